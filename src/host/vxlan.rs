//! The fast path's kernel objects: the `vxlan` device on the bridge, its
//! bridge-port flags, and forwarding-database (FDB) entries, all over
//! netlink.
//!
//! Two FDBs are programmed per remote MAC that lives behind a fast-path
//! peer:
//!
//! - the VXLAN device's own (`bridge fdb replace MAC dev vxmesh self dst
//!   IP port P`): where the kernel sends frames for that MAC;
//! - the bridge's (`bridge fdb replace MAC dev vxmesh master static
//!   sticky`): which port the bridge forwards frames for that MAC to. Static
//!   and sticky, so that the same MAC seen in a broadcast arriving over the
//!   sleeve's TAP does not move it.
//!
//! Entries are added and removed one by one, per peer; nothing here
//! flushes a whole table. The overlay ports (the VXLAN device and the
//! sleeve's TAP) are made *isolated* bridge ports, so the bridge never
//! forwards between them, and the VXLAN port does not learn: only what the
//! daemon programs sends traffic into the fast path.

use mesh_proto::name::mac_string as mac_str;
use std::net::{IpAddr, Ipv4Addr};

use rtnetlink::packet_route::link::InfoKind;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkBridgePort, LinkVxlan};

use super::error::{netlink_errno, HostError};
use super::netlink::link_kind;
use super::netlink::Netlink;

/// Create the VXLAN device `name` (VNI `vni`, UDP `port`, no learning, MTU
/// `mtu`) as a port of `bridge`, isolated and not learning, and set it up.
/// A link left over under that name (e.g. by a crashed daemon, with a stale
/// FDB) is deleted first. Returns its ifindex.
pub async fn ensure_vxlan(
    nl: &Netlink,
    name: &str,
    vni: u32,
    port: u16,
    mtu: u32,
    bridge: &str,
) -> Result<u32, HostError> {
    let bridge_index = nl
        .link_index(bridge)
        .await?
        .ok_or_else(|| HostError::NoSuchLink(bridge.to_string()))?;
    if let Some(m) = nl.link(name).await? {
        if link_kind(&m) != Some(&InfoKind::Vxlan) {
            tracing::warn!(link = name, "deleting a non-VXLAN link in the way");
        }
        nl.delete_link(name).await?;
    }
    let msg = LinkVxlan::new(name, vni)
        .port(port)
        .learning(false)
        .mtu(mtu)
        .build();
    nl.handle()
        .link()
        .add(msg)
        .execute()
        .await
        .map_err(|e| HostError::netlink(format!("create vxlan {name}"), e))?;
    let index = nl.require_index(name).await?;
    nl.enslave(
        index,
        bridge_index,
        None,
        false,
        &format!("enslave {name} to {bridge}"),
    )
    .await?;
    set_overlay_port(nl, index, false).await?;
    nl.set_up(index).await?;
    tracing::info!(
        vxlan = name,
        vni,
        port,
        mtu,
        bridge,
        "created fast-path device"
    );
    Ok(index)
}

/// Make bridge port `index` an isolated overlay port (never forwarded to
/// another isolated port), learning source MACs or not.
pub async fn set_overlay_port(nl: &Netlink, index: u32, learning: bool) -> Result<(), HostError> {
    nl.handle()
        .link()
        .set_port(
            LinkBridgePort::new(index)
                .isolated(true)
                .learning(learning)
                .build(),
        )
        .execute()
        .await
        .map_err(|e| HostError::netlink(format!("set bridge port flags of link {index}"), e))
}

fn fdb_message(index: u32, mac: [u8; 6], flags: NeighbourFlags) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.flags = flags;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    m
}

/// `bridge fdb replace MAC dev VX self permanent dst IP port PORT`.
pub async fn vxlan_fdb_replace(
    nl: &Netlink,
    vx_index: u32,
    mac: [u8; 6],
    dst: Ipv4Addr,
    port: u16,
) -> Result<(), HostError> {
    let mut req = nl
        .handle()
        .neighbours()
        .add_bridge(vx_index, &mac)
        .flags(NeighbourFlags::Own)
        .state(NeighbourState::Permanent)
        .destination(IpAddr::V4(dst))
        .replace();
    req.message_mut()
        .attributes
        .push(NeighbourAttribute::Port(port));
    req.execute()
        .await
        .map_err(|e| HostError::netlink(format!("vxlan fdb {} dst {dst}", mac_str(mac)), e))
}

/// `bridge fdb del MAC dev VX self dst IP`; Ok if it is not there.
pub async fn vxlan_fdb_del(
    nl: &Netlink,
    vx_index: u32,
    mac: [u8; 6],
    dst: Ipv4Addr,
) -> Result<(), HostError> {
    let mut m = fdb_message(vx_index, mac, NeighbourFlags::Own);
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    ignore_missing(
        nl.handle().neighbours().del(m).execute().await,
        format!("delete vxlan fdb {} dst {dst}", mac_str(mac)),
    )
}

/// `bridge fdb replace MAC dev PORT master static sticky`.
pub async fn bridge_fdb_replace(
    nl: &Netlink,
    port_index: u32,
    mac: [u8; 6],
) -> Result<(), HostError> {
    nl.handle()
        .neighbours()
        .add_bridge(port_index, &mac)
        .flags(NeighbourFlags::Controller | NeighbourFlags::Sticky)
        .state(NeighbourState::Noarp)
        .replace()
        .execute()
        .await
        .map_err(|e| HostError::netlink(format!("bridge fdb {}", mac_str(mac)), e))
}

