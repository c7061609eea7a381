//! IP address management: Weave's ring, made safe under partitions.
//!
//! [`Ipam`] is a sans-IO core, one per peer. Inputs: `allocate`, `claim`,
//! `release`, `rmpeer`, `leave`, `forget_peer`, [`GossipData::merge`] of what
//! neighbours sent, and [`Ipam::tick`] with the time and the set of peers
//! reachable over the mesh. Outputs: the answers, [`Ipam::take_delta`] (our
//! own changes, to broadcast on the IPAM channel), [`Ipam::persist`] (to
//! write, atomically, whenever [`Ipam::generation`] moved, before anything is
//! sent or answered) and [`Ipam::status`].
//!
//! # The state
//!
//! The channel's state ([`state`]) is one signed record per peer, written
//! only by that peer and verified (Ed25519, with the key book the gossip
//! core passes to [`GossipData::merge`]) before it is merged. The range is
//! split into contiguous *pieces*, each with an owner; who owns what is not
//! written by anyone but derived from the ring, the *grants* in the
//! records (a peer gives space it owns; a grant of space its writer does not
//! own has no effect) and the decided reclaims: the same records give the
//! same pieces everywhere, whatever order they arrived in (see
//! [`state::derive`]). Each record also holds its peer's Paxos acceptor
//! state per instance (`paxos`), so every vote is signed by its voter;
//! its outstanding requests for space, the requests it served, and the
//! addresses it holds (as runs). There is no unicast: every exchange is
//! state that floods.
//!
//! - **Creation.** `Seed` peers compute the ring from the seed list (the
//!   same list gives the same ring everywhere). `Consensus` peers run Paxos
//!   over the records (instance [`state::Instance::Ring`]) once the first
//!   allocation or [`Ipam::prime`] asks for it; the decided list of peers
//!   splits the range evenly. With the default size ([`InitMode::Consensus`]
//!   with `None`), the size counts us and every peer we were told about
//!   ([`Told`]: targets, peers learned, also those learned before a restart),
//!   and grows with what we learn until the ring is decided; a peer with
//!   targets takes no part until a connection reached one of them. So only a
//!   peer told about nobody creates a ring alone.
//! - **Rings that meet.** Two meshes started apart have two rings. A whole
//!   state carries the ring header in every part, so a peer of the other ring
//!   refuses it whole (nothing is mixed in). The meeting is noted once
//!   ([`Ipam::take_notes`]) and listed in [`Ipam::status`] with the fix. A
//!   side that holds no address adopts the other ring (when both hold none,
//!   the larger ring wins): nothing of its own can then be handed out twice. `Observer`s never take part and learn the ring
//!   from the ring header of a whole state, taken once the records show a
//!   quorum of its owners deciding it. A ring has an identity
//!   (range and initial owners); a payload with a different range or ring is
//!   refused by `merge` with an error naming both.
//! - **Allocation** takes the lowest free address of our own pieces inside
//!   the subnet, never the subnet's first or last address, and never an
//!   address another peer's record says it holds (inside that peer's space,
//!   or its heir's: a peer cannot block others' space by claiming to hold
//!   it). When we have none, we write a request naming a donor (a reachable
//!   peer with free space in the subnet, chosen at random weighted by its
//!   free space, as computed from the ring and its held runs); the donor
//!   sees it, gives the upper half of its largest free run by a grant in its
//!   record, and marks the request served.
//! - **Reclaim.** A dead peer's pieces pass to an heir decided by Paxos
//!   (instance [`state::Instance::Reclaim`]), with the current owners of the
//!   ring as voters: a majority of them must accept. An acceptor takes part
//!   only while the dead peer is not reachable from it. `rmpeer` proposes us
//!   as heir; `tick` does so once an owner has been unreachable for
//!   `reclaim_after`. Once decided, the derivation passes the dead peer's
//!   pieces to the heir (after the dead peer's own grants). The decision
//!   is made of the voters' signed records: a member alone cannot decide a
//!   reclaim. Two `rmpeer`s for the same peer are two proposers of one
//!   Paxos instance: one heir.
//!
//! # Why two sides of a partition do not hand out one address twice
//!
//! 1. Two live owners never hold the same piece: a piece changes owner only
//!    by its owner's grant (a donation, a `leave`) or by a decided reclaim,
//!    and a decided reclaim has one heir (Paxos); the derivation is the
//!    same on every peer that holds the same records.
//! 2. A peer allocates from, or donates, its pieces only while it sees at
//!    least half of the ring's owners (itself included) reachable, or within
//!    a lease of `reclaim_after / 2` since it last did. A reclaim needs more
//!    than half of the owners to accept, each of which does not see the dead
//!    peer. A peer that sees at least half cannot be missed by more than
//!    half, so, with reachability roughly symmetric, the owner stops before
//!    its space can be reclaimed: automatically after `reclaim_after`, which
//!    leaves a margin of `reclaim_after / 2` over the lease.
//! 3. The heir does not reuse the addresses the dead peer was known to hold
//!    (its record's held runs), until the peer is forgotten (it owns nothing
//!    and the topology dropped it) or released them.
//! 4. A peer that comes back and finds its pieces reclaimed stops
//!    allocating from them, and [`Ipam::status`] lists each of its claims in
//!    space it no longer owns as a problem.
//!
//! What this cannot cover, and no protocol without a synchronous majority
//! acknowledgement of every allocation could: addresses handed out by a peer
//! that had not yet told anyone (a crash right after an allocation, before
//! gossip; an allocation in the lease window behind a partition) when its
//! space is then reclaimed. `rmpeer` is the user's assertion that the peer
//! is dead with its containers; the automatic reclaim waits `reclaim_after`.
//!
//! # Trust
//!
//! A member that lies can write only its own record. Its grants move only
//! space it owns; its held runs count only in its own space; its votes are
//! one vote; its counters are bounded (see [`state`]), and arithmetic on
//! them is checked or saturating. What it can still do: give its own space
//! to anyone; stall a consensus it takes part in (announce a large
//! consensus size, or compete as a proposer); and equivocate about its own
//! grant history to a peer that never saw the earlier version (a peer that
//! did refuses the rewrite), which can only concern space it owned. A ring
//! met from another mesh is adopted only if its owners' signed records
//! decided it.
//!
//! The Paxos electorate of a reclaim is "the owners of the ring" as each peer
//! sees it; if the set of owners changes (a first donation to a new peer)
//! while a reclaim is running, two peers may count different electorates.
//! The window is small (donations go to peers that ask while running dry) and
//! documented, not closed.

