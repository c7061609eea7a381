//! Control connections on TCP 6783: dialing, accepting, and running one.
//!
//! The protocol of a connection — hellos (version negotiation, password
//! flags) → Noise handshake (`XX`, or `XXpsk3` with a password) → each side
//! sends an [`Intro`](mesh_proto::control::Intro) → heartbeats, gossip and
//! the dead decision until it ends — is the sans-IO
//! [`Connection`] of `mesh_proto::conn`. This module is its I/O shell: it
//! reads the TCP stream into it, writes what it transmits, drives its timer,
//! and tells the router what it reports (the peer's intro becomes the
//! sleeve keys and the negotiated fast path, see [`crate::datapath::fastdp`]).
//! With a password it also rekeys the sleeve ([`mesh_proto::rekey`]): every
//! second it asks whether our sending key is due (by the messages
//! sealed under it or its age) and offers a fresh random one; it seals with
//! it once the peer acknowledges; a key the peer offers goes into the key
//! ring before it is acknowledged. Every
//! failure ends only this connection, with one (rate-limited) log line and a
//! reason shown by `mesh status`. Dial targets retry with exponential
//! backoff and jitter.

use super::msg::{self, ConnId, Established};
use crate::api::{ConnState, ConnStatus};
use crate::datapath::keys::SleeveKeys;
use crate::peer::Me;
use crate::warn::{Kind, WarnLimit};
use mesh_proto::conn::{CloseKind, Config, Connection, Event, SETUP_TIMEOUT};
use mesh_proto::control::{FastdpOffer, Intro};
use mesh_proto::handshake::Role;
use mesh_proto::name::PeerName;
use mesh_proto::rekey::Sending;
use mesh_proto::seal::{Opener, Sealer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

/// Backoff bounds for dial retries.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The reason given when closing the redundant one of two connections.
pub use mesh_proto::conn::DUPLICATE;

/// The most inbound connections open at once.
const MAX_INBOUND: usize = 512;

/// How often a connection asks whether its sending sleeve key is due.
const REKEY_CHECK: Duration = Duration::from_secs(1);
/// TCP_USER_TIMEOUT of control connections.
const USER_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a target reached through the peer's own connection to us is
/// looked at again.
const RECHECK_CONNECTED: Duration = Duration::from_secs(2);

/// Ids for inbound connections start high, clear of dial targets' ids.
static NEXT_INBOUND: AtomicU64 = AtomicU64::new(1 << 32);

/// How a connection ended.
enum End {
    /// Try again later (after backoff).
    Retry(String),
    /// Do not try this target again.
    Fatal(String),
    /// The peer is already connected through another connection.
    Duplicate,
}

fn row(
    dir: &str,
    addr: SocketAddr,
    state: ConnState,
    peer: Option<(PeerName, &str)>,
    encrypted: bool,
    info: Option<String>,
) -> ConnStatus {
    ConnStatus {
        direction: dir.into(),
        address: addr.to_string(),
        state,
        peer: peer.map(|(p, _)| p.to_string()),
        nickname: peer.map(|(_, n)| n.to_string()),
        encrypted,
        info,
        overlay: None,
        overlay_info: None,
        path_mtu: None,
        sleeve_keys: None,
    }
}

/// Accept inbound connections until shutdown.
pub async fn accept_loop(
    me: Arc<Me>,
    listener: tokio::net::TcpListener,
    router: mpsc::Sender<msg::Cmd>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND));
    let sources = PerSource::default();
    loop {
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { warn!("accept: {e}"); tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            },
            _ = shutdown.changed() => return,
        };
        // Bounded: a flood of connections cannot exhaust the daemon.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if WarnLimit::allow(Kind::Inbound) {
                warn!(%addr, "too many inbound connections; refused");
            }
            continue;
        };
        // And per source: one address cannot take every slot.
        let Some(source) = sources.acquire(addr.ip()) else {
            if WarnLimit::allow(Kind::Inbound) {
                warn!(%addr, "too many inbound connections from {}; refused", addr.ip());
            }
            continue;
        };
        let id = NEXT_INBOUND.fetch_add(1, Ordering::Relaxed);
        let (me, router) = (me.clone(), router.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _source = source;
            let end = run_conn(&me, id, stream, addr, Role::Responder, &router).await;
            let _ = router.send(msg::Cmd::Closed { id, forget: true }).await;
            match end {
                End::Retry(reason) | End::Fatal(reason) => {
                    if WarnLimit::allow(Kind::Inbound) {
                        info!(%addr, "inbound connection ended: {reason}");
                    }
                }
                End::Duplicate => {}
            }
        });
    }
}

