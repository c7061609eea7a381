//! Attached containers: the one task that attaches, detaches and lists
//! them, and keeps the list in `$MESH_DATA_DIR/containers.json` (written
//! atomically), so that `mesh ps` survives a restart of the daemon. The
//! interfaces themselves live in the kernel and outlive the daemon.
//!
//! Addresses inside `--ipalloc-range` come from the allocator ([`crate::router::ipam`],
//! through the router task): `net:` and `net:default` allocate, `ip:` claims.
//! The allocation is made (and persisted by the allocator) before the
//! interface is created, and released after it is removed, so after a crash
//! the allocator may hold a claim for a container that is not attached, never
//! the reverse; the reconciliation at start-up releases such claims.
//! Addresses outside the range are the user's own business, checked only
//! against this peer's other containers.
//!
//! Invariant: no address is held by two attached containers.

pub mod addr;
pub mod run;

use crate::api::{PsEntry, Request, Response};
use crate::host::BRIDGE;
use crate::host::{self, Netlink, NetnsId};
use crate::persist;
use crate::router::{self, ipam, names};
use addr::Addr;
use ipnet::{IpNet, Ipv4Net};
use mesh_proto::name::mac_string;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// How often attached containers are checked for having gone away (their
/// namespace destroyed takes the veth pair with it).
const GONE_CHECK: Duration = Duration::from_secs(5);

/// The namespaces held by other processes are looked at on every this many
/// gone checks: a namespace held by this daemon alone is released 15-30 s
/// after its last process left. Usually a `stat` per container (the
/// process or mount that held it last time); a walk of all of `/proc`,
/// once the largest idle cost of a daemon with containers, only when one
/// of those let go.
const ORPHAN_EVERY: u32 = 3;

/// The prefix of host-side interface names.
const HOST_PREFIX: &str = host::nft::PORT_PREFIX;

/// The container-side interface name.
pub const IFNAME: &str = "ethmesh";

/// A request for the manager, with where to answer.
pub struct Cmd {
    /// Attach, Detach or Ps.
    pub req: Request,
    /// The answer.
    pub reply: oneshot::Sender<Response>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Attachment {
    id: String,
    name: Option<String>,
    target: String,
    netns: NetnsId,
    host_ifname: String,
    /// The interface's name inside the container (lists saved before it
    /// was recorded used [`IFNAME`]).
    #[serde(default = "default_ifname")]
    ifname: String,
    mac: String,
    cidrs: Vec<IpNet>,
}

fn default_ifname() -> String {
    IFNAME.to_string()
}

/// Owns the list of attached containers.
pub struct Manager {
    nl: Netlink,
    path: PathBuf,
    mtu: u32,
    list: Vec<Attachment>,
    router: mpsc::Sender<router::Cmd>,
    range: Ipv4Net,
    zone: Option<Arc<mesh_dns::Zone>>,
    /// DNS servers inside containers, by host interface.
    servers: HashMap<String, tokio::task::AbortHandle>,
    /// The host's addresses on the bridge (`mesh expose`), saved in
    /// `exposed.json`.
    exposed: Vec<Ipv4Net>,
    /// Host interfaces of containers whose namespace only this daemon
    /// held at the last check (see [`Manager::release_gone`]).
    orphans: std::collections::HashSet<String>,
    /// A path that held each container's namespace at the last check
    /// (`/proc/PID/ns/net` of a process in it, or a mount), by host
    /// interface: checked first, so `/proc` is walked only when one of
    /// them let go (see [`host::netns::holders`]).
    holders: HashMap<String, String>,
    /// Gone checks so far (see [`ORPHAN_EVERY`]).
    gone_checks: u32,
    /// Ports of the Docker plugin's veths not yet adopted by an attach
    /// (Docker moves the other end into a sandbox that does not exist
    /// yet), by host interface: in the rules from their first frame.
    docker_ports: HashMap<String, host::nft::Port>,
}

/// The allocator's id for the host's own addresses (`mesh expose`); not a
/// container id, which are 12 hex digits.
const HOST_ID: &str = "host";

/// The most DNS queries per second one container's server answers over
/// UDP: plenty for any resolver, and a flood from one container costs the
/// daemon a bounded share of its CPU (the kernel drops the excess).
const CONTAINER_DNS_QPS: u32 = 5_000;

/// Where containers find the mesh's DNS (in their own namespace).
pub const DNS_ADDR: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 53);

impl Attachment {
    /// The allocator's id for this container: stable for its namespace,
    /// whatever name it is given later.
    fn alloc_id(&self) -> String {
        alloc_id(self.netns)
    }

    /// Its IPv4 addresses.
    fn v4(&self) -> Vec<Ipv4Addr> {
        v4_nets(&self.cidrs).iter().map(|n| n.addr()).collect()
    }

    /// Its addresses that the allocator manages.
    fn managed(&self, range: Ipv4Net) -> Vec<Ipv4Net> {
        self.cidrs
            .iter()
            .filter_map(|c| match c {
                IpNet::V4(n) if range.contains(&n.addr()) => Some(*n),
                _ => None,
            })
            .collect()
    }
}

/// Decode the bytes of `containers.json` (sealed or plain) as the daemon
/// does at start: how many attachments it lists. Pure, for the fuzz
/// target and its regression tests.
pub fn decode_containers(bytes: &[u8]) -> Result<usize, persist::Corrupt> {
    persist::decode_json::<Vec<Attachment>>(bytes).map(|v| v.len())
}

/// The host-side interfaces of the containers recorded in `data_dir`
/// (for `mesh reset` without a daemon).
pub fn host_interfaces(data_dir: &std::path::Path) -> Vec<String> {
    persist::load_json::<Vec<Attachment>>(&data_dir.join(crate::paths::CONTAINERS))
        .ok()
        .flatten()
        .unwrap_or_default()
        .into_iter()
        .map(|a| a.host_ifname)
        .collect()
}

/// The IPv4 ones of `cidrs` (the mesh hands out, isolates and names IPv4
/// addresses only).
fn v4_nets<'a>(cidrs: impl IntoIterator<Item = &'a IpNet>) -> Vec<Ipv4Net> {
    cidrs
        .into_iter()
        .filter_map(|c| match c {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        })
        .collect()
}

