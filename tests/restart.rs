//! A peer killed with SIGKILL and relaunched is a new session (issue 13,
//! part 2): once its neighbour holds a connection to the new session, it
//! seals with that session's keys only and has forgotten the dead one's;
//! the containers on both reach each other again within [`RECOVER`], with
//! the addresses they had before.
//!
//! Four cases: with and without a password, on the sleeve (`--no-fastdp`)
//! and with the fast path allowed (the default; a password keeps the fast
//! path off, so the encrypted cases both run on the sleeve). A fifth, with a
//! password, loses the dead daemon's FIN and RST on h2's way out: h1 still
//! holds the dead connection and its keys when the new one arrives (it
//! learns of the death when the old connection next carries a heartbeat or
//! gossip and h2's kernel answers with a reset).

mod common;

use common::*;
use std::time::{Duration, Instant};

/// How long the mesh may take to come up at first.
const SETUP: Duration = Duration::from_secs(30);
/// How long containers may take to reach each other again after the
/// relaunch (a poll deadline, not a measurement).
const RECOVER: Duration = Duration::from_secs(10);
/// The password of the encrypted cases.
const PASSWORD: &str = "restart-s3cret";

/// Two hosts launched with `opts` (h2 joins h1), a container on each with
/// an allocated address; h2's daemon is killed with SIGKILL and launched
/// again at once; both containers must ping each other within [`RECOVER`]
/// and keep their addresses. With `goodbye_lost`, the FIN and RST that h2's
/// kernel sends for the dead daemon's connection are dropped, so that h1
/// still holds the dead session when the new one arrives.
fn sigkill_and_relaunch(test: &str, range: &str, opts: &[&str], goodbye_lost: bool) {
    let Some(mut w) = World::new(test) else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    let mut args1 = vec!["--ipalloc-range", range];
    args1.extend_from_slice(opts);
    let mut args2 = args1.clone();
    args2.push("198.18.0.1");
    w.launch(&h1, &args1);
    w.launch(&h2, &args2);
    for (h, c) in [(&h1, &c1), (&h2, &c2)] {
        w.attach_net(h, c, range);
    }
    let (e1, ip1) = h1.attached(&c1.name).expect("c1 attached with an address");
    let (e2, ip2) = h2.attached(&c2.name).expect("c2 attached with an address");
    let (k1, k2) = (c1.ethmesh_addrs(), c2.ethmesh_addrs());
    wait_ping(&c1, &ip2, SETUP);
    wait_ping(&c2, &ip1, SETUP);

    // SIGKILL: nothing of h2's daemon says goodbye.
    if goodbye_lost {
        let drop = "add table inet restarttest { chain out { type filter hook output priority 0; tcp flags & (fin | rst) != 0 drop; }; }";
        let out = run(&mut h2.command("nft", &[drop]), SETUP);
        assert!(out.status.success(), "nft on h2: {}", show(&out));
    }
    let pid = h2.daemon_pid().expect("h2 pid");
    let kill_at = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(killed, "kill -KILL {pid}");
    wait_until(SETUP, "h2's daemon exits", || exited(pid));
    if goodbye_lost {
        let out = run(
            &mut h2.command("nft", &["delete", "table", "inet", "restarttest"]),
            SETUP,
        );
        assert!(out.status.success(), "nft on h2: {}", show(&out));
    }
    w.launch(&h2, &args2);
    let relaunched = Instant::now();
    let result = std::panic::catch_unwind(|| {
        wait_ping(&c1, &ip2, RECOVER);
        wait_ping(&c2, &ip1, RECOVER);
    });
    if let Err(e) = result {
        eprintln!(
            "--- h1 log ---\n{}\n--- h2 log ---\n{}\n--- h1 status ---\n{}",
            h1.log_tail(40),
            h2.log_tail(40),
            h1.try_status().unwrap_or_else(|e| e)
        );
        std::panic::resume_unwind(e);
    }
    // A report, not an assertion: the bound above is the test.
    eprintln!(
        "{test}: containers ping both ways {:?} after `mesh launch` returned, {:?} after the kill",
        relaunched.elapsed(),
        kill_at.elapsed()
    );
    assert_eq!(h1.attached(&c1.name), Some((e1, ip1)), "c1's entry on h1");
    assert_eq!(h2.attached(&c2.name), Some((e2, ip2)), "c2's entry on h2");
    assert_eq!(c1.ethmesh_addrs(), k1, "c1's kernel addresses");
    assert_eq!(c2.ethmesh_addrs(), k2, "c2's kernel addresses");
}

/// Whether every thread of `pid` is gone. A killed process's leader is a
/// zombie while its other threads still exit, holding its sockets (a
/// relaunch then finds TCP 6783 in use).
fn exited(pid: i32) -> bool {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    !pid_alive(pid) && threads <= 1
}

#[test]
fn sigkilled_peer_relaunched_sleeve() {
    sigkill_and_relaunch("restart_sleeve", "198.19.40.0/24", &["--no-fastdp"], false);
}

#[test]
fn sigkilled_peer_relaunched_fastdp() {
    sigkill_and_relaunch("restart_fastdp", "198.19.41.0/24", &[], false);
}

#[test]
fn sigkilled_peer_relaunched_sleeve_encrypted() {
    sigkill_and_relaunch(
        "restart_sleeve_encrypted",
        "198.19.42.0/24",
        &["--no-fastdp", "--password", PASSWORD],
        false,
    );
}

#[test]
fn sigkilled_peer_relaunched_encrypted() {
    sigkill_and_relaunch(
        "restart_encrypted",
        "198.19.43.0/24",
        &["--password", PASSWORD],
        false,
    );
}

#[test]
fn sigkilled_peer_relaunched_goodbye_lost() {
    sigkill_and_relaunch(
        "restart_goodbye_lost",
        "198.19.44.0/24",
        &["--password", PASSWORD],
        true,
    );
}