/// The most inbound connections open at once from one address (a host
/// has one or two connections to a peer; the rest is a flood).
const MAX_INBOUND_PER_SOURCE: usize = 16;

/// Inbound connections open per source address.
#[derive(Clone, Default)]
struct PerSource(Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>);

/// One inbound connection counted against its source; uncounted on drop.
struct SourceSlot {
    sources: PerSource,
    ip: std::net::IpAddr,
}

impl PerSource {
    /// A slot for one more connection from `ip`, unless it has
    /// [`MAX_INBOUND_PER_SOURCE`] open already.
    fn acquire(&self, ip: std::net::IpAddr) -> Option<SourceSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_INBOUND_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.sources.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// What a dialer dials.
#[derive(Debug, Clone)]
pub struct DialSpec {
    /// Addresses to try, in turn.
    pub addrs: Vec<SocketAddr>,
    /// The peer expected there, when learned by gossip: the dialer ends
    /// once that peer is connected by any connection.
    pub peer: Option<PeerName>,
}

async fn is_connected(
    router: &mpsc::Sender<msg::Cmd>,
    peer: Option<PeerName>,
    ip: Option<std::net::IpAddr>,
) -> bool {
    let (tx, rx) = oneshot::channel();
    let _ = router
        .send(msg::Cmd::Connected {
            peer,
            ip,
            reply: tx,
        })
        .await;
    rx.await.unwrap_or(false)
}

/// Keep a connection to a target or a gossip-learned peer up until `stop`.
pub async fn dial_loop(
    me: Arc<Me>,
    id: ConnId,
    spec: DialSpec,
    router: mpsc::Sender<msg::Cmd>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff(BACKOFF_MIN);
    let mut attempt = 0usize;
    let send_row = |target: SocketAddr, state: ConnState, info: Option<String>| {
        let router = router.clone();
        let peer = spec.peer;
        async move {
            let mut r = row("outbound", target, state, None, false, info);
            r.peer = peer.map(|p| p.to_string());
            let _ = router.send(msg::Cmd::Update { id, row: r }).await;
        }
    };
    let forget = |router: mpsc::Sender<msg::Cmd>| async move {
        let _ = router.send(msg::Cmd::Closed { id, forget: true }).await;
    };
    if spec.addrs.is_empty() {
        return;
    }
    loop {
        if *stop.borrow() {
            forget(router.clone()).await;
            return;
        }
        let target = spec.addrs[attempt % spec.addrs.len()];
        attempt += 1;
        // Already connected (e.g. the peer dialed us): nothing to do.
        let ip = spec.peer.is_none().then_some(target.ip());
        if is_connected(&router, spec.peer, ip).await {
            if spec.peer.is_some() {
                forget(router.clone()).await;
                return;
            }
            let info = Some("via the connection the peer made to us".into());
            send_row(target, ConnState::Established, info).await;
            tokio::select! {
                _ = tokio::time::sleep(RECHECK_CONNECTED) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        send_row(target, ConnState::Connecting, None).await;
        let started = Instant::now();
        let end = match tokio::time::timeout(SETUP_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(stream)) => run_conn(&me, id, stream, target, Role::Initiator, &router).await,
            Ok(Err(e)) => End::Retry(format!("connect: {e}")),
            Err(_) => End::Retry("connect: timed out".into()),
        };
        let _ = router.send(msg::Cmd::Closed { id, forget: false }).await;
        match end {
            End::Fatal(reason) => {
                warn!(%target, "giving up on target: {reason}");
                send_row(target, ConnState::Failed, Some(reason)).await;
                return;
            }
            End::Duplicate => {
                backoff.reset();
                continue;
            }
            End::Retry(reason) => {
                if WarnLimit::allow(Kind::Dial) {
                    info!(%target, "connection failed: {reason}");
                }
                send_row(target, ConnState::Retrying, Some(reason)).await;
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next()) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Exponential backoff with jitter, from [`BACKOFF_MIN`] to [`BACKOFF_MAX`].
struct Backoff(Duration);

impl Backoff {
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }

    /// The next wait: the delay plus up to half of it again; the delay
    /// doubles.
    fn next(&mut self) -> Duration {
        let d = self.0;
        let jitter =
            Duration::from_millis(u64::from(random_u16()) % (d.as_millis() as u64 / 2 + 1));
        self.0 = (d * 2).min(BACKOFF_MAX);
        d + jitter
    }
}

fn random_u16() -> u16 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    u16::from_le_bytes(b)
}

/// The writing half of a connection, in its own task so that reading goes
/// on while a write waits for the peer: writes what it is given, each with
/// a deadline, and reports the first failure.
struct Writer {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    failed: oneshot::Receiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn spawn(mut w: OwnedWriteHalf) -> Writer {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
        let (failed_tx, failed) = oneshot::channel();
        let task = tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                let e = match tokio::time::timeout(SETUP_TIMEOUT, w.write_all(&bytes)).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => format!("connection lost: {e}"),
                    Err(_) => "connection lost: write timed out".into(),
                };
                let _ = failed_tx.send(e);
                return;
            }
        });
        Writer {
            tx: Some(tx),
            failed,
            task,
        }
    }

    /// Queue bytes; the failure that ended the writer, if it has ended.
    async fn send(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        let Some(tx) = &self.tx else {
            return Err("connection lost".into());
        };
        if tx.send(bytes).await.is_err() {
            return Err(self
                .failed
                .try_recv()
                .unwrap_or_else(|_| "connection lost".into()));
        }
        Ok(())
    }

    /// Write what is queued (at most for [`SETUP_TIMEOUT`]), then stop.
    /// (Dropping the writer stops it at once.)
    async fn finish(&mut self) {
        self.tx = None;
        let _ = tokio::time::timeout(SETUP_TIMEOUT, &mut self.task).await;
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a connection task knows about its connection, to register it.
struct Link<'a> {
    me: &'a Me,
    id: ConnId,
    addr: SocketAddr,
    role: Role,
    dir: &'static str,
    router: &'a mpsc::Sender<msg::Cmd>,
}

