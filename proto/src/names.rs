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
//! - **Single writer.** Only peer P creates, changes or deletes P's entries.
//!   Every local change takes the next value of P's version counter, so P's
//!   versions are totally ordered in time.
//! - **Merge.** For one key the higher `(version, tombstone)` wins (at equal
//!   versions a tombstone wins, which only matters for corrupted input). This
//!   is a join on a per-key lattice, hence commutative, associative and
//!   idempotent; [`GossipData::merge`] returns the entries that won (and
//!   nothing when there were none), which is what stops the flood.
//! - **Deletes are tombstones**, so that an older add that arrives late by
//!   another path cannot bring a deleted name back.
//! - **Purging tombstones** is the owner's decision: [`NameTable::purge`]
//!   drops our own tombstones older than a grace period
//!   ([`DEFAULT_GRACE`], ten minutes: far longer than gossip needs to reach
//!   everyone) and raises our *floor*, the version at or below which none of
//!   our tombstones are kept any more. The floor travels with our entries;
//!   every peer that learns it drops our tombstones at or below it and
//!   ignores such tombstones arriving afterwards. Everyone therefore forgets
//!   the same tombstones and digests agree again.
//! - **The owner heals.** If one of our own entries comes back to us live
//!   while we do not hold it live (a stale copy after its tombstone was
//!   purged, or our state from before a restart without persisted state), we
//!   answer with a fresh tombstone at a higher version, which wins
//!   everywhere; our version counter jumps past any version of ours we see.
//! - **Dead peers.** [`NameTable::drop_peer`] removes everything of a peer
//!   the topology has garbage-collected.
//!
//! Wire format (gossip payloads): one format byte ([`FORMAT`]), then postcard
//! of a list of `(peer, floor, entries)` groups. Persisted form
//! ([`NameTable::persist`]): one byte [`PERSIST_FORMAT`], then postcard of
//! the same groups plus our version counter. Every decoder checks lengths
//! and names and returns an error for malformed input, never panics.
//!
//! Outputs are values: [`NameTable::take_delta`] hands the encoded changes
//! of our own entries since the last call to the driver, which passes them
//! to `Gossip::channel_broadcast`.

use crate::gossip::digest::mix;
use crate::gossip::GossipData;
use crate::name::PeerName;
use crate::sign::KeyBook;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Format byte of gossip payloads of the `dns` channel.
pub const FORMAT: u8 = 1;
/// Format byte of the persisted table.
pub const PERSIST_FORMAT: u8 = 1;
/// The gossip channel's name.
pub const CHANNEL: &str = "dns";
/// Longest container id accepted.
pub const MAX_CONTAINER: usize = 128;
/// Longest DNS name accepted (without the trailing dot).
pub const MAX_NAME: usize = 253;
/// Largest payload or persisted table accepted.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// How long our own tombstones are kept before [`NameTable::purge`] drops
/// them.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// A caller's mistake in a name or container id.
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

