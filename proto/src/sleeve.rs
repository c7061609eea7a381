//! The sleeve: Ethernet frames in UDP datagrams (UDP 6783).
//!
//! The unit the sleeve seals, relays and delivers is a **message**: one or
//! several frames (each a 10-byte `virtio_net_hdr` + Ethernet frame, up to a
//! 64 KB GSO super-frame) sent from one peer to another (or to all). A
//! message too large for one datagram is cut into **segments** of equal size
//! (the last may be shorter), each a datagram with its own header, so that a
//! whole message leaves in one `UDP_SEGMENT` send and arrives in one
//! `UDP_GRO` receive, and the kernel of the receiving peer segments the
//! super-frame only when it writes it to its TAP.
//!
//! ```text
//! 0       1         2      3        4          10         16     17              24
//! +-------+---------+------+--------+----------+----------+------+---------------+
//! | magic | version | kind | key id | src peer | dst peer | hops | counter (u56) |
//! +-------+---------+------+--------+----------+----------+------+---------------+
//! 24             26           28            30
//! | count (u16)  | index (u16) | stride (u16) | this segment's bytes ...   |
//! +--------------+-------------+--------------+----------------------------+
//! ```
//!
//! `src`/`dst` are [`PeerName`]s, so a message can be relayed over several
//! hops; `dst` is [`PeerName::BROADCAST`] for flooded frames. `hops` is how
//! many times the message was relayed so far (0 as its origin sends it;
//! each relay sends it on with one more, and none relays a message that
//! arrived with [`MAX_HOPS`]). The counter (56 bits, [`COUNTER_MASK`])
//! numbers the messages of one sending hop: it is the nonce when sealed and
//! the reassembly key. Segment `index` of `count` carries the message bytes
//! `[index × stride, index × stride + len)`.
//!
//! The message body is a sequence of frame records `| len (u32) | bytes |`.
//! A sealed message (kind 2) is the body encrypted with ChaCha20-Poly1305
//! then its 16-byte tag, with the first 24 header bytes as associated data:
//! one seal per message, however many segments carry it (see
//! [`crate::seal`]). The hop count is in that header, so each hop seals
//! what it sends on (with its own key for the next link): a relay cannot
//! be made to forward a message with a lowered count. The segment fields
//! are outside the seal; a forged one can only make its message fail to
//! reassemble or to open.
//!
//! Path MTU probes ([`Kind::Probe`]) are plain padding. Their answers
//! ([`Kind::ProbeAck`]) are plain without a password (the counter is the
//! size received, no body) and sealed with one: the counter is taken from
//! the sender's sealer (the nonce), the body is the size (u64, big-endian)
//! sealed under the header, so that no one who can only spoof a
//! neighbour's address can raise our path MTU ([`sealed_probe_ack`],
//! [`open_probe_ack`]).

use crate::name::PeerName;
use crate::seal::{Opener, SealError, Sealer, TAG_LEN};
use crate::WireError;

