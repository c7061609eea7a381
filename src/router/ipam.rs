//! The address allocator's driver: the thin layer between the router task
//! and the sans-IO ring in [`mesh_proto::ipam`].
//!
//! The ring is one of the gossip core's named channels (`ipam`). The gossip
//! core owns a boxed [`GossipData`], so the ring lives behind an
//! `Arc<Mutex<_>>` shared by the channel and this driver; both are used from
//! the router task only, so the lock is never contended.
//!
//! Ordering is what keeps addresses unique across crashes: every change the
//! ring makes on our behalf (an allocation, a donation, a reclaim) is written
//! to `$MESH_DATA_DIR/ipam.bin` (sealed with a checksum, atomically, fsynced)
//! before it is answered or its delta gossiped. The write runs on a saver
//! thread ([`super::saver`]), so a slow disk holds back only what waits for
//! it; a failed write fails the allocations it carried (their addresses are
//! released again, said once in the log and in `mesh status ipam`) and their
//! deltas wait for a write that succeeds. A SIGKILL at any instant therefore
//! loses nothing anyone else was promised.
//!
//! A corrupt `ipam.bin` is moved aside and the ring starts empty, in
//! *recovery*: our record (what we hold) and the ring come back from the
//! peers' gossip, and until a peer has synced with us (or, with no peer,
//! until `--ipalloc-timeout`) nothing is allocated, claimed, reconciled or
//! donated; `mesh status ipam` says why.
//!
//! Requests that cannot be satisfied yet (ring not agreed, space asked of
//! another peer) are kept here and retried after every change and every
//! tick, until their deadline; then they fail with the ring's own account of
//! what it waits for. Nothing hangs.

use super::channel::ChannelDriver;
use super::saver::{Durable, File, Saved};
use crate::api::{IpamPeer, IpamStatus};
use crate::persist;
use durable::{Held, Recovery};
use ipnet::Ipv4Net;
use mesh_proto::gossip::{Gossip, GossipData};
use mesh_proto::ipam::{AllocError, Config, Ipam, Note, Status, Told};
use mesh_proto::name::PeerName;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

mod durable;

/// The gossip channel's name.
pub const CHANNEL: &str = "ipam";

/// The answer to an allocation: the address with its subnet's prefix.
pub type AllocReply = oneshot::Sender<Result<ipnet::Ipv4Net, String>>;

/// What the attach manager and the API ask of the allocator.
pub enum Cmd {
    /// Allocate one address in `subnet` (the default subnet when `None`)
    /// for container `id`.
    Allocate {
        /// The container's allocation id.
        id: String,
        /// Where.
        subnet: Option<Ipv4Net>,
        /// The answer.
        reply: AllocReply,
    },
    /// Claim `addr` (inside the range) for container `id`.
    Claim {
        /// The container's allocation id.
        id: String,
        /// The address with its subnet's prefix.
        addr: Ipv4Net,
        /// The answer.
        reply: AllocReply,
    },
    /// Hand `addr` from allocation id `from` to `to` (the Docker plugin's
    /// address to the container joining with it); answers whether `from`
    /// held it.
    HandOver {
        /// The id holding it now.
        from: String,
        /// The id to hold it.
        to: String,
        /// The address.
        addr: Ipv4Addr,
        /// Whether it was handed over.
        reply: oneshot::Sender<bool>,
    },
    /// Release one address of `id`, or all of them.
    Release {
        /// The container's allocation id.
        id: String,
        /// One address, or all when `None`.
        addr: Option<Ipv4Addr>,
    },
    /// After a restart: make the claims match the containers still attached
    /// (claim what they hold, release the rest).
    Reconcile {
        /// Allocation id → addresses (inside the range) of every container
        /// still attached.
        live: Vec<(String, Vec<Ipv4Net>)>,
    },
    /// Create the ring now (`mesh prime`).
    Prime,
    /// Take over a dead peer's space, with the majority's agreement.
    RmPeer {
        /// Peer name or nickname.
        peer: String,
        /// The answer.
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Hand all our space to a live peer (`mesh reset`).
    Leave {
        /// Who received it.
        reply: oneshot::Sender<Result<Option<String>, String>>,
    },
}

/// The shared ring, as the gossip channel sees it.
struct Channel(Arc<Mutex<Ipam>>);

fn lock(m: &Mutex<Ipam>) -> MutexGuard<'_, Ipam> {
    // A panic while holding the lock cannot leave the ring half-changed in
    // a way the next call cannot cope with: every change is one method.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl GossipData for Channel {
    fn encode(&self) -> Vec<u8> {
        lock(&self.0).encode()
    }
    fn merge(
        &mut self,
        payload: &[u8],
        keys: &mut mesh_proto::sign::KeyBook,
    ) -> Result<Option<Vec<u8>>, String> {
        lock(&self.0).merge(payload, keys)
    }
    fn digest(&self) -> u64 {
        lock(&self.0).digest()
    }
    fn split(&self, payload: Vec<u8>, max: usize) -> Vec<Vec<u8>> {
        mesh_proto::ipam::split_payload(payload, max)
    }
}

