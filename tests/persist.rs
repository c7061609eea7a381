//! Persistence before promise (issue 15, item 5), on real daemons.
//!
//! - A corrupt `ipam.bin` and a truncated `names.bin`: the daemon moves
//!   both aside (one log line each), starts, re-learns its claims and names
//!   from its peer, and its attached container keeps its address; a new
//!   container gets another one (nothing handed out twice). Alone, with a
//!   truncated `ipam.bin`, it allocates nothing until `--ipalloc-timeout`
//!   (`mesh status ipam` says why), then claims its containers' addresses
//!   again before handing out any.
//! - A corrupt `identity.key`: the launch is refused with the `mv` command.
//! - A slow disk (`MESH_TEST_SAVE_DELAY_MS`): while the ring's save takes
//!   seconds, the router still answers, the connection stays up, and the
//!   allocation is answered once the save is done.
//! - A full disk (a 64 KiB tmpfs as the data dir): an allocation, a name
//!   (`mesh dns-add`) and a target (`mesh connect`) each fail with a clear
//!   error naming the file, `mesh status ipam` says why, what was promised
//!   before (an address, a container's name, a target) survives a SIGKILL,
//!   and allocation works again once there is room.
//!
//! Every range here is inside 198.19.0.0/16 (the tests' own addresses).

mod common;

use common::*;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(60);

/// Whether every thread of `pid` is gone (a killed leader is a zombie while
/// its threads exit, still holding the ports).
fn exited(pid: i32) -> bool {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    !pid_alive(pid) && threads <= 1
}

/// SIGKILL `h`'s daemon and wait until it is gone.
fn kill9(h: &Host) {
    let pid = h.daemon_pid().expect("daemon pid");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(killed, "kill -KILL {pid}");
    wait_until(DEADLINE, &format!("{}'s daemon exits", h.name), || {
        exited(pid)
    });
}

/// The whole log of `h`.
fn log(h: &Host) -> String {
    std::fs::read_to_string(h.run_dir.join("mesh.log")).unwrap_or_default()
}

/// Files in `h`'s data dir whose name starts with `prefix` and holds
/// `.corrupt-`.
fn moved_aside(h: &Host, prefix: &str) -> Vec<String> {
    std::fs::read_dir(&h.data_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix) && n.contains(".corrupt-"))
                .collect()
        })
        .unwrap_or_default()
}

/// `mesh attach net:SUBNET --name NAME PATH` on `h`, any outcome.
fn try_attach(h: &Host, c: &Container, subnet: &str) -> std::process::Output {
    let net = format!("net:{subnet}");
    h.mesh_timeout(&["attach", &net, "--name", &c.name, &c.path], DEADLINE)
}

