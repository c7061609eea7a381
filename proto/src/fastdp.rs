//! The fast path's wire format and health core.
//!
//! The fast path ("fastdp") is a kernel VXLAN device on the bridge: data
//! never passes through the daemon. The daemon only has to know, per
//! connection, (a) whether VXLAN packets really get through in both
//! directions and (b) which MACs live behind the peer, so that it can
//! program the kernel's forwarding databases. Both come from one message,
//! the [`Probe`], which each daemon sends to each fast-path peer (paced by
//! [`PACE`]: fast until the path is up, every 20 s while it is, and at once
//! when its local MACs change) *through the fast path itself*: a VXLAN packet built in userspace and
//! sent to the peer's VXLAN port (UDP 6784), whose inner Ethernet frame
//! (ethertype [`ETHERTYPE`], addressed to the peer's bridge MAC) the peer's
//! kernel decapsulates onto its bridge, where the daemon picks it up with a
//! packet socket. A probe arriving proves that this peer's VXLAN packets
//! reach us; its [`Probe::hears_you`] flag tells the sender that ours reach
//! it. A connection uses the fast path only while both hold ([`Health`]).
//!
//! Probe layout (inner Ethernet payload, big-endian):
//!
//! ```text
//! 0..4    magic "MFDP"
//! 4       version (1)
//! 5       flags: bit 0 = hears_you, other bits must be zero
//! 6..12   sender's peer name
//! 12..14  n, the number of MACs (at most MAX_MACS)
//! 14..    n MACs of 6 bytes: the sender's local (container, bridge) MACs
//! +16     tag: keyed BLAKE2s-128 over everything before it, keyed with the
//!         sender's probe key (exchanged in the encrypted Intro)
//! ...     zero bytes only (Ethernet pads short frames to 46 bytes)
//! ```
//!
//! The tag means that only a peer that completed a control handshake with
//! us can program our forwarding database: a host on the underlay that
//! merely sends VXLAN packets to port 6784 cannot redirect a MAC.

use crate::beat::{Beat, Pace};
use crate::name::PeerName;
use crate::WireError;
use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use blake2::Blake2sMac;
use std::time::{Duration, Instant};

/// The ethertype of probe frames (IEEE local experimental ethertype 1).
pub const ETHERTYPE: u16 = 0x88B5;
/// The most MACs one probe carries.
pub const MAX_MACS: usize = 200;
/// Length of the probe's tag.
pub const TAG_LEN: usize = 16;
/// Length of a VXLAN header.
pub const VXLAN_HDR_LEN: usize = 8;
/// Length of the fixed part of a probe (before the MACs).
pub const PROBE_FIXED_LEN: usize = 14;
/// Overhead of VXLAN over IPv4: outer IP 20 + UDP 8 + VXLAN 8 + inner
/// Ethernet 14. The fast path's device MTU is the underlay's minus this.
pub const VXLAN_OVERHEAD_V4: u32 = 50;

const MAGIC: &[u8; 4] = b"MFDP";
const VERSION: u8 = 1;
const FLAG_HEARS_YOU: u8 = 1;

/// A probe's key: each side draws its own at random per connection.
pub type ProbeKey = [u8; 16];

/// One probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The sender.
    pub from: PeerName,
    /// Whether the sender has received our probes recently.
    pub hears_you: bool,
    /// The sender's local MACs (at most [`MAX_MACS`]).
    pub macs: Vec<[u8; 6]>,
}

fn tag(key: &ProbeKey, body: &[u8]) -> [u8; TAG_LEN] {
    // A 16-byte key is always a valid BLAKE2s key.
    let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("16-byte BLAKE2s key"));
    m.update(body);
    m.finalize().into_bytes().into()
}

impl Probe {
    /// Serialized length.
    pub fn buffer_len(&self) -> usize {
        PROBE_FIXED_LEN + 6 * self.macs.len().min(MAX_MACS) + TAG_LEN
    }

    /// Append the probe, tagged with `key`, to `out`. MACs beyond
    /// [`MAX_MACS`] are left out.
    pub fn emit(&self, key: &ProbeKey, out: &mut Vec<u8>) {
        let start = out.len();
        let n = self.macs.len().min(MAX_MACS);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(if self.hears_you { FLAG_HEARS_YOU } else { 0 });
        out.extend_from_slice(&self.from.0);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        for m in &self.macs[..n] {
            out.extend_from_slice(m);
        }
        let t = tag(key, &out[start..]);
        out.extend_from_slice(&t);
    }

    /// The sender named in a probe, read before its tag can be checked
    /// (the key depends on who sent it).
    pub fn peek_sender(b: &[u8]) -> Result<PeerName, WireError> {
        if b.len() < PROBE_FIXED_LEN {
            return Err(WireError::Truncated {
                what: "fastdp probe",
                need: PROBE_FIXED_LEN,
                have: b.len(),
            });
        }
        if &b[0..4] != MAGIC {
            return Err(WireError::BadMagic("fastdp probe"));
        }
        let mut name = [0u8; 6];
        name.copy_from_slice(&b[6..12]);
        Ok(PeerName(name))
    }

