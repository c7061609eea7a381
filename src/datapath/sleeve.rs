//! The sleeve data path: frames between the TAP on the bridge and UDP 6783.
//!
//! Threads, not tasks: the data path runs on plain threads doing blocking
//! system calls, so no frame waits for an async scheduler.
//!
//! - **Senders**, one per TAP queue: read frames from the TAP (10-byte
//!   virtio-net header + Ethernet frame, up to a 64 KB TSO super-frame),
//!   find the peer that owns the destination MAC (or every peer along our
//!   broadcast tree, for broadcast, multicast and unknown destinations), and
//!   send. Where a frame goes is decided by the pure functions of
//!   [`mesh_proto::forward`]; this file does the I/O. A large frame
//!   is a message of its own: it is read into place after room for its
//!   record header, sealed in place (one seal per message), and sent as a run
//!   of equal datagrams with one `UDP_SEGMENT` send ([`crate::datapath::udpio`]), no
//!   copy in between. Small frames of one burst are packed into one
//!   datagram per destination.
//! - **One receiver**: `recvmmsg` with `UDP_GRO` hands over runs of
//!   datagrams. A run that is exactly one plain message for us goes to the
//!   TAP with one `writev` straight from the datagrams; single-datagram
//!   messages are handled where they lie; the others are reassembled
//!   ([`Reassembler`]) and then opened, relayed and/or written to the TAP in
//!   one write per frame, so the kernel segments a super-frame only here,
//!   at the end. After a light batch (a request, an acknowledgement) that
//!   reached the TAP the receiver also sends what the kernel answered during its TAP write
//!   (`answer_now`), instead of waking a sender for it; each TAP queue
//!   has a lock, held by whoever reads it, so one flow's frames leave in
//!   order.
//! - **The control task** (async): applies the router's commands to the
//!   shared tables, sends heartbeats paced by [`PACE`] (see below),
//!   re-reads a neighbour's path MTU before each, and reports neighbours
//!   that have gone silent.
//!
//! Heartbeats ([`mesh_proto::beat`]): an empty message to a neighbour every
//! second until it is heard, and whenever it has been silent for longer
//! than a slow interval; every 10 s while it is healthy, the lower peer
//! name pinging and the other answering (the receiver answers a heartbeat
//! when it has sent the neighbour nothing for half a second). Any datagram
//! from a neighbour counts as hearing it, and any message to it as a beat,
//! so a link that carries traffic sends no heartbeats at all. A neighbour
//! silent for [`PACE`]`.dead_after` (15 s) is reported, and its connection
//! closed: that is the mesh's dead-peer detection time.
//!
//! The shared state is a read-mostly table (neighbours, routes) and the MAC
//! table, behind `RwLock`s taken for a lookup and released before any system
//! call. Per-neighbour counters and, with a password, the connection's
//! [`SleeveKeys`] (a sealer with an atomic counter, swapped whole when the
//! key is replaced; the key ring under a mutex that the receiver takes, and
//! the control task when the peer sends a new key) live in `Arc<Peer>`.
//!
//! Path MTU: datagrams leave with don't-fragment set; each neighbour's
//! segment size follows the kernel's path MTU towards it (re-read with a
//! heartbeat at most every [`MTU_REREAD`], and at once when a send fails as
//! too large) and the probes of
//! [`mesh_proto::pmtu`] (a padded datagram each heartbeat, answered by the
//! peer; with a password the answers are sealed, so a spoofed one cannot
//! raise the MTU), which also find paths that drop large datagrams
//! silently. A super-frame is cut to fit whatever the path takes;
//! containers never see the limit.
//!
//! Bounds: each neighbour link reassembles at most [`REASM_PER_LINK`]
//! messages at once and all links [`REASM_TOTAL`] (see
//! [`mesh_proto::reassembly`]); a message relayed [`sleeve::MAX_HOPS`]
//! times is relayed no more; the MAC table refuses this host's own MACs
//! ([`Cmd::LocalMacs`]) and more MACs than its bounds, and a frame whose
//! source MAC it refuses is dropped rather than written to the TAP, so the
//! kernel bridge learns no more than the table holds. Every datagram,
//! message or frame dropped is counted under one reason ([`Reason`]),
//! reported as `sleeve.drops`.

use crate::api::{KeyStatus, SleeveStats};
use crate::datapath::keys::SleeveKeys;
use crate::datapath::udpio::{self, RecvBatch, MAX_SEGMENTS, MAX_UDP_PAYLOAD};
use crate::host::Tap;
use mesh_proto::beat::{Beat, Pace};
use mesh_proto::forward::{self, Decision, DropReason, Fan, Floods, Learn, MacTable};
use mesh_proto::name::PeerName;
use mesh_proto::pmtu::{Probe, MIN_MTU};
use mesh_proto::reassembly::Reassembler;
use mesh_proto::seal::{SealError, TAG_LEN};
use mesh_proto::sleeve::{
    self, Header, Kind, OpenError, Segment, DATAGRAM_HEADER_LEN, FRAME_RECORD_HEADER, HEADER_LEN,
    IP_UDP_V4, MAX_FRAME, VNET_HDR_LEN,
};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, IoSlice};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, trace, warn};
use tun_rs::SyncDevice;

/// Frames drained from the TAP per wake-up before packed frames are sent.
const BATCH: usize = 64;
/// Receive buffers per `recvmmsg`.
const RECV_BATCH: usize = 8;
/// A buffer for the largest message: record header, frame, tag.
const BUF: usize = FRAME_RECORD_HEADER + MAX_FRAME + TAG_LEN;
/// How long the data-path threads block before looking at the stop flag.
const WAKE: Duration = Duration::from_secs(1);
/// Partial messages reassembled at once per neighbour link.
pub const REASM_PER_LINK: usize = 16;
/// Partial messages reassembled at once over all links (at most
/// `REASM_TOTAL × reassembly::MAX_SLOT_BYTES` ≈ 16.8 MB).
pub const REASM_TOTAL: usize = 128;
/// How long a partial message waits for its other segments.
pub const REASM_TIMEOUT: Duration = Duration::from_secs(2);

/// Heartbeats to each neighbour: every second until heard and after a
/// silence, every 10 s while healthy; silence on the sleeve for
/// `dead_after` drops the neighbour's connection.
pub const PACE: Pace = Pace {
    fast: Duration::from_secs(1),
    slow: Duration::from_secs(10),
    dead_after: DEAD_AFTER,
};
/// Silence on the sleeve after which a neighbour's connection is dropped.
pub const DEAD_AFTER: Duration = Duration::from_secs(15);
const _: () = assert!(PACE.check());

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

/// Commands to the sleeve.
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
    /// This host's own MACs (its containers' and its bridge's), replacing
    /// the previous set: never learnt behind a peer, and frames from the
    /// overlay that claim one as their source are dropped.
    LocalMacs(Vec<[u8; 6]>),
    /// Counters.
    Stats(oneshot::Sender<SleeveStats>),
}

/// A connected peer, as the sleeve needs it.
pub struct PeerUp {
    /// The peer.
    pub name: PeerName,
    /// Its UDP address.
    pub addr: SocketAddr,
    /// With a password: the keys for our messages to it and its to us,
    /// which its connection's control task replaces (rekeying).
    pub keys: Option<Arc<SleeveKeys>>,
}

