//! `launch`'s check of `--ipalloc-range` against the host's routes: a range
//! that overlaps a network the host already reaches (an interface's subnet,
//! a VPN's routes) would make containers' addresses ambiguous, so launch
//! refuses it with the route and its interface named, as Weave did.
//!
//! Only routes of the main table count, and not the default route, nor
//! routes through mesh's own devices (the bridge, which `mesh expose`
//! gives addresses in the range, its TAP, the VXLAN device, container
//! ports): those are there because mesh runs, or ran before a restart.

use crate::host::{self, Netlink};
use anyhow::{bail, Context};
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteType};
use rtnetlink::RouteMessageBuilder;
use std::net::Ipv4Addr;

/// A route of the host: its destination and its device's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HostRoute {
    pub(super) dest: Ipv4Net,
    pub(super) dev: String,
}

/// Refuse `range` if it overlaps a route of this network namespace.
pub(super) fn check_range(range: Ipv4Net) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime to read the host's routes")?;
    let routes = rt
        .block_on(host_routes())
        .context("reading the host's routes")?;
    if let Some(r) = overlapping(range, &routes) {
        bail!(
            "--ipalloc-range {range} overlaps the host's route {} on {}: choose another range with --ipalloc-range",
            r.dest,
            r.dev
        );
    }
    Ok(())
}

/// The first route of `routes` that overlaps `range` and is not one of
/// mesh's own.
pub(super) fn overlapping(range: Ipv4Net, routes: &[HostRoute]) -> Option<&HostRoute> {
    routes.iter().find(|r| {
        r.dest.prefix_len() > 0
            && !is_mesh_device(&r.dev)
            && (range.contains(&r.dest) || r.dest.contains(&range))
    })
}

/// Devices mesh makes itself.
fn is_mesh_device(dev: &str) -> bool {
    dev == host::BRIDGE
        || dev == host::TAP
        || dev == crate::datapath::fastdp::DEVICE
        || dev.starts_with(host::nft::PORT_PREFIX)
}

/// The main table's IPv4 unicast routes with an output device.
async fn host_routes() -> anyhow::Result<Vec<HostRoute>> {
    let nl = Netlink::current().await?;
    let links = nl.links().await?;
    let name_of = |index: u32| {
        links
            .iter()
            .find(|l| l.header.index == index)
            .and_then(|l| {
                l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
            })
            .unwrap_or_else(|| format!("interface {index}"))
    };
    let msgs = nl
        .dump("dump IPv4 routes", |h| {
            h.route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
        })
        .await?;
    let mut out = Vec::new();
    for m in &msgs {
        let h = &m.header;
        if h.table != RouteHeader::RT_TABLE_MAIN || h.kind != RouteType::Unicast {
            continue;
        }
        let mut dest = Ipv4Addr::UNSPECIFIED;
        let mut oif = None;
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dest = *d,
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::MultiPath(hops) if oif.is_none() => {
                    oif = hops.first().map(|h| h.interface_index)
                }
                _ => {}
            }
        }
        let (Some(oif), Ok(dest)) = (oif, Ipv4Net::new(dest, h.destination_prefix_length)) else {
            continue;
        };
        out.push(HostRoute {
            dest: dest.trunc(),
            dev: name_of(oif),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(dest: &str, dev: &str) -> HostRoute {
        HostRoute {
            dest: dest.parse().unwrap(),
            dev: dev.to_string(),
        }
    }

    #[test]
    fn a_range_overlapping_a_route_either_way_is_found() {
        let routes = [
            r("0.0.0.0/0", "eth0"),
            r("198.18.0.0/24", "eth0"),
            r("198.19.5.0/24", "mesh"),
            r("198.19.6.0/24", "vmesh1234"),
            r("10.0.0.0/8", "tun0"),
        ];
        let range = |s: &str| s.parse::<Ipv4Net>().unwrap();
        // The range holds the route.
        assert_eq!(
            overlapping(range("198.18.0.0/16"), &routes),
            Some(&routes[1])
        );
        // The route holds the range.
        assert_eq!(
            overlapping(range("10.32.0.0/12"), &routes),
            Some(&routes[4])
        );
        // Next to it, the default route and mesh's own devices: no overlap.
        assert_eq!(overlapping(range("198.18.1.0/24"), &routes), None);
        assert_eq!(overlapping(range("198.19.0.0/16"), &routes), None);
    }
}