/// Length of the header every message shares.
pub const HEADER_LEN: usize = 24;
/// Length of the segment fields after it.
pub const SEGMENT_LEN: usize = 6;
/// Everything before a segment's bytes.
pub const DATAGRAM_HEADER_LEN: usize = HEADER_LEN + SEGMENT_LEN;
/// First byte of every sleeve datagram.
pub const MAGIC: u8 = 0x6d;
/// Sleeve format version (3: the hop count in byte 16, a 56-bit counter).
pub const VERSION: u8 = 3;
/// Counters are 56 bits: what fits after the hop count.
pub const COUNTER_MASK: u64 = (1 << 56) - 1;
/// A message that arrives having been relayed this many times is delivered
/// (when it is for us or a broadcast) but never relayed again. Far beyond
/// the diameter of any real mesh (routes are shortest paths over at most
/// `--max-peers` peers, and a mesh of thousands is a few hops across), and
/// small enough that a transient routing loop (two peers whose topology
/// views disagree for a moment, each routing through the other) dies after
/// a few dozen copies instead of circling until the views agree.
pub const MAX_HOPS: u8 = 64;
/// Length of the virtio-net header carried before each frame.
pub const VNET_HDR_LEN: usize = 10;
/// Bytes before each frame in a message body.
pub const FRAME_RECORD_HEADER: usize = 4;
/// The largest frame (vnet header + Ethernet, up to a 64 KB GSO super-frame).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 14 + 65535 + 64;
/// The TSO size given to containers' interfaces: a super-frame of this size,
/// cut into segments of at least 700 bytes with their headers, still fits
/// one UDP GSO send (65,507 bytes), so it leaves in one system call.
pub const CONTAINER_GSO_MAX_SIZE: u32 = 62_000;
/// The largest message: one largest frame, sealed.
pub const MAX_MESSAGE: usize = FRAME_RECORD_HEADER + MAX_FRAME + TAG_LEN;
/// IPv4 and UDP headers: what an MTU counts beyond a datagram's payload.
pub const IP_UDP_V4: usize = 20 + 8;
/// Everything the sleeve adds around one Ethernet frame carried whole in one
/// datagram over IPv4: IP, UDP, our headers, tag, record header, vnet header.
pub const OVERHEAD_V4: usize =
    IP_UDP_V4 + DATAGRAM_HEADER_LEN + TAG_LEN + FRAME_RECORD_HEADER + VNET_HDR_LEN;

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Frame records in the clear.
    Frames,
    /// Frame records sealed with ChaCha20-Poly1305.
    Sealed,
    /// A path MTU probe: one datagram of `counter` bytes (IP and UDP headers
    /// included) of padding, sent with don't-fragment ([`crate::pmtu`]).
    Probe,
    /// The answer to a probe. Plain (key id 0): `counter` is the size
    /// received, no bytes. Sealed (with a password): `counter` is the
    /// nonce, and the body is the size (u64, big-endian) sealed.
    ProbeAck,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Frames => 1,
            Kind::Sealed => 2,
            Kind::Probe => 3,
            Kind::ProbeAck => 4,
        }
    }
}

/// The header every segment of a message repeats.
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
    /// How many times the message was relayed before this hop sent it.
    pub hops: u8,
    /// The sending hop's message counter: the nonce when sealed. Only its
    /// low 56 bits are sent ([`COUNTER_MASK`]).
    pub counter: u64,
}

/// Where one datagram's bytes belong in its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// How many segments the message has (at least 1).
    pub count: u16,
    /// This one's position, below `count`.
    pub index: u16,
    /// Bytes in every segment but the last (which has at most as many).
    pub stride: u16,
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
            3 => Kind::Probe,
            4 => Kind::ProbeAck,
            value => {
                return Err(WireError::Unknown {
                    what: "sleeve message kind",
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
        c[1..].copy_from_slice(&h[17..24]);
        Ok(Header {
            kind,
            key_id: h[3],
            src: name(4..10),
            dst: name(10..16),
            hops: h[16],
            counter: u64::from_be_bytes(c),
        })
    }

    /// The wire form (the counter's low 56 bits).
    pub fn emit(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = MAGIC;
        h[1] = VERSION;
        h[2] = self.kind.code();
        h[3] = self.key_id;
        h[4..10].copy_from_slice(&self.src.0);
        h[10..16].copy_from_slice(&self.dst.0);
        h[16] = self.hops;
        h[17..24].copy_from_slice(&(self.counter & COUNTER_MASK).to_be_bytes()[1..]);
        h
    }
}

impl Segment {
    /// How a message of `len` bytes is cut into segments of at most
    /// `max_payload` bytes each.
    pub fn plan(len: usize, max_payload: usize) -> Result<Segment, WireError> {
        let stride = max_payload.clamp(1, u16::MAX as usize);
        let count = len.div_ceil(stride).max(1);
        if len > MAX_MESSAGE || count > u16::MAX as usize {
            return Err(WireError::TooLong {
                what: "sleeve message",
                len,
                max: MAX_MESSAGE,
            });
        }
        Ok(Segment {
            count: count as u16,
            index: 0,
            stride: stride as u16,
        })
    }

    /// The datagram headers of every segment of this plan, in order.
    pub fn headers(
        self,
        h: &[u8; HEADER_LEN],
    ) -> impl Iterator<Item = [u8; DATAGRAM_HEADER_LEN]> + '_ {
        (0..self.count).map(move |index| emit_datagram_header(h, Segment { index, ..self }))
    }

    /// The byte range of segment `index` in a message of `len` bytes.
    pub fn range(&self, index: u16, len: usize) -> std::ops::Range<usize> {
        let start = (index as usize * self.stride as usize).min(len);
        start..(start + self.stride as usize).min(len)
    }

    /// Check this segment's fields and its byte count.
    fn check(&self, len: usize) -> Result<(), WireError> {
        if self.count == 0 || self.index >= self.count {
            return Err(WireError::Invalid("segment index"));
        }
        if self.stride == 0 && self.count > 1 {
            return Err(WireError::Invalid("segment stride"));
        }
        if self.count as usize * self.stride as usize > MAX_MESSAGE + self.stride as usize {
            return Err(WireError::TooLong {
                what: "segmented message",
                len: self.count as usize * self.stride as usize,
                max: MAX_MESSAGE,
            });
        }
        let last = self.index + 1 == self.count;
        let ok = if last {
            len <= self.stride as usize || self.count == 1
        } else {
            len == self.stride as usize
        };
        if !ok {
            return Err(WireError::Invalid("segment length"));
        }
        Ok(())
    }
}

