//! The data path end to end, on every overlay: real daemons, real kernel
//! devices, real TCP between container namespaces.
//!
//! For each overlay (the kernel VXLAN fast path of a default launch, the
//! sleeve with `--no-fastdp`, the encrypted sleeve with `--password`), two
//! hosts with a container each: the connection settles on the expected
//! overlay; a 9,000-byte ping (fragmented by the container into overlay-MTU
//! pieces) gets its replies both ways; 64 MiB of a known byte stream cross
//! over TCP in each direction, every byte checked; a capture of the underlay
//! shows the stream crossed on the expected UDP port, in clear without a
//! password and never in clear with one.
//!
//! Three hosts in a chain (h1 and h3 cannot reach each other on the
//! underlay, both reach h2): 64 MiB from c1 to c3 arrive intact, relayed by
//! h2's sleeve, plain and encrypted. (The fast path never carries relayed
//! traffic: see `tests/fastdp.rs`.)
//!
//! The sleeve on an underlay route with a smaller MTU (1280) than the link's
//! (1500): bulk TCP and the 9,000-byte ping still get through whole.

mod common;

use std::time::Duration;

use common::*;

/// How long containers may take to reach each other.
const PING_DEADLINE: Duration = Duration::from_secs(20);
/// Bytes of each bulk transfer.
const BULK_BYTES: u64 = 64 << 20;
/// The encrypted sleeve's password.
const PASSWORD: &str = "dp-s3cret";
/// The sleeve, no password.
const PLAIN: &[&str] = &["--no-fastdp"];
/// The sleeve, encrypted (a password keeps the fast path off).
const ENCRYPTED: &[&str] = &["--password", PASSWORD];
/// Kernel VXLAN's UDP port (the sleeve's + 1).
const FASTDP_PORT: u16 = PORT + 1;

/// Two hosts (h2 joins h1) launched with `args`, a container on each,
/// attached at 198.19.1.1 and 198.19.1.2.
fn pair(w: &mut World, args: &[&str]) -> (Host, Host, Container, Container) {
    pair_with(w, args, |_, _| {})
}

/// [`pair`], with `prepare` run on the hosts before the daemons start.
fn pair_with(
    w: &mut World,
    args: &[&str],
    prepare: impl FnOnce(&Host, &Host),
) -> (Host, Host, Container, Container) {
    let h1 = w.add_host();
    let h2 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    prepare(&h1, &h2);
    launch_pair(w, &h1, &h2, args);
    w.attach(&h1, &c1, "198.19.1.1/24");
    w.attach(&h2, &c2, "198.19.1.2/24");
    (h1, h2, c1, c2)
}

fn launch_pair(w: &World, h1: &Host, h2: &Host, args: &[&str]) {
    w.launch(h1, args);
    let mut a2 = args.to_vec();
    a2.push("198.18.0.1");
    w.launch(h2, &a2);
}

/// Waits until `host`'s one established connection reports a sleeve path
/// MTU that `ok` accepts; returns it.
#[track_caller]
fn wait_path_mtu(host: &Host, what: &str, ok: impl Fn(u64) -> bool) -> u64 {
    wait_for(
        Duration::from_secs(30),
        &format!("{}'s sleeve path MTU {what}", host.name),
        || {
            let mtus = path_mtus(host);
            match mtus.as_slice() {
                [m] if ok(*m) => Ok(*m),
                other => Err(format!("path MTUs {other:?}")),
            }
        },
    )
}

/// `ping -s 9000` from `from` to `ip`: three echoes, all must be answered
/// (bounded by `-w 15`).
#[track_caller]
fn ping_jumbo(from: &Container, ip: &str) {
    let out = from.exec(
        "ping",
        &[
            "-n", "-q", "-c", "3", "-i", "0.2", "-s", "9000", "-W", "2", "-w", "15", ip,
        ],
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{} -> {ip}: 9000-byte ping not answered 3 of 3: {}",
        from.name,
        show(&out)
    );
}

