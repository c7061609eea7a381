//! The peer's persistent identity: an X25519 static key in
//! `$MESH_DATA_DIR/identity.key` (mode 0600), created on first launch. The
//! peer name is derived from it, so it survives restarts and differs on a
//! cloned machine that generates its own key.

use crate::persist::write_atomic;
use anyhow::Context;
use mesh_proto::handshake::StaticKey;
use std::path::Path;

/// Load the key, or create and store a new one.
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<StaticKey> {
    let path = data_dir.join(crate::paths::IDENTITY);
    match std::fs::read(&path) {
        Ok(bytes) => StaticKey::from_bytes(&bytes)
            .with_context(|| format!("identity key {} is corrupt", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = StaticKey::generate().context("generating identity key")?;
            write_atomic(&path, &key.to_bytes(), 0o600)?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
