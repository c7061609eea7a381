//! Adaptive heartbeats: fast while a path is being established or has gone
//! quiet, slow while it is healthy (sans-IO: time comes in).
//!
//! Every path a daemon keeps to a neighbour (the control connection over
//! TCP, the sleeve and the fast path over UDP) proves itself alive the same
//! way: each end must hear *something* from the other within a deadline.
//! A heartbeat is only the filler for silence, so [`Beat`] is told of every
//! message heard and sent on its path ([`Beat::heard`], [`Beat::sent`]):
//! traffic proves liveness, and a beat goes out only when nothing else did
//! for the current interval.
//!
//! - **Fast** ([`Pace::fast`]) until the first message from the peer, and
//!   again whenever the peer has been silent for longer than a slow interval
//!   and a little more (a lost datagram, a path that broke): the peer
//!   answers each of them ([`Beat::should_answer`]), so one lost beat costs
//!   a round trip, not a slow interval, and a dead path is declared dead
//!   ([`Beat::dead`], after [`Pace::dead_after`] of silence) on time.
//! - **Slow** ([`Pace::slow`]) while healthy. Of the two ends one leads:
//!   the follower's interval is longer by one fast interval, and an end that
//!   hears a beat after sending nothing for half a fast interval answers it
//!   at once, which resets its own timer. So in steady state one end pings,
//!   the other answers, once per slow interval: two messages per interval
//!   for the pair, not two each — and over TCP the answer carries the
//!   acknowledgement of the ping.
//!
//! The dead-peer detection time is [`Pace::dead_after`]; it must exceed the
//! slow interval plus some fast ones ([`Pace::check`]).

use std::time::{Duration, Instant};

/// The intervals of one kind of path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Interval while establishing or after the peer went quiet.
    pub fast: Duration,
    /// Interval while healthy (the leader's; the follower adds one `fast`).
    pub slow: Duration,
    /// Silence after which the path is dead.
    pub dead_after: Duration,
}

impl Pace {
    /// Whether a path that goes quiet still gets at least three fast beats
    /// (each answered by a live peer) before it is declared dead.
    pub const fn check(&self) -> bool {
        let quiet = self.slow.as_millis() + 2 * self.fast.as_millis();
        self.dead_after.as_millis() >= quiet + 3 * self.fast.as_millis()
    }
}

/// The heartbeat state of one path to one peer.
#[derive(Debug, Clone, Copy)]
pub struct Beat {
    pace: Pace,
    /// Added to the slow interval: zero for the leader, `fast` otherwise.
    lag: Duration,
    last_sent: Option<Instant>,
    last_heard: Option<Instant>,
}

impl Beat {
    /// A path that has sent and heard nothing yet. `leader` must be true at
    /// exactly one end (e.g. the lower peer name, or the dialer).
    pub fn new(pace: Pace, leader: bool) -> Beat {
        Beat {
            pace,
            lag: if leader { Duration::ZERO } else { pace.fast },
            last_sent: None,
            last_heard: None,
        }
    }

    /// The same, with what is already known of the path (for callers that
    /// keep the times themselves, e.g. in atomics on a hot path).
    pub fn with_times(
        pace: Pace,
        leader: bool,
        last_sent: Option<Instant>,
        last_heard: Option<Instant>,
    ) -> Beat {
        Beat {
            last_sent,
            last_heard,
            ..Beat::new(pace, leader)
        }
    }

