//! Packet capture on a host's underlay, and reading the pcap.

use super::consts::*;
use super::process::*;

// ---------------------------------------------------------------------------
// Packet capture

/// A running `tcpdump`; stopped by PID on [`Capture::stop`] or when dropped.
pub struct Capture {
    pub(super) child: Option<Child>,
    /// Namespace of the captured host.
    pub(super) ns: String,
    /// Broadcast address of its underlay.
    pub(super) broadcast: Ipv4Addr,
    pub(super) file: PathBuf,
    pub(super) errfile: PathBuf,
}

impl Capture {
    /// Stops tcpdump and returns what it captured.
    /// tcpdump may still hold packets it has not written, so this first
    /// broadcasts a marker datagram out of the captured interface until the
    /// marker shows in the file: everything before it is then written too.
    #[track_caller]
    pub fn stop(mut self) -> Pcap {
        let marker = random_bytes(16);
        let ns = self.ns.clone();
        wait_for(
            Duration::from_secs(15),
            "the capture records its end marker",
            || {
                in_netns(&ns, || -> Result<(), String> {
                    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
                    s.set_broadcast(true).map_err(|e| e.to_string())?;
                    s.send_to(&marker, (self.broadcast, 9))
                        .map_err(|e| e.to_string())?;
                    Ok(())
                })?;
                let pcap = self.read()?;
                if pcap.contains(&marker) {
                    Ok(())
                } else {
                    Err(format!("marker not yet in capture: {}", pcap.summary()))
                }
            },
        );
        self.halt();
        self.read().unwrap_or_else(|e| panic!("{e}"))
    }

    fn read(&self) -> Result<Pcap, String> {
        let bytes = fs::read(&self.file)
            .map_err(|e| format!("read capture {}: {e}", self.file.display()))?;
        parse_pcap(&bytes).map_err(|e| {
            format!(
                "capture {}: {e}; tcpdump said: {}",
                self.file.display(),
                fs::read_to_string(&self.errfile).unwrap_or_default()
            )
        })
    }

    fn halt(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            if wait_child(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The packets of a classic pcap file.
#[derive(Debug)]
pub struct Pcap {
    /// Link-layer type (1: Ethernet, 113: Linux cooked).
    pub linktype: u32,
    /// Every packet's captured bytes.
    pub packets: Vec<Vec<u8>>,
}

/// Parses a classic pcap file (either byte order, µs or ns timestamps). A
/// record cut short at the end is dropped.
pub fn parse_pcap(b: &[u8]) -> Result<Pcap, String> {
    if b.len() < 24 {
        return Err(format!("pcap of {} bytes has no header", b.len()));
    }
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        m if matches!(m.swap_bytes(), 0xa1b2_c3d4 | 0xa1b2_3c4d) => false,
        m => return Err(format!("not a pcap file (magic {m:#x})")),
    };
    let rd = |off: usize| {
        let w = [b[off], b[off + 1], b[off + 2], b[off + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let linktype = rd(20) & 0xffff;
    let mut packets = Vec::new();
    let mut off = 24;
    while off + 16 <= b.len() {
        let incl = rd(off + 8) as usize;
        let start = off + 16;
        let Some(end) = start.checked_add(incl).filter(|&e| e <= b.len()) else {
            break;
        };
        packets.push(b[start..end].to_vec());
        off = end;
    }
    Ok(Pcap { linktype, packets })
}

pub(super) fn be16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(off)?, *b.get(off + 1)?]))
}

/// Whether `needle` occurs in `hay`.
pub fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

impl Pcap {
    /// The IPv4 packet inside a captured frame, if it is one.
    pub(super) fn ipv4<'a>(&self, pkt: &'a [u8]) -> Option<&'a [u8]> {
        let (mut ethertype_at, l2) = match self.linktype {
            1 => (12, 14),
            113 => (14, 16),
            _ => return None,
        };
        let mut l2 = l2;
        if be16(pkt, ethertype_at)? == 0x8100 {
            ethertype_at += 4;
            l2 += 4;
        }
        (be16(pkt, ethertype_at)? == 0x0800).then(|| pkt.get(l2..))?
    }

    /// Source and destination ports of a UDP/IPv4 packet (first fragment).
    pub fn udp_ports(&self, pkt: &[u8]) -> Option<(u16, u16)> {
        let ip = self.ipv4(pkt)?;
        let ihl = usize::from(ip.first()? & 0x0f) * 4;
        let frag_offset = be16(ip, 6)? & 0x1fff;
        if *ip.get(9)? != 17 || frag_offset != 0 {
            return None;
        }
        Some((be16(ip, ihl)?, be16(ip, ihl + 2)?))
    }

    /// Number of UDP packets from or to `port`.
    pub fn udp_count(&self, port: u16) -> usize {
        self.packets
            .iter()
            .filter(|p| {
                self.udp_ports(p)
                    .is_some_and(|(s, d)| s == port || d == port)
            })
            .count()
    }

    /// Whether any captured packet contains `pattern`.
    pub fn contains(&self, pattern: &[u8]) -> bool {
        self.packets.iter().any(|p| contains_bytes(p, pattern))
    }

    /// A one-line summary for failure messages.
    pub fn summary(&self) -> String {
        format!(
            "{} packets (linktype {}), {} UDP/{PORT}, {} UDP/{}",
            self.packets.len(),
            self.linktype,
            self.udp_count(PORT),
            self.udp_count(PORT + 1),
            PORT + 1
        )
    }
}

/// Asserts a CLI failure as the contract wants it: non-zero exit, exactly one
/// non-empty line on stderr, no panic or backtrace. Returns that line.
#[track_caller]
pub fn assert_one_line_error(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what}: expected a failure, got {}",
        show(out)
    );
    assert!(
        out.status.code().is_some(),
        "{what}: killed by a signal: {}",
        show(out)
    );
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(
            !stderr.contains(bad),
            "{what}: stderr has {bad:?}: {stderr}"
        );
    }
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && !lines[0].trim().is_empty(),
        "{what}: stderr must be exactly one non-empty line, got {} lines: {stderr:?}",
        lines.len()
    );
    lines[0].to_string()
}

/// Path of a copy of the `mesh` binary that any user may run (the build dir
/// may not be reachable for an unprivileged user).
pub fn world_readable_mesh(dir: &Path) -> PathBuf {
    let dest = dir.join("mesh");
    fs::copy(MESH, &dest).expect("copy mesh binary");
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).expect("chmod mesh copy");
    dest
}
