//! The sleeve: Ethernet frames in UDP datagrams (UDP 6783).
//!
//! ```text
//! 0       1         2      3        4          10         16              24
//! +-------+---------+------+--------+----------+----------+---------------+
//! | magic | version | kind | key id | src peer | dst peer | counter (u64) |
//! +-------+---------+------+--------+----------+----------+---------------+
//! | body: records (kind 1), or records sealed + 16-byte tag (kind 2)      |
//! +-----------------------------------------------------------------------+
//! ```
//!
//! `src`/`dst` are [`PeerName`]s, so a datagram can be relayed over several
//! hops; `dst` is [`PeerName::BROADCAST`] for flooded frames. In a sealed
//! datagram the 24-byte header is the AEAD's associated data and the counter
//! its nonce (see [`crate::seal`]).
//!
//! The body is a sequence of records:
//!
//! ```text
//! frame:    | 1 | len (u16) | virtio-net header (10) + Ethernet frame |
//! fragment: | 2 | id (u32) | total (u32) | offset (u32) | len (u16) | bytes |
//! ```
//!
//! Frames carry the 10-byte `virtio_net_hdr` read from the TAP, so that
//! checksum and segmentation offloads survive the crossing: a 64 KB TCP
//! super-frame is read once, carried as fragments, reassembled
//! ([`crate::reassembly`]) and written once. Small frames are packed several
//! to a datagram by [`Packer`].

use crate::name::PeerName;
use crate::seal::{Opener, SealError, Sealer, TAG_LEN};
use crate::WireError;

/// Header length.
pub const HEADER_LEN: usize = 24;
/// First byte of every sleeve datagram.
pub const MAGIC: u8 = 0x6d;
/// Sleeve format version.
pub const VERSION: u8 = 1;
/// Length of the virtio-net header carried before each frame.
pub const VNET_HDR_LEN: usize = 10;
/// Bytes before a whole frame's data.
pub const FRAME_RECORD_HEADER: usize = 3;
/// Bytes before a fragment's data.
pub const FRAGMENT_RECORD_HEADER: usize = 15;
/// The largest frame (vnet header + Ethernet, up to a 64 KB GSO super-frame).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 14 + 65535 + 64;
/// Everything the sleeve adds around one Ethernet frame carried whole in one
/// datagram over IPv4: IP, UDP, our header, tag, record header, vnet header.
pub const OVERHEAD_V4: usize = 20 + 8 + HEADER_LEN + TAG_LEN + FRAME_RECORD_HEADER + VNET_HDR_LEN;

/// What a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Records in the clear.
    Frames,
    /// Records sealed with ChaCha20-Poly1305.
    Sealed,
}

/// A parsed datagram header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Plain or sealed.
    pub kind: Kind,
    /// Which of the sender's keys sealed it (0 when plain).
    pub key_id: u8,
    /// The peer that sent the frames into the mesh.
    pub src: PeerName,
    /// The peer they are for, or broadcast.
    pub dst: PeerName,
    /// Counter: the nonce when sealed, a sequence number otherwise.
    pub counter: u64,
}

impl Header {
    /// Parse the header at the front of a datagram.
    pub fn parse(b: &[u8]) -> Result<Header, WireError> {
        let Some(h) = b.first_chunk::<HEADER_LEN>() else {
            return Err(WireError::Truncated {
                what: "sleeve header",
                need: HEADER_LEN,
                have: b.len(),
            });
        };
        if h[0] != MAGIC {
            return Err(WireError::BadMagic("sleeve datagram"));
        }
        if h[1] != VERSION {
            return Err(WireError::Unknown {
                what: "sleeve version",
                value: h[1],
            });
        }
        let kind = match h[2] {
            1 => Kind::Frames,
            2 => Kind::Sealed,
            value => {
                return Err(WireError::Unknown {
                    what: "sleeve datagram kind",
                    value,
                })
            }
        };
        let name = |r: std::ops::Range<usize>| {
            let mut n = [0u8; 6];
            n.copy_from_slice(&h[r]);
            PeerName(n)
        };
        let mut c = [0u8; 8];
        c.copy_from_slice(&h[16..24]);
        Ok(Header {
            kind,
            key_id: h[3],
            src: name(4..10),
            dst: name(10..16),
            counter: u64::from_be_bytes(c),
        })
    }

    /// The wire form.
    pub fn emit(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = MAGIC;
        h[1] = VERSION;
        h[2] = match self.kind {
            Kind::Frames => 1,
            Kind::Sealed => 2,
        };
        h[3] = self.key_id;
        h[4..10].copy_from_slice(&self.src.0);
        h[10..16].copy_from_slice(&self.dst.0);
        h[16..24].copy_from_slice(&self.counter.to_be_bytes());
        h
    }
}

