//! Starting and running the daemon.
//!
//! `mesh launch` re-executes the binary as `mesh launch --foreground` in the
//! background (its own process group, output to `$MESH_RUN_DIR/mesh.log`,
//! the password passed through the environment rather than argv) and
//! returns once the control socket answers. The foreground daemon sets up
//! the bridge, the sleeve's TAP and sockets, then runs one task per job:
//! the router, the sleeve data path, the attachment manager, the control
//! connections, the API server and the HTTP listener for metrics and the
//! status page ([`http`]); it stops on `mesh stop`, SIGTERM or
//! SIGINT, leaving the bridge and attached containers in place.
//!
//! The log (`logging`) is plain text or JSON lines, size-capped and rotated
//! in the background; under systemd (`notify`) the daemon reports
//! `READY=1` once it answers on its control socket and `STOPPING=1` when
//! it stops.

pub mod logging;
pub mod notify;

use crate::api::{self, Request, Response};
use crate::datapath::{fastdp, sleeve};
use crate::integrations::{docker, plugin, proxy};
use crate::router::{self, connmaker, control, ipam};
use crate::{attach, host, identity, paths};

mod http;
mod report;
use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::host::{BRIDGE, TAP};
use crate::peer::Me;
/// How long `mesh launch` waits for the daemon to answer.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);

/// What the daemon runs with: built by the CLI from `launch`'s flags (the
/// daemon knows no CLI type), and handed whole to the background process.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    /// Targets, `HOST` or `HOST:PORT`.
    pub peers: Vec<String>,
    /// The mesh's password, if any.
    pub password: Option<String>,
    /// This peer's nickname (default: the host name).
    pub nickname: Option<String>,
    /// TCP and UDP port.
    pub port: u16,
    /// Overlay MTU (default: from the underlay).
    pub mtu: Option<u32>,
    /// The most direct connections.
    pub conn_limit: usize,
    /// The most peers held (`--max-peers`).
    #[serde(default = "default_max_peers")]
    pub max_peers: usize,
    /// The tracing filter.
    pub log_level: String,
    /// Plain or JSON lines (`--log-format`).
    #[serde(default)]
    pub log_format: logging::LogFormat,
    /// The allocator's range.
    pub ipalloc_range: ipnet::Ipv4Net,
    /// `net:default` (default: the range).
    pub ipalloc_default_subnet: Option<ipnet::Ipv4Net>,
    /// How the ring is created, as given (`consensus[=N]`, `seed=…`, `observer`).
    pub ipalloc_init: String,
    /// Reclaim the space of a peer unreachable this long.
    pub ipalloc_reclaim_after: Duration,
    /// How long an allocation may wait.
    pub ipalloc_timeout: Duration,
    /// Every connection on the sleeve.
    pub no_fastdp: bool,
    /// With a password, the fast path still with peers in these.
    pub trusted_subnets: Vec<ipnet::Ipv4Net>,
    /// Serve no DNS.
    pub no_dns: bool,
    /// The containers' domain.
    pub dns_domain: String,
    /// The answers' TTL.
    pub dns_ttl: u32,
    /// Also serve DNS on the host here.
    pub dns_listen_address: Option<SocketAddr>,
    /// Where the upstream servers are listed.
    pub resolv_conf: std::path::PathBuf,
    /// The Docker daemon's API behind the proxy.
    pub docker_host: String,
    /// The Docker network plugin's name (`/run/docker/plugins/NAME.sock`);
    /// `None` with `--no-docker-plugin`.
    #[serde(default)]
    pub docker_plugin: Option<String>,
    /// The group that owns the proxy's socket (mode 0660); root only
    /// (0600) when `None`.
    #[serde(default)]
    pub proxy_group: Option<String>,
    /// Where the metrics, `/status`, `/ready` and the status page are
    /// served (`--metrics-addr`, default `127.0.0.1:6782`).
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: SocketAddr,
    /// Test only: replace a sleeve key after this many messages sealed
    /// under it (default [`mesh_proto::rekey::REKEY_AFTER_MESSAGES`]).
    #[serde(default)]
    pub rekey_after_messages: Option<u64>,
    /// Test only: replace a sleeve key after this many seconds (default
    /// [`mesh_proto::rekey::REKEY_AFTER_TIME`]).
    #[serde(default)]
    pub rekey_after_secs: Option<u64>,
}

