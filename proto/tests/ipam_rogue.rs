//! A rogue member of the mesh (issue 15, "Trust"): it has its own key and a
//! piece of the ring, and it lies. It forges records for an honest peer
//! (signed with its own key, or carrying the victim's key with a signature
//! that is not the victim's), gives away in its own record space it does not
//! own, inflates its counters (versions, grant counters, Paxos rounds) to
//! the maximum and beyond, makes Paxos noise (accepts for a reclaim of a
//! live peer, a ring of its own), claims to hold the whole range, and sends
//! oversized payloads. The honest peers must keep exactly the space and the
//! addresses they had, keep allocating, never hand out one address twice,
//! and converge.

#![allow(clippy::needless_range_loop)]
use mesh_proto::gossip::GossipData;
use mesh_proto::ipam::state::{
    self, Acceptor, Ballot, Grant, Instance, Net, Payload, Record, Signed, MAX_AT, MAX_VERSION,
};
use mesh_proto::ipam::{Config, InitMode, Ipam};
use mesh_proto::name::PeerName;
use mesh_proto::sign::{Identity, KeyBook};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Honest peers 0..4, the rogue is peer 4.
const N: usize = 5;
const ROGUE: usize = 4;
const VICTIM: usize = 1;

fn id(i: usize) -> Identity {
    mesh_proto::sim::sim_identity(i, 0x0bad)
}

fn name(i: usize) -> PeerName {
    id(i).name()
}

fn range() -> Net {
    Net::from_ipnet("10.32.0.0/12".parse().expect("range"))
}

fn config(init: InitMode) -> Config {
    Config {
        range: "10.32.0.0/12".parse().expect("range"),
        default_subnet: "10.32.0.0/12".parse().expect("subnet"),
        init,
        reclaim_after: Duration::from_secs(60),
    }
}

/// A peer's space as one peer sees it, and that peer's own claims.
type View = (u64, Vec<(String, Ipv4Addr)>);

struct World {
    peers: Vec<Ipam>,
    keys: Vec<KeyBook>,
    now: Instant,
}

impl World {
    fn new() -> World {
        let seed: Vec<PeerName> = (0..N).map(name).collect();
        World {
            peers: (0..N)
                .map(|i| Ipam::new(id(i), config(InitMode::Seed(seed.clone()))))
                .collect(),
            keys: (0..N).map(|_| KeyBook::new()).collect(),
            now: Instant::now(),
        }
    }

    fn everyone_but(&self, i: usize) -> BTreeSet<PeerName> {
        (0..N).filter(|j| *j != i).map(name).collect()
    }

    /// Tick everyone, exchange whole states until nothing is new.
    fn settle(&mut self) {
        for _ in 0..30 {
            self.now += Duration::from_secs(1);
            for i in 0..N {
                let r = self.everyone_but(i);
                self.peers[i].tick(self.now, &r);
                let _ = self.peers[i].take_delta();
            }
            let mut news = false;
            for i in 0..N {
                let e = self.peers[i].encode();
                for j in 0..N {
                    if i != j {
                        let r = self.peers[j].merge(&e, &mut self.keys[j]);
                        news |= matches!(r, Ok(Some(_)));
                    }
                }
            }
            if !news {
                break;
            }
        }
    }

    /// The rogue sends `bytes` to every honest peer; whether any took
    /// something in.
    fn attack(&mut self, bytes: &[u8]) -> bool {
        let mut took = false;
        for j in 0..N {
            if j != ROGUE {
                took |= matches!(self.peers[j].merge(bytes, &mut self.keys[j]), Ok(Some(_)));
            }
        }
        took
    }

    /// (space owned, claims) of every honest peer, as every honest peer sees it.
    fn honest_view(&self) -> Vec<Vec<View>> {
        (0..N)
            .filter(|i| *i != ROGUE)
            .map(|viewer| {
                (0..N)
                    .filter(|i| *i != ROGUE)
                    .map(|i| (self.peers[viewer].owned_by(name(i)), self.peers[i].claims()))
                    .collect()
            })
            .collect()
    }

    fn check_no_duplicates(&self) {
        let mut seen: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
        for (i, p) in self.peers.iter().enumerate() {
            for (_, a) in p.claims() {
                if let Some(j) = seen.insert(a, i) {
                    panic!("{a} held by peers {j} and {i}");
                }
            }
        }
    }

    fn honest_digests(&self) -> BTreeSet<u64> {
        (0..N)
            .filter(|i| *i != ROGUE)
            .map(|i| self.peers[i].digest())
            .collect()
    }
}

