//! The topology store: every known peer's entry, the CRDT merge, and deltas.
//!
//! An entry (nickname, incarnation, version, addresses, connections) is
//! written only by its owner, who bumps its version on every change; a new
//! incarnation (a restart) supersedes every version of the old one. Merging
//! keeps, per peer, the entry with the highest `(incarnation, version)`: a
//! join-semilattice, so merges commute, associate and are idempotent.
//!
//! Peers are interned to dense indices ([`Idx`]) so connections cost two
//! bytes in memory ([`Conns`]: sorted, exact-size, 16-bit while every index
//! fits) and one or two on the wire. Indices are never reused.
//!
//! Memory matters: every peer holds every entry, so a mesh of N peers with
//! C connections each holds N·C connections per peer (the simulator holds
//! N² of them). Nothing derivable is stored per entry (its digest hash is
//! recomputed from name, incarnation and version), the nickname and
//! addresses share one exact-size box ([`Card`]), and the change history is
//! bounded and four bytes an operation ([`History`]). A core told the mesh's
//! size ([`Topology::reserve`]) keeps no growth slack.
//!
//! Deltas: each entry remembers its recent changes ([`Op`]s, oldest first,
//! at most [`MAX_RECENT`], complete above `floor`), so anyone holding version
//! `v` can be sent just the changes from any `base ≥ floor`; replaying
//! "connection X present/absent" operations from any `base ≤ v` yields
//! exactly the newer entry (the last operation on each connection wins).
//! Older bases get the whole entry. The history of an entry that did not
//! change between two compactions is dropped. An entry learned whole over
//! an older version `v` of the same incarnation keeps its history, then a
//! hole marker at `v`, then the difference (stamped with the new version):
//! that serves bases up to `v`; a base inside the hole gets the whole entry.
//!
//! Signatures: every entry carries its owner's signature of its content at
//! its version ([`signed_message`]: name, incarnation, version, card and
//! the *names* of its connections, sorted), never of a delta. A receiver
//! applies a delta to its copy, and [`Topology::apply`] checks the
//! signature against the entry that results before changing anything, so
//! deltas made by any relayer from its history stay verifiable end to end,
//! and no member can write another's entry.

use super::digest::{entry_hash, Digest};
use super::wire::MAX_ADDRS;
use crate::name::PeerName;
use crate::sign::{PublicKey, Sig};
use std::collections::HashMap;
use std::net::SocketAddr;

/// Hashing for maps keyed by peer names. Names are derived from keys by a
/// cryptographic hash and a peer can only send names it received, so a
/// fast non-keyed mix is enough (no HashDoS beyond what a mesh member could
/// do anyway by flooding).
#[derive(Clone, Copy, Default)]
pub struct NameHash;

impl std::hash::BuildHasher for NameHash {
    type Hasher = NameHasher;
    fn build_hasher(&self) -> NameHasher {
        NameHasher(0)
    }
}

/// The hasher of [`NameHash`].
pub struct NameHasher(u64);

impl std::hash::Hasher for NameHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Eight bytes a round: a name (six bytes) is one.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(29) ^ u64::from_le_bytes(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        // Length prefixes of fixed-size keys: cheap to fold in.
        self.0 = self.0.wrapping_add(n as u64);
    }
    fn finish(&self) -> u64 {
        super::digest::mix(self.0)
    }
}

/// A dense local index of a peer name.
pub type Idx = u32;

/// How many recent operations an entry remembers for deltas.
pub const MAX_RECENT: usize = 32;

/// One change to a peer's connections, packed in eight bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// The version it produced (an upper bound, when learned from a delta).
    pub version: u32,
    /// The connection's other end (low 31 bits) and whether it was added
    /// (top bit).
    peer_add: u32,
}

/// The peer of a hole marker: an [`Op`] at version `v` followed by
/// operations at version `w` says the history does not know what happened
/// between `v` and `w` (the entry was learned whole at `w` over `v`): the
/// operations at `w` serve bases up to `v` only.
const HOLE: Idx = 0x7fff_ffff;

impl Op {
    fn hole(version: u32) -> Op {
        Op::new(version, HOLE, false)
    }

    fn is_hole(&self) -> bool {
        self.peer() == HOLE
    }

    fn new(version: u32, peer: Idx, add: bool) -> Op {
        Op {
            version,
            peer_add: (peer & 0x7fff_ffff) | (u32::from(add) << 31),
        }
    }

    /// The connection's other end.
    pub fn peer(&self) -> Idx {
        self.peer_add & 0x7fff_ffff
    }

    /// Added (true) or removed.
    pub fn add(&self) -> bool {
        self.peer_add >> 31 == 1
    }
}

/// A sorted set of connections: two bytes an index while every index fits
/// in 16 bits (any mesh of fewer than 65,536 names), four bytes beyond.
/// Stored exactly (no spare capacity): a simulator holds millions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conns {
    /// Every index below 65,536.
    Narrow(Box<[u16]>),
    /// Some index above.
    Wide(Box<[u32]>),
}

impl Default for Conns {
    fn default() -> Self {
        Conns::Narrow(Box::new([]))
    }
}

/// The indices of a [`Conns`], in order.
pub enum ConnIter<'a> {
    /// Of a narrow set.
    Narrow(std::slice::Iter<'a, u16>),
    /// Of a wide set.
    Wide(std::slice::Iter<'a, u32>),
}

impl Iterator for ConnIter<'_> {
    type Item = Idx;
    #[inline]
    fn next(&mut self) -> Option<Idx> {
        match self {
            ConnIter::Narrow(i) => i.next().map(|&x| Idx::from(x)),
            ConnIter::Wide(i) => i.next().copied(),
        }
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            ConnIter::Narrow(i) => i.size_hint(),
            ConnIter::Wide(i) => i.size_hint(),
        }
    }
}

impl ExactSizeIterator for ConnIter<'_> {}

impl Conns {
    /// From sorted, deduplicated indices.
    pub fn from_sorted(v: &[Idx]) -> Conns {
        if v.iter().all(|&i| i <= Idx::from(u16::MAX)) {
            Conns::Narrow(v.iter().map(|&i| i as u16).collect())
        } else {
            Conns::Wide(v.into())
        }
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        match self {
            Conns::Narrow(s) => s.len(),
            Conns::Wide(s) => s.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The indices, in order.
    pub fn iter(&self) -> ConnIter<'_> {
        match self {
            Conns::Narrow(s) => ConnIter::Narrow(s.iter()),
            Conns::Wide(s) => ConnIter::Wide(s.iter()),
        }
    }

    /// Whether `i` is among them.
    #[inline]
    pub fn contains(&self, i: Idx) -> bool {
        match self {
            Conns::Narrow(s) => u16::try_from(i).is_ok_and(|i| s.binary_search(&i).is_ok()),
            Conns::Wide(s) => s.binary_search(&i).is_ok(),
        }
    }

    /// As a vector.
    pub fn to_vec(&self) -> Vec<Idx> {
        self.iter().collect()
    }

    /// Add (`present`) or remove one index; whether anything changed.
    fn set(&mut self, i: Idx, present: bool) -> bool {
        if self.contains(i) == present {
            return false;
        }
        self.edit(|v| match v.binary_search(&i) {
            Ok(p) => {
                v.remove(p);
            }
            Err(p) => v.insert(p, i),
        });
        true
    }

    /// Change as a sorted vector (kept sorted and deduplicated by `f`).
    fn edit(&mut self, f: impl FnOnce(&mut Vec<Idx>)) {
        let mut v = self.to_vec();
        f(&mut v);
        *self = Conns::from_sorted(&v);
    }
}

/// An entry's recent changes ([`Op`]s, oldest first): four bytes an
/// operation while every version is within 65,535 above the entry's
/// `floor` and every index below 32,767 (any mesh of fewer names), eight
/// beyond. Every topology holds one per changing entry while a mesh
/// converges, so this is much of a simulator's peak memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum History {
    /// Version above the floor (high 16 bits), added (bit 15), index
    /// (0x7fff: a hole marker).
    Narrow(Box<[u32]>),
    /// Anything.
    Wide(Box<[Op]>),
}

