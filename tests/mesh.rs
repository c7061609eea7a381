//! The mesh (issue 3): peers launched naming only one seed learn each other
//! by gossip, connect directly, keep working when the seed stops, and relay
//! for a peer whose underlay reaches only one other.

mod common;

use common::*;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

/// Every container pings every other.
fn all_pairs_ping(pairs: &[(&Container, String)]) {
    for (from, _) in pairs {
        for (to, ip) in pairs {
            if from.name != to.name {
                wait_ping(from, ip, DEADLINE);
            }
        }
    }
}

#[test]
fn six_hosts_through_one_seed_and_the_seed_stops() {
    let Some(mut w) = World::new("six_hosts_through_one_seed") else {
        return;
    };
    let (hosts, containers) = w.add_hosts_with_containers(6);
    w.launch(&hosts[0], &[]);
    for h in &hosts[1..] {
        w.launch(h, &["198.18.0.1"]);
    }
    let ips = w.attach_each(&hosts, &containers);
    let pairs: Vec<(&Container, String)> = containers.iter().zip(ips).collect();
    // Every peer learns all six and connects to the other five directly.
    for h in &hosts {
        wait_until(
            DEADLINE,
            &format!("{} is connected to all five others", h.name),
            || {
                h.mesh_ok(&["status", "connections"])
                    .lines()
                    .filter(|l| l.contains("established") && !l.contains(" via "))
                    .count()
                    >= 5
            },
        );
    }
    all_pairs_ping(&pairs);

    // The seed goes away; the others stay connected and reachable.
    let pid = hosts[0].daemon_pid().expect("h1 pid");
    hosts[0].mesh_ok(&["stop"]);
    wait_until(DEADLINE, "h1 exits", || !pid_alive(pid));
    all_pairs_ping(&pairs[1..]);
}

#[test]
fn relays_for_a_host_that_reaches_only_one_peer() {
    let Some(mut w) = World::new("relays_for_a_host") else {
        return;
    };
    let (hosts, containers) = w.add_hosts_with_containers(4);
    // h4's underlay reaches only h3: drop everything to and from h1 and h2.
    let rules = "table inet meshtest {
        chain in { type filter hook input priority 0; ip saddr { 198.18.0.1, 198.18.0.2 } drop; }
        chain out { type filter hook output priority 0; ip daddr { 198.18.0.1, 198.18.0.2 } drop; }
    }";
    let path = w.dir.join("h4.nft");
    std::fs::write(&path, rules).expect("write nft rules");
    let out = run(
        &mut hosts[3].command("nft", &["-f", &path.to_string_lossy()]),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "nft: {}", show(&out));

    let names: Vec<String> = (0..3)
        .map(|i| w.launch(&hosts[i], if i == 0 { &[] } else { &["198.18.0.1"] }))
        .collect();
    w.launch(&hosts[3], &["198.18.0.3"]);
    let ips = w.attach_each(&hosts, &containers);
    let pairs: Vec<(&Container, String)> = containers.iter().zip(ips).collect();
    all_pairs_ping(&pairs);
    // h4 reaches h1 and h2 through h3, and h3 did relay.
    let peers = hosts[3].mesh_ok(&["status", "peers"]);
    for n in &names[..2] {
        assert!(
            peers
                .lines()
                .any(|l| l.starts_with(n.as_str()) && l.contains(&format!("via {}", names[2]))),
            "h4 should reach {n} via h3 ({}):\n{peers}",
            names[2]
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&hosts[2].mesh_ok(&["report"])).expect("report JSON");
    assert!(
        report["sleeve"]["relayed"].as_u64().unwrap_or(0) > 0,
        "h3 relayed nothing: {report}"
    );
}
