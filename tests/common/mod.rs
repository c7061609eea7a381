//! Harness for the integration tests: hosts and containers as network
//! namespaces, real `mesh` daemons in them, bounded waits, packet captures.
//!
//! A [`World`] is one test's private network: an underlay "switch" (a bridge
//! in its own namespace) and hosts joined to it by veth pairs, each host at
//! `198.18.0.N/24` on its `eth0`, with its own `MESH_RUN_DIR` and
//! `MESH_DATA_DIR`. Containers are further namespaces that a host's daemon
//! attaches. Every namespace and directory carries a prefix unique to the test
//! run, so tests run in parallel.
//!
//! Invariants the harness keeps (see `shared/TESTING.md`):
//! - dropping the `World` (also while unwinding from a failed assertion) stops
//!   every daemon it started by PID, deletes every namespace (and with them
//!   every link) and its temp dirs; on failure it first prints each host's
//!   `mesh status` and the tail of its `mesh.log`;
//! - every external command runs with a deadline and every wait is a bounded
//!   poll ([`wait_until`], [`wait_for`]); nothing sleeps blindly;
//! - only addresses from 198.18.0.0/15 are used.
#![allow(dead_code)] // each test binary uses a different subset

pub mod podman;

use std::cell::RefCell;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The `mesh` binary under test.
pub const MESH: &str = env!("CARGO_BIN_EXE_mesh");
/// The control (TCP) and sleeve (UDP) port.
pub const PORT: u16 = 6783;
/// Default deadline of a `mesh` command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of `mesh launch` (key generation, password derivation).
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(90);
/// Lines of `mesh.log` printed per host when a test fails.
const LOG_TAIL_LINES: usize = 60;

/// Serialises `ip netns add`: the first ones on a fresh machine race to set up
/// the shared `/run/netns` mount.
static NETNS_LOCK: Mutex<()> = Mutex::new(());
/// Makes scratch file names unique within this process.
static SCRATCH: AtomicU64 = AtomicU64::new(0);