impl Default for History {
    fn default() -> Self {
        History::Narrow(Box::new([]))
    }
}

impl History {
    /// The operations, given the entry's floor.
    fn from_ops(ops: &[Op], floor: u32) -> History {
        let narrow = |op: &Op| {
            let off = op.version.checked_sub(floor)?;
            let peer = if op.is_hole() { 0x7fff } else { op.peer() };
            (off <= 0xffff && (peer < 0x7fff || op.is_hole()))
                .then(|| off << 16 | u32::from(op.add()) << 15 | peer)
        };
        match ops.iter().map(narrow).collect::<Option<Box<[u32]>>>() {
            Some(n) => History::Narrow(n),
            None => History::Wide(ops.into()),
        }
    }

    /// Operation `k` (oldest first), given the entry's floor.
    fn op(&self, k: usize, floor: u32) -> Op {
        match self {
            History::Narrow(n) => {
                let x = n[k];
                let peer = match x & 0x7fff {
                    0x7fff => HOLE,
                    p => p,
                };
                Op::new(floor + (x >> 16), peer, x >> 15 & 1 == 1)
            }
            History::Wide(w) => w[k],
        }
    }

    /// The operations, oldest first, given the entry's floor.
    pub fn iter(&self, floor: u32) -> impl DoubleEndedIterator<Item = Op> + '_ {
        (0..self.len()).map(move |k| self.op(k, floor))
    }

    /// The operations, oldest first, given the entry's floor.
    pub fn ops(&self, floor: u32) -> Vec<Op> {
        self.iter(floor).collect()
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        match self {
            History::Narrow(n) => n.len(),
            History::Wide(w) => w.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An entry's nickname and the addresses it can be dialed at (as its
/// neighbours see it), in one exact-size allocation: a length-prefixed
/// nickname, then each address as a tag (4 or 6), the IP, the port (and
/// for IPv6 flow info and scope). Every peer holds one per known peer (a
/// simulator N² of them), so two boxes each would cost more than the data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Card(Box<[u8]>);

impl Card {
    /// A nickname (cut to 255 bytes) and addresses.
    pub fn new(nickname: &str, addrs: &[SocketAddr]) -> Card {
        let mut cut = nickname.len().min(255);
        while !nickname.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut b = Vec::with_capacity(1 + cut + 8 * addrs.len());
        b.push(cut as u8);
        b.extend_from_slice(&nickname.as_bytes()[..cut]);
        for a in addrs {
            match a {
                SocketAddr::V4(v) => {
                    b.push(4);
                    b.extend_from_slice(&v.ip().octets());
                    b.extend_from_slice(&v.port().to_le_bytes());
                }
                SocketAddr::V6(v) => {
                    b.push(6);
                    b.extend_from_slice(&v.ip().octets());
                    b.extend_from_slice(&v.port().to_le_bytes());
                    b.extend_from_slice(&v.flowinfo().to_le_bytes());
                    b.extend_from_slice(&v.scope_id().to_le_bytes());
                }
            }
        }
        Card(b.into())
    }

    fn split(&self) -> (&[u8], &[u8]) {
        let n = self
            .0
            .first()
            .map_or(0, |&n| usize::from(n) + 1)
            .min(self.0.len());
        let (nick, addrs) = self.0.split_at(n);
        (nick.get(1..).unwrap_or_default(), addrs)
    }

    /// The nickname.
    pub fn nickname(&self) -> &str {
        std::str::from_utf8(self.split().0).unwrap_or_default()
    }

    /// The addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        use std::net::{SocketAddrV4, SocketAddrV6};
        let mut out = Vec::new();
        let mut b = self.split().1;
        let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        loop {
            match b {
                [4, rest @ ..] if rest.len() >= 6 => {
                    let ip: [u8; 4] = [rest[0], rest[1], rest[2], rest[3]];
                    out.push(SocketAddrV4::new(ip.into(), u16_at(rest, 4)).into());
                    b = &rest[6..];
                }
                [6, rest @ ..] if rest.len() >= 26 => {
                    let mut ip = [0u8; 16];
                    ip.copy_from_slice(&rest[..16]);
                    let (port, flow, scope) =
                        (u16_at(rest, 16), u32_at(rest, 18), u32_at(rest, 22));
                    out.push(SocketAddrV6::new(ip.into(), port, flow, scope).into());
                    b = &rest[26..];
                }
                _ => return out,
            }
        }
    }

    /// Whether there is any address.
    pub fn has_addrs(&self) -> bool {
        !self.split().1.is_empty()
    }
}

/// What an owner wrote and signed for one version of its entry. Immutable
/// once made, and shared ([`Entry::body`]): topologies that hold the same
/// version with the same local indices hold one allocation (the simulator's
/// thousands of cores, which intern names in one order, see
/// [`Topology::intern_all`]; see [`share`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    /// Restart counter of the peer.
    pub incarnation: u64,
    /// Version within the incarnation (≥ 1).
    pub version: u32,
    /// Its nickname and the addresses it can be dialed at.
    pub card: Card,
    /// Its established connections, sorted.
    pub conns: Conns,
    /// The owner's signature of this version ([`signed_message`]).
    pub sig: Sig,
}

/// One peer's entry: the shared [`Body`] (its fields read through
/// `Deref`) and what this topology knows of its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    body: std::sync::Arc<Body>,
    /// The version that last changed `addrs`.
    pub addrs_version: u32,
    /// Deltas can be made from any base ≥ floor.
    pub floor: u32,
    /// The version seen at the last compaction (for pruning `recent`).
    settled: u32,
    /// Recent changes, oldest first; complete for versions above `floor`
    /// (but for holes). At most [`MAX_RECENT`], dropped once the entry
    /// settles (then no allocation at all: most entries at rest).
    pub recent: Recent,
}

/// An entry's [`History`], boxed when there is any: eight bytes in every
/// entry of every topology rather than twenty-four.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recent(Option<Box<History>>);

impl Recent {
    fn new(h: History) -> Recent {
        Recent((!h.is_empty()).then(|| Box::new(h)))
    }
}

impl Recent {
    /// The operations, oldest first, given the entry's floor.
    pub fn iter(&self, floor: u32) -> impl DoubleEndedIterator<Item = Op> + '_ {
        self.0.iter().flat_map(move |h| h.iter(floor))
    }

    /// The operations, oldest first, given the entry's floor.
    pub fn ops(&self, floor: u32) -> Vec<Op> {
        self.iter(floor).collect()
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |h| h.len())
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl std::ops::Deref for Entry {
    type Target = Body;
    fn deref(&self) -> &Body {
        &self.body
    }
}

impl Entry {
    /// Whether `peer` is among the connections.
    #[inline]
    pub fn has_conn(&self, peer: Idx) -> bool {
        self.conns.contains(peer)
    }

    /// The body, shared.
    pub fn body(&self) -> &std::sync::Arc<Body> {
        &self.body
    }

