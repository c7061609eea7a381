//! Crashes at every write (issue 17, part 3), on real daemons.
//!
//! For each state file the daemon writes — `identity.key`, `ipam.bin`,
//! `names.bin`, `targets.json`, `containers.json` — and each point of
//! `persist::write_atomic` — `before-rename` (the temporary file written
//! and fsynced, the old file still in place) and `after-rename` (the new
//! file in place, the directory not yet fsynced) — the daemon kills itself
//! with SIGKILL there (the test hook `MESH_TEST_CRASH_AT`), and is launched
//! again without the hook. Then:
//!
//! - it starts: no file is refused or moved aside (an atomic write leaves
//!   the old or the new contents, never a torn file);
//! - what was promised before the crash (a command that answered success)
//!   still holds: the containers attached keep their addresses and names,
//!   the targets connected stay targets;
//! - nothing is held twice or leaked: every `vmesh*` interface belongs to
//!   a container `mesh ps` lists and the other way round; this peer's IPAM
//!   holds exactly the addresses of its attached containers (owned − free
//!   of `mesh status ipam`); a container attached afterwards gets an
//!   address no container holds, on this host or the other one;
//! - every attached container that has a name (`--name`) is found by it;
//! - after `after-rename`, the new contents are the ones used (the renamed
//!   identity, the new target); after `before-rename`, the old ones.
//!
//! Each case is its own test (they run in parallel), with its own range
//! inside 198.19.0.0/16.

mod common;

use common::*;
use std::process::{Command, Output};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

/// The two points of a write at which the hook crashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    BeforeRename,
    AfterRename,
}

impl Point {
    fn hook(self, file: &str, nth: u32) -> String {
        let p = match self {
            Point::BeforeRename => "before-rename",
            Point::AfterRename => "after-rename",
        };
        format!("{file}:{p}:{nth}")
    }
}

/// Whether every thread of `pid` is gone (a killed leader is a zombie while
/// its threads exit, still holding the ports).
fn exited(pid: i32) -> bool {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    !pid_alive(pid) && threads <= 1
}

/// `mesh launch ARGS` on `h` with `MESH_TEST_CRASH_AT=hook`, any outcome.
fn launch_hooked(h: &Host, args: &[&str], hook: &str) -> Output {
    let mut all = vec!["launch"];
    all.extend_from_slice(args);
    run(
        h.command(MESH, &all).env("MESH_TEST_CRASH_AT", hook),
        LAUNCH_TIMEOUT,
    )
}

/// `mesh launch ARGS` on `h` with `hook`, which must kill the daemon
/// during the launch (the command fails, the daemon is gone).
fn launch_dies(h: &Host, args: &[&str], hook: &str) {
    let out = launch_hooked(h, args, hook);
    assert!(
        !out.status.success(),
        "launch survived {hook}: {}",
        show(&out)
    );
    wait_crashed(h, hook);
}

/// Waits until the hook has killed `h`'s daemon (it must: else the write
/// the case is about never happened).
fn wait_crashed(h: &Host, hook: &str) {
    wait_until(
        DEADLINE,
        &format!("{}'s daemon dies at {hook}", h.name),
        || h.daemon_pid().is_none_or(exited),
    );
}

/// `mesh attach net:SUBNET --name NAME PATH` on `h`, any outcome.
fn try_attach(h: &Host, c: &Container, subnet: &str) -> Output {
    let net = format!("net:{subnet}");
    h.mesh_timeout(&["attach", &net, "--name", &c.name, &c.path], DEADLINE)
}

/// The address an attach printed, if it succeeded.
fn attached_ip(out: &Output) -> Option<String> {
    out.status
        .success()
        .then(|| first_addr(&String::from_utf8_lossy(&out.stdout)))
}

/// Files of `h`'s data dir moved aside as corrupt.
fn moved_aside(h: &Host) -> Vec<String> {
    std::fs::read_dir(&h.data_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".corrupt-"))
                .collect()
        })
        .unwrap_or_default()
}

/// The `vmesh*` interfaces in `h`'s namespace.
fn veths(h: &Host) -> Vec<String> {
    let out = run(
        Command::new("ip").args(["-n", &h.ns, "-o", "link", "show"]),
        CMD_TIMEOUT,
    );
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default().to_string())
        .filter(|n| n.starts_with("vmesh"))
        .collect();
    v.sort();
    v
}