/// The environment variable that carries the [`Config`] to the background
/// daemon (JSON; not the command line, where the password would show).
const CONFIG_ENV: &str = "MESH_LAUNCH_CONFIG";

impl Config {
    /// The form [`Config::from_env_value`] reads back.
    pub fn to_env_value(&self) -> anyhow::Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// Parse what [`Config::to_env_value`] wrote.
    pub fn from_env_value(s: &str) -> anyhow::Result<Config> {
        serde_json::from_str(s).with_context(|| format!("malformed {CONFIG_ENV}"))
    }

    /// The configuration handed down by a background launch, if this
    /// process is one.
    pub fn inherited() -> anyhow::Result<Option<Config>> {
        match std::env::var(CONFIG_ENV) {
            Ok(s) => Config::from_env_value(&s).map(Some),
            Err(_) => Ok(None),
        }
    }
}

/// When sleeve keys are replaced: the defaults, unless the test-only flags
/// say otherwise (at least one message, at least one second).
fn rekey_policy(args: &Config) -> mesh_proto::rekey::Policy {
    let d = mesh_proto::rekey::Policy::default();
    mesh_proto::rekey::Policy {
        after_messages: args
            .rekey_after_messages
            .map_or(d.after_messages, |n| n.max(1)),
        after: args
            .rekey_after_secs
            .map_or(d.after, |s| Duration::from_secs(s.max(1))),
    }
}

/// Start the daemon in the background and return its peer name.
pub fn spawn_background(config: &Config) -> anyhow::Result<String> {
    let run_dir = paths::run_dir();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("creating run directory {}", run_dir.display()))?;
    let log_path = paths::log_file();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening log {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the mesh binary")?;
    let mut cmd = std::process::Command::new(exe);
    // The whole configuration travels in one variable: no flag list to
    // keep in step with the CLI's.
    cmd.arg("launch").arg("--foreground");
    cmd.env_remove("MESH_PASSWORD").env_remove("WEAVE_PASSWORD");
    cmd.env(CONFIG_ENV, config.to_env_value()?);
    // The daemon's stderr is this file: it rotates it (see `logging`).
    cmd.env(logging::LOG_FILE_ENV, &log_path);
    // Not started by systemd: a background daemon notifies no one.
    cmd.env_remove(notify::NOTIFY_SOCKET_ENV);
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let mut child = cmd.spawn().context("starting the daemon")?;
    let deadline = Instant::now() + LAUNCH_TIMEOUT;
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(status) = child.try_wait()? {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last = tail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .to_string();
            bail!(
                "the daemon exited during start-up ({status}): {} (log: {})",
                last.trim(),
                log_path.display()
            );
        }
        if let Ok(Response::Status(s)) =
            api::call(&paths::socket(), &Request::Status, Duration::from_secs(5))
        {
            return Ok(s.name.clone());
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon did not answer within {}s; see {}",
                LAUNCH_TIMEOUT.as_secs(),
                log_path.display()
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Run the daemon in this process until stopped.
pub fn run_foreground(args: Config) -> anyhow::Result<()> {
    logging::init(&args.log_level, args.log_format)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let r = rt.block_on(run(args));
    if let Err(e) = &r {
        tracing::error!("daemon failed: {e:#}");
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    r
}

async fn run(args: Config) -> anyhow::Result<()> {
    let run_dir = paths::run_dir();
    let data_dir = paths::data_dir();
    for d in [&run_dir, &data_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
    }
    let pid_path = paths::pid_file();
    std::fs::write(&pid_path, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", pid_path.display()))?;
    let args_plugin = args.docker_plugin.clone();
    let result = serve(args).await;
    let _ = std::fs::remove_file(paths::socket());
    let _ = std::fs::remove_file(paths::docker_socket());
    if let Some(name) = &args_plugin {
        plugin::remove(&plugin::plugin_dir().join(format!("{name}.sock")));
    }
    let _ = std::fs::remove_file(&pid_path);
    result
}

fn default_metrics_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6782))
}

fn default_max_peers() -> usize {
    mesh_proto::gossip::Config::default().max_peers
}

/// This peer's identity: its key, the password's key, the nickname.
async fn identity(args: &Config) -> anyhow::Result<Identity> {
    let id = identity::load_or_create(&paths::data_dir())?;
    let psk = match args.password.clone() {
        Some(p) => Some(
            tokio::task::spawn_blocking(move || {
                mesh_proto::handshake::psk_from_password(p.as_bytes())
            })
            .await
            .context("password key derivation")??,
        ),
        None => None,
    };
    let nickname = args.nickname.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "mesh".into())
    });
    Ok(Identity { id, psk, nickname })
}

