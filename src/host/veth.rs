//! Attaching containers: a veth pair with its host end on the bridge and its
//! other end (`ethmesh`) inside the container's network namespace, carrying
//! the container's addresses.
//!
//! Invariants: the pair is created in one RTM_NEWLINK, with the container
//! end born directly inside the container's namespace under its final name
//! (no temporary name, no move, so no window where a half-made interface is
//! visible in the daemon's namespace). Anything that fails after creation
//! deletes the host end, which removes the whole pair. IPv6 link-local
//! addresses, which the kernel adds by itself, are never reported nor
//! counted as "remaining".

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};

use super::error::{check_ifname, netlink_errno, HostError};
use super::netlink::Netlink;
use super::netlink::{link_mac_of, link_name_of};

/// The container-facing result of an attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerIf {
    /// Name of the veth end on the host's bridge.
    pub host_ifname: String,
    /// MAC of the container-side interface.
    pub mac: [u8; 6],
}

/// Attach a container: a veth pair whose host end `host_ifname` (MTU `mtu`,
/// up) is a port of `bridge`, and whose other end is created inside `ns` as
/// `ifname` with MTU `mtu`, the addresses `addrs` (the kernel adds each
/// subnet's route), and up, together with `lo`.
///
/// If `ifname` already exists in `ns` (the same container attached again),
/// only the missing addresses are added. A stale host end of the same name
/// (left by a crash, whose container end is gone) is replaced. On failure
/// part-way, the pair is removed.
pub async fn attach_veth(
    host: &Netlink,
    ns: &File,
    bridge: &str,
    host_ifname: &str,
    ifname: &str,
    addrs: &[IpNet],
    mtu: u32,
) -> Result<ContainerIf, HostError> {
    check_ifname(host_ifname)?;
    check_ifname(ifname)?;
    let cnl = Netlink::in_netns(ns).await?;
    if let Some(link) = cnl.link(ifname).await? {
        let index = link.header.index;
        add_missing_addrs(&cnl, index, ifname, addrs).await?;
        cnl.set_up(index).await?;
        let mac = link_mac_of(&link)
            .ok_or_else(|| HostError::NoSuchLink(format!("{ifname} (no MAC address)")))?;
        tracing::debug!(
            host_ifname,
            ifname,
            "container already attached; added missing addresses"
        );
        return Ok(ContainerIf {
            host_ifname: host_ifname.to_string(),
            mac,
        });
    }
    let bridge_index = host
        .link_index(bridge)
        .await?
        .ok_or_else(|| HostError::NoSuchLink(bridge.to_string()))?;
    if host.link_index(host_ifname).await?.is_some() {
        tracing::warn!(host_ifname, "replacing stale host end of a veth");
        host.delete_link(host_ifname).await?;
    }

    add_veth(host, host_ifname, ifname, mtu, bridge_index, Some(ns)).await?;

    match configure_container_end(&cnl, ifname, addrs).await {
        Ok(mac) => {
            tracing::info!(host_ifname, ifname, bridge, "attached container veth");
            Ok(ContainerIf {
                host_ifname: host_ifname.to_string(),
                mac,
            })
        }
        Err(e) => {
            if let Err(e2) = host.delete_link(host_ifname).await {
                tracing::warn!(host_ifname, error = %e2, "cleanup after failed attach");
            }
            Err(e)
        }
    }
}

