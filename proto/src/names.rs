//! The name table: which container answers to which DNS name, mesh-wide.
//!
//! A sans-IO CRDT carried by the gossip channel `dns` (it implements
//! [`GossipData`]). Each entry says "peer P's container C has address A
//! and is called N"; its key is the whole tuple `(peer, container, address,
//! name)` — a container may carry several names (`mesh dns-add -h`) and
//! several addresses — and its value is a version and a tombstone flag.
//!
//! Invariants and rules:
//!
//! - **Single writer, signed.** Only peer P creates, changes or deletes P's
//!   entries, and P signs each one (Ed25519, domain [`ENTRY_DOMAIN`], over
//!   the peer, the key tuple, the version and the tombstone flag). P's
//!   public key travels with every group of P's entries, so any receiver,
//!   however far along a relay chain, verifies each entry before merging it
//!   and pins the key in its [`KeyBook`]; a relay cannot alter what it
//!   passes on. A payload with one entry or floor that does not verify
//!   (forged, another peer's key, a second key for a pinned name) is refused
//!   whole with an error and changes nothing. Per-entry signatures are what
//!   survives deltas, [`GossipData::split`] and partial merges: any subset
//!   of a peer's entries is still verifiable on its own.
//! - **Checked versions.** Every local change takes the next value of P's
//!   version counter (steps of one), so P's versions are totally ordered in
//!   time. Versions live in `1..=`[`MAX_VERSION`] (2^48: a million changes a
//!   second for nine years); a signed version or floor outside that range
//!   is an impossible value and the payload is refused. Counter arithmetic
//!   is checked: at [`MAX_VERSION`] our own writes fail with
//!   [`NameError::Exhausted`], nothing wraps and nothing panics. Only
//!   entries signed by us move our own counter, so no other peer can push
//!   it.
//! - **Merge.** For one key the higher `(version, tombstone)` wins (at equal
//!   versions a tombstone wins, which only matters for corrupted input). This
//!   is a join on a per-key lattice, hence commutative, associative and
//!   idempotent; [`GossipData::merge`] returns the entries that won (and
//!   nothing when there were none), which is what stops the flood. Entries
//!   we already hold at that version or newer are skipped unverified: a
//!   repeated full state costs no signature checks.
//! - **Deletes are tombstones**, so that an older add that arrives late by
//!   another path cannot bring a deleted name back.
//! - **Purging tombstones** is the owner's decision: [`NameTable::purge`]
//!   drops our own tombstones older than a grace period
//!   ([`DEFAULT_GRACE`], ten minutes: far longer than gossip needs to reach
//!   everyone) and raises our *floor*, the version at or below which none of
//!   our tombstones are kept any more. The floor is signed (domain
//!   [`FLOOR_DOMAIN`]) and travels with our entries; every peer that learns
//!   it drops our tombstones at or below it and ignores such tombstones
//!   arriving afterwards. Everyone therefore forgets the same tombstones and
//!   digests agree again.
//! - **The owner heals.** If one of our own entries, signed by us, comes
//!   back to us live while we do not hold it live (a stale copy after its
//!   tombstone was purged, or our state from before a restart without
//!   persisted state), we answer with a fresh tombstone one step above the
//!   highest version of ours we have seen, which wins everywhere.
//! - **Bounds** ([`Limits`]): at most `per_peer` entries (live and
//!   tombstones) of one peer, entries of at most `peers` other peers, and at
//!   most `entries` entries of other peers in all. Entries beyond a limit
//!   are refused (not merged, not verified, counted, and reported by
//!   [`NameTable::take_refusals`]) while the rest of the payload merges:
//!   an honest relay may forward another peer's flood, so it is not cut
//!   off for it. Our own entries count against `per_peer` only, so a flood
//!   cannot stop us naming our containers.
//! - **Dead peers.** [`NameTable::drop_peer`] removes everything of a peer
//!   the topology has garbage-collected, its key included.
//!
//! Wire format (gossip payloads, [`FORMAT`] 2): one format byte, then
//! postcard of a list of groups `(peer, public key, floor, floor signature,
//! entries)`, each entry `(container, address, name, version, tombstone,
//! signature)`. Persisted form ([`NameTable::persist`], [`PERSIST_FORMAT`]
//! 2): one format byte, then postcard of our version counter and our own
//! group only (other peers' entries come back by gossip, verified). A
//! format-1 file (unsigned) is migrated on [`NameTable::restore`]: our own
//! entries are kept and signed afresh, other peers' are dropped. Every
//! decoder checks lengths, names and versions and returns an error for
//! malformed input, never panics.
//!
//! Outputs are values: [`NameTable::take_delta`] hands the encoded changes
//! of our own entries since the last call to the driver, which passes them
//! to `Gossip::channel_broadcast`.

use crate::gossip::digest::mix;
use crate::gossip::GossipData;
use crate::name::PeerName;
use crate::sign::{Identity, KeyBook, KeyError, PublicKey, Sig};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Format byte of gossip payloads of the `dns` channel (2: signed).
pub const FORMAT: u8 = 2;
/// Format byte of the persisted table (2: signed, our own entries only).
pub const PERSIST_FORMAT: u8 = 2;
/// The unsigned persisted format of earlier versions, migrated on restore.
pub const PERSIST_FORMAT_V1: u8 = 1;
/// The gossip channel's name.
pub const CHANNEL: &str = "dns";
/// Longest container id accepted.
pub const MAX_CONTAINER: usize = 128;
/// Longest DNS name accepted (without the trailing dot).
pub const MAX_NAME: usize = 253;
/// Largest payload or persisted table accepted.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Highest version (and floor) any peer may sign: 2^48. A writer that
/// takes one step per change cannot get there (a million changes a second
/// for nine years); anything above is refused, and our own counter stops
/// there instead of wrapping.
pub const MAX_VERSION: u64 = 1 << 48;
/// Signature domain of an entry.
pub const ENTRY_DOMAIN: &[u8] = b"mesh/names/entry/v1";
/// Signature domain of a floor.
pub const FLOOR_DOMAIN: &[u8] = b"mesh/names/floor/v1";
/// How long our own tombstones are kept before [`NameTable::purge`] drops
/// them.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// How much of other peers' data the table holds (see the module
/// documentation). Memory and `names.bin` follow from these: an entry takes
/// at most about 470 bytes on the wire (a 128-byte container id, a
/// 253-byte name, a 64-byte signature) and 600 in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Entries (live and tombstones) of one peer, ours included.
    pub per_peer: usize,
    /// Other peers with entries or a floor here.
    pub peers: usize,
    /// Entries of other peers, in all.
    pub entries: usize,
}

impl Limits {
    /// The defaults: 4,096 entries per peer, 1,024 other peers, 65,536
    /// entries of other peers in all: at most ~36 MB of memory with the
    /// longest names (~17 MB with 64-character container ids and
    /// 20-character names), and a full state of at most ~31 MB on the wire
    /// (sent in parts).
    pub const DEFAULT: Limits = Limits {
        per_peer: 4096,
        peers: 1024,
        entries: 64 * 1024,
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}

/// A caller's mistake in a name or container id, or a local limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not a DNS name: labels of 1–63 letters, digits, `-` or `_`, at most
    /// 253 characters, optionally ending with a dot.
    #[error(
        "invalid DNS name {0:?}: expected labels of letters, digits, '-' or '_' separated by dots"
    )]
    BadName(String),
    /// Empty or longer than [`MAX_CONTAINER`].
    #[error("invalid container id {0:?}")]
    BadContainer(String),
    /// We already hold [`Limits::per_peer`] entries of our own.
    #[error("this peer already has {0} DNS entries (live and recently deleted), the limit")]
    Full(usize),
    /// Our version counter reached [`MAX_VERSION`].
    #[error("the name table's version counter is exhausted")]
    Exhausted,
}

/// Why a payload or persisted table was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Empty input.
    #[error("empty name-table payload")]
    Empty,
    /// A format byte this version does not know.
    #[error("unknown name-table format {0}")]
    Format(u8),
    /// Larger than [`MAX_PAYLOAD`].
    #[error("name-table payload of {0} bytes is too large")]
    TooLarge(usize),
    /// postcard could not decode it, or bytes were left over.
    #[error("malformed name-table payload: {0}")]
    Malformed(String),
    /// A decoded entry holds an invalid name or container id.
    #[error("invalid entry in name-table payload: {0}")]
    Invalid(#[from] NameError),
    /// A version or floor of 0 (for a version) or above [`MAX_VERSION`].
    #[error("peer {peer} signed version {version}, outside 1..={MAX_VERSION}")]
    Version {
        /// The writer.
        peer: PeerName,
        /// The value.
        version: u64,
    },
    /// A signature that does not verify, or a key that is not the peer's.
    #[error("refused entries of peer {peer}: {reason}")]
    Signature {
        /// The peer the data claims to be of.
        peer: PeerName,
        /// Why.
        reason: String,
    },
    /// A persisted table written by another peer.
    #[error("the name table was written by peer {found}, not by this peer ({me}); move it aside")]
    NotOurs {
        /// This peer.
        me: PeerName,
        /// The writer of the file.
        found: PeerName,
    },
}

/// Lowercase and check a DNS name (a label like `web` or a FQDN like
/// `web.mesh.local.`).
pub fn normalize_name(name: &str) -> Result<String, NameError> {
    let bad = || NameError::BadName(name.to_string());
    let body = name.strip_suffix('.').unwrap_or(name);
    if body.is_empty() || body.len() > MAX_NAME {
        return Err(bad());
    }
    for label in body.split('.') {
        if label.is_empty()
            || label.len() > 63
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad());
        }
    }
    Ok(name.to_ascii_lowercase())
}

