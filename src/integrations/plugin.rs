//! The Docker network plugin (DESIGN §7): `docker network create --driver
//! mesh --ipam-driver mesh [--subnet CIDR] NAME`, then `docker run
//! --network NAME`. One unix socket, `/run/docker/plugins/<name>.sock`
//! (`--docker-plugin NAME`, default `mesh`; the directory from
//! `$MESH_DOCKER_PLUGIN_DIR`), serves Docker's remote network driver and
//! IPAM driver protocols: JSON over HTTP POSTs named
//! `/NetworkDriver.<Method>` and `/IpamDriver.<Method>`.
//!
//! - **IPAM.** A pool is a subnet of `--ipalloc-range` (the default subnet
//!   without `--subnet`), the same on every host, so one Docker network
//!   created with the same subnet on several hosts is one mesh subnet.
//!   Addresses come from the mesh's allocator (no coordinator, never a
//!   duplicate across hosts), held under an id of the plugin's until the
//!   container joins; a network's "gateway" is its subnet's own address,
//!   which the allocator never hands out (containers reach the host only
//!   through `mesh expose`).
//! - **Join.** Docker makes the container's namespace only as its process
//!   starts, after the join. So the join makes a veth pair in the host's
//!   namespace ([`Request::DockerPort`]): the host end on the bridge, in the
//!   isolation rules with its peer's MAC and the address from its first
//!   frame; the peer is given to Docker (`InterfaceName`, prefix
//!   `ethmesh`), which moves it in, sets the address and brings it up
//!   before the process runs. No gateway (and no `docker_gwbridge`). A
//!   task then waits for that (bounded), and an attach adopts the port
//!   ([`Request::Attach`] with `port`): the container is listed, saved,
//!   served DNS inside, named by its Docker name (read from `GET
//!   /networks/{id}` on `--docker-host` during the join) and announced by
//!   a gratuitous ARP; the allocator's claim passes to it in one step.
//!   Queries to `127.0.0.11:53` in the sandbox then reach the mesh's
//!   server, not Docker's embedded one (a raw-priority `notrack` in table
//!   `ip mesh_dns` of the sandbox: Docker's DNAT never sees them).
//! - **Leave** detaches that address; **ReleaseAddress** gives back one
//!   that never joined.
//!
//! Networks must use the mesh's IPAM (`--ipam-driver`): with Docker's own,
//! each host would hand out the same addresses. `CreateNetwork` refuses
//! them, saying so. The decisions on requests are pure ([`pool_for`],
//! [`check_network`], [`address_reply`]) and unit-tested; the driver below
//! owns the socket and talks to the allocator and the attach manager.

use crate::api::{Request, Response};
use crate::attach;
use crate::integrations::proxy::{self, Head};
use crate::router::{self, ipam};
use ipnet::Ipv4Net;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// The address space of the mesh's IPAM driver, as Docker records it.
pub const ADDRESS_SPACE: &str = "mesh";
/// The plugin protocol's content type.
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";
/// How long an idle connection from Docker is kept.
const IDLE: Duration = Duration::from_secs(300);
/// How long Docker is asked for a joining container's name.
const NAME_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a joined endpoint's sandbox may take to appear.
const ADOPT_WAIT: Duration = Duration::from_secs(60);
/// Docker names the interface in the container this, with an index.
const IFNAME_PREFIX: &str = "ethmesh";
/// Docker's option that marks a request for a network's gateway.
const GATEWAY_OPTION: &str = "com.docker.network.gateway";

/// Where the plugin's socket lives: `$MESH_DOCKER_PLUGIN_DIR`, default
/// `/run/docker/plugins` (where dockerd looks).
pub fn plugin_dir() -> PathBuf {
    std::env::var_os("MESH_DOCKER_PLUGIN_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/docker/plugins"))
}

/// A plugin name: the driver name users give Docker, and the socket's.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a plugin name: letters, digits, '-', '_' and '.' (at most 64)"
        ))
    }
}

