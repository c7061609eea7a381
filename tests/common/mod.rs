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
//! Beyond that: `frames` puts chosen bytes on a link (a packet socket in a
//! namespace, Ethernet/IPv4/IPv6/VXLAN builders); `impair` puts a relay
//! between a host and the switch that drops, delays, reorders and
//! duplicates its frames, or cuts it off (`World::add_impaired_host`);
//! `capture` runs tcpdump on a host's underlay.
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
mod consts;
mod datapath;
pub mod docker;
mod frames;
mod hosts;
mod impair;
pub mod podman;
mod process;
mod world;

// Each test binary uses a different subset.
#[allow(unused_imports)]
pub use capture::*;
#[allow(unused_imports)]
pub use consts::*;
#[allow(unused_imports)]
pub use datapath::*;
#[allow(unused_imports)]
pub use frames::*;
#[allow(unused_imports)]
pub use hosts::*;
#[allow(unused_imports)]
pub use impair::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use world::*;
