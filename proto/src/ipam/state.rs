//! The replicated state of the IPAM channel and its wire format.
//!
//! Everything replicated is a **record**, one per peer, written only by that
//! peer and carrying its Ed25519 signature ([`Signed`], domain
//! [`RECORD_DOMAIN`], over the range, the peer's name and the record) and
//! its public key, so that a peer that never met the writer verifies it
//! (and pins the key in its [`KeyBook`]). The greater `version` wins a
//! merge, and only after the signature verified: a member can write only its
//! own record, and a relayed record stays verifiable end to end.
//!
//! - the **ring header** ([`Ring`]): the initial owners. A seed ring comes
//!   from the configuration; a ring decided by consensus is taken from a
//!   payload only when the records show a quorum of its owners accepting it
//!   (their signed Paxos votes, see `ring_justified` in the parent module);
//!   a different header is a foreign ring and is refused;
//! - **ownership** is not written by anyone as such: it is derived
//!   ([`derive()`]) from the ring's initial split, the **grants** in the
//!   records, and the decided reclaims. A grant says "the space
//!   `[first, last]`, which I own, I give to `to`"; each grant carries a
//!   counter `at`, one above the counter at which the writer got that space.
//!   A grant takes effect only on space its writer owns (in the derivation)
//!   at a lower counter; a peer's grants are append-only and apply in the
//!   order written. So no peer can take or change space it does not own,
//!   whatever it signs: its grants of others' space have no effect. And
//!   because every grant stays in its writer's latest record (records are
//!   never superseded by anyone else's writes), a peer that missed any
//!   number of intermediate hand-overs (P gives to Q, Q gives to R) still
//!   derives the same owner as everyone else once it has the latest record
//!   of each peer: the derivation is a function of the set of latest records,
//!   not of the order they came in. This replaces the tokens of format 1,
//!   whose `(epoch, version)` anyone could raise.
//! - a record also holds the peer's Paxos acceptor state, its requests for
//!   space, the requests it served, and the addresses it holds (as runs,
//!   never expanded address by address).
//!
//! Bounds ([`validate_record`], [`Crdt::merge`]): versions at most
//! [`MAX_VERSION`] (an absolute bound: a step bound from the version held
//! would make peers that saw a record at different times disagree on it
//! for good, and anti-entropy resend it forever);
//! grant counters at most [`MAX_AT`]; Paxos rounds at most [`MAX_ROUND`] and
//! at most [`MAX_ROUND_STEP`] above every round another peer has shown; at
//! most [`MAX_GRANTS`] grants, [`MAX_RUNS`] held runs, [`MAX_REQUESTS`]
//! requests and [`MAX_INSTANCES`] Paxos instances per record, at most
//! [`MAX_RECORDS`] records; a payload at most [`MAX_PAYLOAD`] bytes. A
//! newer record that drops or changes a grant we hold is refused.
//!
//! Encoding: one version byte ([`FORMAT`]) then postcard. Full states,
//! deltas and relayed news all use the same [`Payload`] shape.

use crate::gossip::digest::{mix, name_u64};
use crate::name::PeerName;
use crate::sign::{KeyBook, PublicKey, Sig};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// The version byte in front of every encoding of this module.
pub const FORMAT: u8 = 2;
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
                    at: 0,
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

/// A piece of the ring as derived from the grants: who owns it, and the
/// counter at which it got it (see [`derive()`]). Not on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Who owns the piece.
    pub owner: PeerName,
    /// The `at` of the grant that gave it to `owner` (0: the ring's split).
    pub at: u64,
}

/// A grant in a peer's record: "the space `[first, last]` that I own, I
/// give to `to`". `at` is one more than the counter at which the writer
/// got that space (so it is above it), and orders nothing else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// First address given.
    pub first: u32,
    /// Last address given (inclusive).
    pub last: u32,
    /// The new owner.
    pub to: PeerName,
    /// The counter of the space given: above the one at which the writer
    /// got it, at most [`MAX_AT`].
    pub at: u64,
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
    /// Every piece of space this peer gave away, in the order it did
    /// (append-only: a later version keeps the earlier grants in front).
    pub grants: Vec<Grant>,
}

impl Record {
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

    /// The held runs as inclusive `(first, last)`.
    pub fn held_runs(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.held.iter().map(|&(a, n)| {
            (
                a,
                (a as u64 + (n as u64).max(1) - 1).min(u32::MAX as u64) as u32,
            )
        })
    }
}

