//! The connection maker: which peers we dial.
//!
//! Two sources: *targets*, the addresses named on `mesh launch` or by
//! `mesh connect` (persisted in `$MESH_DATA_DIR/targets.json`, removed by
//! `mesh forget`), and *candidates*, peers learned by gossip that we are not
//! directly connected to, dialed up to `--conn-limit`. Each gets a dialer
//! task ([`crate::router::control::dial_loop`]) that retries with backoff and
//! jitter; a dialer stops when told to, or when its peer turns out to be
//! connected anyway.

use super::msg;
use crate::peer::{parse_peer, Me};
use crate::persist;
use crate::router::control::{self, DialSpec};
use mesh_proto::name::PeerName;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tracing::info;

pub use super::msg::{MakerCmd as Cmd, Target};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Target(String),
    Peer(PeerName),
}

struct Dialer {
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

/// Owns the targets and the dialers.
pub struct ConnMaker {
    me: Arc<Me>,
    path: PathBuf,
    targets: BTreeSet<String>,
    dialers: BTreeMap<Key, Dialer>,
    router: mpsc::Sender<msg::Cmd>,
    conn_limit: usize,
    next_id: u64,
}

impl ConnMaker {
    /// Load persisted targets and add `extra` (from the command line).
    pub fn load(
        me: Arc<Me>,
        data_dir: PathBuf,
        extra: &[String],
        router: mpsc::Sender<msg::Cmd>,
        conn_limit: usize,
    ) -> anyhow::Result<ConnMaker> {
        let path = data_dir.join(crate::paths::TARGETS);
        let next = "starting without the saved targets (those given to `mesh launch` are still dialed; add others again with `mesh connect`)";
        let loaded = persist::load_or_move_aside(&path, next, |b, _| {
            Ok(Ok::<_, std::convert::Infallible>(persist::decode_json::<
                Vec<String>,
            >(b)?))
        })?;
        let mut targets: BTreeSet<String> = match loaded {
            Ok(persist::Loaded::Found(t)) => t.into_iter().collect(),
            _ => BTreeSet::new(),
        };
        targets.extend(extra.iter().cloned());
        let m = ConnMaker {
            me,
            path,
            targets,
            dialers: BTreeMap::new(),
            router,
            conn_limit,
            next_id: 1,
        };
        m.save()?;
        Ok(m)
    }

    fn save(&self) -> anyhow::Result<()> {
        persist::save_json(&self.path, &self.targets.iter().collect::<Vec<_>>())
    }

    fn spawn(&mut self, key: Key, spec: DialSpec) {
        let (stop, stop_rx) = watch::channel(false);
        let id = self.next_id;
        self.next_id += 1;
        let done = tokio::spawn(control::dial_loop(
            self.me.clone(),
            id,
            spec,
            self.router.clone(),
            stop_rx,
        ));
        self.dialers.insert(key, Dialer { stop, done });
    }

    fn start_targets(&mut self) {
        for t in self.targets.clone() {
            let key = Key::Target(t.clone());
            if self.dialers.contains_key(&key) {
                continue;
            }
            match parse_peer(&t, self.me.port) {
                Ok(addr) => self.spawn(
                    key,
                    DialSpec {
                        addrs: vec![addr],
                        peer: None,
                    },
                ),
                Err(e) => tracing::warn!("target {t}: {e}"),
            }
        }
    }

    /// Tell the router what the targets are now.
    async fn announce(&self) {
        let local = local_ips();
        let list = self
            .targets
            .iter()
            .map(|t| {
                let addr = parse_peer(t, self.me.port).ok();
                Target {
                    text: t.clone(),
                    addr,
                    ours: addr.is_some_and(|a| a.port() == self.me.port && local.contains(&a.ip())),
                }
            })
            .collect();
        let _ = self.router.send(msg::Cmd::Targets(list)).await;
    }

    fn stop(&mut self, key: &Key) {
        if let Some(d) = self.dialers.remove(key) {
            let _ = d.stop.send(true);
        }
    }

    /// Serve until the channel closes or shutdown.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, mut shutdown: watch::Receiver<bool>) {
        self.announce().await;
        self.start_targets();
        loop {
            let cmd = tokio::select! {
                c = rx.recv() => match c { Some(c) => c, None => break },
                _ = shutdown.changed() => break,
            };
            // Dialers that ended by themselves (peer connected another way).
            self.dialers.retain(|_, d| !d.done.is_finished());
            match cmd {
                Cmd::Connect { peers, reply } => {
                    let mut bad = None;
                    for p in &peers {
                        if let Err(e) = parse_peer(p, self.me.port) {
                            bad = Some(e);
                        }
                    }
                    if let Some(e) = bad {
                        let _ = reply.send(Err(e));
                        continue;
                    }
                    let new: Vec<String> = peers
                        .iter()
                        .filter(|p| !self.targets.contains(*p))
                        .cloned()
                        .collect();
                    self.targets.extend(new.iter().cloned());
                    if let Err(e) = self.save() {
                        // Refused, so not done: a target that is not on
                        // disk would be forgotten at the next restart.
                        for p in &new {
                            self.targets.remove(p);
                        }
                        let _ = reply.send(Err(format!("could not save the targets: {e:#}")));
                        continue;
                    }
                    self.start_targets();
                    info!(targets = ?peers, "connect");
                    self.announce().await;
                    let _ = reply.send(Ok(()));
                }
                Cmd::Forget { peers, reply } => {
                    for p in &peers {
                        self.targets.remove(p);
                        self.stop(&Key::Target(p.clone()));
                    }
                    info!(targets = ?peers, "forget");
                    self.announce().await;
                    let _ = reply.send(self.save().map_err(|e| format!("{e:#}")));
                }
                Cmd::Targets(reply) => {
                    let _ = reply.send(self.targets.iter().cloned().collect());
                }
                Cmd::Candidates(list) => {
                    let wanted: BTreeSet<PeerName> = list.iter().map(|(p, _)| *p).collect();
                    let stale: Vec<Key> = self
                        .dialers
                        .keys()
                        .filter(|k| matches!(k, Key::Peer(p) if !wanted.contains(p)))
                        .cloned()
                        .collect();
                    for k in stale {
                        self.stop(&k);
                    }
                    for (peer, addrs) in list {
                        let key = Key::Peer(peer);
                        if addrs.is_empty() || self.dialers.contains_key(&key) {
                            continue;
                        }
                        if self.dialers.len() >= self.conn_limit {
                            break;
                        }
                        self.spawn(
                            key,
                            DialSpec {
                                addrs,
                                peer: Some(peer),
                            },
                        );
                    }
                }
            }
        }
        for (_, d) in std::mem::take(&mut self.dialers) {
            let _ = d.stop.send(true);
        }
    }
}

/// This host's own addresses (empty when they cannot be listed).
fn local_ips() -> BTreeSet<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return BTreeSet::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .collect()
}