    /// Parse and authenticate a probe from its sender, keyed with `key`.
    pub fn parse(b: &[u8], key: &ProbeKey) -> Result<Probe, WireError> {
        let from = Self::peek_sender(b)?;
        if b[4] != VERSION {
            return Err(WireError::Unknown {
                what: "fastdp probe version",
                value: b[4],
            });
        }
        let flags = b[5];
        if flags & !FLAG_HEARS_YOU != 0 {
            return Err(WireError::Unknown {
                what: "fastdp probe flags",
                value: flags,
            });
        }
        let n = usize::from(u16::from_be_bytes([b[12], b[13]]));
        if n > MAX_MACS {
            return Err(WireError::TooLong {
                what: "fastdp probe MAC list",
                len: n,
                max: MAX_MACS,
            });
        }
        let body_len = PROBE_FIXED_LEN + 6 * n;
        let need = body_len + TAG_LEN;
        if b.len() < need {
            return Err(WireError::Truncated {
                what: "fastdp probe",
                need,
                have: b.len(),
            });
        }
        if b[need..].iter().any(|&x| x != 0) {
            return Err(WireError::Trailing(b.len() - need));
        }
        let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("16-byte BLAKE2s key"));
        m.update(&b[..body_len]);
        if m.verify_slice(&b[body_len..need]).is_err() {
            return Err(WireError::Invalid("fastdp probe tag"));
        }
        let macs = b[PROBE_FIXED_LEN..body_len]
            .chunks_exact(6)
            .map(|c| {
                let mut m = [0u8; 6];
                m.copy_from_slice(c);
                m
            })
            .collect();
        Ok(Probe {
            from,
            hears_you: flags & FLAG_HEARS_YOU != 0,
            macs,
        })
    }
}

/// A whole VXLAN packet (the UDP payload) carrying `probe` as an Ethernet
/// frame from `src_mac` to `dst_mac` on network `vni`.
pub fn emit_vxlan_probe(
    vni: u32,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    probe: &Probe,
    key: &ProbeKey,
    out: &mut Vec<u8>,
) {
    out.clear();
    let v = vni.to_be_bytes();
    // Flags: I (valid VNI); VNI in bytes 4..7.
    out.extend_from_slice(&[0x08, 0, 0, 0, v[1], v[2], v[3], 0]);
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&ETHERTYPE.to_be_bytes());
    probe.emit(key, out);
}

/// How long without a probe before the fast path to a peer is down.
pub const DEAD_AFTER: Duration = Duration::from_secs(25);
/// How often probes go ([`crate::beat`]): every 500 ms until the path is
/// up both ways and whenever the peer has gone quiet; every 20 s while it
/// is up, the lower peer name probing and the other answering. A path that
/// breaks is down within [`DEAD_AFTER`].
pub const PACE: Pace = Pace {
    fast: Duration::from_millis(500),
    slow: Duration::from_secs(20),
    dead_after: DEAD_AFTER,
};
const _: () = assert!(PACE.check());

/// Why a connection is (not) on the fast path, as far as its health goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Probes flow both ways.
    Up,
    /// No probe has arrived yet.
    Waiting,
    /// Nothing heard from the peer for [`DEAD_AFTER`].
    NotHearing,
    /// The peer does not hear our probes.
    NotHeard,
}

/// Per-connection health of the fast path (sans-IO: time comes in).
///
/// The path is up when a probe arrived within [`DEAD_AFTER`] and the
/// latest one said that the peer hears us. Each direction is checked, so a
/// path blocked one way falls back at both ends. It also paces our probes
/// ([`PACE`]): fast until the path is up, slow while it is.
#[derive(Debug, Clone)]
pub struct Health {
    beat: Beat,
    last_sent: Option<Instant>,
    peer_hears_us: bool,
}

impl Health {
    /// A path with nothing heard yet; `leader` at exactly one end (the
    /// lower peer name).
    pub fn new(leader: bool) -> Health {
        Health {
            beat: Beat::new(PACE, leader),
            last_sent: None,
            peer_hears_us: false,
        }
    }

    /// A probe from the peer arrived.
    pub fn handle_probe(&mut self, now: Instant, hears_you: bool) {
        self.beat.heard(now);
        self.peer_hears_us = hears_you;
    }

    /// We sent the peer a probe.
    pub fn sent(&mut self, now: Instant) {
        self.beat.sent(now);
        self.last_sent = Some(now);
    }

    /// Whether we hear the peer (what our probes tell it).
    pub fn hearing(&self, now: Instant) -> bool {
        self.beat.last_heard().is_some() && !self.beat.dead(now)
    }

    /// When our next probe is due (`None`: now). Fast while the peer does
    /// not hear us yet.
    pub fn next_probe(&self) -> Option<Instant> {
        let due = self.beat.next_due()?;
        if self.peer_hears_us {
            return Some(due);
        }
        Some(due.min(self.last_sent? + PACE.fast))
    }

    /// Whether a probe is due now.
    pub fn probe_due(&self, now: Instant) -> bool {
        self.next_probe().is_none_or(|t| t <= now)
    }

