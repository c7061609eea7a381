//! The simulator's model of the daemon's connection maker.
//!
//! It dials the seed peer it was started with and every peer
//! [`Gossip::dial_candidates`] offers, while established connections plus
//! dials in flight stay under the connection limit. A failed or refused dial
//! backs off with jitter (1 s, doubling to 30 s); an established connection
//! that drops is retried at once.

use crate::gossip::rng::Rng;
use crate::gossip::topology::NameHash;
use crate::gossip::Gossip;
use crate::name::PeerName;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// First backoff after a failed dial.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Connection-maker state of one simulated peer.
#[derive(Debug, Clone)]
pub struct Maker {
    seed: Option<u32>,
    dialing: HashSet<u32, NameHash>,
    backoff: HashMap<u32, (Duration, Duration), NameHash>,
}

impl Maker {
    /// A maker whose command-line target is `seed`.
    pub fn new(seed: Option<u32>) -> Self {
        Maker {
            seed,
            dialing: HashSet::default(),
            backoff: HashMap::default(),
        }
    }

    /// Whom to dial now, and when to look again (the earliest backoff expiry
    /// among peers we would dial).
    pub fn plan(
        &mut self,
        now: Duration,
        core: &Gossip,
        conns: &HashSet<u32, NameHash>,
        limit: usize,
        rng: &mut Rng,
        resolve: impl Fn(PeerName) -> Option<u32>,
    ) -> (Vec<u32>, Option<Duration>) {
        let busy = conns.len() + self.dialing.len();
        if busy >= limit {
            return (vec![], None);
        }
        let mut targets: Vec<u32> = self.seed.into_iter().collect();
        // Candidates are distinct peers: only the seed may come twice.
        let seed = self.seed;
        targets.extend(
            core.dial_candidate_names()
                .filter_map(&resolve)
                .filter(|&t| Some(t) != seed),
        );
        let mut retry: Option<Duration> = None;
        let mut eligible = Vec::new();
        for t in targets {
            if conns.contains(&t) || self.dialing.contains(&t) {
                continue;
            }
            match self.backoff.get(&t) {
                Some(&(until, _)) if until > now => {
                    retry = Some(retry.map_or(until, |r: Duration| r.min(until)));
                }
                _ => eligible.push(t),
            }
        }
        rng.shuffle(&mut eligible);
        eligible.truncate(limit - busy);
        for &t in &eligible {
            self.dialing.insert(t);
        }
        (eligible, retry)
    }

    /// Whether `peer` is the command-line target.
    pub fn is_target(&self, peer: u32) -> bool {
        self.seed == Some(peer)
    }

    /// A dial finished (either way).
    pub fn dial_done(&mut self, to: u32) {
        self.dialing.remove(&to);
    }

    /// A dial failed or was refused: back off.
    pub fn failed(&mut self, now: Duration, to: u32, rng: &mut Rng) {
        let cur = self
            .backoff
            .get(&to)
            .map_or(BACKOFF_MIN, |&(_, c)| (c * 2).min(BACKOFF_MAX));
        let wait = cur.mul_f64(0.5 + rng.unit());
        self.backoff.insert(to, (now + wait, cur));
    }

    /// A dial succeeded.
    pub fn connected(&mut self, to: u32) {
        self.backoff.remove(&to);
    }

    /// An established connection dropped: retry at once.
    pub fn dropped(&mut self, other: u32) {
        self.backoff.remove(&other);
    }
}
