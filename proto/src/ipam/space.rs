//! Allocation from our own pieces, and questions about who owns what.

use super::state::{net_str, Grant, Instance, Net, Request, Token, MAX_AT, MAX_GRANTS};
use super::{AllocError, InitMode, Ipam};
use crate::name::PeerName;
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Instant;

impl Ipam {
    /// Allocate an address for `id` in `subnet` (idempotent per id and subnet).
    pub fn allocate(
        &mut self,
        now: Instant,
        id: &str,
        subnet: Ipv4Net,
    ) -> Result<Ipv4Addr, AllocError> {
        let net = self.check_subnet(subnet)?;
        let (lo, hi) = net.bounds();
        if let Some(a) = self
            .by_id
            .get(id)
            .and_then(|s| s.range(lo + 1..=hi - 1).next())
        {
            return Ok(Ipv4Addr::from(*a));
        }
        self.ensure_ring()?;
        self.check_lease(now)?;
        if let Some(a) = self.first_free_mine(lo + 1, hi - 1) {
            self.add_claim(id, a);
            self.needs.remove(&net);
            return Ok(Ipv4Addr::from(a));
        }
        self.needs.insert(net, now);
        Err(self.ask_for_space(net))
    }

    /// Claim a given address for `id`.
    pub fn claim(
        &mut self,
        now: Instant,
        id: &str,
        addr: Ipv4Addr,
        subnet: Ipv4Net,
    ) -> Result<(), AllocError> {
        let a = u32::from(addr);
        let (rlo, rhi) = self.range.bounds();
        if a < rlo || a > rhi {
            return Err(AllocError::Refused(format!(
                "{addr} is outside the range {} (--ipalloc-range): IPAM does not manage it",
                self.config.range
            )));
        }
        let net = self.check_subnet(subnet)?;
        let (lo, hi) = net.bounds();
        if a == lo || a == hi {
            return Err(AllocError::Refused(format!(
                "{addr} is the first or last address of {}, which are reserved",
                subnet.trunc()
            )));
        }
        if a < lo || a > hi {
            return Err(AllocError::Refused(format!(
                "{addr} is not inside the subnet {}",
                subnet.trunc()
            )));
        }
        if let Some(holder) = self.claims.get(&a) {
            return if holder == id {
                Ok(())
            } else {
                Err(AllocError::Refused(format!(
                    "{addr} is already taken by {holder}"
                )))
            };
        }
        self.ensure_ring()?;
        let owner = self.owner_of(a);
        if owner != Some(self.me) {
            let owner = owner.map_or("nobody".to_string(), |o| o.to_string());
            return Err(AllocError::Refused(format!(
                "{addr} lies in the space of peer {owner}: claim it on that peer, or let IPAM allocate"
            )));
        }
        if let Some(p) = self.held_by_other(a) {
            return Err(AllocError::Refused(format!(
                "{addr} is held by peer {p} (our space was taken over from it)"
            )));
        }
        self.check_lease(now)?;
        self.add_claim(id, a);
        Ok(())
    }

    /// Hand `addr` from `from` to `to` in one step, so that no other
    /// allocation can take it in between (the Docker plugin's addresses
    /// pass to the container that joins with them); `false` when `from`
    /// does not hold it.
    pub fn hand_over(&mut self, from: &str, to: &str, addr: Ipv4Addr) -> bool {
        let a = u32::from(addr);
        if self.claims.get(&a).is_none_or(|h| h != from) {
            return false;
        }
        self.release(from, Some(addr));
        self.add_claim(to, a);
        true
    }