    /// The body, to change (a copy if shared).
    fn body_mut(&mut self) -> &mut Body {
        std::sync::Arc::make_mut(&mut self.body)
    }
}

/// Bodies by content, process-wide: each body made from a record is looked
/// up here, and an equal one already held by some topology is taken
/// instead, so equal versions cost one allocation however many
/// topologies hold them. Only weak references: a body goes when its last
/// holder drops it; dead slots are swept when the table doubles.
static SHARED: std::sync::Mutex<Option<crate::intern::Weaks<u64, Body, NameHash>>> =
    std::sync::Mutex::new(None);

fn body_hash(b: &Body) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = NameHash.build_hasher();
    h.write(&b.sig.0[..16]);
    h.write_u64(b.incarnation);
    h.write_u32(b.version);
    h.write(&b.card.0);
    match &b.conns {
        Conns::Narrow(c) => c.iter().for_each(|&x| h.write_u16(x)),
        Conns::Wide(c) => c.iter().for_each(|&x| h.write_u32(x)),
    }
    h.finish()
}

/// An equal body already held somewhere, or this one (then registered).
pub fn share(b: Body) -> std::sync::Arc<Body> {
    let k = body_hash(&b);
    let mut g = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    g.get_or_insert_with(|| crate::intern::Weaks::new(4096))
        .intern(k, b)
}

/// A record with names resolved to local indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRecord {
    /// The peer.
    pub peer: Idx,
    /// Incarnation.
    pub incarnation: u64,
    /// 0 for a whole entry, else the version the changes start from.
    pub base: u32,
    /// The version the changes lead to.
    pub version: u32,
    /// Whole entries only.
    pub nickname: Option<String>,
    /// When changed.
    pub addrs: Option<Vec<SocketAddr>>,
    /// Connections added (all, for a whole entry).
    pub add: Vec<Idx>,
    /// Connections removed.
    pub del: Vec<Idx>,
    /// The owner's signature of the entry this record leads to.
    pub sig: Sig,
    /// The owner's key (sent with whole entries, for receivers that do not
    /// know the peer yet).
    pub key: Option<PublicKey>,
}

/// The domain of topology signatures.
pub const SIGN_DOMAIN: &[u8] = b"mesh/topology/entry/v1";

/// The highest incarnation accepted: the daemon's is the time of its start
/// in milliseconds (2^48 ms is the year 10889), so anything above is not a
/// value its writer could have produced. An absolute bound, not a step from
/// what we hold, so that every peer refuses the same records whatever
/// order they arrive in (a step bound would leave peers that saw an entry
/// at different times disagreeing on it for good).
pub const MAX_INCARNATION: u64 = 1 << 48;
/// The highest version accepted (one per change of an entry: 2^31 changes
/// is more than a peer makes in its life).
pub const MAX_VERSION: u32 = 1 << 31;

/// The bytes a peer signs for its entry: name, incarnation, version, the
/// card's canonical bytes, and its connections' names in ascending order.
pub fn signed_message(
    name: PeerName,
    incarnation: u64,
    version: u32,
    card: &Card,
    conns: &mut [PeerName],
) -> Vec<u8> {
    // Sorted as big-endian integers (the same order as the bytes): several
    // times faster than comparing six-byte arrays, and every signature
    // checked sorts its entry's connections.
    if !conns.is_sorted() {
        let mut keys: Vec<u64> = conns
            .iter()
            .map(|n| {
                let mut b = [0u8; 8];
                b[2..].copy_from_slice(&n.0);
                u64::from_be_bytes(b)
            })
            .collect();
        keys.sort_unstable();
        for (c, k) in conns.iter_mut().zip(&keys) {
            c.0.copy_from_slice(&k.to_be_bytes()[2..]);
        }
    }
    let mut m = Vec::with_capacity(6 + 8 + 4 + 2 + card.0.len() + 4 + 6 * conns.len());
    m.extend_from_slice(&name.0);
    m.extend_from_slice(&incarnation.to_le_bytes());
    m.extend_from_slice(&version.to_le_bytes());
    m.extend_from_slice(&(card.0.len() as u16).to_le_bytes());
    m.extend_from_slice(&card.0);
    m.extend_from_slice(&(conns.len() as u32).to_le_bytes());
    for c in conns.iter() {
        m.extend_from_slice(&c.0);
    }
    m
}

/// What merging a record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Nothing new.
    Stale,
    /// The entry changed; `prev` is the version we had before within the same
    /// incarnation (0: none, or a different incarnation).
    Changed {
        /// Previous version in this incarnation (0 if none).
        prev: u32,
        /// The peer was not known before.
        new_peer: bool,
    },
    /// The signature does not match the entry the record leads to (or no
    /// key is known for the peer): nothing changed. For a delta, a whole
    /// entry may still verify.
    BadSignature,
    /// Refused by a bound: an incarnation or version past
    /// [`MAX_INCARNATION`] or [`MAX_VERSION`], or a new peer while the
    /// table is full.
    Refused,
    /// A delta we cannot apply: we need the changes from this version
    /// (incarnation 0: we know nothing of the peer).
    Want {
        /// Our incarnation.
        incarnation: u64,
        /// Our version.
        version: u32,
    },
}

/// A mesh's names in one order, shared by the topologies that intern them
/// all in that order ([`Topology::share_names`]): a simulator's thousands
/// of cores then hold one name index between them instead of one each.
#[derive(Debug, Default)]
pub struct NameTable {
    names: Vec<PeerName>,
    index: HashMap<PeerName, Idx, NameHash>,
}

impl NameTable {
    /// The names, in this order (a repeated name keeps its first position).
    pub fn new(names: &[PeerName]) -> std::sync::Arc<NameTable> {
        let mut index: HashMap<PeerName, Idx, NameHash> = HashMap::default();
        index.reserve(names.len());
        for (i, &n) in names.iter().enumerate() {
            index.entry(n).or_insert(i as Idx);
        }
        std::sync::Arc::new(NameTable {
            names: names.to_vec(),
            index,
        })
    }

    /// The position of a name.
    #[inline]
    pub fn position(&self, n: PeerName) -> Option<Idx> {
        self.index.get(&n).copied()
    }

    /// The name at a position.
    #[inline]
    pub fn name(&self, pos: Idx) -> PeerName {
        self.names[pos as usize]
    }

    /// Number of positions.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Every known entry.
pub struct Topology {
    /// Our own name (at index 0), then the names interned past `shared`
    /// (at indices `base + 1`, `base + 2`, ... where `base` is the shared
    /// table's length, 0 without one).
    names: Vec<PeerName>,
    /// The index of ourselves and of the names in `names`.
    index: HashMap<PeerName, Idx, NameHash>,
    /// Names interned in one order shared with other topologies
    /// ([`Topology::share_names`]): position `p` at index `p + 1`.
    shared: Option<std::sync::Arc<NameTable>>,
    entries: Vec<Option<Entry>>,
    digest: Digest,
    count: usize,
    /// Set when a change needs a whole route search (see
    /// [`Topology::take_routing_change`]).
    routing_full: bool,
    /// Peers whose entry appeared or gained connections since, unless
    /// `routing_full` (at most [`MAX_ROUTING_CHANGES`]).
    routing_grown: Vec<Idx>,
    /// Connections both ends reported that went away since, unless
    /// `routing_full` (at most [`MAX_ROUTING_CHANGES`]).
    routing_removed: Vec<(Idx, Idx)>,
}

/// Past this many changes, routes are simply recomputed.
const MAX_ROUTING_CHANGES: usize = 4096;

/// What changed in what routes are made of since the last
/// [`Topology::take_routing_change`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoutingChange {
    /// Nothing that can change unicast routes.
    None,
    /// Only these peers' entries appeared or gained connections (perhaps
    /// repeated): distances can only shrink, from the ends of their
    /// connections outwards ([`super::routes::add_links`]).
    Grown(Vec<Idx>),
    /// Something else (a connection or entry went away, or too much
    /// changed): search again ([`super::routes::unicast_into`]).
    Full,
}

