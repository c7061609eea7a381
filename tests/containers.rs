//! Containers and hosts (issue 6), the seed's walk-through end to end: a
//! process attached by PID from its WEAVE_CIDR, a `mesh run` container on
//! another host reaching it by IP and by name, a container of another
//! subnet cut off, `mesh expose` letting the host in, an outside host
//! routing through the exposing peer, `mesh hide` undoing it, and `mesh
//! run`'s exit status and release.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);
const SUBNET: &str = "198.19.3.0/24";

/// A child process killed (and reaped) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn attached_ip(h: &Host, id: &str) -> Option<String> {
    h.attached(id).map(|(_, ip)| ip)
}

/// `nsenter -t PID -n CMD...` (the process's network namespace only).
fn in_pid_ns(pid: u32, args: &[&str]) -> std::process::Output {
    run(
        Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-n"])
            .args(args),
        Duration::from_secs(15),
    )
}

fn pid_ping(pid: u32, ip: &str) -> bool {
    in_pid_ns(pid, &["ping", "-c", "1", "-W", "1", "-q", ip])
        .status
        .success()
}

#[test]
fn the_seed_walkthrough_on_real_namespaces() {
    let Some(mut w) = World::new("containers") else {
        return;
    };
    let hosts: Vec<Host> = (0..3).map(|_| w.add_host()).collect();
    let outside = w.add_host();
    for (i, h) in hosts.iter().enumerate() {
        let mut args = vec!["--ipalloc-range", "198.19.0.0/16"];
        if i > 0 {
            args.push("198.18.0.1");
        }
        w.launch(h, &args);
    }

    // A process with WEAVE_CIDR in its environment, in namespaces of its
    // own (unshare), attached by PID with no ADDR.
    let child = hosts[0]
        .command(
            "unshare",
            &[
                "--net",
                "--uts",
                "sh",
                "-c",
                "hostname pidc && exec env WEAVE_CIDR=net:198.19.3.0/24 sleep 300",
            ],
        )
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare");
    let pidc = Proc(child);
    let pid = pidc.0.id();
    wait_until(DEADLINE, "the unshared process runs sleep", || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    });
    let out = hosts[0].mesh_ok(&["attach", &pid.to_string()]);
    let pidc_ip = out
        .lines()
        .next()
        .and_then(|l| l.split('/').next())
        .expect("attach prints a CIDR")
        .to_string();
    assert!(
        pidc_ip.starts_with("198.19.3."),
        "attached at {out}, not in {SUBNET}"
    );

    // `mesh run` on h3 in the same subnet, chosen by -e WEAVE_CIDR.
    let runner = Proc(
        hosts[2]
            .command(
                MESH,
                &[
                    "run",
                    "-e",
                    "WEAVE_CIDR=net:198.19.3.0/24",
                    "--name",
                    "r",
                    "--",
                    "sleep",
                    "300",
                ],
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("mesh run"),
    );
    let r_ip = wait_for(DEADLINE, "r is attached on h3", || {
        attached_ip(&hosts[2], "r").ok_or_else(|| "not yet".into())
    });
    assert!(r_ip.starts_with("198.19.3."), "r at {r_ip}");
    // By IP, and by name through the mesh's DNS inside the namespace.
    wait_until(DEADLINE, "pidc pings r", || pid_ping(pid, &r_ip));
    wait_until(DEADLINE, "pidc resolves r", || {
        let out = in_pid_ns(
            pid,
            &["dig", "+short", "+time=2", "+tries=1", "@127.0.0.11", "r"],
        );
        String::from_utf8_lossy(&out.stdout).trim() == r_ip
    });
    // And r resolves pidc by its hostname.
    let out = in_pid_ns(
        pid,
        &[
            "dig",
            "+short",
            "+time=2",
            "+tries=1",
            "@127.0.0.11",
            "pidc.mesh.local",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        pidc_ip,
        "pidc by hostname"
    );

    // A container in another subnet reaches neither, even with a route.
    let other = w.add_container("other");
    let out = hosts[1].mesh_ok(&["attach", "net:198.19.4.0/24", &other.path]);
    assert!(out.starts_with("198.19.4."), "{out}");
    let route = run(
        Command::new("ip").args(["-n", &other.ns, "route", "add", SUBNET, "dev", "ethmesh"]),
        Duration::from_secs(10),
    );
    assert!(route.status.success(), "{}", show(&route));
    for ip in [&pidc_ip, &r_ip] {
        let out = other.exec(
            "ping",
            &["-c", "2", "-W", "1", "-q", ip],
            Duration::from_secs(10),
        );
        assert!(!out.status.success(), "the other subnet reached {ip}");
    }

    // Bad input: an unknown PID, a subnet outside the range.
    let out = hosts[0].mesh(&["attach", &dead_pid().to_string()]);
    assert_one_line_error(&out, "attach to a dead PID");
    let out = hosts[0].mesh(&["expose", "net:10.99.0.0/24"]);
    assert_one_line_error(&out, "expose outside the range");

    // The host joins the subnet: it reaches containers on every host.
    let exposed = hosts[0].mesh_ok(&["expose", "net:198.19.3.0/24"]);
    let exposed = exposed.trim().to_string();
    assert!(
        exposed.starts_with("198.19.3."),
        "expose printed {exposed:?}"
    );
    let out = hosts[0].mesh(&["expose", "net:198.19.3.0/24"]);
    let err = assert_one_line_error(&out, "expose twice");
    assert!(err.contains("already exposed"), "{err}");
    let host_ping = |ip: &str| {
        run(
            &mut hosts[0].command("ping", &["-c", "1", "-W", "1", "-q", ip]),
            Duration::from_secs(10),
        )
        .status
        .success()
    };
    wait_until(DEADLINE, "h1 pings r on h3", || host_ping(&r_ip));
    wait_until(DEADLINE, "h1 pings pidc", || host_ping(&pidc_ip));

    // An outside host routes the subnet via h1 and reaches containers on
    // h1 and on h3 (attached before the expose).
    let route = run(
        &mut outside.command("ip", &["route", "add", SUBNET, "via", "198.18.0.1"]),
        Duration::from_secs(10),
    );
    assert!(route.status.success(), "{}", show(&route));
    let outside_ping = |ip: &str| {
        run(
            &mut outside.command("ping", &["-c", "1", "-W", "1", "-q", ip]),
            Duration::from_secs(10),
        )
        .status
        .success()
    };
    wait_until(DEADLINE, "the outside host pings pidc on h1", || {
        outside_ping(&pidc_ip)
    });
    wait_until(DEADLINE, "the outside host pings r on h3", || {
        outside_ping(&r_ip)
    });
    // And pidc, in the exposed subnet on h1, goes out through h1 (its
    // default route was set by the expose, its source masqueraded).
    wait_until(DEADLINE, "pidc pings the outside host", || {
        pid_ping(pid, &outside.ip.to_string())
    });

    // Several subnets on one container.
    let multi = w.add_container("multi");
    let out = hosts[1].mesh_ok(&[
        "attach",
        "net:198.19.5.0/24",
        "net:198.19.6.0/24",
        &multi.path,
    ]);
    let cidrs: Vec<&str> = out.lines().collect();
    assert!(
        cidrs.len() == 2 && cidrs[0].starts_with("198.19.5.") && cidrs[1].starts_with("198.19.6."),
        "attach net:A net:B printed {out:?}"
    );

    // Hide: the address and the NAT rules go.
    hosts[0].mesh_ok(&["hide"]);
    let addrs = run(
        &mut hosts[0].command("ip", &["-o", "addr", "show", "dev", "mesh"]),
        Duration::from_secs(10),
    );
    assert!(
        !String::from_utf8_lossy(&addrs.stdout).contains(&exposed),
        "{exposed} still on the bridge"
    );
    let rules = run(
        &mut hosts[0].command("nft", &["list", "ruleset"]),
        Duration::from_secs(10),
    );
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("table ip mesh"),
        "NAT rules left after hide"
    );

    // mesh run: SIGTERM reaches CMD, the exit status comes back (143), and
    // r is released.
    let run_pid = runner.0.id() as i32;
    terminate_child(run_pid);
    wait_until(DEADLINE, "r is released on h3", || {
        attached_ip(&hosts[2], "r").is_none()
    });
    drop(runner);
    let out = run(
        &mut hosts[2].command(MESH, &["run", "--", "sh", "-c", "exit 3"]),
        DEADLINE,
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "mesh run's status: {}",
        show(&out)
    );
    drop(pidc);
}

/// SIGTERM to a process we started.
fn terminate_child(pid: i32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}
