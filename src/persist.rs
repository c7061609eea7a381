//! Persistence: atomic writes, and the checksummed container every state
//! file of the data directory is kept in.
//!
//! **Atomic.** [`write_atomic`] writes a temporary file, fsyncs it, renames
//! it over the old one and fsyncs the directory. A crash at any instant
//! leaves either the old or the new contents, never a torn file.
//!
//! **Checked.** [`seal`] wraps a payload as
//! `MESHSTAT` (8 bytes) · format (1 byte, [`FORMAT`]) · payload length
//! (u32, little endian) · BLAKE2s-256 of the payload (32 bytes) · payload.
//! [`open`] checks all of it, so a file cut short, grown, or with a flipped
//! bit is refused as [`Corrupt`] rather than decoded into something else.
//! Files written before the container existed (no magic) are still read as
//! they are ([`Opened::Legacy`]), so existing data directories load; the
//! next write seals them.
//!
//! **Moved aside.** [`load_or_move_aside`] reads a state file the daemon can
//! rebuild from the mesh (the address ring, the name table, the targets): a
//! corrupt one is renamed to `<file>.corrupt-<unix time>` (kept for a post
//! mortem, never read again), one line says so and what happens next, and
//! the caller starts without it.
//!
//! Test hook: `MESH_TEST_SAVE_DELAY_MS` delays every [`write_atomic`] of
//! `ipam.bin` and `names.bin` by that many milliseconds (a slow disk), for
//! the tests that prove no task that must stay responsive waits on a save.
//!
//! Test hook: `MESH_TEST_CRASH_AT=<file>:<point>[:<n>]` makes the process
//! kill itself with SIGKILL in the middle of the `n`th (default: first)
//! [`write_atomic`] of the state file named `<file>` (e.g. `ipam.bin`), at
//! `<point>`: `before-rename` (the temporary file is written and fsynced,
//! not yet renamed over the file) or `after-rename` (renamed, the directory
//! not yet fsynced). The tests of a crash at every write use it
//! (`tests/crash_at_write.rs`). Read once; unset, it costs one check of a
//! `OnceLock` per write.

use anyhow::Context;
use blake2::{Blake2s256, Digest};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The first bytes of every sealed state file.
pub const MAGIC: &[u8; 8] = b"MESHSTAT";
/// The container's format: 1 = BLAKE2s-256 of the payload.
pub const FORMAT: u8 = 1;
/// Bytes before the payload.
pub const HEADER: usize = MAGIC.len() + 1 + 4 + 32;
/// No state file is larger than this (the ring's and the name table's own
/// caps are far below); a length field above it is corruption.
pub const MAX_PAYLOAD: usize = 256 << 20;

/// Why a sealed file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    /// Shorter than its header or than the length it announces.
    #[error("truncated: {found} bytes where {expected} were expected")]
    Truncated {
        /// Bytes needed.
        expected: usize,
        /// Bytes found.
        found: usize,
    },
    /// Longer than the length it announces.
    #[error("{0} bytes of trailing garbage")]
    Trailing(usize),
    /// A format this release does not know (written by a newer one?).
    #[error("unknown container format {0}")]
    Format(u8),
    /// The length field is absurd.
    #[error("announced length {0} is too large")]
    Length(u64),
    /// The payload does not match its checksum.
    #[error("checksum mismatch")]
    Checksum,
    /// The checksum held but the payload does not decode (or, for a file
    /// of before the container, it does not decode at all).
    #[error("{0}")]
    Payload(String),
}

/// What [`open`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened<'a> {
    /// A sealed file whose checksum holds: its payload.
    Sealed(&'a [u8]),
    /// A file of before the container (no magic): the bytes as they are,
    /// unchecked.
    Legacy(&'a [u8]),
}

impl<'a> Opened<'a> {
    /// The payload, checked or not.
    pub fn payload(&self) -> &'a [u8] {
        match self {
            Opened::Sealed(p) | Opened::Legacy(p) => p,
        }
    }
}

