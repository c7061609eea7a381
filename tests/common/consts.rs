//! The harness's constants and shared counters, and the imports every
//! part of it uses (a leaf: it imports no other part).
#![allow(unused_imports)]

pub(super) use std::cell::RefCell;
pub(super) use std::fs::{self, File, OpenOptions};
pub(super) use std::io::{Read, Seek, SeekFrom};
pub(super) use std::net::{Ipv4Addr, UdpSocket};
pub(super) use std::os::unix::fs::PermissionsExt;
pub(super) use std::path::{Path, PathBuf};
pub(super) use std::process::{Child, Command, ExitStatus, Output, Stdio};
pub(super) use std::sync::atomic::{AtomicU64, Ordering};
pub(super) use std::sync::Mutex;
pub(super) use std::time::{Duration, Instant};

pub(super) use nix::sched::CloneFlags;
pub(super) use nix::sys::signal::{kill, Signal};
pub(super) use nix::unistd::Pid;

/// The `mesh` binary under test.
pub const MESH: &str = env!("CARGO_BIN_EXE_mesh");
/// The control (TCP) and sleeve (UDP) port.
pub const PORT: u16 = 6783;
/// Default deadline of a `mesh` command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of `mesh launch` (key generation, password derivation).
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(90);
/// Lines of `mesh.log` printed per host when a test fails.
pub(super) const LOG_TAIL_LINES: usize = 60;

/// Serialises `ip netns add`: the first ones on a fresh machine race to set up
/// the shared `/run/netns` mount.
pub(super) static NETNS_LOCK: Mutex<()> = Mutex::new(());
/// Makes scratch file names unique within this process.
pub(super) static SCRATCH: AtomicU64 = AtomicU64::new(0);
