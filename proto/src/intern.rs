//! Values held once however many holders hold them, process-wide: a table
//! of weak references by key. A value interned while an equal one is alive
//! somewhere is that one; a value goes when its last holder drops it, and
//! dead slots are swept when the table has doubled since the last sweep.
//! It serves the simulator's thousands of gossip cores, which each hold
//! every peer's entry bodies and keys (see `gossip::topology::share` and
//! `sign::KeyBook`); a daemon's one core barely uses it.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Weak};

/// Weak references to interned values, by key.
pub(crate) struct Weaks<K, V, S = std::collections::hash_map::RandomState> {
    map: HashMap<K, Weak<V>, S>,
    /// The table's size after the last sweep.
    swept: usize,
    /// Slots allowed on top of twice that before a sweep.
    slack: usize,
}

impl<K: Hash + Eq, V: PartialEq, S: BuildHasher + Default> Weaks<K, V, S> {
    /// An empty table that sweeps past twice its last size plus `slack`.
    pub(crate) fn new(slack: usize) -> Self {
        Weaks {
            map: HashMap::default(),
            swept: 0,
            slack,
        }
    }

    /// The live value under `key` if it equals `v`, else `v`, now
    /// registered under `key` (replacing a different one: `key` may be a
    /// hash that two values share).
    pub(crate) fn intern(&mut self, key: K, v: V) -> Arc<V> {
        if let Some(a) = self.map.get(&key).and_then(Weak::upgrade) {
            if *a == v {
                return a;
            }
        }
        let a = Arc::new(v);
        self.map.insert(key, Arc::downgrade(&a));
        if self.map.len() > 2 * self.swept + self.slack {
            self.map.retain(|_, w| w.strong_count() > 0);
            self.swept = self.map.len();
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_are_one_and_dead_ones_are_swept() {
        let mut t: Weaks<u8, String> = Weaks::new(2);
        let a = t.intern(1, "a".to_string());
        let b = t.intern(1, "a".to_string());
        assert!(Arc::ptr_eq(&a, &b));
        // Another value under the same key replaces it.
        let c = t.intern(1, "c".to_string());
        assert_eq!(*c, "c");
        drop((a, b, c));
        for k in 2..10 {
            t.intern(k, k.to_string());
        }
        assert!(t.map.len() <= 2 * t.swept + t.slack);
    }
}
