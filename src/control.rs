//! Control connections on TCP 6783: dialing, accepting, and running one.
//!
//! A connection goes: hellos (version negotiation, password flags) →
//! Noise handshake (`XX`, or `XXpsk3` with a password) → each side sends an
//! [`Intro`] (nickname, sleeve port, with a password its random sleeve
//! key, and its fast-path offer, see [`crate::fastdp`]) → the router
//! registers it → heartbeats until it ends. Every read has a deadline;
//! every failure ends only this connection, with one (rate-limited) log
//! line and a reason shown by `mesh status`. Dial targets retry with
//! exponential backoff and jitter.

use crate::api::ConnStatus;
use crate::daemon::Me;
use crate::router::{self, ConnId, Established};
use anyhow::anyhow;
use mesh_proto::control::{ControlMsg, Intro};
use mesh_proto::frame::{self, RecordKind, RECORD_HEADER_LEN};
use mesh_proto::handshake::{Handshake, HandshakeError, Role, Transport};
use mesh_proto::hello::{Hello, HELLO_LEN};
use mesh_proto::name::PeerName;
use mesh_proto::seal::{Opener, Sealer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

/// Deadline for each step of setting up a connection.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a heartbeat is sent.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Silence after which a connection is declared dead.
const DEAD_AFTER: Duration = Duration::from_secs(8);
/// Backoff bounds for dial retries.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The reason given when closing the redundant one of two connections.
pub const DUPLICATE: &str = "duplicate connection";

/// The most inbound connections open at once.
const MAX_INBOUND: usize = 512;

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

/// Rate limiter for warnings that others can cause (misbehaving peers, a
/// Docker daemon the proxy cannot reach): at most `BURST` lines per
/// 10-second window, shared by the whole daemon.
pub struct WarnLimit;
static WARN_WINDOW: AtomicU64 = AtomicU64::new(0);
static WARN_COUNT: AtomicU64 = AtomicU64::new(0);
impl WarnLimit {
    const BURST: u64 = 10;
    /// Whether one more warning may be logged now.
    pub fn allow() -> bool {
        let window = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() / 10)
            .unwrap_or(0);
        if WARN_WINDOW.swap(window, Ordering::Relaxed) != window {
            WARN_COUNT.store(0, Ordering::Relaxed);
        }
        WARN_COUNT.fetch_add(1, Ordering::Relaxed) < Self::BURST
    }
}

fn row(
    dir: &str,
    addr: SocketAddr,
    state: &str,
    peer: Option<(PeerName, &str)>,
    encrypted: bool,
    info: Option<String>,
) -> ConnStatus {
    ConnStatus {
        direction: dir.into(),
        address: addr.to_string(),
        state: state.into(),
        peer: peer.map(|(p, _)| p.to_string()),
        nickname: peer.map(|(_, n)| n.to_string()),
        encrypted,
        info,
        overlay: None,
        overlay_info: None,
        path_mtu: None,
    }
}

