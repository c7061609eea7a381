//! A deterministic simulator of many [`Gossip`] cores.
//!
//! quinn's `Pair` harness grown to thousands of peers: real cores, a virtual
//! clock (a base `Instant` plus a `Duration`), and a simulated network with
//! latency (1–20 ms per message, FIFO per direction like TCP), message loss,
//! partitions and crashes. Everything random comes from one seed, so a run is
//! reproduced by its seed; failures print it.
//!
//! What the simulator plays of the daemon:
//!
//! - **Connection maker** ([`maker`]): dials the seed peer it was started
//!   with and every [`Gossip::dial_candidates`] entry, while its connections
//!   plus dials in flight stay under `conn_limit`; accepts incoming
//!   connections under the same limit, and above it only a dialer for which
//!   it is the command-line target and which has no route to it (a joining
//!   or cut-off peer: else a full mesh strands it); refuses duplicates;
//!   backs off with jitter (1 s doubling to 30 s) after a failed or refused
//!   dial, and retries at once after an established connection drops. It
//!   runs 100 ms after news from the core, at most every 300 ms. A connection
//!   costs one round trip to set up (and ~350 handshake bytes); a dial to a
//!   dead or partitioned peer fails after 3 s.
//! - **Failure detection**: a connection whose path breaks (partition, crash,
//!   cut link) is reported down at each live end after a delay drawn from
//!   `[dead_after − heartbeat, dead_after]` (5–15 s with the defaults: the
//!   last beat heard was up to one slow interval before the break, and the
//!   sleeve gives up after 15 s of silence).
//! - **Heartbeats**: one sleeve heartbeat ([`HEARTBEAT_BYTES`]) per
//!   connection per heartbeat period (10 s) in each direction, counted as
//!   control bytes (not delivered as messages): a healthy link's steady
//!   beat, the leader's ping and the other end's answer
//!   ([`crate::beat`]). The control connection's beat (about 20 bytes a
//!   minute each way), the fast beats of links being set up or gone quiet,
//!   and UDP/TCP/IP headers (as for every byte counted here) are left out.
//! - **Loss**: each gossip message is dropped with probability `loss` (harsher
//!   than TCP, which would only delay it); each leg of a dial is delayed by a
//!   1 s SYN retransmission with that probability.
//!
//! Bytes counted per peer: every gossip message it sends, heartbeats and
//! handshakes; the totals of the last two (and the number of dials) are
//! kept apart too ([`Sim::heartbeat_bytes`], [`Sim::handshake_bytes`],
//! [`Sim::dials`]) to tell what a figure is made of.
//!
//! Cost: every simulated peer holds the whole topology, so memory and work
//! grow with peers²: 355 MiB and 71 s of one core at 1,000 peers, 6.3 GiB
//! and 31 minutes at 5,000 (about 265 bytes per entry per simulated peer;
//! commit 58a0add). A heap profile at 1,000 peers put about 190 bytes per
//! entry per peer in each core's own tables at the peak of convergence:
//! requests in flight, the entry slot, key book, name index, recent
//! history. The cores now share one name table ([`Gossip::share_names`]:
//! no name index per core, keys kept by position), and requests are kept
//! in a vector: 275 MiB and 53 s at 1,000 peers. The entries' bodies, with
//! their connections, are shared between cores that hold the same version
//! (see
//! [`Topology::intern_all`](crate::gossip::topology::Topology::intern_all)).
//! Each core is told the mesh's size ([`Gossip::reserve_peers`]) so that
//! its tables keep no growth slack.

pub mod maker;

use crate::gossip::rng::Rng;
use crate::gossip::topology::{NameHash, NameTable};
use crate::gossip::{Config, Event, Gossip};
use crate::name::PeerName;
use maker::Maker;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Bytes of one sleeve heartbeat: an empty sealed message, its 30 bytes
/// of header and 16 of tag ([`crate::sleeve`]).
pub const HEARTBEAT_BYTES: u64 = (crate::sleeve::DATAGRAM_HEADER_LEN + crate::seal::TAG_LEN) as u64;
const _: () = assert!(HEARTBEAT_BYTES == 46);
/// Bytes a dialer sends for a handshake (Noise XX messages 1 and 3, hello).
pub const HANDSHAKE_DIALER_BYTES: u64 = 200;
/// Bytes the acceptor sends (Noise XX message 2, hello, or a refusal).
pub const HANDSHAKE_ACCEPTOR_BYTES: u64 = 150;
/// The connection maker runs this long after news (coalescing news)...
pub const MAKER_DELAY: Duration = Duration::from_millis(100);
/// ...and runs at most this often.
pub const MAKER_INTERVAL: Duration = Duration::from_millis(300);
/// How long a dial to an unreachable peer takes to fail.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of peers.
    pub peers: usize,
    /// The seed of everything random.
    pub seed: u64,
    /// Probability that a gossip message is lost.
    pub loss: f64,
    /// One-way latency range of a message.
    pub latency: (Duration, Duration),
    /// Peers start at random times within this window.
    pub start_window: Duration,
    /// The cores' configuration (the daemon's defaults).
    pub gossip: Config,
}