/// Whether every established connection of `host` is `encrypted` as given.
#[track_caller]
fn assert_encrypted(host: &Host, want: bool) {
    let r = report(host);
    let conns: Vec<&serde_json::Value> = r["connections"]
        .as_array()
        .map(|a| a.iter().filter(|c| c["state"] == "established").collect())
        .unwrap_or_default();
    assert!(
        !conns.is_empty(),
        "{}: no established connection: {r}",
        host.name
    );
    for c in conns {
        assert_eq!(
            c["encrypted"].as_bool(),
            Some(want),
            "{}: connection {c} should be encrypted={want}",
            host.name
        );
    }
}

/// The longest run of the bulk stream in clear in any captured UDP payload
/// on `port` (or any port for `None`).
fn longest_clear_run(pcap: &Pcap, port: Option<u16>) -> usize {
    pcap.packets
        .iter()
        .filter(|p| match port {
            None => true,
            Some(port) => pcap
                .udp_ports(p)
                .is_some_and(|(s, d)| s == port || d == port),
        })
        .map(|p| match port {
            // Whole frames: anything anywhere in clear counts.
            None => longest_bulk_run(p),
            Some(_) => pcap.udp_payload(p).map_or(0, longest_bulk_run),
        })
        .max()
        .unwrap_or(0)
}

/// Which overlay a two-host case runs on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Overlay {
    Fastdp,
    Sleeve,
    EncryptedSleeve,
}

/// One overlay, two hosts: the connection uses it, 9,000-byte pings both
/// ways, 64 MiB of bulk TCP both ways (c1 -> c2 captured on h1's underlay).
fn two_hosts(test: &str, overlay: Overlay) {
    let Some(mut w) = World::new(test) else {
        return;
    };
    let args: &[&str] = match overlay {
        Overlay::Fastdp => &[],
        Overlay::Sleeve => PLAIN,
        Overlay::EncryptedSleeve => ENCRYPTED,
    };
    let (h1, h2, c1, c2) = pair(&mut w, args);
    let name = if overlay == Overlay::Fastdp {
        "fastdp"
    } else {
        "sleeve"
    };
    wait_overlay(&h1, name);
    wait_overlay(&h2, name);
    let encrypted = overlay == Overlay::EncryptedSleeve;
    assert_encrypted(&h1, encrypted);
    assert_encrypted(&h2, encrypted);
    wait_ping(&c1, "198.19.1.2", PING_DEADLINE);
    wait_ping(&c2, "198.19.1.1", PING_DEADLINE);
    if overlay == Overlay::Fastdp {
        // Until each host has programmed the other's container MAC, frames
        // take the sleeve.
        wait_programmed(&h1, &c2);
        wait_programmed(&h2, &c1);
    }
    ping_jumbo(&c1, "198.19.1.2");
    ping_jumbo(&c2, "198.19.1.1");

    let capture = w.capture(&h1);
    let took = bulk_tcp(&c1, &c2, "198.19.1.2:5201", BULK_BYTES);
    let pcap = capture.stop();
    eprintln!(
        "{test}: {BULK_BYTES} bytes c1 -> c2 in {took:?} (capturing); {}",
        pcap.summary()
    );
    let (on, off) = if overlay == Overlay::Fastdp {
        (FASTDP_PORT, PORT)
    } else {
        (PORT, FASTDP_PORT)
    };
    // tcpdump may drop part of a fast burst: a quarter tells the paths apart.
    let (on_bytes, off_bytes) = (pcap.udp_bytes(on), pcap.udp_bytes(off));
    assert!(
        on_bytes >= BULK_BYTES / 4,
        "only {on_bytes} bytes on UDP {on} for {BULK_BYTES} sent ({off_bytes} on UDP {off}): {}",
        pcap.summary()
    );
    assert!(
        off_bytes < BULK_BYTES / 8,
        "{off_bytes} bytes on UDP {off}, the wrong overlay: {}",
        pcap.summary()
    );
    match overlay {
        Overlay::Sleeve => {
            // The detector sees the stream in the sleeve's datagrams, so
            // its silence in the encrypted case means something.
            let run = longest_clear_run(&pcap, Some(PORT));
            assert!(
                run >= 1024,
                "the plain sleeve's datagrams hold no clear run of the stream (longest {run})"
            );
        }
        Overlay::EncryptedSleeve => {
            let run = longest_clear_run(&pcap, None);
            assert!(
                run < 64,
                "{run} bytes of the stream in clear on the encrypted underlay"
            );
        }
        Overlay::Fastdp => {}
    }
    drop(pcap);

    let took = bulk_tcp(&c2, &c1, "198.19.1.1:5202", BULK_BYTES);
    eprintln!("{test}: {BULK_BYTES} bytes c2 -> c1 in {took:?}");
}

