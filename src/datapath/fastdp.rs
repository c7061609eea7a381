//! The kernel VXLAN fast path ("fastdp"): one task that owns the `vxmesh`
//! device's forwarding state, probes each fast-path peer and falls back to
//! the sleeve when the path fails.
//!
//! # Design
//!
//! The bridge `mesh` has two overlay ports: the sleeve's TAP `meshtap` and
//! the VXLAN device `vxmesh` (UDP 6784, `nolearning`, MTU = underlay − 50).
//! Both are *isolated* bridge ports, so the bridge never forwards a frame
//! from one overlay to the other: relaying between peers is the sleeve's
//! job alone. A frame leaves a host by exactly one path:
//!
//! - **Known unicast to a fast-path peer's MAC** goes to `vxmesh` only: the
//!   daemon programs, per MAC behind peer P, a static sticky bridge FDB
//!   entry on `vxmesh` and a VXLAN FDB entry `dst P`. The bridge therefore
//!   never floods it and the sleeve never sees it.
//! - **Broadcast, multicast and unknown unicast** go to the sleeve only. The
//!   VXLAN device has no all-zeros (default) entry, so whatever the bridge
//!   floods to `vxmesh` is dropped there, and the sleeve floods along the
//!   mesh's broadcast tree as before, relaying through third peers. This
//!   replaces `bridge fdb append 00:00:00:00:00:00 ... dst P` deliberately:
//!   head-end replication to every fast-path peer could not follow the
//!   broadcast tree (peers beyond the connection limit are reached by
//!   relaying), and flooding both ways would deliver some frames twice.
//!   Broadcasts are few (ARP, DHCP); the bulk is unicast.
//! - Frames from a sleeve-only peer, and relayed frames, stay on the sleeve:
//!   only direct fast-path peers' MACs are ever programmed.
//!
//! Which MACs live behind P? P tells us, in its probes: paced by
//! [`mesh_proto::fastdp::PACE`] (every 500 ms until the path is up both
//! ways, every 20 s while it is, and at once to every peer when the local
//! MACs change, which are read every 2 s) each daemon sends each
//! fast-path peer a probe *through VXLAN* (built in userspace, sent to the peer's UDP
//! 6784, decapsulated by the peer's kernel onto its bridge and read there by
//! a packet socket for ethertype 0x88B5) listing its local MACs (those its
//! bridge learned on container ports, and the bridge's own). Probes are
//! tagged with a key exchanged in the encrypted control handshake, so only
//! a connected peer can program our FDB. A probe arriving proves the path
//! works one way; its `hears_you` flag proves the other. When probes stop
//! for [`mesh_proto::fastdp::DEAD_AFTER`] (UDP 6784 blocked, say) or the
//! peer stops hearing us, P's entries are removed (only P's: never a global
//! flush), its unicast then floods to the TAP and the sleeve carries it;
//! when probes flow both ways again, the entries come back.
//!
//! Use is decided per connection in the control handshake: each side
//! offers the fast path in its `Intro` when it has the device and either
//! has no password or has the peer's address in `--trusted-subnets`; the
//! fast path is used when both offer.

use crate::api;
use crate::host::{self, Netlink};
use crate::peer::Me;
use mesh_proto::control::FastdpOffer;
use mesh_proto::fastdp::{self, Health, Probe, ProbeKey, Verdict};
use mesh_proto::name::PeerName;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// The fast path's VXLAN device.
pub const DEVICE: &str = "vxmesh";
/// Its UDP port with the default `--port` (the fast path uses `--port` + 1).
pub const PORT: u16 = 6784;
/// Its VXLAN network identifier.
pub const VNI: u32 = 0x6d_65_73; // "mes"

use crate::peer::FastdpLocal as Local;

/// The overlay a connection uses, for `mesh status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// The fast path, or the sleeve.
    pub overlay: api::Overlay,
    /// Why, when it is the sleeve.
    pub reason: Option<String>,
}

