//! The drivers of the fuzz targets: one function per target, taking the
//! fuzzer's bytes and handing them to the decoders of outside input the
//! way the daemon does (and, where that is pure, on to the state machine
//! that receives the decoded value). Each must return for every input: a
//! panic, an abort or a slow input is a finding.
//!
//! The files under `fuzz_targets/` only call these, and the regression
//! tests of the `mesh` crate (`tests/fuzz_regressions.rs`, stable Rust)
//! include this file with `#[path]` and run every file under
//! `fuzz/regressions/<target>/` through the same function, so a finding
//! fixed once stays fixed without nightly. Hence it depends only on what
//! the `mesh` crate's tests can reach: `mesh`, `mesh_proto`, `mesh_dns`,
//! `serde_json`, `ipnet`.

use mesh::integrations::{cni, proxy};
use mesh_proto::conn::{Config as ConnConfig, Connection};
use mesh_proto::gossip::{self, Gossip, GossipData};
use mesh_proto::handshake::{Handshake, Role, StaticKey};
use mesh_proto::ipam::{self, InitMode, Ipam};
use mesh_proto::names::NameTable;
use mesh_proto::reassembly::Reassembler;
use mesh_proto::seal::Opener;
use mesh_proto::sign::{Identity, KeyBook};
use mesh_proto::{control, fastdp, frame, hello, sleeve};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// A target's driver.
pub type Driver = fn(&[u8]);

/// Every target's name with its driver.
pub const TARGETS: &[(&str, Driver)] = &[
    ("hello", hello),
    ("control", control),
    ("conn", conn),
    ("handshake", handshake),
    ("gossip_topology", gossip_topology),
    ("gossip_ipam", gossip_ipam),
    ("gossip_names", gossip_names),
    ("sleeve", sleeve),
    ("fastdp_probe", fastdp_probe),
    ("dns_query", dns_query),
    ("proxy_head", proxy_head),
    ("proxy_chunked", proxy_chunked),
    ("proxy_json", proxy_json),
    ("cni_conf", cni_conf),
    ("state_files", state_files),
];

/// Peer `i`'s identity (fixed seeds, so runs are reproducible).
fn id(i: u8) -> Identity {
    Identity::from_seed(&[i; 32])
}

/// Cut `data` into messages: each a little-endian `u16` length and that
/// many bytes; what is left when a length overruns is the last message.
fn messages(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some((len, rest)) = data.split_first_chunk::<2>() {
        let len = usize::from(u16::from_le_bytes(*len));
        if len > rest.len() {
            out.push(rest);
            return out;
        }
        let (m, rest) = rest.split_at(len);
        out.push(m);
        data = rest;
    }
    if !data.is_empty() {
        out.push(data);
    }
    out
}

/// The 8-byte hello of the control connection.
pub fn hello(data: &[u8]) {
    if let Ok(h) = hello::Hello::parse(data) {
        let again = hello::Hello::parse(&h.emit());
        assert_eq!(again.ok(), Some(h), "hello round trip");
    }
}

/// Control messages (intro, heartbeat, close, rekey), and the record
/// framing they travel in.
pub fn control(data: &[u8]) {
    if let Ok(m) = control::ControlMsg::decode(data) {
        let bytes = m.encode().expect("a decoded message encodes");
        assert_eq!(
            control::ControlMsg::decode(&bytes).ok(),
            Some(m),
            "control round trip"
        );
    }
    let mut rest = data;
    while let Ok(Some((_, used))) = frame::parse(rest) {
        rest = &rest[used..];
    }
}

fn conn_config(role: Role, who: u8, psk: bool) -> ConnConfig {
    ConnConfig {
        role,
        key: StaticKey::from_identity(&id(who)),
        psk: psk.then_some([9; 32]),
        nickname: format!("fuzz{who}"),
        udp_port: 6783,
        max_frame: 1414,
        sleeve_key: psk.then_some((1, [who; 32])),
        fastdp: None,
    }
}

fn drain(c: &mut Connection) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(t) = c.poll_transmit() {
        out.extend_from_slice(&t);
    }
    while c.poll_event().is_some() {}
    out
}

