//! Tests of container attach/detach against real namespaces, veths and a
//! bridge (root only).

use std::fs::File;
use std::time::Duration;

use ipnet::IpNet;

use super::*;
use crate::host::netlink::link_mtu_of;
use crate::host::testutil::{ns_ok, ns_run, on_host, require_root, wait_until, TestNet};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn open(path: &str) -> File {
    File::open(path).unwrap()
}

/// True once `ifname` is absent from namespace `ns` (bounded poll).
fn gone_in(ns: &str, ifname: &'static str) -> bool {
    wait_until(Duration::from_secs(5), || {
        !ns_ok(ns, &["ip", "link", "show", "dev", ifname])
    })
}

// Long for a reason: one test that tells one story, step by step, on
// real kernel objects; split, its steps would lose their order.
#[test]
fn attach_two_containers_ping_and_detach() {
    if !require_root() {
        return;
    }
    let tn = TestNet::new();
    let host = tn.add_ns("h");
    let c1 = tn.add_ns("c1");
    let c2 = tn.add_ns("c2");
    let (p1, p2) = (tn.ns_path(&c1), tn.ns_path(&c2));
    let (c1n, c2n) = (c1.clone(), c2.clone());
    on_host(&host, move || async move {
        let nl = Netlink::current().await.unwrap();
        nl.ensure_bridge("meshbr", 1410).await.unwrap();
        let (f1, f2) = (open(&p1), open(&p2));
        let a1 = [net("198.19.1.1/24")];
        let i1 = attach_veth(&nl, &f1, "meshbr", "vethmh1", "ethmesh", &a1, 1410)
            .await
            .unwrap();
        let i2 = attach_veth(
            &nl,
            &f2,
            "meshbr",
            "vethmh2",
            "ethmesh",
            &[net("198.19.1.2/24")],
            1410,
        )
        .await
        .unwrap();
        assert_eq!(i1.host_ifname, "vethmh1");
        assert_ne!(i1.mac, i2.mac);

        // Container side: MAC, addresses, MTU as asked.
        let (addrs, mac) = container_if(&f1, "ethmesh").await.unwrap().unwrap();
        assert_eq!(mac, i1.mac);
        assert_eq!(addrs, a1.to_vec());
        let cnl = Netlink::in_netns(&f1).await.unwrap();
        let link = cnl.link("ethmesh").await.unwrap().unwrap();
        assert_eq!(link_mtu_of(&link), Some(1410));
        assert_eq!(container_if(&f1, "nosuch").await.unwrap(), None);
        // The host end is a port of the bridge, with the MTU.
        let br = nl.link_index("meshbr").await.unwrap().unwrap();
        let h1 = nl.link("vethmh1").await.unwrap().unwrap();
        assert_eq!(link_mtu_of(&h1), Some(1410));
        assert!(h1.attributes.iter().any(|a| matches!(
            a,
            rtnetlink::packet_route::link::LinkAttribute::Controller(i) if *i == br
        )));

        // Real traffic between the two containers through the bridge.
        assert!(
            wait_until(Duration::from_secs(15), || ns_ok(
                &c1n,
                &["ping", "-c1", "-W1", "198.19.1.2"]
            )),
            "c1 cannot ping c2"
        );
        assert!(ns_ok(&c2n, &["ping", "-c1", "-W1", "198.19.1.1"]));

        // Second attach of c1: adds only the missing address, same MAC.
        let both = [net("198.19.1.1/24"), net("198.19.2.1/24")];
        let again = attach_veth(&nl, &f1, "meshbr", "vethmh1", "ethmesh", &both, 1410)
            .await
            .unwrap();
        assert_eq!(again, i1);
        let (mut addrs, _) = container_if(&f1, "ethmesh").await.unwrap().unwrap();
        addrs.sort();
        assert_eq!(addrs, both.to_vec());

        // Detach one address: the interface stays.
        detach_veth(
            &nl,
            Some(&f1),
            "vethmh1",
            "ethmesh",
            &[net("198.19.2.1/24")],
            false,
        )
        .await
        .unwrap();
        let (addrs, _) = container_if(&f1, "ethmesh").await.unwrap().unwrap();
        assert_eq!(addrs, a1.to_vec());
        // Detach the last one: the pair goes.
        detach_veth(&nl, Some(&f1), "vethmh1", "ethmesh", &a1, false)
            .await
            .unwrap();
        assert_eq!(nl.link_index("vethmh1").await.unwrap(), None);
        assert_eq!(container_if(&f1, "ethmesh").await.unwrap(), None);
        // Detach all of c2, then again, then with its namespace unknown.
        detach_veth(&nl, Some(&f2), "vethmh2", "ethmesh", &[], true)
            .await
            .unwrap();
        detach_veth(&nl, Some(&f2), "vethmh2", "ethmesh", &[], true)
            .await
            .unwrap();
        detach_veth(&nl, None, "vethmh2", "ethmesh", &[], true)
            .await
            .unwrap();
        assert_eq!(nl.link_index("vethmh2").await.unwrap(), None);
        // Only the bridge and lo remain on the host.
        let names: Vec<u32> = nl
            .links()
            .await
            .unwrap()
            .iter()
            .map(|l| l.header.index)
            .collect();
        assert_eq!(names.len(), 2, "leftover links on host");
    });
    assert!(gone_in(&c1, "ethmesh"));
    assert!(gone_in(&c2, "ethmesh"));
    let out = ns_run(&host, &["ip", "-o", "link"]);
    assert!(!out.contains("veth"), "{out}");
}

