//! Simulate a mesh of gossip cores and print its convergence figures.
//!
//! ```text
//! cargo run --release -p mesh-proto --example simulate -- --peers N [--seed S] [--loss P]
//! ```
//!
//! Ends with exactly one line:
//! `peers=N converged_s=X bytes_per_peer_s=Y steady_bytes_per_peer_s=Z`.

use mesh_proto::sim::{run, SimConfig};
use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: simulate --peers N [--seed S] [--loss P]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut peers: Option<usize> = None;
    let mut seed: u64 = 1;
    let mut loss: f64 = 0.0;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let Some(v) = args.next() else {
            return usage();
        };
        let ok = match a.as_str() {
            "--peers" => v.parse().map(|n| peers = Some(n)).is_ok(),
            "--seed" => v.parse().map(|s| seed = s).is_ok(),
            "--loss" => v
                .parse::<f64>()
                .ok()
                .filter(|p| (0.0..1.0).contains(p))
                .map(|p| loss = p)
                .is_some(),
            _ => false,
        };
        if !ok {
            eprintln!("simulate: bad argument {a} {v}");
            return usage();
        }
    }
    let Some(peers) = peers.filter(|&n| n >= 1) else {
        return usage();
    };
    let mut cfg = SimConfig::new(peers, seed);
    cfg.loss = loss;
    eprintln!("simulate: {peers} peers, seed {seed}, loss {loss}");
    let report = run(cfg);
    if report.converged_s.is_none() {
        eprintln!("simulate: did not converge within 120 simulated seconds (seed {seed})");
    }
    println!("{report}");
    if report.converged_s.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