/// Create a veth pair: `host_ifname` up on the bridge `bridge_index`, its
/// peer `peer_ifname` in `peer_ns` (or here), both with `mtu`.
async fn add_veth(
    host: &Netlink,
    host_ifname: &str,
    peer_ifname: &str,
    mtu: u32,
    bridge_index: u32,
    peer_ns: Option<&File>,
) -> Result<(), HostError> {
    // TSO super-frames a little under 64 KB, so that one, cut into sleeve
    // segments with their headers, fits a single UDP GSO send.
    let gso = LinkAttribute::GsoMaxSize(mesh_proto::sleeve::CONTAINER_GSO_MAX_SIZE);
    let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer_ifname.to_string())
        .mtu(mtu);
    if let Some(ns) = peer_ns {
        peer = peer.setns_by_fd(ns.as_raw_fd());
    }
    let mut peer = peer.build();
    peer.attributes.push(gso.clone());
    let mut msg = LinkMessageBuilder::<LinkVeth>::new(host_ifname, peer_ifname)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .mtu(mtu)
        .controller(bridge_index)
        .up()
        .build();
    msg.attributes.push(gso);
    host.handle()
        .link()
        .add(msg)
        .execute()
        .await
        .map_err(|e| HostError::netlink(format!("create veth {host_ifname}/{peer_ifname}"), e))
}

/// A veth pair whose two ends stay in the host's namespace: `host_ifname`
/// up on `bridge`, `peer_ifname` down, for another to move into a container
/// (the Docker plugin's, which Docker moves into the container's sandbox
/// and configures itself). Returns the peer's MAC.
pub async fn make_veth_pair(
    host: &Netlink,
    bridge: &str,
    host_ifname: &str,
    peer_ifname: &str,
    mtu: u32,
) -> Result<[u8; 6], HostError> {
    check_ifname(host_ifname)?;
    check_ifname(peer_ifname)?;
    let bridge_index = host
        .link_index(bridge)
        .await?
        .ok_or_else(|| HostError::NoSuchLink(bridge.to_string()))?;
    for stale in [host_ifname, peer_ifname] {
        if host.link_index(stale).await?.is_some() {
            tracing::warn!(link = stale, "replacing a stale veth end");
            host.delete_link(stale).await?;
        }
    }
    add_veth(host, host_ifname, peer_ifname, mtu, bridge_index, None).await?;
    match host.link_mac(peer_ifname).await {
        Ok(mac) => Ok(mac),
        Err(e) => {
            let _ = host.delete_link(host_ifname).await;
            Err(e)
        }
    }
}

/// A packet socket (`AF_PACKET`) of `kind` (`SOCK_DGRAM`, with flags)
/// for ethertype `proto` (network order; 0 for none), close-on-exec.
pub fn packet_socket(kind: libc::c_int, proto: u16) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            kind | libc::SOCK_CLOEXEC,
            libc::c_int::from(proto),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and own exclusively.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A gratuitous ARP (an ARP request for one's own address) as sent by
/// `mac` holding `ip`: the payload after the Ethernet header.
pub fn garp_payload(mac: [u8; 6], ip: std::net::Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&ip.octets());
    p[24..28].copy_from_slice(&ip.octets());
    p
}