/// The domain of a record's signature.
pub const RECORD_DOMAIN: &[u8] = b"mesh/ipam/record/v1";

/// The bytes a record's signature covers: the range, the writer's name,
/// and the record (postcard).
pub fn record_message(range: Net, peer: PeerName, r: &Record) -> Vec<u8> {
    // Serializing plain data into a Vec cannot fail.
    postcard::to_allocvec(&(range, peer, r)).unwrap_or_default()
}

/// A record on the wire: with its writer's public key (so that a peer that
/// never met the writer can verify it and pin the key) and signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// The writer.
    pub peer: PeerName,
    /// The writer's public key (gives `peer`), as bytes: checked (and
    /// decompressed, which costs) only for a record we are about to merge.
    pub key: [u8; 32],
    /// The record.
    pub record: Record,
    /// The writer's signature over [`record_message`].
    pub sig: Sig,
}

/// Verify a signed record with the key book: the key pinned for its peer,
/// or the key it carries (pinned once it verified).
pub fn verify(keys: &mut KeyBook, range: Net, s: &Signed) -> Result<(), String> {
    let offered = match keys.get(s.peer) {
        Some(k) if *k.as_bytes() == s.key => None,
        _ => Some(PublicKey::from_bytes(&s.key).map_err(|e| e.to_string())?),
    };
    let msg = record_message(range, s.peer, &s.record);
    keys.verify(s.peer, offered, RECORD_DOMAIN, &msg, &s.sig)
        .map_err(|e| e.to_string())
}

/// The largest record version accepted (2^48: a peer that changed its
/// record a million times a second would need nine years).
pub const MAX_VERSION: u64 = 1 << 48;
/// The largest grant counter ([`Grant::at`]): each hand-over of a piece
/// adds one.
pub const MAX_AT: u64 = 1 << 48;
/// The largest Paxos round.
pub const MAX_ROUND: u64 = 1 << 40;
/// How far above every round we know for an instance a record's rounds
/// may be.
pub const MAX_ROUND_STEP: u64 = 1 << 16;
/// Grants kept per record.
pub const MAX_GRANTS: usize = 8192;
/// Held runs per record.
pub const MAX_RUNS: usize = 1 << 16;
/// Outstanding requests per record.
pub const MAX_REQUESTS: usize = 64;
/// Paxos instances per record.
pub const MAX_INSTANCES: usize = 1024;
/// Peers with a record (and requesters served per record).
pub const MAX_RECORDS: usize = 10_000;
/// The largest consensus size announced.
pub const MAX_CONSENSUS: u32 = MAX_RECORDS as u32;

/// What travels on the channel: a whole state, a delta, or relayed news.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Payload {
    /// The range of the sender (refused if different from ours).
    pub range: Option<Net>,
    /// The ring header, present whenever the sender has one.
    pub ring: Option<Ring>,
    /// Signed records.
    pub records: Vec<Signed>,
}

impl Payload {
    /// Whether there is nothing in it.
    pub fn is_empty(&self) -> bool {
        self.ring.is_none() && self.records.is_empty()
    }

    /// Version byte, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        // Serializing plain data into a Vec cannot fail.
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// Parse and check everything that can be checked without our state
    /// (signatures are checked by [`Crdt::merge`], with the key book).
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
        if let Some(r) = &self.ring {
            if r.owners.is_empty()
                || r.owners.len() > MAX_RECORDS
                || r.owners.windows(2).any(|w| w[0] >= w[1])
            {
                return Err("malformed IPAM payload: ring owners not sorted".into());
            }
        }
        if self.records.len() > MAX_RECORDS {
            return Err("malformed IPAM payload: too many records".into());
        }
        for s in &self.records {
            validate_record(range, &s.record)
                .map_err(|e| format!("malformed IPAM record of peer {}: {e}", s.peer))?;
        }
        Ok(())
    }
}