mod drive;
mod paxos;
mod space;
pub mod state;
#[cfg(test)]
mod tests;

use crate::gossip::GossipData;
use crate::name::PeerName;
use crate::sign::{Identity, KeyBook};
use ipnet::Ipv4Net;
use state::{Crdt, Instance, Net, Payload, Record, Ring, Signed};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// What the daemon was told about other peers: the default consensus size
/// counts them (see [`InitMode::Consensus`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Told {
    /// How many connection targets we have (given at launch, persisted, or
    /// added by `mesh connect`), those that are our own address excluded.
    pub targets: usize,
    /// Of those, the ones no connection has reached yet, for messages.
    pub unreached: Vec<String>,
    /// Peers learned by gossip, reachable or not.
    pub peers: BTreeSet<PeerName>,
}

/// Another ring of the same range met on a connection (two meshes that
/// each created their own ring, then were joined).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Meeting {
    /// The other ring's initial owners.
    owners: Vec<PeerName>,
    /// Whether any of its peers was seen holding addresses.
    holds: bool,
    /// When it was last seen (set by `tick`; `None` until then).
    last_seen: Option<Instant>,
    /// Seen again since the last tick.
    fresh: bool,
}

/// A line for the log, said once (see [`Ipam::take_notes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// Another ring was met and stays apart: a warning, with what to do.
    Met(String),
    /// Another ring was adopted (ours held nothing).
    Adopted(String),
    /// A peer sent records we refused (bad signature, counters out of
    /// bounds, rewritten history): a warning.
    Refused(String),
}

/// How many notes wait at most (a member that lies cannot grow this).
const MAX_NOTES: usize = 64;

/// How many other rings we remember (a member that lies cannot grow this).
const MAX_MEETINGS: usize = 8;
/// How long a ring met is reported after it was last seen.
const MEETING_TTL: Duration = Duration::from_secs(120);

/// How a peer takes part in IPAM.
pub struct Config {
    /// The whole range managed by IPAM.
    pub range: Ipv4Net,
    /// The subnet used for `net:default`.
    pub default_subnet: Ipv4Net,
    /// How the ring is created.
    pub init: InitMode,
    /// How long an owner must be unreachable before its space is reclaimed.
    pub reclaim_after: Duration,
}

