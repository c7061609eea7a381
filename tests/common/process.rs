//! Running commands with deadlines, bounded waits, processes and namespaces.

use super::consts::*;

// ---------------------------------------------------------------------------
// Running commands with deadlines

/// An anonymous file (created, then unlinked) to collect a child's output.
/// Files, not pipes: a daemon that inherits a pipe would keep it open and make
/// the reader wait forever.
fn scratch_file() -> std::io::Result<File> {
    let path = std::env::temp_dir().join(format!(
        "mesh-test-{}-{}.out",
        std::process::id(),
        SCRATCH.fetch_add(1, Ordering::Relaxed)
    ));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    fs::remove_file(&path)?;
    Ok(f)
}

fn read_back(mut f: File) -> Vec<u8> {
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(0)).is_ok() {
        let _ = f.read_to_end(&mut buf);
    }
    buf
}

/// Polls `child` until it exits or `timeout` passes.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return None;
        }
        std::thread::sleep(pause.min(timeout - elapsed));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Runs `cmd` to completion with a deadline; on timeout the child is killed
/// (by its PID) and an error returned. Never panics.
pub fn try_run(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let (out, err) = match (scratch_file(), scratch_file()) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => return Err(format!("scratch file: {e}")),
    };
    let (out2, err2) = match (out.try_clone(), err.try_clone()) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => return Err(format!("dup: {e}")),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out2))
        .stderr(Stdio::from(err2));
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    match wait_child(&mut child, timeout) {
        Some(status) => Ok(Output {
            status,
            stdout: read_back(out),
            stderr: read_back(err),
        }),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "{cmd:?} did not finish within {timeout:?}; stdout: {} stderr: {}",
                String::from_utf8_lossy(&read_back(out)),
                String::from_utf8_lossy(&read_back(err)),
            ))
        }
    }
}

/// Runs `cmd` with a deadline; panics if it cannot be run or times out.
#[track_caller]
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    try_run(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `program args...` and panics unless it exits 0.
#[track_caller]
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(Command::new(program).args(args), CMD_TIMEOUT);
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip ARGS...`, which must succeed.
#[track_caller]
pub fn ip(args: &[&str]) -> String {
    run_ok("ip", args)
}

/// Stdout and stderr of `out`, for failure messages.
pub fn show(out: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------
// Bounded waiting

/// Polls `f` (backing off from 20 ms to 200 ms) until it returns `Ok`, and
/// returns that value; panics after `timeout` with `what` and the last error.
#[track_caller]
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        let last = match f() {
            Ok(v) => return v,
            Err(e) => e,
        };
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            panic!("timed out after {timeout:?} waiting until {what}; last: {last}");
        }
        std::thread::sleep(pause.min(timeout - elapsed));
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Polls `f` until it returns true; panics with `what` after `timeout`.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    wait_for(timeout, what, || {
        if f() {
            Ok(())
        } else {
            Err("condition still false".to_string())
        }
    })
}

// ---------------------------------------------------------------------------
// Processes

/// Whether `pid` names a live process (a zombie counts as gone: an orphaned
/// daemon may never be reaped inside a container).
pub fn pid_alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may hold spaces.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => state != "Z" && state != "X",
        None => false,
    }
}

/// Whether `pid` runs the binary we test (guards against PID reuse).
pub(super) fn is_mesh_process(pid: i32) -> bool {
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with("mesh"))
        })
        .unwrap_or(false)
}

fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    while pid_alive(pid) {
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    true
}

/// Stops process `pid`: SIGTERM, a bounded wait, then SIGKILL. Never panics.
pub fn terminate(pid: i32) {
    if !pid_alive(pid) {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if !wait_gone(pid, Duration::from_secs(5)) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        wait_gone(pid, Duration::from_secs(3));
    }
}

/// A PID that belonged to a process which has exited (and been reaped).
#[track_caller]
pub fn dead_pid() -> i32 {
    let mut child = Command::new("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn true");
    let pid = i32::try_from(child.id()).expect("pid fits i32");
    wait_child(&mut child, CMD_TIMEOUT).expect("`true` exits");
    assert!(!pid_alive(pid), "pid {pid} still alive");
    pid
}

// ---------------------------------------------------------------------------
// Namespaces

/// Runs `f` on a thread that has entered network namespace `ns` (a name under
/// `/run/netns`), and returns its result. Panics in `f` propagate.
#[track_caller]
pub fn in_netns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> R {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    std::thread::scope(|s| {
        let handle = s.spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        });
        handle
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

pub(super) fn netns_add(name: &str) {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ip(&["netns", "add", name]);
}

/// `len` random bytes from the OS.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    getrandom::fill(&mut b).expect("getrandom");
    b
}

/// A random number in `0..n` (n > 0); uniformity is not important here.
pub fn random_below(n: usize) -> usize {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("getrandom");
    (u64::from_le_bytes(b) % n as u64) as usize
}

/// Whether the tests run as root (they need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