/// Where to send frames for peers we are not directly connected to.
pub use mesh_proto::forward::Routes;

/// Fixed settings.
pub struct Config {
    /// Our name.
    pub me: PeerName,
    /// Whether messages must be sealed.
    pub encrypted: bool,
    /// The underlay interface's MTU: the path MTU assumed until the kernel
    /// knows better.
    pub underlay_mtu: usize,
}

/// A direct neighbour.
struct Peer {
    name: PeerName,
    addr: SocketAddrV4,
    /// Numbers this connection for reassembly.
    link: u64,
    keys: Option<Arc<SleeveKeys>>,
    seq: AtomicU64,
    /// Path MTU towards it (an IP datagram's size), as `probe` says.
    mtu: AtomicUsize,
    /// The path MTU search.
    probe: Mutex<Probe>,
    /// Milliseconds since the sleeve started, when the kernel's path MTU
    /// towards it was last read (see [`MTU_REREAD`]).
    mtu_read: AtomicU64,
    /// Milliseconds since the sleeve started, when it was last heard.
    last_rx: AtomicU64,
    /// Whether it was heard at all since it came up.
    heard: AtomicBool,
    /// Milliseconds since the sleeve started, when we last sent it a
    /// message (`u64::MAX`: never).
    last_tx: AtomicU64,
    silent: AtomicBool,
    /// Set when the table lets go of it (its connection closed, or a new
    /// session with the same peer replaced it): senders holding it drop it.
    retired: AtomicBool,
}

impl Peer {
    /// Change the probe search and publish its MTU.
    fn with_probe(&self, f: impl FnOnce(&mut Probe)) {
        let mut p = self.probe.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut p);
        let mtu = p.mtu();
        drop(p);
        let old = self.mtu.swap(mtu, Ordering::Relaxed);
        if old != mtu {
            info!(peer = %self.name, old, mtu, "sleeve path MTU changed");
        }
    }

    /// Bytes of a message one datagram carries to this peer.
    fn payload(&self) -> usize {
        self.mtu.load(Ordering::Relaxed).max(MIN_MTU) - IP_UDP_V4 - DATAGRAM_HEADER_LEN
    }
}

struct Table {
    peers: HashMap<PeerName, Arc<Peer>>,
    by_addr: HashMap<SocketAddr, Arc<Peer>>,
    routes: Routes,
    /// Where each source's broadcasts go on to, made of `peers` and
    /// `routes` each time either changes ([`Table::changed`]).
    floods: Floods<Arc<Peer>>,
}

/// A [`Decision`] with its neighbours in hand, to send to once the table's
/// lock is released.
enum Hops {
    /// Nowhere but, perhaps, the TAP.
    None,
    /// To this neighbour, for the destination peer.
    One(Arc<Peer>, PeerName),
    /// A copy to each of these neighbours.
    Flood(Fan<Arc<Peer>>),
}

/// A decision of [`forward`], a flood's neighbours with their sessions.
type Decided = Decision<Fan<Arc<Peer>>>;

impl Table {
    fn new(me: PeerName) -> Table {
        let (peers, routes) = (HashMap::new(), Routes::default());
        Table {
            floods: Floods::new(me, &peers, &routes),
            peers,
            by_addr: HashMap::new(),
            routes,
        }
    }

    /// The neighbours or the routes changed: where broadcasts go, again.
    fn changed(&mut self) {
        self.floods = Floods::new(self.floods.me(), &self.peers, &self.routes);
    }

    /// The neighbours that `d` sends to.
    fn hops(&self, d: &Decided) -> Hops {
        let one = |via: &PeerName, to: PeerName| match self.peers.get(via) {
            Some(h) => Hops::One(h.clone(), to),
            None => Hops::None,
        };
        match d {
            Decision::Direct(to) => one(to, *to),
            Decision::Relay { via, to } => one(via, *to),
            Decision::Flood { hops, .. } => Hops::Flood(hops.clone()),
            Decision::Local | Decision::HopLimit { .. } | Decision::Drop(_) => Hops::None,
        }
    }
}

/// Why the sleeve dropped a datagram, message or frame: the keys of
/// `sleeve.drops` in `mesh report` (stable names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A bad datagram, segment, or frame records.
    Malformed,
    /// Failed authentication, a key we do not hold, no key, or plaintext
    /// where encryption is required.
    Auth,
    /// A sealed message or acknowledgement seen before or too old.
    Replay,
    /// A datagram from an address that is no connected peer.
    UnknownSender,
    /// A partial message given up (evicted or timed out).
    Reassembly,
    /// A message that was relayed [`sleeve::MAX_HOPS`] times and should have
    /// gone further.
    HopLimit,
    /// A message for a peer we have no route to.
    NoRoute,
    /// A message claiming to come from us.
    FromUs,
    /// A frame whose source MAC is one of this host's own.
    MacClaim,
    /// A frame whose source MAC cannot be learnt (its peer's or the total
    /// bound is reached).
    MacLimit,
    /// A message that does not fit the path MTU.
    PathMtu,
    /// Any other failure to send.
    Send,
}

impl Reason {
    /// Every reason, in report order.
    pub const ALL: [Reason; 12] = [
        Reason::Malformed,
        Reason::Auth,
        Reason::Replay,
        Reason::UnknownSender,
        Reason::Reassembly,
        Reason::HopLimit,
        Reason::NoRoute,
        Reason::FromUs,
        Reason::MacClaim,
        Reason::MacLimit,
        Reason::PathMtu,
        Reason::Send,
    ];

    /// The stable name shown in `sleeve.drops`.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::Auth => "auth",
            Reason::Replay => "replay",
            Reason::UnknownSender => "unknown_sender",
            Reason::Reassembly => "reassembly",
            Reason::HopLimit => "hop_limit",
            Reason::NoRoute => "no_route",
            Reason::FromUs => "from_us",
            Reason::MacClaim => "mac_claim",
            Reason::MacLimit => "mac_limit",
            Reason::PathMtu => "path_mtu",
            Reason::Send => "send",
        }
    }

    /// Why a message or acknowledgement failed to open.
    pub fn of_open(e: &OpenError) -> Reason {
        match e {
            OpenError::Wire(_) => Reason::Malformed,
            OpenError::Seal(SealError::Replay(_)) => Reason::Replay,
            OpenError::Seal(_) | OpenError::NoKey(_) | OpenError::PlainRefused => Reason::Auth,
        }
    }

    /// The reason for a forwarding decision's drop.
    pub fn of_drop(d: DropReason) -> Reason {
        match d {
            DropReason::FromUs => Reason::FromUs,
            DropReason::NoRoute => Reason::NoRoute,
        }
    }
}

#[derive(Default)]
struct Counters {
    frames_in: AtomicU64,
    datagrams_out: AtomicU64,
    datagrams_in: AtomicU64,
    /// Indexed by the position of a [`Reason`] in [`Reason::ALL`].
    drops: [AtomicU64; Reason::ALL.len()],
    sealed_out: AtomicU64,
    relayed: AtomicU64,
}

impl Counters {
    fn drop(&self, why: Reason, n: u64) {
        let i = Reason::ALL.iter().position(|r| *r == why).unwrap_or(0);
        bump(&self.drops[i], n);
    }

