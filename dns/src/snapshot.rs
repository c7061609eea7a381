//! The names as the socket loops see them: an immutable [`Snapshot`] that
//! [`crate::zone`] builds from the name table and swaps whole, and that
//! [`crate::answer`] reads to answer a query.
//!
//! It sits below both: it imports neither, so the modules of this crate
//! point one way (`zone` → `answer` → `snapshot`, `zone` → `snapshot`).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::Ipv4Addr;

/// FNV-1a: names are short and trusted enough (they come from the mesh);
/// SipHash's cost shows at 100k queries per second.
#[derive(Default)]
pub(crate) struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        self.0 = h;
    }
}

type FnvMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

/// The names as the socket loops see them.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// The domain, lowercase, with the trailing dot (`mesh.local.`).
    pub domain: Box<[u8]>,
    pub ttl: u32,
    /// Lowercase dotted FQDN → addresses.
    pub names: FnvMap<Box<[u8]>, Vec<Ipv4Addr>>,
    /// Address → names in wire form.
    pub reverse: FnvMap<Ipv4Addr, Vec<Box<[u8]>>>,
}

impl Snapshot {
    #[cfg(test)]
    pub(crate) fn for_tests() -> Snapshot {
        let mut s = Snapshot {
            domain: (*b"mesh.local.").into(),
            ttl: 1,
            ..Default::default()
        };
        for i in 0..3u8 {
            s.names
                .entry((*b"c1.mesh.local.").into())
                .or_default()
                .push(Ipv4Addr::new(198, 19, 0, i));
        }
        s.reverse.insert(
            Ipv4Addr::new(198, 19, 0, 1),
            vec![wire_name("c1.mesh.local.").into()],
        );
        s
    }
}

/// The wire form of a dotted name (labels, then the root).
pub(crate) fn wire_name(dotted: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(dotted.len() + 2);
    for label in dotted.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len().min(63) as u8);
        out.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names() {
        assert_eq!(wire_name("ab.c."), b"\x02ab\x01c\x00");
        assert_eq!(wire_name("."), b"\x00");
    }
}
