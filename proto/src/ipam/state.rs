//! The replicated state of the IPAM channel and its wire format.
//!
//! Three parts, each a join-semilattice, so that merging is commutative,
//! associative and idempotent:
//!
//! - the **ring header** ([`Ring`]): the initial owners, set once (by seed or
//!   by consensus) and identical everywhere; a different header is a foreign
//!   ring and is refused;
//! - the **tokens**: a token at address `a` says "the piece from `a` up to the
//!   next token belongs to `owner`". Tokens are never removed. Each carries an
//!   `(epoch, version)` and the greater wins. Only the owner of a piece writes
//!   its tokens (bumping `version`); an heir that took a piece over by a
//!   decided reclaim writes it with `epoch + 1`, which beats anything the old
//!   owner could still write in its own epoch;
//! - the **records**: one per peer, written only by that peer, the greater
//!   `version` wins (the content is a function of peer and version).
//!
//! Encoding: one version byte ([`FORMAT`]) then postcard. Full states,
//! deltas and relayed news all use the same [`Payload`] shape.

use crate::gossip::digest::{mix, name_u64};
use crate::name::PeerName;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The version byte in front of every encoding of this module.
pub const FORMAT: u8 = 1;
/// The largest payload we decode (a whole ring of a /8 split a million ways
/// would not fit, which is fine: a ring has one piece per donation).
pub const MAX_PAYLOAD: usize = 32 << 20;

/// A subnet on the wire: network address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Net {
    /// The network address as a number.
    pub addr: u32,
    /// The prefix length (0..=32).
    pub prefix: u8,
}

impl Net {
    /// From an `Ipv4Net` (truncated to its network address).
    pub fn from_ipnet(n: Ipv4Net) -> Net {
        Net {
            addr: u32::from(n.network()),
            prefix: n.prefix_len(),
        }
    }
    /// Back to an `Ipv4Net`; `None` for a prefix over 32.
    pub fn to_ipnet(self) -> Option<Ipv4Net> {
        Ipv4Net::new(Ipv4Addr::from(self.addr), self.prefix)
            .ok()
            .map(|n| n.trunc())
    }
    /// First and last address, inclusive.
    pub fn bounds(self) -> (u32, u32) {
        let size = 1u64 << (32 - self.prefix.min(32) as u32);
        let lo = self.addr & !((size - 1) as u32);
        (lo, (lo as u64 + size - 1) as u32)
    }
}

/// The header of a ring: who it was first split among.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    /// The initial owners, sorted and without duplicates.
    pub owners: Vec<PeerName>,
}

impl Ring {
    /// The ring's identity: a hash of the range and the initial owners.
    pub fn id(&self, range: Net) -> u64 {
        let mut h = mix(((range.addr as u64) << 8) | range.prefix as u64);
        for o in &self.owners {
            h = mix(h ^ name_u64(*o));
        }
        h
    }

    /// The initial tokens: the range split evenly among the owners.
    pub fn initial_tokens(&self, range: Net) -> BTreeMap<u32, Token> {
        let (lo, hi) = range.bounds();
        let size = hi as u64 - lo as u64 + 1;
        let n = (self.owners.len() as u64).min(size).max(1);
        let mut out = BTreeMap::new();
        for (i, owner) in self.owners.iter().take(n as usize).enumerate() {
            let start = lo as u64 + i as u64 * size / n;
            out.insert(
                start as u32,
                Token {
                    owner: *owner,
                    epoch: 0,
                    version: 0,
                },
            );
        }
        out
    }

    /// The owners, for messages.
    pub fn describe(&self) -> String {
        let v: Vec<String> = self.owners.iter().map(|o| o.to_string()).collect();
        v.join(", ")
    }
}

/// A token: the start of a piece of the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Who owns the piece.
    pub owner: PeerName,
    /// Bumped when an heir takes the piece over after a reclaim.
    pub epoch: u32,
    /// Bumped by the owner on every change.
    pub version: u32,
}

