//! Digests of the topology for anti-entropy.
//!
//! Every entry hashes to 64 bits from its name, incarnation and version (the
//! content of an entry is a function of those three: only its owner writes
//! it). Entries fall in [`FINE`] buckets by name; a bucket's hash is the XOR
//! of its entries' hashes, the root the XOR of all, so an update costs O(1).
//! A coarser view with `B` buckets (any power of two up to [`FINE`]) folds the
//! fine buckets: `bucket(name) mod B`. Sync then costs a root (steady state),
//! `B` bucket hashes, and versions only for the buckets that differ.

use crate::name::PeerName;

/// Number of fine buckets kept up to date.
pub const FINE: usize = super::wire::MAX_BUCKETS;

/// A 64-bit mix (SplitMix64's finaliser).
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A name as a number.
pub fn name_u64(n: PeerName) -> u64 {
    let b = n.0;
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], 0, 0])
}

/// The fine bucket of a name.
pub fn fine_bucket(n: PeerName) -> usize {
    (mix(name_u64(n) ^ 0x5bd1_e995) as usize) % FINE
}

/// The hash of one entry version.
pub fn entry_hash(n: PeerName, incarnation: u64, version: u32) -> u64 {
    mix(mix(name_u64(n)) ^ mix(incarnation.wrapping_add(0x9e37_79b9_7f4a_7c15)) ^ version as u64)
}

/// The bucket hashes and root.
#[derive(Clone)]
pub struct Digest {
    fine: Vec<u64>,
    root: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            fine: vec![0; FINE],
            root: 0,
        }
    }
}

impl Digest {
    /// Replace an entry's hash (`old` 0 for a new entry, `new` 0 for removal).
    pub fn replace(&mut self, n: PeerName, old: u64, new: u64) {
        let b = fine_bucket(n);
        self.fine[b] ^= old ^ new;
        self.root ^= old ^ new;
    }

    /// The root hash.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// `buckets` coarse hashes (truncated to 32 bits); `buckets` must be a
    /// power of two no larger than [`FINE`].
    pub fn coarse(&self, buckets: usize) -> Vec<u32> {
        let mut out = vec![0u64; buckets];
        for (i, h) in self.fine.iter().enumerate() {
            out[i % buckets] ^= h;
        }
        out.into_iter().map(|h| (h ^ (h >> 32)) as u32).collect()
    }

    /// The coarse bucket count to use for a state of `count` peers.
    pub fn buckets_for(count: usize) -> usize {
        (count / 16).next_power_of_two().clamp(16, FINE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_is_order_independent() {
        let names: Vec<PeerName> = (0..50u8).map(|i| PeerName([2, i, 0, 0, 0, i])).collect();
        let mut a = Digest::default();
        let mut b = Digest::default();
        for n in &names {
            a.replace(*n, 0, entry_hash(*n, 1, 1));
        }
        for n in names.iter().rev() {
            b.replace(*n, 0, entry_hash(*n, 1, 1));
        }
        assert_eq!(a.root(), b.root());
        assert_eq!(a.coarse(64), b.coarse(64));
        b.replace(
            names[3],
            entry_hash(names[3], 1, 1),
            entry_hash(names[3], 1, 2),
        );
        assert_ne!(a.root(), b.root());
        let diff: Vec<usize> = (0..64)
            .filter(|&i| a.coarse(64)[i] != b.coarse(64)[i])
            .collect();
        assert_eq!(diff, vec![fine_bucket(names[3]) % 64]);
    }
}