fn checksum(payload: &[u8]) -> [u8; 32] {
    Blake2s256::digest(payload).into()
}

/// Wrap `payload` in the checksummed container.
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(payload));
    out.extend_from_slice(payload);
    out
}

/// Check a file's bytes: the payload of a sealed file whose checksum holds,
/// or the bytes of a file of before the container.
pub fn open(bytes: &[u8]) -> Result<Opened<'_>, Corrupt> {
    // Also a file cut inside the magic is one of ours, cut short.
    let n = bytes.len().min(MAGIC.len());
    if bytes.is_empty() || bytes[..n] != MAGIC[..n] {
        return Ok(Opened::Legacy(bytes));
    }
    let truncated = |expected| Corrupt::Truncated {
        expected,
        found: bytes.len(),
    };
    let header = bytes.get(..HEADER).ok_or_else(|| truncated(HEADER))?;
    let format = header[MAGIC.len()];
    if format != FORMAT {
        return Err(Corrupt::Format(format));
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&header[MAGIC.len() + 1..MAGIC.len() + 5]);
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_PAYLOAD {
        return Err(Corrupt::Length(len as u64));
    }
    let payload = &bytes[HEADER..];
    if payload.len() < len {
        return Err(truncated(HEADER + len));
    }
    if payload.len() > len {
        return Err(Corrupt::Trailing(payload.len() - len));
    }
    if header[MAGIC.len() + 5..] != checksum(payload) {
        return Err(Corrupt::Checksum);
    }
    Ok(Opened::Sealed(payload))
}

