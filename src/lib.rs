//! The `mesh` daemon and CLI as a library: the binary (`main.rs`) only calls
//! [`cli::run`] (or the CNI plugin). The folders are the layers, and imports
//! point one way, downwards: `cli` → `daemon` → `integrations` → `attach` →
//! `router` → `datapath` → `host` (and `mesh_proto`, `mesh_dns`); the leaf
//! modules at the top level (`api`, `paths`, `persist`, `identity`, `peer`,
//! `warn`) import none of the layers. `scripts/imports.py src` prints the
//! graph and fails on a cycle.
//!
//! - [`cli`]: the command line, its argument types and output formats (the
//!   only place clap types exist).
//! - [`daemon`]: its [`daemon::Config`], launching (in the background too),
//!   setting up devices and sockets, starting the tasks, the control socket.
//! - [`integrations`]: the Docker API proxy (`mesh env`) and the CNI plugin.
//! - [`attach`]: attached containers, `mesh run`, `expose`, the ADDR forms,
//!   the DNS server in each container.
//! - [`router`]: the task that owns the gossip core and every connection,
//!   the control connections (TCP 6783) around the sans-IO
//!   [`mesh_proto::conn::Connection`], the connection maker, and the
//!   drivers of the gossip channels (IPAM ring, names).
//! - [`datapath`]: the sleeve (TAP ↔ UDP 6783, batched), its UDP I/O, the
//!   kernel VXLAN fast path.
//! - [`host`]: netlink (bridge, veth, VXLAN, addresses), nftables, netns, TAP.
//! - Leaves: [`api`] (the CLI ↔ daemon protocol and its client), [`metrics`]
//!   (the Prometheus instruments and the scrape's text), [`paths`]
//!   (every file under the run and data directories), [`persist`] (atomic
//!   files), [`identity`] (the peer's key), [`peer`] (the local peer's
//!   facts), [`warn`] (the warning limiter).

pub mod api;
pub mod attach;
pub mod cli;
pub mod daemon;
pub mod datapath;
pub mod host;
pub mod identity;
pub mod integrations;
pub mod metrics;
pub mod paths;
pub mod peer;
pub mod persist;
pub mod router;
pub mod warn;
