//! The kernel VXLAN fast path, on real kernel devices in namespaces.
//!
//! Two hosts with a container each. A default launch carries container
//! traffic over `vxmesh` (UDP 6784) and says so in `mesh status` and `mesh
//! report`; a password or `--no-fastdp` keeps the sleeve (unless the peer
//! is in `--trusted-subnets`); blocking UDP 6784 with nftables moves the
//! connection to the sleeve without losing the containers' connectivity,
//! and unblocking brings the fast path back; a bulk TCP transfer of a fixed
//! size crosses the fast path whole.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// How long containers may take to reach each other.
const PING_DEADLINE: Duration = Duration::from_secs(20);
/// Bytes sent by the bulk transfer.
const BULK_BYTES: u64 = 8 << 20;

/// Two hosts (h2 joins h1) launched with these extra arguments, a
/// container on each, attached.
fn pair(w: &mut World, args1: &[&str], args2: &[&str]) -> (Host, Host, Container, Container) {
    let h1 = w.add_host();
    let h2 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    w.launch(&h1, args1);
    let mut a2 = args2.to_vec();
    a2.push("198.18.0.1");
    w.launch(&h2, &a2);
    w.attach(&h1, &c1, "198.19.1.1/24");
    w.attach(&h2, &c2, "198.19.1.2/24");
    (h1, h2, c1, c2)
}

fn ping_both(c1: &Container, c2: &Container) {
    wait_ping(c1, "198.19.1.2", PING_DEADLINE);
    wait_ping(c2, "198.19.1.1", PING_DEADLINE);
}

/// Drops UDP to port 6784 arriving in `host`'s namespace (its own table).
fn block_fastdp(host: &Host) {
    let script = "table inet mtfastdp {\n chain in {\n  type filter hook input priority -10; policy accept;\n  udp dport 6784 drop\n }\n}\n";
    let path = host.run_dir.join("block.nft");
    std::fs::write(&path, script).expect("write nft script");
    let out = run(
        Command::new("ip")
            .args(["netns", "exec", &host.ns, "nft", "-f"])
            .arg(&path),
        CMD_TIMEOUT,
    );
    assert!(out.status.success(), "nft: {}", show(&out));
}

fn unblock_fastdp(host: &Host) {
    let out = run(
        Command::new("ip").args([
            "netns", "exec", &host.ns, "nft", "delete", "table", "inet", "mtfastdp",
        ]),
        CMD_TIMEOUT,
    );
    assert!(out.status.success(), "nft: {}", show(&out));
}

/// Test 1: a default launch uses the fast path, says so, and containers ping.
#[test]
fn default_launch_uses_fastdp() {
    let Some(mut w) = World::new("default_launch_uses_fastdp") else {
        return;
    };
    let (h1, h2, c1, c2) = pair(&mut w, &[], &[]);
    assert_eq!(wait_overlay(&h1, "fastdp"), None);
    assert_eq!(wait_overlay(&h2, "fastdp"), None);
    let status = h2.status();
    assert!(
        status
            .lines()
            .any(|l| l.contains("established") && l.contains(" fastdp ")),
        "h2's status does not show the fast path:\n{status}"
    );
    ping_both(&c1, &c2);
    // Each host programs the other's container MAC once its probes list it.
    wait_programmed(&h1, &c2);
    wait_programmed(&h2, &c1);
    let capture = w.capture(&h1);
    wait_until(PING_DEADLINE, "c1 pings c2 with the pattern", || {
        ping_pattern(&c1.ns, "198.19.1.2", PATTERN_HEX, 200)
    });
    wait_until(PING_DEADLINE, "c2 pings c1 with the pattern", || {
        ping_pattern(&c2.ns, "198.19.1.1", PATTERN_HEX, 200)
    });
    let pcap = capture.stop();
    let on = |port: u16| {
        pcap.packets.iter().any(|p| {
            pcap.udp_ports(p)
                .is_some_and(|(s, d)| s == port || d == port)
                && contains_bytes(p, PATTERN)
        })
    };
    assert!(
        on(6784),
        "the pings did not cross as VXLAN: {}",
        pcap.summary()
    );
    assert!(
        !on(PORT),
        "the pings crossed the sleeve: {}",
        pcap.summary()
    );
}

/// `ping -p` pattern: ASCII "mesh-fastdp".
const PATTERN_HEX: &str = "6d6573682d666173746470";
/// The same bytes, looked for on the underlay.
const PATTERN: &[u8] = b"mesh-fastdp";