#[test]
fn attach_failures_leave_nothing() {
    if !require_root() {
        return;
    }
    let tn = TestNet::new();
    let host = tn.add_ns("h");
    let c1 = tn.add_ns("c1");
    // Any IPv6 address is refused inside c1: a failure after the pair exists.
    ns_run(
        &c1,
        &["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"],
    );
    let p1 = tn.ns_path(&c1);
    on_host(&host, move || async move {
        let nl = Netlink::current().await.unwrap();
        let f1 = open(&p1);
        let a = [net("198.19.3.1/24")];

        // No bridge: refused before anything is made.
        let e = attach_veth(&nl, &f1, "nobridge", "vethmf1", "ethmesh", &a, 1500)
            .await
            .unwrap_err();
        assert!(
            matches!(e, HostError::NoSuchLink(ref b) if b == "nobridge"),
            "{e}"
        );
        assert_eq!(nl.link_index("vethmf1").await.unwrap(), None);

        nl.ensure_bridge("meshbr", 1500).await.unwrap();
        // A bad target: a file that is not a network namespace.
        let notns = File::open("/proc/self/ns/uts").unwrap();
        let e = attach_veth(&nl, &notns, "meshbr", "vethmf1", "ethmesh", &a, 1500)
            .await
            .unwrap_err();
        assert!(matches!(e, HostError::NotNetns(_)), "{e}");
        assert_eq!(nl.link_index("vethmf1").await.unwrap(), None);

        // Bad names are refused up front.
        let e = attach_veth(&nl, &f1, "meshbr", "vethmf1-too-long", "ethmesh", &a, 1500)
            .await
            .unwrap_err();
        assert!(matches!(e, HostError::InvalidIfname(_)), "{e}");

        // Failure after creation (address refused by the kernel): the pair is
        // removed. 2001:db8::/32 is documentation space and is never
        // configured; no traffic is sent.
        let bad = [net("198.19.3.1/24"), net("2001:db8::1/64")];
        let e = attach_veth(&nl, &f1, "meshbr", "vethmf1", "ethmesh", &bad, 1500)
            .await
            .unwrap_err();
        eprintln!("mid-way failure: {e}");
        assert!(matches!(e, HostError::Netlink { .. }), "{e}");
        assert_eq!(nl.link_index("vethmf1").await.unwrap(), None);
        assert_eq!(container_if(&f1, "ethmesh").await.unwrap(), None);

        // And the same container attaches fine afterwards.
        attach_veth(&nl, &f1, "meshbr", "vethmf1", "ethmesh", &a, 1500)
            .await
            .unwrap();
        detach_veth(&nl, Some(&f1), "vethmf1", "ethmesh", &[], true)
            .await
            .unwrap();
    });
    assert!(gone_in(&c1, "ethmesh"));
}

#[test]
fn stale_host_end_is_replaced() {
    if !require_root() {
        return;
    }
    let tn = TestNet::new();
    let host = tn.add_ns("h");
    let c1 = tn.add_ns("c1");
    // A crashed daemon's leftover: a host end whose peer is not in c1.
    ns_run(
        &host,
        &[
            "ip", "link", "add", "vethms1", "type", "veth", "peer", "name", "orphan",
        ],
    );
    let p1 = tn.ns_path(&c1);
    on_host(&host, move || async move {
        let nl = Netlink::current().await.unwrap();
        nl.ensure_bridge("meshbr", 1500).await.unwrap();
        let f1 = open(&p1);
        attach_veth(
            &nl,
            &f1,
            "meshbr",
            "vethms1",
            "ethmesh",
            &[net("198.19.4.1/24")],
            1500,
        )
        .await
        .unwrap();
        assert_eq!(nl.link_index("orphan").await.unwrap(), None);
        assert!(container_if(&f1, "ethmesh").await.unwrap().is_some());
    });
}

/// Clones of one handle share a netlink socket, on which the kernel runs
/// one dump at a time and refuses a second with EBUSY: many concurrent
/// dumps of links, routes, addresses and the bridge's fdb must all
/// succeed (the daemon's restore and its fast-path MAC scan once
/// collided exactly so at start-up).
#[test]
fn concurrent_dumps_on_one_socket_all_succeed() {
    if !require_root() {
        return;
    }
    let tn = TestNet::new();
    let host = tn.add_ns("h");
    // Enough links that a dump spans several messages and stays open
    // while the others are sent.
    for i in 0..20 {
        let (a, b) = (format!("dva{i}"), format!("dvb{i}"));
        ns_run(
            &host,
            &["ip", "link", "add", &a, "type", "veth", "peer", "name", &b],
        );
    }
    on_host(&host, move || async move {
        let nl = Netlink::current().await.unwrap();
        let br = nl.ensure_bridge("meshbr", 1410).await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64 {
            let nl = nl.clone();
            tasks.spawn(async move {
                match i % 4 {
                    0 => nl.links().await.map(|l| assert!(l.len() > 40)),
                    1 => nl.underlay_mtu().await.map(|_| ()),
                    2 => link_addrs(&nl, 1).await.map(|_| ()),
                    _ => crate::host::vxlan::local_macs(&nl, br, &[])
                        .await
                        .map(|_| ()),
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
    });
}

#[test]
fn gratuitous_arp_is_a_request_for_ones_own_address() {
    let mac = [2, 0, 0, 0, 0, 9];
    let ip = std::net::Ipv4Addr::new(198, 19, 5, 7);
    let p = garp_payload(mac, ip);
    assert_eq!(&p[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
    assert_eq!(&p[8..14], &mac);
    assert_eq!(&p[14..18], &ip.octets());
    assert_eq!(&p[18..24], &[0; 6]);
    assert_eq!(&p[24..28], &ip.octets());
}