    /// Whether a probe just heard should be answered at once: we do not
    /// hear the peer yet, it does not hear us, or we have been quiet.
    pub fn should_answer(&self, now: Instant, was_hearing: bool, hears_you: bool) -> bool {
        !was_hearing || !hears_you || self.beat.should_answer(now)
    }

    /// The state now.
    pub fn verdict(&self, now: Instant) -> Verdict {
        match self.beat.last_heard() {
            None => Verdict::Waiting,
            Some(_) if !self.hearing(now) => Verdict::NotHearing,
            Some(_) if !self.peer_hears_us => Verdict::NotHeard,
            Some(_) => Verdict::Up,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: ProbeKey = [7; 16];

    fn probe() -> Probe {
        Probe {
            from: PeerName([1, 2, 3, 4, 5, 6]),
            hears_you: true,
            macs: vec![[0xaa; 6], [2, 0, 0, 0, 0, 1]],
        }
    }

    #[test]
    fn fixed_bytes() {
        let mut b = Vec::new();
        probe().emit(&KEY, &mut b);
        assert_eq!(&b[..14], b"MFDP\x01\x01\x01\x02\x03\x04\x05\x06\x00\x02");
        assert_eq!(&b[14..20], &[0xaa; 6]);
        assert_eq!(b.len(), probe().buffer_len());
        assert_eq!(Probe::parse(&b, &KEY).unwrap(), probe());
        // Ethernet padding is accepted.
        b.extend_from_slice(&[0; 10]);
        assert_eq!(Probe::parse(&b, &KEY).unwrap(), probe());
        let mut v = Vec::new();
        emit_vxlan_probe(0x0a1b2c, [1; 6], [2; 6], &probe(), &KEY, &mut v);
        assert_eq!(&v[..8], &[0x08, 0, 0, 0, 0x0a, 0x1b, 0x2c, 0]);
        assert_eq!(&v[20..22], &[0x88, 0xb5]);
        assert_eq!(Probe::parse(&v[22..], &KEY).unwrap(), probe());
    }

    #[test]
    fn malformed() {
        let mut b = Vec::new();
        probe().emit(&KEY, &mut b);
        assert!(Probe::parse(&b, &[8; 16]).is_err(), "wrong key");
        for n in 0..b.len() {
            assert!(Probe::parse(&b[..n], &KEY).is_err(), "truncated to {n}");
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(Probe::parse(&c, &KEY).is_err(), "bit flipped at {i}");
        }
        let mut c = b.clone();
        c.push(1);
        assert!(matches!(
            Probe::parse(&c, &KEY),
            Err(WireError::Trailing(1))
        ));
        let mut c = b.clone();
        c[12] = 0xff;
        assert!(matches!(
            Probe::parse(&c, &KEY),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn health() {
        let t0 = Instant::now();
        let mut h = Health::new(true);
        assert_eq!(h.verdict(t0), Verdict::Waiting);
        h.handle_probe(t0, false);
        assert_eq!(h.verdict(t0), Verdict::NotHeard);
        assert!(h.hearing(t0));
        h.handle_probe(t0 + Duration::from_secs(1), true);
        assert_eq!(h.verdict(t0 + Duration::from_secs(1)), Verdict::Up);
        let late = t0 + Duration::from_secs(1) + DEAD_AFTER + Duration::from_millis(1);
        assert_eq!(h.verdict(late), Verdict::NotHearing);
        assert!(!h.hearing(late));
        h.handle_probe(late, true);
        assert_eq!(h.verdict(late), Verdict::Up);
    }

    #[test]
    fn probes_are_fast_until_up_then_slow() {
        let t0 = Instant::now();
        let mut h = Health::new(true);
        assert!(h.probe_due(t0), "the first goes at once");
        h.sent(t0);
        assert_eq!(h.next_probe(), Some(t0 + PACE.fast));
        // Heard, but the peer does not hear us yet: still fast.
        h.handle_probe(t0, false);
        assert_eq!(h.next_probe(), Some(t0 + PACE.fast));
        assert!(h.should_answer(t0, false, false));
        // Up: slow.
        h.handle_probe(t0, true);
        assert_eq!(h.next_probe(), Some(t0 + PACE.slow));
        // Quiet for a slow interval and more: fast again, then down.
        let t1 = t0 + PACE.slow;
        h.sent(t1);
        let quiet = t0 + PACE.slow + 2 * PACE.fast;
        assert!(h.next_probe().is_some_and(|t| t <= quiet));
        assert_eq!(h.verdict(t0 + DEAD_AFTER), Verdict::NotHearing);
    }

    proptest! {
        #[test]
        fn round_trip(name: [u8; 6], hears: bool, macs in proptest::collection::vec(any::<[u8; 6]>(), 0..MAX_MACS), key: [u8; 16]) {
            let p = Probe { from: PeerName(name), hears_you: hears, macs };
            let mut b = Vec::new();
            p.emit(&key, &mut b);
            prop_assert_eq!(Probe::parse(&b, &key).unwrap(), p);
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Probe::parse(&b, &KEY);
            let _ = Probe::peek_sender(&b);
        }
    }
}