/// Whether the tests run as root (they need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

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
fn is_mesh_process(pid: i32) -> bool {
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

fn netns_add(name: &str) {
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

// ---------------------------------------------------------------------------
// Hosts and containers

/// A test host: a network namespace on the underlay with its own mesh dirs.
#[derive(Clone, Debug)]
pub struct Host {
    /// Short name, `h1`, `h2`, ...
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its underlay address, `198.18.0.N`.
    pub ip: Ipv4Addr,
    /// `MESH_RUN_DIR`.
    pub run_dir: PathBuf,
    /// `MESH_DATA_DIR`.
    pub data_dir: PathBuf,
    /// Its underlay interface (inside its namespace).
    pub underlay_if: String,
}

impl Host {
    /// `ip netns exec <ns> <program> <args>` with this host's mesh environment
    /// and none of the caller's mesh settings.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program])
            .args(args)
            .env("MESH_RUN_DIR", &self.run_dir)
            .env("MESH_DATA_DIR", &self.data_dir);
        for var in ["MESH_PASSWORD", "WEAVE_PASSWORD", "MESH_CIDR", "WEAVE_CIDR"] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// `mesh ARGS...` on this host (any exit status).
    #[track_caller]
    pub fn mesh(&self, args: &[&str]) -> Output {
        self.mesh_timeout(args, CMD_TIMEOUT)
    }

    /// `mesh ARGS...` with a given deadline.
    #[track_caller]
    pub fn mesh_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        run(&mut self.command(MESH, args), timeout)
    }

    /// `mesh ARGS...`, which must exit 0; returns stdout.
    #[track_caller]
    pub fn mesh_ok(&self, args: &[&str]) -> String {
        let out = self.mesh(args);
        assert!(
            out.status.success(),
            "`mesh {}` on {} failed: {}",
            args.join(" "),
            self.name,
            show(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `mesh status` text if the command succeeds, else the failure.
    pub fn try_status(&self) -> Result<String, String> {
        let out = try_run(&mut self.command(MESH, &["status"]), CMD_TIMEOUT)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(show(&out))
        }
    }

    /// `mesh status`, which must succeed.
    #[track_caller]
    pub fn status(&self) -> String {
        self.mesh_ok(&["status"])
    }

    /// `mesh ps`, parsed.
    #[track_caller]
    pub fn ps(&self) -> Vec<PsEntry> {
        parse_ps(&self.mesh_ok(&["ps"]))
    }

    /// The `mesh ps` entry of container `id` and its first address (no
    /// prefix length), if it is attached with one.
    pub fn attached(&self, id: &str) -> Option<(PsEntry, String)> {
        let e = self.ps().into_iter().find(|e| e.id == id)?;
        let ip = e.cidrs.first()?.split('/').next()?.to_string();
        Some((e, ip))
    }

    /// The PID in `$MESH_RUN_DIR/mesh.pid`, if any.
    pub fn daemon_pid(&self) -> Option<i32> {
        fs::read_to_string(self.run_dir.join("mesh.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// The last `n` lines of `$MESH_RUN_DIR/mesh.log`.
    pub fn log_tail(&self, n: usize) -> String {
        match fs::read(self.run_dir.join("mesh.log")) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n")
            }
            Err(e) => format!("(no mesh.log: {e})"),
        }
    }
}

/// A container: a network namespace for a daemon to attach.
#[derive(Clone, Debug)]
pub struct Container {
    /// Short name, also passed as `--name`.
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// `/run/netns/<ns>`, the attach target.
    pub path: String,
}

impl Container {
    /// `ip -o -4 addr show dev ethmesh` inside the container (empty if none).
    pub fn ethmesh_addrs(&self) -> String {
        let out = run(
            Command::new("ip").args(["-n", &self.ns, "-o", "-4", "addr", "show", "dev", "ethmesh"]),
            CMD_TIMEOUT,
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The MAC address of `ethmesh` inside the container, if it exists.
    pub fn ethmesh_mac(&self) -> Option<String> {
        self.mac_of("ethmesh")
    }

    /// The MAC address of `ifname` inside the container, if it exists.
    pub fn mac_of(&self, ifname: &str) -> Option<String> {
        let out = run(
            Command::new("ip").args(["-n", &self.ns, "-o", "link", "show", "dev", ifname]),
            CMD_TIMEOUT,
        );
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        words.find(|w| *w == "link/ether")?;
        words.next().map(str::to_lowercase)
    }

    /// Runs `program args` inside the container with a deadline.
    pub fn exec(&self, program: &str, args: &[&str], timeout: Duration) -> Output {
        run(
            Command::new("ip")
                .args(["netns", "exec", &self.ns, program])
                .args(args),
            timeout,
        )
    }
}

/// One line of `mesh ps`: `ID MAC CIDR...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PsEntry {
    /// The container's id (its `--name` when given).
    pub id: String,
    /// The MAC of its `ethmesh`.
    pub mac: String,
    /// Its addresses.
    pub cidrs: Vec<String>,
}

/// Whether `s` looks like `xx:xx:xx:xx:xx:xx` (hex).
pub fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Parses `mesh ps` output; lines whose second word is not a MAC (a header,
/// say) are skipped.
pub fn parse_ps(text: &str) -> Vec<PsEntry> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() < 2 || !is_mac(words[1]) {
                return None;
            }
            Some(PsEntry {
                id: words[0].to_string(),
                mac: words[1].to_lowercase(),
                cidrs: words[2..].iter().map(|w| w.to_string()).collect(),
            })
        })
        .collect()
}

/// `ping -c1 -W1 IP` inside namespace `ns`: whether a reply came.
pub fn ping(ns: &str, ip: &str) -> bool {
    ping_args(ns, ip, &["-c1", "-W1"])
}

/// `ping -c3 -W1` (bounded by `-w 5`): whether any reply came.
pub fn ping3(ns: &str, ip: &str) -> bool {
    ping_args(ns, ip, &["-c3", "-W1", "-w5"])
}

/// One ping whose payload (`size` bytes) repeats the hex `pattern`.
pub fn ping_pattern(ns: &str, ip: &str, pattern: &str, size: usize) -> bool {
    let size = size.to_string();
    ping_args(ns, ip, &["-c1", "-W1", "-p", pattern, "-s", &size])
}

fn ping_args(ns: &str, ip: &str, args: &[&str]) -> bool {
    try_run(
        Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-n", "-q"])
            .args(args)
            .arg(ip),
        Duration::from_secs(15),
    )
    .map(|o| o.status.success())
    .unwrap_or(false)
}

/// Waits (at most `timeout`) until `from` gets a ping reply from `ip`.
#[track_caller]
pub fn wait_ping(from: &Container, ip: &str, timeout: Duration) {
    wait_until(timeout, &format!("{} pings {ip}", from.name), || {
        ping(&from.ns, ip)
    });
}

// ---------------------------------------------------------------------------
// The world

/// One test's private network; cleans up everything when dropped.
pub struct World {
    /// The test's name, for messages.
    pub test: String,
    /// Prefix of every namespace and temp dir of this run.
    pub prefix: String,
    /// The run's temp dir.
    pub dir: PathBuf,
    switch_ns: String,
    hosts: Vec<Host>,
    containers: Vec<Container>,
    daemon_pids: RefCell<Vec<i32>>,
}

impl World {
    /// A new, empty underlay for `test`; `None` (after saying so loudly) when
    /// not running as root.
    pub fn new(test: &str) -> Option<World> {
        if !is_root() {
            eprintln!("\n*** SKIPPED (needs root): {test} ***\n");
            return None;
        }
        let r = random_bytes(3);
        let prefix = format!("mt{:02x}{:02x}{:02x}", r[0], r[1], r[2]);
        let dir = std::env::temp_dir().join(&prefix);
        fs::create_dir_all(&dir).expect("create test dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod test dir");
        eprintln!("{test}: namespaces and files prefixed {prefix}");
        let switch_ns = format!("{prefix}-sw");
        let world = World {
            test: test.to_string(),
            prefix,
            dir,
            switch_ns: switch_ns.clone(),
            hosts: Vec::new(),
            containers: Vec::new(),
            daemon_pids: RefCell::new(Vec::new()),
        };
        // From here on, the guard cleans up whatever was made.
        netns_add(&switch_ns);
        ip(&["-n", &switch_ns, "link", "set", "lo", "up"]);
        ip(&["-n", &switch_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch_ns, "link", "set", "br0", "up"]);
        Some(world)
    }

    /// Adds host `hN` at `198.18.0.N/24`, joined to the switch.
    pub fn add_host(&mut self) -> Host {
        let n = self.hosts.len() + 1;
        assert!(n < 255, "too many hosts");
        let name = format!("h{n}");
        let ns = format!("{}-{name}", self.prefix);
        let host_dir = self.dir.join(&name);
        let run_dir = host_dir.join("run");
        let data_dir = host_dir.join("data");
        fs::create_dir_all(&run_dir).expect("create run dir");
        fs::create_dir_all(&data_dir).expect("create data dir");
        let host = Host {
            name: name.clone(),
            ns: ns.clone(),
            ip: Ipv4Addr::new(198, 18, 0, n as u8),
            run_dir,
            data_dir,
            underlay_if: "eth0".to_string(),
        };
        netns_add(&ns);
        self.hosts.push(host.clone());
        let sw = self.switch_ns.as_str();
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        // Both ends are created directly inside their namespaces, so no name
        // ever appears in the root namespace.
        ip(&[
            "-n", sw, "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["-n", sw, "link", "set", &name, "master", "br0", "up"]);
        let cidr = format!("{}/24", host.ip);
        ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        host
    }

    /// Adds an empty container namespace `<prefix>-<name>` (loopback up).
    pub fn add_container(&mut self, name: &str) -> Container {
        let ns = format!("{}-{name}", self.prefix);
        let c = Container {
            name: name.to_string(),
            path: format!("/run/netns/{ns}"),
            ns: ns.clone(),
        };
        netns_add(&ns);
        self.containers.push(c.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        c
    }

    /// A namespace path under this run's prefix that does not exist.
    pub fn missing_netns_path(&self) -> String {
        format!("/run/netns/{}-does-not-exist", self.prefix)
    }

    /// `mesh launch ARGS...` on `host`, whatever the outcome; the daemon's PID
    /// (if it wrote one) is remembered for clean-up.
    #[track_caller]
    pub fn try_launch(&self, host: &Host, args: &[&str]) -> Output {
        let mut all = vec!["launch"];
        all.extend_from_slice(args);
        let out = try_run(&mut host.command(MESH, &all), LAUNCH_TIMEOUT);
        if let Some(pid) = host.daemon_pid() {
            self.daemon_pids.borrow_mut().push(pid);
        }
        out.unwrap_or_else(|e| panic!("mesh launch on {}: {e}", host.name))
    }

    /// `mesh launch ARGS...` on `host`, which must succeed; returns the peer
    /// name it printed.
    #[track_caller]
    pub fn launch(&self, host: &Host, args: &[&str]) -> String {
        let out = self.try_launch(host, args);
        assert!(
            out.status.success(),
            "mesh launch {} on {} failed: {}",
            args.join(" "),
            host.name,
            show(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let name = stdout
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("")
            .to_string();
        assert!(
            is_mac(&name),
            "mesh launch on {} printed {stdout:?}, not a peer name xx:xx:xx:xx:xx:xx",
            host.name
        );
        let pid = host
            .daemon_pid()
            .unwrap_or_else(|| panic!("no mesh.pid in {} after launch", host.run_dir.display()));
        assert!(
            pid_alive(pid),
            "daemon {pid} of {} is not running",
            host.name
        );
        name
    }

    /// `mesh attach ip:CIDR --name <c.name> <c.path>` on `host`, which must
    /// succeed and print `cidr` on a line of its own.
    #[track_caller]
    pub fn attach(&self, host: &Host, c: &Container, cidr: &str) {
        let addr = format!("ip:{cidr}");
        let out = host.mesh(&["attach", &addr, "--name", &c.name, &c.path]);
        assert!(
            out.status.success(),
            "attach {cidr} to {} on {}: {}",
            c.name,
            host.name,
            show(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.lines().any(|l| l.trim() == cidr),
            "attach printed {stdout:?}, no line {cidr:?}"
        );
    }

    /// `mesh attach net:SUBNET --name <c.name> <c.path>` on `host`, which
    /// must succeed with an address in `subnet`; returns the address (no
    /// prefix length). An allocated address, unlike a fixed one, need not
    /// lie in `host`'s own part of the range.
    #[track_caller]
    pub fn attach_net(&self, host: &Host, c: &Container, subnet: &str) -> String {
        let net: ipnet::Ipv4Net = subnet.parse().expect("a subnet");
        let addr = format!("net:{subnet}");
        let out = host.mesh_ok(&["attach", &addr, "--name", &c.name, &c.path]);
        let ip = out.trim().split('/').next().unwrap_or_default().to_string();
        assert!(
            ip.parse::<Ipv4Addr>().is_ok_and(|a| net.contains(&a)),
            "attach {addr} to {} on {} printed {out:?}",
            c.name,
            host.name
        );
        ip
    }

    /// `n` hosts `h1..hn`, each with one container `c1..cn` (neither
    /// launched nor attached).
    pub fn add_hosts_with_containers(&mut self, n: usize) -> (Vec<Host>, Vec<Container>) {
        let hosts = (0..n).map(|_| self.add_host()).collect();
        let containers = (1..=n)
            .map(|i| self.add_container(&format!("c{i}")))
            .collect();
        (hosts, containers)
    }

    /// Attaches container `i` to host `i` at `198.19.1.<i+1>/24`; returns
    /// the container addresses (without prefix), in order.
    #[track_caller]
    pub fn attach_each(&self, hosts: &[Host], containers: &[Container]) -> Vec<String> {
        hosts
            .iter()
            .zip(containers)
            .enumerate()
            .map(|(i, (h, c))| {
                let ip = format!("198.19.1.{}", i + 1);
                self.attach(h, c, &format!("{ip}/24"));
                ip
            })
            .collect()
    }

    /// Starts capturing everything on `host`'s underlay interface.
    #[track_caller]
    pub fn capture(&self, host: &Host) -> Capture {
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let file = self.dir.join(format!("{}-{n}.pcap", host.name));
        let errfile = self.dir.join(format!("{}-{n}.tcpdump.err", host.name));
        let err = File::create(&errfile).expect("create tcpdump log");
        let file_s = file.to_string_lossy().into_owned();
        // -Z root: keep root so tcpdump can write into our root-owned dir;
        // --immediate-mode and -U: hand over and write each packet at once.
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &host.ns,
                "tcpdump",
                "-Z",
                "root",
                "--immediate-mode",
                "-n",
                "-i",
            ])
            .arg(&host.underlay_if)
            .args(["-s", "0", "-U", "-w", &file_s])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn tcpdump (is it installed? scripts/test.sh installs it)");
        let mut cap = Capture {
            child: Some(child),
            ns: host.ns.clone(),
            broadcast: Ipv4Addr::new(198, 18, 0, 255),
            file,
            errfile,
        };
        // tcpdump says "listening on ..." once the capture is open.
        wait_for(Duration::from_secs(15), "tcpdump listens", || {
            let log = fs::read_to_string(&cap.errfile).unwrap_or_default();
            if log.contains("listening on") {
                return Ok(());
            }
            match cap.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => panic!("tcpdump exited ({status}): {log}"),
                _ => Err(log),
            }
        });
        cap
    }

    /// Cuts `host`'s underlay off from the hosts at `others` (nftables drop
    /// rules in its namespace, both directions); [`World::heal`] undoes it.
    #[track_caller]
    pub fn partition(&self, host: &Host, others: &[Ipv4Addr]) {
        let set = others
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet meshtest {{
                chain in {{ type filter hook input priority 0; ip saddr {{ {set} }} drop; }}
                chain out {{ type filter hook output priority 0; ip daddr {{ {set} }} drop; }}
            }}"
        );
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{}-{n}.nft", host.name));
        fs::write(&path, rules).expect("write nft rules");
        let out = run(
            &mut host.command("nft", &["-f", &path.to_string_lossy()]),
            CMD_TIMEOUT,
        );
        assert!(out.status.success(), "nft on {}: {}", host.name, show(&out));
    }

    /// Removes the rules of [`World::partition`] from `host`.
    #[track_caller]
    pub fn heal(&self, host: &Host) {
        let out = run(
            &mut host.command("nft", &["delete", "table", "inet", "meshtest"]),
            CMD_TIMEOUT,
        );
        assert!(out.status.success(), "nft on {}: {}", host.name, show(&out));
    }

    /// Every host made so far.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Nothing in here may panic: a panic while unwinding aborts the run.
        if std::thread::panicking() {
            eprintln!("===== {} FAILED; state of its hosts =====", self.test);
            for h in &self.hosts {
                let status = match h.daemon_pid() {
                    Some(pid) if pid_alive(pid) => {
                        let mut text = String::new();
                        for args in [
                            &["status"][..],
                            &["status", "peers"][..],
                            &["status", "ipam"][..],
                        ] {
                            match try_run(&mut h.command(MESH, args), Duration::from_secs(5)) {
                                Ok(out) => text.push_str(&show(&out)),
                                Err(e) => text.push_str(&e),
                            }
                        }
                        text
                    }
                    _ => "(daemon not running)".to_string(),
                };
                eprintln!("----- {} ({}) mesh status -----\n{status}", h.name, h.ns);
                eprintln!(
                    "----- {} mesh.log (last {LOG_TAIL_LINES} lines) -----\n{}",
                    h.name,
                    h.log_tail(LOG_TAIL_LINES)
                );
            }
            eprintln!("===== end of {} =====", self.test);
        }
        let mut pids = self.daemon_pids.borrow().clone();
        pids.extend(self.hosts.iter().filter_map(Host::daemon_pid));
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            if is_mesh_process(pid) {
                terminate(pid);
            }
        }
        let namespaces = self
            .containers
            .iter()
            .map(|c| c.ns.clone())
            .chain(self.hosts.iter().map(|h| h.ns.clone()))
            .chain(std::iter::once(self.switch_ns.clone()));
        for ns in namespaces {
            match try_run(
                Command::new("ip").args(["netns", "del", &ns]),
                Duration::from_secs(10),
            ) {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!("cleanup: ip netns del {ns}: {}", show(&out)),
                Err(e) => eprintln!("cleanup: {e}"),
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup: rm -r {}: {e}", self.dir.display());
        }
    }
}

// ---------------------------------------------------------------------------
// Packet capture

/// A running `tcpdump`; stopped by PID on [`Capture::stop`] or when dropped.
pub struct Capture {
    child: Option<Child>,
    /// Namespace of the captured host.
    ns: String,
    /// Broadcast address of its underlay.
    broadcast: Ipv4Addr,
    file: PathBuf,
    errfile: PathBuf,
}

impl Capture {
    /// Stops tcpdump and returns what it captured.
    /// tcpdump may still hold packets it has not written, so this first
    /// broadcasts a marker datagram out of the captured interface until the
    /// marker shows in the file: everything before it is then written too.
    #[track_caller]
    pub fn stop(mut self) -> Pcap {
        let marker = random_bytes(16);
        let ns = self.ns.clone();
        wait_for(
            Duration::from_secs(15),
            "the capture records its end marker",
            || {
                in_netns(&ns, || -> Result<(), String> {
                    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
                    s.set_broadcast(true).map_err(|e| e.to_string())?;
                    s.send_to(&marker, (self.broadcast, 9))
                        .map_err(|e| e.to_string())?;
                    Ok(())
                })?;
                let pcap = self.read()?;
                if pcap.contains(&marker) {
                    Ok(())
                } else {
                    Err(format!("marker not yet in capture: {}", pcap.summary()))
                }
            },
        );
        self.halt();
        self.read().unwrap_or_else(|e| panic!("{e}"))
    }

    fn read(&self) -> Result<Pcap, String> {
        let bytes = fs::read(&self.file)
            .map_err(|e| format!("read capture {}: {e}", self.file.display()))?;
        parse_pcap(&bytes).map_err(|e| {
            format!(
                "capture {}: {e}; tcpdump said: {}",
                self.file.display(),
                fs::read_to_string(&self.errfile).unwrap_or_default()
            )
        })
    }

    fn halt(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            if wait_child(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The packets of a classic pcap file.
#[derive(Debug)]
pub struct Pcap {
    /// Link-layer type (1: Ethernet, 113: Linux cooked).
    pub linktype: u32,
    /// Every packet's captured bytes.
    pub packets: Vec<Vec<u8>>,
}

/// Parses a classic pcap file (either byte order, µs or ns timestamps). A
/// record cut short at the end is dropped.
pub fn parse_pcap(b: &[u8]) -> Result<Pcap, String> {
    if b.len() < 24 {
        return Err(format!("pcap of {} bytes has no header", b.len()));
    }
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        m if matches!(m.swap_bytes(), 0xa1b2_c3d4 | 0xa1b2_3c4d) => false,
        m => return Err(format!("not a pcap file (magic {m:#x})")),
    };
    let rd = |off: usize| {
        let w = [b[off], b[off + 1], b[off + 2], b[off + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let linktype = rd(20) & 0xffff;
    let mut packets = Vec::new();
    let mut off = 24;
    while off + 16 <= b.len() {
        let incl = rd(off + 8) as usize;
        let start = off + 16;
        let Some(end) = start.checked_add(incl).filter(|&e| e <= b.len()) else {
            break;
        };
        packets.push(b[start..end].to_vec());
        off = end;
    }
    Ok(Pcap { linktype, packets })
}

fn be16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(off)?, *b.get(off + 1)?]))
}

/// Whether `needle` occurs in `hay`.
pub fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

impl Pcap {
    /// The IPv4 packet inside a captured frame, if it is one.
    fn ipv4<'a>(&self, pkt: &'a [u8]) -> Option<&'a [u8]> {
        let (mut ethertype_at, l2) = match self.linktype {
            1 => (12, 14),
            113 => (14, 16),
            _ => return None,
        };
        let mut l2 = l2;
        if be16(pkt, ethertype_at)? == 0x8100 {
            ethertype_at += 4;
            l2 += 4;
        }
        (be16(pkt, ethertype_at)? == 0x0800).then(|| pkt.get(l2..))?
    }

    /// Source and destination ports of a UDP/IPv4 packet (first fragment).
    pub fn udp_ports(&self, pkt: &[u8]) -> Option<(u16, u16)> {
        let ip = self.ipv4(pkt)?;
        let ihl = usize::from(ip.first()? & 0x0f) * 4;
        let frag_offset = be16(ip, 6)? & 0x1fff;
        if *ip.get(9)? != 17 || frag_offset != 0 {
            return None;
        }
        Some((be16(ip, ihl)?, be16(ip, ihl + 2)?))
    }

    /// Number of UDP packets from or to `port`.
    pub fn udp_count(&self, port: u16) -> usize {
        self.packets
            .iter()
            .filter(|p| {
                self.udp_ports(p)
                    .is_some_and(|(s, d)| s == port || d == port)
            })
            .count()
    }

    /// Whether any captured packet contains `pattern`.
    pub fn contains(&self, pattern: &[u8]) -> bool {
        self.packets.iter().any(|p| contains_bytes(p, pattern))
    }

    /// A one-line summary for failure messages.
    pub fn summary(&self) -> String {
        format!(
            "{} packets (linktype {}), {} UDP/{PORT}, {} UDP/{}",
            self.packets.len(),
            self.linktype,
            self.udp_count(PORT),
            self.udp_count(PORT + 1),
            PORT + 1
        )
    }
}

/// Asserts a CLI failure as the contract wants it: non-zero exit, exactly one
/// non-empty line on stderr, no panic or backtrace. Returns that line.
#[track_caller]
pub fn assert_one_line_error(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what}: expected a failure, got {}",
        show(out)
    );
    assert!(
        out.status.code().is_some(),
        "{what}: killed by a signal: {}",
        show(out)
    );
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(
            !stderr.contains(bad),
            "{what}: stderr has {bad:?}: {stderr}"
        );
    }
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && !lines[0].trim().is_empty(),
        "{what}: stderr must be exactly one non-empty line, got {} lines: {stderr:?}",
        lines.len()
    );
    lines[0].to_string()
}