#[derive(Debug, Clone, Copy, Default)]
struct PeerState {
    /// Highest version of this peer seen (for us: our counter).
    max: u64,
    /// Tombstones at or below this version are forgotten.
    floor: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WireEntry {
    container: String,
    addr: Ipv4Addr,
    name: String,
    version: u64,
    tombstone: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WirePeer {
    peer: PeerName,
    floor: u64,
    entries: Vec<WireEntry>,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    counter: u64,
    peers: Vec<WirePeer>,
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

/// The mesh-wide name table (see the module documentation).
#[derive(Debug, Clone)]
pub struct NameTable {
    me: PeerName,
    entries: BTreeMap<Key, Val>,
    peers: BTreeMap<PeerName, PeerState>,
    /// Our own tombstones and when we first saw them as such (`None` until
    /// the next [`NameTable::purge`] after a restore or a heal).
    deleted_at: BTreeMap<Key, Option<Instant>>,
    /// Our versions up to this were handed out by [`NameTable::take_delta`].
    sent: u64,
    /// Our floor as of the last [`NameTable::take_delta`].
    floor_sent: u64,
    generation: u64,
    grace: Duration,
}

impl NameTable {
    /// An empty table owned by peer `me`.
    pub fn new(me: PeerName) -> NameTable {
        NameTable {
            me,
            entries: BTreeMap::new(),
            peers: BTreeMap::new(),
            deleted_at: BTreeMap::new(),
            sent: 0,
            floor_sent: 0,
            generation: 0,
            grace: DEFAULT_GRACE,
        }
    }

    /// Change how long our tombstones are kept (default [`DEFAULT_GRACE`]).
    pub fn with_grace(mut self, grace: Duration) -> NameTable {
        self.grace = grace;
        self
    }

    /// The owning peer.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// A counter that changes whenever the live entries may have changed
    /// (for the driver to rebuild its DNS snapshot).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn next_version(&mut self) -> u64 {
        let st = self.peers.entry(self.me).or_default();
        st.max += 1;
        st.max
    }

    fn write_own(&mut self, key: Key, tombstone: bool) {
        let version = self.next_version();
        if tombstone {
            self.deleted_at.insert(key.clone(), None);
        } else {
            self.deleted_at.remove(&key);
        }
        self.entries.insert(key, Val { version, tombstone });
        self.generation += 1;
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
        if matches!(self.entries.get(&key), Some(v) if !v.tombstone) {
            return Ok(false);
        }
        self.write_own(key, false);
        Ok(true)
    }

    /// Delete our entries of `container`, narrowed to one address and/or
    /// one name when given. Returns how many entries were deleted.
    pub fn remove(&mut self, container: &str, addr: Option<Ipv4Addr>, name: Option<&str>) -> usize {
        let name = name.map(|n| n.to_ascii_lowercase());
        let doomed: Vec<Key> = self
            .entries
            .iter()
            .filter(|(k, v)| {
                !v.tombstone
                    && k.peer == self.me
                    && k.container == container
                    && addr.is_none_or(|a| a == k.addr)
                    && name.as_deref().is_none_or(|n| n == k.name)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let n = doomed.len();
        for k in doomed {
            self.write_own(k, true);
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
            .iter()
            .filter(|(k, v)| !v.tombstone && k.peer == self.me && k.addr == addr)
            .map(|(k, _)| k.clone())
            .collect();
        let n = doomed.len();
        for k in doomed {
            self.write_own(k, true);
        }
        n
    }

    /// Forget everything of `peer` (after the topology garbage-collected
    /// it). Returns whether anything was removed.
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

    /// Drop our tombstones older than the grace period and raise our floor,
    /// so that every peer drops them too. Call it now and then (every
    /// minute is plenty); the raised floor goes out with the next
    /// [`NameTable::take_delta`].
    pub fn purge(&mut self, now: Instant) -> usize {
        let mut floor = self.peers.get(&self.me).map_or(0, |s| s.floor);
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
            if let Some(v) = self.entries.remove(key) {
                floor = floor.max(v.version);
            }
        }
        if !purged.is_empty() {
            self.set_floor(self.me, floor);
        }
        purged.len()
    }

    /// Raise `peer`'s floor and drop its tombstones at or below it.
    fn set_floor(&mut self, peer: PeerName, floor: u64) -> bool {
        let st = self.peers.entry(peer).or_default();
        if floor <= st.floor {
            return false;
        }
        st.floor = floor;
        st.max = st.max.max(floor);
        self.entries
            .retain(|k, v| !(k.peer == peer && v.tombstone && v.version <= floor));
        if peer == self.me {
            self.deleted_at
                .retain(|k, _| self.entries.get(k).is_some_and(|v| v.tombstone));
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
            .filter(|(_, v)| !v.tombstone)
            .map(|(k, v)| Entry {
                peer: k.peer,
                container: &k.container,
                addr: k.addr,
                name: &k.name,
                version: v.version,
            })
    }

    /// How many tombstones are held.
    pub fn tombstones(&self) -> usize {
        self.entries.values().filter(|v| v.tombstone).count()
    }

    /// Our changes since the last call, encoded for
    /// `Gossip::channel_broadcast`; `None` when there were none.
    pub fn take_delta(&mut self) -> Option<Vec<u8>> {
        let st = self.peers.get(&self.me).copied().unwrap_or_default();
        if st.max <= self.sent && st.floor <= self.floor_sent {
            return None;
        }
        let entries: Vec<WireEntry> = self
            .entries
            .range(Self::peer_range(self.me))
            .filter(|(_, v)| v.version > self.sent)
            .map(|(k, v)| wire_entry(k, v))
            .collect();
        self.sent = st.max;
        self.floor_sent = st.floor;
        Some(encode_payload(&[WirePeer {
            peer: self.me,
            floor: st.floor,
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

    fn groups(&self) -> Vec<WirePeer> {
        let mut out: Vec<WirePeer> = Vec::new();
        let mut peers: BTreeSet<PeerName> = self.peers.keys().copied().collect();
        peers.extend(self.entries.keys().map(|k| k.peer));
        for peer in peers {
            let entries: Vec<WireEntry> = self
                .entries
                .range(Self::peer_range(peer))
                .take_while(|(k, _)| k.peer == peer)
                .map(|(k, v)| wire_entry(k, v))
                .collect();
            let floor = self.peers.get(&peer).map_or(0, |s| s.floor);
            if entries.is_empty() && floor == 0 {
                continue;
            }
            out.push(WirePeer {
                peer,
                floor,
                entries,
            });
        }
        out
    }

    /// The whole table with our version counter, for the data directory.
    pub fn persist(&self) -> Vec<u8> {
        let p = Persisted {
            counter: self.peers.get(&self.me).map_or(0, |s| s.max),
            peers: self.groups(),
        };
        let mut out = vec![PERSIST_FORMAT];
        out.extend(postcard::to_allocvec(&p).unwrap_or_default());
        out
    }

    /// A table from [`NameTable::persist`] output, owned by `me`.
    pub fn restore(me: PeerName, bytes: &[u8]) -> Result<NameTable, DecodeError> {
        let (&fmt, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
        if fmt != PERSIST_FORMAT {
            return Err(DecodeError::Format(fmt));
        }
        if bytes.len() > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let p: Persisted = from_bytes_exact(body)?;
        validate(&p.peers)?;
        let mut t = NameTable::new(me);
        for g in p.peers {
            let st = t.peers.entry(g.peer).or_default();
            st.floor = g.floor;
            st.max = st.max.max(g.floor);
            for e in g.entries {
                st.max = st.max.max(e.version);
                let key = Key {
                    peer: g.peer,
                    container: e.container,
                    addr: e.addr,
                    name: e.name,
                };
                if g.peer == me && e.tombstone {
                    t.deleted_at.insert(key.clone(), None);
                }
                t.entries.insert(
                    key,
                    Val {
                        version: e.version,
                        tombstone: e.tombstone,
                    },
                );
            }
        }
        let st = t.peers.entry(me).or_default();
        st.max = st.max.max(p.counter);
        // Everything restored is "sent": the mesh learns it by anti-entropy.
        t.sent = st.max;
        t.floor_sent = st.floor;
        t.generation = 1;
        Ok(t)
    }

    /// Merge decoded groups; returns the groups of what was new to us.
    fn merge_groups(&mut self, groups: Vec<WirePeer>) -> Vec<WirePeer> {
        let mut out = Vec::new();
        for g in groups {
            let old_floor = self.peers.get(&g.peer).map_or(0, |s| s.floor);
            let mut fresh = Vec::new();
            for e in g.entries {
                let incoming = Val {
                    version: e.version,
                    tombstone: e.tombstone,
                };
                let key = Key {
                    peer: g.peer,
                    container: e.container,
                    addr: e.addr,
                    name: e.name,
                };
                let held = self.entries.get(&key).copied();
                if held.is_some_and(|h| h >= incoming) {
                    continue;
                }
                let st = self.peers.entry(g.peer).or_default();
                st.max = st.max.max(incoming.version);
                if g.peer == self.me {
                    self.heal_own(key, held, incoming);
                    continue;
                }
                if incoming.tombstone && incoming.version <= old_floor {
                    // Already forgotten everywhere; only its effect remains.
                    if self.entries.remove(&key).is_some() {
                        self.generation += 1;
                    }
                    continue;
                }
                self.entries.insert(key.clone(), incoming);
                self.generation += 1;
                fresh.push(wire_entry(&key, &incoming));
            }
            let raised = g.floor > old_floor && self.set_floor(g.peer, g.floor);
            if raised {
                self.generation += 1;
            }
            if !fresh.is_empty() || raised {
                out.push(WirePeer {
                    peer: g.peer,
                    floor: self.peers.get(&g.peer).map_or(0, |s| s.floor),
                    entries: fresh,
                });
            }
        }
        out
    }

    /// One of our own entries came back newer than what we hold: we are
    /// the authority, so we re-assert our state at a higher version (it
    /// goes out with the next delta).
    fn heal_own(&mut self, key: Key, held: Option<Val>, incoming: Val) {
        let live_here = held.is_some_and(|h| !h.tombstone);
        if live_here {
            self.write_own(key, false);
        } else if !incoming.tombstone {
            self.write_own(key, true);
        } else {
            self.deleted_at.insert(key.clone(), None);
            self.entries.insert(key, incoming);
        }
    }
}

fn wire_entry(k: &Key, v: &Val) -> WireEntry {
    WireEntry {
        container: k.container.clone(),
        addr: k.addr,
        name: k.name.clone(),
        version: v.version,
        tombstone: v.tombstone,
    }
}

/// Cut a payload into payloads of about `max` bytes: each carries some
/// entries of some peers (and their floors), which merge on their own.
fn split_payload(payload: Vec<u8>, max: usize) -> Vec<Vec<u8>> {
    let Ok(groups) = decode_payload(&payload) else {
        return vec![payload];
    };
    let mut flat: Vec<(PeerName, u64, WireEntry)> = Vec::new();
    let mut floors_only = Vec::new();
    for g in groups {
        if g.entries.is_empty() {
            floors_only.push(g);
            continue;
        }
        for e in g.entries {
            flat.push((g.peer, g.floor, e));
        }
    }
    let size = |(_, _, e): &(PeerName, u64, WireEntry)| e.container.len() + e.name.len() + 40;
    let mut out: Vec<Vec<u8>> = crate::gossip::chunks(flat, max, 64, size)
        .into_iter()
        .map(|run| {
            let mut groups: Vec<WirePeer> = Vec::new();
            for (peer, floor, e) in run {
                match groups.last_mut() {
                    Some(g) if g.peer == peer => g.entries.push(e),
                    _ => groups.push(WirePeer {
                        peer,
                        floor,
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
        for e in &g.entries {
            check_container(&e.container)?;
            if normalize_name(&e.name)? != e.name {
                return Err(NameError::BadName(e.name.clone()).into());
            }
        }
    }
    Ok(())
}

/// Decode a gossip payload of the `dns` channel.
fn decode_payload(payload: &[u8]) -> Result<Vec<WirePeer>, DecodeError> {
    let (&fmt, body) = payload.split_first().ok_or(DecodeError::Empty)?;
    if fmt != FORMAT {
        return Err(DecodeError::Format(fmt));
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge(payload.len()));
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

impl GossipData for NameTable {
    fn encode(&self) -> Vec<u8> {
        encode_payload(&self.groups())
    }

    fn merge(&mut self, payload: &[u8], keys: &mut KeyBook) -> Result<Option<Vec<u8>>, String> {
        let _ = keys;
        let groups = decode_payload(payload).map_err(|e| e.to_string())?;
        let out = self.merge_groups(groups);
        Ok((!out.is_empty()).then(|| encode_payload(&out)))
    }

    fn split(&self, payload: Vec<u8>, max: usize) -> Vec<Vec<u8>> {
        split_payload(payload, max)
    }

    fn digest(&self) -> u64 {
        let mut h = 0u64;
        for (k, v) in &self.entries {
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
    use proptest::prelude::*;

    fn pn(i: u8) -> PeerName {
        PeerName([2, 0, 0, 0, 0, i])
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
        let mut t = NameTable::new(pn(1));
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
        let mut other = NameTable::new(pn(2));
        for p in &parts {
            assert!(p.len() <= 60_000, "part of {} bytes", p.len());
            other.merge(p, &mut crate::sign::KeyBook::new()).unwrap();
        }
        assert_eq!(other.digest(), t.digest());
        assert_eq!(other.lookup("name-9"), t.lookup("name-9"));
    }

    #[test]
    fn add_lookup_reverse_remove() {
        let mut t = NameTable::new(pn(1));
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
        let mut a = NameTable::new(pn(1));
        let mut b = NameTable::new(pn(2));
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
        let mut a = NameTable::new(pn(1));
        let mut c = NameTable::new(pn(3));
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
        let mut a = NameTable::new(pn(1)).with_grace(Duration::from_secs(10));
        let mut b = NameTable::new(pn(2));
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
        let mut a = NameTable::new(pn(1));
        let mut b = NameTable::new(pn(2));
        for i in 0..5 {
            a.add("c1", ip(i), "web").unwrap();
        }
        sync(&mut b, &a);
        // a restarts with nothing and re-adds one container.
        let mut a = NameTable::new(pn(1));
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
        let mut a = NameTable::new(pn(1));
        let mut b = NameTable::new(pn(2));
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
        let mut a = NameTable::new(pn(1));
        let mut b = NameTable::new(pn(2));
        b.add("x", ip(7), "other").unwrap();
        sync(&mut a, &b);
        a.add("c1", ip(1), "web").unwrap();
        a.add("c2", ip(2), "db").unwrap();
        a.remove_container("c2");
        let bytes = a.persist();
        assert_eq!(bytes[0], PERSIST_FORMAT);
        let mut r = NameTable::restore(pn(1), &bytes).unwrap();
        assert_eq!(r.digest(), a.digest());
        assert_eq!(r.encode(), a.encode());
        assert!(r.take_delta().is_none());
        r.add("c3", ip(3), "new").unwrap();
        b.merge(&r.take_delta().unwrap(), &mut crate::sign::KeyBook::new())
            .unwrap();
        assert_eq!(b.lookup("new"), vec![ip(3)]);
        assert!(NameTable::restore(pn(1), &[]).is_err());
        assert!(NameTable::restore(pn(1), &[9, 0]).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(NameTable::restore(pn(1), &trailing).is_err());
    }

    #[test]
    fn rejects_invalid_entries() {
        let g = vec![WirePeer {
            peer: pn(5),
            floor: 0,
            entries: vec![WireEntry {
                container: "c".into(),
                addr: ip(1),
                name: "UPPER".into(),
                version: 1,
                tombstone: false,
            }],
        }];
        let mut t = NameTable::new(pn(1));
        assert!(t
            .merge(&encode_payload(&g), &mut crate::sign::KeyBook::new())
            .is_err());
        assert_eq!(t.entries().count(), 0);
    }

    #[test]
    fn shared_handle_is_the_same_table() {
        let h = SharedNameTable::new(NameTable::new(pn(1)));
        let mut boxed: Box<dyn GossipData> = Box::new(h.clone());
        let mut b = NameTable::new(pn(2));
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
        let mut w: Vec<NameTable> = (0..3).map(|i| NameTable::new(pn(i + 10))).collect();
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
        let mut t = NameTable::new(pn(1));
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
            let mut mid = NameTable::new(pn(1));
            let mut far = NameTable::new(pn(2));
            for p in &ps {
                if let Some(relay) = mid.merge(p, &mut crate::sign::KeyBook::new()).unwrap() {
                    far.merge(&relay, &mut crate::sign::KeyBook::new()).unwrap();
                }
            }
            prop_assert_eq!(mid.digest(), far.digest());
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut t = NameTable::new(pn(1));
            let _ = t.merge(&bytes, &mut crate::sign::KeyBook::new());
            let mut b = bytes.clone();
            b.insert(0, FORMAT);
            let _ = t.merge(&b, &mut crate::sign::KeyBook::new());
            let _ = NameTable::restore(pn(1), &bytes);
            b[0] = PERSIST_FORMAT;
            let _ = NameTable::restore(pn(1), &b);
        }

        #[test]
        fn truncated_payloads_are_errors(ops in proptest::collection::vec(op(), 1..20), cut in any::<prop::sample::Index>()) {
            let ps = payloads(&ops);
            let mut w = NameTable::new(pn(1));
            for p in &ps { w.merge(p, &mut crate::sign::KeyBook::new()).unwrap(); }
            let full = w.encode();
            let n = cut.index(full.len());
            let mut t = NameTable::new(pn(3));
            if n < full.len() {
                prop_assert!(t.merge(&full[..n], &mut crate::sign::KeyBook::new()).is_err() || n == full.len());
            }
        }
    }
}
