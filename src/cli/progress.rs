//! Progress on a terminal for waits longer than a second: a spinner, what
//! is awaited and the seconds so far, on stderr, erased when the wait ends.
//! When stderr is not a terminal (scripts, pipes, logs) nothing is written,
//! so the output of a command does not depend on how long it waited.
//!
//! A [`Progress`] is a guard: the spinner runs on its own thread from
//! [`Progress::start`] until the guard is dropped, whatever the waiting
//! code does meanwhile (a blocking call, a poll loop).

use std::io::{IsTerminal, Write};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Waits shorter than this show nothing.
const QUIET_FOR: Duration = Duration::from_secs(1);
/// Time between two frames of the spinner.
const FRAME: Duration = Duration::from_millis(125);
/// The longest progress line: one that wrapped could not be redrawn in
/// place by `\r` on an 80-column terminal.
const WIDTH: usize = 79;
/// The spinner's frames.
const SPINNER: [char; 4] = ['|', '/', '-', '\\'];

/// A progress line on stderr while alive (see the module docs).
pub(super) struct Progress {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Show `what` (e.g. "waiting for the daemon to answer") if the wait
    /// lasts longer than a second and stderr is a terminal.
    pub(super) fn start(what: impl Into<String>) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress {
                stop: None,
                thread: None,
            };
        }
        let what = what.into();
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            if !matches!(rx.recv_timeout(QUIET_FOR), Err(RecvTimeoutError::Timeout)) {
                return;
            }
            let mut i = 0usize;
            loop {
                let line = frame(i, &what, start.elapsed());
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r{line}\x1b[K");
                let _ = err.flush();
                drop(err);
                i += 1;
                if !matches!(rx.recv_timeout(FRAME), Err(RecvTimeoutError::Timeout)) {
                    break;
                }
            }
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        });
        Progress {
            stop: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread; it erases its line.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Frame `i` of the progress line: `| waiting for X (3s)`, at most
/// [`WIDTH`] characters (`what` is cut short to fit).
fn frame(i: usize, what: &str, elapsed: Duration) -> String {
    let spin = SPINNER[i % SPINNER.len()];
    let secs = format!(" ({}s)", elapsed.as_secs());
    let room = WIDTH.saturating_sub(2 + secs.chars().count());
    let what: String = if what.chars().count() > room {
        let mut w: String = what.chars().take(room.saturating_sub(3)).collect();
        w.push_str("...");
        w
    } else {
        what.to_string()
    };
    format!("{spin} {what}{secs}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_turn_and_count_seconds() {
        assert_eq!(
            frame(0, "waiting for IPAM", Duration::from_millis(1500)),
            "| waiting for IPAM (1s)"
        );
        assert_eq!(frame(5, "x", Duration::from_secs(12)), "/ x (12s)");
        let long = frame(2, &"é".repeat(200), Duration::from_secs(3));
        assert_eq!(long.chars().count(), WIDTH, "{long}");
        assert!(long.ends_with("... (3s)"), "{long}");
    }

    #[test]
    fn a_guard_ends_cleanly_however_short_the_wait() {
        // Under `cargo test` stderr may or may not be a terminal: either
        // way the guard must return at once when dropped.
        let p = Progress::start("nothing");
        drop(p);
    }
}