enum Want {
    Alloc(Option<Ipv4Net>),
    Claim(Ipv4Net),
}

struct Pending {
    id: String,
    want: Want,
    /// When it was asked, for the allocation latency.
    since: Instant,
    deadline: Instant,
    reply: AllocReply,
}

/// The driver, owned by the router.
pub struct Driver {
    ring: Arc<Mutex<Ipam>>,
    /// `ipam.bin`, and what waits for it to be written.
    disk: Durable<Held>,
    recovery: Option<Recovery>,
    pending: Vec<Pending>,
    timeout: Duration,
    problems: Vec<String>,
    /// How many targets are not our own address, and which of those no
    /// connection has reached yet.
    targets: (usize, Vec<String>),
}

impl Driver {
    /// Load the persisted ring, or start a new one.
    pub fn load(
        me: mesh_proto::sign::Identity,
        config: Config,
        data_dir: PathBuf,
        timeout: Duration,
    ) -> anyhow::Result<Driver> {
        let path = data_dir.join(crate::paths::IPAM);
        let range = config.range;
        let next = "starting with an empty ring and re-learning this peer's claims from the mesh; nothing is allocated until a peer has synced with us (see `mesh status ipam`)";
        let loaded = persist::load_or_move_aside(&path, next, |bytes, sealed| {
            match Ipam::restore(me.clone(), copy(&config), bytes) {
                Ok(ring) => Ok(Ok(ring)),
                // Bytes of before the checksum that do not decode are
                // damaged; a sound file for another range is the user's
                // to settle.
                Err(e) if !sealed && e.starts_with("malformed") => {
                    Err(persist::Corrupt::Payload(e))
                }
                Err(e) => Ok(Err(e)),
            }
        })?
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot use the saved address ring {} for --ipalloc-range {range}: {e} (to start over, `mesh reset` or remove the file)",
                path.display()
            )
        })?;
        let (ring, recovery) = match loaded {
            persist::Loaded::Found(ring) => (ring, None),
            persist::Loaded::Missing => (Ipam::new(me, config), None),
            persist::Loaded::MovedAside { aside } => (
                Ipam::new(me, config),
                Some(Recovery {
                    aside,
                    until: Instant::now() + timeout,
                    generation: 0,
                    news: None,
                    reconcile: None,
                    prime: false,
                }),
            ),
        };
        let disk = Durable::new(
            File::Ipam,
            path,
            ring.generation(),
            "the address ring",
            "allocations fail and our changes are not gossiped",
        );
        Ok(Driver {
            ring: Arc::new(Mutex::new(ring)),
            disk,
            recovery,
            pending: Vec::new(),
            timeout,
            problems: Vec::new(),
            targets: (0, Vec::new()),
        })
    }

    /// The connection targets: how many are not our own address, and which
    /// of those no connection has reached yet.
    pub fn set_targets(&mut self, count: usize, unreached: Vec<String>) {
        self.targets = (count, unreached);
    }

    /// Hand the ring what we were told about other peers. Only the
    /// creation of the ring needs it: once there is one, nothing is done.
    fn tell(&self, ring: &mut Ipam, gossip: &Gossip) {
        if ring.ring().is_some() {
            return;
        }
        let me = gossip.name();
        ring.set_told(Told {
            targets: self.targets.0,
            unreached: self.targets.1.clone(),
            peers: gossip.known_names().filter(|p| *p != me).collect(),
        });
    }

    /// Handle one request. Call [`Driver::settle`] afterwards.
    pub fn command(&mut self, cmd: Cmd, gossip: &Gossip) {
        let now = Instant::now();
        self.tell(&mut lock(&self.ring), gossip);
        match cmd {
            Cmd::Allocate { id, subnet, reply } => self.pending.push(Pending {
                id,
                want: Want::Alloc(subnet),
                since: now,
                deadline: now + self.timeout,
                reply,
            }),
            Cmd::Claim { id, addr, reply } => self.pending.push(Pending {
                id,
                want: Want::Claim(addr),
                since: now,
                deadline: now + self.timeout,
                reply,
            }),
            Cmd::HandOver {
                from,
                to,
                addr,
                reply,
            } => {
                let done = lock(&self.ring).hand_over(&from, &to, addr);
                let _ = reply.send(done);
            }
            Cmd::Release { id, addr } => {
                let freed = lock(&self.ring).release(&id, addr);
                if !freed.is_empty() {
                    info!(container = %id, addrs = ?freed, "addresses released");
                }
            }
            Cmd::Reconcile { live } => match &mut self.recovery {
                Some(r) => r.reconcile = Some(live),
                None => self.reconcile(now, live),
            },
            Cmd::Prime => match &mut self.recovery {
                Some(r) => r.prime = true,
                None => lock(&self.ring).prime(now),
            },
            Cmd::RmPeer { reply, .. } if self.recovery.is_some() => {
                let _ = reply.send(Err(self.recovering_why()));
            }
            Cmd::Leave { reply } if self.recovery.is_some() => {
                let _ = reply.send(Err(self.recovering_why()));
            }
            Cmd::RmPeer { peer, reply } => {
                // Judged by who is reachable now, as `mesh status peers`
                // shows it, not at the last tick.
                let reachable = reachable(gossip);
                let r = resolve(gossip, &peer).and_then(|name| {
                    if name == gossip.name() {
                        return Err("cannot rmpeer ourselves: use `mesh reset` to leave".into());
                    }
                    let mut ring = lock(&self.ring);
                    ring.tick(now, &reachable);
                    ring.rmpeer(now, name)
                        .map(|()| format!("reclaiming the space of {name}: proposed to the peers of the ring; `mesh status ipam` shows when it is agreed"))
                });
                let _ = reply.send(r);
            }
            Cmd::Leave { reply } => {
                let reachable = reachable(gossip);
                let r = lock(&self.ring)
                    .leave(now, &reachable)
                    .map(|p| p.map(|p| p.to_string()));
                let _ = reply.send(r);
            }
        }
    }

    fn reconcile(&mut self, now: Instant, live: Vec<(String, Vec<Ipv4Net>)>) {
        let mut ring = lock(&self.ring);
        let keep: BTreeSet<(String, Ipv4Addr)> = live
            .iter()
            .flat_map(|(id, addrs)| addrs.iter().map(move |a| (id.clone(), a.addr())))
            .collect();
        for (id, addr) in ring.claims() {
            if !keep.contains(&(id.clone(), addr)) {
                info!(container = %id, %addr, "container gone while we were stopped: address released");
                ring.release(&id, Some(addr));
            }
        }
        let held: BTreeSet<(String, Ipv4Addr)> = ring.claims().into_iter().collect();
        for (id, addrs) in &live {
            for a in addrs {
                if held.contains(&(id.clone(), a.addr())) {
                    continue;
                }
                if let Err(e) = ring.claim(now, id, a.addr(), a.trunc()) {
                    let p = format!(
                        "container {id} holds {a} but the ring does not record it as ours: {e}"
                    );
                    warn!("{p}");
                    self.problems.push(p);
                }
            }
        }
    }

    /// The earliest deadline of a waiting request.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.deadline).min()
    }

    /// For `mesh status ipam` and `mesh report`.
    pub fn status(&self, gossip: &Gossip) -> IpamStatus {
        let peers = gossip.peers();
        let s: Status = lock(&self.ring).status(Instant::now(), &reachable(gossip));
        let nicknames: BTreeMap<String, String> = peers
            .into_iter()
            .map(|p| (p.name.to_string(), p.nickname))
            .collect();
        IpamStatus {
            range: s.range,
            default_subnet: s.default_subnet,
            state: match &self.recovery {
                Some(_) => format!("recovering: {}", self.recovering_why()),
                None => s.state.to_string(),
            },
            peers: s
                .peers
                .into_iter()
                .map(|p| IpamPeer {
                    nickname: nicknames.get(&p.peer).cloned().unwrap_or_default(),
                    peer: p.peer,
                    owned: p.owned,
                    free: p.free,
                    reachable: p.reachable,
                })
                .collect(),
            pending: s.pending,
            problems: s
                .problems
                .into_iter()
                .chain(self.problems.iter().cloned())
                .chain(self.disk.error().map(|e| {
                    format!(
                        "cannot save {}: {e}; allocations fail until it can be written",
                        self.disk.path().display()
                    )
                }))
                .chain(self.recovery.is_some().then(|| self.recovering_why()))
                .collect(),
        }
    }
}

