//! The data path: overlays, bulk transfers.

use super::capture::*;
use super::consts::*;
use super::hosts::*;
use super::process::*;

// ---------------------------------------------------------------------------
// The data path: overlays, bulk transfers

/// How long a connection may take to settle on an overlay (fast-path probes
/// every 0.5 s until up, every 20 s while up; a dead path is noticed within
/// `mesh_proto::fastdp::DEAD_AFTER`, 25 s).
pub const OVERLAY_DEADLINE: Duration = Duration::from_secs(45);

/// The overlays of `host`'s established connections, with their reasons,
/// from `mesh report`.
pub fn overlays(host: &Host) -> Result<Vec<(String, Option<String>)>, String> {
    let out = try_run(&mut host.command(MESH, &["report"]), CMD_TIMEOUT)?;
    if !out.status.success() {
        return Err(show(&out));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("report is not JSON: {e}"))?;
    let conns = v["connections"].as_array().cloned().unwrap_or_default();
    Ok(conns
        .iter()
        .filter(|c| c["state"] == "established")
        .map(|c| {
            (
                c["overlay"].as_str().unwrap_or("").to_string(),
                c["overlay_info"].as_str().map(str::to_string),
            )
        })
        .collect())
}

/// Waits until `host` has an established connection on `overlay` (and
/// none on another); returns its reason.
#[track_caller]
pub fn wait_overlay(host: &Host, overlay: &str) -> Option<String> {
    wait_for(
        OVERLAY_DEADLINE,
        &format!("{}'s connection uses the {overlay}", host.name),
        || {
            let o = overlays(host)?;
            match o.as_slice() {
                [(got, why)] if got == overlay => Ok(why.clone()),
                _ => Err(format!("{o:?}")),
            }
        },
    )
}

/// Waits until `host`'s VXLAN device has an FDB entry for `c`'s MAC.
#[track_caller]
pub fn wait_programmed(host: &Host, c: &Container) {
    let mac = c.ethmesh_mac().expect("container MAC");
    wait_for(
        OVERLAY_DEADLINE,
        &format!("{} programs {}'s MAC {mac}", host.name, c.name),
        || {
            let out = try_run(
                Command::new("bridge").args(["-n", &host.ns, "fdb", "show", "dev", "vxmesh"]),
                CMD_TIMEOUT,
            )?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let dst = text
                .lines()
                .any(|l| l.starts_with(&mac) && l.contains(" dst "));
            let master = text
                .lines()
                .any(|l| l.starts_with(&mac) && l.contains("master"));
            if dst && master {
                Ok(())
            } else {
                Err(text)
            }
        },
    );
}

/// The sleeve path MTUs of `host`'s established connections, from its
/// report.
pub fn path_mtus(host: &Host) -> Vec<u64> {
    report(host)["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["state"] == "established")
        .filter_map(|c| c["path_mtu"].as_u64())
        .collect()
}

/// `mesh report` of `host`, parsed; panics if it fails.
#[track_caller]
pub fn report(host: &Host) -> serde_json::Value {
    let out = host.mesh_ok(&["report"]);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("report of {} is not JSON: {e}", host.name))
}

/// The byte at offset `i` of a bulk stream (not periodic in 2^n, so a
/// chunk lost, repeated or swapped shows).
pub fn bulk_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// The longest run in `hay` of consecutive bytes of the bulk stream (at any
/// phase): 64 or more means the stream is there in clear.
pub fn longest_bulk_run(hay: &[u8]) -> usize {
    let (mut best, mut run) = (0usize, 0usize);
    for (i, &b) in hay.iter().enumerate() {
        let follows = i > 0 && hay[i - 1] < 251 && b == bulk_byte(u64::from(hay[i - 1]) + 1);
        run = if b >= 251 {
            0
        } else if follows {
            run + 1
        } else {
            1
        };
        best = best.max(run);
    }
    best
}

