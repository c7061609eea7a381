//! Running mesh as a service: its log and systemd.
//!
//! - `--log-format json`: every line of `mesh.log` is a JSON object with a
//!   timestamp, a level and fields (the message among them);
//! - in the background `mesh.log` is size-capped (`MESH_LOG_MAX_BYTES`):
//!   it rotates to `mesh.log.1` and `mesh.log.2`, never more files, each
//!   within the cap, records never cut, and the daemon writes on into the
//!   new `mesh.log`;
//! - `mesh launch --foreground` under a `$NOTIFY_SOCKET` (a unix datagram
//!   socket the test binds, as systemd does) sends `READY=1` once
//!   `mesh status` answers and `STOPPING=1` on `mesh stop`;
//! - a `MESH_LOG_MAX_BYTES` that is no number is one clear error;
//! - `contrib/mesh.service` passes `systemd-analyze verify`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;

/// How long a burst of activity may take to fill the log.
const LOG_DEADLINE: Duration = Duration::from_secs(90);
/// The log cap the rotation test sets.
const TINY_CAP: u64 = 16 * 1024;

/// Every non-empty line of `path`, parsed as JSON; panics naming the file
/// and line on the first that is not a JSON object with a timestamp, a
/// level and fields.
#[track_caller]
fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("{} line {}: not JSON ({e}): {l:?}", path.display(), i + 1)
            });
            let ok = v.get("timestamp").is_some_and(|t| t.is_string())
                && v.get("level")
                    .and_then(|l| l.as_str())
                    .is_some_and(|l| ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&l))
                && v.get("fields").is_some_and(|f| f.is_object());
            assert!(
                ok,
                "{} line {}: a JSON log line needs timestamp, level and fields: {l}",
                path.display(),
                i + 1
            );
            v
        })
        .collect()
}

/// The `fields.message` of a JSON log line.
fn message(v: &serde_json::Value) -> &str {
    v.pointer("/fields/message")
        .and_then(|m| m.as_str())
        .unwrap_or("")
}

/// `mesh stop` on `host`, then a bounded wait until its daemon is gone.
#[track_caller]
fn stop(host: &Host) {
    let pid = host.daemon_pid().expect("daemon pid");
    host.mesh_ok(&["stop"]);
    wait_until(
        Duration::from_secs(15),
        "the daemon exits after mesh stop",
        || !pid_alive(pid),
    );
}

/// `--log-format json`: a launch, an attach, a stop; every line of
/// `mesh.log` parses, and the start and the stop are there.
#[test]
fn json_log_lines_parse() {
    let Some(mut w) = World::new("json_log_lines_parse") else {
        return;
    };
    let h1 = w.add_host();
    let c1 = w.add_container("c1");
    w.launch(
        &h1,
        &[
            "--nickname",
            "h1",
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ],
    );
    w.attach(&h1, &c1, "198.19.1.1/24");
    h1.mesh_ok(&["detach", &c1.path]);
    stop(&h1);

    let lines = json_lines(&h1.run_dir.join("mesh.log"));
    let started = lines
        .iter()
        .find(|v| message(v) == "mesh started")
        .unwrap_or_else(|| panic!("no \"mesh started\" record among {} lines", lines.len()));
    assert_eq!(
        started.pointer("/fields/nickname").and_then(|n| n.as_str()),
        Some("h1"),
        "the start record's fields: {started}"
    );
    assert!(
        lines.iter().any(|v| message(v).starts_with("stopping")),
        "no stopping record in mesh.log"
    );
}

/// `mesh.log` with `.N` appended.
fn numbered(run_dir: &Path, n: usize) -> PathBuf {
    run_dir.join(format!("mesh.log.{n}"))
}

/// A tiny cap and debug logging: attaches and detaches until the log has
/// rotated at least twice; then there are `mesh.log`, `.1` and `.2` and no
/// `.3`, each within the cap and whole JSON lines, and the daemon's last
/// words (its stop) are in the current `mesh.log`.
#[test]
fn background_log_rotates_at_its_cap() {
    let Some(mut w) = World::new("background_log_rotates_at_its_cap") else {
        return;
    };
    let h1 = w.add_host();
    let c1 = w.add_container("c1");
    let out = run(
        h1.command(
            MESH,
            &["launch", "--log-format", "json", "--log-level", "debug"],
        )
        .env("MESH_LOG_MAX_BYTES", TINY_CAP.to_string()),
        LAUNCH_TIMEOUT,
    );
    assert!(out.status.success(), "mesh launch: {}", show(&out));
    // The world stops the daemon by the PID in mesh.pid.
    let mut rounds = 0;
    wait_until(LOG_DEADLINE, "mesh.log rotates twice", || {
        rounds += 1;
        w.attach(&h1, &c1, "198.19.1.1/24");
        h1.mesh_ok(&["detach", &c1.path]);
        numbered(&h1.run_dir, 2).exists()
    });
    eprintln!("rotated twice after {rounds} attach/detach rounds");
    stop(&h1);

    assert!(
        !numbered(&h1.run_dir, 3).exists(),
        "more than two rotated files are kept"
    );
    for path in [
        h1.run_dir.join("mesh.log"),
        numbered(&h1.run_dir, 1),
        numbered(&h1.run_dir, 2),
    ] {
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .len();
        assert!(
            len <= TINY_CAP,
            "{} is {len} bytes, over the cap of {TINY_CAP}",
            path.display()
        );
        json_lines(&path);
    }
    let current = json_lines(&h1.run_dir.join("mesh.log"));
    assert!(
        current.iter().any(|v| message(v).starts_with("stopping")),
        "the stop was not logged into the new mesh.log"
    );
}