impl ChannelDriver for Driver {
    /// Plug the ring into the gossip core as the `ipam` channel.
    fn register(&self, gossip: &mut Gossip) {
        gossip.add_channel(CHANNEL, Box::new(Channel(self.ring.clone())));
    }

    /// Periodic work: drive consensus, space requests and reclaims.
    fn tick(&mut self, gossip: &Gossip) {
        let now = Instant::now();
        self.recover(now, gossip);
        if self.recovery.is_some() {
            // Nothing of ours is known yet: no donation, no vote.
            return;
        }
        if self.disk.retry_due() {
            self.persist(true);
        }
        let reachable = reachable(gossip);
        let mut ring = lock(&self.ring);
        self.tell(&mut ring, gossip);
        ring.tick(now, &reachable);
    }

    /// A peer was garbage-collected by the topology.
    fn forget_peer(&mut self, peer: PeerName) {
        lock(&self.ring).forget_peer(peer);
    }

    /// After anything that may have changed the ring: persist, gossip our
    /// changes, retry waiting requests, fail those past their deadline.
    /// Persisting comes first: nothing is answered or sent that a crash
    /// could take back.
    fn settle(&mut self, gossip: &mut Gossip) {
        let now = Instant::now();
        // Serve what can be served; each success changes the ring.
        let mut waiting = Vec::new();
        let mut answers = Vec::new();
        let recovering = self.recovery.as_ref().map(|_| self.recovering_why());
        {
            let mut ring = lock(&self.ring);
            for p in self.pending.drain(..) {
                if let Some(why) = &recovering {
                    if now >= p.deadline {
                        let e = format!("no address after {}s: {why}", self.timeout.as_secs());
                        answers.push((p.since, p.reply, p.id, Err(e)));
                    } else {
                        waiting.push(p);
                    }
                    continue;
                }
                let r = match &p.want {
                    Want::Alloc(subnet) => {
                        let subnet = subnet.unwrap_or(ring.config().default_subnet);
                        ring.allocate(now, &p.id, subnet)
                            .map(|a| Ipv4Net::new(a, subnet.prefix_len()).unwrap_or(subnet))
                    }
                    Want::Claim(addr) => ring
                        .claim(now, &p.id, addr.addr(), addr.trunc())
                        .map(|()| *addr),
                };
                match r {
                    Ok(a) => answers.push((p.since, p.reply, p.id, Ok(a))),
                    Err(AllocError::Refused(e)) => answers.push((p.since, p.reply, p.id, Err(e))),
                    Err(AllocError::Wait(why)) if now >= p.deadline => answers.push((
                        p.since,
                        p.reply,
                        p.id,
                        Err(format!(
                            "no address after {}s: {why} (see `mesh status ipam`)",
                            self.timeout.as_secs()
                        )),
                    )),
                    Err(AllocError::Wait(_)) => waiting.push(p),
                }
            }
        }
        self.pending = waiting;
        for note in lock(&self.ring).take_notes() {
            match note {
                Note::Adopted(n) => info!("{n}"),
                Note::Met(n) => warn!("{n}"),
                Note::Refused(n) => {
                    if crate::warn::WarnLimit::allow(crate::warn::Kind::Gossip) {
                        warn!("{n}");
                    }
                }
            }
        }
        // Each success, and our delta, waits for its state to be on disk.
        let generation = self.persist(false);
        let delta = lock(&self.ring).take_delta();
        if let Some(d) = delta {
            self.promise(gossip, generation, Held::Delta(d));
        }
        for (since, reply, id, r) in answers {
            match r {
                Ok(addr) => self.promise(
                    gossip,
                    generation,
                    Held::Answer {
                        reply,
                        id,
                        addr,
                        since,
                    },
                ),
                Err(e) => {
                    observe_latency(since);
                    let _ = reply.send(Err(e));
                }
            }
        }
        if let Some(failed) = self.disk.failed(generation) {
            // Saved here, without a saver, and it failed.
            self.release_held(gossip, Some(failed));
        }
    }

