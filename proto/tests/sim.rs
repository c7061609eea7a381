//! Simulation tests: many real gossip cores on a virtual clock.
//!
//! Every test is deterministic from its seed and prints it on failure; no
//! test asserts wall-clock timing (speed is measured by the benchmark), only
//! simulated-time bounds that are part of the protocol's contract.

use mesh_proto::gossip::Config;
use mesh_proto::sim::{Sim, SimConfig};
use std::time::Duration;

/// After the daemon reports a connection down (at most [`dead_after`]
/// after it died), every peer stops using it within this long: the two ends'
/// deltas reach everyone by push within a few flush rounds, and anti-entropy
/// (one summary per second) repairs any peer the pushes missed.
const GOSSIP_BOUND: Duration = Duration::from_secs(5);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The daemon's failure detection time (15 s by default).
fn dead_after() -> Duration {
    Config::default().dead_after
}

fn converged_sim(peers: usize, seed: u64) -> Sim {
    let mut sim = Sim::new(SimConfig::new(peers, seed));
    let t = sim.run_until_converged(secs(30));
    assert!(
        t.is_some(),
        "seed {seed}: {peers} peers did not converge in 30 s"
    );
    sim
}

#[test]
fn two_hundred_peers_converge() {
    let seed = 200;
    let sim = converged_sim(200, seed);
    // Routes are loop-free: following next hops from every peer reaches
    // every destination within the peer count.
    for src in (0..200).step_by(17) {
        for dst in 0..200 {
            if src == dst {
                continue;
            }
            let target = sim.name(dst);
            let mut at = src;
            let mut hops = 0;
            while at != dst {
                let hop = sim.core(at).unwrap().next_hop(target);
                let hop = hop.unwrap_or_else(|| panic!("seed {seed}: {at} has no route to {dst}"));
                at = (0..200).find(|&i| sim.name(i) == hop).unwrap();
                hops += 1;
                assert!(hops < 200, "seed {seed}: routing loop from {src} to {dst}");
            }
        }
    }
    // Every peer respects the connection limit (plus joiners admitted over it).
    for i in 0..200 {
        assert!(
            sim.core(i).unwrap().neighbours().count() <= 110,
            "seed {seed}"
        );
    }
}

#[test]
fn broadcast_reaches_everyone_once() {
    let seed = 11;
    let mut sim = converged_sim(120, seed);
    // Trees agree once the views do: wait until every peer holds the same
    // topology (anti-entropy gets there).
    let same = sim.run_until_with(sim.now() + secs(30), |s| {
        let h = s.core(0).unwrap().state_hash();
        (1..120).all(|i| s.core(i).unwrap().state_hash() == h)
    });
    assert!(same.is_some(), "seed {seed}: views never agreed");
    for src in [0usize, 57, 119] {
        let mut got = vec![0u32; 120];
        got[src] = 1;
        let mut stack = vec![src];
        while let Some(at) = stack.pop() {
            for next in sim.core(at).unwrap().broadcast_next_hops(sim.name(src)) {
                let k = (0..120).find(|&i| sim.name(i) == next).unwrap();
                got[k] += 1;
                assert_eq!(got[k], 1, "seed {seed}: {k} got {src}'s broadcast twice");
                stack.push(k);
            }
        }
        assert!(
            got.iter().all(|&g| g == 1),
            "seed {seed}: broadcast from {src} missed peers"
        );
    }
}

#[test]
fn partition_of_fifty_heals() {
    let seed = 50;
    let mut sim = converged_sim(200, seed);
    let side: Vec<usize> = (0..200).filter(|i| i % 4 == 1).collect();
    assert_eq!(side.len(), 50);
    sim.partition(&side);
    let t = sim.now();
    sim.run_until(t + dead_after() + GOSSIP_BOUND);
    // Split: no route across.
    let (a, b) = (side[0], 0);
    assert_eq!(
        sim.core(a).unwrap().next_hop(sim.name(b)),
        None,
        "seed {seed}"
    );
    assert_eq!(
        sim.core(b).unwrap().next_hop(sim.name(a)),
        None,
        "seed {seed}"
    );
    sim.run_until(t + dead_after() + secs(22));
    sim.heal();
    let healed = sim.now();
    let conv = sim.run_until_converged(healed + secs(60));
    assert!(
        conv.is_some(),
        "seed {seed}: no convergence within 60 s after healing"
    );
}

