//! The sleeve's forwarding decision, apart from any I/O.
//!
//! Where does a frame go? A frame read from our TAP (one of our containers,
//! or the host) is addressed by its destination MAC; a message received from
//! a neighbour is addressed by the destination peer in its sleeve header
//! ([`crate::sleeve`]). Given what the daemon knows, the direct neighbours,
//! the topology's [`Routes`] and the [`MacTable`], [`from_tap`] and
//! [`from_peer`] say where it goes, as a [`Decision`] value; the daemon's
//! sleeve (`src/sleeve.rs`) does the sending.
//!
//! The rules:
//!
//! - From the TAP, a unicast MAC whose owner is known and reachable goes to
//!   that peer, straight or through the next hop of the unicast route.
//!   Everything else (broadcast, multicast, unknown MACs, MACs of peers we
//!   can no longer reach) is flooded along our own broadcast tree.
//! - From a neighbour, a message for us is delivered locally; one for another
//!   peer is relayed along the unicast route, never back to the neighbour it
//!   came from; a broadcast is delivered locally and forwarded only along
//!   the origin's broadcast tree, never back to the neighbour it came from
//!   nor to its origin, so it cannot loop. A message claiming to come from
//!   us is dropped.
//! - A message that arrives having been relayed [`MAX_HOPS`] times is still
//!   delivered when it is for us (or a broadcast), but relayed no further
//!   ([`Decision::HopLimit`]): whatever the routes say for a moment (two
//!   peers whose views of the topology disagree can route through each
//!   other), no message circles for long.
//!
//! Before the first routes arrive, our own broadcasts go to every direct
//! neighbour and others' are not forwarded.
//!
//! No work per frame grows with the mesh: unicast decisions are hash
//! lookups, and the neighbours each source's broadcasts go on to are
//! computed once, when the neighbours or the routes change ([`Floods`]), and
//! shared with every decision that floods ([`Fan`]: one reference count, no
//! copy, no allocation). Sending a copy to each hop is the only work that
//! grows, and only with the fan-out.
//!
//! MAC learning is a pure step too: [`MacTable::learn`] records that a
//! unicast source MAC lives behind the peer that sent it, and says when it
//! cannot ([`Learn`]): the MACs of this host's own containers and bridge
//! ([`MacTable::set_local`]) never live behind a peer, and a peer's frames
//! from more source MACs than the table holds for it are not learnt. The
//! sleeve drops such frames rather than hand them to the kernel bridge,
//! which would learn them too.

use crate::name::PeerName;
pub use crate::sleeve::MAX_HOPS;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An Ethernet address.
pub type Mac = [u8; 6];

/// Whether `mac` is a unicast address (the group bit is clear).
pub fn is_unicast(mac: &Mac) -> bool {
    mac[0] & 1 == 0
}

/// Where to send frames for peers we are not directly connected to, as the
/// topology computed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// Destination peer → the neighbour to send through.
    pub unicast: HashMap<PeerName, PeerName>,
    /// Source peer → the neighbours its broadcasts go on to from here.
    pub broadcast: HashMap<PeerName, Vec<PeerName>>,
}

impl Routes {
    /// The direct neighbour to send through towards `dst`: `dst` itself
    /// when it is a neighbour, else the unicast route's next hop, if that is
    /// a neighbour.
    pub fn next_hop<V>(
        &self,
        neighbours: &HashMap<PeerName, V>,
        dst: PeerName,
    ) -> Option<PeerName> {
        if neighbours.contains_key(&dst) {
            return Some(dst);
        }
        self.unicast
            .get(&dst)
            .copied()
            .filter(|h| neighbours.contains_key(h))
    }

    /// Whether `peer` is a neighbour or has a unicast route.
    pub fn reaches<V>(&self, neighbours: &HashMap<PeerName, V>, peer: PeerName) -> bool {
        neighbours.contains_key(&peer) || self.unicast.contains_key(&peer)
    }
}

/// Neighbours, each with the caller's value for it, shared.
type Hops<V> = Arc<[(PeerName, V)]>;

/// Per broadcast source, the direct neighbours its broadcasts go on to from
/// here: the hops of its tree in [`Routes::broadcast`] that are neighbours,
/// in the tree's order, each with the caller's value for that neighbour
/// (the daemon's: the neighbour's session). Our own broadcasts, before the
/// routes give us a tree, go to every neighbour; others' without a tree
/// nowhere.
///
/// Built whole by [`Floods::new`] whenever the neighbours or the routes
/// change (sources with the same hops share one list), so that deciding
/// where a broadcast goes ([`from_tap`], [`from_peer`]) is one lookup and
/// allocates nothing, however many peers the mesh has.
#[derive(Clone)]
pub struct Floods<V> {
    me: PeerName,
    /// Where our own broadcasts go.
    own: Hops<V>,
    /// Other sources whose broadcasts go on from here (sources not listed
    /// go nowhere).
    others: HashMap<PeerName, Hops<V>>,
    /// The empty list.
    none: Hops<V>,
}