/// The control connection's state machine: the first byte picks a
/// password or none, the chunk size, and whether the bytes arrive from
/// the start (hellos, handshake records, refusals) or after a real
/// handshake with a second connection (records that must be sealed).
pub fn conn(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let psk = mode & 1 == 1;
    let chunk = usize::from(mode >> 2).max(1);
    let now = Instant::now();
    let mut a = Connection::new(conn_config(Role::Responder, 1, psk), now);
    if mode & 2 == 2 {
        let mut b = Connection::new(conn_config(Role::Initiator, 2, psk), now);
        for _ in 0..16 {
            let to_a = drain(&mut b);
            let to_b = drain(&mut a);
            if to_a.is_empty() && to_b.is_empty() {
                break;
            }
            a.handle_input(now, &to_a);
            b.handle_input(now, &to_b);
        }
    }
    for c in data.chunks(chunk) {
        a.handle_input(now, c);
        drain(&mut a);
    }
    a.handle_timeout(now + Duration::from_secs(30));
    drain(&mut a);
}

/// Noise handshake messages read without knowing the peer: message 1 as
/// the responder, message 2 as the initiator (after writing message 1).
pub fn handshake(data: &[u8]) {
    let _ = StaticKey::from_bytes(data);
    let key = StaticKey::from_identity(&id(1));
    for psk in [None, Some(&[9; 32])] {
        if let Ok(mut r) = Handshake::new(Role::Responder, &key, psk, b"prologue") {
            if r.read(data).is_ok() {
                let _ = r.write();
            }
        }
        if let Ok(mut i) = Handshake::new(Role::Initiator, &key, psk, b"prologue") {
            if i.write().is_ok() && i.read(data).is_ok() {
                let _ = i.write();
                let _ = i.finish();
            }
        }
    }
}

/// Gossip messages from a neighbour, through the whole topology core
/// (summaries, digests, versions, updates, wants, channel payloads), with
/// time passing between them.
pub fn gossip_topology(data: &[u8]) {
    let mut now = Instant::now();
    let mut g = Gossip::new(id(1), "fuzz".into(), 1, gossip::Config::default(), 7);
    let peer = id(2).name();
    let addr: SocketAddr = ([198, 18, 0, 2], 6783).into();
    g.handle_connection_up(now, peer, addr);
    for m in messages(data) {
        let _ = gossip::wire::Body::decode(m);
        let _ = g.handle_message(now, peer, m);
        now += Duration::from_millis(700);
        g.handle_timeout(now);
        while g.poll_transmit().is_some() {}
        while g.poll_event().is_some() {}
    }
    let _ = g.peers();
    let _ = g.dial_candidates();
    let _ = g.next_hop(peer);
    g.handle_connection_down(now, peer);
    g.handle_timeout(now + Duration::from_secs(120));
}

fn ipam_config(init: InitMode) -> ipam::Config {
    let range: ipnet::Ipv4Net = "10.32.0.0/12".parse().expect("a constant range");
    ipam::Config {
        range,
        default_subnet: range,
        init,
        reclaim_after: Duration::from_secs(60),
    }
}

fn key_book(peers: &[u8]) -> KeyBook {
    let mut keys = KeyBook::new();
    for &p in peers {
        let i = id(p);
        let _ = keys.pin(i.name(), i.public());
    }
    keys
}

/// IPAM channel payloads merged into a peer's ring (the first byte picks
/// how that peer's ring starts), then its delta, its persisted state and
/// a restore from it.
pub fn gossip_ipam(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let init = match mode % 3 {
        0 => InitMode::Seed(vec![id(1).name(), id(2).name()]),
        1 => InitMode::Consensus(Some(2)),
        _ => InitMode::Observer,
    };
    let mut ipam = Ipam::new(id(1), ipam_config(init.clone()));
    let mut keys = key_book(&[1, 2, 3]);
    for m in messages(data) {
        let _ = ipam::state::Payload::decode(m);
        let _ = ipam.merge(m, &mut keys);
        let _ = ipam.take_delta();
    }
    let _ = ipam.encode();
    let saved = ipam.persist();
    let _ = Ipam::restore(id(1), ipam_config(init), &saved);
}

/// Name-table channel payloads merged into a peer's table, then its
/// delta, its persisted state and a restore from it.
pub fn gossip_names(data: &[u8]) {
    let mut t = NameTable::new(id(1));
    let _ = t.add("c1", Ipv4Addr::new(10, 32, 0, 1), "web");
    let mut keys = key_book(&[1, 2, 3]);
    for m in messages(data) {
        let _ = t.merge(m, &mut keys);
        let _ = t.take_delta();
    }
    let _ = t.lookup("web");
    let _ = t.purge(Instant::now() + Duration::from_secs(3600));
    let saved = t.persist();
    let _ = NameTable::restore(id(1), &saved);
}

