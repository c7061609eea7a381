//! nf_tables set elements changed over netlink, in one kernel transaction,
//! without running `nft`.
//!
//! An attach changes a few elements of the bridge table's sets (its port's
//! MAC, addresses and subnets). Running `nft -f` for that costs a process,
//! and `nft` reads the whole ruleset before it changes anything, so the
//! cost grows with the containers already attached: most of an attach's
//! time. Here the same change is one batch of `NFT_MSG_DELSETELEM` and
//! `NFT_MSG_NEWSETELEM` messages (between `NFNL_MSG_BATCH_BEGIN` and
//! `_END`, which the kernel applies atomically or not at all) on a netlink
//! socket, answered by one acknowledgement per message.
//!
//! Keys are laid out as `nft` lays them out, so `nft list` shows what it
//! would have written and `nft` can change the same elements: each field
//! of a concatenation padded to four bytes (an `ifname` is 16 bytes, NUL
//! padded; an `ether_addr` 6 bytes and two of padding; an `ipv4_addr` 4
//! bytes in network order), a lone field unpadded. A range in a set of
//! concatenations with `flags interval` is one element with a key (its
//! first value) and an end key (its last). `tests` checks all of it
//! against `nft` itself.

use nix::sys::socket::{
    bind, setsockopt, sockopt, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
/// `NFPROTO_BRIDGE`.
pub const FAMILY_BRIDGE: u8 = 7;
/// `NFPROTO_INET`.
pub const FAMILY_INET: u8 = 1;
/// Elements per message: the list is one attribute, whose length is 16
/// bits (an element here is at most about 80 bytes).
const PER_MESSAGE: usize = 256;

/// One set element: its key, and for a range its last value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Elem {
    /// The key as the kernel holds it.
    pub key: Vec<u8>,
    /// The range's end key (sets of concatenations with `flags interval`).
    pub end: Option<Vec<u8>>,
}

/// Elements to add to or delete from one set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change<'a> {
    /// The set's name.
    pub set: &'a str,
    /// Add (true) or delete.
    pub add: bool,
    /// What.
    pub elems: Vec<Elem>,
}

/// Key bytes of one field of a concatenation: `bytes` padded to four.
pub fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes);
    out.resize(out.len() + (4 - bytes.len() % 4) % 4, 0);
}

/// An interface name as an `ifname` key field (16 bytes, NUL padded);
/// `None` for one longer than 15 bytes, which no interface has.
pub fn ifname(name: &str) -> Option<[u8; 16]> {
    let b = name.as_bytes();
    let mut k = [0u8; 16];
    k.get_mut(..b.len())
        .filter(|_| b.len() < 16)?
        .copy_from_slice(b);
    Some(k)
}

fn attr(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Open a nested attribute; [`close`] writes its length.
fn open(out: &mut Vec<u8>, kind: u16) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    at
}

fn close(out: &mut [u8], at: usize) {
    let len = (out.len() - at) as u16;
    out[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Append one netlink message: header, `nfgenmsg`, then what `body`
/// writes.
fn message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[family, 0]);
    out.extend_from_slice(&res_id.to_be_bytes());
    body(out);
    let len = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&len.to_ne_bytes());
}