/// Who this peer is, before any device exists.
struct Identity {
    id: mesh_proto::sign::Identity,
    psk: Option<[u8; 32]>,
    nickname: String,
}

/// The kernel objects of the data path.
struct Devices {
    underlay_mtu: u32,
    mtu: u32,
    tap: host::Tap,
    fastdp: Option<fastdp::Device>,
}

/// The bridge, the sleeve's TAP and (unless `--no-fastdp` or it fails) the
/// fast path's VXLAN device.
async fn devices(nl: &host::Netlink, args: &Config) -> anyhow::Result<Devices> {
    let underlay = nl
        .underlay_mtu()
        .await
        .context("reading the underlay MTU")?;
    let overhead = (mesh_proto::sleeve::OVERHEAD_V4 + 14) as u32;
    let mtu = match args.mtu {
        Some(m) => m,
        None => underlay.saturating_sub(overhead).max(576),
    };
    nl.ensure_bridge(BRIDGE, mtu)
        .await
        .with_context(|| format!("creating bridge {BRIDGE}"))?;
    // One TAP queue (and sleeve sender thread) per core, up to four.
    let queues = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let tap = host::open_tap(nl, TAP, BRIDGE, mtu, queues)
        .await
        .with_context(|| format!("creating TAP {TAP}"))?;
    let fastdp = if args.no_fastdp {
        if let Err(e) = nl.delete_link(fastdp::DEVICE).await {
            warn!("removing {}: {e:#}", fastdp::DEVICE);
        }
        None
    } else {
        match fastdp::setup(nl, BRIDGE, TAP, underlay, args.port.wrapping_add(1)).await {
            Ok(d) => Some(d),
            Err(e) => {
                warn!("fast path unavailable, using the sleeve only: {e:#}");
                let _ = nl.delete_link(fastdp::DEVICE).await;
                None
            }
        }
    };
    Ok(Devices {
        underlay_mtu: underlay,
        mtu,
        tap,
        fastdp,
    })
}

/// The sockets the daemon serves on.
struct Listeners {
    tcp: tokio::net::TcpListener,
    udp: std::net::UdpSocket,
    api: tokio::net::UnixListener,
    /// The Docker API proxy's socket, unless it could not be bound.
    proxy: Option<tokio::net::UnixListener>,
    /// The Docker network plugin's socket, unless disabled or unbindable.
    plugin: Option<tokio::net::UnixListener>,
    /// Metrics, `/status`, `/ready` and the status page (`--metrics-addr`).
    metrics: tokio::net::TcpListener,
    docker_host: std::path::PathBuf,
}