/// Test 2: with a password the sleeve is used (encrypted), and says why.
#[test]
fn password_uses_sleeve() {
    let Some(mut w) = World::new("password_uses_sleeve") else {
        return;
    };
    let pw = ["--password", "s3cret"];
    let (h1, h2, c1, c2) = pair(&mut w, &pw, &pw);
    let why = wait_overlay(&h2, "sleeve").unwrap_or_default();
    assert!(why.contains("password"), "reason {why:?}");
    wait_overlay(&h1, "sleeve");
    ping_both(&c1, &c2);
    let status = h2.status();
    assert!(
        status.lines().any(|l| l.contains("encrypted sleeve")),
        "{status}"
    );
    // Still the sleeve after traffic has flowed.
    wait_overlay(&h1, "sleeve");
}

/// Test 2b: with a password, peers that list each other in
/// `--trusted-subnets` use the fast path.
#[test]
fn trusted_subnets_use_fastdp_with_password() {
    let Some(mut w) = World::new("trusted_subnets_use_fastdp_with_password") else {
        return;
    };
    let args = [
        "--password",
        "s3cret",
        "--trusted-subnets",
        "198.18.0.0/24,198.18.9.0/24",
    ];
    let (h1, h2, c1, c2) = pair(&mut w, &args, &args);
    wait_overlay(&h1, "fastdp");
    wait_overlay(&h2, "fastdp");
    ping_both(&c1, &c2);
}

/// Test 3: `--no-fastdp` on one end keeps both ends on the sleeve.
#[test]
fn no_fastdp_uses_sleeve() {
    let Some(mut w) = World::new("no_fastdp_uses_sleeve") else {
        return;
    };
    let (h1, h2, c1, c2) = pair(&mut w, &["--no-fastdp"], &[]);
    let why = wait_overlay(&h2, "sleeve").unwrap_or_default();
    assert!(why.contains("does not offer"), "h2's reason {why:?}");
    let why = wait_overlay(&h1, "sleeve").unwrap_or_default();
    assert!(why.contains("disabled"), "h1's reason {why:?}");
    ping_both(&c1, &c2);
    let links = ip(&["-n", &h1.ns, "-o", "link", "show"]);
    assert!(!links.contains("vxmesh"), "h1 has a vxmesh: {links}");
}

/// Test 4: blocking UDP 6784 on one host moves the connection to the sleeve
/// at both ends and the containers keep (or regain) connectivity; lifting
/// the block brings the fast path back.
#[test]
fn blocked_fastdp_falls_back_to_sleeve_and_recovers() {
    let Some(mut w) = World::new("blocked_fastdp_falls_back_to_sleeve_and_recovers") else {
        return;
    };
    let (h1, h2, c1, c2) = pair(&mut w, &[], &[]);
    wait_overlay(&h1, "fastdp");
    wait_overlay(&h2, "fastdp");
    ping_both(&c1, &c2);

    block_fastdp(&h2);
    // h2 stops hearing h1's probes; h1 learns that h2 does not hear it.
    let why = wait_overlay(&h2, "sleeve").unwrap_or_default();
    assert!(why.contains("6784"), "h2's reason {why:?}");
    let why = wait_overlay(&h1, "sleeve").unwrap_or_default();
    assert!(why.contains("6784"), "h1's reason {why:?}");
    ping_both(&c1, &c2);

    unblock_fastdp(&h2);
    wait_overlay(&h1, "fastdp");
    wait_overlay(&h2, "fastdp");
    ping_both(&c1, &c2);
}

/// Test 5: a bulk TCP transfer of a fixed size over the fast path arrives
/// whole and intact, and it crossed the underlay as VXLAN, not as sleeve
/// datagrams.
#[test]
fn bulk_tcp_over_fastdp() {
    let Some(mut w) = World::new("bulk_tcp_over_fastdp") else {
        return;
    };
    let (h1, h2, c1, c2) = pair(&mut w, &[], &[]);
    wait_overlay(&h1, "fastdp");
    wait_overlay(&h2, "fastdp");
    ping_both(&c1, &c2);
    wait_programmed(&h1, &c2);
    wait_programmed(&h2, &c1);
    let capture = w.capture(&h1);
    bulk_tcp(&c1, &c2, "198.19.1.2:5201", BULK_BYTES);
    let pcap = capture.stop();
    let udp_bytes = |port: u16| -> usize {
        pcap.packets
            .iter()
            .filter(|p| {
                pcap.udp_ports(p)
                    .is_some_and(|(s, d)| s == port || d == port)
            })
            .map(Vec::len)
            .sum()
    };
    let (vx, sleeve) = (udp_bytes(6784), udp_bytes(PORT));
    // tcpdump may drop some of a burst this fast: a quarter is plenty to
    // tell the paths apart.
    assert!(
        vx as u64 >= BULK_BYTES / 4,
        "only {vx} bytes of VXLAN on the underlay for {BULK_BYTES} sent (sleeve: {sleeve}): {}",
        pcap.summary()
    );
    assert!(
        (sleeve as u64) < BULK_BYTES / 8,
        "{sleeve} bytes went over the sleeve: {}",
        pcap.summary()
    );
}

