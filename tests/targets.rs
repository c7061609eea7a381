//! Connection targets: `mesh connect` / `mesh forget`, persisted across
//! restarts, and `mesh report` as JSON with its documented field names.

mod common;

use common::*;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(20);

fn established_to(host: &Host, addr: &str) -> bool {
    host.mesh_ok(&["status", "connections"])
        .lines()
        .any(|l| l.contains(addr) && l.contains("established"))
}

#[test]
fn connect_forget_and_persisted_targets() {
    let Some(mut w) = World::new("connect_forget_and_persisted_targets") else {
        return;
    };
    let (hosts, cs) = w.add_hosts_with_containers(2);
    let (h1, h2, c2) = (&hosts[0], &hosts[1], &cs[1]);
    w.launch(h1, &[]);
    w.launch(h2, &[]);
    w.attach_each(&hosts, &cs);
    assert!(h2.mesh_ok(&["status", "targets"]).trim().is_empty());

    // A bad target is one clear error and changes nothing.
    let out = h2.mesh(&["connect", "not a host!"]);
    assert!(!out.status.success(), "bad connect target accepted");
    assert!(h2.mesh_ok(&["status", "targets"]).trim().is_empty());

    h2.mesh_ok(&["connect", "198.18.0.1"]);
    assert_eq!(h2.mesh_ok(&["status", "targets"]).trim(), "198.18.0.1");
    wait_until(DEADLINE, "h2 connects to h1 after mesh connect", || {
        established_to(h2, "198.18.0.1:6783")
    });
    wait_ping(c2, "198.19.1.1", DEADLINE);

    // The target survives a restart: h2 relaunched with no PEER reconnects.
    let pid = h2.daemon_pid().expect("h2 pid");
    h2.mesh_ok(&["stop"]);
    wait_until(DEADLINE, "h2 exits", || !pid_alive(pid));
    w.launch(h2, &[]);
    assert_eq!(h2.mesh_ok(&["status", "targets"]).trim(), "198.18.0.1");
    wait_until(DEADLINE, "h2 reconnects to its persisted target", || {
        established_to(h2, "198.18.0.1:6783")
    });
    wait_ping(c2, "198.19.1.1", DEADLINE);

    // The report is JSON with the documented fields.
    let report: serde_json::Value =
        serde_json::from_str(&h2.mesh_ok(&["report"])).expect("mesh report is JSON");
    for field in [
        "name",
        "nickname",
        "encryption",
        "connections",
        "peers",
        "targets",
        "sleeve",
    ] {
        assert!(
            report.get(field).is_some(),
            "report lacks {field}: {report}"
        );
    }
    assert_eq!(report["targets"][0], "198.18.0.1");
    let conns = report["connections"].as_array().expect("connections array");
    assert!(
        conns
            .iter()
            .any(|c| c["state"] == "established" && c["direction"] == "outbound"),
        "no established outbound connection in report: {report}"
    );

    // Forget: no longer a target, and not redialed after a restart.
    h2.mesh_ok(&["forget", "198.18.0.1"]);
    assert!(h2.mesh_ok(&["status", "targets"]).trim().is_empty());
    let pid = h2.daemon_pid().expect("h2 pid");
    h2.mesh_ok(&["stop"]);
    wait_until(DEADLINE, "h2 exits", || !pid_alive(pid));
    w.launch(h2, &[]);
    assert!(
        h2.mesh_ok(&["status", "targets"]).trim().is_empty(),
        "a forgotten target came back after restart"
    );
    let status = h2.mesh_ok(&["status", "connections"]);
    assert!(
        !status.contains("198.18.0.1:6783"),
        "a forgotten target was dialed after restart:\n{status}"
    );
}
