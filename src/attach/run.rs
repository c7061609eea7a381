//! `mesh run [ADDR...] [--name NAME] [-e K=V]... -- CMD...`: run CMD as a
//! container of the mesh, without a container engine.
//!
//! The CLI forks. The child enters new network, UTS and mount namespaces,
//! makes its mounts private, sets the hostname, brings `lo` up, bind-mounts
//! a resolv.conf pointing at the mesh's DNS (when the daemon serves one) and
//! tells the parent it is ready; the parent asks the daemon to attach the
//! child by PID; only when the attachment is made does the child exec CMD,
//! so CMD never runs without its network. The parent forwards the usual
//! signals to CMD, waits for it, detaches it (releasing its addresses) and
//! exits with CMD's status (128 + signal if it was killed).
//!
//! If `mesh run` itself is killed, CMD's namespace dies with CMD, and the
//! daemon notices the interface gone and releases the addresses then.

use crate::api::{self, Request, Response};
use crate::attach::addr;
use crate::paths;
use anyhow::{bail, Context};
use nix::sched::CloneFlags;
use nix::sys::signal::{self, SigHandler, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{ForkResult, Pid};
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// The child's PID, for the signal handler.
static CHILD: AtomicI32 = AtomicI32::new(0);

/// Signals passed on to CMD.
const FORWARDED: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// What `mesh run` was asked.
pub struct RunArgs {
    /// ADDRs given on the command line.
    pub addrs: Vec<String>,
    /// Container name (hostname, `mesh ps` id, DNS name).
    pub name: Option<String>,
    /// `-e K=V`.
    pub env: Vec<String>,
    /// CMD and its arguments.
    pub cmd: Vec<String>,
}

/// The ADDRs to attach with: the command line's, else `MESH_CIDR` /
/// `WEAVE_CIDR` from `-e`, else from our own environment, else the default.
fn addrs_for(args: &RunArgs) -> anyhow::Result<Vec<String>> {
    if !args.addrs.is_empty() {
        return Ok(args.addrs.clone());
    }
    let from_e = |key: &str| {
        args.env
            .iter()
            .rev()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(String::from))
    };
    let list = from_e("MESH_CIDR")
        .or_else(|| from_e("WEAVE_CIDR"))
        .or_else(|| std::env::var("MESH_CIDR").ok())
        .or_else(|| std::env::var("WEAVE_CIDR").ok());
    addr::addrs_or_default(list.as_deref()).map_err(anyhow::Error::msg)
}

/// Check what can be checked before the daemon is asked anything.
fn check_args(args: &RunArgs) -> anyhow::Result<()> {
    if args.cmd.is_empty() {
        bail!("missing CMD: mesh run [ADDR...] [--name NAME] [-e K=V]... -- CMD...");
    }
    for kv in &args.env {
        if !kv.contains('=') || kv.starts_with('=') {
            bail!("invalid -e {kv:?}: expected KEY=VALUE");
        }
        if kv.contains('\0') {
            bail!("-e {kv:?} contains a NUL byte");
        }
    }
    if let Some(n) = &args.name {
        if n.is_empty()
            || n.len() > 63
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            bail!("invalid --name {n:?}: use letters, digits, '-', '_' or '.', at most 63");
        }
    }
    Ok(())
}

/// The container's resolv.conf (the mesh's DNS and search domain), when
/// the daemon serves DNS; written under the run directory.
fn write_resolv(status: &api::Status) -> anyhow::Result<Option<PathBuf>> {
    let Some(dns) = status.dns.as_ref().filter(|d| d.serving) else {
        return Ok(None);
    };
    let domain = dns.domain.trim_end_matches('.');
    let path = paths::run_dir().join(format!("resolv.conf.{}", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "nameserver {}\nsearch {domain}\noptions ndots:0\n",
            crate::attach::DNS_ADDR.ip()
        ),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(path))
}