/// The fast path negotiated for one connection.
#[derive(Debug, Clone)]
pub struct Agreed {
    /// Our probe key for this connection.
    pub our_key: ProbeKey,
    /// The peer's offer.
    pub theirs: FastdpOffer,
}

/// Our offer to a peer at `peer_ip`, or why there is none.
pub fn offer(me: &Me, peer_ip: IpAddr) -> Result<FastdpOffer, String> {
    let Some(local) = &me.fastdp else {
        return Err("fast path disabled here (--no-fastdp or no device)".into());
    };
    if me.psk.is_some() {
        let trusted = match peer_ip {
            IpAddr::V4(ip) => me.trusted.iter().any(|n| n.contains(&ip)),
            IpAddr::V6(_) => false,
        };
        if !trusted {
            return Err("password set and peer not in --trusted-subnets".into());
        }
    }
    let mut probe_key = [0u8; 16];
    getrandom::fill(&mut probe_key).map_err(|e| format!("no randomness: {e}"))?;
    Ok(FastdpOffer {
        vni: local.vni,
        port: local.port,
        mac: local.mac,
        probe_key,
    })
}

/// Both offers → the fast path for this connection, or why not.
pub fn negotiate(
    ours: &Result<FastdpOffer, String>,
    theirs: Option<&FastdpOffer>,
    peer_ip: IpAddr,
) -> Result<Agreed, String> {
    let ours = ours.as_ref().map_err(Clone::clone)?;
    let Some(theirs) = theirs else {
        return Err("the peer does not offer the fast path".into());
    };
    if theirs.vni != ours.vni {
        return Err(format!(
            "VXLAN id mismatch: ours {}, the peer's {}",
            ours.vni, theirs.vni
        ));
    }
    if !peer_ip.is_ipv4() {
        return Err("fast path over IPv6 not supported".into());
    }
    Ok(Agreed {
        our_key: ours.probe_key,
        theirs: theirs.clone(),
    })
}

/// Commands to the fast-path task.
#[derive(Debug)]
pub enum Cmd {
    /// A connection was established.
    PeerUp {
        /// The peer.
        name: PeerName,
        /// Its underlay address.
        ip: IpAddr,
        /// The negotiated fast path, or why the sleeve is used.
        agreed: Result<Agreed, String>,
    },
    /// The connection to this peer is gone.
    PeerDown {
        /// The peer.
        name: PeerName,
    },
    /// Which overlay each connected peer uses.
    Status(oneshot::Sender<HashMap<PeerName, Overlay>>),
}

struct Peer {
    ip: Ipv4Addr,
    port: u16,
    mac: [u8; 6],
    our_key: ProbeKey,
    their_key: ProbeKey,
    health: Health,
    /// MACs the peer announced last.
    announced: BTreeSet<[u8; 6]>,
    /// MACs programmed towards this peer (only while `up`).
    programmed: BTreeSet<[u8; 6]>,
    up: bool,
}

/// A connected peer: on the fast path (maybe not up), or on the sleeve.
enum Conn {
    Fast(Box<Peer>),
    Sleeve(String),
}

struct Fastdp {
    me: PeerName,
    dev: Ports,
    conns: HashMap<PeerName, Conn>,
    /// MAC → the peer whose entry currently holds it.
    owner: HashMap<[u8; 6], PeerName>,
    local_macs: Vec<[u8; 6]>,
    /// Ticks so far (the local MACs are read every fourth one).
    ticks: u64,
    /// The fast-path peers changed since the port filter last admitted
    /// them: admitted at the next tick, one `nft` run for a burst of
    /// connections (a daemon joining a mesh of 100 gets 99 at once).
    admit_due: bool,
    out: Vec<u8>,
}

/// Everything set up at start: the device and the sockets.
pub struct Device {
    ports: Ports,
    rx: AsyncFd<OwnedFd>,
}

