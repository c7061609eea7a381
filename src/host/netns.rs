//! Network namespace handles: resolving a TARGET (PID or nsfs path) to an
//! open namespace file, identifying namespaces, and running code inside one.
//!
//! Invariant: only threads spawned here ever call `setns()`; they live for
//! one closure and exit, so no thread of the daemon's runtime changes
//! namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use nix::sched::CloneFlags;
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};
use serde::{Deserialize, Serialize};

use super::error::HostError;

/// Identity of a network namespace: `st_dev` and `st_ino` of its nsfs file.
/// Two files refer to the same namespace iff their ids are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetnsId {
    /// Device of the nsfs file.
    pub dev: u64,
    /// Inode of the nsfs file.
    pub ino: u64,
}

/// Resolve a TARGET string to an open network namespace and its identity.
///
/// All digits means a PID (`/proc/PID/ns/net`); anything else is a path to
/// a namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`, ...). The file
/// is checked to really be a network namespace.
pub fn open_netns(target: &str) -> Result<(File, NetnsId), HostError> {
    let (path, pid) = if !target.is_empty() && target.bytes().all(|b| b.is_ascii_digit()) {
        let pid: u32 = target
            .parse()
            .map_err(|_| HostError::NoSuchProcess(u32::MAX))?;
        (format!("/proc/{pid}/ns/net"), Some(pid))
    } else {
        (target.to_string(), None)
    };
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(match pid {
                Some(pid) => HostError::NoSuchProcess(pid),
                None => HostError::NoSuchNetns(path),
            });
        }
        Err(e) => return Err(HostError::io(format!("open {path}"), e)),
    };
    check_is_netns(&file, &path)?;
    let id = netns_id(&file).map_err(|e| HostError::io(format!("stat {path}"), e))?;
    Ok((file, id))
}

/// The network namespaces kept alive by something besides this process,
/// each with a path that holds it: those some other process is in
/// (`/proc/PID/ns/net`), and those bind-mounted where this process sees
/// mounts (`/run/netns/NAME`, a runtime's own directory). A container's
/// namespace in neither is held only by this daemon's own sockets (its DNS
/// server inside): no process of the container is left and no one can
/// enter it again. A walk of all of `/proc`: see [`holders`] for the cheap
/// way to ask again.
pub fn netns_in_use() -> std::collections::HashMap<NetnsId, String> {
    let me = std::process::id();
    let mut used = std::collections::HashMap::new();
    let mut add = |path: String| {
        if let Some(id) = id_of_path(&path) {
            used.entry(id).or_insert(path);
        }
    };
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid != me {
                add(format!("/proc/{pid}/ns/net"));
            }
        }
    }
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in mounts.lines() {
            // `ID PARENT MAJ:MIN ROOT MOUNTPOINT ... - FSTYPE SOURCE ...`;
            // a mount point with a space or tab comes escaped (`\040`): skipped.
            let Some((fields, fs)) = line.split_once(" - ") else {
                continue;
            };
            if !fs.starts_with("nsfs ") {
                continue;
            }
            if let Some(mp) = fields.split(' ').nth(4).filter(|m| !m.contains('\\')) {
                add(mp.to_string());
            }
        }
    }
    used
}

fn id_of_path(path: &str) -> Option<NetnsId> {
    std::fs::metadata(path).ok().map(|md| NetnsId {
        dev: md.dev(),
        ino: md.ino(),
    })
}

/// For each namespace, a path that holds it now (see [`netns_in_use`]),
/// or `None` when nothing but this process does. Each comes with the path
/// that held it last time, if any: while every such path still leads to
/// its namespace (the same process, the same mount), that is the answer,
/// one `stat` each, and `/proc` is not walked, so the check costs the
/// same on a host running thousands of processes as on an empty one.
/// `None` overall when the walk found nothing at all (`/proc`
/// unreadable): that decides nothing.
pub fn holders(namespaces: &[(NetnsId, Option<String>)]) -> Option<Vec<Option<String>>> {
    let held = |(id, hint): &(NetnsId, Option<String>)| {
        hint.as_ref()
            .filter(|p| id_of_path(p) == Some(*id))
            .cloned()
    };
    let hinted: Vec<Option<String>> = namespaces.iter().map(held).collect();
    if hinted.iter().all(Option::is_some) {
        return Some(hinted);
    }
    let used = netns_in_use();
    if used.is_empty() {
        return None;
    }
    Some(
        namespaces
            .iter()
            .map(|(id, _)| used.get(id).cloned())
            .collect(),
    )
}

/// Identity of an open namespace file.
pub fn netns_id(file: &File) -> std::io::Result<NetnsId> {
    let md = file.metadata()?;
    Ok(NetnsId {
        dev: md.dev(),
        ino: md.ino(),
    })
}

/// The network namespace of the calling thread, opened.
pub fn current_netns() -> Result<(File, NetnsId), HostError> {
    // thread-self, not self: a thread may have been setns()'d on purpose
    // (tests run their "host" on such a thread).
    let path = "/proc/thread-self/ns/net";
    let f = File::open(path).map_err(|e| HostError::io(format!("open {path}"), e))?;
    let id = netns_id(&f).map_err(|e| HostError::io(format!("stat {path}"), e))?;
    Ok((f, id))
}

/// Check that an already open file is a network namespace (as
/// [`open_netns`] does), naming it by its `/proc/self/fd` link in errors.
pub fn check_netns_file(file: &File) -> Result<(), HostError> {
    let label = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| format!("fd {}", file.as_raw_fd()));
    check_is_netns(file, &label)
}