/// Path of a copy of the `mesh` binary that any user may run (the build dir
/// may not be reachable for an unprivileged user).
pub fn world_readable_mesh(dir: &Path) -> PathBuf {
    let dest = dir.join("mesh");
    fs::copy(MESH, &dest).expect("copy mesh binary");
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).expect("chmod mesh copy");
    dest
}

// ---------------------------------------------------------------------------
// The data path: overlays, bulk transfers

/// How long a connection may take to settle on an overlay (fast-path probes
/// every 0.5 s; a dead path is noticed after 3 s).
pub const OVERLAY_DEADLINE: Duration = Duration::from_secs(30);

/// The overlays of `host`'s established connections, with their reasons,
/// from `mesh report`.
pub fn overlays(host: &Host) -> Result<Vec<(String, Option<String>)>, String> {
    let out = try_run(&mut host.command(MESH, &["report"]), CMD_TIMEOUT)?;
    if !out.status.success() {
        return Err(show(&out));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("report is not JSON: {e}"))?;
    let conns = v["connections"].as_array().cloned().unwrap_or_default();
    Ok(conns
        .iter()
        .filter(|c| c["state"] == "established")
        .map(|c| {
            (
                c["overlay"].as_str().unwrap_or("").to_string(),
                c["overlay_info"].as_str().map(str::to_string),
            )
        })
        .collect())
}