/// Bounds on one record that need no state.
pub fn validate_record(range: Net, r: &Record) -> Result<(), String> {
    let (lo, hi) = range.bounds();
    if r.version == 0 || r.version > MAX_VERSION {
        return Err(format!("version {} out of bounds", r.version));
    }
    if r.consensus > MAX_CONSENSUS {
        return Err(format!(
            "consensus size {} over {MAX_CONSENSUS}",
            r.consensus
        ));
    }
    if r.held.len() > MAX_RUNS {
        return Err("too many held runs".into());
    }
    let mut last: Option<u64> = None;
    for &(a, n) in &r.held {
        let end = a as u64 + n as u64;
        if n == 0 || a < lo || end - 1 > hi as u64 || last.is_some_and(|l| a as u64 <= l) {
            return Err("bad held addresses".into());
        }
        last = Some(end - 1);
    }
    if r.requests.len() > MAX_REQUESTS
        || r.served.len() > MAX_RECORDS
        || r.paxos.len() > MAX_INSTANCES
    {
        return Err("too many requests, served requesters or Paxos instances".into());
    }
    if r.requests.iter().any(|q| q.subnet.prefix > 32) {
        return Err("bad subnet in a request".into());
    }
    for a in r.paxos.values() {
        if a.accepted
            .as_ref()
            .is_some_and(|(_, v)| v.len() > MAX_RECORDS)
        {
            return Err("Paxos value too long".into());
        }
        let rounds = [a.promised, a.accepted.as_ref().map(|(b, _)| *b)];
        if rounds.iter().flatten().any(|b| b.round > MAX_ROUND) {
            return Err("Paxos round out of bounds".into());
        }
    }
    if r.grants.len() > MAX_GRANTS {
        return Err("too many grants".into());
    }
    for g in &r.grants {
        if g.first > g.last || g.first < lo || g.last > hi || g.at == 0 || g.at > MAX_AT {
            return Err("bad grant".into());
        }
    }
    Ok(())
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
    /// The pieces by start address, derived ([`derive()`]) from the ring, the
    /// grants and the decided reclaims.
    pub tokens: BTreeMap<u32, Token>,
    /// Records by peer.
    pub records: BTreeMap<PeerName, Record>,
    /// Each record's key (bytes) and signature.
    pub sigs: BTreeMap<PeerName, ([u8; 32], Sig)>,
}

/// What a merge changed.
#[derive(Default)]
pub struct Merged {
    /// The news, to relay.
    pub news: Payload,
    /// Records replaced: (peer, previous record if any).
    pub replaced: Vec<(PeerName, Option<Record>)>,
    /// Records refused (bad signature, counters out of bounds, history
    /// rewritten): (peer, why).
    pub refused: Vec<(PeerName, String)>,
}

impl Crdt {
    /// An empty state for a range.
    pub fn new(range: Net) -> Crdt {
        Crdt {
            range,
            ring: None,
            tokens: BTreeMap::new(),
            records: BTreeMap::new(),
            sigs: BTreeMap::new(),
        }
    }

    /// Describe our range.
    pub fn range_str(&self) -> String {
        net_str(self.range)
    }