/// The control port (TCP), the sleeve (UDP), the metrics listener, the
/// control socket and the Docker API proxy's socket.
async fn listeners(args: &Config) -> anyhow::Result<Listeners> {
    // Checked by `mesh launch` already; before anything is bound.
    let group = args
        .proxy_group
        .as_deref()
        .map(proxy::group_id)
        .transpose()?;
    let tcp = tokio::net::TcpListener::bind(("0.0.0.0", args.port))
        .await
        .with_context(|| format!("listening on TCP port {}", args.port))?;
    let udp = bind_udp(args.port).with_context(|| format!("binding UDP port {}", args.port))?;
    let metrics = http::bind(args.metrics_addr).await?;
    let sock_path = paths::socket();
    let _ = std::fs::remove_file(&sock_path);
    let api = tokio::net::UnixListener::bind(&sock_path)
        .with_context(|| format!("binding control socket {}", sock_path.display()))?;
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))?;
    let docker_host = paths::parse_docker_host(&args.docker_host).map_err(anyhow::Error::msg)?;
    if !docker_host.exists() {
        // Not a warning: hosts with no Docker (CNI, `mesh run`) are normal.
        info!(docker_host = %args.docker_host, "no Docker socket (yet): the Docker API proxy answers 502 until there is one");
    }
    let proxy_path = paths::docker_socket();
    let proxy = match proxy::bind(&proxy_path, group) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(
                "Docker API proxy disabled: binding {}: {e}",
                proxy_path.display()
            );
            None
        }
    };
    let plugin = match &args.docker_plugin {
        None => None,
        Some(name) => match plugin::bind(name) {
            Ok((l, path)) => {
                info!(socket = %path.display(), "Docker network plugin: docker network create --driver {name} --ipam-driver {name}");
                Some(l)
            }
            Err(e) => {
                warn!(
                    "Docker network plugin disabled: binding {}: {e}",
                    plugin::plugin_dir().join(format!("{name}.sock")).display()
                );
                None
            }
        },
    };
    Ok(Listeners {
        tcp,
        udp,
        api,
        proxy,
        plugin,
        metrics,
        docker_host,
    })
}

/// The DNS zone (unless `--no-dns`), served on the host too with
/// `--dns-listen-address`.
fn dns_zone(args: &Config) -> anyhow::Result<Option<Arc<mesh_dns::Zone>>> {
    if args.no_dns {
        return Ok(None);
    }
    let zone = Arc::new(
        mesh_dns::Zone::new(mesh_dns::Config {
            domain: args.dns_domain.clone(),
            ttl: args.dns_ttl,
            resolv_conf: args.resolv_conf.clone(),
            ..Default::default()
        })
        .map_err(|e| anyhow::anyhow!("DNS: {e}"))?,
    );
    if let Some(addr) = args.dns_listen_address {
        let udp =
            std::net::UdpSocket::bind(addr).with_context(|| format!("DNS on {addr} (UDP)"))?;
        let tcp =
            std::net::TcpListener::bind(addr).with_context(|| format!("DNS on {addr} (TCP)"))?;
        let zone = zone.clone();
        tokio::spawn(async move {
            if let Err(e) = mesh_dns::serve(udp, tcp, zone).await {
                warn!("DNS on {addr}: {e}");
            }
        });
        info!(%addr, "serving DNS on the host");
    }
    Ok(Some(zone))
}

/// Until `mesh stop`/`reset`, SIGTERM or SIGINT; whether it was a reset.
async fn wait_for_stop(mut stop_rx: mpsc::Receiver<bool>) -> anyhow::Result<bool> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            r = stop_rx.recv() => {
                let reset = r.unwrap_or(false);
                info!("stopping: mesh {}", if reset { "reset" } else { "stop" });
                return Ok(reset);
            }
            _ = term.recv() => { info!("stopping: SIGTERM"); return Ok(false); }
            _ = tokio::signal::ctrl_c() => { info!("stopping: SIGINT"); return Ok(false); }
            _ = hup.recv() => { info!("SIGHUP ignored"); }
        }
    }
}

