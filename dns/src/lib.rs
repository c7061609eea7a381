//! # mesh-dns: the DNS server of a mesh peer
//!
//! Answers `NAME.<domain>` (default `mesh.local.`) from the mesh's name
//! table and forwards everything else to the servers of a resolv.conf. It is
//! the only crate that sees hickory (`hickory-proto`, for parsing queries);
//! none of hickory's types appear in its API.
//!
//! What it answers:
//!
//! - A records for known names, several addresses in random order; a
//!   single-label name gets the domain appended; case-insensitive (the
//!   client's letter case is echoed); TTL from [`Config::ttl`] (1 s).
//! - PTR records for `d.c.b.a.in-addr.arpa.` of known addresses.
//! - Other types for known names: NOERROR, no answers. Unknown names in the
//!   domain: NXDOMAIN.
//! - Anything else (unknown single labels included) is forwarded to the
//!   upstream servers, which answer within [`Config::upstream_timeout`] or
//!   the client gets SERVFAIL.
//! - UDP answers are cut to 512 bytes, or the client's EDNS size up to
//!   1232: over it the answers are dropped and TC is set, and the client
//!   asks again over TCP. Malformed queries get FORMERR, or nothing.
//!
//! How the daemon drives it:
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use mesh_dns::{serve, Config, Zone};
//! let zone = Arc::new(Zone::new(Config::default())?);
//! // Bound by the caller (e.g. inside a container's network namespace).
//! let udp = std::net::UdpSocket::bind("127.0.0.11:53")?;
//! let tcp = std::net::TcpListener::bind("127.0.0.11:53")?;
//! let server = tokio::spawn(serve(udp, tcp, zone.clone()));
//! // Whenever the name table's generation moves:
//! # let table = mesh_proto::names::NameTable::new(mesh_proto::sign::Identity::from_seed(&[1; 32]));
//! zone.set_table(&table);
//! // One zone may back many servers; abort the task to stop one.
//! server.abort();
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod answer;
mod server;
mod snapshot;
mod upstream;
mod zone;

pub use answer::{Outcome, Transport, EDNS_PAYLOAD, MAX_TCP_PAYLOAD, MIN_UDP_PAYLOAD};
pub use server::{serve, serve_paced, serve_tcp, serve_udp};
pub use upstream::parse_resolv_conf;
pub use zone::{Config, ConfigError, Counts, Zone};

/// A server that cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket failed (setting it up, or an error that is not about one
    /// client).
    #[error("DNS server socket: {0}")]
    Io(#[from] std::io::Error),
}

/// A random number (ids of forwarded queries, answer order seeds).
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    RandomState::new().hash_one((COUNTER.fetch_add(1, Ordering::Relaxed), nanos))
}