/// Build a whole datagram into `out` (cleared first): plain when `sealer` is
/// `None` (with `seq` as its counter), sealed otherwise.
pub fn emit_datagram(
    src: PeerName,
    dst: PeerName,
    body: &[u8],
    sealer: Option<&mut Sealer>,
    seq: u64,
    out: &mut Vec<u8>,
) -> Result<(), SealError> {
    out.clear();
    let header = match &sealer {
        None => Header {
            kind: Kind::Frames,
            key_id: 0,
            src,
            dst,
            counter: seq,
        },
        Some(_) => Header {
            kind: Kind::Sealed,
            key_id: 0,
            src,
            dst,
            counter: 0,
        },
    };
    match sealer {
        None => {
            out.extend_from_slice(&header.emit());
            out.extend_from_slice(body);
        }
        Some(s) => {
            let header = Header {
                key_id: s.key_id(),
                counter: s.next_counter()?,
                ..header
            };
            let h = header.emit();
            let mut sealed = Vec::with_capacity(body.len() + TAG_LEN);
            sealed.extend_from_slice(body);
            s.seal(header.counter, &h, &mut sealed)?;
            out.extend_from_slice(&h);
            out.extend_from_slice(&sealed);
        }
    }
    Ok(())
}

/// Why an incoming datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Failed authentication or replay check.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// A sealed datagram where we have no key for the sender, or a key id we
    /// do not hold.
    #[error("sealed datagram with key id {0} we do not hold")]
    NoKey(u8),
    /// A plaintext datagram where encryption is required.
    #[error("unencrypted datagram refused: encryption is required")]
    PlainRefused,
}

/// Open a datagram in place: check its header, verify and decrypt a sealed
/// body with `opener` (required iff encryption is on), and return the header
/// and the plaintext body's range within `buf`.
pub fn open_datagram(
    buf: &mut [u8],
    opener: Option<&mut Opener>,
) -> Result<(Header, std::ops::Range<usize>), OpenError> {
    let header = Header::parse(buf)?;
    match (header.kind, opener) {
        (Kind::Frames, None) => Ok((header, HEADER_LEN..buf.len())),
        (Kind::Frames, Some(_)) => Err(OpenError::PlainRefused),
        (Kind::Sealed, None) => Err(OpenError::NoKey(header.key_id)),
        (Kind::Sealed, Some(o)) => {
            if o.key_id() != header.key_id {
                return Err(OpenError::NoKey(header.key_id));
            }
            let (h, body) = buf.split_at_mut(HEADER_LEN);
            let n = o.open(header.counter, h, body)?;
            Ok((header, HEADER_LEN..HEADER_LEN + n))
        }
    }
}

/// One record of a datagram body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// A whole frame: vnet header + Ethernet frame.
    Frame(&'a [u8]),
    /// A piece of a large frame.
    Fragment {
        /// Identifies the frame among the sender's.
        id: u32,
        /// The whole frame's length.
        total: u32,
        /// Where this piece starts.
        offset: u32,
        /// The piece.
        data: &'a [u8],
    },
}

/// Iterate over the records of a body. Stops after the first error.
pub fn records(body: &[u8]) -> Records<'_> {
    Records { rest: body }
}

/// Iterator returned by [`records`].
pub struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Records<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError::Truncated {
                what,
                need: n,
                have: self.rest.len(),
            });
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    fn u16(&mut self, what: &'static str) -> Result<usize, WireError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn next_record(&mut self) -> Result<Record<'a>, WireError> {
        let kind = self.take(1, "record kind")?[0];
        match kind {
            1 => {
                let len = self.u16("frame record")?;
                if len < VNET_HDR_LEN + 14 {
                    return Err(WireError::Invalid("frame shorter than its headers"));
                }
                Ok(Record::Frame(self.take(len, "frame")?))
            }
            2 => {
                let id = self.u32("fragment record")?;
                let total = self.u32("fragment record")?;
                let offset = self.u32("fragment record")?;
                let len = self.u16("fragment record")?;
                if total as usize > MAX_FRAME {
                    return Err(WireError::TooLong {
                        what: "fragmented frame",
                        len: total as usize,
                        max: MAX_FRAME,
                    });
                }
                if len == 0 || offset as usize + len > total as usize {
                    return Err(WireError::Invalid("fragment outside its frame"));
                }
                let data = self.take(len, "fragment")?;
                Ok(Record::Fragment {
                    id,
                    total,
                    offset,
                    data,
                })
            }
            value => Err(WireError::Unknown {
                what: "sleeve record kind",
                value,
            }),
        }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, WireError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let r = self.next_record();
        if r.is_err() {
            self.rest = &[];
        }
        Some(r)
    }
}