/// This peer's (owned, free) from `mesh status ipam` (none before the ring
/// exists).
fn own_space(h: &Host) -> Option<(u64, u64)> {
    let ipam = h.mesh_ok(&["status", "ipam"]);
    let line = ipam.lines().find(|l| l.contains("(this peer)"))?;
    let owned = line.split_whitespace().nth(1)?.parse().ok()?;
    let free = line
        .split(',')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((owned, free))
}

/// Launches `h` again without the hook; it must start with no file moved
/// aside.
fn relaunch(w: &World, h: &Host, args: &[&str]) -> String {
    let name = w.launch(h, args);
    assert_eq!(
        moved_aside(h),
        Vec::<String>::new(),
        "{} moved a state file aside after a crash mid-write",
        h.name
    );
    name
}

/// The consistency every case ends with, on `h` (whose containers get
/// addresses from `range`): interfaces and `mesh ps` agree, the IPAM holds
/// exactly the attached addresses, every named container is found by its
/// name. Returns the attached containers' addresses.
fn check_consistent(h: &Host, range: &str) -> Vec<String> {
    let ps = h.ps();
    let net: ipnet::Ipv4Net = range.parse().expect("range");
    let mut ips: Vec<String> = ps
        .iter()
        .flat_map(|e| e.cidrs.iter())
        .filter_map(|c| c.split('/').next())
        .filter(|a| {
            a.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| net.contains(&a))
        })
        .map(str::to_string)
        .collect();
    ips.sort();
    let before = ips.len();
    ips.dedup();
    assert_eq!(
        before,
        ips.len(),
        "an address twice in mesh ps on {}",
        h.name
    );
    assert_eq!(
        veths(h).len(),
        ps.len(),
        "vmesh interfaces {:?} on {} do not match mesh ps {ps:?}",
        veths(h),
        h.name
    );
    // The reconciliation after the relaunch is asynchronous: poll.
    wait_for(
        DEADLINE,
        &format!("{}'s IPAM holds just its containers' addresses", h.name),
        || match own_space(h) {
            Some((owned, free)) if owned - free == ips.len() as u64 => Ok(()),
            None if ips.is_empty() => Ok(()),
            other => Err(format!(
                "(owned, free) {other:?} for {} attached: {ps:?}",
                ips.len()
            )),
        },
    );
    for e in &ps {
        let found = h.mesh(&["dns-lookup", &e.id]);
        let text = String::from_utf8_lossy(&found.stdout);
        for c in &e.cidrs {
            let ip = c.split('/').next().unwrap_or_default();
            assert!(
                text.lines().any(|l| l.trim() == ip),
                "container {} on {} is attached at {ip} but its name gives {}",
                e.id,
                h.name,
                show(&found)
            );
        }
    }
    ips
}

/// A new container on `h` gets an address no container holds (`held`).
fn fresh_address(w: &mut World, h: &Host, name: &str, range: &str, held: &[String]) -> String {
    let c = w.add_container(name);
    let ip = w.attach_net(h, &c, range);
    assert!(
        !held.contains(&ip),
        "{name} on {} got {ip}, already held ({held:?})",
        h.name
    );
    ip
}

// ---------------------------------------------------------------------------
// identity.key

/// A crash while the first launch writes the identity: the next launch
/// makes or uses a whole identity, keeps it, and the peer joins another.
fn identity(test: &str, range: &str, point: Point) {
    let Some(mut w) = World::new(test) else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    let args = ["--ipalloc-range", range];
    let hook = point.hook("identity.key", 1);
    launch_dies(&h1, &args, &hook);
    let key = h1.data_dir.join("identity.key");
    assert_eq!(
        key.exists(),
        point == Point::AfterRename,
        "identity.key after a crash at {hook}"
    );
    let name = relaunch(&w, &h1, &args);
    // The key on disk is whole and is the one used: the name survives.
    let pid = h1.daemon_pid().expect("pid");
    terminate(pid);
    wait_until(DEADLINE, "h1's daemon exits", || exited(pid));
    assert_eq!(relaunch(&w, &h1, &args), name, "h1's name after a relaunch");
    // The peer works: another joins it, containers on both talk.
    let mut a2 = args.to_vec();
    a2.push("198.18.0.1");
    w.launch(&h2, &a2);
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    let ip1 = w.attach_net(&h1, &c1, range);
    let ip2 = w.attach_net(&h2, &c2, range);
    assert_ne!(ip1, ip2);
    wait_ping(&c1, &ip2, DEADLINE);
    let peers = h2.mesh_ok(&["status", "peers"]);
    assert!(
        peers.contains(&name),
        "h2 does not know h1 as {name}: {peers}"
    );
}

