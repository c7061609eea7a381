//! The sleeve's own tables hold against a host that can only spoof
//! (issue 16, "The overlay holds"): path MTU acknowledgements are
//! authenticated with a password.
//!
//! Two hosts with a password, so on the sleeve. h2 drops every sleeve
//! datagram to it larger than 1,300 bytes (an nft rule: a path that
//! swallows large datagrams without telling anyone), so h1's path MTU
//! probes settle just under 1,300 — which also shows that h2's sealed
//! acknowledgements open. Then, from h2's own namespace, a raw socket sends
//! h1 datagrams from h2's sleeve address (198.18.0.2:6783, the address h1
//! knows the peer by) that claim 1,500 bytes arrived: plain `ProbeAck`s, as
//! any host that can spoof h2's address could send, and "sealed" ones under
//! h2's key id with a body that is not. Before acknowledgements were sealed,
//! the first plain one raised h1's path MTU to 1,500, and every full-size
//! segment to h2 was lost from then on. Now each is dropped and counted
//! under `sleeve.drops.auth`, and the path MTU stays where the probes put
//! it. A datagram from another port of h2 is counted as `unknown_sender`.
//!
//! Addresses: the test's own underlay 198.18.0.0/24.

mod common;

use common::*;
use mesh_proto::name::PeerName;
use mesh_proto::sleeve::{self, emit_datagram_header, Header, Kind, Segment};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

/// The password.
const PASSWORD: &str = "holds-s3cret";
/// Sleeve datagrams to h2 larger than this (IP length) are dropped.
const BLACK_HOLE: u64 = 1300;
/// The size the forgeries claim arrived: the underlay's MTU, what h1's
/// kernel allows, so a forged acknowledgement would be believed.
const FORGED: u64 = 1500;
/// Forgeries of each kind h1 must have counted.
const FORGERIES: u64 = 20;
/// How long the probes may take to settle (each size that fails takes
/// three one-second probes).
const SETTLE: Duration = Duration::from_secs(90);

/// A peer name as `mesh report` prints it.
fn peer_name(s: &str) -> PeerName {
    let mut n = [0u8; 6];
    let parts: Vec<u8> = s
        .split(':')
        .filter_map(|p| u8::from_str_radix(p, 16).ok())
        .collect();
    assert_eq!(parts.len(), 6, "peer name {s}");
    n.copy_from_slice(&parts);
    PeerName(n)
}

/// `host`'s drop counter for `reason` (0 when absent).
#[track_caller]
fn drops(host: &Host, reason: &str) -> u64 {
    let r = report(host);
    assert!(
        r["sleeve"]["drops"].is_object(),
        "{}: no sleeve.drops in the report: {}",
        host.name,
        r["sleeve"]
    );
    r["sleeve"]["drops"][reason].as_u64().unwrap_or(0)
}

/// The path MTU of `host`'s one established connection.
#[track_caller]
fn path_mtu(host: &Host) -> Option<u64> {
    match path_mtus(host).as_slice() {
        [m] => Some(*m),
        _ => None,
    }
}

/// A UDP datagram (header with checksum 0, "none" in IPv4) from `sport` to
/// `dport` carrying `payload`, for a raw socket (the kernel adds the IP
/// header, with the namespace's own source address).
fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(8 + payload.len());
    d.extend_from_slice(&sport.to_be_bytes());
    d.extend_from_slice(&dport.to_be_bytes());
    d.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    d
}

/// The forgeries: a plain acknowledgement of [`FORGED`] bytes, and a
/// "sealed" one under key id 1 (h2's first key) whose body is random.
fn forgeries(src: PeerName, dst: PeerName, counter: u64) -> [Vec<u8>; 2] {
    let plain = sleeve::probe_ack(src, dst, FORGED as usize).to_vec();
    let h = Header {
        kind: Kind::ProbeAck,
        key_id: 1,
        src,
        dst,
        hops: 0,
        counter,
    };
    let mut sealed = emit_datagram_header(
        &h.emit(),
        Segment {
            count: 1,
            index: 0,
            stride: 0,
        },
    )
    .to_vec();
    sealed.extend_from_slice(&FORGED.to_be_bytes());
    sealed.extend_from_slice(&random_bytes(16));
    [plain, sealed]
}

#[test]
fn forged_path_mtu_acks_are_refused() {
    let Some(mut w) = World::new("sleeve_holds_pmtu") else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    black_hole(&h2, BLACK_HOLE as usize);
    w.launch(&h1, &["--password", PASSWORD]);
    w.launch(&h2, &["--password", PASSWORD, "198.18.0.1"]);
    wait_overlay(&h1, "sleeve");
    let settled = wait_for(
        SETTLE,
        "h1's path MTU to h2 found under 1300",
        || match path_mtu(&h1) {
            Some(m) if (BLACK_HOLE - 16..=BLACK_HOLE).contains(&m) => Ok(m),
            other => Err(format!("path MTU {other:?}")),
        },
    );
    eprintln!("sleeve_holds: h1's path MTU to h2 settled at {settled} (sealed acks open)");
    let me = peer_name(report(&h1)["name"].as_str().unwrap_or_default());
    let them = peer_name(report(&h2)["name"].as_str().unwrap_or_default());
    let auth0 = drops(&h1, "auth");
    let unknown0 = drops(&h1, "unknown_sender");

    // From h2's sleeve address, as a raw socket: h1 takes them for h2's.
    let h1_sleeve = SocketAddr::V4(SocketAddrV4::new(h1.ip, PORT));
    let mut counter = 1u64 << 40;
    let auth = wait_for(
        Duration::from_secs(30),
        "h1 counting the forged acknowledgements as auth drops",
        || {
            in_netns(&h2.ns, || {
                let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))
                    .unwrap_or_else(|e| panic!("raw socket: {e}"));
                for _ in 0..5 {
                    counter += 1;
                    for f in forgeries(them, me, counter) {
                        raw.send_to(&udp(PORT, PORT, &f), &h1_sleeve.into())
                            .unwrap_or_else(|e| panic!("raw send: {e}"));
                    }
                }
                // And one from another port of h2: no peer sends from there.
                let other = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
                    .unwrap_or_else(|e| panic!("udp bind: {e}"));
                other
                    .send_to(&forgeries(them, me, 0)[0], h1_sleeve)
                    .unwrap_or_else(|e| panic!("udp send: {e}"));
            });
            let n = drops(&h1, "auth") - auth0;
            if n >= 2 * FORGERIES {
                Ok(n)
            } else {
                Err(format!("{n} auth drops"))
            }
        },
    );
    // h1's receiver handles datagrams in order: the forgeries counted were
    // all looked at, and none moved the path MTU.
    let after = path_mtu(&h1);
    eprintln!("sleeve_holds: {auth} forged acknowledgements refused; path MTU now {after:?}");
    assert!(
        after.is_some_and(|m| m <= BLACK_HOLE),
        "a forged acknowledgement raised h1's path MTU to {after:?} (probes had found {settled})"
    );
    let unknown = drops(&h1, "unknown_sender") - unknown0;
    assert!(unknown >= 1, "no unknown_sender drop counted");
    let r = report(&h1);
    let sum: u64 = r["sleeve"]["drops"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    assert_eq!(
        r["sleeve"]["dropped"].as_u64(),
        Some(sum),
        "dropped is the sum of drops: {}",
        r["sleeve"]
    );
}