    /// Install a ring header (the caller rederives the tokens). Err if a
    /// different one is already there.
    pub fn install_ring(&mut self, ring: Ring) -> Result<bool, String> {
        match &self.ring {
            Some(r) if *r == ring => Ok(false),
            Some(r) => Err(self.ring_mismatch(r, &ring)),
            None => {
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

    /// Per instance, the highest round shown and by whom, and the highest
    /// round shown by anyone else: in our records and in `more`.
    fn rounds(&self, more: &[Signed]) -> BTreeMap<Instance, Rounds> {
        let mut out: BTreeMap<Instance, Rounds> = BTreeMap::new();
        let ours = self.records.iter();
        let theirs = more.iter().map(|s| (&s.peer, &s.record));
        for (p, r) in ours.chain(theirs) {
            for (i, a) in &r.paxos {
                for b in ballots(a) {
                    out.entry(*i).or_default().add(*p, b.round);
                }
            }
        }
        out
    }

    /// Whether a newer record of `peer` may replace what we hold: counters
    /// not too far ahead, grants only appended.
    fn admissible(&self, s: &Signed, rounds: &BTreeMap<Instance, Rounds>) -> Result<(), String> {
        if let Some(old) = self.records.get(&s.peer) {
            if s.record.grants.len() < old.grants.len()
                || s.record.grants[..old.grants.len()] != old.grants[..]
            {
                return Err("its grants rewrite the history we hold".into());
            }
        }
        // Rounds: at most MAX_ROUND_STEP above what anyone else has shown.
        for (i, a) in &s.record.paxos {
            let others = rounds.get(i).map_or(0, |r| r.excluding(s.peer));
            for b in ballots(a) {
                if b.round > others.saturating_add(MAX_ROUND_STEP) {
                    return Err(format!(
                        "Paxos round {} is far above every round known ({others})",
                        b.round
                    ));
                }
            }
        }
        Ok(())
    }

    /// Merge a decoded payload (already [`Crdt::check`]ed): every newer
    /// record whose signature verifies (with `keys`) and whose counters are
    /// in bounds replaces ours. Our own record (`me`) is taken from outside
    /// only when it is signed by our key and newer than ours: that is our
    /// own writing from before we lost our state (a corrupt or removed
    /// `ipam.bin`), which the mesh kept for us; anything else about us is
    /// ignored. The ring header is not taken from the payload: the caller
    /// decides whether it is justified.
    pub fn merge(
        &mut self,
        p: Payload,
        keys: &mut KeyBook,
        me: PeerName,
    ) -> Result<Merged, String> {
        self.check(&p)?;
        let mut m = Merged::default();
        let rounds = self.rounds(&p.records);
        for s in p.records {
            if s.peer == me {
                let newer = self
                    .records
                    .get(&me)
                    .is_none_or(|old| s.record.version > old.version);
                if newer && verify(keys, self.range, &s).is_ok() {
                    let old = self.records.insert(me, s.record.clone());
                    self.sigs.insert(me, (s.key, s.sig));
                    m.replaced.push((me, old));
                    m.news.records.push(s);
                }
                continue;
            }
            let newer = match self.records.get(&s.peer) {
                None => true,
                Some(old) => s.record.version > old.version,
            };
            if !newer {
                continue;
            }
            if self.records.len() >= MAX_RECORDS && !self.records.contains_key(&s.peer) {
                m.refused
                    .push((s.peer, format!("more than {MAX_RECORDS} peers")));
                continue;
            }
            if let Err(e) = verify(keys, self.range, &s) {
                m.refused.push((s.peer, e));
                continue;
            }
            if let Err(e) = self.admissible(&s, &rounds) {
                m.refused.push((s.peer, e));
                continue;
            }
            let old = self.records.insert(s.peer, s.record.clone());
            self.sigs.insert(s.peer, (s.key, s.sig));
            m.replaced.push((s.peer, old));
            m.news.records.push(s);
        }
        m.news.range = Some(self.range);
        Ok(m)
    }

    /// A record with its signature, for the wire.
    pub fn signed(&self, peer: PeerName) -> Option<Signed> {
        let record = self.records.get(&peer)?.clone();
        let (key, sig) = *self.sigs.get(&peer)?;
        Some(Signed {
            peer,
            key,
            record,
            sig,
        })
    }

    /// The whole state as a payload.
    pub fn payload(&self) -> Payload {
        Payload {
            range: Some(self.range),
            ring: self.ring.clone(),
            records: self
                .records
                .keys()
                .filter_map(|p| self.signed(*p))
                .collect(),
        }
    }

    /// Equal digests mean equal states.
    pub fn digest(&self) -> u64 {
        let mut h = mix(((self.range.addr as u64) << 8) | self.range.prefix as u64);
        if let Some(r) = &self.ring {
            h = mix(h ^ r.id(self.range));
        }
        for (p, r) in &self.records {
            h = mix(h ^ name_u64(*p));
            h = mix(h ^ r.version);
        }
        h
    }

    /// Recompute the pieces from the ring, the grants and the heirs.
    pub fn rederive(&mut self, heirs: &BTreeMap<PeerName, PeerName>) {
        self.tokens = match &self.ring {
            Some(ring) => derive(ring, self.range, &self.records, heirs),
            None => BTreeMap::new(),
        };
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

/// The ballots of an acceptor entry.
fn ballots(a: &Acceptor) -> impl Iterator<Item = Ballot> {
    [a.promised, a.accepted.as_ref().map(|(b, _)| *b)]
        .into_iter()
        .flatten()
}

/// The highest round of an instance, by whom, and the highest of others.
#[derive(Default)]
struct Rounds {
    best: Option<(u64, PeerName)>,
    second: u64,
}

impl Rounds {
    fn add(&mut self, p: PeerName, round: u64) {
        match self.best {
            Some((b, q)) if q == p => self.best = Some((b.max(round), p)),
            Some((b, _)) if round > b => {
                self.second = self.second.max(b);
                self.best = Some((round, p));
            }
            Some(_) => self.second = self.second.max(round),
            None => self.best = Some((round, p)),
        }
    }

    /// The highest round shown by a peer other than `p`.
    fn excluding(&self, p: PeerName) -> u64 {
        match self.best {
            Some((_, q)) if q == p => self.second,
            Some((b, _)) => b,
            None => 0,
        }
    }
}

/// Who owns what, from the ring's initial split, every peer's grants and
/// the decided reclaims (`heirs`: dead peer → heir). A deterministic
/// function of the records, so every peer that holds the same records
/// derives the same pieces, whatever order it got them in.
///
/// Start from the initial split, every piece at counter 0. A grant of peer
/// `O` applies to the parts of `[first, last]` that `O` owns at a counter
/// below the grant's `at`: they pass to `to` at counter `at`. Grants of one
/// log apply in log order (an earlier grant takes a part first, so a grant
/// appended later cannot give again what was given). A piece of a peer with
/// a decided reclaim passes to its heir at its counter + 1. Repeat until
/// nothing changes; each application raises the counter of what it moves,
/// so this ends (and is cut off after a bound besides).
pub fn derive(
    ring: &Ring,
    range: Net,
    records: &BTreeMap<PeerName, Record>,
    heirs: &BTreeMap<PeerName, PeerName>,
) -> BTreeMap<u32, Token> {
    let (_, rhi) = range.bounds();
    // start → (last, token)
    let mut pieces: BTreeMap<u32, (u32, Token)> = BTreeMap::new();
    let init: Vec<(u32, Token)> = ring.initial_tokens(range).into_iter().collect();
    for (i, (a, t)) in init.iter().enumerate() {
        let last = init.get(i + 1).map_or(rhi, |(b, _)| b - 1);
        pieces.insert(*a, (last, *t));
    }
    let total: usize = records.values().map(|r| r.grants.len()).sum();
    let passes = total
        .saturating_add(heirs.len())
        .saturating_add(2)
        .min(1 << 16);
    // A grant can take effect only when its writer gained a piece: after
    // the first pass, only those writers' grants are looked at again.
    let mut gained: Option<BTreeSet<PeerName>> = None;
    for _ in 0..passes {
        let mut now_gained: BTreeSet<PeerName> = BTreeSet::new();
        for (o, r) in records {
            if gained.as_ref().is_some_and(|g| !g.contains(o)) {
                continue;
            }
            for g in &r.grants {
                if apply(&mut pieces, *o, g) {
                    now_gained.insert(g.to);
                }
            }
        }
        for (_, t) in pieces.values_mut() {
            if let Some(h) = heir_of(heirs, t.owner) {
                t.owner = h;
                t.at = t.at.saturating_add(1);
                now_gained.insert(h);
            }
        }
        if now_gained.is_empty() {
            break;
        }
        gained = Some(now_gained);
    }
    // Adjacent pieces of one owner at one counter are one piece.
    let mut out: BTreeMap<u32, Token> = BTreeMap::new();
    let mut prev: Option<Token> = None;
    for (a, (_, t)) in pieces {
        if prev != Some(t) {
            out.insert(a, t);
            prev = Some(t);
        }
    }
    out
}

/// The last heir of a chain of reclaims from `p` (at most 16 steps; a
/// chain that comes back to `p` gives none).
fn heir_of(heirs: &BTreeMap<PeerName, PeerName>, p: PeerName) -> Option<PeerName> {
    let mut h = p;
    for _ in 0..16 {
        match heirs.get(&h) {
            Some(n) if *n != h => h = *n,
            _ => break,
        }
    }
    (h != p).then_some(h)
}

/// Apply one grant of `owner` (see [`derive()`]); whether anything moved.
fn apply(pieces: &mut BTreeMap<u32, (u32, Token)>, owner: PeerName, g: &Grant) -> bool {
    if g.to == owner {
        return false;
    }
    let start = pieces
        .range(..=g.first)
        .next_back()
        .map(|(a, _)| *a)
        .unwrap_or(g.first);
    let hits: Vec<(u32, u32, Token)> = pieces
        .range(start..=g.last)
        .filter(|(_, (last, t))| *last >= g.first && t.owner == owner && t.at < g.at)
        .map(|(a, (l, t))| (*a, *l, *t))
        .collect();
    for &(a, last, t) in &hits {
        let s = a.max(g.first);
        let e = last.min(g.last);
        if a < s {
            pieces.insert(a, (s - 1, t));
        }
        pieces.insert(
            s,
            (
                e,
                Token {
                    owner: g.to,
                    at: g.at,
                },
            ),
        );
        if e < last {
            pieces.insert(e + 1, (last, t));
        }
    }
    !hits.is_empty()
}

/// A wire subnet for messages.
pub fn net_str(n: Net) -> String {
    n.to_ipnet()
        .map(|n| n.to_string())
        .unwrap_or_else(|| format!("{}/{}", Ipv4Addr::from(n.addr), n.prefix))
}
