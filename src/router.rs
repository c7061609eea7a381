//! The router: the one task that knows every connection.
//!
//! Connection tasks report their progress here; the router keeps the table
//! that `mesh status` shows, decides which of two connections to the same
//! peer survives (the one initiated by the lower peer name, so both ends
//! agree without talking), and tells the sleeve which peers are up and with
//! which keys.

use crate::api::{ConnStatus, SleeveStats, Status};
use crate::daemon::Me;
use crate::sleeve;
use mesh_proto::name::PeerName;
use mesh_proto::seal::{Opener, Sealer};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tracing::info;

/// Identifies a connection (or a dial target's attempts) in the table.
pub type ConnId = u64;

/// Messages to the router.
pub enum Cmd {
    /// A connection's visible state changed.
    Update {
        /// Which.
        id: ConnId,
        /// The row to show.
        row: ConnStatus,
    },
    /// A connection finished its handshake and introductions.
    Established(Box<Established>),
    /// A connection ended (its row stays if it is a dial target).
    Closed {
        /// Which.
        id: ConnId,
        /// Drop its row too (inbound connections).
        forget: bool,
    },
    /// Is this peer connected, or anyone at this IP?
    Connected {
        /// A peer name, if known.
        peer: Option<PeerName>,
        /// An IP.
        ip: Option<IpAddr>,
        /// The answer.
        reply: oneshot::Sender<bool>,
    },
    /// A snapshot for `mesh status`.
    Status(oneshot::Sender<Status>),
}

/// A connection ready to carry traffic.
pub struct Established {
    /// Which.
    pub id: ConnId,
    /// The peer.
    pub peer: PeerName,
    /// Who dialed.
    pub initiator: PeerName,
    /// The peer's sleeve address.
    pub udp: SocketAddr,
    /// Our sealer for datagrams to it, when encrypted.
    pub sealer: Option<Sealer>,
    /// Our opener for its datagrams, when encrypted.
    pub opener: Option<Opener>,
    /// Closes the connection when the router drops it as a duplicate.
    pub close: oneshot::Sender<String>,
    /// Whether it was accepted (false: a duplicate, closed).
    pub reply: oneshot::Sender<bool>,
}

struct Active {
    id: ConnId,
    initiator: PeerName,
    udp: SocketAddr,
    close: Option<oneshot::Sender<String>>,
}

/// Run the router until every sender is gone.
pub async fn run(me: Arc<Me>, mut rx: mpsc::Receiver<Cmd>, sleeve: mpsc::Sender<sleeve::Cmd>) {
    let mut rows: BTreeMap<ConnId, ConnStatus> = BTreeMap::new();
    let mut active: BTreeMap<PeerName, Active> = BTreeMap::new();
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Cmd::Update { id, row } => {
                rows.insert(id, row);
            }
            Cmd::Established(e) => {
                let e = *e;
                let keep_new = match active.get(&e.peer) {
                    None => true,
                    // Both ends keep the connection dialed by the lower name.
                    Some(old) => e.initiator < old.initiator,
                };
                if !keep_new {
                    let _ = e.reply.send(false);
                    continue;
                }
                if let Some(mut old) = active.remove(&e.peer) {
                    if let Some(c) = old.close.take() {
                        let _ = c.send("duplicate connection".into());
                    }
                    rows.remove(&old.id);
                }
                info!(peer = %e.peer, udp = %e.udp, "connection established");
                let _ = sleeve
                    .send(sleeve::Cmd::PeerUp(Box::new(sleeve::PeerUp {
                        name: e.peer,
                        addr: e.udp,
                        sealer: e.sealer,
                        opener: e.opener,
                    })))
                    .await;
                active.insert(
                    e.peer,
                    Active {
                        id: e.id,
                        initiator: e.initiator,
                        udp: e.udp,
                        close: Some(e.close),
                    },
                );
                let _ = e.reply.send(true);
            }
            Cmd::Closed { id, forget } => {
                if forget {
                    rows.remove(&id);
                }
                let gone: Vec<PeerName> = active
                    .iter()
                    .filter(|(_, a)| a.id == id)
                    .map(|(p, _)| *p)
                    .collect();
                for p in gone {
                    active.remove(&p);
                    info!(peer = %p, "connection lost");
                    let _ = sleeve.send(sleeve::Cmd::PeerDown { name: p }).await;
                }
            }
            Cmd::Connected { peer, ip, reply } => {
                let yes = active
                    .iter()
                    .any(|(p, a)| Some(*p) == peer || Some(a.udp.ip()) == ip);
                let _ = reply.send(yes);
            }
            Cmd::Status(reply) => {
                let (tx, srx) = oneshot::channel();
                let stats = if sleeve.send(sleeve::Cmd::Stats(tx)).await.is_ok() {
                    srx.await.unwrap_or_default()
                } else {
                    SleeveStats::default()
                };
                let _ = reply.send(Status {
                    version: env!("CARGO_PKG_VERSION").into(),
                    protocol: format!(
                        "{}..={}",
                        mesh_proto::PROTOCOL_MIN_VERSION,
                        mesh_proto::PROTOCOL_VERSION
                    ),
                    name: me.name.to_string(),
                    nickname: me.nickname.clone(),
                    encryption: me.psk.is_some(),
                    port: me.port,
                    mtu: me.mtu,
                    connections: rows.values().cloned().collect(),
                    sleeve: stats,
                });
            }
        }
    }
}