#[test]
fn corrupt_ipam_and_truncated_names_are_moved_aside_and_relearned() {
    let Some(mut w) = World::new("persist_corrupt") else {
        return;
    };
    let range = "198.19.60.0/24";
    let h1 = w.add_host();
    let h2 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    let c3 = w.add_container("c3");
    let args1 = ["--ipalloc-range", range];
    let args2 = ["--ipalloc-range", range, "198.18.0.1"];
    w.launch(&h1, &args1);
    w.launch(&h2, &args2);
    let ip1 = w.attach_net(&h1, &c1, range);
    let ip2 = w.attach_net(&h2, &c2, range);
    wait_ping(&c1, &ip2, DEADLINE);
    // h1 holds h2's name for c2 (so that it can give it back).
    wait_until(DEADLINE, "h1 resolves c2", || {
        String::from_utf8_lossy(&h1.mesh(&["dns-lookup", "c2"]).stdout).contains(&ip2)
    });

    kill9(&h2);
    let ipam = h2.data_dir.join("ipam.bin");
    let names = h2.data_dir.join("names.bin");
    let mut bytes = std::fs::read(&ipam).expect("ipam.bin");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&ipam, &bytes).expect("corrupt ipam.bin");
    let bytes = std::fs::read(&names).expect("names.bin");
    std::fs::write(&names, &bytes[..bytes.len() / 2]).expect("truncate names.bin");

    w.launch(&h2, &args2);
    let text = log(&h2);
    assert!(
        text.contains("ipam.bin is corrupt") && text.contains("re-learning"),
        "no move-aside line for ipam.bin in h2's log:\n{}",
        h2.log_tail(40)
    );
    assert!(
        text.contains("names.bin is corrupt"),
        "no move-aside line for names.bin in h2's log:\n{}",
        h2.log_tail(40)
    );
    assert_eq!(
        moved_aside(&h2, "ipam.bin").len(),
        1,
        "ipam.bin moved aside"
    );
    assert_eq!(
        moved_aside(&h2, "names.bin").len(),
        1,
        "names.bin moved aside"
    );

    // c2 keeps its address and its name; traffic flows again.
    assert_eq!(h2.attached(&c2.name).map(|(_, ip)| ip), Some(ip2.clone()));
    wait_ping(&c1, &ip2, DEADLINE);
    wait_ping(&c2, &ip1, DEADLINE);
    wait_until(DEADLINE, "h2 resolves its own c2 again", || {
        String::from_utf8_lossy(&h2.mesh(&["dns-lookup", "c2"]).stdout).contains(&ip2)
    });

    // A new container on h2 gets an address nobody holds.
    let ip3 = w.attach_net(&h2, &c3, range);
    assert_ne!(ip3, ip2, "c3 got c2's address: h2 forgot its claim");
    assert_ne!(ip3, ip1, "c3 got c1's address");
    // h2's record, re-learned and rewritten, still holds c2's address: a
    // relaunch from the new (sealed) ipam.bin keeps both.
    kill9(&h2);
    w.launch(&h2, &args2);
    assert!(
        moved_aside(&h2, "ipam.bin").len() == 1,
        "no second move-aside"
    );
    assert_eq!(h2.attached(&c2.name).map(|(_, ip)| ip), Some(ip2.clone()));
    assert_eq!(h2.attached(&c3.name).map(|(_, ip)| ip), Some(ip3));
    wait_ping(&c1, &ip2, DEADLINE);
}

#[test]
fn alone_after_a_corrupt_ipam_bin_allocation_waits_then_skips_held_addresses() {
    let Some(mut w) = World::new("persist_alone") else {
        return;
    };
    let range = "198.19.64.0/24";
    let h1 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    let args = ["--ipalloc-range", range, "--ipalloc-timeout", "8s"];
    w.launch(&h1, &args);
    let ip1 = w.attach_net(&h1, &c1, range);
    kill9(&h1);
    let ipam = h1.data_dir.join("ipam.bin");
    let bytes = std::fs::read(&ipam).expect("ipam.bin");
    std::fs::write(&ipam, &bytes[..bytes.len() - 3]).expect("truncate ipam.bin");
    w.launch(&h1, &args);
    assert_eq!(
        moved_aside(&h1, "ipam.bin").len(),
        1,
        "ipam.bin moved aside"
    );
    // No peer to sync with: allocation waits for --ipalloc-timeout, and
    // `mesh status ipam` says why.
    let status = h1.mesh_ok(&["status", "ipam"]);
    assert!(
        status.contains("recovering") && status.contains("corrupt"),
        "mesh status ipam does not say why nothing is allocated: {status}"
    );
    wait_until(DEADLINE, "h1 ends its recovery", || {
        !h1.mesh_ok(&["status", "ipam"]).contains("recovering")
    });
    // c1's address was claimed again before anything was handed out.
    let ip2 = w.attach_net(&h1, &c2, range);
    assert_ne!(ip2, ip1, "c2 got c1's address after the corrupt ipam.bin");
    assert_eq!(h1.attached(&c1.name).map(|(_, ip)| ip), Some(ip1));
}

