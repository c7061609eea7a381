//! The gossip wire format.
//!
//! ```text
//! +--------+------------------------------------------+
//! | format | postcard-encoded [`Body`] (format 1)     |
//! +--------+------------------------------------------+
//! ```
//!
//! One message is one control-channel record; the daemon carries it opaque.
//! The leading format byte lets a mesh be upgraded peer by peer: a new layout
//! of [`Body`] is a new format number. Topology records do not repeat peer
//! names: every [`Update`] carries a dictionary of the names it mentions and
//! the records refer to them by index, so a connection costs one to two bytes.
//!
//! Decoding caps the message length before anything else ([`MAX_MESSAGE`]),
//! postcard pre-allocates at most what the remaining bytes could hold, and
//! every count and index is checked after decoding: a bad message is an
//! error, never a panic.

use crate::name::PeerName;
use crate::sign::{PublicKey, Sig};
use crate::WireError;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The format byte this build writes and reads (2: records are signed).
pub const FORMAT: u8 = 2;
/// The largest message this build sends (the daemon puts each in one
/// encrypted control record).
pub const MAX_MESSAGE: usize = 60_000;
/// The largest message accepted (a little slack over [`MAX_MESSAGE`]).
pub const MAX_INBOUND: usize = 65_000;
/// The most connections one peer may report.
pub const MAX_CONNS: usize = 4096;
/// The most addresses a peer advertises for itself.
pub const MAX_ADDRS: usize = 4;
/// The longest nickname.
pub const MAX_NICKNAME: usize = crate::control::MAX_NICKNAME;
/// The longest channel name.
pub const MAX_CHANNEL_NAME: usize = 32;
/// The most digest buckets (a power of two).
pub const MAX_BUCKETS: usize = 1024;

/// A gossip message (format 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// First message on a new connection.
    Hello(Hello),
    /// Periodic anti-entropy: "this is a hash of what I know".
    Summary(Summary),
    /// Per-bucket hashes of the sender's topology (sync step 1).
    Buckets(Vec<u32>),
    /// The sender's versions for the buckets that differ (sync step 2).
    Versions(Versions),
    /// Topology records (full entries or deltas).
    Update(Update),
    /// The sender wants newer records of these peers; it has the versions
    /// given (incarnation 0 = nothing).
    Want(Vec<VersionRec>),
    /// A named channel's payload: its full state or a delta.
    Channel(ChannelMsg),
    /// The sender has these versions (news too large to push to everyone:
    /// a receiver that lacks them asks with [`Body::Want`]).
    Have(Vec<VersionRec>),
}

/// First message on a new connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// How many peers the sender knows.
    pub count: u32,
    /// Hash of the sender's topology.
    pub root: u64,
    /// The sender did not reach the receiver before this connection (it is
    /// new to it, or was on the other side of a partition): a digest sync
    /// is wanted.
    pub want_sync: bool,
    /// Where the sender sees the receiver (its IP and listen port).
    pub your_addr: Option<SocketAddr>,
}

/// Periodic anti-entropy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// How many peers the sender knows.
    pub count: u32,
    /// Hash of the sender's topology.
    pub root: u64,
    /// Digests of the named channels (name, digest).
    pub channels: Vec<(String, u64)>,
}

/// One peer's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRec {
    /// The peer.
    pub name: PeerName,
    /// Its incarnation (0: unknown to the sender).
    pub incarnation: u64,
    /// Its version.
    pub version: u32,
}

/// The sender's versions of every peer it knows in some buckets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    /// Number of buckets (the receiver's [`Body::Buckets`] length).
    pub buckets: u16,
    /// The buckets that differ.
    pub differing: Vec<u16>,
    /// The sender's versions of all its peers in those buckets.
    pub recs: Vec<VersionRec>,
}

/// Topology records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// Pushed news (relayed further by the receiver), not an answer to a
    /// sync or a want.
    pub push: bool,
    /// Every name the records mention; records refer to it by index.
    pub names: Vec<PeerName>,
    /// The records.
    pub recs: Vec<Record>,
}

