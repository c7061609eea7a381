//! The command line (clap). Each subcommand either talks to the daemon over
//! the control socket ([`crate::api`]) or, for `launch`, starts it. Errors
//! come back as `anyhow` values and are printed by `main` as one line.

use crate::api::{self, unexpected, Request, Response};
use crate::attach::addr;
use crate::{daemon, paths};
use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;

/// How long a CLI call waits for the daemon.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// mesh: a container network for Linux hosts, in the tradition of Weave Net.
#[derive(Parser, Debug)]
#[command(name = "mesh", version, disable_version_flag = true)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start the daemon in this network namespace and join the given peers.
    Launch(Box<LaunchArgs>),
    /// Stop the daemon (state, bridge and attached containers are kept).
    Stop,
    /// Hand our address space to a live peer, detach every container, stop,
    /// and remove all state and the bridge.
    Reset,
    /// Take over a dead peer's address space (agreed by a majority of the
    /// ring; never by one side of a partition alone).
    Rmpeer {
        /// Peer name (aa:bb:cc:dd:ee:ff) or nickname.
        #[arg(value_name = "NAME")]
        peer: String,
    },
    /// Create the address ring now instead of on the first allocation.
    Prime,
    /// Show this peer's state, or one part of it.
    Status {
        /// `peers`, `connections`, `ipam`, `dns` or `targets`.
        #[arg(value_enum)]
        what: Option<StatusPart>,
    },
    /// The whole state as JSON (field names are stable; see README).
    Report,
    /// Add connection targets (persisted) and connect to them.
    Connect {
        /// `HOST` or `HOST:PORT`.
        #[arg(required = true, value_name = "PEER[:PORT]")]
        peers: Vec<String>,
    },
    /// Remove connection targets (existing connections stay until they drop).
    Forget {
        /// As given to `mesh connect` or `mesh launch`.
        #[arg(required = true, value_name = "PEER[:PORT]")]
        peers: Vec<String>,
    },
    /// Attach a container: `mesh attach [ADDR...] [--name NAME] TARGET`.
    Attach {
        /// Container name (shown by `mesh ps`).
        #[arg(long)]
        name: Option<String>,
        /// ADDRs (`ip:CIDR`, `CIDR`, `net:CIDR`, `net:default`, `none`), then
        /// TARGET (a PID or a network-namespace path).
        #[arg(required = true, num_args = 1.., value_name = "ADDR... TARGET")]
        args: Vec<String>,
    },
    /// Detach a container: `mesh detach [ADDR...] TARGET`.
    Detach {
        /// ADDRs to release (all when none), then TARGET.
        #[arg(required = true, num_args = 1.., value_name = "ADDR... TARGET")]
        args: Vec<String>,
    },
    /// Run CMD in new network, UTS and mount namespaces, attached to the
    /// mesh; release it when CMD exits. Exits with CMD's status.
    Run {
        /// Container name: its hostname, `mesh ps` id and DNS name.
        #[arg(long)]
        name: Option<String>,
        /// Environment for CMD, `KEY=VALUE` (`WEAVE_CIDR`/`MESH_CIDR` here
        /// choose the addresses when no ADDR is given).
        #[arg(short = 'e', long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// ADDRs (`net:CIDR`, `net:default`, `ip:CIDR`, `none`).
        #[arg(value_name = "ADDR")]
        addrs: Vec<String>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Register names: `dns-add [IP...] TARGET [-h FQDN]` (the container's
    /// name, or FQDN, for its addresses or these), or `dns-add IP... -h FQDN`.
    #[command(name = "dns-add", disable_help_flag = true)]
    DnsAdd(DnsArgs),
    /// Remove names, in the forms of `dns-add`.
    #[command(name = "dns-remove", disable_help_flag = true)]
    DnsRemove(DnsArgs),
    /// Print the addresses the mesh's DNS answers for NAME.
    #[command(name = "dns-lookup")]
    DnsLookup {
        /// A name (a single label gets the domain appended).
        name: String,
    },
    /// Give this host an address on the bridge in each subnet (default
    /// `net:default`) and print it: the host reaches the subnet's
    /// containers on every host, their traffic out is masqueraded, and
    /// outside hosts routing the subnet via this one reach them.
    Expose {
        /// `net:CIDR`, `net:default` or `ip:CIDR`.
        #[arg(value_name = "ADDR")]
        addrs: Vec<String>,
    },
    /// Undo `mesh expose` (all exposed subnets when no ADDR is given).
    Hide {
        /// `net:CIDR`, `ip:CIDR`, or nothing for all.
        #[arg(value_name = "ADDR")]
        addrs: Vec<String>,
    },
    /// List attached containers: `ID MAC CIDR...`.
    Ps,
    /// Print the shell commands that point the `docker` CLI at the mesh's
    /// Docker API proxy (`eval $(mesh env)`), or, with `--restore`, back
    /// where it pointed before.
    Env {
        /// Restore the previous `DOCKER_HOST` (saved in `ORIG_DOCKER_HOST`).
        #[arg(long)]
        restore: bool,
    },
    /// Show versions of the binary and the protocol.
    Version,
}

/// Arguments of `dns-add` / `dns-remove`.
#[derive(clap::Args, Debug)]
struct DnsArgs {
    /// The name to use instead of the container's (`-h`, as in Weave).
    #[arg(short = 'h', long = "hostname", value_name = "FQDN")]
    fqdn: Option<String>,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// IPs, then TARGET (a PID, netns path, or container id/name).
    #[arg(value_name = "IP... TARGET")]
    args: Vec<String>,
}

impl DnsArgs {
    /// IPs and the optional TARGET (the last argument when it is not an IP).
    fn split(&self) -> (Vec<String>, Option<String>) {
        let is_ip = |s: &str| {
            s.split('/')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        };
        match self.args.split_last() {
            Some((last, rest)) if !is_ip(last) => (rest.to_vec(), Some(last.clone())),
            _ => (self.args.clone(), None),
        }
    }
}

/// Parts of `mesh status`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum StatusPart {
    /// Every peer known by gossip, with its route.
    Peers,
    /// Our connections and connection attempts.
    Connections,
    /// Our connection targets.
    Targets,
    /// The address allocator's ring: space per peer, pending requests.
    Ipam,
    /// Names served: one line per name and address.
    Dns,
}