impl Topology {
    /// A topology holding only our own entry, at index 0.
    pub fn new(me: PeerName, nickname: String, incarnation: u64) -> Self {
        let mut t = Topology {
            names: Vec::new(),
            index: HashMap::default(),
            shared: None,
            entries: Vec::new(),
            digest: Digest::default(),
            count: 0,
            routing_full: false,
            routing_grown: Vec::new(),
            routing_removed: Vec::new(),
        };
        let i = t.intern(me);
        t.set(
            i,
            Some(Entry {
                body: std::sync::Arc::new(Body {
                    card: Card::new(&nickname, &[]),
                    incarnation: incarnation.max(1),
                    version: 1,
                    conns: Conns::default(),
                    sig: Sig::NONE,
                }),
                addrs_version: 1,
                recent: Recent::default(),
                floor: 1,
                settled: 0,
            }),
        );
        t
    }

    /// The message the owner of entry `i` signs for its current version.
    pub fn entry_message(&self, i: Idx) -> Option<Vec<u8>> {
        let e = self.get(i)?;
        let mut conns: Vec<PeerName> = e.conns.iter().map(|c| self.name(c)).collect();
        Some(signed_message(
            self.name(i),
            e.incarnation,
            e.version,
            &e.card,
            &mut conns,
        ))
    }

    /// Set the signature of entry `i` (our own, after a change).
    pub fn set_sig(&mut self, i: Idx, sig: Sig) {
        if let Some(Some(e)) = self.entries.get_mut(i as usize) {
            e.body_mut().sig = sig;
        }
    }

    /// The message signed for the entry `r` leads to (applied to ours for
    /// a delta); `None` if `r` is a delta that does not apply.
    fn record_message(&self, r: &LocalRecord) -> Option<Vec<u8>> {
        let (card, conns) = if r.base == 0 {
            let mut addrs = r.addrs.clone().unwrap_or_default();
            addrs.truncate(MAX_ADDRS);
            let card = Card::new(r.nickname.as_deref().unwrap_or_default(), &addrs);
            let mut conns = r.add.clone();
            conns.sort_unstable();
            conns.dedup();
            (card, conns)
        } else {
            let e = self.get(r.peer)?;
            let card = match &r.addrs {
                Some(a) => {
                    let mut addrs = a.clone();
                    addrs.truncate(MAX_ADDRS);
                    Card::new(e.card.nickname(), &addrs)
                }
                None => e.card.clone(),
            };
            let mut conns = e.conns.to_vec();
            for d in &r.del {
                if let Ok(p) = conns.binary_search(d) {
                    conns.remove(p);
                }
            }
            for a in &r.add {
                if let Err(p) = conns.binary_search(a) {
                    conns.insert(p, *a);
                }
            }
            (card, conns)
        };
        let mut names: Vec<PeerName> = conns.iter().map(|&c| self.name(c)).collect();
        Some(signed_message(
            self.name(r.peer),
            r.incarnation,
            r.version,
            &card,
            &mut names,
        ))
    }

    /// Make room for `peers` entries in all (a hint: a simulator holding
    /// thousands of topologies saves the slack of growing each).
    pub fn reserve(&mut self, peers: usize) {
        let more = peers.saturating_sub(self.slots());
        self.names.reserve_exact(more);
        self.entries.reserve_exact(more);
        self.index.reserve(more);
    }

    /// Intern `names` in this order, each at the next slot (a name we
    /// hold already, ourselves included, keeps its index and leaves its
    /// slot unused). A hint for a simulator: topologies that intern the
    /// mesh's names in one order give each peer the same index (but
    /// ourselves, at 0), so an entry's connections read the same in all
    /// of them but its neighbours', and its [`Body`] is shared.
    pub fn intern_all(&mut self, names: &[PeerName]) {
        self.reserve(names.len() + 1);
        for &n in names {
            let i = self.slots() as Idx;
            self.names.push(n);
            self.entries.push(None);
            self.index.entry(n).or_insert(i);
        }
    }

    /// [`Topology::intern_all`] with a table shared with other
    /// topologies: the same indices, but the names and their index are
    /// held once between them all. Only for a topology holding nothing
    /// but ourselves (else the names are interned one by one).
    pub fn share_names(&mut self, table: std::sync::Arc<NameTable>) {
        if self.shared.is_some() || self.names.len() != 1 {
            let names = table.names.clone();
            return self.intern_all(&names);
        }
        self.entries.reserve_exact(table.len());
        self.entries.resize(1 + table.len(), None);
        self.shared = Some(table);
        self.names.shrink_to_fit();
        self.index.shrink_to_fit();
    }

    /// The shared names ([`Topology::share_names`]), if any.
    pub fn shared_names(&self) -> Option<&std::sync::Arc<NameTable>> {
        self.shared.as_ref()
    }

    /// The length of the shared table (0 without one).
    #[inline]
    fn base(&self) -> usize {
        self.shared.as_ref().map_or(0, |t| t.len())
    }

    /// The local index of a name, allocating one.
    pub fn intern(&mut self, n: PeerName) -> Idx {
        if let Some(i) = self.lookup(n) {
            return i;
        }
        let i = self.slots() as Idx;
        self.names.push(n);
        self.index.insert(n, i);
        self.entries.push(None);
        i
    }

    /// The index of a known name.
    pub fn lookup(&self, n: PeerName) -> Option<Idx> {
        // Ourselves, then names interned past a shared table (none in a
        // simulator's cores: one hash lookup, not two), then the table.
        if self.names.first() == Some(&n) {
            return Some(0);
        }
        if self.names.len() > 1 {
            if let Some(&i) = self.index.get(&n) {
                return Some(i);
            }
        }
        let t = self.shared.as_ref()?;
        t.position(n).map(|p| p + 1)
    }

    /// The name at an index.
    pub fn name(&self, i: Idx) -> PeerName {
        let base = self.base();
        match i as usize {
            0 => self.names[0],
            k if k <= base => self
                .shared
                .as_ref()
                .map_or(self.names[0], |t| t.name(i - 1)),
            k => self.names[k - base],
        }
    }

    /// The entry at an index, if known.
    pub fn get(&self, i: Idx) -> Option<&Entry> {
        self.entries.get(i as usize).and_then(|e| e.as_ref())
    }

    /// Number of slots (known and merely referenced names).
    pub fn slots(&self) -> usize {
        self.names.len() + self.base()
    }

    /// Number of known entries (ourselves included).
    pub fn count(&self) -> usize {
        self.count
    }

