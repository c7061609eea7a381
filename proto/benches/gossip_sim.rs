//! Convergence benchmark of the gossip core on the simulator.
//!
//! `cargo bench -p mesh-proto --bench gossip_sim` runs the `simulate`
//! scenario (DESIGN.md §9) for N = 100, 1,000 and 5,000 peers and prints, for
//! each, simulated seconds to convergence, control bytes per peer per second
//! while converging and at rest, and the wall time the simulation took.
//! `MESH_BENCH_PEERS=100,1000` picks other sizes. The figures are simulated
//! (deterministic from the seed), so one run each is enough; the wall time is
//! the simulator's own speed. N = 5,000 alone takes about 31 minutes of one
//! core and 6.3 GiB (`MESH_BENCH_PEERS=5000 cargo bench -p mesh-proto
//! --bench gossip_sim`, or the `simulate` example with `--peers 5000`; see
//! the README's simulator section); `MESH_BENCH_PEERS=100,1000,2000` stays
//! within a few minutes.

use mesh_proto::sim::{run, SimConfig};
use std::time::Instant;

fn main() {
    // `cargo test --benches` runs benches with `--bench` absent: stay quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = match std::env::var("MESH_BENCH_PEERS") {
        Ok(s) => s.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) if quick => vec![50],
        Err(_) => vec![100, 1000, 5000],
    };
    for n in sizes {
        let start = Instant::now();
        let report = run(SimConfig::new(n, 1));
        println!("{report} wall_s={:.1}", start.elapsed().as_secs_f64());
    }
}