/// Options of `mesh launch`.
#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Peers to connect to, `HOST` or `HOST:PORT`.
    #[arg(value_name = "PEER[:PORT]")]
    pub peers: Vec<String>,
    /// Run in the foreground (for systemd) instead of in the background.
    #[arg(long)]
    pub foreground: bool,
    /// Password for the mesh (also MESH_PASSWORD or WEAVE_PASSWORD): control
    /// and data are encrypted with keys bound to it.
    #[arg(long)]
    pub password: Option<String>,
    /// A human-friendly name for this peer (default: the host name).
    #[arg(long)]
    pub nickname: Option<String>,
    /// TCP and UDP port of the control channel and sleeve.
    #[arg(long, default_value_t = 6783)]
    pub port: u16,
    /// Overlay MTU (default: the underlay's MTU minus encapsulation overhead).
    #[arg(long, value_parser = clap::value_parser!(u32).range(576..=65000))]
    pub mtu: Option<u32>,
    /// The most peers to connect to directly; beyond that frames and gossip
    /// are relayed.
    #[arg(long, default_value_t = 100)]
    pub conn_limit: usize,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// The range containers' addresses are allocated from, shared by the
    /// whole mesh.
    #[arg(long, default_value = "10.32.0.0/12", value_parser = parse_range)]
    pub ipalloc_range: ipnet::Ipv4Net,
    /// The subnet of `net:default` (default: the whole range).
    #[arg(long, value_parser = parse_range)]
    pub ipalloc_default_subnet: Option<ipnet::Ipv4Net>,
    /// How the ring is created: `consensus[=N]` (the first N peers agree),
    /// `seed=NAME,...` (split among these peer names), or `observer`
    /// (never owns space, asks for it).
    #[arg(long, default_value = "consensus", value_parser = parse_init)]
    pub ipalloc_init: String,
    /// Reclaim the space of a peer unreachable this long, with the
    /// agreement of a majority of the ring (e.g. 300s, 5m).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub ipalloc_reclaim_after: Duration,
    /// How long an allocation may wait (for consensus, for space from
    /// another peer) before it fails with the reason.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ipalloc_timeout: Duration,
    /// Do not use the kernel VXLAN fast path (UDP 6784): every connection
    /// uses the sleeve.
    #[arg(long)]
    pub no_fastdp: bool,
    /// With a password, still use the unencrypted fast path with peers
    /// whose underlay address is in these subnets (`CIDR,...`; both ends
    /// must list each other).
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
    pub trusted_subnets: Vec<ipnet::Ipv4Net>,
    /// Do not serve DNS (names are still gossiped for other peers).
    #[arg(long)]
    pub no_dns: bool,
    /// The domain containers' names are served under.
    #[arg(long, default_value = "mesh.local.", value_parser = parse_domain)]
    pub dns_domain: String,
    /// TTL of the answers, in seconds.
    #[arg(long, default_value_t = 1)]
    pub dns_ttl: u32,
    /// Also serve DNS on the host at this address (e.g. 127.0.0.1:53).
    #[arg(long, value_name = "IP:PORT", value_parser = parse_listen)]
    pub dns_listen_address: Option<std::net::SocketAddr>,
    /// Where the upstream servers for other names are listed (re-read when
    /// it changes).
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: std::path::PathBuf,
    /// The Docker daemon's API socket, behind the proxy on
    /// `<run dir>/docker.sock` (`mesh env`).
    #[arg(long, default_value = "unix:///var/run/docker.sock", value_parser = parse_docker_host)]
    pub docker_host: String,
}