    /// The digest.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Indices of all known entries.
    pub fn known(&self) -> impl Iterator<Item = Idx> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_some())
            .map(|(i, _)| i as Idx)
    }

    /// The digest hash of the entry at `i` (0: none).
    fn hash_of(&self, i: Idx) -> u64 {
        self.entries[i as usize]
            .as_ref()
            .map_or(0, |e| entry_hash(self.name(i), e.incarnation, e.version))
    }

    fn set(&mut self, i: Idx, e: Option<Entry>) {
        let old = self.hash_of(i);
        match (self.entries[i as usize].is_some(), e.is_some()) {
            // Routes may now reach it, and through it.
            (false, true) => {
                self.count += 1;
                self.note_grown(i);
            }
            (true, false) => {
                self.count -= 1;
                self.routing_full = true;
            }
            _ => {}
        }
        self.entries[i as usize] = e;
        let new = self.hash_of(i);
        self.digest.replace(self.name(i), old, new);
    }

    /// Change the entry at `i` in place, keeping the digest up to date.
    fn modify<R>(&mut self, i: Idx, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        let old = self.hash_of(i);
        let r = f(self.entries[i as usize].as_mut()?);
        let new = self.hash_of(i);
        self.digest.replace(self.name(i), old, new);
        Some(r)
    }

    /// What changed since the last call that may change our unicast
    /// routes: the set of known entries, our own connections, or a
    /// connection both ends report (a connection one end reports alone
    /// counts for nobody's routes but that end's own). A removed connection
    /// a–b for which `same_level(a, b)` holds does not count (a
    /// breadth-first search never takes a link between two peers it reaches
    /// at the same depth). Conservative: a change may also turn out to
    /// change nothing.
    pub fn take_routing_change(&mut self, same_level: impl Fn(Idx, Idx) -> bool) -> RoutingChange {
        let full = std::mem::take(&mut self.routing_full)
            || self.routing_removed.iter().any(|&(a, b)| !same_level(a, b));
        self.routing_removed.clear();
        if self.routing_removed.capacity() > 64 {
            self.routing_removed = Vec::new();
        }
        let grown = std::mem::take(&mut self.routing_grown);
        if full {
            RoutingChange::Full
        } else if grown.is_empty() {
            RoutingChange::None
        } else {
            RoutingChange::Grown(grown)
        }
    }

    fn too_many_changes(&mut self) {
        self.routing_full = true;
        self.routing_grown = Vec::new();
        self.routing_removed = Vec::new();
    }

    /// Note a peer whose entry appeared or gained connections.
    fn note_grown(&mut self, peer: Idx) {
        if self.routing_full || self.routing_grown.last() == Some(&peer) {
            return;
        }
        if self.routing_grown.len() >= MAX_ROUTING_CHANGES {
            return self.too_many_changes();
        }
        self.routing_grown.push(peer);
    }

    /// Note the connections of `peer` to `others` that went away, if the
    /// other end reports them too (call it before the change). Links to
    /// us do not count: our own connections are used from our side alone.
    fn note_removed(&mut self, peer: Idx, others: impl Iterator<Item = Idx>) {
        if peer == 0 || self.routing_full {
            return;
        }
        for o in others {
            if o != 0 && self.get(o).is_some_and(|e| e.has_conn(peer)) {
                if self.routing_removed.len() >= MAX_ROUTING_CHANGES {
                    return self.too_many_changes();
                }
                self.routing_removed.push((peer, o));
            }
        }
    }

    /// Forget an entry (garbage collection).
    pub fn remove(&mut self, i: Idx) {
        self.set(i, None);
    }

    /// Merge one record whose signature `verify(message, &sig, key)`
    /// accepts, if no more than `max_peers` entries are then known. The
    /// caller handles records about ourselves.
    pub fn apply(
        &mut self,
        r: LocalRecord,
        max_peers: usize,
        verify: impl FnOnce(&[u8], &Sig, Option<PublicKey>) -> bool,
    ) -> Applied {
        let i = r.peer;
        let cur = self.get(i).map(|e| (e.incarnation, e.version));
        let whole = r.base == 0;
        let applies = match cur {
            None => whole,
            Some((inc, _)) if r.incarnation < inc => false,
            Some((inc, _)) if r.incarnation > inc => whole,
            Some((_, ver)) => r.version > ver && (whole || r.base <= ver),
        };
        if applies {
            if r.incarnation > MAX_INCARNATION
                || r.version > MAX_VERSION
                || (cur.is_none() && self.count >= max_peers)
            {
                return Applied::Refused;
            }
            let ok = self
                .record_message(&r)
                .is_some_and(|m| verify(&m, &r.sig, r.key));
            if !ok {
                return Applied::BadSignature;
            }
        }
        match cur {
            None if !whole => Applied::Want {
                incarnation: 0,
                version: 0,
            },
            None => {
                self.replace_whole(r);
                Applied::Changed {
                    prev: 0,
                    new_peer: true,
                }
            }
            Some((inc, _)) if r.incarnation < inc => Applied::Stale,
            Some((inc, ver)) if r.incarnation > inc => {
                if whole {
                    self.replace_whole(r);
                    Applied::Changed {
                        prev: 0,
                        new_peer: false,
                    }
                } else {
                    Applied::Want {
                        incarnation: inc,
                        version: ver,
                    }
                }
            }
            Some((_, ver)) if r.version <= ver => Applied::Stale,
            Some((inc, ver)) => {
                if whole {
                    self.replace_whole(r);
                } else if r.base <= ver {
                    self.apply_delta(r);
                } else {
                    return Applied::Want {
                        incarnation: inc,
                        version: ver,
                    };
                }
                Applied::Changed {
                    prev: ver,
                    new_peer: false,
                }
            }
        }
    }

    fn replace_whole(&mut self, r: LocalRecord) {
        let mut conns = r.add;
        conns.sort_unstable();
        conns.dedup();
        let mut addrs = r.addrs.unwrap_or_default();
        addrs.truncate(MAX_ADDRS);
        let mut e = Entry {
            body: share(Body {
                card: Card::new(r.nickname.as_deref().unwrap_or_default(), &addrs),
                incarnation: r.incarnation,
                version: r.version,
                conns: Conns::from_sorted(&conns),
                sig: r.sig,
            }),
            addrs_version: r.version,
            recent: Recent::default(),
            floor: r.version,
            settled: 0,
        };
        if let Some(old) = self.get(r.peer) {
            let (gone, added) = sorted_diff(old.conns.iter(), conns.iter().copied());
            if old.incarnation == r.incarnation && old.version < r.version {
                // Keep serving deltas to neighbours at or below the version
                // we had: our history, a hole, and the difference (else a
                // whole entry learned while a mesh converges makes every
                // neighbour a little behind fetch it whole again).
                let ops = gone.iter().map(|&c| Op::new(r.version, c, false));
                let ops = ops.chain(added.iter().map(|&c| Op::new(r.version, c, true)));
                e.floor = old.floor;
                e.recent = old.recent.clone();
                push_ops(&mut e, std::iter::once(Op::hole(old.version)).chain(ops));
            }
            if !self.routing_full {
                self.note_removed(r.peer, gone.into_iter());
                if !added.is_empty() {
                    self.note_grown(r.peer);
                }
            }
        }
        self.set(r.peer, Some(e));
    }

    /// [`Topology::apply`] without checks (tests of the merge itself).
    #[cfg(test)]
    pub fn apply_trusted(&mut self, r: LocalRecord) -> Applied {
        self.apply(r, usize::MAX, |_, _, _| true)
    }

    fn apply_delta(&mut self, r: LocalRecord) {
        if !self.routing_full {
            let e = self.get(r.peer).expect("a delta applies to a known entry");
            let gone: Vec<Idx> = r.del.iter().copied().filter(|&d| e.has_conn(d)).collect();
            let new = r.add.iter().any(|&a| !e.has_conn(a));
            self.note_removed(r.peer, gone.into_iter());
            if new {
                self.note_grown(r.peer);
            }
        }
        self.modify(r.peer, |e| {
            let v = r.version;
            let mut b = Body::clone(&e.body);
            b.conns.edit(|conns| {
                for &d in &r.del {
                    if let Ok(p) = conns.binary_search(&d) {
                        conns.remove(p);
                    }
                }
                for &a in &r.add {
                    if let Err(p) = conns.binary_search(&a) {
                        conns.insert(p, a);
                    }
                }
            });
            if let Some(mut addrs) = r.addrs {
                addrs.truncate(MAX_ADDRS);
                b.card = Card::new(b.card.nickname(), &addrs);
                e.addrs_version = v;
            }
            let ops = r.del.iter().map(|&d| Op::new(v, d, false));
            push_ops(e, ops.chain(r.add.iter().map(|&a| Op::new(v, a, true))));
            b.version = v;
            b.sig = r.sig;
            e.body = share(b);
        });
    }

    /// What to send a neighbour holding `(incarnation, version)` of peer `i`
    /// (incarnation 0: nothing) so that it has our entry: a delta when our
    /// history reaches back far enough, else the whole entry; `None` if it
    /// is not behind.
    pub fn record_for(&self, i: Idx, incarnation: u64, version: u32) -> Option<LocalRecord> {
        let e = self.get(i)?;
        if incarnation > e.incarnation || (incarnation == e.incarnation && version >= e.version) {
            return None;
        }
        if incarnation != e.incarnation || version < e.floor || version == 0 {
            return Some(LocalRecord {
                peer: i,
                incarnation: e.incarnation,
                base: 0,
                version: e.version,
                nickname: Some(e.card.nickname().to_string()),
                addrs: Some(e.card.addrs()),
                add: e.conns.to_vec(),
                del: vec![],
                sig: e.sig,
                key: None,
            });
        }
        // A base inside a hole gets the whole entry.
        // Newest first: the version of the nearest later operation that is
        // not a hole bounds each hole.
        let mut next: Option<u32> = None;
        for op in e.recent.iter(e.floor).rev() {
            if !op.is_hole() {
                next = Some(op.version);
            } else if version > op.version && next.is_none_or(|n| version < n) {
                return self.record_for(i, 0, 0);
            }
        }
        // Latest operation per connection, above `version`.
        let mut last: Vec<(Idx, bool)> = Vec::new();
        for op in e
            .recent
            .iter(e.floor)
            .rev()
            .take_while(|op| op.version > version)
        {
            if !op.is_hole() && !last.iter().any(|(p, _)| *p == op.peer()) {
                last.push((op.peer(), op.add()));
            }
        }
        Some(LocalRecord {
            peer: i,
            incarnation: e.incarnation,
            base: version,
            version: e.version,
            nickname: None,
            addrs: (e.addrs_version > version).then(|| e.card.addrs()),
            add: last.iter().filter(|(_, a)| *a).map(|(p, _)| *p).collect(),
            del: last.iter().filter(|(_, a)| !*a).map(|(p, _)| *p).collect(),
            sig: e.sig,
            key: None,
        })
    }

    /// Change our own entry (index 0): add or remove a connection.
    pub fn set_own_conn(&mut self, peer: Idx, up: bool) -> bool {
        let changed = self
            .modify(0, |e| {
                if e.has_conn(peer) == up {
                    return false;
                }
                let b = e.body_mut();
                b.conns.set(peer, up);
                b.version = b.version.saturating_add(1);
                let v = e.version;
                push_ops(e, std::iter::once(Op::new(v, peer, up)));
                true
            })
            .unwrap_or(false);
        // Our own connections count for routes from our side alone.
        if changed {
            if up {
                self.note_grown(0);
            } else {
                self.routing_full = true;
            }
        }
        changed
    }

    /// Change our own addresses.
    pub fn set_own_addrs(&mut self, addrs: Vec<SocketAddr>) {
        self.modify(0, |e| {
            let b = e.body_mut();
            b.version = b.version.saturating_add(1);
            b.card = Card::new(b.card.nickname(), &addrs);
            e.addrs_version = e.version;
        });
    }

    /// Supersede a newer claim to our own name: move to `(incarnation,
    /// version + 1)`, forgetting history (neighbours get the whole entry).
    pub fn supersede_own(&mut self, incarnation: u64, version: u32) {
        self.modify(0, |e| {
            let b = e.body_mut();
            b.incarnation = incarnation.max(b.incarnation);
            b.version = version.saturating_add(1).max(b.version.saturating_add(1));
            e.recent = Recent::default();
            e.floor = e.version;
            e.addrs_version = e.version;
        });
    }

    /// Drop the history of entries that did not change since the previous
    /// call, so memory goes back to the entries alone at rest.
    pub fn compact(&mut self) {
        for e in self.entries.iter_mut().flatten() {
            if e.settled == e.version && !e.recent.is_empty() {
                e.recent = Recent::default();
                e.floor = e.version;
            }
            e.settled = e.version;
        }
    }
}

