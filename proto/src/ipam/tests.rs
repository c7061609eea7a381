//! Tests of the IPAM core: unit cases, then proptests over many peers.
#![allow(clippy::needless_range_loop)]

use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

/// 1,024 identities, sorted by name, so that `name(i) < name(i + 1)` (the
/// ring splits in the order of the names).
fn ids() -> &'static [Identity] {
    static IDS: std::sync::OnceLock<Vec<Identity>> = std::sync::OnceLock::new();
    IDS.get_or_init(|| {
        let mut v: Vec<Identity> = (0..1024).map(|i| crate::sim::sim_identity(i, 7)).collect();
        v.sort_by_key(|i| i.name());
        v
    })
}

/// Peer `i`'s identity.
pub(crate) fn id(i: usize) -> Identity {
    ids()[i].clone()
}

/// Peer `i`'s name.
pub(crate) fn name(i: usize) -> PeerName {
    ids()[i].name()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn cfg(init: InitMode) -> Config {
    Config {
        range: net("10.32.0.0/12"),
        default_subnet: net("10.32.0.0/12"),
        init,
        reclaim_after: Duration::from_secs(60),
    }
}

fn seeds(n: usize) -> Vec<Ipam> {
    let list: Vec<PeerName> = (0..n).map(name).collect();
    (0..n)
        .map(|i| Ipam::new(id(i), cfg(InitMode::Seed(list.clone()))))
        .collect()
}

/// Everyone up in `up` sees everyone else in `up` (in the same group).
fn reach(peers: &[Ipam], i: usize, group: &dyn Fn(usize) -> u8) -> BTreeSet<PeerName> {
    (0..peers.len())
        .filter(|j| *j != i && group(*j) == group(i))
        .map(name)
        .collect()
}

/// Tick and exchange whole states within groups until nothing changes.
fn settle(peers: &mut [Ipam], now: Instant, group: &dyn Fn(usize) -> u8) {
    for _ in 0..40 {
        let mut changed = false;
        for i in 0..peers.len() {
            let r = reach(peers, i, group);
            peers[i].tick(now, &r);
            let _ = peers[i].take_delta();
        }
        for i in 0..peers.len() {
            let e = peers[i].encode();
            for j in 0..peers.len() {
                if i != j
                    && group(i) == group(j)
                    && peers[j]
                        .merge(&e, &mut crate::sign::KeyBook::new())
                        .unwrap()
                        .is_some()
                {
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
}

fn all(_: usize) -> u8 {
    0
}

#[test]
fn a_large_state_splits_into_parts_that_merge_alone() {
    // 300 peers, each holding scattered addresses, cut into small parts.
    let mut p = seeds(300);
    let t = Instant::now();
    let d = net("10.32.0.0/12");
    let everyone: BTreeSet<PeerName> = (0..300).map(name).collect();
    for (i, peer) in p.iter_mut().enumerate() {
        peer.tick(t, &everyone);
        for k in 0..20 {
            peer.allocate(t, &format!("c{i}-{k}"), d).unwrap();
        }
        for k in (0..20).step_by(2) {
            peer.release(&format!("c{i}-{k}"), None);
        }
    }
    let mut whole = Ipam::new(id(999), cfg(InitMode::Observer));
    for peer in &p {
        whole
            .merge(&peer.encode(), &mut crate::sign::KeyBook::new())
            .unwrap();
    }
    let bytes = whole.encode();
    assert!(bytes.len() > 20_000, "{} bytes", bytes.len());
    let parts = whole.split(bytes, 4_000);
    assert!(parts.len() > 5, "{} parts", parts.len());
    let mut other = Ipam::new(id(998), cfg(InitMode::Observer));
    for part in &parts {
        assert!(part.len() <= 4_000, "part of {} bytes", part.len());
        other.merge(part, &mut crate::sign::KeyBook::new()).unwrap();
    }
    assert_eq!(other.digest(), whole.digest());
}

#[test]
fn seed_ring_splits_evenly_and_allocates_lowest() {
    let mut p = seeds(2);
    let t = Instant::now();
    settle(&mut p, t, &all);
    let d = net("10.32.0.0/12");
    assert_eq!(p[0].allocate(t, "a", d), Ok("10.32.0.1".parse().unwrap()));
    assert_eq!(p[0].allocate(t, "b", d), Ok("10.32.0.2".parse().unwrap()));
    assert_eq!(p[0].allocate(t, "a", d), Ok("10.32.0.1".parse().unwrap()));
    assert_eq!(p[1].allocate(t, "c", d), Ok("10.40.0.0".parse().unwrap()));
    let s = p[0].status(t, &[name(1)].into());
    assert_eq!(s.state, RingState::Ready);
    assert_eq!(s.state.to_string(), "ready");
    assert_eq!(s.peers.len(), 2);
    assert_eq!(s.peers[0].owned, 1 << 19);
    assert_eq!(s.peers[0].free, (1 << 19) - 2);
}

#[test]
fn claim_and_release() {
    let mut p = seeds(2);
    let t = Instant::now();
    settle(&mut p, t, &all);
    let d = net("10.32.0.0/12");
    let a: Ipv4Addr = "10.32.0.9".parse().unwrap();
    assert_eq!(p[0].claim(t, "x", a, d), Ok(()));
    assert_eq!(p[0].claim(t, "x", a, d), Ok(()));
    let e = p[0].claim(t, "y", a, d).unwrap_err();
    assert!(e.to_string().contains("already taken by x"), "{e}");
    let e = p[0]
        .claim(t, "y", "10.40.0.9".parse().unwrap(), d)
        .unwrap_err();
    assert!(e.to_string().contains(&name(1).to_string()), "{e}");
    let e = p[0]
        .claim(t, "y", "10.0.0.1".parse().unwrap(), d)
        .unwrap_err();
    assert!(matches!(&e, AllocError::Refused(m) if m.contains("outside the range")));
    assert!(p[0].release("y", Some(a)).is_empty());
    assert_eq!(p[0].release("x", None), vec![a]);
    assert!(p[0].claims().is_empty());
}

#[test]
fn hand_over_moves_a_claim_in_one_step() {
    let mut p = seeds(2);
    let t = Instant::now();
    settle(&mut p, t, &all);
    let d = net("10.32.0.0/12");
    let a = p[0].allocate(t, "docker-1", d).unwrap();
    assert!(
        !p[0].hand_over("nobody", "c", a),
        "only the holder hands over"
    );
    assert!(p[0].hand_over("docker-1", "c", a));
    assert_eq!(p[0].claims(), vec![("c".to_string(), a)]);
    // The container's own claim is now a no-op; the old id holds nothing.
    assert_eq!(p[0].claim(t, "c", a, d), Ok(()));
    assert!(p[0].release("docker-1", None).is_empty());
    assert!(!p[0].hand_over("docker-1", "c", a));
    assert_eq!(p[0].release("c", Some(a)), vec![a]);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut p = seeds(2);
    let t = Instant::now();
    settle(&mut p, t, &all);
    let d = net("10.32.0.0/12");
    p[0].allocate(t, "a", d).unwrap();
    let before = (p[0].persist(), p[0].generation(), p[0].digest());
    let cases: Vec<Result<(), AllocError>> = vec![
        p[0].allocate(t, "b", net("10.0.0.0/24")).map(|_| ()),
        p[0].allocate(t, "b", net("10.32.0.0/31")).map(|_| ()),
        p[0].claim(t, "b", "10.32.0.1".parse().unwrap(), d),
        p[0].claim(t, "b", "10.32.0.0".parse().unwrap(), net("10.32.0.0/24")),
        p[0].claim(t, "b", "10.32.1.1".parse().unwrap(), net("10.32.0.0/24")),
    ];
    let want = [
        "outside the range",
        "too small",
        "already taken",
        "reserved",
        "not inside",
    ];
    for (c, w) in cases.iter().zip(want) {
        match c {
            Err(AllocError::Refused(m)) => assert!(m.contains(w), "{m} lacks {w}"),
            other => panic!("{other:?}"),
        }
    }
    for bad in [
        &[][..],
        &[9, 1, 2][..],
        &[1, 0xff, 0xff, 0xff][..],
        &[1][..],
    ] {
        assert!(p[0].merge(bad, &mut crate::sign::KeyBook::new()).is_err());
        assert!(Ipam::restore(id(0), cfg(InitMode::Observer), bad).is_err());
    }
    assert_eq!(before, (p[0].persist(), p[0].generation(), p[0].digest()));
}

#[test]
fn foreign_rings_are_refused_naming_both_ranges() {
    let mut a = Ipam::new(id(0), cfg(InitMode::Seed(vec![name(0)])));
    let mut other = cfg(InitMode::Seed(vec![name(1)]));
    other.range = net("10.64.0.0/16");
    let b = Ipam::new(id(1), other);
    let e = a
        .merge(&b.encode(), &mut crate::sign::KeyBook::new())
        .unwrap_err();
    assert!(
        e.contains("10.32.0.0/12") && e.contains("10.64.0.0/16"),
        "{e}"
    );
    let c = Ipam::new(id(1), cfg(InitMode::Seed(vec![name(1)])));
    let before = a.digest();
    let e = a
        .merge(&c.encode(), &mut crate::sign::KeyBook::new())
        .unwrap_err();
    assert!(
        e.contains("10.32.0.0/12") && e.contains(&name(1).to_string()),
        "{e}"
    );
    assert_eq!(a.digest(), before);
}

#[test]
fn consensus_creates_one_ring_and_says_what_it_waits_for() {
    let t = Instant::now();
    let mut p: Vec<Ipam> = (0..3)
        .map(|i| Ipam::new(id(i), cfg(InitMode::Consensus(Some(3)))))
        .collect();
    let e = p[0].allocate(t, "a", net("10.32.0.0/12")).unwrap_err();
    match &e {
        AllocError::Wait(m) => assert!(m.contains("waiting for 1 of 3 peers"), "{m}"),
        _ => panic!("{e:?}"),
    }
    let state = p[0].status(t, &BTreeSet::new()).state;
    assert!(matches!(state, RingState::Awaiting(_)), "{state}");
    assert!(state.to_string().starts_with("awaiting consensus"));
    // Peer 2 is away: a quorum of 2 of 3 is enough.
    settle(&mut p[..2], t, &all);
    settle(&mut p[..2], t + Duration::from_secs(5), &all);
    assert_eq!(p[0].digest(), p[1].digest());
    let r = p[0].allocate(t, "a", net("10.32.0.0/12"));
    assert!(r.is_ok(), "{r:?} {:?}", p[0].status(t, &[name(1)].into()));
    settle(&mut p, t + Duration::from_secs(6), &all);
    assert!(p.iter().all(|x| x.digest() == p[0].digest()));
    assert!(p[2].crdt.ring.is_some());
    let mut obs = Ipam::new(id(9), cfg(InitMode::Observer));
    assert!(matches!(
        obs.allocate(t, "o", net("10.32.0.0/12")),
        Err(AllocError::Wait(_))
    ));
    obs.merge(&p[1].encode(), &mut crate::sign::KeyBook::new())
        .unwrap();
    assert_eq!(obs.digest(), p[1].digest());
}

#[test]
fn running_dry_asks_a_donor() {
    let t = Instant::now();
    let mut p = seeds(2);
    settle(&mut p, t, &all);
    let s = net("10.32.0.0/28");
    let e = p[1].allocate(t, "a", s).unwrap_err();
    assert_eq!(
        e,
        AllocError::Wait(format!("asked peer {} for space in 10.32.0.0/28", name(0)))
    );
    settle(&mut p, t, &all);
    let a = p[1].allocate(t, "a", s).unwrap();
    assert!(s.contains(&a));
    // Fill the subnet (14 usable addresses) across both peers.
    let mut got = vec![a];
    for i in 0..40 {
        settle(&mut p, t, &all);
        if let Ok(a) = p[i % 2].allocate(t, &format!("x{i}"), s) {
            got.push(a);
        }
    }
    let set: BTreeSet<_> = got.iter().collect();
    assert_eq!(set.len(), got.len());
    assert_eq!(got.len(), 14);
    let e = p[0].allocate(t, "full", s).unwrap_err();
    assert!(
        matches!(e, AllocError::Refused(ref m) if m.contains("no free address")),
        "{e}"
    );
}

#[test]
fn rmpeer_on_two_hosts_decides_one_heir() {
    let t = Instant::now();
    let mut p = seeds(5);
    settle(&mut p, t, &all);
    let dead = |i: usize| u8::from(i == 4);
    for i in 0..4 {
        let r = reach(&p, i, &dead);
        p[i].tick(t, &r);
    }
    assert!(p[0].rmpeer(t, name(4)).is_ok());
    assert!(p[1].rmpeer(t, name(4)).is_ok());
    assert!(p[0].rmpeer(t, name(1)).is_err());
    for k in 0..10 {
        settle(&mut p[..4], t + Duration::from_secs(k * 3), &all);
    }
    let heirs: BTreeSet<_> = (0..4)
        .map(|i| p[i].decided.get(&Instance::Reclaim(name(4))).cloned())
        .collect();
    assert_eq!(heirs.len(), 1, "{heirs:?}");
    let heir = heirs.into_iter().next().unwrap().unwrap()[0];
    assert!(heir == name(0) || heir == name(1));
    assert!(p[0].owners().len() == 4 && !p[0].owners().contains(&name(4)));
    assert!((0..4).all(|i| p[i].digest() == p[0].digest()));
    // Peer 4 comes back: it learns, stops, and reports its claim.
    p[4].claim(t, "old", "10.46.0.7".parse().unwrap(), net("10.32.0.0/12"))
        .unwrap();
    settle(&mut p, t + Duration::from_secs(40), &all);
    assert!(p[4]
        .allocate(t + Duration::from_secs(40), "new", net("10.46.0.0/16"))
        .is_err());
    let s = p[4].status(t, &(0..4).map(name).collect());
    assert!(s.problems.iter().any(|m| m.contains("10.46.0.7")), "{s:?}");
}

#[test]
fn automatic_reclaim_after_timeout_and_partition_lease() {
    let t = Instant::now();
    let mut p = seeds(5);
    settle(&mut p, t, &all);
    let split = |i: usize| u8::from(i >= 3);
    let d = net("10.32.0.0/12");
    for k in 0..20u64 {
        settle(&mut p, t + Duration::from_secs(k * 5), &split);
    }
    // The minority (3, 4) stopped allocating after the lease.
    let late = t + Duration::from_secs(100);
    assert!(
        matches!(p[3].allocate(late, "m", d), Err(AllocError::Wait(m)) if m.contains("sees only 2 of the 5"))
    );
    // The majority reclaimed both (each needs 3 of 5 votes).
    assert_eq!(p[0].owners().len(), 3, "{:?}", p[0].owners());
    assert!(p[0].allocate(late, "ok", d).is_ok());
}

#[test]
fn leave_hands_everything_on() {
    let t = Instant::now();
    let mut p = seeds(3);
    settle(&mut p, t, &all);
    let r = reach(&p, 2, &all);
    let heir = p[2].leave(t, &r).unwrap().unwrap();
    assert_eq!(p[2].owned_by(name(2)), 0);
    settle(&mut p, t, &all);
    assert_eq!(p[0].owners().len(), 2);
    assert_eq!(p[0].owned_by(heir), 699051);
    assert_eq!(p[2].leave(t, &r), Ok(None));
    // Its record stays: its grants are what prove the heir's ownership.
    p[0].forget_peer(name(2));
    assert!(p[0].crdt.records.contains_key(&name(2)));
    assert_eq!(p[0].owned_by(heir), 699051);
}

#[test]
fn persist_restore_round_trip() {
    let t = Instant::now();
    let mut p = seeds(2);
    settle(&mut p, t, &all);
    p[0].allocate(t, "a", net("10.32.0.0/12")).unwrap();
    let bytes = p[0].persist();
    let q = Ipam::restore(id(0), cfg(InitMode::Seed(vec![name(0), name(1)])), &bytes).unwrap();
    assert_eq!(q.digest(), p[0].digest());
    assert_eq!(q.claims(), p[0].claims());
    let mut other = cfg(InitMode::Observer);
    other.range = net("10.64.0.0/16");
    let e = Ipam::restore(id(0), other, &bytes).err().unwrap();
    assert!(e.contains("10.64.0.0/16"), "{e}");
}

#[test]
fn deltas_are_small() {
    let t = Instant::now();
    let mut p = seeds(120);
    let _ = p[0].take_delta();
    let r = (1..120).map(name).collect();
    p[0].tick(t, &r);
    let _ = p[0].take_delta();
    p[0].allocate(t, "a", net("10.32.0.0/12")).unwrap();
    let d = p[0].take_delta().unwrap();
    // One signed record: name, key, signature and a few fields.
    assert!(d.len() < 256, "{}", d.len());
    assert!(p[0].take_delta().is_none());
}

/// A lone peer of the default consensus, told about `targets` peers none
/// of which it has reached.
fn told(i: usize, targets: usize) -> Ipam {
    let mut p = Ipam::new(id(i), cfg(InitMode::Consensus(None)));
    p.set_told(Told {
        targets,
        unreached: (0..targets)
            .map(|t| format!("198.18.0.{}:6783", t + 1))
            .collect(),
        peers: BTreeSet::new(),
    });
    p
}

#[test]
fn a_peer_told_about_nobody_creates_the_ring_alone() {
    let t = Instant::now();
    let mut p = told(0, 0);
    assert!(p.allocate(t, "a", net("10.32.0.0/12")).is_ok());
    assert_eq!(p.ring(), Some(&[name(0)][..]));
}

#[test]
fn a_peer_told_about_others_never_creates_the_ring_alone() {
    let t = Instant::now();
    let mut p = told(1, 1);
    for k in 0..5 {
        let now = t + Duration::from_secs(k);
        p.tick(now, &BTreeSet::new());
        match p.allocate(now, "a", net("10.32.0.0/12")) {
            Err(AllocError::Wait(why)) => {
                assert!(why.contains("198.18.0.1:6783"), "names the target: {why}")
            }
            r => panic!("a told peer allocated alone: {r:?}"),
        }
    }
    assert!(p.ring().is_none());
    let s = p.status(t, &BTreeSet::new());
    let state = s.state.to_string();
    assert!(state.contains("198.18.0.1:6783"), "{state}");
    // Reached, but still alone with a consensus size of 2: no ring either.
    p.set_told(Told {
        targets: 1,
        unreached: vec![],
        peers: BTreeSet::new(),
    });
    assert!(matches!(
        p.allocate(t, "a", net("10.32.0.0/12")),
        Err(AllocError::Wait(_))
    ));
    assert!(p.ring().is_none());
}

#[test]
fn peers_learned_before_a_restart_still_count() {
    let t = Instant::now();
    let mut p = told(0, 0);
    p.set_told(Told {
        targets: 0,
        unreached: vec![],
        peers: [name(1)].into(),
    });
    let saved = p.persist();
    let mut q = Ipam::restore(id(0), cfg(InitMode::Consensus(None)), &saved).unwrap();
    q.set_told(Told::default());
    assert!(
        matches!(
            q.allocate(t, "a", net("10.32.0.0/12")),
            Err(AllocError::Wait(_))
        ),
        "a restarted peer that had learned a peer created a ring alone"
    );
}

#[test]
fn formats_before_signing_are_refused_saying_what_to_do() {
    for v in [1u8, 2] {
        let e = Ipam::restore(id(0), cfg(InitMode::Observer), &[v, 0, 0])
            .err()
            .unwrap();
        assert!(
            e.contains("before IPAM records were signed") && e.contains("mesh reset"),
            "{e}"
        );
    }
}

/// Two lone peers, each with its own ring; `holds[i]`: peer i holds an address.
fn two_rings(holds: [bool; 2]) -> Vec<Ipam> {
    let t = Instant::now();
    let mut p = vec![told(0, 0), told(1, 0)];
    for (i, q) in p.iter_mut().enumerate() {
        q.prime(t);
        if holds[i] {
            q.allocate(t, "c", net("10.32.0.0/12")).unwrap();
        }
        let _ = q.take_delta();
        assert_eq!(q.ring(), Some(&[name(i)][..]));
    }
    p
}

#[test]
fn rings_that_meet_holding_addresses_are_reported_once_with_the_fix() {
    let t = Instant::now();
    let mut p = two_rings([true, true]);
    for _ in 0..3 {
        let e = p[1].encode();
        let err = p[0]
            .merge(&e, &mut crate::sign::KeyBook::new())
            .unwrap_err();
        assert!(err.contains("foreign IPAM ring"), "{err}");
    }
    let notes = p[0].take_notes();
    assert_eq!(notes.len(), 1, "said once: {notes:?}");
    assert!(matches!(&notes[0], Note::Met(m) if m.contains("free every address on one side")));
    let s = p[0].status(t, &BTreeSet::new());
    assert!(
        s.problems
            .iter()
            .any(|m| m.contains("another address ring")),
        "{:?}",
        s.problems
    );
    assert_eq!(p[0].ring(), Some(&[name(0)][..]));
}

#[test]
fn a_side_that_holds_nothing_adopts_the_other_ring() {
    let t = Instant::now();
    let mut p = two_rings([true, false]);
    let e = p[0].encode();
    assert!(p[1]
        .merge(&e, &mut crate::sign::KeyBook::new())
        .unwrap()
        .is_some());
    assert_eq!(p[1].ring(), Some(&[name(0)][..]));
    assert!(matches!(&p[1].take_notes()[..], [Note::Adopted(_)]));
    // Its record lives on with a greater version, and the other side merges it.
    let d = p[1].take_delta().unwrap();
    p[0].merge(&d, &mut crate::sign::KeyBook::new()).unwrap();
    settle(&mut p, t, &all);
    let a = p[0].claims()[0].1;
    // It owns nothing yet: it asks the other side for space.
    assert!(p[1].allocate(t, "d", net("10.32.0.0/12")).is_err());
    settle(&mut p, t, &all);
    let b = p[1].allocate(t, "d", net("10.32.0.0/12")).unwrap();
    assert_ne!(a, b);
    // The holder reported the other ring, until its owner joined ours.
    assert!(p[0]
        .status(t, &BTreeSet::new())
        .problems
        .iter()
        .all(|m| !m.contains("another address ring")));
}

#[test]
fn two_empty_rings_that_meet_become_one_without_swapping() {
    let mut p = two_rings([false, false]);
    let (e0, e1) = (p[0].encode(), p[1].encode());
    let r0 = p[0].merge(&e1, &mut crate::sign::KeyBook::new());
    let r1 = p[1].merge(&e0, &mut crate::sign::KeyBook::new());
    assert!(
        r0.is_ok() != r1.is_ok(),
        "exactly one side adopts: {r0:?} {r1:?}"
    );
    assert_eq!(p[0].ring(), p[1].ring());
}

// ---- proptests ------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Alloc(usize, usize),
    Release(usize),
    Deliver(usize),
    Drop(usize),
    Dup(usize),
    Tick(u64),
    Split(u8),
    Heal,
    Restart(usize),
    Kill(usize),
    RmPeer(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..5usize, 0..3usize).prop_map(|(p, s)| Op::Alloc(p, s)),
        1 => (0..5usize).prop_map(Op::Release),
        6 => any::<usize>().prop_map(Op::Deliver),
        1 => any::<usize>().prop_map(Op::Drop),
        1 => any::<usize>().prop_map(Op::Dup),
        3 => (0..3000u64).prop_map(Op::Tick),
        1 => any::<u8>().prop_map(Op::Split),
        1 => Just(Op::Heal),
        1 => (0..5usize).prop_map(Op::Restart),
        1 => (0..5usize).prop_map(Op::Kill),
        1 => (0..5usize, 0..5usize).prop_map(|(a, b)| Op::RmPeer(a, b)),
    ]
}

const SUBNETS: [&str; 3] = ["10.32.0.0/28", "10.40.0.0/29", "10.32.0.0/12"];

struct World {
    peers: Vec<Option<Ipam>>,
    init: Vec<InitMode>,
    queue: Vec<(usize, usize, Vec<u8>)>,
    group: Vec<u8>,
    now: Instant,
    ids: u64,
}

impl World {
    fn new(n: usize, consensus: bool) -> World {
        let list: Vec<PeerName> = (0..n).map(name).collect();
        let init: Vec<InitMode> = (0..n)
            .map(|i| {
                if consensus {
                    if i == n - 1 {
                        InitMode::Observer
                    } else {
                        InitMode::Consensus(Some(n - 1))
                    }
                } else {
                    InitMode::Seed(list.clone())
                }
            })
            .collect();
        let peers = (0..n)
            .map(|i| Some(Ipam::new(id(i), cfg(init[i].clone()))))
            .collect();
        World {
            peers,
            init,
            queue: Vec::new(),
            group: vec![0; n],
            now: Instant::now(),
            ids: 0,
        }
    }

    fn linked(&self, a: usize, b: usize) -> bool {
        self.peers[a].is_some() && self.peers[b].is_some() && self.group[a] == self.group[b]
    }

    fn reachable(&self, i: usize) -> BTreeSet<PeerName> {
        (0..self.peers.len())
            .filter(|j| *j != i && self.linked(i, *j))
            .map(name)
            .collect()
    }

    /// Collect deltas into the queue (the daemon persists first: nothing to model).
    fn flush(&mut self, i: usize) {
        let Some(p) = self.peers[i].as_mut() else {
            return;
        };
        if let Some(d) = p.take_delta() {
            for j in 0..self.peers.len() {
                if j != i {
                    self.queue.push((i, j, d.clone()));
                }
            }
        }
    }

    fn deliver(&mut self, k: usize) {
        if self.queue.is_empty() {
            return;
        }
        let (from, to, bytes) = self.queue.remove(k % self.queue.len());
        if !self.linked(from, to) {
            return;
        }
        let p = self.peers[to].as_mut().unwrap();
        if let Some(news) = p.merge(&bytes, &mut crate::sign::KeyBook::new()).unwrap() {
            for j in 0..self.peers.len() {
                if j != to && j != from {
                    self.queue.push((to, j, news.clone()));
                }
            }
        }
        self.flush(to);
    }

    fn tick(&mut self) {
        for i in 0..self.peers.len() {
            let r = self.reachable(i);
            if let Some(p) = self.peers[i].as_mut() {
                p.tick(self.now, &r);
            }
            self.flush(i);
        }
    }

    fn apply(&mut self, op: &Op) {
        let n = self.peers.len();
        match *op {
            Op::Alloc(i, s) => {
                self.ids += 1;
                let id = format!("c{}", self.ids);
                if let Some(p) = self.peers[i % n].as_mut() {
                    let _ = p.allocate(self.now, &id, net(SUBNETS[s]));
                }
                self.flush(i % n);
            }
            Op::Release(i) => {
                if let Some(p) = self.peers[i % n].as_mut() {
                    if let Some((id, _)) = p.claims().first().cloned() {
                        p.release(&id, None);
                    }
                }
                self.flush(i % n);
            }
            Op::Deliver(k) => self.deliver(k),
            Op::Drop(k) => {
                if !self.queue.is_empty() {
                    let l = self.queue.len();
                    self.queue.remove(k % l);
                }
            }
            Op::Dup(k) => {
                if !self.queue.is_empty() {
                    let l = self.queue.len();
                    let m = self.queue[k % l].clone();
                    self.queue.push(m);
                }
            }
            Op::Tick(ms) => {
                self.now += Duration::from_millis(ms);
                self.tick();
            }
            Op::Split(mask) => {
                for i in 0..n {
                    self.group[i] = (mask >> i) & 1;
                }
            }
            Op::Heal => self.group = vec![0; n],
            Op::Restart(i) => {
                if let Some(p) = self.peers[i % n].take() {
                    let bytes = p.persist();
                    let q =
                        Ipam::restore(id(i % n), cfg(self.init[i % n].clone()), &bytes).unwrap();
                    assert_eq!(q.digest(), p.digest());
                    self.peers[i % n] = Some(q);
                    self.flush(i % n);
                }
            }
            Op::Kill(i) => {
                // A host dies for good, with its containers (at most 1 of 5).
                if self.peers.iter().all(|p| p.is_some()) && i % n != 0 {
                    self.peers[i % n] = None;
                }
            }
            Op::RmPeer(a, b) => {
                if self.peers[b % n].is_none() {
                    let now = self.now;
                    if let Some(p) = self.peers[a % n].as_mut() {
                        let _ = p.rmpeer(now, name(b % n));
                    }
                    self.flush(a % n);
                }
            }
        }
    }

    fn check_no_duplicates(&self) {
        let mut seen: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
        for (i, p) in self.peers.iter().enumerate() {
            let Some(p) = p else { continue };
            for (_, a) in p.claims() {
                if let Some(j) = seen.insert(a, i) {
                    panic!("{a} held by peers {j} and {i}");
                }
            }
        }
    }

    /// Heal, deliver everything, exchange whole states, tick: until quiet.
    fn converge(&mut self) {
        self.group = vec![0; self.peers.len()];
        for round in 0..120 {
            while !self.queue.is_empty() {
                self.deliver(0);
            }
            if round < 100 {
                self.now += Duration::from_millis(1500);
            }
            self.tick();
            let live: Vec<usize> = (0..self.peers.len())
                .filter(|i| self.peers[*i].is_some())
                .collect();
            let mut news = false;
            for &i in &live {
                let e = self.peers[i].as_ref().unwrap().encode();
                for &j in &live {
                    if i != j {
                        news |= self.peers[j]
                            .as_mut()
                            .unwrap()
                            .merge(&e, &mut crate::sign::KeyBook::new())
                            .unwrap()
                            .is_some();
                    }
                }
            }
            if round >= 100 && !news && self.queue.is_empty() {
                break;
            }
        }
    }

    fn digests(&self) -> BTreeSet<u64> {
        self.peers.iter().flatten().map(|p| p.digest()).collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn never_two_holders_and_views_converge(consensus in any::<bool>(), ops in proptest::collection::vec(op(), 1..160)) {
        let mut w = World::new(5, consensus);
        for i in 0..5 {
            w.peers[i].as_mut().unwrap().prime(w.now);
        }
        for op in &ops {
            w.apply(op);
            w.check_no_duplicates();
        }
        w.converge();
        w.check_no_duplicates();
        prop_assert_eq!(w.digests().len(), 1);
        // After healing, every live owner can allocate again.
        let now = w.now;
        for p in w.peers.iter_mut().flatten() {
            if p.owned_by(p.me()) > 0 && p.claims().len() < 100 {
                prop_assert!(p.allocate(now, "after", net("10.32.0.0/12")).is_ok());
            }
        }
    }

    #[test]
    fn merge_is_commutative_associative_idempotent(ops in proptest::collection::vec(op(), 1..80)) {
        let mut w = World::new(5, false);
        for op in &ops {
            w.apply(op);
        }
        let states: Vec<Vec<u8>> = w.peers.iter().flatten().map(|p| p.encode()).collect();
        let fold = |order: &[usize]| {
            let mut x = Ipam::new(id(99), cfg(InitMode::Observer));
            for &k in order {
                x.merge(&states[k], &mut crate::sign::KeyBook::new()).unwrap();
                x.merge(&states[k], &mut crate::sign::KeyBook::new()).unwrap();
            }
            x.digest()
        };
        let n = states.len();
        let fwd: Vec<usize> = (0..n).collect();
        let rev: Vec<usize> = (0..n).rev().collect();
        prop_assert_eq!(fold(&fwd), fold(&rev));
        // (a ⊔ b) ⊔ c == a ⊔ (b ⊔ c): merge the encoding of a merge.
        if n >= 3 {
            let mut ab = Ipam::new(id(98), cfg(InitMode::Observer));
            ab.merge(&states[0], &mut crate::sign::KeyBook::new()).unwrap();
            ab.merge(&states[1], &mut crate::sign::KeyBook::new()).unwrap();
            let mut bc = Ipam::new(id(97), cfg(InitMode::Observer));
            bc.merge(&states[1], &mut crate::sign::KeyBook::new()).unwrap();
            bc.merge(&states[2], &mut crate::sign::KeyBook::new()).unwrap();
            let mut left = Ipam::new(id(96), cfg(InitMode::Observer));
            left.merge(&ab.encode(), &mut crate::sign::KeyBook::new()).unwrap();
            left.merge(&states[2], &mut crate::sign::KeyBook::new()).unwrap();
            let mut right = Ipam::new(id(95), cfg(InitMode::Observer));
            right.merge(&states[0], &mut crate::sign::KeyBook::new()).unwrap();
            right.merge(&bc.encode(), &mut crate::sign::KeyBook::new()).unwrap();
            prop_assert_eq!(left.digest(), right.digest());
        }
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6)) {
        let mut p = seeds(3).remove(0);
        let _ = p.merge(&bytes, &mut crate::sign::KeyBook::new());
        let _ = Ipam::restore(id(0), cfg(InitMode::Observer), &bytes);
        let mut good = p.encode();
        good.extend(bytes.iter().take(3));
        let mut persisted = p.persist();
        for (i, b) in flips {
            let l = good.len();
            good[i % l] ^= b;
            let l = persisted.len();
            persisted[i % l] ^= b;
        }
        let _ = p.merge(&good, &mut crate::sign::KeyBook::new());
        let _ = Ipam::restore(id(0), cfg(InitMode::Seed((0..3).map(name).collect())), &persisted);
    }
}

// ---- signatures, grants and bounds ---------------------------------------

/// A record of `i`, signed by `i`.
fn signed_by(i: usize, record: Record) -> state::Signed {
    let range = Net::from_ipnet(net("10.32.0.0/12"));
    let msg = state::record_message(range, name(i), &record);
    state::Signed {
        peer: name(i),
        key: *id(i).public().as_bytes(),
        sig: id(i).sign(state::RECORD_DOMAIN, &msg),
        record,
    }
}

fn payload_of(records: Vec<state::Signed>) -> Vec<u8> {
    Payload {
        range: Some(Net::from_ipnet(net("10.32.0.0/12"))),
        ring: None,
        records,
    }
    .encode()
}

#[test]
fn a_receiver_that_missed_hand_overs_derives_the_latest_owner() {
    // Peer 0 gives a piece to 1, 1 gives it to 2, 2 gives part of it to 3.
    let t = Instant::now();
    let mut p = seeds(4);
    settle(&mut p, t, &all);
    let a = u32::from(Ipv4Addr::new(10, 33, 0, 0));
    let g = |first: u32, last: u32, to: usize, at: u64| state::Grant {
        first,
        last,
        to: name(to),
        at,
    };
    let rec = |i: usize, v: u64, grants: Vec<state::Grant>| {
        signed_by(
            i,
            Record {
                version: v,
                grants,
                ..Record::default()
            },
        )
    };
    let chain = [
        rec(0, 100, vec![g(a, a + 255, 1, 1)]),
        rec(1, 100, vec![g(a, a + 255, 2, 2)]),
        rec(2, 100, vec![g(a + 128, a + 255, 3, 3)]),
    ];
    // Every order, and an observer that holds an older record of 0 (from
    // before its grant) and then sees only the latest ones.
    let orders: [[usize; 3]; 4] = [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]];
    let mut results = BTreeSet::new();
    for order in orders {
        let mut obs = Ipam::new(id(900), cfg(InitMode::Seed((0..4).map(name).collect())));
        let mut keys = crate::sign::KeyBook::new();
        obs.merge(&payload_of(vec![rec(0, 50, vec![])]), &mut keys)
            .unwrap();
        for k in order {
            obs.merge(&payload_of(vec![chain[k].clone()]), &mut keys)
                .unwrap();
        }
        assert_eq!(obs.owner_of(a), Some(name(2)));
        assert_eq!(obs.owner_of(a + 200), Some(name(3)));
        assert_eq!(obs.owner_of(a + 256), Some(name(0)));
        results.insert(format!("{:?}", obs.crdt.tokens));
    }
    assert_eq!(results.len(), 1);
    // Peer 1 appends a grant of the same piece again (it gave it away
    // already): nothing moves.
    let mut obs = Ipam::new(id(900), cfg(InitMode::Seed((0..4).map(name).collect())));
    let mut keys = crate::sign::KeyBook::new();
    let late = rec(1, 101, vec![g(a, a + 255, 2, 2), g(a, a + 255, 1, 3)]);
    for s in [chain[0].clone(), chain[2].clone(), late, chain[1].clone()] {
        let _ = obs.merge(&payload_of(vec![s]), &mut keys);
    }
    assert_eq!(obs.owner_of(a), Some(name(2)));
}

#[test]
fn forged_and_unsigned_records_are_refused_and_change_nothing() {
    let t = Instant::now();
    let mut p = seeds(3);
    settle(&mut p, t, &all);
    let before = p[0].digest();
    let whole = Record {
        version: 10,
        grants: vec![state::Grant {
            first: u32::from(Ipv4Addr::new(10, 32, 0, 0)),
            last: u32::from(Ipv4Addr::new(10, 47, 255, 255)),
            to: name(2),
            at: 1,
        }],
        ..Record::default()
    };
    // Signed by 2, presented as 1's (with 2's key, then with 1's).
    let mut forged = signed_by(2, whole.clone());
    forged.peer = name(1);
    let mut keys = crate::sign::KeyBook::new();
    assert!(p[0]
        .merge(&payload_of(vec![forged.clone()]), &mut keys)
        .is_err());
    forged.key = *id(1).public().as_bytes();
    assert!(p[0].merge(&payload_of(vec![forged]), &mut keys).is_err());
    // Not a curve point.
    let mut bad = signed_by(1, whole);
    bad.key = [0xff; 32];
    assert!(p[0].merge(&payload_of(vec![bad]), &mut keys).is_err());
    assert_eq!(p[0].digest(), before);
    // Our own record is taken from outside only signed by us and newer
    // than ours (our writing from before a lost ipam.bin, kept by the
    // mesh): one signed by another key is refused...
    let mut theirs = signed_by(
        2,
        Record {
            version: 1 << 30,
            ..Record::default()
        },
    );
    theirs.peer = name(0);
    let r = p[0].merge(&payload_of(vec![theirs]), &mut keys);
    assert!(matches!(r, Ok(None)), "{r:?}");
    assert_eq!(p[0].digest(), before);
    // ... and ours is taken back.
    let mine = signed_by(
        0,
        Record {
            version: 1 << 30,
            ..Record::default()
        },
    );
    let r = p[0].merge(&payload_of(vec![mine]), &mut keys);
    assert!(matches!(r, Ok(Some(_))), "{r:?}");
    assert_ne!(p[0].digest(), before);
}

/// Values at and around a bound.
fn edges(max: u64) -> Vec<u64> {
    vec![0, 1, max - 1, max, max + 1, u64::MAX - 1, u64::MAX]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Counters at 0, max-1, max and past it, in every field a peer sends:
    /// merging never panics, takes a record only within the bounds, and
    /// the result does not depend on the order.
    #[test]
    fn counters_at_their_bounds(
        v in proptest::sample::select(edges(state::MAX_VERSION)),
        at in proptest::sample::select(edges(state::MAX_AT)),
        round in proptest::sample::select(edges(state::MAX_ROUND)),
        consensus in proptest::sample::select(vec![0u32, 1, state::MAX_CONSENSUS, state::MAX_CONSENSUS + 1, u32::MAX]),
        run in proptest::sample::select(vec![(0u32, 1u32), (0, 1 << 20), (1 << 20, 1), ((1 << 20) - 1, 1), ((1 << 20) - 1, 2), (0, u32::MAX), (u32::MAX, u32::MAX)]),
    ) {
        let (lo, hi) = Net::from_ipnet(net("10.32.0.0/12")).bounds();
        let b = state::Ballot { round, proposer: name(1) };
        let r = Record {
            version: v,
            consensus,
            held: vec![(lo.wrapping_add(run.0), run.1)],
            grants: vec![state::Grant { first: hi - 10, last: hi, to: name(0), at }],
            paxos: [(Instance::Reclaim(name(2)), state::Acceptor { promised: Some(b), accepted: Some((b, vec![name(1)])) })].into(),
            ..Record::default()
        };
        let in_bounds = (1..=state::MAX_VERSION).contains(&v)
            && (1..=state::MAX_AT).contains(&at)
            && round <= state::MAX_ROUND_STEP
            && consensus <= state::MAX_CONSENSUS
            && run.1 >= 1 && run.0 as u64 + run.1 as u64 <= (hi - lo) as u64 + 1;
        let other = signed_by(3, Record { version: 7, consensus: 1, ..Record::default() });
        let one = signed_by(1, r);
        let mut digests = BTreeSet::new();
        for order in [[one.clone(), other.clone()], [other, one]] {
            let mut p = seeds(4).remove(0);
            let mut keys = crate::sign::KeyBook::new();
            let mut took = false;
            for s in order {
                let bytes = payload_of(vec![s.clone()]);
                if let Ok(Some(_)) = p.merge(&bytes, &mut keys) {
                    took |= s.peer == name(1);
                }
            }
            prop_assert_eq!(took, in_bounds);
            digests.insert(p.digest());
            // Peer 1's grant is of space it does not own (the end of the
            // range is peer 3's): peer 0 gets nothing from it.
            prop_assert_eq!(p.owned_by(name(0)), 1 << 18);
            p.tick(Instant::now(), &BTreeSet::new());
        }
        prop_assert_eq!(digests.len(), 1);
    }
}

/// `n` peers of the default consensus, a full mesh, as the daemon runs
/// them: each ticks once a second (at its own phase) and sends its own
/// deltas to every other peer; news a peer merges is relayed to three
/// random others (the gossip's relay fanout); every message takes
/// 20-300 ms. Peer 0 asks for an address at 0.1 s and on every event
/// after until it has one. Returns the simulated seconds until every peer
/// has the ring and the merges per peer it took, or `None` after `limit`
/// seconds.
fn consensus_time(n: usize, seed: u64, limit: u64) -> Option<(f64, u64)> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let t0 = Instant::now();
    let everyone: BTreeSet<PeerName> = (0..n).map(name).collect();
    let mut peers: Vec<Ipam> = (0..n)
        .map(|i| {
            let mut p = Ipam::new(id(i), cfg(InitMode::Consensus(None)));
            p.set_told(Told {
                targets: usize::from(i != 0),
                unreached: vec![],
                peers: everyone.clone(),
            });
            p
        })
        .collect();
    let mut rng = seed | 1;
    let mut next = move |m: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % m
    };
    // (time in ms, order, to, a message or None for a tick)
    type Event = Reverse<(u64, u64, usize, Option<Vec<u8>>)>;
    let mut q: BinaryHeap<Event> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |q: &mut BinaryHeap<Event>, t: u64, to: usize, m: Option<Vec<u8>>| {
        seq += 1;
        q.push(Reverse((t, seq, to, m)));
    };
    for i in 0..n {
        push(&mut q, next(1000), i, None);
    }
    let (mut have, mut merges) = (false, 0u64);
    while let Some(Reverse((t, _, i, what))) = q.pop() {
        if t > limit * 1000 {
            return None;
        }
        let now = t0 + Duration::from_millis(t);
        match what {
            None => {
                let mut r = everyone.clone();
                r.remove(&name(i));
                peers[i].tick(now, &r);
                push(&mut q, t + 1000, i, None);
            }
            Some(bytes) => {
                merges += 1;
                let news = peers[i]
                    .merge(&bytes, &mut crate::sign::KeyBook::new())
                    .unwrap();
                for _ in 0..3 {
                    let j = next(n as u64) as usize;
                    if let Some(news) = news.as_ref().filter(|_| j != i) {
                        push(&mut q, t + 20 + next(280), j, Some(news.clone()));
                    }
                }
            }
        }
        if i == 0 && !have && t >= 100 {
            have = peers[0].allocate(now, "a", net("10.32.0.0/12")).is_ok();
        }
        if let Some(d) = peers[i].take_delta() {
            for j in (0..n).filter(|j| *j != i) {
                push(&mut q, t + 20 + next(280), j, Some(d.clone()));
            }
        }
        if peers.iter().all(|p| p.ring().is_some()) {
            return Some((t as f64 / 1000.0, merges / n as u64));
        }
    }
    None
}

#[test]
fn a_hundred_peers_agree_a_ring_in_seconds() {
    // Found with 60 real daemons: consensus took minutes when every
    // peer relayed every change to all its neighbours (see the gossip's
    // `channel_news_crosses_a_full_mesh_a_few_times_not_n_times`).
    for n in [3, 30, 100] {
        let (secs, merges) = consensus_time(n, n as u64 * 7919, 60)
            .unwrap_or_else(|| panic!("{n} peers: no ring after 60 s"));
        assert!(secs < 10.0, "{n} peers: {secs} s");
        assert!(
            merges < 15 * n as u64,
            "{n} peers: {merges} merges per peer"
        );
    }
}
