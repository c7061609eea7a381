//! A flood at the mesh's ports while containers talk (issue 17, part 4).
//!
//! Hosts h1 and h2 run daemons with a container each (c1, c2) that ping
//! each other; h3, a host of the same underlay that runs no daemon, floods
//! h1 for [`FLOOD_FOR`] from several threads:
//!
//! - TCP 6783: connect and close at once; connect, send random bytes and
//!   close; connect and stay silent (up to [`SILENT`] held at a time, then
//!   dropped and opened again) — far past the daemon's inbound limits;
//! - UDP 6783 (the sleeve): random bytes, sleeve headers cut short, and
//!   whole sleeve headers (plain and sealed kinds, random segment fields,
//!   random bodies) from random peer names and from the real peers' names;
//! - UDP 6784 (the fast path's VXLAN): random bytes and VXLAN headers with
//!   random VNIs.
//!
//! Meanwhile and after, c1 and c2 keep pinging: every round (a ping each
//! way) must succeed within [`ROUND`], retrying; the pings that needed a
//! retry are counted and at most a [`MAX_LOST_PERCENT`] of the pings sent
//! may be lost. h1's daemon stays alive, `mesh status` answers, its
//! connection to h2 stays established, its RSS (VmRSS) stays under
//! [`RSS_BOUND_KB`] and its log grows by less than [`LOG_BOUND`] bytes (the
//! warnings are rate-limited). RSS before, peak and after and the pings
//! lost are printed.
//!
//! Two cases: the fast path (no password), and the encrypted sleeve
//! (`--password`). Addresses: the underlay 198.18.0.0/24, the containers
//! in 198.19.90.0/24 and 198.19.91.0/24.

mod common;

use common::*;
use mesh_proto::name::PeerName;
use mesh_proto::sleeve::{emit_datagram_header, Header, Kind, Segment, HEADER_LEN, MAGIC};
use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long the flood lasts.
const FLOOD_FOR: Duration = Duration::from_secs(12);
/// Deadline of one round of pings (retrying), and of the set-up.
const ROUND: Duration = Duration::from_secs(20);
/// Silent connections a flooding thread holds at a time.
const SILENT: usize = 64;
/// Of the pings sent during and after the flood, at most this share may
/// be lost (each round still has to succeed within [`ROUND`]).
const MAX_LOST_PERCENT: u64 = 20;
/// h1's daemon's resident memory never goes above this.
const RSS_BOUND_KB: u64 = 64 * 1024;
/// h1's log grows by less than this during the flood.
const LOG_BOUND: u64 = 1 << 20;
/// The password of the encrypted case.
const PASSWORD: &str = "flood-s3cret";

/// What the flood sent, for the report.
#[derive(Default)]
struct Sent {
    tcp: AtomicU64,
    udp: AtomicU64,
}

/// The resident memory of `pid` in KiB (`VmRSS`).
fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn log_len(h: &Host) -> u64 {
    std::fs::metadata(h.run_dir.join("mesh.log")).map_or(0, |m| m.len())
}

/// A random peer name.
fn random_peer() -> PeerName {
    let b = random_bytes(6);
    let mut n = [0u8; 6];
    n.copy_from_slice(&b);
    PeerName(n)
}

