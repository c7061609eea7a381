//! The Docker network plugin (DESIGN §7) end to end, with the real Docker
//! engine: two namespace hosts, each with its own private `dockerd` and a
//! mesh daemon serving the plugin on `/run/docker/plugins/<name>.sock`
//! (names unique to the run). On each host `docker network create --driver
//! N --ipam-driver N --subnet 198.19.5.0/24 app`; `docker run --network
//! app` on h1 and h2: the two reach each other by IP and by name (FQDN and
//! single label, through the mesh's DNS at 127.0.0.11, not Docker's), a
//! container of another Docker network (another subnet, given a route)
//! reaches neither, `docker network disconnect`/`connect` and `docker
//! stop`/`start` leave and join again, `docker
//! rm` releases the address (another container can claim it at once),
//! the daemon restarting under a running container keeps it and Docker's
//! later leave still releases it, `docker network rm` works, a network
//! without the mesh's IPAM is
//! refused with the fix, and `mesh stop` takes the socket away.

mod common;

use common::docker::{Docker, IMAGE};
use common::*;
use std::path::PathBuf;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

/// `docker exec C ping -c 1 -W 1 DEST` succeeds.
fn docker_ping(d: &Docker, c: &str, dest: &str) -> bool {
    run(
        &mut d.cmd(&["exec", c, "ping", "-c", "1", "-W", "1", dest]),
        Duration::from_secs(20),
    )
    .status
    .success()
}

/// The container's address on Docker network `net`.
fn docker_ip(d: &Docker, c: &str, net: &str) -> String {
    d.ok(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
        c,
    ])
}

