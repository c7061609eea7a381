//! Addresses (issue 4): containers attached with no address get one from
//! the ring, shared by the hosts with no coordinator. Distinct everywhere,
//! kept across restarts and SIGKILL, safe across partitions, and a stopped
//! peer's space is reclaimed by the majority and used again.
//!
//! Every range here is inside 198.19.0.0/16 (the tests' own addresses).

mod common;

use common::*;
use std::net::Ipv4Addr;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

/// `--ipalloc-range` and the rest of the launch options of each host.
fn launch_all(w: &World, hosts: &[Host], opts: &[&str]) -> Vec<String> {
    hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let mut args: Vec<&str> = opts.to_vec();
            if i > 0 {
                args.push("198.18.0.1");
            }
            w.launch(h, &args)
        })
        .collect()
}

/// Waits until every host has a connection to every other.
fn wait_full_mesh(hosts: &[Host]) {
    for h in hosts {
        wait_until(DEADLINE, &format!("{} connects to all", h.name), || {
            h.mesh_ok(&["status", "connections"])
                .lines()
                .filter(|l| l.contains("established"))
                .count()
                >= hosts.len() - 1
        });
    }
}

/// One container per host, `first0..`, attached with no address (which
/// also agrees the ring).
fn first_containers(w: &mut World, hosts: &[Host]) -> Vec<Container> {
    let first: Vec<Container> = (0..hosts.len())
        .map(|i| w.add_container(&format!("first{i}")))
        .collect();
    for (h, c) in hosts.iter().zip(&first) {
        attach_auto(h, c, &[]);
    }
    first
}

/// `mesh attach ADDRS... --name NAME PATH`; the one CIDR it prints.
#[track_caller]
fn attach_auto(h: &Host, c: &Container, addrs: &[&str]) -> String {
    let mut args = vec!["attach"];
    args.extend_from_slice(addrs);
    args.extend_from_slice(&["--name", &c.name, &c.path]);
    let out = h.mesh_timeout(&args, DEADLINE);
    assert!(
        out.status.success(),
        "attach {} on {}: {}",
        c.name,
        h.name,
        show(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "attach printed {text:?}, not one CIDR");
    lines[0].to_string()
}

fn addr_of(cidr: &str) -> Ipv4Addr {
    cidr.split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{cidr:?} is not a CIDR"))
}

fn in_net(a: Ipv4Addr, net: Ipv4Addr, prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(a) & mask == u32::from(net) & mask
}

/// Every address of every container, as the kernel has them: the truth the
/// invariant is checked against.
fn kernel_addrs(containers: &[Container]) -> Vec<(String, Ipv4Addr)> {
    let mut out = Vec::new();
    for c in containers {
        for line in c.ethmesh_addrs().lines() {
            let mut words = line.split_whitespace();
            if words.any(|w| w == "inet") {
                if let Some(a) = words.next() {
                    out.push((c.name.clone(), addr_of(a)));
                }
            }
        }
    }
    out
}

#[track_caller]
fn assert_distinct(addrs: &[(String, Ipv4Addr)]) {
    let mut seen = std::collections::BTreeMap::new();
    for (who, a) in addrs {
        if let Some(other) = seen.insert(*a, who.clone()) {
            panic!("{a} is held by both {other} and {who}: {addrs:?}");
        }
    }
}

/// Every container attached (no address given) on its host, all at once;
/// each one's name and the CIDR it got, all distinct.
#[track_caller]
fn attach_at_once(jobs: Vec<(&Host, &Container)>) -> Vec<(String, String)> {
    let results: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(h, c)| s.spawn(move || (c.name.clone(), attach_auto(h, c, &[]))))
            .collect();
        handles
            .into_iter()
            .map(|j| j.join().expect("attach thread"))
            .collect()
    });
    let all: Vec<(String, Ipv4Addr)> = results
        .iter()
        .map(|(n, c)| (n.clone(), addr_of(c)))
        .collect();
    assert_distinct(&all);
    results
}

