//! The server over real sockets on 127.0.0.1 (ephemeral ports), queried
//! with hickory-proto messages (and `dig` when it is installed). Upstream
//! servers are tiny UDP/TCP servers on 127.0.0.1 started by the tests. Data
//! addresses come from 198.18.0.0/15 and are never sent to.

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use mesh_dns::{serve, Config, Zone};
use mesh_proto::names::NameTable;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 1, i)
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "mesh-dns-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server; stops when dropped.
struct Harness {
    addr: SocketAddr,
    zone: Arc<Zone>,
    resolv: PathBuf,
    _dir: TempDir,
    _rt: tokio::runtime::Runtime,
}

/// Bind UDP and TCP on the same ephemeral port of 127.0.0.1.
fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()) {
            return (udp, tcp);
        }
    }
    panic!("no free port pair on 127.0.0.1");
}

impl Harness {
    fn start(resolv_text: &str, timeout: Duration) -> Harness {
        let dir = TempDir::new();
        let resolv = dir.0.join("resolv.conf");
        std::fs::write(&resolv, resolv_text).unwrap();
        let zone = Arc::new(
            Zone::new(Config {
                resolv_conf: resolv.clone(),
                upstream_timeout: timeout,
                ttl: 1,
                ..Config::default()
            })
            .unwrap(),
        );
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let z = zone.clone();
        rt.spawn(async move {
            if let Err(e) = serve(udp, tcp, z).await {
                panic!("server failed: {e}");
            }
        });
        Harness {
            addr,
            zone,
            resolv,
            _dir: dir,
            _rt: rt,
        }
    }

    fn with_names(names: &[(&str, Ipv4Addr)]) -> Harness {
        let h = Harness::start("", Duration::from_millis(500));
        h.zone.set_names(names.iter().map(|(n, a)| (*n, *a)));
        h
    }
}

fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.metadata.recursion_desired = true;
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.send_to(bytes, server).unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = s.recv_from(&mut buf).expect("an answer within 5 s");
    buf.truncate(n);
    buf
}

fn udp(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let q = query(name, rtype, None);
    let a = udp_raw(server, &q);
    assert_eq!(a[..2], q[..2], "answer id");
    Message::from_vec(&a).unwrap()
}

fn tcp(server: SocketAddr, bytes: &[u8]) -> Message {
    let mut s = TcpStream::connect(server).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut m = (bytes.len() as u16).to_be_bytes().to_vec();
    m.extend_from_slice(bytes);
    s.write_all(&m).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).unwrap();
    Message::from_vec(&buf).unwrap()
}

fn addrs(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn sorted(mut v: Vec<Ipv4Addr>) -> Vec<Ipv4Addr> {
    v.sort();
    v
}

#[test]
fn a_records_all_addresses_in_random_order() {
    let h = Harness::with_names(&[
        ("web", ip(1)),
        ("web", ip(2)),
        ("web", ip(3)),
        ("db", ip(9)),
    ]);
    let mut orders = std::collections::HashSet::new();
    for _ in 0..40 {
        let m = udp(h.addr, "web.mesh.local.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        let a = addrs(&m);
        assert_eq!(sorted(a.clone()), vec![ip(1), ip(2), ip(3)]);
        assert!(m.answers.iter().all(|r| r.ttl == 1));
        orders.insert(a);
    }
    assert!(orders.len() > 1, "always the same order");
    assert_eq!(
        addrs(&udp(h.addr, "db.mesh.local.", RecordType::A)),
        vec![ip(9)]
    );
}

#[test]
fn ptr_for_our_addresses() {
    let h = Harness::with_names(&[("web", ip(1)), ("www", ip(1))]);
    let m = udp(h.addr, "1.1.19.198.in-addr.arpa.", RecordType::PTR);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let mut names: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::PTR(p) => Some(p.0.to_ascii()),
            _ => None,
        })
        .collect();
    names.sort();
    assert_eq!(names, vec!["web.mesh.local.", "www.mesh.local."]);
}

#[test]
fn case_insensitive_and_case_echoed() {
    let h = Harness::with_names(&[("Web", ip(1))]);
    let m = udp(h.addr, "wEb.MESH.local.", RecordType::A);
    assert_eq!(addrs(&m), vec![ip(1)]);
    assert_eq!(m.queries[0].name().to_ascii(), "wEb.MESH.local.");
    assert_eq!(m.answers[0].name.to_ascii(), "wEb.MESH.local.");
}

#[test]
fn single_label_gets_the_domain() {
    let h = Harness::with_names(&[("web", ip(1))]);
    let m = udp(h.addr, "web.", RecordType::A);
    assert_eq!(addrs(&m), vec![ip(1)]);
}