/// Waits until `host` has an established connection on `overlay` (and
/// none on another); returns its reason.
#[track_caller]
pub fn wait_overlay(host: &Host, overlay: &str) -> Option<String> {
    wait_for(
        OVERLAY_DEADLINE,
        &format!("{}'s connection uses the {overlay}", host.name),
        || {
            let o = overlays(host)?;
            match o.as_slice() {
                [(got, why)] if got == overlay => Ok(why.clone()),
                _ => Err(format!("{o:?}")),
            }
        },
    )
}

/// Waits until `host`'s VXLAN device has an FDB entry for `c`'s MAC.
#[track_caller]
pub fn wait_programmed(host: &Host, c: &Container) {
    let mac = c.ethmesh_mac().expect("container MAC");
    wait_for(
        OVERLAY_DEADLINE,
        &format!("{} programs {}'s MAC {mac}", host.name, c.name),
        || {
            let out = try_run(
                Command::new("bridge").args(["-n", &host.ns, "fdb", "show", "dev", "vxmesh"]),
                CMD_TIMEOUT,
            )?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let dst = text
                .lines()
                .any(|l| l.starts_with(&mac) && l.contains(" dst "));
            let master = text
                .lines()
                .any(|l| l.starts_with(&mac) && l.contains("master"));
            if dst && master {
                Ok(())
            } else {
                Err(text)
            }
        },
    );
}