impl Token {
    /// The order in which versions of a token supersede each other.
    pub fn key(&self) -> (u32, u32, PeerName) {
        (self.epoch, self.version, self.owner)
    }
}

/// A Paxos ballot: a round and the proposer (ties broken by name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ballot {
    /// The round.
    pub round: u64,
    /// The proposer.
    pub proposer: PeerName,
}

/// Which single-decree Paxos instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Instance {
    /// Creating the ring; the value is the sorted list of initial owners.
    Ring,
    /// Reclaiming a dead peer's space; the value is the heir (one name).
    Reclaim(PeerName),
}

/// One acceptor's state for one instance. A proposer's own entry doubles
/// as its messages: `promised` = its prepare, `accepted` = its accept request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Acceptor {
    /// The highest ballot promised.
    pub promised: Option<Ballot>,
    /// The last accepted ballot and value.
    pub accepted: Option<(Ballot, Vec<PeerName>)>,
}

/// A request for space, addressed to one donor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Increases with every request of this peer.
    pub seq: u64,
    /// The peer asked.
    pub donor: PeerName,
    /// The subnet in which space is wanted.
    pub subnet: Net,
}

/// A peer's own record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Record {
    /// Bumped on every change.
    pub version: u64,
    /// Takes part in creating the ring by consensus, with this consensus
    /// size N (0: does not take part). Peers adopt the largest N they see,
    /// so a peer that joins with a stale or small view of the mesh cannot
    /// decide a ring on its own.
    pub consensus: u32,
    /// Paxos acceptor (and proposer) state per instance.
    pub paxos: BTreeMap<Instance, Acceptor>,
    /// Outstanding requests for space.
    pub requests: Vec<Request>,
    /// As a donor: the highest request `seq` handled, per requester.
    pub served: BTreeMap<PeerName, u64>,
    /// The addresses this peer holds, as runs `(first, count)`, sorted.
    pub held: Vec<(u32, u32)>,
}

impl Record {
    /// The held addresses, one by one.
    pub fn held_addrs(&self) -> impl Iterator<Item = u32> + '_ {
        self.held
            .iter()
            .flat_map(|&(a, n)| (0..n).map(move |i| a.wrapping_add(i)))
    }

    /// How many held addresses fall in `[lo, hi]`.
    pub fn held_in(&self, lo: u32, hi: u32) -> u64 {
        self.held
            .iter()
            .map(|&(a, n)| {
                let end = a as u64 + n as u64 - 1;
                let s = (a as u64).max(lo as u64);
                let e = end.min(hi as u64);
                e.saturating_sub(s) + u64::from(e >= s)
            })
            .sum()
    }
}

/// What travels on the channel: a whole state, a delta, or relayed news.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Payload {
    /// The range of the sender (refused if different from ours).
    pub range: Option<Net>,
    /// The ring header, present whenever tokens are.
    pub ring: Option<Ring>,
    /// Tokens by start address.
    pub tokens: Vec<(u32, Token)>,
    /// Records by peer.
    pub records: Vec<(PeerName, Record)>,
}

impl Payload {
    /// Whether there is nothing in it.
    pub fn is_empty(&self) -> bool {
        self.ring.is_none() && self.tokens.is_empty() && self.records.is_empty()
    }

    /// Version byte, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        // Serializing plain data into a Vec cannot fail.
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// Parse and check everything that can be checked without our state.
    pub fn decode(bytes: &[u8]) -> Result<Payload, String> {
        let body = check_header(bytes, "IPAM payload")?;
        let p: Payload =
            postcard::from_bytes(body).map_err(|e| format!("malformed IPAM payload: {e}"))?;
        p.validate()?;
        Ok(p)
    }