/// The device and the bridge's ports the fast path works with.
struct Ports {
    nl: Netlink,
    local: Local,
    vx_index: u32,
    bridge_index: u32,
    overlay_ports: Vec<u32>,
}

impl Device {
    /// Our side of the offer.
    pub fn local(&self) -> Local {
        self.ports.local.clone()
    }
}

/// Create the VXLAN device on `bridge` (UDP `port`, MTU = underlay − 50),
/// make it and the TAP `tap` isolated overlay ports, and open the probe
/// sockets.
pub async fn setup(
    nl: &Netlink,
    bridge: &str,
    tap: &str,
    underlay_mtu: u32,
    port: u16,
) -> anyhow::Result<Device> {
    use anyhow::Context;
    let mtu = underlay_mtu
        .saturating_sub(fastdp::VXLAN_OVERHEAD_V4)
        .max(576);
    let vx_index = host::vxlan::ensure_vxlan(nl, DEVICE, VNI, port, mtu, bridge).await?;
    let bridge_index = nl
        .link_index(bridge)
        .await?
        .with_context(|| format!("no bridge {bridge}"))?;
    let tap_index = nl
        .link_index(tap)
        .await?
        .with_context(|| format!("no TAP {tap}"))?;
    // The TAP keeps learning (sleeve peers' MACs), but never forwards to
    // the VXLAN port or back.
    host::vxlan::set_overlay_port(nl, tap_index, true).await?;
    // Probes are addressed to the bridge's MAC (pinned when the bridge was
    // made, so it does not change as containers come and go).
    let mac = nl.link_mac(bridge).await?;
    // Until a peer is connected, no one may send to the VXLAN port.
    host::nft::make_underlay(port)
        .await
        .map_err(anyhow::Error::msg)
        .context("guarding the fast path's port")?;
    let rx = packet_socket(bridge_index).context("opening the probe packet socket")?;
    Ok(Device {
        ports: Ports {
            nl: nl.clone(),
            local: Local {
                vni: VNI,
                port,
                mac,
            },
            vx_index,
            bridge_index,
            overlay_ports: vec![vx_index, tap_index],
        },
        rx,
    })
}

/// A non-blocking packet socket receiving ethertype 0x88B5 frames
/// delivered to the bridge itself (probes addressed to its MAC).
fn packet_socket(ifindex: u32) -> std::io::Result<AsyncFd<OwnedFd>> {
    let proto = fastdp::ETHERTYPE.to_be();
    let fd = crate::host::packet_socket(libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, proto)?;
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = proto;
    sa.sll_ifindex = ifindex as i32;
    // SAFETY: `sa` is a valid sockaddr_ll and the length passed is its size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: we own `fd` (moved in), and nothing else registers or uses
    // it while the AsyncFd lives; it is closed only when the AsyncFd drops.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn recv_probe(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Run the fast path until the command channel closes. Removes every
/// entry it programmed on the way out.
pub async fn run(me: PeerName, dev: Device, mut rx: mpsc::Receiver<Cmd>) {
    let Device { ports, rx: sock } = dev;
    let mut f = Fastdp {
        me,
        dev: ports,
        conns: HashMap::new(),
        owner: HashMap::new(),
        local_macs: Vec::new(),
        out: Vec::with_capacity(2048),
        ticks: 0,
        admit_due: false,
    };
    let mut tick = tokio::time::interval(fastdp::PACE.fast);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => break,
                Some(c) => f.command(c).await,
            },
            _ = tick.tick() => f.tick().await,
            r = sock.readable() => {
                let Ok(mut guard) = r else { break };
                match guard.try_io(|fd| recv_probe(fd, &mut buf)) {
                    Ok(Ok(n)) => f.on_probe(&buf[..n]).await,
                    Ok(Err(e)) => debug!("probe socket: {e}"),
                    Err(_would_block) => {}
                }
            }
        }
    }
    let names: Vec<PeerName> = f.conns.keys().copied().collect();
    for p in names {
        f.set_down(p, "shutting down").await;
    }
}