/// The data path and the router: the sleeve's threads (and the task that
/// passes its events on), the fast path, the router with the allocator and
/// the name table. Returns the allocator's range.
#[allow(clippy::too_many_arguments)] // the parts serve set up, handed over once
fn start_core(
    args: &Config,
    me: &Arc<Me>,
    underlay_mtu: u32,
    tap: host::Tap,
    fastdp_dev: Option<fastdp::Device>,
    udp: std::net::UdpSocket,
    (router_tx, router_rx): (mpsc::Sender<router::Cmd>, mpsc::Receiver<router::Cmd>),
    conn_tx: mpsc::Sender<connmaker::Cmd>,
    zone: Option<Arc<mesh_dns::Zone>>,
) -> anyhow::Result<ipnet::Ipv4Net> {
    let name = me.name;
    let (sleeve_tx, sleeve_rx) = mpsc::channel(256);
    let sleeve_cfg = sleeve::Config {
        me: name,
        encrypted: me.psk.is_some(),
        underlay_mtu: underlay_mtu as usize,
    };
    let (sleeve_ev_tx, mut sleeve_ev_rx) = mpsc::channel(64);
    tokio::spawn(sleeve::run(sleeve_cfg, tap, udp, sleeve_rx, sleeve_ev_tx));
    tokio::spawn(async move {
        while let Some(ev) = sleeve_ev_rx.recv().await {
            if router_tx.send(router::Cmd::Sleeve(ev)).await.is_err() {
                return;
            }
        }
    });
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);
    let gossip_config = mesh_proto::gossip::Config {
        conn_limit: args.conn_limit,
        max_peers: args.max_peers,
        ..Default::default()
    };
    let names = crate::router::names::Driver::load(me.id.clone(), paths::data_dir(), zone)?;
    let ipam_config = ipam_config(args)?;
    let range = ipam_config.range;
    let allocator = ipam::Driver::load(
        me.id.clone(),
        ipam_config,
        paths::data_dir(),
        args.ipalloc_timeout,
    )?;
    let fastdp_tx = fastdp_dev.map(|d| {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(fastdp::run(name, d, rx));
        tx
    });
    tokio::spawn(router::run(
        me.clone(),
        router_rx,
        sleeve_tx,
        conn_tx,
        gossip_config,
        incarnation,
        router::Channels {
            ipam: allocator,
            names,
        },
        fastdp_tx,
    ));
    Ok(range)
}