impl SimConfig {
    /// `peers` peers with the daemon's defaults.
    pub fn new(peers: usize, seed: u64) -> Self {
        SimConfig {
            peers,
            seed,
            loss: 0.0,
            latency: (Duration::from_millis(1), Duration::from_millis(20)),
            start_window: Duration::from_secs(1),
            gossip: Config::default(),
        }
    }
}

/// The figures of one run (the `simulate` example's line).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// Peers.
    pub peers: usize,
    /// Simulated seconds until every peer knew every peer and had a route to
    /// it (None: not within the deadline).
    pub converged_s: Option<f64>,
    /// Mean control bytes sent per peer per second until then.
    pub bytes_per_peer_s: f64,
    /// The same over the following 60 simulated seconds, nothing changing.
    pub steady_bytes_per_peer_s: f64,
}

/// Seconds with two decimals, or `never`.
fn secs_or_never(s: Option<f64>) -> String {
    s.map_or_else(|| "never".to_string(), |c| format!("{c:.2}"))
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "peers={} converged_s={} bytes_per_peer_s={:.0} steady_bytes_per_peer_s={:.0}",
            self.peers,
            secs_or_never(self.converged_s),
            self.bytes_per_peer_s,
            self.steady_bytes_per_peer_s
        )
    }
}

#[derive(Debug)]
enum Ev {
    Start(u32),
    Deliver {
        from: u32,
        to: u32,
        epoch: u64,
        bytes: Vec<u8>,
    },
    Timer(u32),
    Maker(u32),
    DialArrive {
        from: u32,
        to: u32,
        life: u64,
        bootstrap: bool,
    },
    DialResult {
        from: u32,
        to: u32,
        life: u64,
        epoch: Option<u64>,
    },
    ConnDown {
        at: u32,
        other: u32,
        epoch: u64,
    },
    Heartbeats,
}

struct Link {
    epoch: u64,
    /// Whether each end (the smaller index first) holds it established.
    up: [bool; 2],
}

struct Peer {
    name: PeerName,
    addr: SocketAddr,
    core: Option<Gossip>,
    /// Bumps on every (re)start: events of an earlier life are ignored.
    life: u64,
    incarnation: u64,
    conns: HashSet<u32, NameHash>,
    maker: Maker,
    timer_at: Option<Duration>,
    maker_at: Option<Duration>,
    maker_last: Option<Duration>,
    bytes: u64,
}

/// The simulated mesh.
pub struct Sim {
    cfg: SimConfig,
    base: Instant,
    now: Duration,
    rng: Rng,
    peers: Vec<Peer>,
    by_name: HashMap<PeerName, u32, NameHash>,
    /// Every peer's name, by index: each core interns them in this order
    /// (sharing this one table: [`Gossip::share_names`]), so that equal
    /// entry versions are shared between cores.
    name_table: std::sync::Arc<NameTable>,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    events: HashMap<u64, Ev, NameHash>,
    seq: u64,
    links: HashMap<(u32, u32), Link, NameHash>,
    next_epoch: u64,
    fifo: HashMap<(u32, u32), Duration, NameHash>,
    group: Vec<u8>,
    cut: HashSet<(u32, u32), NameHash>,
    /// Gossip messages handed to the network.
    pub messages: u64,
    /// Heartbeat bytes counted so far (all peers).
    pub heartbeat_bytes: u64,
    /// Handshake bytes counted so far (all peers, refusals included).
    pub handshake_bytes: u64,
    /// Dials started so far.
    pub dials: u64,
}

fn key(a: u32, b: u32) -> (u32, u32) {
    (a.min(b), a.max(b))
}

fn side(a: u32, b: u32) -> usize {
    usize::from(a > b)
}

