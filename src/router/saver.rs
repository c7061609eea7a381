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

/// One state file's durability, as a driver keeps it: the generations
/// handed to the saver, reported on and on disk, the last failure, and what
/// waits for a generation to be on disk (`H`: a delta to gossip, an answer
/// to give). The IPAM and name drivers each keep one.
pub struct Durable<H> {
    file: File,
    path: PathBuf,
    /// What the file holds and what happens while it cannot be written,
    /// for the log ("the address ring", "allocations fail ...").
    what: &'static str,
    meanwhile: &'static str,
    saved: u64,
    submitted: u64,
    reported: u64,
    saver: Option<Saver>,
    held: Vec<(u64, H)>,
    error: Option<String>,
}

impl<H> Durable<H> {
    /// For `path`, whose state of `generation` is on disk already.
    pub fn new(
        file: File,
        path: PathBuf,
        generation: u64,
        what: &'static str,
        meanwhile: &'static str,
    ) -> Durable<H> {
        Durable {
            file,
            path,
            what,
            meanwhile,
            saved: generation,
            submitted: generation,
            reported: generation,
            saver: None,
            held: Vec::new(),
            error: None,
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why the last save failed, while it is the newest outcome.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// The newest generation handed over to be written.
    pub fn submitted(&self) -> u64 {
        self.submitted
    }

    /// Start the thread that writes the file, reporting to `done`.
    pub fn start(&mut self, done: mpsc::UnboundedSender<Saved>) {
        self.saver = Some(Saver::spawn(self.file, self.path.clone(), done));
    }

    /// Write the state of `generation`: through the saver, or here before
    /// the router started one.
    pub fn submit(&mut self, generation: u64, bytes: Vec<u8>) {
        self.submitted = generation;
        let queued = self
            .saver
            .as_ref()
            .is_some_and(|s| s.submit(generation, bytes.clone()));
        if !queued {
            let r = persist::save_sealed(&self.path, &bytes).map_err(|e| format!("{e:#}"));
            self.record(generation, r);
        }
    }

    /// The save of `generation` ended with `result`: the first failure is
    /// logged with what happens meanwhile, and so is the recovery.
    pub fn record(&mut self, generation: u64, result: Result<(), String>) {
        self.reported = self.reported.max(generation);
        match result {
            Ok(()) => {
                self.saved = self.saved.max(generation);
                if let Some(e) = self.error.take() {
                    tracing::info!(file = %self.path.display(), "{} saved again (the last failure was: {e})", self.what);
                }
            }
            Err(e) => {
                if self.error.is_none() {
                    tracing::warn!(
                        file = %self.path.display(),
                        "cannot save {}: {e}; {} until it can be written (retried every second)",
                        self.what,
                        self.meanwhile
                    );
                }
                self.error = Some(e);
            }
        }
    }

    /// The last save failed and no other is on its way: time to retry.
    pub fn retry_due(&self) -> bool {
        self.error.is_some() && self.reported >= self.submitted
    }

    /// `generation`, if its save has failed already (written here, without
    /// a saver).
    pub fn failed(&self, generation: u64) -> Option<u64> {
        (self.error.is_some() && self.reported >= generation).then_some(generation)
    }

    /// `h` back to do now when the state of `generation` is on disk, else
    /// `None`: it is held until it is.
    pub fn promise(&mut self, generation: u64, h: H) -> Option<H> {
        if generation <= self.saved {
            return Some(h);
        }
        self.held.push((generation, h));
        None
    }

    /// What waited and is now on disk; and, of what a save failed for
    /// (generations up to `failed_upto`), what `fails` with it (the rest
    /// waits for a save that succeeds).
    pub fn settled(
        &mut self,
        failed_upto: Option<u64>,
        fails: impl Fn(&H) -> bool,
    ) -> (Vec<H>, Vec<H>) {
        let (mut ready, mut failed, mut keep) = (Vec::new(), Vec::new(), Vec::new());
        for (g, h) in std::mem::take(&mut self.held) {
            if g <= self.saved {
                ready.push(h);
            } else if failed_upto.is_some_and(|f| g <= f) && fails(&h) {
                failed.push(h);
            } else {
                keep.push((g, h));
            }
        }
        self.held = keep;
        (ready, failed)
    }
}