impl<V: Clone> Floods<V> {
    /// Where each source's broadcasts go from `me`, given the direct
    /// `neighbours` and the `routes`.
    pub fn new(me: PeerName, neighbours: &HashMap<PeerName, V>, routes: &Routes) -> Floods<V> {
        let none: Hops<V> = Arc::from(Vec::new());
        let mut shared: HashMap<Vec<PeerName>, Hops<V>> = HashMap::new();
        let mut list = |hops: &mut dyn Iterator<Item = PeerName>| -> Hops<V> {
            let names: Vec<PeerName> = hops.filter(|h| neighbours.contains_key(h)).collect();
            if names.is_empty() {
                return none.clone();
            }
            shared
                .entry(names)
                .or_insert_with_key(|names| {
                    names
                        .iter()
                        .filter_map(|n| neighbours.get(n).map(|v| (*n, v.clone())))
                        .collect()
                })
                .clone()
        };
        let mut others = HashMap::new();
        for (src, hops) in &routes.broadcast {
            if *src == me {
                continue;
            }
            let l = list(&mut hops.iter().copied());
            if !l.is_empty() {
                others.insert(*src, l);
            }
        }
        let own = match routes.broadcast.get(&me) {
            Some(hops) => list(&mut hops.iter().copied()),
            None => list(&mut neighbours.keys().copied()),
        };
        Floods {
            me,
            own,
            others,
            none,
        }
    }
}

impl<V> Floods<V> {
    /// The peer these are for.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// Where broadcasts from `src` go on to, before leaving out their
    /// sender and origin.
    fn of(&self, src: PeerName) -> &Hops<V> {
        if src == self.me {
            return &self.own;
        }
        self.others.get(&src).unwrap_or(&self.none)
    }
}

/// The neighbours a flooded frame goes to ([`Decision::Flood`]): a list of
/// [`Floods`] (shared, not copied), less the neighbour the frame came from
/// and the peer it came from first.
#[derive(Clone)]
pub struct Fan<V> {
    hops: Hops<V>,
    skip: [Option<PeerName>; 2],
}

impl<V> Fan<V> {
    /// Each neighbour, and the caller's value for it.
    pub fn iter(&self) -> impl Iterator<Item = (PeerName, &V)> + '_ {
        self.hops
            .iter()
            .filter(|(n, _)| !self.skip.contains(&Some(*n)))
            .map(|(n, v)| (*n, v))
    }

    /// Whether it goes to no neighbour.
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// The neighbours' names, in order.
    pub fn names(&self) -> Vec<PeerName> {
        self.iter().map(|(n, _)| n).collect()
    }
}

impl<V> std::fmt::Debug for Fan<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter().map(|(n, _)| n)).finish()
    }
}

/// Which peer each remote MAC lives behind, learnt from frames that arrived
/// over the overlay. Bounded: at most [`MacTable::PER_PEER`] MACs behind
/// one peer and [`MacTable::TOTAL`] in all (a peer sending from ever new
/// source MACs stops being learnt, and frames to MACs not learnt are
/// flooded along the broadcast tree, which still delivers them); the MACs
/// of peers that become unreachable are forgotten. This host's own MACs
/// ([`MacTable::set_local`]) are never learnt behind a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MacTable {
    /// MAC → the peer it lives behind, and the tick it was learnt at.
    owners: HashMap<Mac, (PeerName, u64)>,
    per_peer: HashMap<PeerName, u32>,
    /// Per peer, its MACs in the order they were learnt (entries that no
    /// longer match `owners` are stale and skipped).
    order: HashMap<PeerName, VecDeque<(u64, Mac)>>,
    local: HashSet<Mac>,
    /// The clock, in seconds, as [`MacTable::tick`] last set it.
    now: u64,
    start: Option<Instant>,
}

/// What [`MacTable::learn`] made of a frame's source MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learn {
    /// Now known to live behind the sending peer (new, or moved to it).
    Learned,
    /// Already known behind that peer: nothing changed.
    Known,
    /// One of this host's own MACs: a peer claims it. Not learnt; the frame
    /// must not reach our bridge.
    Local,
    /// Not known behind that peer, and the peer's bound or the total bound
    /// is reached: not learnt; the frame must not reach our bridge either
    /// (which would learn it, unbounded).
    Full,
    /// A group address (broadcast or multicast): never learnt.
    NotUnicast,
    /// The frame claims to come from us: never learnt.
    FromUs,
}

impl Learn {
    /// Whether a frame with this source MAC may be written to our TAP.
    pub fn deliverable(self) -> bool {
        !matches!(self, Learn::Local | Learn::Full)
    }
}

impl MacTable {
    /// The most MACs learnt behind one peer.
    pub const PER_PEER: u32 = 4_096;
    /// The most MACs learnt in all.
    pub const TOTAL: usize = 65_536;
    /// The most local MACs held.
    pub const MAX_LOCAL: usize = 65_536;

    /// How long a MAC learnt behind a peer is kept at the least before a
    /// peer at its bound may replace it with a new one: the kernel bridge's
    /// ageing time, so the bridge, which learns whatever reaches the TAP,
    /// never holds many more of a peer's MACs than this table does, while a
    /// host whose containers come and go keeps being learnt.
    pub const REPLACE_AFTER: Duration = Duration::from_secs(300);

    /// An empty table.
    pub fn new() -> MacTable {
        MacTable::default()
    }

    /// Tell the table the time (the sleeve does, every second).
    pub fn tick(&mut self, now: Instant) {
        let start = *self.start.get_or_insert(now);
        self.now = now.saturating_duration_since(start).as_secs();
    }

    /// The peer `mac` lives behind, if known.
    pub fn owner(&self, mac: &Mac) -> Option<PeerName> {
        self.owners.get(mac).map(|(p, _)| *p)
    }

    /// The oldest MAC still learnt behind `peer` and when, if any.
    fn oldest(&self, peer: &PeerName) -> Option<(u64, Mac)> {
        self.order
            .get(peer)?
            .iter()
            .find(|(t, m)| self.owners.get(m) == Some(&(*peer, *t)))
            .copied()
    }

