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

mod capture;
mod datapath;
mod hosts;
pub mod podman;
mod process;
mod world;

// Each test binary uses a different subset.
#[allow(unused_imports)]
pub use capture::*;
#[allow(unused_imports)]
pub use datapath::*;
#[allow(unused_imports)]
pub use hosts::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use world::*;

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