/// Packs frames into datagram bodies of at most `budget` bytes: several small
/// frames share a body; a frame too large for one body is cut into fragments.
pub struct Packer {
    budget: usize,
    bodies: Vec<Vec<u8>>,
    open: bool,
    next_id: u32,
}

impl Packer {
    /// A packer for bodies of at most `budget` bytes (the datagram payload
    /// minus header and tag). `budget` must leave room for a fragment record
    /// with at least one byte of data.
    pub fn new(budget: usize) -> Packer {
        Packer {
            budget: budget.max(FRAGMENT_RECORD_HEADER + 1),
            bodies: Vec::new(),
            open: false,
            next_id: 0,
        }
    }

    /// The body budget.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Add a frame (vnet header + Ethernet frame).
    pub fn push(&mut self, frame: &[u8]) -> Result<(), WireError> {
        if frame.len() < VNET_HDR_LEN + 14 {
            return Err(WireError::Invalid("frame shorter than its headers"));
        }
        if frame.len() > MAX_FRAME {
            return Err(WireError::TooLong {
                what: "frame",
                len: frame.len(),
                max: MAX_FRAME,
            });
        }
        let need = FRAME_RECORD_HEADER + frame.len();
        if need <= self.budget && frame.len() <= u16::MAX as usize {
            let fits = self.open
                && self
                    .bodies
                    .last()
                    .is_some_and(|b| b.len() + need <= self.budget);
            if !fits {
                self.bodies.push(Vec::with_capacity(self.budget));
                self.open = true;
            }
            if let Some(body) = self.bodies.last_mut() {
                body.push(1);
                body.extend_from_slice(&(frame.len() as u16).to_be_bytes());
                body.extend_from_slice(frame);
            }
            return Ok(());
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let chunk = (self.budget - FRAGMENT_RECORD_HEADER).min(u16::MAX as usize);
        for (i, piece) in frame.chunks(chunk).enumerate() {
            let mut body = Vec::with_capacity(FRAGMENT_RECORD_HEADER + piece.len());
            body.push(2);
            body.extend_from_slice(&id.to_be_bytes());
            body.extend_from_slice(&(frame.len() as u32).to_be_bytes());
            body.extend_from_slice(&((i * chunk) as u32).to_be_bytes());
            body.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            body.extend_from_slice(piece);
            self.bodies.push(body);
        }
        // The last fragment's body may still take small frames.
        self.open = true;
        Ok(())
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.bodies.is_empty()
    }

    /// Take the finished bodies.
    pub fn drain(&mut self) -> std::vec::Drain<'_, Vec<u8>> {
        self.open = false;
        self.bodies.drain(..)
    }
}