/// How the ring is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitMode {
    /// Paxos among the first peers; `Some(n)`: among `n` peers. `None`: a
    /// size that counts this peer and every peer it was told about
    /// ([`Told`]: targets, peers learned by gossip, peers whose records it
    /// holds), so a peer that was told about anyone never creates a ring
    /// by itself; the peers adopt the largest size any of them announced.
    Consensus(Option<usize>),
    /// The ring is split among these peers.
    Seed(Vec<PeerName>),
    /// Never create or take part: learn the ring, ask for space.
    Observer,
}

impl std::str::FromStr for InitMode {
    type Err = String;

    /// `consensus[=N]`, `seed=NAME,...` or `observer`, as `--ipalloc-init`
    /// takes them.
    fn from_str(s: &str) -> Result<InitMode, String> {
        if s == "consensus" {
            return Ok(InitMode::Consensus(None));
        }
        if s == "observer" {
            return Ok(InitMode::Observer);
        }
        if let Some(n) = s.strip_prefix("consensus=") {
            return match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(InitMode::Consensus(Some(n))),
                _ => Err(format!(
                    "{s:?}: consensus=N needs a number of peers, 1 or more"
                )),
            };
        }
        if let Some(list) = s.strip_prefix("seed=") {
            let names = list
                .split(',')
                .map(|n| {
                    n.trim().parse::<PeerName>().map_err(|_| {
                        format!("{s:?}: {n:?} is not a peer name (aa:bb:cc:dd:ee:ff, as `mesh launch` prints)")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(InitMode::Seed(names));
        }
        Err(format!(
            "{s:?}: expected consensus, consensus=N, seed=NAME,NAME... or observer"
        ))
    }
}

/// Why an allocation or claim did not succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllocError {
    /// Not now: retry after the next change (the reason says what for).
    Wait(String),
    /// Never: waiting cannot fix it.
    Refused(String),
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllocError::Wait(r) => write!(f, "waiting: {r}"),
            AllocError::Refused(r) => write!(f, "{r}"),
        }
    }
}

impl std::error::Error for AllocError {}

/// What `mesh status ipam` shows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    /// The range.
    pub range: String,
    /// The default subnet.
    pub default_subnet: String,
    /// Whether the ring can be used, or what it waits for.
    pub state: RingState,
    /// Every peer known to IPAM.
    pub peers: Vec<PeerSpace>,
    /// What we are waiting for.
    pub pending: Vec<String>,
    /// What is wrong.
    pub problems: Vec<String>,
}

/// Whether the ring can be used, or what it waits for. Shown (and in
/// `mesh report`, serialized) as a sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RingState {
    /// Allocations can be served.
    Ready,
    /// Ready, but fewer than half of the owners are reachable: allocation
    /// stops when the lease runs out.
    ReadyFewOwners {
        /// Owners reachable, us included.
        seen: usize,
        /// All owners.
        owners: usize,
        /// The lease, `--ipalloc-reclaim-after / 2`.
        lease_secs: u64,
    },
    /// An observer that has not learned the ring yet.
    Observer,
    /// `seed=` with no names.
    EmptySeed,
    /// No ring, and consensus has not started (it does on the first
    /// allocation).
    NotStarted,
    /// Consensus runs or waits: for what.
    Awaiting(String),
}

impl fmt::Display for RingState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingState::Ready => f.write_str("ready"),
            RingState::ReadyFewOwners {
                seen,
                owners,
                lease_secs,
            } => write!(
                f,
                "ready, but only {seen} of {owners} owners are reachable: allocation stops once the lease of {lease_secs}s runs out"
            ),
            RingState::Observer => f.write_str("observer, no ring yet"),
            RingState::EmptySeed => f.write_str("no ring: the seed list is empty"),
            RingState::NotStarted => {
                f.write_str("no ring yet: consensus starts with the first allocation")
            }
            RingState::Awaiting(why) => write!(f, "awaiting consensus ({why})"),
        }
    }
}

impl serde::Serialize for RingState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One peer's share of the ring.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PeerSpace {
    /// The peer's name.
    pub peer: String,
    /// Addresses in its pieces.
    pub owned: u64,
    /// Of those, not held.
    pub free: u64,
    /// Reachable now (we are).
    pub reachable: bool,
}

/// How long an instance of Paxos must show no progress before we propose.
const RETRY: Duration = Duration::from_millis(1000);
/// How long a need for space outlives the last allocation that felt it.
const NEED_TTL: Duration = Duration::from_secs(60);

