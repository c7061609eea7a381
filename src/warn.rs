//! Warnings that others can cause (misbehaving peers, a Docker daemon the
//! proxy cannot reach) are rate-limited, so that a flood cannot fill the log.

use std::sync::atomic::{AtomicU64, Ordering};

/// Rate limiter for warnings that others can cause (misbehaving peers, a
/// Docker daemon the proxy cannot reach): at most `BURST` lines per
/// 10-second window, shared by the whole daemon.
pub struct WarnLimit;
static WARN_WINDOW: AtomicU64 = AtomicU64::new(0);
static WARN_COUNT: AtomicU64 = AtomicU64::new(0);
impl WarnLimit {
    const BURST: u64 = 10;
    /// Whether one more warning may be logged now.
    pub fn allow() -> bool {
        let window = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() / 10)
            .unwrap_or(0);
        if WARN_WINDOW.swap(window, Ordering::Relaxed) != window {
            WARN_COUNT.store(0, Ordering::Relaxed);
        }
        WARN_COUNT.fetch_add(1, Ordering::Relaxed) < Self::BURST
    }
}
