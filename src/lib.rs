//! The `mesh` daemon and CLI as a library: the binary (`main.rs`) only calls
//! [`cli::run`]. Modules, one job each:
//!
//! - [`cli`]: the command line; [`api`]: the CLI ↔ daemon socket protocol.
//! - [`daemon`]: launching and running the daemon.
//! - [`control`]: control connections (TCP 6783); [`connmaker`]: which
//!   peers to dial; [`router`]: connections and the gossip core; [`sleeve`]:
//!   the data path (TAP ↔ UDP 6783), relaying included.
//! - [`attach`]: attached containers; [`addr`]: ADDR forms.
//! - [`host`]: netlink plumbing (bridge, veth, netns, TAP).
//! - [`identity`], [`persist`], [`paths`]: the files a peer keeps.
//! - [`proxy`]: the Docker API proxy (`mesh env`); [`cni`]: the CNI plugin.

pub mod addr;
pub mod api;
pub mod attach;
pub mod cli;
pub mod cni;
pub mod connmaker;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod fastdp;
pub mod host;
pub mod identity;
pub mod ipam;
pub mod paths;
pub mod peer;
pub mod persist;
pub mod proxy;
pub mod router;
pub mod run;
pub mod sleeve;
pub mod udpio;
pub mod warn;
