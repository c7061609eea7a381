//! In-process allocation latency: 10,000 allocations into a /16 that this
//! peer owns (two seeds split a /12; the /16 lies in our half).
//! Prints p50/p99/max in µs. `cargo bench -p mesh-proto --bench ipam_alloc`.

use mesh_proto::ipam::{Config, InitMode, Ipam};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn main() {
    let (a, b) = (
        mesh_proto::sim::sim_identity(1, 0),
        mesh_proto::sim::sim_identity(2, 0),
    );
    // The /16 below lies in the first half of the ring: ours.
    let (id, other) = if a.name() < b.name() {
        (a, b.name())
    } else {
        (b, a.name())
    };
    let me = id.name();
    let mut ipam = Ipam::new(
        id,
        Config {
            range: "10.32.0.0/12".parse().unwrap(),
            default_subnet: "10.32.0.0/12".parse().unwrap(),
            init: InitMode::Seed(vec![me, other]),
            reclaim_after: Duration::from_secs(600),
        },
    );
    let now = Instant::now();
    ipam.tick(now, &BTreeSet::from([other]));
    let subnet = "10.33.0.0/16".parse().unwrap();
    let n = 10_000;
    let mut us = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("container-{i}");
        let t = Instant::now();
        ipam.allocate(now, &id, subnet).expect("allocation");
        us.push(t.elapsed().as_secs_f64() * 1e6);
        if i % 100 == 0 {
            let _ = ipam.take_delta();
        }
    }
    us.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| us[((us.len() as f64 * p) as usize).min(us.len() - 1)];
    println!(
        "ipam_alloc: {n} allocations into a /16: p50={:.1}us p99={:.1}us max={:.1}us",
        pct(0.50),
        pct(0.99),
        us[us.len() - 1]
    );
}
