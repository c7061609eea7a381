//! Gossip and topology: how peers learn each other and route over the mesh.
//!
//! [`Gossip`] is a sans-IO core, one per peer, in the shape of quinn-proto:
//! `handle_*` methods take inputs (a connection came up or went down, a
//! message arrived, time passed) with an explicit `now`; `poll_*` methods
//! return outputs ([`Transmit`]s to direct neighbours, the next timeout,
//! [`Event`]s). Queries ([`Gossip::next_hop`], [`Gossip::broadcast_next_hops`],
//! [`Gossip::dial_candidates`], [`Gossip::peers`]) read the current state.
//!
//! How the topology spreads, and what it costs:
//!
//! - **Entries and deltas.** Each peer owns one entry (its nickname,
//!   incarnation, version, dialable addresses and connections) and bumps its
//!   version on every change. Changes are batched for
//!   [`Config::flush_interval`] and sent as deltas ("from version b to v:
//!   these connections added, those removed") to [`Config::relay_fanout`]
//!   random neighbours; our own changes also go to the neighbours they are
//!   about (a new connection counts for routing only once both ends report
//!   it). A receiver that learned something relays it the same way, so news
//!   spreads as an epidemic, each peer receiving it about `relay_fanout`
//!   times. Large news (a whole entry, a delta of more than a few
//!   connections) is announced ([`wire::Body::Have`]: name and version, ~12
//!   bytes) instead of pushed, and fetched only by the neighbours that lack
//!   it ([`wire::Body::Want`]), so it crosses each peer's links about once.
//!   A peer that misses a delta notices the gap on the next one and asks for
//!   exactly the changes it lacks. A peer that learns an entry whole over an
//!   older version keeps the difference as history (see [`topology`]), so
//!   neighbours a few versions behind still get deltas from it, not the
//!   whole entry again.
//! - **New connections.** Both sides send a [`wire::Hello`] (peer count and
//!   a hash of all they know), then at once, not at the next flush, the
//!   change of their own entry that adds the connection (for the receiver
//!   only: the flush spreads it), then every channel's state: each end
//!   holds both halves of the connection, and the other's nickname, one
//!   exchange after it comes up (a neighbour that lacked the delta's base
//!   asks for the whole entry: one round trip more). When the neighbour
//!   was not reachable before (a joining peer, a healed partition), the
//!   two also run a digest sync, which for a peer that knows nothing
//!   amounts to the full state; when it was reachable, deltas are already
//!   flowing and nothing more is sent.
//! - **Anti-entropy.** Every [`Config::gossip_interval`] a peer sends one
//!   random neighbour a [`wire::Summary`] (a 64-bit hash of its state, ~15
//!   bytes). Only if the hashes differ do they exchange bucket hashes, then
//!   versions for the differing buckets, then the missing changes: the cost
//!   at rest does not grow with N, and the cost of a repair grows with what
//!   differs.
//!
//! - **Dialing.** [`Gossip::dial_candidates`] leaves out peers whose entry
//!   already shows [`Config::conn_limit`] connections: they would refuse,
//!   and a mesh whose peers keep dialing full peers pays handshakes and
//!   backoffs long after it converged.
//!
//! Why the defaults: with `relay_fanout` 2 a push epidemic misses about
//! e⁻² ≈ 13% of peers for each final version, which anti-entropy then
//! repairs at far greater cost (bucket hashes, versions, often whole
//! entries) in the seconds after convergence; with 3 it misses ~5%, and
//! 350 ms batches keep the extra pushes in check. Simulated at 1,000
//! peers (seeds 1 and 2): converged in 4.5-4.7 s, 174-182 kB/s per peer
//! while converging, 1.4-1.6 kB/s per peer at rest, of which ~1 kB/s is the
//! daemon's heartbeats (100 connections × 20 bytes every 2 s). Sending our
//! own entry when a connection comes up (rather than only at the flush)
//! costs about 15% more while converging (it was 4.2-4.5 s, 150-164 kB/s):
//! the receivers that lack its base ask for the whole entry, and the
//! flush still sends the batch to the connection's other end when the
//! entry changed again since. Signed entries (64 bytes of signature per
//! record, 32 of key per whole entry) cost about a third more while
//! converging: seed 1 at 1,000 peers converged in 4.7 s at 240 kB/s per
//! peer, 1.8 kB/s at rest (`MESH_BENCH_PEERS=1000 cargo bench -p
//! mesh-proto --bench gossip_sim`, 71 s of wall time). With the heartbeats
//! modelled as the daemon's since its adaptive beats ([`Config::heartbeat`]:
//! one 46-byte sleeve beat each way per connection per 10 s), the same seed
//! gives 4.40 s, 259 kB/s while converging and 1.55 kB/s at rest, of which
//! ~0.46 kB/s is heartbeats and the rest gossip in the minute after
//! convergence (`simulate --peers 1000`).
//!
//! Steady state, per peer: heartbeats (the daemon's) plus one summary per
//! interval (~15 bytes/s). Routes are recomputed at most once per [`Config::route_delay`]
//! after a change (see [`routes`]), and only where the change can shorten
//! them when it only adds entries or connections (most news while a mesh
//! converges); unreachable, unreferenced peers are
//! forgotten after [`Config::gc_grace`] ([`Event::PeerRemoved`]).
//!
//! Other subsystems (IPAM, DNS) plug in as named [`GossipData`] channels.
//! A channel's own changes go to every neighbour; news learned from a
//! neighbour is relayed to [`Config::relay_fanout`] random others, like the
//! topology's, and anti-entropy (the summary carries each channel's
//! digest) repairs the peers an epidemic misses.

mod channel;
pub mod digest;
pub mod rng;
pub mod routes;
pub mod topology;
pub mod wire;

pub use channel::{chunks, GossipData};

use crate::name::PeerName;
use crate::sign::{Identity, KeyBook, KeyError};
use crate::WireError;
use digest::{fine_bucket, Digest};
use rng::Rng;
use routes::Routes;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use topology::{Applied, Idx, LocalRecord, RoutingChange, Topology};
use wire::{Body, ChannelMsg, Hello, Record, Summary, Update, VersionRec, Versions};

/// Knobs; `Default` gives the daemon's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Most connections a peer keeps (`--conn-limit`); the daemon's
    /// connection maker enforces it. At most [`wire::MAX_CONNS`].
    pub conn_limit: usize,
    /// Anti-entropy period: one summary to one random neighbour.
    pub gossip_interval: Duration,
    /// The period of the daemon's heartbeats on a healthy connection, in
    /// each direction (the core sends none; the simulator counts their
    /// bytes and models failure detection with it). The default models the
    /// beat that dominates at rest: the sleeve's, one datagram each way per
    /// 10 s on a healthy link ([`crate::beat`]; the control connection beats
    /// once a minute, the fast path's probes every 20 s).
    pub heartbeat: Duration,
    /// The daemon declares a connection dead after this long without
    /// hearing from it, and then calls [`Gossip::handle_connection_down`].
    /// The default models the sleeve's: a neighbour silent on UDP for 15 s
    /// loses its connection, so a dead neighbour is noticed within 15 s.
    pub dead_after: Duration,
    /// Changes are batched this long before deltas are sent.
    pub flush_interval: Duration,
    /// Relayed deltas go to this many random neighbours (our own go to all).
    pub relay_fanout: usize,
    /// Routes are recomputed this long after the first change.
    pub route_delay: Duration,
    /// Unreachable, unreferenced peers are forgotten after this long.
    pub gc_grace: Duration,
    /// The most peers held (`--max-peers`): entries of further new peers
    /// are refused, and names mentioned only by them are not interned past
    /// four times this many.
    pub max_peers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            conn_limit: 100,
            gossip_interval: Duration::from_secs(1),
            heartbeat: Duration::from_secs(10),
            dead_after: Duration::from_secs(15),
            flush_interval: Duration::from_millis(350),
            relay_fanout: 3,
            route_delay: Duration::from_millis(100),
            gc_grace: Duration::from_secs(120),
            max_peers: 16_384,
        }
    }
}

/// A message for a direct neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Always a directly connected peer.
    pub to: PeerName,
    /// At most [`wire::MAX_MESSAGE`] bytes.
    pub bytes: Vec<u8>,
}

/// Something the daemon may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer became known.
    PeerAdded {
        /// Its name.
        name: PeerName,
    },
    /// A peer was forgotten (unreachable and unreferenced for
    /// [`Config::gc_grace`]): other channels may drop its state.
    PeerRemoved {
        /// Its name.
        name: PeerName,
    },
    /// The topology changed: next hops, reachability or broadcast trees
    /// may differ (coalesced: at most one per [`Config::route_delay`]).
    RoutesChanged,
    /// Someone else claims our name: a newer entry for it arrived, or a
    /// connection to ourselves came up. We supersede it, but two live peers
    /// with one name (a cloned key) will keep fighting: report it.
    NameCollision {
        /// Our name.
        name: PeerName,
        /// The nickname the other claim carries.
        nickname: String,
        /// Its incarnation.
        incarnation: u64,
    },
    /// A record was refused: a signature that does not verify, a key that
    /// collides with the one pinned for its name, or a bound. The daemon
    /// logs it (rate-limited); nothing changed.
    Refused {
        /// The neighbour that sent it.
        from: PeerName,
        /// The peer the record is about.
        peer: PeerName,
        /// Why.
        reason: String,
        /// Two keys claim the peer's name (the second was refused): worth
        /// showing in `mesh status`.
        collision: bool,
    },
    /// A named channel learned something from a neighbour.
    ChannelUpdated {
        /// The channel.
        channel: String,
    },
}