/// Write `bytes` to `path` atomically with the given mode.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    test_delay(path);
    let dir = path
        .parent()
        .context("persisted file has no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        // A full disk: leave no half-written temporary file taking space.
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    let crash = crash_point(path);
    if crash == Some(CrashPoint::BeforeRename) {
        crash_now();
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if crash == Some(CrashPoint::AfterRename) {
        crash_now();
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Seal `payload` and write it atomically (mode 0600).
pub fn save_sealed(path: &Path, payload: &[u8]) -> anyhow::Result<()> {
    write_atomic(path, &seal(payload), 0o600)
}

/// `MESH_TEST_SAVE_DELAY_MS`: sleep that long before a write of the ring
/// or the name table (tests only).
fn test_delay(path: &Path) {
    let slow = [crate::paths::IPAM, crate::paths::NAMES]
        .iter()
        .any(|f| path.file_name().is_some_and(|n| n == *f));
    if !slow {
        return;
    }
    let ms = std::env::var("MESH_TEST_SAVE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Where in [`write_atomic`] the `MESH_TEST_CRASH_AT` hook kills us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CrashPoint {
    /// The temporary file written and fsynced, not renamed.
    BeforeRename,
    /// Renamed, the directory not fsynced.
    AfterRename,
}

/// `MESH_TEST_CRASH_AT`, parsed: the file's name, the point, which write
/// (1-based), and how many writes of the file were seen.
struct CrashAt {
    file: String,
    point: CrashPoint,
    nth: u64,
    seen: AtomicU64,
}

/// Parse `<file>:<point>[:<n>]`; `None` for anything else.
fn parse_crash_at(v: &str) -> Option<CrashAt> {
    let mut parts = v.split(':');
    let file = parts.next().filter(|f| !f.is_empty())?.to_string();
    let point = match parts.next()? {
        "before-rename" => CrashPoint::BeforeRename,
        "after-rename" => CrashPoint::AfterRename,
        _ => return None,
    };
    let nth = match parts.next() {
        Some(n) => n.parse::<u64>().ok().filter(|n| *n > 0)?,
        None => 1,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(CrashAt {
        file,
        point,
        nth,
        seen: AtomicU64::new(0),
    })
}

/// The point at which this write of `path` must crash, if the hook is set
/// for it and this is the write it names (counting the writes of that
/// file that got this far).
fn crash_point(path: &Path) -> Option<CrashPoint> {
    static HOOK: OnceLock<Option<CrashAt>> = OnceLock::new();
    let hook = HOOK
        .get_or_init(|| {
            let v = std::env::var("MESH_TEST_CRASH_AT").ok()?;
            let parsed = parse_crash_at(&v);
            if parsed.is_none() {
                tracing::warn!("MESH_TEST_CRASH_AT={v:?} is not <file>:before-rename|after-rename[:<n>]: ignored");
            }
            parsed
        })
        .as_ref()?;
    if path.file_name().is_none_or(|n| *n != *hook.file) {
        return None;
    }
    let n = hook.seen.fetch_add(1, Ordering::SeqCst) + 1;
    (n == hook.nth).then_some(hook.point)
}

/// The `MESH_TEST_CRASH_AT` hook fired: die as a `kill -9` would.
fn crash_now() {
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    // SIGKILL cannot be caught; should raise fail, still end here.
    std::process::abort();
}

/// Write a value as JSON, sealed, atomically (mode 0600).
pub fn save_json<T: serde::Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).context("encoding state")?;
    save_sealed(path, &bytes)
}

/// Read a JSON value (sealed, or plain JSON of before the container), or
/// `None` if the file does not exist. A corrupt file is an error naming it.
pub fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    let Some(bytes) = read(path)? else {
        return Ok(None);
    };
    decode_json(&bytes)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{} is corrupt: {e}", path.display()))
}

/// Decode a JSON state file's bytes (sealed or plain).
pub fn decode_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Corrupt> {
    let payload = open(bytes)?.payload();
    serde_json::from_slice(payload).map_err(|e| Corrupt::Payload(e.to_string()))
}

/// Read a file, or `None` if it does not exist.
pub fn read(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// What [`load_or_move_aside`] found.
#[derive(Debug)]
pub enum Loaded<T> {
    /// No file.
    Missing,
    /// The decoded file.
    Found(T),
    /// The file was corrupt and is now at `aside`.
    MovedAside {
        /// Where it went.
        aside: PathBuf,
    },
}

/// Where a corrupt `path` is moved: `<path>.corrupt-<unix time>`.
pub fn aside_path(path: &Path) -> PathBuf {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".corrupt-{t}"));
    PathBuf::from(s)
}

/// Read and decode a state file the daemon can do without. `decode` gets
/// the checked payload and whether it was sealed; it returns
/// `Err(Corrupt)` for bytes that are damaged (the file is then moved aside,
/// with one warning naming it and `next`, what the daemon does now) and
/// `Ok(Err(e))` for a file that is sound but unusable here (e.g. another
/// `--ipalloc-range`), which the caller reports as it sees fit.
pub fn load_or_move_aside<T, E>(
    path: &Path,
    next: &str,
    decode: impl FnOnce(&[u8], bool) -> Result<Result<T, E>, Corrupt>,
) -> anyhow::Result<Result<Loaded<T>, E>> {
    let Some(bytes) = read(path)? else {
        return Ok(Ok(Loaded::Missing));
    };
    let why = match open(&bytes) {
        Ok(o) => match decode(o.payload(), matches!(o, Opened::Sealed(_))) {
            Ok(Ok(v)) => return Ok(Ok(Loaded::Found(v))),
            Ok(Err(e)) => return Ok(Err(e)),
            Err(c) => c,
        },
        Err(c) => c,
    };
    let aside = aside_path(path);
    std::fs::rename(path, &aside).with_context(|| {
        format!(
            "{} is corrupt ({why}) and could not be moved aside to {}",
            path.display(),
            aside.display()
        )
    })?;
    if let Some(dir) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
        let _ = dir.sync_all();
    }
    tracing::warn!(
        file = %path.display(),
        aside = %aside.display(),
        "state file {} is corrupt ({why}): moved to {}; {next}",
        path.display(),
        aside.display()
    );
    Ok(Ok(Loaded::MovedAside { aside }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_every_damage_refused() {
        let p = b"hello state".to_vec();
        let s = seal(&p);
        assert_eq!(s.len(), HEADER + p.len());
        assert_eq!(open(&s), Ok(Opened::Sealed(&p[..])));
        assert_eq!(open(&seal(b"")), Ok(Opened::Sealed(&b""[..])));
        // Cut anywhere: truncated (also inside the magic).
        for cut in 1..s.len() {
            assert!(
                matches!(open(&s[..cut]), Err(Corrupt::Truncated { .. })),
                "cut at {cut}"
            );
        }
        // Any flipped bit of the payload or checksum: mismatch.
        for i in (MAGIC.len() + 5)..s.len() {
            let mut b = s.clone();
            b[i] ^= 0x10;
            assert_eq!(open(&b), Err(Corrupt::Checksum), "byte {i}");
        }
        let mut b = s.clone();
        b[MAGIC.len()] = 9;
        assert_eq!(open(&b), Err(Corrupt::Format(9)));
        let mut b = s.clone();
        b.push(0);
        assert_eq!(open(&b), Err(Corrupt::Trailing(1)));
        let mut b = s.clone();
        b[MAGIC.len() + 1..MAGIC.len() + 5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(open(&b), Err(Corrupt::Length(_))));
        // Files of before the container are read as they are.
        assert_eq!(open(b"[\"a\"]"), Ok(Opened::Legacy(&b"[\"a\"]"[..])));
        assert_eq!(open(b""), Ok(Opened::Legacy(&b""[..])));
    }

    #[test]
    fn crash_at_parses_file_point_and_nth() {
        let c = parse_crash_at("ipam.bin:before-rename").expect("parsed");
        assert_eq!(
            (c.file.as_str(), c.point, c.nth),
            ("ipam.bin", CrashPoint::BeforeRename, 1)
        );
        let c = parse_crash_at("names.bin:after-rename:3").expect("parsed");
        assert_eq!(
            (c.file.as_str(), c.point, c.nth),
            ("names.bin", CrashPoint::AfterRename, 3)
        );
        for bad in [
            "",
            "ipam.bin",
            ":before-rename",
            "x:middle",
            "x:after-rename:0",
            "x:after-rename:a",
            "x:after-rename:1:2",
        ] {
            assert!(parse_crash_at(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn json_sealed_and_legacy_load_and_corrupt_is_moved_aside() {
        let dir = std::env::temp_dir().join(format!("mesh-persist-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("t.json");
        save_json(&path, &vec!["a".to_string()]).expect("save");
        assert_eq!(
            load_json::<Vec<String>>(&path).expect("load"),
            Some(vec!["a".to_string()])
        );
        std::fs::write(&path, b"[\"old\"]").expect("legacy");
        assert_eq!(
            load_json::<Vec<String>>(&path).expect("legacy load"),
            Some(vec!["old".to_string()])
        );
        let sealed = seal(b"[\"x\"]");
        std::fs::write(&path, &sealed[..sealed.len() - 2]).expect("truncated");
        assert!(load_json::<Vec<String>>(&path).is_err());
        let r = load_or_move_aside(&path, "starting without it", |b, _| {
            Ok::<_, Corrupt>(Ok::<Vec<String>, ()>(decode_json(b)?))
        })
        .expect("io");
        let Ok(Loaded::MovedAside { aside }) = r else {
            panic!("not moved aside: {r:?}");
        };
        assert!(!path.exists());
        assert!(aside.exists());
        assert!(aside.to_string_lossy().contains(".corrupt-"));
        let r = load_or_move_aside(&path, "", |_, _| Ok::<_, Corrupt>(Ok::<(), ()>(())));
        assert!(matches!(r, Ok(Ok(Loaded::Missing))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
