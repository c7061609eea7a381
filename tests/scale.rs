//! Twenty real daemons on one underlay (issue 20): each launched naming
//! only the first, they converge into a full mesh, agree one address ring
//! (one container per host, no duplicate address, a cross-host ping), and
//! then cost little at rest: the bytes every host sends on the underlay,
//! per peer and second, stay under the target of 2,000 (`benches/scale.sh`
//! measures 30, 60 and 100 daemons, and CPU and memory too).
//!
//! The at-rest figure is a bound checked like a benchmark, not a timing
//! assertion: it is measured over windows of 20 s, and the test passes when
//! one of (at most) three windows is under the bound; every window's figure
//! is printed. Only 198.18.0.0/15.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const HOSTS: usize = 20;
const RANGE: &str = "198.19.0.0/16";
/// The target: bytes per second per peer on the underlay at rest.
const TARGET_BPS: f64 = 2_000.0;
const WINDOW: Duration = Duration::from_secs(20);
const WINDOWS: usize = 3;

/// Peers `h` reaches, by `mesh report`.
fn reachable(h: &Host) -> usize {
    let out = h.mesh(&["report"]);
    if !out.status.success() {
        return 0;
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|r| {
            r["peers"]
                .as_array()
                .map(|p| p.iter().filter(|p| p["reachable"] == true).count())
        })
        .unwrap_or(0)
}

#[test]
fn twenty_daemons_converge_and_cost_little_at_rest() {
    let Some(mut w) = World::new("twenty_daemons_converge_and_cost_little_at_rest") else {
        return;
    };
    let (hosts, containers) = w.add_hosts_with_containers(HOSTS);
    let started = Instant::now();
    w.launch(&hosts[0], &["--ipalloc-range", RANGE]);
    let seed = hosts[0].ip.to_string();
    for h in &hosts[1..] {
        w.launch(h, &["--ipalloc-range", RANGE, &seed]);
    }
    let mut pending: Vec<&Host> = hosts.iter().collect();
    wait_until(
        Duration::from_secs(180),
        "every daemon reaches all 20 peers",
        || {
            pending.retain(|h| reachable(h) < HOSTS);
            pending.is_empty()
        },
    );
    eprintln!(
        "{HOSTS} daemons converged in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // One container per host, each from the one ring.
    let addrs: Vec<String> = hosts
        .iter()
        .zip(&containers)
        .map(|(h, c)| {
            let out = h.mesh_timeout(
                &["attach", "--name", &c.name, &c.path],
                Duration::from_secs(90),
            );
            assert!(out.status.success(), "attach on {}: {}", h.name, show(&out));
            first_addr(&String::from_utf8_lossy(&out.stdout))
        })
        .collect();
    let distinct: BTreeSet<&String> = addrs.iter().collect();
    assert_eq!(distinct.len(), HOSTS, "duplicate addresses: {addrs:?}");
    wait_ping(&containers[0], &addrs[HOSTS - 1], Duration::from_secs(45));
    wait_ping(&containers[HOSTS - 1], &addrs[1], Duration::from_secs(45));

    // At rest: nothing attached, sent or looked up from here on.
    let mut figures = Vec::new();
    for _ in 0..WINDOWS {
        let (b0, t0) = (w.underlay_bytes(), Instant::now());
        // A measurement window (what is measured is the daemons' own
        // traffic during it), not a wait for an event.
        std::thread::sleep(WINDOW);
        let (b1, t1) = (w.underlay_bytes(), Instant::now());
        let bps = (b1 - b0) as f64 / HOSTS as f64 / (t1 - t0).as_secs_f64();
        eprintln!("at rest: {bps:.0} bytes/s per peer on the underlay (target < {TARGET_BPS})");
        figures.push(bps);
        if bps < TARGET_BPS {
            break;
        }
    }
    assert!(
        figures.iter().any(|b| *b < TARGET_BPS),
        "at rest, {HOSTS} daemons sent {figures:.0?} bytes/s per peer in {WINDOWS} windows of {WINDOW:?}: over {TARGET_BPS}"
    );
    for h in &hosts {
        assert!(h.daemon_running(), "the daemon of {} stopped", h.name);
    }
}
