//! The zone: configuration plus an immutable snapshot of the names, swapped
//! whole on every change.
//!
//! Readers (the socket loops) hold an `Arc<Snapshot>` and only look at the
//! generation counter per query (one atomic load); when it moved they take
//! the new snapshot under a read lock held for the time of an `Arc` clone.
//! No lock is ever held across an await, and a writer never waits for a
//! query to finish.

use crate::answer::{self, Outcome, Rng, Transport};
use crate::snapshot::{wire_name, Snapshot};
use crate::upstream::Upstreams;
use mesh_proto::names::{normalize_name, NameTable};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How the server answers and forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The domain served (default `mesh.local.`); single-label queries get
    /// it appended.
    pub domain: String,
    /// TTL of our answers, in seconds (default 1).
    pub ttl: u32,
    /// Where the upstream servers are listed (`nameserver` lines; re-read
    /// when its modification time changes). As an extension a server may
    /// carry a port: `nameserver 127.0.0.1:5353`.
    pub resolv_conf: PathBuf,
    /// Bound on forwarding one query over all upstream servers (default
    /// 2 s); past it the client gets SERVFAIL.
    pub upstream_timeout: Duration,
    /// Forwarded queries in flight at most; more get SERVFAIL at once.
    pub max_forwards: usize,
    /// TCP connections at most; more are closed at once.
    pub max_tcp_connections: usize,
    /// A TCP connection idle this long is closed.
    pub tcp_idle: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            domain: "mesh.local.".into(),
            ttl: 1,
            resolv_conf: "/etc/resolv.conf".into(),
            upstream_timeout: Duration::from_secs(2),
            max_forwards: 256,
            max_tcp_connections: 128,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// A configuration that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The domain is not a DNS name.
    #[error("invalid DNS domain {0:?}: expected a name like mesh.local.")]
    BadDomain(String),
}

/// What the server serves: the configuration and the current names.
#[derive(Debug)]
pub struct Zone {
    config: Config,
    domain: String,
    snapshot: RwLock<Arc<Snapshot>>,
    generation: AtomicU64,
    pub(crate) upstreams: Upstreams,
    counters: Counters,
}

/// How many queries the servers of a zone saw, by outcome; every server
/// (each container's, the host's) counts into its zone's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Answered from the names with one or more records.
    pub answered: u64,
    /// Answered from the names with none: NXDOMAIN, or no record of the
    /// type asked.
    pub not_found: u64,
    /// Sent to the upstream servers.
    pub forwarded: u64,
    /// Answered with an error code: SERVFAIL (no upstream answered, too
    /// many forwards in flight), FORMERR, NOTIMP, REFUSED.
    pub failed: u64,
    /// Not answered: not a query, or too short to answer.
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    answered: AtomicU64,
    not_found: AtomicU64,
    forwarded: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