/// `--docker-host`: `unix:///PATH`.
fn parse_docker_host(s: &str) -> Result<String, String> {
    paths::parse_docker_host(s).map(|_| s.to_string())
}

/// `mesh env [--restore]`: shell commands for `eval`.
pub fn env_commands(
    restore: bool,
    docker_host: Option<&str>,
    orig: Option<&str>,
    proxy: &str,
) -> String {
    let docker_host = docker_host.unwrap_or("");
    let orig = orig.unwrap_or("");
    if restore {
        if docker_host != proxy {
            // Not pointing at the proxy: nothing to restore.
            return String::new();
        }
        return if orig.is_empty() {
            "unset DOCKER_HOST ORIG_DOCKER_HOST".to_string()
        } else {
            format!(
                "export DOCKER_HOST={}; unset ORIG_DOCKER_HOST",
                shell_quote(orig)
            )
        };
    }
    // Already pointing at the proxy: keep what was saved before.
    let saved = if docker_host == proxy {
        orig
    } else {
        docker_host
    };
    format!(
        "export DOCKER_HOST={} ORIG_DOCKER_HOST={}",
        shell_quote(proxy),
        shell_quote(saved)
    )
}

/// A word the shell reads back as `s`.
fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/_.:-=@%+,".contains(c);
    if s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `--dns-domain`: labels of letters, digits and '-', ending with a dot
/// (added if missing).
fn parse_domain(s: &str) -> Result<String, String> {
    let d = s.trim_end_matches('.');
    let ok = !d.is_empty()
        && d.len() <= 200
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !ok {
        return Err(format!("{s:?} is not a domain like mesh.local."));
    }
    Ok(format!("{}.", d.to_ascii_lowercase()))
}

/// `--dns-listen-address`: `IP:PORT`, or `IP` for port 53.
fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse::<std::net::SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
        .map_err(|_| format!("{s:?} is not an address like 127.0.0.1:53"))
}

/// `--ipalloc-range` and subnets: an IPv4 network, host bits clear.
fn parse_range(s: &str) -> Result<ipnet::Ipv4Net, String> {
    let n: ipnet::Ipv4Net = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 CIDR like 10.32.0.0/12"))?;
    if n.trunc() != n {
        return Err(format!(
            "{s:?} has host bits set; did you mean {}?",
            n.trunc()
        ));
    }
    if n.prefix_len() > 30 {
        return Err(format!("{s:?} is too small: at least a /30 is needed"));
    }
    Ok(n)
}

/// `--ipalloc-init`, checked; the daemon parses it again into an
/// [`mesh_proto::ipam::InitMode`].
fn parse_init(s: &str) -> Result<String, String> {
    s.parse::<mesh_proto::ipam::InitMode>()
        .map(|_| s.to_string())
}