/// A peer's entry, whole (`base == 0`) or as the changes from version
/// `base` to `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The peer (index into [`Update::names`]).
    pub peer: u32,
    /// Its incarnation (non-zero).
    pub incarnation: u64,
    /// The version the changes start from; 0 for a whole entry.
    pub base: u32,
    /// The version they lead to (> base).
    pub version: u32,
    /// The nickname (whole entries only).
    pub nickname: Option<String>,
    /// The addresses the peer can be dialed at, when they changed.
    pub addrs: Option<Vec<SocketAddr>>,
    /// Connections added (a whole entry: all of them), as name indices.
    pub add: Vec<u32>,
    /// Connections removed, as name indices.
    pub del: Vec<u32>,
    /// The peer's signature of the entry this record leads to (see
    /// [`super::topology::signed_message`]).
    pub sig: Sig,
    /// The peer's public key (with whole entries).
    pub key: Option<PublicKey>,
}

/// A named channel's message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelMsg {
    /// The channel ("ipam", "dns", …).
    pub channel: String,
    /// The channel's own encoding of a state or delta.
    pub payload: Vec<u8>,
}

impl Record {
    /// An upper bound of the encoded size of this record.
    pub fn size_bound(&self) -> usize {
        let addrs = self.addrs.as_ref().map_or(0, |a| a.len() * 20) + 2;
        let nick = self.nickname.as_ref().map_or(0, |n| n.len() + 3) + 1;
        5 + 10 + 5 + 5 + nick + addrs + 5 + 5 * (self.add.len() + self.del.len()) + 10 + 64 + 33
    }
}

/// Number of message kinds.
pub const KINDS: usize = 9;
/// Names of the message kinds, by [`Body::kind_index`].
pub const KIND_NAMES: [&str; KINDS] = [
    "hello", "summary", "buckets", "versions", "push", "want", "channel", "pull", "have",
];

impl Body {
    /// Index of this message's kind in [`KIND_NAMES`].
    pub fn kind_index(&self) -> usize {
        match self {
            Body::Hello(_) => 0,
            Body::Summary(_) => 1,
            Body::Buckets(_) => 2,
            Body::Versions(_) => 3,
            Body::Update(u) if u.push => 4,
            Body::Update(_) => 7,
            Body::Have(_) => 8,
            Body::Want(_) => 5,
            Body::Channel(_) => 6,
        }
    }

    /// Serialize with the format byte in front.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size_hint());
        out.push(FORMAT);
        // Encoding into a Vec cannot fail for these types.
        postcard::to_extend(self, out).unwrap_or_else(|_| vec![FORMAT])
    }

    /// About the encoded size (a little over for updates, so that encoding
    /// a large one does not grow its buffer again and again).
    fn size_hint(&self) -> usize {
        match self {
            Body::Update(u) => {
                let recs: usize = u
                    .recs
                    .iter()
                    .map(|r| {
                        140 + 3 * (r.add.len() + r.del.len())
                            + r.nickname.as_ref().map_or(0, |n| n.len())
                            + r.addrs.as_ref().map_or(0, |a| 20 * a.len())
                    })
                    .sum();
                16 + 7 * u.names.len() + recs
            }
            Body::Have(v) | Body::Want(v) => 16 + 16 * v.len(),
            Body::Versions(v) => 16 + 3 * v.differing.len() + 16 * v.recs.len(),
            Body::Buckets(b) => 16 + 5 * b.len(),
            _ => 256,
        }
    }

    /// Parse one message occupying all of `b`, checking every cap.
    pub fn decode(b: &[u8]) -> Result<Body, WireError> {
        if b.len() > MAX_INBOUND {
            return Err(WireError::TooLong {
                what: "gossip message",
                len: b.len(),
                max: MAX_INBOUND,
            });
        }
        let Some((&format, rest)) = b.split_first() else {
            return Err(WireError::Truncated {
                what: "gossip message",
                need: 1,
                have: 0,
            });
        };
        if format != FORMAT {
            return Err(WireError::Unknown {
                what: "gossip format",
                value: format,
            });
        }
        let (body, tail): (Body, &[u8]) =
            postcard::take_from_bytes(rest).map_err(|_| WireError::Invalid("gossip message"))?;
        if !tail.is_empty() {
            return Err(WireError::Trailing(tail.len()));
        }
        body.validate()?;
        Ok(body)
    }

    fn validate(&self) -> Result<(), WireError> {
        match self {
            Body::Hello(_) => Ok(()),
            Body::Summary(s) => {
                for (name, _) in &s.channels {
                    cap("channel name", name.len(), MAX_CHANNEL_NAME)?;
                }
                Ok(())
            }
            Body::Buckets(h) => {
                if h.is_empty() || !h.len().is_power_of_two() || h.len() > MAX_BUCKETS {
                    return Err(WireError::Invalid("bucket count"));
                }
                Ok(())
            }
            Body::Versions(v) => {
                let n = v.buckets as usize;
                if n == 0 || !n.is_power_of_two() || n > MAX_BUCKETS {
                    return Err(WireError::Invalid("bucket count"));
                }
                if v.differing.iter().any(|&d| d as usize >= n) {
                    return Err(WireError::Invalid("bucket index"));
                }
                Ok(())
            }
            Body::Update(u) => u.validate(),
            Body::Want(_) | Body::Have(_) => Ok(()),
            Body::Channel(c) => cap("channel name", c.channel.len(), MAX_CHANNEL_NAME),
        }
    }
}