impl Sim {
    /// A mesh of `cfg.peers` peers, each starting at a random time in the
    /// start window, seeded with one random earlier peer.
    pub fn new(cfg: SimConfig) -> Sim {
        let mut rng = Rng::new(cfg.seed);
        let n = cfg.peers;
        let mut starts: Vec<Duration> = (0..n)
            .map(|i| {
                if i == 0 {
                    Duration::ZERO
                } else {
                    cfg.start_window.mul_f64(rng.unit())
                }
            })
            .collect();
        starts.sort();
        let mut sim = Sim {
            base: Instant::now(),
            now: Duration::ZERO,
            peers: Vec::with_capacity(n),
            by_name: HashMap::default(),
            name_table: Default::default(),
            queue: BinaryHeap::new(),
            events: HashMap::default(),
            seq: 0,
            links: HashMap::default(),
            next_epoch: 1,
            fifo: HashMap::default(),
            group: vec![0; n],
            cut: HashSet::default(),
            messages: 0,
            heartbeat_bytes: 0,
            handshake_bytes: 0,
            dials: 0,
            rng,
            cfg,
        };
        let mut names = Vec::with_capacity(n);
        for (i, &at) in starts.iter().enumerate() {
            let id = sim_identity(i, sim.cfg.seed);
            let name = id.name();
            let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 6783));
            let seed = (i > 0).then(|| sim.rng.below(i) as u32);
            sim.by_name.insert(name, i as u32);
            names.push(name);
            sim.peers.push(Peer {
                name,
                addr,
                core: None,
                life: 0,
                incarnation: 0,
                conns: HashSet::default(),
                maker: Maker::new(seed),
                timer_at: None,
                maker_at: None,
                maker_last: None,
                bytes: 0,
            });
            sim.schedule(at, Ev::Start(i as u32));
        }
        sim.name_table = NameTable::new(&names);
        let hb = sim.cfg.gossip.heartbeat;
        sim.schedule(hb, Ev::Heartbeats);
        sim
    }

    /// The seed of this run.
    pub fn seed(&self) -> u64 {
        self.cfg.seed
    }

    /// Simulated time since the start.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are no peers.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Peer `i`'s name.
    pub fn name(&self, i: usize) -> PeerName {
        self.peers[i].name
    }

    /// Peer `i`'s core (None while crashed or not yet started).
    pub fn core(&self, i: usize) -> Option<&Gossip> {
        self.peers[i].core.as_ref()
    }

    /// Peer `i`'s incarnation.
    pub fn incarnation(&self, i: usize) -> u64 {
        self.peers[i].incarnation
    }

    /// Control bytes sent by all peers so far.
    pub fn total_bytes(&self) -> u64 {
        self.peers.iter().map(|p| p.bytes).sum()
    }

    /// Established connections (both ends up).
    pub fn links(&self) -> Vec<(usize, usize)> {
        let mut v: Vec<(usize, usize)> = self
            .links
            .iter()
            .filter(|(_, l)| l.up[0] && l.up[1])
            .map(|(&(a, b), _)| (a as usize, b as usize))
            .collect();
        v.sort_unstable();
        v
    }

    fn at(&self, d: Duration) -> Instant {
        self.base + d
    }

    fn schedule(&mut self, at: Duration, ev: Ev) {
        let s = self.seq;
        self.seq += 1;
        self.events.insert(s, ev);
        self.queue.push(Reverse((at.max(self.now), s)));
    }

    fn latency(&mut self) -> Duration {
        let (lo, hi) = self.cfg.latency;
        lo + (hi - lo).mul_f64(self.rng.unit())
    }

    /// Time a message sent now from `a` arrives at `b`, FIFO per direction.
    fn arrival(&mut self, a: u32, b: u32, extra: Duration) -> Duration {
        let t = self.now + self.latency() + extra;
        let last = self.fifo.entry((a, b)).or_insert(Duration::ZERO);
        let t = t.max(*last);
        *last = t;
        t
    }

    fn blocked(&self, a: u32, b: u32) -> bool {
        self.group[a as usize] != self.group[b as usize] || self.cut.contains(&key(a, b))
    }

    fn alive(&self, i: u32) -> bool {
        self.peers[i as usize].core.is_some()
    }

    /// Run until simulated time `t`.
    pub fn run_until(&mut self, t: Duration) {
        while let Some(&Reverse((at, s))) = self.queue.peek() {
            if at > t {
                break;
            }
            self.queue.pop();
            self.now = at;
            if let Some(ev) = self.events.remove(&s) {
                self.step(ev);
            }
        }
        self.now = t;
    }

    /// Whether every live peer knows every other peer and has a route to it.
    pub fn converged(&self) -> bool {
        let live = self.peers.iter().filter(|p| p.core.is_some()).count();
        if live < self.peers.len() {
            return false;
        }
        self.peers.iter().all(|p| {
            p.core
                .as_ref()
                .is_some_and(|c| c.known_count() == live && c.reachable_count() == live - 1)
        })
    }

    /// Run until [`Sim::converged`] holds (checked every 10 ms), at most
    /// until `deadline`. Returns the time it first held.
    pub fn run_until_converged(&mut self, deadline: Duration) -> Option<Duration> {
        let step = Duration::from_millis(10);
        let mut t = self.now;
        while t < deadline {
            t += step;
            self.run_until(t);
            if self.converged() {
                return Some(t);
            }
        }
        None
    }

    /// Run until `check` holds (checked every 10 ms), at most until
    /// `deadline`; returns the time it first held.
    pub fn run_until_with(
        &mut self,
        deadline: Duration,
        mut check: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let step = Duration::from_millis(10);
        let mut t = self.now;
        while t < deadline {
            t += step;
            self.run_until(t);
            if check(self) {
                return Some(t);
            }
        }
        None
    }

    /// Split the mesh: `side` on one side, everyone else on the other.
    /// Connections across break (detected after 5–15 s), dials across fail.
    pub fn partition(&mut self, side: &[usize]) {
        for &i in side {
            self.group[i] = 1;
        }
        self.break_blocked_links();
    }

    /// Remove every partition and cut link.
    pub fn heal(&mut self) {
        self.group.iter_mut().for_each(|g| *g = 0);
        self.cut.clear();
    }

    /// Break the path between `a` and `b` (until [`Sim::heal`]).
    pub fn cut_link(&mut self, a: usize, b: usize) {
        self.cut.insert(key(a as u32, b as u32));
        self.break_blocked_links();
    }

    fn detection_delay(&mut self) -> Duration {
        let c = &self.cfg.gossip;
        let lo = c.dead_after.saturating_sub(c.heartbeat);
        lo + (c.dead_after - lo).mul_f64(self.rng.unit())
    }

    fn break_blocked_links(&mut self) {
        let mut broken: Vec<((u32, u32), u64, [bool; 2])> = self
            .links
            .iter()
            .filter(|(&(a, b), _)| self.blocked(a, b))
            .map(|(&k, l)| (k, l.epoch, l.up))
            .collect();
        broken.sort_unstable();
        for ((a, b), epoch, up) in broken {
            // Each end that had the link up notices on its own schedule.
            for (end_up, at, other) in [(up[0], a, b), (up[1], b, a)] {
                if end_up {
                    let t = self.now + self.detection_delay();
                    self.schedule(t, Ev::ConnDown { at, other, epoch });
                }
            }
        }
    }

    /// Crash peer `i`: its connections are detected down by the other ends
    /// after 5–15 s.
    pub fn crash(&mut self, i: usize) {
        let i = i as u32;
        let p = &mut self.peers[i as usize];
        p.core = None;
        p.life += 1;
        p.timer_at = None;
        p.maker_at = None;
        let conns: Vec<u32> = p.conns.drain().collect();
        let mut conns = conns;
        conns.sort_unstable();
        for o in conns {
            if let Some(l) = self.links.get_mut(&key(i, o)) {
                l.up[side(i, o)] = false;
                let epoch = l.epoch;
                let t = self.now + self.detection_delay();
                self.schedule(
                    t,
                    Ev::ConnDown {
                        at: o,
                        other: i,
                        epoch,
                    },
                );
            }
        }
    }

    /// Restart crashed peer `i` with a new incarnation, seeded with one
    /// random live peer.
    pub fn restart(&mut self, i: usize) {
        let live: Vec<u32> = (0..self.peers.len() as u32)
            .filter(|&j| j as usize != i && self.alive(j))
            .collect();
        let seed = (!live.is_empty()).then(|| live[self.rng.below(live.len())]);
        self.peers[i].maker = Maker::new(seed);
        let now = self.now;
        self.schedule(now, Ev::Start(i as u32));
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Start(i) => self.start(i),
            Ev::Deliver {
                from,
                to,
                epoch,
                bytes,
            } => self.deliver(from, to, epoch, bytes),
            Ev::Timer(i) => {
                if self.peers[i as usize].timer_at == Some(self.now) {
                    self.peers[i as usize].timer_at = None;
                    let now = self.at(self.now);
                    if let Some(c) = self.peers[i as usize].core.as_mut() {
                        c.handle_timeout(now);
                    }
                    self.after(i);
                }
            }
            Ev::Maker(i) => {
                if self.peers[i as usize].maker_at == Some(self.now) {
                    self.peers[i as usize].maker_at = None;
                    self.peers[i as usize].maker_last = Some(self.now);
                    self.run_maker(i);
                }
            }
            Ev::DialArrive {
                from,
                to,
                life,
                bootstrap,
            } => self.dial_arrive(from, to, life, bootstrap),
            Ev::DialResult {
                from,
                to,
                life,
                epoch,
            } => self.dial_result(from, to, life, epoch),
            Ev::ConnDown { at, other, epoch } => self.conn_down(at, other, epoch),
            Ev::Heartbeats => {
                for p in &mut self.peers {
                    if p.core.is_some() {
                        let b = HEARTBEAT_BYTES * p.conns.len() as u64;
                        p.bytes += b;
                        self.heartbeat_bytes += b;
                    }
                }
                let t = self.now + self.cfg.gossip.heartbeat;
                self.schedule(t, Ev::Heartbeats);
            }
        }
    }

    fn start(&mut self, i: u32) {
        let p = &mut self.peers[i as usize];
        if p.core.is_some() {
            return;
        }
        p.incarnation += 1;
        p.life += 1;
        let seed = self.cfg.seed ^ (i as u64).wrapping_mul(0x9e37_79b9) ^ p.incarnation << 48;
        let mut core = Gossip::new(
            sim_identity(i as usize, self.cfg.seed),
            format!("host{i}"),
            p.incarnation,
            self.cfg.gossip.clone(),
            seed,
        );
        core.reserve_peers(self.cfg.peers);
        core.share_names(self.name_table.clone());
        p.core = Some(core);
        self.trigger_maker(i, Duration::ZERO);
    }

    /// Drain a core's outputs after it handled something.
    fn after(&mut self, i: u32) {
        let mut out = Vec::new();
        let mut maker = false;
        let timeout;
        {
            let Some(c) = self.peers[i as usize].core.as_mut() else {
                return;
            };
            while let Some(t) = c.poll_transmit() {
                out.push(t);
            }
            while let Some(e) = c.poll_event() {
                maker |= matches!(e, Event::PeerAdded { .. } | Event::RoutesChanged);
            }
            timeout = c.poll_timeout();
        }
        for t in out {
            assert!(
                t.bytes.len() <= crate::gossip::wire::MAX_MESSAGE,
                "seed {}: message of {} bytes",
                self.cfg.seed,
                t.bytes.len()
            );
            self.peers[i as usize].bytes += t.bytes.len() as u64;
            self.messages += 1;
            let Some(&to) = self.by_name.get(&t.to) else {
                continue;
            };
            let k = key(i, to);
            let Some(l) = self.links.get(&k) else {
                continue;
            };
            let epoch = l.epoch;
            if self.blocked(i, to) || (self.cfg.loss > 0.0 && self.rng.chance(self.cfg.loss)) {
                continue;
            }
            let at = self.arrival(i, to, Duration::ZERO);
            self.schedule(
                at,
                Ev::Deliver {
                    from: i,
                    to,
                    epoch,
                    bytes: t.bytes,
                },
            );
        }
        if let Some(t) = timeout {
            let t = t.saturating_duration_since(self.base).max(self.now);
            let p = &mut self.peers[i as usize];
            if p.timer_at.is_none_or(|cur| t < cur) {
                p.timer_at = Some(t);
                self.schedule(t, Ev::Timer(i));
            }
        }
        if maker {
            self.trigger_maker(i, MAKER_DELAY);
        }
    }

    fn deliver(&mut self, from: u32, to: u32, epoch: u64, bytes: Vec<u8>) {
        let ok = self
            .links
            .get(&key(from, to))
            .is_some_and(|l| l.epoch == epoch && l.up[side(to, from)]);
        if !ok || self.blocked(from, to) {
            return;
        }
        let now = self.at(self.now);
        let name = self.peers[from as usize].name;
        let Some(c) = self.peers[to as usize].core.as_mut() else {
            return;
        };
        if let Err(e) = c.handle_message(now, name, &bytes) {
            panic!(
                "seed {}: peer {to} rejected gossip from {from}: {e}",
                self.cfg.seed
            );
        }
        self.after(to);
    }

    /// Run the maker after `delay`, but at most every MAKER_INTERVAL.
    fn trigger_maker(&mut self, i: u32, delay: Duration) {
        let p = &self.peers[i as usize];
        let t = (self.now + delay).max(p.maker_last.map_or(Duration::ZERO, |l| l + MAKER_INTERVAL));
        let p = &mut self.peers[i as usize];
        if p.maker_at.is_none_or(|cur| t < cur) {
            p.maker_at = Some(t);
            self.schedule(t, Ev::Maker(i));
        }
    }

    fn run_maker(&mut self, i: u32) {
        let limit = self.cfg.gossip.conn_limit;
        let now = self.now;
        let (dials, retry) = {
            let p = &mut self.peers[i as usize];
            let Some(core) = p.core.as_ref() else { return };
            let by_name = &self.by_name;
            p.maker
                .plan(now, core, &p.conns, limit, &mut self.rng, |n| {
                    by_name.get(&n).copied()
                })
        };
        for to in dials {
            self.peers[i as usize].bytes += HANDSHAKE_DIALER_BYTES;
            self.handshake_bytes += HANDSHAKE_DIALER_BYTES;
            self.dials += 1;
            let extra = self.syn_loss();
            let at = self.now + self.latency() + extra;
            let life = self.peers[i as usize].life;
            let target = self.peers[to as usize].name;
            let bootstrap = self.peers[i as usize].maker.is_target(to)
                && self.peers[i as usize]
                    .core
                    .as_ref()
                    .is_some_and(|c| c.next_hop(target).is_none());
            self.schedule(
                at,
                Ev::DialArrive {
                    from: i,
                    to,
                    life,
                    bootstrap,
                },
            );
        }
        if let Some(r) = retry {
            let d = r.saturating_sub(self.now);
            self.trigger_maker(i, d);
        }
    }

    fn syn_loss(&mut self) -> Duration {
        if self.cfg.loss > 0.0 && self.rng.chance(self.cfg.loss) {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        }
    }

    fn dial_arrive(&mut self, from: u32, to: u32, life: u64, bootstrap: bool) {
        let fail_at = self.now + DIAL_TIMEOUT;
        if !self.alive(to) || self.blocked(from, to) {
            self.schedule(
                fail_at,
                Ev::DialResult {
                    from,
                    to,
                    life,
                    epoch: None,
                },
            );
            return;
        }
        let k = key(from, to);
        // A connection the dialer no longer holds (it restarted, or saw it
        // die) is replaced by the new one; one it holds is a duplicate.
        if let Some(l) = self.links.get(&k) {
            if l.up[side(from, to)] {
                self.refuse(from, to, life);
                return;
            }
            if l.up[side(to, from)] {
                let epoch = l.epoch;
                self.conn_down(to, from, epoch);
            }
        }
        // At the limit, a peer still accepts a dialer for which it is a
        // command-line target and which has no route to it (a joining peer,
        // or one cut off; the dialer says so in its handshake): a full mesh
        // must not strand anyone.
        let limit = self.cfg.gossip.conn_limit;
        if self.peers[to as usize].conns.len() >= limit && !bootstrap {
            self.refuse(from, to, life);
            return;
        }
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let mut up = [false; 2];
        up[side(to, from)] = true;
        self.links.insert(k, Link { epoch, up });
        self.peers[to as usize].bytes += HANDSHAKE_ACCEPTOR_BYTES;
        self.handshake_bytes += HANDSHAKE_ACCEPTOR_BYTES;
        self.peers[to as usize].conns.insert(from);
        let extra = self.syn_loss();
        let at = self.arrival(to, from, extra);
        self.schedule(
            at,
            Ev::DialResult {
                from,
                to,
                life,
                epoch: Some(epoch),
            },
        );
        let now = self.at(self.now);
        let (name, addr) = (
            self.peers[from as usize].name,
            self.peers[from as usize].addr,
        );
        if let Some(c) = self.peers[to as usize].core.as_mut() {
            c.handle_connection_up(now, name, addr);
        }
        self.after(to);
    }

    fn refuse(&mut self, from: u32, to: u32, life: u64) {
        self.peers[to as usize].bytes += HANDSHAKE_ACCEPTOR_BYTES;
        self.handshake_bytes += HANDSHAKE_ACCEPTOR_BYTES;
        let at = self.now + self.latency();
        self.schedule(
            at,
            Ev::DialResult {
                from,
                to,
                life,
                epoch: None,
            },
        );
    }

    fn dial_result(&mut self, from: u32, to: u32, life: u64, epoch: Option<u64>) {
        let k = key(from, to);
        if self.peers[from as usize].life != life || !self.alive(from) {
            // The dialer died meanwhile: the acceptor notices later.
            if let Some(e) = epoch {
                let t = self.now + self.detection_delay();
                self.schedule(
                    t,
                    Ev::ConnDown {
                        at: to,
                        other: from,
                        epoch: e,
                    },
                );
            }
            return;
        }
        let now = self.now;
        self.peers[from as usize].maker.dial_done(to);
        let valid = epoch.is_some_and(|e| {
            self.links
                .get(&k)
                .is_some_and(|l| l.epoch == e && l.up[side(to, from)])
        });
        if !valid {
            self.peers[from as usize]
                .maker
                .failed(now, to, &mut self.rng);
            self.trigger_maker(from, Duration::ZERO);
            return;
        }
        if let Some(l) = self.links.get_mut(&k) {
            l.up[side(from, to)] = true;
        }
        self.peers[from as usize].conns.insert(to);
        self.peers[from as usize].maker.connected(to);
        let (name, addr) = (self.peers[to as usize].name, self.peers[to as usize].addr);
        let inst = self.at(now);
        if let Some(c) = self.peers[from as usize].core.as_mut() {
            c.handle_connection_up(inst, name, addr);
        }
        self.after(from);
        if self.blocked(from, to) {
            self.break_blocked_links();
        }
    }

    fn conn_down(&mut self, at: u32, other: u32, epoch: u64) {
        let k = key(at, other);
        let Some(l) = self.links.get_mut(&k) else {
            return;
        };
        if l.epoch != epoch || !l.up[side(at, other)] {
            return;
        }
        l.up[side(at, other)] = false;
        if !l.up[0] && !l.up[1] {
            self.links.remove(&k);
        }
        self.peers[at as usize].conns.remove(&other);
        self.peers[at as usize].maker.dropped(other);
        let now = self.at(self.now);
        let name = self.peers[other as usize].name;
        if let Some(c) = self.peers[at as usize].core.as_mut() {
            c.handle_connection_down(now, name);
        }
        self.after(at);
        self.trigger_maker(at, Duration::ZERO);
    }
}