/// Set everything up, start the tasks, and serve until stopped. The order
/// matters: devices and sockets first (a failure there ends the launch with
/// its reason), then the tasks, each owning its part, wired by channels.
async fn serve(args: Config) -> anyhow::Result<()> {
    let id = identity(&args).await?;
    let name = id.id.name();
    let nl = host::Netlink::current().await.context("opening netlink")?;
    let dev = devices(&nl, &args).await?;
    let l = listeners(&args).await?;
    let me = Arc::new(Me {
        key: mesh_proto::handshake::StaticKey::from_identity(&id.id),
        id: id.id,
        name,
        nickname: id.nickname,
        psk: id.psk,
        port: args.port,
        mtu: dev.mtu,
        fastdp: dev.fastdp.as_ref().map(|d| d.local()),
        trusted: args.trusted_subnets.clone(),
        rekey: rekey_policy(&args),
    });
    info!(peer = %name, nickname = %me.nickname, mtu = dev.mtu, underlay_mtu = dev.underlay_mtu, encryption = me.psk.is_some(), "mesh started");

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (router_tx, router_rx) = mpsc::channel(1024);
    let (conn_tx, conn_rx) = mpsc::channel(256);
    let zone = dns_zone(&args)?;
    let metrics_zone = zone.clone();
    let range = start_core(
        &args,
        &me,
        dev.underlay_mtu,
        dev.tap,
        dev.fastdp,
        l.udp,
        (router_tx.clone(), router_rx),
        conn_tx.clone(),
        zone.clone(),
    )?;
    let (attach_tx, attach_rx) = mpsc::channel(64);
    let manager = attach::Manager::load(
        nl.clone(),
        paths::data_dir(),
        dev.mtu,
        router_tx.clone(),
        range,
        zone,
    )
    .await?;
    tokio::spawn(manager.run(attach_rx));
    tokio::spawn(control::accept_loop(
        me.clone(),
        l.tcp,
        router_tx.clone(),
        shutdown_rx.clone(),
    ));
    let maker = connmaker::ConnMaker::load(
        me.clone(),
        paths::data_dir(),
        &args.peers,
        router_tx.clone(),
        args.conn_limit,
    )?;
    tokio::spawn(maker.run(conn_rx, shutdown_rx.clone()));
    if let Some(p) = l.plugin {
        let settings = plugin::Settings {
            range,
            default_subnet: args.ipalloc_default_subnet.unwrap_or(range),
            dns: !args.no_dns,
            docker_host: l.docker_host.clone(),
        };
        tokio::spawn(plugin::serve(
            p,
            args.docker_plugin.clone().unwrap_or_default(),
            settings,
            router_tx.clone(),
            attach_tx.clone(),
        ));
    }
    if let Some(p) = l.proxy {
        tokio::spawn(proxy::serve(p, l.docker_host.clone(), paths::socket()));
    }
    let (stop_tx, stop_rx) = mpsc::channel::<bool>(1);
    let services = Services {
        router: router_tx,
        attach: attach_tx,
        connmaker: conn_tx,
        stop: stop_tx,
        docker_host: Arc::from(l.docker_host.as_path()),
    };
    tokio::spawn(http::serve(
        l.metrics,
        http::Sources {
            router: services.router.clone(),
            connmaker: services.connmaker.clone(),
            netlink: nl.clone(),
            zone: metrics_zone,
        },
    ));
    tokio::spawn(api_loop(l.api, services));
    // The control socket answers from here on: what `mesh launch` waits
    // for, and what systemd is told.
    notify::notify_or_warn(&format!(
        "READY=1\nSTATUS=peer {name}\nMAINPID={}",
        std::process::id()
    ));

    let reset = wait_for_stop(stop_rx).await?;
    notify::notify_or_warn("STOPPING=1");
    let _ = shutdown_tx.send(true);
    if reset {
        if let Err(e) = remove_host_objects(&nl, &[]).await {
            warn!("reset: {e:#}");
        }
        remove_state()?;
    }
    Ok(())
}

/// The allocator's configuration from `launch` options.
pub fn ipam_config(args: &Config) -> anyhow::Result<mesh_proto::ipam::Config> {
    let range = args.ipalloc_range;
    let default_subnet = args.ipalloc_default_subnet.unwrap_or(range);
    if !range.contains(&default_subnet) {
        bail!("--ipalloc-default-subnet {default_subnet} is not inside --ipalloc-range {range}");
    }
    Ok(mesh_proto::ipam::Config {
        range,
        default_subnet,
        init: args
            .ipalloc_init
            .parse::<mesh_proto::ipam::InitMode>()
            .map_err(anyhow::Error::msg)?,
        reclaim_after: args.ipalloc_reclaim_after,
    })
}

/// `mesh reset`'s kernel part: these container interfaces, the fast-path
/// device, the TAP, the bridge and the nftables tables. Tries everything;
/// the first failure is returned.
async fn remove_host_objects(nl: &host::Netlink, containers: &[String]) -> anyhow::Result<()> {
    let mut first: Option<anyhow::Error> = None;
    let devices = containers
        .iter()
        .map(String::as_str)
        .chain([fastdp::DEVICE, TAP, BRIDGE]);
    for dev in devices {
        if let Err(e) = nl.delete_link(dev).await {
            first.get_or_insert(anyhow::anyhow!("removing {dev}: {e}"));
        }
    }
    if let Err(e) = host::nft::remove().await {
        first.get_or_insert(anyhow::anyhow!("removing the nftables tables: {e}"));
    }
    first.map_or(Ok(()), Err)
}

