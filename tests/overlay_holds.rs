//! The overlay holds (issue 16): only members reach it, isolation covers
//! every protocol, no member takes a local container's MAC, and multicast
//! and broadcast reach every container of their subnet on every host, once,
//! and no other subnet.
//!
//! Each negative check can fail: it is paired with a control frame that
//! takes the same path and must arrive (so "nothing arrived" means "was
//! dropped", not "was not sent yet"), and with the drop counter of its
//! reason, which must move.

mod common;

use common::*;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);
/// The fast path's VXLAN network identifier (the daemon's constant).
const VNI: u32 = 0x6d_65_73;

/// Frames dropped by `host` for `reason`, by its filters and its sleeve.
fn drops(host: &Host, reason: &str) -> u64 {
    let r = report(host);
    r["drops"][reason].as_u64().unwrap_or(0) + r["sleeve"]["drops"][reason].as_u64().unwrap_or(0)
}

/// Waits until `host` has counted at least `n` drops for `reason`.
#[track_caller]
fn wait_drops(host: &Host, reason: &str, n: u64) {
    wait_for(
        DEADLINE,
        &format!("{} counts {n} drops for {reason}", host.name),
        || {
            let got = drops(host, reason);
            if got >= n {
                Ok(())
            } else {
                Err(format!("{got}; report drops: {}", report(host)["drops"]))
            }
        },
    );
}

/// A UDP socket bound to `port` inside `c`, reading with a short timeout.
fn udp_in(c: &Container, port: u16) -> UdpSocket {
    let s = in_netns(&c.ns, || UdpSocket::bind(("0.0.0.0", port)))
        .unwrap_or_else(|e| panic!("bind {port} in {}: {e}", c.name));
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    s
}

