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
//! `names.bin` holds our own entries only, sealed with a checksum. It is
//! written by a saver thread ([`super::saver`]); our delta is gossiped, and
//! `mesh dns-add` / an attach answered, only once the write that holds it
//! is on disk (a failed write is said once, and retried each second). A
//! corrupt `names.bin` is moved aside and the table starts without our
//! entries: the peers hold them, signed by our key, and gossip them back. Entries the table refused for a
//! limit are logged (rate-limited) at each settle; the names of peers the
//! topology did not know at two purges in a row (a minute apart) are
//! dropped, as are those of peers it garbage-collects.

use super::channel::ChannelDriver;
use super::saver::{Durable, File, Saved};
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
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// How the answer to an `Add` whose name could not be written to disk
/// begins (the rest names the file and the cause).
pub const SAVE_FAILED: &str = "could not save the name to";

/// How often our old tombstones are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Test hook: `MESH_TEST_NAME_GRACE_SECS` keeps our tombstones that long
/// instead of [`mesh_proto::names::DEFAULT_GRACE`] (so a soak shows, in
/// minutes, that memory stops growing once purging starts).
fn test_grace() -> Option<Duration> {
    std::env::var("MESH_TEST_NAME_GRACE_SECS")
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_secs)
}

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

/// What waits for our own entries of a generation to be on disk.
enum Held {
    /// Our delta, to gossip.
    Delta(Vec<u8>),
    /// The answer to an `Add`.
    Reply(AddReply),
}

/// Where the answer to an `Add` goes.
type AddReply = oneshot::Sender<Result<(), String>>;

/// After a corrupt `names.bin`: our entries are adopted as the peers gossip
/// them back, until a neighbour has been connected for [`RECOVERY_FOR`]
/// (or [`RECOVERY_MAX`] passed); then those of containers gone are removed.
struct Recovery {
    until: Instant,
    connected_since: Option<Instant>,
    /// The reconcile asked for meanwhile.
    live: Option<Vec<String>>,
}

/// How long a neighbour must have been connected to end a recovery.
const RECOVERY_FOR: Duration = Duration::from_secs(5);
/// A recovery ends after this in any case.
const RECOVERY_MAX: Duration = Duration::from_secs(120);

