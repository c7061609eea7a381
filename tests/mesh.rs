//! The mesh (issue 3): peers launched naming only one seed learn each other
//! by gossip, connect directly, keep working when the seed stops, and relay
//! for a peer whose underlay reaches only one other.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Peers (by name) with an established direct connection in a report.
fn established_peers(report: &serde_json::Value) -> BTreeSet<String> {
    report["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["state"] == "established")
        .filter_map(|c| c["peer"].as_str().map(str::to_string))
        .collect()
}

/// Peers (by name) with a share of the allocation range in a report.
fn ipam_shares(report: &serde_json::Value) -> BTreeSet<String> {
    report["ipam"]["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["owned"].as_u64().unwrap_or(0) > 0)
        .filter_map(|p| p["peer"].as_str().map(str::to_string))
        .collect()
}

/// Where `report`'s views disagree about what `before` (the same host's
/// previous report) already showed: every peer connected then must now be
/// in `status peers` with its nickname, reachable directly, with the
/// connection established in both entries; every peer with a share then
/// must now show its nickname in `status ipam`. (A connection or share is
/// checked from the report after the one that first shows it: its peer's
/// first gossip may be a round trip behind the connection row, but a report
/// takes longer than that.)
fn disagreements(
    host: &str,
    before: &serde_json::Value,
    report: &serde_json::Value,
) -> Vec<String> {
    let me = report["name"].as_str().unwrap_or("");
    let peers: Vec<&serde_json::Value> = report["peers"].as_array().into_iter().flatten().collect();
    let entry = |name: &str| peers.iter().find(|p| p["name"] == name).copied();
    let conn_established = |from: &str, to: &str| {
        entry(from).is_some_and(|p| {
            p["connections"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["peer"] == to && c["established"] == true)
        })
    };
    let mut out = Vec::new();
    let now_connected = established_peers(report);
    for p in established_peers(before).intersection(&now_connected) {
        match entry(p) {
            None => out.push(format!("{host}: {p} is connected but not in status peers")),
            Some(e) => {
                if e["nickname"].as_str().unwrap_or("").is_empty() {
                    out.push(format!("{host}: {p} is connected but has no nickname"));
                }
                if e["reachable"] != true || e["next_hop"] != p.as_str() {
                    out.push(format!("{host}: {p} is connected but not shown direct"));
                }
            }
        }
        if !conn_established(me, p) {
            out.push(format!("{host}: our connection to {p} is pending"));
        }
        if !conn_established(p, me) {
            out.push(format!(
                "{host}: {p}'s connection to us is pending or missing"
            ));
        }
    }
    let nicknames: BTreeSet<String> = report["ipam"]["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| !p["nickname"].as_str().unwrap_or("").is_empty())
        .filter_map(|p| p["peer"].as_str().map(str::to_string))
        .collect();
    for p in ipam_shares(before).intersection(&ipam_shares(report)) {
        if !nicknames.contains(p) {
            out.push(format!(
                "{host}: {p}'s share in status ipam has no nickname"
            ));
        }
    }
    out
}

/// Reads `mesh report` on every host, one after the other, from before
/// the daemons start until stopped, and collects every disagreement
/// between a host's views (see [`disagreements`]). Stops and joins its
/// thread when dropped.
struct Watcher {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Watcher {
    fn start(hosts: &[Host]) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let hosts = hosts.to_vec();
        let (s, r) = (stop.clone(), rounds.clone());
        let thread = std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(300);
            let mut last: Vec<Option<serde_json::Value>> = vec![None; hosts.len()];
            let mut found = Vec::new();
            while !s.load(Ordering::SeqCst) && Instant::now() < end {
                for (h, last) in hosts.iter().zip(&mut last) {
                    let out = h.mesh(&["report"]);
                    // Not launched yet (or mid-start): nothing to compare.
                    let Ok(report) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    else {
                        continue;
                    };
                    if !out.status.success() {
                        continue;
                    }
                    if let Some(before) = last.as_ref() {
                        for d in disagreements(&h.name, before, &report) {
                            if !found.contains(&d) {
                                eprintln!("{d}");
                                found.push(d);
                            }
                        }
                    }
                    *last = Some(report);
                }
                r.fetch_add(1, Ordering::SeqCst);
            }
            found
        });
        Watcher {
            stop,
            rounds,
            thread: Some(thread),
        }
    }

    /// Waits for `n` more complete rounds over the hosts.
    fn wait_rounds(&self, n: u64) {
        let target = self.rounds.load(Ordering::SeqCst) + n;
        wait_until(DEADLINE, "the watcher reads every host again", || {
            self.rounds.load(Ordering::SeqCst) >= target
        });
    }

    /// Stops the thread; every disagreement it saw.
    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().expect("watcher thread"))
            .unwrap_or_default()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Issue 13 (part 3): `mesh status peers`, `status connections` and
/// `status ipam` of a host agree about a directly connected peer from the
/// moment the connection is established (full state crosses a new
/// connection at once), not seconds later. Every host's report is read
/// continuously while the mesh forms and containers get addresses.
#[test]
fn three_hosts_views_agree_as_soon_as_connected() {
    let Some(mut w) = World::new("views_agree") else {
        return;
    };
    let (hosts, containers) = w.add_hosts_with_containers(3);
    let watcher = Watcher::start(&hosts);
    let range = "198.19.0.0/16";
    w.launch(&hosts[0], &["--ipalloc-range", range]);
    for h in &hosts[1..] {
        w.launch(h, &["--ipalloc-range", range, "198.18.0.1"]);
    }
    // Addresses from the ring: each host gets a share.
    for (h, c) in hosts.iter().zip(&containers) {
        let out = h.mesh_timeout(&["attach", "--name", &c.name, &c.path], DEADLINE);
        assert!(out.status.success(), "attach on {}: {}", h.name, show(&out));
    }
    for h in &hosts {
        wait_until(
            DEADLINE,
            &format!("{} is connected to both others", h.name),
            || {
                let r = report(h);
                established_peers(&r).len() == 2 && ipam_shares(&r).len() == 3
            },
        );
    }
    watcher.wait_rounds(3);
    let found = watcher.finish();
    assert!(
        found.is_empty(),
        "views disagreed after a connection was established:\n{}",
        found.join("\n")
    );
}