impl Zone {
    /// A zone with no names yet.
    pub fn new(config: Config) -> Result<Zone, ConfigError> {
        let bad = || ConfigError::BadDomain(config.domain.clone());
        let mut domain = normalize_name(&config.domain).map_err(|_| bad())?;
        if !domain.ends_with('.') {
            domain.push('.');
        }
        let snap = Snapshot {
            domain: domain.as_bytes().into(),
            ttl: config.ttl,
            ..Default::default()
        };
        Ok(Zone {
            upstreams: Upstreams::new(config.resolv_conf.clone()),
            config,
            domain,
            snapshot: RwLock::new(Arc::new(snap)),
            generation: AtomicU64::new(0),
            counters: Counters::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The domain, lowercase, with its trailing dot.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The full name served for a table name: a name with a trailing dot,
    /// or one that already ends in our domain (`web.mesh.local`, as
    /// `mesh dns-add -h` takes it), is absolute; any other is a label (or
    /// a relative name) in our domain.
    pub fn fqdn(&self, name: &str) -> String {
        let name = name.to_ascii_lowercase();
        let bare = self.domain.trim_end_matches('.');
        if name.ends_with('.') {
            name
        } else if name == bare || name.ends_with(&format!(".{bare}")) {
            format!("{name}.")
        } else {
            format!("{name}.{}", self.domain)
        }
    }

    /// Replace all names with these `(name, address)` pairs. Invalid names
    /// are skipped.
    pub fn set_names<I, S>(&self, entries: I)
    where
        I: IntoIterator<Item = (S, Ipv4Addr)>,
        S: AsRef<str>,
    {
        let mut snap = Snapshot {
            domain: self.domain.as_bytes().into(),
            ttl: self.config.ttl,
            ..Default::default()
        };
        for (name, addr) in entries {
            let Ok(name) = normalize_name(name.as_ref()) else {
                continue;
            };
            let fqdn = self.fqdn(&name);
            let addrs = snap.names.entry(fqdn.as_bytes().into()).or_default();
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
            let wire: Box<[u8]> = wire_name(&fqdn).into();
            let names = snap.reverse.entry(addr).or_default();
            if !names.contains(&wire) {
                names.push(wire);
            }
        }
        for names in snap.reverse.values_mut() {
            names.sort();
        }
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snap);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Replace all names with the live entries of `table`.
    pub fn set_table(&self, table: &NameTable) {
        self.set_names(table.entries().map(|e| (e.name, e.addr)));
    }

    /// The addresses served for `name` (a single label gets the domain).
    pub fn lookup(&self, name: &str) -> Vec<Ipv4Addr> {
        let snap = self.snapshot();
        let key = self.fqdn(name);
        snap.names.get(key.as_bytes()).cloned().unwrap_or_default()
    }

    /// How many names are served.
    pub fn len(&self) -> usize {
        self.snapshot().names.len()
    }

    /// Whether no name is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Answer one query without sockets (for tests and other transports):
    /// writes the answer to `out` when the outcome is
    /// [`Outcome::Reply`].
    pub fn respond(&self, query: &[u8], transport: Transport, out: &mut Vec<u8>) -> Outcome {
        let mut rng = Rng::new(crate::random_u64());
        let o = answer::respond(&self.snapshot(), query, transport, out, &mut rng);
        self.count(o, out);
        o
    }

    /// The queries counted so far.
    pub fn counts(&self) -> Counts {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            answered: get(&c.answered),
            not_found: get(&c.not_found),
            forwarded: get(&c.forwarded),
            failed: get(&c.failed),
            dropped: get(&c.dropped),
        }
    }

    /// Count one query's outcome; `out` holds the answer for
    /// [`Outcome::Reply`].
    pub(crate) fn count(&self, outcome: Outcome, out: &[u8]) {
        let c = &self.counters;
        let counter = match outcome {
            Outcome::Forward => &c.forwarded,
            Outcome::Drop => &c.dropped,
            Outcome::Reply => {
                let rcode = out.get(3).map_or(2, |b| b & 0x0f);
                let answers = match (out.get(6), out.get(7)) {
                    (Some(&h), Some(&l)) => u16::from_be_bytes([h, l]),
                    _ => 0,
                };
                match rcode {
                    0 if answers > 0 => &c.answered,
                    0 | 3 => &c.not_found,
                    _ => &c.failed,
                }
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Count an answer that failed (a forward no upstream answered).
    pub(crate) fn count_failed(&self) {
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A socket loop's view of the zone: refreshed only when the generation
/// moved.
pub(crate) struct View {
    pub snap: Arc<Snapshot>,
    generation: u64,
}

impl View {
    pub(crate) fn new(zone: &Zone) -> View {
        let generation = zone.generation();
        View {
            snap: zone.snapshot(),
            generation,
        }
    }

    pub(crate) fn refresh(&mut self, zone: &Zone) {
        let g = zone.generation();
        if g != self.generation {
            self.generation = g;
            self.snap = zone.snapshot();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_and_names() {
        assert!(Zone::new(Config {
            domain: "bad domain".into(),
            ..Config::default()
        })
        .is_err());
        let z = Zone::new(Config {
            domain: "Mesh.Local".into(),
            ..Config::default()
        })
        .unwrap();
        assert_eq!(z.domain(), "mesh.local.");
        let a = Ipv4Addr::new(198, 19, 0, 1);
        z.set_names([("web", a), ("WEB", a), ("x.example.", a), ("bad name", a)]);
        assert_eq!(z.len(), 2);
        assert_eq!(z.lookup("web"), vec![a]);
        assert_eq!(z.lookup("web.mesh.local."), vec![a]);
        assert_eq!(z.lookup("x.example."), vec![a]);
        // `mesh dns-add -h web2.mesh.local` (no trailing dot): absolute,
        // served and looked up as web2.mesh.local., not under the domain
        // twice; a dotted name outside the domain is relative.
        let b = Ipv4Addr::new(198, 19, 0, 2);
        z.set_names([("web2.mesh.local", b), ("db.rack1", b)]);
        assert_eq!(z.lookup("web2.mesh.local"), vec![b]);
        assert_eq!(z.lookup("web2"), vec![b]);
        assert!(z.lookup("web2.mesh.local.mesh.local").is_empty());
        assert_eq!(z.lookup("db.rack1"), vec![b]);
        assert_eq!(z.lookup("db.rack1.mesh.local."), vec![b]);
        assert_eq!(z.fqdn("mesh.local"), "mesh.local.");
    }
}
