//! Ring creation in every order of events (issue 13): a deterministic
//! exploration of small meshes of IPAM cores with the default
//! `--ipalloc-init consensus`, each peer told about others the way users
//! launch hosts (every host names the first one, or every host is given the
//! same list), booting in random order (seeds that come up late), with
//! connections that drop and come back (loss on the underlay), partitions
//! during ring creation, crashes and restarts from the persisted state, and
//! containers attached from the first instant.
//!
//! After every step: no address is held by two containers. At the end, with
//! everything healed: every peer has the same ring, and every container
//! that waited got an address.
//!
//! `MESH_BOOT_SEEDS=N` explores N seeds (default 1,500, which CI runs); a
//! failure prints its seed, and `MESH_BOOT_SEED=S` replays one.

use mesh_proto::gossip::rng::Rng;
use mesh_proto::gossip::GossipData;
use mesh_proto::ipam::{AllocError, Config, InitMode, Ipam, Told};
use mesh_proto::name::PeerName;
use mesh_proto::sign::Identity;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const STEP: Duration = Duration::from_millis(100);
/// Steps of activity (boots, attaches, faults), then the settling.
const STEPS: usize = 400;

/// Peer `i`'s identity (deterministic).
fn id(i: usize) -> Identity {
    mesh_proto::sim::sim_identity(i, 0xb007)
}

/// Peer `i`'s name (cached: deriving a key takes a while).
fn name(i: usize) -> PeerName {
    static NAMES: std::sync::OnceLock<Vec<PeerName>> = std::sync::OnceLock::new();
    NAMES.get_or_init(|| (0..256).map(|i| id(i).name()).collect())[i]
}

fn config() -> Config {
    Config {
        range: "10.32.0.0/16".parse().expect("range"),
        default_subnet: "10.32.0.0/16".parse().expect("subnet"),
        init: InitMode::Consensus(None),
        reclaim_after: Duration::from_secs(600),
    }
}

/// How the user told the hosts about each other.
#[derive(Clone, Copy, Debug)]
enum Launch {
    /// `mesh launch` on host 0, `mesh launch <host 0>` on the others.
    Star,
    /// The same list of every host on every host (itself included, which
    /// the daemon recognises as its own address).
    List,
}

struct Peer {
    /// `None` before boot and while crashed.
    core: Option<Ipam>,
    /// The key book of its gossip core.
    keys: mesh_proto::sign::KeyBook,
    booted: bool,
    /// Persisted bytes while crashed, and when it comes back.
    crashed: Option<(Vec<u8>, Instant)>,
    /// Targets (peer indices) named at launch.
    targets: Vec<usize>,
    /// Targets some connection reached.
    reached: BTreeSet<usize>,
    /// Peers learned by gossip (names a real daemon's topology holds).
    known: BTreeSet<usize>,
    /// Containers waiting for an address: id.
    waiting: Vec<String>,
    /// The ring it had after the last step, for the trace.
    ring: Option<Vec<PeerName>>,
}

struct Sim {
    rng: Rng,
    seed: u64,
    now: Instant,
    boot_at: Vec<Instant>,
    peers: Vec<Peer>,
    /// Connections up (i < j), with the time they may be retried after a
    /// refusal or a drop.
    links: BTreeSet<(usize, usize)>,
    retry_at: BTreeMap<(usize, usize), Instant>,
    /// Per direction, FIFO (a TCP stream): (deliver at, bytes).
    queues: BTreeMap<(usize, usize), Stream>,
    group: Vec<u8>,
    heal_at: Option<Instant>,
    ids: u64,
    trace: Vec<String>,
}

/// One direction of a connection: messages in order, with when each arrives.
type Stream = VecDeque<(Instant, Vec<u8>)>;