/// Run the `simulate` scenario: start `cfg.peers` peers, run until every
/// peer knows every peer and has a route to it (at most 120 simulated
/// seconds), then 60 more seconds with nothing changing.
pub fn run(cfg: SimConfig) -> Report {
    run_with_churn(cfg, None).0
}

/// [`run`], then, if given, a churn phase ([`Sim::run_churn`]).
pub fn run_with_churn(cfg: SimConfig, churn: Option<Churn>) -> (Report, Option<ChurnReport>) {
    let n = cfg.peers.max(1);
    let mut sim = Sim::new(cfg);
    let conv = sim.run_until_converged(Duration::from_secs(120));
    let t = sim.now();
    let at_conv = sim.total_bytes();
    sim.run_until(t + Duration::from_secs(60));
    let steady = sim.total_bytes() - at_conv;
    let report = Report {
        peers: n,
        converged_s: conv.map(|c| c.as_secs_f64()),
        bytes_per_peer_s: at_conv as f64 / n as f64 / t.as_secs_f64().max(1e-9),
        steady_bytes_per_peer_s: steady as f64 / n as f64 / 60.0,
    };
    (report, churn.map(|c| sim.run_churn(c)))
}

/// Churn: peers leaving and joining continuously.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Churn {
    /// Peers leaving, and as many joining, per simulated minute (at
    /// exponentially distributed intervals).
    pub per_min: f64,
    /// For this long.
    pub duration: Duration,
}