/// Every datagram `s` holds now or within `limit`, until `enough` says so.
fn datagrams_until(
    s: &UdpSocket,
    limit: Duration,
    mut enough: impl FnMut(&[Vec<u8>]) -> bool,
) -> Vec<Vec<u8>> {
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < end && !enough(&got) {
        if let Ok(n) = s.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    got
}

#[test]
fn a_host_that_is_not_a_member_cannot_inject_vxlan() {
    let Some(mut w) = World::new("vxlan_injection") else {
        return;
    };
    let (h1, h2) = w.launch_pair(&[]);
    let h3 = w.add_host(); // on the underlay, not a member
    let [a1, a2] = <[Container; 2]>::try_from(
        w.attach_new(&[(&h1, "a1", "198.19.1.1/24"), (&h2, "a2", "198.19.1.2/24")]),
    )
    .expect("two containers");
    wait_ping(&a2, "198.19.1.1", DEADLINE);
    wait_overlay(&h1, "fastdp");
    let a1_mac = mac(&a1.ethmesh_mac().expect("a1's MAC"));
    let inbox = udp_in(&a1, 5000);
    let frame = |marker: &[u8]| {
        let ip = ipv4_udp(
            Ipv4Addr::new(198, 19, 1, 2),
            Ipv4Addr::new(198, 19, 1, 1),
            4000,
            5000,
            marker,
        );
        vxlan(VNI, &ether(a1_mac, mac("0a:bb:00:00:00:03"), 0x0800, &ip))
    };
    let h1_vxlan = SocketAddrV4::new(h1.ip, 6784);
    let before = drops(&h1, "vxlan_not_peer");

    // The stranger sends VXLAN with our VNI to h1's port, for a1.
    let stranger = random_bytes(8);
    let s3 = in_netns(&h3.ns, || UdpSocket::bind("0.0.0.0:0")).expect("socket on h3");
    for _ in 0..10 {
        s3.send_to(&frame(&stranger), h1_vxlan)
            .expect("send from h3");
    }
    wait_drops(&h1, "vxlan_not_peer", before + 10);

    // The same frame from h2, a fast-path peer, arrives: the frame itself is
    // deliverable, only its sender made the difference.
    let member = random_bytes(8);
    let s2 = in_netns(&h2.ns, || UdpSocket::bind("0.0.0.0:0")).expect("socket on h2");
    let mut got = Vec::new();
    wait_for(
        DEADLINE,
        "a frame a member sent by VXLAN reaches a1",
        || {
            s2.send_to(&frame(&member), h1_vxlan)
                .map_err(|e| e.to_string())?;
            got.extend(datagrams_until(&inbox, Duration::from_millis(500), |g| {
                g.iter().any(|d| d == &member)
            }));
            if got.iter().any(|d| d == &member) {
                Ok(())
            } else {
                Err(format!("{} datagrams, none the member's", got.len()))
            }
        },
    );
    assert!(
        !got.iter().any(|d| d == &stranger),
        "a datagram injected by a non-member reached a container"
    );
    let status = h1.status();
    assert!(status.contains("vxlan_not_peer"), "{status}");
}

#[test]
fn ipv6_and_other_ethertypes_reach_no_container() {
    let Some(mut w) = World::new("ethertypes") else {
        return;
    };
    let (h1, h2) = w.launch_pair(&[]);
    let [a1, a2, a3, b1, b2] = <[Container; 5]>::try_from(w.attach_new(&[
        (&h1, "a1", "198.19.1.1/24"),
        (&h2, "a2", "198.19.1.2/24"),
        (&h1, "a3", "198.19.1.3/24"),
        (&h1, "b1", "198.19.2.1/24"),
        (&h2, "b2", "198.19.2.2/24"),
    ]))
    .expect("five containers");
    wait_ping(&a1, "198.19.1.2", DEADLINE);
    wait_ping(&b1, "198.19.2.2", DEADLINE);
    let before1 = drops(&h1, "ethertype");
    let before2 = drops(&h2, "ethertype");
    let listeners: Vec<Link> = [&a2, &a3, &b1, &b2]
        .iter()
        .map(|c| Link::open(&c.ns, "ethmesh"))
        .collect();
    let refs: Vec<&Link> = listeners.iter().collect();

    let bad = random_bytes(8);
    // Controls: a1's broadcast, and one h2 itself puts on its bridge.
    let control = random_bytes(8);
    let control_h2 = random_bytes(8);
    let a1_mac = mac(&a1.ethmesh_mac().expect("a1's MAC"));
    let stranger_mac = mac("0a:cc:00:00:00:02");
    let from_a1 = Link::open(&a1.ns, "ethmesh");
    // A member host puts frames on its own bridge: they reach the overlay.
    let from_h2 = Link::open(&h2.ns, "mesh");
    for _ in 0..5 {
        from_a1.send(&ether(
            mac("33:33:00:00:00:01"),
            a1_mac,
            0x86dd,
            &ipv6_udp(&bad),
        ));
        from_a1.send(&ether([0xff; 6], a1_mac, 0x88b6, &bad));
        from_h2.send(&ether(
            mac("33:33:00:00:00:01"),
            stranger_mac,
            0x86dd,
            &ipv6_udp(&bad),
        ));
        from_h2.send(&ether([0xff; 6], stranger_mac, 0x88b6, &bad));
    }
    // Then IPv4 broadcasts of subnet A, along the same paths.
    let bcast = |src_ip: [u8; 4], src_mac, marker: &[u8]| {
        ether(
            [0xff; 6],
            src_mac,
            0x0800,
            &ipv4_udp(
                Ipv4Addr::from(src_ip),
                Ipv4Addr::new(198, 19, 1, 255),
                4000,
                4001,
                marker,
            ),
        )
    };
    let got = collect_until(&refs, DEADLINE, |got| {
        from_a1.send(&bcast([198, 19, 1, 1], a1_mac, &control));
        from_h2.send(&bcast([198, 19, 1, 77], stranger_mac, &control_h2));
        // a2 and a3 (subnet A) have both controls.
        [&control, &control_h2]
            .iter()
            .all(|c| any_holds(&got[0], c) && any_holds(&got[1], c))
    });
    for (l, frames) in listeners.iter().zip(&got) {
        assert!(
            !any_holds(frames, &bad),
            "an IPv6 or foreign-ethertype frame reached {}",
            l.what
        );
    }
    for c in [&control, &control_h2] {
        assert!(
            any_holds(&got[0], c) && any_holds(&got[1], c),
            "a control is missing"
        );
    }
    // Subnet B has neither a1's broadcast nor, on the other host, h2's
    // (h2 itself may reach its own containers: it is their host).
    assert!(!any_holds(&got[2], &control), "a1's broadcast reached b1");
    assert!(!any_holds(&got[3], &control), "a1's broadcast reached b2");
    assert!(
        !any_holds(&got[2], &control_h2),
        "h2's subnet-A broadcast reached b1 on h1"
    );
    // a1's 10 at its port; h2's at h1's ports (from the overlay) and at
    // h2's own ports (sent by the host itself).
    wait_drops(&h1, "ethertype", before1 + 10);
    wait_drops(&h2, "ethertype", before2 + 1);
}

#[test]
fn the_overlay_cannot_take_a_local_containers_mac() {
    let Some(mut w) = World::new("mac_claim") else {
        return;
    };
    let (h1, h2) = w.launch_pair(&[]);
    let [a1, c1, a2] = <[Container; 3]>::try_from(w.attach_new(&[
        (&h1, "a1", "198.19.1.1/24"),
        (&h1, "c1", "198.19.1.3/24"),
        (&h2, "a2", "198.19.1.2/24"),
    ]))
    .expect("three containers");
    wait_ping(&a2, "198.19.1.1", DEADLINE);
    wait_ping(&a2, "198.19.1.3", DEADLINE);
    wait_ping(&c1, "198.19.1.1", DEADLINE);
    wait_programmed(&h2, &c1);
    let a1_mac_s = a1.ethmesh_mac().expect("a1's MAC");
    let a1_mac = mac(&a1_mac_s);
    let c1_mac = mac(&c1.ethmesh_mac().expect("c1's MAC"));
    let before = drops(&h1, "mac_claim");

    // Member h2 sends, from its bridge, frames claiming a1's MAC: broadcasts
    // (over the sleeve) and unicasts to c1 (over the fast path); then a
    // control from a MAC of its own, along the same paths.
    let at_c1 = Link::open(&c1.ns, "ethmesh");
    let from_h2 = Link::open(&h2.ns, "mesh");
    let marked = random_bytes(8);
    let control = random_bytes(8);
    let frame = |dst, src, marker: &[u8]| {
        ether(
            dst,
            src,
            0x0800,
            &ipv4_udp(
                Ipv4Addr::new(198, 19, 1, 1),
                Ipv4Addr::new(198, 19, 1, 255),
                4000,
                4001,
                marker,
            ),
        )
    };
    for _ in 0..10 {
        from_h2.send(&frame([0xff; 6], a1_mac, &marked));
        from_h2.send(&frame(c1_mac, a1_mac, &marked));
    }
    let own = mac("0a:cc:00:00:00:02");
    let got = collect_until(&[&at_c1], DEADLINE, |got| {
        from_h2.send(&frame([0xff; 6], own, &control));
        from_h2.send(&frame(c1_mac, own, &control));
        any_holds(&got[0], &control)
    });
    assert!(
        any_holds(&got[0], &control),
        "h2's control never reached c1"
    );
    assert!(
        !any_holds(&got[0], &marked),
        "a frame from the overlay claiming a1's MAC reached c1"
    );
    wait_drops(&h1, "mac_claim", before + 20);

    // h1's bridge still has a1's MAC on a1's own port only, and c1 reaches
    // a1 there.
    let fdb = run_ok("bridge", &["-n", &h1.ns, "fdb", "show", "br", "mesh"]);
    for line in fdb.lines().filter(|l| l.starts_with(&a1_mac_s)) {
        assert!(
            !line.contains("meshtap") && !line.contains("vxmesh"),
            "h1's bridge learnt a1's MAC from the overlay: {line}\n{fdb}"
        );
    }
    assert!(ping(&c1.ns, "198.19.1.1"), "c1 cannot reach a1");
}

/// Three hosts, all connected to each other (a loop), each with a container
/// of subnet A and one of subnet B, and a second container of A on h1: a
/// multicast datagram and a subnet broadcast from h1's first container of A
/// reach every other container of A exactly once and none of B.
fn multicast_and_broadcast(test: &str, launch_args: &[&str], overlay: &str) {
    let Some(mut w) = World::new(test) else {
        return;
    };
    let hs: Vec<Host> = (0..3).map(|_| w.add_host()).collect();
    w.launch(&hs[0], launch_args);
    let mut args = launch_args.to_vec();
    args.push("198.18.0.1");
    w.launch(&hs[1], &args);
    w.launch(&hs[2], &args);
    for h in &hs {
        wait_for(
            DEADLINE,
            &format!("{} connects to both others", h.name),
            || {
                let o = overlays(h)?;
                if o.len() == 2 && o.iter().all(|(got, _)| got == overlay) {
                    Ok(())
                } else {
                    Err(format!("{o:?}"))
                }
            },
        );
    }
    let a: Vec<Container> = (1..=3).map(|i| w.add_container(&format!("a{i}"))).collect();
    let b: Vec<Container> = (1..=3).map(|i| w.add_container(&format!("b{i}"))).collect();
    let a4 = w.add_container("a4");
    for i in 0..3 {
        w.attach(&hs[i], &a[i], &format!("198.19.1.{}/24", i + 1));
        w.attach(&hs[i], &b[i], &format!("198.19.2.{}/24", i + 1));
    }
    w.attach(&hs[0], &a4, "198.19.1.4/24");
    wait_ping(&a[0], "198.19.1.2", DEADLINE);
    wait_ping(&a[0], "198.19.1.3", DEADLINE);
    wait_ping(&b[0], "198.19.2.3", DEADLINE);

    let group = Ipv4Addr::new(239, 1, 2, 3);
    let join = |c: &Container, ip: Ipv4Addr| -> (UdpSocket, UdpSocket) {
        let m = udp_in(c, 5007);
        m.join_multicast_v4(&group, &ip).expect("join the group");
        (m, udp_in(c, 5008))
    };
    let want: Vec<(String, (UdpSocket, UdpSocket))> = [
        (&a[1], [198, 19, 1, 2]),
        (&a[2], [198, 19, 1, 3]),
        (&a4, [198, 19, 1, 4]),
    ]
    .iter()
    .map(|(c, ip)| (c.name.clone(), join(c, Ipv4Addr::from(*ip))))
    .collect();
    let never: Vec<(String, (UdpSocket, UdpSocket))> = b
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                c.name.clone(),
                join(c, Ipv4Addr::new(198, 19, 2, i as u8 + 1)),
            )
        })
        .collect();
    let never_l2: Vec<Link> = b.iter().map(|c| Link::open(&c.ns, "ethmesh")).collect();

    let run = random_bytes(4);
    let tag = |kind: &str, k: u32| {
        let mut v = kind.as_bytes().to_vec();
        v.extend_from_slice(&run);
        v.extend_from_slice(&k.to_be_bytes());
        v
    };
    let sender = in_netns(&a[0].ns, || -> std::io::Result<UdpSocket> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        s.bind(&SocketAddrV4::new(Ipv4Addr::new(198, 19, 1, 1), 0).into())?;
        s.set_multicast_if_v4(&Ipv4Addr::new(198, 19, 1, 1))?;
        s.set_broadcast(true)?;
        Ok(s.into())
    })
    .expect("sender in a1");
    // The mesh's broadcast trees settle a moment after the last
    // connection: until every peer knows every connection, a relay may
    // forward along a tree another peer has already outgrown, and a
    // datagram can arrive twice (as in Weave). Wait until it is settled,
    // observed: a round of one multicast and one broadcast (tagged apart
    // from the run below) reaches every member exactly once. Bounded: a
    // mesh that keeps duplicating fails here.
    let warm = random_bytes(4);
    let warm_tag = |kind: &str, k: u32| {
        let mut v = kind.as_bytes().to_vec();
        v.extend_from_slice(&warm);
        v.extend_from_slice(&k.to_be_bytes());
        v
    };
    let mut round = 0;
    wait_for(DEADLINE, "one copy of each broadcast per member", || {
        round += 1;
        sender
            .send_to(&warm_tag("wm", round), (group, 5007))
            .map_err(|e| e.to_string())?;
        sender
            .send_to(
                &warm_tag("wb", round),
                (Ipv4Addr::new(198, 19, 1, 255), 5008),
            )
            .map_err(|e| e.to_string())?;
        let mut counts = Vec::new();
        for (name, (m, bc)) in &want {
            for (sock, kind) in [(m, "wm"), (bc, "wb")] {
                let got = datagrams_until(sock, Duration::from_millis(300), |_| false);
                let n = got.iter().filter(|d| **d == warm_tag(kind, round)).count();
                counts.push((name.clone(), kind, n));
            }
        }
        if counts.iter().all(|(_, _, n)| *n == 1) {
            Ok(())
        } else {
            Err(format!("round {round}: {counts:?}"))
        }
    });
    eprintln!("{test}: broadcasts once per member from round {round}");

    const N: u32 = 5;
    for k in 0..N {
        sender
            .send_to(&tag("mc", k), (group, 5007))
            .expect("send to the group");
        sender
            .send_to(&tag("bc", k), (Ipv4Addr::new(198, 19, 1, 255), 5008))
            .expect("send the subnet broadcast");
    }
    // End markers, after which copies along other paths would have come.
    sender.send_to(&tag("mc", N), (group, 5007)).expect("send");
    sender
        .send_to(&tag("bc", N), (Ipv4Addr::new(198, 19, 1, 255), 5008))
        .expect("send");

    for (name, (m, bc)) in &want {
        for (sock, kind) in [(m, "mc"), (bc, "bc")] {
            let end = tag(kind, N);
            let got = datagrams_until(sock, DEADLINE, |g| g.contains(&end));
            // What a loop would add comes within a moment.
            let mut got = got;
            got.extend(datagrams_until(sock, Duration::from_millis(500), |_| false));
            for k in 0..=N {
                let n = got.iter().filter(|d| **d == tag(kind, k)).count();
                assert_eq!(
                    n, 1,
                    "{name} received {kind} datagram {k} {n} times (over the {overlay})"
                );
            }
        }
    }
    for (name, (m, bc)) in &never {
        for sock in [m, bc] {
            let got = datagrams_until(sock, Duration::from_millis(200), |_| false);
            assert!(
                !got.iter().any(|d| contains_bytes(d, &run)),
                "{name} in subnet B received subnet A's multicast or broadcast"
            );
        }
    }
    for l in &never_l2 {
        let frames = l.frames_for(Duration::from_millis(200));
        assert!(
            !any_holds(&frames, &run),
            "subnet A's multicast or broadcast reached {}",
            l.what
        );
    }
}

