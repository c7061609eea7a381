//! Peer names.
//!
//! A peer is named by six bytes shown like a MAC address
//! (`8a:3f:01:c2:44:9e`), as Weave Net users know them. The name is derived
//! from the peer's persistent X25519 static public key (BLAKE2s of the key,
//! first six bytes, with the multicast bit cleared and the locally-administered
//! bit set), so a cloned machine with a new key gets a new name, and a peer
//! cannot claim a name without holding the matching key: the Noise handshake
//! proves the key, and the receiver recomputes the name from it.

use blake2::{Blake2s256, Digest};
use std::fmt;
use std::str::FromStr;

/// A peer's name.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct PeerName(pub [u8; 6]);

impl PeerName {
    /// The destination of frames flooded to every peer.
    pub const BROADCAST: PeerName = PeerName([0xff; 6]);
    /// No peer.
    pub const UNKNOWN: PeerName = PeerName([0; 6]);

    /// The name belonging to a static public key.
    pub fn from_public_key(key: &[u8]) -> PeerName {
        let digest = Blake2s256::digest(key);
        let mut b = [0u8; 6];
        b.copy_from_slice(&digest[..6]);
        b[0] = (b[0] & 0xfe) | 0x02;
        PeerName(b)
    }

    /// Whether this is the broadcast name.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }
}

/// A MAC address (or a peer name) as `aa:bb:cc:dd:ee:ff`: the one
/// formatter of six bytes in the workspace.
pub fn mac_string(b: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5]
    )
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mac_string(self.0))
    }
}

impl fmt::Debug for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not a peer name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid peer name {0:?}: expected six hex bytes like 8a:3f:01:c2:44:9e")]
pub struct BadPeerName(pub String);

impl FromStr for PeerName {
    type Err = BadPeerName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadPeerName(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(PeerName(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse() {
        let n = PeerName([0x8a, 0x3f, 0x01, 0xc2, 0x44, 0x9e]);
        assert_eq!(n.to_string(), "8a:3f:01:c2:44:9e");
        assert_eq!("8a:3f:01:c2:44:9e".parse::<PeerName>(), Ok(n));
        for bad in [
            "",
            "8a:3f",
            "8a:3f:01:c2:44:9e:00",
            "8a:3f:01:c2:44:9",
            "zz:3f:01:c2:44:9e",
        ] {
            assert!(bad.parse::<PeerName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn derived_names_are_unicast_local() {
        for k in 0u8..50 {
            let n = PeerName::from_public_key(&[k; 32]);
            assert_eq!(n.0[0] & 1, 0);
            assert_eq!(n.0[0] & 2, 2);
            assert!(!n.is_broadcast());
        }
        assert_ne!(
            PeerName::from_public_key(&[1; 32]),
            PeerName::from_public_key(&[2; 32])
        );
    }
}