    /// Whether `peer`'s oldest MAC may give way to a new one.
    fn may_replace(&self, peer: &PeerName) -> bool {
        self.oldest(peer)
            .is_some_and(|(t, _)| self.now.saturating_sub(t) >= Self::REPLACE_AFTER.as_secs())
    }

    /// How many MACs are known.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// Whether no MAC is known.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// Replace the set of this host's own MACs (its containers' and its
    /// bridge's; at most [`MacTable::MAX_LOCAL`] are kept), and forget any of
    /// them learnt behind a peer.
    pub fn set_local(&mut self, macs: impl IntoIterator<Item = Mac>) {
        self.local = macs.into_iter().take(Self::MAX_LOCAL).collect();
        let local = &self.local;
        let before = self.owners.len();
        self.owners.retain(|m, _| !local.contains(m));
        if self.owners.len() != before {
            self.rebuild();
        }
    }

    /// Whether `mac` is one of this host's own.
    pub fn is_local(&self, mac: &Mac) -> bool {
        self.local.contains(mac)
    }

    /// What [`MacTable::learn`] would do, without doing it: lets a caller
    /// that shares the table look under a read lock first, and take the
    /// write lock only for [`Learn::Learned`].
    pub fn check(&self, me: PeerName, src: PeerName, mac: &Mac) -> Learn {
        if !is_unicast(mac) {
            return Learn::NotUnicast;
        }
        if src == me {
            return Learn::FromUs;
        }
        if self.local.contains(mac) {
            return Learn::Local;
        }
        if self.owner(mac) == Some(src) {
            return Learn::Known;
        }
        let full = self.per_peer.get(&src).copied().unwrap_or(0) >= Self::PER_PEER
            || (self.owners.len() >= Self::TOTAL && !self.owners.contains_key(mac));
        if full && !self.may_replace(&src) {
            return Learn::Full;
        }
        Learn::Learned
    }

    /// Remember that `mac`, the source of a frame sent by peer `src`, lives
    /// behind `src` (unicast MACs of other peers, not our own, within the
    /// bounds), and say what became of it.
    pub fn learn(&mut self, me: PeerName, src: PeerName, mac: Mac) -> Learn {
        let l = self.check(me, src, &mac);
        if l != Learn::Learned {
            return l;
        }
        let full = self.per_peer.get(&src).copied().unwrap_or(0) >= Self::PER_PEER
            || (self.owners.len() >= Self::TOTAL && !self.owners.contains_key(&mac));
        if full {
            // `check` found src's oldest old enough: it gives way.
            if let Some((_, gone)) = self.oldest(&src) {
                self.owners.remove(&gone);
                if let Some(n) = self.per_peer.get_mut(&src) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        if let Some((old, _)) = self.owners.insert(mac, (src, self.now)) {
            if let Some(n) = self.per_peer.get_mut(&old) {
                *n = n.saturating_sub(1);
            }
        }
        *self.per_peer.entry(src).or_insert(0) += 1;
        let q = self.order.entry(src).or_default();
        q.push_back((self.now, mac));
        // Drop stale entries (moved or replaced MACs) before they pile up.
        if q.len() > 2 * Self::PER_PEER as usize {
            let owners = &self.owners;
            q.retain(|(t, m)| owners.get(m) == Some(&(src, *t)));
        }
        l
    }

    /// Forget the MACs behind peers that are neither neighbours nor have a
    /// unicast route.
    pub fn forget_unreachable<V>(&mut self, neighbours: &HashMap<PeerName, V>, routes: &Routes) {
        self.owners
            .retain(|_, (p, _)| routes.reaches(neighbours, *p));
        self.rebuild();
    }

    /// Recount the peers' MACs and drop stale order entries, after entries
    /// were removed.
    fn rebuild(&mut self) {
        self.per_peer.clear();
        for (p, _) in self.owners.values() {
            *self.per_peer.entry(*p).or_insert(0) += 1;
        }
        let owners = &self.owners;
        self.order.retain(|p, q| {
            q.retain(|(t, m)| owners.get(m) == Some(&(*p, *t)));
            !q.is_empty()
        });
    }
}

/// Why a frame goes nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A neighbour sent us a message that claims to come from us.
    FromUs,
    /// No neighbour leads to the destination peer (other than the one the
    /// message came from).
    NoRoute,
}

/// Whether a message that arrived having been relayed `hops` times may be
/// relayed again.
pub fn may_relay(hops: u8) -> bool {
    hops < MAX_HOPS
}

/// Where a frame goes. [`from_tap`] and [`from_peer`] give the hops of a
/// flood as a [`Fan`]; `Decision` alone (hops as names) is what
/// [`Decision::named`] makes of it, to compare and print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<H = Vec<PeerName>> {
    /// To our TAP only.
    Local,
    /// To the neighbour that is the destination peer.
    Direct(PeerName),
    /// To neighbour `via`, for peer `to` further on.
    Relay {
        /// The neighbour to send through.
        via: PeerName,
        /// The destination peer.
        to: PeerName,
    },
    /// Addressed to every peer: to each of `hops` (the neighbours along the
    /// broadcast tree, possibly none), and to our TAP too when `local`.
    Flood {
        /// The neighbours to send a copy to.
        hops: H,
        /// Whether our TAP gets it too.
        local: bool,
    },
    /// Relayed nowhere: the message has been relayed [`MAX_HOPS`] times
    /// already and should have gone on. Delivered to our TAP when `local`
    /// (a broadcast).
    HopLimit {
        /// Whether our TAP gets it.
        local: bool,
    },
    /// Nowhere.
    Drop(DropReason),
}

