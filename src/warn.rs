//! Warnings that others can cause (misbehaving peers, connection floods, a
//! Docker daemon the proxy cannot reach) are rate-limited, so that a flood
//! cannot fill the log; each kind of event has its own limit, so that a
//! flood of one kind does not silence the others.

use std::sync::atomic::{AtomicU64, Ordering};

/// The kinds of events whose warnings are limited apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Inbound connections: refused for the limit, or ended.
    Inbound,
    /// Our dialers' attempts that failed.
    Dial,
    /// Handshakes refused (password, version, not a mesh peer).
    Handshake,
    /// Gossip refused from a neighbour.
    Gossip,
    /// Another peer with our name.
    Identity,
    /// The Docker daemon behind the proxy.
    Docker,
}

const KINDS: usize = 6;

/// Rate limiter for warnings that others can cause: at most `BURST` lines
/// per 10-second window for each [`Kind`].
pub struct WarnLimit;

static WINDOW: [AtomicU64; KINDS] = [const { AtomicU64::new(0) }; KINDS];
static COUNT: [AtomicU64; KINDS] = [const { AtomicU64::new(0) }; KINDS];

impl WarnLimit {
    const BURST: u64 = 10;

    /// Whether one more warning of this kind may be logged now.
    pub fn allow(kind: Kind) -> bool {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self::allow_at(kind, secs)
    }

    /// [`WarnLimit::allow`] at a given time (seconds since the epoch).
    fn allow_at(kind: Kind, secs: u64) -> bool {
        let k = kind as usize;
        let window = secs / 10;
        if WINDOW[k].swap(window, Ordering::Relaxed) != window {
            COUNT[k].store(0, Ordering::Relaxed);
        }
        COUNT[k].fetch_add(1, Ordering::Relaxed) < Self::BURST
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood of one kind is cut at the burst; another kind still speaks;
    /// the next window starts afresh.
    #[test]
    fn a_flood_of_one_kind_does_not_silence_another() {
        let t = 1_000_000_000;
        let allowed = (0..100)
            .filter(|_| WarnLimit::allow_at(Kind::Inbound, t))
            .count();
        assert_eq!(allowed as u64, WarnLimit::BURST);
        assert!(WarnLimit::allow_at(Kind::Handshake, t));
        assert!(!WarnLimit::allow_at(Kind::Inbound, t + 1));
        assert!(WarnLimit::allow_at(Kind::Inbound, t + 10));
    }
}