/// A connection the router took: the peer, and the channels the router
/// closes it and sends gossip on.
#[derive(Default)]
struct Registered {
    peer: Option<PeerName>,
    close: Option<oneshot::Receiver<String>>,
    gossip: Option<mpsc::Receiver<Vec<u8>>>,
    /// With a password: the keys the sleeve uses, and our sending key's
    /// rekey state.
    keys: Option<(Arc<SleeveKeys>, Sending)>,
}

impl<'a> Link<'a> {
    fn new(
        me: &'a Me,
        id: ConnId,
        addr: SocketAddr,
        role: Role,
        router: &'a mpsc::Sender<msg::Cmd>,
    ) -> Link<'a> {
        let dir = if role == Role::Initiator {
            "outbound"
        } else {
            "inbound"
        };
        Link {
            me,
            id,
            addr,
            role,
            dir,
            router,
        }
    }

    /// The handshake is done: derive the sleeve keys and the fast path, and
    /// hand the connection to the router. `None` when the router keeps
    /// another connection to this peer (a duplicate); otherwise the
    /// channels the router closes it and sends gossip on.
    async fn register(
        &self,
        peer: PeerName,
        intro: &Intro,
        sleeve_key: Option<(u8, [u8; 32])>,
        fastdp_offer: &Result<FastdpOffer, String>,
    ) -> Option<Registered> {
        let keys = match (sleeve_key, intro.sleeve_key) {
            (Some((kid, k)), Some((tid, t))) => Some((
                SleeveKeys::new(Sealer::new(kid, &k), Opener::new(tid, &t)),
                Sending::new(Instant::now(), kid, self.me.rekey),
            )),
            _ => None,
        };
        let udp = SocketAddr::new(self.addr.ip(), intro.udp_port);
        let fastdp =
            crate::datapath::fastdp::negotiate(fastdp_offer, intro.fastdp.as_ref(), self.addr.ip());
        let (close_tx, close) = oneshot::channel();
        let (gossip_tx, gossip) = mpsc::channel::<Vec<u8>>(256);
        let (reply_tx, reply_rx) = oneshot::channel();
        let initiator = if self.role == Role::Initiator {
            self.me.name
        } else {
            peer
        };
        let _ = self
            .router
            .send(msg::Cmd::Established(Box::new(Established {
                id: self.id,
                peer,
                initiator,
                udp,
                keys: keys.as_ref().map(|(k, _)| k.clone()),
                fastdp,
                close: close_tx,
                gossip: gossip_tx,
                reply: reply_tx,
            })))
            .await;
        if !reply_rx.await.unwrap_or(false) {
            return None;
        }
        let row = row(
            self.dir,
            self.addr,
            ConnState::Established,
            Some((peer, &intro.nickname)),
            self.me.psk.is_some(),
            None,
        );
        let _ = self
            .router
            .send(msg::Cmd::Update { id: self.id, row })
            .await;
        Some(Registered {
            peer: Some(peer),
            close: Some(close),
            gossip: Some(gossip),
            keys,
        })
    }
}

