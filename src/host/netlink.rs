//! The [`Netlink`] handle: an rtnetlink connection bound to one network
//! namespace, with the link operations the daemon needs (bridge, lookups,
//! deletion, underlay MTU).
//!
//! Invariant: a `Netlink` always knows which namespace its socket lives in
//! (it keeps that namespace open), so code that must create a kernel object
//! by other means than netlink (the TAP) can do so in the same namespace.
//! The connection task ends by itself when the last handle clone is dropped.
//!
//! Invariant: at most one dump is in flight per socket. The kernel runs one
//! dump at a time per netlink socket and refuses a second with `EBUSY`
//! while the first is being read, and every clone of a `Netlink` shares
//! one socket, so all dumps go through [`Netlink::dump`], which holds the
//! handle's dump lock from request to last message.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{
    BridgeStpState, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader, RouteType};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, TokioSocket};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use super::error::{check_ifname, netlink_errno, HostError};
use super::netns::{current_netns, run_in_netns, NetnsId};

const DEFAULT_MTU: u32 = 1500;

/// A netlink handle bound to one network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    ns: Arc<File>,
    ns_id: NetnsId,
    /// Held for the whole of a dump (see the module invariant).
    dump_lock: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").field("ns", &self.ns_id).finish()
    }
}

impl Netlink {
    /// Netlink in the calling thread's current namespace. Spawns the
    /// rtnetlink connection on the current tokio runtime.
    pub async fn current() -> Result<Self, HostError> {
        let (ns, ns_id) = current_netns()?;
        let socket =
            Socket::new(NETLINK_ROUTE).map_err(|e| HostError::io("create netlink socket", e))?;
        Self::spawn(socket, ns, ns_id)
    }

    /// Netlink inside the namespace referred to by `ns` (an open
    /// `/run/netns/x` or `/proc/PID/ns/net`). The socket is created on a
    /// short-lived thread that joined `ns`; the daemon's threads never move.
    pub async fn in_netns(ns: &File) -> Result<Self, HostError> {
        super::netns::check_netns_file(ns)?;
        let ns_id = super::netns::netns_id(ns).map_err(|e| HostError::io("stat netns file", e))?;
        let ns = ns
            .try_clone()
            .map_err(|e| HostError::io("dup netns fd", e))?;
        let socket = run_in_netns(&ns, || Socket::new(NETLINK_ROUTE))?
            .map_err(|e| HostError::io("create netlink socket in netns", e))?;
        Self::spawn(socket, ns, ns_id)
    }

