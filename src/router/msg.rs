//! The messages of the router's tasks: what connections, the connection
//! maker, the attach manager and the API send the router ([`Cmd`]), and
//! what the router sends the connection maker ([`MakerCmd`]). A leaf of the
//! router's folder, so that the tasks that talk to each other do not import
//! each other.

use super::{ipam, names};
use crate::api::{ConnStatus, Status};
use crate::datapath::keys::SleeveKeys;
use crate::datapath::{fastdp, sleeve};
use mesh_proto::name::PeerName;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Identifies a connection (or a dialer's attempts) in the table.
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
    /// A connection ended.
    Closed {
        /// Which.
        id: ConnId,
        /// Drop its row too.
        forget: bool,
    },
    /// A gossip message from a neighbour.
    GossipIn {
        /// The connection it came on.
        id: ConnId,
        /// The neighbour.
        from: PeerName,
        /// The message.
        bytes: Vec<u8>,
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
    /// The sleeve reports a neighbour silent.
    Sleeve(sleeve::Event),
    /// A snapshot for `mesh status` (targets are filled in by the caller).
    Status(oneshot::Sender<Status>),
    /// A request for the address allocator.
    Ipam(ipam::Cmd),
    /// A request for the name table.
    Names(names::Cmd),
    /// The connection targets now (from the connection maker).
    Targets(Vec<Target>),
    /// This host's own MACs (its containers' and its bridge's), from the
    /// attach manager, replacing the previous set: handed to the sleeve,
    /// which never learns them behind a peer and drops frames from the
    /// overlay that claim them.
    LocalMacs(Vec<[u8; 6]>),
}

/// A connection ready to carry traffic.
pub struct Established {
    /// Which.
    pub id: ConnId,
    /// The peer.
    pub peer: PeerName,
    /// Who dialed.
    pub initiator: PeerName,
    /// The peer's sleeve address (also where it can be dialed).
    pub udp: SocketAddr,
    /// The sleeve keys both ways, when encrypted (its control task
    /// replaces them: rekeying).
    pub keys: Option<Arc<SleeveKeys>>,
    /// The fast path agreed for this connection, or why not.
    pub fastdp: Result<fastdp::Agreed, String>,
    /// Closes the connection, with a reason.
    pub close: oneshot::Sender<String>,
    /// Gossip to send on this connection.
    pub gossip: mpsc::Sender<Vec<u8>>,
    /// Whether it was accepted (false: a duplicate, closed).
    pub reply: oneshot::Sender<bool>,
}

/// Messages to the connection maker.
pub enum MakerCmd {
    /// Add targets (and dial them).
    Connect {
        /// `HOST[:PORT]` strings.
        peers: Vec<String>,
        /// Done, or why not.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Remove targets (stop redialing them).
    Forget {
        /// `HOST[:PORT]` strings as given to connect.
        peers: Vec<String>,
        /// Done, or why not.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The targets.
    Targets(oneshot::Sender<Vec<String>>),
    /// Peers gossip says we could dial.
    Candidates(Vec<(PeerName, Vec<SocketAddr>)>),
}

/// A target as the router sees it (for the allocator's consensus size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// As given (`HOST[:PORT]`).
    pub text: String,
    /// Where it resolves to, if it does.
    pub addr: Option<SocketAddr>,
    /// It is this peer's own address (a host given the whole list of
    /// peers, itself included): not a peer we were told about.
    pub ours: bool,
}