/// One garbage datagram for the sleeve port, of kind `i % 4`: random
/// bytes, a header cut short, a whole header from a random peer, a whole
/// header from one of `names`.
fn sleeve_garbage(i: u64, names: &[PeerName]) -> Vec<u8> {
    let r = random_bytes(8);
    let len = 1 + usize::from(r[0]) * 5;
    match i % 4 {
        0 => random_bytes(len),
        1 => {
            let mut d = vec![MAGIC];
            d.extend(random_bytes(usize::from(r[1]) % (HEADER_LEN + 4)));
            d
        }
        k => {
            let src = if k == 2 || names.is_empty() {
                random_peer()
            } else {
                names[usize::from(r[2]) % names.len()]
            };
            let dst = match r[3] % 3 {
                0 => PeerName::BROADCAST,
                1 if !names.is_empty() => names[usize::from(r[4]) % names.len()],
                _ => random_peer(),
            };
            let h = Header {
                kind: if r[5].is_multiple_of(2) {
                    Kind::Frames
                } else {
                    Kind::Sealed
                },
                key_id: r[6] % 3,
                src,
                dst,
                hops: r[7] % 4,
                counter: u64::from_le_bytes(random_bytes(8).try_into().unwrap_or([0; 8]))
                    & 0x00ff_ffff_ffff_ffff,
            };
            let count = 1 + u16::from(r[1] % 40);
            let seg = Segment {
                count,
                index: u16::from(r[2]) % count,
                stride: 1200,
            };
            let mut d = emit_datagram_header(&h.emit(), seg).to_vec();
            d.extend(random_bytes(len));
            d
        }
    }
}

/// One garbage datagram for the VXLAN port: random bytes, or a VXLAN
/// header with a random VNI before random bytes.
fn vxlan_garbage(i: u64) -> Vec<u8> {
    let r = random_bytes(4);
    let len = 1 + usize::from(r[0]) * 5;
    if i.is_multiple_of(2) {
        random_bytes(len)
    } else {
        let vni = u32::from_be_bytes([0, r[1], r[2], r[3]]);
        vxlan(vni, &random_bytes(len.max(14)))
    }
}

/// Floods `target` from the calling thread's namespace until `stop`, from
/// five threads; returns when they are done.
fn flood(target: &str, names: &[PeerName], stop: &AtomicBool, sent: &Sent) {
    let tcp = (target, PORT);
    let pace = || std::thread::sleep(Duration::from_millis(1));
    std::thread::scope(|s| {
        // Connect and close.
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if TcpStream::connect(tcp).is_ok() {
                    sent.tcp.fetch_add(1, Ordering::Relaxed);
                }
                pace();
            }
        });
        // Connect, send garbage, close.
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut c) = TcpStream::connect(tcp) {
                    sent.tcp.fetch_add(1, Ordering::Relaxed);
                    let n = 1 + random_below(2048);
                    let _ = c.write_all(&random_bytes(n));
                }
                pace();
            }
        });
        // Connect and stay silent.
        s.spawn(|| {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if held.len() >= SILENT {
                    held.clear();
                }
                if let Ok(c) = TcpStream::connect(tcp) {
                    sent.tcp.fetch_add(1, Ordering::Relaxed);
                    held.push(c);
                }
                pace();
            }
        });
        // Garbage at the sleeve and at the VXLAN port.
        for port in [PORT, PORT + 1] {
            s.spawn(move || {
                let Ok(sock) = UdpSocket::bind("0.0.0.0:0") else {
                    return;
                };
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..20 {
                        let d = if port == PORT {
                            sleeve_garbage(i, names)
                        } else {
                            vxlan_garbage(i)
                        };
                        if sock.send_to(&d, (target, port)).is_ok() {
                            sent.udp.fetch_add(1, Ordering::Relaxed);
                        }
                        i += 1;
                    }
                    pace();
                }
            });
        }
    });
}

/// One ping from `from` to `ip`, retried until it succeeds within
/// [`ROUND`]; returns how many attempts failed first.
fn ping_round(from: &Container, ip: &str) -> u64 {
    let start = Instant::now();
    let mut lost = 0;
    while !ping(&from.ns, ip) {
        lost += 1;
        assert!(
            start.elapsed() < ROUND,
            "{} got no ping reply from {ip} within {ROUND:?} ({lost} attempts)",
            from.name
        );
    }
    lost
}