/// Ask the daemon to attach the child's namespace; the error as a line.
fn attach_child(args: &RunArgs, addrs: Vec<String>, target: &str) -> Result<(), String> {
    let resp = api::call(
        &paths::socket(),
        &Request::Attach {
            addrs,
            name: args.name.clone(),
            target: target.to_string(),
            ifname: None,
            hand_over: None,
            port: None,
        },
        Duration::from_secs(120),
    );
    match resp {
        Ok(Response::Attached { .. }) => Ok(()),
        Ok(Response::Error { message }) => Err(message),
        Ok(other) => Err(format!("unexpected answer from the daemon: {other:?}")),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Release the container's addresses once CMD has exited.
fn detach_child(who: String) {
    match api::call(
        &paths::socket(),
        &Request::Detach {
            addrs: Vec::new(),
            target: who,
        },
        Duration::from_secs(30),
    ) {
        Ok(Response::Ok) => {}
        // Already released (the daemon noticed the namespace go first).
        Ok(Response::Error { message }) if message.starts_with("no attached container") => {}
        Ok(Response::Error { message }) => eprintln!("mesh: releasing the container: {message}"),
        Ok(_) => {}
        Err(e) => eprintln!("mesh: releasing the container: {e:#}"),
    }
}

/// From now on, the signals `mesh run` gets go to CMD.
fn forward_signals_to(child: Pid) {
    CHILD.store(child.as_raw(), Ordering::Relaxed);
    for sig in FORWARDED {
        // SAFETY: the handler only calls kill(2).
        unsafe {
            let _ = signal::signal(sig, SigHandler::Handler(forward));
        }
    }
}

/// Run CMD attached; returns CMD's exit status. The child makes its
/// namespaces and waits; it is attached; then it may exec CMD.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    check_args(&args)?;
    let addrs = addrs_for(&args)?;
    let attach = !addr::all_none(&addrs);
    // The daemon must answer before anything is forked.
    let status = match api::call(&paths::socket(), &Request::Status, Duration::from_secs(10))? {
        Response::Status(s) => s,
        other => return Err(api::unexpected(other)),
    };
    let resolv = write_resolv(&status)?;
    let hostname = args
        .name
        .clone()
        .unwrap_or_else(|| format!("mesh-run-{}", std::process::id()));
    let argv: Vec<CString> = args
        .cmd
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .context("CMD contains a NUL byte")?;

    let (ready_r, ready_w) = nix::unistd::pipe()?;
    let (go_r, go_w) = nix::unistd::pipe()?;
    // SAFETY: the CLI is single-threaded here (no runtime has been
    // started), so the child may run ordinary code before exec.
    let child = match unsafe { nix::unistd::fork() }.context("fork")? {
        ForkResult::Child => {
            drop(ready_r);
            drop(go_w);
            let code = child_main(
                ready_w,
                go_r,
                &hostname,
                resolv.as_deref(),
                &argv,
                &args.env,
            );
            std::process::exit(code);
        }
        ForkResult::Parent { child } => child,
    };
    drop(ready_w);
    drop(go_r);
    forward_signals_to(child);
    let cleanup_resolv = || {
        if let Some(p) = &resolv {
            let _ = std::fs::remove_file(p);
        }
    };
    let mut ready = [0u8; 1];
    let mut rf = std::fs::File::from(ready_r);
    if rf.read_exact(&mut ready).is_err() || ready[0] != b'R' {
        let _ = waitpid(child, None);
        cleanup_resolv();
        bail!("could not create the container's namespaces (is this root, with unshare allowed?)");
    }
    let target = child.as_raw().to_string();
    if attach {
        if let Err(e) = attach_child(&args, addrs, &target) {
            let _ = signal::kill(child, Signal::SIGKILL);
            let _ = waitpid(child, None);
            cleanup_resolv();
            bail!("{e}");
        }
    }
    let mut gw = std::fs::File::from(go_w);
    let _ = gw.write_all(b"G");
    drop(gw);
    let code = wait_child(child);
    cleanup_resolv();
    if attach {
        // By the PID it was attached with (the attachment keeps it as its
        // target), never by name: a name the daemon no longer knows would
        // be looked up in Docker, which may have a container of that name.
        detach_child(target);
    }
    Ok(ExitCode::from(code))
}

fn wait_child(child: Pid) -> u8 {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return code as u8,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128u8.wrapping_add(sig as u8),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return 255,
        }
    }
}

/// In the child: namespaces, hostname, lo, resolv.conf; wait for the go;
/// exec. Returns an exit code only on failure.
fn child_main(
    ready: OwnedFd,
    go: OwnedFd,
    hostname: &str,
    resolv: Option<&std::path::Path>,
    argv: &[CString],
    env: &[String],
) -> i32 {
    let fail = |what: &str, e: &dyn std::fmt::Display| -> i32 {
        eprintln!("mesh run: {what}: {e}");
        125
    };
    if let Err(e) = nix::sched::unshare(
        CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWNS,
    ) {
        return fail("creating namespaces", &e);
    }
    use nix::mount::{mount, MsFlags};
    if let Err(e) = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    ) {
        return fail("making mounts private", &e);
    }
    if let Err(e) = nix::unistd::sethostname(hostname) {
        return fail("setting the hostname", &e);
    }
    if let Err(e) = lo_up() {
        return fail("bringing lo up", &e);
    }
    if let Some(src) = resolv {
        if let Err(e) = mount(
            Some(src),
            "/etc/resolv.conf",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ) {
            return fail("mounting resolv.conf", &e);
        }
    }
    let mut rf = std::fs::File::from(ready);
    if rf.write_all(b"R").is_err() {
        return 125;
    }
    drop(rf);
    let mut go_byte = [0u8; 1];
    let mut gf = std::fs::File::from(go);
    if gf.read_exact(&mut go_byte).is_err() || go_byte[0] != b'G' {
        // The parent failed to attach us (and said so).
        return 125;
    }
    drop(gf);
    for kv in env {
        if let Some((k, v)) = kv.split_once('=') {
            std::env::set_var(k, v);
        }
    }
    for sig in FORWARDED {
        // SAFETY: restoring the default disposition before exec.
        unsafe {
            let _ = signal::signal(sig, SigHandler::SigDfl);
        }
    }
    let e = match nix::unistd::execvp(&argv[0], argv) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    eprintln!("mesh run: cannot run {}: {e}", argv[0].to_string_lossy());
    if e == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    }
}

/// `ip link set lo up`, with an ioctl.
fn lo_up() -> Result<(), nix::Error> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data; the name is NUL-terminated within
    // IFNAMSIZ, and the ioctls only read/write the struct we pass.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(nix::Error::last());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(nix::Error::last());
        }
    }
    Ok(())
}
