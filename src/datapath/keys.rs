//! The sleeve keys of one connection, shared by its control task and the
//! data path.
//!
//! With a password each connection has a [`SleeveKeys`]: the sealer our
//! datagrams to the peer are sealed with, and the [`KeyRing`] its datagrams
//! to us are opened with. The data path only uses them; the connection's
//! control task (`crate::router::control`) replaces them as the rekey
//! protocol of [`mesh_proto::rekey`] says: a new sealer once the peer
//! acknowledged our offer, a new key in the ring (before acknowledging) when
//! the peer offers one.
//!
//! Invariants: the sealer is swapped whole (a sender takes the current one
//! once per message, so a message's header and seal always agree); the ring
//! is behind a mutex that only the receiver thread and the control task
//! take, each for one message or one install.

use mesh_proto::rekey::{KeyRing, RekeyError};
use mesh_proto::seal::{Opener, Sealer};
use mesh_proto::sleeve::{Header, OpenError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// One connection's sleeve keys: see the module docs.
pub struct SleeveKeys {
    sealer: RwLock<Arc<Sealer>>,
    ring: Mutex<KeyRing>,
    send_rekeys: AtomicU64,
}

/// What `mesh status` shows of a connection's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyIds {
    /// The id of the key we seal with.
    pub send: u8,
    /// The id of the peer's newest key.
    pub recv: u8,
    /// How many times either key was replaced.
    pub rekeys: u64,
}

impl SleeveKeys {
    /// The intro's keys.
    pub fn new(sealer: Sealer, opener: Opener) -> Arc<SleeveKeys> {
        Arc::new(SleeveKeys {
            sealer: RwLock::new(Arc::new(sealer)),
            ring: Mutex::new(KeyRing::new(opener)),
            send_rekeys: AtomicU64::new(0),
        })
    }

    /// The sealer to seal the next message with.
    pub fn sealer(&self) -> Arc<Sealer> {
        self.sealer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Messages sealed under the current sending key.
    pub fn sealed(&self) -> u64 {
        self.sealer().sealed()
    }

    /// Seal with `sealer` from now on (the peer acknowledged its key).
    pub fn set_sealer(&self, sealer: Sealer) {
        *self.sealer.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(sealer);
        self.send_rekeys.fetch_add(1, Ordering::Relaxed);
    }

    /// Accept the peer's new key (acknowledge it only once this is `Ok`).
    pub fn install(&self, now: Instant, key_id: u8, key: &[u8; 32]) -> Result<(), RekeyError> {
        self.ring().install(now, key_id, key)
    }

    /// Open a sealed message from the peer.
    pub fn open(&self, now: Instant, header: &Header, msg: &mut [u8]) -> Result<usize, OpenError> {
        self.ring().open_message(now, header, msg)
    }

    /// Open a sealed path MTU acknowledgement from the peer: the size.
    pub fn open_probe_ack(
        &self,
        now: Instant,
        header: &Header,
        body: &mut [u8],
    ) -> Result<u64, OpenError> {
        self.ring().open_probe_ack(now, header, body)
    }

    /// The key ids in use and the number of rekeys.
    pub fn ids(&self) -> KeyIds {
        let send = self.sealer().key_id();
        let ring = self.ring();
        KeyIds {
            send,
            recv: ring.key_id(),
            rekeys: self.send_rekeys.load(Ordering::Relaxed) + ring.rekeys(),
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, KeyRing> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::name::PeerName;
    use mesh_proto::sleeve::{message_header, seal_message};

    /// Two connections' worth of keys wired back to back: a rekey each way
    /// moves the ids, and messages open across it.
    #[test]
    fn rekey_through_shared_keys() {
        let (a, b) = (PeerName([2, 0, 0, 0, 0, 1]), PeerName([2, 0, 0, 0, 0, 2]));
        let now = Instant::now();
        let ours = SleeveKeys::new(Sealer::new(1, &[1; 32]), Opener::new(1, &[2; 32]));
        let theirs = SleeveKeys::new(Sealer::new(1, &[2; 32]), Opener::new(1, &[1; 32]));
        let send = |from: &SleeveKeys, to: &SleeveKeys| {
            let s = from.sealer();
            let h = message_header(a, b, 0, Some(&s), 0).expect("header");
            let mut m = vec![9u8; 20];
            seal_message(&h, Some(&s), &mut m).expect("seal");
            to.open(now, &h, &mut m)
        };
        assert_eq!(send(&ours, &theirs), Ok(20));
        theirs.install(now, 2, &[3; 32]).expect("install");
        ours.set_sealer(Sealer::new(2, &[3; 32]));
        assert_eq!(send(&ours, &theirs), Ok(20));
        assert_eq!(send(&theirs, &ours), Ok(20));
        assert_eq!(
            ours.ids(),
            KeyIds {
                send: 2,
                recv: 1,
                rekeys: 1
            }
        );
        assert_eq!(
            theirs.ids(),
            KeyIds {
                send: 1,
                recv: 2,
                rekeys: 1
            }
        );
        assert_eq!(ours.sealed(), 1);
    }
}