    /// Release `addr` of `id`, or all of `id`'s addresses; returns what was freed.
    pub fn release(&mut self, id: &str, addr: Option<Ipv4Addr>) -> Vec<Ipv4Addr> {
        let freed: Vec<u32> = match addr {
            Some(addr) => {
                let a = u32::from(addr);
                if self.claims.get(&a).is_some_and(|h| h == id) {
                    vec![a]
                } else {
                    vec![]
                }
            }
            None => self
                .by_id
                .get(id)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
        };
        if freed.is_empty() {
            return vec![];
        }
        for a in &freed {
            self.claims.remove(a);
        }
        if let Some(s) = self.by_id.get_mut(id) {
            for a in &freed {
                s.remove(a);
            }
            if s.is_empty() {
                self.by_id.remove(id);
            }
        }
        self.publish_held();
        freed.into_iter().map(Ipv4Addr::from).collect()
    }

    /// Our own claims.
    pub fn claims(&self) -> Vec<(String, Ipv4Addr)> {
        self.claims
            .iter()
            .map(|(a, id)| (id.clone(), Ipv4Addr::from(*a)))
            .collect()
    }

    fn add_claim(&mut self, id: &str, a: u32) {
        self.claims.insert(a, id.to_string());
        self.by_id.entry(id.to_string()).or_default().insert(a);
        self.publish_held();
    }

    /// Write our held runs into our record.
    fn publish_held(&mut self) {
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for &a in self.claims.keys() {
            match runs.last_mut() {
                Some((s, n)) if *s as u64 + *n as u64 == a as u64 => *n += 1,
                _ => runs.push((a, 1)),
            }
        }
        self.write_record(|r| r.held = runs);
    }

    /// A subnet of our range, big enough.
    fn check_subnet(&self, subnet: Ipv4Net) -> Result<Net, AllocError> {
        let subnet = subnet.trunc();
        if !self.config.range.contains(&subnet) {
            return Err(AllocError::Refused(format!(
                "subnet {subnet} is outside the range {} (the mesh's --ipalloc-range): give a subnet inside it",
                self.config.range
            )));
        }
        if subnet.prefix_len() > 30 {
            return Err(AllocError::Refused(format!(
                "subnet {subnet} is too small: a subnet needs at least 4 addresses (a /30)"
            )));
        }
        Ok(Net::from_ipnet(subnet))
    }

    /// Ok when the ring exists; otherwise start consensus and say what we wait for.
    pub(super) fn ensure_ring(&mut self) -> Result<(), AllocError> {
        if self.crdt.ring.is_some() {
            return Ok(());
        }
        match &self.config.init {
            InitMode::Observer => Err(AllocError::Wait(
                "this peer is an observer and has not learned the ring yet: waiting for a peer that owns space"
                    .into(),
            )),
            InitMode::Seed(_) => Err(AllocError::Refused(
                "the seed list is empty: no ring can be created".into(),
            )),
            InitMode::Consensus(_) => {
                self.start_consensus();
                self.react();
                if self.crdt.ring.is_some() {
                    Ok(())
                } else {
                    Err(AllocError::Wait(self.consensus_reason()))
                }
            }
        }
    }

    /// Ok when we may use our space now (see the safety argument).
    pub(super) fn check_lease(&mut self, now: Instant) -> Result<(), AllocError> {
        let (seen, owners) = self.owners_seen();
        if 2 * seen >= owners {
            self.last_quorum = Some(now);
            return Ok(());
        }
        let lease = self.config.reclaim_after / 2;
        if self
            .last_quorum
            .is_some_and(|t| now.saturating_duration_since(t) <= lease)
        {
            return Ok(());
        }
        Err(AllocError::Wait(format!(
            "this peer sees only {seen} of the {owners} owners of the ring; it allocates again once it sees at least half, so that two sides of a partition never hand out the same addresses"
        )))
    }

    /// (owners reachable or us, owners).
    pub(super) fn owners_seen(&self) -> (usize, usize) {
        let owners = self.owners();
        let seen = owners
            .iter()
            .filter(|o| **o == self.me || self.reachable.contains(o))
            .count();
        (seen, owners.len())
    }