/// What a connection needs from the daemon: with a password, a random key
/// for the sleeve; the fast-path offer to this address. Returns the
/// connection, the sleeve key and the offer (both needed again once it is
/// established).
#[allow(clippy::type_complexity)] // three parts, used once by run_conn
fn connection(
    me: &Me,
    role: Role,
    addr: SocketAddr,
) -> Result<
    (
        Connection,
        Option<(u8, [u8; 32])>,
        Result<FastdpOffer, String>,
    ),
    End,
> {
    let sleeve_key = if me.psk.is_some() {
        let k =
            fresh_key().map_err(|e| End::Fatal(format!("no randomness for a sleeve key: {e}")))?;
        Some((1u8, k))
    } else {
        None
    };
    let fastdp_offer = crate::datapath::fastdp::offer(me, addr.ip());
    let conn = Connection::new(
        Config {
            role,
            key: me.key.clone(),
            psk: me.psk,
            nickname: me.nickname.clone(),
            udp_port: me.port,
            max_frame: me.mtu + 14,
            sleeve_key,
            fastdp: fastdp_offer.as_ref().ok().cloned(),
        },
        Instant::now(),
    );
    Ok((conn, sleeve_key, fastdp_offer))
}

/// A fresh random sleeve key.
fn fresh_key() -> Result<[u8; 32], getrandom::Error> {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k)?;
    Ok(k)
}

/// The connection closed: say why (rate-limited), send what it still has
/// for the peer (a refusal, a Close), and end.
async fn closed(
    conn: &mut Connection,
    mut writer: Writer,
    addr: SocketAddr,
    kind: CloseKind,
    reason: String,
    warn: bool,
) -> End {
    if warn && WarnLimit::allow(Kind::Handshake) {
        warn!(%addr, peer = ?conn.peer(), "{reason}");
    }
    if !conn.is_established() && kind != CloseKind::Duplicate {
        crate::metrics::count_handshake_failure(&reason);
    }
    // Best effort: a refusal or a Close the peer should see.
    while let Some(bytes) = conn.poll_transmit() {
        if writer.send(bytes).await.is_err() {
            break;
        }
    }
    writer.finish().await;
    match kind {
        CloseKind::Retry => End::Retry(reason),
        CloseKind::Fatal => End::Fatal(reason),
        CloseKind::Duplicate => End::Duplicate,
    }
}