#[test]
fn fastdp_jumbo_ping_and_bulk_tcp() {
    two_hosts("fastdp_jumbo_ping_and_bulk_tcp", Overlay::Fastdp);
}

#[test]
fn sleeve_jumbo_ping_and_bulk_tcp() {
    two_hosts("sleeve_jumbo_ping_and_bulk_tcp", Overlay::Sleeve);
}

#[test]
fn encrypted_sleeve_jumbo_ping_and_bulk_tcp() {
    two_hosts(
        "encrypted_sleeve_jumbo_ping_and_bulk_tcp",
        Overlay::EncryptedSleeve,
    );
}

/// The sleeve's relay counter on `host`.
#[track_caller]
fn relayed(host: &Host) -> u64 {
    let r = report(host);
    r["sleeve"]["relayed"]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: no sleeve.relayed in {r}", host.name))
}

/// h1 — h2 — h3, h1 and h3 cut off from each other on the underlay, all
/// launched with `args` via h2: bulk TCP c1 -> c3 arrives intact, relayed by
/// h2.
fn chain(test: &str, args: &[&str], encrypted: bool) {
    let Some(mut w) = World::new(test) else {
        return;
    };
    let ([h1, h2, h3], c1, c3) = w.relay_chain(args);
    // One established connection each: to h2 (h1 <-> h3 cannot connect).
    wait_overlay(&h1, "sleeve");
    wait_overlay(&h3, "sleeve");
    assert_encrypted(&h1, encrypted);
    assert_encrypted(&h3, encrypted);
    wait_ping(&c1, "198.19.1.3", PING_DEADLINE);
    wait_ping(&c3, "198.19.1.1", PING_DEADLINE);
    let before = relayed(&h2);
    let took = bulk_tcp(&c1, &c3, "198.19.1.3:5201", BULK_BYTES);
    let after = relayed(&h2);
    eprintln!(
        "{test}: {BULK_BYTES} bytes c1 -> c3 in {took:?}; h2 relayed {} datagrams",
        after - before
    );
    // Each relayed datagram carries at most 64 KiB.
    assert!(
        after - before >= BULK_BYTES >> 16,
        "h2 relayed only {} datagrams while {BULK_BYTES} bytes crossed",
        after - before
    );
    // Still one connection each, still the sleeve.
    wait_overlay(&h1, "sleeve");
    wait_overlay(&h3, "sleeve");
}

#[test]
fn relayed_chain_bulk_tcp_sleeve() {
    chain("relayed_chain_bulk_tcp_sleeve", PLAIN, false);
}

#[test]
fn relayed_chain_bulk_tcp_encrypted_sleeve() {
    chain("relayed_chain_bulk_tcp_encrypted_sleeve", ENCRYPTED, true);
}