fn key(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng::new(seed);
        let n = 2 + rng.below(5);
        let launch = if rng.chance(0.5) {
            Launch::Star
        } else {
            Launch::List
        };
        let now = Instant::now();
        let peers: Vec<Peer> = (0..n)
            .map(|i| Peer {
                core: None,
                keys: mesh_proto::sign::KeyBook::new(),
                booted: false,
                crashed: None,
                targets: match launch {
                    Launch::Star if i == 0 => vec![],
                    Launch::Star => vec![0],
                    Launch::List => (0..n).filter(|j| *j != i).collect(),
                },
                reached: BTreeSet::new(),
                known: BTreeSet::new(),
                waiting: Vec::new(),
                ring: None,
            })
            .collect();
        // Random boot order within 15 s: the seed is often late.
        let boot_at = (0..n)
            .map(|_| now + Duration::from_millis(rng.below(15_000) as u64))
            .collect();
        Sim {
            seed,
            now,
            boot_at,
            peers,
            links: BTreeSet::new(),
            retry_at: BTreeMap::new(),
            queues: BTreeMap::new(),
            group: vec![0; n],
            heal_at: None,
            ids: 0,
            trace: vec![format!("seed {seed}: {n} peers, {launch:?}")],
            rng,
        }
    }

    fn n(&self) -> usize {
        self.peers.len()
    }

    fn up(&self, i: usize) -> bool {
        self.peers[i].core.is_some()
    }

    fn fail(&self, why: String) -> ! {
        let tail: Vec<&String> = self.trace.iter().rev().take(80).collect();
        let tail: Vec<&&String> = tail.iter().rev().collect();
        panic!(
            "seed {}: {why}\nreplay with MESH_BOOT_SEED={}\nlast events:\n{}",
            self.seed,
            self.seed,
            tail.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// Peers reachable from `i` over connections that are up.
    fn component(&self, i: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::from([i]);
        let mut todo = vec![i];
        while let Some(a) = todo.pop() {
            for &(x, y) in &self.links {
                let b = if x == a {
                    y
                } else if y == a {
                    x
                } else {
                    continue;
                };
                if seen.insert(b) {
                    todo.push(b);
                }
            }
        }
        seen
    }

    fn send(&mut self, from: usize, to: usize, bytes: Vec<u8>) {
        if !self.links.contains(&key(from, to)) {
            return;
        }
        let q = self.queues.entry((from, to)).or_default();
        let last = q.back().map_or(self.now, |(t, _)| *t);
        let at = last.max(self.now + Duration::from_millis(1 + self.rng.below(300) as u64));
        self.queues
            .entry((from, to))
            .or_default()
            .push_back((at, bytes));
    }

    fn neighbours(&self, i: usize) -> Vec<usize> {
        self.links
            .iter()
            .filter_map(|&(a, b)| {
                if a == i {
                    Some(b)
                } else if b == i {
                    Some(a)
                } else {
                    None
                }
            })
            .collect()
    }

    /// What a peer's daemon tells its core (as the router does).
    fn tell(&mut self, i: usize) {
        let p = &self.peers[i];
        let told = Told {
            targets: p.targets.len(),
            unreached: p
                .targets
                .iter()
                .filter(|t| !p.reached.contains(t))
                .map(|t| format!("198.18.0.{}:6783", t + 1))
                .collect(),
            peers: p.known.iter().map(|j| name(*j)).collect(),
        };
        if let Some(c) = self.peers[i].core.as_mut() {
            c.set_told(told);
        }
    }

    /// Gossip our own changes to every neighbour.
    fn flush(&mut self, i: usize) {
        let Some(d) = self.peers[i].core.as_mut().and_then(|c| c.take_delta()) else {
            return;
        };
        for j in self.neighbours(i) {
            self.send(i, j, d.clone());
        }
    }

    fn drop_link(&mut self, a: usize, b: usize, why: &str) {
        if self.links.remove(&key(a, b)) {
            self.trace.push(format!("link {a}-{b} down: {why}"));
        }
        self.queues.remove(&(a, b));
        self.queues.remove(&(b, a));
        let back = self.now + Duration::from_millis(200 + self.rng.below(3000) as u64);
        self.retry_at.insert(key(a, b), back);
    }

    /// A new connection: learn each other (and what the other knows, as
    /// the topology does), then exchange whole states.
    fn connect(&mut self, a: usize, b: usize) {
        self.links.insert(key(a, b));
        self.trace.push(format!("link {a}-{b} up"));
        for (x, y) in [(a, b), (b, a)] {
            let theirs = self.peers[y].known.clone();
            let p = &mut self.peers[x];
            p.known.insert(y);
            p.known.extend(theirs.into_iter().filter(|k| *k != x));
        }
        for (x, y) in [(a, b), (b, a)] {
            if let Some(e) = self.peers[x].core.as_ref().map(|c| c.encode()) {
                self.send(x, y, e);
            }
        }
    }

    fn step(&mut self, active: bool) {
        self.now += STEP;
        let now = self.now;
        let n = self.n();
        // Boots and restarts.
        for i in 0..n {
            if !self.peers[i].booted && self.boot_at[i] <= now {
                self.peers[i].booted = true;
                self.peers[i].core = Some(Ipam::new(id(i), config()));
                self.trace.push(format!("boot {i}"));
            }
            if let Some((bytes, t)) = self.peers[i].crashed.clone() {
                if t <= now {
                    match Ipam::restore(id(i), config(), &bytes) {
                        Ok(c) => self.peers[i].core = Some(c),
                        Err(e) => self.fail(format!("restore of {i}: {e}")),
                    }
                    self.peers[i].crashed = None;
                    self.trace.push(format!("restart {i}"));
                }
            }
        }
        // Faults, while active: partitions during ring creation, dropped
        // connections (loss), crashes.
        if active {
            match self.heal_at {
                Some(t) if t <= now => {
                    self.group = vec![0; n];
                    self.heal_at = None;
                    self.trace.push("heal".into());
                }
                None if self.rng.chance(0.01) => {
                    for g in self.group.iter_mut() {
                        *g = u8::from(self.rng.chance(0.5));
                    }
                    self.heal_at = Some(now + Duration::from_secs(1 + self.rng.below(8) as u64));
                    self.trace.push(format!("partition {:?}", self.group));
                }
                _ => {}
            }
            if self.rng.chance(0.03) {
                let links: Vec<_> = self.links.iter().copied().collect();
                if !links.is_empty() {
                    let (a, b) = links[self.rng.below(links.len())];
                    self.drop_link(a, b, "loss");
                }
            }
            if self.rng.chance(0.01) {
                let i = self.rng.below(n);
                if let Some(c) = self.peers[i].core.take() {
                    let back = now + Duration::from_millis(500 + self.rng.below(4000) as u64);
                    self.peers[i].crashed = Some((c.persist(), back));
                    // What lives in memory only: the topology, targets reached.
                    self.peers[i].waiting.clear();
                    self.peers[i].known.clear();
                    self.peers[i].reached.clear();
                    for j in 0..n {
                        if self.links.contains(&key(i, j)) {
                            self.drop_link(i, j, "crash");
                        }
                    }
                    self.trace.push(format!("crash {i}"));
                }
            }
        }
        // Links that cannot be up go down.
        let cut: Vec<(usize, usize)> = self
            .links
            .iter()
            .copied()
            .filter(|&(a, b)| !self.up(a) || !self.up(b) || self.group[a] != self.group[b])
            .collect();
        for (a, b) in cut {
            self.drop_link(a, b, "down or partitioned");
        }
        // Topology gossip: neighbours learn what the other knows.
        let links: Vec<(usize, usize)> = self.links.iter().copied().collect();
        for (a, b) in links {
            if self.rng.chance(0.5) {
                let (ka, kb) = (self.peers[a].known.clone(), self.peers[b].known.clone());
                self.peers[a]
                    .known
                    .extend(kb.into_iter().filter(|k| *k != a));
                self.peers[b]
                    .known
                    .extend(ka.into_iter().filter(|k| *k != b));
            }
        }
        // Dial: targets, and peers learned (the connection maker).
        for a in 0..n {
            if !self.up(a) {
                continue;
            }
            let wanted: Vec<usize> = self.peers[a]
                .targets
                .iter()
                .chain(self.peers[a].known.iter())
                .copied()
                .collect();
            for b in wanted {
                let k = key(a, b);
                if a == b
                    || !self.up(b)
                    || self.group[a] != self.group[b]
                    || self.links.contains(&k)
                    || self.retry_at.get(&k).is_some_and(|t| *t > now)
                {
                    continue;
                }
                self.connect(a, b);
            }
        }
        // Deliver what is due, in order per direction.
        let dirs: Vec<(usize, usize)> = self.queues.keys().copied().collect();
        for (from, to) in dirs {
            loop {
                let due = self
                    .queues
                    .get(&(from, to))
                    .and_then(|q| q.front())
                    .is_some_and(|(t, _)| *t <= now);
                if !due || !self.links.contains(&key(from, to)) {
                    break;
                }
                let Some((_, bytes)) = self.queues.get_mut(&(from, to)).and_then(|q| q.pop_front())
                else {
                    break;
                };
                // A target is reached once its whole state (the first thing
                // it sends on a connection) arrived.
                if self.peers[to].targets.contains(&from) {
                    self.peers[to].reached.insert(from);
                }
                self.tell(to);
                let peer = &mut self.peers[to];
                let Some(core) = peer.core.as_mut() else {
                    break;
                };
                match core.merge(&bytes, &mut peer.keys) {
                    Ok(Some(news)) => {
                        for j in self.neighbours(to) {
                            if j != from {
                                self.send(to, j, news.clone());
                            }
                        }
                        self.flush(to);
                    }
                    Ok(None) => self.flush(to),
                    Err(e) => {
                        self.trace.push(format!("{to} refuses {from}: {e}"));
                        self.flush(to);
                        self.drop_link(from, to, "refused");
                        break;
                    }
                }
            }
        }
        // Ticks.
        for i in 0..n {
            if !self.up(i) {
                continue;
            }
            let reach: BTreeSet<PeerName> = self
                .component(i)
                .into_iter()
                .filter(|j| *j != i)
                .map(name)
                .collect();
            self.tell(i);
            if let Some(c) = self.peers[i].core.as_mut() {
                c.tick(now, &reach);
            }
            self.flush(i);
        }
        // Attaches from the first instant; retries of those waiting.
        if active && self.rng.chance(0.3) {
            let i = self.rng.below(n);
            if self.up(i) {
                self.ids += 1;
                let id = format!("c{}", self.ids);
                self.peers[i].waiting.push(id);
            }
        }
        if active && self.rng.chance(0.05) {
            let i = self.rng.below(n);
            if let Some(c) = self.peers[i].core.as_mut() {
                if let Some((id, a)) = c.claims().first().cloned() {
                    c.release(&id, Some(a));
                    self.trace.push(format!("{i} releases {a}"));
                }
            }
            self.flush(i);
        }
        for i in 0..n {
            let waiting = std::mem::take(&mut self.peers[i].waiting);
            let mut still = Vec::new();
            for id in waiting {
                self.tell(i);
                let Some(c) = self.peers[i].core.as_mut() else {
                    break;
                };
                let subnet = c.config().default_subnet;
                match c.allocate(now, &id, subnet) {
                    Ok(a) => self.trace.push(format!("{i} allocates {a} to {id}")),
                    Err(AllocError::Wait(_)) => still.push(id),
                    Err(AllocError::Refused(e)) => self.fail(format!("{i} refused {id}: {e}")),
                }
            }
            self.peers[i].waiting = still;
            self.flush(i);
        }
        for i in 0..n {
            let ring = self.peers[i]
                .core
                .as_ref()
                .and_then(|c| c.ring().map(<[_]>::to_vec));
            if ring.is_some() && ring != self.peers[i].ring {
                let owners: Vec<String> = ring.iter().flatten().map(|o| o.to_string()).collect();
                self.trace
                    .push(format!("{i} has the ring [{}]", owners.join(", ")));
            }
            self.peers[i].ring = ring;
        }
        self.check_unique();
    }

    /// No address held by two containers, crashed peers' saved claims
    /// included.
    fn check_unique(&self) {
        let mut seen: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
        for (i, p) in self.peers.iter().enumerate() {
            let claims = match (&p.core, &p.crashed) {
                (Some(c), _) => c.claims(),
                (None, Some((bytes, _))) => match Ipam::restore(id(i), config(), bytes) {
                    Ok(c) => c.claims(),
                    Err(e) => self.fail(format!("restore of {i}: {e}")),
                },
                (None, None) => Vec::new(),
            };
            for (_, a) in claims {
                if let Some(j) = seen.insert(a, i) {
                    self.fail(format!("{a} held by peers {j} and {i}"));
                }
            }
        }
    }

    /// Everything booted and healed, no more faults: one ring everywhere,
    /// and every waiting container served.
    fn settle(&mut self) {
        self.group = vec![0; self.n()];
        self.heal_at = None;
        for p in &mut self.peers {
            if let Some((_, t)) = p.crashed.as_mut() {
                *t = self.now;
            }
        }
        for _ in 0..600 {
            self.step(false);
            let rings: BTreeSet<Option<Vec<PeerName>>> = self
                .peers
                .iter()
                .map(|p| p.core.as_ref().and_then(|c| c.ring().map(<[_]>::to_vec)))
                .collect();
            let waiting = self.peers.iter().any(|p| !p.waiting.is_empty());
            if rings.len() == 1 && !waiting {
                return;
            }
        }
        let rings: Vec<Option<Vec<String>>> = self
            .peers
            .iter()
            .map(|p| {
                p.core
                    .as_ref()
                    .and_then(|c| c.ring().map(|r| r.iter().map(|n| n.to_string()).collect()))
            })
            .collect();
        let waiting: Vec<usize> = self.peers.iter().map(|p| p.waiting.len()).collect();
        self.fail(format!(
            "not settled after 60 s: rings {rings:?}, containers waiting per peer {waiting:?}"
        ));
    }
}

fn explore(seed: u64) {
    let mut sim = Sim::new(seed);
    for _ in 0..STEPS {
        sim.step(true);
    }
    sim.settle();
}

#[test]
fn boot_orders_loss_and_partitions_make_one_ring_and_no_duplicate() {
    if let Some(seed) = std::env::var("MESH_BOOT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        explore(seed);
        return;
    }
    let seeds: u64 = std::env::var("MESH_BOOT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    for seed in 0..seeds {
        explore(seed);
    }
    eprintln!("explored {seeds} seeds of {STEPS} steps each (plus settling)");
}