/// The header of segment `seg.index` of a message.
pub fn emit_datagram_header(h: &[u8; HEADER_LEN], seg: Segment) -> [u8; DATAGRAM_HEADER_LEN] {
    let mut out = [0u8; DATAGRAM_HEADER_LEN];
    out[..HEADER_LEN].copy_from_slice(h);
    out[24..26].copy_from_slice(&seg.count.to_be_bytes());
    out[26..28].copy_from_slice(&seg.index.to_be_bytes());
    out[28..30].copy_from_slice(&seg.stride.to_be_bytes());
    out
}

/// Parse one datagram: its message header, its segment fields, and the
/// range of its bytes within `b`.
pub fn parse_datagram(b: &[u8]) -> Result<(Header, Segment, std::ops::Range<usize>), WireError> {
    let header = Header::parse(b)?;
    let Some(s) = b.get(HEADER_LEN..DATAGRAM_HEADER_LEN) else {
        return Err(WireError::Truncated {
            what: "sleeve segment header",
            need: DATAGRAM_HEADER_LEN,
            have: b.len(),
        });
    };
    let seg = Segment {
        count: u16::from_be_bytes([s[0], s[1]]),
        index: u16::from_be_bytes([s[2], s[3]]),
        stride: u16::from_be_bytes([s[4], s[5]]),
    };
    seg.check(b.len() - DATAGRAM_HEADER_LEN)?;
    Ok((header, seg, DATAGRAM_HEADER_LEN..b.len()))
}

/// Why an incoming message was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Failed authentication or replay check.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// A sealed message where we have no key for the sender, or a key id we
    /// do not hold.
    #[error("sealed message with key id {0} we do not hold")]
    NoKey(u8),
    /// A plaintext message where encryption is required.
    #[error("unencrypted message refused: encryption is required")]
    PlainRefused,
}

/// The header for a message to send, relayed `hops` times before: plain
/// with counter `seq` (its low 56 bits) when `sealer` is `None`, else sealed
/// under the sealer's next counter.
pub fn message_header(
    src: PeerName,
    dst: PeerName,
    hops: u8,
    sealer: Option<&Sealer>,
    seq: u64,
) -> Result<Header, SealError> {
    Ok(match sealer {
        None => Header {
            kind: Kind::Frames,
            key_id: 0,
            src,
            dst,
            hops,
            counter: seq & COUNTER_MASK,
        },
        Some(s) => Header {
            kind: Kind::Sealed,
            key_id: s.key_id(),
            src,
            dst,
            hops,
            counter: s.next_counter()?,
        },
    })
}

/// Seal a message body in place: `body` grows by the tag. A no-op for plain
/// headers.
pub fn seal_message(
    header: &Header,
    sealer: Option<&Sealer>,
    body: &mut Vec<u8>,
) -> Result<(), SealError> {
    match (header.kind, sealer) {
        (Kind::Sealed, Some(s)) => s.seal(header.counter, &header.emit(), body),
        _ => Ok(()),
    }
}

/// Open a whole message in place: check that its kind is what we require
/// (sealed iff `opener` is given), verify and decrypt, and return the
/// plaintext body's length (its start is 0).
pub fn open_message(
    header: &Header,
    msg: &mut [u8],
    opener: Option<&mut Opener>,
) -> Result<usize, OpenError> {
    match (header.kind, opener) {
        (Kind::Probe | Kind::ProbeAck, _) => Err(OpenError::Wire(WireError::Invalid(
            "probe where frames were expected",
        ))),
        (Kind::Frames, None) => Ok(msg.len()),
        (Kind::Frames, Some(_)) => Err(OpenError::PlainRefused),
        (Kind::Sealed, None) => Err(OpenError::NoKey(header.key_id)),
        (Kind::Sealed, Some(o)) => {
            if o.key_id() != header.key_id {
                return Err(OpenError::NoKey(header.key_id));
            }
            Ok(o.open(header.counter, &header.emit(), msg)?)
        }
    }
}