impl Fastdp {
    /// The peer `name`, if it is on the fast path.
    fn fast(&self, name: &PeerName) -> Option<&Peer> {
        match self.conns.get(name) {
            Some(Conn::Fast(p)) => Some(p),
            _ => None,
        }
    }

    fn fast_mut(&mut self, name: &PeerName) -> Option<&mut Peer> {
        match self.conns.get_mut(name) {
            Some(Conn::Fast(p)) => Some(p),
            _ => None,
        }
    }

    async fn command(&mut self, c: Cmd) {
        match c {
            Cmd::PeerUp { name, ip, agreed } => {
                self.set_down(name, "connection replaced").await;
                let conn = match (agreed, ip) {
                    (Ok(a), IpAddr::V4(ip)) => {
                        info!(peer = %name, %ip, "fast path negotiated; probing");
                        Conn::Fast(Box::new(Peer {
                            ip,
                            port: a.theirs.port,
                            mac: a.theirs.mac,
                            our_key: a.our_key,
                            their_key: a.theirs.probe_key,
                            health: Health::new(self.me < name),
                            announced: BTreeSet::new(),
                            programmed: BTreeSet::new(),
                            up: false,
                        }))
                    }
                    (Ok(_), IpAddr::V6(_)) => Conn::Sleeve("IPv6 underlay".into()),
                    (Err(reason), _) => Conn::Sleeve(reason),
                };
                self.conns.insert(name, conn);
                self.admit_due = true;
                self.send_probe(name).await;
            }
            Cmd::PeerDown { name } => {
                self.set_down(name, "connection closed").await;
                self.conns.remove(&name);
                self.admit_due = true;
            }
            Cmd::Status(reply) => {
                let now = Instant::now();
                let map = self
                    .conns
                    .iter()
                    .map(|(p, c)| (*p, overlay_of(c, now, self.dev.local.port)))
                    .collect();
                let _ = reply.send(map);
            }
        }
    }

    /// Make the underlay filter again if the attach manager's check found
    /// it removed (a firewall reload): the VXLAN port must not open to
    /// everyone silently.
    async fn restore_filter(&mut self) {
        if !host::nft::take_underlay_lost() {
            return;
        }
        warn!("the fast path's port filter was removed (nft flush ruleset?); making it again");
        if let Err(e) = host::nft::make_underlay(self.dev.local.port).await {
            warn!("guarding the fast path's port: {e}");
        }
        self.admit().await;
    }

    /// Admit VXLAN datagrams from exactly the peers with a fast-path
    /// connection (see [`host::nft`]).
    async fn admit(&mut self) {
        let ips: Vec<Ipv4Addr> = self
            .conns
            .values()
            .filter_map(|c| match c {
                Conn::Fast(p) => Some(p.ip),
                Conn::Sleeve(_) => None,
            })
            .collect();
        if let Err(e) = host::nft::set_underlay_peers(&ips).await {
            warn!("admitting fast-path peers to the VXLAN port: {e}");
        }
    }

    /// Every [`fastdp::PACE`]`.fast`: the port filter if peers came or
    /// went, the local MACs (every fourth tick, 2 s: a dump of the bridge's
    /// FDB, the largest part of an idle daemon's work; a change is
    /// announced to every peer at once), then a probe to each peer whose
    /// probe is due, and each peer's entries brought in line.
    async fn tick(&mut self) {
        self.ticks += 1;
        if std::mem::take(&mut self.admit_due) {
            self.admit().await;
        }
        let mut changed = false;
        if self.ticks % 4 == 1 {
            self.restore_filter().await;
            changed = self.read_local_macs().await;
        }
        let now = Instant::now();
        let names: Vec<PeerName> = self.conns.keys().copied().collect();
        for p in names {
            let due = match self.conns.get(&p) {
                Some(Conn::Fast(peer)) => changed || peer.health.probe_due(now),
                _ => false,
            };
            if due {
                self.send_probe(p).await;
            }
            self.evaluate(p).await;
        }
    }

