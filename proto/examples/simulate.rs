//! Simulate a mesh of gossip cores and print its convergence figures.
//!
//! ```text
//! cargo run --release -p mesh-proto --example simulate -- --peers N [--seed S] [--loss P]
//!     [--churn RATE [--churn-secs D]]
//! ```
//!
//! Ends with exactly one line:
//! `peers=N converged_s=X bytes_per_peer_s=Y steady_bytes_per_peer_s=Z`,
//! then, with `--churn` (RATE peers leaving and as many joining per
//! simulated minute, for D simulated seconds, 120 by default, after the
//! steady minute) the churn figures
//! (`churn_leaves= churn_bytes_per_peer_s= join_known_s= join_known_max_s=
//! churn_converged_s=`, see `mesh_proto::sim::ChurnReport`), and last
//! `rss_mb=`, the process's peak resident memory (VmHWM), when known.

use mesh_proto::sim::{run_with_churn, Churn, SimConfig};
use std::process::ExitCode;
use std::time::Duration;

fn usage() -> ExitCode {
    eprintln!("usage: simulate --peers N [--seed S] [--loss P] [--churn RATE [--churn-secs D]]");
    ExitCode::from(2)
}

/// Peak resident memory in MB, from /proc/self/status (Linux).
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> ExitCode {
    let mut peers: Option<usize> = None;
    let mut seed: u64 = 1;
    let mut loss: f64 = 0.0;
    let mut churn: Option<f64> = None;
    let mut churn_secs: u64 = 120;
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
            "--churn" => v
                .parse::<f64>()
                .ok()
                .filter(|r| *r > 0.0 && r.is_finite())
                .map(|r| churn = Some(r))
                .is_some(),
            "--churn-secs" => v.parse().map(|d| churn_secs = d).is_ok(),
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
    let churn = churn.map(|per_min| Churn {
        per_min,
        duration: Duration::from_secs(churn_secs),
    });
    let (report, churned) = run_with_churn(cfg, churn);
    if report.converged_s.is_none() {
        eprintln!("simulate: did not converge within 120 simulated seconds (seed {seed})");
    }
    let mut line = report.to_string();
    if let Some(c) = &churned {
        if c.converged_s.is_none() {
            eprintln!(
                "simulate: did not converge within 120 simulated seconds after churn (seed {seed})"
            );
        }
        line += &format!(" {c}");
    }
    if let Some(mb) = peak_rss_mb() {
        line += &format!(" rss_mb={mb:.0}");
    }
    println!("{line}");
    let ok = report.converged_s.is_some() && churned.is_none_or(|c| c.converged_s.is_some());
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
