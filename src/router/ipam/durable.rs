//! The allocator driver's durability: what waits for `ipam.bin` to be on
//! disk ([`Held`]), the saver's reports, and the recovery after a corrupt
//! file ([`Recovery`]). Kept apart from the driver's protocol work so that
//! each reads alone; see the parent module for the guarantees.
//!
//! Known gap: our *deltas* wait for the disk, but a whole-state exchange
//! (a new connection, an anti-entropy repair) encodes the ring as it is in
//! memory, so a change still being written can reach a neighbour. That is
//! conservative for addresses (answers still wait: a crash forgets only
//! what nobody was given, and peers then treat it as held by us until our
//! record moves on), but it is not yet "nothing leaves before the disk".

use super::{lock, AllocReply, Driver, CHANNEL};
use ipnet::Ipv4Net;
use mesh_proto::gossip::Gossip;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// What waits for the ring's state of a generation to be on disk.
pub(super) enum Held {
    /// Our delta, to gossip.
    Delta(Vec<u8>),
    /// An address to hand out.
    Answer {
        /// Where.
        reply: AllocReply,
        /// The container.
        id: String,
        /// The address.
        addr: Ipv4Net,
        /// When it was asked for.
        since: Instant,
    },
}

/// After a corrupt `ipam.bin`: re-learning our claims from the mesh.
pub(super) struct Recovery {
    /// Where the corrupt file went.
    pub(super) aside: PathBuf,
    /// Allocation waits at most until then with no peer to sync with.
    pub(super) until: Instant,
    /// The ring's generation when last looked at, and when it last moved
    /// while a neighbour was connected.
    pub(super) generation: u64,
    pub(super) news: Option<Instant>,
    /// The reconcile and prime asked for meanwhile, done on recovery.
    pub(super) reconcile: Option<Vec<(String, Vec<Ipv4Net>)>>,
    pub(super) prime: bool,
}

/// Recovery ends this long after the last news from a neighbour (its whole
/// state arrives in a burst of messages when the connection comes up).
const RECOVERY_QUIET: Duration = Duration::from_secs(2);

impl Driver {
    /// Hand the ring's state to the saver when it changed since the last
    /// submission (or `again`, to retry after a failure); returns the
    /// current generation.
    pub(super) fn persist(&mut self, again: bool) -> u64 {
        let (generation, bytes) = {
            let ring = lock(&self.ring);
            let g = ring.generation();
            if g == self.disk.submitted() && !again {
                return g;
            }
            (g, ring.persist())
        };
        self.disk.submit(generation, bytes);
        generation
    }

    /// Send what waited for the disk and is now on it; fail the answers a
    /// failed save carried (their addresses are released again, so that
    /// nothing unsaved is handed out).
    pub(super) fn release_held(&mut self, gossip: &mut Gossip, failed_upto: Option<u64>) {
        let (ready, failed) = self
            .disk
            .settled(failed_upto, |h| matches!(h, Held::Answer { .. }));
        for h in ready {
            self.fulfil(gossip, h);
        }
        for h in failed {
            if let Held::Answer {
                reply,
                id,
                addr,
                since,
            } = h
            {
                super::observe_latency(since);
                lock(&self.ring).release(&id, Some(addr.addr()));
                let e = self.disk.error().unwrap_or_default();
                let _ = reply.send(Err(format!(
                    "could not save the allocation to {}: {e}",
                    self.disk.path().display()
                )));
            }
        }
    }

    pub(super) fn fulfil(&self, gossip: &mut Gossip, h: Held) {
        match h {
            Held::Delta(d) => gossip.channel_broadcast(CHANNEL, d),
            Held::Answer {
                reply, addr, since, ..
            } => {
                super::observe_latency(since);
                let _ = reply.send(Ok(addr));
            }
        }
    }

    /// Do `h` now if the state of `generation` is on disk, else once it is.
    pub(super) fn promise(&mut self, gossip: &mut Gossip, generation: u64, h: Held) {
        if let Some(h) = self.disk.promise(generation, h) {
            self.fulfil(gossip, h);
        }
    }

    /// Why nothing is allocated during recovery.
    pub(super) fn recovering_why(&self) -> String {
        match &self.recovery {
            Some(r) => format!(
                "ipam.bin was corrupt (moved to {}): re-learning this peer's claims from the mesh; nothing is allocated until a peer has synced with us, or {}s without one",
                r.aside.display(),
                r.until.saturating_duration_since(Instant::now()).as_secs()
            ),
            None => String::new(),
        }
    }

    /// During recovery: end it once a neighbour's news has settled (or at
    /// the deadline with none), then do what was deferred.
    pub(super) fn recover(&mut self, now: Instant, gossip: &Gossip) {
        let Some(r) = &mut self.recovery else {
            return;
        };
        let generation = lock(&self.ring).generation();
        let connected = gossip.neighbours().next().is_some();
        if generation != r.generation {
            r.generation = generation;
            if connected {
                r.news = Some(now);
            }
        }
        let synced = connected && r.news.is_some_and(|t| now >= t + RECOVERY_QUIET);
        if !synced && now < r.until {
            return;
        }
        let Some(r) = self.recovery.take() else {
            return;
        };
        if synced {
            info!("address ring re-learned from the mesh after the corrupt ipam.bin: allocating again");
        } else {
            warn!(
                "no peer synced with us within --ipalloc-timeout after the corrupt ipam.bin: allocating from what is known (a peer that rejoins later restores our claims)"
            );
        }
        if let Some(live) = r.reconcile {
            self.reconcile(now, live);
        }
        if r.prime {
            lock(&self.ring).prime(now);
        }
    }
}