/// Bind the plugin's socket (mode 0600: Docker runs as root), replacing a
/// stale one.
pub fn bind(name: &str) -> std::io::Result<(UnixListener, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = plugin_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok((l, path))
}

// ---------------------------------------------------------------------------
// The pure decisions

/// What the plugin needs of the daemon's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--ipalloc-range`.
    pub range: Ipv4Net,
    /// `--ipalloc-default-subnet` (the range by default).
    pub default_subnet: Ipv4Net,
    /// Whether the mesh serves DNS in containers.
    pub dns: bool,
    /// The Docker API (`--docker-host`), for containers' names.
    pub docker_host: PathBuf,
}

/// `RequestPool`: the subnet a network's addresses come from.
pub fn pool_for(req: &Value, s: &Settings) -> Result<Ipv4Net, String> {
    if req.get("V6").and_then(Value::as_bool).unwrap_or(false) {
        return Err("mesh networks are IPv4 only: drop --ipv6".into());
    }
    if str_field(req, "SubPool").is_some_and(|p| !p.is_empty()) {
        return Err("--ip-range is not supported: the mesh allocates in the whole subnet".into());
    }
    let pool = match str_field(req, "Pool").filter(|p| !p.is_empty()) {
        None => return Ok(s.default_subnet),
        Some(p) => p,
    };
    let net: Ipv4Net = pool
        .parse()
        .map_err(|_| format!("{pool:?} is not an IPv4 subnet like 198.19.5.0/24"))?;
    if net.trunc() != net {
        return Err(format!(
            "{pool} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    if !s.range.contains(&net) {
        return Err(format!(
            "{net} is outside the mesh's range {}: give a --subnet inside it",
            s.range
        ));
    }
    if net.prefix_len() > 30 {
        return Err(format!("{net} is too small: at least a /30 is needed"));
    }
    Ok(net)
}

/// `CreateNetwork`: the network must take its addresses from the mesh.
pub fn check_network(req: &Value, driver: &str) -> Result<(), String> {
    let v6 = req.get("IPv6Data").and_then(Value::as_array);
    if v6.is_some_and(|d| !d.is_empty()) {
        return Err("mesh networks are IPv4 only: drop --ipv6".into());
    }
    let v4 = req
        .get("IPv4Data")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ours = !v4.is_empty()
        && v4
            .iter()
            .all(|d| str_field(d, "AddressSpace") == Some(ADDRESS_SPACE));
    if !ours {
        return Err(format!(
            "a {driver} network takes its addresses from the mesh, or hosts would hand out the same ones: \
             docker network create --driver {driver} --ipam-driver {driver} [--subnet CIDR] NAME"
        ));
    }
    Ok(())
}

/// What `RequestAddress` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressRequest {
    /// The network's gateway: its subnet's own address, never allocated.
    Gateway(Ipv4Net),
    /// A given address (`docker run --ip`), to claim.
    Claim(Ipv4Net),
    /// Any address of the subnet.
    Any(Ipv4Net),
}

/// `RequestAddress`: what is asked, checked against the pool.
pub fn address_request(req: &Value) -> Result<AddressRequest, String> {
    let pool_id = str_field(req, "PoolID").unwrap_or("");
    let pool: Ipv4Net = pool_id
        .parse()
        .map_err(|_| format!("unknown pool {pool_id:?}"))?;
    let gateway = req
        .get("Options")
        .and_then(|o| o.get("RequestAddressType"))
        .and_then(Value::as_str)
        == Some(GATEWAY_OPTION);
    let given = str_field(req, "Address").filter(|a| !a.is_empty());
    match (gateway, given) {
        (true, None) => Ok(AddressRequest::Gateway(pool)),
        (true, Some(_)) => Err(
            "mesh networks have no gateway: drop --gateway (containers reach the host through `mesh expose`)"
                .into(),
        ),
        (false, None) => Ok(AddressRequest::Any(pool)),
        (false, Some(a)) => {
            let ip: Ipv4Addr = a
                .parse()
                .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
            if !pool.contains(&ip) {
                return Err(format!("{ip} is not inside the network's subnet {pool}"));
            }
            Ipv4Net::new(ip, pool.prefix_len())
                .map(AddressRequest::Claim)
                .map_err(|e| e.to_string())
        }
    }
}

/// The answer to a `RequestAddress`.
pub fn address_reply(addr: Ipv4Net) -> Value {
    json!({"Address": addr.to_string(), "Data": {}})
}

/// The gateway Docker is told about: the subnet's own address.
pub fn gateway_of(pool: Ipv4Net) -> Ipv4Net {
    Ipv4Net::new(pool.network(), pool.prefix_len()).unwrap_or(pool)
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// A new allocation id for an address handed to Docker before its
/// container joins (not a container's: those are 12 hex digits).
fn pending_id() -> String {
    let mut b = [0u8; 6];
    if getrandom::fill(&mut b).is_err() {
        // Unique enough within this process, which is what matters:
        // ids of a previous run are released when the daemon starts.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        b.copy_from_slice(&n.to_le_bytes()[..6]);
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("docker-{hex}")
}

/// The table that sends a sandbox's queries to `127.0.0.11:53` to the
/// mesh's server rather than through Docker's DNAT to its own.
pub const DNS_BYPASS: &str = "table ip mesh_dns\ndelete table ip mesh_dns\n\
table ip mesh_dns {\n\
  chain output {\n\
    type filter hook output priority raw; policy accept;\n\
    ip daddr 127.0.0.11 udp dport 53 notrack\n\
    ip daddr 127.0.0.11 tcp dport 53 notrack\n\
    ip saddr 127.0.0.11 udp sport 53 notrack\n\
    ip saddr 127.0.0.11 tcp sport 53 notrack\n\
  }\n\
}\n";

// ---------------------------------------------------------------------------
// The driver

/// An endpoint Docker created, until it deletes it.
#[derive(Debug, Clone)]
struct Endpoint {
    addr: Ipv4Net,
    /// The sandbox it joined.
    sandbox: Option<String>,
    /// The task waiting to adopt its port once the sandbox exists.
    adopting: Option<tokio::task::AbortHandle>,
}

#[derive(Default)]
struct State {
    /// Addresses handed to Docker and not yet joined, with the allocation
    /// id holding them.
    pending: HashMap<Ipv4Addr, String>,
    /// Endpoints by id.
    endpoints: HashMap<String, Endpoint>,
}

struct Shared {
    name: String,
    settings: Settings,
    router: mpsc::Sender<router::Cmd>,
    attach: mpsc::Sender<attach::Cmd>,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serve Docker on `listener` until the daemon stops.
pub async fn serve(
    listener: UnixListener,
    name: String,
    settings: Settings,
    router: mpsc::Sender<router::Cmd>,
    attach: mpsc::Sender<attach::Cmd>,
) {
    info!(driver = %name, "Docker network plugin listening");
    let shared = Arc::new(Shared {
        name,
        settings,
        router,
        attach,
        state: Mutex::new(State::default()),
    });
    loop {
        let client = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("docker plugin accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(client, &shared).await {
                debug!("docker plugin client: {e:#}");
            }
        });
    }
}

/// One connection from Docker: requests one after another (keep-alive).
async fn connection(mut s: UnixStream, shared: &Arc<Shared>) -> anyhow::Result<()> {
    loop {
        let mut buf = Vec::new();
        let end = match tokio::time::timeout(IDLE, proxy::read_head(&mut s, &mut buf)).await {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(end))) => end,
            Ok(Err(e)) => {
                let _ = s.write_all(&reply(400, &err_body(&format!("{e:#}")))).await;
                return Ok(());
            }
        };
        let head = match Head::parse(&buf[..end]) {
            Ok(h) => h,
            Err(e) => {
                let _ = s.write_all(&reply(400, &err_body(&e.to_string()))).await;
                return Ok(());
            }
        };
        let mut rest = buf.split_off(end);
        let body = proxy::read_body(&mut s, &head, &mut rest).await?;
        let req: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    let msg = format!("malformed JSON: {e}");
                    s.write_all(&reply(400, &err_body(&msg))).await?;
                    continue;
                }
            }
        };
        let method = head.second.trim_start_matches('/').to_string();
        debug!(%method, "docker plugin request");
        let answer = match handle(&method, &req, shared).await {
            Ok(v) => reply(200, &v),
            Err(e) => {
                warn!(%method, "docker plugin: {e}");
                reply(500, &err_body(&e))
            }
        };
        s.write_all(&answer).await?;
        if head.has_token("Connection", "close") {
            return Ok(());
        }
    }
}