    /// The effective owner: follows decided reclaims.
    pub(super) fn eff(&self, mut p: PeerName) -> PeerName {
        for _ in 0..16 {
            match self.decided.get(&Instance::Reclaim(p)) {
                Some(v) if v.first().is_some_and(|h| *h != p) => p = v[0],
                _ => break,
            }
        }
        p
    }

    /// The distinct effective owners of the ring.
    pub(super) fn owners(&self) -> BTreeSet<PeerName> {
        let raw: BTreeSet<PeerName> = self.crdt.tokens.values().map(|t| t.owner).collect();
        raw.into_iter().map(|p| self.eff(p)).collect()
    }

    /// The effective owner of an address.
    pub fn owner_of(&self, a: u32) -> Option<PeerName> {
        self.crdt
            .tokens
            .range(..=a)
            .next_back()
            .map(|(_, t)| self.eff(t.owner))
    }

    /// Our pieces clipped to `[lo, hi]`: (token start, first, last, token).
    fn my_pieces(&self, lo: u32, hi: u32) -> Vec<(u32, u32, u32, Token)> {
        self.crdt
            .pieces_in(lo, hi)
            .into_iter()
            .filter(|(_, _, _, t)| self.eff(t.owner) == self.me)
            .collect()
    }

    /// The first address of `[s, e]` neither claimed by us nor held by others.
    fn first_free_in(&self, s: u32, e: u32) -> Option<u32> {
        let mut a = s as u64;
        while a <= e as u64 {
            let x = a as u32;
            if self.claims.contains_key(&x) {
                a += 1;
                continue;
            }
            if let Some((_, (last, _))) = self
                .foreign_held
                .range(..=x)
                .next_back()
                .filter(|(_, (l, _))| *l >= x)
            {
                a = *last as u64 + 1;
                continue;
            }
            return Some(x);
        }
        None
    }

    /// The lowest free address of our space in `[lo, hi]`.
    pub(super) fn first_free_mine(&self, lo: u32, hi: u32) -> Option<u32> {
        if lo > hi {
            return None;
        }
        self.my_pieces(lo, hi)
            .into_iter()
            .find_map(|(_, s, e, _)| self.first_free_in(s, e))
    }

    /// Free addresses of `peer` in `[lo, hi]`: its space less every address
    /// anyone is known to hold there (published held runs, our claims).
    pub(super) fn free_of(&self, peer: PeerName, lo: u32, hi: u32) -> u64 {
        if lo > hi {
            return 0;
        }
        let mut free = 0;
        for (_, s, e, t) in self.crdt.pieces_in(lo, hi) {
            if self.eff(t.owner) != peer {
                continue;
            }
            let size = e as u64 - s as u64 + 1;
            // Whoever holds them: in a peer's space there may be addresses
            // held by a peer whose space it inherited, which it will not
            // hand out again.
            let held: u64 = self
                .held_runs_in(s, e)
                .iter()
                .map(|(a, b)| *b as u64 - *a as u64 + 1)
                .sum();
            let used = self.claims.range(s..=e).count() as u64 + held;
            free += size.saturating_sub(used);
        }
        free
    }

    /// Addresses owned by `peer` in the whole range.
    pub fn owned_by(&self, peer: PeerName) -> u64 {
        self.crdt
            .pieces()
            .filter(|(_, _, t)| self.eff(t.owner) == peer)
            .map(|(s, e, _)| e as u64 - s as u64 + 1)
            .sum()
    }

    /// We have no space in `net`: ask a donor, or say why we cannot.
    fn ask_for_space(&mut self, net: Net) -> AllocError {
        let subnet = net_str(net);
        if let Some(q) = self.my_request(net) {
            return AllocError::Wait(format!("asked peer {} for space in {subnet}", q.donor));
        }
        let (reachable, unreachable) = self.donors(net);
        if let Some(donor) = self.choose_donor(&reachable) {
            self.request_space(net, donor);
            return AllocError::Wait(format!("asked peer {donor} for space in {subnet}"));
        }
        if unreachable.is_empty() {
            return AllocError::Refused(format!(
                "no free address left in {subnet}: all of its space is in use"
            ));
        }
        let names: Vec<String> = unreachable.keys().map(|p| p.to_string()).collect();
        AllocError::Wait(format!(
            "no space left here in {subnet}; peers with free space there are unreachable: {}",
            names.join(", ")
        ))
    }