    fn spawn(socket: Socket, ns: File, ns_id: NetnsId) -> Result<Self, HostError> {
        socket
            .set_non_blocking(true)
            .map_err(|e| HostError::io("set netlink socket non-blocking", e))?;
        let fd = socket.into_raw_fd();
        // SAFETY: `fd` is a netlink socket we own (just released from
        // `socket`), non-blocking; TokioSocket takes ownership. Its
        // registration with tokio needs a runtime, which callers of this
        // async API have.
        let tsock = unsafe { TokioSocket::from_raw_fd(fd) };
        let (conn, handle, _unsolicited) = rtnetlink::from_socket(tsock);
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            ns: Arc::new(ns),
            ns_id,
            dump_lock: Arc::default(),
        })
    }

    /// The raw rtnetlink handle, for requests this module does not wrap
    /// (routes, neighbours, vxlan).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Run the dump request that `request` makes and collect every
    /// message, one dump at a time on this socket (the module invariant).
    /// `what` names the dump in the error.
    pub async fn dump<T, S>(
        &self,
        what: impl Into<String>,
        request: impl FnOnce(&Handle) -> S,
    ) -> Result<Vec<T>, HostError>
    where
        S: futures::Stream<Item = Result<T, rtnetlink::Error>>,
    {
        let _one_at_a_time = self.dump_lock.lock().await;
        request(&self.handle)
            .try_collect()
            .await
            .map_err(|e| HostError::netlink(what, e))
    }

    /// The namespace this handle's socket lives in.
    pub fn netns(&self) -> &File {
        &self.ns
    }

    /// Identity of the namespace this handle's socket lives in.
    pub fn netns_id(&self) -> NetnsId {
        self.ns_id
    }

    /// Run `f` on a thread inside this handle's namespace (see
    /// [`run_in_netns`]).
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HostError> {
        run_in_netns(&self.ns, f)
    }

    /// The link called `name`, if it exists.
    pub async fn link(&self, name: &str) -> Result<Option<LinkMessage>, HostError> {
        check_ifname(name)?;
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(HostError::netlink(format!("get link {name}"), e)),
        }
    }

    /// The kernel's packet and byte counters of link `name`, or None if
    /// there is no such link.
    pub async fn counters(
        &self,
        name: &str,
    ) -> Result<Option<crate::metrics::DeviceCounters>, HostError> {
        Ok(self.link(name).await?.as_ref().and_then(link_counters_of))
    }

    /// All links of this namespace.
    pub async fn links(&self) -> Result<Vec<LinkMessage>, HostError> {
        self.dump("dump links", |h| h.link().get().execute()).await
    }

    /// Interface index of `name`, or None if there is no such link.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, HostError> {
        Ok(self.link(name).await?.map(|m| m.header.index))
    }

    /// The index of the link called `name`, which must exist.
    pub async fn require_index(&self, name: &str) -> Result<u32, HostError> {
        self.link_index(name)
            .await?
            .ok_or_else(|| HostError::NoSuchLink(name.to_string()))
    }

    /// Make `index` a port of the bridge `bridge_index`, with this MTU if
    /// given, and set it up if asked.
    pub async fn enslave(
        &self,
        index: u32,
        bridge_index: u32,
        mtu: Option<u32>,
        up: bool,
        what: &str,
    ) -> Result<(), HostError> {
        let mut b = rtnetlink::LinkUnspec::new_with_index(index).controller(bridge_index);
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        if up {
            b = b.up();
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(|e| HostError::netlink(what.to_string(), e))
    }

    /// MAC address of `name`.
    pub async fn link_mac(&self, name: &str) -> Result<[u8; 6], HostError> {
        let m = self
            .link(name)
            .await?
            .ok_or_else(|| HostError::NoSuchLink(name.to_string()))?;
        link_mac_of(&m).ok_or_else(|| HostError::NoSuchLink(format!("{name} (no MAC address)")))
    }

    /// Delete a link; Ok if it does not exist.
    pub async fn delete_link(&self, name: &str) -> Result<(), HostError> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => {
                tracing::debug!(link = name, "deleted link");
                Ok(())
            }
            Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(HostError::netlink(format!("delete link {name}"), e)),
        }
    }

    /// Set link `index` up.
    pub async fn set_up(&self, index: u32) -> Result<(), HostError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| HostError::netlink(format!("set link {index} up"), e))
    }

    /// Create bridge `name` if missing (idempotent), set its MTU, set it up,
    /// STP off. Returns its ifindex. Fails if `name` exists and is not a
    /// bridge.
    pub async fn ensure_bridge(&self, name: &str, mtu: u32) -> Result<u32, HostError> {
        if let Some(m) = self.link(name).await? {
            if link_kind(&m) != Some(&InfoKind::Bridge) {
                return Err(HostError::WrongKind {
                    name: name.to_string(),
                    expected: "bridge",
                });
            }
        } else {
            let msg = LinkBridge::new(name)
                .stp_state(BridgeStpState::Disabled)
                .mtu(mtu)
                .build();
            match self.handle.link().add(msg).execute().await {
                Ok(()) => tracing::info!(bridge = name, mtu, "created bridge"),
                // Lost a race with another creator: fine, configure below.
                Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(HostError::netlink(format!("create bridge {name}"), e)),
            }
        }
        let index = self
            .link_index(name)
            .await?
            .ok_or_else(|| HostError::NoSuchLink(name.to_string()))?;
        // RTM_NEWLINK without NLM_F_CREATE: changes the bridge's own
        // settings (RTM_SETLINK would ignore IFLA_LINKINFO).
        // Its MAC set to itself: a bridge whose address was never set takes
        // the lowest of its ports' and changes as ports come and go, while
        // peers address fast-path probes to it and the isolation rules
        // list it as local. Multicast snooping off: multicast is flooded
        // like broadcast, to every port and both overlays (the isolation
        // rules keep it within its subnet); with snooping, a group with a
        // local listener would stop going to the overlays.
        let mac = self.link_mac(name).await?;
        let msg = LinkMessageBuilder::<LinkBridge>::new(name)
            .index(index)
            .stp_state(BridgeStpState::Disabled)
            .mcast_snooping(false)
            .mtu(mtu)
            .address(mac.to_vec())
            .up()
            .build();
        self.handle
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(|e| HostError::netlink(format!("configure bridge {name}"), e))?;
        Ok(index)
    }

    /// MTU of the underlay: that of the device carrying the IPv4 default
    /// route (lowest metric); if there is none, the largest MTU among up,
    /// non-loopback devices that are not bridges, bridge ports that are
    /// veths, or tun/tap. Falls back to 1500.
    pub async fn underlay_mtu(&self) -> Result<u32, HostError> {
        let links = self.links().await?;
        if let Some(oif) = self.default_route_oif().await? {
            if let Some(mtu) = links
                .iter()
                .find(|l| l.header.index == oif)
                .and_then(link_mtu_of)
            {
                return Ok(mtu);
            }
        }
        let best = links
            .iter()
            .filter(|l| is_underlay_candidate(l))
            .filter_map(link_mtu_of)
            .max();
        Ok(best.unwrap_or(DEFAULT_MTU))
    }

    /// Output interface of the main table's IPv4 default route, lowest
    /// metric first; for a multipath route, its first next hop.
    async fn default_route_oif(&self) -> Result<Option<u32>, HostError> {
        let routes = self
            .dump("dump IPv4 routes", |h| {
                h.route()
                    .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                    .execute()
            })
            .await?;
        let mut best: Option<(u32, u32)> = None; // (metric, oif)
        for r in &routes {
            let h = &r.header;
            if h.destination_prefix_length != 0
                || h.table != RouteHeader::RT_TABLE_MAIN
                || h.kind != RouteType::Unicast
            {
                continue;
            }
            let mut metric = 0;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Priority(p) => metric = *p,
                    RouteAttribute::MultiPath(hops) if oif.is_none() => {
                        oif = hops.first().map(|h| h.interface_index)
                    }
                    _ => {}
                }
            }
            if let Some(oif) = oif {
                if best.is_none_or(|(m, _)| metric < m) {
                    best = Some((metric, oif));
                }
            }
        }
        Ok(best.map(|(_, oif)| oif))
    }
}

