//! Sealing of sleeve datagrams: ChaCha20-Poly1305, counter nonces, replay
//! window.
//!
//! Each direction of each peer pair has its own random 32-byte key, sent over
//! the (Noise-encrypted) control channel. The nonce is the datagram's
//! counter (56 bits on the wire, so below [`REJECT_AFTER`]; as a u64,
//! little-endian, after four zero bytes, as WireGuard does); the datagram
//! header is the associated data, so names, hop count and counter cannot be
//! altered. A [`Sealer`] never reuses a counter and refuses to go past
//! [`REJECT_AFTER`]; long before that (by count or by age) the sender
//! replaces its key with a fresh one, see [`crate::rekey`].
//! An [`Opener`] accepts each counter at most once, within a window of
//! [`WINDOW`] counters behind the highest seen; each key has its own.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes the AEAD tag adds.
pub const TAG_LEN: usize = 16;
/// Counters at or beyond this are never used: 2^56, what the sleeve
/// header's counter field holds (keys are replaced after 2^32 messages,
/// [`crate::rekey::REKEY_AFTER_MESSAGES`], long before).
pub const REJECT_AFTER: u64 = 1 << 56;
/// How far behind the highest counter a datagram may arrive.
pub const WINDOW: u64 = 2048;

/// Sealing or opening failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The tag did not verify: wrong key, or altered bytes.
    #[error("datagram failed authentication")]
    Forged,
    /// A counter seen before, or too old for the window.
    #[error("replayed or stale datagram (counter {0})")]
    Replay(u64),
    /// The key is used up.
    #[error("sealing key exhausted; rekey required")]
    Exhausted,
    /// Too short to hold a tag.
    #[error("sealed body shorter than its tag")]
    Short,
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::from(n)
}

/// Seals outgoing datagrams under one key. Shared by the sending threads:
/// the counter is atomic, so no two messages ever get the same nonce.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
    key_id: u8,
    next: AtomicU64,
}

impl Sealer {
    /// A sealer starting at counter 0.
    pub fn new(key_id: u8, key: &[u8; 32]) -> Sealer {
        Sealer {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
            key_id,
            next: AtomicU64::new(0),
        }
    }

    /// The id receivers know this key by.
    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// How many counters were taken (messages sealed) under this key.
    pub fn sealed(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Take the next counter.
    pub fn next_counter(&self) -> Result<u64, SealError> {
        let c = self.next.fetch_add(1, Ordering::Relaxed);
        if c >= REJECT_AFTER {
            // Stay exhausted: never wrap back to used counters.
            self.next.store(REJECT_AFTER, Ordering::Relaxed);
            return Err(SealError::Exhausted);
        }
        Ok(c)
    }

    /// Encrypt `body` in place under `counter` (from [`Self::next_counter`])
    /// with `aad`, and append the tag.
    pub fn seal(&self, counter: u64, aad: &[u8], body: &mut Vec<u8>) -> Result<(), SealError> {
        let tag = self.seal_detached(counter, aad, body)?;
        body.extend_from_slice(&tag);
        Ok(())
    }

    /// Encrypt `body` in place (a slice of a larger buffer) and return the
    /// tag, for callers that place it themselves.
    pub fn seal_detached(
        &self,
        counter: u64,
        aad: &[u8],
        body: &mut [u8],
    ) -> Result<[u8; TAG_LEN], SealError> {
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce(counter), aad, body)
            .map_err(|_| SealError::Exhausted)?;
        Ok(tag.into())
    }
}

/// Opens incoming datagrams under one key, rejecting replays.
pub struct Opener {
    cipher: ChaCha20Poly1305,
    key_id: u8,
    window: ReplayWindow,
}

impl Opener {
    /// An opener for the peer's key.
    pub fn new(key_id: u8, key: &[u8; 32]) -> Opener {
        Opener {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
            key_id,
            window: ReplayWindow::default(),
        }
    }

    /// The id of this key.
    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// Verify and decrypt `sealed` (ciphertext then tag) in place; returns
    /// the plaintext length. The counter is marked seen only once the tag
    /// verifies, so forged datagrams cannot poison the window.
    pub fn open(
        &mut self,
        counter: u64,
        aad: &[u8],
        sealed: &mut [u8],
    ) -> Result<usize, SealError> {
        if sealed.len() < TAG_LEN {
            return Err(SealError::Short);
        }
        if !self.window.check(counter) {
            return Err(SealError::Replay(counter));
        }
        let n = sealed.len() - TAG_LEN;
        let (body, tag) = sealed.split_at_mut(n);
        let tag = Tag::clone_from_slice(tag);
        self.cipher
            .decrypt_in_place_detached(&nonce(counter), aad, body, &tag)
            .map_err(|_| SealError::Forged)?;
        self.window.update(counter);
        Ok(n)
    }
}

