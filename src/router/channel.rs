//! What the router needs of a gossip channel's driver (the IPAM ring, the
//! name table), in the spirit of weaveworks/mesh's `Gossiper`: the sans-IO
//! state lives in `mesh_proto` and travels as a named channel of the gossip
//! core; its driver plugs it in, drives it with time, makes its changes
//! durable and sends them, and forgets the peers the topology forgot.

use super::saver::Saved;
use mesh_proto::gossip::Gossip;
use mesh_proto::name::PeerName;
use tokio::sync::mpsc;

/// A gossip channel's driver, as the router drives it.
pub trait ChannelDriver {
    /// Plug the channel's state into the gossip core.
    fn register(&self, gossip: &mut Gossip);
    /// Periodic work (and after news on the channel).
    fn tick(&mut self, gossip: &Gossip);
    /// After anything that may have changed the state: persist, then
    /// gossip our changes and answer what waited. Nothing is sent or
    /// answered that a crash could take back.
    fn settle(&mut self, gossip: &mut Gossip);
    /// A peer the topology garbage-collected.
    fn forget_peer(&mut self, peer: PeerName);
    /// Save off the router's task from now on, reporting to `done`.
    fn start_saver(&mut self, done: mpsc::UnboundedSender<Saved>);
    /// A save finished: send and answer what waited for it (or fail it).
    fn saved(&mut self, gossip: &mut Gossip, saved: Saved);
}