/// A record signed by `signer`, presented as `peer`'s, carrying `key`.
fn signed(peer: PeerName, key: [u8; 32], record: Record, signer: &Identity) -> Signed {
    let msg = state::record_message(range(), peer, &record);
    Signed {
        peer,
        key,
        sig: signer.sign(state::RECORD_DOMAIN, &msg),
        record,
    }
}

fn payload(records: Vec<Signed>) -> Vec<u8> {
    Payload {
        range: Some(range()),
        ring: None,
        records,
    }
    .encode()
}

/// The whole range, as one grant from `first` to `last`.
fn everything() -> (u32, u32) {
    range().bounds()
}

#[test]
fn a_rogue_member_cannot_touch_honest_state() {
    let mut w = World::new();
    w.settle();
    let d: ipnet::Ipv4Net = "10.32.0.0/12".parse().expect("subnet");
    // Every honest peer holds a few addresses.
    for i in 0..N {
        for k in 0..3 {
            let now = w.now;
            w.peers[i]
                .allocate(now, &format!("c{i}-{k}"), d)
                .expect("allocation before the attack");
        }
    }
    w.settle();
    let before = w.honest_view();
    let victim_space = w.peers[0].owned_by(name(VICTIM));
    assert!(victim_space > 0);
    let rogue = id(ROGUE);
    let victim = id(VICTIM);
    let (lo, hi) = everything();

    // 1. A record for the victim giving all its space to the rogue, at
    //    the largest counters: signed by the rogue with its own key (which
    //    does not give the victim's name), then carrying the victim's key
    //    with the rogue's signature.
    // (One version above the victim's: only the signature stands in the way;
    // at MAX_VERSION the version bound would refuse it as well.)
    let forged = Record {
        version: version_of(&w, VICTIM) + 1,
        grants: vec![Grant {
            first: lo,
            last: hi,
            to: name(ROGUE),
            at: MAX_AT,
        }],
        ..Record::default()
    };
    let own_key = *rogue.public().as_bytes();
    let victims_key = *victim.public().as_bytes();
    assert!(!w.attack(&payload(vec![signed(
        name(VICTIM),
        own_key,
        forged.clone(),
        &rogue
    )])));
    assert!(!w.attack(&payload(vec![signed(
        name(VICTIM),
        victims_key,
        forged.clone(),
        &rogue
    )])));
    let at_max = Record {
        version: MAX_VERSION,
        ..forged.clone()
    };
    assert!(!w.attack(&payload(vec![signed(
        name(VICTIM),
        victims_key,
        at_max,
        &rogue
    )])));

    // 2. In its own record, correctly signed: it gives itself and a
    //    friend the whole range (it owns a fifth), at the largest counter;
    //    it holds the whole range; it accepts a reclaim of the live victim
    //    with itself as heir and a ring of its own, at huge rounds.
    let mut paxos = BTreeMap::new();
    let b = Ballot {
        round: 1_000,
        proposer: name(ROGUE),
    };
    paxos.insert(
        Instance::Reclaim(name(VICTIM)),
        Acceptor {
            promised: Some(b),
            accepted: Some((b, vec![name(ROGUE)])),
        },
    );
    paxos.insert(
        Instance::Ring,
        Acceptor {
            promised: Some(b),
            accepted: Some((b, vec![name(ROGUE)])),
        },
    );
    let lies = Record {
        version: rogue_version(&w) + 1,
        consensus: 1,
        paxos,
        held: vec![(lo, hi - lo + 1)],
        grants: vec![
            Grant {
                first: lo,
                last: hi,
                to: name(ROGUE),
                at: MAX_AT,
            },
            Grant {
                first: lo,
                last: hi,
                to: name(7),
                at: 1,
            },
        ],
        ..Record::default()
    };
    // Taken (it is its own record, signed), but it changes nothing of ours.
    assert!(w.attack(&payload(vec![signed(name(ROGUE), own_key, lies, &rogue)])));
    // The same with counters past every bound: refused whole.
    let over = Record {
        version: u64::MAX,
        ..Record::default()
    };
    assert!(!w.attack(&payload(vec![signed(name(ROGUE), own_key, over, &rogue)])));

    // 3. Oversized: more bytes than any payload may have, and a record with
    //    more held runs than any peer may have.
    let mut huge = vec![state::FORMAT];
    huge.resize(state::MAX_PAYLOAD + 1, 0);
    assert!(!w.attack(&huge));
    let runs = Record {
        version: MAX_VERSION,
        held: (0..(state::MAX_RUNS as u32 + 1))
            .map(|i| (lo + 2 * i, 1))
            .collect(),
        ..Record::default()
    };
    assert!(!w.attack(&payload(vec![signed(name(ROGUE), own_key, runs, &rogue)])));

    // 4. A ring header of its own to a fresh observer: not taken.
    let mut observer = Ipam::new(id(9), config(InitMode::Observer));
    let fake_ring = Payload {
        range: Some(range()),
        ring: Some(state::Ring {
            owners: vec![name(ROGUE)],
        }),
        records: vec![],
    };
    let _ = observer.merge(&fake_ring.encode(), &mut KeyBook::new());
    assert_eq!(observer.ring(), None, "a ring nobody decided was taken");

    // Honest peers go on; the rogue gossips too (its lies went out above).
    w.settle();
    w.check_no_duplicates();
    assert_eq!(w.honest_view(), before, "honest space or claims changed");
    // The rogue's own fifth went to its friend: that it may do.
    assert!(w.peers[0].owned_by(name(7)) > 0);
    assert_eq!(w.peers[0].owned_by(name(VICTIM)), victim_space);
    assert_eq!(w.honest_digests().len(), 1, "honest peers did not converge");
    // The victim still allocates, from its own space; so does everyone.
    for i in 0..N {
        if i == ROGUE {
            continue;
        }
        let now = w.now;
        w.peers[i]
            .allocate(now, "after", d)
            .expect("allocation after the attack");
        assert!(w.peers[i].owned_by(name(i)) > 0);
        assert_eq!(
            w.peers[i].status(now, &w.everyone_but(i)).problems,
            Vec::<String>::new()
        );
    }
    w.settle();
    w.check_no_duplicates();
    assert_eq!(w.honest_digests().len(), 1);
}