/// The sleeve (plain) where h1's route to h2 has MTU 1280, less than the
/// underlay link's 1500 (set before launch): bulk TCP both ways and
/// 9,000-byte pings still arrive whole.
#[test]
fn sleeve_under_lower_path_mtu() {
    let Some(mut w) = World::new("sleeve_under_lower_path_mtu") else {
        return;
    };
    let (h1, h2, c1, c2) = pair_with(&mut w, PLAIN, |h1, _| {
        let dev = h1.underlay_if.clone();
        ip(&[
            "-n",
            &h1.ns,
            "route",
            "replace",
            "198.18.0.0/24",
            "dev",
            &dev,
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            "198.18.0.1",
            "mtu",
            "1280",
        ]);
        let route = ip(&["-n", &h1.ns, "route", "get", "198.18.0.2"]);
        assert!(route.contains("mtu 1280"), "route to h2: {route}");
    });
    wait_overlay(&h1, "sleeve");
    wait_overlay(&h2, "sleeve");
    wait_ping(&c1, "198.19.1.2", PING_DEADLINE);
    wait_ping(&c2, "198.19.1.1", PING_DEADLINE);
    // The kernel's route MTU is the sleeve's path MTU towards h2.
    wait_path_mtu(&h1, "is the route's 1280", |m| m == 1280);
    ping_jumbo(&c1, "198.19.1.2");
    ping_jumbo(&c2, "198.19.1.1");
    // c1 -> c2 is the direction whose data leaves through the 1280 route.
    let took = bulk_tcp(&c1, &c2, "198.19.1.2:5201", BULK_BYTES);
    eprintln!("sleeve_under_lower_path_mtu: c1 -> c2 in {took:?}");
    let took = bulk_tcp(&c2, &c1, "198.19.1.1:5202", BULK_BYTES / 4);
    eprintln!("sleeve_under_lower_path_mtu: c2 -> c1 in {took:?}");
    // The route was not changed behind the test's back.
    let route = ip(&["-n", &h1.ns, "route", "get", "198.18.0.2"]);
    assert!(
        route.contains("mtu 1280"),
        "route to h2 afterwards: {route}"
    );
}

/// The clear-text detector the encrypted case relies on finds the stream at
/// any phase and nothing in random bytes (no root needed).
#[test]
fn bulk_run_detector() {
    let stream: Vec<u8> = (1000..1000 + 300).map(bulk_byte).collect();
    assert_eq!(longest_bulk_run(&stream), 300);
    let mut hay = random_bytes(4096);
    hay[1000..1000 + 100].copy_from_slice(&stream[150..250]);
    assert!(longest_bulk_run(&hay) >= 100, "missed a run of 100");
    assert!(longest_bulk_run(&random_bytes(1 << 16)) < 16);
    assert_eq!(longest_bulk_run(&[]), 0);
    assert_eq!(longest_bulk_run(&[250, 0, 1, 255, 2]), 3);
}

/// A path that silently drops large datagrams (no ICMP, so the kernel's
/// path MTU stays 1500): h2's firewall drops every sleeve datagram over
/// 1300 bytes. (h1's underlay segments UDP in software, so that the rule
/// sees datagrams as a wire would: a veth otherwise carries a whole GSO
/// run as one packet.) The sleeve's probes find the size that gets through, and
/// bulk TCP (whose super-frames are cut into full-size segments) still
/// arrives intact. Without probing every full-size segment would be lost
/// and the transfer would stall.
#[test]
fn sleeve_finds_the_mtu_of_a_black_hole() {
    let Some(mut w) = World::new("sleeve_finds_the_mtu_of_a_black_hole") else {
        return;
    };
    let (h1, _h2, c1, c2) = pair_with(&mut w, PLAIN, |h1, h2| {
        let dev = h1.underlay_if.clone();
        let out = run(
            &mut h1.command("ethtool", &["-K", &dev, "tx-udp-segmentation", "off"]),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "ethtool on {dev}: {out:?}");
        black_hole(h2, 1300);
    });
    wait_overlay(&h1, "sleeve");
    wait_ping(&c1, "198.19.1.2", PING_DEADLINE);
    let took = bulk_tcp(&c1, &c2, "198.19.1.2:5201", BULK_BYTES / 4);
    eprintln!("sleeve_finds_the_mtu_of_a_black_hole: c1 -> c2 in {took:?}");
    // The probes settled just under what passes (16-byte steps).
    let m = wait_path_mtu(&h1, "found under 1300", |m| (1284..=1300).contains(&m));
    eprintln!("sleeve_finds_the_mtu_of_a_black_hole: path MTU {m}");
    ping_jumbo(&c1, "198.19.1.2");
}