/// `bridge fdb del MAC dev PORT master`; Ok if it is not there (or has
/// moved to another port meanwhile).
pub async fn bridge_fdb_del(nl: &Netlink, port_index: u32, mac: [u8; 6]) -> Result<(), HostError> {
    let m = fdb_message(port_index, mac, NeighbourFlags::Controller);
    ignore_missing(
        nl.handle().neighbours().del(m).execute().await,
        format!("delete bridge fdb {}", mac_str(mac)),
    )
}

fn ignore_missing(r: Result<(), rtnetlink::Error>, op: String) -> Result<(), HostError> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if matches!(netlink_errno(&e), Some(libc::ENOENT) | Some(libc::ENODEV)) => Ok(()),
        Err(e) => Err(HostError::netlink(op, e)),
    }
}

/// The MACs the bridge has learned on its local ports (containers): every
/// dynamic or static entry of `bridge` whose port is not in `overlay`.
pub async fn local_macs(
    nl: &Netlink,
    bridge_index: u32,
    overlay: &[u32],
) -> Result<Vec<[u8; 6]>, HostError> {
    let entries: Vec<NeighbourMessage> = nl
        .dump("dump bridge fdb", |h| {
            h.neighbours()
                .get()
                .set_address_family(AddressFamily::Bridge)
                .execute()
        })
        .await?;
    let mut macs = Vec::new();
    for e in entries {
        if overlay.contains(&e.header.ifindex)
            || e.header.state == NeighbourState::Permanent
            || e.header.flags.contains(NeighbourFlags::Own)
        {
            continue;
        }
        let mut on_bridge = false;
        let mut mac = None;
        for a in &e.attributes {
            match a {
                NeighbourAttribute::Controller(i) => on_bridge = *i == bridge_index,
                NeighbourAttribute::LinkLayerAddress(b) => mac = <[u8; 6]>::try_from(&b[..]).ok(),
                _ => {}
            }
        }
        if let (true, Some(m)) = (on_bridge, mac) {
            if m[0] & 1 == 0 {
                macs.push(m);
            }
        }
    }
    macs.sort();
    macs.dedup();
    Ok(macs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::testutil::{ns_run, on_host, require_root, TestNet};

    #[test]
    fn vxlan_device_and_fdb_entries() {
        if !require_root() {
            return;
        }
        let net = TestNet::new();
        let host = net.add_ns("h");
        let m1 = [0x02, 0, 0, 0, 0, 0x11];
        let m2 = [0x02, 0, 0, 0, 0, 0x22];
        let dst = Ipv4Addr::new(198, 18, 0, 9);
        let (vx, br) = on_host(&host, move || async move {
            let nl = Netlink::current().await.unwrap();
            let br = nl.ensure_bridge("br0", 1400).await.unwrap();
            let a = ensure_vxlan(&nl, "vx0", 42, 6784, 1450, "br0")
                .await
                .unwrap();
            // Idempotent: a second start replaces the device (and its FDB).
            vxlan_fdb_replace(&nl, a, m1, dst, 6784).await.unwrap();
            let vx = ensure_vxlan(&nl, "vx0", 42, 6784, 1450, "br0")
                .await
                .unwrap();
            vxlan_fdb_replace(&nl, vx, m1, dst, 6784).await.unwrap();
            vxlan_fdb_replace(&nl, vx, m1, dst, 6784).await.unwrap();
            bridge_fdb_replace(&nl, vx, m1).await.unwrap();
            vxlan_fdb_replace(&nl, vx, m2, dst, 6785).await.unwrap();
            bridge_fdb_replace(&nl, vx, m2).await.unwrap();
            (vx, br)
        });
        let fdb = ns_run(&host, &["bridge", "fdb", "show", "dev", "vx0"]);
        assert!(
            fdb.contains("02:00:00:00:00:11 dst 198.18.0.9 self permanent"),
            "{fdb}"
        );
        assert!(
            fdb.contains("02:00:00:00:00:22 dst 198.18.0.9 port 6785"),
            "{fdb}"
        );
        assert!(
            fdb.contains("02:00:00:00:00:11 sticky master br0 static"),
            "{fdb}"
        );
        let link = ns_run(&host, &["ip", "-d", "link", "show", "vx0"]);
        for want in [
            "mtu 1450",
            "vxlan id 42",
            "dstport 6784",
            "nolearning",
            "master br0",
            "isolated on",
            "learning off",
        ] {
            assert!(link.contains(want), "no {want:?} in {link}");
        }
        on_host(&host, move || async move {
            let nl = Netlink::current().await.unwrap();
            // One peer's entries go, the other's stay; deleting twice is fine.
            vxlan_fdb_del(&nl, vx, m1, dst).await.unwrap();
            bridge_fdb_del(&nl, vx, m1).await.unwrap();
            vxlan_fdb_del(&nl, vx, m1, dst).await.unwrap();
            bridge_fdb_del(&nl, vx, m1).await.unwrap();
            // Overlay ports' entries are not local MACs.
            assert_eq!(
                local_macs(&nl, br, &[vx]).await.unwrap(),
                Vec::<[u8; 6]>::new()
            );
            let all = local_macs(&nl, br, &[]).await.unwrap();
            assert_eq!(all, vec![m2], "static entries on a non-overlay port count");
        });
        let fdb = ns_run(&host, &["bridge", "fdb", "show", "dev", "vx0"]);
        assert!(!fdb.contains("02:00:00:00:00:11"), "{fdb}");
        assert!(fdb.contains("02:00:00:00:00:22"), "{fdb}");
    }
}