    /// Something arrived from the peer on this path.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = Some(self.last_heard.map_or(now, |t| t.max(now)));
    }

    /// Something was sent to the peer on this path.
    pub fn sent(&mut self, now: Instant) {
        self.last_sent = Some(self.last_sent.map_or(now, |t| t.max(now)));
    }

    /// When the peer was last heard.
    pub fn last_heard(&self) -> Option<Instant> {
        self.last_heard
    }

    /// How long a healthy path may stay silent before beats go fast.
    fn quiet_after(&self) -> Duration {
        self.pace.slow + self.lag + self.pace.fast
    }

    /// Whether the path is healthy: the peer was heard within a slow
    /// interval (and a fast one for slack).
    pub fn healthy(&self, now: Instant) -> bool {
        self.last_heard
            .is_some_and(|t| now.saturating_duration_since(t) < self.quiet_after())
    }

    /// The interval beats go at now.
    pub fn interval(&self, now: Instant) -> Duration {
        if self.healthy(now) {
            self.pace.slow + self.lag
        } else {
            self.pace.fast
        }
    }

    /// When the next beat is due if nothing is heard or sent before;
    /// `None` before the first beat (send one now).
    pub fn next_due(&self) -> Option<Instant> {
        let sent = self.last_sent?;
        let fast_due = sent + self.pace.fast;
        let Some(heard) = self.last_heard else {
            return Some(fast_due);
        };
        // Slow while healthy; fast from the moment it went quiet.
        let slow_due = sent + self.pace.slow + self.lag;
        let quiet_at = heard + self.quiet_after();
        Some(slow_due.min(fast_due.max(quiet_at)))
    }

    /// Whether a beat is due now.
    pub fn due(&self, now: Instant) -> bool {
        self.next_due().is_none_or(|t| t <= now)
    }

    /// Whether a beat just heard from the peer should be answered at once:
    /// we have sent nothing for half a fast interval.
    pub fn should_answer(&self, now: Instant) -> bool {
        self.last_sent
            .is_none_or(|t| now.saturating_duration_since(t) >= self.pace.fast / 2)
    }

    /// Whether the path is dead: heard once, then silent for `dead_after`.
    /// (A path never heard is the setup's business: its own timeout.)
    pub fn dead(&self, now: Instant) -> bool {
        self.last_heard
            .is_some_and(|t| now.saturating_duration_since(t) >= self.pace.dead_after)
    }

    /// When [`Beat::dead`] turns true if nothing is heard before.
    pub fn dead_at(&self) -> Option<Instant> {
        self.last_heard.map(|t| t + self.pace.dead_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PACE: Pace = Pace {
        fast: Duration::from_secs(1),
        slow: Duration::from_secs(10),
        dead_after: Duration::from_secs(15),
    };

    /// Two ends of one path with a one-way latency, stepped every 10 ms.
    /// Returns the beats each end sent in `secs` seconds; `lose(t)` drops a
    /// beat sent at time t (ms since start), `cut_at` stops all delivery.
    struct Pair {
        t0: Instant,
        ends: [Beat; 2],
        inflight: Vec<(u64, usize)>,
        sent: [u32; 2],
        died: [Option<u64>; 2],
    }

    impl Pair {
        fn new(pace: Pace) -> Pair {
            Pair {
                t0: Instant::now(),
                ends: [Beat::new(pace, true), Beat::new(pace, false)],
                inflight: Vec::new(),
                sent: [0; 2],
                died: [None; 2],
            }
        }

        fn run(&mut self, from_ms: u64, to_ms: u64, latency: u64, lose: impl Fn(u64) -> bool) {
            let mut ms = from_ms;
            while ms < to_ms {
                let now = self.t0 + Duration::from_millis(ms);
                // Deliveries.
                let (arrived, rest): (Vec<_>, Vec<_>) =
                    self.inflight.iter().partition(|(at, _)| *at <= ms);
                self.inflight = rest;
                for (_, to) in arrived {
                    self.ends[to].heard(now);
                    if self.ends[to].should_answer(now) {
                        self.send(to, ms, latency, &lose);
                    }
                }
                for i in 0..2 {
                    if self.ends[i].due(now) {
                        self.send(i, ms, latency, &lose);
                    }
                    if self.died[i].is_none() && self.ends[i].dead(now) {
                        self.died[i] = Some(ms);
                    }
                }
                ms += 10;
            }
        }

        fn send(&mut self, i: usize, ms: u64, latency: u64, lose: &impl Fn(u64) -> bool) {
            let now = self.t0 + Duration::from_millis(ms);
            self.ends[i].sent(now);
            self.sent[i] += 1;
            if !lose(ms) {
                self.inflight.push((ms + latency, 1 - i));
            }
        }
    }

    #[test]
    fn pace_defaults_check() {
        assert!(PACE.check());
        let bad = Pace {
            dead_after: Duration::from_secs(11),
            ..PACE
        };
        assert!(!bad.check());
    }

    #[test]
    fn healthy_pair_pings_and_answers_once_per_slow_interval() {
        let mut p = Pair::new(PACE);
        p.run(0, 20_000, 5, |_| false);
        let warm = p.sent;
        p.run(20_000, 120_000, 5, |_| false);
        let steady = [p.sent[0] - warm[0], p.sent[1] - warm[1]];
        // 100 s at one ping per 10 s from the leader, each answered.
        assert!((9..=11).contains(&steady[0]), "{steady:?}");
        assert!((9..=11).contains(&steady[1]), "{steady:?}");
        assert_eq!(p.died, [None, None]);
    }

    #[test]
    fn a_lost_beat_costs_a_fast_interval_not_death() {
        let mut p = Pair::new(PACE);
        p.run(0, 30_000, 5, |_| false);
        // Everything sent in [30 s, 33 s) is lost: a burst of loss.
        p.run(30_000, 120_000, 5, |t| (30_000..33_000).contains(&t));
        assert_eq!(p.died, [None, None]);
    }

    #[test]
    fn a_cut_path_dies_within_dead_after() {
        let mut p = Pair::new(PACE);
        p.run(0, 30_000, 5, |_| false);
        let cut = 30_000;
        p.run(cut, 60_000, 5, |t| t >= cut);
        for d in p.died {
            let d = d.expect("declared dead");
            assert!(d <= cut + PACE.dead_after.as_millis() as u64, "{d}");
        }
    }

    #[test]
    fn traffic_proves_liveness() {
        let now = Instant::now();
        let mut b = Beat::new(PACE, true);
        assert!(b.due(now), "the first beat goes at once");
        b.sent(now);
        b.heard(now);
        for s in 1..=60 {
            // Data both ways every second: no beat is ever due.
            let t = now + Duration::from_secs(s);
            assert!(!b.due(t), "at {s}s");
            b.sent(t);
            b.heard(t);
        }
    }

    #[test]
    fn unanswered_beats_go_fast() {
        let now = Instant::now();
        let mut b = Beat::new(PACE, true);
        b.sent(now);
        assert_eq!(b.interval(now), PACE.fast, "never heard: fast");
        b.heard(now);
        assert_eq!(b.interval(now), PACE.slow);
        let quiet = now + PACE.slow + 2 * PACE.fast;
        assert_eq!(b.interval(quiet), PACE.fast, "quiet: fast again");
        assert!(!b.dead(quiet));
        assert!(b.dead(now + PACE.dead_after));
    }

    proptest! {
        /// Whatever the latency and the loss pattern, a path is never
        /// declared dead while at least every second beat gets through.
        #[test]
        fn alternate_loss_never_kills(latency in 0u64..200, phase in 0u64..2) {
            let mut p = Pair::new(PACE);
            let counter = std::cell::Cell::new(0u64);
            p.run(0, 90_000, latency, |_| {
                counter.set(counter.get() + 1);
                (counter.get() + phase).is_multiple_of(2)
            });
            prop_assert_eq!(p.died, [None, None]);
        }
    }
}