/// The header of a one-datagram message of `kind` carrying `counter`.
fn lone_datagram_header(
    kind: Kind,
    src: PeerName,
    dst: PeerName,
    counter: u64,
) -> [u8; DATAGRAM_HEADER_LEN] {
    let h = Header {
        kind,
        key_id: 0,
        src,
        dst,
        hops: 0,
        counter,
    };
    emit_datagram_header(
        &h.emit(),
        Segment {
            count: 1,
            index: 0,
            stride: 0,
        },
    )
}

/// A path MTU probe from `src` to `dst` that makes an IPv4 datagram of
/// `size` bytes (at least the headers).
pub fn probe_datagram(src: PeerName, dst: PeerName, size: usize) -> Vec<u8> {
    let mut d = lone_datagram_header(Kind::Probe, src, dst, size as u64).to_vec();
    d.resize(size.saturating_sub(IP_UDP_V4).max(DATAGRAM_HEADER_LEN), 0);
    d
}

/// The plain answer to a probe of `size` bytes (without a password).
pub fn probe_ack(src: PeerName, dst: PeerName, size: usize) -> [u8; DATAGRAM_HEADER_LEN] {
    lone_datagram_header(Kind::ProbeAck, src, dst, size as u64)
}

/// Bytes of a sealed probe acknowledgement after its datagram header: the
/// size and the tag.
pub const SEALED_ACK_BODY: usize = 8 + TAG_LEN;

/// The sealed answer to a probe of `size` bytes (with a password): one
/// datagram whose header takes its counter from `sealer` and whose body is
/// the size sealed under that header.
pub fn sealed_probe_ack(
    src: PeerName,
    dst: PeerName,
    sealer: &Sealer,
    size: usize,
) -> Result<Vec<u8>, SealError> {
    let h = Header {
        kind: Kind::ProbeAck,
        key_id: sealer.key_id(),
        src,
        dst,
        hops: 0,
        counter: sealer.next_counter()?,
    };
    let aad = h.emit();
    let mut body = (size as u64).to_be_bytes().to_vec();
    sealer.seal(h.counter, &aad, &mut body)?;
    let mut d = emit_datagram_header(
        &aad,
        Segment {
            count: 1,
            index: 0,
            stride: 0,
        },
    )
    .to_vec();
    d.extend_from_slice(&body);
    Ok(d)
}

/// The size a probe acknowledgement (its header and body, as
/// [`parse_datagram`] gave them) says arrived: plain when `opener` is
/// `None` (key id 0, no body, the size in the counter), else sealed under
/// the opener's key, opened (replay window included) in place.
pub fn open_probe_ack(
    header: &Header,
    body: &mut [u8],
    opener: Option<&mut Opener>,
) -> Result<u64, OpenError> {
    if header.kind != Kind::ProbeAck {
        return Err(OpenError::Wire(WireError::Invalid(
            "not a probe acknowledgement",
        )));
    }
    match opener {
        None if header.key_id == 0 && body.is_empty() => Ok(header.counter),
        None if header.key_id == 0 => Err(OpenError::Wire(WireError::Trailing(body.len()))),
        None => Err(OpenError::NoKey(header.key_id)),
        Some(_) if header.key_id == 0 => Err(OpenError::PlainRefused),
        Some(o) if o.key_id() != header.key_id => Err(OpenError::NoKey(header.key_id)),
        Some(o) => {
            if body.len() != SEALED_ACK_BODY {
                return Err(OpenError::Wire(WireError::Invalid(
                    "sealed probe acknowledgement length",
                )));
            }
            let n = o.open(header.counter, &header.emit(), body)?;
            let size = body
                .get(..n)
                .and_then(|b| b.first_chunk::<8>())
                .map(|b| u64::from_be_bytes(*b))
                .ok_or(OpenError::Wire(WireError::Invalid(
                    "sealed probe acknowledgement length",
                )))?;
            Ok(size)
        }
    }
}

/// Append one frame (vnet header + Ethernet frame) as a record.
pub fn push_frame(body: &mut Vec<u8>, frame: &[u8]) -> Result<(), WireError> {
    check_frame(frame.len())?;
    body.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    body.extend_from_slice(frame);
    Ok(())
}

/// The record header for a frame of `len` bytes, for callers that place the
/// frame themselves (read straight from the TAP after these 4 bytes).
pub fn frame_record_header(len: usize) -> Result<[u8; FRAME_RECORD_HEADER], WireError> {
    check_frame(len)?;
    Ok((len as u32).to_be_bytes())
}