/// The destination and source MACs of a vnet-prefixed frame.
pub fn frame_macs(frame: &[u8]) -> Option<([u8; 6], [u8; 6])> {
    let eth = frame.get(VNET_HDR_LEN..VNET_HDR_LEN + 12)?;
    let mut dst = [0u8; 6];
    let mut src = [0u8; 6];
    dst.copy_from_slice(&eth[..6]);
    src.copy_from_slice(&eth[6..12]);
    Some((dst, src))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: PeerName = PeerName([2, 0, 0, 0, 0, 1]);
    const B: PeerName = PeerName([2, 0, 0, 0, 0, 2]);

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![fill; len];
        f[..VNET_HDR_LEN].fill(0);
        f
    }

    #[test]
    fn header_fixed_bytes() {
        let h = Header {
            kind: Kind::Sealed,
            key_id: 7,
            src: A,
            dst: PeerName::BROADCAST,
            counter: 0x0102,
        };
        let b = h.emit();
        assert_eq!(
            b,
            [
                0x6d, 1, 2, 7, 2, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0,
                0, 1, 2
            ]
        );
        assert_eq!(Header::parse(&b), Ok(h));
    }

    #[test]
    fn header_malformed() {
        let good = Header {
            kind: Kind::Frames,
            key_id: 0,
            src: A,
            dst: B,
            counter: 1,
        }
        .emit();
        assert!(matches!(
            Header::parse(&good[..10]),
            Err(WireError::Truncated { .. })
        ));
        let mut b = good;
        b[0] = 0;
        assert!(matches!(Header::parse(&b), Err(WireError::BadMagic(_))));
        let mut b = good;
        b[1] = 9;
        assert!(Header::parse(&b).is_err());
        let mut b = good;
        b[2] = 3;
        assert!(Header::parse(&b).is_err());
    }

    #[test]
    fn records_fixed_bytes() {
        let mut body = vec![1, 0, 24];
        body.extend_from_slice(&[0xab; 24]);
        body.extend_from_slice(&[2, 0, 0, 0, 9, 0, 0, 0, 100, 0, 0, 0, 10, 0, 2, 0xcd, 0xce]);
        let rs: Vec<_> = records(&body).collect::<Result<_, _>>().unwrap();
        assert_eq!(rs[0], Record::Frame(&[0xab; 24]));
        assert_eq!(
            rs[1],
            Record::Fragment {
                id: 9,
                total: 100,
                offset: 10,
                data: &[0xcd, 0xce]
            }
        );
    }

    #[test]
    fn records_malformed() {
        for bad in [
            &[9u8][..],
            &[1, 0, 30, 0, 0],                                    // truncated frame
            &[1, 0, 5, 0, 0, 0, 0, 0],                            // frame too short
            &[2, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 3, 0, 2, 1, 1], // past total
            &[2, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0],       // empty fragment
            &[2, 0, 0, 0, 1, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1], // total too large
        ] {
            assert!(records(bad).any(|r| r.is_err()), "{bad:?}");
        }
    }

    #[test]
    fn packs_small_frames_together() {
        let mut p = Packer::new(1400);
        for i in 0..10 {
            p.push(&frame(100, i)).unwrap();
        }
        let bodies: Vec<_> = p.drain().collect();
        assert_eq!(bodies.len(), 1);
        assert_eq!(records(&bodies[0]).count(), 10);
        p.push(&frame(1000, 1)).unwrap();
        p.push(&frame(1000, 2)).unwrap();
        assert_eq!(p.drain().count(), 2);
    }

    #[test]
    fn sealed_round_trip_and_plain_refused() {
        let mut s = Sealer::new(1, &[9; 32]);
        let mut o = Opener::new(1, &[9; 32]);
        let mut out = Vec::new();
        emit_datagram(A, B, b"\x01body", Some(&mut s), 0, &mut out).unwrap();
        assert!(!out.windows(5).any(|w| w == b"\x01body"));
        let (h, r) = open_datagram(&mut out.clone(), Some(&mut o)).unwrap();
        assert_eq!((h.src, h.dst, h.kind), (A, B, Kind::Sealed));
        let mut copy = out.clone();
        assert_eq!(
            open_datagram(&mut copy, Some(&mut o)).map(|_| ()),
            Err(OpenError::Seal(SealError::Replay(0)))
        );
        let _ = r;
        emit_datagram(A, B, b"\x01body", None, 5, &mut out).unwrap();
        assert_eq!(
            open_datagram(&mut out.clone(), Some(&mut o)).map(|_| ()),
            Err(OpenError::PlainRefused)
        );
        let (h, r) = open_datagram(&mut out, None).unwrap();
        assert_eq!(h.counter, 5);
        assert_eq!(&out[r], b"\x01body");
    }

    proptest! {
        #[test]
        fn header_round_trip(kind: bool, key_id: u8, src: [u8; 6], dst: [u8; 6], counter: u64) {
            let h = Header { kind: if kind { Kind::Sealed } else { Kind::Frames }, key_id, src: PeerName(src), dst: PeerName(dst), counter };
            prop_assert_eq!(Header::parse(&h.emit()), Ok(h));
        }

        /// Whatever frames go in come out, in order, through records and
        /// reassembly, and no body exceeds the budget.
        #[test]
        fn pack_unpack(budget in 64usize..3000, lens in proptest::collection::vec(24usize..5000, 1..20)) {
            let mut p = Packer::new(budget);
            let frames: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &l)| frame(l, i as u8)).collect();
            for f in &frames { p.push(f).unwrap(); }
            let mut r = crate::reassembly::Reassembler::new(16, std::time::Duration::from_secs(1));
            let now = std::time::Instant::now();
            let mut got = Vec::new();
            for body in p.drain() {
                prop_assert!(body.len() <= budget);
                for rec in records(&body) {
                    match rec.unwrap() {
                        Record::Frame(f) => got.push(f.to_vec()),
                        Record::Fragment { id, total, offset, data } => {
                            if let Some(f) = r.push(now, A, id, total, offset, data).unwrap() { got.push(f); }
                        }
                    }
                }
            }
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn never_panics(mut b in proptest::collection::vec(any::<u8>(), 0..200)) {
            for r in records(&b) { let _ = r; }
            let _ = open_datagram(&mut b.clone(), None);
            let _ = open_datagram(&mut b, Some(&mut Opener::new(0, &[0; 32])));
        }
    }
}