#[test]
fn ten_percent_loss_converges() {
    let seed = 10;
    let mut cfg = SimConfig::new(200, seed);
    cfg.loss = 0.1;
    let mut sim = Sim::new(cfg);
    assert!(
        sim.run_until_converged(secs(60)).is_some(),
        "seed {seed}: no convergence with 10% loss"
    );
}

#[test]
fn crashed_and_restarted_peer_is_relearned() {
    let seed = 77;
    let n = 150;
    let mut sim = converged_sim(n, seed);
    let victim = 42;
    let name = sim.name(victim);
    let old = sim.incarnation(victim);
    sim.crash(victim);
    let t = sim.now();
    sim.run_until(t + dead_after() + GOSSIP_BOUND);
    for i in (0..n).filter(|&i| i != victim) {
        assert_eq!(
            sim.core(i).unwrap().next_hop(name),
            None,
            "seed {seed}: {i} still routes to crashed {victim}"
        );
    }
    sim.restart(victim);
    let relearned = sim.run_until_with(sim.now() + secs(30), |s| {
        (0..n).filter(|&i| i != victim).all(|i| {
            let c = s.core(i).unwrap();
            c.next_hop(name).is_some()
                && c.peers()
                    .iter()
                    .any(|p| p.name == name && p.incarnation == old + 1)
        })
    });
    assert!(
        relearned.is_some(),
        "seed {seed}: restarted peer not re-learned"
    );
    assert!(
        sim.run_until_converged(sim.now() + secs(30)).is_some(),
        "seed {seed}"
    );
}

#[test]
fn dead_links_are_withdrawn_within_the_bound() {
    let seed = 8;
    let n = 150;
    let mut sim = converged_sim(n, seed);
    let links = sim.links();
    let cut: Vec<(usize, usize)> = links
        .iter()
        .copied()
        .step_by(links.len() / 20)
        .take(20)
        .collect();
    for &(a, b) in &cut {
        sim.cut_link(a, b);
    }
    let t0 = sim.now();
    // Routes through a dead link may linger only until the failure is
    // detected (dead_after) plus the gossip bound; check every 100 ms after.
    let bound = t0 + dead_after() + GOSSIP_BOUND;
    sim.run_until(bound);
    let mut t = bound;
    while t < bound + secs(20) {
        for i in 0..n {
            let c = sim.core(i).unwrap();
            for &(a, b) in &cut {
                assert!(
                    !c.link_in_use(sim.name(a), sim.name(b)),
                    "seed {seed}: peer {i} still uses dead link {a}-{b} at {:?} after the cut",
                    t - t0
                );
            }
        }
        t += Duration::from_millis(100);
        sim.run_until(t);
    }
    // And everyone still reaches everyone (around the dead links).
    assert!(sim.converged(), "seed {seed}");
}

#[test]
fn simulation_is_deterministic() {
    let run = |seed| {
        let mut sim = Sim::new(SimConfig::new(60, seed));
        let t = sim.run_until_converged(secs(30));
        (t, sim.total_bytes(), sim.links())
    };
    assert_eq!(run(5), run(5));
}

#[test]
fn churn_of_fifty_converges_after_it_stops() {
    use mesh_proto::sim::Churn;
    let seed = 21;
    let mut sim = converged_sim(50, seed);
    // 20 peers leaving and 20 joining a minute, for two minutes: about
    // ten away at any time (each for `CHURN_AWAY`, 30 s).
    let report = sim.run_churn(Churn {
        per_min: 20.0,
        duration: secs(120),
    });
    assert!(report.leaves >= 20, "seed {seed}: {report}");
    // Joins spread like any news: within the gossip bound.
    assert!(report.joins_known >= 10, "seed {seed}: {report}");
    assert!(
        report.join_known_max_s <= GOSSIP_BOUND.as_secs_f64(),
        "seed {seed}: {report}"
    );
    // Once churn stops and everyone away is back: converged within the
    // detection delay plus the gossip bound.
    let conv = report.converged_s;
    let bound = dead_after() + GOSSIP_BOUND;
    assert!(
        conv.is_some_and(|c| c <= bound.as_secs_f64()),
        "seed {seed}: {report}"
    );
    assert!(sim.converged(), "seed {seed}");
}