fn err_body(msg: &str) -> Value {
    json!({ "Err": msg })
}

fn reply(status: u16, body: &Value) -> Vec<u8> {
    let text = body.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Internal Server Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )
    .into_bytes()
}

async fn handle(method: &str, req: &Value, shared: &Arc<Shared>) -> Result<Value, String> {
    let s = &shared.settings;
    match method {
        "Plugin.Activate" => Ok(json!({"Implements": ["NetworkDriver", "IpamDriver"]})),
        // One Docker network per host, made with the same subnet on each;
        // its containers reach each other across hosts.
        "NetworkDriver.GetCapabilities" => {
            Ok(json!({"Scope": "local", "ConnectivityScope": "global"}))
        }
        "NetworkDriver.CreateNetwork" => {
            check_network(req, &shared.name)?;
            info!(network = %str_field(req, "NetworkID").unwrap_or(""), "docker plugin: network created");
            Ok(json!({}))
        }
        "NetworkDriver.CreateEndpoint" => create_endpoint(req, shared),
        "NetworkDriver.EndpointOperInfo" => Ok(json!({"Value": {}})),
        "NetworkDriver.DeleteEndpoint" => {
            if let Some(id) = str_field(req, "EndpointID") {
                if let Some(t) = shared.state().endpoints.remove(id).and_then(|e| e.adopting) {
                    t.abort();
                }
                let gone = Request::DockerPortGone {
                    endpoint: id.to_string(),
                };
                let _ = ask(shared, gone).await;
            }
            Ok(json!({}))
        }
        "NetworkDriver.Join" => join(req, shared).await,
        "NetworkDriver.Leave" => leave(req, shared).await,
        "NetworkDriver.AllocateNetwork" => Err(
            "swarm-scoped mesh networks are not supported: create the network on each host".into(),
        ),
        "NetworkDriver.DeleteNetwork"
        | "NetworkDriver.FreeNetwork"
        | "NetworkDriver.DiscoverNew"
        | "NetworkDriver.DiscoverDelete"
        | "NetworkDriver.ProgramExternalConnectivity"
        | "NetworkDriver.RevokeExternalConnectivity"
        | "IpamDriver.ReleasePool" => Ok(json!({})),
        "IpamDriver.GetCapabilities" => Ok(json!({"RequiresMACAddress": false})),
        "IpamDriver.GetDefaultAddressSpaces" => Ok(json!({
            "LocalDefaultAddressSpace": ADDRESS_SPACE,
            "GlobalDefaultAddressSpace": ADDRESS_SPACE,
        })),
        "IpamDriver.RequestPool" => {
            let pool = pool_for(req, s)?;
            Ok(json!({"PoolID": pool.to_string(), "Pool": pool.to_string(), "Data": {}}))
        }
        "IpamDriver.RequestAddress" => request_address(req, shared).await,
        "IpamDriver.ReleaseAddress" => {
            release_address(req, shared).await;
            Ok(json!({}))
        }
        other => Err(format!("unknown method {other}")),
    }
}