/// A duration: `90`, `90s`, `5m`, `1h`, `500ms`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 90s, 5m or 1h");
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(bad()),
    })
}

/// Parse the command line and run it.
///
/// Longer than most functions, for a reason: it is the CLI's dispatch
/// table, one short arm per command, kept whole so that every command is
/// found in one place; the work is in the functions the arms call.
pub fn run() -> anyhow::Result<ExitCode> {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.print()?;
                return Ok(if e.kind() == DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                });
            }
            // One line: clap's first line without its "error: " prefix.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.trim_start_matches("error: ");
            eprintln!("mesh: {first} (see `mesh --help`)");
            return Ok(ExitCode::from(2));
        }
    };
    match cli.cmd {
        Cmd::Launch(args) => launch(*args),
        Cmd::Stop => {
            need_root("stop")?;
            let pid = daemon_pid();
            expect_ok(call(&Request::Stop)?)?;
            if let Some(pid) = pid {
                wait_gone(pid)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Reset => {
            need_root("reset")?;
            let pid = daemon_pid();
            let running = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
            if !running {
                daemon::offline_reset()?;
                println!("mesh is not running: removed its interfaces and state");
                return Ok(ExitCode::SUCCESS);
            }
            match call(&Request::Reset)? {
                Response::Message { message } => println!("{message}"),
                other => return Err(unexpected(other)),
            }
            if let Some(pid) = pid {
                wait_gone(pid)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rmpeer { peer } => {
            need_root("rmpeer")?;
            match call(&Request::RmPeer { peer })? {
                Response::Message { message } => println!("{message}"),
                other => return Err(unexpected(other)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Prime => {
            need_root("prime")?;
            expect_ok(call(&Request::Prime)?)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { what } => {
            need_root("status")?;
            let s = status()?;
            match what {
                None => print!("{}", format_status(&s)),
                Some(StatusPart::Connections) => print!("{}", format_connections(&s)),
                Some(StatusPart::Peers) => print!("{}", format_peers(&s)),
                Some(StatusPart::Targets) => {
                    for t in &s.targets {
                        println!("{t}");
                    }
                }
                Some(StatusPart::Ipam) => print!("{}", format_ipam(&s)),
                Some(StatusPart::Dns) => print!("{}", format_dns(&s)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report => {
            need_root("report")?;
            let s = status()?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Connect { peers } => {
            need_root("connect")?;
            for p in &peers {
                crate::peer::parse_peer(p, 6783).map_err(anyhow::Error::msg)?;
            }
            expect_ok(call(&Request::Connect { peers })?)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Forget { peers } => {
            need_root("forget")?;
            expect_ok(call(&Request::Forget { peers })?)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Attach { name, args } => attach(name, args),
        Cmd::Detach { args } => {
            need_root("detach")?;
            let (addrs, target) = split_addrs(&args)?;
            expect_ok(call(&Request::Detach { addrs, target })?)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            name,
            env,
            addrs,
            cmd,
        } => {
            for a in &addrs {
                addr::parse(a).map_err(anyhow::Error::msg)?;
            }
            need_root("run")?;
            crate::attach::run::run(crate::attach::run::RunArgs {
                addrs,
                name,
                env,
                cmd,
            })
        }
        Cmd::Expose { addrs } => {
            for a in &addrs {
                addr::parse(a).map_err(anyhow::Error::msg)?;
            }
            need_root("expose")?;
            match call(&Request::Expose { addrs })? {
                Response::Attached { cidrs } => {
                    for c in cidrs {
                        println!("{c}");
                    }
                }
                other => return Err(unexpected(other)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Hide { addrs } => {
            for a in &addrs {
                addr::parse(a).map_err(anyhow::Error::msg)?;
            }
            need_root("hide")?;
            expect_ok(call(&Request::Hide { addrs })?)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::DnsAdd(a) | Cmd::DnsRemove(a) if a.args.is_empty() => {
            bail!("give IP... TARGET, TARGET, or IP... -h FQDN")
        }
        Cmd::DnsAdd(a) => {
            need_root("dns-add")?;
            let (ips, target) = a.split();
            expect_ok(call(&Request::DnsAdd {
                ips,
                target,
                fqdn: a.fqdn,
            })?)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::DnsRemove(a) => {
            need_root("dns-remove")?;
            let (ips, target) = a.split();
            expect_ok(call(&Request::DnsRemove {
                ips,
                target,
                fqdn: a.fqdn,
            })?)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::DnsLookup { name } => {
            need_root("dns-lookup")?;
            match call(&Request::DnsLookup { name: name.clone() })? {
                Response::Addresses { addrs } if addrs.is_empty() => {
                    bail!("{name}: no such name in the mesh")
                }
                Response::Addresses { addrs } => {
                    for a in addrs {
                        println!("{a}");
                    }
                }
                other => return Err(unexpected(other)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ps => {
            need_root("ps")?;
            match call(&Request::Ps)? {
                Response::Ps { containers } => {
                    for c in containers {
                        println!("{} {} {}", c.id, c.mac, c.cidrs.join(" "));
                    }
                }
                other => return Err(unexpected(other)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Env { restore } => {
            let proxy = format!("unix://{}", paths::docker_socket().display());
            let cur = std::env::var("DOCKER_HOST").ok();
            let orig = std::env::var("ORIG_DOCKER_HOST").ok();
            let out = env_commands(restore, cur.as_deref(), orig.as_deref(), &proxy);
            if !out.is_empty() {
                println!("{out}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Version => {
            println!("mesh {}", env!("CARGO_PKG_VERSION"));
            println!(
                "protocol {}..={}",
                mesh_proto::PROTOCOL_MIN_VERSION,
                mesh_proto::PROTOCOL_VERSION
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The PID in the pid file, if any.
fn daemon_pid() -> Option<i32> {
    std::fs::read_to_string(paths::pid_file())
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
}

/// Wait (bounded) until process `pid` has exited.
fn wait_gone(pid: i32) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut pause = Duration::from_millis(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if std::time::Instant::now() > deadline {
            bail!("the daemon (pid {pid}) did not exit within 15s");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    Ok(())
}

fn need_root(what: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`mesh {what}` must be run as root (it manages network devices and the root-only control socket); try sudo");
    }
    Ok(())
}

fn call(req: &Request) -> anyhow::Result<Response> {
    api::call(&paths::socket(), req, CALL_TIMEOUT)
}

fn status() -> anyhow::Result<api::Status> {
    match call(&Request::Status)? {
        Response::Status(s) => Ok(*s),
        other => Err(unexpected(other)),
    }
}

fn expect_ok(r: Response) -> anyhow::Result<()> {
    match r {
        Response::Ok => Ok(()),
        other => Err(unexpected(other)),
    }
}

/// Split `ADDR... TARGET`, validating every ADDR.
fn split_addrs(args: &[String]) -> anyhow::Result<(Vec<String>, String)> {
    let Some((target, addrs)) = args.split_last() else {
        bail!("missing TARGET (a PID or a network namespace path)");
    };
    if addr::parse(target).is_ok() && !target.chars().all(|c| c.is_ascii_digit()) {
        bail!("missing TARGET after the addresses: give a PID or a network namespace path last");
    }
    for a in addrs {
        addr::parse(a).map_err(anyhow::Error::msg)?;
    }
    Ok((addrs.to_vec(), target.clone()))
}

fn attach(name: Option<String>, args: Vec<String>) -> anyhow::Result<ExitCode> {
    let (mut addrs, target) = split_addrs(&args)?;
    need_root("attach")?;
    if addrs.is_empty() {
        // From the target's environment, as Weave does with WEAVE_CIDR.
        let mut list = None;
        if target.chars().all(|c| c.is_ascii_digit()) {
            let env = std::fs::read(format!("/proc/{target}/environ"))
                .with_context(|| format!("no such process: {target}"))?;
            list = addr::from_environ(&env);
        }
        addrs = addr::addrs_or_default(list.as_deref()).map_err(anyhow::Error::msg)?;
    }
    if addr::all_none(&addrs) {
        return Ok(ExitCode::SUCCESS);
    }
    match call(&Request::Attach {
        addrs,
        name,
        target,
        ifname: None,
    })? {
        Response::Attached { cidrs } => {
            for c in cidrs {
                println!("{c}");
            }
        }
        other => return Err(unexpected(other)),
    }
    Ok(ExitCode::SUCCESS)
}

fn launch(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    need_root("launch")?;
    let foreground = args.foreground;
    // A background launch hands its whole configuration down (see
    // `daemon::spawn_background`); otherwise it comes from the flags.
    let config = match daemon::Config::inherited()? {
        Some(c) if foreground => c,
        _ => args.into_config(),
    };
    for p in &config.peers {
        crate::peer::parse_peer(p, config.port).map_err(anyhow::Error::msg)?;
    }
    daemon::ipam_config(&config)?;
    if let Ok(Response::Status(s)) =
        api::call(&paths::socket(), &Request::Status, Duration::from_secs(5))
    {
        bail!(
            "mesh is already running here as peer {} (stop it with `mesh stop`)",
            s.name
        );
    }
    if foreground {
        daemon::run_foreground(config)?;
        return Ok(ExitCode::SUCCESS);
    }
    let name = daemon::spawn_background(&config)?;
    println!("{name}");
    Ok(ExitCode::SUCCESS)
}

impl LaunchArgs {
    /// The daemon's configuration from these flags (and the password from
    /// `MESH_PASSWORD` / `WEAVE_PASSWORD` when not given).
    pub fn into_config(self) -> daemon::Config {
        let password = self.password.or_else(|| {
            ["MESH_PASSWORD", "WEAVE_PASSWORD"]
                .iter()
                .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        });
        daemon::Config {
            peers: self.peers,
            password,
            nickname: self.nickname,
            port: self.port,
            mtu: self.mtu,
            conn_limit: self.conn_limit,
            log_level: self.log_level,
            ipalloc_range: self.ipalloc_range,
            ipalloc_default_subnet: self.ipalloc_default_subnet,
            ipalloc_init: self.ipalloc_init,
            ipalloc_reclaim_after: self.ipalloc_reclaim_after,
            ipalloc_timeout: self.ipalloc_timeout,
            no_fastdp: self.no_fastdp,
            trusted_subnets: self.trusted_subnets,
            no_dns: self.no_dns,
            dns_domain: self.dns_domain,
            dns_ttl: self.dns_ttl,
            dns_listen_address: self.dns_listen_address,
            resolv_conf: self.resolv_conf,
            docker_host: self.docker_host,
        }
    }
}

/// The human form of `mesh status`.
pub fn format_status(s: &api::Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let established = s
        .connections
        .iter()
        .filter(|c| c.state == api::ConnState::Established)
        .count();
    let failed = s
        .connections
        .iter()
        .filter(|c| matches!(c.state, api::ConnState::Failed | api::ConnState::Retrying))
        .count();
    let _ = writeln!(
        o,
        "        Version: {} (protocol {})",
        s.version, s.protocol
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "           Name: {}({})", s.name, s.nickname);
    let _ = writeln!(
        o,
        "     Encryption: {}",
        if s.encryption { "enabled" } else { "disabled" }
    );
    let _ = writeln!(o, "           Port: {}", s.port);
    let _ = writeln!(o, "            MTU: {}", s.mtu);
    let _ = writeln!(
        o,
        "    Connections: {} ({} established, {} failed)",
        s.connections.len(),
        established,
        failed
    );
    let st = &s.sleeve;
    let _ = writeln!(
        o,
        "         Sleeve: {} frames in, {} datagrams out ({} sealed), {} in, {} relayed, {} dropped",
        st.frames_in, st.datagrams_out, st.sealed_out, st.datagrams_in, st.relayed, st.dropped
    );
    let _ = writeln!(
        o,
        "          Peers: {} ({} reachable)",
        s.peers.len(),
        s.peers.iter().filter(|p| p.reachable).count()
    );
    let _ = writeln!(o, "        Targets: {}", s.targets.len());
    format_status_parts(s, &mut o);
    if !s.connections.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "CONNECTIONS");
        o.push_str(&format_connections(s));
    }
    o
}

/// The DNS, IPAM and problem lines of `mesh status`.
fn format_status_parts(s: &api::Status, o: &mut String) {
    use std::fmt::Write;
    if let Some(d) = &s.dns {
        let _ = writeln!(
            o,
            "            DNS: {}, {} names",
            if d.serving {
                format!("serving {}", d.domain)
            } else {
                "not serving".to_string()
            },
            d.entries.len()
        );
    }
    if let Some(i) = &s.ipam {
        let mine = i.peers.iter().find(|p| p.peer == s.name);
        let _ = writeln!(
            o,
            "           IPAM: {}, range {}{}",
            i.state,
            i.range,
            mine.map(|p| format!(", {} owned here ({} free)", p.owned, p.free))
                .unwrap_or_default()
        );
    }
    // The allocator's problems too (another ring met, a claim in space we
    // lost): they are what a user must act on.
    let ipam_problems = s.ipam.iter().flat_map(|i| &i.problems);
    for p in s.problems.iter().chain(ipam_problems) {
        let _ = writeln!(o, "        Problem: {p}");
    }
}

/// `mesh status dns`: `NAME ADDRESS CONTAINER PEER`, one line each.
pub fn format_dns(s: &api::Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    match &s.dns {
        None => o.push_str("the daemon reports no DNS\n"),
        Some(d) => {
            if !d.serving {
                o.push_str("not serving DNS here (--no-dns); names of the mesh:\n");
            }
            for e in &d.entries {
                let _ = writeln!(
                    o,
                    "{:<24} {:<15} {:<14} {}",
                    e.name, e.addr, e.container, e.peer
                );
            }
        }
    }
    o
}

/// `mesh status ipam`: the ring as this peer sees it.
pub fn format_ipam(s: &api::Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let Some(i) = &s.ipam else {
        return "the daemon reports no address allocator\n".into();
    };
    let total: u64 = i.peers.iter().map(|p| p.owned).sum();
    let _ = writeln!(
        o,
        "Range: {}  Default subnet: {}",
        i.range, i.default_subnet
    );
    let _ = writeln!(o, "State: {}", i.state);
    for p in &i.peers {
        let pct = if total == 0 {
            0.0
        } else {
            p.owned as f64 * 100.0 / total as f64
        };
        let who = if p.nickname.is_empty() {
            p.peer.clone()
        } else {
            format!("{}({})", p.peer, p.nickname)
        };
        let this = if p.peer == s.name {
            "  (this peer)"
        } else if p.reachable {
            ""
        } else {
            "  - unreachable!"
        };
        let _ = writeln!(
            o,
            "{who}  {} IPs ({pct:.1}% of total), {} free{this}",
            p.owned, p.free
        );
    }
    for p in &i.pending {
        let _ = writeln!(o, "Pending: {p}");
    }
    for p in &i.problems {
        let _ = writeln!(o, "Problem: {p}");
    }
    o
}

/// `mesh status peers`: each peer, its route and its connections.
pub fn format_peers(s: &api::Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    for p in &s.peers {
        let route = if p.name == s.name {
            "(this peer)".to_string()
        } else {
            match (&p.next_hop, p.reachable) {
                (Some(h), true) if *h == p.name => "direct".to_string(),
                (Some(h), true) => format!("via {h}"),
                _ => "unreachable".to_string(),
            }
        };
        let _ = writeln!(o, "{}({})  {}", p.name, p.nickname, route);
        for c in &p.connections {
            let _ = writeln!(
                o,
                "   -> {} {} {}",
                c.peer,
                c.address.as_deref().unwrap_or("-"),
                if c.established {
                    "established"
                } else {
                    "pending"
                }
            );
        }
    }
    o
}

/// `mesh status connections`: one line per connection or attempt.
pub fn format_connections(s: &api::Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    {
        for c in &s.connections {
            let arrow = if c.direction == "inbound" { "<-" } else { "->" };
            let peer = match (&c.peer, &c.nickname) {
                (Some(p), Some(n)) => format!("{p}({n})"),
                (Some(p), None) => p.clone(),
                _ => String::new(),
            };
            let mut line = format!("  {arrow} {:<21} {:<12}", c.address, c.state);
            if c.state == api::ConnState::Established {
                line.push_str(match (c.overlay, c.encrypted) {
                    (Some(api::Overlay::Fastdp), _) => " fastdp ",
                    (_, true) => " encrypted sleeve ",
                    _ => " sleeve ",
                });
                line.push_str(&peer);
            } else {
                line.push(' ');
                line.push_str(&peer);
            }
            if let Some(i) = &c.info {
                line.push_str("  ");
                line.push_str(i);
            }
            if let Some(i) = &c.overlay_info {
                line.push_str("  (sleeve: ");
                line.push_str(i);
                line.push(')');
            }
            if let (Some(m), Some(api::Overlay::Sleeve)) = (c.path_mtu, c.overlay) {
                let _ = write!(line, "  path MTU {m}");
            }
            let _ = writeln!(o, "{}", line.trim_end());
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROXY: &str = "unix:///run/mesh/docker.sock";

    fn launch_config(args: &[&str]) -> daemon::Config {
        let mut all = vec!["mesh", "launch"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).map(|c| c.cmd) {
            Ok(Cmd::Launch(l)) => l.into_config(),
            Ok(_) => panic!("not a launch"),
            Err(e) => panic!("{e}"),
        }
    }

    /// Every flag of `launch` reaches the background daemon as given: the
    /// configuration travels whole, and this list sets every field of it
    /// (a field added without a flag here fails the second check).
    #[test]
    fn launch_flags_round_trip_through_the_background_launch() {
        let given = launch_config(&[
            "--password",
            "s3cret",
            "--nickname",
            "nick",
            "--port",
            "7000",
            "--mtu",
            "1300",
            "--conn-limit",
            "7",
            "--log-level",
            "debug",
            "--ipalloc-range",
            "198.19.0.0/16",
            "--ipalloc-default-subnet",
            "198.19.1.0/24",
            "--ipalloc-init",
            "consensus=3",
            "--ipalloc-reclaim-after",
            "90s",
            "--ipalloc-timeout",
            "5s",
            "--no-fastdp",
            "--trusted-subnets",
            "198.18.0.0/24,198.18.1.0/24",
            "--no-dns",
            "--dns-domain",
            "example.test.",
            "--dns-ttl",
            "9",
            "--dns-listen-address",
            "127.0.0.1:5353",
            "--resolv-conf",
            "/tmp/resolv.conf",
            "--docker-host",
            "unix:///tmp/docker.sock",
            "198.18.0.1",
            "198.18.0.2:7000",
        ]);
        let passed = given.to_env_value().unwrap();
        assert_eq!(daemon::Config::from_env_value(&passed).unwrap(), given);
        let defaults = serde_json::to_value(launch_config(&[])).unwrap();
        let set = serde_json::to_value(&given).unwrap();
        let (Some(defaults), Some(set)) = (defaults.as_object(), set.as_object()) else {
            panic!("a Config is a JSON object");
        };
        for (field, value) in set {
            assert_ne!(
                defaults.get(field),
                Some(value),
                "the flag list above leaves {field} at its default"
            );
        }
    }

    #[test]
    fn env_saves_and_restores_docker_host() {
        assert_eq!(
            env_commands(false, None, None, PROXY),
            "export DOCKER_HOST=unix:///run/mesh/docker.sock ORIG_DOCKER_HOST="
        );
        assert_eq!(
            env_commands(false, Some("tcp://h:2375"), None, PROXY),
            "export DOCKER_HOST=unix:///run/mesh/docker.sock ORIG_DOCKER_HOST=tcp://h:2375"
        );
        // Twice in a row keeps the first saved value.
        assert_eq!(
            env_commands(false, Some(PROXY), Some("tcp://h:2375"), PROXY),
            "export DOCKER_HOST=unix:///run/mesh/docker.sock ORIG_DOCKER_HOST=tcp://h:2375"
        );
        assert_eq!(
            env_commands(true, Some(PROXY), Some("tcp://h:2375"), PROXY),
            "export DOCKER_HOST=tcp://h:2375; unset ORIG_DOCKER_HOST"
        );
        assert_eq!(
            env_commands(true, Some(PROXY), Some(""), PROXY),
            "unset DOCKER_HOST ORIG_DOCKER_HOST"
        );
        assert_eq!(env_commands(true, Some("tcp://x"), None, PROXY), "");
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
    }
}