impl<V> Decision<Fan<V>> {
    /// The same decision, a flood's hops as names.
    pub fn named(&self) -> Decision {
        match self {
            Decision::Local => Decision::Local,
            Decision::Direct(to) => Decision::Direct(*to),
            Decision::Relay { via, to } => Decision::Relay { via: *via, to: *to },
            Decision::Flood { hops, local } => Decision::Flood {
                hops: hops.names(),
                local: *local,
            },
            Decision::HopLimit { local } => Decision::HopLimit { local: *local },
            Decision::Drop(why) => Decision::Drop(*why),
        }
    }
}

/// A unicast decision: `to` itself when `via` is `to`.
fn towards<H>(via: PeerName, to: PeerName) -> Decision<H> {
    if via == to {
        Decision::Direct(to)
    } else {
        Decision::Relay { via, to }
    }
}

/// Where a frame read from our TAP, for `dst_mac`, goes.
///
/// `neighbours` are the directly connected peers (the values are not
/// looked at), `routes` the topology's routes, `floods` what was made of
/// both ([`Floods::new`], for us), `macs` what was learnt.
pub fn from_tap<V>(
    floods: &Floods<V>,
    neighbours: &HashMap<PeerName, V>,
    routes: &Routes,
    macs: &MacTable,
    dst_mac: Mac,
) -> Decision<Fan<V>> {
    let owner = if is_unicast(&dst_mac) {
        macs.owner(&dst_mac)
    } else {
        None
    };
    if let Some((via, to)) = owner.and_then(|p| routes.next_hop(neighbours, p).map(|h| (h, p))) {
        return towards(via, to);
    }
    Decision::Flood {
        hops: Fan {
            hops: floods.own.clone(),
            skip: [None, None],
        },
        local: false,
    }
}