#[test]
fn multicast_and_broadcast_stay_in_their_subnet_over_the_sleeve() {
    multicast_and_broadcast("multicast_sleeve", &["--no-fastdp"], "sleeve");
}

#[test]
fn multicast_and_broadcast_stay_in_their_subnet_with_the_fast_path() {
    multicast_and_broadcast("multicast_fastdp", &[], "fastdp");
}

#[test]
fn a_firewall_reload_does_not_end_isolation() {
    let Some(mut w) = World::new("nft_flush") else {
        return;
    };
    let h1 = w.add_host();
    w.launch(&h1, &[]);
    let a1 = w.add_container("a1");
    let b1 = w.add_container("b1");
    w.attach(&h1, &a1, "198.19.1.1/24");
    w.attach(&h1, &b1, "198.19.2.1/24");
    let a1_mac = a1.ethmesh_mac().expect("a1's MAC");
    // What `systemctl reload nftables` does first.
    run_ok("ip", &["netns", "exec", &h1.ns, "nft", "flush", "ruleset"]);
    wait_for(DEADLINE, "h1 makes its tables again", || {
        let tables = run_ok("ip", &["netns", "exec", &h1.ns, "nft", "list", "tables"]);
        let set = run(
            &mut h1.command("nft", &["list", "set", "bridge", "mesh", "port_mac"]),
            CMD_TIMEOUT,
        );
        let set = String::from_utf8_lossy(&set.stdout).to_string();
        if tables.contains("table inet mesh_fastdp") && set.contains(&a1_mac) {
            Ok(())
        } else {
            Err(format!("{tables}{set}"))
        }
    });
    // b1, with a route to subnet A, still cannot reach a1.
    run_ok(
        "ip",
        &[
            "-n",
            &b1.ns,
            "route",
            "add",
            "198.19.1.0/24",
            "dev",
            "ethmesh",
        ],
    );
    assert!(
        !ping(&b1.ns, "198.19.1.1"),
        "b1 reached a1 after the ruleset was flushed"
    );
    assert!(h1.log_tail(200).contains("making them again"));
}