fn check_frame(len: usize) -> Result<(), WireError> {
    if len < VNET_HDR_LEN + 14 {
        return Err(WireError::Invalid("frame shorter than its headers"));
    }
    if len > MAX_FRAME {
        return Err(WireError::TooLong {
            what: "frame",
            len,
            max: MAX_FRAME,
        });
    }
    Ok(())
}

/// Iterate over the frames of a message body. Stops after the first error.
pub fn frames(body: &[u8]) -> Frames<'_> {
    Frames { rest: body }
}

/// Iterator returned by [`frames`].
pub struct Frames<'a> {
    rest: &'a [u8],
}

impl<'a> Frames<'a> {
    fn next_frame(&mut self) -> Result<&'a [u8], WireError> {
        let Some((len, rest)) = self.rest.split_first_chunk::<FRAME_RECORD_HEADER>() else {
            return Err(WireError::Truncated {
                what: "frame record",
                need: FRAME_RECORD_HEADER,
                have: self.rest.len(),
            });
        };
        let len = u32::from_be_bytes(*len) as usize;
        check_frame(len)?;
        if rest.len() < len {
            return Err(WireError::Truncated {
                what: "frame",
                need: len,
                have: rest.len(),
            });
        }
        let (f, rest) = rest.split_at(len);
        self.rest = rest;
        Ok(f)
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<&'a [u8], WireError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let r = self.next_frame();
        if r.is_err() {
            self.rest = &[];
        }
        Some(r)
    }
}