#[test]
fn identity_before_rename() {
    identity(
        "crash_identity_before",
        "198.19.70.0/24",
        Point::BeforeRename,
    );
}

#[test]
fn identity_after_rename() {
    identity("crash_identity_after", "198.19.71.0/24", Point::AfterRename);
}

// ---------------------------------------------------------------------------
// ipam.bin

/// Two hosts share `range`; h1 holds c1 (promised). With the hook, h1's
/// next write of the ring — the ring's creation when `prime`, else an
/// attach that allocates — kills it. After the relaunch: c1 keeps its
/// address, the IPAM is consistent, and new containers on both hosts get
/// addresses nobody holds.
fn ipam(test: &str, range: &str, point: Point, prime: bool) {
    let Some(mut w) = World::new(test) else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    let args1 = ["--ipalloc-range", range];
    let args2 = ["--ipalloc-range", range, "198.18.0.1"];
    let hook = point.hook("ipam.bin", 1);
    let mut promised = Vec::new();
    let c1 = w.add_container("c1");
    if prime {
        // Fresh: the first write of the ring is its creation.
        let out = launch_hooked(&h1, &args1, &hook);
        assert!(out.status.success(), "launch h1: {}", show(&out));
        let _ = h1.mesh_timeout(&["prime"], DEADLINE);
        wait_crashed(&h1, &hook);
        relaunch(&w, &h1, &args1);
        w.launch(&h2, &args2);
    } else {
        w.launch(&h1, &args1);
        w.launch(&h2, &args2);
        let ip1 = w.attach_net(&h1, &c1, range);
        promised.push((c1.name.clone(), ip1));
        let pid = h1.daemon_pid().expect("pid");
        terminate(pid);
        wait_until(DEADLINE, "h1's daemon exits", || exited(pid));
        let out = launch_hooked(&h1, &args1, &hook);
        assert!(out.status.success(), "launch h1: {}", show(&out));
        let c3 = w.add_container("c3");
        let out = try_attach(&h1, &c3, range);
        eprintln!("{test}: attach during the crash: {}", show(&out));
        wait_crashed(&h1, &hook);
        relaunch(&w, &h1, &args1);
        if let Some(ip) = attached_ip(&out) {
            promised.push((c3.name.clone(), ip));
        }
    }
    for (c, ip) in &promised {
        assert_eq!(
            h1.attached(c).map(|(_, ip)| ip).as_ref(),
            Some(ip),
            "{c} lost its address on h1"
        );
    }
    let mut held = check_consistent(&h1, range);
    let c2 = w.add_container("c2");
    held.push(w.attach_net(&h2, &c2, range));
    let ip4 = fresh_address(&mut w, &h1, "c4", range, &held);
    held.push(ip4.clone());
    let ip5 = fresh_address(&mut w, &h2, "c5", range, &held);
    held.push(ip5);
    // Across hosts, no address is held twice.
    let mut all = check_consistent(&h1, range);
    all.extend(check_consistent(&h2, range));
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(n, all.len(), "an address held on both hosts: {all:?}");
    wait_ping(&c2, &ip4, DEADLINE);
}

#[test]
fn ipam_ring_creation_before_rename() {
    ipam(
        "crash_ipam_ring_before",
        "198.19.72.0/24",
        Point::BeforeRename,
        true,
    );
}

#[test]
fn ipam_ring_creation_after_rename() {
    ipam(
        "crash_ipam_ring_after",
        "198.19.73.0/24",
        Point::AfterRename,
        true,
    );
}

#[test]
fn ipam_allocation_before_rename() {
    ipam(
        "crash_ipam_alloc_before",
        "198.19.74.0/24",
        Point::BeforeRename,
        false,
    );
}

#[test]
fn ipam_allocation_after_rename() {
    ipam(
        "crash_ipam_alloc_after",
        "198.19.75.0/24",
        Point::AfterRename,
        false,
    );
}

// ---------------------------------------------------------------------------
// names.bin and containers.json

