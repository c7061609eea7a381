//! The sleeve data path: frames between the TAP on the bridge and UDP 6783.
//!
//! One task owns the TAP, the UDP socket and the forwarding state (peers,
//! their keys, learned MACs), so nothing is shared or locked. Frames read
//! from the TAP (10-byte virtio-net header + Ethernet frame, up to a 64 KB
//! super-frame) go to the peer that owns the destination MAC, or to every
//! peer for broadcast, multicast and unknown destinations. After each
//! blocking read the TAP is drained without blocking, so bursts are packed
//! several frames to a datagram ([`Packer`]). Datagrams from the overlay are
//! checked (known sender, addressed to us, sealed when a password is set),
//! teach "this MAC is behind that peer", and are written to the TAP.

use crate::api::SleeveStats;
use crate::host::Tap;
use mesh_proto::name::PeerName;
use mesh_proto::reassembly::Reassembler;
use mesh_proto::seal::{Opener, Sealer};
use mesh_proto::sleeve::{self, Packer, Record, VNET_HDR_LEN};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, trace, warn};

/// Frames drained from the TAP per wake-up before flushing.
const BATCH: usize = 64;
/// Buffer for one TAP read or UDP datagram.
const BUF: usize = sleeve::MAX_FRAME + 64;

/// How often an empty datagram is sent to each neighbour.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence on the sleeve after which a neighbour's connection is dropped.
pub const DEAD_AFTER: Duration = Duration::from_secs(6);

/// What the sleeve tells the router.
#[derive(Debug)]
pub enum Event {
    /// Nothing has arrived from this neighbour over UDP for [`DEAD_AFTER`],
    /// although its control connection is up (UDP blocked, or a wrong
    /// address): its connection must not carry routes.
    Silent {
        /// The neighbour.
        peer: PeerName,
    },
}

/// Commands to the sleeve task.
pub enum Cmd {
    /// A peer is directly connected: send to it at `addr`.
    PeerUp(Box<PeerUp>),
    /// A direct connection is gone.
    PeerDown {
        /// The peer.
        name: PeerName,
    },
    /// New routes (replaces the old ones).
    Routes(Routes),
    /// Counters.
    Stats(oneshot::Sender<SleeveStats>),
}

/// A connected peer, as the sleeve needs it.
pub struct PeerUp {
    /// The peer.
    pub name: PeerName,
    /// Its UDP address.
    pub addr: SocketAddr,
    /// Sealer for our datagrams to it (with a password).
    pub sealer: Option<Sealer>,
    /// Opener for its datagrams (with a password).
    pub opener: Option<Opener>,
}

/// Where to send frames for peers we are not directly connected to.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// Destination peer → the neighbour to send through.
    pub unicast: HashMap<PeerName, PeerName>,
    /// Source peer → the neighbours its broadcasts go on to from here.
    pub broadcast: HashMap<PeerName, Vec<PeerName>>,
}

/// Fixed settings.
pub struct Config {
    /// Our name.
    pub me: PeerName,
    /// Whether datagrams must be sealed.
    pub encrypted: bool,
    /// Largest datagram body (payload minus header and tag).
    pub body_budget: usize,
}

struct Peer {
    addr: SocketAddr,
    sealer: Option<Sealer>,
    opener: Option<Opener>,
    seq: u64,
    last_rx: Instant,
    silent: bool,
}

struct Sleeve {
    cfg: Config,
    tap: Tap,
    udp: UdpSocket,
    /// Direct neighbours.
    peers: HashMap<PeerName, Peer>,
    by_addr: HashMap<SocketAddr, PeerName>,
    routes: Routes,
    /// MAC → the peer it lives behind (the frame's origin, not the hop).
    macs: HashMap<[u8; 6], PeerName>,
    /// Per (next hop, destination) packers of the current batch.
    packers: HashMap<(PeerName, PeerName), Packer>,
    reasm: Reassembler,
    stats: SleeveStats,
    out: Vec<u8>,
    last_warn: Option<Instant>,
}