/// Sleeve datagrams as the receiving hop handles them: each parsed, then
/// by kind a probe acknowledgement (plain and sealed), or reassembled
/// from its segments and opened (plain, and with a key), its frames read.
pub fn sleeve(data: &[u8]) {
    let now = Instant::now();
    let mut reasm = Reassembler::new(16, 128, Duration::from_secs(2));
    let key = [5u8; 32];
    for d in messages(data) {
        let mut d = d.to_vec();
        let Ok((header, seg, range)) = sleeve::parse_datagram(&d) else {
            let _ = sleeve::Header::parse(&d);
            continue;
        };
        if header.kind == sleeve::Kind::ProbeAck {
            let _ = sleeve::open_probe_ack(&header, &mut d[range.clone()], None);
            let mut o = Opener::new(header.key_id, &key);
            let _ = sleeve::open_probe_ack(&header, &mut d[range], Some(&mut o));
            continue;
        }
        let id = (u64::from(header.key_id) << 56) | (header.counter & sleeve::COUNTER_MASK);
        let Ok(Some(msg)) = reasm.push(now, 1, id, seg, &d[range]) else {
            continue;
        };
        let mut plain = msg.clone();
        if let Ok(n) = sleeve::open_message(&header, &mut plain, None) {
            for f in sleeve::frames(&plain[..n]).flatten() {
                let _ = sleeve::frame_macs(f);
            }
        }
        let mut sealed = msg;
        let mut o = Opener::new(header.key_id, &key);
        if let Ok(n) = sleeve::open_message(&header, &mut sealed, Some(&mut o)) {
            for f in sleeve::frames(&sealed[..n]).flatten() {
                let _ = sleeve::frame_macs(f);
            }
        }
    }
    let _ = reasm.take_dropped();
}

/// Fast-path probes: the sender peeked, then parsed and authenticated.
pub fn fastdp_probe(data: &[u8]) {
    if fastdp::Probe::peek_sender(data).is_ok() {
        let _ = fastdp::Probe::parse(data, &[7; 16]);
    }
}

fn zone() -> &'static mesh_dns::Zone {
    static ZONE: std::sync::OnceLock<mesh_dns::Zone> = std::sync::OnceLock::new();
    ZONE.get_or_init(|| {
        let z = mesh_dns::Zone::new(mesh_dns::Config::default()).expect("the default zone");
        z.set_names([
            ("web", Ipv4Addr::new(10, 32, 0, 1)),
            ("web", Ipv4Addr::new(10, 32, 0, 2)),
            ("db.rack1", Ipv4Addr::new(10, 32, 0, 3)),
        ]);
        z
    })
}

/// DNS queries through the server's entry point ([`mesh_dns::Zone::respond`],
/// which the UDP and TCP loops call), over both transports.
pub fn dns_query(data: &[u8]) {
    let mut out = Vec::new();
    for t in [mesh_dns::Transport::Udp, mesh_dns::Transport::Tcp] {
        out.clear();
        let _ = zone().respond(data, t, &mut out);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mesh_dns::parse_resolv_conf(text);
    }
}

/// HTTP heads (requests and responses) as the proxy reads them.
pub fn proxy_head(data: &[u8]) {
    let end = proxy::head_end(data);
    let mut finder = proxy::HeadFinder::default();
    for n in (0..=data.len()).step_by(7).chain([data.len()]) {
        if let Some(e) = finder.find(&data[..n]) {
            assert_eq!(Some(e), proxy::head_end(&data[..n]), "incremental head end");
            break;
        }
    }
    let Ok(mut h) = proxy::Head::parse(&data[..end.unwrap_or(data.len())]) else {
        return;
    };
    let _ = h.content_length();
    let _ = h.status();
    let _ = h.is_upgrade();
    let _ = h.is_chunked();
    let _ = proxy::Route::of(&h.first, &h.second);
    h.set("Connection", "close");
    let _ = proxy::Head::parse(&h.emit());
}