/// The IPAM core of one peer.
pub struct Ipam {
    id: Identity,
    me: PeerName,
    config: Config,
    range: Net,
    crdt: Crdt,
    /// Our claims: address → container id.
    claims: BTreeMap<u32, String>,
    /// Our claims by id.
    by_id: BTreeMap<String, BTreeSet<u32>>,
    generation: u64,
    dirty_record: bool,
    dirty_ring: bool,
    /// Reachable peers as of the last tick.
    reachable: BTreeSet<PeerName>,
    /// When we last saw at least half of the owners.
    last_quorum: Option<Instant>,
    unreachable_since: BTreeMap<PeerName, Instant>,
    /// The consensus size, once consensus started here.
    consensus_n: Option<usize>,
    /// Instances we propose in.
    proposing: BTreeSet<Instance>,
    /// Per instance: its fingerprint and when it last changed.
    activity: BTreeMap<Instance, (u64, Instant)>,
    /// Subnets in which we lack space, and when an allocation last felt it.
    needs: BTreeMap<Net, Instant>,
    next_seq: u64,
    forgotten: BTreeMap<PeerName, u64>,
    /// Decided instances (derived from the records, never undone).
    decided: BTreeMap<Instance, Vec<PeerName>>,
    /// Addresses other peers hold (derived from their records, clipped to
    /// the space of each peer or of its heir), as disjoint runs: first →
    /// (last, peer).
    foreign_held: BTreeMap<u32, (u32, PeerName)>,
    /// What the daemon was told about other peers.
    told: Told,
    /// Peers learned while there was no ring (persisted).
    learned: BTreeSet<PeerName>,
    /// Other rings met, by ring id.
    meetings: BTreeMap<u64, Meeting>,
    /// Lines for the log, see [`Ipam::take_notes`].
    notes: Vec<Note>,
    rng: u64,
}

/// The format byte of what `persist` writes now. Formats 1 and 2 (before
/// records were signed and ownership moved into grants) are refused with
/// an error that says what to do: their unsigned tokens prove nothing.
const PERSIST_FORMAT: u8 = 3;

/// What `persist` writes ([`PERSIST_FORMAT`]).
#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted {
    state: Payload,
    claims: Vec<(String, u32)>,
    consensus_n: Option<u64>,
    next_seq: u64,
    /// Peers learned while there was no ring: a restarted peer still
    /// counts them in its default consensus size.
    learned: Vec<PeerName>,
}

/// At most this many peers learned are kept (the size only grows with
/// them; past this it is large enough).
const MAX_LEARNED: usize = 10_000;

impl Ipam {
    /// A fresh core, signing with `id` (our name is its name).
    pub fn new(id: Identity, config: Config) -> Ipam {
        let range = Net::from_ipnet(config.range);
        let me = id.name();
        let mut ipam = Ipam {
            id,
            me,
            range,
            crdt: Crdt::new(range),
            claims: BTreeMap::new(),
            by_id: BTreeMap::new(),
            generation: 0,
            dirty_record: false,
            dirty_ring: false,
            reachable: BTreeSet::new(),
            last_quorum: None,
            unreachable_since: BTreeMap::new(),
            consensus_n: None,
            proposing: BTreeSet::new(),
            activity: BTreeMap::new(),
            needs: BTreeMap::new(),
            next_seq: 1,
            forgotten: BTreeMap::new(),
            decided: BTreeMap::new(),
            foreign_held: BTreeMap::new(),
            told: Told::default(),
            learned: BTreeSet::new(),
            meetings: BTreeMap::new(),
            notes: Vec::new(),
            rng: crate::gossip::digest::name_u64(me) ^ 0x2545_f491_4f6c_dd1d,
            config,
        };
        if let InitMode::Seed(seed) = &ipam.config.init {
            let mut owners = seed.clone();
            owners.sort();
            owners.dedup();
            if !owners.is_empty() {
                // A fresh state has no ring: this cannot conflict.
                let _ = ipam.crdt.install_ring(Ring { owners });
                ipam.refresh();
            }
        }
        ipam
    }