/// Run the data path until the command channel closes.
pub async fn run(
    cfg: Config,
    tap: Tap,
    udp: UdpSocket,
    mut rx: mpsc::Receiver<Cmd>,
    events: mpsc::Sender<Event>,
) {
    let mut s = Sleeve {
        cfg,
        tap,
        udp,
        peers: HashMap::new(),
        by_addr: HashMap::new(),
        routes: Routes::default(),
        macs: HashMap::new(),
        packers: HashMap::new(),
        reasm: Reassembler::new(256, Duration::from_secs(2)),
        stats: SleeveStats::default(),
        out: Vec::with_capacity(BUF),
        last_warn: None,
    };
    let mut tap_buf = vec![0u8; BUF];
    let mut udp_buf = vec![0u8; BUF];
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => s.heartbeat(&events).await,
            cmd = rx.recv() => match cmd {
                None => return,
                Some(c) => s.command(c),
            },
            r = s.tap.dev.recv(&mut tap_buf) => match r {
                Ok(n) => {
                    s.on_tap_frame(&tap_buf[..n]);
                    for _ in 1..BATCH {
                        match s.tap.dev.try_recv(&mut tap_buf) {
                            Ok(n) => s.on_tap_frame(&tap_buf[..n]),
                            Err(_) => break,
                        }
                    }
                    s.flush().await;
                }
                Err(e) => {
                    warn!("TAP read failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            r = s.udp.recv_from(&mut udp_buf) => match r {
                Ok((n, from)) => s.on_datagram(&mut udp_buf[..n], from).await,
                Err(e) => debug!("UDP receive: {e}"),
            },
        }
    }
}