/// Where a message that neighbour `from` sent us, from peer `src` for peer
/// `dst` ([`PeerName::BROADCAST`] for a broadcast), relayed `hops` times
/// before it reached us, goes (`floods` as for [`from_tap`]).
pub fn from_peer<V>(
    floods: &Floods<V>,
    neighbours: &HashMap<PeerName, V>,
    routes: &Routes,
    from: PeerName,
    src: PeerName,
    dst: PeerName,
    hops: u8,
) -> Decision<Fan<V>> {
    let me = floods.me;
    if src == me {
        return Decision::Drop(DropReason::FromUs);
    }
    if dst.is_broadcast() {
        let next = Fan {
            hops: floods.of(src).clone(),
            skip: [Some(from), Some(src)],
        };
        if !next.is_empty() && !may_relay(hops) {
            return Decision::HopLimit { local: true };
        }
        return Decision::Flood {
            hops: next,
            local: true,
        };
    }
    if dst == me {
        return Decision::Local;
    }
    match routes.next_hop(neighbours, dst).filter(|h| *h != from) {
        Some(_) if !may_relay(hops) => Decision::HopLimit { local: false },
        Some(via) => towards(via, dst),
        None => Decision::Drop(DropReason::NoRoute),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u8) -> PeerName {
        PeerName([2, 0, 0, 0, 0, n])
    }

    fn mac(n: u8) -> Mac {
        [0x0a, 0, 0, 0, 0, n]
    }

    const ME: u8 = 1;

    /// [`super::from_tap`] with the floods of `n` and `r` built for it,
    /// hops as names.
    fn from_tap(
        me: PeerName,
        n: &HashMap<PeerName, ()>,
        r: &Routes,
        macs: &MacTable,
        dst_mac: Mac,
    ) -> Decision {
        super::from_tap(&Floods::new(me, n, r), n, r, macs, dst_mac).named()
    }

    /// [`super::from_peer`] likewise.
    fn from_peer(
        me: PeerName,
        n: &HashMap<PeerName, ()>,
        r: &Routes,
        from: PeerName,
        src: PeerName,
        dst: PeerName,
        hops: u8,
    ) -> Decision {
        super::from_peer(&Floods::new(me, n, r), n, r, from, src, dst, hops).named()
    }

    /// The floods are computed once: sources with the same hops share one
    /// list, each decision shares it too (no copy), and it follows the
    /// neighbours and routes it was built from only when built again.
    #[test]
    fn floods_are_shared_and_rebuilt() {
        let (mut n, mut r) = line();
        // 3 and 4 both go on to 5 only.
        let f = Floods::new(p(ME), &n, &r);
        assert!(Arc::ptr_eq(f.of(p(3)), f.of(p(4))));
        assert_eq!(f.of(p(9)).len(), 0);
        let d = super::from_peer(&f, &n, &r, p(2), p(3), PeerName::BROADCAST, 0);
        match &d {
            Decision::Flood { hops, local: true } => {
                assert!(Arc::ptr_eq(&hops.hops, f.of(p(3))));
                assert_eq!(hops.names(), vec![p(5)]);
                assert_eq!(format!("{hops:?}"), format!("{:?}", [p(5)]));
            }
            d => panic!("{:?}", d.named()),
        }
        // 5 gone: 3's broadcasts go nowhere, once the floods are rebuilt.
        n.remove(&p(5));
        let f = Floods::new(p(ME), &n, &r);
        assert!(f.of(p(3)).is_empty());
        // Our own tree replaced by routes that leave us without one: every
        // neighbour.
        r.broadcast.remove(&p(ME));
        n.insert(p(7), ());
        let f = Floods::new(p(ME), &n, &r);
        let mut own: Vec<PeerName> = f.of(p(ME)).iter().map(|(h, _)| *h).collect();
        own.sort();
        assert_eq!(own, vec![p(2), p(7)]);
    }

    /// A line `1 — 2 — 3 — 4` seen from 1, plus neighbour 5: 2 and 5 are
    /// neighbours, 3 and 4 are reached through 2.
    fn line() -> (HashMap<PeerName, ()>, Routes) {
        let neighbours: HashMap<PeerName, ()> = [(p(2), ()), (p(5), ())].into_iter().collect();
        let mut routes = Routes::default();
        routes.unicast.insert(p(2), p(2));
        routes.unicast.insert(p(5), p(5));
        routes.unicast.insert(p(3), p(2));
        routes.unicast.insert(p(4), p(2));
        // Our broadcasts go to both neighbours; 2's to 5 through us; 5's to
        // 2; 3's and 4's arrive through 2 and go on to 5.
        routes.broadcast.insert(p(ME), vec![p(2), p(5)]);
        routes.broadcast.insert(p(2), vec![p(5)]);
        routes.broadcast.insert(p(5), vec![p(2)]);
        routes.broadcast.insert(p(3), vec![p(5)]);
        routes.broadcast.insert(p(4), vec![p(5)]);
        (neighbours, routes)
    }

    fn sorted(d: Decision) -> Decision {
        match d {
            Decision::Flood { mut hops, local } => {
                hops.sort();
                Decision::Flood { hops, local }
            }
            d => d,
        }
    }

    #[test]
    fn unknown_unicast_from_tap_floods_along_our_tree() {
        let (n, r) = line();
        let d = from_tap(p(ME), &n, &r, &MacTable::new(), mac(9));
        assert_eq!(
            sorted(d),
            Decision::Flood {
                hops: vec![p(2), p(5)],
                local: false
            }
        );
    }

    #[test]
    fn our_tree_reaches_only_connected_neighbours() {
        let (mut n, r) = line();
        n.remove(&p(5));
        let d = from_tap(p(ME), &n, &r, &MacTable::new(), mac(9));
        assert_eq!(
            d,
            Decision::Flood {
                hops: vec![p(2)],
                local: false
            }
        );
    }

    #[test]
    fn before_routes_our_broadcasts_go_to_every_neighbour() {
        let (n, _) = line();
        let d = from_tap(p(ME), &n, &Routes::default(), &MacTable::new(), [0xff; 6]);
        assert_eq!(
            sorted(d),
            Decision::Flood {
                hops: vec![p(2), p(5)],
                local: false
            }
        );
    }

    #[test]
    fn mac_learning_is_bounded_per_peer_and_in_all() {
        let mut macs = MacTable::new();
        let m = |i: u32| -> Mac {
            let b = i.to_be_bytes();
            [2, 0, b[0], b[1], b[2], b[3]]
        };
        for i in 0..MacTable::PER_PEER + 10 {
            macs.learn(p(ME), p(5), m(i));
        }
        assert_eq!(macs.len(), MacTable::PER_PEER as usize);
        // Another peer still learns, and a MAC that moves is counted once.
        assert_eq!(macs.learn(p(ME), p(6), m(0)), Learn::Learned);
        assert_eq!(
            macs.learn(p(ME), p(5), m(MacTable::PER_PEER + 20)),
            Learn::Learned
        );
        assert_eq!(macs.len(), MacTable::PER_PEER as usize + 1);
        // Full again: a new MAC is refused, a known one is still known.
        assert_eq!(
            macs.learn(p(ME), p(5), m(MacTable::PER_PEER + 21)),
            Learn::Full
        );
        assert_eq!(macs.learn(p(ME), p(5), m(1)), Learn::Known);
        let mut n = 7u8;
        let mut i = 100_000u32;
        while macs.len() < MacTable::TOTAL {
            if macs.learn(p(ME), p(n), m(i)) != Learn::Learned {
                n += 1;
            }
            i += 1;
        }
        assert_eq!(macs.learn(p(ME), p(n + 1), m(i + 1)), Learn::Full);
        // A MAC already known may still move within the total bound.
        assert_eq!(macs.learn(p(ME), p(n + 1), m(1)), Learn::Learned);
        assert_eq!(macs.len(), MacTable::TOTAL);
    }

    /// A peer at its bound gets new MACs learnt once its oldest has been
    /// held for [`MacTable::REPLACE_AFTER`] (a host whose containers come
    /// and go keeps working), never sooner (a flood of new MACs stays
    /// bounded per ageing time).
    #[test]
    fn a_full_peer_replaces_its_oldest_mac_after_the_ageing_time() {
        let m = |i: u32| -> Mac {
            let b = i.to_be_bytes();
            [2, 0, b[0], b[1], b[2], b[3]]
        };
        let t0 = Instant::now();
        let mut macs = MacTable::new();
        macs.tick(t0);
        for i in 0..MacTable::PER_PEER {
            assert_eq!(macs.learn(p(ME), p(5), m(i)), Learn::Learned);
        }
        let new = m(MacTable::PER_PEER);
        assert_eq!(macs.learn(p(ME), p(5), new), Learn::Full);
        macs.tick(t0 + MacTable::REPLACE_AFTER - Duration::from_secs(1));
        assert_eq!(macs.learn(p(ME), p(5), new), Learn::Full);
        macs.tick(t0 + MacTable::REPLACE_AFTER);
        assert_eq!(macs.check(p(ME), p(5), &new), Learn::Learned);
        assert_eq!(macs.learn(p(ME), p(5), new), Learn::Learned);
        // The oldest gave way; the count is unchanged.
        assert_eq!(macs.owner(&m(0)), None);
        assert_eq!(macs.owner(&new), Some(p(5)));
        assert_eq!(macs.len(), MacTable::PER_PEER as usize);
        // A MAC that moved away frees its slot and is not the oldest any
        // more: the next to give way is m(2), not m(1).
        assert_eq!(macs.learn(p(ME), p(6), m(1)), Learn::Learned);
        assert_eq!(macs.learn(p(ME), p(5), m(9_999_998)), Learn::Learned);
        assert_eq!(macs.owner(&m(2)), Some(p(5)));
        assert_eq!(macs.learn(p(ME), p(5), m(9_999_999)), Learn::Learned);
        assert_eq!(macs.owner(&m(2)), None);
        assert_eq!(macs.owner(&m(1)), Some(p(6)));
    }

    #[test]
    fn known_mac_of_a_neighbour_goes_direct() {
        let (n, r) = line();
        let mut macs = MacTable::new();
        assert_eq!(macs.learn(p(ME), p(5), mac(5)), Learn::Learned);
        assert_eq!(
            from_tap(p(ME), &n, &r, &macs, mac(5)),
            Decision::Direct(p(5))
        );
    }

    #[test]
    fn known_mac_behind_a_far_peer_goes_through_the_next_hop() {
        let (n, r) = line();
        let mut macs = MacTable::new();
        macs.learn(p(ME), p(4), mac(4));
        assert_eq!(
            from_tap(p(ME), &n, &r, &macs, mac(4)),
            Decision::Relay {
                via: p(2),
                to: p(4)
            }
        );
    }

    #[test]
    fn broadcast_and_multicast_from_tap_flood_even_if_learnt() {
        let (n, r) = line();
        let mut macs = MacTable::new();
        let multicast = [0x01, 0x00, 0x5e, 0, 0, 1];
        // Group addresses are never learnt ...
        assert_eq!(macs.learn(p(ME), p(5), multicast), Learn::NotUnicast);
        assert_eq!(macs.learn(p(ME), p(5), [0xff; 6]), Learn::NotUnicast);
        assert!(macs.is_empty());
        // ... and always flooded.
        for dst in [multicast, [0xff; 6], [0x33, 0x33, 0, 0, 0, 1]] {
            assert_eq!(
                sorted(from_tap(p(ME), &n, &r, &macs, dst)),
                Decision::Flood {
                    hops: vec![p(2), p(5)],
                    local: false
                }
            );
        }
    }

    #[test]
    fn mac_of_an_unreachable_peer_floods() {
        let (n, mut r) = line();
        let mut macs = MacTable::new();
        macs.learn(p(ME), p(4), mac(4));
        // 4 is gone from the topology, its MAC not yet forgotten.
        r.unicast.remove(&p(4));
        assert_eq!(
            sorted(from_tap(p(ME), &n, &r, &macs, mac(4))),
            Decision::Flood {
                hops: vec![p(2), p(5)],
                local: false
            }
        );
        // A route through a neighbour that is no longer connected is no
        // route either.
        let (mut n, r) = line();
        n.remove(&p(2));
        assert_eq!(
            from_tap(p(ME), &n, &r, &macs, mac(4)),
            Decision::Flood {
                hops: vec![p(5)],
                local: false
            }
        );
    }

    #[test]
    fn unreachable_peers_macs_are_forgotten() {
        let (n, mut r) = line();
        let mut macs = MacTable::new();
        macs.learn(p(ME), p(4), mac(4));
        macs.learn(p(ME), p(3), mac(3));
        macs.learn(p(ME), p(5), mac(5));
        r.unicast.remove(&p(4));
        macs.forget_unreachable(&n, &r);
        assert_eq!(macs.owner(&mac(4)), None);
        assert_eq!(macs.owner(&mac(3)), Some(p(3)));
        assert_eq!(macs.owner(&mac(5)), Some(p(5)));
        assert_eq!(macs.len(), 2);
    }

    #[test]
    fn our_own_mac_is_never_learnt_so_it_floods_like_an_unknown_one() {
        let (n, r) = line();
        let mut macs = MacTable::new();
        // A frame of ours that came back (a message claiming to be from us).
        assert_eq!(macs.learn(p(ME), p(ME), mac(1)), Learn::FromUs);
        assert_eq!(macs.owner(&mac(1)), None);
        assert_eq!(
            sorted(from_tap(p(ME), &n, &r, &macs, mac(1))),
            Decision::Flood {
                hops: vec![p(2), p(5)],
                local: false
            }
        );
    }

    #[test]
    fn learning_moves_a_mac_to_its_new_peer_once() {
        let mut macs = MacTable::new();
        assert_eq!(macs.check(p(ME), p(3), &mac(7)), Learn::Learned);
        assert_eq!(macs.learn(p(ME), p(3), mac(7)), Learn::Learned);
        assert_eq!(macs.check(p(ME), p(3), &mac(7)), Learn::Known);
        assert_eq!(macs.learn(p(ME), p(3), mac(7)), Learn::Known);
        // The container moved to another host.
        assert_eq!(macs.learn(p(ME), p(4), mac(7)), Learn::Learned);
        assert_eq!(macs.owner(&mac(7)), Some(p(4)));
    }

    #[test]
    fn message_for_us_is_delivered_locally() {
        let (n, r) = line();
        assert_eq!(
            from_peer(p(ME), &n, &r, p(2), p(3), p(ME), 0),
            Decision::Local
        );
    }

    #[test]
    fn message_for_a_peer_behind_a_third_is_relayed() {
        let (n, r) = line();
        // From 5, for 4, which lies behind 2.
        assert_eq!(
            from_peer(p(ME), &n, &r, p(5), p(5), p(4), 0),
            Decision::Relay {
                via: p(2),
                to: p(4)
            }
        );
        // From 2 (on behalf of 3), for neighbour 5: straight to it.
        assert_eq!(
            from_peer(p(ME), &n, &r, p(2), p(3), p(5), 0),
            Decision::Direct(p(5))
        );
    }

    #[test]
    fn relaying_never_goes_back_to_the_sender() {
        let (n, r) = line();
        // 2 sends us something for 4, but our route to 4 is through 2.
        assert_eq!(
            from_peer(p(ME), &n, &r, p(2), p(2), p(4), 0),
            Decision::Drop(DropReason::NoRoute)
        );
    }

    #[test]
    fn message_for_an_unreachable_peer_is_dropped() {
        let (n, r) = line();
        assert_eq!(
            from_peer(p(ME), &n, &r, p(2), p(3), p(9), 0),
            Decision::Drop(DropReason::NoRoute)
        );
    }

    #[test]
    fn message_claiming_to_be_from_us_is_dropped() {
        let (n, r) = line();
        for dst in [p(ME), p(5), PeerName::BROADCAST] {
            assert_eq!(
                from_peer(p(ME), &n, &r, p(2), p(ME), dst, 0),
                Decision::Drop(DropReason::FromUs)
            );
        }
    }

    #[test]
    fn broadcast_from_a_peer_follows_only_its_tree() {
        let (n, r) = line();
        // 3's broadcast arrives through 2: delivered, and on to 5 only.
        assert_eq!(
            from_peer(p(ME), &n, &r, p(2), p(3), PeerName::BROADCAST, 0),
            Decision::Flood {
                hops: vec![p(5)],
                local: true
            }
        );
        // 5's broadcast goes on to 2, not back to 5.
        assert_eq!(
            from_peer(p(ME), &n, &r, p(5), p(5), PeerName::BROADCAST, 0),
            Decision::Flood {
                hops: vec![p(2)],
                local: true
            }
        );
    }

    #[test]
    fn broadcast_never_goes_back_to_its_sender_or_origin() {
        let (n, mut r) = line();
        // Even with a tree that (wrongly) lists them.
        r.broadcast.insert(p(3), vec![p(2), p(3), p(5)]);
        assert_eq!(
            from_peer(p(ME), &n, &r, p(2), p(3), PeerName::BROADCAST, 0),
            Decision::Flood {
                hops: vec![p(5)],
                local: true
            }
        );
        // The origin itself a neighbour, its frame relayed to us by another.
        r.broadcast.insert(p(5), vec![p(2), p(5)]);
        assert_eq!(
            from_peer(p(ME), &n, &r, p(2), p(5), PeerName::BROADCAST, 0),
            Decision::Flood {
                hops: vec![],
                local: true
            }
        );
    }

    #[test]
    fn broadcast_of_an_origin_without_a_tree_is_only_delivered() {
        let (n, r) = line();
        assert_eq!(
            from_peer(p(ME), &n, &r, p(2), p(9), PeerName::BROADCAST, 0),
            Decision::Flood {
                hops: vec![],
                local: true
            }
        );
        assert_eq!(
            from_peer(
                p(ME),
                &n,
                &Routes::default(),
                p(2),
                p(2),
                PeerName::BROADCAST,
                0
            ),
            Decision::Flood {
                hops: vec![],
                local: true
            }
        );
    }

    /// Flooding along the trees of a ring never reaches a peer twice: each
    /// peer applies [`from_peer`] to what it receives, and the walk ends.
    #[test]
    fn a_broadcast_on_a_ring_reaches_everyone_once() {
        // Ring 1-2-3-4-1; trees rooted at 1: 1→2, 1→4, 2→3.
        let links = [(1, 2), (2, 3), (3, 4), (4, 1)];
        let neighbours = |me: u8| -> HashMap<PeerName, ()> {
            links
                .iter()
                .filter_map(|&(a, b)| match () {
                    _ if a == me => Some((p(b), ())),
                    _ if b == me => Some((p(a), ())),
                    _ => None,
                })
                .collect()
        };
        let tree = |me: u8| -> Routes {
            let mut r = Routes::default();
            let hops = match me {
                1 => vec![p(2), p(4)],
                2 => vec![p(3)],
                _ => vec![],
            };
            r.broadcast.insert(p(1), hops);
            r
        };
        let mut delivered = vec![];
        let mut queue: Vec<(u8, u8)> =
            match from_tap(p(1), &neighbours(1), &tree(1), &MacTable::new(), [0xff; 6]) {
                Decision::Flood { hops, .. } => hops.iter().map(|h| (1, h.0[5])).collect(),
                d => panic!("{d:?}"),
            };
        let mut steps = 0;
        while let Some((from, at)) = queue.pop() {
            steps += 1;
            assert!(steps < 100, "the broadcast loops");
            match from_peer(
                p(at),
                &neighbours(at),
                &tree(at),
                p(from),
                p(1),
                PeerName::BROADCAST,
                0,
            ) {
                Decision::Flood { hops, local: true } => {
                    delivered.push(at);
                    queue.extend(hops.iter().map(|h| (at, h.0[5])));
                }
                d => panic!("{d:?}"),
            }
        }
        delivered.sort();
        assert_eq!(delivered, vec![2, 3, 4]);
    }

    #[test]
    fn local_macs_are_never_learnt_behind_a_peer() {
        let (n, r) = line();
        let mut macs = MacTable::new();
        assert_eq!(macs.learn(p(ME), p(5), mac(7)), Learn::Learned);
        assert_eq!(macs.learn(p(ME), p(5), mac(8)), Learn::Learned);
        // mac(7) is (now) one of our containers': what was learnt goes.
        macs.set_local([mac(7), mac(1)]);
        assert!(macs.is_local(&mac(7)));
        assert_eq!(macs.owner(&mac(7)), None);
        assert_eq!(macs.owner(&mac(8)), Some(p(5)));
        assert_eq!(macs.len(), 1);
        for peer in [p(5), p(4)] {
            assert_eq!(macs.check(p(ME), peer, &mac(7)), Learn::Local);
            assert_eq!(macs.learn(p(ME), peer, mac(7)), Learn::Local);
            assert!(!Learn::Local.deliverable());
        }
        assert_eq!(macs.owner(&mac(7)), None);
        // Frames for it from our TAP are not sent to the claimant.
        assert_eq!(
            sorted(from_tap(p(ME), &n, &r, &macs, mac(7))),
            Decision::Flood {
                hops: vec![p(2), p(5)],
                local: false
            }
        );
        // Replaced: no longer local, learnt again.
        macs.set_local([mac(1)]);
        assert_eq!(macs.learn(p(ME), p(5), mac(7)), Learn::Learned);
        // The per-peer count followed the forgetting.
        let mut m = MacTable::new();
        for i in 0..MacTable::PER_PEER {
            let b = i.to_be_bytes();
            assert_eq!(
                m.learn(p(ME), p(5), [2, 0, b[0], b[1], b[2], b[3]]),
                Learn::Learned
            );
        }
        assert_eq!(m.learn(p(ME), p(5), mac(9)), Learn::Full);
        assert!(!Learn::Full.deliverable());
        m.set_local([[2, 0, 0, 0, 0, 0]]);
        assert_eq!(m.learn(p(ME), p(5), mac(9)), Learn::Learned);
    }

    #[test]
    fn learn_says_what_it_did() {
        let mut macs = MacTable::new();
        assert!(Learn::Learned.deliverable() && Learn::Known.deliverable());
        assert!(Learn::NotUnicast.deliverable() && Learn::FromUs.deliverable());
        assert_eq!(macs.learn(p(ME), p(2), mac(2)), Learn::Learned);
        assert_eq!(macs.learn(p(ME), p(2), mac(2)), Learn::Known);
        assert_eq!(
            macs.learn(p(ME), p(2), [1, 0, 0, 0, 0, 2]),
            Learn::NotUnicast
        );
        assert_eq!(macs.learn(p(ME), p(ME), mac(3)), Learn::FromUs);
    }

    /// The hop limit: at [`MAX_HOPS`] a message for us or a broadcast is
    /// still delivered, but nothing is relayed; below it, as always.
    #[test]
    fn hop_limit_stops_relaying_not_delivery() {
        let (n, r) = line();
        let at = |hops, src, dst| from_peer(p(ME), &n, &r, p(5), src, dst, hops);
        assert_eq!(
            at(MAX_HOPS - 1, p(5), p(4)),
            Decision::Relay {
                via: p(2),
                to: p(4)
            }
        );
        assert_eq!(
            at(MAX_HOPS, p(5), p(4)),
            Decision::HopLimit { local: false }
        );
        assert_eq!(at(u8::MAX, p(5), p(2)), Decision::HopLimit { local: false });
        assert_eq!(at(MAX_HOPS - 1, p(5), p(2)), Decision::Direct(p(2)));
        // For us: delivered whatever the count.
        assert_eq!(at(u8::MAX, p(5), p(ME)), Decision::Local);
        // A broadcast: delivered, not flooded on.
        assert_eq!(
            at(MAX_HOPS - 1, p(5), PeerName::BROADCAST),
            Decision::Flood {
                hops: vec![p(2)],
                local: true
            }
        );
        assert_eq!(
            at(MAX_HOPS, p(5), PeerName::BROADCAST),
            Decision::HopLimit { local: true }
        );
        // A broadcast at the end of its tree was not going on anyway: no
        // limit was hit.
        assert_eq!(
            from_peer(p(ME), &n, &r, p(2), p(9), PeerName::BROADCAST, MAX_HOPS),
            Decision::Flood {
                hops: vec![],
                local: true
            }
        );
        // No route is still no route.
        assert_eq!(
            at(MAX_HOPS, p(5), p(9)),
            Decision::Drop(DropReason::NoRoute)
        );
        assert!(may_relay(0) && may_relay(MAX_HOPS - 1) && !may_relay(MAX_HOPS));
    }

    /// Two peers whose routes point at each other (their topology views
    /// disagree), each reached from the other through a third link (so the
    /// never-straight-back rule does not end it): a message for a fourth
    /// peer circles, each relay adding one hop, and stops after
    /// [`MAX_HOPS`] relays.
    #[test]
    fn a_routing_loop_dies_at_the_hop_limit() {
        // Peer 1's only neighbour is 2 and peer 2's is 1; both route 9
        // through the other; the message claims to arrive from 7.
        let view = |other: u8| {
            let nb: HashMap<PeerName, ()> = [(p(other), ())].into_iter().collect();
            let mut r = Routes::default();
            r.unicast.insert(p(9), p(other));
            (nb, r)
        };
        let (mut at, mut hops) = (1u8, 0u8);
        let mut relays = 0u32;
        loop {
            let other = 3 - at;
            let (nb, r) = view(other);
            match from_peer(p(at), &nb, &r, p(7), p(3), p(9), hops) {
                Decision::Relay { via, .. } => {
                    relays += 1;
                    assert!(relays <= u32::from(MAX_HOPS), "the loop goes on");
                    at = via.0[5];
                    hops += 1;
                }
                Decision::HopLimit { local: false } => break,
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(relays, u32::from(MAX_HOPS));
        assert_eq!(hops, MAX_HOPS);
    }
}