/// The driver, owned by the router.
pub struct Driver {
    table: SharedNameTable,
    zone: Option<Arc<Zone>>,
    /// `names.bin` (our own entries, by own generation), and what waits
    /// for it to be written.
    disk: Durable<Held>,
    /// Answers to `Add` of this round, sent at the settle.
    replies: Vec<(AddReply, Result<(), String>)>,
    /// After a corrupt `names.bin`: taking our entries back from the peers.
    recovery: Option<Recovery>,
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
        let next = "starting without this peer's own names: the peers hold them (signed by our key) and gossip them back";
        let loaded = persist::load_or_move_aside(&path, next, |bytes, _| {
            NameTable::restore(id.clone(), bytes)
                .map(Ok::<_, std::convert::Infallible>)
                .map_err(|e| persist::Corrupt::Payload(e.to_string()))
        })?;
        let (table, recovery) = match loaded {
            Ok(persist::Loaded::Found(t)) => (t, None),
            Ok(persist::Loaded::MovedAside { .. }) => {
                let mut t = NameTable::new(id);
                t.set_adopting(true);
                let r = Recovery {
                    until: Instant::now() + RECOVERY_MAX,
                    connected_since: None,
                    live: None,
                };
                (t, Some(r))
            }
            _ => (NameTable::new(id), None),
        };
        let table = match test_grace() {
            Some(g) => table.with_grace(g),
            None => table,
        };
        let disk = Durable::new(
            File::Names,
            path,
            table.own_generation(),
            "the name table",
            "names added are refused and not gossiped",
        );
        Ok(Driver {
            table: SharedNameTable::new(table),
            zone,
            disk,
            replies: Vec::new(),
            recovery,
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
                drop(t);
                if let Some(reply) = reply {
                    self.replies.push((reply, r));
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
            Cmd::Reconcile { live } => match &mut self.recovery {
                Some(r) => r.live = Some(live),
                None => self.reconcile(&live),
            },
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
        self.retry_save();
        let now = Instant::now();
        self.recover(now, gossip);
        if now.duration_since(self.last_purge) >= PURGE_EVERY {
            self.last_purge = now;
            let known: HashSet<PeerName> = gossip.known_names().collect();
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
        let (generation, own, delta, bytes, refused) = {
            let mut t = self.table.lock();
            let own = t.own_generation();
            let bytes = (own != self.disk.submitted()).then(|| t.persist());
            (
                t.generation(),
                own,
                t.take_delta(),
                bytes,
                t.take_refusals(),
            )
        };
        if let Some(r) = refused {
            if WarnLimit::allow(Kind::Gossip) {
                warn!(count = r.count, "name entries refused: {}", r.last);
            }
        }
        if let Some(bytes) = bytes {
            self.disk.submit(own, bytes);
        }
        // Our delta and the answers wait for our entries to be on disk.
        if let Some(d) = delta {
            self.promise(gossip, own, Held::Delta(d));
        }
        for (reply, r) in std::mem::take(&mut self.replies) {
            match r {
                Ok(()) => self.promise(gossip, own, Held::Reply(reply)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        if let Some(failed) = self.disk.failed(own) {
            self.release_held(gossip, Some(failed));
        }
        if generation != self.served {
            self.served = generation;
            if let Some(z) = &self.zone {
                z.set_table(&self.table.lock());
            }
        }
    }

    fn start_saver(&mut self, done: mpsc::UnboundedSender<Saved>) {
        self.disk.start(done);
    }

    fn saved(&mut self, gossip: &mut Gossip, s: Saved) {
        let failed = s.result.is_err().then_some(s.generation);
        self.disk.record(s.generation, s.result);
        self.release_held(gossip, failed);
    }
}

impl Driver {
    /// Drop our entries of containers no longer attached.
    fn reconcile(&mut self, live: &[String]) {
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

    /// During a recovery: end it once a neighbour had time to give our
    /// entries back.
    fn recover(&mut self, now: Instant, gossip: &Gossip) {
        let Some(r) = &mut self.recovery else {
            return;
        };
        if gossip.neighbours().next().is_none() {
            r.connected_since = None;
        } else if r.connected_since.is_none() {
            r.connected_since = Some(now);
        }
        let synced = r.connected_since.is_some_and(|t| now >= t + RECOVERY_FOR);
        if !synced && now < r.until {
            return;
        }
        let Some(r) = self.recovery.take() else {
            return;
        };
        let own = {
            let mut t = self.table.lock();
            t.set_adopting(false);
            let me = t.me();
            t.entries().filter(|e| e.peer == me).count()
        };
        if let Some(live) = r.live {
            self.reconcile(&live);
        }
        info!(
            entries = own,
            "own names taken back from the mesh after the corrupt names.bin"
        );
    }

    /// Send what is now on disk; refuse the answers a failed save carried
    /// (their deltas wait for a save that succeeds).
    fn release_held(&mut self, gossip: &mut Gossip, failed_upto: Option<u64>) {
        let (ready, failed) = self
            .disk
            .settled(failed_upto, |h| matches!(h, Held::Reply(_)));
        for h in ready {
            self.fulfil(gossip, h);
        }
        for h in failed {
            if let Held::Reply(reply) = h {
                let e = self.disk.error().unwrap_or_default();
                let _ = reply.send(Err(format!(
                    "{SAVE_FAILED} {}: {e}",
                    self.disk.path().display()
                )));
            }
        }
    }

    fn fulfil(&self, gossip: &mut Gossip, h: Held) {
        match h {
            Held::Delta(d) => gossip.channel_broadcast(names::CHANNEL, d),
            Held::Reply(reply) => {
                let _ = reply.send(Ok(()));
            }
        }
    }

    fn promise(&mut self, gossip: &mut Gossip, own: u64, h: Held) {
        if let Some(h) = self.disk.promise(own, h) {
            self.fulfil(gossip, h);
        }
    }

    /// Retry a failed save (each tick).
    fn retry_save(&mut self) {
        if self.disk.retry_due() {
            let (own, bytes) = {
                let t = self.table.lock();
                (t.own_generation(), t.persist())
            };
            self.disk.submit(own, bytes);
        }
    }
}