    /// Restore from `persist()` bytes (ring, records, own claims); Err on
    /// malformed bytes, another range, a record whose signature does not
    /// verify, or a format written before records were signed.
    pub fn restore(id: Identity, config: Config, bytes: &[u8]) -> Result<Ipam, String> {
        let what = "persisted IPAM state";
        let p = match bytes.first() {
            Some(&PERSIST_FORMAT) if bytes.len() <= state::MAX_PAYLOAD => {
                postcard::from_bytes::<Persisted>(&bytes[1..])
                    .map_err(|e| format!("malformed {what}: {e}"))?
            }
            Some(v @ 1..=2) => {
                return Err(format!(
                    "{what} has format {v}, written by a version of mesh before IPAM records were signed; its ownership cannot be proven to the mesh. Detach this host's containers and `mesh reset` it (or remove the file) to start it afresh"
                ))
            }
            Some(v) => return Err(format!("{what} has unknown format {v}")),
            None => return Err(format!("empty {what}")),
        };
        let state_bytes = p.state.encode();
        // Re-decode to run the payload's checks.
        let mut state =
            Payload::decode(&state_bytes).map_err(|e| format!("persisted IPAM state: {e}"))?;
        let mut ipam = Ipam::new(id, config);
        ipam.crdt
            .check(&state)
            .map_err(|e| format!("persisted IPAM state does not fit this configuration: {e}"))?;
        // Our own record: it must be ours, signed by us.
        let me = ipam.me;
        if let Some(pos) = state.records.iter().position(|s| s.peer == me) {
            let s = state.records.swap_remove(pos);
            let msg = state::record_message(ipam.range, me, &s.record);
            let public = ipam.id.public();
            if s.key != *public.as_bytes() || !public.verify(state::RECORD_DOMAIN, &msg, &s.sig) {
                return Err(format!(
                    "{what} holds a record of this peer that this peer's key did not sign (the identity changed?)"
                ));
            }
            ipam.crdt.records.insert(me, s.record);
            ipam.crdt.sigs.insert(me, (s.key, s.sig));
        }
        if ipam.crdt.ring.is_none() {
            if let Some(r) = state.ring.take() {
                // Our own ring, as we wrote it.
                let _ = ipam.crdt.install_ring(r);
            }
        }
        let mut keys = KeyBook::new();
        let m = ipam
            .crdt
            .merge(state, &mut keys, me)
            .map_err(|e| format!("persisted IPAM state does not fit this configuration: {e}"))?;
        if let Some((peer, why)) = m.refused.first() {
            return Err(format!(
                "{what}: the record of peer {peer} is refused: {why}"
            ));
        }
        let (lo, hi) = ipam.range.bounds();
        for (id, a) in p.claims {
            if a < lo || a > hi {
                return Err(format!(
                    "persisted IPAM claim {} of {id} lies outside the range {}",
                    Ipv4Addr::from(a),
                    ipam.config.range
                ));
            }
            if ipam.claims.insert(a, id.clone()).is_some() {
                return Err(format!(
                    "persisted IPAM claims hold {} twice",
                    Ipv4Addr::from(a)
                ));
            }
            ipam.by_id.entry(id).or_default().insert(a);
        }
        ipam.consensus_n = p.consensus_n.map(|n| n as usize);
        ipam.learned = p.learned.into_iter().take(MAX_LEARNED).collect();
        ipam.next_seq = p.next_seq.max(1);
        ipam.refresh();
        ipam.react();
        ipam.dirty_record = ipam.crdt.records.contains_key(&me);
        Ok(ipam)
    }

    /// Everything to write to disk.
    pub fn persist(&self) -> Vec<u8> {
        let p = Persisted {
            state: self.crdt.payload(),
            claims: self.claims.iter().map(|(a, id)| (id.clone(), *a)).collect(),
            consensus_n: self.consensus_n.map(|n| n as u64),
            next_seq: self.next_seq,
            learned: self.learned.iter().copied().collect(),
        };
        let mut out = vec![PERSIST_FORMAT];
        out.extend(postcard::to_allocvec(&p).unwrap_or_default());
        out
    }

    /// Our public key (what other peers verify our records with).
    pub fn public(&self) -> crate::sign::PublicKey {
        self.id.public()
    }

    /// Increments on every change that must be persisted before anything is
    /// sent or answered.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Our peer name.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// Start consensus on the ring now, rather than on the first allocation.
    pub fn prime(&mut self, _now: Instant) {
        self.start_consensus();
        self.react();
    }

    /// Our own changes since the last call, as a delta for the channel.
    pub fn take_delta(&mut self) -> Option<Vec<u8>> {
        if !self.dirty_record && !self.dirty_ring {
            return None;
        }
        let mut p = Payload {
            range: Some(self.range),
            ..Payload::default()
        };
        if self.dirty_record {
            if let Some(s) = self.crdt.signed(self.me) {
                p.records.push(s);
            }
        }
        // Deltas stay small: the ring header comes only when it was just
        // decided (a whole state carries it in every part, which is what a
        // peer of another ring sees first, on a new connection).
        if self.dirty_ring {
            p.ring = self.crdt.ring.clone();
        }
        self.dirty_record = false;
        self.dirty_ring = false;
        (!p.is_empty()).then(|| p.encode())
    }