    fn validate(&self) -> Result<(), String> {
        let range = self
            .range
            .ok_or_else(|| "malformed IPAM payload: no range".to_string())?;
        if range.prefix > 32 {
            return Err("malformed IPAM payload: prefix over 32".into());
        }
        let (lo, hi) = range.bounds();
        if !self.tokens.is_empty() && self.ring.is_none() {
            return Err("malformed IPAM payload: tokens without a ring".into());
        }
        if let Some(r) = &self.ring {
            if r.owners.is_empty() || r.owners.windows(2).any(|w| w[0] >= w[1]) {
                return Err("malformed IPAM payload: ring owners not sorted".into());
            }
        }
        if self.tokens.iter().any(|(a, _)| *a < lo || *a > hi) {
            return Err("malformed IPAM payload: token outside the range".into());
        }
        for (_, r) in &self.records {
            let mut last: Option<u64> = None;
            for &(a, n) in &r.held {
                let end = a as u64 + n as u64;
                if n == 0 || a < lo || end - 1 > hi as u64 || last.is_some_and(|l| a as u64 <= l) {
                    return Err("malformed IPAM payload: bad held addresses".into());
                }
                last = Some(end - 1);
            }
            if r.requests.iter().any(|q| q.subnet.prefix > 32) {
                return Err("malformed IPAM payload: bad subnet in a request".into());
            }
            for a in r.paxos.values() {
                if a.accepted.as_ref().is_some_and(|(_, v)| v.len() > 4096) {
                    return Err("malformed IPAM payload: Paxos value too long".into());
                }
            }
        }
        Ok(())
    }
}

/// Check the size and version byte; return the body.
pub fn check_header<'a>(bytes: &'a [u8], what: &str) -> Result<&'a [u8], String> {
    if bytes.len() > MAX_PAYLOAD {
        return Err(format!(
            "{what} of {} bytes exceeds the limit of {MAX_PAYLOAD}",
            bytes.len()
        ));
    }
    match bytes.first() {
        None => Err(format!("empty {what}")),
        Some(&FORMAT) => Ok(&bytes[1..]),
        Some(v) => Err(format!(
            "{what} has format version {v}; this build reads version {FORMAT}"
        )),
    }
}

/// The replicated state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crdt {
    /// Our range.
    pub range: Net,
    /// The ring header, once created.
    pub ring: Option<Ring>,
    /// Tokens by start address.
    pub tokens: BTreeMap<u32, Token>,
    /// Records by peer.
    pub records: BTreeMap<PeerName, Record>,
}

/// What a merge changed.
#[derive(Default)]
pub struct Merged {
    /// The news, to relay.
    pub news: Payload,
    /// Records replaced: (peer, previous record if any).
    pub replaced: Vec<(PeerName, Option<Record>)>,
}

impl Crdt {
    /// An empty state for a range.
    pub fn new(range: Net) -> Crdt {
        Crdt {
            range,
            ring: None,
            tokens: BTreeMap::new(),
            records: BTreeMap::new(),
        }
    }

    /// Describe our range.
    pub fn range_str(&self) -> String {
        net_str(self.range)
    }

    /// Install a ring header (and its initial tokens). Err if a different one
    /// is already there.
    pub fn install_ring(&mut self, ring: Ring) -> Result<bool, String> {
        match &self.ring {
            Some(r) if *r == ring => Ok(false),
            Some(r) => Err(self.ring_mismatch(r, &ring)),
            None => {
                for (a, t) in ring.initial_tokens(self.range) {
                    let e = self.tokens.entry(a).or_insert(t);
                    if t.key() > e.key() {
                        *e = t;
                    }
                }
                self.ring = Some(ring);
                Ok(true)
            }
        }
    }

    fn ring_mismatch(&self, ours: &Ring, theirs: &Ring) -> String {
        format!(
            "foreign IPAM ring: ours covers {} and was created among [{}], theirs covers {} and was created among [{}]; peers of one mesh must be launched with the same --ipalloc-range and --ipalloc-init",
            self.range_str(),
            ours.describe(),
            self.range_str(),
            theirs.describe()
        )
    }