    /// Read the MACs behind our bridge; whether they changed.
    async fn read_local_macs(&mut self) -> bool {
        match host::vxlan::local_macs(&self.dev.nl, self.dev.bridge_index, &self.dev.overlay_ports)
            .await
        {
            Ok(mut macs) => {
                macs.push(self.dev.local.mac);
                macs.sort();
                macs.dedup();
                if macs.len() > fastdp::MAX_MACS {
                    warn!(
                        count = macs.len(),
                        max = fastdp::MAX_MACS,
                        "too many local MACs for one probe; the rest use the sleeve"
                    );
                }
                let changed = macs != self.local_macs;
                self.local_macs = macs;
                changed
            }
            Err(e) => {
                debug!("reading the bridge fdb: {e}");
                false
            }
        }
    }

    async fn send_probe(&mut self, name: PeerName) {
        let now = Instant::now();
        // The field itself, not `fast()`: `self.out` is borrowed below.
        let Some(Conn::Fast(peer)) = self.conns.get(&name) else {
            return;
        };
        let probe = Probe {
            from: self.me,
            hears_you: peer.health.hearing(now),
            macs: self.local_macs.clone(),
        };
        fastdp::emit_vxlan_probe(
            self.dev.local.vni,
            peer.mac,
            self.dev.local.mac,
            &probe,
            &peer.our_key,
            &mut self.out,
        );
        let to = SocketAddr::new(IpAddr::V4(peer.ip), peer.port);
        // From a socket connected for this one probe: a long-lived
        // unconnected one would be a UDP listener on every address (only
        // 6783 and 6784 may be), and the answer comes back through the
        // VXLAN device anyway, not to this port.
        let sent = super::udpio::connected(to).and_then(|s| {
            s.set_nonblocking(true)?;
            s.send(&self.out)
        });
        if let Err(e) = sent {
            debug!(peer = %name, "probe: {e}");
        }
        if let Some(peer) = self.fast_mut(&name) {
            peer.health.sent(now);
        }
    }

    async fn on_probe(&mut self, b: &[u8]) {
        let Ok(from) = Probe::peek_sender(b) else {
            return;
        };
        let Some(peer) = self.fast_mut(&from) else {
            return;
        };
        let probe = match Probe::parse(b, &peer.their_key) {
            Ok(p) => p,
            Err(e) => {
                debug!(peer = %from, "bad probe: {e}");
                return;
            }
        };
        let now = Instant::now();
        let was_hearing = peer.health.hearing(now);
        peer.health.handle_probe(now, probe.hears_you);
        peer.announced = probe.macs.into_iter().collect();
        if peer.health.should_answer(now, was_hearing, probe.hears_you) {
            // Tell it at once that we hear it (it need not wait a tick),
            // or answer its ping.
            self.send_probe(from).await;
        }
        self.evaluate(from).await;
    }