async fn ipam_ask(
    shared: &Shared,
    make: impl FnOnce(ipam::AllocReply) -> ipam::Cmd,
) -> Result<Ipv4Net, String> {
    let (tx, rx) = oneshot::channel();
    shared
        .router
        .send(router::Cmd::Ipam(make(tx)))
        .await
        .map_err(|_| "the mesh daemon is shutting down".to_string())?;
    rx.await
        .map_err(|_| "the mesh daemon is shutting down".to_string())?
}

async fn request_address(req: &Value, shared: &Shared) -> Result<Value, String> {
    let id = pending_id();
    let addr = match address_request(req)? {
        AddressRequest::Gateway(pool) => return Ok(address_reply(gateway_of(pool))),
        AddressRequest::Any(pool) => {
            ipam_ask(shared, |reply| ipam::Cmd::Allocate {
                id: id.clone(),
                subnet: Some(pool),
                reply,
            })
            .await?
        }
        AddressRequest::Claim(addr) => {
            ipam_ask(shared, |reply| ipam::Cmd::Claim {
                id: id.clone(),
                addr,
                reply,
            })
            .await?
        }
    };
    shared.state().pending.insert(addr.addr(), id);
    debug!(%addr, "docker plugin: address handed out");
    Ok(address_reply(addr))
}

