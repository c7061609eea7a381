//! Hosts and containers: the `mesh` CLI on a host, a container namespace.

use super::consts::*;
use super::process::*;

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
    /// `MESH_DOCKER_PLUGIN_DIR`: under the run dir, so that parallel tests'
    /// plugins do not meet; `/run/docker/plugins` where a test's dockerd
    /// must find one.
    pub plugin_dir: PathBuf,
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
            .env("MESH_DATA_DIR", &self.data_dir)
            .env("MESH_DOCKER_PLUGIN_DIR", &self.plugin_dir);
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

    /// Whether this host's daemon (by its pid file) is alive.
    pub fn daemon_running(&self) -> bool {
        self.daemon_pid().is_some_and(pid_alive)
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

/// `dig` inside `c` against the mesh's DNS: the A answers, sorted.
pub fn dig_a(c: &Container, name: &str) -> Vec<String> {
    let out = c.exec(
        "dig",
        &["@127.0.0.11", "+time=3", "+tries=1", "+short", name, "A"],
        Duration::from_secs(15),
    );
    let mut answers: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .map(String::from)
        .collect();
    answers.sort();
    answers
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

/// The address (without prefix length) of the first CIDR an attach
/// printed; empty if none.
pub fn first_addr(printed: &str) -> String {
    printed
        .trim()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string()
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
