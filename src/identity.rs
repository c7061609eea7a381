//! The peer's persistent identity: a 32-byte Ed25519 seed in
//! `$MESH_DATA_DIR/identity.key` (mode 0600), created on first launch. The
//! signing key, the Noise key and the peer name all come from it (see
//! `mesh_proto::sign`), so they survive restarts and differ on a cloned
//! machine that generates its own.
//!
//! Stored form: the 8 bytes `MESHID2\n` then the seed, sealed in the
//! checksummed container of [`crate::persist`] (files written before it,
//! unsealed, still load). A corrupt key is never replaced silently: a new
//! identity is a new peer, so the daemon refuses to start and prints the
//! command that moves the file aside. A file of release
//! 0.1's form (a 64-byte X25519 key pair, which cannot sign) is moved aside
//! to `identity.key.v1` and a new identity made: the peer gets a new name,
//! which is part of the documented upgrade (README, "Upgrading").

use crate::persist::{self, write_atomic};
use anyhow::Context;
use mesh_proto::sign::Identity;
use std::path::Path;

const MAGIC: &[u8; 8] = b"MESHID2\n";

/// Load the identity, or create and store a new one.
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Identity> {
    let path = data_dir.join(crate::paths::IDENTITY);
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 64 => {
            let aside = path.with_extension("key.v1");
            std::fs::rename(&path, &aside)
                .with_context(|| format!("moving {} aside", path.display()))?;
            tracing::warn!(
                "{} is a key of mesh 0.1, which cannot sign gossip: moved to {}; this peer gets a new identity (and name)",
                path.display(),
                aside.display()
            );
            create(&path)
        }
        Ok(bytes) => persist::open(&bytes)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .and_then(|o| decode(o.payload()))
            .map_err(|e| {
                let aside = persist::aside_path(&path);
                anyhow::anyhow!(
                    "identity key {} is corrupt ({e}). This peer's name comes from it: a new key makes this host a new peer (its addresses come back only by `mesh rmpeer` of the old name from another peer). To start with a new identity, move the file aside and launch again: mv {} {}",
                    path.display(),
                    path.display(),
                    aside.display()
                )
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(&path),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn create(path: &Path) -> anyhow::Result<Identity> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("generating identity key: {e}"))?;
    let id = Identity::from_seed(&seed);
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&seed);
    write_atomic(path, &persist::seal(&bytes), 0o600)?;
    Ok(id)
}

/// Decode the payload of `identity.key` (after [`persist::open`]): the
/// magic, then the 32-byte seed. Public for the fuzz target and its
/// regression tests.
pub fn decode(bytes: &[u8]) -> anyhow::Result<Identity> {
    let seed = bytes
        .strip_prefix(MAGIC)
        .and_then(|s| <[u8; 32]>::try_from(s).ok())
        .ok_or_else(|| {
            anyhow::anyhow!("expected {} bytes, found {}", MAGIC.len() + 32, bytes.len())
        })?;
    Ok(Identity::from_seed(&seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded_and_an_old_key_is_moved_aside() {
        let dir = std::env::temp_dir().join(format!("mesh-id-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = load_or_create(&dir).expect("create");
        let b = load_or_create(&dir).expect("load");
        assert_eq!(a.public(), b.public());
        let path = dir.join(crate::paths::IDENTITY);
        std::fs::write(&path, [7u8; 64]).expect("old key");
        let c = load_or_create(&dir).expect("replace");
        assert_ne!(c.public(), a.public());
        assert!(path.with_extension("key.v1").exists());
        // A key of before the checksum still loads.
        let d = load_or_create(&dir).expect("load sealed");
        assert_eq!(d.public(), c.public());
        let sealed = std::fs::read(&path).expect("read");
        let mut unsealed = MAGIC.to_vec();
        unsealed.extend_from_slice(&sealed[sealed.len() - 32..]);
        std::fs::write(&path, &unsealed).expect("legacy");
        assert_eq!(load_or_create(&dir).expect("legacy").public(), c.public());
        // A flipped bit is refused, with the command to move it aside.
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(&path, &bad).expect("flip");
        let e = match load_or_create(&dir) {
            Ok(_) => panic!("a corrupt key was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains("checksum") && e.contains("mv "), "{e}");
        std::fs::write(&path, b"junk").expect("junk");
        assert!(load_or_create(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