async fn release_address(req: &Value, shared: &Shared) {
    let Some(addr) = str_field(req, "Address").and_then(|a| a.parse::<Ipv4Addr>().ok()) else {
        return;
    };
    let id = shared.state().pending.remove(&addr);
    if let Some(id) = id {
        let cmd = ipam::Cmd::Release {
            id,
            addr: Some(addr),
        };
        let _ = shared.router.send(router::Cmd::Ipam(cmd)).await;
    }
}

fn create_endpoint(req: &Value, shared: &Shared) -> Result<Value, String> {
    let id = str_field(req, "EndpointID").ok_or("CreateEndpoint without EndpointID")?;
    let iface = req.get("Interface").cloned().unwrap_or_else(|| json!({}));
    if str_field(&iface, "AddressIPv6").is_some_and(|a| !a.is_empty()) {
        return Err("mesh networks are IPv4 only".into());
    }
    let addr: Ipv4Net = str_field(&iface, "Address")
        .filter(|a| !a.is_empty())
        .ok_or("the endpoint has no address: the network must use the mesh's IPAM driver")?
        .parse()
        .map_err(|_| "the endpoint's address is not an IPv4 CIDR".to_string())?;
    shared.state().endpoints.insert(
        id.to_string(),
        Endpoint {
            addr,
            sandbox: None,
            adopting: None,
        },
    );
    Ok(json!({}))
}

/// Ask the attach manager.
async fn ask(shared: &Shared, req: Request) -> Response {
    let (reply, rx) = oneshot::channel();
    if shared
        .attach
        .send(attach::Cmd { req, reply })
        .await
        .is_err()
    {
        return Response::Error {
            message: "the mesh daemon is shutting down".into(),
        };
    }
    rx.await.unwrap_or(Response::Error {
        message: "the mesh daemon is shutting down".into(),
    })
}

/// The network's entry for `endpoint` in Docker's `GET /networks/{id}`:
/// the container's name and address.
async fn docker_endpoint(
    shared: &Shared,
    network: &str,
    endpoint: &str,
) -> Option<(String, String)> {
    let path = format!("/networks/{}", proxy::encode(network));
    let v = match tokio::time::timeout(
        NAME_TIMEOUT,
        proxy::docker_get(&shared.settings.docker_host, &path),
    )
    .await
    {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            warn!(
                network,
                "docker plugin: asking Docker about the network: {e:#}"
            );
            return None;
        }
        Err(_) => {
            warn!(
                network,
                "docker plugin: Docker did not answer about the network"
            );
            return None;
        }
    };
    endpoint_in(&v, endpoint)
}

/// The (name, address) of `endpoint` in a network's inspection.
pub fn endpoint_in(network: &Value, endpoint: &str) -> Option<(String, String)> {
    network
        .get("Containers")?
        .as_object()?
        .values()
        .find(|c| str_field(c, "EndpointID") == Some(endpoint))
        .map(|c| {
            (
                str_field(c, "Name").unwrap_or("").to_string(),
                str_field(c, "IPv4Address").unwrap_or("").to_string(),
            )
        })
}