/// Sends `bytes` of the bulk stream over TCP from inside container `from` to
/// a listener at `addr` (`IP:PORT`) inside container `to`, and asserts that
/// exactly `bytes` arrived, every one the right value. Socket reads and writes
/// time out after 20 s without progress. Returns how long the transfer took
/// (for messages only).
#[track_caller]
pub fn bulk_tcp(from: &Container, to: &Container, addr: &str, bytes: u64) -> Duration {
    use std::io::Write;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    let sock: SocketAddr = addr
        .parse()
        .unwrap_or_else(|e| panic!("bulk_tcp address {addr:?}: {e}"));
    let io_timeout = Some(Duration::from_secs(20));
    let listener = in_netns(&to.ns, || TcpListener::bind(sock))
        .unwrap_or_else(|e| panic!("listen on {addr} in {}: {e}", to.name));
    let start = Instant::now();
    let (received, first_bad) = std::thread::scope(|s| {
        let server = s.spawn(|| {
            listener
                .set_nonblocking(true)
                .expect("nonblocking listener");
            let mut conn = wait_for(
                Duration::from_secs(15),
                "the bulk connection is accepted",
                || match listener.accept() {
                    Ok((c, _)) => Ok(c),
                    Err(e) => Err(e.to_string()),
                },
            );
            conn.set_nonblocking(false).expect("blocking connection");
            conn.set_read_timeout(io_timeout).expect("timeout");
            let mut buf = vec![0u8; 1 << 16];
            let (mut n, mut first_bad) = (0u64, None);
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => {
                        if first_bad.is_none() {
                            first_bad = buf[..k]
                                .iter()
                                .enumerate()
                                .find(|&(j, &b)| b != bulk_byte(n + j as u64))
                                .map(|(j, _)| n + j as u64);
                        }
                        n += k as u64;
                    }
                    Err(e) => panic!("reading the bulk stream after {n} bytes: {e}"),
                }
            }
            (n, first_bad)
        });
        let sent = in_netns(&from.ns, || {
            let mut conn = match TcpStream::connect_timeout(&sock, Duration::from_secs(10)) {
                Ok(c) => c,
                Err(e) => return Err(format!("connect from {} to {addr}: {e}", from.name)),
            };
            conn.set_write_timeout(io_timeout).expect("timeout");
            let chunk: Vec<u8> = (0..(1u64 << 16)).map(bulk_byte).collect();
            let mut sent = 0u64;
            while sent < bytes {
                // 2^16 is not a multiple of 251: send from the right phase.
                let phase = (sent % 251) as usize;
                let k = (bytes - sent).min(chunk.len() as u64 - 251) as usize;
                if let Err(e) = conn.write_all(&chunk[phase..phase + k]) {
                    return Err(format!("sending after {sent} bytes: {e}"));
                }
                sent += k as u64;
            }
            Ok(sent)
        });
        let got = server.join();
        if let Err(e) = sent {
            panic!("bulk TCP {} -> {} ({addr}): {e}", from.name, to.name);
        }
        got.unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
    let took = start.elapsed();
    assert_eq!(
        received, bytes,
        "bulk TCP {} -> {} ({addr}): bytes received",
        from.name, to.name
    );
    assert_eq!(
        first_bad, None,
        "bulk TCP {} -> {} ({addr}): first corrupted byte at this offset",
        from.name, to.name
    );
    took
}

impl Pcap {
    /// The UDP payload of a UDP/IPv4 packet (first fragment; as captured).
    pub fn udp_payload<'a>(&self, pkt: &'a [u8]) -> Option<&'a [u8]> {
        let ip = self.ipv4(pkt)?;
        let ihl = usize::from(ip.first()? & 0x0f) * 4;
        let frag_offset = be16(ip, 6)? & 0x1fff;
        if *ip.get(9)? != 17 || frag_offset != 0 {
            return None;
        }
        ip.get(ihl + 8..)
    }

    /// Bytes of the UDP packets (whole frames as captured) from or to `port`.
    pub fn udp_bytes(&self, port: u16) -> u64 {
        self.packets
            .iter()
            .filter(|p| {
                self.udp_ports(p)
                    .is_some_and(|(s, d)| s == port || d == port)
            })
            .map(|p| p.len() as u64)
            .sum()
    }
}

/// Makes `host` drop, silently, sleeve datagrams (UDP 6783) whose IP length
/// is above `above`: a path MTU black hole (nftables table `inet meshbh`).
#[track_caller]
pub fn black_hole(host: &Host, above: usize) {
    let above = above.to_string();
    for args in [
        &["add", "table", "inet", "meshbh"][..],
        &[
            "add",
            "chain",
            "inet",
            "meshbh",
            "in",
            "{ type filter hook input priority 0; }",
        ],
        &[
            "add", "rule", "inet", "meshbh", "in", "udp", "dport", "6783", "ip", "length", ">",
            &above, "drop",
        ],
    ] {
        let out = run(&mut host.command("nft", args), Duration::from_secs(10));
        assert!(
            out.status.success(),
            "nft {args:?} on {}: {out:?}",
            host.name
        );
    }
}
