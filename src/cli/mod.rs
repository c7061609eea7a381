//! The command line (clap). Each subcommand either talks to the daemon over
//! the control socket ([`crate::api`]) or, for `launch`, starts it. Errors
//! come back as `anyhow` values and are printed by `main` as one line;
//! parse errors are printed here (`usage`: what is wrong, and for usage
//! errors the command's usage line). Waits longer than a second show
//! progress on a terminal (`progress`). The grammar is in `args`, its
//! help layout, completions and manual pages in `help`.

use crate::api::{self, unexpected, Request, Response};
use crate::attach::addr;
use crate::{daemon, paths};
use anyhow::{bail, Context};
use clap::FromArgMatches;
use std::process::ExitCode;
use std::time::Duration;

/// How long a CLI call waits for the daemon.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// What `attach` and `expose` wait for when they take long.
const WAIT_IPAM: &str = "waiting for an address (IPAM needs consensus or space from a peer)";

mod args;
mod env;
mod format;
mod help;
mod progress;
mod routes;
mod usage;

pub use args::LaunchArgs;
use args::{Cli, Cmd, StatusPart};
pub use env::env_commands;
pub use format::{format_connections, format_dns, format_ipam, format_peers, format_status};
pub use help::command;
use progress::Progress;

/// What the command line asks for: a command of [`Cli`], or the hidden
/// `mesh man [--dir DIR]` (see [`help::command`]).
enum Parsed {
    Cli(Box<Cli>),
    Man(Option<std::path::PathBuf>),
}

/// Whether `args` (the words after `mesh`) parse as a command line, and
/// clap's message when not; nothing runs. For checking the documentation
/// (`tests/readme.rs` parses every `mesh` command of the README).
pub fn check_args<I, T>(args: I) -> Result<(), String>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let all =
        std::iter::once(std::ffi::OsString::from("mesh")).chain(args.into_iter().map(Into::into));
    let parsed = help::command()
        .try_get_matches_from(all)
        .and_then(|m| match m.subcommand() {
            Some(("man", _)) => Ok(()),
            _ => Cli::from_arg_matches(&m).map(|_| ()),
        });
    match parsed {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e.render().to_string()),
    }
}

/// Parse the command line and run it.
///
/// Longer than most functions, for a reason: it is the CLI's dispatch
/// table, one short arm per command, kept whole so that every command is
/// found in one place; the work is in the functions the arms call.
pub fn run() -> anyhow::Result<ExitCode> {
    let grammar = help::command();
    let parsed = grammar.clone().try_get_matches().and_then(|m| {
        if let Some(("man", m)) = m.subcommand() {
            return Ok(Parsed::Man(m.get_one("dir").cloned()));
        }
        Cli::from_arg_matches(&m).map(|c| Parsed::Cli(Box::new(c)))
    });
    let parsed = match parsed {
        Ok(p) => p,
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
            eprintln!("{}", usage::render(&e, &grammar));
            return Ok(ExitCode::from(2));
        }
    };
    let cli = match parsed {
        Parsed::Cli(cli) => cli,
        Parsed::Man(None) => {
            help::man_page(&mut std::io::stdout().lock())?;
            return Ok(ExitCode::SUCCESS);
        }
        Parsed::Man(Some(dir)) => {
            help::man_pages(&dir)
                .with_context(|| format!("writing manual pages to {}", dir.display()))?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    match cli.cmd {
        Cmd::Launch(args) => launch(*args),
        Cmd::Stop => {
            need_root("stop")?;
            let pid = daemon_pid();
            let _progress = Progress::start("stopping mesh: waiting for the daemon to exit");
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
            let progress = Progress::start("resetting mesh: handing over its addresses");
            let answer = call(&Request::Reset);
            drop(progress);
            match answer? {
                Response::Message { message } => println!("{message}"),
                other => return Err(unexpected(other)),
            }
            if let Some(pid) = pid {
                let _progress = Progress::start("resetting mesh: waiting for the daemon to exit");
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
            let targets = status()?.targets;
            if let Some(p) = peers.iter().find(|p| !targets.contains(p)) {
                bail!("{p} is not a connection target (`mesh status targets` lists them, as given to `mesh connect` or `mesh launch`)");
            }
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
            let progress = Progress::start(WAIT_IPAM);
            let answer = call(&Request::Expose { addrs });
            drop(progress);
            match answer? {
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
        Cmd::Completion { shell } => {
            help::completion(shell, &mut std::io::stdout().lock());
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
        bail!("missing TARGET (a PID, a network namespace path, or a Docker container name or ID)");
    };
    if addr::parse(target).is_ok() && !target.chars().all(|c| c.is_ascii_digit()) {
        bail!("missing TARGET after the addresses: give a PID, a network namespace path, or a Docker container name or ID last");
    }
    for a in addrs {
        addr::parse(a).map_err(anyhow::Error::msg)?;
    }
    Ok((addrs.to_vec(), target.clone()))
}

fn attach(name: Option<String>, args: Vec<String>) -> anyhow::Result<ExitCode> {
    let (mut addrs, target) = split_addrs(&args)?;
    need_root("attach")?;
    if addrs.is_empty() && !crate::integrations::docker::is_reference(&target) {
        // From the target's environment, as Weave does with WEAVE_CIDR (a
        // Docker container's, the daemon reads from the Docker API).
        let mut list = None;
        if target.chars().all(|c| c.is_ascii_digit()) {
            let env = std::fs::read(format!("/proc/{target}/environ"))
                .with_context(|| format!("no such process: {target}"))?;
            list = addr::from_environ(&env);
        }
        addrs = addr::addrs_or_default(list.as_deref()).map_err(anyhow::Error::msg)?;
    }
    if !addrs.is_empty() && addr::all_none(&addrs) {
        return Ok(ExitCode::SUCCESS);
    }
    let progress = Progress::start(WAIT_IPAM);
    let answer = call(&Request::Attach {
        addrs,
        name,
        target,
        ifname: None,
        hand_over: None,
        port: None,
    });
    drop(progress);
    match answer? {
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
    routes::check_range(config.ipalloc_range)?;
    if let Some(group) = &config.proxy_group {
        crate::integrations::proxy::group_id(group)?;
    }
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
    let progress = Progress::start("starting mesh: waiting for the daemon to answer");
    let name = daemon::spawn_background(&config);
    drop(progress);
    println!("{}", name?);
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
            max_peers: self.max_peers as usize,
            log_level: self.log_level,
            log_format: self.log_format,
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
            docker_plugin: (!self.no_docker_plugin).then_some(self.docker_plugin),
            proxy_group: self.proxy_group,
            metrics_addr: self.metrics_addr,
            rekey_after_messages: self.rekey_after_messages,
            rekey_after_secs: self.rekey_after_secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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
            "--max-peers",
            "99",
            "--log-level",
            "debug",
            "--log-format",
            "json",
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
            "--docker-plugin",
            "meshtest",
            "--proxy-group",
            "docker",
            "--metrics-addr",
            "127.0.0.2:9100",
            "--rekey-after-messages",
            "20",
            "--rekey-after-secs",
            "2",
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
        let off = launch_config(&["--no-docker-plugin"]);
        assert_eq!(off.docker_plugin, None, "--no-docker-plugin");
        for (field, value) in set {
            assert_ne!(
                defaults.get(field),
                Some(value),
                "the flag list above leaves {field} at its default"
            );
        }
    }
}
