//! The daemon's log: plain text or JSON lines (`--log-format`), to stderr,
//! and, when `mesh launch` started the daemon in the background, to
//! `<run dir>/mesh.log` with a size cap.
//!
//! In the background the daemon's stdout and stderr *are* `mesh.log` (the
//! launching process opened it). Each log record is one `write` to stderr;
//! before a record would take the file past the cap (`MESH_LOG_MAX_BYTES`,
//! default 10 MB), `mesh.log.1` becomes `mesh.log.2`, `mesh.log` becomes
//! `mesh.log.1`, a new `mesh.log` is opened and put in place of stdout and
//! stderr (`dup2`), so that a panic message lands in the current file too.
//! The log thus never holds more than [`KEEP`] + 1 files of at most the cap
//! each (a single record longer than the cap gets a file of its own).
//! In the foreground (systemd) stderr is left alone: the journal rotates.

use anyhow::Context;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The environment variable with which a background launch tells the
/// daemon the path of the log file its stderr is.
pub const LOG_FILE_ENV: &str = "MESH_LOG_FILE";
/// The environment variable that overrides the size cap of `mesh.log`, in
/// bytes (tests use a tiny one).
pub const MAX_BYTES_ENV: &str = "MESH_LOG_MAX_BYTES";
/// The default size cap of `mesh.log`.
pub const DEFAULT_MAX_BYTES: u64 = 10 << 20;
/// The smallest cap honoured: below it every line would be a rotation.
const MIN_MAX_BYTES: u64 = 1024;
/// How many rotated files are kept (`mesh.log.1` … `mesh.log.KEEP`).
pub const KEEP: usize = 2;

/// How the log's lines look: `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per record.
    #[default]
    Plain,
    /// One JSON object per line: `timestamp`, `level`, `target`,
    /// `fields` (with `message`), and the current span's fields.
    Json,
}

/// Install the daemon's tracing subscriber: `filter` (a `--log-level`) in
/// `format`, to stderr, rotated when this process is a background launch.
pub fn init(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid --log-level {filter:?}"))?;
    let writer = match std::env::var_os(LOG_FILE_ENV) {
        Some(path) => Writer::Rotating(Arc::new(Mutex::new(Rotator::new(
            PathBuf::from(path),
            max_bytes()?,
        )))),
        None => Writer::Stderr,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
    Ok(())
}

/// The cap from [`MAX_BYTES_ENV`] (at least [`MIN_MAX_BYTES`]), else
/// [`DEFAULT_MAX_BYTES`].
fn max_bytes() -> anyhow::Result<u64> {
    match std::env::var(MAX_BYTES_ENV) {
        Err(_) => Ok(DEFAULT_MAX_BYTES),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) => Ok(n.max(MIN_MAX_BYTES)),
            Err(_) => anyhow::bail!("{MAX_BYTES_ENV}={v:?} is not a size in bytes like 10485760"),
        },
    }
}

/// Where records go: stderr as it is, or stderr as a capped file.
#[derive(Clone)]
enum Writer {
    Stderr,
    Rotating(Arc<Mutex<Rotator>>),
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Writer {
    type Writer = Record;

    fn make_writer(&'a self) -> Record {
        Record {
            to: self.clone(),
            buf: Vec::new(),
        }
    }
}

/// One record, gathered and written whole when dropped (the formatter may
/// write a record in pieces; a rotation must not cut it).
struct Record {
    to: Writer,
    buf: Vec<u8>,
}

impl Write for Record {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        match &self.to {
            Writer::Stderr => {
                let _ = std::io::stderr().write_all(&self.buf);
            }
            Writer::Rotating(r) => {
                let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
                r.write_record(&self.buf);
            }
        }
    }
}

/// The size-capped `mesh.log` behind stderr.
struct Rotator {
    path: PathBuf,
    max: u64,
    /// Bytes in the current file (its size when the daemon started, plus
    /// what was written since).
    written: u64,
    /// Whether a rotation failed (reported once, then retried at each
    /// record, writing on to the old file meanwhile).
    failing: bool,
}

impl Rotator {
    fn new(path: PathBuf, max: u64) -> Rotator {
        let written = std::fs::metadata(&path).map_or(0, |m| m.len());
        Rotator {
            path,
            max,
            written,
            failing: false,
        }
    }

    fn write_record(&mut self, rec: &[u8]) {
        let len = rec.len() as u64;
        if self.written > 0 && self.written.saturating_add(len) > self.max {
            match rotate(&self.path) {
                Ok(()) => {
                    self.written = 0;
                    self.failing = false;
                }
                Err(e) if !self.failing => {
                    self.failing = true;
                    let msg = format!("mesh: rotating {}: {e:#}\n", self.path.display());
                    let _ = std::io::stderr().write_all(msg.as_bytes());
                }
                Err(_) => {}
            }
        }
        if std::io::stderr().write_all(rec).is_ok() {
            self.written = self.written.saturating_add(len);
        }
    }
}

/// `path.{KEEP-1}` → `path.{KEEP}`, …, `path` → `path.1`, then a new
/// `path` in place of stdout and stderr.
fn rotate(path: &Path) -> anyhow::Result<()> {
    let numbered = |n: usize| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    };
    for n in (1..KEEP).rev() {
        match std::fs::rename(numbered(n), numbered(n + 1)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("renaming {}", numbered(n).display())),
        }
    }
    std::fs::rename(path, numbered(1))
        .with_context(|| format!("renaming to {}", numbered(1).display()))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::unistd::dup2_stdout(&file).context("dup2 onto stdout")?;
    nix::unistd::dup2_stderr(&file).context("dup2 onto stderr")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_names_are_lowercase() {
        assert_eq!(serde_json::to_string(&LogFormat::Json).unwrap(), "\"json\"");
        assert_eq!(
            serde_json::from_str::<LogFormat>("\"plain\"").unwrap(),
            LogFormat::Plain
        );
    }
}