/// `mesh report` of `host`, parsed; panics if it fails.
#[track_caller]
pub fn report(host: &Host) -> serde_json::Value {
    let out = host.mesh_ok(&["report"]);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("report of {} is not JSON: {e}", host.name))
}

/// The byte at offset `i` of a bulk stream (not periodic in 2^n, so a
/// chunk lost, repeated or swapped shows).
pub fn bulk_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// The longest run in `hay` of consecutive bytes of the bulk stream (at any
/// phase): 64 or more means the stream is there in clear.
pub fn longest_bulk_run(hay: &[u8]) -> usize {
    let (mut best, mut run) = (0usize, 0usize);
    for (i, &b) in hay.iter().enumerate() {
        let follows = i > 0 && hay[i - 1] < 251 && b == bulk_byte(u64::from(hay[i - 1]) + 1);
        run = if b >= 251 {
            0
        } else if follows {
            run + 1
        } else {
            1
        };
        best = best.max(run);
    }
    best
}

/// Sends `bytes` of the bulk stream over TCP from inside container `from` to
/// a listener at `addr` (`IP:PORT`) inside container `to`, and asserts that
/// exactly `bytes` arrived, every one the right value. Socket reads and writes
/// time out after 20 s without progress. Returns how long the transfer took
/// (for messages only).
#[track_caller]
pub fn bulk_tcp(from: &Container, to: &Container, addr: &str, bytes: u64) -> Duration {
    use std::io::Write;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    let sock: SocketAddr = addr
        .parse()
        .unwrap_or_else(|e| panic!("bulk_tcp address {addr:?}: {e}"));
    let io_timeout = Some(Duration::from_secs(20));
    let listener = in_netns(&to.ns, || TcpListener::bind(sock))
        .unwrap_or_else(|e| panic!("listen on {addr} in {}: {e}", to.name));
    let start = Instant::now();
    let (received, first_bad) = std::thread::scope(|s| {
        let server = s.spawn(|| {
            listener
                .set_nonblocking(true)
                .expect("nonblocking listener");
            let mut conn = wait_for(
                Duration::from_secs(15),
                "the bulk connection is accepted",
                || match listener.accept() {
                    Ok((c, _)) => Ok(c),
                    Err(e) => Err(e.to_string()),
                },
            );
            conn.set_nonblocking(false).expect("blocking connection");
            conn.set_read_timeout(io_timeout).expect("timeout");
            let mut buf = vec![0u8; 1 << 16];
            let (mut n, mut first_bad) = (0u64, None);
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => {
                        if first_bad.is_none() {
                            first_bad = buf[..k]
                                .iter()
                                .enumerate()
                                .find(|&(j, &b)| b != bulk_byte(n + j as u64))
                                .map(|(j, _)| n + j as u64);
                        }
                        n += k as u64;
                    }
                    Err(e) => panic!("reading the bulk stream after {n} bytes: {e}"),
                }
            }
            (n, first_bad)
        });
        let sent = in_netns(&from.ns, || {
            let mut conn = match TcpStream::connect_timeout(&sock, Duration::from_secs(10)) {
                Ok(c) => c,
                Err(e) => return Err(format!("connect from {} to {addr}: {e}", from.name)),
            };
            conn.set_write_timeout(io_timeout).expect("timeout");
            let chunk: Vec<u8> = (0..(1u64 << 16)).map(bulk_byte).collect();
            let mut sent = 0u64;
            while sent < bytes {
                // 2^16 is not a multiple of 251: send from the right phase.
                let phase = (sent % 251) as usize;
                let k = (bytes - sent).min(chunk.len() as u64 - 251) as usize;
                if let Err(e) = conn.write_all(&chunk[phase..phase + k]) {
                    return Err(format!("sending after {sent} bytes: {e}"));
                }
                sent += k as u64;
            }
            Ok(sent)
        });
        let got = server.join();
        if let Err(e) = sent {
            panic!("bulk TCP {} -> {} ({addr}): {e}", from.name, to.name);
        }
        got.unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
    let took = start.elapsed();
    assert_eq!(
        received, bytes,
        "bulk TCP {} -> {} ({addr}): bytes received",
        from.name, to.name
    );
    assert_eq!(
        first_bad, None,
        "bulk TCP {} -> {} ({addr}): first corrupted byte at this offset",
        from.name, to.name
    );
    took
}

impl Pcap {
    /// The UDP payload of a UDP/IPv4 packet (first fragment; as captured).
    pub fn udp_payload<'a>(&self, pkt: &'a [u8]) -> Option<&'a [u8]> {
        let ip = self.ipv4(pkt)?;
        let ihl = usize::from(ip.first()? & 0x0f) * 4;
        let frag_offset = be16(ip, 6)? & 0x1fff;
        if *ip.get(9)? != 17 || frag_offset != 0 {
            return None;
        }
        ip.get(ihl + 8..)
    }

    /// Bytes of the UDP packets (whole frames as captured) from or to `port`.
    pub fn udp_bytes(&self, port: u16) -> u64 {
        self.packets
            .iter()
            .filter(|p| {
                self.udp_ports(p)
                    .is_some_and(|(s, d)| s == port || d == port)
            })
            .map(|p| p.len() as u64)
            .sum()
    }
}