/// Of two sorted sequences: the elements only in the first, and those
/// only in the second.
fn sorted_diff(
    mut a: impl Iterator<Item = Idx>,
    mut b: impl Iterator<Item = Idx>,
) -> (Vec<Idx>, Vec<Idx>) {
    let (mut gone, mut new) = (Vec::new(), Vec::new());
    let (mut x, mut y) = (a.next(), b.next());
    loop {
        match (x, y) {
            (None, None) => return (gone, new),
            (Some(p), Some(q)) if p == q => (x, y) = (a.next(), b.next()),
            (Some(p), Some(q)) if p < q => {
                gone.push(p);
                x = a.next();
            }
            (Some(_), Some(q)) | (None, Some(q)) => {
                new.push(q);
                y = b.next();
            }
            (Some(p), None) => {
                gone.push(p);
                x = a.next();
            }
        }
    }
}

/// Append operations to an entry's history, keeping at most [`MAX_RECENT`]
/// and no spare capacity.
fn push_ops(e: &mut Entry, ops: impl Iterator<Item = Op>) {
    let mut recent = e.recent.ops(e.floor);
    recent.extend(ops);
    while recent.len() > MAX_RECENT {
        // Drop the oldest version's operations whole, so that the history
        // stays complete above the floor. A hole goes with the operations
        // after it (they serve bases below it only).
        let v = if recent[0].is_hole() {
            recent[1..]
                .iter()
                .find(|op| !op.is_hole())
                .map_or(e.version, |op| op.version)
        } else {
            recent[0].version
        };
        let skip = usize::from(recent[0].is_hole());
        let n = skip
            + recent[skip..]
                .iter()
                .take_while(|op| op.version <= v && !op.is_hole())
                .count();
        recent.drain(..n);
        e.floor = e.floor.max(v);
    }
    e.recent = Recent::new(History::from_ops(&recent, e.floor));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nm(b: u8) -> PeerName {
        PeerName([2, 0, 0, 0, 1, b])
    }

    #[test]
    fn shared_names_give_the_indices_of_interning_them_all() {
        let all: Vec<PeerName> = (1..=6).map(nm).collect();
        let table = NameTable::new(&all);
        let mut a = Topology::new(nm(3), "a".into(), 1);
        let mut b = Topology::new(nm(3), "b".into(), 1);
        a.intern_all(&all);
        b.share_names(table);
        assert!(b.shared_names().is_some());
        assert_eq!(a.slots(), b.slots());
        for n in all.iter().copied().chain([nm(9), nm(10)]) {
            assert_eq!(a.intern(n), b.intern(n));
        }
        assert_eq!(a.slots(), b.slots());
        for i in 0..a.slots() as Idx {
            assert_eq!(a.name(i), b.name(i));
            assert_eq!(a.lookup(a.name(i)), b.lookup(b.name(i)));
        }
        assert_eq!(b.lookup(nm(3)), Some(0));
        assert_eq!(b.lookup(nm(11)), None);
    }

    /// A whole record as its (honest) owner would write it: the content of
    /// a version is a function of (name, incarnation, version).
    fn honest(t: &mut Topology, owner: u8, inc: u64, ver: u32) -> LocalRecord {
        let peer = t.intern(nm(owner));
        let add = (0..8u8)
            .filter(|k| {
                (owner as u64 * 31 + inc * 7 + ver as u64 * 13 + *k as u64).is_multiple_of(3)
            })
            .map(|k| t.intern(nm(100 + k)))
            .collect();
        LocalRecord {
            peer,
            incarnation: inc,
            base: 0,
            version: ver,
            nickname: Some(format!("n{owner}")),
            addrs: Some(vec![SocketAddr::from(([198, 18, 0, owner], 6783))]),
            add,
            del: vec![],
            sig: crate::sign::Sig::NONE,
            key: None,
        }
    }

    type Recs = Vec<(u8, u64, u32)>;

    /// A state's content by name, independent of local indices.
    fn content(t: &Topology) -> Vec<(PeerName, u64, u32, Vec<PeerName>)> {
        let mut v: Vec<_> = t
            .known()
            .map(|i| {
                let e = t.get(i).unwrap();
                let mut c: Vec<PeerName> = e.conns.iter().map(|j| t.name(j)).collect();
                c.sort();
                (t.name(i), e.incarnation, e.version, c)
            })
            .collect();
        v.sort();
        v
    }

    fn build(recs: &Recs) -> Topology {
        let mut t = Topology::new(nm(0), "me".into(), 1);
        for &(o, i, v) in recs {
            let r = honest(&mut t, o, i, v);
            t.apply_trusted(r);
        }
        t
    }

    /// Merge b into a by sending every entry of b whole.
    fn merge(a: &mut Topology, b: &Topology) {
        for i in b.known().filter(|&i| i != 0) {
            let r = b.record_for(i, 0, 0).unwrap();
            let peer = a.intern(b.name(r.peer));
            let add = r.add.iter().map(|&j| a.intern(b.name(j))).collect();
            a.apply_trusted(LocalRecord { peer, add, ..r });
        }
    }

    fn arb_recs() -> impl Strategy<Value = Recs> {
        proptest::collection::vec((1u8..6, 1u64..3, 1u32..5), 0..12)
    }

    proptest! {
        #[test]
        fn merge_commutes(a in arb_recs(), b in arb_recs()) {
            let (mut ab, tb) = (build(&a), build(&b));
            merge(&mut ab, &tb);
            let (mut ba, ta) = (build(&b), build(&a));
            merge(&mut ba, &ta);
            prop_assert_eq!(content(&ab), content(&ba));
            prop_assert_eq!(ab.digest().root(), ba.digest().root());
        }

        #[test]
        fn merge_associates(a in arb_recs(), b in arb_recs(), c in arb_recs()) {
            let (ta, tb, tc) = (build(&a), build(&b), build(&c));
            let mut left = build(&a);
            merge(&mut left, &tb);
            merge(&mut left, &tc);
            let mut bc = build(&b);
            merge(&mut bc, &tc);
            let mut right = Topology::new(nm(0), "me".into(), 1);
            merge(&mut right, &ta);
            merge(&mut right, &bc);
            prop_assert_eq!(content(&left), content(&right));
        }

        #[test]
        fn merge_idempotent(a in arb_recs()) {
            let mut t = build(&a);
            let before = content(&t);
            let copy = build(&a);
            merge(&mut t, &copy);
            prop_assert_eq!(content(&t), before);
        }

        /// A delta from any version the receiver may hold yields exactly the
        /// sender's entry.
        #[test]
        fn deltas_equal_whole(ops in proptest::collection::vec((1u8..30, any::<bool>()), 1..150),
                              cut in 0usize..150) {
            let mut owner = Topology::new(nm(1), "o".into(), 1);
            let mut snapshots = vec![owner.record_for(0, 0, 0).unwrap()];
            for (p, up) in ops {
                let i = owner.intern(nm(p));
                if owner.set_own_conn(i, up) {
                    snapshots.push(owner.record_for(0, 0, 0).unwrap());
                }
            }
            let old = &snapshots[cut.min(snapshots.len() - 1)];
            let mut rx = Topology::new(nm(0), "rx".into(), 1);
            let tr = |rx: &mut Topology, r: &LocalRecord| LocalRecord {
                peer: rx.intern(owner.name(r.peer)),
                add: r.add.iter().map(|&j| rx.intern(owner.name(j))).collect(),
                del: r.del.iter().map(|&j| rx.intern(owner.name(j))).collect(),
                ..r.clone()
            };
            let r = tr(&mut rx, old);
            rx.apply_trusted(r);
            let me = rx.lookup(nm(1)).unwrap();
            let have = rx.get(me).unwrap().version;
            if let Some(d) = owner.record_for(0, 1, have) {
                let d = tr(&mut rx, &d);
                let applied = matches!(rx.apply_trusted(d), Applied::Changed { .. });
                prop_assert!(applied);
            }
            let want: Vec<PeerName> = owner.get(0).unwrap().conns.iter().map(|j| owner.name(j)).collect();
            let mut got: Vec<PeerName> = rx.get(me).unwrap().conns.iter().map(|j| rx.name(j)).collect();
            let mut want = want;
            want.sort();
            got.sort();
            prop_assert_eq!(got, want);
            prop_assert_eq!(rx.get(me).unwrap().version, owner.get(0).unwrap().version);
        }
    }

    proptest! {
        /// A relay that learns an entry from whole records and deltas at
        /// any versions serves any neighbour, at any version it may hold,
        /// exactly the relay's entry.
        #[test]
        fn relayed_deltas_equal_whole(
            ops in proptest::collection::vec((1u8..12, any::<bool>(), 0u8..4), 1..120),
            have in 0usize..120,
        ) {
            let tr = |from: &Topology, to: &mut Topology, r: &LocalRecord| LocalRecord {
                peer: to.intern(from.name(r.peer)),
                add: r.add.iter().map(|&j| to.intern(from.name(j))).collect(),
                del: r.del.iter().map(|&j| to.intern(from.name(j))).collect(),
                ..r.clone()
            };
            let mut owner = Topology::new(nm(1), "o".into(), 1);
            let mut relay = Topology::new(nm(0), "relay".into(), 1);
            let mut snapshots = vec![owner.record_for(0, 0, 0).unwrap()];
            for (p, up, learn) in ops {
                let i = owner.intern(nm(p));
                if !owner.set_own_conn(i, up) {
                    continue;
                }
                snapshots.push(owner.record_for(0, 0, 0).unwrap());
                // The relay learns this version whole (1), as a delta from
                // its own (2), or not at all.
                let at = relay.lookup(nm(1)).and_then(|m| relay.get(m)).map(|e| e.version);
                let rec = match (learn, at) {
                    (1, _) | (2, None) => owner.record_for(0, 0, 0),
                    (2, Some(v)) => owner.record_for(0, 1, v),
                    _ => None,
                };
                if let Some(rec) = rec {
                    let r = tr(&owner, &mut relay, &rec);
                    relay.apply_trusted(r);
                }
            }
            let Some(m) = relay.lookup(nm(1)).filter(|&m| relay.get(m).is_some()) else {
                return Ok(());
            };
            let top = relay.get(m).unwrap().version;
            // A neighbour holding any version up to the relay's.
            let held: Vec<&LocalRecord> = snapshots.iter().filter(|s| s.version <= top).collect();
            let snap = held[have % held.len()];
            let mut rx = Topology::new(nm(2), "rx".into(), 1);
            let r = tr(&owner, &mut rx, snap);
            rx.apply_trusted(r);
            if let Some(d) = relay.record_for(m, 1, snap.version) {
                let d = tr(&relay, &mut rx, &d);
                let applied = matches!(rx.apply_trusted(d), Applied::Changed { .. });
                prop_assert!(applied);
            }
            let names = |t: &Topology, i: Idx| {
                let mut v: Vec<PeerName> = t.get(i).unwrap().conns.iter().map(|j| t.name(j)).collect();
                v.sort();
                v
            };
            let me = rx.lookup(nm(1)).unwrap();
            prop_assert_eq!(names(&rx, me), names(&relay, m));
            prop_assert_eq!(rx.get(me).unwrap().version, top);
        }
    }

    #[test]
    fn connections_widen_past_sixteen_bits() {
        let mut c = Conns::from_sorted(&[3, 700]);
        assert!(matches!(c, Conns::Narrow(_)));
        assert!(c.set(70_000, true));
        assert!(matches!(c, Conns::Wide(_)));
        assert!(!c.set(70_000, true));
        assert!(c.contains(70_000) && c.contains(3) && !c.contains(4));
        assert_eq!(c.to_vec(), vec![3, 700, 70_000]);
        assert!(c.set(70_000, false));
        assert!(matches!(c, Conns::Narrow(_)));
        assert!(!c.contains(70_000));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn history_narrows_and_widens() {
        let ops = [Op::new(5, 3, true), Op::hole(5), Op::new(6, 0x7ffe, false)];
        let h = History::from_ops(&ops, 4);
        assert!(matches!(h, History::Narrow(_)));
        assert_eq!(h.ops(4), ops);
        for wide in [Op::new(70_000, 1, true), Op::new(7, 0x7fff, false)] {
            let ops = [ops[0], ops[1], wide];
            let h = History::from_ops(&ops, 4);
            assert!(matches!(h, History::Wide(_)));
            assert_eq!(h.ops(4), ops);
        }
    }

    #[test]
    fn cards_round_trip() {
        let addrs: Vec<SocketAddr> = vec![
            "198.18.0.1:6783".parse().unwrap(),
            "[fe80::1%3]:6784".parse().unwrap(),
        ];
        let c = Card::new("höst", &addrs);
        assert_eq!((c.nickname(), c.addrs()), ("höst", addrs));
        assert!(c.has_addrs() && !Card::new("x", &[]).has_addrs());
        let long = "é".repeat(200);
        assert_eq!(Card::new(&long, &[]).nickname(), "é".repeat(127));
        assert_eq!(Card::default().nickname(), "");
    }

    #[test]
    fn history_is_bounded() {
        let mut t = Topology::new(nm(0), "me".into(), 1);
        for k in 0..(3 * MAX_RECENT as u32) {
            let p = t.intern(PeerName([3, 0, 0, 0, (k >> 8) as u8, k as u8]));
            t.set_own_conn(p, true);
        }
        let e = t.get(0).unwrap();
        assert_eq!(e.recent.len(), MAX_RECENT);
        assert_eq!(e.conns.len(), 3 * MAX_RECENT);
        // A base below the floor gets the whole entry, one above a delta.
        assert_eq!(t.record_for(0, 1, 1).unwrap().base, 0);
        let d = t.record_for(0, 1, e.version - 2).unwrap();
        assert_eq!((d.base, d.add.len()), (e.version - 2, 2));
    }

    #[test]
    fn delta_gap_asks_for_changes() {
        let mut t = Topology::new(nm(0), "me".into(), 1);
        let p = t.intern(nm(5));
        let r = LocalRecord {
            peer: p,
            incarnation: 1,
            base: 3,
            version: 4,
            nickname: None,
            addrs: None,
            add: vec![],
            del: vec![],
            sig: crate::sign::Sig::NONE,
            key: None,
        };
        assert_eq!(
            t.apply_trusted(r.clone()),
            Applied::Want {
                incarnation: 0,
                version: 0
            }
        );
        let mut whole = honest(&mut t, 5, 1, 2);
        whole.peer = p;
        assert!(matches!(
            t.apply_trusted(whole),
            Applied::Changed { new_peer: true, .. }
        ));
        assert_eq!(
            t.apply_trusted(r),
            Applied::Want {
                incarnation: 1,
                version: 2
            }
        );
        // A new incarnation supersedes any version of the old one.
        let mut next = honest(&mut t, 5, 2, 1);
        next.peer = p;
        assert!(matches!(t.apply_trusted(next), Applied::Changed { .. }));
        let mut stale = honest(&mut t, 5, 1, 9);
        stale.peer = p;
        assert_eq!(t.apply_trusted(stale), Applied::Stale);
    }

    proptest::proptest! {
        /// Whole entries at the counters' boundaries merge to the same
        /// state in any order, never panic, and past the bounds are refused.
        #[test]
        fn boundary_counters_merge_the_same_in_any_order(
            picks in proptest::collection::vec((0usize..6, 0usize..6), 1..8),
            seed in 0u64..1000,
        ) {
            let incs = [0u64, 1, MAX_INCARNATION - 1, MAX_INCARNATION, MAX_INCARNATION + 1, u64::MAX];
            let vers = [0u32, 1, MAX_VERSION - 1, MAX_VERSION, MAX_VERSION + 1, u32::MAX];
            let mut a = Topology::new(nm(0), "me".into(), 1);
            let mut b = Topology::new(nm(0), "me".into(), 1);
            let recs: Vec<(u64, u32)> = picks
                .iter()
                .map(|&(i, v)| (incs[i], vers[v]))
                .filter(|&(i, v)| i > 0 && v > 0)
                .collect();
            let mut order: Vec<usize> = (0..recs.len()).collect();
            let mut x = seed;
            for k in (1..order.len()).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(k, (x >> 33) as usize % (k + 1));
            }
            let rec = |t: &mut Topology, (inc, ver): (u64, u32)| {
                let peer = t.intern(nm(7));
                let r = LocalRecord {
                    peer,
                    incarnation: inc,
                    base: 0,
                    version: ver,
                    nickname: Some("p".into()),
                    addrs: None,
                    add: vec![],
                    del: vec![],
                    sig: crate::sign::Sig::NONE,
                    key: None,
                };
                let out = t.apply(r, usize::MAX, |_, _, _| true);
                if inc > MAX_INCARNATION || ver > MAX_VERSION {
                    proptest::prop_assert!(matches!(out, Applied::Refused | Applied::Stale));
                }
                Ok(())
            };
            for &r in &recs {
                rec(&mut a, r)?;
            }
            for &k in &order {
                rec(&mut b, recs[k])?;
            }
            let get = |t: &Topology| t.lookup(nm(7)).and_then(|i| t.get(i)).map(|e| (e.incarnation, e.version));
            proptest::prop_assert_eq!(get(&a), get(&b));
            if let Some((i, v)) = get(&a) {
                proptest::prop_assert!(i <= MAX_INCARNATION && v <= MAX_VERSION);
            }
        }
    }
}