    fn start_saver(&mut self, done: mpsc::UnboundedSender<Saved>) {
        self.disk.start(done);
    }

    fn saved(&mut self, gossip: &mut Gossip, s: Saved) {
        let failed = s.result.is_err().then_some(s.generation);
        self.disk.record(s.generation, s.result);
        self.release_held(gossip, failed);
    }
}

/// A copy of the ring's configuration (which is not `Clone`).
/// An allocation asked at `since` is answered now (the metrics'
/// `mesh_ipam_allocation_seconds`).
fn observe_latency(since: Instant) {
    crate::metrics::instruments()
        .ipam_allocation_seconds
        .observe(since.elapsed().as_secs_f64());
}

fn copy(c: &Config) -> Config {
    Config {
        range: c.range,
        default_subnet: c.default_subnet,
        init: c.init.clone(),
        reclaim_after: c.reclaim_after,
    }
}

/// Peers reachable over the mesh now, excluding us: those the topology
/// routes to, and our direct neighbours (whose connections the topology
/// counts only once both ends have gossiped them).
fn reachable(gossip: &Gossip) -> BTreeSet<PeerName> {
    gossip
        .reachable_names()
        .chain(gossip.neighbours())
        .collect()
}

/// A peer by name or nickname.
fn resolve(gossip: &Gossip, s: &str) -> Result<PeerName, String> {
    if let Ok(n) = s.parse::<PeerName>() {
        return Ok(n);
    }
    let matches: Vec<PeerName> = gossip
        .peers()
        .into_iter()
        .filter(|p| p.nickname == s)
        .map(|p| p.name)
        .collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => Err(format!(
            "unknown peer {s:?}: give a peer name (aa:bb:cc:dd:ee:ff) or the nickname of a peer this one knows (`mesh status peers` lists them)"
        )),
        _ => Err(format!(
            "nickname {s:?} is used by several peers: give the peer name"
        )),
    }
}