fn flood_while_pinging(test: &str, subnet: u8, opts: &[&str]) {
    let Some(mut w) = World::new(test) else {
        return;
    };
    let (h1, h2) = w.launch_pair(opts);
    let h3 = w.add_host();
    let ip1 = format!("198.19.{subnet}.1");
    let ip2 = format!("198.19.{subnet}.2");
    let cs = w.attach_new(&[
        (&h1, "c1", &format!("{ip1}/24")),
        (&h2, "c2", &format!("{ip2}/24")),
    ]);
    let (c1, c2) = (&cs[0], &cs[1]);
    wait_ping(c1, &ip2, ROUND);
    wait_ping(c2, &ip1, ROUND);
    let names: Vec<PeerName> = [&h1, &h2]
        .iter()
        .filter_map(|h| h.status().lines().find_map(peer_name_of))
        .collect();
    let pid = h1.daemon_pid().expect("h1's pid");
    let rss_before = rss_kb(pid);
    let log_before = log_len(&h1);

    let stop = AtomicBool::new(false);
    let sent = Sent::default();
    let (mut pings, mut lost, mut peak) = (0u64, 0u64, rss_before);
    let flood_start = Instant::now();
    std::thread::scope(|s| {
        let flooder = s.spawn(|| {
            in_netns(&h3.ns, || flood("198.18.0.1", &names, &stop, &sent));
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            while flood_start.elapsed() < FLOOD_FOR {
                lost += ping_round(c1, &ip2) + ping_round(c2, &ip1);
                pings += 2;
                peak = peak.max(rss_kb(pid));
                assert!(pid_alive(pid), "h1's daemon died under the flood");
            }
        }));
        stop.store(true, Ordering::Relaxed);
        let _ = flooder.join();
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    });
    let flood_lost = lost;
    let flood_pings = pings;
    // After: pings, status, the connection, memory.
    for _ in 0..5 {
        lost += ping_round(c1, &ip2) + ping_round(c2, &ip1);
        pings += 2;
    }
    let rss_after = rss_kb(pid);
    peak = peak.max(rss_after);
    let log_growth = log_len(&h1).saturating_sub(log_before);
    eprintln!(
        "{test}: flood of {:?}: {} TCP connections, {} UDP datagrams at h1; pings lost {flood_lost} of {flood_pings} during, {} of {} after; h1 RSS before {} KiB, peak {} KiB, after {} KiB; log +{log_growth} bytes",
        FLOOD_FOR,
        sent.tcp.load(Ordering::Relaxed),
        sent.udp.load(Ordering::Relaxed),
        lost - flood_lost,
        pings - flood_pings,
        rss_before,
        peak,
        rss_after,
    );
    assert!(pid_alive(pid), "h1's daemon died under the flood");
    let status = h1.status();
    assert!(status.contains("Connections"), "mesh status: {status}");
    wait_until(ROUND, "h1's connection to h2 is established", || {
        h1.mesh_ok(&["status", "connections"])
            .lines()
            .any(|l| l.contains("198.18.0.2") && l.contains("established"))
    });
    assert!(
        lost * 100 <= pings * MAX_LOST_PERCENT,
        "{lost} of {pings} pings lost"
    );
    assert!(
        peak < RSS_BOUND_KB,
        "h1's RSS reached {peak} KiB (bound {RSS_BOUND_KB} KiB)"
    );
    assert!(
        log_growth < LOG_BOUND,
        "h1's log grew by {log_growth} bytes during the flood"
    );
    assert!(
        sent.tcp.load(Ordering::Relaxed) >= 1000,
        "the flood opened too few connections to mean anything"
    );
}

/// The peer name on a `mesh status` line `Name: xx:..(nick)`.
fn peer_name_of(line: &str) -> Option<PeerName> {
    let rest = line.trim().strip_prefix("Name:")?.trim();
    let hex: Vec<u8> = rest
        .split(['(', ' '])
        .next()?
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect::<Option<_>>()?;
    Some(PeerName(hex.try_into().ok()?))
}

#[test]
fn a_flood_at_the_ports_leaves_fast_path_traffic_flowing() {
    flood_while_pinging("flood_fastdp", 90, &[]);
}

#[test]
fn a_flood_at_the_ports_leaves_encrypted_sleeve_traffic_flowing() {
    flood_while_pinging("flood_sleeve", 91, &["--password", PASSWORD]);
}