/// How long a peer that left stays away before it joins again (long
/// enough for its connections to be detected down, 5–15 s, and the news
/// to spread).
pub const CHURN_AWAY: Duration = Duration::from_secs(30);

/// The figures of a churn phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChurnReport {
    /// Peers that left (each crashed, and came back [`CHURN_AWAY`] later
    /// with a new incarnation, or when churn stopped).
    pub leaves: usize,
    /// Joins known everywhere during churn (every live peer held the new
    /// incarnation), and the mean and longest time that took.
    pub joins_known: usize,
    /// Mean seconds for a join to be known everywhere.
    pub join_known_mean_s: f64,
    /// Longest.
    pub join_known_max_s: f64,
    /// Mean control bytes sent per peer per second during churn.
    pub bytes_per_peer_s: f64,
    /// Seconds from the end of churn (when every peer away joins again)
    /// until every peer knows every peer and has a route to it (None: not
    /// within 120 s).
    pub converged_s: Option<f64>,
}

impl std::fmt::Display for ChurnReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "churn_leaves={} churn_bytes_per_peer_s={:.0} join_known_s={:.2} join_known_max_s={:.2} churn_converged_s={}",
            self.leaves,
            self.bytes_per_peer_s,
            self.join_known_mean_s,
            self.join_known_max_s,
            secs_or_never(self.converged_s)
        )
    }
}

