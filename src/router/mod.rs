//! The router: the one task that knows every connection and owns the
//! gossip core.
//!
//! Connection tasks report their progress here; the router keeps the table
//! that `mesh status` shows, decides which of two connections to the same
//! peer survives (the one initiated by the lower peer name, so both ends
//! agree without talking), feeds connection changes and gossip messages to
//! the sans-IO [`Gossip`] core, sends what it emits to the neighbours, pushes
//! the routes it computes to the sleeve, and the peers it learns to the
//! connection maker.
//!
//! State files are written by saver threads ([`saver`]), never on this
//! task: a slow disk cannot stall connections, heartbeats or status. Their
//! reports come back here, and only then is what depended on them gossiped
//! or answered.

mod channel;
pub mod connmaker;
pub mod control;
pub mod ipam;
mod msg;
pub mod names;
mod saver;

use crate::api::{ConnState, ConnStatus, Overlay, PeerConn, PeerStatus, SleeveStats, Status};
use crate::datapath::{fastdp, sleeve};
use crate::peer::Me;
use crate::warn::{Kind, WarnLimit};
use channel::ChannelDriver;
use mesh_proto::conn::DUPLICATE;
use mesh_proto::gossip::{self, Event, Gossip};
use mesh_proto::name::PeerName;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// How often the allocator's ring is driven (consensus, space requests,
/// reclaims) without other news.
const IPAM_TICK: std::time::Duration = std::time::Duration::from_secs(1);

pub use msg::{Cmd, ConnId, Established};

struct Active {
    id: ConnId,
    initiator: PeerName,
    udp: SocketAddr,
    close: Option<oneshot::Sender<String>>,
    gossip: mpsc::Sender<Vec<u8>>,
}

struct Router {
    me: Arc<Me>,
    rows: BTreeMap<ConnId, ConnStatus>,
    active: BTreeMap<PeerName, Active>,
    gossip: Gossip,
    sleeve: mpsc::Sender<sleeve::Cmd>,
    connmaker: mpsc::Sender<connmaker::Cmd>,
    routes_dirty: bool,
    candidates_dirty: bool,
    problems: Vec<String>,
    ipam: ipam::Driver,
    names: names::Driver,
    fastdp: Option<mpsc::Sender<fastdp::Cmd>>,
    /// The targets, each with whether a connection reached it yet.
    targets: Vec<(connmaker::Target, bool)>,
    /// Refusals of a peer's gossip already warned about.
    warned: BTreeSet<(PeerName, String)>,
}

/// How many refusals [`Router::warned`] remembers.
const MAX_WARNED: usize = 64;

/// The drivers of the gossip channels other than the topology.
pub struct Channels {
    /// The address allocator.
    pub ipam: ipam::Driver,
    /// The name table.
    pub names: names::Driver,
}

/// Run the router until every sender is gone.
#[allow(clippy::too_many_arguments)] // one channel per task it drives
pub async fn run(
    me: Arc<Me>,
    mut rx: mpsc::Receiver<Cmd>,
    sleeve: mpsc::Sender<sleeve::Cmd>,
    connmaker: mpsc::Sender<connmaker::Cmd>,
    config: gossip::Config,
    incarnation: u64,
    channels: Channels,
    fastdp: Option<mpsc::Sender<fastdp::Cmd>>,
) {
    let Channels {
        mut ipam,
        mut names,
    } = channels;
    let (saved_tx, mut saved_rx) = mpsc::unbounded_channel();
    for c in [&mut ipam as &mut dyn ChannelDriver, &mut names] {
        c.start_saver(saved_tx.clone());
    }
    drop(saved_tx);
    let mut seed = [0u8; 8];
    let _ = getrandom::fill(&mut seed);
    let mut gossip = Gossip::new(
        me.id.clone(),
        me.nickname.clone(),
        incarnation,
        config,
        u64::from_le_bytes(seed),
    );
    for c in [&ipam as &dyn ChannelDriver, &names] {
        c.register(&mut gossip);
    }
    let mut r = Router {
        me,
        rows: BTreeMap::new(),
        active: BTreeMap::new(),
        gossip,
        sleeve,
        connmaker,
        routes_dirty: true,
        candidates_dirty: true,
        problems: Vec::new(),
        ipam,
        names,
        fastdp,
        targets: Vec::new(),
        warned: BTreeSet::new(),
    };
    let mut tick = tokio::time::interval(IPAM_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wake = match (r.gossip.poll_timeout(), r.ipam.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timer = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => return,
                Some(c) => r.command(c).await,
            },
            _ = timer => r.gossip.handle_timeout(Instant::now()),
            _ = tick.tick() => {
                r.tick_channels();
            }
            Some(s) = saved_rx.recv() => r.saved(s),
        }
        r.settle();
        r.pump().await;
    }
}