fn check_container(container: &str) -> Result<(), NameError> {
    if container.is_empty() || container.len() > MAX_CONTAINER {
        return Err(NameError::BadContainer(container.to_string()));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    peer: PeerName,
    container: String,
    addr: Ipv4Addr,
    name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Val {
    version: u64,
    tombstone: bool,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    val: Val,
    /// The owner's signature of the key and `val`.
    sig: Sig,
}

#[derive(Debug, Clone, Copy)]
struct PeerState {
    /// The peer's public key (ours for us).
    key: PublicKey,
    /// Highest version of this peer seen (for us: our counter).
    max: u64,
    /// Tombstones at or below this version are forgotten.
    floor: u64,
    /// The owner's signature of `floor` (unused while it is 0).
    floor_sig: Sig,
}

impl PeerState {
    fn new(key: PublicKey) -> PeerState {
        PeerState {
            key,
            max: 0,
            floor: 0,
            floor_sig: Sig::NONE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WireEntry {
    container: String,
    addr: Ipv4Addr,
    name: String,
    version: u64,
    tombstone: bool,
    sig: Sig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WirePeer {
    peer: PeerName,
    key: PublicKey,
    floor: u64,
    floor_sig: Sig,
    entries: Vec<WireEntry>,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    counter: u64,
    own: WirePeer,
}

/// The unsigned format 1, for migration.
#[derive(Deserialize)]
struct PersistedV1 {
    counter: u64,
    peers: Vec<WirePeerV1>,
}

#[derive(Deserialize)]
struct WirePeerV1 {
    peer: PeerName,
    floor: u64,
    entries: Vec<WireEntryV1>,
}

#[derive(Deserialize)]
struct WireEntryV1 {
    container: String,
    addr: Ipv4Addr,
    name: String,
    version: u64,
    tombstone: bool,
}

/// What an entry's signature covers.
fn entry_msg(peer: PeerName, container: &str, addr: Ipv4Addr, name: &str, val: Val) -> Vec<u8> {
    let mut m = Vec::with_capacity(6 + 8 + 1 + 4 + 2 + container.len() + name.len());
    m.extend_from_slice(&peer.0);
    m.extend_from_slice(&val.version.to_be_bytes());
    m.push(val.tombstone as u8);
    m.extend_from_slice(&addr.octets());
    // Both lengths are checked (at most 253) before anything is signed or
    // verified; one byte each keeps the fields apart.
    m.push(container.len().min(255) as u8);
    m.extend_from_slice(container.as_bytes());
    m.push(name.len().min(255) as u8);
    m.extend_from_slice(name.as_bytes());
    m
}

/// What a floor's signature covers.
fn floor_msg(peer: PeerName, floor: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(14);
    m.extend_from_slice(&peer.0);
    m.extend_from_slice(&floor.to_be_bytes());
    m
}

fn sign_entry(id: &Identity, key: &Key, val: Val) -> Sig {
    id.sign(
        ENTRY_DOMAIN,
        &entry_msg(key.peer, &key.container, key.addr, &key.name, val),
    )
}

/// A live entry, for status and lookups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The peer whose container it is.
    pub peer: PeerName,
    /// The container id.
    pub container: &'a str,
    /// The container's address.
    pub addr: Ipv4Addr,
    /// The name (lowercase label or FQDN).
    pub name: &'a str,
    /// The owner's version of this entry.
    pub version: u64,
}

/// Entries refused for a limit (or our own that could not be healed) since
/// the last [`NameTable::take_refusals`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusals {
    /// How many.
    pub count: u64,
    /// The last reason.
    pub last: String,
}

/// The mesh-wide name table (see the module documentation).
#[derive(Debug, Clone)]
pub struct NameTable {
    id: Identity,
    me: PeerName,
    entries: BTreeMap<Key, Held>,
    peers: BTreeMap<PeerName, PeerState>,
    /// Our own tombstones and when we first saw them as such (`None` until
    /// the next [`NameTable::purge`] after a restore or a heal).
    deleted_at: BTreeMap<Key, Option<Instant>>,
    /// Our versions up to this were handed out by [`NameTable::take_delta`].
    sent: u64,
    /// Our floor as of the last [`NameTable::take_delta`].
    floor_sent: u64,
    generation: u64,
    /// Moves whenever our own entries or floor change (what
    /// [`NameTable::persist`] saves).
    own_generation: u64,
    grace: Duration,
    limits: Limits,
    refused: u64,
    refused_last: String,
    /// Our own entries coming back live are kept, not tombstoned (after
    /// our saved entries were lost: see [`NameTable::set_adopting`]).
    adopting: bool,
}

impl NameTable {
    /// An empty table owned by the peer of identity `id`, which signs our
    /// entries.
    pub fn new(id: Identity) -> NameTable {
        let me = id.name();
        let mut peers = BTreeMap::new();
        peers.insert(me, PeerState::new(id.public()));
        NameTable {
            id,
            me,
            entries: BTreeMap::new(),
            peers,
            deleted_at: BTreeMap::new(),
            sent: 0,
            floor_sent: 0,
            generation: 0,
            own_generation: 0,
            grace: DEFAULT_GRACE,
            limits: Limits::DEFAULT,
            refused: 0,
            refused_last: String::new(),
            adopting: false,
        }
    }

    /// While on, an entry of ours that comes back live (signed by us, held
    /// by a peer) is re-asserted live rather than tombstoned: for a daemon
    /// whose saved entries were lost, which takes the peers' word until it
    /// reconciles them with its containers and turns this off.
    pub fn set_adopting(&mut self, on: bool) {
        self.adopting = on;
    }

    /// Change how long our tombstones are kept (default [`DEFAULT_GRACE`]).
    pub fn with_grace(mut self, grace: Duration) -> NameTable {
        self.grace = grace;
        self
    }

    /// Change the limits (default [`Limits::DEFAULT`]); applies to what
    /// arrives from now on.
    pub fn with_limits(mut self, limits: Limits) -> NameTable {
        self.limits = limits;
        self
    }

    /// The owning peer.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A counter that changes whenever the live entries may have changed
    /// (for the driver to rebuild its DNS snapshot).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A counter that changes whenever our own entries or floor may have
    /// changed (for the driver to save them; other peers' changes leave it
    /// alone, so a flood of theirs writes nothing to disk).
    pub fn own_generation(&self) -> u64 {
        self.own_generation
    }

    /// Our version counter: the highest version of ours written or seen.
    pub fn counter(&self) -> u64 {
        self.own().max
    }

    /// Entries refused since the last call (for the driver to log), if any.
    pub fn take_refusals(&mut self) -> Option<Refusals> {
        if self.refused == 0 {
            return None;
        }
        let r = Refusals {
            count: self.refused,
            last: std::mem::take(&mut self.refused_last),
        };
        self.refused = 0;
        Some(r)
    }

    fn refuse(&mut self, n: u64, why: impl FnOnce() -> String) {
        if n > 0 {
            self.refused = self.refused.saturating_add(n);
            self.refused_last = why();
        }
    }

    fn own(&self) -> PeerState {
        self.peers
            .get(&self.me)
            .copied()
            .unwrap_or_else(|| PeerState::new(self.id.public()))
    }

    fn own_mut(&mut self) -> &mut PeerState {
        let key = self.id.public();
        self.peers
            .entry(self.me)
            .or_insert_with(|| PeerState::new(key))
    }

    /// The next version of ours: one step up, never past [`MAX_VERSION`].
    fn next_version(&mut self) -> Result<u64, NameError> {
        let st = self.own_mut();
        let v = st
            .max
            .checked_add(1)
            .filter(|v| *v <= MAX_VERSION)
            .ok_or(NameError::Exhausted)?;
        st.max = v;
        Ok(v)
    }

    fn write_own(&mut self, key: Key, tombstone: bool) -> Result<(), NameError> {
        let version = self.next_version()?;
        if tombstone {
            self.deleted_at.insert(key.clone(), None);
        } else {
            self.deleted_at.remove(&key);
        }
        let val = Val { version, tombstone };
        let sig = sign_entry(&self.id, &key, val);
        self.entries.insert(key, Held { val, sig });
        self.generation += 1;
        self.own_generation += 1;
        Ok(())
    }

    /// How many entries (live and tombstones) of `peer` are held.
    fn count(&self, peer: PeerName) -> usize {
        self.entries
            .range(Self::peer_range(peer))
            .take_while(|(k, _)| k.peer == peer)
            .count()
    }

    /// Name our container `container` at `addr`. Returns whether this was a
    /// change (false when the entry was already live).
    pub fn add(&mut self, container: &str, addr: Ipv4Addr, name: &str) -> Result<bool, NameError> {
        check_container(container)?;
        let name = normalize_name(name)?;
        let key = Key {
            peer: self.me,
            container: container.to_string(),
            addr,
            name,
        };
        match self.entries.get(&key) {
            Some(h) if !h.val.tombstone => return Ok(false),
            Some(_) => {}
            None => {
                if self.count(self.me) >= self.limits.per_peer {
                    return Err(NameError::Full(self.limits.per_peer));
                }
            }
        }
        self.write_own(key, false)?;
        Ok(true)
    }

    /// Delete our entries of `container`, narrowed to one address and/or
    /// one name when given. Returns how many entries were deleted (fewer
    /// than matched only when our version counter is exhausted).
    pub fn remove(&mut self, container: &str, addr: Option<Ipv4Addr>, name: Option<&str>) -> usize {
        let name = name.map(|n| n.to_ascii_lowercase());
        let doomed: Vec<Key> = self
            .entries
            .range(Self::peer_range(self.me))
            .take_while(|(k, _)| k.peer == self.me)
            .filter(|(k, h)| {
                !h.val.tombstone
                    && k.container == container
                    && addr.is_none_or(|a| a == k.addr)
                    && name.as_deref().is_none_or(|n| n == k.name)
            })
            .map(|(k, _)| k.clone())
            .collect();
        self.tombstone_all(doomed)
    }

    fn tombstone_all(&mut self, doomed: Vec<Key>) -> usize {
        let mut n = 0;
        for k in doomed {
            if self.write_own(k, true).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Delete all our entries of `container`.
    pub fn remove_container(&mut self, container: &str) -> usize {
        self.remove(container, None, None)
    }

    /// Delete every entry of our own whose address is `addr` (any
    /// container). Returns how many.
    pub fn remove_addr(&mut self, addr: Ipv4Addr) -> usize {
        let doomed: Vec<Key> = self
            .entries
            .range(Self::peer_range(self.me))
            .take_while(|(k, _)| k.peer == self.me)
            .filter(|(k, h)| !h.val.tombstone && k.addr == addr)
            .map(|(k, _)| k.clone())
            .collect();
        self.tombstone_all(doomed)
    }

    /// Forget everything of `peer`, its key included (after the topology
    /// garbage-collected it). Returns whether anything was removed.
    pub fn drop_peer(&mut self, peer: PeerName) -> bool {
        if peer == self.me {
            return false;
        }
        let before = self.entries.len();
        self.entries.retain(|k, _| k.peer != peer);
        let had = self.peers.remove(&peer).is_some();
        let changed = before != self.entries.len();
        if changed {
            self.generation += 1;
        }
        changed || had
    }

    /// The peers that own entries (live or tombstones).
    pub fn peers(&self) -> BTreeSet<PeerName> {
        self.entries.keys().map(|k| k.peer).collect()
    }

    /// The other peers we hold anything of (entries or a floor).
    pub fn holders(&self) -> impl Iterator<Item = PeerName> + '_ {
        self.peers.keys().copied().filter(move |p| *p != self.me)
    }

    /// How many entries (live and tombstones) are held, ours included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entries at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drop our tombstones older than the grace period and raise our floor,
    /// so that every peer drops them too. Call it now and then (every
    /// minute is plenty); the raised floor goes out with the next
    /// [`NameTable::take_delta`].
    pub fn purge(&mut self, now: Instant) -> usize {
        let mut floor = self.own().floor;
        let mut purged = Vec::new();
        for (key, at) in self.deleted_at.iter_mut() {
            match at {
                None => *at = Some(now),
                Some(t) if now.saturating_duration_since(*t) >= self.grace => {
                    purged.push(key.clone())
                }
                Some(_) => {}
            }
        }
        for key in &purged {
            self.deleted_at.remove(key);
            if let Some(h) = self.entries.remove(key) {
                floor = floor.max(h.val.version);
            }
        }
        if !purged.is_empty() {
            let sig = self.id.sign(FLOOR_DOMAIN, &floor_msg(self.me, floor));
            self.set_floor(self.me, floor, sig);
        }
        purged.len()
    }

    /// Raise `peer`'s floor and drop its tombstones at or below it.
    fn set_floor(&mut self, peer: PeerName, floor: u64, sig: Sig) -> bool {
        let Some(st) = self.peers.get_mut(&peer) else {
            return false;
        };
        if floor <= st.floor {
            return false;
        }
        st.floor = floor;
        st.floor_sig = sig;
        st.max = st.max.max(floor);
        self.entries
            .retain(|k, h| !(k.peer == peer && h.val.tombstone && h.val.version <= floor));
        if peer == self.me {
            self.deleted_at
                .retain(|k, _| self.entries.get(k).is_some_and(|h| h.val.tombstone));
            self.own_generation += 1;
        }
        true
    }

    /// The addresses answering to `name` (exact, case-insensitive), sorted.
    pub fn lookup(&self, name: &str) -> Vec<Ipv4Addr> {
        let name = name.to_ascii_lowercase();
        let set: BTreeSet<Ipv4Addr> = self
            .entries()
            .filter(|e| e.name == name)
            .map(|e| e.addr)
            .collect();
        set.into_iter().collect()
    }

    /// The names of `addr`, sorted.
    pub fn reverse(&self, addr: Ipv4Addr) -> Vec<String> {
        let set: BTreeSet<&str> = self
            .entries()
            .filter(|e| e.addr == addr)
            .map(|e| e.name)
            .collect();
        set.into_iter().map(str::to_string).collect()
    }

    /// The live entries, ordered by peer, container, address, name.
    pub fn entries(&self) -> impl Iterator<Item = Entry<'_>> + '_ {
        self.entries
            .iter()
            .filter(|(_, h)| !h.val.tombstone)
            .map(|(k, h)| Entry {
                peer: k.peer,
                container: &k.container,
                addr: k.addr,
                name: &k.name,
                version: h.val.version,
            })
    }

    /// How many tombstones are held.
    pub fn tombstones(&self) -> usize {
        self.entries.values().filter(|h| h.val.tombstone).count()
    }

    /// Our changes since the last call, encoded for
    /// `Gossip::channel_broadcast`; `None` when there were none.
    pub fn take_delta(&mut self) -> Option<Vec<u8>> {
        let st = self.own();
        if st.max <= self.sent && st.floor <= self.floor_sent {
            return None;
        }
        let entries: Vec<WireEntry> = self
            .entries
            .range(Self::peer_range(self.me))
            .take_while(|(k, _)| k.peer == self.me)
            .filter(|(_, h)| h.val.version > self.sent)
            .map(|(k, h)| wire_entry(k, h))
            .collect();
        self.sent = st.max;
        self.floor_sent = st.floor;
        Some(encode_payload(&[WirePeer {
            peer: self.me,
            key: st.key,
            floor: st.floor,
            floor_sig: st.floor_sig,
            entries,
        }]))
    }

    fn peer_range(peer: PeerName) -> std::ops::RangeFrom<Key> {
        Key {
            peer,
            container: String::new(),
            addr: Ipv4Addr::UNSPECIFIED,
            name: String::new(),
        }..
    }

    fn group(&self, peer: PeerName, st: &PeerState) -> WirePeer {
        WirePeer {
            peer,
            key: st.key,
            floor: st.floor,
            floor_sig: st.floor_sig,
            entries: self
                .entries
                .range(Self::peer_range(peer))
                .take_while(|(k, _)| k.peer == peer)
                .map(|(k, h)| wire_entry(k, h))
                .collect(),
        }
    }

    fn groups(&self) -> Vec<WirePeer> {
        self.peers
            .iter()
            .map(|(p, st)| self.group(*p, st))
            .filter(|g| !g.entries.is_empty() || g.floor > 0)
            .collect()
    }

    /// Our own entries and version counter, for the data directory (other
    /// peers' entries come back by gossip). At most [`Limits::per_peer`]
    /// entries (plus, briefly, healed ones): about 1.9 MB at the default
    /// limit with the longest names, ~0.6 MB with typical ones.
    pub fn persist(&self) -> Vec<u8> {
        let st = self.own();
        let p = Persisted {
            counter: st.max,
            own: self.group(self.me, &st),
        };
        let mut out = vec![PERSIST_FORMAT];
        out.extend(postcard::to_allocvec(&p).unwrap_or_default());
        out
    }

    /// A table from [`NameTable::persist`] output, owned by `id`. Our own
    /// signatures are checked (a file of another peer, or one altered, is
    /// an error). A format-1 file is migrated: our own entries are kept and
    /// signed now, other peers' dropped.
    pub fn restore(id: Identity, bytes: &[u8]) -> Result<NameTable, DecodeError> {
        let (&fmt, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
        if bytes.len() > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let mut t = NameTable::new(id);
        let me = t.me;
        let key = t.id.public();
        let (counter, own) = match fmt {
            PERSIST_FORMAT => {
                let p: Persisted = from_bytes_exact(body)?;
                if p.own.peer != me || p.own.key != key {
                    return Err(DecodeError::NotOurs {
                        me,
                        found: p.own.peer,
                    });
                }
                validate(std::slice::from_ref(&p.own))?;
                verify_group(&p.own, Some(key), &mut KeyBook::new(), true)?;
                (p.counter, p.own)
            }
            PERSIST_FORMAT_V1 => {
                let p: PersistedV1 = from_bytes_exact(body)?;
                let mut own = WirePeer {
                    peer: me,
                    key,
                    floor: 0,
                    floor_sig: Sig::NONE,
                    entries: Vec::new(),
                };
                for g in p.peers.into_iter().filter(|g| g.peer == me) {
                    own.floor = g.floor;
                    own.floor_sig = t.id.sign(FLOOR_DOMAIN, &floor_msg(me, g.floor));
                    for e in g.entries {
                        let k = Key {
                            peer: me,
                            container: e.container,
                            addr: e.addr,
                            name: e.name,
                        };
                        let val = Val {
                            version: e.version,
                            tombstone: e.tombstone,
                        };
                        let sig = sign_entry(&t.id, &k, val);
                        own.entries.push(wire_entry(&k, &Held { val, sig }));
                    }
                }
                validate(std::slice::from_ref(&own))?;
                (p.counter, own)
            }
            other => return Err(DecodeError::Format(other)),
        };
        if counter > MAX_VERSION {
            return Err(DecodeError::Version {
                peer: me,
                version: counter,
            });
        }
        let st = t.own_mut();
        st.floor = own.floor;
        st.floor_sig = own.floor_sig;
        st.max = counter.max(own.floor);
        for e in own.entries {
            let val = Val {
                version: e.version,
                tombstone: e.tombstone,
            };
            let k = Key {
                peer: me,
                container: e.container,
                addr: e.addr,
                name: e.name,
            };
            if val.tombstone {
                t.deleted_at.insert(k.clone(), None);
            }
            let st = t.own_mut();
            st.max = st.max.max(val.version);
            t.entries.insert(k, Held { val, sig: e.sig });
        }
        // Everything restored is "sent": the mesh learns it by anti-entropy.
        let st = t.own();
        t.sent = st.max;
        t.floor_sent = st.floor;
        t.generation = 1;
        t.own_generation = 1;
        Ok(t)
    }

    /// Choose what of `groups` to merge: entries newer than ours, within
    /// the limits (the rest is counted as refused). Nothing changes yet.
    fn select(&mut self, groups: Vec<WirePeer>) -> Result<Vec<WirePeer>, DecodeError> {
        let own_count = self.count(self.me);
        let mut foreign = self.entries.len().saturating_sub(own_count);
        let mut others = self.peers.len().saturating_sub(1);
        let mut refused = 0u64;
        let mut why = String::new();
        let mut plan = Vec::new();
        for mut g in groups {
            let known = self.peers.get(&g.peer).copied();
            if g.peer == self.me && g.key != self.id.public() {
                return Err(DecodeError::Signature {
                    peer: g.peer,
                    reason: "not our key".into(),
                });
            }
            if let Some(st) = known {
                if st.key != g.key {
                    return Err(DecodeError::Signature {
                        peer: g.peer,
                        reason: format!(
                            "key {} differs from the key {} it signed with before",
                            g.key.fingerprint(),
                            st.key.fingerprint()
                        ),
                    });
                }
            }
            let old_floor = known.map_or(0, |s| s.floor);
            let raises = g.floor > old_floor;
            let entries = std::mem::take(&mut g.entries);
            let fresh: Vec<WireEntry> = entries
                .into_iter()
                .filter(|e| {
                    let incoming = Val {
                        version: e.version,
                        tombstone: e.tombstone,
                    };
                    match self.entries.get(&wire_key(g.peer, e)) {
                        Some(h) => h.val < incoming,
                        // A tombstone under the floor of something we do
                        // not hold has no effect left.
                        None => !(e.tombstone && e.version <= old_floor),
                    }
                })
                .collect();
            if fresh.is_empty() && !raises {
                continue;
            }
            let ours = g.peer == self.me;
            if known.is_none() && !ours {
                if others >= self.limits.peers {
                    refused += fresh.len().max(1) as u64;
                    why = format!(
                        "entries of {} other peers held, the limit: peer {} refused",
                        self.limits.peers, g.peer
                    );
                    continue;
                }
                others += 1;
            }
            let mut n = self.count(g.peer);
            for e in fresh {
                let new_key = !self.entries.contains_key(&wire_key(g.peer, &e));
                // Our own entries coming back are healed, whatever the
                // count: each is one we signed.
                if new_key && !ours {
                    if n >= self.limits.per_peer {
                        refused += 1;
                        why = format!(
                            "{} entries of peer {} held, the limit",
                            self.limits.per_peer, g.peer
                        );
                        continue;
                    }
                    if foreign >= self.limits.entries {
                        refused += 1;
                        why = format!(
                            "{} entries of other peers held, the limit",
                            self.limits.entries
                        );
                        continue;
                    }
                    n += 1;
                    foreign += 1;
                }
                g.entries.push(e);
            }
            if !raises {
                g.floor = old_floor;
            }
            if g.entries.is_empty() && !raises {
                continue;
            }
            plan.push(g);
        }
        self.refuse(refused, || why);
        Ok(plan)
    }

    /// Merge verified groups; returns the groups of what was new to us.
    fn apply(&mut self, plan: Vec<WirePeer>) -> Vec<WirePeer> {
        let mut out = Vec::new();
        for g in plan {
            let old_floor = {
                let st = self
                    .peers
                    .entry(g.peer)
                    .or_insert_with(|| PeerState::new(g.key));
                st.floor
            };
            let mut fresh = Vec::new();
            for e in g.entries {
                let incoming = Val {
                    version: e.version,
                    tombstone: e.tombstone,
                };
                let key = wire_key(g.peer, &e);
                let held = self.entries.get(&key).copied();
                if held.is_some_and(|h| h.val >= incoming) {
                    continue;
                }
                if let Some(st) = self.peers.get_mut(&g.peer) {
                    st.max = st.max.max(incoming.version);
                }
                let sig = e.sig;
                if g.peer == self.me {
                    self.heal_own(key, held, Held { val: incoming, sig });
                    continue;
                }
                if incoming.tombstone && incoming.version <= old_floor {
                    // Already forgotten everywhere; only its effect remains.
                    if self.entries.remove(&key).is_some() {
                        self.generation += 1;
                    }
                    continue;
                }
                let h = Held { val: incoming, sig };
                self.entries.insert(key.clone(), h);
                self.generation += 1;
                fresh.push(wire_entry(&key, &h));
            }
            let raised = g.floor > old_floor && self.set_floor(g.peer, g.floor, g.floor_sig);
            if raised {
                self.generation += 1;
            }
            if !fresh.is_empty() || raised {
                let st = self.peers.get(&g.peer).copied();
                out.push(WirePeer {
                    peer: g.peer,
                    key: g.key,
                    floor: st.map_or(0, |s| s.floor),
                    floor_sig: st.map_or(Sig::NONE, |s| s.floor_sig),
                    entries: fresh,
                });
            }
        }
        out
    }

    /// One of our own entries, signed by us, came back newer than what we
    /// hold: we are the authority, so we re-assert our state one step above
    /// (it goes out with the next delta).
    fn heal_own(&mut self, key: Key, held: Option<Held>, incoming: Held) {
        let live_here =
            held.is_some_and(|h| !h.val.tombstone) || (self.adopting && !incoming.val.tombstone);
        let r = if live_here {
            self.write_own(key, false)
        } else if !incoming.val.tombstone {
            self.write_own(key, true)
        } else {
            self.deleted_at.insert(key.clone(), None);
            self.entries.insert(key, incoming);
            self.own_generation += 1;
            Ok(())
        };
        if let Err(e) = r {
            self.refuse(1, || format!("could not heal an entry of ours: {e}"));
        }
    }
}

fn wire_key(peer: PeerName, e: &WireEntry) -> Key {
    Key {
        peer,
        container: e.container.clone(),
        addr: e.addr,
        name: e.name.clone(),
    }
}

fn wire_entry(k: &Key, h: &Held) -> WireEntry {
    WireEntry {
        container: k.container.clone(),
        addr: k.addr,
        name: k.name.clone(),
        version: h.val.version,
        tombstone: h.val.tombstone,
        sig: h.sig,
    }
}

/// Check the floor (when `check_floor`) and the entries of `g` against the
/// peer's key: `own` for our own, else the key book (which pins `g.key`
/// once it has signed).
fn verify_group(
    g: &WirePeer,
    own: Option<PublicKey>,
    keys: &mut KeyBook,
    check_floor: bool,
) -> Result<(), DecodeError> {
    let refuse = |e: KeyError| DecodeError::Signature {
        peer: g.peer,
        reason: e.to_string(),
    };
    let mut check = |domain: &[u8], msg: &[u8], sig: &Sig| match own {
        Some(k) if k.verify(domain, msg, sig) => Ok(()),
        Some(_) => Err(refuse(KeyError::BadSignature(g.peer))),
        None => keys
            .verify(g.peer, Some(g.key), domain, msg, sig)
            .map_err(refuse),
    };
    if check_floor && g.floor > 0 {
        check(FLOOR_DOMAIN, &floor_msg(g.peer, g.floor), &g.floor_sig)?;
    }
    for e in &g.entries {
        let val = Val {
            version: e.version,
            tombstone: e.tombstone,
        };
        check(
            ENTRY_DOMAIN,
            &entry_msg(g.peer, &e.container, e.addr, &e.name, val),
            &e.sig,
        )?;
    }
    Ok(())
}

/// Cut a payload into payloads of about `max` bytes: each carries some
/// entries of some peers (with their keys and floors), which merge and
/// verify on their own.
fn split_payload(payload: Vec<u8>, max: usize) -> Vec<Vec<u8>> {
    let Ok(groups) = decode_any(&payload) else {
        return vec![payload];
    };
    type Head = (PeerName, PublicKey, u64, Sig);
    let mut flat: Vec<(Head, bool, WireEntry)> = Vec::new();
    let mut floors_only = Vec::new();
    for g in groups {
        if g.entries.is_empty() {
            floors_only.push(g);
            continue;
        }
        let head = (g.peer, g.key, g.floor, g.floor_sig);
        for (i, e) in g.entries.into_iter().enumerate() {
            flat.push((head, i == 0, e));
        }
    }
    // A group's head (name, key, floor, signature, lengths) is ~120 bytes:
    // counted on a group's first entry, and once per run for a group that
    // goes on from the previous run.
    const HEAD: usize = 120;
    let size = |(_, first, e): &(Head, bool, WireEntry)| {
        e.container.len() + e.name.len() + 40 + 64 + if *first { HEAD } else { 0 }
    };
    let mut out: Vec<Vec<u8>> = crate::gossip::chunks(flat, max, 64 + HEAD, size)
        .into_iter()
        .map(|run| {
            let mut groups: Vec<WirePeer> = Vec::new();
            for ((peer, key, floor, floor_sig), _, e) in run {
                match groups.last_mut() {
                    Some(g) if g.peer == peer => g.entries.push(e),
                    _ => groups.push(WirePeer {
                        peer,
                        key,
                        floor,
                        floor_sig,
                        entries: vec![e],
                    }),
                }
            }
            encode_payload(&groups)
        })
        .collect();
    if !floors_only.is_empty() {
        out.push(encode_payload(&floors_only));
    }
    out
}

fn encode_payload(groups: &[WirePeer]) -> Vec<u8> {
    let mut out = vec![FORMAT];
    out.extend(postcard::to_allocvec(groups).unwrap_or_default());
    out
}

fn from_bytes_exact<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, DecodeError> {
    let (v, rest) =
        postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(v)
}

fn validate(groups: &[WirePeer]) -> Result<(), DecodeError> {
    for g in groups {
        if g.floor > MAX_VERSION {
            return Err(DecodeError::Version {
                peer: g.peer,
                version: g.floor,
            });
        }
        for e in &g.entries {
            check_container(&e.container)?;
            if normalize_name(&e.name)? != e.name {
                return Err(NameError::BadName(e.name.clone()).into());
            }
            if e.version == 0 || e.version > MAX_VERSION {
                return Err(DecodeError::Version {
                    peer: g.peer,
                    version: e.version,
                });
            }
        }
    }
    Ok(())
}

/// Decode a gossip payload of the `dns` channel.
fn decode_payload(payload: &[u8]) -> Result<Vec<WirePeer>, DecodeError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge(payload.len()));
    }
    decode_any(payload)
}

/// Decode a payload of any size (our own full state, to split it).
fn decode_any(payload: &[u8]) -> Result<Vec<WirePeer>, DecodeError> {
    let (&fmt, body) = payload.split_first().ok_or(DecodeError::Empty)?;
    if fmt != FORMAT {
        return Err(DecodeError::Format(fmt));
    }
    let groups: Vec<WirePeer> = from_bytes_exact(body)?;
    validate(&groups)?;
    Ok(groups)
}

fn hash_bytes(h: u64, b: &[u8]) -> u64 {
    // FNV-1a, then mixed: stable across builds and platforms.
    let mut x = h ^ 0xcbf2_9ce4_8422_2325;
    for &c in b {
        x = (x ^ c as u64).wrapping_mul(0x100_0000_01b3);
    }
    mix(x)
}

impl NameTable {
    /// Decode, select within the limits, verify every selected entry and
    /// floor, then merge; a signature that fails refuses the whole payload
    /// before anything changed.
    fn merge_payload(
        &mut self,
        payload: &[u8],
        keys: &mut KeyBook,
    ) -> Result<Vec<WirePeer>, DecodeError> {
        let groups = decode_payload(payload)?;
        let plan = self.select(groups)?;
        let own = self.id.public();
        for g in &plan {
            let own = (g.peer == self.me).then_some(own);
            let old_floor = self.peers.get(&g.peer).map_or(0, |s| s.floor);
            verify_group(g, own, keys, g.floor > old_floor)?;
        }
        Ok(self.apply(plan))
    }
}

impl GossipData for NameTable {
    fn encode(&self) -> Vec<u8> {
        encode_payload(&self.groups())
    }

    fn merge(&mut self, payload: &[u8], keys: &mut KeyBook) -> Result<Option<Vec<u8>>, String> {
        let out = self
            .merge_payload(payload, keys)
            .map_err(|e| e.to_string())?;
        Ok((!out.is_empty()).then(|| encode_payload(&out)))
    }

    fn split(&self, payload: Vec<u8>, max: usize) -> Vec<Vec<u8>> {
        split_payload(payload, max)
    }

    fn digest(&self) -> u64 {
        let mut h = 0u64;
        for (k, held) in &self.entries {
            let v = held.val;
            h = hash_bytes(h, &k.peer.0);
            h = hash_bytes(h, k.container.as_bytes());
            h = hash_bytes(h, &k.addr.octets());
            h = hash_bytes(h, k.name.as_bytes());
            h = mix(h ^ v.version ^ ((v.tombstone as u64) << 63));
        }
        for (p, s) in &self.peers {
            if s.floor > 0 {
                h = hash_bytes(h, &p.0);
                h = mix(h ^ s.floor);
            }
        }
        h
    }
}

/// The name table as a gossip channel and as the driver's, at once.
///
/// `Gossip` owns its channels as `Box<dyn GossipData>`, with no way back to
/// the concrete type, while the driver must call [`NameTable::add`] and
/// friends (our own entries cannot enter through `merge`: they would be
/// taken for stale copies). Register a clone of this handle with
/// `Gossip::add_channel(CHANNEL, Box::new(handle.clone()))` and keep the
/// other. Both are used by the one task that drives gossip, so the lock is
/// never contended nor held across anything but a method call.
#[derive(Debug, Clone)]
pub struct SharedNameTable(std::sync::Arc<std::sync::Mutex<NameTable>>);

impl SharedNameTable {
    /// Share `table`.
    pub fn new(table: NameTable) -> SharedNameTable {
        SharedNameTable(std::sync::Arc::new(std::sync::Mutex::new(table)))
    }

    /// The table, for a call or two (a poisoned lock is taken over: the
    /// table's methods leave it consistent at every return).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, NameTable> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl GossipData for SharedNameTable {
    fn encode(&self) -> Vec<u8> {
        self.lock().encode()
    }
    fn split(&self, payload: Vec<u8>, max: usize) -> Vec<Vec<u8>> {
        split_payload(payload, max)
    }
    fn merge(&mut self, payload: &[u8], keys: &mut KeyBook) -> Result<Option<Vec<u8>>, String> {
        self.lock().merge(payload, keys)
    }
    fn digest(&self) -> u64 {
        self.lock().digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::{KeyBook, PublicKey};
    use proptest::prelude::*;

    fn id(i: u8) -> Identity {
        Identity::from_seed(&[i; 32])
    }
    fn pn(i: u8) -> PeerName {
        id(i).name()
    }
    fn ip(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 0, i)
    }

    /// Merge `from`'s full state into `to`.
    fn sync(to: &mut NameTable, from: &NameTable) -> bool {
        to.merge(&from.encode(), &mut crate::sign::KeyBook::new())
            .unwrap()
            .is_some()
    }

    #[test]
    fn a_large_table_splits_into_parts_that_merge_alone() {
        let big = Limits {
            per_peer: 4096,
            ..Limits::DEFAULT
        };
        let mut t = NameTable::new(id(1)).with_limits(big);
        for i in 0..3000u32 {
            let a = Ipv4Addr::from(0xc613_0000 + i);
            t.add(&format!("{i:064x}"), a, &format!("name-{i}"))
                .unwrap();
        }
        t.remove_container(&format!("{:064x}", 7));
        let whole = t.encode();
        assert!(whole.len() > 200_000);
        let parts = t.split(whole, 60_000);
        assert!(parts.len() > 3);
        let mut other = NameTable::new(id(2)).with_limits(big);
        for p in &parts {
            assert!(p.len() <= 60_000, "part of {} bytes", p.len());
            other.merge(p, &mut crate::sign::KeyBook::new()).unwrap();
        }
        assert_eq!(other.digest(), t.digest());
        assert_eq!(other.lookup("name-9"), t.lookup("name-9"));
    }

    #[test]
    fn add_lookup_reverse_remove() {
        let mut t = NameTable::new(id(1));
        assert!(t.add("c1", ip(1), "Web").unwrap());
        assert!(!t.add("c1", ip(1), "web").unwrap());
        assert!(t.add("c2", ip(2), "web").unwrap());
        assert!(t.add("c2", ip(2), "db.mesh.local.").unwrap());
        assert_eq!(t.lookup("WEB"), vec![ip(1), ip(2)]);
        assert_eq!(t.reverse(ip(2)), vec!["db.mesh.local.", "web"]);
        assert_eq!(t.remove("c2", None, Some("web")), 1);
        assert_eq!(t.lookup("web"), vec![ip(1)]);
        assert_eq!(t.remove_container("c2"), 1);
        assert_eq!(t.entries().count(), 1);
        assert_eq!(t.tombstones(), 2);
        assert!(t.add("c1", ip(1), "bad name").is_err());
        assert!(t.add("", ip(1), "x").is_err());
        assert!(t.add("c", ip(1), &"a".repeat(64)).is_err());
    }

    #[test]
    fn deltas_carry_only_new_changes() {
        let mut a = NameTable::new(id(1));
        let mut b = NameTable::new(id(2));
        assert!(a.take_delta().is_none());
        a.add("c1", ip(1), "web").unwrap();
        let d = a.take_delta().unwrap();
        assert!(a.take_delta().is_none());
        let relayed = b.merge(&d, &mut crate::sign::KeyBook::new()).unwrap();
        assert!(relayed.is_some());
        assert_eq!(b.merge(&d, &mut crate::sign::KeyBook::new()).unwrap(), None);
        assert_eq!(b.lookup("web"), vec![ip(1)]);
        a.remove_container("c1");
        b.merge(&a.take_delta().unwrap(), &mut crate::sign::KeyBook::new())
            .unwrap();
        assert!(b.lookup("web").is_empty());
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.encode(), b.encode());
    }

    #[test]
    fn tombstone_beats_late_add_and_readd_works() {
        let mut a = NameTable::new(id(1));
        let mut c = NameTable::new(id(3));
        a.add("c1", ip(1), "web").unwrap();
        let old_add = a.take_delta().unwrap();
        a.remove_container("c1");
        let del = a.take_delta().unwrap();
        c.merge(&del, &mut crate::sign::KeyBook::new()).unwrap();
        assert_eq!(
            c.merge(&old_add, &mut crate::sign::KeyBook::new()).unwrap(),
            None
        );
        assert!(c.lookup("web").is_empty());
        a.add("c1", ip(1), "web").unwrap();
        c.merge(&a.take_delta().unwrap(), &mut crate::sign::KeyBook::new())
            .unwrap();
        assert_eq!(c.lookup("web"), vec![ip(1)]);
    }

    #[test]
    fn purge_spreads_by_floor_and_owner_heals() {
        let t0 = Instant::now();
        let mut a = NameTable::new(id(1)).with_grace(Duration::from_secs(10));
        let mut b = NameTable::new(id(2));
        a.add("c1", ip(1), "web").unwrap();
        let stale = a.encode();
        a.remove_container("c1");
        sync(&mut b, &a);
        assert_eq!(b.tombstones(), 1);
        assert_eq!(a.purge(t0), 0);
        assert_eq!(a.purge(t0 + Duration::from_secs(5)), 0);
        assert_eq!(a.purge(t0 + Duration::from_secs(11)), 1);
        assert_eq!(a.tombstones(), 0);
        b.merge(&a.take_delta().unwrap(), &mut crate::sign::KeyBook::new())
            .unwrap();
        assert_eq!(b.tombstones(), 0);
        assert_eq!(a.digest(), b.digest());
        // A stale copy of the deleted entry resurfaces at b, then reaches a:
        // a answers with a newer tombstone that wins at b.
        assert!(b
            .merge(&stale, &mut crate::sign::KeyBook::new())
            .unwrap()
            .is_some());
        assert_eq!(b.lookup("web"), vec![ip(1)]);
        sync(&mut a, &b);
        assert!(a.lookup("web").is_empty());
        b.merge(&a.take_delta().unwrap(), &mut crate::sign::KeyBook::new())
            .unwrap();
        assert!(b.lookup("web").is_empty());
    }

    #[test]
    fn restart_without_state_counter_jumps() {
        let mut a = NameTable::new(id(1));
        let mut b = NameTable::new(id(2));
        for i in 0..5 {
            a.add("c1", ip(i), "web").unwrap();
        }
        sync(&mut b, &a);
        // a restarts with nothing and re-adds one container.
        let mut a = NameTable::new(id(1));
        a.add("c9", ip(9), "db").unwrap();
        sync(&mut a, &b);
        assert!(a.lookup("web").is_empty());
        assert_eq!(a.lookup("db"), vec![ip(9)]);
        b.merge(&a.take_delta().unwrap(), &mut crate::sign::KeyBook::new())
            .unwrap();
        assert!(b.lookup("web").is_empty());
        assert_eq!(b.lookup("db"), vec![ip(9)]);
        sync(&mut a, &b);
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn drop_peer_forgets_it() {
        let mut a = NameTable::new(id(1));
        let mut b = NameTable::new(id(2));
        a.add("c1", ip(1), "web").unwrap();
        b.add("c2", ip(2), "web").unwrap();
        sync(&mut b, &a);
        assert_eq!(b.lookup("web").len(), 2);
        let g = b.generation();
        assert!(b.drop_peer(pn(1)));
        assert!(b.generation() > g);
        assert_eq!(b.lookup("web"), vec![ip(2)]);
        assert!(!b.drop_peer(pn(2)));
    }

    #[test]
    fn persist_restore_round_trip() {
        let mut a = NameTable::new(id(1));
        let mut b = NameTable::new(id(2));
        b.add("x", ip(7), "other").unwrap();
        sync(&mut a, &b);
        a.add("c1", ip(1), "web").unwrap();
        a.add("c2", ip(2), "db").unwrap();
        a.remove_container("c2");
        let bytes = a.persist();
        assert_eq!(bytes[0], PERSIST_FORMAT);
        let mut r = NameTable::restore(id(1), &bytes).unwrap();
        // Our own entries only: b's come back by gossip.
        assert!(r.lookup("other").is_empty());
        assert_eq!(r.lookup("web"), vec![ip(1)]);
        assert_eq!(r.tombstones(), 1);
        assert_eq!(r.counter(), a.counter());
        sync(&mut r, &b);
        assert_eq!(r.digest(), a.digest());
        assert_eq!(r.encode(), a.encode());
        assert!(r.take_delta().is_none());
        r.add("c3", ip(3), "new").unwrap();
        b.merge(&r.take_delta().unwrap(), &mut crate::sign::KeyBook::new())
            .unwrap();
        assert_eq!(b.lookup("new"), vec![ip(3)]);
        assert!(NameTable::restore(id(1), &[]).is_err());
        assert!(NameTable::restore(id(1), &[9, 0]).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(NameTable::restore(id(1), &trailing).is_err());
        // Another peer's file, or one altered, is refused.
        assert!(matches!(
            NameTable::restore(id(2), &bytes),
            Err(DecodeError::NotOurs { .. })
        ));
        let mut bad = bytes.clone();
        let at = bad.windows(3).position(|w| w == b"web").unwrap();
        bad[at] = b'x';
        assert!(matches!(
            NameTable::restore(id(1), &bad),
            Err(DecodeError::Signature { .. })
        ));
    }

    #[test]
    fn a_format_1_file_is_migrated_keeping_our_own_entries() {
        type E = (String, Ipv4Addr, String, u64, bool);
        let e =
            |c: &str, a: u8, n: &str, v: u64, t: bool| -> E { (c.into(), ip(a), n.into(), v, t) };
        let v1: (u64, Vec<(PeerName, u64, Vec<E>)>) = (
            9,
            vec![
                (
                    pn(1),
                    3,
                    vec![e("c1", 1, "web", 5, false), e("c2", 2, "db", 7, true)],
                ),
                (pn(4), 0, vec![e("x", 4, "theirs", 2, false)]),
            ],
        );
        let mut bytes = vec![PERSIST_FORMAT_V1];
        bytes.extend(postcard::to_allocvec(&v1).unwrap());
        let mut a = NameTable::restore(id(1), &bytes).unwrap();
        assert_eq!(a.lookup("web"), vec![ip(1)]);
        assert!(a.lookup("theirs").is_empty());
        assert_eq!(a.tombstones(), 1);
        assert_eq!(a.counter(), 9);
        // Signed afresh: another peer verifies and merges them.
        let mut b = NameTable::new(id(2));
        sync(&mut b, &a);
        assert_eq!(b.lookup("web"), vec![ip(1)]);
        a.add("c3", ip(3), "new").unwrap();
        assert_eq!(a.counter(), 10);
        // And the next save is format 2.
        assert_eq!(a.persist()[0], PERSIST_FORMAT);
    }

    #[test]
    fn rejects_invalid_entries() {
        let w = id(5);
        let mut g = signed(&w, 0, &[("c", 1, "web", 1, false)]);
        g.entries[0].name = "UPPER".into();
        let mut t = NameTable::new(id(1));
        assert!(t
            .merge(&encode_payload(&[g]), &mut crate::sign::KeyBook::new())
            .is_err());
        assert_eq!(t.entries().count(), 0);
    }

    /// `who`'s entries `(container, address, name, version, tombstone)` and
    /// floor as `who` signs them, at any version (tests need impossible
    /// ones too).
    fn signed(who: &Identity, floor: u64, es: &[(&str, u8, &str, u64, bool)]) -> WirePeer {
        forged(who.name(), who.public(), who, floor, es)
    }

    /// Entries claimed for `peer` with key `key`, signed by `signer`.
    fn forged(
        peer: PeerName,
        key: PublicKey,
        signer: &Identity,
        floor: u64,
        es: &[(&str, u8, &str, u64, bool)],
    ) -> WirePeer {
        WirePeer {
            peer,
            key,
            floor,
            floor_sig: signer.sign(FLOOR_DOMAIN, &floor_msg(peer, floor)),
            entries: es
                .iter()
                .map(|&(c, a, n, version, tombstone)| {
                    let val = Val { version, tombstone };
                    WireEntry {
                        container: c.into(),
                        addr: ip(a),
                        name: n.into(),
                        version,
                        tombstone,
                        sig: signer.sign(ENTRY_DOMAIN, &entry_msg(peer, c, ip(a), n, val)),
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn forged_entries_in_another_peers_name_are_refused_and_change_nothing() {
        let mallory = id(66);
        let mut h1 = NameTable::new(id(1));
        let mut h2 = NameTable::new(id(2));
        let mut kb1 = KeyBook::new();
        h2.add("c2", ip(2), "web").unwrap();
        h1.merge(&h2.take_delta().unwrap(), &mut kb1).unwrap();
        let before = (h1.digest(), h2.digest(), h2.counter());
        let top = h2.counter() + 1;
        let attempts = [
            // Mallory's key for h2's name.
            forged(
                pn(2),
                mallory.public(),
                &mallory,
                0,
                &[("c9", 9, "evil", top, false)],
            ),
            // h2's key, Mallory's signature.
            forged(
                pn(2),
                id(2).public(),
                &mallory,
                0,
                &[("c9", 9, "evil", top, false)],
            ),
            // h2's entry deleted, at the highest version, unsigned.
            WirePeer {
                entries: vec![WireEntry {
                    sig: Sig::NONE,
                    ..forged(
                        pn(2),
                        id(2).public(),
                        &id(2),
                        0,
                        &[("c2", 2, "web", MAX_VERSION, true)],
                    )
                    .entries[0]
                        .clone()
                }],
                ..forged(pn(2), id(2).public(), &mallory, 0, &[])
            },
            // A floor that would wipe h2's tombstones, signed by Mallory.
            forged(pn(2), id(2).public(), &mallory, MAX_VERSION, &[]),
            // The counter attack of issue 15: u64::MAX in h2's name.
            forged(
                pn(2),
                id(2).public(),
                &mallory,
                0,
                &[("c2", 2, "web", u64::MAX, true)],
            ),
        ];
        for g in attempts {
            // Alone, and next to a valid group of Mallory's own: the whole
            // payload is refused.
            let own = signed(&mallory, 0, &[("m", 66, "mallory", 1, false)]);
            for p in [
                encode_payload(std::slice::from_ref(&g)),
                encode_payload(&[own, g]),
            ] {
                assert!(h1.merge(&p, &mut kb1).is_err());
                assert!(h1.merge(&p, &mut KeyBook::new()).is_err());
                assert!(h2.merge(&p, &mut KeyBook::new()).is_err());
            }
        }
        assert_eq!((h1.digest(), h2.digest(), h2.counter()), before);
        assert!(h1.lookup("evil").is_empty() && h1.lookup("mallory").is_empty());
        assert_eq!(h1.lookup("web"), vec![ip(2)]);
        // The owner still changes its names, and they still reach h1.
        assert_eq!(h2.remove_container("c2"), 1);
        h2.add("c3", ip(3), "web").unwrap();
        h1.merge(&h2.take_delta().unwrap(), &mut kb1).unwrap();
        assert_eq!(h1.lookup("web"), vec![ip(3)]);
        assert_eq!(h1.digest(), h2.digest());
    }

    #[test]
    fn a_relay_cannot_alter_what_it_passes_on() {
        let mut h1 = NameTable::new(id(1));
        let mut h2 = NameTable::new(id(2));
        let mut h3 = NameTable::new(id(3));
        h1.add("c1", ip(1), "web").unwrap();
        let relayed = h2
            .merge(&h1.take_delta().unwrap(), &mut KeyBook::new())
            .unwrap()
            .unwrap();
        // Verified end to end: h3 never met h1.
        let mut tampered = decode_payload(&relayed).unwrap();
        tampered[0].entries[0].addr = ip(66);
        assert!(h3
            .merge(&encode_payload(&tampered), &mut KeyBook::new())
            .is_err());
        let mut tampered = decode_payload(&relayed).unwrap();
        tampered[0].entries[0].tombstone = true;
        assert!(h3
            .merge(&encode_payload(&tampered), &mut KeyBook::new())
            .is_err());
        assert!(h3.is_empty());
        let mut kb3 = KeyBook::new();
        h3.merge(&relayed, &mut kb3).unwrap();
        assert_eq!(h3.lookup("web"), vec![ip(1)]);
        assert_eq!(kb3.get(pn(1)), Some(id(1).public()));
        // Once pinned, another key for h1's name is refused.
        let mut other = decode_payload(&relayed).unwrap();
        other[0].key = id(4).public();
        assert!(h3.merge(&encode_payload(&other), &mut kb3).is_err());
    }

    #[test]
    fn inflated_counters_cannot_wrap_or_lock_the_owner() {
        let mallory = id(66);
        let mut h1 = NameTable::new(id(1));
        let mut h2 = NameTable::new(id(2));
        h2.add("c2", ip(2), "web").unwrap();
        sync(&mut h1, &h2);
        // Mallory's own entries: at the bound they are accepted (its own
        // business), beyond it refused; nothing of h2 moves.
        let ok = signed(&mallory, 0, &[("m", 66, "m", MAX_VERSION, false)]);
        assert!(h1
            .merge(&encode_payload(&[ok]), &mut KeyBook::new())
            .is_ok());
        for v in [0, MAX_VERSION + 1, u64::MAX - 1, u64::MAX] {
            let g = signed(&mallory, 0, &[("m", 66, "m2", v, false)]);
            assert!(matches!(
                h1.merge_payload(&encode_payload(&[g]), &mut KeyBook::new()),
                Err(DecodeError::Version { .. })
            ));
            let g = signed(&mallory, v.max(1), &[]);
            if v > MAX_VERSION {
                assert!(h1
                    .merge(&encode_payload(&[g]), &mut KeyBook::new())
                    .is_err());
            }
        }
        // h2's own counter near the top: the last step succeeds, then writes
        // fail cleanly; nothing wraps, nothing panics.
        h2.own_mut().max = MAX_VERSION - 1;
        assert!(h2.add("c3", ip(3), "db").unwrap());
        assert_eq!(h2.counter(), MAX_VERSION);
        assert_eq!(h2.add("c4", ip(4), "x"), Err(NameError::Exhausted));
        assert_eq!(h2.remove_container("c2"), 0);
        assert_eq!(h2.counter(), MAX_VERSION);
        assert_eq!(h2.lookup("web"), vec![ip(2)]);
        // An entry of ours we do not hold, signed by us at the top: the heal
        // cannot step above it, which is reported, not a panic.
        let stale = signed(&id(2), 0, &[("old", 9, "old", MAX_VERSION, false)]);
        h2.merge(&encode_payload(&[stale]), &mut KeyBook::new())
            .unwrap();
        assert!(h2.take_refusals().is_some());
        assert_eq!(h2.counter(), MAX_VERSION);
    }

    #[test]
    fn an_own_entry_we_lost_is_healed_one_step_above() {
        // h2 restarted without state; a signed copy of an old entry at
        // version 40 comes back: the tombstone is at 41, not further.
        let h2_id = id(2);
        let mut h2 = NameTable::new(h2_id.clone());
        let stale = signed(&h2_id, 0, &[("c", 2, "web", 40, false)]);
        let out = h2
            .merge(
                &encode_payload(std::slice::from_ref(&stale)),
                &mut KeyBook::new(),
            )
            .unwrap();
        assert!(out.is_none());
        assert_eq!(h2.counter(), 41);
        assert!(h2.lookup("web").is_empty());
        let mut h1 = NameTable::new(id(1));
        h1.merge(&encode_payload(&[stale]), &mut KeyBook::new())
            .unwrap();
        assert_eq!(h1.lookup("web"), vec![ip(2)]);
        h1.merge(&h2.take_delta().unwrap(), &mut KeyBook::new())
            .unwrap();
        assert!(h1.lookup("web").is_empty());
    }

    #[test]
    fn an_own_entry_we_lost_is_adopted_while_adopting() {
        // h2 lost names.bin: while adopting, a signed copy of its live
        // entry is taken back (one step above), and spreads as live.
        let h2_id = id(2);
        let mut h2 = NameTable::new(h2_id.clone());
        h2.set_adopting(true);
        let held = signed(&h2_id, 0, &[("c", 2, "web", 40, false)]);
        h2.merge(&encode_payload(&[held]), &mut KeyBook::new())
            .unwrap();
        assert_eq!(h2.counter(), 41);
        assert_eq!(h2.lookup("web"), vec![ip(2)]);
        assert!(h2.own_generation() > 0, "taken back entries are saved");
        h2.set_adopting(false);
        let gone = signed(&h2_id, 0, &[("d", 2, "old", 50, false)]);
        h2.merge(&encode_payload(&[gone]), &mut KeyBook::new())
            .unwrap();
        assert!(h2.lookup("old").is_empty(), "healed as before once off");
        assert_eq!(h2.lookup("web"), vec![ip(2)]);
    }

    #[test]
    fn a_flood_of_entries_for_invented_peers_is_bounded() {
        // Issue 15: 200 messages, 110,000 entries of 2,000 invented peers,
        // every one validly signed by its (invented) key.
        let mut h1 = NameTable::new(id(1));
        h1.add("c1", ip(1), "web").unwrap();
        let mut kb = KeyBook::new();
        let names: Vec<String> = (0..55).map(|i| format!("n{i}")).collect();
        let mut relayed = 0;
        for msg in 0..200u32 {
            let groups: Vec<WirePeer> = (0..10u32)
                .map(|j| {
                    let k = msg * 10 + j;
                    let mut seed = [7u8; 32];
                    seed[..4].copy_from_slice(&k.to_be_bytes());
                    let w = Identity::from_seed(&seed);
                    let es: Vec<(&str, u8, &str, u64, bool)> = names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| ("c", i as u8, n.as_str(), i as u64 + 1, false))
                        .collect();
                    signed(&w, 0, &es)
                })
                .collect();
            if h1
                .merge(&encode_payload(&groups), &mut kb)
                .unwrap()
                .is_some()
            {
                relayed += 1;
            }
        }
        let l = Limits::DEFAULT;
        assert!(h1.len() <= l.entries + 1, "{} entries held", h1.len());
        assert!(h1.peers().len() <= l.peers + 1);
        assert!(relayed > 0);
        let r = h1.take_refusals().unwrap();
        assert!(r.count >= 110_000 - l.entries as u64, "{r:?}");
        // Our own names are unaffected, and names.bin holds only ours.
        let saved = h1.own_generation();
        h1.merge(
            &encode_payload(&[signed(&id(8), 0, &[("c", 8, "z", 1, false)])]),
            &mut kb,
        )
        .unwrap();
        assert_eq!(h1.own_generation(), saved, "others' names are not saved");
        assert!(h1.add("c2", ip(2), "db").unwrap());
        assert!(h1.own_generation() > saved);
        assert!(h1.persist().len() < 1_000);
        // A single peer is held to its own limit; dropping it frees it all.
        let mut h3 = NameTable::new(id(3)).with_limits(Limits {
            per_peer: 100,
            peers: 2,
            entries: 150,
        });
        let w = id(9);
        let names: Vec<String> = (0..300).map(|i| format!("x{i}")).collect();
        let es: Vec<(&str, u8, &str, u64, bool)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| ("c", 1, n.as_str(), i as u64 + 1, false))
            .collect();
        h3.merge(&encode_payload(&[signed(&w, 0, &es)]), &mut KeyBook::new())
            .unwrap();
        assert_eq!(h3.len(), 100);
        let w2 = id(10);
        h3.merge(&encode_payload(&[signed(&w2, 0, &es)]), &mut KeyBook::new())
            .unwrap();
        assert_eq!(h3.len(), 150);
        let w3 = id(11);
        h3.merge(&encode_payload(&[signed(&w3, 0, &es)]), &mut KeyBook::new())
            .unwrap();
        assert_eq!(h3.peers().len(), 2);
        assert!(h3.drop_peer(w.name()));
        assert!(h3.drop_peer(w2.name()));
        assert!(h3.is_empty());
        h3.merge(&encode_payload(&[signed(&w3, 0, &es)]), &mut KeyBook::new())
            .unwrap();
        assert_eq!(h3.len(), 100);
        // Our own: the per-peer limit, then a clear error.
        for i in 0..100 {
            h3.add("c", ip(1), &format!("o{i}")).unwrap();
        }
        assert_eq!(h3.add("c", ip(1), "one-more"), Err(NameError::Full(100)));
    }

    #[test]
    fn shared_handle_is_the_same_table() {
        let h = SharedNameTable::new(NameTable::new(id(1)));
        let mut boxed: Box<dyn GossipData> = Box::new(h.clone());
        let mut b = NameTable::new(id(2));
        b.add("c2", ip(2), "db").unwrap();
        boxed
            .merge(&b.encode(), &mut crate::sign::KeyBook::new())
            .unwrap();
        h.lock().add("c1", ip(1), "web").unwrap();
        assert_eq!(h.lock().lookup("db"), vec![ip(2)]);
        assert_eq!(boxed.digest(), h.lock().digest());
        assert!(h.lock().take_delta().is_some());
    }

    /// A scripted op by writer `w`.
    #[derive(Debug, Clone)]
    enum Op {
        Add(u8, u8, u8, u8),
        Remove(u8, u8),
        Snapshot(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3, 0u8..3, 0u8..3, 0u8..3).prop_map(|(w, c, a, n)| Op::Add(w, c, a, n)),
            (0u8..3, 0u8..3).prop_map(|(w, c)| Op::Remove(w, c)),
            (0u8..3).prop_map(Op::Snapshot),
        ]
    }

    /// Run ops on three writers; return the payloads captured along the
    /// way (full states and deltas).
    fn payloads(ops: &[Op]) -> Vec<Vec<u8>> {
        let mut w: Vec<NameTable> = (0..3).map(|i| NameTable::new(id(i + 10))).collect();
        let mut out = Vec::new();
        for op in ops {
            match *op {
                Op::Add(i, c, a, n) => {
                    let t = &mut w[i as usize];
                    t.add(&format!("c{c}"), ip(a), &format!("n{n}")).unwrap();
                    out.extend(t.take_delta());
                }
                Op::Remove(i, c) => {
                    let t = &mut w[i as usize];
                    t.remove_container(&format!("c{c}"));
                    out.extend(t.take_delta());
                }
                Op::Snapshot(i) => out.push(w[i as usize].encode()),
            }
        }
        out
    }

    fn merged(order: impl Iterator<Item = Vec<u8>>) -> NameTable {
        let mut t = NameTable::new(id(1));
        for p in order {
            t.merge(&p, &mut crate::sign::KeyBook::new()).unwrap();
        }
        t
    }

    proptest! {
        #[test]
        fn merge_is_order_insensitive_and_idempotent(
            ops in proptest::collection::vec(op(), 0..40),
            seed in any::<u64>(),
        ) {
            let ps = payloads(&ops);
            let forward = merged(ps.iter().cloned());
            let backward = merged(ps.iter().rev().cloned());
            let mut shuffled = ps.clone();
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let shuf = merged(shuffled.into_iter());
            prop_assert_eq!(forward.encode(), backward.encode());
            prop_assert_eq!(forward.encode(), shuf.encode());
            prop_assert_eq!(forward.digest(), shuf.digest());
            // Idempotent: merging everything again changes nothing.
            let mut again = forward.clone();
            for p in &ps {
                prop_assert_eq!(again.merge(p, &mut crate::sign::KeyBook::new()).unwrap(), None);
            }
            prop_assert_eq!(again.encode(), forward.encode());
        }

        #[test]
        fn merge_is_associative(ops in proptest::collection::vec(op(), 0..30), cut in 0usize..30) {
            // (x ⊔ y) ⊔ z == x ⊔ (y ⊔ z), with x, y, z tables built from
            // three slices of the payloads.
            let ps = payloads(&ops);
            let a = cut.min(ps.len());
            let b = (a + ps.len()) / 2;
            let x = merged(ps[..a].iter().cloned());
            let y = merged(ps[a..b].iter().cloned());
            let z = merged(ps[b..].iter().cloned());
            let mut xy = x.clone();
            xy.merge(&y.encode(), &mut crate::sign::KeyBook::new()).unwrap();
            xy.merge(&z.encode(), &mut crate::sign::KeyBook::new()).unwrap();
            let mut yz = y.clone();
            yz.merge(&z.encode(), &mut crate::sign::KeyBook::new()).unwrap();
            let mut x_yz = x.clone();
            x_yz.merge(&yz.encode(), &mut crate::sign::KeyBook::new()).unwrap();
            prop_assert_eq!(xy.encode(), x_yz.encode());
        }

        #[test]
        fn relayed_deltas_converge(ops in proptest::collection::vec(op(), 0..40)) {
            // What merge returns is enough for a third peer to catch up.
            let ps = payloads(&ops);
            let mut mid = NameTable::new(id(1));
            let mut far = NameTable::new(id(2));
            for p in &ps {
                if let Some(relay) = mid.merge(p, &mut crate::sign::KeyBook::new()).unwrap() {
                    far.merge(&relay, &mut crate::sign::KeyBook::new()).unwrap();
                }
            }
            prop_assert_eq!(mid.digest(), far.digest());
        }

        #[test]
        fn boundary_versions_merge_the_same_in_any_order(
            picks in proptest::collection::vec((0usize..8, 0usize..8, any::<bool>(), 0u8..3), 1..12),
            floors in any::<bool>(),
            seed in any::<u64>(),
        ) {
            // Versions and floors at 0, 1, MAX-1, MAX, MAX+1, u64::MAX-1,
            // u64::MAX (all validly signed by their writer): accepted iff in
            // range, the same result in any order, idempotent, no panic.
            // Versions compete for a few keys; floors (which make a late
            // add of a key whose tombstone went under the floor new again,
            // until its owner heals it) come with keys of their own.
            const B: [u64; 8] = [0, 1, 2, MAX_VERSION - 1, MAX_VERSION, MAX_VERSION + 1, u64::MAX - 1, u64::MAX];
            let w = id(20);
            let ps: Vec<(bool, Vec<u8>)> = picks
                .iter()
                .enumerate()
                .map(|(i, &(v, f, t, n))| {
                    let (name, floor) = if floors {
                        (format!("f{i}"), B[f])
                    } else {
                        (format!("n{n}"), 0)
                    };
                    let g = signed(&w, floor, &[("c", n, name.as_str(), B[v], t)]);
                    let valid = (1..=MAX_VERSION).contains(&B[v]) && floor <= MAX_VERSION;
                    (valid, encode_payload(&[g]))
                })
                .collect();
            let run = |order: &[(bool, Vec<u8>)]| {
                let mut t = NameTable::new(id(1));
                let mut kb = KeyBook::new();
                for (valid, p) in order {
                    let r = t.merge(p, &mut kb);
                    assert_eq!(r.is_ok(), *valid);
                }
                t
            };
            let fwd = run(&ps);
            let mut rev = ps.clone();
            rev.reverse();
            let bwd = run(&rev);
            let mut shuf = ps.clone();
            let mut s = seed | 1;
            for i in (1..shuf.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuf.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let sh = run(&shuf);
            prop_assert_eq!(fwd.digest(), bwd.digest());
            prop_assert_eq!(fwd.digest(), sh.digest());
            prop_assert_eq!(fwd.encode(), sh.encode());
            let mut again = fwd.clone();
            for (_, p) in &ps {
                if let Ok(r) = again.merge(p, &mut KeyBook::new()) {
                    prop_assert_eq!(r, None);
                }
            }
            prop_assert_eq!(again.digest(), fwd.digest());
            for p in fwd.peers.values() {
                prop_assert!(p.max <= MAX_VERSION && p.floor <= MAX_VERSION);
            }
        }

        #[test]
        fn our_counter_at_its_boundaries(start in prop_oneof![Just(0u64), Just(MAX_VERSION - 1), Just(MAX_VERSION), 0..MAX_VERSION], ops in 1usize..4) {
            // From a counter at 0, MAX-1, MAX or anywhere: each write takes
            // one step or fails with Exhausted; never past MAX, never wraps.
            let mut t = NameTable::new(id(1));
            t.own_mut().max = start;
            for i in 0..ops {
                let before = t.counter();
                let r = t.add("c", ip(i as u8), "web");
                if before < MAX_VERSION {
                    prop_assert_eq!(r, Ok(true));
                    prop_assert_eq!(t.counter(), before + 1);
                } else {
                    prop_assert_eq!(r, Err(NameError::Exhausted));
                    prop_assert_eq!(t.counter(), MAX_VERSION);
                }
                // Another peer's signed copy of our state cannot move us.
                let before = t.counter();
                let mallory = id(66);
                let g = forged(t.me(), t.id.public(), &mallory, 0, &[("c", 9, "x", MAX_VERSION, false)]);
                prop_assert!(t.merge(&encode_payload(&[g]), &mut KeyBook::new()).is_err());
                prop_assert_eq!(t.counter(), before);
            }
        }

        #[test]
        fn limits_hold_at_their_boundaries(
            per_peer in 1usize..5,
            peers in 1usize..4,
            entries in 1usize..9,
            sends in proptest::collection::vec((0u8..5, 0usize..7), 1..10),
        ) {
            // Whatever arrives: no peer above per_peer, no more than `peers`
            // others, no more than `entries` of theirs; below the limits,
            // nothing is refused; a refusal is counted, never an error.
            let l = Limits { per_peer, peers, entries };
            let mut t = NameTable::new(id(1)).with_limits(l);
            let mut kb = KeyBook::new();
            let mut sent: BTreeMap<PeerName, BTreeSet<usize>> = BTreeMap::new();
            for (w, n) in sends {
                let writer = id(30 + w);
                let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
                let es: Vec<(&str, u8, &str, u64, bool)> = names
                    .iter()
                    .enumerate()
                    .map(|(i, nm)| ("c", 1, nm.as_str(), i as u64 + 1, false))
                    .collect();
                prop_assert!(t.merge(&encode_payload(&[signed(&writer, 0, &es)]), &mut kb).is_ok());
                sent.entry(writer.name()).or_default().extend(0..n);
                let held: BTreeMap<PeerName, usize> = t.holders().map(|p| (p, t.count(p))).collect();
                prop_assert!(held.len() <= peers);
                prop_assert!(held.values().all(|&c| c <= per_peer));
                prop_assert!(held.values().sum::<usize>() <= entries);
                let wanted: usize = sent.values().map(|s| s.len().min(per_peer)).sum();
                let fits = sent.len() <= peers && sent.values().map(|s| s.len()).sum::<usize>() <= entries
                    && sent.values().all(|s| s.len() <= per_peer);
                if fits {
                    prop_assert_eq!(held.values().sum::<usize>(), wanted);
                    prop_assert!(t.take_refusals().is_none());
                }
            }
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut t = NameTable::new(id(1));
            let _ = t.merge(&bytes, &mut crate::sign::KeyBook::new());
            let mut b = bytes.clone();
            b.insert(0, FORMAT);
            let _ = t.merge(&b, &mut crate::sign::KeyBook::new());
            let _ = NameTable::restore(id(1), &bytes);
            b[0] = PERSIST_FORMAT;
            let _ = NameTable::restore(id(1), &b);
        }

        #[test]
        fn truncated_payloads_are_errors(ops in proptest::collection::vec(op(), 1..20), cut in any::<prop::sample::Index>()) {
            let ps = payloads(&ops);
            let mut w = NameTable::new(id(1));
            for p in &ps { w.merge(p, &mut crate::sign::KeyBook::new()).unwrap(); }
            let full = w.encode();
            let n = cut.index(full.len());
            let mut t = NameTable::new(id(3));
            if n < full.len() {
                prop_assert!(t.merge(&full[..n], &mut crate::sign::KeyBook::new()).is_err() || n == full.len());
            }
        }
    }
}