/// Bad input from a neighbour. The daemon logs it (rate-limited) and
/// disconnects; the core's state is unchanged by the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GossipError {
    /// The bytes do not parse.
    #[error("malformed gossip: {0}")]
    Wire(#[from] WireError),
    /// Well-formed but impossible content.
    #[error("gossip breaks the protocol: {0}")]
    Protocol(&'static str),
    /// A channel rejected its payload.
    #[error("gossip channel {channel}: {reason}")]
    Channel {
        /// The channel.
        channel: String,
        /// Its error.
        reason: String,
    },
}

/// One connection of a peer, for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSummary {
    /// The other end.
    pub peer: PeerName,
    /// Its address (known for our own connections only).
    pub addr: Option<SocketAddr>,
    /// Both ends report it (so routes use it).
    pub established: bool,
}

/// One known peer, for `mesh status peers` and `mesh report`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSummary {
    /// Its name.
    pub name: PeerName,
    /// Its nickname.
    pub nickname: String,
    /// Its incarnation.
    pub incarnation: u64,
    /// Its entry's version.
    pub version: u32,
    /// Where it can be dialed, as its neighbours see it.
    pub addrs: Vec<SocketAddr>,
    /// Its connections.
    pub connections: Vec<ConnectionSummary>,
    /// We have a route to it (always true for ourselves and for direct
    /// neighbours).
    pub reachable: bool,
    /// The next hop towards it (None for ourselves or when unreachable).
    pub next_hop: Option<PeerName>,
}

#[derive(Clone, Copy)]
struct Pending {
    incarnation: u64,
    version: u32,
    source: Option<PeerName>,
}

/// A version we asked a neighbour for, and when: sixteen bytes (the
/// incarnation in two halves, so four-byte aligned).
#[derive(Debug, Clone, Copy, Default)]
struct Asked {
    incarnation: [u32; 2],
    version: u32,
    /// Milliseconds since [`Gossip::origin`], wrapping (every 49 days; an
    /// entry lives two flush rounds).
    at: u32,
}

impl Asked {
    fn new(incarnation: u64, version: u32, at: u32) -> Asked {
        Asked {
            incarnation: [incarnation as u32, (incarnation >> 32) as u32],
            version,
            at,
        }
    }

    /// The version asked for.
    fn version(&self) -> (u64, u32) {
        let [lo, hi] = self.incarnation;
        (u64::from(hi) << 32 | u64::from(lo), self.version)
    }

    /// An empty slot of [`Wanted`].
    fn is_empty(&self) -> bool {
        self.version() == (0, 0)
    }

    /// Asked less than `patience` ms before `now` (both from
    /// [`Gossip::stamp`]).
    fn fresh(&self, now: u32, patience: u32) -> bool {
        now.wrapping_sub(self.at) < patience
    }
}

/// The versions asked for, by local index: a vector of sixteen-byte
/// slots rather than a hash table (a joining peer asks for thousands of
/// entries at once, and a simulator holds thousands of joining peers),
/// freed once nothing is awaited. A slot asking for version (0, 0) is
/// empty: nobody asks for it (it is below every entry).
#[derive(Default)]
struct Wanted {
    slots: Vec<Asked>,
    /// Slots not empty.
    live: usize,
}

impl Wanted {
    fn get(&self, i: Idx) -> Option<&Asked> {
        self.slots.get(i as usize).filter(|a| !a.is_empty())
    }

    /// Record a request at `i`, making room for `slots` indices.
    fn insert(&mut self, i: Idx, a: Asked, slots: usize) {
        let i = i as usize;
        if i >= self.slots.len() {
            let n = slots.max(i + 1);
            self.slots.reserve_exact(n - self.slots.len());
            self.slots.resize(n, Asked::default());
        }
        let was = !self.slots[i].is_empty();
        self.slots[i] = a;
        self.live = self.live + usize::from(!a.is_empty()) - usize::from(was);
    }

    /// Keep the requests `f` accepts; free the slots when none is left.
    fn retain(&mut self, f: impl Fn(&Asked) -> bool) {
        if self.live == 0 {
            self.slots = Vec::new();
            return;
        }
        let mut live = 0;
        for a in &mut self.slots {
            if !a.is_empty() {
                if f(a) {
                    live += 1;
                } else {
                    *a = Asked::default();
                }
            }
        }
        self.live = live;
        if live == 0 {
            self.slots = Vec::new();
        }
    }
}

struct Neighbour {
    addr: SocketAddr,
    /// We sent a hello asking for a sync (it was unreachable before).
    want_sync: bool,
    /// The version of our own entry it was sent when the connection came
    /// up (0: none yet): the flush sends our own changes to the
    /// neighbours they are about only when there is something newer.
    own_sent: u32,
}

/// Leave room for the enum tags around records in one message.
const MESSAGE_BUDGET: usize = wire::MAX_MESSAGE - 1_000;

/// The gossip and topology core of one peer.
pub struct Gossip {
    me: PeerName,
    /// Signs our own entry.
    id: Identity,
    /// Every peer's key, pinned on its first valid signature.
    keys: KeyBook,
    config: Config,
    rng: Rng,
    topo: Topology,
    neighbours: BTreeMap<PeerName, Neighbour>,
    /// Entries changed since the last flush, with the version the neighbours
    /// probably had before (incarnation, version; (0, 0): whole entry).
    /// Who told us (not told again; None for our own changes).
    pending: HashMap<Idx, Pending>,
    /// Peers whose news we asked for after a gap in pushed deltas: their
    /// records are relayed on arrival like pushed ones.
    gaps: HashSet<Idx>,
    /// Versions we asked for and when: a second announcement of the same
    /// news within a flush round does not ask again. Held by thousands
    /// while a peer joins (16 bytes a slot, not 40 with an `Instant`).
    wanted: Wanted,
    /// The origin of [`Asked::at`] (the first time we were given).
    origin: Option<Instant>,
    routes: Routes,
    /// Each slot's depth in the last search (for
    /// [`Topology::take_routing_change`]).
    route_depth: Vec<u16>,
    routes_due: Option<Instant>,
    flush_due: Option<Instant>,
    next_sync: Option<Instant>,
    next_gc: Option<Instant>,
    unreachable_since: HashMap<Idx, Instant>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    channels: BTreeMap<String, Box<dyn GossipData>>,
    bytes_sent: u64,
    sent_by_kind: [u64; wire::KINDS],
    refused: u64,
}

impl Gossip {
    /// A core for peer `me`. `incarnation` must grow with every restart of
    /// the daemon (e.g. a persisted counter, or seconds since the epoch at
    /// start-up); `seed` seeds its random choices.
    pub fn new(
        id: Identity,
        nickname: String,
        incarnation: u64,
        config: Config,
        seed: u64,
    ) -> Self {
        let mut nickname = nickname;
        truncate_utf8(&mut nickname, wire::MAX_NICKNAME);
        let me = id.name();
        let mut keys = KeyBook::new();
        // Our own key gives our name: pinning it cannot fail.
        let _ = keys.pin(me, id.public());
        let mut g = Gossip {
            me,
            id,
            keys,
            config,
            rng: Rng::new(seed),
            topo: Topology::new(me, nickname, incarnation),
            neighbours: BTreeMap::new(),
            pending: HashMap::new(),
            gaps: HashSet::new(),
            wanted: Wanted::default(),
            origin: None,
            routes: Routes::default(),
            route_depth: Vec::new(),
            routes_due: None,
            flush_due: None,
            next_sync: None,
            next_gc: None,
            unreachable_since: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            channels: BTreeMap::new(),
            bytes_sent: 0,
            sent_by_kind: [0; wire::KINDS],
            refused: 0,
        };
        g.sign_own();
        g
    }

    /// Sign our own entry's current version.
    fn sign_own(&mut self) {
        if let Some(m) = self.topo.entry_message(0) {
            let sig = self.id.sign(topology::SIGN_DOMAIN, &m);
            self.topo.set_sig(0, sig);
        }
    }

    /// The key book: every peer's pinned key, and the collisions seen.
    pub fn keys(&self) -> &KeyBook {
        &self.keys
    }

    /// Records refused so far (bad signature, key collision, bounds).
    pub fn refused_count(&self) -> u64 {
        self.refused
    }

