//! Savers: one thread per state file that writes it off the router's task.
//!
//! The router hands a saver the latest bytes of a file with the generation
//! they reflect ([`Saver::submit`]) and goes on serving connections,
//! heartbeats and status. The thread takes the newest submission (older
//! ones still queued are skipped: a later state contains them), seals it
//! ([`persist::save_sealed`]: checksummed, written atomically and fsynced)
//! and reports the outcome ([`Saved`]) to the router. Drivers hold back
//! what depends on a change (its gossip, the answer to a request) until the
//! report for a generation at least as new says it is on disk. A slow or
//! failing disk therefore delays promises, never heartbeats.

use crate::persist;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use tokio::sync::mpsc;

/// Which file a report is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum File {
    /// `ipam.bin`.
    Ipam,
    /// `names.bin`.
    Names,
}

/// A saver's report: the state of `generation` is on disk, or failed to
/// get there.
#[derive(Debug)]
pub struct Saved {
    /// The file.
    pub file: File,
    /// The generation written (or not).
    pub generation: u64,
    /// The outcome, with the cause of a failure.
    pub result: Result<(), String>,
}

/// The handle a driver keeps; the thread ends when it is dropped.
pub struct Saver {
    tx: std_mpsc::Sender<(u64, Vec<u8>)>,
}

impl Saver {
    /// Start the thread that writes `path`, reporting to `done`.
    pub fn spawn(file: File, path: PathBuf, done: mpsc::UnboundedSender<Saved>) -> Saver {
        let (tx, rx) = std_mpsc::channel::<(u64, Vec<u8>)>();
        let name = format!("save-{file:?}").to_lowercase();
        let run = move || {
            while let Ok(mut job) = rx.recv() {
                // Coalesce: only the newest state is worth writing.
                while let Ok(newer) = rx.try_recv() {
                    job = newer;
                }
                let (generation, bytes) = job;
                let result = persist::save_sealed(&path, &bytes).map_err(|e| format!("{e:#}"));
                if done
                    .send(Saved {
                        file,
                        generation,
                        result,
                    })
                    .is_err()
                {
                    return;
                }
            }
        };
        if let Err(e) = std::thread::Builder::new().name(name).spawn(run) {
            // Without the thread, `submit` fails (its receiver is gone) and
            // the driver reports every save as failed.
            tracing::warn!("cannot start the thread that saves {file:?}: {e}");
        }
        Saver { tx }
    }

    /// Write the state of `generation` (replacing any not yet written).
    /// Returns false when the thread is gone.
    pub fn submit(&self, generation: u64, bytes: Vec<u8>) -> bool {
        self.tx.send((generation, bytes)).is_ok()
    }
}

/// Where a driver's saves of one file stand: the newest generation on
/// disk, the newest with an outcome, and the last failure if the newest
/// outcome was one.
pub struct Progress<'a> {
    /// Newest generation on disk.
    pub saved: &'a mut u64,
    /// Newest generation whose save has an outcome.
    pub reported: &'a mut u64,
    /// The failure of the newest outcome, if it failed.
    pub error: &'a mut Option<String>,
}

impl Progress<'_> {
    /// The save of `generation` of `file` (`what`: "the address ring")
    /// ended with `result`: the first failure is logged with what happens
    /// `meanwhile`, and so is the recovery.
    pub fn record(
        self,
        generation: u64,
        result: Result<(), String>,
        file: &Path,
        what: &str,
        meanwhile: &str,
    ) {
        *self.reported = (*self.reported).max(generation);
        match result {
            Ok(()) => {
                *self.saved = (*self.saved).max(generation);
                if let Some(e) = self.error.take() {
                    tracing::info!(file = %file.display(), "{what} saved again (the last failure was: {e})");
                }
            }
            Err(e) => {
                if self.error.is_none() {
                    tracing::warn!(
                        file = %file.display(),
                        "cannot save {what}: {e}; {meanwhile} until it can be written (retried every second)"
                    );
                }
                *self.error = Some(e);
            }
        }
    }
}