/// Chunked bodies, decoded at once and as the proxy reads them (in
/// increments; the first byte picks their size): both must give the same
/// result, errors included.
pub fn proxy_chunked(data: &[u8]) {
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let whole = proxy::dechunk(data);
    let mut d = proxy::Dechunker::default();
    let step = usize::from(step).max(1);
    let mut n = 0;
    let incremental = loop {
        n = (n + step).min(data.len());
        match d.poll(&data[..n]) {
            Ok(Some(used)) => break Ok(Some((d.into_body(), used))),
            Ok(None) if n == data.len() => break Ok(None),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
    };
    assert_eq!(
        whole, incremental,
        "dechunk at once and incrementally disagree"
    );
}

/// JSON bodies: a create request rewritten, an inspect answer read.
pub fn proxy_json(data: &[u8]) {
    let _ = proxy::rewrite_create(data, Some("mesh.local"), Some("/web"));
    let _ = proxy::rewrite_create(data, None, None);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = proxy::cidr_env(v.get("Env"));
        if let Some(i) = proxy::Inspected::from_json(&v) {
            let _ = i.addrs();
        }
    }
}

/// The CNI plugin's input: the configuration on stdin, then (after a NUL)
/// `CNI_ARGS`.
pub fn cni_conf(data: &[u8]) {
    let (conf, args) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let args = cni::parse_args(&String::from_utf8_lossy(args));
    let _ = cni::container_name("0123456789abcdef", &args);
    if let Ok(c) = cni::parse_conf(conf) {
        let _ = cni::addrs_for(&c, &args);
    }
}

/// The state files read at start: each decoder gets the same bytes (the
/// sealed container, `identity.key`, `ipam.bin`, `names.bin`,
/// `targets.json`, `containers.json`).
pub fn state_files(data: &[u8]) {
    if let Ok(o) = mesh::persist::open(data) {
        let payload = o.payload();
        let _ = mesh::identity::decode(payload);
        let _ = Ipam::restore(id(1), ipam_config(InitMode::Observer), payload);
        let _ = NameTable::restore(id(1), payload);
    }
    let _ = mesh::persist::decode_json::<Vec<String>>(data);
    let _ = mesh::attach::decode_containers(data);
}

/// Frame `ms` the way [`messages`] cuts them.
fn framed(ms: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in ms {
        let len = u16::try_from(m.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&m[..usize::from(len)]);
    }
    out
}

