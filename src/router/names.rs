//! Names: the driver of the mesh-wide name table ([`mesh_proto::names`],
//! the gossip channel `dns`) and the DNS servers that answer from it
//! ([`mesh_dns`]).
//!
//! The router task owns the table's driver, as it owns the allocator's: our
//! own entries (added on attach, `mesh dns-add`) change the table, are
//! written to `$MESH_DATA_DIR/names.bin`, and their delta is gossiped; what
//! neighbours send is merged by the gossip core. After either, the
//! [`Zone`] — one snapshot shared by every server — is refreshed. Servers
//! listen inside each attached container at `127.0.0.11:53` (sockets opened
//! in the container's namespace, UDP and TCP, as Docker's embedded DNS) and
//! on the host at `--dns-listen-address`; they never touch the table.
//!
//! The table signs our entries with the daemon's identity and verifies
//! everyone else's (see [`mesh_proto::names`] for the bounds).
//! `names.bin` holds our own entries only. Entries the table refused for a
//! limit are logged (rate-limited) at each settle; the names of peers the
//! topology did not know at two purges in a row (a minute apart) are
//! dropped, as are those of peers it garbage-collects.

use super::channel::ChannelDriver;
use crate::api::{DnsEntry, DnsStatus};
use crate::persist;
use crate::warn::{Kind, WarnLimit};
use mesh_dns::Zone;
use mesh_proto::gossip::Gossip;
use mesh_proto::name::PeerName;
use mesh_proto::names::{self, NameError, NameTable, SharedNameTable};
use mesh_proto::sign::Identity;
use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::warn;

/// How often our old tombstones are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// What the attach manager and the API ask of the name table.
pub enum Cmd {
    /// Register `name` for each address of `container`.
    Add {
        /// The container's id (its allocation id), or `-` for names added
        /// with `mesh dns-add IP... -h FQDN`.
        container: String,
        /// Its addresses.
        addrs: Vec<Ipv4Addr>,
        /// The name: a label (served under the domain) or an FQDN.
        name: String,
        /// The answer.
        reply: Option<oneshot::Sender<Result<(), String>>>,
    },
    /// Remove entries of `container`: those with these addresses (all when
    /// empty) and this name (any when `None`).
    Remove {
        /// The container's id.
        container: String,
        /// Addresses; all when empty.
        addrs: Vec<Ipv4Addr>,
        /// A name, or any.
        name: Option<String>,
        /// The answer: how many entries went.
        reply: Option<oneshot::Sender<usize>>,
    },
    /// After a restart: drop our entries of containers no longer attached.
    Reconcile {
        /// The ids of the containers still attached.
        live: Vec<String>,
    },
    /// Addresses served for a name.
    Lookup {
        /// The name.
        name: String,
        /// The answer.
        reply: oneshot::Sender<Vec<Ipv4Addr>>,
    },
}

/// The driver, owned by the router.
pub struct Driver {
    table: SharedNameTable,
    zone: Option<Arc<Zone>>,
    path: PathBuf,
    saved: u64,
    served: u64,
    last_purge: Instant,
    /// Peers we hold names of that the topology did not know at the last
    /// purge.
    unknown: BTreeSet<PeerName>,
}

impl Driver {
    /// Load the persisted table (our own entries), or start an empty one.
    /// `zone` is `None` with `--no-dns`: names are still gossiped (other
    /// peers may serve them), just not served here.
    pub fn load(
        id: Identity,
        data_dir: PathBuf,
        zone: Option<Arc<Zone>>,
    ) -> anyhow::Result<Driver> {
        let path = data_dir.join(crate::paths::NAMES);
        let table = match std::fs::read(&path) {
            Ok(bytes) => NameTable::restore(id, &bytes)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => NameTable::new(id),
            Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
        };
        let saved = table.own_generation();
        Ok(Driver {
            table: SharedNameTable::new(table),
            zone,
            path,
            saved,
            served: u64::MAX,
            last_purge: Instant::now(),
            unknown: BTreeSet::new(),
        })
    }