/// A sliding window of seen counters (RFC 6479 style bitmap).
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    bits: [u64; (WINDOW / 64) as usize + 1],
    top: Option<u64>,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            bits: [0; (WINDOW / 64) as usize + 1],
            top: None,
        }
    }
}

impl ReplayWindow {
    const BLOCKS: u64 = WINDOW / 64 + 1;

    fn slot(counter: u64) -> (usize, u64) {
        (
            ((counter / 64) % Self::BLOCKS) as usize,
            1u64 << (counter % 64),
        )
    }

    /// Whether `counter` would be accepted (not seen, not too old).
    pub fn check(&self, counter: u64) -> bool {
        if counter >= REJECT_AFTER {
            return false;
        }
        let Some(top) = self.top else { return true };
        if counter > top {
            return true;
        }
        if top - counter >= WINDOW {
            return false;
        }
        let (i, bit) = Self::slot(counter);
        self.bits[i] & bit == 0
    }

    /// Mark `counter` seen (call only after [`Self::check`] and authentication).
    pub fn update(&mut self, counter: u64) {
        match self.top {
            Some(top) if counter <= top => {}
            Some(top) => {
                // Clear the blocks the window slides over.
                let (old, new) = (top / 64, counter / 64);
                let steps = (new - old).min(Self::BLOCKS);
                for k in 1..=steps {
                    self.bits[((old + k) % Self::BLOCKS) as usize] = 0;
                }
                self.top = Some(counter);
            }
            None => self.top = Some(counter),
        }
        let (i, bit) = Self::slot(counter);
        self.bits[i] |= bit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seal_open() {
        let s = Sealer::new(3, &[7; 32]);
        let mut o = Opener::new(3, &[7; 32]);
        let c = s.next_counter().unwrap();
        let mut body = b"frame bytes".to_vec();
        s.seal(c, b"hdr", &mut body).unwrap();
        assert_eq!(body.len(), 11 + TAG_LEN);
        assert_ne!(&body[..11], b"frame bytes");
        let mut copy = body.clone();
        let n = o.open(c, b"hdr", &mut copy).unwrap();
        assert_eq!(&copy[..n], b"frame bytes");
        // Replay refused.
        let mut again = body.clone();
        assert_eq!(o.open(c, b"hdr", &mut again), Err(SealError::Replay(c)));
        // Other header, other key, altered byte: forged.
        let c2 = s.next_counter().unwrap();
        let mut b2 = b"x".to_vec();
        s.seal(c2, b"hdr", &mut b2).unwrap();
        assert_eq!(o.open(c2, b"HDR", &mut b2.clone()), Err(SealError::Forged));
        assert_eq!(
            Opener::new(3, &[8; 32]).open(c2, b"hdr", &mut b2.clone()),
            Err(SealError::Forged)
        );
        // A forged datagram did not burn the counter.
        assert_eq!(o.open(c2, b"hdr", &mut b2).map(|_| ()), Ok(()));
        assert_eq!(o.open(0, b"", &mut [0u8; 3]), Err(SealError::Short));
    }

    #[test]
    fn exhaustion() {
        let s = Sealer::new(0, &[0; 32]);
        s.next.store(REJECT_AFTER - 1, Ordering::Relaxed);
        assert!(s.next_counter().is_ok());
        assert_eq!(s.next_counter(), Err(SealError::Exhausted));
        assert_eq!(s.sealed(), REJECT_AFTER);
    }

    #[test]
    fn window_basics() {
        let mut w = ReplayWindow::default();
        for c in [5, 3, 100, 99, 4000] {
            assert!(w.check(c));
            w.update(c);
            assert!(!w.check(c));
        }
        assert!(!w.check(4000 - WINDOW));
        assert!(w.check(4000 - WINDOW + 1));
        assert!(!w.check(REJECT_AFTER));
    }

    proptest! {
        /// The window accepts a counter iff it was never accepted before and
        /// is within WINDOW of the highest accepted.
        #[test]
        fn window_model(seq in proptest::collection::vec(0u64..6000, 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::BTreeSet::new();
            for c in seq {
                let top = seen.iter().next_back().copied();
                let expect = !seen.contains(&c) && top.is_none_or(|t| c > t || t - c < WINDOW);
                prop_assert_eq!(w.check(c), expect, "counter {}", c);
                if expect { w.update(c); seen.insert(c); }
            }
        }
    }
}