async fn join(req: &Value, shared: &Arc<Shared>) -> Result<Value, String> {
    let eid = str_field(req, "EndpointID").ok_or("Join without EndpointID")?;
    let nid = str_field(req, "NetworkID").unwrap_or("");
    let sandbox = str_field(req, "SandboxKey")
        .filter(|k| !k.is_empty())
        .ok_or("Join without SandboxKey")?
        .to_string();
    let ep = shared.state().endpoints.get(eid).cloned();
    let found = docker_endpoint(shared, nid, eid).await;
    let addr = match (ep, &found) {
        (Some(ep), _) => ep.addr,
        // The daemon restarted since Docker created the endpoint.
        (None, Some((_, a))) => a
            .parse()
            .map_err(|_| format!("Docker gives the endpoint no address ({a:?})"))?,
        (None, None) => return Err(format!("unknown endpoint {eid}")),
    };
    let name = found
        .map(|(n, _)| n)
        .filter(|n| mesh_proto::names::normalize_name(n).is_ok());
    let port = ask(
        shared,
        Request::DockerPort {
            endpoint: eid.to_string(),
            addrs: vec![addr.to_string()],
        },
    )
    .await;
    let (peer, mac, host_ifname) = match port {
        Response::Port {
            ifname,
            mac,
            host_ifname,
        } => (ifname, mac, host_ifname),
        Response::Error { message } => return Err(message),
        other => return Err(format!("unexpected answer {other:?}")),
    };
    let task = tokio::spawn(adopt(
        shared.clone(),
        Adopt {
            addr,
            name,
            sandbox: sandbox.clone(),
            mac,
            host_ifname,
        },
    ));
    let mut st = shared.state();
    let ep = st.endpoints.entry(eid.to_string()).or_insert(Endpoint {
        addr,
        sandbox: None,
        adopting: None,
    });
    ep.sandbox = Some(sandbox);
    if let Some(old) = ep.adopting.replace(task.abort_handle()) {
        old.abort();
    }
    Ok(json!({
        "InterfaceName": {"SrcName": peer, "DstPrefix": IFNAME_PREFIX},
        "DisableGatewayService": true,
    }))
}

/// What the adoption of a joined endpoint needs.
struct Adopt {
    addr: Ipv4Net,
    name: Option<String>,
    sandbox: String,
    mac: String,
    host_ifname: String,
}