/// `mesh reset` with no daemon running: remove the interfaces of the
/// containers it had attached, the bridge, and the state.
pub fn offline_reset() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let nl = host::Netlink::current().await.context("opening netlink")?;
        remove_host_objects(&nl, &attach::host_interfaces(&paths::data_dir())).await
    })?;
    remove_state()
}

/// `mesh reset`: remove everything this peer keeps in `$MESH_DATA_DIR`
/// (identity, ring and claims, containers, targets): the next launch is a
/// new peer.
pub fn remove_state() -> anyhow::Result<()> {
    let dir = paths::data_dir();
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_file() {
                    std::fs::remove_file(&p)
                        .with_context(|| format!("removing {}", p.display()))?;
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

fn bind_udp(port: u16) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Generous buffers: bursts of fragments of 64 KB super-frames.
    // The sleeve's threads use it with blocking calls.
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    Ok(s.into())
}

/// The tasks the API server talks to.
#[derive(Clone)]
struct Services {
    router: mpsc::Sender<router::Cmd>,
    attach: mpsc::Sender<attach::Cmd>,
    connmaker: mpsc::Sender<connmaker::Cmd>,
    stop: mpsc::Sender<bool>,
    /// `--docker-host`, where Docker container names given as TARGET are
    /// resolved.
    docker_host: Arc<std::path::Path>,
}

async fn api_loop(listener: tokio::net::UnixListener, services: Services) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let services = services.clone();
        tokio::spawn(async move {
            if let Err(e) = api_conn(stream, services).await {
                tracing::debug!("control socket client: {e:#}");
            }
        });
    }
}

async fn api_conn(stream: tokio::net::UnixStream, services: Services) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::BufReader::new(r)
            .take(api::MAX_LINE as u64)
            .read_line(&mut line),
    )
    .await
    .context("request timed out")??;
    let resp = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::Error {
            message: format!("malformed request: {e}"),
        },
        Ok(req) => handle(req, &services).await,
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    Ok(())
}

async fn ask<C, T>(tx: &mpsc::Sender<C>, make: impl FnOnce(oneshot::Sender<T>) -> C) -> Option<T> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply)).await.ok()?;
    rx.await.ok()
}

/// How long `mesh reset` gives the gossip of our departing space to reach
/// the neighbours before the daemon stops.
const RESET_FLUSH: Duration = Duration::from_secs(2);

/// `mesh reset`: detach everything (releasing its addresses), hand our
/// space to a live peer, give the gossip time to leave, then stop; the
/// daemon removes the bridge and state on its way out.
async fn reset(s: &Services) -> Response {
    let detached = ask(&s.attach, |reply| attach::Cmd {
        req: Request::Reset,
        reply,
    })
    .await;
    if let Some(Response::Error { message }) = detached {
        return Response::Error {
            message: format!("reset stopped, nothing removed: {message}"),
        };
    }
    let heir = ask(&s.router, |reply| {
        router::Cmd::Ipam(ipam::Cmd::Leave { reply })
    })
    .await;
    let message = match heir {
        Some(Ok(Some(p))) => {
            tokio::time::sleep(RESET_FLUSH).await;
            format!("address space handed to {p}")
        }
        Some(Ok(None)) => "no address space to hand over".to_string(),
        Some(Err(e)) => {
            warn!("reset: could not hand over our address space: {e}");
            format!("could not hand over our address space ({e}); the other peers reclaim it by majority after --ipalloc-reclaim-after")
        }
        None => {
            return Response::Error {
                message: "the daemon is shutting down".into(),
            }
        }
    };
    let _ = s.stop.try_send(true);
    Response::Message { message }
}