    /// Change our own record (bumps its version, signs it). A record at the
    /// largest version cannot change any more (it would take 2^48 changes).
    fn write_record(&mut self, f: impl FnOnce(&mut Record)) {
        let r = self.crdt.records.entry(self.me).or_default();
        let before = r.clone();
        f(r);
        let Some(v) = r
            .version
            .checked_add(1)
            .filter(|v| *v <= state::MAX_VERSION)
        else {
            *r = before;
            return;
        };
        r.version = v;
        let grants_changed = r.grants.len() != before.grants.len();
        let msg = state::record_message(self.range, self.me, r);
        let sig = self.id.sign(state::RECORD_DOMAIN, &msg);
        self.crdt
            .sigs
            .insert(self.me, (*self.id.public().as_bytes(), sig));
        self.dirty_record = true;
        self.generation += 1;
        if grants_changed {
            self.refresh();
        }
    }

    /// Rederive the pieces (from the ring, the grants and the decided
    /// reclaims) and the index of what other peers hold.
    fn refresh(&mut self) {
        let heirs: BTreeMap<PeerName, PeerName> = self
            .decided
            .iter()
            .filter_map(|(i, v)| match (i, v.first()) {
                (Instance::Reclaim(d), Some(h)) => Some((*d, *h)),
                _ => None,
            })
            .collect();
        self.crdt.rederive(&heirs);
        self.reindex_held();
    }

    /// Rebuild the index of what other peers hold: each peer's held runs,
    /// clipped to the pieces of that peer or of its heir (a peer's word
    /// about addresses in someone else's space is not taken), as disjoint
    /// runs. Never expanded address by address.
    fn reindex_held(&mut self) {
        let mut runs: Vec<(u32, u32, PeerName)> = Vec::new();
        for (p, r) in &self.crdt.records {
            if *p == self.me {
                continue;
            }
            let whose = self.eff(*p);
            for (a, b) in r.held_runs() {
                for (_, s, e, t) in self.crdt.pieces_in(a, b) {
                    if self.eff(t.owner) == whose {
                        runs.push((s, e, *p));
                    }
                }
            }
        }
        runs.sort_unstable();
        let mut out: BTreeMap<u32, (u32, PeerName)> = BTreeMap::new();
        let mut cur: Option<(u32, u32, PeerName)> = None;
        for (s, e, p) in runs {
            match &mut cur {
                Some((_, ce, _)) if s as u64 <= *ce as u64 + 1 => *ce = (*ce).max(e),
                _ => {
                    if let Some((cs, ce, cp)) = cur.take() {
                        out.insert(cs, (ce, cp));
                    }
                    cur = Some((s, e, p));
                }
            }
        }
        if let Some((cs, ce, cp)) = cur {
            out.insert(cs, (ce, cp));
        }
        self.foreign_held = out;
    }

    /// The peer another record says holds `a`.
    pub(super) fn held_by_other(&self, a: u32) -> Option<PeerName> {
        self.foreign_held
            .range(..=a)
            .next_back()
            .filter(|(_, (e, _))| *e >= a)
            .map(|(_, (_, p))| *p)
    }

    /// The runs others hold that overlap `[s, e]`, clipped to it.
    pub(super) fn held_runs_in(&self, s: u32, e: u32) -> Vec<(u32, u32)> {
        let from = self
            .foreign_held
            .range(..=s)
            .next_back()
            .map_or(s, |(a, _)| *a);
        self.foreign_held
            .range(from..=e)
            .filter(|(_, (l, _))| *l >= s)
            .map(|(a, (l, _))| ((*a).max(s), (*l).min(e)))
            .collect()
    }

    /// What the daemon was told about other peers (call before `tick`).
    /// While there is no ring, the peers among it are remembered (and
    /// persisted): a restarted peer still counts them.
    pub fn set_told(&mut self, told: Told) {
        if self.crdt.ring.is_none() {
            let before = self.learned.len();
            for p in told.peers.iter().chain(&self.reachable) {
                if self.learned.len() >= MAX_LEARNED {
                    break;
                }
                if *p != self.me {
                    self.learned.insert(*p);
                }
            }
            if self.learned.len() != before {
                self.generation += 1;
            }
        }
        self.told = told;
    }

    /// The ring's initial owners, once there is a ring.
    pub fn ring(&self) -> Option<&[PeerName]> {
        self.crdt.ring.as_ref().map(|r| r.owners.as_slice())
    }

    /// Things worth a line in the log, each said once: another ring met,
    /// another ring adopted.
    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    /// Whether neither we nor any peer of our ring (as far as we know)
    /// holds an address.
    fn holds_nothing(&self) -> bool {
        self.claims.is_empty() && self.crdt.records.values().all(|r| r.held.is_empty())
    }

