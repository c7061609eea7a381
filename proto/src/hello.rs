//! The control channel's plaintext preamble: version negotiation.
//!
//! Both ends of a TCP 6783 connection send an 8-byte hello at once:
//!
//! ```text
//! 0      4        5        6       7         8
//! +------+--------+--------+-------+---------+
//! | MESH | min_ver| max_ver| flags | reserved|
//! +------+--------+--------+-------+---------+
//! ```
//!
//! `flags` bit 0: this peer has a password (uses `XXpsk3`). The highest
//! version both ranges share is used; if there is none the connection is
//! refused with a log line naming both ranges. Both hellos are fed to the
//! Noise handshake as its prologue, so a tampered hello fails the handshake.

use crate::WireError;

/// Length of a hello on the wire.
pub const HELLO_LEN: usize = 8;
const MAGIC: &[u8; 4] = b"MESH";
const FLAG_PASSWORD: u8 = 1;

/// One side's hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Oldest version spoken.
    pub min_version: u8,
    /// Newest version spoken.
    pub max_version: u8,
    /// Whether the sender is configured with a password.
    pub password: bool,
}

/// No version in common.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no common protocol version: we speak {ours_min}..={ours_max} ({}), peer speaks {theirs_min}..={theirs_max} ({}); every peer of a mesh must run a release that shares one (README: Upgrading)", releases(*.ours_min, *.ours_max), releases(*.theirs_min, *.theirs_max))]
pub struct VersionMismatch {
    /// Our oldest.
    pub ours_min: u8,
    /// Our newest.
    pub ours_max: u8,
    /// Their oldest.
    pub theirs_min: u8,
    /// Their newest.
    pub theirs_max: u8,
}

/// The mesh releases that speak protocol versions `lo..=hi`, for messages.
pub fn releases(lo: u8, hi: u8) -> String {
    let of = |v: u8| match v {
        0..=2 => "0.1",
        3 => "0.2",
        4 => "0.3",
        _ => "a later release",
    };
    if of(lo) == of(hi) {
        format!("mesh {}", of(lo))
    } else {
        format!("mesh {} to {}", of(lo), of(hi))
    }
}

impl Hello {
    /// Our own hello.
    pub fn ours(password: bool) -> Hello {
        Hello {
            min_version: crate::PROTOCOL_MIN_VERSION,
            max_version: crate::PROTOCOL_VERSION,
            password,
        }
    }

    /// Parse exactly [`HELLO_LEN`] bytes.
    pub fn parse(b: &[u8]) -> Result<Hello, WireError> {
        if b.len() < HELLO_LEN {
            return Err(WireError::Truncated {
                what: "hello",
                need: HELLO_LEN,
                have: b.len(),
            });
        }
        if b.len() > HELLO_LEN {
            return Err(WireError::Trailing(b.len() - HELLO_LEN));
        }
        if &b[0..4] != MAGIC {
            return Err(WireError::BadMagic("hello"));
        }
        let (min_version, max_version) = (b[4], b[5]);
        if min_version == 0 || min_version > max_version {
            return Err(WireError::Invalid("hello version range"));
        }
        Ok(Hello {
            min_version,
            max_version,
            password: b[6] & FLAG_PASSWORD != 0,
        })
    }

    /// The wire form.
    pub fn emit(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(MAGIC);
        b[4] = self.min_version;
        b[5] = self.max_version;
        b[6] = if self.password { FLAG_PASSWORD } else { 0 };
        b
    }

    /// The version to speak with a peer that sent `theirs`.
    pub fn negotiate(&self, theirs: &Hello) -> Result<u8, VersionMismatch> {
        let hi = self.max_version.min(theirs.max_version);
        let lo = self.min_version.max(theirs.min_version);
        if hi >= lo {
            Ok(hi)
        } else {
            Err(VersionMismatch {
                ours_min: self.min_version,
                ours_max: self.max_version,
                theirs_min: theirs.min_version,
                theirs_max: theirs.max_version,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_fixed_bytes() {
        let b = [b'M', b'E', b'S', b'H', 1, 3, 1, 0];
        let h = Hello::parse(&b).unwrap();
        assert_eq!(
            h,
            Hello {
                min_version: 1,
                max_version: 3,
                password: true
            }
        );
        assert_eq!(h.emit(), b);
    }

    #[test]
    fn malformed() {
        assert!(matches!(
            Hello::parse(b"MESH"),
            Err(WireError::Truncated { .. })
        ));
        assert!(matches!(
            Hello::parse(b"MASH\x01\x01\0\0"),
            Err(WireError::BadMagic(_))
        ));
        assert!(Hello::parse(b"MESH\x02\x01\0\0").is_err());
        assert!(Hello::parse(b"MESH\x00\x01\0\0").is_err());
        assert!(matches!(
            Hello::parse(b"MESH\x01\x01\0\0\0"),
            Err(WireError::Trailing(1))
        ));
    }

    #[test]
    fn negotiation() {
        let a = Hello {
            min_version: 1,
            max_version: 3,
            password: false,
        };
        let b = Hello {
            min_version: 2,
            max_version: 5,
            password: false,
        };
        assert_eq!(a.negotiate(&b), Ok(3));
        assert_eq!(b.negotiate(&a), Ok(3));
        let c = Hello {
            min_version: 4,
            max_version: 5,
            password: false,
        };
        assert!(a.negotiate(&c).is_err());
    }
}