#[test]
fn other_types_for_our_names_are_empty_and_unknown_is_nxdomain() {
    let h = Harness::with_names(&[("web", ip(1))]);
    let m = udp(h.addr, "web.mesh.local.", RecordType::AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    let m = udp(h.addr, "nope.mesh.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = udp(h.addr, "mesh.local.", RecordType::SOA);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    // Counted by outcome (the metrics' `mesh_dns_queries_total`).
    let _ = udp(h.addr, "web.mesh.local.", RecordType::A);
    let c = h.zone.counts();
    assert_eq!(
        (c.answered, c.not_found, c.forwarded, c.failed),
        (1, 3, 0, 0),
        "{c:?}"
    );
}

#[test]
fn names_follow_the_table() {
    let h = Harness::with_names(&[]);
    let mut t = NameTable::new(mesh_proto::sign::Identity::from_seed(&[1; 32]));
    t.add("c1", ip(5), "app").unwrap();
    t.add("c2", ip(6), "other.mesh.local.").unwrap();
    h.zone.set_table(&t);
    assert_eq!(
        addrs(&udp(h.addr, "app.mesh.local.", RecordType::A)),
        vec![ip(5)]
    );
    assert_eq!(
        addrs(&udp(h.addr, "other.mesh.local.", RecordType::A)),
        vec![ip(6)]
    );
    t.remove_container("c1");
    h.zone.set_table(&t);
    let m = udp(h.addr, "app.mesh.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn tcp_queries_and_truncation() {
    let names: Vec<(String, Ipv4Addr)> = (1..=40).map(|i| ("big".to_string(), ip(i))).collect();
    let h = Harness::start("", Duration::from_millis(500));
    h.zone
        .set_names(names.iter().map(|(n, a)| (n.as_str(), *a)));
    // UDP without EDNS: 40 A records do not fit in 512 bytes.
    let m = udp(h.addr, "big.mesh.local.", RecordType::A);
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    // With EDNS 1232 they fit.
    let q = query("big.mesh.local.", RecordType::A, Some(1232));
    let m = Message::from_vec(&udp_raw(h.addr, &q)).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 40);
    assert!(m.edns.is_some());
    // TCP: all of them, twice on one connection.
    let q = query("big.mesh.local.", RecordType::A, None);
    let m = tcp(h.addr, &q);
    assert!(!m.metadata.truncation);
    assert_eq!(
        sorted(addrs(&m)),
        names.iter().map(|n| n.1).collect::<Vec<_>>()
    );
}

/// A tiny upstream on 127.0.0.1 that answers every A query with
/// 198.18.0.99 (or stays silent); stops when dropped.
struct Upstream {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    fn start(silent: bool) -> Upstream {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = s.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let deadline = Instant::now() + Duration::from_secs(60);
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((n, from)) = s.recv_from(&mut buf) else {
                    continue;
                };
                if silent {
                    continue;
                }
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut a = Message::response(q.metadata.id, q.metadata.op_code);
                a.metadata.recursion_desired = q.metadata.recursion_desired;
                a.metadata.recursion_available = true;
                a.add_queries(q.queries.clone());
                if let Some(qq) = q.queries.first() {
                    a.add_answer(hickory_proto::rr::Record::from_rdata(
                        qq.name().clone(),
                        60,
                        RData::A(Ipv4Addr::new(198, 18, 0, 99).into()),
                    ));
                }
                let _ = s.send_to(&a.to_vec().unwrap(), from);
            }
        });
        Upstream {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn forwards_other_names_and_rereads_resolv_conf() {
    let up = Upstream::start(false);
    let h = Harness::start(&format!("nameserver {}\n", up.addr), Duration::from_secs(2));
    let m = udp(h.addr, "example.test.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&m), vec![Ipv4Addr::new(198, 18, 0, 99)]);
    // Unknown single labels go upstream too.
    let m = udp(h.addr, "someplace.", RecordType::A);
    assert_eq!(addrs(&m), vec![Ipv4Addr::new(198, 18, 0, 99)]);
    // Reverse names of addresses that are not ours too.
    let m = udp(h.addr, "1.0.0.127.in-addr.arpa.", RecordType::PTR);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    // A new resolv.conf naming a dead server is picked up: SERVFAIL.
    servfail_once_upstream_is_dead(&h, || udp(h.addr, "example.test.", RecordType::A));
}

#[test]
fn forwarding_over_tcp_falls_back_to_udp_upstream() {
    let up = Upstream::start(false);
    let h = Harness::start(&format!("nameserver {}\n", up.addr), Duration::from_secs(2));
    let m = tcp(h.addr, &query("example.test.", RecordType::A, None));
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&m), vec![Ipv4Addr::new(198, 18, 0, 99)]);
    // And SERVFAIL over TCP when nothing answers.
    servfail_once_upstream_is_dead(&h, || {
        tcp(h.addr, &query("example.test.", RecordType::A, None))
    });
}

/// Point the harness's resolv.conf at a server that is not there, then ask
/// with `ask` until the answer is SERVFAIL (bounded: the file is re-read).
fn servfail_once_upstream_is_dead(h: &Harness, ask: impl Fn() -> Message) {
    let dead = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(&h.resolv, format!("nameserver {dead}\n")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ask().metadata.response_code != ResponseCode::ServFail {
        assert!(Instant::now() < deadline, "resolv.conf change not seen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn upstream_down_is_servfail_not_a_hang() {
    // Nothing listening: refused at once.
    let dead = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h = Harness::start(&format!("nameserver {dead}\n"), Duration::from_millis(500));
    let m = udp(h.addr, "example.test.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(m.queries[0].name().to_ascii(), "example.test.");
    // A server that never answers: SERVFAIL once the bound has passed
    // (the client waits up to 5 s; the bound is 0.5 s).
    let silent = Upstream::start(true);
    std::fs::write(&h.resolv, format!("nameserver {}\n", silent.addr)).unwrap();
    let m = udp(h.addr, "example.test.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    // No upstream at all.
    std::fs::write(&h.resolv, "# none\n").unwrap();
    let m = udp(h.addr, "example.test.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    // Each was forwarded (or meant to be) and failed.
    let c = h.zone.counts();
    assert_eq!((c.forwarded, c.failed, c.answered), (3, 3, 0), "{c:?}");
}

#[test]
fn malformed_queries_do_not_hurt() {
    let h = Harness::with_names(&[("web", ip(1))]);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x1234_5678_9abc_def1u64;
    for len in 0..200usize {
        let mut b = vec![0u8; len];
        for x in b.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *x = seed as u8;
        }
        s.send_to(&b, h.addr).unwrap();
    }
    // Two questions: FORMERR.
    let mut two = query("web.mesh.local.", RecordType::A, None);
    two[5] = 2;
    let a = udp_raw(h.addr, &two);
    assert_eq!(a[3] & 0x0f, 1, "FORMERR");
    // A response sent to us: dropped; the next query is still answered.
    let m = udp(h.addr, "web.mesh.local.", RecordType::A);
    assert_eq!(addrs(&m), vec![ip(1)]);
    // Garbage over TCP closes that connection only.
    let mut t = TcpStream::connect(h.addr).unwrap();
    t.write_all(&[0, 3, 1, 2, 3]).unwrap();
    let m = tcp(h.addr, &query("web.mesh.local.", RecordType::A, None));
    assert_eq!(addrs(&m), vec![ip(1)]);
}

#[test]
fn dig_if_installed() {
    let Ok(out) = std::process::Command::new("dig").arg("-v").output() else {
        eprintln!("SKIPPED: dig is not installed");
        return;
    };
    let _ = out;
    let h = Harness::with_names(&[("web", ip(1)), ("web", ip(2))]);
    let port = h.addr.port().to_string();
    for extra in [&[][..], &["+tcp"][..]] {
        let out = std::process::Command::new("dig")
            .args(["@127.0.0.1", "-p", &port, "+short", "+time=3", "+tries=1"])
            .args(extra)
            .arg("web.mesh.local")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut got: Vec<&str> = text.lines().collect();
        got.sort();
        assert_eq!(got, vec!["198.19.1.1", "198.19.1.2"], "dig {extra:?}");
    }
    let out = std::process::Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port,
            "+short",
            "+time=3",
            "+tries=1",
            "-x",
            "198.19.1.2",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "web.mesh.local."
    );
}

#[test]
fn dropping_the_server_releases_its_sockets() {
    let up = Upstream::start(true);
    let dir = TempDir::new();
    let resolv = dir.0.join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {}\n", up.addr)).unwrap();
    let zone = Arc::new(
        Zone::new(Config {
            resolv_conf: resolv,
            upstream_timeout: Duration::from_secs(30),
            ..Config::default()
        })
        .unwrap(),
    );
    zone.set_names([("web", ip(1))]);
    let (udp_sock, tcp_sock) = bind_pair();
    let addr = udp_sock.local_addr().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let task = rt.spawn(serve(udp_sock, tcp_sock, zone));
    assert_eq!(
        addrs(&udp(addr, "web.mesh.local.", RecordType::A)),
        vec![ip(1)]
    );
    // A forward in flight (the upstream never answers) and an open TCP
    // connection must not keep the sockets.
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.send_to(&query("example.test.", RecordType::A, None), addr)
        .unwrap();
    let _conn = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    task.abort();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let u = UdpSocket::bind(addr);
        let t = TcpListener::bind(addr);
        if u.is_ok() && t.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "sockets still held: {u:?} {t:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