/// Set up and run one connection; returns how it ended. The protocol is
/// [`Connection`]'s; this moves its bytes, drives its timer and tells the
/// router what it reports.
async fn run_conn(
    me: &Me,
    id: ConnId,
    stream: TcpStream,
    addr: SocketAddr,
    role: Role,
    router: &mpsc::Sender<msg::Cmd>,
) -> End {
    let _ = stream.set_nodelay(true);
    // Healthy connections are quiet for up to a minute (heartbeats are
    // slow, `conn::PACE`): a stream whose data goes unacknowledged this
    // long is broken, whatever the heartbeats say.
    let _ = socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(USER_TIMEOUT));
    let (mut r, w) = stream.into_split();
    let mut writer = Writer::spawn(w);
    let link = Link::new(me, id, addr, role, router);
    let row = row(link.dir, addr, ConnState::Handshaking, None, false, None);
    let _ = router.send(msg::Cmd::Update { id, row }).await;

    let (mut conn, sleeve_key, fastdp_offer) = match connection(me, role, addr) {
        Ok(c) => c,
        Err(end) => return end,
    };

    // Small until the peer is authenticated: an unauthenticated connection
    // costs a few KB, not the 64 KB an established one reads with.
    let mut buf = vec![0u8; 4 * 1024];
    let mut reg = Registered::default();
    let mut rekey = tokio::time::interval(REKEY_CHECK);
    rekey.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while let Some(bytes) = conn.poll_transmit() {
            if let Err(e) = writer.send(bytes).await {
                return End::Retry(e);
            }
        }
        if let Some(event) = conn.poll_event() {
            match event {
                Event::Established { peer, intro } => {
                    buf.resize(64 * 1024, 0);
                    match link.register(peer, &intro, sleeve_key, &fastdp_offer).await {
                        Some(r) => reg = r,
                        None => conn.close(DUPLICATE),
                    }
                }
                Event::Gossip(bytes) => {
                    if let Some(from) = reg.peer {
                        let _ = router.send(msg::Cmd::GossipIn { id, from, bytes }).await;
                    }
                }
                Event::SleeveKey { key_id, key } => {
                    if let Some((keys, _)) = &reg.keys {
                        // Installed before acknowledged: whatever the peer
                        // seals with it once it hears the ack opens.
                        match keys.install(Instant::now(), key_id, &key) {
                            Ok(()) => {
                                conn.ack_sleeve_key(key_id);
                                debug!(%addr, key_id, "peer's sleeve key replaced");
                            }
                            Err(e) => {
                                if WarnLimit::allow(Kind::Handshake) {
                                    warn!(%addr, peer = ?reg.peer, "sleeve key refused: {e}");
                                }
                            }
                        }
                    }
                }
                Event::SleeveKeyAck { key_id } => {
                    if let Some((keys, sending)) = &mut reg.keys {
                        if let Some((kid, k)) = sending.handle_ack(Instant::now(), key_id) {
                            keys.set_sealer(Sealer::new(kid, &k));
                            debug!(%addr, key_id = kid, "our sleeve key replaced");
                        }
                    }
                }
                Event::Closed { kind, reason, warn } => {
                    return closed(&mut conn, writer, addr, kind, reason, warn).await;
                }
            }
            continue;
        }
        let timer = conn.poll_timeout();
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(
            timer.unwrap_or_else(|| Instant::now() + SETUP_TIMEOUT),
        ));
        tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) => conn.handle_read_error(Instant::now(), "early eof"),
                Ok(n) => conn.handle_input(Instant::now(), &buf[..n]),
                Err(e) => conn.handle_read_error(Instant::now(), &e.to_string()),
            },
            _ = sleep, if timer.is_some() => conn.handle_timeout(Instant::now()),
            out = async { reg.gossip.as_mut()?.recv().await }, if reg.gossip.is_some() => match out {
                Some(bytes) => conn.send_gossip(bytes),
                None => reg.gossip = None,
            },
            e = &mut writer.failed => return End::Retry(e.unwrap_or_else(|_| "connection lost".into())),
            _ = rekey.tick(), if reg.keys.is_some() => {
                if let Some((keys, sending)) = &mut reg.keys {
                    if sending.due(Instant::now(), keys.sealed()) {
                        match fresh_key() {
                            Ok(k) => {
                                let key_id = sending.offer(k);
                                conn.offer_sleeve_key(key_id, k);
                            }
                            Err(e) => warn!(%addr, "no randomness for a sleeve key: {e}"),
                        }
                    }
                }
            }
            reason = async { reg.close.as_mut()?.await.ok() }, if reg.close.is_some() => {
                reg.close = None;
                conn.close(&reason.unwrap_or_else(|| "shutting down".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One source gets at most its share; a slot comes back on drop; other
    /// sources are not affected.
    #[test]
    fn one_source_cannot_take_every_slot() {
        let s = PerSource::default();
        let a: std::net::IpAddr = "198.18.0.3".parse().expect("ip");
        let b: std::net::IpAddr = "198.18.0.2".parse().expect("ip");
        let mut held: Vec<SourceSlot> = (0..MAX_INBOUND_PER_SOURCE)
            .map(|_| s.acquire(a).expect("a slot"))
            .collect();
        assert!(s.acquire(a).is_none());
        assert!(s.acquire(b).is_some());
        held.pop();
        assert!(s.acquire(a).is_some());
        drop(held);
        assert!(s.0.lock().expect("lock").get(&a).is_none());
    }
}