#[test]
fn a_corrupt_identity_key_is_refused_with_the_command_to_move_it() {
    let Some(mut w) = World::new("persist_identity") else {
        return;
    };
    let h1 = w.add_host();
    let args = ["--ipalloc-range", "198.19.61.0/24"];
    w.launch(&h1, &args);
    kill9(&h1);
    let key = h1.data_dir.join("identity.key");
    let mut bytes = std::fs::read(&key).expect("identity.key");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&key, &bytes).expect("corrupt identity.key");
    let out = w.try_launch(&h1, &args);
    let text = format!("{}{}", show(&out), log(&h1));
    assert!(!out.status.success(), "launched with a corrupt key: {text}");
    assert!(
        text.contains("identity.key is corrupt") && text.contains(&format!("mv {}", key.display())),
        "no clear refusal naming the command: {text}"
    );
}

#[test]
fn a_slow_save_does_not_stall_the_router_or_heartbeats() {
    let Some(mut w) = World::new("persist_slow") else {
        return;
    };
    let range = "198.19.62.0/24";
    let h1 = w.add_host();
    let h2 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    let c3 = w.add_container("c3");
    w.launch(&h1, &["--ipalloc-range", range]);
    // h2's disk takes 6 s per write of ipam.bin and names.bin.
    let delay = Duration::from_secs(6);
    let out = run(
        h2.command(MESH, &["launch", "--ipalloc-range", range, "198.18.0.1"])
            .env("MESH_TEST_SAVE_DELAY_MS", delay.as_millis().to_string()),
        LAUNCH_TIMEOUT,
    );
    assert!(out.status.success(), "launch h2: {}", show(&out));
    let ip1 = w.attach_net(&h1, &c1, range);
    wait_until(DEADLINE, "h1 and h2 connected", || {
        h1.mesh_ok(&["status", "connections"])
            .contains("established")
    });

    // An allocation on h2: its answer waits for the slow save, while the
    // router goes on serving status and the connection its heartbeats.
    let ip2 = slow_attach(&h2, &c2, range, || {});
    wait_ping(&c1, &ip2, DEADLINE);
    wait_ping(&c2, &ip1, DEADLINE);
    // Another, while traffic flows between c1 and c2.
    let mut lost = 0;
    let mut sent = 0;
    slow_attach(&h2, &c3, range, || {
        sent += 1;
        if !ping(&c1.ns, &ip2) {
            lost += 1;
        }
    });
    assert!(
        lost * 2 < sent,
        "{lost} of {sent} pings c1 -> c2 lost while h2 saved"
    );
    for (h, other) in [(&h1, "h2"), (&h2, "h1")] {
        assert!(
            !log(h).contains("connection lost"),
            "{}'s connection to {other} was lost during slow saves:\n{}",
            h.name,
            h.log_tail(40)
        );
    }
}

/// Attach `c` on `h` (whose saves are slow) in the background; until it
/// is answered, `h`'s router must answer `mesh status connections` within
/// 3 s each time, and `each` runs between. Returns the address.
fn slow_attach(h: &Host, c: &Container, range: &str, mut each: impl FnMut()) -> String {
    let attach = {
        let (h, c, range) = (h.clone(), c.clone(), range.to_string());
        std::thread::spawn(move || try_attach(&h, &c, &range))
    };
    let started = Instant::now();
    let mut answered = 0;
    while !attach.is_finished() && started.elapsed() < DEADLINE {
        let t = Instant::now();
        let status = try_run(
            &mut h.command(MESH, &["status", "connections"]),
            Duration::from_secs(3),
        );
        assert!(
            status
                .as_ref()
                .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("established")),
            "{}'s router did not answer status within 3 s, or lost its connection, while saving ({:?} into the attach): {status:?}",
            h.name,
            t.duration_since(started)
        );
        answered += 1;
        each();
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = attach.join().expect("attach thread");
    assert!(out.status.success(), "attach on {}: {}", h.name, show(&out));
    assert!(
        answered >= 3,
        "the attach was not slow: the hook did not apply"
    );
    first_addr(&String::from_utf8_lossy(&out.stdout))
}

