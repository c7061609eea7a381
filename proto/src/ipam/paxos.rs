//! Single-decree Paxos carried as state in the peers' records.
//!
//! There are no messages: each peer's record holds, per [`Instance`], its
//! acceptor state (`promised`, `accepted`), and a proposer's own entry doubles
//! as its requests. A proposer raises a ballot by promising it to itself (the
//! *prepare*); an acceptor that sees a proposer's own promise higher than its
//! own promises it too. Once the proposer sees a quorum of voters promising
//! its ballot, it accepts, in its own entry, the value with the highest ballot
//! those voters had accepted, or its own value (the *accept request*); an
//! acceptor that sees an accept request at least as high as its promise
//! accepts it. A value is decided when a quorum of voters accepted the same
//! `(ballot, value)`, which any peer can compute from the merged records.
//!
//! Records are written only by their peer and merged by version, so a
//! record's `promised` and `accepted` are always seen together, as Paxos
//! requires of a promise.

use super::state::{Acceptor, Ballot, Instance, Record};
use crate::gossip::digest::{mix, name_u64};
use crate::name::PeerName;
use std::collections::BTreeMap;

/// Votes needed among `n` voters.
pub fn quorum(n: usize) -> usize {
    n / 2 + 1
}

fn entry<'a>(r: &'a Record, inst: &Instance) -> Option<&'a Acceptor> {
    r.paxos.get(inst)
}

/// The value decided for `inst`: accepted, with the same ballot, by at least
/// `quorum` of the peers for which `voter` holds.
pub fn decided(
    records: &BTreeMap<PeerName, Record>,
    inst: &Instance,
    voter: &dyn Fn(PeerName) -> bool,
    quorum: usize,
) -> Option<Vec<PeerName>> {
    let mut counts: BTreeMap<(Ballot, &Vec<PeerName>), usize> = BTreeMap::new();
    for (p, r) in records {
        if !voter(*p) {
            continue;
        }
        if let Some((b, v)) = entry(r, inst).and_then(|a| a.accepted.as_ref()) {
            let c = counts.entry((*b, v)).or_default();
            *c += 1;
            if *c >= quorum {
                return Some(v.clone());
            }
        }
    }
    None
}

/// The highest ballot anyone promised or accepted for `inst`.
pub fn max_ballot(records: &BTreeMap<PeerName, Record>, inst: &Instance) -> Option<Ballot> {
    records
        .values()
        .filter_map(|r| entry(r, inst))
        .flat_map(|a| [a.promised, a.accepted.as_ref().map(|(b, _)| *b)])
        .flatten()
        .max()
}

/// A fingerprint of everybody's state for `inst`: it changes whenever the
/// instance makes progress (used to hold back competing proposers).
pub fn fingerprint(records: &BTreeMap<PeerName, Record>, inst: &Instance) -> u64 {
    let mut h = 0u64;
    for (p, r) in records {
        if let Some(a) = entry(r, inst) {
            h = mix(h ^ name_u64(*p));
            for b in [a.promised, a.accepted.as_ref().map(|(b, _)| *b)] {
                h = mix(h ^ b.map_or(0, |b| b.round ^ name_u64(b.proposer) << 1));
            }
        }
    }
    h
}

/// A new ballot for `me`, above everything seen: our own entry with it promised.
pub fn prepare(records: &BTreeMap<PeerName, Record>, me: PeerName, inst: &Instance) -> Acceptor {
    // Rounds are bounded on the wire (`MAX_ROUND`): this cannot wrap.
    let round = max_ballot(records, inst).map_or(1, |b| b.round.saturating_add(1));
    let mut mine = records
        .get(&me)
        .and_then(|r| entry(r, inst))
        .cloned()
        .unwrap_or_default();
    mine.promised = Some(Ballot {
        round,
        proposer: me,
    });
    mine
}

/// The acceptor's step: promise the highest prepare, accept the highest
/// accept request not below our promise. `Some` when our entry changes.
pub fn acceptor_step(
    records: &BTreeMap<PeerName, Record>,
    me: PeerName,
    inst: &Instance,
) -> Option<Acceptor> {
    let mine = records
        .get(&me)
        .and_then(|r| entry(r, inst))
        .cloned()
        .unwrap_or_default();
    let mut new = mine.clone();
    for (p, r) in records {
        if let Some(b) = entry(r, inst).and_then(|a| a.promised) {
            if b.proposer == *p && Some(b) > new.promised {
                new.promised = Some(b);
            }
        }
    }
    let mut best: Option<&(Ballot, Vec<PeerName>)> = None;
    for (p, r) in records {
        if let Some(acc) = entry(r, inst).and_then(|a| a.accepted.as_ref()) {
            if acc.0.proposer == *p
                && Some(acc.0) >= new.promised
                && best.is_none_or(|b| acc.0 > b.0)
            {
                best = Some(acc);
            }
        }
    }
    if let Some((b, v)) = best {
        if new.accepted.as_ref().is_none_or(|(ab, _)| ab < b) {
            new.promised = Some(*b);
            new.accepted = Some((*b, v.clone()));
        }
    }
    (new != mine).then_some(new)
}

/// The proposer's step: once a quorum of voters promised our ballot, accept
/// (in our own entry) the value to propose. `Some` when our entry changes.
pub fn proposer_step(
    records: &BTreeMap<PeerName, Record>,
    me: PeerName,
    inst: &Instance,
    voter: &dyn Fn(PeerName) -> bool,
    quorum: usize,
    own_value: &dyn Fn() -> Vec<PeerName>,
) -> Option<Acceptor> {
    let mine = records.get(&me).and_then(|r| entry(r, inst))?;
    let b = mine.promised?;
    if b.proposer != me || mine.accepted.as_ref().is_some_and(|(ab, _)| *ab >= b) {
        return None;
    }
    let mut count = 0;
    let mut highest: Option<&(Ballot, Vec<PeerName>)> = None;
    for (p, r) in records {
        let Some(a) = entry(r, inst) else { continue };
        if !voter(*p) || a.promised != Some(b) {
            continue;
        }
        count += 1;
        if let Some(acc) = &a.accepted {
            if highest.is_none_or(|h| acc.0 > h.0) {
                highest = Some(acc);
            }
        }
    }
    if count < quorum {
        return None;
    }
    let value = highest.map(|h| h.1.clone()).unwrap_or_else(own_value);
    if value.is_empty() {
        return None;
    }
    Some(Acceptor {
        promised: Some(b),
        accepted: Some((b, value)),
    })
}