/// The batch for `changes` to the sets of table `table` (family
/// `family`), its messages numbered from `seq`; and how many of them ask
/// for an acknowledgement.
pub fn batch(family: u8, table: &str, changes: &[Change<'_>], seq: u32) -> (Vec<u8>, u32) {
    let mut out = Vec::new();
    let mut n = seq;
    message(
        &mut out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        n,
        0,
        NFNL_SUBSYS_NFTABLES,
        |_| {},
    );
    let mut acked = 0;
    for c in changes {
        for chunk in c.elems.chunks(PER_MESSAGE) {
            n = n.wrapping_add(1);
            acked += 1;
            let (kind, flags) = if c.add {
                (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)
            } else {
                (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
            };
            message(
                &mut out,
                (NFNL_SUBSYS_NFTABLES << 8) | kind,
                flags,
                n,
                family,
                0,
                |b| {
                    attr(b, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
                    attr(b, NFTA_SET_ELEM_LIST_SET, &cstr(c.set));
                    let list = open(b, NFTA_SET_ELEM_LIST_ELEMENTS);
                    for e in chunk {
                        let el = open(b, NFTA_LIST_ELEM);
                        for (kind, key) in [
                            (NFTA_SET_ELEM_KEY, Some(&e.key)),
                            (NFTA_SET_ELEM_KEY_END, e.end.as_ref()),
                        ] {
                            if let Some(key) = key {
                                let k = open(b, kind);
                                attr(b, NFTA_DATA_VALUE, key);
                                close(b, k);
                            }
                        }
                        close(b, el);
                    }
                    close(b, list);
                },
            );
        }
    }
    n = n.wrapping_add(1);
    message(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        n,
        0,
        NFNL_SUBSYS_NFTABLES,
        |_| {},
    );
    (out, acked)
}

/// Errors in the acknowledgements read so far: each `NLMSG_ERROR` message
/// in `buf` counts one answer, and the first non-zero code is kept.
fn read_acks(buf: &[u8], answers: &mut u32, first_err: &mut Option<i32>) {
    let mut rest = buf;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < 16 || len > rest.len() {
            return;
        }
        if kind == NLMSG_ERROR && len >= 20 {
            *answers += 1;
            let code = i32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
            if code != 0 && first_err.is_none() {
                *first_err = Some(-code);
            }
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
}

/// A netfilter netlink socket (what `nft` talks to), bound to the
/// multicast `groups` (a bit mask; 0 for none).
pub fn socket(groups: u32, flags: SockFlag) -> io::Result<OwnedFd> {
    let fd = nix::sys::socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        flags,
        SockProtocol::NetlinkNetFilter,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
    Ok(fd)
}

/// Apply `changes` to the sets of `table` (family `family`) in one
/// transaction: all of them, or (an error) none.
pub fn apply(family: u8, table: &str, changes: &[Change<'_>]) -> io::Result<()> {
    let (msg, expected) = batch(family, table, changes, 1);
    if expected == 0 {
        return Ok(());
    }
    let fd = socket(0, SockFlag::SOCK_CLOEXEC)?;
    // Answers come at once; a kernel that says nothing is not waited for.
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(2, 0))?;
    let sent = nix::sys::socket::send(fd.as_raw_fd(), &msg, nix::sys::socket::MsgFlags::empty())
        .map_err(io::Error::from)?;
    if sent != msg.len() {
        return Err(io::Error::other("netlink: the batch was cut short"));
    }
    let mut buf = vec![0u8; 64 * 1024];
    let (mut answers, mut err) = (0, None);
    while answers < expected {
        let n = nix::sys::socket::recv(
            fd.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        )
        .map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::Error::other("netlink: closed before answering"));
        }
        read_acks(&buf[..n], &mut answers, &mut err);
        if err.is_some() {
            break;
        }
    }
    match err {
        None => Ok(()),
        Some(e) => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_laid_out_like_nft_lays_them_out() {
        let mut k = ifname("vmesh1").unwrap().to_vec();
        assert_eq!(k.len(), 16);
        field(&mut k, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(k.len(), 24);
        assert_eq!(&k[16..], &[1, 2, 3, 4, 5, 6, 0, 0]);
        assert_eq!(ifname("a-name-too-long!"), None);
        assert!(ifname("fifteen-bytes-x").is_some());
    }

    #[test]
    fn a_batch_is_well_formed_netlink() {
        let e = Elem {
            key: vec![1; 20],
            end: Some(vec![2; 20]),
        };
        let changes = [
            Change {
                set: "port_net",
                add: false,
                elems: vec![e.clone()],
            },
            Change {
                set: "port_net",
                add: true,
                elems: vec![e; 300],
            },
        ];
        let (b, acked) = batch(FAMILY_BRIDGE, "mesh", &changes, 7);
        // One delete, two adds (300 elements in chunks of 256).
        assert_eq!(acked, 3);
        let mut kinds = Vec::new();
        let mut rest = &b[..];
        while !rest.is_empty() {
            let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
            assert!(len >= 20 && len.is_multiple_of(4) && len <= rest.len());
            kinds.push(u16::from_ne_bytes([rest[4], rest[5]]));
            rest = &rest[len..];
        }
        assert_eq!(kinds, [16, 0x0a0e, 0x0a0c, 0x0a0c, 17]);
    }

    #[test]
    fn acks_count_and_the_first_error_is_kept() {
        let ack = |code: i32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_ne_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&[0; 10]);
            m.extend_from_slice(&code.to_ne_bytes());
            m.extend_from_slice(&[0; 16]);
            m
        };
        let mut buf = ack(0);
        buf.extend(ack(-2));
        buf.extend(ack(-17));
        buf.extend_from_slice(&[9, 9]); // a torn tail is ignored
        let (mut n, mut err) = (0, None);
        read_acks(&buf, &mut n, &mut err);
        assert_eq!((n, err), (3, Some(2)));
    }
}