impl Update {
    /// Append a whole entry of `subject` (no addresses, connections to
    /// `conns`), signed by `signer`, whose key goes with it when `offer`.
    /// What a peer sends of its own entry; the tests forge with it.
    #[allow(clippy::too_many_arguments)] // an entry's fields, one by one
    pub fn push_whole_signed(
        &mut self,
        subject: PeerName,
        incarnation: u64,
        version: u32,
        nickname: &str,
        conns: &[PeerName],
        signer: &crate::sign::Identity,
        offer: bool,
    ) {
        let index = |n: PeerName, names: &mut Vec<PeerName>| -> u32 {
            match names.iter().position(|x| *x == n) {
                Some(i) => i as u32,
                None => {
                    names.push(n);
                    (names.len() - 1) as u32
                }
            }
        };
        let peer = index(subject, &mut self.names);
        let add = conns.iter().map(|&c| index(c, &mut self.names)).collect();
        let card = super::topology::Card::new(nickname, &[]);
        let m = super::topology::signed_message(
            subject,
            incarnation,
            version,
            &card,
            &mut conns.to_vec(),
        );
        self.recs.push(Record {
            peer,
            incarnation,
            base: 0,
            version,
            nickname: Some(nickname.to_string()),
            addrs: None,
            add,
            del: vec![],
            sig: signer.sign(super::topology::SIGN_DOMAIN, &m),
            key: offer.then(|| signer.public()),
        });
    }

    fn validate(&self) -> Result<(), WireError> {
        let n = self.names.len();
        for r in &self.recs {
            if r.peer as usize >= n || r.add.iter().chain(&r.del).any(|&i| i as usize >= n) {
                return Err(WireError::Invalid("name index"));
            }
            if r.incarnation == 0 || r.version <= r.base {
                return Err(WireError::Invalid("record version"));
            }
            if (r.base == 0) != r.nickname.is_some() || (r.base == 0 && !r.del.is_empty()) {
                return Err(WireError::Invalid("whole record"));
            }
            cap("connection list", r.add.len() + r.del.len(), MAX_CONNS)?;
            if let Some(nick) = &r.nickname {
                cap("nickname", nick.len(), MAX_NICKNAME)?;
            }
            if let Some(a) = &r.addrs {
                cap("address list", a.len(), MAX_ADDRS)?;
            }
        }
        Ok(())
    }
}