/// Owned space per peer name, from `mesh report`.
fn owned(h: &Host) -> std::collections::BTreeMap<String, u64> {
    let report: serde_json::Value =
        serde_json::from_str(&h.mesh_ok(&["report"])).expect("report JSON");
    report["ipam"]["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["peer"].as_str().unwrap_or("").to_string(),
                        p["owned"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn three_hosts_allocate_concurrently_and_a_restart_keeps_addresses() {
    let Some(mut w) = World::new("ipam_three_hosts") else {
        return;
    };
    let hosts: Vec<Host> = (0..3).map(|_| w.add_host()).collect();
    launch_all(&w, &hosts, &["--ipalloc-range", "198.19.0.0/16"]);
    wait_full_mesh(&hosts);
    let per_host: Vec<Vec<Container>> = (0..3)
        .map(|i| {
            (0..15)
                .map(|j| w.add_container(&format!("h{}c{j}", i + 1)))
                .collect()
        })
        .collect();
    // 45 attaches at once, 15 per host, no address given.
    let results = attach_at_once(
        hosts
            .iter()
            .zip(&per_host)
            .flat_map(|(h, cs)| cs.iter().map(move |c| (h, c)))
            .collect(),
    );
    for (n, c) in &results {
        assert!(
            c.ends_with("/16"),
            "{n} got {c}: not in the default subnet's prefix"
        );
        let a = addr_of(c);
        assert!(in_net(a, Ipv4Addr::new(198, 19, 0, 0), 16), "{n} got {a}");
        assert!(
            a != Ipv4Addr::new(198, 19, 0, 0) && a != Ipv4Addr::new(198, 19, 255, 255),
            "{n} got a reserved address {a}"
        );
    }
    let everything: Vec<Container> = per_host.iter().flatten().cloned().collect();
    assert_distinct(&kernel_addrs(&everything));
    // Each container reaches a container on every other host.
    let ip_of = |c: &Container| -> String {
        results
            .iter()
            .find(|(n, _)| *n == c.name)
            .map(|(_, cidr)| addr_of(cidr).to_string())
            .expect("address of container")
    };
    for i in 0..3 {
        for (j, c) in per_host[i].iter().enumerate() {
            for k in 1..3 {
                let other = &per_host[(i + k) % 3][j];
                wait_ping(c, &ip_of(other), DEADLINE);
            }
        }
    }

    // h2 restarts: its containers keep their addresses, and the next
    // allocation there does not reuse one.
    let before = hosts[1].ps();
    let pid = hosts[1].daemon_pid().expect("h2 pid");
    hosts[1].mesh_ok(&["stop"]);
    wait_until(DEADLINE, "h2 exits", || !pid_alive(pid));
    w.launch(
        &hosts[1],
        &["--ipalloc-range", "198.19.0.0/16", "198.18.0.1"],
    );
    let after = hosts[1].ps();
    assert_eq!(before, after, "mesh ps changed across a restart");
    let extra = w.add_container("h2extra");
    let cidr = attach_auto(&hosts[1], &extra, &["net:default"]);
    let mut with_extra: Vec<(String, Ipv4Addr)> = results
        .iter()
        .map(|(n, c)| (n.clone(), addr_of(c)))
        .collect();
    with_extra.push(("h2extra".into(), addr_of(&cidr)));
    assert_distinct(&with_extra);
    wait_ping(&extra, &ip_of(&per_host[0][0]), DEADLINE);
    let status = hosts[1].mesh_ok(&["status", "ipam"]);
    assert!(status.contains("State: ready"), "status ipam:\n{status}");
}

#[test]
fn allocations_on_both_sides_of_a_partition_never_collide() {
    let Some(mut w) = World::new("ipam_partition") else {
        return;
    };
    let hosts: Vec<Host> = (0..3).map(|_| w.add_host()).collect();
    let range = ["--ipalloc-range", "198.19.4.0/24"];
    launch_all(&w, &hosts, &range);
    wait_full_mesh(&hosts);
    // The ring is agreed by all three before the partition.
    let first = first_containers(&mut w, &hosts);
    // h3 is cut off from h1 and h2.
    w.partition(&hosts[2], &[hosts[0].ip, hosts[1].ip]);
    wait_until(DEADLINE, "h1 sees h3 unreachable", || {
        hosts[0]
            .mesh_ok(&["status", "peers"])
            .lines()
            .filter(|l| l.contains("unreachable"))
            .count()
            == 1
    });
    // Both sides allocate.
    let mut side_a = Vec::new();
    let mut side_b = Vec::new();
    for i in 0..5 {
        let a = w.add_container(&format!("a{i}"));
        attach_auto(&hosts[i % 2], &a, &[]);
        side_a.push(a);
        let b = w.add_container(&format!("b{i}"));
        attach_auto(&hosts[2], &b, &[]);
        side_b.push(b);
    }
    w.heal(&hosts[2]);
    wait_full_mesh(&hosts);
    let everything: Vec<Container> = first
        .iter()
        .chain(&side_a)
        .chain(&side_b)
        .cloned()
        .collect();
    let addrs = kernel_addrs(&everything);
    assert_eq!(
        addrs.len(),
        everything.len(),
        "every container has one address: {addrs:?}"
    );
    assert_distinct(&addrs);
    // And the two sides reach each other again.
    let b0 = addrs
        .iter()
        .find(|(n, _)| n == "b0")
        .map(|(_, a)| a.to_string())
        .expect("b0");
    wait_ping(&side_a[0], &b0, DEADLINE);
}

/// Three hosts share a /27; h3 stops and is reclaimed (automatically after
/// `--ipalloc-reclaim-after`, or by `mesh rmpeer` run on two hosts at once);
/// then h1 and h2 fill the whole range, h3's old space included.
fn reclaim(test: &str, by_rmpeer: bool) {
    let Some(mut w) = World::new(test) else {
        return;
    };
    let hosts: Vec<Host> = (0..3).map(|_| w.add_host()).collect();
    let reclaim_after = if by_rmpeer { "10m" } else { "3s" };
    let names = launch_all(
        &w,
        &hosts,
        &[
            "--ipalloc-range",
            "198.19.9.0/27",
            "--ipalloc-reclaim-after",
            reclaim_after,
        ],
    );
    wait_full_mesh(&hosts);
    let first = first_containers(&mut w, &hosts);
    wait_until(DEADLINE, "h1 sees three owners", || {
        owned(&hosts[0]).values().filter(|&&n| n > 0).count() == 3
    });
    let h3 = names[2].clone();
    let pid = hosts[2].daemon_pid().expect("h3 pid");
    hosts[2].mesh_ok(&["stop"]);
    wait_until(DEADLINE, "h3 exits", || !pid_alive(pid));
    if by_rmpeer {
        wait_until(DEADLINE, "h1 and h2 see h3 unreachable", || {
            hosts[..2].iter().all(|h| {
                h.mesh_ok(&["status", "peers"])
                    .lines()
                    .any(|l| l.starts_with(h3.as_str()) && l.contains("unreachable"))
            })
        });
        std::thread::scope(|s| {
            for h in &hosts[..2] {
                let h3 = h3.clone();
                s.spawn(move || h.mesh_ok(&["rmpeer", &h3]));
            }
        });
    }
    for h in &hosts[..2] {
        wait_until(
            DEADLINE,
            &format!("{} sees h3's space reclaimed", h.name),
            || {
                let o = owned(h);
                o.get(&h3).copied().unwrap_or(0) == 0 && o.values().sum::<u64>() == 32
            },
        );
    }
    // 32 addresses, 2 reserved, 3 held by the first containers (h3's among
    // them: its container outlives its daemon): 27 left. Fill them from h1
    // and h2 at once.
    let more: Vec<Container> = (0..27).map(|i| w.add_container(&format!("m{i}"))).collect();
    std::thread::scope(|s| {
        for (i, c) in more.iter().enumerate() {
            let h = &hosts[i % 2];
            s.spawn(move || attach_auto(h, c, &[]));
        }
    });
    let everything: Vec<Container> = first.iter().chain(&more).cloned().collect();
    let addrs = kernel_addrs(&everything);
    assert_eq!(addrs.len(), 30, "every container has an address: {addrs:?}");
    assert_distinct(&addrs);
    // The range is now full: one more fails with a clear error, nothing
    // changes.
    let last = w.add_container("last");
    let out = hosts[0].mesh_timeout(&["attach", "--name", "last", &last.path], DEADLINE);
    let err = assert_one_line_error(&out, "attach to a full range");
    assert!(err.contains("no free address"), "{err}");
    assert!(
        last.ethmesh_mac().is_none(),
        "a failed attach left an interface"
    );
}

#[test]
fn a_stopped_peers_space_is_reclaimed_by_the_majority() {
    reclaim("ipam_reclaim_auto", false);
}

#[test]
fn rmpeer_on_two_hosts_at_once_reclaims_once() {
    reclaim("ipam_rmpeer_twice", true);
}

#[test]
fn sigkill_during_attaches_hands_nothing_out_twice() {
    let Some(mut w) = World::new("ipam_sigkill") else {
        return;
    };
    let h = w.add_host();
    let opts = ["--ipalloc-range", "198.19.6.0/24"];
    w.launch(&h, &opts);
    let first: Vec<Container> = (0..12).map(|i| w.add_container(&format!("k{i}"))).collect();
    let pid = h.daemon_pid().expect("pid");
    // Attaches in flight while the daemon is killed; some succeed, some fail.
    std::thread::scope(|s| {
        for c in &first {
            let h = &h;
            s.spawn(move || {
                let _ = h.mesh_timeout(&["attach", "--name", &c.name, &c.path], DEADLINE);
            });
        }
        s.spawn(|| {
            wait_until(DEADLINE, "a few attaches done", || h.ps().len() >= 3);
            let _ = nix_kill(pid);
        });
    });
    wait_until(DEADLINE, "the daemon is dead", || !pid_alive(pid));
    w.launch(&h, &opts);
    // Attach everything again (already attached ones keep theirs) plus more.
    let second: Vec<Container> = (0..6).map(|i| w.add_container(&format!("n{i}"))).collect();
    for c in first.iter().chain(&second) {
        attach_auto(&h, c, &[]);
    }
    let everything: Vec<Container> = first.iter().chain(&second).cloned().collect();
    let addrs = kernel_addrs(&everything);
    assert_distinct(&addrs);
    let ps = h.ps();
    assert_eq!(ps.len(), everything.len(), "mesh ps: {ps:?}");
}

fn nix_kill(pid: i32) -> bool {
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn bad_addresses_get_one_clear_error_and_change_nothing() {
    let Some(mut w) = World::new("ipam_bad_input") else {
        return;
    };
    let h = w.add_host();
    w.launch(&h, &["--ipalloc-range", "198.19.8.0/24"]);
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    let held = attach_auto(&h, &c1, &["ip:198.19.8.10/24"]);
    assert_eq!(held, "198.19.8.10/24");
    let before = h.ps();
    let cases: [(&[&str], &str); 4] = [
        (&["net:198.19.200.0/24"], "outside"),
        (&["net:198.19.8.0/31"], "small"),
        (&["ip:198.19.8.10/24"], "already"),
        (&["net:198.19.8.0/33"], "CIDR"),
    ];
    for (addrs, word) in cases {
        let mut args = vec!["attach"];
        args.extend_from_slice(addrs);
        args.extend_from_slice(&["--name", "c2", &c2.path]);
        let out = h.mesh(&args);
        let err = assert_one_line_error(&out, &format!("attach {addrs:?}"));
        assert!(
            err.to_lowercase().contains(&word.to_lowercase()),
            "attach {addrs:?}: {err:?} does not say {word:?}"
        );
    }
    // A malformed WEAVE_CIDR in the target's environment.
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &c2.ns, "sleep", "60"])
        .env("WEAVE_CIDR", "net:banana")
        .spawn()
        .expect("spawn sleep");
    let sleeper = wait_for(Duration::from_secs(10), "sleep runs in c2", || {
        let out = run(
            std::process::Command::new("pgrep").args(["-P", &child.id().to_string()]),
            Duration::from_secs(5),
        );
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if text.is_empty() {
            // `ip netns exec` execs sleep itself: then the child is the sleeper.
            let comm =
                std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap_or_default();
            if comm.trim() == "sleep" {
                return Ok(child.id().to_string());
            }
            return Err(comm);
        }
        Ok(text)
    });
    let out = h.mesh(&["attach", &sleeper]);
    let _ = child.kill();
    let _ = child.wait();
    let err = assert_one_line_error(&out, "attach with WEAVE_CIDR=net:banana");
    assert!(err.contains("banana"), "{err}");
    assert_eq!(h.ps(), before, "a failed attach changed mesh ps");
    assert!(
        c2.ethmesh_mac().is_none(),
        "a failed attach left an interface"
    );
    // Launch options are checked too.
    let h2 = w.add_host();
    for (args, word) in [
        (&["--ipalloc-range", "198.19.8.0/33"][..], "CIDR"),
        (&["--ipalloc-range", "198.19.8.1/24"][..], "host bits"),
        (&["--ipalloc-init", "bogus"][..], "consensus"),
        (
            &[
                "--ipalloc-range",
                "198.19.8.0/24",
                "--ipalloc-default-subnet",
                "198.19.9.0/24",
            ][..],
            "inside",
        ),
    ] {
        let out = w.try_launch(&h2, args);
        let err = assert_one_line_error(&out, &format!("launch {args:?}"));
        assert!(
            err.contains(word),
            "launch {args:?}: {err:?} does not say {word:?}"
        );
    }
}

#[test]
fn reset_hands_the_space_to_a_live_peer_and_leaves_nothing_behind() {
    let Some(mut w) = World::new("ipam_reset") else {
        return;
    };
    let hosts: Vec<Host> = (0..2).map(|_| w.add_host()).collect();
    let names = launch_all(&w, &hosts, &["--ipalloc-range", "198.19.10.0/24"]);
    wait_full_mesh(&hosts);
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    attach_auto(&hosts[0], &c1, &[]);
    attach_auto(&hosts[1], &c2, &[]);
    wait_until(DEADLINE, "both own space", || {
        owned(&hosts[0]).values().filter(|&&n| n > 0).count() == 2
    });
    let pid = hosts[1].daemon_pid().expect("h2 pid");
    let out = hosts[1].mesh_ok(&["reset"]);
    assert!(
        out.contains(&names[0]),
        "reset should name the heir {}: {out}",
        names[0]
    );
    wait_until(DEADLINE, "h2 exits", || !pid_alive(pid));
    // h1 owns the whole range now, and h2's container address is free again.
    wait_until(DEADLINE, "h1 owns everything", || {
        owned(&hosts[0]).get(&names[0]).copied() == Some(256)
    });
    // Nothing of h2 is left: no bridge, TAP, veth, rules or state.
    let links = run(
        &mut hosts[1].command("ip", &["-o", "link"]),
        Duration::from_secs(10),
    );
    let links = String::from_utf8_lossy(&links.stdout);
    for dev in ["mesh", "meshtap", "vmesh"] {
        assert!(
            !links.lines().any(|l| l
                .split(':')
                .nth(1)
                .is_some_and(|n| n.trim().starts_with(dev))),
            "{dev} left behind on h2:\n{links}"
        );
    }
    let rules = run(
        &mut hosts[1].command("nft", &["list", "ruleset"]),
        Duration::from_secs(10),
    );
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(!rules.contains("bridge mesh"), "rules left on h2:\n{rules}");
    let left: Vec<_> = std::fs::read_dir(&hosts[1].data_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "state left in h2's data dir: {left:?}");
    assert!(c2.ethmesh_mac().is_none(), "c2 still has its interface");
}

/// The elements of set `set` of the bridge table on `h`, as `nft` lists
/// them, one string per element (`"vmesh…" . 0a:58:…`).
fn set_elements(h: &Host, set: &str) -> std::collections::BTreeSet<String> {
    let out = run(
        &mut h.command("nft", &["list", "set", "bridge", "mesh", set]),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "nft list set: {}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some(start) = text.find("elements = {") else {
        return Default::default();
    };
    let body = &text[start + "elements = {".len()..];
    let body = &body[..body.find('}').unwrap_or(body.len())];
    body.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect()
}

/// Issue 21: a hundred attaches at once on one host all succeed, each with
/// its own address, and the isolation rules (changed over netlink, a
/// batch per change) then say exactly the containers attached: after the
/// hundred, and after half of them detach at once.
#[test]
fn a_hundred_attaches_at_once_on_one_host() {
    let Some(mut w) = World::new("ipam_hundred") else {
        return;
    };
    let h = w.add_host();
    w.launch(&h, &["--ipalloc-range", "198.19.0.0/16"]);
    let cs: Vec<Container> = (0..100)
        .map(|i| w.add_container(&format!("c{i}")))
        .collect();
    let results = attach_at_once(cs.iter().map(|c| (&h, c)).collect());
    assert_distinct(&kernel_addrs(&cs));
    assert_eq!(kernel_addrs(&cs).len(), 100);

    // What the kernel's sets must say: each attached container's port with
    // its MAC, and its address.
    let want = |h: &Host| {
        let ps = h.ps();
        let macs: std::collections::BTreeSet<String> =
            ps.iter().map(|e| e.mac.to_lowercase()).collect();
        let ips: std::collections::BTreeSet<String> = ps
            .iter()
            .flat_map(|e| e.cidrs.iter())
            .map(|c| addr_of(c).to_string())
            .collect();
        (macs, ips)
    };
    let check = |h: &Host, n: usize| {
        let (macs, ips) = want(h);
        assert_eq!(macs.len(), n, "mesh ps");
        let port_mac = set_elements(h, "port_mac");
        let got: std::collections::BTreeSet<String> = port_mac
            .iter()
            .filter_map(|e| e.rsplit(" . ").next())
            .map(str::to_lowercase)
            .collect();
        assert_eq!(port_mac.len(), n, "{port_mac:?}");
        assert_eq!(got, macs);
        let port_ip: std::collections::BTreeSet<String> = set_elements(h, "port_ip")
            .iter()
            .filter_map(|e| e.rsplit(" . ").next())
            .map(String::from)
            .collect();
        assert_eq!(port_ip, ips);
        assert_eq!(set_elements(h, "port_net").len(), n);
    };
    check(&h, 100);

    // Half of them go at once.
    std::thread::scope(|s| {
        for c in cs.iter().step_by(2) {
            let h = &h;
            s.spawn(move || {
                let out = h.mesh_timeout(&["detach", &c.path], DEADLINE);
                assert!(out.status.success(), "detach {}: {}", c.name, show(&out));
            });
        }
    });
    check(&h, 50);
    // The rest still talk to each other.
    wait_ping(&cs[1], &addr_of(&results[3].1).to_string(), DEADLINE);
}