/// The `IFLA_INFO_KIND` of a link (bridge, veth, tun, ...), if any.
pub fn link_kind(m: &LinkMessage) -> Option<&InfoKind> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

/// The MAC address of a link message, if it has a 6-byte one.
pub fn link_mac_of(m: &LinkMessage) -> Option<[u8; 6]> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
        _ => None,
    })
}

/// The name of a link message.
pub fn link_name_of(m: &LinkMessage) -> Option<&str> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// The kernel's packet and byte counters of a link message (its 64-bit
/// statistics), if it carries them.
pub fn link_counters_of(m: &LinkMessage) -> Option<crate::metrics::DeviceCounters> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Stats64(s) => Some(crate::metrics::DeviceCounters {
            rx_packets: s.rx_packets,
            tx_packets: s.tx_packets,
            rx_bytes: s.rx_bytes,
            tx_bytes: s.tx_bytes,
        }),
        _ => None,
    })
}

/// The MTU of a link message.
pub fn link_mtu_of(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(v) => Some(*v),
        _ => None,
    })
}

fn link_controller_of(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(v) => Some(*v),
        _ => None,
    })
}

fn is_underlay_candidate(m: &LinkMessage) -> bool {
    let h = &m.header;
    if !h.flags.contains(LinkFlags::Up)
        || h.flags.contains(LinkFlags::Loopback)
        || h.link_layer_type == LinkLayerType::Loopback
    {
        return false;
    }
    match link_kind(m) {
        Some(InfoKind::Bridge) | Some(InfoKind::Tun) => false,
        Some(InfoKind::Veth) => link_controller_of(m).is_none(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::testutil::{ns_run, on_host, require_root, TestNet};

    #[test]
    fn ensure_bridge_is_idempotent() {
        if !require_root() {
            return;
        }
        let net = TestNet::new();
        let host = net.add_ns("h");
        on_host(&host, || async {
            let nl = Netlink::current().await.unwrap();
            assert_eq!(nl.link_index("meshbr").await.unwrap(), None);
            let a = nl.ensure_bridge("meshbr", 1400).await.unwrap();
            let b = nl.ensure_bridge("meshbr", 1376).await.unwrap();
            assert_eq!(a, b);
            let m = nl.link("meshbr").await.unwrap().unwrap();
            assert_eq!(link_mtu_of(&m), Some(1376));
            assert!(m.header.flags.contains(LinkFlags::Up));
            assert_eq!(link_kind(&m), Some(&InfoKind::Bridge));
            let mac = nl.link_mac("meshbr").await.unwrap();
            assert_eq!(mac, nl.link_mac("meshbr").await.unwrap());
            // Deleting is idempotent too.
            nl.delete_link("meshbr").await.unwrap();
            nl.delete_link("meshbr").await.unwrap();
            assert_eq!(nl.link_index("meshbr").await.unwrap(), None);
            assert!(matches!(
                nl.link_mac("meshbr").await,
                Err(HostError::NoSuchLink(_))
            ));
        });
    }

    #[test]
    fn ensure_bridge_turns_stp_off_and_rejects_non_bridge() {
        if !require_root() {
            return;
        }
        let net = TestNet::new();
        let host = net.add_ns("h");
        ns_run(
            &host,
            &[
                "ip",
                "link",
                "add",
                "br1",
                "type",
                "bridge",
                "stp_state",
                "1",
            ],
        );
        // (No dummy driver on these machines: a veth stands in.)
        ns_run(
            &host,
            &[
                "ip", "link", "add", "dum0", "type", "veth", "peer", "name", "dum1",
            ],
        );
        on_host(&host, || async {
            let nl = Netlink::current().await.unwrap();
            nl.ensure_bridge("br1", 1500).await.unwrap();
            let err = nl.ensure_bridge("dum0", 1500).await.unwrap_err();
            assert!(matches!(err, HostError::WrongKind { .. }), "{err}");
        });
        let out = ns_run(&host, &["ip", "-d", "link", "show", "br1"]);
        assert!(out.contains("stp_state 0"), "{out}");
    }

    #[test]
    fn underlay_mtu_follows_default_route() {
        if !require_root() {
            return;
        }
        let net = TestNet::new();
        let host = net.add_ns("h");
        let peer = net.add_ns("p");
        on_host(&host, || async {
            let nl = Netlink::current().await.unwrap();
            // Nothing but lo: fallback.
            assert_eq!(nl.underlay_mtu().await.unwrap(), 1500);
        });
        let peer_path = format!("/run/netns/{peer}");
        ns_run(
            &host,
            &[
                "ip", "link", "add", "up0", "mtu", "1450", "type", "veth", "peer", "name", "up0p",
                "netns", &peer_path,
            ],
        );
        ns_run(
            &host,
            &[
                "ip", "link", "add", "big0", "mtu", "9000", "type", "veth", "peer", "name", "big1",
            ],
        );
        ns_run(&host, &["ip", "link", "set", "big0", "up"]);
        on_host(&host, || async {
            let nl = Netlink::current().await.unwrap();
            // No default route: the largest candidate (unenslaved veth, 9000).
            assert_eq!(nl.underlay_mtu().await.unwrap(), 9000);
        });
        ns_run(&host, &["ip", "addr", "add", "198.18.0.1/24", "dev", "up0"]);
        ns_run(&host, &["ip", "link", "set", "up0", "up"]);
        ns_run(
            &host,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                "198.18.0.2",
                "dev",
                "up0",
                "onlink",
            ],
        );
        on_host(&host, || async {
            let nl = Netlink::current().await.unwrap();
            assert_eq!(nl.underlay_mtu().await.unwrap(), 1450);
        });
    }
}