impl Sleeve {
    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::PeerUp(up) => {
                let PeerUp {
                    name,
                    addr,
                    sealer,
                    opener,
                } = *up;
                if let Some(old) = self.peers.get(&name) {
                    self.by_addr.remove(&old.addr);
                }
                self.by_addr.insert(addr, name);
                self.peers.insert(
                    name,
                    Peer {
                        addr,
                        sealer,
                        opener,
                        seq: 0,
                        last_rx: Instant::now(),
                        silent: false,
                    },
                );
            }
            Cmd::PeerDown { name } => {
                if let Some(old) = self.peers.remove(&name) {
                    self.by_addr.remove(&old.addr);
                }
                self.packers.retain(|(hop, _), _| *hop != name);
            }
            Cmd::Routes(r) => {
                self.routes = r;
                // Forget MACs behind peers we can no longer reach.
                let (peers, routes) = (&self.peers, &self.routes);
                self.macs
                    .retain(|_, p| peers.contains_key(p) || routes.unicast.contains_key(p));
            }
            Cmd::Stats(reply) => {
                let _ = reply.send(self.stats.clone());
            }
        }
    }

    /// Send an empty datagram to every neighbour, and report the ones that
    /// have been silent too long.
    async fn heartbeat(&mut self, events: &mpsc::Sender<Event>) {
        let now = Instant::now();
        let neighbours: Vec<PeerName> = self.peers.keys().copied().collect();
        for p in neighbours {
            self.send_body(p, self.cfg.me, p, &[]).await;
            if let Some(peer) = self.peers.get_mut(&p) {
                if !peer.silent && now.duration_since(peer.last_rx) > DEAD_AFTER {
                    peer.silent = true;
                    let _ = events.try_send(Event::Silent { peer: p });
                }
            }
        }
    }

    /// The neighbour to send through towards `dst`.
    fn next_hop(&self, dst: PeerName) -> Option<PeerName> {
        if self.peers.contains_key(&dst) {
            return Some(dst);
        }
        self.routes
            .unicast
            .get(&dst)
            .copied()
            .filter(|h| self.peers.contains_key(h))
    }

    /// The neighbours a broadcast from `src` goes on to from here.
    fn broadcast_hops(&self, src: PeerName) -> Vec<PeerName> {
        match self.routes.broadcast.get(&src) {
            Some(hops) => hops
                .iter()
                .copied()
                .filter(|h| self.peers.contains_key(h))
                .collect(),
            // Before any routes are known: our own broadcasts go to every
            // neighbour; others' are not forwarded.
            None if src == self.cfg.me => self.peers.keys().copied().collect(),
            None => Vec::new(),
        }
    }

    fn warn_limited(&mut self, msg: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if self
            .last_warn
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(5))
        {
            self.last_warn = Some(now);
            warn!("{msg}");
        }
    }

    /// One frame read from the TAP: queue it for its peer(s).
    fn on_tap_frame(&mut self, frame: &[u8]) {
        self.stats.frames_in += 1;
        let owned;
        let frame = if self.tap.vnet_hdr {
            frame
        } else {
            let mut f = vec![0u8; VNET_HDR_LEN];
            f.extend_from_slice(frame);
            owned = f;
            &owned
        };
        let Some((dst_mac, _)) = sleeve::frame_macs(frame) else {
            return;
        };
        let unicast = dst_mac[0] & 1 == 0;
        let budget = self.cfg.body_budget;
        let target = self
            .macs
            .get(&dst_mac)
            .copied()
            .filter(|_| unicast)
            .and_then(|p| self.next_hop(p).map(|hop| (hop, p)));
        match target {
            Some((hop, dst)) => {
                let _ = self
                    .packers
                    .entry((hop, dst))
                    .or_insert_with(|| Packer::new(budget))
                    .push(frame);
            }
            None => {
                for hop in self.broadcast_hops(self.cfg.me) {
                    let _ = self
                        .packers
                        .entry((hop, PeerName::BROADCAST))
                        .or_insert_with(|| Packer::new(budget))
                        .push(frame);
                }
            }
        }
    }

    /// Send one body to neighbour `hop`, as a datagram from `src` to `dst`.
    async fn send_body(&mut self, hop: PeerName, src: PeerName, dst: PeerName, body: &[u8]) {
        let Some(peer) = self.peers.get_mut(&hop) else {
            return;
        };
        peer.seq += 1;
        let sealed = peer.sealer.is_some();
        if let Err(e) = sleeve::emit_datagram(
            src,
            dst,
            body,
            peer.sealer.as_mut(),
            peer.seq,
            &mut self.out,
        ) {
            warn!(peer = %hop, "cannot seal: {e}");
            return;
        }
        let addr = peer.addr;
        match self.udp.send_to(&self.out, addr).await {
            Ok(_) => {
                self.stats.datagrams_out += 1;
                if sealed {
                    self.stats.sealed_out += 1;
                }
            }
            Err(e) => trace!(peer = %hop, "send: {e}"),
        }
    }

    /// Send everything the packers hold.
    async fn flush(&mut self) {
        let me = self.cfg.me;
        let mut batch = Vec::new();
        for ((hop, dst), packer) in self.packers.iter_mut() {
            for body in packer.drain() {
                batch.push((*hop, *dst, body));
            }
        }
        for (hop, dst, body) in batch {
            self.send_body(hop, me, dst, &body).await;
        }
    }

    /// One datagram from the overlay: deliver it, relay it, or both.
    async fn on_datagram(&mut self, buf: &mut [u8], from: SocketAddr) {
        let Some(&neighbour) = self.by_addr.get(&from) else {
            self.stats.dropped += 1;
            self.warn_limited(format_args!(
                "dropped datagram from {from}: not a connected peer"
            ));
            return;
        };
        let encrypted = self.cfg.encrypted;
        let Some(peer) = self.peers.get_mut(&neighbour) else {
            return;
        };
        let opener = if encrypted {
            match peer.opener.as_mut() {
                Some(o) => Some(o),
                None => {
                    self.stats.dropped += 1;
                    return;
                }
            }
        } else {
            None
        };
        let (header, range) = match sleeve::open_datagram(buf, opener) {
            Ok(x) => x,
            Err(e) => {
                self.stats.dropped += 1;
                self.warn_limited(format_args!(
                    "dropped datagram from {from} ({neighbour}): {e}"
                ));
                return;
            }
        };
        if let Some(p) = self.peers.get_mut(&neighbour) {
            p.last_rx = Instant::now();
            p.silent = false;
        }
        if header.src == self.cfg.me {
            self.stats.dropped += 1;
            return;
        }
        self.stats.datagrams_in += 1;
        let body = &buf[range];
        let me = self.cfg.me;
        if header.dst.is_broadcast() {
            let hops: Vec<PeerName> = self
                .broadcast_hops(header.src)
                .into_iter()
                .filter(|h| *h != neighbour && *h != header.src)
                .collect();
            for hop in hops {
                self.stats.relayed += 1;
                self.send_body(hop, header.src, header.dst, body).await;
            }
        } else if header.dst != me {
            match self.next_hop(header.dst).filter(|h| *h != neighbour) {
                Some(hop) => {
                    self.stats.relayed += 1;
                    self.send_body(hop, header.src, header.dst, body).await;
                }
                None => self.stats.dropped += 1,
            }
            return;
        }
        self.deliver(header.src, body).await;
    }

    /// Write the frames of a body addressed to us (or broadcast) to the TAP.
    async fn deliver(&mut self, src: PeerName, body: &[u8]) {
        let now = Instant::now();
        let mut frames: Vec<Vec<u8>> = Vec::new();
        for rec in sleeve::records(body) {
            match rec {
                Ok(Record::Frame(f)) => frames.push(f.to_vec()),
                Ok(Record::Fragment {
                    id,
                    total,
                    offset,
                    data,
                }) => match self.reasm.push(now, src, id, total, offset, data) {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => {}
                    Err(e) => trace!("fragment dropped: {e}"),
                },
                Err(e) => {
                    self.stats.dropped += 1;
                    self.warn_limited(format_args!("malformed records from {src}: {e}"));
                    break;
                }
            }
        }
        for f in frames {
            if let Some((_, src_mac)) = sleeve::frame_macs(&f) {
                if src_mac[0] & 1 == 0 {
                    self.macs.insert(src_mac, src);
                }
            }
            let data = if self.tap.vnet_hdr {
                &f[..]
            } else {
                &f[VNET_HDR_LEN..]
            };
            if let Err(e) = self.tap.dev.send(data).await {
                trace!("TAP write: {e}");
            }
        }
    }
}
