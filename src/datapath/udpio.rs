//! Batched UDP for the sleeve: segmentation offload out, receive offload in.
//!
//! - **Out**: [`send_segments`] sends a run of datagrams of equal size (the
//!   last may be shorter) from one gather list with a single `sendmsg`
//!   carrying a `UDP_SEGMENT` control message: the kernel (or the NIC) cuts
//!   the run into datagrams, so a 64 KB message costs one or two system
//!   calls instead of fifty. Without GSO (an old kernel) each datagram is
//!   sent on its own.
//! - **In**: [`RecvBatch`] receives with `recvmmsg(MSG_WAITFORONE)` on a
//!   socket with `UDP_GRO` on: each buffer then holds one datagram or a run
//!   of coalesced ones of one size (given by the `UDP_GRO` control message),
//!   and the caller walks them with [`datagrams`]. Without a
//!   control message a buffer holds a single datagram, so both cases read
//!   alike.
//! - The socket sends with the don't-fragment bit (`IP_PMTUDISC_DO`): a
//!   datagram larger than the path MTU fails with `EMSGSIZE` instead of being
//!   fragmented, and [`path_mtu`] reads the kernel's path MTU towards a peer
//!   (route MTU, lowered by ICMP "fragmentation needed") so the sender cuts
//!   smaller segments.
//!
//! Only IPv4 (the sleeve socket is bound to 0.0.0.0). This is the one module
//! of the daemon with `unsafe` system calls; each block says why it is sound.

use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

/// The largest UDP payload of one IPv4 datagram, and of one GSO send.
pub const MAX_UDP_PAYLOAD: usize = 65507;
/// The most segments one GSO send may carry (the kernel's UDP_MAX_SEGMENTS
/// has been 64 or more since GSO exists).
pub const MAX_SEGMENTS: usize = 64;
/// Size of one receive buffer: the largest GRO run.
pub const RECV_BUF: usize = 65536;

fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its size is passed; the kernel only
    // reads it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What the kernel accepted when the socket was set up.
#[derive(Debug, Clone, Copy)]
pub struct Offloads {
    /// `UDP_SEGMENT` sends work.
    pub gso: bool,
    /// `UDP_GRO` receives are on.
    pub gro: bool,
}

/// Turn on GRO and don't-fragment on the sleeve socket, and find out whether
/// GSO sends work (by asking for the option's current value).
pub fn setup(sock: &UdpSocket) -> Offloads {
    let fd = sock.as_raw_fd();
    // Room for bursts of 64 KB messages; the FORCE variants pass the
    // rmem_max/wmem_max caps (we run as root), the plain ones are the
    // fallback.
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(fd, libc::SOL_SOCKET, force, 8 << 20).is_err() {
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, 8 << 20);
        }
    }
    let gro = setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
    let _ = setsockopt_int(
        fd,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DO,
    );
    // Setting a zero socket-wide segment size is accepted exactly where the
    // per-message UDP_SEGMENT control message is.
    let gso = setsockopt_int(fd, libc::SOL_UDP, libc::UDP_SEGMENT, 0).is_ok();
    Offloads { gso, gro }
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Space for one `UDP_SEGMENT` control message (a u16), aligned.
#[repr(C, align(8))]
struct CmsgSpace([u8; 32]);

