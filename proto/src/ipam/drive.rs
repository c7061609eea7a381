//! What happens with time and on news: Paxos steps, reclaim, space requests
//! and donations, `rmpeer`, `leave`, `forget_peer`, and the status.

use super::paxos;
use super::state::{net_str, Acceptor, Grant, Instance, Ring, MAX_AT, MAX_GRANTS};
use super::{
    meeting_message, InitMode, Ipam, PeerSpace, RingState, Status, MEETING_TTL, NEED_TTL, RETRY,
};
use crate::gossip::digest::name_u64;
use crate::name::PeerName;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

fn names(peers: impl IntoIterator<Item = PeerName>) -> String {
    let v: Vec<String> = peers.into_iter().map(|p| p.to_string()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

impl Ipam {
    /// Drive Paxos, space requests and donations, reclaim and leases.
    /// `reachable`: the peers reachable now over the mesh, excluding us.
    pub fn tick(&mut self, now: Instant, reachable: &BTreeSet<PeerName>) {
        self.reachable = reachable.clone();
        self.reachable.remove(&self.me);
        for m in self.meetings.values_mut() {
            if std::mem::take(&mut m.fresh) {
                m.last_seen = Some(now);
            }
        }
        self.meetings.retain(|_, m| {
            m.last_seen
                .is_none_or(|t| now.saturating_duration_since(t) < MEETING_TTL)
        });
        let (seen, n) = self.owners_seen();
        if 2 * seen >= n {
            self.last_quorum = Some(now);
        }
        let owners = self.owners();
        self.unreachable_since
            .retain(|p, _| owners.contains(p) && !reachable.contains(p));
        for p in &owners {
            if *p != self.me && !reachable.contains(p) {
                self.unreachable_since.entry(*p).or_insert(now);
            }
        }
        self.grow_consensus();
        self.react();
        for inst in self.instances() {
            let fp = paxos::fingerprint(&self.crdt.records, &inst);
            match self.activity.get(&inst) {
                Some((f, _)) if *f == fp => {}
                _ => {
                    self.activity.insert(inst, (fp, now));
                }
            }
        }
        if self.crdt.ring.is_none() && self.consensus_n.is_some() {
            let (voters, q) = self.electorate(&Instance::Ring);
            if voters.len() >= q {
                self.proposing.insert(Instance::Ring);
            }
        }
        let since: Vec<(PeerName, Instant)> = self
            .unreachable_since
            .iter()
            .map(|(p, t)| (*p, *t))
            .collect();
        for (p, t) in since {
            let jitter = Duration::from_millis((name_u64(self.me) ^ name_u64(p)) % 1000);
            let inst = Instance::Reclaim(p);
            if now.saturating_duration_since(t) >= self.config.reclaim_after + jitter
                && !self.decided.contains_key(&inst)
            {
                self.proposing.insert(inst);
            }
        }
        for inst in self.proposing.clone() {
            if self.decided.contains_key(&inst) {
                self.proposing.remove(&inst);
            } else {
                self.maybe_prepare(now, inst);
            }
        }
        self.react();
        self.drive_requests(now);
        self.serve_requests(now);
    }

    /// Take over a dead peer's space (proposes us as heir; a majority of the
    /// owners must agree, each not seeing `peer`).
    pub fn rmpeer(&mut self, _now: Instant, peer: PeerName) -> Result<(), String> {
        if peer == self.me {
            return Err(
                "cannot rmpeer this peer itself: use mesh reset to hand our space on".into(),
            );
        }
        if self.crdt.ring.is_none() {
            return Err("there is no ring yet: nothing to take over".into());
        }
        if self.reachable.contains(&peer) {
            return Err(format!(
                "peer {peer} is reachable: rmpeer is only for peers that are gone"
            ));
        }
        let inst = Instance::Reclaim(peer);
        if self.decided.contains_key(&inst) {
            return Ok(());
        }
        if !self.owners().contains(&peer) {
            return Err(format!("peer {peer} owns no address space"));
        }
        self.proposing.insert(inst);
        self.prepare(inst);
        self.react();
        Ok(())
    }

    /// `mesh reset`: hand all our pieces to a reachable peer; returns who got
    /// them (`None` when we owned nothing).
    pub fn leave(
        &mut self,
        _now: Instant,
        reachable: &BTreeSet<PeerName>,
    ) -> Result<Option<PeerName>, String> {
        self.reachable = reachable.clone();
        self.reachable.remove(&self.me);
        self.react();
        let mine: Vec<(u32, u32, u64)> = self
            .crdt
            .pieces()
            .filter(|(_, _, t)| self.eff(t.owner) == self.me)
            .map(|(s, e, t)| (s, e, t.at))
            .collect();
        if mine.is_empty() {
            return Ok(None);
        }
        let owners = self.owners();
        let heir = self
            .reachable
            .iter()
            .filter(|p| owners.contains(p))
            .min_by_key(|p| self.owned_by(**p))
            .or_else(|| {
                self.reachable
                    .iter()
                    .find(|p| self.crdt.records.contains_key(p))
            })
            .or_else(|| self.reachable.iter().next())
            .copied();
        let Some(heir) = heir else {
            return Err(format!(
                "no reachable peer to hand our {} addresses to: connect to a peer first",
                self.owned_by(self.me)
            ));
        };
        let grants: Vec<Grant> = mine
            .into_iter()
            .filter_map(|(first, last, at)| {
                let at = at.checked_add(1).filter(|a| *a <= MAX_AT)?;
                Some(Grant {
                    first,
                    last,
                    to: heir,
                    at,
                })
            })
            .collect();
        let room = self
            .crdt
            .records
            .get(&self.me)
            .map_or(MAX_GRANTS, |r| MAX_GRANTS.saturating_sub(r.grants.len()));
        if grants.len() > room {
            return Err(format!(
                "our record has room for {room} more grants and {} are needed: hand the space on with `mesh rmpeer` from another peer once this one is stopped",
                grants.len()
            ));
        }
        self.write_record(|r| r.grants.extend(grants));
        Ok(Some(heir))
    }

    /// Drop the record of a peer that owns nothing and that the topology
    /// garbage-collected.
    /// A peer that gave space away, or an initial owner of the ring, is
    /// kept: its grants (and its vote for the ring) are what prove who owns
    /// what now.
    pub fn forget_peer(&mut self, peer: PeerName) {
        if peer == self.me || self.owners().contains(&peer) {
            return;
        }
        if self
            .crdt
            .ring
            .as_ref()
            .is_some_and(|r| r.owners.contains(&peer))
            || self
                .crdt
                .records
                .get(&peer)
                .is_some_and(|r| !r.grants.is_empty())
        {
            return;
        }
        if let Some(old) = self.crdt.records.remove(&peer) {
            self.crdt.sigs.remove(&peer);
            self.forgotten.insert(peer, old.version);
            self.refresh();
            self.generation += 1;
        }
        self.unreachable_since.remove(&peer);
    }

    /// Start consensus on the ring here (Consensus mode, no ring yet).
    pub(super) fn start_consensus(&mut self) {
        let InitMode::Consensus(n) = self.config.init else {
            return;
        };
        if self.crdt.ring.is_some() || self.consensus_n.is_some() || self.awaits_target() {
            return;
        }
        let others: Vec<u32> = self
            .crdt
            .records
            .iter()
            .filter(|(p, r)| **p != self.me && r.consensus > 0)
            .map(|(_, r)| r.consensus)
            .collect();
        let n = n
            .unwrap_or_else(|| self.told_size())
            .max(others.len() + 1)
            .max(others.iter().copied().max().unwrap_or(0) as usize)
            .max(1);
        self.consensus_n = Some(n);
        let announced = u32::try_from(n).unwrap_or(u32::MAX);
        self.write_record(|r| r.consensus = announced);
        let (voters, q) = self.electorate(&Instance::Ring);
        if voters.len() >= q {
            self.proposing.insert(Instance::Ring);
            if paxos::max_ballot(&self.crdt.records, &Instance::Ring).is_none() {
                self.prepare(Instance::Ring);
            }
        }
    }

    /// With the default consensus size, while the ring is not decided: grow
    /// our announced size with what we learn, so that a peer that started
    /// consensus knowing few peers does not let a minority of the mesh it
    /// has since learned decide a ring.
    fn grow_consensus(&mut self) {
        if self.crdt.ring.is_some() || self.config.init != InitMode::Consensus(None) {
            return;
        }
        let Some(n) = self.consensus_n else { return };
        let t = self.told_size();
        if t > n {
            self.consensus_n = Some(t);
            let announced = u32::try_from(t).unwrap_or(u32::MAX);
            self.write_record(|r| r.consensus = announced);
        }
    }

    /// With the default consensus size: we have targets and no connection
    /// reached any of them yet. Such a peer takes no part in creating the
    /// ring: the peer it was told about may have created one already (it
    /// arrives with the first connection), or be about to with others.
    pub(super) fn awaits_target(&self) -> bool {
        self.config.init == InitMode::Consensus(None)
            && self.told.targets > 0
            && self.told.unreached.len() >= self.told.targets
    }

    /// The default consensus size: us, and every peer we were told about
    /// (targets, peers learned by gossip, reachable now, or whose records we
    /// hold), so that a peer that was told about anyone never decides a
    /// ring alone.
    fn told_size(&self) -> usize {
        let named: BTreeSet<PeerName> = self
            .learned
            .iter()
            .chain(&self.reachable)
            .chain(self.crdt.records.keys())
            .filter(|p| **p != self.me)
            .copied()
            .collect();
        1 + named.len().max(self.told.targets)
    }

    /// Why the ring does not exist yet.
    pub(super) fn consensus_reason(&self) -> String {
        if self.awaits_target() {
            return format!(
                "the ring is not agreed yet: this peer was told about other peers and takes part in creating the ring only once it has reached one of them (targets not reached yet: {})",
                self.told.unreached.join(", ")
            );
        }
        let (voters, q) = self.electorate(&Instance::Ring);
        let n = self.consensus_n.unwrap_or(0);
        if voters.len() < q {
            let missing: Vec<PeerName> = self
                .reachable
                .iter()
                .filter(|p| !voters.contains(p))
                .copied()
                .collect();
            let unreached = if self.told.unreached.is_empty() {
                String::new()
            } else {
                format!(
                    "; targets not reached yet: {}",
                    self.told.unreached.join(", ")
                )
            };
            format!(
                "the ring is not agreed yet: waiting for {} of {n} peers to take part in consensus (taking part: {}; reachable, not yet taking part: {}{unreached})",
                q - voters.len(),
                names(voters),
                names(missing)
            )
        } else {
            format!(
                "the ring is not agreed yet: consensus among {} of {n} peers in progress ({})",
                voters.len(),
                names(voters)
            )
        }
    }

    /// The voters and the quorum of an instance.
    fn electorate(&self, inst: &Instance) -> (BTreeSet<PeerName>, usize) {
        match inst {
            Instance::Ring => {
                let voters: BTreeSet<PeerName> = self
                    .crdt
                    .records
                    .iter()
                    .filter(|(_, r)| r.consensus > 0)
                    .map(|(p, _)| *p)
                    .collect();
                // The largest consensus size anyone announced: all peers
                // converge on one quorum however they started.
                let seen = self
                    .crdt
                    .records
                    .values()
                    .map(|r| r.consensus as usize)
                    .max()
                    .unwrap_or(0);
                let q = self
                    .consensus_n
                    .map_or(usize::MAX, |n| paxos::quorum(n.max(seen)));
                (voters, q)
            }
            Instance::Reclaim(_) => {
                let owners = self.owners();
                let q = paxos::quorum(owners.len());
                (owners, q)
            }
        }
    }

    /// Whether we act as an acceptor in an instance now.
    fn may_accept(&self, inst: &Instance) -> bool {
        match inst {
            Instance::Ring => {
                matches!(self.config.init, InitMode::Consensus(_))
                    && self.consensus_n.is_some()
                    && self.crdt.ring.is_none()
                    && !self.awaits_target()
            }
            Instance::Reclaim(p) => {
                let owners = self.owners();
                *p != self.me
                    && owners.contains(&self.me)
                    && owners.contains(p)
                    && !self.reachable.contains(p)
            }
        }
    }

    /// The value we propose in an instance.
    fn own_value(&self, inst: &Instance) -> Vec<PeerName> {
        match inst {
            Instance::Ring => {
                let (voters, _) = self.electorate(inst);
                let n = self.consensus_n.unwrap_or(voters.len());
                voters.into_iter().take(n).collect()
            }
            Instance::Reclaim(_) => vec![self.me],
        }
    }

    /// Every instance anyone has state for.
    fn instances(&self) -> BTreeSet<Instance> {
        self.crdt
            .records
            .values()
            .flat_map(|r| r.paxos.keys().copied())
            .collect()
    }

    fn set_acceptor(&mut self, inst: Instance, a: Acceptor) {
        self.write_record(|r| {
            r.paxos.insert(inst, a);
        });
    }

    /// Raise a new ballot of ours.
    fn prepare(&mut self, inst: Instance) {
        let a = paxos::prepare(&self.crdt.records, self.me, &inst);
        self.set_acceptor(inst, a);
        self.activity.remove(&inst);
    }

    /// Prepare unless our ballot leads or someone else made progress recently.
    fn maybe_prepare(&mut self, now: Instant, inst: Instance) {
        let max = paxos::max_ballot(&self.crdt.records, &inst);
        if max.is_some_and(|b| b.proposer == self.me) {
            return;
        }
        let retry = RETRY + Duration::from_millis(name_u64(self.me) % 1000);
        let quiet = match self.activity.get(&inst) {
            None => true,
            Some((_, t)) => now.saturating_duration_since(*t) >= retry,
        };
        if max.is_none() || quiet {
            self.prepare(inst);
            self.activity
                .insert(inst, (paxos::fingerprint(&self.crdt.records, &inst), now));
        }
    }

    /// Recompute decisions (never undone).
    fn update_decided(&mut self) -> bool {
        let mut any = false;
        for _ in 0..4 {
            let mut new = false;
            for inst in self.instances() {
                if self.decided.contains_key(&inst) {
                    continue;
                }
                let (voters, q) = self.electorate(&inst);
                let voter = |p: PeerName| voters.contains(&p);
                if let Some(v) = paxos::decided(&self.crdt.records, &inst, &voter, q) {
                    self.decided.insert(inst, v);
                    new = true;
                }
            }
            any |= new;
            if !new {
                break;
            }
            self.refresh();
        }
        any
    }

    /// React to a change: Paxos steps, ring creation, taking over reclaimed
    /// pieces. Needs no clock.
    pub(super) fn react(&mut self) {
        for _ in 0..6 {
            let mut changed = self.update_decided();
            if self.crdt.ring.is_none() {
                if let Some(mut owners) = self.decided.get(&Instance::Ring).cloned() {
                    owners.sort();
                    owners.dedup();
                    if self.crdt.install_ring(Ring { owners }).is_ok() {
                        self.refresh();
                        self.dirty_ring = true;
                        self.generation += 1;
                        changed = true;
                    }
                }
            }
            if self.crdt.ring.is_none()
                && self.consensus_n.is_none()
                && matches!(self.config.init, InitMode::Consensus(_))
                && self.crdt.records.values().any(|r| r.consensus > 0)
            {
                self.start_consensus();
                changed = true;
            }
            for inst in self.instances() {
                if self.decided.contains_key(&inst) {
                    continue;
                }
                if self.may_accept(&inst) {
                    if let Some(a) = paxos::acceptor_step(&self.crdt.records, self.me, &inst) {
                        self.set_acceptor(inst, a);
                        changed = true;
                    }
                }
                if self.proposing.contains(&inst)
                    && !(inst == Instance::Ring && self.awaits_target())
                {
                    let (voters, q) = self.electorate(&inst);
                    let value = self.own_value(&inst);
                    let voter = |p: PeerName| voters.contains(&p);
                    if let Some(a) =
                        paxos::proposer_step(&self.crdt.records, self.me, &inst, &voter, q, &|| {
                            value.clone()
                        })
                    {
                        self.set_acceptor(inst, a);
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
    }

    /// As requester: drop served or stale requests, ask for what we need.
    fn drive_requests(&mut self, now: Instant) {
        let mine = self
            .crdt
            .records
            .get(&self.me)
            .map(|r| r.requests.clone())
            .unwrap_or_default();
        let keep: Vec<_> = mine
            .iter()
            .filter(|q| {
                let served = self
                    .crdt
                    .records
                    .get(&q.donor)
                    .and_then(|r| r.served.get(&self.me))
                    .is_some_and(|s| *s >= q.seq);
                !served && self.reachable.contains(&q.donor)
            })
            .cloned()
            .collect();
        if keep.len() != mine.len() {
            self.write_record(|r| r.requests = keep);
        }
        self.needs
            .retain(|_, t| now.saturating_duration_since(*t) < NEED_TTL);
        if self.crdt.ring.is_none() {
            return;
        }
        let needs: Vec<_> = self.needs.keys().copied().collect();
        for net in needs {
            let (lo, hi) = net.bounds();
            if self.first_free_mine(lo + 1, hi - 1).is_some() {
                self.needs.remove(&net);
                continue;
            }
            if self.my_request(net).is_none() {
                let (reach, _) = self.donors(net);
                if let Some(d) = self.choose_donor(&reach) {
                    self.request_space(net, d);
                }
            }
        }
    }

    /// As donor: serve the requests addressed to us.
    fn serve_requests(&mut self, now: Instant) {
        let mut todo = Vec::new();
        let served_by_me = self.crdt.records.get(&self.me).map(|r| r.served.clone());
        for (p, r) in &self.crdt.records {
            if *p == self.me {
                continue;
            }
            let done = served_by_me
                .as_ref()
                .and_then(|s| s.get(p).copied())
                .unwrap_or(0);
            for q in &r.requests {
                if q.donor == self.me && q.seq > done {
                    todo.push((*p, q.clone()));
                }
            }
        }
        if todo.is_empty() || self.check_lease(now).is_err() {
            return;
        }
        for (p, q) in todo {
            self.donate(p, q.subnet);
            self.write_record(|r| {
                let s = r.served.entry(p).or_default();
                *s = (*s).max(q.seq);
            });
        }
    }

    /// What `mesh status ipam` shows.
    pub fn status(&self, now: Instant, reachable: &BTreeSet<PeerName>) -> Status {
        let mut problems = Vec::new();
        let mut pending = Vec::new();
        let owners = self.owners();
        let seen = owners
            .iter()
            .filter(|o| **o == self.me || reachable.contains(o))
            .count();
        let state = match (&self.crdt.ring, &self.config.init) {
            (Some(_), _) if 2 * seen < owners.len() => RingState::ReadyFewOwners {
                seen,
                owners: owners.len(),
                lease_secs: (self.config.reclaim_after / 2).as_secs(),
            },
            (Some(_), _) => RingState::Ready,
            (None, InitMode::Observer) => RingState::Observer,
            (None, InitMode::Seed(_)) => RingState::EmptySeed,
            (None, InitMode::Consensus(_))
                if self.consensus_n.is_none() && !self.awaits_target() =>
            {
                RingState::NotStarted
            }
            (None, InitMode::Consensus(_)) => RingState::Awaiting(self.consensus_reason()),
        };
        let mut peers: BTreeSet<PeerName> = owners.clone();
        peers.extend(self.crdt.records.keys().copied());
        peers.insert(self.me);
        let (lo, hi) = self.range.bounds();
        let space = peers
            .iter()
            .map(|p| PeerSpace {
                peer: p.to_string(),
                owned: self.owned_by(*p),
                free: self.free_of(*p, lo, hi),
                reachable: *p == self.me || reachable.contains(p),
            })
            .collect();
        if let Some(r) = self.crdt.records.get(&self.me) {
            for q in &r.requests {
                pending.push(format!(
                    "asked peer {} for space in {}",
                    q.donor,
                    net_str(q.subnet)
                ));
            }
        }
        for net in self.needs.keys() {
            if self.my_request(*net).is_none() {
                pending.push(format!(
                    "needs space in {}: no reachable peer has any",
                    net_str(*net)
                ));
            }
        }
        for inst in &self.proposing {
            if let Instance::Reclaim(p) = inst {
                pending.push(format!(
                    "taking over the space of peer {p}: waiting for a majority of the {} owners to agree",
                    owners.len()
                ));
            }
        }
        for (p, t) in &self.unreachable_since {
            pending.push(format!(
                "owner {p} unreachable for {}s; its space is reclaimed after {}s",
                now.saturating_duration_since(*t).as_secs(),
                self.config.reclaim_after.as_secs()
            ));
        }
        if let Some(ours) = &self.crdt.ring {
            for m in self.meetings.values() {
                let theirs = Ring {
                    owners: m.owners.clone(),
                };
                problems.push(meeting_message(ours, &theirs, self.range));
            }
        }
        if let Some(h) = self.decided.get(&Instance::Reclaim(self.me)) {
            if h.first() != Some(&self.me) {
                problems.push(format!(
                    "our space was taken over by peer {} while we were away (reclaim agreed by a majority)",
                    names(h.iter().copied())
                ));
            }
        }
        for (a, id) in &self.claims {
            match self.owner_of(*a) {
                Some(o) if o == self.me => {}
                o => problems.push(format!(
                    "{} of {id} lies in space now owned by {}: release it and allocate again",
                    Ipv4Addr::from(*a),
                    o.map_or("nobody".into(), |o| o.to_string())
                )),
            }
            if let Some(p) = self.held_by_other(*a) {
                problems.push(format!(
                    "{} of {id} is also held by peer {p}",
                    Ipv4Addr::from(*a)
                ));
            }
        }
        Status {
            range: self.config.range.to_string(),
            default_subnet: self.config.default_subnet.to_string(),
            state,
            peers: space,
            pending,
            problems,
        }
    }
}