fn check_is_netns(file: &File, path: &str) -> Result<(), HostError> {
    let st = fstatfs(file).map_err(|e| HostError::io(format!("statfs {path}"), e.into()))?;
    if st.filesystem_type() != NSFS_MAGIC {
        return Err(HostError::NotNetns(path.to_string()));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only returns an int; the
    // fd is valid for the duration of the call because `file` is borrowed.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if kind < 0 {
        return Err(HostError::io(
            format!("ioctl NS_GET_NSTYPE {path}"),
            std::io::Error::last_os_error(),
        ));
    }
    if kind != libc::CLONE_NEWNET {
        return Err(HostError::NotNetns(path.to_string()));
    }
    Ok(())
}

/// Run `f` on a fresh thread that has joined the network namespace `ns`,
/// and return its result. Blocks the caller until `f` returns: from async
/// code, keep `f` short (creating a socket, a device) or use
/// `tokio::task::spawn_blocking` around this call.
///
/// Sockets and devices created by `f` stay in `ns` after the thread exits.
pub fn run_in_netns<T: Send + 'static>(
    ns: &File,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, HostError> {
    let ns = ns
        .try_clone()
        .map_err(|e| HostError::io("dup netns fd", e))?;
    let handle = std::thread::Builder::new()
        .name("mesh-netns".into())
        .spawn(move || -> Result<T, HostError> {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| HostError::io("setns(CLONE_NEWNET)", e.into()))?;
            Ok(f())
        })
        .map_err(|e| HostError::Thread(e.to_string()))?;
    handle
        .join()
        .map_err(|_| HostError::Thread("panicked".into()))?
}

/// The hostname of process `pid`, if it has a UTS namespace of its own
/// (a container's); `None` when it shares ours or is gone.
pub fn hostname_of(pid: u32) -> Option<String> {
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/uts")).ok()?;
    let ours = std::fs::metadata("/proc/self/ns/uts").ok()?;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return None;
    }
    let uts = File::open(format!("/proc/{pid}/ns/uts")).ok()?;
    std::thread::Builder::new()
        .name("mesh-uts".into())
        .spawn(move || -> Option<String> {
            nix::sched::setns(&uts, CloneFlags::CLONE_NEWUTS).ok()?;
            nix::unistd::gethostname().ok()?.into_string().ok()
        })
        .ok()?
        .join()
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::testutil::{require_root, TestNet};

    #[test]
    fn open_netns_errors() {
        if !require_root() {
            return;
        }
        // A PID that cannot exist (above pid_max's hard limit of 2^22).
        match open_netns("99999999") {
            Err(HostError::NoSuchProcess(99999999)) => {}
            other => panic!("expected NoSuchProcess, got {other:?}"),
        }
        match open_netns("/run/netns/mesh-test-does-not-exist") {
            Err(HostError::NoSuchNetns(p)) => assert_eq!(p, "/run/netns/mesh-test-does-not-exist"),
            other => panic!("expected NoSuchNetns, got {other:?}"),
        }
        let path = std::env::temp_dir().join(format!("mesh-notns-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let r = open_netns(path.to_str().unwrap());
        std::fs::remove_file(&path).unwrap();
        match r {
            Err(HostError::NotNetns(_)) => {}
            other => panic!("expected NotNetns, got {other:?}"),
        }
        // A namespace file of another type is not a network namespace.
        match open_netns("/proc/self/ns/uts") {
            Err(HostError::NotNetns(_)) => {}
            other => panic!("expected NotNetns, got {other:?}"),
        }
    }

    #[test]
    fn open_netns_by_pid_and_path_agree() {
        if !require_root() {
            return;
        }
        let (_, by_pid) = open_netns(&std::process::id().to_string()).unwrap();
        let (_, by_path) = open_netns("/proc/self/ns/net").unwrap();
        assert_eq!(by_pid, by_path);

        let net = TestNet::new();
        let ns = net.add_ns("a");
        let (f, id) = open_netns(&net.ns_path(&ns)).unwrap();
        assert_ne!(id, by_pid);
        // Code run inside it sees its namespace, and the caller is unmoved.
        let inner = run_in_netns(&f, || current_netns().map(|(_, id)| id))
            .unwrap()
            .unwrap();
        assert_eq!(inner, id);
        assert_eq!(current_netns().unwrap().1, by_pid);
    }

    #[test]
    fn holders_follow_a_namespace_from_its_mount_to_a_process_to_nothing() {
        if !require_root() {
            return;
        }
        let net = TestNet::new();
        let ns = net.add_ns("h");
        let mount = net.ns_path(&ns);
        let (_, id) = open_netns(&mount).unwrap();
        let ask = |hint: Option<String>| holders(&[(id, hint)]).unwrap().pop().unwrap();
        // Held by its mount: found by a walk, and the hint is the answer.
        let found = ask(None).expect("the mount holds it");
        assert_eq!(id_of_path(&found), Some(id));
        assert_eq!(ask(Some(mount.clone())), Some(mount.clone()));
        // A process in it, then the mount gone: the stale hint is let go
        // of and the process found.
        struct Reaped(std::process::Child);
        impl Drop for Reaped {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let child = Reaped(
            std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "sleep", "300"])
                .spawn()
                .unwrap(),
        );
        let proc_path = format!("/proc/{}/ns/net", child.0.id());
        assert!(crate::host::testutil::wait_until(
            std::time::Duration::from_secs(10),
            || id_of_path(&proc_path) == Some(id)
        ));
        crate::host::testutil::run(&["ip", "netns", "del", &ns]);
        assert_eq!(ask(Some(mount.clone())), Some(proc_path.clone()));
        assert_eq!(ask(Some(proc_path.clone())), Some(proc_path.clone()));
        // The process gone too: nothing but us (the open file) holds it.
        drop(child);
        assert_eq!(ask(Some(proc_path)), None);
    }
}