/// Valid inputs made by the real encoders (target, name, bytes), so the
/// fuzzer starts past the decoders, in the merge and reassembly logic;
/// `tests/fuzz_regressions.rs` writes them as `seed-*` files.
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let now = Instant::now();
    // Gossip: what peer 2 sends peer 1 when they connect and when they
    // learn of a third.
    let mut g = Gossip::new(id(2), "two".into(), 1, gossip::Config::default(), 3);
    g.handle_connection_up(now, id(1).name(), ([198, 18, 0, 1], 6783).into());
    g.handle_connection_up(now, id(3).name(), ([198, 18, 0, 3], 6783).into());
    g.handle_timeout(now + Duration::from_secs(3));
    let sent: Vec<Vec<u8>> = std::iter::from_fn(|| g.poll_transmit())
        .filter(|t| t.to == id(1).name())
        .map(|t| t.bytes)
        .collect();
    let refs: Vec<&[u8]> = sent.iter().map(Vec::as_slice).collect();
    out.push(("gossip_topology", "connect", framed(&refs)));
    // IPAM: peer 2's ring and record, seeded by both.
    let init = InitMode::Seed(vec![id(1).name(), id(2).name()]);
    let mut two = Ipam::new(id(2), ipam_config(init.clone()));
    two.prime(now);
    let full = two.encode();
    let delta = two.take_delta().unwrap_or_default();
    // Into a peer seeded alike, one waiting for consensus, an observer.
    for (mode, name) in [
        (0u8, "ring-seeded"),
        (1, "ring-consensus"),
        (2, "ring-observer"),
    ] {
        let mut seed = vec![mode];
        seed.extend(framed(&[&full, &delta]));
        out.push(("gossip_ipam", name, seed));
    }
    let mut one = Ipam::new(id(1), ipam_config(init));
    let _ = one.merge(&full, &mut key_book(&[1, 2]));
    out.push(("state_files", "ipam", mesh::persist::seal(&one.persist())));
    // Names: peer 2's table.
    let mut t = NameTable::new(id(2));
    let _ = t.add("c2", Ipv4Addr::new(10, 32, 0, 9), "db");
    let _ = t.add("c3", Ipv4Addr::new(10, 32, 0, 10), "web");
    let full = t.encode();
    let _ = t.remove_container("c3");
    let delta = t.take_delta().unwrap_or_default();
    out.push(("gossip_names", "table", framed(&[&full, &delta])));
    out.push(("state_files", "names", mesh::persist::seal(&t.persist())));
    let mut idf = b"MESHID2\n".to_vec();
    idf.extend_from_slice(&[4; 32]);
    out.push(("state_files", "identity", mesh::persist::seal(&idf)));
    out.push((
        "state_files",
        "targets",
        mesh::persist::seal(br#"["198.18.0.2:6783","host-b"]"#),
    ));
    // Sleeve: a plain message of two frames in three segments, and a
    // sealed one (key id 1, the driver's key) in two.
    let mut body = Vec::new();
    for len in [60usize, 1500] {
        let mut f = vec![0u8; len];
        f[..12].copy_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]);
        let _ = sleeve::push_frame(&mut body, &f);
    }
    let plain = sleeve::message_header(id(2).name(), id(1).name(), 0, None, 7);
    if let Ok(h) = plain {
        if let Ok(ds) = sleeve::segment_message(&h, &body, 600) {
            let refs: Vec<&[u8]> = ds.iter().map(Vec::as_slice).collect();
            out.push(("sleeve", "plain", framed(&refs)));
        }
    }
    let sealer = mesh_proto::seal::Sealer::new(1, &[5; 32]);
    if let Ok(h) = sleeve::message_header(id(2).name(), id(1).name(), 1, Some(&sealer), 0) {
        let mut sealed = body.clone();
        if sleeve::seal_message(&h, Some(&sealer), &mut sealed).is_ok() {
            if let Ok(ds) = sleeve::segment_message(&h, &sealed, 1000) {
                let refs: Vec<&[u8]> = ds.iter().map(Vec::as_slice).collect();
                out.push(("sleeve", "sealed", framed(&refs)));
            }
        }
    }
    let ack = sleeve::probe_ack(id(2).name(), id(1).name(), 1400);
    let probe = sleeve::probe_datagram(id(2).name(), id(1).name(), 200);
    out.push(("sleeve", "probe", framed(&[&probe, &ack])));
    // Fast path: a probe with two MACs.
    let mut p = Vec::new();
    fastdp::Probe {
        from: id(2).name(),
        hears_you: true,
        macs: vec![[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]],
    }
    .emit(&[7; 16], &mut p);
    out.push(("fastdp_probe", "two-macs", p));
    // DNS: A queries for a name of the zone and one to forward, with EDNS.
    let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1];
    for l in ["web", "mesh", "local"] {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q.extend_from_slice(&[0, 0, 0x29, 0x10, 0, 0, 0, 0, 0, 0, 0]);
    out.push(("dns_query", "a-web", q));
    let mut q = vec![0x12, 0x35, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x07example\x03com\x00\x00\x1c\x00\x01");
    out.push(("dns_query", "aaaa-forward", q));
    // The proxy.
    out.push((
        "proxy_head",
        "create",
        b"POST /v1.41/containers/create?name=web HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
    ));
    out.push((
        "proxy_chunked",
        "trailers",
        b"\x03b\r\n{\"Env\":[1]}\r\n3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n".to_vec(),
    ));
    out.push((
        "proxy_json",
        "create",
        br#"{"Image":"alpine","Env":["WEAVE_CIDR=net:10.32.1.0/24 ip:10.32.0.5/12"],"HostConfig":{"NetworkMode":"bridge","Dns":[]},"Name":"/web","State":{"Pid":42,"Running":true},"Config":{"Env":["MESH_CIDR=net:default"]}}"#.to_vec(),
    ));
    out.push((
        "cni_conf",
        "podman",
        b"{\"cniVersion\":\"1.0.0\",\"name\":\"mesh\",\"type\":\"mesh\",\"subnet\":\"net:10.32.1.0/24\"}\0IgnoreUnknown=1;K8S_POD_NAME=web;MESH_CIDR=ip:10.32.1.7/24".to_vec(),
    ));
    out
}