/// Test 6: h1 and h3 cannot reach each other directly (partitioned on the
/// underlay), both reach h2. h1–h2 and h2–h3 use the fast path; c1 and c3
/// still talk, relayed by h2's sleeve, and no MAC of c1 or c3 is ever
/// programmed towards h2 (relayed traffic stays on the sleeve).
#[test]
fn relayed_traffic_stays_on_sleeve() {
    let Some(mut w) = World::new("relayed_traffic_stays_on_sleeve") else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    let h3 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    let c3 = w.add_container("c3");
    w.partition(&h1, &[h3.ip]);
    w.launch(&h2, &[]);
    w.launch(&h1, &["198.18.0.2"]);
    w.launch(&h3, &["198.18.0.2"]);
    w.attach(&h1, &c1, "198.19.1.1/24");
    w.attach(&h2, &c2, "198.19.1.2/24");
    w.attach(&h3, &c3, "198.19.1.3/24");
    wait_overlay(&h1, "fastdp");
    wait_overlay(&h3, "fastdp");
    ping_both(&c1, &c2);
    wait_ping(&c1, "198.19.1.3", PING_DEADLINE);
    wait_ping(&c3, "198.19.1.1", PING_DEADLINE);
    wait_ping(&c3, "198.19.1.2", PING_DEADLINE);
    wait_programmed(&h1, &c2);
    wait_programmed(&h3, &c2);
    // Still relayed, and never programmed into a VXLAN FDB.
    wait_ping(&c1, "198.19.1.3", PING_DEADLINE);
    for (h, c) in [(&h1, &c3), (&h3, &c1)] {
        let mac = c.ethmesh_mac().expect("container MAC");
        let fdb = ip_fdb(h);
        assert!(
            !fdb.lines().any(|l| l.starts_with(&mac)),
            "{} programmed the relayed container {}'s MAC on vxmesh:\n{fdb}",
            h.name,
            c.name
        );
    }
}

fn ip_fdb(h: &Host) -> String {
    let out = run(
        Command::new("bridge").args(["-n", &h.ns, "fdb", "show", "dev", "vxmesh"]),
        CMD_TIMEOUT,
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The device's life: created at launch as a port of the bridge, kept off
/// by `--no-fastdp`, removed by `mesh reset`.
#[test]
fn vxmesh_created_at_launch_removed_by_reset() {
    let Some(mut w) = World::new("vxmesh_created_at_launch_removed_by_reset") else {
        return;
    };
    let h1 = w.add_host();
    let has_vxmesh = |h: &Host| {
        let out = run(
            Command::new("ip").args(["-n", &h.ns, "-d", "link", "show", "vxmesh"]),
            CMD_TIMEOUT,
        );
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    w.launch(&h1, &[]);
    let link = has_vxmesh(&h1).expect("vxmesh after launch");
    for want in ["master mesh", "dstport 6784", "nolearning", "mtu 1450"] {
        assert!(link.contains(want), "no {want:?} in {link}");
    }
    h1.mesh_ok(&["stop"]);
    w.launch(&h1, &["--no-fastdp"]);
    assert_eq!(has_vxmesh(&h1), None, "vxmesh left with --no-fastdp");
    h1.mesh_ok(&["stop"]);
    w.launch(&h1, &[]);
    assert!(has_vxmesh(&h1).is_some(), "vxmesh after relaunch");
    h1.mesh_ok(&["reset"]);
    wait_until(CMD_TIMEOUT, "the daemon exits after reset", || {
        h1.daemon_pid().is_none_or(|p| !pid_alive(p))
    });
    assert_eq!(has_vxmesh(&h1), None, "vxmesh left after reset");
}