    /// Whether a payload is compatible with us (checked before merging
    /// anything, so that a refused payload leaves the state unchanged).
    pub fn check(&self, p: &Payload) -> Result<(), String> {
        let theirs = p.range.unwrap_or(self.range);
        if theirs != self.range {
            return Err(format!(
                "foreign IPAM ring: ours covers {}, theirs covers {}; peers of one mesh must be launched with the same --ipalloc-range",
                self.range_str(),
                net_str(theirs)
            ));
        }
        if let (Some(ours), Some(r)) = (&self.ring, &p.ring) {
            if ours != r {
                return Err(self.ring_mismatch(ours, r));
            }
        }
        Ok(())
    }

    /// Merge a decoded payload (already [`Crdt::check`]ed).
    pub fn merge(&mut self, p: Payload) -> Result<Merged, String> {
        self.check(&p)?;
        let mut m = Merged::default();
        if let Some(r) = p.ring {
            if self.install_ring(r.clone())? {
                m.news.ring = Some(r);
            }
        }
        for (a, t) in p.tokens {
            let newer = match self.tokens.get(&a) {
                None => true,
                Some(old) => t.key() > old.key(),
            };
            if newer {
                self.tokens.insert(a, t);
                m.news.tokens.push((a, t));
            }
        }
        for (peer, r) in p.records {
            let newer = match self.records.get(&peer) {
                None => true,
                Some(old) => r.version > old.version,
            };
            if newer {
                let old = self.records.insert(peer, r.clone());
                m.replaced.push((peer, old));
                m.news.records.push((peer, r));
            }
        }
        if !m.news.tokens.is_empty() && m.news.ring.is_none() {
            m.news.ring = self.ring.clone();
        }
        m.news.range = Some(self.range);
        Ok(m)
    }

    /// The whole state as a payload.
    pub fn payload(&self) -> Payload {
        Payload {
            range: Some(self.range),
            ring: self.ring.clone(),
            tokens: self.tokens.iter().map(|(a, t)| (*a, *t)).collect(),
            records: self.records.iter().map(|(p, r)| (*p, r.clone())).collect(),
        }
    }

    /// Equal digests mean equal states.
    pub fn digest(&self) -> u64 {
        let mut h = mix(((self.range.addr as u64) << 8) | self.range.prefix as u64);
        if let Some(r) = &self.ring {
            h = mix(h ^ r.id(self.range));
        }
        for (a, t) in &self.tokens {
            h = mix(h ^ *a as u64);
            h = mix(h ^ name_u64(t.owner) ^ ((t.epoch as u64) << 48));
            h = mix(h ^ t.version as u64);
        }
        for (p, r) in &self.records {
            h = mix(h ^ name_u64(*p));
            h = mix(h ^ r.version);
        }
        h
    }

    /// The pieces: `(first, last, token)` in address order.
    pub fn pieces(&self) -> impl Iterator<Item = (u32, u32, Token)> + '_ {
        let (_, hi) = self.range.bounds();
        let mut it = self.tokens.iter().peekable();
        std::iter::from_fn(move || {
            let (a, t) = it.next()?;
            let last = match it.peek() {
                Some((b, _)) => **b - 1,
                None => hi,
            };
            Some((*a, last, *t))
        })
    }

    /// The pieces overlapping `[lo, hi]`, clipped to it.
    pub fn pieces_in(&self, lo: u32, hi: u32) -> Vec<(u32, u32, u32, Token)> {
        let (_, rhi) = self.range.bounds();
        let start = self
            .tokens
            .range(..=lo)
            .next_back()
            .map(|(a, _)| *a)
            .unwrap_or(lo);
        let mut out = Vec::new();
        let mut it = self.tokens.range(start..).peekable();
        while let Some((a, t)) = it.next() {
            if *a > hi {
                break;
            }
            let last = match it.peek() {
                Some((b, _)) => **b - 1,
                None => rhi,
            };
            if last < lo {
                continue;
            }
            out.push((*a, (*a).max(lo), last.min(hi), *t));
        }
        out
    }
}

/// A wire subnet for messages.
pub fn net_str(n: Net) -> String {
    n.to_ipnet()
        .map(|n| n.to_string())
        .unwrap_or_else(|| format!("{}/{}", Ipv4Addr::from(n.addr), n.prefix))
}