/// Tell the neighbours a container's (new) MAC: one gratuitous ARP per
/// IPv4 address, broadcast from `ifname` inside `ns`. A container that
/// comes back with its address on a new interface (a restart, a Docker
/// stop and start) is otherwise unreachable from those that knew it until
/// their ARP entries go stale, up to a minute.
pub fn announce(
    ns: &File,
    ifname: &str,
    mac: [u8; 6],
    addrs: &[std::net::Ipv4Addr],
) -> Result<(), HostError> {
    let ifname = ifname.to_string();
    let addrs = addrs.to_vec();
    super::netns::run_in_netns(ns, move || -> std::io::Result<()> {
        let index = nix::net::if_::if_nametoindex(ifname.as_str())?;
        let proto = 0x0806u16.to_be();
        // Protocol 0: it sends, and receives nothing.
        let fd = packet_socket(libc::SOCK_DGRAM, 0)?;
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = index as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        for ip in addrs {
            let p = garp_payload(mac, ip);
            // SAFETY: `p` is valid for reads of its length, `sa` is a
            // valid sockaddr_ll and the length passed is its size.
            let r = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    p.as_ptr() as *const libc::c_void,
                    p.len(),
                    0,
                    &sa as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // Closing a packet socket waits for an RCU grace period
        // (`synchronize_net`), several milliseconds: most of an attach's
        // time once it was otherwise done. What was sent is sent; the
        // socket is closed on a thread of its own.
        let closing = std::thread::Builder::new()
            .name("mesh-close".into())
            .spawn(move || drop(fd));
        if let Err(e) = closing {
            tracing::debug!("closing the ARP socket on this thread: {e}");
        }
        Ok(())
    })?
    .map_err(|e| HostError::io("gratuitous ARP", e))
}

/// The name of the link with MAC `mac` in `ns`, if any.
pub async fn link_with_mac(ns: &File, mac: [u8; 6]) -> Result<Option<String>, HostError> {
    let cnl = Netlink::in_netns(ns).await?;
    Ok(cnl
        .links()
        .await?
        .iter()
        .find(|l| link_mac_of(l) == Some(mac))
        .and_then(|l| link_name_of(l).map(str::to_string)))
}

async fn configure_container_end(
    cnl: &Netlink,
    ifname: &str,
    addrs: &[IpNet],
) -> Result<[u8; 6], HostError> {
    let link = cnl
        .link(ifname)
        .await?
        .ok_or_else(|| HostError::NoSuchLink(ifname.to_string()))?;
    let index = link.header.index;
    add_missing_addrs(cnl, index, ifname, addrs).await?;
    let lo = cnl
        .link_index("lo")
        .await?
        .ok_or_else(|| HostError::NoSuchLink("lo".into()))?;
    cnl.set_up(lo).await?;
    cnl.set_up(index).await?;
    link_mac_of(&link).ok_or_else(|| HostError::NoSuchLink(format!("{ifname} (no MAC address)")))
}

async fn add_missing_addrs(
    cnl: &Netlink,
    index: u32,
    ifname: &str,
    addrs: &[IpNet],
) -> Result<(), HostError> {
    let present: Vec<IpNet> = link_addrs(cnl, index)
        .await?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for a in addrs {
        if present.contains(a) {
            continue;
        }
        match cnl
            .handle()
            .address()
            .add(index, a.addr(), a.prefix_len())
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(HostError::netlink(
                    format!("add address {a} to {ifname}"),
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// Addresses of link `index` (without IPv6 link-local ones), each with the
/// kernel's message for deleting it.
async fn link_addrs(cnl: &Netlink, index: u32) -> Result<Vec<(IpNet, AddressMessage)>, HostError> {
    let msgs: Vec<AddressMessage> = cnl
        .dump(format!("dump addresses of link {index}"), |h| {
            h.address().get().set_link_index_filter(index).execute()
        })
        .await?;
    let mut out = Vec::new();
    for m in msgs {
        let mut local = None;
        let mut address = None;
        for a in &m.attributes {
            match a {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        // IPv4 carries the interface's own address in IFA_LOCAL (IFA_ADDRESS
        // is the peer on point-to-point links); IPv6 only has IFA_ADDRESS.
        let Some(ip) = local.or(address) else {
            continue;
        };
        if let IpAddr::V6(v6) = ip {
            if v6.is_unicast_link_local() {
                continue;
            }
        }
        if let Ok(net) = IpNet::new(ip, m.header.prefix_len) {
            out.push((net, m));
        }
    }
    Ok(out)
}

/// Remove `addrs` from the container interface `ifname`; when `all`, or
/// when no address remains, delete the veth pair (through its host end).
/// `ns` is None when the container's namespace is already gone. Ok if
/// everything is already gone.
pub async fn detach_veth(
    host: &Netlink,
    ns: Option<&File>,
    host_ifname: &str,
    ifname: &str,
    addrs: &[IpNet],
    all: bool,
) -> Result<(), HostError> {
    check_ifname(host_ifname)?;
    check_ifname(ifname)?;
    let cnl = match ns {
        Some(ns) => Some(Netlink::in_netns(ns).await?),
        None => None,
    };
    if let (false, Some(cnl)) = (all, &cnl) {
        if let Some(index) = cnl.link_index(ifname).await? {
            let mut remaining = 0;
            for (net, msg) in link_addrs(cnl, index).await? {
                if !addrs.contains(&net) {
                    remaining += 1;
                    continue;
                }
                match cnl.handle().address().del(msg).execute().await {
                    Ok(()) => {}
                    Err(e) if netlink_errno(&e) == Some(libc::EADDRNOTAVAIL) => {}
                    Err(e) => {
                        return Err(HostError::netlink(
                            format!("delete address {net} from {ifname}"),
                            e,
                        ))
                    }
                }
            }
            if remaining > 0 {
                tracing::debug!(ifname, remaining, "removed addresses, interface kept");
                return Ok(());
            }
        }
    }
    host.delete_link(host_ifname).await?;
    if let Some(cnl) = &cnl {
        // Normally gone with its peer; covers a host end that was elsewhere.
        cnl.delete_link(ifname).await?;
    }
    tracing::info!(host_ifname, ifname, "detached container veth");
    Ok(())
}

/// Add `addrs` to the link `ifname` of `nl`'s namespace (those missing).
pub async fn add_addrs(nl: &Netlink, ifname: &str, addrs: &[IpNet]) -> Result<(), HostError> {
    let index = nl
        .link_index(ifname)
        .await?
        .ok_or_else(|| HostError::NoSuchLink(ifname.to_string()))?;
    add_missing_addrs(nl, index, ifname, addrs).await
}

/// Remove `addrs` from the link `ifname` (Ok if absent).
pub async fn del_addrs(nl: &Netlink, ifname: &str, addrs: &[IpNet]) -> Result<(), HostError> {
    let Some(index) = nl.link_index(ifname).await? else {
        return Ok(());
    };
    for (net, msg) in link_addrs(nl, index).await? {
        if !addrs.contains(&net) {
            continue;
        }
        match nl.handle().address().del(msg).execute().await {
            Ok(()) => {}
            Err(e) if netlink_errno(&e) == Some(libc::EADDRNOTAVAIL) => {}
            Err(e) => {
                return Err(HostError::netlink(
                    format!("delete address {net} from {ifname}"),
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// Set a default route via `gateway` in the namespace of `nl`, unless one
/// exists. Returns whether it was added.
pub async fn add_default_route(
    nl: &Netlink,
    gateway: std::net::Ipv4Addr,
) -> Result<bool, HostError> {
    use rtnetlink::RouteMessageBuilder;
    let msg = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
        .gateway(gateway)
        .build();
    match nl.handle().route().add(msg).execute().await {
        Ok(()) => Ok(true),
        Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(HostError::netlink(
            format!("add default route via {gateway}"),
            e,
        )),
    }
}

/// Remove the default route via `gateway` (Ok if absent).
pub async fn del_default_route(nl: &Netlink, gateway: std::net::Ipv4Addr) -> Result<(), HostError> {
    use rtnetlink::RouteMessageBuilder;
    let msg = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
        .gateway(gateway)
        .build();
    match nl.handle().route().del(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(netlink_errno(&e), Some(libc::ESRCH) | Some(libc::ENOENT)) => Ok(()),
        Err(e) => Err(HostError::netlink(
            format!("delete default route via {gateway}"),
            e,
        )),
    }
}

/// Addresses currently on `ifname` inside `ns` (IPv6 link-local excluded),
/// and its MAC; None if there is no such link.
pub async fn container_if(
    ns: &File,
    ifname: &str,
) -> Result<Option<(Vec<IpNet>, [u8; 6])>, HostError> {
    let cnl = Netlink::in_netns(ns).await?;
    let Some(link) = cnl.link(ifname).await? else {
        return Ok(None);
    };
    let mac = link_mac_of(&link)
        .ok_or_else(|| HostError::NoSuchLink(format!("{ifname} (no MAC address)")))?;
    let addrs = link_addrs(&cnl, link.header.index)
        .await?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    Ok(Some((addrs, mac)))
}

#[cfg(test)]
#[path = "veth_tests.rs"]
mod tests;