    fn drops(&self) -> BTreeMap<String, u64> {
        Reason::ALL
            .iter()
            .zip(&self.drops)
            .map(|(r, c)| (r.name().to_string(), c.load(Ordering::Relaxed)))
            .collect()
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Everything the threads share.
struct Shared {
    me: PeerName,
    encrypted: bool,
    vnet_hdr: bool,
    underlay_mtu: usize,
    table: RwLock<Table>,
    /// Taken after `table` when both are needed.
    macs: RwLock<MacTable>,
    stats: Counters,
    sock: UdpSocket,
    gso: AtomicBool,
    tap: Vec<SyncDevice>,
    /// Held while a thread reads and sends from a TAP queue, so that the
    /// frames of one flow leave in the order they were read.
    tap_locks: Vec<Mutex<()>>,
    epoch: Instant,
    stop: AtomicBool,
    next_link: AtomicU64,
    last_warn: Mutex<Option<Instant>>,
    /// Where frames and datagrams go instead of `sock` and `tap[0]`, when
    /// set ([`Engine`]).
    io: Option<Box<dyn Io>>,
}

/// Where the per-frame functions put what they send: the daemon's sleeve
/// sends on its UDP socket and writes to its TAP; an [`Engine`] hands the
/// same bytes to an `Io` of the caller's (a test that counts, a benchmark).
pub trait Io: Send + Sync {
    /// Send the datagrams in `iov` to `to`: a run of `segment`-byte
    /// datagrams when set, else one ([`udpio::send_segments`]).
    fn send(
        &self,
        to: SocketAddrV4,
        iov: &[IoSlice<'_>],
        segment: Option<u16>,
    ) -> io::Result<usize>;
    /// Write one frame (vnet header included when the TAP has one),
    /// gathered from `iov`, to the TAP.
    fn write_tap(&self, iov: &[IoSlice<'_>]) -> io::Result<usize>;
}

/// Small frames waiting to be sent together, per (neighbour's session, as
/// its [`Peer::link`], destination). Keyed by session, not by name: a
/// neighbour that reconnects (a restarted peer) gets new keys and a new
/// `Peer`, and frames for it must never go out with the old one's sealer.
/// Entries (and their buffers) stay for the next burst: all of them while
/// there are at most [`PACKS_IDLE`], else those the burst used
/// ([`flush_packs`]); so steady traffic, to however many neighbours,
/// allocates nothing, and the map holds at most the larger of
/// [`PACKS_IDLE`] and the destinations of one burst.
type Packs = HashMap<(u64, PeerName), Pack>;

/// How many pack entries are kept while not in use.
const PACKS_IDLE: usize = 256;

/// The small frames waiting for one neighbour and destination.
struct Pack {
    hop: Arc<Peer>,
    buf: Vec<u8>,
    /// Whether a frame was packed since the last burst ended.
    used: bool,
}

/// Per-thread scratch for sending.
#[derive(Default)]
struct Out {
    hdrs: Vec<[u8; DATAGRAM_HEADER_LEN]>,
}

/// Why a send did not go out whole.
enum SendFail {
    /// Larger than the path takes.
    TooBig,
    /// Anything else (logged by the caller, rate-limited).
    Other(io::Error),
}

impl Shared {
    /// The state the threads share; `io` replaces the socket and the TAP
    /// as where frames go ([`Engine`]).
    fn new(
        cfg: &Config,
        sock: UdpSocket,
        gso: bool,
        vnet_hdr: bool,
        queues: Vec<SyncDevice>,
        io: Option<Box<dyn Io>>,
    ) -> Shared {
        Shared {
            me: cfg.me,
            encrypted: cfg.encrypted,
            vnet_hdr,
            underlay_mtu: cfg.underlay_mtu,
            table: RwLock::new(Table::new(cfg.me)),
            macs: RwLock::new(MacTable::new()),
            stats: Counters::default(),
            sock,
            gso: AtomicBool::new(gso),
            tap_locks: queues.iter().map(|_| Mutex::new(())).collect(),
            tap: queues,
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            next_link: AtomicU64::new(1),
            last_warn: Mutex::new(None),
            io,
        }
    }

    /// Send datagrams to a neighbour (see [`Io::send`]).
    fn send_datagrams(
        &self,
        to: SocketAddrV4,
        iov: &[IoSlice<'_>],
        segment: Option<u16>,
    ) -> io::Result<usize> {
        match &self.io {
            Some(io) => io.send(to, iov, segment),
            None => udpio::send_segments(self.sock.as_raw_fd(), to, iov, segment),
        }
    }

    /// Write a frame to the TAP (its first queue; see [`Io::write_tap`]).
    fn write_tap(&self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        match (&self.io, self.tap.first()) {
            (Some(io), _) => io.write_tap(iov),
            (None, Some(tap)) => udpio::writev(tap.as_raw_fd(), iov),
            (None, None) => Err(io::Error::other("no TAP queue")),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The heartbeat state of the link to `peer`, from its atomics.
    fn beat_of(&self, peer: &Peer) -> Beat {
        let at = |ms: u64| self.epoch + Duration::from_millis(ms);
        let tx = peer.last_tx.load(Ordering::Relaxed);
        let heard = peer
            .heard
            .load(Ordering::Relaxed)
            .then(|| at(peer.last_rx.load(Ordering::Relaxed)));
        Beat::with_times(
            PACE,
            self.me < peer.name,
            (tx != u64::MAX).then(|| at(tx)),
            heard,
        )
    }

    /// Send `peer` a heartbeat (an empty message).
    fn beat(&self, out: &mut Out, peer: &Peer) {
        let mut buf = [0u8; TAG_LEN];
        self.send_message(out, peer, self.me, peer.name, 0, &mut buf, 0);
    }

    /// Mark `peer` heard now.
    fn heard(&self, peer: &Peer) {
        peer.last_rx.store(self.now_ms(), Ordering::Relaxed);
        if !peer.heard.load(Ordering::Relaxed) {
            peer.heard.store(true, Ordering::Relaxed);
        }
        peer.silent.store(false, Ordering::Relaxed);
    }

    fn warn_limited(&self, msg: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        let Ok(mut last) = self.last_warn.lock() else {
            return;
        };
        if last.is_none_or(|t| now.duration_since(t) > Duration::from_secs(5)) {
            *last = Some(now);
            warn!("{msg}");
        }
    }

    /// Count a datagram or message from a neighbour as dropped for
    /// `reason`, and say why (rate-limited).
    fn dropped_from(&self, peer: &Peer, reason: Reason, what: &str, why: &dyn std::fmt::Display) {
        self.stats.drop(reason, 1);
        self.warn_limited(format_args!(
            "dropped {what} from {} ({}): {why}",
            peer.addr, peer.name
        ));
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-read the kernel's path MTU towards a neighbour.
    fn refresh_mtu(&self, peer: &Peer) {
        peer.mtu_read.store(self.now_ms(), Ordering::Relaxed);
        let kernel = udpio::path_mtu(peer.addr).unwrap_or(self.underlay_mtu);
        peer.with_probe(|p| p.set_kernel(Instant::now(), kernel));
    }

    /// Send one message, relayed `hops` times before (0 for our own):
    /// `buf[..len]` is its plain body, and `buf` has room for the tag after
    /// it. Seals it (once, in place, the hop count under the seal) when the
    /// neighbour has a sealer, then sends it in segments that fit the path.
    #[allow(clippy::too_many_arguments)]
    fn send_message(
        &self,
        out: &mut Out,
        hop: &Peer,
        src: PeerName,
        dst: PeerName,
        hops: u8,
        buf: &mut [u8],
        len: usize,
    ) {
        let seq = hop.seq.fetch_add(1, Ordering::Relaxed);
        // One sealer for the whole message, even if a rekey swaps it now.
        let sealer = hop.keys.as_ref().map(|k| k.sealer());
        let header = match sleeve::message_header(src, dst, hops, sealer.as_deref(), seq) {
            Ok(h) => h,
            Err(e) => {
                self.stats.drop(Reason::Send, 1);
                self.warn_limited(format_args!("cannot seal for {}: {e}", hop.name));
                return;
            }
        };
        let h = header.emit();
        let mut total = len;
        if let (Kind::Sealed, Some(s)) = (header.kind, sealer.as_deref()) {
            if buf.len() < len + TAG_LEN {
                self.stats.drop(Reason::Send, 1);
                return;
            }
            match s.seal_detached(header.counter, &h, &mut buf[..len]) {
                Ok(tag) => buf[len..len + TAG_LEN].copy_from_slice(&tag),
                Err(e) => {
                    self.stats.drop(Reason::Send, 1);
                    self.warn_limited(format_args!("cannot seal for {}: {e}", hop.name));
                    return;
                }
            }
            total += TAG_LEN;
            bump(&self.stats.sealed_out, 1);
        }
        let msg = &buf[..total];
        hop.last_tx.store(self.now_ms(), Ordering::Relaxed);
        for attempt in 0..2 {
            match self.send_segments(out, hop, &h, msg) {
                Ok(()) => return,
                Err(SendFail::TooBig) if attempt == 0 => {
                    self.refresh_mtu(hop);
                }
                Err(SendFail::TooBig) => {
                    self.stats.drop(Reason::PathMtu, 1);
                    self.warn_limited(format_args!(
                        "message to {} does not fit the path MTU {}",
                        hop.name,
                        hop.mtu.load(Ordering::Relaxed)
                    ));
                    return;
                }
                Err(SendFail::Other(e)) => {
                    self.stats.drop(Reason::Send, 1);
                    trace!(peer = %hop.name, "send: {e}");
                    return;
                }
            }
        }
    }

    /// Cut `msg` into datagrams for `hop` and send them: runs of up to
    /// [`MAX_SEGMENTS`] in one `UDP_SEGMENT` send each.
    fn send_segments(
        &self,
        out: &mut Out,
        hop: &Peer,
        h: &[u8; HEADER_LEN],
        msg: &[u8],
    ) -> Result<(), SendFail> {
        let plan = Segment::plan(msg.len(), hop.payload())
            .map_err(|e| SendFail::Other(io::Error::other(e.to_string())))?;
        out.hdrs.clear();
        out.hdrs.extend(plan.headers(h));
        let dsize = DATAGRAM_HEADER_LEN + plan.stride as usize;
        let gso = self.gso.load(Ordering::Relaxed);
        let per = if gso {
            (MAX_UDP_PAYLOAD / dsize).clamp(1, MAX_SEGMENTS)
        } else {
            1
        };
        let count = plan.count as usize;
        let mut i = 0;
        // A header and a slice per datagram, on the stack.
        let mut iov = [IoSlice::new(&[]); 2 * MAX_SEGMENTS];
        while i < count {
            let end = (i + per).min(count);
            for (j, k) in (i..end).enumerate() {
                iov[2 * j] = IoSlice::new(&out.hdrs[k]);
                iov[2 * j + 1] = IoSlice::new(&msg[plan.range(k as u16, msg.len())]);
            }
            let seg = (end - i > 1).then_some(dsize as u16);
            match self.send_datagrams(hop.addr, &iov[..2 * (end - i)], seg) {
                Ok(_) => bump(&self.stats.datagrams_out, (end - i) as u64),
                Err(e) => {
                    let code = e.raw_os_error();
                    if i == 0 && (code == Some(libc::EMSGSIZE) || code == Some(libc::EINVAL)) {
                        return Err(SendFail::TooBig);
                    }
                    if seg.is_some() && code == Some(libc::EIO) {
                        // The route's device cannot checksum for GSO: send
                        // one datagram per call from now on.
                        if self.gso.swap(false, Ordering::Relaxed) {
                            warn!("UDP segmentation offload refused ({e}); sending datagrams one by one");
                        }
                        return self.send_segments(out, hop, h, msg);
                    }
                    return Err(SendFail::Other(e));
                }
            }
            i = end;
        }
        Ok(())
    }
}

/// Run the sleeve until the command channel closes: start the data-path
/// threads, then serve commands and heartbeats.
pub async fn run(
    cfg: Config,
    tap: Tap,
    udp: UdpSocket,
    mut rx: mpsc::Receiver<Cmd>,
    events: mpsc::Sender<Event>,
) {
    let offloads = udpio::setup(&udp);
    let _ = udp.set_read_timeout(Some(WAKE));
    let Tap {
        queues, vnet_hdr, ..
    } = tap;
    info!(
        gso = offloads.gso,
        gro = offloads.gro,
        queues = queues.len(),
        vnet_hdr,
        "sleeve data path"
    );
    let shared = Arc::new(Shared::new(&cfg, udp, offloads.gso, vnet_hdr, queues, None));
    for (q, dev) in shared.tap.iter().enumerate() {
        if let Err(e) = dev.set_nonblocking(true) {
            warn!("TAP queue {q}: cannot make it non-blocking: {e}");
        }
    }
    for q in 0..shared.tap.len() {
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("sleeve-tx{q}"))
            .spawn(move || tx_loop(&s, q));
        if let Err(e) = spawned {
            warn!("cannot start sleeve sender {q}: {e}");
        }
    }
    let s = shared.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("sleeve-rx".into())
        .spawn(move || rx_loop(&s))
    {
        warn!("cannot start the sleeve receiver: {e}");
    }

    let mut tick = tokio::time::interval(PACE.fast);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => heartbeat(&shared, &events).await,
            cmd = rx.recv() => match cmd {
                None => break,
                Some(c) => command(&shared, c),
            },
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
}

fn command(sh: &Shared, c: Cmd) {
    match c {
        Cmd::PeerUp(up) => {
            let PeerUp { name, addr, keys } = *up;
            let SocketAddr::V4(v4) = addr else {
                warn!(peer = %name, %addr, "the sleeve carries IPv4 only; not using this peer");
                return;
            };
            let peer = Arc::new(Peer {
                name,
                addr: v4,
                link: sh.next_link.fetch_add(1, Ordering::Relaxed),
                keys,
                seq: AtomicU64::new(0),
                mtu: AtomicUsize::new(sh.underlay_mtu),
                probe: Mutex::new(Probe::new(Instant::now(), sh.underlay_mtu)),
                mtu_read: AtomicU64::new(0),
                last_rx: AtomicU64::new(sh.now_ms()),
                heard: AtomicBool::new(false),
                last_tx: AtomicU64::new(u64::MAX),
                silent: AtomicBool::new(false),
                retired: AtomicBool::new(false),
            });
            sh.refresh_mtu(&peer);
            let mut t = sh.table.write().unwrap_or_else(|e| e.into_inner());
            if let Some(old) = t.peers.insert(name, peer.clone()) {
                t.by_addr.remove(&SocketAddr::V4(old.addr));
                old.retired.store(true, Ordering::Relaxed);
            }
            t.by_addr.insert(addr, peer);
            t.changed();
        }
        Cmd::PeerDown { name } => {
            let mut t = sh.table.write().unwrap_or_else(|e| e.into_inner());
            if let Some(old) = t.peers.remove(&name) {
                t.by_addr.remove(&SocketAddr::V4(old.addr));
                old.retired.store(true, Ordering::Relaxed);
                t.changed();
            }
        }
        Cmd::Routes(r) => {
            let mut t = sh.table.write().unwrap_or_else(|e| e.into_inner());
            t.routes = r;
            t.changed();
            // Forget MACs behind peers we can no longer reach.
            let mut macs = sh.macs.write().unwrap_or_else(|e| e.into_inner());
            macs.forget_unreachable(&t.peers, &t.routes);
        }
        Cmd::LocalMacs(local) => {
            let mut macs = sh.macs.write().unwrap_or_else(|e| e.into_inner());
            macs.set_local(local);
        }
        Cmd::Stats(reply) => {
            let c = &sh.stats;
            let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let drops = c.drops();
            let _ = reply.send(SleeveStats {
                frames_in: get(&c.frames_in),
                datagrams_out: get(&c.datagrams_out),
                datagrams_in: get(&c.datagrams_in),
                dropped: drops.values().sum(),
                drops,
                sealed_out: get(&c.sealed_out),
                relayed: get(&c.relayed),
                path_mtu: sh
                    .table()
                    .peers
                    .values()
                    .map(|p| (p.name.to_string(), p.mtu.load(Ordering::Relaxed)))
                    .collect(),
                keys: sh
                    .table()
                    .peers
                    .values()
                    .filter_map(|p| {
                        let ids = p.keys.as_ref()?.ids();
                        let status = KeyStatus {
                            send_key_id: ids.send,
                            recv_key_id: ids.recv,
                            rekeys: ids.rekeys,
                        };
                        Some((p.name.to_string(), status))
                    })
                    .collect(),
            });
        }
    }
}

/// How often a heartbeat also re-reads the kernel's path MTU towards its
/// peer. A read is a socket, a `connect` and a `close`: with a beat every
/// 10 s to each of 99 peers, a read per beat was the largest system-call
/// cost of an idle daemon. A send refused as too large re-reads it at once.
const MTU_REREAD: Duration = Duration::from_secs(60);

/// Send a heartbeat to every neighbour whose beat is due (re-reading its
/// path MTU first, at most every [`MTU_REREAD`]), run the path MTU
/// searches, and report the neighbours that have been silent too long.
async fn heartbeat(sh: &Arc<Shared>, events: &mpsc::Sender<Event>) {
    let now = Instant::now();
    // The MAC table's clock (it lets long-learnt MACs give way).
    sh.macs.write().unwrap_or_else(|e| e.into_inner()).tick(now);
    let peers: Vec<Arc<Peer>> = sh.table().peers.values().cloned().collect();
    // Who needs a system call: a beat due, or a path MTU probe to send.
    let mut work = Vec::new();
    for p in &peers {
        let beat = sh.beat_of(p).due(now);
        let mut size = None;
        p.with_probe(|pr| size = pr.tick(now));
        if beat || size.is_some() {
            work.push((p.clone(), beat, size));
        }
    }
    if !work.is_empty() {
        let s = sh.clone();
        // System calls, so off the async threads.
        let _ = tokio::task::spawn_blocking(move || {
            let mut out = Out::default();
            for (p, beat, size) in &work {
                if *beat {
                    let read = p.mtu_read.load(Ordering::Relaxed);
                    if s.now_ms().saturating_sub(read) >= MTU_REREAD.as_millis() as u64 {
                        s.refresh_mtu(p);
                    }
                    s.beat(&mut out, p);
                }
                if let Some(size) = *size {
                    let d = sleeve::probe_datagram(s.me, p.name, size);
                    let sent =
                        udpio::send_segments(s.sock.as_raw_fd(), p.addr, &[IoSlice::new(&d)], None);
                    if let Err(e) = sent {
                        trace!(peer = %p.name, size, "probe: {e}");
                    }
                }
            }
        })
        .await;
    }
    let now = sh.now_ms();
    for p in peers {
        let last = p.last_rx.load(Ordering::Relaxed);
        if now.saturating_sub(last) > DEAD_AFTER.as_millis() as u64
            && !p.silent.swap(true, Ordering::Relaxed)
        {
            let _ = events.try_send(Event::Silent { peer: p.name });
        }
    }
}

/// A sender's buffers.
struct Tx {
    buf: Vec<u8>,
    scratch: Vec<u8>,
    out: Out,
    packs: Packs,
}

impl Tx {
    fn new() -> Tx {
        Tx {
            buf: vec![0u8; BUF],
            scratch: vec![0u8; BUF],
            out: Out::default(),
            packs: HashMap::new(),
        }
    }

    /// Read what TAP queue `q` holds (up to [`BATCH`] frames, without
    /// blocking) and send it.
    fn drain(&mut self, sh: &Shared, q: usize) {
        let dev = &sh.tap[q];
        // Without a vnet header, frames are read after room for a zero one.
        let off = Tx::read_offset(sh);
        for _ in 0..BATCH {
            let n = match dev.recv(&mut self.buf[off..BUF - TAG_LEN]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    sh.warn_limited(format_args!("TAP read failed: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            self.on_read(sh, n);
        }
        flush_packs(sh, &mut self.out, &mut self.packs);
    }

    /// Where a frame read from the TAP goes in `buf`: after its record
    /// header, and a zero vnet header when the TAP has none.
    fn read_offset(sh: &Shared) -> usize {
        FRAME_RECORD_HEADER + if sh.vnet_hdr { 0 } else { VNET_HDR_LEN }
    }

    /// A frame of `n` bytes was read into `buf` at [`Tx::read_offset`]:
    /// send it, or pack it.
    fn on_read(&mut self, sh: &Shared, n: usize) {
        let off = Tx::read_offset(sh);
        if !sh.vnet_hdr {
            self.buf[FRAME_RECORD_HEADER..off].fill(0);
        }
        let flen = n + off - FRAME_RECORD_HEADER;
        on_tap_frame(
            sh,
            &mut self.out,
            &mut self.packs,
            &mut self.buf,
            &mut self.scratch,
            flen,
        );
    }
}

/// A sender: frames from TAP queue `q` to the overlay.
fn tx_loop(sh: &Shared, q: usize) {
    let fd = sh.tap[q].as_raw_fd();
    let mut tx = Tx::new();
    while !sh.stop.load(Ordering::Relaxed) {
        if !wait_readable(fd, WAKE) {
            continue;
        }
        let _held = sh.tap_locks[q].lock().unwrap_or_else(|e| e.into_inner());
        tx.drain(sh, q);
    }
}

/// Wait until `fd` is readable, at most `limit`.
fn wait_readable(fd: RawFd, limit: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, and its count.
    let r = unsafe { libc::poll(&mut p, 1, limit.as_millis() as i32) };
    r > 0
}

/// One frame read from the TAP into `buf[4..4 + flen]`: send it, or pack it.
fn on_tap_frame(
    sh: &Shared,
    out: &mut Out,
    packs: &mut Packs,
    buf: &mut [u8],
    scratch: &mut [u8],
    flen: usize,
) {
    bump(&sh.stats.frames_in, 1);
    let frame_at = FRAME_RECORD_HEADER..FRAME_RECORD_HEADER + flen;
    let Some((dst_mac, _)) = sleeve::frame_macs(&buf[frame_at.clone()]) else {
        return;
    };
    let Ok(rec) = sleeve::frame_record_header(flen) else {
        sh.stats.drop(Reason::Malformed, 1);
        return;
    };
    buf[..FRAME_RECORD_HEADER].copy_from_slice(&rec);
    let len = FRAME_RECORD_HEADER + flen;
    let hops = {
        let t = sh.table();
        let macs = sh.macs.read().unwrap_or_else(|e| e.into_inner());
        t.hops(&forward::from_tap(
            &t.floods, &t.peers, &t.routes, &macs, dst_mac,
        ))
    };
    let flood = match hops {
        Hops::One(hop, dst) => {
            send_frame(sh, out, packs, &hop, dst, buf, len);
            return;
        }
        Hops::Flood(flood) => flood,
        Hops::None => return,
    };
    let single = flood.iter().nth(1).is_none();
    for (_, hop) in flood.iter() {
        if single || hop.keys.is_none() {
            // Not sealed (in place) for this neighbour, or for no other:
            // `buf` stays as it is.
            send_frame(sh, out, packs, hop, PeerName::BROADCAST, buf, len);
        } else {
            // Sealing is in place: each neighbour gets its own copy.
            scratch[..len].copy_from_slice(&buf[..len]);
            send_frame(sh, out, packs, hop, PeerName::BROADCAST, scratch, len);
        }
    }
}

/// Send the frame record `buf[..len]` to neighbour `hop`, for `dst`: packed
/// with others when small, as a message of its own (sealed in place in
/// `buf`) when large.
fn send_frame(
    sh: &Shared,
    out: &mut Out,
    packs: &mut Packs,
    hop: &Arc<Peer>,
    dst: PeerName,
    buf: &mut [u8],
    len: usize,
) {
    let key = (hop.link, dst);
    // Small frames ride together in one datagram.
    if len + TAG_LEN <= hop.payload() {
        let entry = packs.entry(key).or_insert_with(|| Pack {
            hop: hop.clone(),
            buf: Vec::with_capacity(hop.payload()),
            used: false,
        });
        entry.used = true;
        if !entry.buf.is_empty() && entry.buf.len() + len + TAG_LEN > hop.payload() {
            send_pack(sh, out, &entry.hop, dst, &mut entry.buf);
        }
        entry.buf.extend_from_slice(&buf[..len]);
        return;
    }
    // A large frame: what was packed for this destination goes first, to
    // keep the order.
    if let Some(p) = packs.get_mut(&key) {
        if !p.buf.is_empty() {
            send_pack(sh, out, &p.hop, dst, &mut p.buf);
        }
    }
    sh.send_message(out, hop, sh.me, dst, 0, buf, len);
}

fn send_pack(sh: &Shared, out: &mut Out, hop: &Peer, dst: PeerName, pack: &mut Vec<u8>) {
    let len = pack.len();
    pack.resize(len + TAG_LEN, 0);
    sh.send_message(out, hop, sh.me, dst, 0, pack, len);
    pack.clear();
}

fn flush_packs(sh: &Shared, out: &mut Out, packs: &mut Packs) {
    for ((_, dst), p) in packs.iter_mut() {
        if !p.buf.is_empty() {
            send_pack(sh, out, &p.hop, *dst, &mut p.buf);
        }
    }
    // Forget sessions that ended and, beyond PACKS_IDLE entries,
    // destinations this burst did not send to; the others' buffers serve
    // the next burst.
    let keep_idle = packs.len() <= PACKS_IDLE;
    packs.retain(|_, p| {
        !p.hop.retired.load(Ordering::Relaxed) && (std::mem::take(&mut p.used) || keep_idle)
    });
}

/// The receiver: datagrams from the overlay to the TAP (and on to other
/// neighbours).
fn rx_loop(sh: &Shared) {
    let fd = sh.sock.as_raw_fd();
    let mut batch = RecvBatch::new(RECV_BATCH);
    let mut rx = Rx::new();
    let mut tx = Tx::new();
    while !sh.stop.load(Ordering::Relaxed) {
        let n = match batch.recv(fd) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                debug!("UDP receive: {e}");
                continue;
            }
        };
        let now = Instant::now();
        let mut bytes = 0;
        for i in 0..n {
            let Some((from, seg, data)) = batch.get(i) else {
                continue;
            };
            bytes += data.len();
            rx.on_buffer(sh, from, data, seg, now);
        }
        if std::mem::take(&mut rx.wrote) && bytes <= ANSWER_MAX {
            answer_now(sh, &mut tx);
        }
    }
}

/// Received bytes per batch up to which the receiver sends the answers
/// itself (see [`answer_now`]): a request, an acknowledgement, a lone
/// segment; not the GRO runs of a bulk transfer.
const ANSWER_MAX: usize = 4096;

/// Send what the kernel answered while the receiver wrote to the TAP.
///
/// A TAP write runs the bridge, the container's stack and its reply
/// synchronously: when the write returns, a ping's echo reply or a
/// request's response is already queued in the TAP, and a sender thread
/// has just been woken for it. Waking a sleeping thread costs tens of
/// microseconds on a virtual machine (its idle vCPU halts); the receiver
/// is awake and sends it now. Only after light batches that wrote to
/// the TAP (heartbeats and relayed traffic leave nothing): under bulk
/// traffic the senders are busy anyway, and a queue a sender holds is
/// left to it.
fn answer_now(sh: &Shared, tx: &mut Tx) {
    for q in 0..sh.tap.len() {
        if let Ok(_held) = sh.tap_locks[q].try_lock() {
            tx.drain(sh, q);
        }
    }
}

/// The receiver's own state.
struct Rx {
    reasm: Reassembler,
    out: Out,
    relay: Vec<u8>,
    /// Whether frames went to the TAP since the batch began (so the kernel
    /// may have answered: see [`answer_now`]).
    wrote: bool,
}

impl Rx {
    fn new() -> Rx {
        Rx {
            reasm: Reassembler::new(REASM_PER_LINK, REASM_TOTAL, REASM_TIMEOUT),
            out: Out::default(),
            relay: Vec::with_capacity(BUF),
            wrote: false,
        }
    }

    /// One received buffer from `from`: a datagram, or a GRO run of
    /// `seg`-byte datagrams.
    fn on_buffer(
        &mut self,
        sh: &Shared,
        from: SocketAddr,
        data: &mut [u8],
        seg: usize,
        now: Instant,
    ) {
        let peer = sh.table().by_addr.get(&from).cloned();
        let Some(peer) = peer else {
            sh.stats.drop(Reason::UnknownSender, 1);
            sh.warn_limited(format_args!(
                "dropped datagram from {from}: not a connected peer"
            ));
            return;
        };
        if deliver_run(sh, &peer, data, seg) {
            self.wrote = true;
            return;
        }
        for d in udpio::datagrams(data, seg) {
            self.on_datagram(sh, &peer, d, now);
        }
    }

    fn on_datagram(&mut self, sh: &Shared, peer: &Arc<Peer>, d: &mut [u8], now: Instant) {
        let (header, seg, range) = match sleeve::parse_datagram(d) {
            Ok(x) => x,
            Err(e) => return sh.dropped_from(peer, Reason::Malformed, "datagram", &e),
        };
        bump(&sh.stats.datagrams_in, 1);
        match header.kind {
            Kind::Probe => return answer_probe(sh, peer, d.len() + IP_UDP_V4),
            Kind::ProbeAck => return on_probe_ack(sh, peer, &header, &mut d[range], now),
            Kind::Frames | Kind::Sealed => {}
        }
        if seg.count == 1 {
            self.on_message(sh, peer, header, &mut d[range], now);
            return;
        }
        // Counters start again at 0 under each new key: the key id is part
        // of what a message is reassembled by (counters are 56 bits, the
        // key id goes above them). The quota is per link, whatever the key.
        let id = (u64::from(header.key_id) << 56) | (header.counter & sleeve::COUNTER_MASK);
        let pushed = self.reasm.push(now, peer.link, id, seg, &d[range]);
        let given_up = self.reasm.take_dropped();
        if given_up > 0 {
            sh.stats.drop(Reason::Reassembly, given_up);
        }
        match pushed {
            Ok(Some(mut m)) => {
                self.on_message(sh, peer, header, &mut m, now);
                self.reasm.recycle(m);
            }
            Ok(None) => {}
            Err(e) => {
                sh.stats.drop(Reason::Malformed, 1);
                trace!(peer = %peer.name, "segment dropped: {e}");
            }
        }
    }

    /// A whole message from neighbour `peer`: open it, then deliver it,
    /// relay it, or both.
    fn on_message(
        &mut self,
        sh: &Shared,
        peer: &Arc<Peer>,
        header: Header,
        msg: &mut [u8],
        now: Instant,
    ) {
        let opened = match (sh.encrypted, peer.keys.as_ref()) {
            (true, Some(k)) => k.open(now, &header, msg),
            (true, None) => {
                sh.stats.drop(Reason::Auth, 1);
                return;
            }
            (false, _) => sleeve::open_message(&header, msg, None),
        };
        let n = match opened {
            Ok(n) => n,
            Err(e) => return sh.dropped_from(peer, Reason::of_open(&e), "message", &e),
        };
        sh.heard(peer);
        if n == 0 && header.dst == sh.me && header.src == peer.name {
            // A heartbeat: answered when we have been quiet (see `PACE`).
            if sh.beat_of(peer).should_answer(now) {
                sh.beat(&mut self.out, peer);
            }
            return;
        }
        let body = &msg[..n];
        let (decision, hops) = {
            let t = sh.table();
            let d = forward::from_peer(
                &t.floods,
                &t.peers,
                &t.routes,
                peer.name,
                header.src,
                header.dst,
                header.hops,
            );
            let hops = t.hops(&d);
            (d, hops)
        };
        match hops {
            Hops::One(hop, _) => self.relay(sh, &hop, &header, body),
            Hops::Flood(hops) => {
                for (_, hop) in hops.iter() {
                    self.relay(sh, hop, &header, body);
                }
            }
            Hops::None => {}
        }
        if let Decision::HopLimit { .. } = decision {
            sh.stats.drop(Reason::HopLimit, 1);
            sh.warn_limited(format_args!(
                "not relaying a message from {} to {} that was relayed {} times already (a routing loop?)",
                header.src, header.dst, header.hops
            ));
        }
        match decision {
            Decision::Local
            | Decision::Flood { local: true, .. }
            | Decision::HopLimit { local: true } => {
                deliver(sh, header.src, body);
                self.wrote = true;
            }
            Decision::Drop(why) => sh.stats.drop(Reason::of_drop(why), 1),
            Decision::Direct(_)
            | Decision::Relay { .. }
            | Decision::Flood { .. }
            | Decision::HopLimit { .. } => {}
        }
    }

    /// Send a message on to `hop`, one hop further (sealed anew, hop count
    /// included, for that link).
    fn relay(&mut self, sh: &Shared, hop: &Peer, header: &Header, body: &[u8]) {
        bump(&sh.stats.relayed, 1);
        self.relay.clear();
        self.relay.extend_from_slice(body);
        self.relay.resize(body.len() + TAG_LEN, 0);
        sh.send_message(
            &mut self.out,
            hop,
            header.src,
            header.dst,
            header.hops.saturating_add(1),
            &mut self.relay,
            body.len(),
        );
    }
}

/// The sleeve's per-frame work without its threads and devices: the
/// functions the senders call for each frame read from the TAP, and the
/// receiver for each buffer received, with what they send and write handed
/// to an [`Io`] of the caller's instead of the socket and the TAP. Tests
/// and benchmarks drive the real data path with it
/// (`tests/alloc_per_frame.rs`); the daemon's threads do not use it.
pub struct Engine {
    sh: Shared,
    tx: Tx,
    rx: Rx,
}

impl Engine {
    /// A sleeve for `cfg` with a TAP that has vnet headers (as the
    /// daemon's has), sending to `io`. It also holds a UDP socket on
    /// 127.0.0.1 (a port the kernel picks), which the per-frame work never
    /// uses.
    pub fn new(cfg: &Config, io: Box<dyn Io>) -> io::Result<Engine> {
        let sock = UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
        Ok(Engine {
            sh: Shared::new(cfg, sock, true, true, Vec::new(), Some(io)),
            tx: Tx::new(),
            rx: Rx::new(),
        })
    }

    /// Apply a command, as the control task does.
    pub fn command(&self, c: Cmd) {
        command(&self.sh, c);
    }

    /// One frame (vnet header + Ethernet frame, at most [`MAX_FRAME`]
    /// bytes; the rest is cut) as if read from the TAP: sent, or packed
    /// until [`Engine::flush`].
    pub fn tap_frame(&mut self, frame: &[u8]) {
        let off = Tx::read_offset(&self.sh);
        let n = frame.len().min(BUF - TAG_LEN - off);
        self.tx.buf[off..off + n].copy_from_slice(&frame[..n]);
        self.tx.on_read(&self.sh, n);
    }

    /// The end of a burst read from the TAP: send what was packed.
    pub fn flush(&mut self) {
        flush_packs(&self.sh, &mut self.tx.out, &mut self.tx.packs);
    }

    /// One buffer received from `from`: a datagram, or a GRO run of
    /// `seg`-byte datagrams.
    pub fn receive(&mut self, from: SocketAddr, data: &mut [u8], seg: usize, now: Instant) {
        self.rx.on_buffer(&self.sh, from, data, seg, now);
    }
}

/// Answer a probe of `size` bytes (IP and UDP included) from `peer`: sealed
/// when the connection has keys, plain otherwise.
fn answer_probe(sh: &Shared, peer: &Peer, size: usize) {
    let ack = match peer.keys.as_ref() {
        Some(k) => match sleeve::sealed_probe_ack(sh.me, peer.name, &k.sealer(), size) {
            Ok(a) => a,
            Err(e) => {
                sh.stats.drop(Reason::Send, 1);
                trace!(peer = %peer.name, "cannot seal a probe acknowledgement: {e}");
                return;
            }
        },
        None => sleeve::probe_ack(sh.me, peer.name, size).to_vec(),
    };
    let sent = udpio::send_segments(sh.sock.as_raw_fd(), peer.addr, &[IoSlice::new(&ack)], None);
    if let Err(e) = sent {
        trace!(peer = %peer.name, "probe acknowledgement: {e}");
    }
}

/// A probe acknowledgement from `peer`: opened with its keys when the
/// connection has them (a plain or forged one is refused), then fed to the
/// path MTU search.
fn on_probe_ack(sh: &Shared, peer: &Peer, header: &Header, body: &mut [u8], now: Instant) {
    let size = match (sh.encrypted, peer.keys.as_ref()) {
        (_, Some(k)) => k.open_probe_ack(now, header, body),
        (true, None) => Err(OpenError::NoKey(header.key_id)),
        (false, None) => sleeve::open_probe_ack(header, body, None),
    };
    match size {
        Ok(size) => {
            let size = usize::try_from(size).unwrap_or(0);
            peer.with_probe(|p| p.ack(size));
        }
        Err(e) => sh.dropped_from(peer, Reason::of_open(&e), "path MTU acknowledgement", &e),
    }
}

/// The most datagrams of one received run that [`deliver_run`] writes to
/// the TAP straight (a GRO run holds at most 64); longer runs take the
/// general path.
const RUN_MAX: usize = 2 * MAX_SEGMENTS;

/// The common case of bulk traffic, without the reassembly copy: a received
/// run of datagrams that is exactly one whole plain message for us holding
/// one frame is written to the TAP straight from the datagrams, in one
/// `writev`. Anything else (sealed, relayed, several frames, a message split
/// across runs) returns false and takes the general path.
fn deliver_run(sh: &Shared, peer: &Peer, data: &[u8], seg: usize) -> bool {
    if sh.encrypted || !sh.vnet_hdr || data.len() <= seg {
        return false;
    }
    let Ok((first, plan, head_range)) = sleeve::parse_datagram(&data[..seg]) else {
        return false;
    };
    let n = data.len().div_ceil(seg);
    if first.kind != Kind::Frames
        || first.dst != sh.me
        || first.src == sh.me
        || plan.index != 0
        || plan.count as usize != n
        || n > RUN_MAX
    {
        return false;
    }
    // A slice per datagram, on the stack.
    let mut iov = [IoSlice::new(&[]); RUN_MAX];
    let mut total = 0;
    for (i, d) in data.chunks(seg).enumerate() {
        let Ok((h, s, range)) = sleeve::parse_datagram(d) else {
            return false;
        };
        if h != first || s.index as usize != i || s.count != plan.count || s.stride != plan.stride {
            return false;
        }
        total += range.len();
        iov[i] = IoSlice::new(&d[range]);
    }
    let iov = &mut iov[..n];
    // One frame record spanning the whole message.
    let head: &[u8] = &data[head_range];
    let Some((len, frame_start)) = head.split_first_chunk::<FRAME_RECORD_HEADER>() else {
        return false;
    };
    let len = u32::from_be_bytes(*len) as usize;
    if len + FRAME_RECORD_HEADER != total || sleeve::frame_record_header(len).is_err() {
        return false;
    }
    let Some((_, mac)) = sleeve::frame_macs(frame_start) else {
        return false;
    };
    bump(&sh.stats.datagrams_in, n as u64);
    sh.heard(peer);
    if !learn(sh, first.src, mac) {
        return true;
    }
    iov[0] = IoSlice::new(frame_start);
    if let Err(e) = sh.write_tap(iov) {
        trace!("TAP write: {e}");
    }
    true
}

/// Remember that `mac` lives behind `src` (unicast MACs of other peers
/// only): a read lock to see whether anything changes, the write lock only
/// when it does. Returns whether the frame may go to the TAP: not when its
/// source is one of our own MACs (counted as `mac_claim`) or one the table
/// cannot hold for that peer (`mac_limit`), which the bridge must not learn
/// either.
fn learn(sh: &Shared, src: PeerName, mac: [u8; 6]) -> bool {
    let mut l = sh
        .macs
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .check(sh.me, src, &mac);
    if l == Learn::Learned {
        l = sh
            .macs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .learn(sh.me, src, mac);
    }
    match l {
        Learn::Local => {
            sh.stats.drop(Reason::MacClaim, 1);
            sh.warn_limited(format_args!(
                "dropped a frame from {src}: its source MAC {} is one of this host's",
                MacFmt(mac)
            ));
        }
        Learn::Full => sh.stats.drop(Reason::MacLimit, 1),
        Learn::Learned | Learn::Known | Learn::NotUnicast | Learn::FromUs => {}
    }
    l.deliverable()
}

/// A MAC as `aa:bb:cc:dd:ee:ff`, formatted only when printed.
struct MacFmt([u8; 6]);

impl std::fmt::Display for MacFmt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Write the frames of a message for us (or broadcast) to the TAP, and learn
/// which peer their source MACs live behind; frames whose source MAC is
/// refused ([`learn`]) are dropped.
fn deliver(sh: &Shared, src: PeerName, body: &[u8]) {
    for f in sleeve::frames(body) {
        let f = match f {
            Ok(f) => f,
            Err(e) => {
                sh.stats.drop(Reason::Malformed, 1);
                sh.warn_limited(format_args!("malformed frames from {src}: {e}"));
                return;
            }
        };
        if let Some((_, mac)) = sleeve::frame_macs(f) {
            if !learn(sh, src, mac) {
                continue;
            }
        }
        let data = if sh.vnet_hdr { f } else { &f[VNET_HDR_LEN..] };
        if let Err(e) = sh.write_tap(&[IoSlice::new(data)]) {
            trace!("TAP write: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report's reason names are stable, distinct snake_case words, and
    /// every reason is reported (a zero too).
    #[test]
    fn drop_reasons_are_named_once() {
        let names: Vec<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(
            names,
            [
                "malformed",
                "auth",
                "replay",
                "unknown_sender",
                "reassembly",
                "hop_limit",
                "no_route",
                "from_us",
                "mac_claim",
                "mac_limit",
                "path_mtu",
                "send"
            ]
        );
        let c = Counters::default();
        c.drop(Reason::Send, 2);
        c.drop(Reason::Auth, 1);
        let d = c.drops();
        assert_eq!(d.len(), Reason::ALL.len());
        assert_eq!((d["send"], d["auth"], d["malformed"]), (2, 1, 0));
    }

    #[test]
    fn open_errors_map_to_reasons() {
        use mesh_proto::WireError;
        for (e, want) in [
            (OpenError::Wire(WireError::Invalid("x")), Reason::Malformed),
            (OpenError::Seal(SealError::Replay(3)), Reason::Replay),
            (OpenError::Seal(SealError::Forged), Reason::Auth),
            (OpenError::NoKey(2), Reason::Auth),
            (OpenError::PlainRefused, Reason::Auth),
        ] {
            assert_eq!(Reason::of_open(&e), want, "{e}");
        }
        assert_eq!(Reason::of_drop(DropReason::NoRoute), Reason::NoRoute);
        assert_eq!(Reason::of_drop(DropReason::FromUs), Reason::FromUs);
    }
}