/// Accept inbound connections until shutdown.
pub async fn accept_loop(
    me: Arc<Me>,
    listener: tokio::net::TcpListener,
    router: mpsc::Sender<router::Cmd>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND));
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
            if WarnLimit::allow() {
                warn!(%addr, "too many inbound connections; refused");
            }
            continue;
        };
        let id = NEXT_INBOUND.fetch_add(1, Ordering::Relaxed);
        let (me, router) = (me.clone(), router.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let end = run_conn(&me, id, stream, addr, Role::Responder, &router).await;
            let _ = router.send(router::Cmd::Closed { id, forget: true }).await;
            match end {
                End::Retry(reason) | End::Fatal(reason) => {
                    if WarnLimit::allow() {
                        info!(%addr, "inbound connection ended: {reason}");
                    }
                }
                End::Duplicate => {}
            }
        });
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
    router: &mpsc::Sender<router::Cmd>,
    peer: Option<PeerName>,
    ip: Option<std::net::IpAddr>,
) -> bool {
    let (tx, rx) = oneshot::channel();
    let _ = router
        .send(router::Cmd::Connected {
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
    router: mpsc::Sender<router::Cmd>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut attempt = 0usize;
    let send_row = |target: SocketAddr, state: &'static str, info: Option<String>| {
        let router = router.clone();
        let peer = spec.peer;
        async move {
            let mut r = row("outbound", target, state, None, false, info);
            r.peer = peer.map(|p| p.to_string());
            let _ = router.send(router::Cmd::Update { id, row: r }).await;
        }
    };
    let forget = |router: mpsc::Sender<router::Cmd>| async move {
        let _ = router.send(router::Cmd::Closed { id, forget: true }).await;
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
        if is_connected(
            &router,
            spec.peer,
            if spec.peer.is_some() {
                None
            } else {
                Some(target.ip())
            },
        )
        .await
        {
            if spec.peer.is_some() {
                forget(router.clone()).await;
                return;
            }
            send_row(
                target,
                "established",
                Some("via the connection the peer made to us".into()),
            )
            .await;
            tokio::select! {
                _ = tokio::time::sleep(HEARTBEAT) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        send_row(target, "connecting", None).await;
        let started = Instant::now();
        let end = match tokio::time::timeout(SETUP_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(stream)) => run_conn(&me, id, stream, target, Role::Initiator, &router).await,
            Ok(Err(e)) => End::Retry(format!("connect: {e}")),
            Err(_) => End::Retry("connect: timed out".into()),
        };
        let _ = router.send(router::Cmd::Closed { id, forget: false }).await;
        match end {
            End::Fatal(reason) => {
                warn!(%target, "giving up on target: {reason}");
                send_row(target, "failed", Some(reason)).await;
                return;
            }
            End::Duplicate => {
                backoff = BACKOFF_MIN;
                continue;
            }
            End::Retry(reason) => {
                if WarnLimit::allow() {
                    info!(%target, "connection failed: {reason}");
                }
                send_row(target, "retrying", Some(reason)).await;
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = BACKOFF_MIN;
        }
        let jitter =
            Duration::from_millis(u64::from(random_u16()) % (backoff.as_millis() as u64 / 2 + 1));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = stop.changed() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn random_u16() -> u16 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    u16::from_le_bytes(b)
}

async fn read_record(r: &mut OwnedReadHalf) -> anyhow::Result<(RecordKind, Vec<u8>)> {
    let mut head = [0u8; RECORD_HEADER_LEN];
    r.read_exact(&mut head).await?;
    let (kind, len) = frame::parse_header(&head)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((kind, payload))
}

async fn write_record(
    w: &mut OwnedWriteHalf,
    kind: RecordKind,
    payload: &[u8],
) -> anyhow::Result<()> {
    let mut out = Vec::with_capacity(payload.len() + RECORD_HEADER_LEN);
    frame::emit(kind, payload, &mut out)?;
    w.write_all(&out).await?;
    Ok(())
}

async fn deadline<T>(
    what: &str,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(SETUP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e:#}")),
        Err(_) => Err(format!("{what}: timed out")),
    }
}

async fn refuse(w: &mut OwnedWriteHalf, reason: &str) {
    let mut r = reason.as_bytes().to_vec();
    r.truncate(frame::MAX_REFUSAL);
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        write_record(w, RecordKind::Refusal, &r),
    )
    .await;
}

fn password_reason(ours: bool, theirs: bool) -> String {
    match (ours, theirs) {
        (true, false) => "password mismatch: we have a password and the peer has none".into(),
        (false, true) => "password mismatch: the peer has a password and we have none".into(),
        _ => "password mismatch: the handshake did not authenticate (different passwords)".into(),
    }
}

/// Set up and run one connection; returns how it ended.
async fn run_conn(
    me: &Me,
    id: ConnId,
    stream: TcpStream,
    addr: SocketAddr,
    role: Role,
    router: &mpsc::Sender<router::Cmd>,
) -> End {
    let _ = stream.set_nodelay(true);
    let dir = if role == Role::Initiator {
        "outbound"
    } else {
        "inbound"
    };
    let (mut r, mut w) = stream.into_split();
    let update = |state: &str, info: Option<String>| router::Cmd::Update {
        id,
        row: row(dir, addr, state, None, false, info),
    };
    let _ = router.send(update("handshaking", None)).await;

    // 1. Hellos.
    let ours = Hello::ours(me.psk.is_some());
    let ours_bytes = ours.emit();
    if let Err(e) = w.write_all(&ours_bytes).await {
        return End::Retry(format!("sending hello: {e}"));
    }
    let mut theirs_bytes = [0u8; HELLO_LEN];
    if let Err(e) = deadline("reading hello", async {
        Ok(r.read_exact(&mut theirs_bytes).await?)
    })
    .await
    {
        return End::Retry(e);
    }
    let theirs = match Hello::parse(&theirs_bytes) {
        Ok(h) => h,
        Err(e) => {
            if WarnLimit::allow() {
                warn!(%addr, "not a mesh peer: {e}");
            }
            return End::Retry(format!("not a mesh peer: {e}"));
        }
    };
    if let Err(e) = ours.negotiate(&theirs) {
        warn!(%addr, "{e}");
        refuse(&mut w, &e.to_string()).await;
        return End::Retry(e.to_string());
    }
    if theirs.password != ours.password {
        let reason = password_reason(ours.password, theirs.password);
        if WarnLimit::allow() {
            warn!(%addr, "refusing connection: {reason}");
        }
        return End::Retry(reason);
    }

    // 2. Noise handshake, with both hellos as prologue.
    let mut prologue = Vec::with_capacity(2 * HELLO_LEN);
    match role {
        Role::Initiator => {
            prologue.extend_from_slice(&ours_bytes);
            prologue.extend_from_slice(&theirs_bytes);
        }
        Role::Responder => {
            prologue.extend_from_slice(&theirs_bytes);
            prologue.extend_from_slice(&ours_bytes);
        }
    }
    let mut hs = match Handshake::new(role, &me.key, me.psk.as_ref(), &prologue) {
        Ok(h) => h,
        Err(e) => return End::Fatal(e.to_string()),
    };
    while !hs.is_finished() {
        if hs.is_my_turn() {
            let msg = match hs.write() {
                Ok(m) => m,
                Err(e) => return End::Retry(e.to_string()),
            };
            if let Err(e) = write_record(&mut w, RecordKind::Handshake, &msg).await {
                return End::Retry(format!("handshake: {e:#}"));
            }
        } else {
            let (kind, payload) = match deadline("handshake", read_record(&mut r)).await {
                Ok(x) => x,
                Err(e) => return End::Retry(e),
            };
            match kind {
                RecordKind::Handshake => {}
                RecordKind::Refusal => {
                    return End::Retry(format!(
                        "refused by peer: {}",
                        String::from_utf8_lossy(&payload)
                    ))
                }
                RecordKind::Transport => {
                    return End::Retry("protocol error: transport record during handshake".into())
                }
            }
            match hs.read(&payload) {
                Ok(()) => {}
                Err(HandshakeError::Rejected) => {
                    let reason = password_reason(true, true);
                    if WarnLimit::allow() {
                        warn!(%addr, "refusing connection: {reason}");
                    }
                    refuse(&mut w, &reason).await;
                    return End::Retry(reason);
                }
                Err(e) => {
                    if WarnLimit::allow() {
                        warn!(%addr, "handshake failed: {e}");
                    }
                    return End::Retry(format!("handshake failed: {e}"));
                }
            }
        }
    }
    let mut transport = match hs.finish() {
        Ok(t) => t,
        Err(e) => return End::Retry(e.to_string()),
    };
    let peer = transport.remote_name();
    if peer == me.name {
        return End::Fatal("connected to ourselves (this address is our own)".into());
    }

    // 3. Introductions.
    let sleeve_key = if me.psk.is_some() {
        let mut k = [0u8; 32];
        if let Err(e) = getrandom::fill(&mut k) {
            return End::Fatal(format!("no randomness for a sleeve key: {e}"));
        }
        Some((1u8, k))
    } else {
        None
    };
    let fastdp_offer = crate::fastdp::offer(me, addr.ip());
    let intro = ControlMsg::Intro(Intro {
        nickname: me.nickname.clone(),
        udp_port: me.port,
        max_frame: me.mtu + 14,
        sleeve_key,
        fastdp: fastdp_offer.as_ref().ok().cloned(),
    });
    if let Err(e) = send_msg(&mut w, &mut transport, &intro).await {
        return End::Retry(format!("sending intro: {e:#}"));
    }
    let their_intro = match deadline(
        "waiting for the peer's intro",
        recv_msg(&mut r, &mut transport),
    )
    .await
    {
        Ok(ControlMsg::Intro(i)) => i,
        Ok(other) => return End::Retry(format!("protocol error: expected intro, got {other:?}")),
        Err(e) => return End::Retry(e),
    };
    let (sealer, opener) = match (sleeve_key, their_intro.sleeve_key) {
        (Some((kid, k)), Some((tid, t))) => {
            (Some(Sealer::new(kid, &k)), Some(Opener::new(tid, &t)))
        }
        (None, None) => (None, None),
        _ => return End::Retry("protocol error: sleeve key missing".into()),
    };
    let nickname = their_intro.nickname.clone();
    let udp = SocketAddr::new(addr.ip(), their_intro.udp_port);
    let fastdp = crate::fastdp::negotiate(&fastdp_offer, their_intro.fastdp.as_ref(), addr.ip());

    // 4. Register with the router.
    let (close_tx, mut close_rx) = oneshot::channel();
    let (gossip_tx, mut gossip_rx) = mpsc::channel::<Vec<u8>>(256);
    let (reply_tx, reply_rx) = oneshot::channel();
    let initiator = if role == Role::Initiator {
        me.name
    } else {
        peer
    };
    let _ = router
        .send(router::Cmd::Established(Box::new(Established {
            id,
            peer,
            initiator,
            udp,
            sealer,
            opener,
            fastdp,
            close: close_tx,
            gossip: gossip_tx,
            reply: reply_tx,
        })))
        .await;
    if !reply_rx.await.unwrap_or(false) {
        let _ = send_msg(
            &mut w,
            &mut transport,
            &ControlMsg::Close {
                reason: DUPLICATE.into(),
            },
        )
        .await;
        return End::Duplicate;
    }
    let encrypted = me.psk.is_some();
    let _ = router
        .send(router::Cmd::Update {
            id,
            row: row(
                dir,
                addr,
                "established",
                Some((peer, &nickname)),
                encrypted,
                None,
            ),
        })
        .await;

    // 5. Heartbeats until the end. Reads run in their own task so that a
    // partially read record is never lost to a cancelled future.
    let (rec_tx, mut rec_rx) = mpsc::channel(16);
    let reader = tokio::spawn(async move {
        loop {
            let r = read_record(&mut r).await;
            let stop = r.is_err();
            if rec_tx.send(r).await.is_err() || stop {
                return;
            }
        }
    });
    let mut tick = tokio::time::interval(HEARTBEAT);
    let mut last_heard = Instant::now();
    let mut gossip_open = true;
    let end = loop {
        tokio::select! {
            _ = tick.tick() => {
                if last_heard.elapsed() > DEAD_AFTER {
                    break End::Retry(format!("no heartbeat from {peer} for {}s", DEAD_AFTER.as_secs()));
                }
                if let Err(e) = send_msg(&mut w, &mut transport, &ControlMsg::Heartbeat).await {
                    break End::Retry(format!("connection lost: {e:#}"));
                }
            }
            out = gossip_rx.recv(), if gossip_open => {
                let Some(bytes) = out else {
                    gossip_open = false;
                    continue;
                };
                if let Err(e) = send_msg(&mut w, &mut transport, &ControlMsg::Gossip(bytes)).await {
                    break End::Retry(format!("connection lost: {e:#}"));
                }
            }
            reason = &mut close_rx => {
                let reason = reason.unwrap_or_else(|_| "shutting down".into());
                let _ = send_msg(&mut w, &mut transport, &ControlMsg::Close { reason: reason.clone() }).await;
                if reason == DUPLICATE {
                    break End::Duplicate;
                }
                break End::Retry(reason);
            }
            rec = rec_rx.recv() => {
                let (kind, payload) = match rec {
                    Some(Ok(x)) => x,
                    Some(Err(e)) => break End::Retry(format!("connection lost: {e:#}")),
                    None => break End::Retry("connection lost".into()),
                };
                if kind != RecordKind::Transport {
                    break End::Retry("protocol error: unexpected record".into());
                }
                let msg = transport.open(&payload).map_err(|e| anyhow!(e)).and_then(|b| Ok(ControlMsg::decode(&b)?));
                match msg {
                    Ok(ControlMsg::Heartbeat) | Ok(ControlMsg::Intro(_)) | Ok(ControlMsg::SleeveKey { .. }) => last_heard = Instant::now(),
                    Ok(ControlMsg::Gossip(bytes)) => {
                        last_heard = Instant::now();
                        let _ = router.send(router::Cmd::GossipIn { id, from: peer, bytes }).await;
                    }
                    Ok(ControlMsg::Close { reason }) => {
                        if reason == DUPLICATE { break End::Duplicate; }
                        break End::Retry(format!("closed by peer: {reason}"));
                    }
                    Err(e) => {
                        if WarnLimit::allow() { warn!(%peer, "malformed control message: {e:#}"); }
                        break End::Retry(format!("malformed control message: {e:#}"));
                    }
                }
            }
        }
    };
    reader.abort();
    end
}

async fn send_msg(
    w: &mut OwnedWriteHalf,
    t: &mut Transport,
    msg: &ControlMsg,
) -> anyhow::Result<()> {
    let sealed = t.seal(&msg.encode()?)?;
    tokio::time::timeout(
        SETUP_TIMEOUT,
        write_record(w, RecordKind::Transport, &sealed),
    )
    .await
    .map_err(|_| anyhow!("write timed out"))?
}

async fn recv_msg(r: &mut OwnedReadHalf, t: &mut Transport) -> anyhow::Result<ControlMsg> {
    let (kind, payload) = read_record(r).await?;
    match kind {
        RecordKind::Transport => Ok(ControlMsg::decode(&t.open(&payload)?)?),
        RecordKind::Refusal => Err(anyhow!(
            "refused by peer: {}",
            String::from_utf8_lossy(&payload)
        )),
        RecordKind::Handshake => Err(anyhow!(
            "protocol error: handshake record after the handshake"
        )),
    }
}