impl Sim {
    /// Run `churn` from now: at random intervals (`churn.per_min` a minute
    /// on average) a random live peer leaves (crashes), and the peer that
    /// has been away longest, if [`CHURN_AWAY`] or more, joins again with a
    /// new incarnation, seeded with a random live peer. When churn stops,
    /// every peer away joins again; then run until converged (at most 120
    /// simulated seconds).
    pub fn run_churn(&mut self, churn: Churn) -> ChurnReport {
        let n = self.peers.len();
        let start = self.now;
        let end = start + churn.duration;
        let bytes0 = self.total_bytes();
        let mean = 60.0 / churn.per_min.max(1e-9);
        let mut next = start + self.exponential(mean);
        let mut away: std::collections::VecDeque<(usize, Duration)> = Default::default();
        // (peer, incarnation, joined at)
        let mut joining: Vec<(usize, u64, Duration)> = Vec::new();
        let mut known: Vec<f64> = Vec::new();
        let mut leaves = 0;
        let step = Duration::from_millis(100);
        let mut t = start;
        while t < end {
            t = (t + step).min(end);
            while next <= t {
                self.run_until(next);
                let live: Vec<usize> = (0..n).filter(|&i| self.alive(i as u32)).collect();
                // Keep at least two peers.
                if live.len() > 2 {
                    let i = live[self.rng.below(live.len())];
                    self.crash(i);
                    away.push_back((i, self.now));
                    joining.retain(|&(j, _, _)| j != i);
                    leaves += 1;
                }
                if away
                    .front()
                    .is_some_and(|&(_, at)| at + CHURN_AWAY <= self.now)
                {
                    if let Some((i, _)) = away.pop_front() {
                        self.restart(i);
                        joining.push((i, self.peers[i].incarnation + 1, self.now));
                    }
                }
                next += self.exponential(mean);
            }
            self.run_until(t);
            joining.retain(|&(i, inc, at)| {
                let name = self.peers[i].name;
                let everywhere = self.peers.iter().enumerate().all(|(j, p)| {
                    j == i
                        || p.core
                            .as_ref()
                            .is_none_or(|c| c.known_incarnation(name).is_some_and(|k| k >= inc))
                });
                if everywhere {
                    known.push((t - at).as_secs_f64());
                }
                !everywhere
            });
        }
        let bytes = self.total_bytes() - bytes0;
        for (i, _) in away {
            self.restart(i);
        }
        let conv = self.run_until_converged(end + Duration::from_secs(120));
        let secs = churn.duration.as_secs_f64().max(1e-9);
        ChurnReport {
            leaves,
            joins_known: known.len(),
            join_known_mean_s: known.iter().sum::<f64>() / known.len().max(1) as f64,
            join_known_max_s: known.iter().copied().fold(0.0, f64::max),
            bytes_per_peer_s: bytes as f64 / n.max(1) as f64 / secs,
            converged_s: conv.map(|c| (c - end).as_secs_f64()),
        }
    }

    /// An exponentially distributed interval with this mean (seconds).
    fn exponential(&mut self, mean: f64) -> Duration {
        let u = self.rng.unit().min(1.0 - 1e-12);
        Duration::from_secs_f64(-mean * (1.0 - u).ln())
    }
}

/// Peer `i`'s identity in a simulation with `seed` (deterministic).
pub fn sim_identity(i: usize, seed: u64) -> crate::sign::Identity {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    b[8..16].copy_from_slice(&seed.to_le_bytes());
    b[16] = 0x5e;
    crate::sign::Identity::from_seed(&b)
}