/// The free addresses of this peer, from `mesh status ipam`
/// (`... N IPs (..), M free  (this peer)`).
fn own_free(h: &Host) -> String {
    let ipam = h.mesh_ok(&["status", "ipam"]);
    ipam.lines()
        .find(|l| l.contains("(this peer)"))
        .and_then(|l| l.split(',').nth(1))
        .map(|s| s.trim().split(' ').next().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("no line of this peer in {ipam}"))
}

/// Unmounts the tmpfs data dir when the test ends, however it ends.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_fails_the_allocation_clearly_and_loses_nothing() {
    let Some(mut w) = World::new("persist_full") else {
        return;
    };
    let range = "198.19.63.0/24";
    let h1 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&h1.data_dir)
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "mount a tmpfs on {}", h1.data_dir.display());
    let _unmount = Unmount(h1.data_dir.clone());
    let args = ["--ipalloc-range", range];
    w.launch(&h1, &args);
    let ip1 = w.attach_net(&h1, &c1, range);
    h1.mesh_ok(&["connect", "198.18.0.8"]);

    let free_before = own_free(&h1);
    assert!(
        free_before.parse::<u32>().is_ok(),
        "free count {free_before:?}"
    );
    // Fill the disk.
    let filler = h1.data_dir.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = [0u8; 4096];
        for _ in 0..64 {
            if f.write_all(&block).and_then(|_| f.sync_all()).is_err() {
                break;
            }
        }
    }
    let out = try_attach(&h1, &c2, range);
    let text = show(&out);
    assert!(
        !out.status.success(),
        "attach on a full disk succeeded: {text}"
    );
    assert!(
        text.contains("could not save") && text.contains("ipam.bin"),
        "no clear error: {text}"
    );
    let ipam = h1.mesh_ok(&["status", "ipam"]);
    assert!(
        ipam.contains("cannot save") && ipam.contains("ipam.bin"),
        "mesh status ipam does not say why: {ipam}"
    );
    assert!(
        log(&h1).matches("cannot save the address ring").count() == 1,
        "the failure is not logged exactly once:\n{}",
        h1.log_tail(40)
    );

    // A name and a target: refused as clearly.
    let out = h1.mesh(&["dns-add", "198.19.63.250", "-h", "full.example.test."]);
    let text = show(&out);
    assert!(
        !out.status.success() && text.contains("could not save") && text.contains("names.bin"),
        "dns-add on a full disk: {text}"
    );
    let out = h1.mesh(&["connect", "198.18.0.9"]);
    let text = show(&out);
    assert!(
        !out.status.success() && text.contains("could not save") && text.contains("targets"),
        "connect on a full disk: {text}"
    );
    let targets = h1.mesh_ok(&["status", "targets"]);
    assert!(
        !targets.contains("198.18.0.9"),
        "a refused target is kept: {targets}"
    );

    // What was promised survives a SIGKILL on the full disk.
    kill9(&h1);
    std::fs::remove_file(&filler).expect("free the disk");
    w.launch(&h1, &args);
    assert_eq!(h1.attached(&c1.name).map(|(_, ip)| ip), Some(ip1.clone()));
    let found = h1.mesh_ok(&["dns-lookup", &c1.name]);
    assert!(
        found.lines().any(|l| l.trim() == ip1),
        "c1's name after the full disk: {found}"
    );
    let targets = h1.mesh_ok(&["status", "targets"]);
    assert!(
        targets.contains("198.18.0.8") && !targets.contains("198.18.0.9"),
        "targets after the full disk: {targets}"
    );
    let ip2 = w.attach_net(&h1, &c2, range);
    assert_ne!(ip2, ip1, "c2 got c1's address");
}