/// A cap that is no number stops the launch with one line naming the
/// variable, and no daemon stays.
#[test]
fn bad_log_cap_is_one_clear_error() {
    let Some(mut w) = World::new("bad_log_cap_is_one_clear_error") else {
        return;
    };
    let h1 = w.add_host();
    let out = run(
        h1.command(MESH, &["launch"])
            .env("MESH_LOG_MAX_BYTES", "ten megabytes"),
        LAUNCH_TIMEOUT,
    );
    let line = assert_one_line_error(
        &out,
        "mesh launch with MESH_LOG_MAX_BYTES=\"ten megabytes\"",
    );
    assert!(
        line.contains("MESH_LOG_MAX_BYTES"),
        "the error does not name MESH_LOG_MAX_BYTES: {line:?}"
    );
    assert!(
        !h1.daemon_running(),
        "a daemon runs after the failed launch"
    );
}

/// Kills the foreground daemon (by its PID) if the test ends before it
/// exits.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            terminate(self.0.id() as i32);
            let _ = self.0.wait();
        }
    }
}

/// Receives datagrams on `sock` until one has the line `line`; returns the
/// datagram.
#[track_caller]
fn receive_line(sock: &UnixDatagram, line: &str, child: &mut Child) -> String {
    let mut seen = Vec::new();
    wait_for(LAUNCH_TIMEOUT, &format!("{line} on $NOTIFY_SOCKET"), || {
        let mut buf = [0u8; 4096];
        match sock.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if text.lines().any(|l| l == line) {
                    return Ok(text);
                }
                seen.push(text);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the daemon exited ({status}) before {line}; received {seen:?}");
        }
        Err(format!("received {seen:?}"))
    })
}

/// systemd's side of `Type=notify`: `READY=1` (with the daemon's PID) once
/// `mesh status` answers, `STOPPING=1` on `mesh stop`, then exit 0.
#[test]
fn foreground_daemon_notifies_systemd() {
    let Some(mut w) = World::new("foreground_daemon_notifies_systemd") else {
        return;
    };
    let h1 = w.add_host();
    let sock_path = w.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("read timeout");
    let log = std::fs::File::create(w.dir.join("foreground.log")).expect("create log");
    let child = h1
        .command(MESH, &["launch", "--foreground", "--nickname", "h1"])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("spawn mesh launch --foreground");
    let mut guard = ChildGuard(child);

    let ready = receive_line(&sock, "READY=1", &mut guard.0);
    // Ready means answering: no wait here.
    let status = h1.status();
    let pid = h1.daemon_pid().expect("mesh.pid after READY=1");
    assert!(
        ready.lines().any(|l| l == format!("MAINPID={pid}")),
        "READY=1 without MAINPID={pid}: {ready:?}"
    );
    assert!(
        status.contains("h1"),
        "mesh status after READY=1 lacks the nickname:\n{status}"
    );

    // `mesh stop` waits for the daemon to be gone, and our child is gone
    // only once we reap it, as systemd would: stop on another thread.
    let stopped = std::thread::scope(|s| {
        let stopping = s.spawn(|| h1.mesh(&["stop"]));
        receive_line(&sock, "STOPPING=1", &mut guard.0);
        let exit = wait_child(&mut guard.0, Duration::from_secs(15))
            .expect("the foreground daemon exits after mesh stop");
        assert!(exit.success(), "the foreground daemon exited with {exit}");
        stopping.join().expect("mesh stop thread")
    });
    assert!(stopped.status.success(), "mesh stop: {}", show(&stopped));
}

/// `contrib/mesh.service` passes `systemd-analyze verify` (with `ExecStart`
/// pointed at the binary under test, since `/usr/bin/mesh` need not exist
/// here). Skipped, loudly, without `systemd-analyze`.
#[test]
fn systemd_unit_verifies() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("\n*** SKIPPED: systemd_unit_verifies: no systemd-analyze ***\n");
        return;
    }
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/mesh.service"))
            .expect("read contrib/mesh.service");
    for want in [
        "Type=notify",
        "EnvironmentFile=-/etc/default/mesh",
        "ExecStart=/usr/bin/mesh launch --foreground",
    ] {
        assert!(
            unit.lines().any(|l| l.starts_with(want)),
            "contrib/mesh.service lacks {want:?}"
        );
    }
    let dir = std::env::temp_dir().join(format!(
        "mesh-unit-{}-{}",
        std::process::id(),
        random_below(1 << 30)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("mesh.service");
    std::fs::write(&path, unit.replace("/usr/bin/mesh", MESH)).expect("write unit");
    let out = try_run(
        std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path),
        CMD_TIMEOUT,
    );
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify contrib/mesh.service: {}",
        show(&out)
    );
}
