//! Isolation is enforced, not advisory (DESIGN.md §5): containers in
//! different subnets cannot exchange frames, even after adding a route to
//! the other subnet or spoofing an address or a MAC; containers in one
//! subnet on different hosts can. The check that the test can fail: with
//! the rules removed, the same spoofing gets through.

mod common;

use common::*;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

/// `ping` that must fail: two probes, one second each.
fn cannot_ping(from: &Container, ip: &str) -> bool {
    let out = from.exec(
        "ping",
        &["-c", "2", "-W", "1", "-q", ip],
        Duration::from_secs(10),
    );
    !out.status.success()
}

fn in_ns(c: &Container, args: &[&str]) {
    let out = run(
        std::process::Command::new("ip")
            .args(["-n", &c.ns])
            .args(args),
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "ip {args:?} in {}: {}",
        c.name,
        show(&out)
    );
}

#[test]
fn subnets_are_isolated_even_against_routes_and_spoofing() {
    let Some(mut w) = World::new("isolation") else {
        return;
    };
    let (h1, h2) = w.launch_pair(&[]);
    let [a1, a2, b1, b2] = <[Container; 4]>::try_from(w.attach_new(&[
        (&h1, "a1", "198.19.1.1/24"),
        (&h2, "a2", "198.19.1.2/24"),
        (&h1, "b1", "198.19.2.1/24"),
        (&h2, "b2", "198.19.2.2/24"),
    ]))
    .expect("four containers");
    // Same subnet, across hosts and on one host's bridge: allowed.
    wait_ping(&a1, "198.19.1.2", DEADLINE);
    wait_ping(&b1, "198.19.2.2", DEADLINE);

    // b1 adds a route to subnet A: still nothing, on its own host or across.
    in_ns(&b1, &["route", "add", "198.19.1.0/24", "dev", "ethmesh"]);
    assert!(cannot_ping(&b1, "198.19.1.1"), "b1 reached a1 by a route");
    assert!(cannot_ping(&b1, "198.19.1.2"), "b1 reached a2 by a route");

    // b1 spoofs an address of subnet A.
    in_ns(&b1, &["route", "del", "198.19.1.0/24", "dev", "ethmesh"]);
    in_ns(&b1, &["addr", "add", "198.19.1.9/24", "dev", "ethmesh"]);
    assert!(
        cannot_ping(&b1, "198.19.1.1"),
        "b1 reached a1 with a spoofed address"
    );
    assert!(
        cannot_ping(&b1, "198.19.1.2"),
        "b1 reached a2 with a spoofed address"
    );

    // ... and a MAC as well: now even its own subnet is cut off.
    in_ns(
        &b1,
        &["link", "set", "ethmesh", "address", "0a:00:00:00:00:99"],
    );
    assert!(
        cannot_ping(&b1, "198.19.1.2"),
        "b1 reached a2 with a spoofed MAC"
    );
    assert!(
        cannot_ping(&b1, "198.19.2.2"),
        "b1 with a spoofed MAC still talks"
    );

    // The test can fail: without the rules the same spoof gets through.
    for h in [&h1, &h2] {
        let out = run(
            &mut h.command("nft", &["delete", "table", "bridge", "mesh"]),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "nft on {}: {}", h.name, show(&out));
    }
    wait_ping(&b1, "198.19.1.2", DEADLINE);

    // Detaching removes each port's entries (the daemon makes the table
    // again, as someone deleted it).
    for (h, c) in [(&h1, &a1), (&h1, &b1), (&h2, &a2), (&h2, &b2)] {
        h.mesh_ok(&["detach", &c.path]);
    }
    for h in [&h1, &h2] {
        let out = run(
            &mut h.command("nft", &["list", "table", "bridge", "mesh"]),
            Duration::from_secs(10),
        );
        // The rules name every port by the pattern "vmesh*"; no port
        // itself may be left in the sets.
        let text = String::from_utf8_lossy(&out.stdout).replace("\"vmesh*\"", "");
        assert!(
            !text.contains("vmesh"),
            "rules left behind on {} after detaching all:\n{text}",
            h.name
        );
    }
}