    /// A payload of another ring of our range (its check failed): remember
    /// the meeting, and adopt the other ring when that is safe, which is
    /// when we hold nothing: no address of ours can then be handed out
    /// twice. When both sides hold nothing, the larger ring (then the
    /// greater id) wins, so that the two do not swap. Returns whether we
    /// adopted it (the caller then merges the payload into the empty state).
    fn meet(&mut self, p: &Payload, keys: &mut KeyBook) -> bool {
        let (Some(ours), Some(theirs)) = (self.crdt.ring.clone(), p.ring.clone()) else {
            return false;
        };
        if p.range != Some(self.range) || ours == theirs {
            return false;
        }
        // Only what the other ring's peers signed counts: their records,
        // verified, and the ring only if a quorum of them decided it.
        let verified: BTreeMap<PeerName, &Record> = p
            .records
            .iter()
            .filter(|s| state::verify(keys, self.range, s).is_ok())
            .map(|s| (s.peer, &s.record))
            .collect();
        let id = theirs.id(self.range);
        let holds = verified.values().any(|r| !r.held.is_empty())
            || self.meetings.get(&id).is_some_and(|m| m.holds);
        let justified = ring_justified(&theirs, verified.iter().map(|(p, r)| (*p, *r)));
        let theirs_wins =
            holds || (theirs.owners.len(), id) > (ours.owners.len(), ours.id(self.range));
        if theirs_wins && justified && self.holds_nothing() {
            self.meetings.remove(&id);
            self.notes.push(Note::Adopted(format!(
                "adopted the address ring created among [{}] (our own ring, created among [{}], held no address)",
                theirs.describe(),
                ours.describe()
            )));
            self.adopt_empty_state();
            return true;
        }
        if !self.meetings.contains_key(&id) {
            if self.meetings.len() >= MAX_MEETINGS {
                let oldest = self
                    .meetings
                    .iter()
                    .filter_map(|(k, m)| m.last_seen.map(|t| (t, *k)))
                    .min()
                    .map(|(_, k)| k);
                if let Some(k) = oldest.or_else(|| self.meetings.keys().next().copied()) {
                    self.meetings.remove(&k);
                }
            }
            self.notes
                .push(Note::Met(meeting_message(&ours, &theirs, self.range)));
        }
        let m = self.meetings.entry(id).or_insert(Meeting {
            owners: theirs.owners.clone(),
            holds: false,
            last_seen: None,
            fresh: true,
        });
        m.holds |= holds;
        m.fresh = true;
        false
    }

    /// Forget our ring (it holds nothing) and start from an empty state:
    /// our record lives on with a greater version, emptied of the old
    /// ring's business.
    fn adopt_empty_state(&mut self) {
        let record = self.crdt.records.remove(&self.me);
        self.crdt = Crdt::new(self.range);
        self.consensus_n = None;
        self.proposing.clear();
        self.activity.clear();
        self.decided.clear();
        self.foreign_held.clear();
        self.unreachable_since.clear();
        self.forgotten.clear();
        self.last_quorum = None;
        self.dirty_ring = false;
        if let Some(mut r) = record {
            r.consensus = 0;
            r.paxos.clear();
            r.requests.clear();
            r.held.clear();
            r.grants.clear();
            self.crdt.records.insert(self.me, r);
            self.write_record(|_| {});
        } else {
            self.generation += 1;
        }
    }

    /// A random number (SplitMix64 over our own state).
    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        crate::gossip::digest::mix(self.rng)
    }
}

impl GossipData for Ipam {
    fn encode(&self) -> Vec<u8> {
        self.crdt.payload().encode()
    }

    /// Tokens (with the ring header) in some parts, records in others;
    /// every part carries the range, so each merges (and is checked) alone.
    fn split(&self, payload: Vec<u8>, max: usize) -> Vec<Vec<u8>> {
        split_payload(payload, max)
    }

