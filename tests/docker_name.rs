//! Docker containers by name or ID as TARGET (DESIGN §2, issue 18): a
//! private real dockerd runs containers (`--network none`, started on
//! dockerd directly, not through the proxy); h1's daemon, launched with
//! `--docker-host` at that dockerd, attaches them by name (named in the mesh
//! by their Docker name), by short ID with no ADDR (their `WEAVE_CIDR`),
//! and detaches by Docker name one that was attached by PID. A container on
//! h2 pings and resolves the one attached by name; `dns-remove` / `dns-add`
//! by ID take its name away and back; `detach` by name releases it. An
//! unknown name, a container that is not running, and a daemon with no
//! Docker behind it are each one clear line and a non-zero exit.

mod common;

use common::docker::{Docker, IMAGE};
use common::*;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);
const SUBNET: &str = "198.19.3.0/24";

/// `mesh ARGS...` on `h`, which must fail with one line on stderr
/// containing every one of `words`; returns the line.
#[track_caller]
fn fails_with(h: &Host, args: &[&str], words: &[&str]) -> String {
    let out = h.mesh(args);
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(
        !out.status.success() && err.lines().count() == 1,
        "`mesh {}` should fail with one line: {}",
        args.join(" "),
        show(&out)
    );
    for w in words {
        assert!(
            err.contains(w),
            "`mesh {}`: {err:?} lacks {w:?}",
            args.join(" ")
        );
    }
    err
}

#[test]
fn attach_detach_and_dns_by_docker_name_or_id() {
    let Some(mut w) = World::new("docker_name") else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    // Declared after the world, so dropped (containers gone) before it.
    let d = Docker::new(w.dir.join("d"));
    let dockerd = format!("unix://{}", d.socket().display());
    let range = ["--ipalloc-range", "198.19.0.0/16"];
    w.launch(&h1, &[&range[..], &["--docker-host", &dockerd]].concat());
    let missing = format!("unix://{}", w.dir.join("no-docker.sock").display());
    w.launch(
        &h2,
        &[&range[..], &["--docker-host", &missing, "198.18.0.1"]].concat(),
    );
    let c2 = w.add_container("c2");
    let c2_ip = w.attach_net(&h2, &c2, SUBNET);

    let run = |name: &str, env: &[&str]| -> String {
        let mut args = vec!["run", "-d", "--network", "none", "--name", name];
        args.extend_from_slice(env);
        args.extend_from_slice(&[IMAGE, "sleep", "300"]);
        d.ok(&args)
    };
    run("app", &[]);

    // Unknown: one line naming the socket asked.
    fails_with(
        &h1,
        &["attach", "nosuch"],
        &["no container \"nosuch\"", "known to Docker", &dockerd],
    );
    fails_with(
        &h1,
        &["attach", "net:198.19.3.0/24", "nosuch"],
        &["no container \"nosuch\""],
    );
    // No Docker daemon behind h2.
    fails_with(
        &h2,
        &["attach", "app"],
        &["no Docker daemon answers", &missing],
    );
    // Not running.
    d.ok(&[
        "create",
        "--network",
        "none",
        "--name",
        "idle",
        IMAGE,
        "sleep",
        "1",
    ]);
    fails_with(&h1, &["attach", "idle"], &["idle", "is not running"]);

    // By name: the CIDR printed, `mesh ps` names it as Docker does.
    let out = h1.mesh_ok(&["attach", &format!("net:{SUBNET}"), "app"]);
    let ip = first_addr(&out);
    assert!(ip.starts_with("198.19.3."), "attach printed {out:?}");
    let (_, seen) = h1.attached("app").expect("mesh ps on h1 lists app");
    assert_eq!(seen, ip);
    wait_ping(&c2, &ip, DEADLINE);
    wait_until(DEADLINE, "app pings c2 (docker exec)", || {
        d.run_via(
            &d.socket(),
            &["exec", "app", "ping", "-c", "1", "-W", "1", &c2_ip],
        )
        .status
        .success()
    });
    wait_until(DEADLINE, "c2 resolves app.mesh.local", || {
        dig_a(&c2, "app.mesh.local") == vec![ip.clone()]
    });

    // DNS by short ID (Docker resolves it; the manager matches the netns).
    let id = d.ok(&["inspect", "-f", "{{.Id}}", "app"]);
    let short = &id[..12];
    h1.mesh_ok(&["dns-remove", &ip, short]);
    wait_until(DEADLINE, "app.mesh.local gone after dns-remove", || {
        dig_a(&c2, "app.mesh.local").is_empty()
    });
    h1.mesh_ok(&["dns-add", &ip, "app"]);
    wait_until(DEADLINE, "app.mesh.local back after dns-add", || {
        dig_a(&c2, "app.mesh.local") == vec![ip.clone()]
    });

    // By short ID, with no ADDR: its WEAVE_CIDR.
    let id2 = run("app2", &["-e", "WEAVE_CIDR=net:198.19.3.0/24"]);
    let out = h1.mesh_ok(&["attach", &id2[..12]]);
    let ip2 = first_addr(&out);
    assert!(ip2.starts_with("198.19.3."), "attach by ID printed {out:?}");
    assert!(h1.attached("app2").is_some(), "mesh ps lacks app2");
    wait_ping(&c2, &ip2, DEADLINE);
    // --name wins over the Docker name.
    let id4 = run("app4", &[]);
    h1.mesh_ok(&["attach", "net:198.19.3.0/24", "--name", "other", &id4]);
    assert!(h1.attached("other").is_some(), "mesh ps lacks other");

    // Attached by PID, detached by Docker name.
    run("app3", &[]);
    let pid3 = d.ok(&["inspect", "-f", "{{.State.Pid}}", "app3"]);
    let out = h1.mesh_ok(&["attach", "net:198.19.3.0/24", &pid3]);
    let ip3 = first_addr(&out);
    assert!(
        h1.ps()
            .iter()
            .any(|e| e.cidrs.iter().any(|c| c.starts_with(&format!("{ip3}/")))),
        "app3 (by PID) not in mesh ps"
    );
    h1.mesh_ok(&["detach", "app3"]);
    assert!(
        !h1.ps()
            .iter()
            .any(|e| e.cidrs.iter().any(|c| c.starts_with(&format!("{ip3}/")))),
        "app3 still attached after mesh detach app3"
    );
    fails_with(
        &h1,
        &["detach", "app3"],
        &["no attached container matches app3", "Docker container"],
    );
    fails_with(
        &h1,
        &["detach", "nosuch"],
        &["no attached container matches nosuch", "known to Docker"],
    );

    // Detach by name releases.
    h1.mesh_ok(&["detach", "app"]);
    assert!(h1.attached("app").is_none(), "app still attached");
    wait_until(DEADLINE, "app.mesh.local gone after detach", || {
        dig_a(&c2, "app.mesh.local").is_empty()
    });
    h1.mesh_ok(&["detach", "app2"]);
    h1.mesh_ok(&["detach", "other"]);
    assert!(h1.ps().is_empty(), "mesh ps on h1: {:?}", h1.ps());
}