    /// Our name.
    pub fn name(&self) -> PeerName {
        self.me
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `now` in wrapping milliseconds since our origin (for [`Asked`]).
    fn stamp(&mut self, now: Instant) -> u32 {
        let o = *self.origin.get_or_insert(now);
        now.saturating_duration_since(o).as_millis() as u32
    }

    /// How long a request stays asked: two flush rounds, in ms.
    fn patience_ms(&self) -> u32 {
        (self.config.flush_interval * 2)
            .as_millis()
            .min(u32::MAX as u128) as u32
    }

    /// Make room for a mesh of `peers` peers up front (a memory hint: a
    /// simulator holding thousands of cores saves the slack of growing
    /// each one's tables; nothing else changes).
    pub fn reserve_peers(&mut self, peers: usize) {
        self.topo.reserve(peers);
    }

    /// Intern the mesh's names in this order (a memory hint for a
    /// simulator: see [`Topology::intern_all`]; nothing else changes).
    pub fn intern_names(&mut self, names: &[PeerName]) {
        self.topo.intern_all(names);
    }

    /// [`Gossip::intern_names`] with a table shared between cores (a
    /// simulator's): the names' index, and the key book's, are held once
    /// between them all, the keys by position ([`KeyBook::share_names`]).
    /// Only a memory hint: nothing else changes.
    pub fn share_names(&mut self, table: std::sync::Arc<topology::NameTable>) {
        self.topo.share_names(table.clone());
        self.keys.share_names(table);
    }

    /// Register a named channel (IPAM, DNS). Neighbours that do not know the
    /// channel ignore its messages.
    pub fn add_channel(&mut self, name: &str, data: Box<dyn GossipData>) {
        self.channels.insert(name.to_string(), data);
    }

    /// A registered channel's state.
    pub fn channel(&self, name: &str) -> Option<&dyn GossipData> {
        self.channels.get(name).map(|c| c.as_ref())
    }

    /// A registered channel's state, to change it; follow a change with
    /// [`Gossip::channel_broadcast`].
    pub fn channel_mut(&mut self, name: &str) -> Option<&mut (dyn GossipData + 'static)> {
        self.channels.get_mut(name).map(|c| c.as_mut())
    }

    /// Send a delta of a channel to every neighbour (after a local change).
    pub fn channel_broadcast(&mut self, channel: &str, delta: Vec<u8>) {
        let peers: Vec<PeerName> = self.neighbours.keys().copied().collect();
        for to in peers {
            self.send_channel(to, channel, delta.clone());
        }
    }

    /// A direct connection to `peer` is established; `addr` is where `peer`
    /// can be dialed (its IP as we see it and its listen port).
    ///
    /// Our own entry lists the connection at once, and the first messages
    /// on it carry everything the other end needs to show it: a hello, our
    /// entry's change (so both halves of the connection meet in one
    /// exchange), and every channel's state. Called again for a peer that
    /// is already a neighbour, it means the daemon replaced the connection
    /// (a duplicate resolved): what was sent on the old one may be lost,
    /// so it is sent again.
    pub fn handle_connection_up(&mut self, now: Instant, peer: PeerName, addr: SocketAddr) {
        self.start(now);
        if peer == self.me {
            self.events.push_back(Event::NameCollision {
                name: peer,
                nickname: String::new(),
                incarnation: 0,
            });
            return;
        }
        let idx = self.topo.intern(peer);
        let replaced = self.neighbours.contains_key(&peer);
        let want_sync = match self.neighbours.get_mut(&peer) {
            Some(n) => {
                n.addr = addr;
                n.want_sync
            }
            None => {
                // A digest sync is wanted when the neighbour is not in our
                // part of the mesh: unknown, or known and unreachable as of
                // the last route computation (entries learned since are
                // from this part, their routes merely not computed yet).
                let known = self.topo.get(idx).is_some();
                let want_sync = !known || self.routes.known_unreachable(idx);
                self.neighbours.insert(
                    peer,
                    Neighbour {
                        addr,
                        want_sync,
                        own_sent: 0,
                    },
                );
                self.change_own(now, |t| {
                    t.set_own_conn(idx, true);
                });
                want_sync
            }
        };
        let hello = Body::Hello(Hello {
            count: self.topo.count() as u32,
            root: self.topo.digest().root(),
            want_sync,
            your_addr: Some(addr),
        });
        self.send(peer, &hello);
        self.send_own_entry(peer, replaced);
        let states: Vec<(String, Vec<u8>)> = self
            .channels
            .iter()
            .map(|(n, c)| (n.clone(), c.encode()))
            .collect();
        for (name, state) in states {
            self.send_channel(peer, &name, state);
        }
    }

    /// Send our own entry to a new neighbour now rather than at the next
    /// flush: the changes since the version the mesh last heard (the base
    /// of the batch not yet flushed), or the whole entry for a replaced
    /// connection. A neighbour that lacks the base asks for the rest
    /// ([`Applied::Want`]); either way it holds our side of the connection
    /// within a round trip, and the flush does not send it the same change
    /// again.
    fn send_own_entry(&mut self, to: PeerName, whole: bool) {
        let (inc, ver) = match self.pending.get(&0) {
            Some(p) if !whole => (p.incarnation, p.version),
            _ => (0, 0),
        };
        let Some(r) = self.topo.record_for(0, inc, ver) else {
            return;
        };
        let version = r.version;
        // Not pushed: the receiver does not relay it. Spreading our new
        // version is the flush's job, once per batch of changes: a push per
        // connection would start an epidemic per connection.
        for m in self.encode_records(std::slice::from_ref(&r), false) {
            self.send(to, &m);
        }
        if let Some(n) = self.neighbours.get_mut(&to) {
            n.own_sent = version;
        }
    }

    /// The direct connection to `peer` is gone.
    pub fn handle_connection_down(&mut self, now: Instant, peer: PeerName) {
        self.start(now);
        if self.neighbours.remove(&peer).is_none() {
            return;
        }
        if let Some(idx) = self.topo.lookup(peer) {
            self.change_own(now, |t| {
                t.set_own_conn(idx, false);
            });
        }
    }

    /// A gossip message from direct neighbour `from`. Malformed, oversized or
    /// impossible input is an error (the daemon disconnects and logs it);
    /// never a panic. Messages from a peer that is not (or no longer) a
    /// neighbour are ignored.
    pub fn handle_message(
        &mut self,
        now: Instant,
        from: PeerName,
        msg: &[u8],
    ) -> Result<(), GossipError> {
        self.start(now);
        let body = Body::decode(msg)?;
        if !self.neighbours.contains_key(&from) {
            return Ok(());
        }
        match body {
            Body::Hello(h) => self.on_hello(now, from, h),
            Body::Summary(s) => self.on_summary(from, s),
            Body::Buckets(b) => self.on_buckets(from, &b),
            Body::Versions(v) => self.on_versions(from, v),
            Body::Update(u) => self.on_update(now, from, u),
            Body::Want(w) => {
                let recs = self.records_for(&w);
                self.send_records(from, recs);
                Ok(())
            }
            Body::Channel(c) => self.on_channel(from, c),
            Body::Have(h) => {
                self.on_have(now, from, &h);
                Ok(())
            }
        }
    }

    /// Time passed: flush batched deltas, recompute routes, run
    /// anti-entropy and garbage collection when due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.start(now);
        if self.flush_due.is_some_and(|t| t <= now) {
            self.flush_due = None;
            self.flush();
            // Forget old requests each round: a joining peer asks for
            // thousands of entries within seconds.
            let (at, patience) = (self.stamp(now), self.patience_ms());
            self.wanted.retain(|w| w.fresh(at, patience));
        }
        if self.routes_due.is_some_and(|t| t <= now) {
            self.routes_due = None;
            self.recompute_routes();
        }
        if self.next_sync.is_some_and(|t| t <= now) {
            let iv = self.config.gossip_interval;
            self.next_sync = Some(now + self.jitter(iv));
            self.anti_entropy(now);
        }
        if self.next_gc.is_some_and(|t| t <= now) {
            self.next_gc = Some(now + self.config.gossip_interval * 5);
            self.collect_garbage(now);
        }
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`Gossip::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.flush_due,
            self.routes_due,
            self.next_sync,
            self.next_gc,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Unicast next hop towards `dst` (None if unreachable or `dst` is us).
    pub fn next_hop(&self, dst: PeerName) -> Option<PeerName> {
        if dst == self.me {
            return None;
        }
        if self.neighbours.contains_key(&dst) {
            return Some(dst);
        }
        let i = self.topo.lookup(dst)?;
        self.routes.hop(i).map(|h| self.topo.name(h))
    }

    /// Neighbours to forward a broadcast from `src` to, on `src`'s broadcast
    /// tree (never back towards `src`; for `src` = us, the initial fan-out).
    /// Loop-free. Costs a breadth-first search (O(connections)): the daemon
    /// should cache the answer per source until [`Event::RoutesChanged`].
    pub fn broadcast_next_hops(&self, src: PeerName) -> Vec<PeerName> {
        let Some(s) = self.topo.lookup(src) else {
            return vec![];
        };
        routes::broadcast_children(&self.topo, s, 0)
            .into_iter()
            .map(|i| self.topo.name(i))
            .filter(|n| self.neighbours.contains_key(n))
            .collect()
    }

    /// Peers we know of and may dial: not us, not directly connected, not
    /// already holding [`Config::conn_limit`] connections by their entry
    /// (they would refuse us: with everyone on the default limit, dialing
    /// them only costs handshakes and backoff), with the addresses they can
    /// be dialed at (as their neighbours see them).
    pub fn dial_candidates(&self) -> Vec<(PeerName, Vec<SocketAddr>)> {
        self.dial_candidate_names()
            .filter_map(|name| {
                let e = self.topo.get(self.topo.lookup(name)?)?;
                Some((name, e.card.addrs()))
            })
            .collect()
    }

    /// The names of [`Gossip::dial_candidates`], in the same order, without
    /// their addresses (a connection maker that resolves names itself
    /// saves decoding them).
    pub fn dial_candidate_names(&self) -> impl Iterator<Item = PeerName> + '_ {
        self.topo.known().filter(|&i| i != 0).filter_map(|i| {
            let name = self.topo.name(i);
            let e = self.topo.get(i)?;
            (!self.neighbours.contains_key(&name)
                && e.card.has_addrs()
                && e.conns.len() < self.config.conn_limit)
                .then_some(name)
        })
    }

    /// Every known peer's name, ourselves first: what [`Gossip::peers`]
    /// lists, without its connection lists (which cost O(peers ×
    /// connections); the daemon asks for names every second).
    pub fn known_names(&self) -> impl Iterator<Item = PeerName> + '_ {
        self.topo.known().map(|i| self.topo.name(i))
    }

    /// The peers [`Gossip::peers`] marks reachable, ourselves excluded: a
    /// route as of the last recomputation, or a direct neighbour.
    pub fn reachable_names(&self) -> impl Iterator<Item = PeerName> + '_ {
        self.topo
            .known()
            .filter(|&i| i != 0)
            .map(|i| (i, self.topo.name(i)))
            .filter(|(i, name)| self.routes.hop(*i).is_some() || self.neighbours.contains_key(name))
            .map(|(_, name)| name)
    }

    /// Every known peer (ourselves first).
    pub fn peers(&self) -> Vec<PeerSummary> {
        self.topo
            .known()
            .filter_map(|i| {
                let e = self.topo.get(i)?;
                let name = self.topo.name(i);
                let connections = e
                    .conns
                    .iter()
                    .map(|c| {
                        let peer = self.topo.name(c);
                        ConnectionSummary {
                            peer,
                            addr: (i == 0)
                                .then(|| self.neighbours.get(&peer).map(|n| n.addr))
                                .flatten(),
                            established: routes::symmetric(&self.topo, i, c),
                        }
                    })
                    .collect();
                Some(PeerSummary {
                    name,
                    nickname: e.card.nickname().to_string(),
                    incarnation: e.incarnation,
                    version: e.version,
                    addrs: e.card.addrs(),
                    connections,
                    // A neighbour is reachable from the moment it is
                    // one, not from the next route computation.
                    reachable: i == 0
                        || self.routes.hop(i).is_some()
                        || self.neighbours.contains_key(&name),
                    next_hop: if i == 0 { None } else { self.next_hop(name) },
                })
            })
            .collect()
    }

    /// A hash of everything we know of the topology: equal on two peers
    /// when their views are equal.
    pub fn state_hash(&self) -> u64 {
        self.topo.digest().root()
    }

    /// Number of known peers, ourselves included.
    pub fn known_count(&self) -> usize {
        self.topo.count()
    }

    /// The incarnation of `peer`'s entry we hold (None: unknown).
    pub fn known_incarnation(&self, peer: PeerName) -> Option<u64> {
        let i = self.topo.lookup(peer)?;
        self.topo.get(i).map(|e| e.incarnation)
    }

    /// Number of peers we have a route to (as of the last recomputation).
    pub fn reachable_count(&self) -> usize {
        self.routes.reachable
    }

    /// Directly connected peers.
    pub fn neighbours(&self) -> impl Iterator<Item = PeerName> + '_ {
        self.neighbours.keys().copied()
    }

    /// Whether our routes may use the connection `a`–`b` (as of the last
    /// recomputation): one of our own, or reported by both ends.
    pub fn link_in_use(&self, a: PeerName, b: PeerName) -> bool {
        if a == self.me || b == self.me {
            let other = if a == self.me { b } else { a };
            return self.neighbours.contains_key(&other);
        }
        match (self.topo.lookup(a), self.topo.lookup(b)) {
            (Some(x), Some(y)) => {
                routes::symmetric(&self.topo, x, y)
                    && (self.routes.hop(x).is_some() || self.routes.hop(y).is_some())
            }
            _ => false,
        }
    }

    /// Total bytes handed out through [`Gossip::poll_transmit`] so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Bytes sent so far per message kind, in the order of
    /// [`wire::KIND_NAMES`].
    pub fn bytes_by_kind(&self) -> [u64; wire::KINDS] {
        self.sent_by_kind
    }

    // ---- internals ----

    fn start(&mut self, now: Instant) {
        if self.next_sync.is_none() {
            let iv = self.config.gossip_interval;
            self.next_sync = Some(now + self.jitter(iv));
            self.next_gc = Some(now + iv * 5);
        }
    }

    fn jitter(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.75 + 0.5 * self.rng.unit())
    }

    fn routes_dirty(&mut self, now: Instant) {
        if self.routes_due.is_none() {
            self.routes_due = Some(now + self.config.route_delay);
        }
    }

    fn mark_pending(
        &mut self,
        now: Instant,
        idx: Idx,
        before: (u64, u32),
        source: Option<PeerName>,
    ) {
        let p = self.pending.entry(idx).or_insert(Pending {
            incarnation: before.0,
            version: before.1,
            source,
        });
        if p.source != source {
            p.source = None;
        }
        if self.flush_due.is_none() {
            self.flush_due = Some(now + self.config.flush_interval);
        }
    }

    fn change_own(&mut self, now: Instant, f: impl FnOnce(&mut Topology)) {
        let before = self
            .topo
            .get(0)
            .map_or((0, 0), |e| (e.incarnation, e.version));
        f(&mut self.topo);
        self.sign_own();
        self.mark_pending(now, 0, before, None);
        self.routes_dirty(now);
    }

    fn send(&mut self, to: PeerName, body: &Body) {
        self.queue(to, body, body.encode());
    }

    /// Queue `body`, encoded as `bytes`, for `to`, and count it.
    fn queue(&mut self, to: PeerName, body: &Body, bytes: Vec<u8>) {
        self.bytes_sent += bytes.len() as u64;
        self.sent_by_kind[body.kind_index()] += bytes.len() as u64;
        self.transmits.push_back(Transmit { to, bytes });
    }

    fn send_channel(&mut self, to: PeerName, channel: &str, payload: Vec<u8>) {
        // Larger than a message: the channel cuts it into parts that merge
        // on their own.
        let budget = MESSAGE_BUDGET.saturating_sub(channel.len());
        let parts = if payload.len() > budget {
            match self.channels.get(channel) {
                Some(c) => c.split(payload, budget),
                None => return,
            }
        } else {
            vec![payload]
        };
        for payload in parts {
            let body = Body::Channel(ChannelMsg {
                channel: channel.to_string(),
                payload,
            });
            let bytes = body.encode();
            if bytes.len() <= wire::MAX_MESSAGE {
                self.queue(to, &body, bytes);
            }
        }
    }

    /// Encode records into as few messages as fit, each with its own name
    /// dictionary.
    fn encode_records(&self, recs: &[LocalRecord], push: bool) -> Vec<Body> {
        let mut out = Vec::new();
        let mut dict: HashMap<Idx, u32, topology::NameHash> = HashMap::default();
        let mut upd = Update {
            push,
            names: vec![],
            recs: vec![],
        };
        let mut size = 0usize;
        for r in recs {
            let new_names = std::iter::once(&r.peer)
                .chain(&r.add)
                .chain(&r.del)
                .filter(|i| !dict.contains_key(i))
                .count();
            let cost = new_names * 6 + 40 + 5 * (r.add.len() + r.del.len()) + 120;
            if size + cost > MESSAGE_BUDGET && !upd.recs.is_empty() {
                out.push(Body::Update(std::mem::replace(
                    &mut upd,
                    Update {
                        push,
                        names: vec![],
                        recs: vec![],
                    },
                )));
                dict.clear();
                size = 0;
            }
            size += cost;
            let mut map = |i: Idx| -> u32 {
                *dict.entry(i).or_insert_with(|| {
                    upd.names.push(self.topo.name(i));
                    (upd.names.len() - 1) as u32
                })
            };
            let peer = map(r.peer);
            let add = r.add.iter().map(|&i| map(i)).collect();
            let del = r.del.iter().map(|&i| map(i)).collect();
            upd.recs.push(Record {
                peer,
                incarnation: r.incarnation,
                base: r.base,
                version: r.version,
                nickname: r.nickname.clone(),
                addrs: r.addrs.clone(),
                add,
                del,
                sig: r.sig,
                key: if r.base == 0 {
                    self.keys.get(self.topo.name(r.peer))
                } else {
                    None
                },
            });
        }
        if !upd.recs.is_empty() {
            out.push(Body::Update(upd));
        }
        out
    }

    fn send_records(&mut self, to: PeerName, recs: Vec<LocalRecord>) {
        for body in self.encode_records(&recs, false) {
            self.send(to, &body);
        }
    }

    fn records_for(&self, want: &[VersionRec]) -> Vec<LocalRecord> {
        let mut out = Vec::with_capacity(want.len());
        out.extend(want.iter().filter_map(|w| {
            let i = self.topo.lookup(w.name)?;
            self.topo.record_for(i, w.incarnation, w.version)
        }));
        out
    }

    fn flush(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let mut own = None;
        let mut relay: Vec<(LocalRecord, Option<PeerName>)> = Vec::new();
        let mut sorted: Vec<(Idx, Pending)> = pending.into_iter().collect();
        sorted.sort_unstable_by_key(|(i, _)| *i);
        for (idx, p) in sorted {
            if let Some(r) = self.topo.record_for(idx, p.incarnation, p.version) {
                if idx == 0 {
                    own = Some(r);
                } else {
                    relay.push((r, p.source));
                }
            }
        }
        if own.is_none() && relay.is_empty() {
            return;
        }
        let mut peers: Vec<PeerName> = self.neighbours.keys().copied().collect();
        self.rng.shuffle(&mut peers);
        let fanout = self.config.relay_fanout.min(peers.len());
        // Everything to a few random neighbours (not back to whoever told us);
        // our own changes also to the neighbours they are about (a new
        // connection's other end needs our side of it at once).
        let mut sent_own: HashSet<PeerName> = HashSet::new();
        for &to in &peers[..fanout] {
            let fresh = |(r, src): &&(LocalRecord, Option<PeerName>)| {
                *src != Some(to) && self.topo.name(r.peer) != to
            };
            let recs: Vec<LocalRecord> = own
                .iter()
                .cloned()
                .chain(
                    relay
                        .iter()
                        .filter(fresh)
                        .filter(|(r, _)| !lazy(r))
                        .map(|(r, _)| r.clone()),
                )
                .collect();
            let have: Vec<VersionRec> = relay
                .iter()
                .filter(fresh)
                .filter(|(r, _)| lazy(r))
                .map(|(r, _)| VersionRec {
                    name: self.topo.name(r.peer),
                    incarnation: r.incarnation,
                    version: r.version,
                })
                .collect();
            if !recs.is_empty() {
                sent_own.insert(to);
                for m in self.encode_records(&recs, true) {
                    self.send(to, &m);
                }
            }
            for chunk in have.chunks(MESSAGE_BUDGET / 24) {
                self.send(to, &Body::Have(chunk.to_vec()));
            }
        }
        if let Some(r) = own {
            // (Unless it had this version when the connection came up.)
            let subjects: Vec<PeerName> = r
                .add
                .iter()
                .map(|&i| self.topo.name(i))
                .filter(|n| {
                    self.neighbours
                        .get(n)
                        .is_some_and(|nb| nb.own_sent < r.version)
                        && !sent_own.contains(n)
                })
                .collect();
            if !subjects.is_empty() {
                let msgs = self.encode_records(std::slice::from_ref(&r), true);
                for to in subjects {
                    for m in &msgs {
                        self.send(to, m);
                    }
                }
            }
        }
    }

    fn on_have(&mut self, now: Instant, from: PeerName, have: &[VersionRec]) {
        let mut want = Vec::new();
        for h in have {
            if h.name == self.me {
                continue;
            }
            let idx = self.topo.lookup(h.name);
            let mine = idx
                .and_then(|i| self.topo.get(i))
                .map_or((0, 0), |e| (e.incarnation, e.version));
            if idx.is_none() && self.topo.slots() >= self.config.max_peers.saturating_mul(4) {
                continue;
            }
            if (h.incarnation, h.version) > mine && want.len() < MESSAGE_BUDGET / 24 {
                let i = idx.unwrap_or_else(|| self.topo.intern(h.name));
                let (at, patience) = (self.stamp(now), self.patience_ms());
                if self.wanted.get(i).is_some_and(|w| {
                    w.version() >= (h.incarnation, h.version) && w.fresh(at, patience)
                }) {
                    continue;
                }
                let slots = self.topo.slots();
                self.wanted
                    .insert(i, Asked::new(h.incarnation, h.version, at), slots);
                if self.gaps.len() < 4 * wire::MAX_CONNS {
                    self.gaps.insert(i);
                }
                want.push(VersionRec {
                    name: h.name,
                    incarnation: mine.0,
                    version: mine.1,
                });
            }
        }
        if !want.is_empty() {
            self.send(from, &Body::Want(want));
        }
    }

    fn on_hello(&mut self, now: Instant, from: PeerName, h: Hello) -> Result<(), GossipError> {
        if let Some(a) = h.your_addr {
            let mine = self.topo.get(0).map(|e| e.card.addrs()).unwrap_or_default();
            if mine.first() != Some(&a) {
                let mut addrs = vec![a];
                addrs.extend(mine.into_iter().filter(|x| *x != a));
                addrs.truncate(wire::MAX_ADDRS);
                self.change_own(now, |t| t.set_own_addrs(addrs));
            }
        }
        let my_want = self.neighbours.get(&from).is_some_and(|n| n.want_sync);
        if my_want && h.want_sync && h.root != self.topo.digest().root() {
            let mine = self.topo.count() as u32;
            let initiator = if mine != h.count {
                mine > h.count
            } else {
                self.me < from
            };
            if initiator {
                self.send_buckets(from, h.count as usize);
            }
        }
        Ok(())
    }

    fn send_buckets(&mut self, to: PeerName, their_count: usize) {
        let b = Digest::buckets_for(self.topo.count().max(their_count));
        let hashes = self.topo.digest().coarse(b);
        self.send(to, &Body::Buckets(hashes));
    }

    fn on_summary(&mut self, from: PeerName, s: Summary) -> Result<(), GossipError> {
        if s.root != self.topo.digest().root() {
            self.send_buckets(from, s.count as usize);
        }
        for (name, digest) in s.channels {
            let state = match self.channels.get(&name) {
                Some(c) if c.digest() != digest => c.encode(),
                _ => continue,
            };
            self.send_channel(from, &name, state);
        }
        Ok(())
    }

    fn entries_in(&self, buckets: usize, differing: &HashSet<u16>) -> Vec<Idx> {
        self.topo
            .known()
            .filter(|&i| differing.contains(&((fine_bucket(self.topo.name(i)) % buckets) as u16)))
            .collect()
    }

    fn on_buckets(&mut self, from: PeerName, theirs: &[u32]) -> Result<(), GossipError> {
        let mine = self.topo.digest().coarse(theirs.len());
        let differing: Vec<u16> = (0..theirs.len())
            .filter(|&i| mine[i] != theirs[i])
            .map(|i| i as u16)
            .collect();
        if differing.is_empty() {
            return Ok(());
        }
        let set: HashSet<u16> = differing.iter().copied().collect();
        let recs = self
            .entries_in(theirs.len(), &set)
            .into_iter()
            .filter_map(|i| {
                let e = self.topo.get(i)?;
                Some(VersionRec {
                    name: self.topo.name(i),
                    incarnation: e.incarnation,
                    version: e.version,
                })
            })
            .collect();
        self.send(
            from,
            &Body::Versions(Versions {
                buckets: theirs.len() as u16,
                differing,
                recs,
            }),
        );
        Ok(())
    }

    fn on_versions(&mut self, from: PeerName, v: Versions) -> Result<(), GossipError> {
        let b = v.buckets as usize;
        let set: HashSet<u16> = v.differing.iter().copied().collect();
        let theirs: HashMap<PeerName, (u64, u32)> = v
            .recs
            .iter()
            .map(|r| (r.name, (r.incarnation, r.version)))
            .collect();
        let mut send = Vec::new();
        for i in self.entries_in(b, &set) {
            let (inc, ver) = theirs.get(&self.topo.name(i)).copied().unwrap_or((0, 0));
            if let Some(r) = self.topo.record_for(i, inc, ver) {
                send.push(r);
            }
        }
        let mut want = Vec::new();
        for r in &v.recs {
            let mine = self
                .topo
                .lookup(r.name)
                .and_then(|i| self.topo.get(i))
                .map_or((0, 0), |e| (e.incarnation, e.version));
            if (r.incarnation, r.version) > mine {
                want.push(VersionRec {
                    name: r.name,
                    incarnation: mine.0,
                    version: mine.1,
                });
            }
        }
        self.send_records(from, send);
        if !want.is_empty() {
            self.send(from, &Body::Want(want));
        }
        Ok(())
    }

    fn on_update(&mut self, now: Instant, from: PeerName, u: Update) -> Result<(), GossipError> {
        // Resolve names lazily: a name is interned only when a record uses
        // it, and not at all past the bound on names (then only records
        // about names we know are taken).
        let mut local: Vec<Option<Idx>> = vec![None; u.names.len()];
        let mut want = Vec::new();
        let mut changed = false;
        let max_slots = self.config.max_peers.saturating_mul(4);
        for r in u.recs {
            let name = u.names[r.peer as usize];
            if r.add.iter().chain(&r.del).any(|&i| i == r.peer) {
                return Err(GossipError::Protocol("a peer connected to itself"));
            }
            if name == self.me {
                self.on_own_entry(now, from, &u.names, &r);
                continue;
            }
            let unknown = std::iter::once(&r.peer)
                .chain(&r.add)
                .chain(&r.del)
                .filter(|&&i| {
                    local[i as usize].is_none() && self.topo.lookup(u.names[i as usize]).is_none()
                })
                .count();
            if unknown > 0 && self.topo.slots() + unknown > max_slots {
                self.refuse(
                    from,
                    name,
                    "the table of peer names is full (--max-peers)".into(),
                );
                continue;
            }
            let mut res = |i: u32, topo: &mut Topology| -> Idx {
                *local[i as usize].get_or_insert_with(|| topo.intern(u.names[i as usize]))
            };
            let peer = res(r.peer, &mut self.topo);
            let add = r.add.iter().map(|&i| res(i, &mut self.topo)).collect();
            let del = r.del.iter().map(|&i| res(i, &mut self.topo)).collect();
            let before = self
                .topo
                .get(peer)
                .map_or((0, 0), |e| (e.incarnation, e.version));
            let whole = r.base == 0;
            let keys = &mut self.keys;
            let mut key_err = None;
            let applied = self.topo.apply(
                LocalRecord {
                    peer,
                    incarnation: r.incarnation,
                    base: r.base,
                    version: r.version,
                    nickname: r.nickname,
                    addrs: r.addrs,
                    add,
                    del,
                    sig: r.sig,
                    key: r.key,
                },
                self.config.max_peers,
                |m, sig, key| match keys.verify(name, key, topology::SIGN_DOMAIN, m, sig) {
                    Ok(()) => true,
                    Err(e) => {
                        key_err = Some(e);
                        false
                    }
                },
            );
            match applied {
                Applied::Stale => {}
                Applied::Refused => {
                    let reason = format!(
                        "version {}.{} is out of bounds (incarnation over 2^48 or version over 2^31), or a new peer past --max-peers {}",
                        r.incarnation, r.version, self.config.max_peers
                    );
                    self.refuse(from, name, reason);
                }
                Applied::BadSignature => {
                    let collision = matches!(key_err, Some(KeyError::Collision { .. }));
                    let reason = key_err.map_or_else(
                        || "its signature does not match the entry".to_string(),
                        |e| e.to_string(),
                    );
                    // A delta may not lead to what its signer signed when
                    // our copy is not the one it was made for: the whole
                    // entry settles it (asked once per flush round).
                    let (at, patience) = (self.stamp(now), self.patience_ms());
                    let asked = self.wanted.get(peer).is_some_and(|w| {
                        w.version() == (r.incarnation, r.version) && w.fresh(at, patience)
                    });
                    if collision {
                        self.refused += 1;
                        self.events.push_back(Event::Refused {
                            from,
                            peer: name,
                            reason,
                            collision,
                        });
                    } else if !whole && !asked && self.topo.get(peer).is_some() {
                        let slots = self.topo.slots();
                        self.wanted
                            .insert(peer, Asked::new(r.incarnation, r.version, at), slots);
                        want.push(VersionRec {
                            name,
                            incarnation: 0,
                            version: 0,
                        });
                    } else {
                        self.refuse(from, name, reason);
                    }
                }
                Applied::Changed { prev, new_peer } => {
                    if new_peer {
                        self.events.push_back(Event::PeerAdded { name });
                    }
                    let base = if prev == 0 { (0, 0) } else { before };
                    if self.gaps.remove(&peer) || u.push {
                        self.mark_pending(now, peer, base, Some(from));
                    }
                    changed = true;
                }
                Applied::Want {
                    incarnation,
                    version,
                } => {
                    if u.push && self.gaps.len() < 4 * wire::MAX_CONNS {
                        self.gaps.insert(peer);
                    }
                    want.push(VersionRec {
                        name,
                        incarnation,
                        version,
                    })
                }
            }
        }
        if changed {
            self.routes_dirty(now);
        }
        if !want.is_empty() {
            self.send(from, &Body::Want(want));
        }
        Ok(())
    }

    fn refuse(&mut self, from: PeerName, peer: PeerName, reason: String) {
        self.refused += 1;
        self.events.push_back(Event::Refused {
            from,
            peer,
            reason,
            collision: false,
        });
    }

    /// A record about ourselves: if it is newer than what we hold (our own
    /// earlier life, or someone else with our name), supersede it.
    ///
    /// Only a record signed with our own key counts (our earlier life, or
    /// a clone of our identity): anything else is refused. A newer delta is
    /// answered by asking for the whole entry, which can be checked.
    fn on_own_entry(&mut self, now: Instant, from: PeerName, names: &[PeerName], r: &Record) {
        let Some(mine) = self.topo.get(0) else { return };
        let (inc, ver) = (mine.incarnation, mine.version);
        if (r.incarnation, r.version) <= (inc, ver) {
            return;
        }
        if r.base != 0 {
            self.send(
                from,
                &Body::Want(vec![VersionRec {
                    name: self.me,
                    incarnation: 0,
                    version: 0,
                }]),
            );
            return;
        }
        let mut addrs = r.addrs.clone().unwrap_or_default();
        addrs.truncate(wire::MAX_ADDRS);
        let card = topology::Card::new(r.nickname.as_deref().unwrap_or_default(), &addrs);
        let mut conns: Vec<PeerName> = r.add.iter().map(|&i| names[i as usize]).collect();
        conns.sort_unstable();
        conns.dedup();
        let m = topology::signed_message(self.me, r.incarnation, r.version, &card, &mut conns);
        if !self.id.public().verify(topology::SIGN_DOMAIN, &m, &r.sig) {
            self.refuse(
                from,
                self.me,
                format!(
                    "an entry for our own name at {}.{} not signed by our key",
                    r.incarnation, r.version
                ),
            );
            return;
        }
        let Some(mine) = self.topo.get(0) else { return };
        if r.incarnation > inc
            || r.nickname
                .as_ref()
                .is_some_and(|n| n.as_str() != mine.card.nickname())
        {
            self.events.push_back(Event::NameCollision {
                name: self.me,
                nickname: r.nickname.clone().unwrap_or_default(),
                incarnation: r.incarnation,
            });
        }
        self.topo.supersede_own(r.incarnation, r.version);
        self.sign_own();
        self.pending.insert(
            0,
            Pending {
                incarnation: 0,
                version: 0,
                source: None,
            },
        );
        if self.flush_due.is_none() {
            self.flush_due = Some(now + self.config.flush_interval);
        }
    }

    fn on_channel(&mut self, from: PeerName, c: ChannelMsg) -> Result<(), GossipError> {
        let Some(ch) = self.channels.get_mut(&c.channel) else {
            return Ok(());
        };
        let delta =
            ch.merge(&c.payload, &mut self.keys)
                .map_err(|reason| GossipError::Channel {
                    channel: c.channel.clone(),
                    reason,
                })?;
        if let Some(delta) = delta {
            self.events.push_back(Event::ChannelUpdated {
                channel: c.channel.clone(),
            });
            // News is relayed like the topology's: to a few random
            // neighbours, not to all of them (in a full mesh of N peers
            // every change would cross the mesh N times over: ~3,500
            // messages per change at 60 peers, which held a 60-peer ring's
            // consensus for minutes). Anti-entropy repairs the few misses.
            let mut others: Vec<PeerName> = self
                .neighbours
                .keys()
                .copied()
                .filter(|&n| n != from)
                .collect();
            self.rng.shuffle(&mut others);
            others.truncate(self.config.relay_fanout);
            for to in others {
                self.send_channel(to, &c.channel, delta.clone());
            }
        }
        Ok(())
    }

    fn anti_entropy(&mut self, now: Instant) {
        let _ = now;
        if self.neighbours.is_empty() {
            return;
        }
        let k = self.rng.below(self.neighbours.len());
        let Some(&to) = self.neighbours.keys().nth(k) else {
            return;
        };
        let channels = self
            .channels
            .iter()
            .map(|(n, c)| (n.clone(), c.digest()))
            .collect();
        let s = Body::Summary(Summary {
            count: self.topo.count() as u32,
            root: self.topo.digest().root(),
            channels,
        });
        self.send(to, &s);
    }

    fn recompute_routes(&mut self) {
        // Only changes to what routes are made of need the search (most
        // news while a mesh converges is one end of a connection reporting
        // it before the other, or an address): otherwise it would find the
        // same routes. The event still goes out: the daemon's connection
        // maker takes it as news of the topology.
        let depth = &self.route_depth;
        let same_level = |a: Idx, b: Idx| {
            let (da, db) = (depth.get(a as usize), depth.get(b as usize));
            da.is_some_and(|&d| d != routes::UNREACHED) && da == db
        };
        match self.topo.take_routing_change(same_level) {
            RoutingChange::None => {}
            RoutingChange::Grown(mut peers) => {
                // A peer whose entry changed several times counts once.
                peers.sort_unstable();
                peers.dedup();
                routes::add_links(&self.topo, &mut self.routes, &mut self.route_depth, &peers);
            }
            RoutingChange::Full => {
                let mut queue = Vec::with_capacity(self.topo.count());
                routes::unicast_into(
                    &self.topo,
                    &mut self.routes,
                    &mut queue,
                    &mut self.route_depth,
                );
            }
        }
        // Broadcast trees depend on every symmetric link, not only on our
        // next hops: any topology change (the only reason we are here) may
        // have changed them, so the daemon must refresh its cached trees.
        self.events.push_back(Event::RoutesChanged);
    }

    fn collect_garbage(&mut self, now: Instant) {
        self.topo.compact();
        let (at, patience) = (self.stamp(now), self.patience_ms());
        self.wanted.retain(|w| w.fresh(at, patience));
        if self.routes_due.is_some() {
            self.routes_due = None;
            self.recompute_routes();
        }
        let known: Vec<Idx> = self.topo.known().filter(|&i| i != 0).collect();
        let mut removed = false;
        // Reading every entry's connections is needed only when some known
        // peer is unreachable (not at rest in a connected mesh).
        let referenced = if known.iter().all(|&i| self.routes.hop(i).is_some()) {
            Vec::new()
        } else {
            routes::referenced(&self.topo, &self.routes)
        };
        for i in known {
            let alive = self.routes.hop(i).is_some()
                || referenced.get(i as usize).copied().unwrap_or(false);
            if alive {
                self.unreachable_since.remove(&i);
                continue;
            }
            let since = *self.unreachable_since.entry(i).or_insert(now);
            if now.duration_since(since) >= self.config.gc_grace {
                self.unreachable_since.remove(&i);
                self.topo.remove(i);
                self.pending.remove(&i);
                self.keys.forget(self.topo.name(i));
                self.events.push_back(Event::PeerRemoved {
                    name: self.topo.name(i),
                });
                removed = true;
            }
        }
        if removed {
            self.recompute_routes();
        }
    }
}

/// Relayed records with more connection changes than this are announced
/// ([`wire::Body::Have`]) rather than pushed: most receivers already have
/// them, and the few that lack them ask.
const LAZY_OPS: usize = 8;

fn lazy(r: &LocalRecord) -> bool {
    r.base == 0 || r.add.len() + r.del.len() > LAZY_OPS
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn id(i: u8) -> Identity {
        Identity::from_seed(&[i.wrapping_add(1); 32])
    }

    fn nm(i: u8) -> PeerName {
        id(i).name()
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, i], 6783))
    }

    /// Cores linked in-process: messages are delivered in order until
    /// nothing more is sent (timers fire only when asked).
    struct Net {
        cores: Vec<Gossip>,
        now: Instant,
    }

    impl Net {
        fn new(n: u8) -> Net {
            Net {
                cores: (0..n)
                    .map(|i| Gossip::new(id(i), format!("h{i}"), 1, Config::default(), i as u64))
                    .collect(),
                now: Instant::now(),
            }
        }

        fn connect(&mut self, a: usize, b: usize) {
            let now = self.now;
            let (na, nb) = (nm(a as u8), nm(b as u8));
            self.cores[a].handle_connection_up(now, nb, addr(b as u8));
            self.cores[b].handle_connection_up(now, na, addr(a as u8));
        }

        fn disconnect(&mut self, a: usize, b: usize) {
            let now = self.now;
            let (na, nb) = (nm(a as u8), nm(b as u8));
            self.cores[a].handle_connection_down(now, nb);
            self.cores[b].handle_connection_down(now, na);
        }

        /// Deliver until quiet; returns messages delivered.
        fn drain(&mut self) -> usize {
            let mut q: VecDeque<(usize, Transmit)> = VecDeque::new();
            let mut n = 0;
            loop {
                for (i, c) in self.cores.iter_mut().enumerate() {
                    while let Some(t) = c.poll_transmit() {
                        assert!(t.bytes.len() <= wire::MAX_MESSAGE);
                        q.push_back((i, t));
                    }
                }
                let Some((from, t)) = q.pop_front() else {
                    return n;
                };
                n += 1;
                assert!(n < 100_000, "gossip does not quiesce");
                let to = (0..self.cores.len())
                    .find(|&i| nm(i as u8) == t.to)
                    .expect("a core of this net");
                let now = self.now;
                self.cores[to]
                    .handle_message(now, nm(from as u8), &t.bytes)
                    .unwrap();
            }
        }

        /// `n` cores, each with a "test" channel (a grow-only set).
        fn with_test_channel(n: u8) -> Net {
            let mut net = Net::new(n);
            for c in &mut net.cores {
                c.add_channel("test", Box::new(channel::tests::GSet::default()));
            }
            net
        }

        /// Core 0 adds `x` to its "test" channel and broadcasts the
        /// change; once drained, every core holds exactly `[x]`.
        #[track_caller]
        fn change_and_broadcast(&mut self, x: u8) {
            let delta = vec![x];
            self.cores[0]
                .channel_mut("test")
                .unwrap()
                .merge(&delta, &mut KeyBook::new())
                .unwrap();
            self.cores[0].channel_broadcast("test", delta);
            self.drain();
            for c in &self.cores {
                assert_eq!(c.channel("test").unwrap().encode(), vec![x]);
            }
        }

        /// Advance time by `d` in small steps, firing timers and draining.
        fn advance(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += Duration::from_millis(10);
                let now = self.now;
                for c in &mut self.cores {
                    if c.poll_timeout().is_some_and(|t| t <= now) {
                        c.handle_timeout(now);
                    }
                }
                self.drain();
            }
        }
    }

    #[test]
    fn two_peers_learn_each_other() {
        let mut net = Net::new(2);
        net.connect(0, 1);
        net.drain();
        net.advance(Duration::from_millis(200));
        for c in &net.cores {
            assert_eq!(c.known_count(), 2);
            assert_eq!(c.reachable_count(), 1);
        }
        assert_eq!(net.cores[0].next_hop(nm(1)), Some(nm(1)));
        assert_eq!(net.cores[0].next_hop(nm(0)), None);
        // Each learned its dialable address from the other's hello.
        let p = net.cores[1].peers();
        let zero = p.iter().find(|s| s.name == nm(0)).unwrap();
        assert_eq!(zero.addrs, vec![addr(0)]);
    }

    /// What `a` shows of its direct neighbour `b`: listed with its
    /// nickname, reachable directly, and the connection established in
    /// both entries.
    #[track_caller]
    fn shows_neighbour(net: &Net, a: usize, b: usize) {
        let (na, nb) = (nm(a as u8), nm(b as u8));
        let peers = net.cores[a].peers();
        let entry = |n: PeerName| peers.iter().find(|p| p.name == n);
        let other = entry(nb).unwrap_or_else(|| panic!("{a} does not list {b}: {peers:?}"));
        assert_eq!(other.nickname, format!("h{b}"));
        assert!(other.reachable, "{a} shows {b} unreachable");
        assert_eq!(other.next_hop, Some(nb));
        for (from, to) in [(na, nb), (nb, na)] {
            let e = entry(from).expect("listed");
            assert!(
                e.connections.iter().any(|c| c.peer == to && c.established),
                "{a} shows {from}'s connection to {to} pending or missing: {e:?}"
            );
        }
    }

    #[test]
    fn a_new_connection_shows_on_both_ends_after_one_exchange() {
        // 0-1 settled; 2 joins through 0 knowing nothing (a digest sync),
        // then 1 and 2, which know each other through 0, connect directly
        // (no sync). Each time, what the connection itself sends (no timer
        // fires) is enough for both ends to agree about it.
        let mut net = Net::new(3);
        net.connect(0, 1);
        net.advance(Duration::from_secs(2));
        net.connect(2, 0);
        net.drain();
        shows_neighbour(&net, 0, 2);
        shows_neighbour(&net, 2, 0);
        net.advance(Duration::from_secs(2));
        assert!(net.cores[1].peers().iter().any(|p| p.name == nm(2)));
        net.connect(1, 2);
        net.drain();
        shows_neighbour(&net, 1, 2);
        shows_neighbour(&net, 2, 1);
        // And the views converge as before.
        net.advance(Duration::from_secs(2));
        for c in &net.cores {
            assert_eq!(c.known_count(), 3);
            assert_eq!(c.state_hash(), net.cores[0].state_hash());
        }
    }

    #[test]
    fn a_replaced_connection_resends_what_the_old_one_carried() {
        // The daemon replaced the connection 0-1 (a duplicate resolved):
        // what 0 sent on the old one may be lost, so 0 sends its hello, its
        // whole entry and its channels' states again; its entry is
        // unchanged (the neighbour never went away).
        let mut net = Net::with_test_channel(2);
        net.connect(0, 1);
        net.advance(Duration::from_secs(1));
        let version = net.cores[0].peers()[0].version;
        let now = net.now;
        net.cores[0].handle_connection_up(now, nm(1), addr(1));
        let mut kinds = Vec::new();
        while let Some(t) = net.cores[0].poll_transmit() {
            assert_eq!(t.to, nm(1));
            let body = Body::decode(&t.bytes).unwrap();
            if let Body::Update(u) = &body {
                assert!(u.recs.iter().any(|r| r.base == 0 && r.nickname.is_some()));
            }
            kinds.push(body.kind_index());
        }
        let kind = |name: &str| wire::KIND_NAMES.iter().position(|k| *k == name);
        for name in ["hello", "pull", "channel"] {
            assert!(kinds.contains(&kind(name).unwrap()), "no {name}: {kinds:?}");
        }
        assert_eq!(net.cores[0].peers()[0].version, version);
    }

    #[test]
    fn joiner_gets_full_state_and_relays() {
        // A line 0-1-2-3, then 4 joins via 3 and learns everyone.
        let mut net = Net::new(5);
        for i in 0..3 {
            net.connect(i, i + 1);
            net.advance(Duration::from_millis(300));
        }
        net.advance(Duration::from_secs(2));
        assert_eq!(net.cores[0].known_count(), 4);
        assert_eq!(net.cores[0].reachable_count(), 3);
        assert_eq!(net.cores[0].next_hop(nm(3)), Some(nm(1)));
        net.connect(4, 3);
        net.advance(Duration::from_millis(300));
        assert_eq!(net.cores[4].known_count(), 5);
        assert_eq!(net.cores[4].next_hop(nm(0)), Some(nm(3)));
        net.advance(Duration::from_secs(3));
        assert_eq!(net.cores[0].known_count(), 5);
        assert_eq!(net.cores[0].next_hop(nm(4)), Some(nm(1)));
        let cands: Vec<PeerName> = net.cores[0]
            .dial_candidates()
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(cands, vec![nm(2), nm(3), nm(4)]);
        // Broadcast from 0 goes to 1 only; 1 forwards to 2.
        assert_eq!(net.cores[0].broadcast_next_hops(nm(0)), vec![nm(1)]);
        assert_eq!(net.cores[1].broadcast_next_hops(nm(0)), vec![nm(2)]);
        assert_eq!(net.cores[1].broadcast_next_hops(nm(2)), vec![nm(0)]);
    }

    #[test]
    fn dead_link_is_withdrawn_and_garbage_collected() {
        let mut net = Net::new(3);
        net.connect(0, 1);
        net.connect(1, 2);
        net.advance(Duration::from_secs(3));
        assert_eq!(net.cores[0].next_hop(nm(2)), Some(nm(1)));
        net.disconnect(1, 2);
        net.advance(Duration::from_millis(500));
        assert_eq!(net.cores[0].next_hop(nm(2)), None);
        assert!(!net.cores[0].link_in_use(nm(1), nm(2)));
        while net.cores[0].poll_event().is_some() {}
        net.advance(Config::default().gc_grace + Duration::from_secs(15));
        let mut removed = vec![];
        while let Some(e) = net.cores[0].poll_event() {
            if let Event::PeerRemoved { name } = e {
                removed.push(name);
            }
        }
        assert_eq!(removed, vec![nm(2)]);
        assert_eq!(net.cores[0].known_count(), 2);
    }

    #[test]
    fn full_peers_are_not_dial_candidates() {
        // 0-1-2, and 2 also to 3 and 4: with a limit of 2, peer 2 (three
        // connections) would refuse 0, so 0 is offered only 3 and 4.
        let mut net = Net::new(5);
        let config = Config {
            conn_limit: 2,
            ..Config::default()
        };
        for (i, c) in net.cores.iter_mut().enumerate() {
            *c = Gossip::new(id(i as u8), format!("h{i}"), 1, config.clone(), i as u64);
        }
        for (a, b) in [(0, 1), (1, 2), (2, 3), (2, 4)] {
            net.connect(a, b);
        }
        net.advance(Duration::from_secs(3));
        assert_eq!(net.cores[0].known_count(), 5);
        let cands: Vec<PeerName> = net.cores[0]
            .dial_candidates()
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(cands, vec![nm(3), nm(4)]);
    }

    /// A forged whole entry for `victim` far ahead of its own, with
    /// no connections, signed by `signer`.
    fn forged(victim: PeerName, signer: &Identity, offer: bool) -> Vec<u8> {
        let mut u = Update {
            push: true,
            names: vec![],
            recs: vec![],
        };
        u.push_whole_signed(victim, 1 << 40, 1_000_000, "pwned", &[], signer, offer);
        Body::Update(u).encode()
    }

    #[test]
    fn a_member_cannot_write_another_peers_entry_or_ours() {
        // 0 - 1 - 2; 2 is the rogue: it forges 1's entry (to 0 and to 1)
        // and 0's entry (to 1), as a member that passed the handshake.
        let mut net = Net::new(3);
        net.connect(0, 1);
        net.connect(1, 2);
        net.connect(0, 2);
        net.advance(Duration::from_secs(2));
        let view = |net: &Net, at: usize, of: u8| {
            net.cores[at]
                .peers()
                .into_iter()
                .find(|p| p.name == nm(of))
                .map(|p| (p.nickname, p.incarnation, p.connections.len()))
        };
        let before = (view(&net, 0, 1), view(&net, 1, 1), view(&net, 1, 0));
        assert_eq!(before.0.as_ref().map(|v| v.2), Some(2));
        let now = net.now;
        let rogue = id(2);
        for (to, victim, offer) in [(0, 1, true), (0, 1, false), (1, 1, true), (1, 0, true)] {
            net.cores[to]
                .handle_message(now, nm(2), &forged(nm(victim), &rogue, offer))
                .expect("refused quietly, not a protocol error");
        }
        // The victim's own key signing a forged entry is what it takes;
        // a key that gives another name is refused too.
        net.drain();
        net.advance(Duration::from_secs(3));
        assert_eq!(
            (view(&net, 0, 1), view(&net, 1, 1), view(&net, 1, 0)),
            before
        );
        assert!(net.cores[0].refused_count() >= 2);
        assert!(net.cores[1].refused_count() >= 2);
        // 1 and 0 can still change their entries, and everyone sees it.
        net.disconnect(0, 2);
        net.advance(Duration::from_secs(3));
        assert_eq!(view(&net, 1, 0).map(|v| v.2), Some(1));
        assert_eq!(view(&net, 2, 0).map(|v| v.2), Some(1));
    }

    #[test]
    fn a_second_key_for_a_known_name_is_a_collision() {
        let mut net = Net::new(2);
        net.connect(0, 1);
        net.advance(Duration::from_secs(1));
        // Find a key whose name collides with 1's would take 2^48 tries;
        // the negated point of 1's key gives the same name (and cannot
        // sign), which exercises the same path: refused, nothing merged.
        use ed25519_dalek::VerifyingKey;
        let k1 = id(1).public();
        let p = VerifyingKey::from_bytes(k1.as_bytes())
            .expect("point")
            .to_edwards();
        let neg = crate::sign::PublicKey::from_bytes(&(-p).compress().to_bytes()).expect("neg");
        assert_eq!(neg.name(), nm(1));
        let mut msg = forged(nm(1), &id(2), true);
        // Swap the offered key for the negated one (the last 32 bytes
        // before the end: `Some(key)` is encoded last).
        let n = msg.len();
        msg[n - 32..].copy_from_slice(neg.as_bytes());
        let now = net.now;
        net.cores[0]
            .handle_message(now, nm(1), &msg)
            .expect("quiet");
        assert_eq!(net.cores[0].keys().get(nm(1)), Some(k1));
        assert!(net.cores[0].refused_count() >= 1);
        let seen = net.cores[0].peers().into_iter().find(|p| p.name == nm(1));
        assert_ne!(seen.map(|p| p.nickname), Some("pwned".to_string()));
    }

    #[test]
    fn stale_own_entry_is_superseded() {
        let mut net = Net::new(2);
        net.connect(0, 1);
        net.advance(Duration::from_secs(1));
        // 0 restarts with the same incarnation (a daemon bug): 1 still holds
        // a newer version of 0's entry, which 0 must supersede.
        net.disconnect(0, 1);
        net.cores[0] = Gossip::new(id(0), "h0".into(), 1, Config::default(), 9);
        net.connect(0, 1);
        net.advance(Duration::from_secs(3));
        let v0 = net.cores[0].peers()[0].version;
        let seen = net.cores[1]
            .peers()
            .into_iter()
            .find(|p| p.name == nm(0))
            .unwrap();
        assert_eq!(seen.version, v0);
        assert!(v0 > 2);
    }

    #[test]
    fn malformed_input_is_an_error() {
        let mut net = Net::new(2);
        net.connect(0, 1);
        net.drain();
        let now = net.now;
        let c = &mut net.cores[0];
        assert!(c.handle_message(now, nm(1), &[]).is_err());
        assert!(c.handle_message(now, nm(1), &[1, 200]).is_err());
        // A record claiming a peer connected to itself.
        let liar = Body::Update(Update {
            push: true,
            names: vec![nm(7)],
            recs: vec![Record {
                peer: 0,
                incarnation: 1,
                base: 0,
                version: 1,
                nickname: Some("x".into()),
                addrs: None,
                add: vec![0],
                del: vec![],
                sig: crate::sign::Sig::NONE,
                key: None,
            }],
        });
        assert_eq!(
            c.handle_message(now, nm(1), &liar.encode()),
            Err(GossipError::Protocol("a peer connected to itself"))
        );
    }

    #[test]
    fn channels_flood_and_anti_entropy() {
        let mut net = Net::with_test_channel(3);
        net.connect(0, 1);
        net.connect(1, 2);
        net.drain();
        net.change_and_broadcast(5);
        // A change that was never broadcast is repaired by anti-entropy.
        net.cores[2]
            .channel_mut("test")
            .unwrap()
            .merge(&[9], &mut KeyBook::new())
            .unwrap();
        net.advance(Duration::from_secs(5));
        assert_eq!(net.cores[0].channel("test").unwrap().encode(), vec![5, 9]);
    }

    #[test]
    fn channel_news_crosses_a_full_mesh_a_few_times_not_n_times() {
        // 40 peers, all connected to all. One change broadcast by its
        // origin goes to its 39 neighbours; each that learns it relays it
        // to `relay_fanout` others, not to its 38 others (~1,500 messages
        // per change: a 60-peer ring's consensus took minutes).
        let n = 40u8;
        let mut net = Net::with_test_channel(n);
        for a in 0..n as usize {
            for b in a + 1..n as usize {
                net.connect(a, b);
            }
        }
        net.advance(Duration::from_secs(3));
        let kind = wire::KIND_NAMES
            .iter()
            .position(|k| *k == "channel")
            .unwrap();
        let sent = |net: &Net| -> u64 { net.cores.iter().map(|c| c.bytes_by_kind()[kind]).sum() };
        let before = sent(&net);
        net.change_and_broadcast(5);
        let per_message = {
            let body = Body::Channel(ChannelMsg {
                channel: "test".into(),
                payload: vec![5],
            });
            body.encode().len() as u64
        };
        let messages = (sent(&net) - before) / per_message;
        let bound = (n as u64 - 1) * (1 + Config::default().relay_fanout as u64);
        assert!(
            messages <= bound,
            "{messages} channel messages for one change, more than {bound}"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut net = Net::new(2);
            net.connect(0, 1);
            let now = net.now;
            let mut b = bytes.clone();
            let _ = net.cores[0].handle_message(now, nm(1), &b);
            b.insert(0, wire::FORMAT);
            let _ = net.cores[0].handle_message(now, nm(1), &b);
        }
    }
}