/// Send the datagrams in `iov` to `dst` in one `sendmsg`. With `segment`
/// set, the gather list is a run of datagrams of exactly `segment` bytes
/// each but the last (at most [`MAX_SEGMENTS`], at most
/// [`MAX_UDP_PAYLOAD`] in all); without, it is one datagram.
pub fn send_segments(
    fd: RawFd,
    dst: SocketAddrV4,
    iov: &[IoSlice<'_>],
    segment: Option<u16>,
) -> io::Result<usize> {
    let mut name = sockaddr_in(dst);
    let mut cmsg = CmsgSpace([0; 32]);
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // IoSlice is ABI-compatible with iovec (documented by std).
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    if let Some(seg) = segment {
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` (≤ 32) aligned bytes that
        // live until sendmsg returns; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
        }
    }
    // SAFETY: every pointer in `msg` refers to memory borrowed for the
    // duration of this call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(fd, &msg, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Write a gather list to `fd` in one `writev` (a frame whose pieces lie in
/// several received datagrams, written to the TAP without joining them).
pub fn writev(fd: RawFd, iov: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: IoSlice is ABI-compatible with iovec; the slices live for the
    // call and the kernel only reads them.
    let n = unsafe { libc::writev(fd, iov.as_ptr().cast(), iov.len() as libc::c_int) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A UDP socket connected to `dst`, its local port picked by the kernel
/// as it connects: it is never an unconnected socket on every address (a
/// listener, in `ss -lu`), not even for an instant, and hears only `dst`.
pub fn connected(dst: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(dst), Type::DGRAM, Some(Protocol::UDP))?;
    s.connect(&dst.into())?;
    Ok(s.into())
}

/// The kernel's path MTU towards `dst` (route MTU, or less once an ICMP
/// "fragmentation needed" arrived), read through a connected throwaway
/// socket.
pub fn path_mtu(dst: SocketAddrV4) -> io::Result<usize> {
    let s = connected(SocketAddr::V4(dst))?;
    let mut v: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: `v` and `len` are live and sized; the kernel writes an int.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut v as *mut i32).cast(),
            &mut len,
        )
    };
    if r == 0 && v > 0 {
        Ok(v as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receive buffers for `recvmmsg`, reused across calls.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_in>,
    cmsgs: Vec<CmsgSpace>,
    hdrs: Vec<libc::mmsghdr>,
    filled: usize,
}

// SAFETY: the raw pointers inside point only into the batch's own heap
// buffers, which move with it.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// `n` buffers of [`RECV_BUF`] bytes.
    pub fn new(n: usize) -> RecvBatch {
        let n = n.max(1);
        RecvBatch {
            bufs: (0..n).map(|_| vec![0u8; RECV_BUF]).collect(),
            // SAFETY (all three): plain C structs; zeroed is valid and every
            // field is set before use.
            iovs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            names: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            cmsgs: (0..n).map(|_| CmsgSpace([0; 32])).collect(),
            hdrs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            filled: 0,
        }
    }

    /// Wait for at least one datagram (or the socket's receive timeout) and
    /// take as many as are queued, up to the batch size. Returns how many
    /// buffers were filled.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.bufs.len();
        for i in 0..n {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.bufs[i].len(),
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.cmsgs[i].0.as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of::<CmsgSpace>() as _;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points into this batch's buffers, which stay
        // alive and unmoved for the call.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            self.filled = 0;
            return Err(io::Error::last_os_error());
        }
        self.filled = r as usize;
        Ok(self.filled)
    }

    /// Buffer `i` of the last [`Self::recv`]: the sender, the GRO segment
    /// size (the whole length when the buffer holds one datagram), and the
    /// bytes.
    pub fn get(&mut self, i: usize) -> Option<(SocketAddr, usize, &mut [u8])> {
        if i >= self.filled {
            return None;
        }
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(RECV_BUF);
        let name = &self.names[i];
        let from = SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
            u16::from_be(name.sin_port),
        ));
        let mut seg = len;
        // SAFETY: the kernel filled msg_control up to msg_controllen inside
        // our CmsgSpace; CMSG_* walk only within it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>());
                    if v > 0 {
                        seg = v as usize;
                    }
                }
                c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
            }
        }
        Some((from, seg.max(1), &mut self.bufs[i][..len]))
    }
}

/// The datagrams of a received buffer holding a GRO run of `seg`-byte
/// datagrams (the last may be shorter).
pub fn datagrams(buf: &mut [u8], seg: usize) -> std::slice::ChunksMut<'_, u8> {
    buf.chunks_mut(seg.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GSO out, GRO in over loopback: a run of equal datagrams sent with one
    /// call arrives as the same datagrams, coalesced or not.
    #[test]
    fn gso_to_gro_over_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let off = setup(&rx);
        let _ = setup(&tx);
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let SocketAddr::V4(dst) = rx.local_addr().unwrap() else {
            panic!("v4")
        };
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let seg = 1200usize;
        let iov: Vec<IoSlice<'_>> = data.chunks(seg).map(IoSlice::new).collect();
        let tx_off = setup(&tx);
        if tx_off.gso {
            send_segments(tx.as_raw_fd(), dst, &iov, Some(seg as u16)).unwrap();
        } else {
            for s in &iov {
                send_segments(tx.as_raw_fd(), dst, std::slice::from_ref(s), None).unwrap();
            }
        }
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut batch = RecvBatch::new(4);
        while got.len() < data.len().div_ceil(seg) {
            let n = batch.recv(rx.as_raw_fd()).unwrap();
            for i in 0..n {
                let (_, s, buf) = batch.get(i).unwrap();
                if !off.gro {
                    assert_eq!(s, buf.len());
                }
                for d in datagrams(buf, s) {
                    got.push(d.to_vec());
                }
            }
        }
        let expect: Vec<Vec<u8>> = data.chunks(seg).map(<[u8]>::to_vec).collect();
        assert_eq!(got, expect);
        assert!(path_mtu(dst).unwrap() >= 1280);
    }
}