#[test]
fn a_rogue_cannot_rewrite_its_grants_or_jump_its_counters() {
    let mut w = World::new();
    w.settle();
    let rogue = id(ROGUE);
    let own_key = *rogue.public().as_bytes();
    let v = rogue_version(&w);
    let (lo, hi) = everything();
    let gift = Record {
        version: v + 1,
        grants: vec![Grant {
            first: lo,
            last: hi,
            to: name(7),
            at: 1,
        }],
        ..Record::default()
    };
    assert!(w.attack(&payload(vec![signed(name(ROGUE), own_key, gift, &rogue)])));
    let given = w.peers[0].owned_by(name(7));
    assert_eq!(
        given,
        w.peers[ROGUE].owned_by(name(ROGUE)),
        "it gave its own fifth"
    );
    // Now it rewrites its history: a newer version, the grant gone.
    let rewritten = Record {
        version: v + 2,
        ..Record::default()
    };
    assert!(!w.attack(&payload(vec![signed(
        name(ROGUE),
        own_key,
        rewritten,
        &rogue
    )])));
    assert_eq!(w.peers[0].owned_by(name(7)), given);
    // A version past the absolute bound, and a Paxos round far above
    // every round known, are refused.
    let ahead = Record {
        version: state::MAX_VERSION + 1,
        grants: vec![Grant {
            first: lo,
            last: hi,
            to: name(7),
            at: 1,
        }],
        ..Record::default()
    };
    assert!(!w.attack(&payload(vec![signed(name(ROGUE), own_key, ahead, &rogue)])));
    let b = Ballot {
        round: state::MAX_ROUND_STEP * 4,
        proposer: name(ROGUE),
    };
    let noise = Record {
        version: v + 3,
        grants: vec![Grant {
            first: lo,
            last: hi,
            to: name(7),
            at: 1,
        }],
        paxos: [(
            Instance::Reclaim(name(VICTIM)),
            Acceptor {
                promised: Some(b),
                accepted: None,
            },
        )]
        .into(),
        ..Record::default()
    };
    assert!(!w.attack(&payload(vec![signed(name(ROGUE), own_key, noise, &rogue)])));
}

/// The version of peer `i`'s record, as it gossips it.
fn version_of(w: &World, i: usize) -> u64 {
    let p = Payload::decode(&w.peers[i].encode()).expect("decode");
    p.records
        .iter()
        .find(|s| s.peer == name(i))
        .map_or(0, |s| s.record.version)
}

/// The version of the rogue's record.
fn rogue_version(w: &World) -> u64 {
    version_of(w, ROGUE)
}