/// One request on the control socket, to the task that answers it.
///
/// Longer than most functions, for a reason: it is the daemon's dispatch
/// table, one short arm per request, kept whole so that every request is
/// found in one place.
async fn handle(req: Request, s: &Services) -> Response {
    let gone = || Response::Error {
        message: "the daemon is shutting down".into(),
    };
    let done = |r: Option<Result<(), String>>| match r {
        Some(Ok(())) => Response::Ok,
        Some(Err(message)) => Response::Error { message },
        None => gone(),
    };
    match req {
        Request::Status => match report::full(&s.router, &s.connmaker).await {
            Some(status) => Response::Status(Box::new(status)),
            None => gone(),
        },
        Request::Stop => {
            let _ = s.stop.try_send(false);
            Response::Ok
        }
        Request::Reset => reset(s).await,
        Request::RmPeer { peer } => {
            match ask(&s.router, |reply| {
                router::Cmd::Ipam(ipam::Cmd::RmPeer { peer, reply })
            })
            .await
            {
                Some(Ok(message)) => Response::Message { message },
                Some(Err(message)) => Response::Error { message },
                None => gone(),
            }
        }
        Request::Prime => {
            if s.router
                .send(router::Cmd::Ipam(ipam::Cmd::Prime))
                .await
                .is_err()
            {
                return gone();
            }
            Response::Ok
        }
        Request::Connect { peers } => done(
            ask(&s.connmaker, |reply| connmaker::Cmd::Connect {
                peers,
                reply,
            })
            .await,
        ),
        Request::Forget { peers } => done(
            ask(&s.connmaker, |reply| connmaker::Cmd::Forget {
                peers,
                reply,
            })
            .await,
        ),
        Request::DnsLookup { name } => {
            match ask(&s.router, |reply| {
                router::Cmd::Names(crate::router::names::Cmd::Lookup { name, reply })
            })
            .await
            {
                Some(a) => Response::Addresses {
                    addrs: a.iter().map(|a| a.to_string()).collect(),
                },
                None => gone(),
            }
        }
        Request::Attach { .. }
        | Request::DockerPort { .. }
        | Request::DockerPortGone { .. }
        | Request::Detach { .. }
        | Request::DnsAdd { .. }
        | Request::DnsRemove { .. } => attach_request(req, s).await,
        Request::Expose { .. } | Request::Hide { .. } | Request::Ps => {
            ask(&s.attach, |reply| attach::Cmd { req, reply })
                .await
                .unwrap_or_else(gone)
        }
    }
}

/// An attach, detach or DNS request, to the attach manager; a TARGET that
/// names a Docker container (and, for detach and DNS, no attached
/// container) is resolved through `--docker-host` first, here rather than
/// in the manager, which a slow Docker daemon must not hold up.
async fn attach_request(req: Request, s: &Services) -> Response {
    let gone = || Response::Error {
        message: "the daemon is shutting down".into(),
    };
    let mut attached = Vec::new();
    if docker::reference_in(&req).is_some() && !matches!(req, Request::Attach { .. }) {
        match ask(&s.attach, |reply| attach::Cmd {
            req: Request::Ps,
            reply,
        })
        .await
        {
            Some(Response::Ps { containers }) => {
                attached = containers.into_iter().map(|c| c.id).collect()
            }
            _ => return gone(),
        }
    }
    let (req, container) = match docker::resolve_request(req, &s.docker_host, &attached).await {
        Ok(r) => r,
        Err(message) => return Response::Error { message },
    };
    match ask(&s.attach, |reply| attach::Cmd { req, reply }).await {
        Some(Response::Error { message }) => Response::Error {
            message: match &container {
                Some(c) => docker::reword(&message, c),
                None => message,
            },
        },
        Some(r) => r,
        None => gone(),
    }
}
