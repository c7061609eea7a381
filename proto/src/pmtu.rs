//! Path MTU probing for the sleeve (sans-IO).
//!
//! The kernel's path MTU towards a peer (the route's MTU, lowered when an
//! ICMP "fragmentation needed" arrives) is an upper bound, and usually the
//! answer. But a path that drops large datagrams without telling anyone (a
//! firewall eating ICMP, a tunnel with a smaller MTU) would swallow every
//! full-size segment, and TCP inside would stall. So each peer's sleeve
//! sends, once a heartbeat, a probe datagram of a candidate size with the
//! don't-fragment bit; the peer answers each probe it receives with its
//! size. A size acknowledged is known good (`lo`); a size sent
//! [`TRIES`] times without an answer is known bad (`hi`). The search starts
//! at the kernel's value and halves the gap from there, so on a sound path
//! one answer settles it, and on a black hole it converges in a few
//! seconds per halving. The MTU used is the kernel's while nothing has
//! failed, else the largest size known good (at least [`MIN_MTU`]).
//! Every [`REPROBE`] the bad bound is forgotten, so a path that got better
//! is found again.

use std::time::{Duration, Instant};

/// The smallest MTU used, whatever the probes say (IPv4's minimum
/// reassembly size: every path must carry it).
pub const MIN_MTU: usize = 576;
/// Probes of one size sent before the size is declared too large.
pub const TRIES: u32 = 3;
/// The search stops when the good and bad bounds are this close.
pub const GRANULARITY: usize = 16;
/// How often a settled search starts again from the kernel's value.
pub const REPROBE: Duration = Duration::from_secs(600);

/// The probing state for one peer.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The kernel's path MTU, as last told.
    kernel: usize,
    /// Largest size acknowledged.
    lo: usize,
    /// Smallest size that failed, if any (always > `lo`).
    hi: Option<usize>,
    /// The size being probed and how many times it was sent.
    trying: Option<(usize, u32)>,
    started: Instant,
}

impl Probe {
    /// A search towards a peer whose kernel path MTU is `kernel`.
    pub fn new(now: Instant, kernel: usize) -> Probe {
        Probe {
            kernel: kernel.max(MIN_MTU),
            lo: 0,
            hi: None,
            trying: None,
            started: now,
        }
    }

    /// The MTU to cut segments for: the kernel's until a probe has failed,
    /// then the largest size known good.
    pub fn mtu(&self) -> usize {
        match (self.lo, self.hi) {
            (0, None) => self.kernel,
            (0, Some(_)) => MIN_MTU,
            (lo, _) => lo.clamp(MIN_MTU, self.kernel),
        }
    }

    /// Whether the search has settled (nothing to probe until
    /// [`REPROBE`]).
    pub fn settled(&self) -> bool {
        self.next_size().is_none()
    }

    /// The kernel's value changed (route change, ICMP): search again below
    /// it, keeping what is known good that still fits.
    pub fn set_kernel(&mut self, now: Instant, kernel: usize) {
        let kernel = kernel.max(MIN_MTU);
        if kernel != self.kernel {
            self.kernel = kernel;
            self.lo = self.lo.min(kernel);
            self.hi = None;
            self.trying = None;
            self.started = now;
        }
    }

    fn next_size(&self) -> Option<usize> {
        if self.lo >= self.kernel {
            return None;
        }
        let Some(hi) = self.hi else {
            return Some(self.kernel);
        };
        let top = hi.min(self.kernel + 1);
        let base = self.lo.max(MIN_MTU);
        if top <= base + GRANULARITY {
            return None;
        }
        Some(base + (top - base) / 2)
    }

    /// Called once a heartbeat: the size of probe to send now, if any.
    pub fn tick(&mut self, now: Instant) -> Option<usize> {
        if now.saturating_duration_since(self.started) >= REPROBE {
            // Forget the bad bound (the path may have got better); what is
            // known good stays in use meanwhile.
            self.hi = None;
            self.trying = None;
            self.started = now;
        }
        if let Some((size, sent)) = self.trying {
            if sent >= TRIES {
                // Too large: nothing came back.
                self.hi = Some(self.hi.map_or(size, |h| h.min(size)));
                self.trying = None;
            }
        }
        let size = match self.trying {
            Some((size, _)) => size,
            None => self.next_size()?,
        };
        let sent = self.trying.map_or(0, |(_, n)| n) + 1;
        self.trying = Some((size, sent));
        Some(size)
    }

    /// The peer received a probe of `size` bytes.
    pub fn ack(&mut self, size: usize) {
        if size > self.kernel || size < MIN_MTU {
            return;
        }
        if size > self.lo {
            self.lo = size;
        }
        if self.hi.is_some_and(|h| h <= self.lo) {
            self.hi = None;
        }
        if self.trying.is_some_and(|(s, _)| s <= size) {
            self.trying = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Drive a probe against a path that carries datagrams up to `path`
    /// bytes; returns the MTU after `beats` heartbeats.
    fn run(kernel: usize, path: usize, beats: usize) -> Probe {
        let t = Instant::now();
        let mut p = Probe::new(t, kernel);
        for i in 0..beats {
            if let Some(size) = p.tick(t + Duration::from_secs(i as u64)) {
                if size <= path {
                    p.ack(size);
                }
            }
        }
        p
    }

    #[test]
    fn sound_path_settles_at_once_on_the_kernel_value() {
        let p = run(1500, 1500, 2);
        assert_eq!(p.mtu(), 1500);
        assert!(p.settled());
    }

    #[test]
    fn black_hole_is_found() {
        let p = run(1500, 1300, 60);
        assert!(p.settled());
        let m = p.mtu();
        assert!((1300 - GRANULARITY..=1300).contains(&m), "mtu {m}");
        // Before it settles it is already safe: after the first failure the
        // MTU in use never exceeds what the path carries.
        let t = Instant::now();
        let mut p = Probe::new(t, 1500);
        for i in 0..60 {
            if let Some(size) = p.tick(t + Duration::from_secs(i)) {
                if size <= 1300 {
                    p.ack(size);
                }
            }
            if i > TRIES as u64 {
                assert!(p.mtu() <= 1300, "beat {i}: {}", p.mtu());
            }
        }
    }

    #[test]
    fn kernel_change_and_reprobe() {
        let t = Instant::now();
        let mut p = run(1500, 1500, 2);
        p.set_kernel(t, 1400);
        assert_eq!(p.mtu(), 1400);
        let mut p = run(1500, 1000, 60);
        assert!(p.mtu() <= 1000);
        // Much later the path got better: found again.
        let later = Instant::now() + REPROBE + Duration::from_secs(1);
        let size = p.tick(later).unwrap();
        assert_eq!(size, 1500);
        p.ack(size);
        assert_eq!(p.mtu(), 1500);
    }

    proptest! {
        /// Whatever the path, the search settles within 60 heartbeats at an
        /// MTU the path carries (or the minimum), within the granularity of
        /// the best.
        #[test]
        fn converges(kernel in 576usize..9000, path in 500usize..9500) {
            let p = run(kernel, path, 80);
            prop_assert!(p.settled());
            let best = path.min(kernel);
            let m = p.mtu();
            if best >= MIN_MTU {
                prop_assert!(m <= best && m + GRANULARITY >= best, "kernel {} path {} mtu {}", kernel, path, m);
            } else {
                prop_assert_eq!(m, MIN_MTU);
            }
        }
    }
}