/// Cut a message into datagrams (header + bytes each), in order: the
/// reference form of what a sender puts on the wire (the daemon sends the
/// same bytes with one `UDP_SEGMENT` send per group, without copying).
pub fn segment_message(
    header: &Header,
    msg: &[u8],
    max_payload: usize,
) -> Result<Vec<Vec<u8>>, WireError> {
    let plan = Segment::plan(msg.len(), max_payload)?;
    let h = header.emit();
    Ok(plan
        .headers(&h)
        .zip(0..)
        .map(|(hdr, index)| {
            let mut d = hdr.to_vec();
            d.extend_from_slice(&msg[plan.range(index, msg.len())]);
            d
        })
        .collect())
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
    use crate::reassembly::Reassembler;
    use proptest::prelude::*;
    use std::time::{Duration, Instant};

    const A: PeerName = PeerName([2, 0, 0, 0, 0, 1]);
    const B: PeerName = PeerName([2, 0, 0, 0, 0, 2]);

    fn plain_header() -> [u8; HEADER_LEN] {
        Header {
            kind: Kind::Frames,
            key_id: 0,
            src: A,
            dst: B,
            hops: 0,
            counter: 1,
        }
        .emit()
    }

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
            hops: 5,
            counter: 0x0102,
        };
        let b = h.emit();
        assert_eq!(
            b,
            [
                0x6d, 3, 2, 7, 2, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 5, 0, 0, 0, 0,
                0, 1, 2
            ]
        );
        assert_eq!(Header::parse(&b), Ok(h));
        // The counter is 56 bits: what is above them is not sent.
        let wide = Header {
            counter: (0xab << 56) | COUNTER_MASK,
            ..h
        };
        let b = wide.emit();
        assert_eq!(&b[16..], &[5, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            Header::parse(&b).map(|p| p.counter),
            Ok(COUNTER_MASK),
            "the hop count stays its own"
        );
        let d = emit_datagram_header(
            &b,
            Segment {
                count: 3,
                index: 1,
                stride: 0x0500,
            },
        );
        assert_eq!(&d[24..], &[0, 3, 0, 1, 5, 0]);
    }

    #[test]
    fn header_malformed() {
        let good = plain_header();
        assert!(matches!(
            Header::parse(&good[..10]),
            Err(WireError::Truncated { .. })
        ));
        let mut b = good;
        b[0] = 0;
        assert!(matches!(Header::parse(&b), Err(WireError::BadMagic(_))));
        for old in [1, 2] {
            let mut b = good;
            b[1] = old;
            assert!(Header::parse(&b).is_err(), "version {old} is refused");
        }
        let mut b = good;
        b[2] = 5;
        assert!(Header::parse(&b).is_err());
    }

    #[test]
    fn segments_checked() {
        let h = plain_header();
        let dgram = |count, index, stride, len: usize| {
            let mut d = emit_datagram_header(
                &h,
                Segment {
                    count,
                    index,
                    stride,
                },
            )
            .to_vec();
            d.resize(DATAGRAM_HEADER_LEN + len, 0);
            d
        };
        assert!(parse_datagram(&dgram(1, 0, 0, 0)).is_ok(), "heartbeat");
        assert!(parse_datagram(&dgram(1, 0, 100, 40)).is_ok());
        assert!(parse_datagram(&dgram(3, 1, 100, 100)).is_ok());
        assert!(parse_datagram(&dgram(3, 2, 100, 7)).is_ok());
        assert!(
            parse_datagram(&dgram(3, 1, 100, 99)).is_err(),
            "short middle"
        );
        assert!(parse_datagram(&dgram(3, 2, 100, 101)).is_err(), "long last");
        assert!(parse_datagram(&dgram(3, 3, 100, 1)).is_err(), "index");
        assert!(parse_datagram(&dgram(0, 0, 100, 1)).is_err(), "count 0");
        assert!(parse_datagram(&dgram(2, 0, 0, 0)).is_err(), "stride 0");
        assert!(
            parse_datagram(&dgram(60000, 0, 1400, 1400)).is_err(),
            "huge"
        );
        assert!(parse_datagram(&h).is_err(), "no segment fields");
    }

    #[test]
    fn frames_fixed_bytes_and_malformed() {
        let mut body = vec![0, 0, 0, 24];
        body.extend_from_slice(&[0xab; 24]);
        let fs: Vec<_> = frames(&body).collect::<Result<_, _>>().unwrap();
        assert_eq!(fs, vec![&[0xab; 24][..]]);
        for bad in [
            &[9u8][..],
            &[0, 0, 0, 30, 0, 0],            // truncated frame
            &[0, 0, 0, 5, 0, 0, 0, 0, 0],    // frame too short
            &[0, 0xff, 0xff, 0xff, 0, 0, 0], // too long
        ] {
            assert!(frames(bad).any(|r| r.is_err()), "{bad:?}");
        }
    }

    #[test]
    fn sealed_round_trip_and_plain_refused() {
        let s = Sealer::new(1, &[9; 32]);
        let mut o = Opener::new(1, &[9; 32]);
        let mut body = Vec::new();
        push_frame(&mut body, &frame(60, 0x42)).unwrap();
        let plain = body.clone();
        let h = message_header(A, B, 0, Some(&s), 0).unwrap();
        seal_message(&h, Some(&s), &mut body).unwrap();
        assert_eq!(body.len(), plain.len() + TAG_LEN);
        assert!(!body.windows(8).any(|w| w == [0x42; 8]));
        let mut copy = body.clone();
        let n = open_message(&h, &mut copy, Some(&mut o)).unwrap();
        assert_eq!(&copy[..n], &plain[..]);
        assert_eq!(
            open_message(&h, &mut body.clone(), Some(&mut o)),
            Err(OpenError::Seal(SealError::Replay(0)))
        );
        // The header is authenticated, the hop count with it.
        let mut o2 = Opener::new(1, &[9; 32]);
        for other in [Header { dst: A, ..h }, Header { hops: 1, ..h }] {
            assert_eq!(
                open_message(&other, &mut body.clone(), Some(&mut o2)),
                Err(OpenError::Seal(SealError::Forged))
            );
        }
        let ph = message_header(A, B, 0, None, 5).unwrap();
        assert_eq!(
            open_message(&ph, &mut plain.clone(), Some(&mut o)),
            Err(OpenError::PlainRefused)
        );
        assert_eq!(open_message(&ph, &mut plain.clone(), None), Ok(plain.len()));
        assert_eq!(
            open_message(&h, &mut body.clone(), None),
            Err(OpenError::NoKey(1))
        );
    }

    /// A restarted peer is a new session: new keys under the same key id
    /// (and counters from 0 again). What the dead session still seals (far
    /// ahead in its counters) is refused by the new opener and does not
    /// move its replay window, so the new session's first messages open;
    /// and the new session's messages never open with the dead one's
    /// opener.
    #[test]
    fn dead_session_refused_new_session_opens() {
        let old_key = [1; 32];
        let new_key = [2; 32];
        let old = Sealer::new(1, &old_key);
        for _ in 0..5000 {
            old.next_counter().unwrap();
        }
        let new = Sealer::new(1, &new_key);
        let mut new_opener = Opener::new(1, &new_key);
        let mut old_opener = Opener::new(1, &old_key);
        let mut body = Vec::new();
        push_frame(&mut body, &frame(60, 0x42)).unwrap();
        let sealed = |s: &Sealer| {
            let h = message_header(A, B, 0, Some(s), 0).unwrap();
            let mut m = body.clone();
            seal_message(&h, Some(s), &mut m).unwrap();
            (h, m)
        };
        for _ in 0..3 {
            let (h, mut m) = sealed(&old);
            assert!(h.counter >= 5000);
            assert_eq!(
                open_message(&h, &mut m, Some(&mut new_opener)),
                Err(OpenError::Seal(SealError::Forged))
            );
        }
        let (h, mut m) = sealed(&new);
        assert_eq!(h.counter, 0);
        assert_eq!(
            open_message(&h, &mut m.clone(), Some(&mut old_opener)),
            Err(OpenError::Seal(SealError::Forged))
        );
        assert_eq!(
            open_message(&h, &mut m, Some(&mut new_opener)),
            Ok(body.len())
        );
    }

    #[test]
    fn probes() {
        let d = probe_datagram(A, B, 1400);
        assert_eq!(d.len(), 1400 - 28);
        let (h, seg, range) = parse_datagram(&d).unwrap();
        assert_eq!((h.kind, h.counter, seg.count), (Kind::Probe, 1400, 1));
        assert_eq!(range.len(), 1400 - 28 - DATAGRAM_HEADER_LEN);
        let a = probe_ack(B, A, 1400);
        let (h, _, range) = parse_datagram(&a).unwrap();
        assert_eq!((h.kind, h.counter, range.len()), (Kind::ProbeAck, 1400, 0));
        // Never taken for frames.
        assert!(open_message(&h, &mut [], None).is_err());
    }

    /// With a password a probe's answer is sealed: it opens under the
    /// sender's key once, and nothing else opens (altered, replayed, under
    /// another key, plain, a plain ack's size field forged).
    #[test]
    fn sealed_probe_acks() {
        let s = Sealer::new(4, &[5; 32]);
        let mut o = Opener::new(4, &[5; 32]);
        let parse = |d: &[u8]| {
            let (h, seg, range) = parse_datagram(d).unwrap();
            assert_eq!((h.kind, seg.count), (Kind::ProbeAck, 1));
            (h, d[range].to_vec())
        };
        let d = sealed_probe_ack(B, A, &s, 1400).unwrap();
        assert_eq!(d.len(), DATAGRAM_HEADER_LEN + SEALED_ACK_BODY);
        let (h, body) = parse(&d);
        assert_eq!((h.key_id, h.counter), (4, 0));
        assert_eq!(
            open_probe_ack(&h, &mut body.clone(), Some(&mut o)),
            Ok(1400)
        );
        // Replayed.
        assert_eq!(
            open_probe_ack(&h, &mut body.clone(), Some(&mut o)),
            Err(OpenError::Seal(SealError::Replay(0)))
        );
        // A later one, altered: its counter, a body byte, its claimed size.
        let d = sealed_probe_ack(B, A, &s, 1200).unwrap();
        let (h, body) = parse(&d);
        let bumped = Header {
            counter: h.counter + 1,
            ..h
        };
        assert_eq!(
            open_probe_ack(&bumped, &mut body.clone(), Some(&mut o)),
            Err(OpenError::Seal(SealError::Forged))
        );
        let mut flipped = body.clone();
        flipped[7] ^= 1;
        assert_eq!(
            open_probe_ack(&h, &mut flipped, Some(&mut o)),
            Err(OpenError::Seal(SealError::Forged))
        );
        // Under another key, or a key id we do not hold.
        let other = Sealer::new(4, &[6; 32]);
        for _ in 0..5 {
            other.next_counter().unwrap();
        }
        let (fh, fb) = parse(&sealed_probe_ack(B, A, &other, 1500).unwrap());
        assert_eq!(
            open_probe_ack(&fh, &mut fb.clone(), Some(&mut o)),
            Err(OpenError::Seal(SealError::Forged))
        );
        let (kh, kb) = parse(&sealed_probe_ack(B, A, &Sealer::new(9, &[5; 32]), 1500).unwrap());
        assert_eq!(
            open_probe_ack(&kh, &mut kb.clone(), Some(&mut o)),
            Err(OpenError::NoKey(9))
        );
        assert_eq!(
            open_probe_ack(&kh, &mut kb.clone(), None),
            Err(OpenError::NoKey(9))
        );
        // A plain ack is refused where acks are sealed.
        let (ph, pb) = parse(&probe_ack(B, A, 1500));
        assert_eq!(
            open_probe_ack(&ph, &mut pb.clone(), Some(&mut o)),
            Err(OpenError::PlainRefused)
        );
        assert_eq!(open_probe_ack(&ph, &mut pb.clone(), None), Ok(1500));
        // The untouched one still opens: forgeries burnt nothing.
        assert_eq!(
            open_probe_ack(&h, &mut body.clone(), Some(&mut o)),
            Ok(1200)
        );
        // Truncated or padded bodies are malformed, never a panic.
        for len in [0, 8, SEALED_ACK_BODY - 1, SEALED_ACK_BODY + 1] {
            let mut b = vec![0u8; len];
            assert!(matches!(
                open_probe_ack(&h, &mut b, Some(&mut o)),
                Err(OpenError::Wire(_))
            ));
        }
        assert!(open_probe_ack(&ph, &mut [0u8; 3], None).is_err());
    }

    proptest! {
        #[test]
        fn header_round_trip(kind: bool, key_id: u8, src: [u8; 6], dst: [u8; 6], hops: u8, counter in 0..=COUNTER_MASK) {
            let h = Header { kind: if kind { Kind::Sealed } else { Kind::Frames }, key_id, src: PeerName(src), dst: PeerName(dst), hops, counter };
            prop_assert_eq!(Header::parse(&h.emit()), Ok(h));
        }

        #[test]
        fn open_probe_ack_never_panics(b in proptest::collection::vec(any::<u8>(), 0..80), sealed: bool) {
            if let Ok((h, _, range)) = parse_datagram(&b) {
                let mut body = b[range].to_vec();
                let mut o = Opener::new(h.key_id, &[0; 32]);
                let _ = open_probe_ack(&h, &mut body, sealed.then_some(&mut o));
            }
        }

        /// Whatever frames go in come out, in order, through segmentation,
        /// reordering, duplication, reassembly and (when sealed) opening.
        #[test]
        fn segment_reassemble(
            payload in 64usize..3000,
            lens in proptest::collection::vec(24usize..16000, 1..5),
            sealed: bool,
            seed: u64,
        ) {
            let s = Sealer::new(0, &[3; 32]);
            let mut o = Opener::new(0, &[3; 32]);
            let frames_in: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &l)| frame(l, i as u8)).collect();
            let mut body = Vec::new();
            for f in &frames_in { push_frame(&mut body, f).unwrap(); }
            let h = message_header(A, B, 0, sealed.then_some(&s), 9).unwrap();
            seal_message(&h, sealed.then_some(&s), &mut body).unwrap();
            let mut dgrams = segment_message(&h, &body, payload).unwrap();
            for d in &dgrams { prop_assert!(d.len() <= DATAGRAM_HEADER_LEN + payload); }
            // Shuffle deterministically and duplicate the first.
            let mut x = seed | 1;
            for i in (1..dgrams.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                dgrams.swap(i, (x % (i as u64 + 1)) as usize);
            }
            // A duplicate (of a message in several segments: a whole
            // duplicated datagram is a duplicated message, which the replay
            // window refuses when sealed).
            if dgrams.len() > 1 {
                let dup = dgrams[0].clone();
                dgrams.push(dup);
            }
            let mut r = Reassembler::new(8, 8, Duration::from_secs(1));
            let now = Instant::now();
            let mut got = None;
            for d in &dgrams {
                let (hh, seg, range) = parse_datagram(d).unwrap();
                prop_assert_eq!(hh, h);
                if let Some(m) = r.push(now, 1, hh.counter, seg, &d[range]).unwrap() {
                    prop_assert!(got.is_none(), "completed twice");
                    got = Some(m);
                }
            }
            let mut m = got.expect("message completed");
            let n = open_message(&h, &mut m, sealed.then_some(&mut o)).unwrap();
            let out: Vec<Vec<u8>> = frames(&m[..n]).map(|f| f.unwrap().to_vec()).collect();
            prop_assert_eq!(out, frames_in);
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            for f in frames(&b) { let _ = f; }
            if let Ok((h, seg, range)) = parse_datagram(&b) {
                let mut r = Reassembler::new(2, 2, Duration::from_secs(1));
                let _ = r.push(Instant::now(), 0, h.counter, seg, &b[range]);
                let _ = open_message(&h, &mut b.clone(), Some(&mut Opener::new(0, &[0; 32])));
            }
        }
    }
}