/// The container's sandbox (its network namespace's path).
fn sandbox(d: &Docker, c: &str) -> String {
    d.ok(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", c])
}

/// Wait until `mesh ps` on `h` lists `name` (adopted once its sandbox
/// exists); its address.
#[track_caller]
fn wait_attached(h: &Host, name: &str) -> String {
    wait_for(
        DEADLINE,
        &format!("mesh ps on {} lists {name}", h.name),
        || h.attached(name).ok_or("not yet".to_string()),
    )
    .1
}

/// `mesh ps` on `h` no longer lists `name` (right after `what` returned).
#[track_caller]
fn assert_detached(h: &Host, name: &str, what: &str) {
    assert!(
        h.ps().iter().all(|e| e.id != name),
        "{name} still attached on {} after {what}",
        h.name
    );
}

/// `docker run -d --network NET --ip IP --name NAME` (sleeping).
fn run_at(d: &Docker, net: &str, ip: &str, name: &str) {
    d.ok(&[
        "run",
        "-d",
        "--network",
        net,
        "--ip",
        ip,
        "--name",
        name,
        IMAGE,
        "sleep",
        "600",
    ]);
}

fn run_on(d: &Docker, net: &str, name: &str) {
    d.ok(&[
        "run",
        "-d",
        "--network",
        net,
        "--name",
        name,
        IMAGE,
        "sleep",
        "600",
    ]);
}

#[test]
fn docker_network_create_driver_mesh_across_two_hosts() {
    let Some(mut w) = World::new("docker_plugin") else {
        return;
    };
    let mut h1 = w.add_host();
    let mut h2 = w.add_host();
    // Declared after the world: dropped (containers gone) before it.
    let d1 = Docker::in_netns(w.dir.join("d1"), &h1.ns);
    let d2 = Docker::in_netns(w.dir.join("d2"), &h2.ns);
    let plugins = PathBuf::from("/run/docker/plugins");
    let (n1, n2) = (format!("{}h1", w.prefix), format!("{}h2", w.prefix));
    h1.plugin_dir = plugins.clone();
    h2.plugin_dir = plugins.clone();
    let range = ["--ipalloc-range", "198.19.0.0/16"];
    let sock = |d: &Docker| format!("unix://{}", d.socket().display());
    w.launch(
        &h1,
        &[
            &range[..],
            &["--docker-host", &sock(&d1), "--docker-plugin", &n1],
        ]
        .concat(),
    );
    w.launch(
        &h2,
        &[
            &range[..],
            &["--docker-host", &sock(&d2), "--docker-plugin", &n2],
            &["198.18.0.1"],
        ]
        .concat(),
    );
    let socket1 = plugins.join(format!("{n1}.sock"));
    assert!(socket1.exists(), "no plugin socket {}", socket1.display());

    // Without the mesh's IPAM each host would hand out the same addresses;
    // a subnet outside the range: each refused, saying what to do.
    let ipam = format!("--ipam-driver {n1}");
    for (extra, subnet, want) in [
        (&[][..], "198.19.7.0/24", ipam.as_str()),
        (
            &["--ipam-driver", &n1][..],
            "10.1.0.0/24",
            "outside the mesh's range",
        ),
    ] {
        let mut args = vec!["network", "create", "--driver", &n1];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--subnet", subnet, "refused"]);
        let out = d1.run_via(&d1.socket(), &args);
        assert!(
            !out.status.success() && show(&out).contains(want),
            "docker {args:?}: {}",
            show(&out)
        );
    }

    for (d, n) in [(&d1, &n1), (&d2, &n2)] {
        d.ok(&[
            "network",
            "create",
            "--driver",
            n,
            "--ipam-driver",
            n,
            "--subnet",
            "198.19.5.0/24",
            "app",
        ]);
    }
    d2.ok(&[
        "network",
        "create",
        "--driver",
        &n2,
        "--ipam-driver",
        &n2,
        "--subnet",
        "198.19.6.0/24",
        "other",
    ]);
    run_on(&d1, "app", "web");
    run_on(&d2, "app", "client");
    run_on(&d2, "other", "outsider");

    // On the mesh when docker run returns, under its Docker name, with the
    // address Docker reports.
    let web_ip = docker_ip(&d1, "web", "app");
    let ip = wait_attached(&h1, "web");
    assert_eq!(ip, web_ip, "the mesh and Docker agree on web's address");
    assert!(web_ip.starts_with("198.19.5."), "web got {web_ip}");
    let client_ip = docker_ip(&d2, "client", "app");
    assert!(client_ip.starts_with("198.19.5."), "client got {client_ip}");
    assert_ne!(web_ip, client_ip, "two hosts, one subnet, no duplicate");

    // Across the hosts by IP, then by name through the mesh's DNS.
    wait_until(DEADLINE, "client pings web by IP", || {
        docker_ping(&d2, "client", &web_ip)
    });
    wait_until(DEADLINE, "client resolves web.mesh.local", || {
        let out = run(
            &mut d2.cmd(&["exec", "client", "nslookup", "web.mesh.local"]),
            Duration::from_secs(20),
        );
        String::from_utf8_lossy(&out.stdout).contains(&web_ip)
    });
    assert!(
        docker_ping(&d2, "client", "web.mesh.local"),
        "client pings web.mesh.local"
    );
    wait_until(
        DEADLINE,
        "web pings client by its single-label name",
        || docker_ping(&d1, "web", "client"),
    );
    let resolv = d1.ok(&["exec", "web", "cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains("nameserver 127.0.0.11"),
        "web's resolv.conf: {resolv}"
    );

    // Another Docker network is another subnet: even with a route, the
    // outsider reaches neither container.
    let outsider_ip = docker_ip(&d2, "outsider", "other");
    assert!(
        outsider_ip.starts_with("198.19.6."),
        "outsider got {outsider_ip}"
    );
    let key = sandbox(&d2, "outsider");
    run_ok(
        "nsenter",
        &[
            &format!("--net={key}"),
            "ip",
            "route",
            "add",
            "198.19.5.0/24",
            "dev",
            "ethmesh0",
        ],
    );
    for dest in [&web_ip, &client_ip] {
        let out = run(
            &mut d2.cmd(&["exec", "outsider", "ping", "-c", "3", "-W", "1", dest]),
            Duration::from_secs(20),
        );
        assert!(
            !out.status.success(),
            "outsider (network other) reached {dest}: {}",
            show(&out)
        );
    }

    // disconnect leaves at once, connect (the container running) joins.
    d2.ok(&["network", "disconnect", "app", "client"]);
    assert_detached(&h2, "client", "docker network disconnect");
    d2.ok(&["network", "connect", "app", "client"]);
    wait_attached(&h2, "client");
    let client_ip = docker_ip(&d2, "client", "app");
    wait_until(DEADLINE, "web pings client after connect", || {
        docker_ping(&d1, "web", &client_ip)
    });

    // stop leaves (detached when docker returns), start joins again.
    d2.ok(&["stop", "-t", "0", "client"]);
    assert_detached(&h2, "client", "docker stop");
    d2.ok(&["start", "client"]);
    let client_ip = docker_ip(&d2, "client", "app");
    let ip = wait_attached(&h2, "client");
    assert_eq!(ip, client_ip);
    wait_until(DEADLINE, "web pings client after its restart", || {
        docker_ping(&d1, "web", &client_ip)
    });

    // rm releases the address: another container claims it at once.
    d1.ok(&["rm", "-f", "web"]);
    assert_detached(&h1, "web", "docker rm -f");
    run_at(&d1, "app", &web_ip, "web2");
    assert_eq!(docker_ip(&d1, "web2", "app"), web_ip);
    wait_until(DEADLINE, "client pings web2 at web's old address", || {
        docker_ping(&d2, "client", &web_ip)
    });
    // The daemon restarted under a running container: it keeps it, and
    // Docker's leave afterwards (the plugin's memory of the endpoint gone
    // with the old daemon) still detaches it and frees its address.
    h1.mesh_ok(&["stop"]);
    w.launch(
        &h1,
        &[
            &range[..],
            &["--docker-host", &sock(&d1), "--docker-plugin", &n1],
        ]
        .concat(),
    );
    wait_attached(&h1, "web2");
    wait_until(DEADLINE, "client pings web2 after h1's restart", || {
        docker_ping(&d2, "client", &web_ip)
    });
    d1.ok(&["stop", "-t", "0", "web2"]);
    assert_detached(
        &h1,
        "web2",
        "docker stop (the daemon restarted since its join)",
    );
    d1.ok(&["rm", "-f", "web2"]);
    run_at(&d1, "app", &web_ip, "web3");
    wait_attached(&h1, "web3");
    d1.ok(&["rm", "-f", "web3"]);
    d1.ok(&["network", "rm", "app"]);
    assert!(h1.ps().is_empty(), "h1 still lists: {:?}", h1.ps());

    // mesh stop takes the plugin's socket away.
    h1.mesh_ok(&["stop"]);
    assert!(!socket1.exists(), "plugin socket left after stop");
}