/// One host; c1 attached with a name (promised). With the hook, the next
/// write of `file` after a relaunch — an attach of c2 with a name — kills
/// the daemon. After the relaunch: c1 keeps its address and name; c2 is
/// attached with its address and name, or not at all (and its address is
/// free again); the IPAM is consistent.
fn attach_case(test: &str, range: &str, file: &str, point: Point) {
    let Some(mut w) = World::new(test) else {
        return;
    };
    let h1 = w.add_host();
    let args = ["--ipalloc-range", range];
    w.launch(&h1, &args);
    let c1 = w.add_container("c1");
    let ip1 = w.attach_net(&h1, &c1, range);
    let pid = h1.daemon_pid().expect("pid");
    terminate(pid);
    wait_until(DEADLINE, "h1's daemon exits", || exited(pid));
    let hook = point.hook(file, 1);
    let out = launch_hooked(&h1, &args, &hook);
    assert!(out.status.success(), "launch h1: {}", show(&out));
    let c2 = w.add_container("c2");
    let out = try_attach(&h1, &c2, range);
    eprintln!("{test}: attach during the crash: {}", show(&out));
    wait_crashed(&h1, &hook);
    relaunch(&w, &h1, &args);
    assert_eq!(h1.attached(&c1.name).map(|(_, ip)| ip), Some(ip1.clone()));
    if let Some(ip2) = attached_ip(&out) {
        assert_eq!(
            h1.attached(&c2.name).map(|(_, ip)| ip),
            Some(ip2),
            "c2's attach answered success, then c2 was lost"
        );
    }
    // Whether c2 survived is decided by the point of the crash.
    let kept = h1.attached(&c2.name).is_some();
    if file == "containers.json" {
        assert_eq!(
            kept,
            point == Point::AfterRename,
            "c2 attached after a crash at {hook}"
        );
    }
    let held = check_consistent(&h1, range);
    let ip3 = fresh_address(&mut w, &h1, "c3", range, &held);
    wait_ping(&c1, &ip3, DEADLINE);
}

#[test]
fn names_before_rename() {
    attach_case(
        "crash_names_before",
        "198.19.76.0/24",
        "names.bin",
        Point::BeforeRename,
    );
}

#[test]
fn names_after_rename() {
    attach_case(
        "crash_names_after",
        "198.19.77.0/24",
        "names.bin",
        Point::AfterRename,
    );
}

#[test]
fn containers_before_rename() {
    attach_case(
        "crash_containers_before",
        "198.19.78.0/24",
        "containers.json",
        Point::BeforeRename,
    );
}

#[test]
fn containers_after_rename() {
    attach_case(
        "crash_containers_after",
        "198.19.79.0/24",
        "containers.json",
        Point::AfterRename,
    );
}

// ---------------------------------------------------------------------------
// targets.json

/// The targets in `mesh status targets` on `h`.
fn targets(h: &Host) -> String {
    h.mesh_ok(&["status", "targets"])
}

/// A crash in the launch's write of the targets, then one in a
/// `mesh connect`'s: the relaunch starts, a target connected before stays,
/// the one being added is there after `after-rename` only.
fn targets_case(test: &str, range: &str, point: Point) {
    let Some(mut w) = World::new(test) else {
        return;
    };
    let h1 = w.add_host();
    let args = ["--ipalloc-range", range, "198.18.0.7"];
    // The launch writes the targets first.
    let hook = point.hook("targets.json", 1);
    launch_dies(&h1, &args, &hook);
    relaunch(&w, &h1, &args);
    assert!(targets(&h1).contains("198.18.0.7"), "{}", targets(&h1));
    h1.mesh_ok(&["connect", "198.18.0.8"]);
    let pid = h1.daemon_pid().expect("pid");
    terminate(pid);
    wait_until(DEADLINE, "h1's daemon exits", || exited(pid));

    // Then in a `mesh connect` (the launch's write is the first).
    let hook = point.hook("targets.json", 2);
    let out = launch_hooked(&h1, &["--ipalloc-range", range], &hook);
    assert!(out.status.success(), "launch h1: {}", show(&out));
    let out = h1.mesh(&["connect", "198.18.0.9"]);
    assert!(
        !out.status.success(),
        "connect survived {hook}: {}",
        show(&out)
    );
    wait_crashed(&h1, &hook);
    relaunch(&w, &h1, &["--ipalloc-range", range]);
    let t = targets(&h1);
    assert!(t.contains("198.18.0.7") && t.contains("198.18.0.8"), "{t}");
    assert_eq!(
        t.contains("198.18.0.9"),
        point == Point::AfterRename,
        "the target being added after a crash at {hook}: {t}"
    );
    // The peer still works (its targets are never reached, so its ring
    // waits: no allocation here).
    let status = h1.status();
    assert!(status.contains("Connections"), "{status}");
    check_consistent(&h1, range);
}

#[test]
fn targets_before_rename() {
    targets_case(
        "crash_targets_before",
        "198.19.80.0/24",
        Point::BeforeRename,
    );
}

#[test]
fn targets_after_rename() {
    targets_case("crash_targets_after", "198.19.81.0/24", Point::AfterRename);
}