fn cap(what: &'static str, len: usize, max: usize) -> Result<(), WireError> {
    if len > max {
        return Err(WireError::TooLong { what, len, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(b: u8) -> PeerName {
        PeerName([2, 0, 0, 0, 0, b])
    }

    #[test]
    fn fixed_bytes() {
        let b = Body::Summary(Summary {
            count: 3,
            root: 0x0102,
            channels: vec![],
        });
        // format 2, variant 1, count 3, root varint 0x82 0x02, no channels
        assert_eq!(b.encode(), vec![2, 1, 3, 0x82, 0x02, 0]);
        assert_eq!(Body::decode(&[2, 1, 3, 0x82, 0x02, 0]).unwrap(), b);
        let w = Body::Want(vec![VersionRec {
            name: n(7),
            incarnation: 1,
            version: 2,
        }]);
        assert_eq!(w.encode(), vec![2, 5, 1, 2, 0, 0, 0, 0, 7, 1, 2]);
    }

    #[test]
    fn malformed() {
        assert!(Body::decode(&[]).is_err());
        assert!(matches!(
            Body::decode(&[1, 1, 3, 0, 0]),
            Err(WireError::Unknown { .. })
        ));
        assert!(matches!(
            Body::decode(&[2, 1, 3, 0, 0, 9]),
            Err(WireError::Trailing(1))
        ));
        assert!(Body::decode(&[2, 42]).is_err());
        // A vector length far beyond the buffer.
        assert!(Body::decode(&[2, 2, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        // Bucket count not a power of two.
        assert!(Body::decode(&Body::Buckets(vec![1, 2, 3]).encode()).is_err());
        assert!(Body::decode(&vec![0u8; MAX_INBOUND + 1]).is_err());
        let bad_index = Body::Update(Update {
            push: false,
            names: vec![n(1)],
            recs: vec![Record {
                peer: 0,
                incarnation: 1,
                base: 1,
                version: 2,
                nickname: None,
                addrs: None,
                add: vec![1],
                del: vec![],
                sig: Sig::NONE,
                key: None,
            }],
        });
        assert_eq!(
            Body::decode(&bad_index.encode()),
            Err(WireError::Invalid("name index"))
        );
        let bad_version = Body::Update(Update {
            push: false,
            names: vec![n(1)],
            recs: vec![Record {
                peer: 0,
                incarnation: 1,
                base: 2,
                version: 2,
                nickname: None,
                addrs: None,
                add: vec![],
                del: vec![],
                sig: Sig::NONE,
                key: None,
            }],
        });
        assert!(Body::decode(&bad_version.encode()).is_err());
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port)))
    }

    fn arb_record(names: usize) -> impl Strategy<Value = Record> {
        let idx = 0..names as u32;
        (
            idx.clone(),
            1u64..1000,
            0u32..5,
            1u32..5,
            proptest::option::of("[a-z]{0,10}"),
            proptest::option::of(proptest::collection::vec(arb_addr(), 0..4)),
            proptest::collection::vec(idx.clone(), 0..10),
            proptest::collection::vec(idx, 0..10),
        )
            .prop_map(|(peer, incarnation, base, extra, nick, addrs, add, del)| {
                let whole = base == 0;
                Record {
                    peer,
                    incarnation,
                    base,
                    version: base + extra,
                    nickname: if whole {
                        Some(nick.unwrap_or_default())
                    } else {
                        None
                    },
                    addrs,
                    add,
                    del: if whole { vec![] } else { del },
                    sig: Sig([7; 64]),
                    key: None,
                }
            })
    }

    fn arb_body() -> impl Strategy<Value = Body> {
        prop_oneof![
            (
                any::<u32>(),
                any::<u64>(),
                any::<bool>(),
                proptest::option::of(arb_addr())
            )
                .prop_map(|(count, root, want_sync, your_addr)| Body::Hello(Hello {
                    count,
                    root,
                    want_sync,
                    your_addr
                })),
            (0u32..10)
                .prop_flat_map(|k| proptest::collection::vec(any::<u32>(), 1usize << k)
                    .prop_map(Body::Buckets)),
            proptest::collection::vec(any::<[u8; 6]>(), 1..20).prop_flat_map(|names| {
                let n = names.len();
                proptest::collection::vec(arb_record(n), 0..5).prop_map(move |recs| {
                    Body::Update(Update {
                        push: true,
                        names: names.iter().map(|&b| PeerName(b)).collect(),
                        recs,
                    })
                })
            }),
            proptest::collection::vec(
                (any::<[u8; 6]>(), any::<u64>(), any::<u32>()).prop_map(|(b, i, v)| VersionRec {
                    name: PeerName(b),
                    incarnation: i,
                    version: v
                }),
                0..10
            )
            .prop_map(Body::Want),
            ("[a-z]{1,8}", proptest::collection::vec(any::<u8>(), 0..50))
                .prop_map(|(channel, payload)| Body::Channel(ChannelMsg { channel, payload })),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(b in arb_body()) {
            prop_assert_eq!(Body::decode(&b.encode()).unwrap(), b);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Body::decode(&bytes);
            let mut with_format = vec![FORMAT];
            with_format.extend_from_slice(&bytes);
            let _ = Body::decode(&with_format);
        }

        #[test]
        fn size_bound_holds(r in arb_record(300)) {
            let u = Update { push: true, names: vec![], recs: vec![r.clone()] };
            let len = postcard::to_allocvec(&u).unwrap().len();
            prop_assert!(len <= r.size_bound() + 2);
        }
    }
}