/// The saved attachments whose interfaces still exist. Host ends of
/// containers that are not in the list (an attach that was in flight when
/// the daemon died: the list is saved after the interface is made, and it
/// never answered the user) are rolled back; the reconciliation releases
/// their addresses.
async fn still_attached(nl: &Netlink, stored: Vec<Attachment>) -> anyhow::Result<Vec<Attachment>> {
    let mut list = Vec::new();
    for a in stored {
        if nl.link_index(&a.host_ifname).await?.is_some() {
            list.push(a);
        } else {
            info!(container = %a.id, "container gone while we were stopped; released");
        }
    }
    let known: std::collections::BTreeSet<&str> =
        list.iter().map(|a| a.host_ifname.as_str()).collect();
    for link in nl.links().await? {
        let Some(name) = host::netlink::link_name_of(&link) else {
            continue;
        };
        if name.starts_with(HOST_PREFIX) && !known.contains(name) {
            warn!(
                interface = name,
                "half-made attachment from before a crash: removed"
            );
            nl.delete_link(name).await?;
        }
    }
    Ok(list)
}

impl Manager {
    /// After a restart: the allocator keeps the addresses the attached
    /// containers (and the exposed host) hold and releases the rest; the
    /// name table likewise.
    async fn reconcile(&self) {
        let range = self.range;
        let mut live: Vec<(String, Vec<Ipv4Net>)> = self
            .list
            .iter()
            .map(|a| (a.alloc_id(), a.managed(range)))
            .collect();
        live.push((
            HOST_ID.to_string(),
            self.exposed
                .iter()
                .filter(|n| range.contains(&n.addr()))
                .copied()
                .collect(),
        ));
        let _ = self
            .router
            .send(router::Cmd::Ipam(ipam::Cmd::Reconcile { live }))
            .await;
        let live = self.list.iter().map(|a| a.alloc_id()).collect();
        let _ = self
            .router
            .send(router::Cmd::Names(names::Cmd::Reconcile { live }))
            .await;
    }
}

/// What an attach works out before it touches the kernel.
struct Plan {
    /// The addresses asked for.
    parsed: Vec<Addr>,
    /// The container's network namespace.
    ns: std::fs::File,
    netns: NetnsId,
    /// Its index in the list when it is attached already.
    existing: Option<usize>,
    /// The addresses it holds already.
    held: Vec<IpNet>,
    /// Its id: `--name`, else derived from the namespace.
    cid: String,
    name: Option<String>,
    target: String,
    host_ifname: String,
    ifname: String,
    /// The port is a Docker plugin veth to adopt, not one to make.
    adopt: bool,
}

/// Add the addresses an attachment does not have yet.
fn add_cidrs(a: &mut Attachment, wanted: &[IpNet]) {
    for w in wanted {
        if !a.cidrs.contains(w) {
            a.cidrs.push(*w);
        }
    }
}

/// The host end and the peer of the Docker plugin's veth for `endpoint`.
pub fn docker_port_names(endpoint: &str) -> (String, String) {
    let mut h: u32 = 0x811c9dc5;
    for b in endpoint.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (format!("{HOST_PREFIX}{h:08x}"), format!("vmd{h:08x}"))
}

fn alloc_id(netns: NetnsId) -> String {
    format!("{:012x}", fnv(netns) & 0xffff_ffff_ffff)
}

