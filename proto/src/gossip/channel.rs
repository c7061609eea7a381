//! Named gossip channels: how IPAM and DNS share the mesh's gossip.
//!
//! In the spirit of weaveworks/mesh's `GossipData`: a channel's state is a
//! CRDT that knows how to encode itself and to merge an encoded state or
//! delta, returning only what was new to it. That return value is what stops
//! propagation: a peer relays a delta to its other neighbours only when it
//! learned something, so every update floods the mesh once per link and
//! dies out. A neighbour gets the whole state on a new connection, and again
//! when the periodic anti-entropy [`crate::gossip::wire::Summary`] shows the
//! two digests differ.
//!
//! The topology itself does not go through this trait: at a thousand peers
//! its state is too large to flood, so it has its own deltas and bucketed
//! digests (see [`super::topology`], [`super::digest`]).

use crate::sign::KeyBook;

/// The state of one named channel.
pub trait GossipData: Send {
    /// The whole state, encoded (its own versioned format).
    fn encode(&self) -> Vec<u8>;
    /// Merge an encoded state or delta from a neighbour. Returns the encoded
    /// part that was new to us (relayed to the other neighbours), or `None`
    /// when we knew it all. Malformed input is an error, never a panic.
    ///
    /// Signed content is verified with `keys` (pinned keys per peer; a
    /// channel pins a key offered with data once its signature verifies)
    /// before anything is merged: a channel merges only what each peer
    /// signed of its own state.
    fn merge(&mut self, payload: &[u8], keys: &mut KeyBook) -> Result<Option<Vec<u8>>, String>;
    /// A digest of the whole state: equal digests mean equal states.
    fn digest(&self) -> u64;
    /// Cut an encoded state or delta that is too large for one gossip
    /// message into payloads of at most `max` bytes, each of which merges
    /// on its own (for a state CRDT, any subset of its entries does). The
    /// default keeps it whole: such a payload is not sent.
    fn split(&self, payload: Vec<u8>, max: usize) -> Vec<Vec<u8>> {
        let _ = max;
        vec![payload]
    }
}

/// Cut `items` into runs whose estimated encoded size (`size` of each,
/// plus `overhead` per run) stays within `max`; every run has at least
/// one item. For [`GossipData::split`] implementations.
pub fn chunks<T>(
    items: Vec<T>,
    max: usize,
    overhead: usize,
    size: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut used = overhead;
    for it in items {
        let n = size(&it);
        if !cur.is_empty() && used + n > max {
            out.push(std::mem::take(&mut cur));
            used = overhead;
        }
        used += n;
        cur.push(it);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A grow-only set of bytes: the simplest CRDT, for tests.
    #[derive(Default)]
    pub struct GSet(pub BTreeSet<u8>);

    impl GossipData for GSet {
        fn encode(&self) -> Vec<u8> {
            self.0.iter().copied().collect()
        }
        fn merge(
            &mut self,
            payload: &[u8],
            _keys: &mut KeyBook,
        ) -> Result<Option<Vec<u8>>, String> {
            if payload.len() > 256 {
                return Err("too long".into());
            }
            let new: Vec<u8> = payload
                .iter()
                .copied()
                .filter(|b| self.0.insert(*b))
                .collect();
            Ok((!new.is_empty()).then_some(new))
        }
        fn digest(&self) -> u64 {
            self.0
                .iter()
                .fold(0u64, |h, &b| super::super::digest::mix(h ^ b as u64))
        }
    }
}