impl Router {
    /// The gossip core and the drivers of its channels other than the
    /// topology, borrowed apart.
    fn channels(&mut self) -> (&mut Gossip, [&mut dyn ChannelDriver; 2]) {
        (&mut self.gossip, [&mut self.ipam, &mut self.names])
    }

    /// Drive every channel with time.
    fn tick_channels(&mut self) {
        let (gossip, drivers) = self.channels();
        for c in drivers {
            c.tick(gossip);
        }
    }

    /// A saver's report: hand it to its file's driver.
    fn saved(&mut self, s: saver::Saved) {
        match s.file {
            saver::File::Ipam => self.ipam.saved(&mut self.gossip, s),
            saver::File::Names => self.names.saved(&mut self.gossip, s),
        }
    }

    /// Settle every channel: persist, gossip, answer.
    fn settle(&mut self) {
        let (gossip, drivers) = self.channels();
        for c in drivers {
            c.settle(gossip);
        }
    }

    async fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Update { id, row } => {
                self.rows.insert(id, row);
            }
            Cmd::Established(e) => self.established(*e).await,
            Cmd::Closed { id, forget } => self.closed(id, forget).await,
            Cmd::GossipIn { id, from, bytes } => self.gossip_in(id, from, &bytes),
            Cmd::Connected { peer, ip, reply } => {
                let yes = self
                    .active
                    .iter()
                    .any(|(p, a)| Some(*p) == peer || Some(a.udp.ip()) == ip);
                let _ = reply.send(yes);
            }
            Cmd::Sleeve(sleeve::Event::Silent { peer }) => {
                let reason = format!(
                    "no sleeve traffic from {peer} for {}s (is UDP {} blocked?)",
                    sleeve::DEAD_AFTER.as_secs(),
                    self.me.port
                );
                warn!(%peer, "{reason}");
                if let Some(c) = self.active.get_mut(&peer).and_then(|a| a.close.take()) {
                    let _ = c.send(reason);
                }
            }
            Cmd::Status(reply) => {
                let status = self.status().await;
                let _ = reply.send(status);
            }
            Cmd::Ipam(c) => {
                self.ipam.command(c, &self.gossip);
                self.ipam.tick(&self.gossip);
            }
            Cmd::Names(c) => self.names.command(c),
            Cmd::Targets(list) => self.set_targets(list),
            Cmd::LocalMacs(macs) => {
                let _ = self.sleeve.send(sleeve::Cmd::LocalMacs(macs)).await;
            }
        }
    }

    /// A connection ended: forget its row if asked, and the peer it served.
    async fn closed(&mut self, id: ConnId, forget: bool) {
        if forget {
            self.rows.remove(&id);
        }
        let gone: Vec<PeerName> = self
            .active
            .iter()
            .filter(|(_, a)| a.id == id)
            .map(|(p, _)| *p)
            .collect();
        for p in gone {
            self.active.remove(&p);
            info!(peer = %p, "connection lost");
            self.gossip.handle_connection_down(Instant::now(), p);
            let _ = self.sleeve.send(sleeve::Cmd::PeerDown { name: p }).await;
            if let Some(f) = &self.fastdp {
                let _ = f.send(fastdp::Cmd::PeerDown { name: p }).await;
            }
            self.candidates_dirty = true;
        }
    }

    /// Gossip from a neighbour, on the connection that serves it; bad
    /// gossip closes that connection (said once per peer and reason).
    fn gossip_in(&mut self, id: ConnId, from: PeerName, bytes: &[u8]) {
        if self.active.get(&from).is_none_or(|a| a.id != id) {
            return;
        }
        crate::metrics::count_gossip("in", bytes);
        let Err(e) = self.gossip.handle_message(Instant::now(), from, bytes) else {
            return;
        };
        // Each reconnection repeats the same refusal: say it once.
        let said = (from, e.to_string());
        if self.warned.contains(&said) {
            info!(peer = %from, "bad gossip, disconnecting: {e}");
        } else if WarnLimit::allow(Kind::Gossip) {
            warn!(peer = %from, "bad gossip, disconnecting: {e}");
            if self.warned.len() >= MAX_WARNED {
                self.warned.clear();
            }
            self.warned.insert(said);
        }
        if let Some(c) = self.active.get_mut(&from).and_then(|a| a.close.take()) {
            let _ = c.send(format!("bad gossip: {e}"));
        }
    }

    /// The connection maker's targets now; those already reached stay so.
    fn set_targets(&mut self, list: Vec<connmaker::Target>) {
        self.targets = list
            .into_iter()
            .map(|t| {
                let reached = t.addr.is_some_and(|a| {
                    self.active.values().any(|c| c.udp.ip() == a.ip())
                        || self.targets.iter().any(|(o, r)| *r && o.text == t.text)
                });
                (t, reached)
            })
            .collect();
        self.told_ipam();
    }

    /// Tell the allocator which targets there are and which were reached.
    fn told_ipam(&mut self) {
        let others = self.targets.iter().filter(|(t, _)| !t.ours);
        let count = others.clone().count();
        let unreached = others
            .filter(|(_, reached)| !reached)
            .map(|(t, _)| t.addr.map_or(t.text.clone(), |a| a.to_string()))
            .collect();
        self.ipam.set_targets(count, unreached);
    }

    async fn established(&mut self, e: Established) {
        let keep_new = match self.active.get(&e.peer) {
            None => true,
            // Both ends keep the connection dialed by the lower name.
            Some(old) => e.initiator < old.initiator,
        };
        if !keep_new {
            let _ = e.reply.send(false);
            return;
        }
        if let Some(mut old) = self.active.remove(&e.peer) {
            if let Some(c) = old.close.take() {
                let _ = c.send(DUPLICATE.into());
            }
            self.rows.remove(&old.id);
        }
        info!(peer = %e.peer, udp = %e.udp, "connection established");
        if let Some(f) = &self.fastdp {
            let _ = f
                .send(fastdp::Cmd::PeerUp {
                    name: e.peer,
                    ip: e.udp.ip(),
                    agreed: e.fastdp,
                })
                .await;
        }
        let _ = self
            .sleeve
            .send(sleeve::Cmd::PeerUp(Box::new(sleeve::PeerUp {
                name: e.peer,
                addr: e.udp,
                keys: e.keys,
            })))
            .await;
        self.active.insert(
            e.peer,
            Active {
                id: e.id,
                initiator: e.initiator,
                udp: e.udp,
                close: Some(e.close),
                gossip: e.gossip,
            },
        );
        let mut reached = false;
        for (t, r) in &mut self.targets {
            if !*r && t.addr.is_some_and(|a| a.ip() == e.udp.ip()) {
                *r = true;
                reached = true;
            }
        }
        if reached {
            self.told_ipam();
        }
        // Also for a connection that replaced a duplicate: the core then
        // resends what the old one carried (it may have been dropped).
        self.gossip
            .handle_connection_up(Instant::now(), e.peer, e.udp);
        self.candidates_dirty = true;
        let _ = e.reply.send(true);
    }

    /// Move what the gossip core produced to where it goes.
    async fn pump(&mut self) {
        let mut ipam_news = false;
        while let Some(ev) = self.gossip.poll_event() {
            match ev {
                Event::RoutesChanged => self.routes_dirty = true,
                Event::PeerAdded { name } => {
                    info!(peer = %name, "peer learned");
                    self.candidates_dirty = true;
                }
                Event::PeerRemoved { name } => {
                    info!(peer = %name, "peer forgotten");
                    for c in self.channels().1 {
                        c.forget_peer(name);
                    }
                    self.candidates_dirty = true;
                }
                Event::NameCollision {
                    name,
                    nickname,
                    incarnation,
                } => {
                    let p = format!(
                        "another peer claims our name {name} (nickname {nickname}, incarnation {incarnation}): do two hosts share one identity key? Remove identity.key on the clone and relaunch it"
                    );
                    if WarnLimit::allow(Kind::Identity) {
                        warn!("{p}");
                    }
                    if !self.problems.contains(&p) {
                        self.problems.truncate(9);
                        self.problems.insert(0, p);
                    }
                }
                Event::Refused {
                    from,
                    peer,
                    reason,
                    collision,
                } => {
                    if WarnLimit::allow(Kind::Gossip) {
                        warn!(%from, %peer, "gossip refused: {reason}");
                    }
                    if collision {
                        let p = format!("{reason}: two peers hold keys that give one name; the first seen is kept and the other is never merged");
                        if !self.problems.contains(&p) {
                            self.problems.truncate(9);
                            self.problems.insert(0, p);
                        }
                    }
                }
                // The name table needs nothing more than the settle that
                // follows every command; the ring may have to answer.
                Event::ChannelUpdated { channel } => {
                    ipam_news |= channel == ipam::CHANNEL;
                }
            }
        }
        if ipam_news {
            // A request addressed to us, a donation, a vote: act on it now.
            self.ipam.tick(&self.gossip);
            self.ipam.settle(&mut self.gossip);
        }
        while let Some(t) = self.gossip.poll_transmit() {
            if let Some(a) = self.active.get(&t.to) {
                crate::metrics::count_gossip("out", &t.bytes);
                // Never block the router on one slow connection: anti-entropy
                // repairs whatever is dropped here.
                let _ = a.gossip.try_send(t.bytes);
            }
        }
        if self.routes_dirty {
            self.routes_dirty = false;
            let mut routes = sleeve::Routes::default();
            // Names, not `peers()`: its connection lists cost O(peers ×
            // connections) on every recomputation.
            let g = &self.gossip;
            for name in std::iter::once(g.name()).chain(g.reachable_names()) {
                // None for us.
                if let Some(hop) = g.next_hop(name) {
                    routes.unicast.insert(name, hop);
                }
                routes.broadcast.insert(name, g.broadcast_next_hops(name));
            }
            let _ = self.sleeve.send(sleeve::Cmd::Routes(routes)).await;
            self.candidates_dirty = true;
        }
        if self.candidates_dirty {
            self.candidates_dirty = false;
            let _ = self
                .connmaker
                .try_send(connmaker::Cmd::Candidates(self.gossip.dial_candidates()));
        }
    }

    /// The connection rows, with the overlay of each established one.
    async fn connection_rows(&mut self) -> Vec<ConnStatus> {
        let mut rows: Vec<ConnStatus> = self.rows.values().cloned().collect();
        let overlays = match &self.fastdp {
            Some(f) => {
                let (tx, rx) = oneshot::channel();
                let _ = f.send(fastdp::Cmd::Status(tx)).await;
                rx.await.unwrap_or_default()
            }
            None => Default::default(),
        };
        for r in rows
            .iter_mut()
            .filter(|r| r.state == ConnState::Established)
        {
            let Some(peer) = r.peer.as_ref().and_then(|p| p.parse::<PeerName>().ok()) else {
                continue;
            };
            let o = overlays.get(&peer);
            r.overlay = Some(o.map_or(Overlay::Sleeve, |o| o.overlay));
            r.overlay_info = match o {
                Some(o) => o.reason.clone(),
                None if self.fastdp.is_none() => Some("fast path disabled here".into()),
                None => None,
            };
        }
        rows
    }

    async fn status(&mut self) -> Status {
        let (tx, srx) = oneshot::channel();
        let mut stats = if self.sleeve.send(sleeve::Cmd::Stats(tx)).await.is_ok() {
            srx.await.unwrap_or_default()
        } else {
            SleeveStats::default()
        };
        let mtus = std::mem::take(&mut stats.path_mtu);
        let keys = std::mem::take(&mut stats.keys);
        let mut connections = self.connection_rows().await;
        for c in &mut connections {
            c.path_mtu = c.peer.as_ref().and_then(|p| mtus.get(p)).copied();
            if c.state == ConnState::Established {
                c.sleeve_keys = c.peer.as_ref().and_then(|p| keys.get(p)).copied();
            }
        }
        let keys = self.gossip.keys();
        let refused: std::collections::HashMap<_, _> = keys.collisions().collect();
        let peers = self
            .gossip
            .peers()
            .into_iter()
            .map(|p| PeerStatus {
                key: keys.get(p.name).map(|k| k.fingerprint()),
                refused_key: refused.get(&p.name).map(|k| k.fingerprint()),
                name: p.name.to_string(),
                nickname: p.nickname,
                reachable: p.reachable,
                next_hop: p.next_hop.map(|h| h.to_string()),
                connections: p
                    .connections
                    .iter()
                    .map(|c| PeerConn {
                        peer: c.peer.to_string(),
                        address: c.addr.map(|a| a.to_string()),
                        established: c.established,
                    })
                    .collect(),
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: format!(
                "{}..={}",
                mesh_proto::PROTOCOL_MIN_VERSION,
                mesh_proto::PROTOCOL_VERSION
            ),
            name: self.me.name.to_string(),
            nickname: self.me.nickname.clone(),
            encryption: self.me.psk.is_some(),
            port: self.me.port,
            mtu: self.me.mtu,
            connections,
            peers,
            targets: Vec::new(),
            sleeve: stats,
            drops: Default::default(),
            problems: self.problems.clone(),
            ipam: Some(self.ipam.status(&self.gossip)),
            dns: Some(self.names.status()),
        }
    }
}