fn fnv(netns: NetnsId) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in netns
        .dev
        .to_le_bytes()
        .iter()
        .chain(netns.ino.to_le_bytes().iter())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl Manager {
    /// Load the persisted list, keeping only containers whose interface
    /// still exists.
    pub async fn load(
        nl: Netlink,
        data_dir: PathBuf,
        mtu: u32,
        router: mpsc::Sender<router::Cmd>,
        range: Ipv4Net,
        zone: Option<Arc<mesh_dns::Zone>>,
    ) -> anyhow::Result<Manager> {
        let path = data_dir.join(crate::paths::CONTAINERS);
        let data_dir_for_expose = data_dir.clone();
        let stored: Vec<Attachment> = persist::load_json(&path)?.unwrap_or_default();
        let before = stored.len();
        let list = still_attached(&nl, stored).await?;
        let mut m = Manager {
            nl,
            path,
            mtu,
            list,
            router,
            range,
            zone,
            servers: HashMap::new(),
            orphans: Default::default(),
            holders: HashMap::new(),
            gone_checks: 0,
            docker_ports: HashMap::new(),
            exposed: persist::load_json(&data_dir_for_expose.join(crate::paths::EXPOSED))?
                .unwrap_or_default(),
        };
        if let Err(e) = host::nft::sync_nat(BRIDGE, &m.exposed).await {
            warn!("NAT of exposed subnets: {e}");
        }
        if m.list.len() != before {
            m.save()?;
        }
        m.sync_rules(None).await.map_err(anyhow::Error::msg)?;
        m.reconcile().await;
        for a in m.list.clone() {
            match host::open_netns(&a.target) {
                Ok((ns, id)) if id == a.netns => m.start_dns(&a.host_ifname, &ns).await,
                _ => {
                    warn!(container = %a.id, "cannot enter its namespace again: no DNS inside it until it is attached again")
                }
            }
        }
        Ok(m)
    }

    /// Make the isolation rules match the list, with `extra` (a port being
    /// created, quarantined until its MAC is known) added.
    async fn sync_rules(&self, extra: Option<host::nft::Port>) -> Result<(), String> {
        let mut ports: Vec<host::nft::Port> = self
            .list
            .iter()
            .map(|a| host::nft::Port {
                ifname: a.host_ifname.clone(),
                mac: Some(a.mac.clone()),
                addrs: v4_nets(&a.cidrs),
            })
            .collect();
        for d in self.docker_ports.values() {
            if !ports.iter().any(|p| p.ifname == d.ifname) {
                ports.push(d.clone());
            }
        }
        if let Some(e) = extra {
            match ports.iter_mut().find(|p| p.ifname == e.ifname) {
                Some(p) => *p = e,
                None => ports.push(e),
            }
        }
        // This host's own MACs, which no frame from the overlay may claim:
        // the containers' (from attach, never learnt) and the bridge's.
        let mut local: Vec<String> = ports.iter().filter_map(|p| p.mac.clone()).collect();
        match self.nl.link_mac(BRIDGE).await {
            Ok(m) => local.push(mac_string(m)),
            Err(e) => debug!("the bridge's MAC: {e}"),
        }
        // The sleeve too: it never learns them behind a peer and drops what
        // claims them (the whole set, each time: it replaces the last).
        // (A MAC is written like a peer name: six hex bytes.)
        let macs: Vec<[u8; 6]> = local
            .iter()
            .filter_map(|m| m.parse::<mesh_proto::name::PeerName>().ok())
            .map(|p| p.0)
            .collect();
        let _ = self.router.send(router::Cmd::LocalMacs(macs)).await;
        host::nft::sync(&ports, &local).await
    }

    /// Serve DNS inside the container at 127.0.0.11:53 (UDP and TCP
    /// sockets opened in its namespace), with its `lo` up.
    async fn start_dns(&mut self, host_ifname: &str, ns: &std::fs::File) {
        let Some(zone) = self.zone.clone() else {
            return;
        };
        if let Some(h) = self.servers.remove(host_ifname) {
            h.abort();
        }
        let lo = async {
            let cnl = Netlink::in_netns(ns).await?;
            if let Some(i) = cnl.link_index("lo").await? {
                cnl.set_up(i).await?;
            }
            Ok::<(), host::HostError>(())
        };
        if let Err(e) = lo.await {
            warn!(host_ifname, "bringing lo up in the container: {e}");
        }
        let sockets = host::run_in_netns(ns, || {
            let udp = std::net::UdpSocket::bind(DNS_ADDR)?;
            let tcp = std::net::TcpListener::bind(DNS_ADDR)?;
            Ok::<_, std::io::Error>((udp, tcp))
        });
        match sockets {
            Ok(Ok((udp, tcp))) => {
                let name = host_ifname.to_string();
                let task = tokio::spawn(async move {
                    if let Err(e) = mesh_dns::serve_paced(udp, tcp, zone, CONTAINER_DNS_QPS).await {
                        warn!(host_ifname = %name, "DNS inside the container: {e}");
                    }
                });
                self.servers
                    .insert(host_ifname.to_string(), task.abort_handle());
            }
            Ok(Err(e)) => warn!(
                host_ifname,
                "no DNS inside the container: {DNS_ADDR} is taken there ({e})"
            ),
            Err(e) => warn!(host_ifname, "no DNS inside the container: {e}"),
        }
    }

    fn stop_dns(&mut self, host_ifname: &str) {
        if let Some(h) = self.servers.remove(host_ifname) {
            h.abort();
        }
    }

    async fn names(&self, cmd: names::Cmd) {
        let _ = self.router.send(router::Cmd::Names(cmd)).await;
    }

    /// The attached container TARGET names: a PID or netns path (matched
    /// by namespace), or its id, name or target as given.
    fn find(&self, target: &str) -> Option<usize> {
        let opened = host::open_netns(target).ok();
        self.list
            .iter()
            .position(|a| opened.as_ref().is_some_and(|(_, id)| a.netns == *id))
            .or_else(|| {
                self.list
                    .iter()
                    .position(|a| a.id == target || a.target == target)
            })
    }

    /// `mesh dns-add` / `dns-remove`.
    async fn dns_change(
        &self,
        add: bool,
        ips: &[String],
        target: Option<&str>,
        fqdn: Option<String>,
    ) -> Result<(), String> {
        let mut addrs = Vec::new();
        for ip in ips {
            let a: Ipv4Addr = ip
                .split('/')
                .next()
                .unwrap_or("")
                .parse()
                .map_err(|_| format!("invalid IP {ip:?}: expected an IPv4 address"))?;
            addrs.push(a);
        }
        let (container, name) = match target {
            Some(t) => {
                let i = self
                    .find(t)
                    .ok_or_else(|| format!("no attached container matches {t}"))?;
                let a = &self.list[i];
                if addrs.is_empty() && add {
                    addrs = a.v4();
                }
                for x in &addrs {
                    if !a.v4().contains(x) {
                        return Err(format!("{x} is not an address of container {}", a.id));
                    }
                }
                let name = fqdn.or_else(|| a.name.clone());
                if add && name.is_none() {
                    return Err(format!(
                        "container {} has no name: give one with -h FQDN",
                        a.id
                    ));
                }
                (a.alloc_id(), name)
            }
            None => {
                if fqdn.is_none() || (add && addrs.is_empty()) {
                    return Err("give a TARGET, or IP... with -h FQDN".into());
                }
                ("-".to_string(), fqdn)
            }
        };
        if add {
            let (reply, rx) = oneshot::channel();
            self.names(names::Cmd::Add {
                container,
                addrs,
                name: name.unwrap_or_default(),
                reply: Some(reply),
            })
            .await;
            rx.await
                .map_err(|_| "the daemon is shutting down".to_string())?
        } else {
            let (reply, rx) = oneshot::channel();
            self.names(names::Cmd::Remove {
                container,
                addrs,
                name,
                reply: Some(reply),
            })
            .await;
            match rx.await {
                Ok(0) => Err("no such name".into()),
                Ok(_) => Ok(()),
                Err(_) => Err("the daemon is shutting down".into()),
            }
        }
    }

    /// The host's exposed address in one of the container's subnets.
    fn gateway_for(&self, a: &Attachment) -> Option<Ipv4Addr> {
        self.exposed.iter().find_map(|e| {
            a.cidrs
                .iter()
                .any(|c| matches!(c, IpNet::V4(n) if n.trunc() == e.trunc()))
                .then_some(e.addr())
        })
    }

    fn save_exposed(&self) -> Result<(), String> {
        let dir = self.path.parent().map(PathBuf::from).unwrap_or_default();
        persist::save_json(&dir.join(crate::paths::EXPOSED), &self.exposed)
            .map_err(|e| format!("{e:#}"))
    }

    /// Set or remove the default route via `gw` in every container of this
    /// host attached in `subnet`.
    async fn routes_via(&self, subnet: Ipv4Net, gw: Ipv4Addr, add: bool) {
        for a in &self.list {
            if !a
                .cidrs
                .iter()
                .any(|c| matches!(c, IpNet::V4(n) if n.trunc() == subnet.trunc()))
            {
                continue;
            }
            let Ok((ns, id)) = host::open_netns(&a.target) else {
                continue;
            };
            if id != a.netns {
                continue;
            }
            let r = match Netlink::in_netns(&ns).await {
                Ok(cnl) if add => host::add_default_route(&cnl, gw).await.map(|_| ()),
                Ok(cnl) => host::del_default_route(&cnl, gw).await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                warn!(container = %a.id, "default route via {gw}: {e}");
            }
        }
    }

    /// `mesh expose`.
    async fn expose(&mut self, addrs: &[String]) -> Result<Vec<String>, String> {
        let mut parsed = addrs
            .iter()
            .map(|a| addr::parse(a))
            .collect::<Result<Vec<Addr>, String>>()?;
        if parsed.is_empty() {
            parsed.push(Addr::NetDefault);
        }
        let mut out = Vec::new();
        for a in parsed {
            let subnet: Option<Ipv4Net> = match &a {
                Addr::Net(IpNet::V4(s)) => Some(*s),
                Addr::Ip(IpNet::V4(n)) => Some(n.trunc()),
                Addr::NetDefault => None,
                Addr::None => continue,
                other => return Err(format!("cannot expose {other}: IPv4 subnets only")),
            };
            if let Some(s) = subnet {
                if let Some(e) = self.exposed.iter().find(|e| e.trunc() == s) {
                    return Err(format!("{s} is already exposed on this host as {e}"));
                }
            }
            let n: Ipv4Net = match a {
                Addr::Ip(IpNet::V4(n)) if !self.range.contains(&n.addr()) => n,
                Addr::Ip(IpNet::V4(n)) => {
                    self.ipam(|reply| ipam::Cmd::Claim {
                        id: HOST_ID.into(),
                        addr: n,
                        reply,
                    })
                    .await?
                }
                Addr::Net(IpNet::V4(s)) => {
                    self.ipam(|reply| ipam::Cmd::Allocate {
                        id: HOST_ID.into(),
                        subnet: Some(s),
                        reply,
                    })
                    .await?
                }
                _ => {
                    self.ipam(|reply| ipam::Cmd::Allocate {
                        id: HOST_ID.into(),
                        subnet: None,
                        reply,
                    })
                    .await?
                }
            };
            if self.exposed.iter().any(|e| e.trunc() == n.trunc()) {
                return Err(format!("{} is already exposed on this host", n.trunc()));
            }
            if let Err(e) = host::add_addrs(&self.nl, BRIDGE, &[IpNet::V4(n)]).await {
                self.release(HOST_ID, Some(n.addr())).await;
                return Err(format!("adding {n} to the bridge: {e}"));
            }
            self.exposed.push(n);
            if let Err(e) = self.save_exposed() {
                let _ = host::del_addrs(&self.nl, BRIDGE, &[IpNet::V4(n)]).await;
                self.exposed.pop();
                self.release(HOST_ID, Some(n.addr())).await;
                return Err(e);
            }
            if let Err(e) = host::nft::sync_nat(BRIDGE, &self.exposed).await {
                warn!("NAT of exposed subnets: {e}");
            }
            if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
                warn!("enabling IPv4 forwarding: {e}");
            }
            self.routes_via(n, n.addr(), true).await;
            info!(addr = %n, "exposed");
            out.push(n.to_string());
        }
        Ok(out)
    }

    /// `mesh hide`.
    async fn hide(&mut self, addrs: &[String]) -> Result<(), String> {
        let mut which: Vec<Ipv4Net> = Vec::new();
        if addrs.is_empty() {
            which = self.exposed.clone();
        }
        for a in addrs {
            let s = match addr::parse(a)? {
                Addr::Net(IpNet::V4(s)) => s,
                Addr::Ip(IpNet::V4(n)) => n.trunc(),
                Addr::NetDefault => {
                    match self.exposed.iter().find(|e| self.range.contains(&e.addr())) {
                        Some(e) => e.trunc(),
                        None => return Err("net:default is not exposed on this host".into()),
                    }
                }
                other => return Err(format!("cannot hide {other}")),
            };
            match self.exposed.iter().find(|e| e.trunc() == s) {
                Some(e) => which.push(*e),
                None => return Err(format!("{s} is not exposed on this host")),
            }
        }
        for n in which {
            host::del_addrs(&self.nl, BRIDGE, &[IpNet::V4(n)])
                .await
                .map_err(|e| format!("removing {n} from the bridge: {e}"))?;
            self.exposed.retain(|e| *e != n);
            self.save_exposed()?;
            self.routes_via(n, n.addr(), false).await;
            self.release(HOST_ID, Some(n.addr())).await;
            info!(addr = %n, "hidden");
        }
        host::nft::sync_nat(BRIDGE, &self.exposed).await
    }

    fn save(&self) -> anyhow::Result<()> {
        persist::save_json(&self.path, &self.list)
    }

    /// `mesh ps`: the exposed host first, then every container.
    async fn ps(&self) -> Response {
        let mut containers: Vec<PsEntry> = Vec::new();
        if !self.exposed.is_empty() {
            let mac = self
                .nl
                .link_mac(BRIDGE)
                .await
                .map(mac_string)
                .unwrap_or_default();
            containers.push(PsEntry {
                id: "mesh:expose".into(),
                mac,
                cidrs: self.exposed.iter().map(|c| c.to_string()).collect(),
            });
        }
        containers.extend(self.list.iter().map(|a| PsEntry {
            id: a.id.clone(),
            mac: a.mac.clone(),
            cidrs: a.cidrs.iter().map(|c| c.to_string()).collect(),
        }));
        Response::Ps { containers }
    }

    /// Serve requests until the channel closes.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut check = tokio::time::interval(GONE_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Told of changes to the ruleset; checked once they settle. The
        // slow check is a backstop, slower while told.
        let mut changes = host::nft::changes();
        let slow_check = |told: bool| {
            let every = if told {
                host::nft::WATCH_TOLD
            } else {
                host::nft::WATCH
            };
            let mut i = tokio::time::interval(every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        };
        let mut watch = slow_check(changes.is_some());
        let mut recheck: Option<tokio::time::Instant> = None;
        loop {
            let Cmd { req, reply } = tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => c,
                    None => return,
                },
                _ = check.tick() => {
                    self.release_gone().await;
                    continue;
                }
                _ = watch.tick() => {
                    self.restore_rules().await;
                    continue;
                }
                c = async { changes.as_mut()?.recv().await }, if changes.is_some() => {
                    if c.is_none() {
                        // No longer told: back to the plain slow check.
                        changes = None;
                        watch = slow_check(false);
                    } else if recheck.is_none() {
                        recheck = Some(tokio::time::Instant::now() + host::nft::SETTLE);
                    }
                    continue;
                }
                _ = async { tokio::time::sleep_until(recheck?).await; Some(()) }, if recheck.is_some() => {
                    recheck = None;
                    self.restore_rules().await;
                    continue;
                }
            };
            let resp = match req {
                Request::Attach {
                    addrs,
                    name,
                    target,
                    ifname,
                    hand_over,
                    port,
                } => match self
                    .attach(&addrs, name, &target, ifname, hand_over.as_deref(), port)
                    .await
                {
                    Ok(cidrs) => Response::Attached { cidrs },
                    Err(message) => Response::Error { message },
                },
                Request::DockerPort { endpoint, addrs } => {
                    match self.docker_port(&endpoint, &addrs).await {
                        Ok(r) => r,
                        Err(message) => Response::Error { message },
                    }
                }
                Request::DockerPortGone { endpoint } => {
                    self.docker_port_gone(&endpoint).await;
                    Response::Ok
                }
                Request::Detach { addrs, target } => match self.detach(&addrs, &target).await {
                    Ok(()) => Response::Ok,
                    Err(message) => Response::Error { message },
                },
                Request::Expose { addrs } => match self.expose(&addrs).await {
                    Ok(cidrs) => Response::Attached { cidrs },
                    Err(message) => Response::Error { message },
                },
                Request::Hide { addrs } => match self.hide(&addrs).await {
                    Ok(()) => Response::Ok,
                    Err(message) => Response::Error { message },
                },
                Request::DnsAdd { ips, target, fqdn } => {
                    match self.dns_change(true, &ips, target.as_deref(), fqdn).await {
                        Ok(()) => Response::Ok,
                        Err(message) => Response::Error { message },
                    }
                }
                Request::DnsRemove { ips, target, fqdn } => {
                    match self.dns_change(false, &ips, target.as_deref(), fqdn).await {
                        Ok(()) => Response::Ok,
                        Err(message) => Response::Error { message },
                    }
                }
                Request::Reset => match self.detach_all().await {
                    Ok(()) => Response::Ok,
                    Err(message) => Response::Error { message },
                },
                Request::Ps => self.ps().await,
                _ => Response::Error {
                    message: "not an attachment request".into(),
                },
            };
            let _ = reply.send(resp);
        }
    }

    /// Ask the allocator, through the router.
    async fn ipam(
        &self,
        make: impl FnOnce(ipam::AllocReply) -> ipam::Cmd,
    ) -> Result<Ipv4Net, String> {
        let (tx, rx) = oneshot::channel();
        self.router
            .send(router::Cmd::Ipam(make(tx)))
            .await
            .map_err(|_| "the daemon is shutting down".to_string())?;
        rx.await
            .map_err(|_| "the daemon is shutting down".to_string())?
    }

    async fn release(&self, id: &str, addr: Option<std::net::Ipv4Addr>) {
        let _ = self
            .router
            .send(router::Cmd::Ipam(ipam::Cmd::Release {
                id: id.to_string(),
                addr,
            }))
            .await;
    }

    /// Turn ADDRs into addresses: allocate, claim, or take as given.
    /// Returns them with those newly taken from the allocator (to give back
    /// if the attachment fails).
    async fn resolve(
        &self,
        addrs: &[Addr],
        id: &str,
        held: &[IpNet],
    ) -> Result<(Vec<IpNet>, Vec<Ipv4Net>), String> {
        let mut out: Vec<IpNet> = Vec::new();
        let mut taken: Vec<Ipv4Net> = Vec::new();
        let mut result = Ok(());
        for a in addrs {
            let r = match a {
                Addr::None => continue,
                Addr::Ip(IpNet::V4(n)) if self.range.contains(&n.addr()) => {
                    let n = *n;
                    self.ipam(|reply| ipam::Cmd::Claim {
                        id: id.to_string(),
                        addr: n,
                        reply,
                    })
                    .await
                }
                Addr::Ip(n) => {
                    out.push(*n);
                    continue;
                }
                Addr::Net(IpNet::V6(n)) => Err(format!(
                    "cannot allocate in {n}: the allocator hands out IPv4 addresses from --ipalloc-range {}",
                    self.range
                )),
                Addr::Net(IpNet::V4(s)) => {
                    let s = *s;
                    self.ipam(|reply| ipam::Cmd::Allocate {
                        id: id.to_string(),
                        subnet: Some(s),
                        reply,
                    })
                    .await
                }
                Addr::NetDefault => {
                    self.ipam(|reply| ipam::Cmd::Allocate {
                        id: id.to_string(),
                        subnet: None,
                        reply,
                    })
                    .await
                }
            };
            match r {
                Ok(n) => {
                    if !held.contains(&IpNet::V4(n)) && !taken.contains(&n) {
                        taken.push(n);
                    }
                    out.push(IpNet::V4(n));
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if let Err(e) = result {
            self.release_taken(id, &taken).await;
            return Err(e);
        }
        out.dedup();
        Ok((out, taken))
    }
    /// Hand the given addresses held by allocation id `from` to `aid`, so
    /// that the claims that follow find them the container's. An address
    /// `from` no longer holds (released while the daemon restarted) is
    /// claimed afresh by them, if still free.
    async fn hand_over(&self, from: &str, aid: &str, addrs: &[Addr]) {
        for a in addrs {
            let Addr::Ip(IpNet::V4(n)) = a else {
                continue;
            };
            let (reply, rx) = oneshot::channel();
            let cmd = ipam::Cmd::HandOver {
                from: from.to_string(),
                to: aid.to_string(),
                addr: n.addr(),
                reply,
            };
            if self.router.send(router::Cmd::Ipam(cmd)).await.is_err() {
                return;
            }
            if !rx.await.unwrap_or(false) {
                debug!(from, addr = %n.addr(), "nothing to hand over: claiming afresh");
            }
        }
    }

    /// The Docker plugin's join ([`Request::DockerPort`]): a veth pair in
    /// the host's namespace, its host end on the bridge and in the rules
    /// with its peer's MAC and `addrs`, the peer for Docker to move.
    async fn docker_port(&mut self, endpoint: &str, addrs: &[String]) -> Result<Response, String> {
        let mut v4 = Vec::new();
        for a in addrs {
            let n: Ipv4Net = a
                .parse()
                .map_err(|_| format!("{a:?} is not an IPv4 CIDR"))?;
            v4.push(n);
        }
        let (host_ifname, peer) = docker_port_names(endpoint);
        let mac = host::make_veth_pair(&self.nl, BRIDGE, &host_ifname, &peer, self.mtu)
            .await
            .map_err(|e| format!("making the endpoint's veth: {e}"))?;
        let mac = mac_string(mac);
        self.docker_ports.insert(
            host_ifname.clone(),
            host::nft::Port {
                ifname: host_ifname.clone(),
                mac: Some(mac.clone()),
                addrs: v4,
            },
        );
        if let Err(e) = self.sync_rules(None).await {
            self.docker_port_gone(endpoint).await;
            return Err(e);
        }
        Ok(Response::Port {
            ifname: peer,
            mac,
            host_ifname,
        })
    }

    /// The Docker plugin's leave of an endpoint never adopted (or a
    /// clean-up after one that was): its pair and rules go.
    async fn docker_port_gone(&mut self, endpoint: &str) {
        let (host_ifname, peer) = docker_port_names(endpoint);
        if self.list.iter().any(|a| a.host_ifname == host_ifname) {
            return;
        }
        for link in [&host_ifname, &peer] {
            if let Err(e) = self.nl.delete_link(link).await {
                warn!(interface = %link, "removing a Docker endpoint's veth: {e}");
            }
        }
        if self.docker_ports.remove(&host_ifname).is_some() {
            let _ = self.sync_rules(None).await;
        }
    }

    /// Give back addresses the allocator handed out for an attach that
    /// failed.
    async fn release_taken(&self, aid: &str, taken: &[Ipv4Net]) {
        for n in taken {
            self.release(aid, Some(n.addr())).await;
        }
    }

    /// Attach `target` with `addrs`: work out the plan, get the addresses,
    /// make the port, record it, then the extras (name, DNS, route).
    async fn attach(
        &mut self,
        addrs: &[String],
        name: Option<String>,
        target: &str,
        ifname: Option<String>,
        hand_over: Option<&str>,
        port: Option<String>,
    ) -> Result<Vec<String>, String> {
        let Some(plan) = self.plan(addrs, name, target, ifname, port)? else {
            return Ok(Vec::new());
        };
        let aid = alloc_id(plan.netns);
        if let Some(from) = hand_over {
            self.hand_over(from, &aid, &plan.parsed).await;
        }
        let (wanted, taken) = self.resolve(&plan.parsed, &aid, &plan.held).await?;
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let mac = self.make_port(&plan, &aid, &wanted, &taken).await?;
        // The name is on disk before the container is recorded: after a
        // crash in between, a container in the list has its name, and a
        // name of one that is not is dropped by the reconciliation.
        if let Err(e) = self.add_name(&plan, &aid, &wanted).await {
            self.undo_port(&plan, &aid, &taken).await;
            return Err(e);
        }
        let a = match self.record(&plan, &wanted, mac) {
            Ok(a) => a,
            Err(e) => {
                self.undo_port(&plan, &aid, &taken).await;
                return Err(e);
            }
        };
        // An adopted Docker port is the container's now.
        self.docker_ports.remove(&a.host_ifname);
        self.after_attach(&plan, &a).await;
        info!(container = %plan.cid, addrs = ?wanted, "attached");
        Ok(wanted.iter().map(|c| c.to_string()).collect())
    }

    /// Check an attach request against what is attached already; `None`
    /// when there is nothing to attach.
    fn plan(
        &self,
        addrs: &[String],
        name: Option<String>,
        target: &str,
        ifname: Option<String>,
        port: Option<String>,
    ) -> Result<Option<Plan>, String> {
        if let Some(n) = &ifname {
            host::check_ifname(n).map_err(|e| e.to_string())?;
        }
        let parsed = addrs
            .iter()
            .map(|a| addr::parse(a))
            .collect::<Result<Vec<Addr>, String>>()?;
        if parsed.iter().all(|a| *a == Addr::None) {
            return Ok(None);
        }
        let (ns, id) = host::open_netns(target).map_err(|e| e.to_string())?;
        let existing = self.list.iter().position(|a| a.netns == id);
        let held = existing
            .map(|i| self.list[i].cidrs.clone())
            .unwrap_or_default();
        for w in parsed.iter().filter_map(|a| match a {
            Addr::Ip(n) => Some(n),
            _ => None,
        }) {
            if let Some(other) = self
                .list
                .iter()
                .find(|a| a.netns != id && a.cidrs.iter().any(|c| c.addr() == w.addr()))
            {
                return Err(format!(
                    "address {} is already attached to container {}",
                    w.addr(),
                    other.id
                ));
            }
        }
        let hash = fnv(id);
        let cid = name
            .clone()
            .unwrap_or_else(|| format!("{:012x}", hash & 0xffff_ffff_ffff));
        if let Some(other) = self.list.iter().find(|a| a.netns != id && a.id == cid) {
            return Err(format!(
                "container name {cid} is already used by another attached container ({})",
                other.target
            ));
        }
        let adopt = port.is_some();
        let host_ifname = match (existing, port) {
            (Some(i), None) => self.list[i].host_ifname.clone(),
            (None, None) => format!("{HOST_PREFIX}{:08x}", hash as u32),
            (None, Some(p)) => p,
            (Some(i), Some(_)) => {
                return Err(format!(
                    "container {} is on the mesh already: a container joins one mesh network",
                    self.list[i].id
                ))
            }
        };
        // An attached container keeps the interface it has.
        let ifname = match existing {
            Some(i) => self.list[i].ifname.clone(),
            None => ifname.unwrap_or_else(default_ifname),
        };
        Ok(Some(Plan {
            parsed,
            ns,
            netns: id,
            existing,
            held,
            cid,
            name,
            target: target.to_string(),
            host_ifname,
            ifname,
            adopt,
        }))
    }

    /// The filter rules and the veth pair, in the order that never lets a
    /// container send from an address it was not given; undone on failure
    /// (addresses released). Returns the container side's MAC.
    async fn make_port(
        &mut self,
        plan: &Plan,
        aid: &str,
        wanted: &[IpNet],
        taken: &[Ipv4Net],
    ) -> Result<String, String> {
        // Rules first: a new port is quarantined until its MAC is known; a
        // known one is allowed its new addresses before they exist.
        let mut all_v4 = v4_nets(plan.held.iter().chain(wanted));
        all_v4.dedup();
        let prior_mac = plan.existing.map(|i| self.list[i].mac.clone());
        if let Err(e) = self
            .sync_rules(Some(host::nft::Port {
                ifname: plan.host_ifname.clone(),
                mac: prior_mac,
                addrs: all_v4.clone(),
            }))
            .await
        {
            self.release_taken(aid, taken).await;
            return Err(e);
        }
        if let Some(i) = plan.existing {
            // Record the new addresses before the kernel has them: after a
            // crash in between, the allocator keeps them (the list says
            // they are in use) rather than hand out what a container holds.
            add_cidrs(&mut self.list[i], wanted);
            if let Err(e) = self.save() {
                return Err(format!("{e:#}"));
            }
        }
        if plan.adopt {
            // Docker's end must be in the container already: never a new pair.
            let there = host::container_if(&plan.ns, &plan.ifname).await;
            if !matches!(there, Ok(Some(_))) {
                self.release_taken(aid, taken).await;
                return Err(format!(
                    "attaching {}: {} is not in the container",
                    plan.target, plan.ifname
                ));
            }
        }
        let cif = match host::attach_veth(
            &self.nl,
            &plan.ns,
            BRIDGE,
            &plan.host_ifname,
            &plan.ifname,
            wanted,
            self.mtu,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                if let Some(i) = plan.existing {
                    self.list[i]
                        .cidrs
                        .retain(|c| !matches!(c, IpNet::V4(n) if taken.contains(n)));
                    let _ = self.save();
                }
                self.release_taken(aid, taken).await;
                let _ = self.sync_rules(None).await;
                return Err(format!("attaching {}: {e}", plan.target));
            }
        };
        let mac = mac_string(cif.mac);
        if let Err(e) = self
            .sync_rules(Some(host::nft::Port {
                ifname: plan.host_ifname.clone(),
                mac: Some(mac.clone()),
                addrs: all_v4,
            }))
            .await
        {
            // Quarantined and useless: undo the attachment entirely.
            let _ = self.nl.delete_link(&plan.host_ifname).await;
            self.release_taken(aid, taken).await;
            let _ = self.sync_rules(None).await;
            return Err(format!("attaching {}: {e}", plan.target));
        }
        Ok(mac)
    }

    /// An attach that failed after [`Manager::make_port`]: a new container's
    /// port, addresses, name and rules go again (and its entry, if
    /// [`Manager::record`] made one); an attached one keeps what it had
    /// (its new addresses stay recorded, and the reconciliation of a
    /// restart settles them).
    async fn undo_port(&mut self, plan: &Plan, aid: &str, taken: &[Ipv4Net]) {
        if plan.existing.is_some() {
            return;
        }
        if let Some(i) = self.list.iter().position(|a| a.netns == plan.netns) {
            self.list.remove(i);
        }
        let _ = self.nl.delete_link(&plan.host_ifname).await;
        self.release_taken(aid, taken).await;
        self.names(names::Cmd::Remove {
            container: aid.to_string(),
            addrs: Vec::new(),
            name: None,
            reply: None,
        })
        .await;
        let _ = self.sync_rules(None).await;
    }

    /// The container's DNS name (`--name`, else its own hostname when it
    /// has a UTS namespace of its own) for all its addresses, on disk when
    /// this returns. Only a failure to save it is an error (a new
    /// container is then not attached); a name the table refuses is
    /// logged and the attach goes on without it.
    async fn add_name(&self, plan: &Plan, aid: &str, wanted: &[IpNet]) -> Result<(), String> {
        let dns_name = plan.name.clone().or_else(|| {
            plan.target
                .parse::<u32>()
                .ok()
                .and_then(host::hostname_of)
                .filter(|h| mesh_proto::names::normalize_name(h).is_ok())
        });
        let Some(name) = dns_name else {
            return Ok(());
        };
        let mut addrs: Vec<Ipv4Addr> = v4_nets(plan.held.iter().chain(wanted))
            .iter()
            .map(|n| n.addr())
            .collect();
        addrs.dedup();
        let (reply, rx) = oneshot::channel();
        self.names(names::Cmd::Add {
            container: aid.to_string(),
            addrs,
            name,
            reply: Some(reply),
        })
        .await;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if e.starts_with(names::SAVE_FAILED) => {
                if plan.existing.is_some() {
                    // Attached already: its port stays; the name is kept
                    // in the table and saved when the disk allows.
                    warn!(container = %plan.cid, "{e}");
                    Ok(())
                } else {
                    Err(e)
                }
            }
            Ok(Err(e)) => {
                warn!(container = %plan.cid, "{e}");
                Ok(())
            }
            Err(_) => Err("the daemon is shutting down".to_string()),
        }
    }

    /// Record the attachment in the list, saved; returns it.
    fn record(&mut self, plan: &Plan, wanted: &[IpNet], mac: String) -> Result<Attachment, String> {
        match plan.existing {
            Some(i) => {
                let a = &mut self.list[i];
                add_cidrs(a, wanted);
                a.mac = mac;
                if plan.name.is_some() {
                    a.id = plan.cid.clone();
                    a.name = plan.name.clone();
                }
            }
            None => self.list.push(Attachment {
                id: plan.cid.clone(),
                name: plan.name.clone(),
                target: plan.target.clone(),
                netns: plan.netns,
                host_ifname: plan.host_ifname.clone(),
                ifname: plan.ifname.clone(),
                mac,
                cidrs: wanted.to_vec(),
            }),
        }
        if let Err(e) = self.save() {
            // The interface exists but would be forgotten at restart: the
            // caller takes it down again rather than leave a half-recorded
            // container.
            warn!("saving the container list: {e:#}");
            return Err(format!("could not save the container list: {e:#}"));
        }
        Ok(self.list[plan.existing.unwrap_or(self.list.len() - 1)].clone())
    }

    /// What an attached container gets besides its interface and name:
    /// the DNS server in its namespace, a default route via an exposed
    /// host.
    async fn after_attach(&mut self, plan: &Plan, a: &Attachment) {
        if !self.servers.contains_key(&a.host_ifname) {
            self.start_dns(&a.host_ifname, &plan.ns).await;
        }
        if let Ok(p) = a.mac.parse::<mesh_proto::name::PeerName>() {
            let (ns, ifname, v4) = (plan.ns.try_clone(), a.ifname.clone(), a.v4());
            let sent = match ns {
                Ok(ns) => {
                    tokio::task::spawn_blocking(move || host::announce(&ns, &ifname, p.0, &v4))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()))
                }
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = sent {
                debug!(container = %a.id, "gratuitous ARP: {e}");
            }
        }
        if let Some(gw) = self.gateway_for(a) {
            match Netlink::in_netns(&plan.ns).await {
                Ok(cnl) => {
                    if let Err(e) = host::add_default_route(&cnl, gw).await {
                        warn!(container = %a.id, "default route via {gw}: {e}");
                    }
                }
                Err(e) => warn!(container = %a.id, "default route via {gw}: {e}"),
            }
        }
    }

    async fn detach(&mut self, addrs: &[String], target: &str) -> Result<(), String> {
        let mut release = Vec::new();
        for a in addrs {
            match addr::parse(a)? {
                Addr::Ip(n) => release.push(n),
                Addr::None => {}
                other => {
                    return Err(format!(
                        "detach takes the addresses to release ({other} is not one): give ip:CIDR, or no address to release all"
                    ))
                }
            }
        }
        let opened = host::open_netns(target).ok();
        let idx = self
            .find(target)
            .ok_or_else(|| format!("no attached container matches {target}"))?;
        let all = release.is_empty();
        let a = self.list[idx].clone();
        host::detach_veth(
            &self.nl,
            opened.as_ref().map(|(f, _)| f),
            &a.host_ifname,
            &a.ifname,
            if all { &a.cidrs } else { &release },
            all,
        )
        .await
        .map_err(|e| format!("detaching {target}: {e}"))?;
        let remaining: Vec<IpNet> = if all {
            Vec::new()
        } else {
            a.cidrs
                .iter()
                .filter(|c| !release.contains(c))
                .copied()
                .collect()
        };
        if remaining.is_empty() {
            self.list.remove(idx);
        } else {
            self.list[idx].cidrs = remaining;
        }
        self.save().map_err(|e| format!("{e:#}"))?;
        if let Err(e) = self.sync_rules(None).await {
            warn!("isolation rules after detaching {}: {e}", a.id);
        }
        let aid = a.alloc_id();
        self.names(names::Cmd::Remove {
            container: aid.clone(),
            addrs: if all {
                Vec::new()
            } else {
                v4_nets(&release).iter().map(|n| n.addr()).collect()
            },
            name: None,
            reply: None,
        })
        .await;
        if !self.list.iter().any(|x| x.host_ifname == a.host_ifname) {
            self.stop_dns(&a.host_ifname);
        }
        if all {
            self.release(&aid, None).await;
        } else {
            for n in &release {
                if let IpNet::V4(n) = n {
                    self.release(&aid, Some(n.addr())).await;
                }
            }
        }
        info!(container = %a.id, "detached");
        Ok(())
    }

    /// `mesh reset`: detach every container, hide every exposed subnet.
    async fn detach_all(&mut self) -> Result<(), String> {
        self.hide(&[]).await?;
        let ids: Vec<String> = self.list.iter().map(|a| a.id.clone()).collect();
        for id in ids {
            self.detach(&[], &id).await?;
        }
        Ok(())
    }

    /// Make the isolation and NAT tables again if someone removed them (a
    /// firewall reload flushes the whole ruleset): isolation must not end
    /// silently. A missing underlay table is flagged for the fast path.
    async fn restore_rules(&mut self) {
        let Ok(tables) = host::nft::tables().await else {
            return;
        };
        let has = |t: &str| tables.iter().any(|x| x == t);
        if !has(&format!("bridge {}", host::nft::TABLE)) {
            warn!("the isolation rules were removed (nft flush ruleset?); making them again");
            host::nft::table_lost();
            if let Err(e) = self.sync_rules(None).await {
                warn!("isolation rules: {e}");
            }
        }
        if !has(&format!("inet {}", host::nft::UNDERLAY_TABLE)) {
            // The fast path owns it (if there is one): it makes it again.
            host::nft::underlay_lost();
        }
        if !self.exposed.is_empty() && !has(&format!("ip {}", host::nft::TABLE)) {
            warn!("the NAT of exposed subnets was removed; making it again");
            if let Err(e) = host::nft::sync_nat(BRIDGE, &self.exposed).await {
                warn!("NAT of exposed subnets: {e}");
            }
        }
    }

    /// Forget containers that are gone and release their addresses and
    /// names. A container is gone when its host interface is, or when its
    /// namespace was held by this daemon alone at two checks in a row: no
    /// process of it left, no mount of it. Its interface would otherwise
    /// live on, since the DNS server's sockets inside keep the namespace
    /// (and its end of the pair) alive. It is taken down here.
    async fn release_gone(&mut self) {
        self.gone_checks = self.gone_checks.wrapping_add(1);
        if !self.list.is_empty() && self.gone_checks.is_multiple_of(ORPHAN_EVERY) {
            let asked: Vec<(host::netns::NetnsId, Option<String>)> = self
                .list
                .iter()
                .map(|a| (a.netns, self.holders.get(&a.host_ifname).cloned()))
                .collect();
            // No answer (/proc unreadable) decides nothing.
            let held = match tokio::task::spawn_blocking(move || host::netns::holders(&asked)).await
            {
                Ok(Some(h)) => h,
                _ => return,
            };
            let mut orphans = std::collections::HashSet::new();
            self.holders.clear();
            for (a, h) in self.list.iter().zip(held) {
                match h {
                    Some(path) => {
                        self.holders.insert(a.host_ifname.clone(), path);
                    }
                    None => {
                        orphans.insert(a.host_ifname.clone());
                    }
                }
            }
            for ifname in orphans.intersection(&self.orphans) {
                info!(
                    interface = %ifname,
                    "the container's namespace is held by nothing but this daemon: it is gone"
                );
                if let Err(e) = self.nl.delete_link(ifname).await {
                    warn!(interface = %ifname, "removing the interface of a gone container: {e}");
                }
            }
            self.orphans = orphans;
        }
        // One dump of the host's links, not a request per container.
        let Ok(links) = self.nl.links().await else {
            return;
        };
        let present: std::collections::HashSet<&str> = links
            .iter()
            .filter_map(host::netlink::link_name_of)
            .collect();
        let gone: Vec<usize> = (0..self.list.len())
            .filter(|&i| !present.contains(self.list[i].host_ifname.as_str()))
            .collect();
        if gone.is_empty() {
            return;
        }
        for i in gone.into_iter().rev() {
            let a = self.list.remove(i);
            info!(container = %a.id, "container gone: addresses and names released");
            self.release(&a.alloc_id(), None).await;
            self.stop_dns(&a.host_ifname);
            self.names(names::Cmd::Remove {
                container: a.alloc_id(),
                addrs: Vec::new(),
                name: None,
                reply: None,
            })
            .await;
        }
        if let Err(e) = self.save() {
            warn!("saving the container list: {e:#}");
        }
        if let Err(e) = self.sync_rules(None).await {
            warn!("isolation rules: {e}");
        }
    }
}