    fn merge(&mut self, payload: &[u8], keys: &mut KeyBook) -> Result<Option<Vec<u8>>, String> {
        let mut p = Payload::decode(payload)?;
        if let Err(e) = self.crdt.check(&p) {
            if !self.meet(&p, keys) {
                return Err(e);
            }
        }
        p.records.retain(|s| {
            self.forgotten
                .get(&s.peer)
                .is_none_or(|v| s.record.version > *v)
        });
        let ring = p.ring.take();
        let m = self.crdt.merge(p, keys, self.me)?;
        let mut news = m.news;
        // A ring header is taken only when the records we hold show a
        // quorum of its owners deciding it.
        let mut new_ring = false;
        if let (None, Some(r)) = (&self.crdt.ring, ring) {
            if ring_justified(&r, self.crdt.records.iter().map(|(p, r)| (*p, r)))
                && self.crdt.install_ring(r.clone()).is_ok()
            {
                news.ring = Some(r);
                new_ring = true;
            }
        }
        for (peer, why) in &m.refused {
            if self.notes.len() < MAX_NOTES {
                self.notes.push(Note::Refused(format!(
                    "refused an IPAM record of peer {peer}: {why}"
                )));
            }
        }
        if news.is_empty() {
            return match m.refused.first() {
                Some((peer, why)) => Err(format!("refused the IPAM record of peer {peer}: {why}")),
                None => Ok(None),
            };
        }
        self.generation += 1;
        for (peer, _) in &m.replaced {
            self.forgotten.remove(peer);
        }
        if !m.replaced.is_empty() {
            // A ring met whose owners all gossip in ours now (they adopted
            // it) is no longer a problem.
            let records = &self.crdt.records;
            self.meetings
                .retain(|_, met| !met.owners.iter().all(|o| records.contains_key(o)));
        }
        // The pieces change only with grants (or the ring); the index of
        // what others hold also with held runs.
        let records = &self.crdt.records;
        let grants = m.replaced.iter().any(|(p, old)| {
            let new = records.get(p).map(|r| r.grants.len());
            old.as_ref().map(|r| r.grants.len()) != new && new != Some(0)
        });
        let held = m
            .replaced
            .iter()
            .any(|(p, old)| old.as_ref().map(|r| &r.held) != records.get(p).map(|r| &r.held));
        if new_ring || grants {
            self.refresh();
        } else if held {
            self.reindex_held();
        }
        self.react();
        news.range = Some(self.range);
        Ok(Some(news.encode()))
    }

    fn digest(&self) -> u64 {
        self.crdt.digest()
    }
}

/// What a user is told when another ring of the range is met.
fn meeting_message(ours: &Ring, theirs: &Ring, range: Net) -> String {
    format!(
        "another address ring for {} met: ours was created among [{}], the other among [{}]; the two meshes were started apart, and cannot join while both hold addresses. To join them, free every address on one side (detach or stop its containers, or `mesh reset` its hosts): that side then adopts the other ring by itself",
        state::net_str(range),
        ours.describe(),
        theirs.describe()
    )
}

/// Whether `ring` was decided: a quorum of peers accepted it in their
/// signed records. Counted by value, not by ballot: once a value is chosen,
/// every higher ballot carries it, so the latest accepts of the peers that
/// chose it (which may have moved to a higher ballot since) still name it.
/// The quorum is of the ring's size: the consensus size a voter announces
/// may grow after it accepted (it learns more peers before it learns the
/// decision), so the size at the time of the decision is not in the
/// records; the value, the list of voters the proposer saw, is at most
/// that size.
pub(crate) fn ring_justified<'a>(
    ring: &Ring,
    records: impl Iterator<Item = (PeerName, &'a Record)>,
) -> bool {
    let n = ring.owners.len();
    let mut votes = 0usize;
    for (_, r) in records {
        if let Some((_, v)) = r
            .paxos
            .get(&Instance::Ring)
            .and_then(|a| a.accepted.as_ref())
        {
            let mut v = v.clone();
            v.sort();
            v.dedup();
            if v == ring.owners {
                votes += 1;
            }
        }
    }
    votes >= paxos::quorum(n)
}

/// See [`GossipData::split`] for [`Ipam`].
pub fn split_payload(payload: Vec<u8>, max: usize) -> Vec<Vec<u8>> {
    let Ok(p) = Payload::decode(&payload) else {
        return vec![payload];
    };
    let mut out = Vec::new();
    let size = |s: &Signed| {
        192 + 16
            * (s.record.held.len()
                + s.record.requests.len()
                + s.record.served.len()
                + s.record.paxos.len())
            + 24 * s.record.grants.len()
    };
    let overhead = 64 + 8 * p.ring.as_ref().map_or(0, |r| r.owners.len());
    for run in crate::gossip::chunks(p.records, max, overhead, size) {
        out.push(
            Payload {
                range: p.range,
                // The ring travels with every part, so that a peer of
                // another ring refuses them rather than mixing them in.
                ring: p.ring.clone(),
                records: run,
            }
            .encode(),
        );
    }
    if out.is_empty() {
        out.push(payload);
    }
    out
}