/// Once Docker has made the sandbox and moved the veth's end into it (as
/// the container starts): attach the container with that port, so that
/// it is listed, saved, served DNS inside and named; then send its DNS
/// queries to the mesh's server.
async fn adopt(shared: Arc<Shared>, a: Adopt) {
    let deadline = tokio::time::Instant::now() + ADOPT_WAIT;
    let mac = match a.mac.parse::<mesh_proto::name::PeerName>() {
        Ok(p) => p.0,
        Err(_) => return,
    };
    let mut pause = Duration::from_millis(1);
    // Docker moves the end in, renames it, gives it the address and sets
    // it up, in that order: adopt it once the address is there.
    let ifname = loop {
        if let Some(n) = docker_done(&a.sandbox, mac, a.addr).await {
            break n;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(sandbox = %a.sandbox, "docker plugin: the container's sandbox never got its interface; not attached");
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    let hand_over = shared.state().pending.get(&a.addr.addr()).cloned();
    let r = ask(
        &shared,
        Request::Attach {
            addrs: vec![a.addr.to_string()],
            name: a.name.clone(),
            target: a.sandbox.clone(),
            ifname: Some(ifname),
            hand_over: hand_over.clone(),
            port: Some(a.host_ifname.clone()),
        },
    )
    .await;
    match r {
        Response::Attached { .. } => {
            let mut st = shared.state();
            if st.pending.get(&a.addr.addr()) == hand_over.as_ref() {
                st.pending.remove(&a.addr.addr());
            }
        }
        Response::Error { message } => {
            warn!(container = ?a.name, "docker plugin: attaching the container: {message}");
            return;
        }
        other => {
            warn!(container = ?a.name, "docker plugin: attach answered {other:?}");
            return;
        }
    }
    if shared.settings.dns {
        if let Err(e) = bypass_docker_dns(&a.sandbox).await {
            warn!(container = ?a.name, "docker plugin: names may not resolve: {e}");
        }
    }
    info!(container = ?a.name, addr = %a.addr, "docker plugin: joined");
}

/// The name of the sandbox's interface with `mac`, once Docker has
/// renamed it and given it `addr`.
async fn docker_done(sandbox: &str, mac: [u8; 6], addr: Ipv4Net) -> Option<String> {
    let (ns, _) = crate::host::open_netns(sandbox).ok()?;
    let name = crate::host::link_with_mac(&ns, mac).await.ok().flatten()?;
    if !name.starts_with(IFNAME_PREFIX) {
        return None;
    }
    let (addrs, _) = crate::host::container_if(&ns, &name).await.ok().flatten()?;
    addrs.contains(&ipnet::IpNet::V4(addr)).then_some(name)
}

async fn leave(req: &Value, shared: &Shared) -> Result<Value, String> {
    let eid = str_field(req, "EndpointID").ok_or("Leave without EndpointID")?;
    let nid = str_field(req, "NetworkID").unwrap_or("");
    let ep = shared.state().endpoints.get_mut(eid).map(|ep| {
        if let Some(t) = ep.adopting.take() {
            t.abort();
        }
        ep.clone()
    });
    let (addr, target) = match ep {
        Some(Endpoint {
            addr,
            sandbox: Some(sb),
            ..
        }) => (addr.to_string(), sb),
        // The daemon restarted since the join: Docker knows the rest, and
        // the container was attached under its name.
        _ => match docker_endpoint(shared, nid, eid).await {
            Some((name, a)) if !name.is_empty() => (a, name),
            _ => {
                warn!(endpoint = %eid, "docker plugin: leave of an unknown endpoint");
                (String::new(), String::new())
            }
        },
    };
    if !target.is_empty() {
        let r = ask(
            shared,
            Request::Detach {
                addrs: vec![addr.clone()],
                target,
            },
        )
        .await;
        match r {
            Response::Ok => info!(%addr, "docker plugin: left"),
            // Never adopted, or gone with its namespace already.
            other => debug!(%addr, "docker plugin: leave: {other:?}"),
        }
    }
    let _ = ask(
        shared,
        Request::DockerPortGone {
            endpoint: eid.to_string(),
        },
    )
    .await;
    Ok(json!({}))
}

/// Load [`DNS_BYPASS`] into the sandbox's namespace.
async fn bypass_docker_dns(sandbox: &str) -> Result<(), String> {
    let sandbox = sandbox.to_string();
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let (ns, _) = crate::host::open_netns(&sandbox).map_err(|e| e.to_string())?;
        crate::host::run_in_netns(&ns, || {
            use std::io::Write;
            use std::process::{Command, Stdio};
            let mut child = Command::new("nft")
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("running nft: {e}"))?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(DNS_BYPASS.as_bytes())
                    .map_err(|e| format!("writing to nft: {e}"))?;
            }
            let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "nft in the sandbox: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        })
        .map_err(|e| e.to_string())?
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Remove the plugin's socket (the daemon is stopping).
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            range: "198.19.0.0/16".parse().unwrap(),
            default_subnet: "198.19.0.0/16".parse().unwrap(),
            dns: true,
            docker_host: PathBuf::from("/nonexistent"),
        }
    }

    #[test]
    fn pools_are_subnets_of_the_range() {
        let s = settings();
        let ok = |v: Value| pool_for(&v, &s).map(|n| n.to_string());
        assert_eq!(ok(json!({"Pool": ""})), Ok("198.19.0.0/16".into()));
        assert_eq!(ok(json!({})), Ok("198.19.0.0/16".into()));
        assert_eq!(
            ok(json!({"Pool": "198.19.5.0/24"})),
            Ok("198.19.5.0/24".into())
        );
        for (v, want) in [
            (json!({"Pool": "10.0.0.0/24"}), "outside the mesh's range"),
            (
                json!({"Pool": "198.19.5.1/24"}),
                "did you mean 198.19.5.0/24",
            ),
            (json!({"Pool": "nonsense"}), "not an IPv4 subnet"),
            (json!({"Pool": "198.19.5.0/31"}), "too small"),
            (json!({"V6": true}), "IPv4 only"),
            (
                json!({"Pool": "198.19.5.0/24", "SubPool": "198.19.5.0/25"}),
                "--ip-range",
            ),
        ] {
            let e = pool_for(&v, &s).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn networks_must_use_the_mesh_ipam() {
        let ours = json!({"IPv4Data": [{"AddressSpace": "mesh", "Pool": "198.19.5.0/24"}], "IPv6Data": []});
        assert_eq!(check_network(&ours, "mesh"), Ok(()));
        let docker =
            json!({"IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "172.17.0.0/16"}]});
        let e = check_network(&docker, "mesh").unwrap_err();
        assert!(e.contains("--ipam-driver mesh"), "{e}");
        assert!(check_network(&json!({}), "mesh").is_err());
        let v6 =
            json!({"IPv4Data": [{"AddressSpace": "mesh"}], "IPv6Data": [{"Pool": "fd00::/64"}]});
        assert!(check_network(&v6, "mesh")
            .unwrap_err()
            .contains("IPv4 only"));
    }

    #[test]
    fn address_requests() {
        let gw = json!({"PoolID": "198.19.5.0/24", "Address": "", "Options": {"RequestAddressType": GATEWAY_OPTION}});
        let pool: Ipv4Net = "198.19.5.0/24".parse().unwrap();
        assert_eq!(address_request(&gw), Ok(AddressRequest::Gateway(pool)));
        assert_eq!(
            address_reply(gateway_of(pool)),
            json!({"Address": "198.19.5.0/24", "Data": {}})
        );
        let any = json!({"PoolID": "198.19.5.0/24", "Address": "", "Options": null});
        assert_eq!(address_request(&any), Ok(AddressRequest::Any(pool)));
        let ip = json!({"PoolID": "198.19.5.0/24", "Address": "198.19.5.9"});
        assert_eq!(
            address_request(&ip),
            Ok(AddressRequest::Claim("198.19.5.9/24".parse().unwrap()))
        );
        let outside = json!({"PoolID": "198.19.5.0/24", "Address": "198.19.6.9"});
        assert!(address_request(&outside)
            .unwrap_err()
            .contains("not inside"));
        let set_gw = json!({"PoolID": "198.19.5.0/24", "Address": "198.19.5.1", "Options": {"RequestAddressType": GATEWAY_OPTION}});
        assert!(address_request(&set_gw).unwrap_err().contains("no gateway"));
        assert!(address_request(&json!({"PoolID": "x"})).is_err());
    }

    #[test]
    fn finds_the_endpoint_in_a_network_inspection() {
        let v = json!({"Containers": {
            "ep-1": {"Name": "web", "EndpointID": "e1", "IPv4Address": "198.19.5.7/24"},
            "abc": {"Name": "db", "EndpointID": "e2", "IPv4Address": "198.19.5.8/24"}
        }});
        assert_eq!(
            endpoint_in(&v, "e2"),
            Some(("db".to_string(), "198.19.5.8/24".to_string()))
        );
        assert_eq!(endpoint_in(&v, "e3"), None);
        assert_eq!(endpoint_in(&json!({}), "e1"), None);
    }

    #[test]
    fn plugin_names() {
        assert!(check_name("mesh").is_ok());
        assert!(check_name("mt01ab-h1").is_ok());
        for bad in ["", "a/b", ".x", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn replies_carry_their_length() {
        let r = String::from_utf8(reply(200, &json!({"Err": "x"}))).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.ends_with("\r\n\r\n{\"Err\":\"x\"}"));
        assert!(r.contains("Content-Length: 11\r\n"));
    }
}
