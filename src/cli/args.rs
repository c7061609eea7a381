//! The command line's grammar: the commands, their arguments and the
//! parsers of argument values (the only clap types in the crate).

use crate::paths;
use clap::{Parser, Subcommand};
use std::time::Duration;

/// mesh: a container network for Linux hosts, in the tradition of Weave Net.
#[derive(Parser, Debug)]
#[command(name = "mesh", version)]
pub struct Cli {
    #[command(subcommand)]
    pub(super) cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub(super) enum Cmd {
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
        /// Container name (shown by `mesh ps`; a Docker container's own
        /// name when not given).
        #[arg(long)]
        name: Option<String>,
        /// ADDRs (`ip:CIDR`, `CIDR`, `net:CIDR`, `net:default`, `none`), then
        /// TARGET (a PID, a network-namespace path, or a Docker container
        /// name or ID).
        #[arg(required = true, num_args = 1.., value_name = "ADDR... TARGET")]
        args: Vec<String>,
    },
    /// Detach a container: `mesh detach [ADDR...] TARGET`.
    Detach {
        /// ADDRs to release (all when none), then TARGET (a PID, a
        /// network-namespace path, an attached container's name, or a
        /// Docker container name or ID).
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
    /// Print a shell completion script: `source <(mesh completion bash)`.
    Completion {
        /// The shell: `bash`, `zsh` or `fish`.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

/// Shells `mesh completion` writes scripts for.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CompletionShell {
    /// GNU Bash.
    Bash,
    /// Z shell.
    Zsh,
    /// The friendly interactive shell.
    Fish,
}

/// Arguments of `dns-add` / `dns-remove`.
#[derive(clap::Args, Debug)]
pub(super) struct DnsArgs {
    /// The name to use instead of the container's (`-h`, as in Weave).
    #[arg(short = 'h', long = "hostname", value_name = "FQDN")]
    pub(super) fqdn: Option<String>,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// IPs, then TARGET (a PID, netns path, or container id/name).
    #[arg(value_name = "IP... TARGET")]
    pub(super) args: Vec<String>,
}

impl DnsArgs {
    /// IPs and the optional TARGET (the last argument when it is not an IP).
    pub(super) fn split(&self) -> (Vec<String>, Option<String>) {
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
pub(super) enum StatusPart {
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
    /// The most peers this daemon holds state for (topology entries; the
    /// names of peers it has not seen are kept up to four times this): what
    /// other members announce beyond it is refused and logged.
    #[arg(long, default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(2..=1_000_000))]
    pub max_peers: u64,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Log lines as `plain` text or `json` objects (one per line).
    #[arg(long, default_value = "plain", value_name = "FORMAT", value_parser = log_format_parser())]
    pub log_format: crate::daemon::logging::LogFormat,
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
    /// The Docker network plugin's name: `docker network create --driver
    /// NAME --ipam-driver NAME` (socket `/run/docker/plugins/NAME.sock`).
    #[arg(long, default_value = "mesh", value_name = "NAME", value_parser = parse_plugin)]
    pub docker_plugin: String,
    /// Serve no Docker network plugin.
    #[arg(long)]
    pub no_docker_plugin: bool,
    /// Make the Docker API proxy's socket group-owned by this group, mode
    /// 0660 (default: root only, 0600), so its members need no root, as
    /// with Docker's own socket.
    #[arg(long, value_name = "GROUP")]
    pub proxy_group: Option<String>,
    /// Serve Prometheus metrics (`/metrics`), the report (`/status`),
    /// readiness (`/ready`) and the status page (`/`) over HTTP here;
    /// loopback by default: anything else exposes them to the network.
    #[arg(long, default_value = "127.0.0.1:6782", value_name = "IP:PORT", value_parser = parse_metrics_addr)]
    pub metrics_addr: std::net::SocketAddr,
    /// Test only (hidden): replace each sleeve key after this many messages
    /// sealed under it, instead of 2^32.
    #[arg(long, hide = true, value_name = "N")]
    pub rekey_after_messages: Option<u64>,
    /// Test only (hidden): replace each sleeve key after this many seconds,
    /// instead of 120.
    #[arg(long, hide = true, value_name = "SECS")]
    pub rekey_after_secs: Option<u64>,
}

/// `--log-format`: `plain` or `json`.
fn log_format_parser(
) -> impl clap::builder::TypedValueParser<Value = crate::daemon::logging::LogFormat> {
    use crate::daemon::logging::LogFormat;
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["plain", "json"]).map(|s| match s.as_str() {
        "json" => LogFormat::Json,
        _ => LogFormat::Plain,
    })
}

/// `--docker-host`: `unix:///PATH`.
fn parse_docker_host(s: &str) -> Result<String, String> {
    paths::parse_docker_host(s).map(|_| s.to_string())
}

/// `--docker-plugin`: a name for Docker's plugin directory.
fn parse_plugin(s: &str) -> Result<String, String> {
    crate::integrations::plugin::check_name(s).map(|()| s.to_string())
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

/// `--metrics-addr`: `IP:PORT`, or an IP (port 6782).
fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse::<std::net::SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 6782).into()))
        .map_err(|_| format!("{s:?} is not an address like 127.0.0.1:6782"))
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
