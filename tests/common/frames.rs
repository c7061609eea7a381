//! Raw frames for tests that must put exactly chosen bytes on a link: a
//! packet socket bound to one interface of one namespace, and builders for
//! Ethernet, IPv4/UDP and VXLAN.

use super::consts::*;
use super::process::*;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `ETH_P_ALL`: every ethertype.
const ETH_P_ALL: u16 = 0x0003;

/// A packet socket on one interface of one namespace (opened there; it
/// stays in that namespace whoever uses it).
pub struct Link {
    fd: OwnedFd,
    /// Where it is, for messages.
    pub what: String,
}

impl Link {
    /// Opens a packet socket on `ifname` inside namespace `ns`, receiving
    /// every ethertype.
    #[track_caller]
    pub fn open(ns: &str, ifname: &str) -> Link {
        let what = format!("{ifname} in {ns}");
        let ifname_c = std::ffi::CString::new(ifname).expect("interface name");
        let fd = in_netns(ns, || -> Result<OwnedFd, String> {
            // SAFETY: plain calls with valid arguments; results checked.
            unsafe {
                let index = libc::if_nametoindex(ifname_c.as_ptr());
                if index == 0 {
                    return Err(format!("no interface: {}", std::io::Error::last_os_error()));
                }
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(ETH_P_ALL.to_be()),
                );
                if fd < 0 {
                    return Err(format!("socket: {}", std::io::Error::last_os_error()));
                }
                let fd = OwnedFd::from_raw_fd(fd);
                let mut sa: libc::sockaddr_ll = std::mem::zeroed();
                sa.sll_family = libc::AF_PACKET as u16;
                sa.sll_protocol = ETH_P_ALL.to_be();
                sa.sll_ifindex = index as i32;
                let r = libc::bind(
                    fd.as_raw_fd(),
                    &sa as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                );
                if r < 0 {
                    return Err(format!("bind: {}", std::io::Error::last_os_error()));
                }
                Ok(fd)
            }
        })
        .unwrap_or_else(|e| panic!("packet socket on {what}: {e}"));
        Link { fd, what }
    }

    /// Sends one whole Ethernet frame.
    #[track_caller]
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for reads of its length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        assert!(
            n == frame.len() as isize,
            "send on {}: {}",
            self.what,
            std::io::Error::last_os_error()
        );
    }

    /// The socket's descriptor, to wait on it with `poll`.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// Receives one frame that arrived on the interface into `buf`, without
    /// waiting: its length, or `None` when nothing is queued. Frames the
    /// interface sent (`PACKET_OUTGOING`) are skipped. Never panics.
    pub fn try_recv_incoming(&self, buf: &mut [u8]) -> Option<usize> {
        loop {
            // SAFETY: zeroed is a valid sockaddr_ll.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is valid for writes of its length, `sa` for
            // writes of `len` bytes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    &mut sa as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 {
                return None;
            }
            if sa.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Some(n as usize);
        }
    }

    /// Sends one whole Ethernet frame; whether the kernel took all of it.
    /// Never panics.
    pub fn try_send(&self, frame: &[u8]) -> bool {
        // SAFETY: `frame` is valid for reads of its length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        n == frame.len() as isize
    }

    /// Every frame received until `limit` passes (at most that long).
    pub fn frames_for(&self, limit: Duration) -> Vec<Vec<u8>> {
        let end = Instant::now() + limit;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return got;
            }
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd, and its count.
            let r = unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as i32) };
            if r <= 0 {
                continue;
            }
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                got.push(buf[..n as usize].to_vec());
            }
        }
    }
}

/// Receives on every one of `links` until `done` says the frames so far
/// (per link, in the order of `links`) are enough, or `limit` passes;
/// returns them.
pub fn collect_until(
    links: &[&Link],
    limit: Duration,
    mut done: impl FnMut(&[Vec<Vec<u8>>]) -> bool,
) -> Vec<Vec<Vec<u8>>> {
    let end = Instant::now() + limit;
    let mut got: Vec<Vec<Vec<u8>>> = vec![Vec::new(); links.len()];
    while Instant::now() < end && !done(&got) {
        for (i, l) in links.iter().enumerate() {
            got[i].extend(l.frames_for(Duration::from_millis(20)));
        }
    }
    got
}

/// Parses `xx:xx:xx:xx:xx:xx`.
#[track_caller]
pub fn mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    v.try_into().expect("six bytes")
}

/// An Ethernet frame.
pub fn ether(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    // Ethernet's minimum (without the FCS).
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// An IPv4 packet carrying UDP (checksum 0: none) from `src:sport` to
/// `dst:dport`.
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let udp_len = 8 + data.len();
    let total = 20 + udp_len;
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64; // TTL
    p[9] = 17; // UDP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = p
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

/// An IPv6 packet (UDP, checksum left zero: it only has to exist on the
/// wire) from `fe80::1` to `ff02::1`.
pub fn ipv6_udp(data: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 1;
    p[8] = 0xfe;
    p[9] = 0x80;
    p[23] = 1;
    p[24] = 0xff;
    p[25] = 0x02;
    p[39] = 1;
    p.extend_from_slice(&9999u16.to_be_bytes());
    p.extend_from_slice(&9999u16.to_be_bytes());
    p.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

/// A VXLAN datagram's payload: the header with `vni`, then `frame`.
pub fn vxlan(vni: u32, frame: &[u8]) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(frame);
    p
}

/// Whether any of `frames` holds `marker`.
pub fn any_holds(frames: &[Vec<u8>], marker: &[u8]) -> bool {
    frames.iter().any(|f| contains_bytes(f, marker))
}

use super::capture::contains_bytes;