    /// Handle one request. Call [`Driver::settle`] afterwards.
    pub fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Add {
                container,
                addrs,
                name,
                reply,
            } => {
                let mut t = self.table.lock();
                let mut r = Ok(());
                for a in addrs {
                    if let Err(e) = t.add(&container, a, &name) {
                        r = Err(match e {
                            NameError::BadName(_) | NameError::BadContainer(_) => {
                                format!("invalid name {name:?}: {e}")
                            }
                            _ => format!("cannot add name {name:?}: {e}"),
                        });
                        break;
                    }
                }
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
            Cmd::Remove {
                container,
                addrs,
                name,
                reply,
            } => {
                let mut t = self.table.lock();
                let n = if addrs.is_empty() {
                    t.remove(&container, None, name.as_deref())
                } else {
                    addrs
                        .iter()
                        .map(|a| t.remove(&container, Some(*a), name.as_deref()))
                        .sum()
                };
                if let Some(reply) = reply {
                    let _ = reply.send(n);
                }
            }
            Cmd::Reconcile { live } => {
                let mut t = self.table.lock();
                let me = t.me();
                let ours: Vec<String> = t
                    .entries()
                    .filter(|e| e.peer == me && e.container != "-")
                    .map(|e| e.container.to_string())
                    .filter(|c| !live.contains(c))
                    .collect();
                for c in ours {
                    t.remove_container(&c);
                }
            }
            Cmd::Lookup { name, reply } => {
                let found = match &self.zone {
                    Some(z) => z.lookup(&name),
                    None => self.table.lock().lookup(&name),
                };
                let _ = reply.send(found);
            }
        }
    }

    /// For `mesh status dns` and `mesh report`.
    pub fn status(&self) -> DnsStatus {
        let t = self.table.lock();
        let mut entries: Vec<DnsEntry> = t
            .entries()
            .map(|e| DnsEntry {
                name: e.name.to_string(),
                addr: e.addr.to_string(),
                container: e.container.to_string(),
                peer: e.peer.to_string(),
            })
            .collect();
        entries.sort_by(|a, b| (&a.name, &a.addr).cmp(&(&b.name, &b.addr)));
        DnsStatus {
            serving: self.zone.is_some(),
            domain: self
                .zone
                .as_ref()
                .map(|z| z.domain().to_string())
                .unwrap_or_default(),
            entries,
        }
    }
}

impl ChannelDriver for Driver {
    /// Plug the table into the gossip core as the `dns` channel.
    fn register(&self, gossip: &mut Gossip) {
        gossip.add_channel(names::CHANNEL, Box::new(self.table.clone()));
    }

    /// Periodic work: purge our old tombstones, and drop the names of
    /// peers the topology did not know at two purges in a row (names of
    /// invented peers, which the topology never garbage-collects).
    fn tick(&mut self, gossip: &Gossip) {
        let now = Instant::now();
        if now.duration_since(self.last_purge) >= PURGE_EVERY {
            self.last_purge = now;
            let known: HashSet<PeerName> = gossip.peers().into_iter().map(|p| p.name).collect();
            let mut t = self.table.lock();
            t.purge(now);
            let absent: BTreeSet<PeerName> = t.holders().filter(|p| !known.contains(p)).collect();
            for p in absent.intersection(&self.unknown) {
                t.drop_peer(*p);
            }
            self.unknown = absent.difference(&self.unknown).copied().collect();
        }
    }

    /// A peer was garbage-collected by the topology: its names go.
    fn forget_peer(&mut self, peer: PeerName) {
        self.table.lock().drop_peer(peer);
    }

    /// After anything that may have changed the table: persist our own
    /// entries when they changed, gossip our changes, refresh what the
    /// servers answer.
    fn settle(&mut self, gossip: &mut Gossip) {
        let (generation, delta, bytes, refused) = {
            let mut t = self.table.lock();
            let own = t.own_generation();
            let bytes = (own != self.saved).then(|| (own, t.persist()));
            (t.generation(), t.take_delta(), bytes, t.take_refusals())
        };
        if let Some(r) = refused {
            if WarnLimit::allow(Kind::Gossip) {
                warn!(count = r.count, "name entries refused: {}", r.last);
            }
        }
        if let Some((own, bytes)) = bytes {
            match persist::write_atomic(&self.path, &bytes, 0o600) {
                Ok(()) => self.saved = own,
                Err(e) => warn!("saving the name table: {e:#}"),
            }
        }
        if let Some(d) = delta {
            gossip.channel_broadcast(names::CHANNEL, d);
        }
        if generation != self.served {
            self.served = generation;
            if let Some(z) = &self.zone {
                z.set_table(&self.table.lock());
            }
        }
    }
}