    /// Our outstanding request for space in `net`.
    pub(super) fn my_request(&self, net: Net) -> Option<Request> {
        self.crdt
            .records
            .get(&self.me)
            .and_then(|r| r.requests.iter().find(|q| q.subnet == net).cloned())
    }

    /// Peers other than us with free space in `net`: (reachable, unreachable).
    pub(super) fn donors(&self, net: Net) -> (BTreeMap<PeerName, u64>, BTreeMap<PeerName, u64>) {
        let (lo, hi) = net.bounds();
        let mut reach = BTreeMap::new();
        let mut unreach = BTreeMap::new();
        for p in self.owners() {
            if p == self.me {
                continue;
            }
            let free = self.free_of(p, lo + 1, hi - 1);
            if free == 0 {
                continue;
            }
            if self.reachable.contains(&p) {
                reach.insert(p, free);
            } else {
                unreach.insert(p, free);
            }
        }
        (reach, unreach)
    }

    /// A donor at random, weighted by free space.
    pub(super) fn choose_donor(&mut self, cands: &BTreeMap<PeerName, u64>) -> Option<PeerName> {
        let total: u64 = cands.values().sum();
        if total == 0 {
            return None;
        }
        let mut r = self.random() % total;
        for (p, f) in cands {
            if r < *f {
                return Some(*p);
            }
            r -= f;
        }
        None
    }

    /// Write a request for space in `net` to `donor`.
    pub(super) fn request_space(&mut self, net: Net, donor: PeerName) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.write_record(|r| {
            r.requests.retain(|q| q.subnet != net);
            r.requests.push(Request {
                seq,
                donor,
                subnet: net,
            });
        });
    }

    /// Give `to` the upper half of our largest free run in `net`: a grant
    /// in our record.
    pub(super) fn donate(&mut self, to: PeerName, net: Net) -> bool {
        let (lo, hi) = net.bounds();
        let mut best: Option<(u64, u32, u32)> = None; // (piece counter, first, last)
        for (_, s, e, t) in self.crdt.pieces_in(lo, hi) {
            if self.eff(t.owner) != self.me {
                continue;
            }
            let mut used: Vec<(u32, u32)> = self
                .claims
                .range(s..=e)
                .map(|(a, _)| (*a, *a))
                .chain(self.held_runs_in(s, e))
                .collect();
            used.sort_unstable();
            let mut from = s as u64;
            let mut consider = |f: u64, l: u64| {
                if l >= f && best.is_none_or(|(_, bf, bl)| l - f > (bl - bf) as u64) {
                    best = Some((t.at, f as u32, l as u32));
                }
            };
            for (us, ue) in used {
                if us as u64 > from {
                    consider(from, us as u64 - 1);
                }
                from = from.max(ue as u64 + 1);
            }
            if from <= e as u64 {
                consider(from, e as u64);
            }
        }
        let Some((at, first, last)) = best else {
            return false;
        };
        let Some(at) = at.checked_add(1).filter(|a| *a <= MAX_AT) else {
            return false;
        };
        if self
            .crdt
            .records
            .get(&self.me)
            .is_some_and(|r| r.grants.len() >= MAX_GRANTS)
        {
            return false;
        }
        let len = last - first + 1;
        let gift = if len == 1 { first } else { first + len / 2 };
        self.write_record(|r| {
            r.grants.push(Grant {
                first: gift,
                last,
                to,
                at,
            })
        });
        true
    }
}