    /// Bring `name`'s entries in line with its health and announcements.
    async fn evaluate(&mut self, name: PeerName) {
        let now = Instant::now();
        let Some(peer) = self.fast(&name) else {
            return;
        };
        let verdict = peer.health.verdict(now);
        if verdict != Verdict::Up {
            if peer.up {
                let why = reason(verdict, self.dev.local.port, peer.port);
                warn!(peer = %name, "fast path down, using the sleeve: {why}");
                self.set_down(name, &why).await;
            }
            return;
        }
        let was_up = peer.up;
        let wanted = |m: &&[u8; 6]| m[0] & 1 == 0 && !self.local_macs.contains(m);
        if was_up
            && peer
                .announced
                .iter()
                .filter(wanted)
                .eq(peer.programmed.iter())
        {
            // Up, and what it announces is what is programmed: the common
            // case on every tick, checked without building sets.
            return;
        }
        let (ip, port) = (peer.ip, peer.port);
        let want: BTreeSet<[u8; 6]> = peer.announced.iter().filter(wanted).copied().collect();
        let have = peer.programmed.clone();
        let mut added = BTreeSet::new();
        for &mac in want.difference(&have) {
            let r = async {
                host::vxlan::vxlan_fdb_replace(&self.dev.nl, self.dev.vx_index, mac, ip, port)
                    .await?;
                host::vxlan::bridge_fdb_replace(&self.dev.nl, self.dev.vx_index, mac).await
            }
            .await;
            match r {
                Ok(()) => {
                    if let Some(old) = self.owner.insert(mac, name) {
                        if old != name {
                            if let Some(Conn::Fast(o)) = self.conns.get_mut(&old) {
                                o.programmed.remove(&mac);
                                let _ = host::vxlan::vxlan_fdb_del(
                                    &self.dev.nl,
                                    self.dev.vx_index,
                                    mac,
                                    o.ip,
                                )
                                .await;
                            }
                        }
                    }
                    added.insert(mac);
                }
                Err(e) => warn!(peer = %name, "programming the fast path: {e}"),
            }
        }
        let gone: Vec<[u8; 6]> = have.difference(&want).copied().collect();
        for &mac in &gone {
            self.remove_entry(name, mac, ip).await;
        }
        if let Some(peer) = self.fast_mut(&name) {
            peer.programmed.extend(added);
            for mac in gone {
                peer.programmed.remove(&mac);
            }
            if !was_up {
                peer.up = true;
                info!(peer = %name, macs = peer.programmed.len(), "fast path up");
            }
        }
    }

    async fn remove_entry(&mut self, name: PeerName, mac: [u8; 6], ip: Ipv4Addr) {
        let _ = host::vxlan::vxlan_fdb_del(&self.dev.nl, self.dev.vx_index, mac, ip).await;
        if self.owner.get(&mac) == Some(&name) {
            self.owner.remove(&mac);
            if let Err(e) = host::vxlan::bridge_fdb_del(&self.dev.nl, self.dev.vx_index, mac).await
            {
                debug!(peer = %name, "removing a bridge entry: {e}");
            }
        }
    }

    /// Remove every entry programmed for `name` (its traffic then floods to
    /// the sleeve). Only this peer's entries.
    async fn set_down(&mut self, name: PeerName, why: &str) {
        let Some(peer) = self.fast_mut(&name) else {
            return;
        };
        let macs = std::mem::take(&mut peer.programmed);
        let was_up = std::mem::replace(&mut peer.up, false);
        let ip = peer.ip;
        for mac in macs {
            self.remove_entry(name, mac, ip).await;
        }
        if was_up {
            debug!(peer = %name, "fast path entries removed: {why}");
        }
    }
}

/// Why a fast-path connection is not up; `ours` and `theirs` are the two
/// ends' VXLAN ports.
fn reason(v: Verdict, ours: u16, theirs: u16) -> String {
    match v {
        Verdict::Up => String::new(),
        Verdict::Waiting => "waiting for the first fast-path probe".into(),
        Verdict::NotHearing => format!(
            "no fast-path probe from the peer for {}s (is UDP {ours} blocked?)",
            fastdp::DEAD_AFTER.as_secs()
        ),
        Verdict::NotHeard => {
            format!("the peer does not receive our fast-path probes (is UDP {theirs} blocked?)")
        }
    }
}

fn overlay_of(c: &Conn, now: Instant, ours: u16) -> Overlay {
    match c {
        Conn::Sleeve(r) => Overlay {
            overlay: api::Overlay::Sleeve,
            reason: Some(r.clone()),
        },
        Conn::Fast(p) if p.up => Overlay {
            overlay: api::Overlay::Fastdp,
            reason: None,
        },
        Conn::Fast(p) => Overlay {
            overlay: api::Overlay::Sleeve,
            reason: Some(reason(p.health.verdict(now), ours, p.port)),
        },
    }
}
