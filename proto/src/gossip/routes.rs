//! Routes over the topology: unicast next hops and broadcast trees.
//!
//! A connection between two other peers is used only when both ends report
//! it (symmetric); our own connections are used as soon as they are up. The
//! unicast table is a breadth-first search from us (shortest paths in hops),
//! so under one shared view every hop strictly nears the destination: no
//! loops. A core keeps the table up to date without a whole search when
//! entries or connections only appeared ([`add_links`]: distances can only
//! shrink, so only the peers that got closer are visited); a removal
//! searches again ([`unicast_into`]).
//!
//! A broadcast from `src` follows `src`'s shortest-path tree, built by every
//! peer alike: breadth-first from `src` over symmetric connections, each
//! level in name order, a node's parent the first (smallest-named) node of the
//! previous level that reaches it. A peer forwards to its children in that
//! tree, so under one shared view every reachable peer receives the broadcast
//! exactly once.

use super::topology::{Idx, Topology};

/// No route.
pub const NONE: Idx = Idx::MAX;
/// No route, and no entry known when the routes were computed.
pub const UNKNOWN: Idx = Idx::MAX - 1;
/// Depth of a slot the search did not reach.
pub const UNREACHED: u16 = u16::MAX;

/// The unicast routing table of one recomputation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// First hop towards each slot ([`NONE`]: unreachable, or ourselves;
    /// [`UNKNOWN`]: unreachable and its entry unknown).
    pub first_hop: Vec<Idx>,
    /// Number of reachable peers (not counting ourselves).
    pub reachable: usize,
}

impl Routes {
    /// The first hop towards slot `i`.
    pub fn hop(&self, i: Idx) -> Option<Idx> {
        self.first_hop
            .get(i as usize)
            .copied()
            .filter(|&h| h != NONE && h != UNKNOWN)
    }

    /// Whether slot `i` was known and unreachable when these routes were
    /// computed.
    pub fn known_unreachable(&self, i: Idx) -> bool {
        self.first_hop.get(i as usize) == Some(&NONE) && i != 0
    }
}

/// Whether the connection u–v counts for routing: both ends report it.
pub fn symmetric(t: &Topology, u: Idx, v: Idx) -> bool {
    match (t.get(u), t.get(v)) {
        (Some(a), Some(b)) => a.has_conn(v) && b.has_conn(u),
        _ => false,
    }
}

/// Shortest-path first hops from us (index 0). A breadth-first search that
/// stops as soon as every known entry is reached: in a mesh where everyone
/// is reachable (the usual case) it reads a few neighbourhoods' connections,
/// not all of them.
pub fn unicast(t: &Topology) -> Routes {
    let mut r = Routes::default();
    let (mut queue, mut depth) = (Vec::new(), Vec::new());
    unicast_into(t, &mut r, &mut queue, &mut depth);
    r
}

/// [`unicast`] into an existing table, reusing its memory and a scratch
/// queue (a peer recomputes often while a mesh converges); `depth` gets
/// each slot's distance in hops ([`UNREACHED`]: none; 0 for us).
pub fn unicast_into(t: &Topology, routes: &mut Routes, queue: &mut Vec<Idx>, depth: &mut Vec<u16>) {
    let n = t.slots();
    // `first_hop` doubles as the visited set: NONE until reached (our own
    // slot is marked visited with a placeholder and reset at the end).
    let first_hop = &mut routes.first_hop;
    first_hop.clear();
    first_hop.resize(n, NONE);
    queue.clear();
    depth.clear();
    depth.resize(n, UNREACHED);
    let all = t.count().saturating_sub(1);
    if n == 0 {
        routes.reachable = 0;
        return;
    }
    first_hop[0] = 0;
    depth[0] = 0;
    if let Some(me) = t.get(0) {
        for v in me.conns.iter() {
            if first_hop[v as usize] == NONE {
                first_hop[v as usize] = v;
                depth[v as usize] = 1;
                queue.push(v);
            }
        }
    }
    // Our own connections count before the other end reports them, so
    // they may name peers whose entries we lack: only known ones count
    // towards `all`.
    let mut known_reached = queue.iter().filter(|&&v| t.get(v).is_some()).count();
    let mut head = 0;
    while head < queue.len() && known_reached < all {
        let u = queue[head];
        head += 1;
        let Some(e) = t.get(u) else { continue };
        let hop = first_hop[u as usize];
        let d = depth[u as usize].saturating_add(1).min(UNREACHED - 1);
        for v in e.conns.iter() {
            if first_hop[v as usize] != NONE {
                continue;
            }
            if t.get(v).is_some_and(|b| b.has_conn(u)) {
                first_hop[v as usize] = hop;
                depth[v as usize] = d;
                queue.push(v);
                known_reached += 1;
            }
        }
    }
    first_hop[0] = NONE;
    for (i, h) in first_hop.iter_mut().enumerate() {
        if *h == NONE && t.get(i as Idx).is_none() {
            *h = UNKNOWN;
        }
    }
    routes.reachable = queue.len();
}

/// Whether routes may take the connection `u`→`v`: our own (from our
/// side alone), or both ends report it.
fn usable(t: &Topology, u: Idx, v: Idx) -> bool {
    match t.get(u) {
        Some(a) if u == 0 => a.has_conn(v),
        Some(a) => a.has_conn(v) && t.get(v).is_some_and(|b| b.has_conn(u)),
        None => false,
    }
}

/// Update `routes` and `depth` (as left by [`unicast_into`] or this
/// function over the topology before the change) after only the entries
/// of `grown` appeared or gained connections. Distances can only shrink:
/// each end of their connections that now gets closer is relaxed, and
/// from it whatever gets closer through it, nearest first. Costs the
/// connections of those peers and of the peers whose distance changed, not
/// a whole search (while a mesh converges most news adds connections far
/// from us that shorten nothing). Next hops are shortest-path first hops,
/// as from [`unicast_into`], though ties may break differently.
pub fn add_links(t: &Topology, routes: &mut Routes, depth: &mut Vec<u16>, grown: &[Idx]) {
    let n = t.slots();
    let first_hop = &mut routes.first_hop;
    first_hop.resize(n, NONE);
    depth.resize(n, UNREACHED);
    if n == 0 {
        routes.reachable = 0;
        return;
    }
    first_hop[0] = NONE;
    depth[0] = 0;
    let mut heap = std::collections::BinaryHeap::new();
    let relax =
        |u: Idx,
         v: Idx,
         first_hop: &mut Vec<Idx>,
         depth: &mut Vec<u16>,
         heap: &mut std::collections::BinaryHeap<std::cmp::Reverse<(u16, Idx)>>| {
            let du = depth[u as usize];
            if du == UNREACHED || v == 0 {
                return;
            }
            let d = du.saturating_add(1).min(UNREACHED - 1);
            if d < depth[v as usize] {
                depth[v as usize] = d;
                first_hop[v as usize] = if u == 0 { v } else { first_hop[u as usize] };
                heap.push(std::cmp::Reverse((d, v)));
            }
        };
    // Cheap depth comparisons first: a connection between two peers at
    // about the same distance shortens nothing.
    let closer = |du: u16, dv: u16| du != UNREACHED && du.saturating_add(1) < dv;
    for &p in grown {
        let Some(e) = t.get(p) else { continue };
        for o in e.conns.iter() {
            if (o as usize) >= n {
                continue;
            }
            let (dp, d_o) = (depth[p as usize], depth[o as usize]);
            if closer(dp, d_o) && usable(t, p, o) {
                relax(p, o, first_hop, depth, &mut heap);
            } else if closer(d_o, dp) && usable(t, o, p) {
                relax(o, p, first_hop, depth, &mut heap);
            }
        }
    }
    while let Some(std::cmp::Reverse((d, u))) = heap.pop() {
        if depth[u as usize] != d {
            continue;
        }
        let Some(e) = t.get(u) else { continue };
        for v in e.conns.iter() {
            if d.saturating_add(1) < depth[v as usize] && t.get(v).is_some_and(|b| b.has_conn(u)) {
                relax(u, v, first_hop, depth, &mut heap);
            }
        }
    }
    let mut reachable = 0;
    for (i, h) in first_hop.iter_mut().enumerate().skip(1) {
        if depth[i] == UNREACHED {
            *h = if t.get(i as Idx).is_some() {
                NONE
            } else {
                UNKNOWN
            };
        } else {
            reachable += 1;
        }
    }
    routes.reachable = reachable;
}

/// Slots that we or some peer reachable under `routes` report a
/// connection to (garbage collection keeps them).
pub fn referenced(t: &Topology, routes: &Routes) -> Vec<bool> {
    let mut out = vec![false; t.slots()];
    for u in t.known() {
        if u != 0 && routes.hop(u).is_none() {
            continue;
        }
        if let Some(e) = t.get(u) {
            for v in e.conns.iter() {
                out[v as usize] = true;
            }
        }
    }
    out
}

/// Our children in `src`'s broadcast tree (for `src` = us: the initial
/// fan-out). Empty when we are not on the tree.
pub fn broadcast_children(t: &Topology, src: Idx, me: Idx) -> Vec<Idx> {
    if t.get(src).is_none() {
        return vec![];
    }
    let n = t.slots();
    let mut parent = vec![NONE; n];
    let mut seen = vec![false; n];
    seen[src as usize] = true;
    let mut level = vec![src];
    while !level.is_empty() {
        level.sort_unstable_by_key(|&i| t.name(i));
        let mut next = Vec::new();
        let mut me_here = false;
        for &u in &level {
            me_here |= u == me;
            let Some(e) = t.get(u) else { continue };
            for v in e.conns.iter() {
                if !seen[v as usize] && symmetric(t, u, v) {
                    seen[v as usize] = true;
                    parent[v as usize] = u;
                    next.push(v);
                }
            }
        }
        if me_here {
            let mut kids: Vec<Idx> = next
                .into_iter()
                .filter(|&v| parent[v as usize] == me)
                .collect();
            kids.sort_unstable_by_key(|&i| t.name(i));
            return kids;
        }
        level = next;
    }
    vec![]
}

#[cfg(test)]
mod tests {
    use super::super::topology::{LocalRecord, RoutingChange};
    use super::*;
    use crate::name::PeerName;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    fn nm(i: usize) -> PeerName {
        PeerName([2, 0, 0, 0, (i >> 8) as u8, i as u8])
    }

    /// Topology of peer `me` with a given undirected edge list, some edges
    /// reported by one end only.
    fn view(
        n: usize,
        me: usize,
        edges: &[(usize, usize)],
        one_sided: &[(usize, usize)],
    ) -> Topology {
        let mut t = Topology::new(nm(me), "x".into(), 1);
        let mut adj: HashMap<usize, BTreeSet<usize>> = HashMap::new();
        for &(a, b) in edges {
            adj.entry(a).or_default().insert(b);
            adj.entry(b).or_default().insert(a);
        }
        for &(a, b) in one_sided {
            adj.entry(a).or_default().insert(b);
        }
        for p in 0..n {
            let conns: Vec<usize> = adj
                .get(&p)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            if p == me {
                for c in conns {
                    let i = t.intern(nm(c));
                    t.set_own_conn(i, true);
                }
                continue;
            }
            let peer = t.intern(nm(p));
            let add = conns.iter().map(|&c| t.intern(nm(c))).collect();
            t.apply_trusted(LocalRecord {
                peer,
                incarnation: 1,
                base: 0,
                version: 1,
                nickname: Some(String::new()),
                addrs: None,
                add,
                del: vec![],
                sig: crate::sign::Sig::NONE,
                key: None,
            });
        }
        t
    }

    /// Peer count, symmetric links, one-sided links.
    type Graph = (usize, Vec<(usize, usize)>, Vec<(usize, usize)>);

    fn arb_graph() -> impl Strategy<Value = Graph> {
        (2usize..25).prop_flat_map(|n| {
            (
                Just(n),
                proptest::collection::vec((0..n, 0..n), 0..60),
                proptest::collection::vec((0..n, 0..n), 0..5),
            )
        })
    }

    fn clean(e: &[(usize, usize)]) -> Vec<(usize, usize)> {
        e.iter().copied().filter(|(a, b)| a != b).collect()
    }

    proptest! {
        /// Following next hops from any peer reaches the destination without
        /// loops, and every peer reachable over symmetric links has a route.
        #[test]
        fn unicast_loop_free((n, edges, one) in arb_graph()) {
            let (edges, one) = (clean(&edges), clean(&one));
            let views: Vec<Topology> = (0..n).map(|me| view(n, me, &edges, &one)).collect();
            for (src, v) in views.iter().enumerate() {
                let r = unicast(v);
                for dst in 0..n {
                    if dst == src { continue; }
                    let Some(i) = v.lookup(nm(dst)) else { continue };
                    let Some(_) = r.hop(i) else { continue };
                    let mut at = src;
                    let mut hops = 0;
                    while at != dst {
                        let va = &views[at];
                        let ra = unicast(va);
                        let h = ra.hop(va.lookup(nm(dst)).unwrap());
                        prop_assert!(h.is_some(), "route breaks at {at}");
                        let next = va.name(h.unwrap());
                        at = (0..n).find(|&k| nm(k) == next).unwrap();
                        hops += 1;
                        prop_assert!(hops <= n, "loop");
                    }
                }
            }
        }

        /// Each source's broadcast reaches every peer connected to it over
        /// symmetric links exactly once, never back to the source.
        #[test]
        fn broadcast_exactly_once((n, edges, one) in arb_graph()) {
            let (edges, one) = (clean(&edges), clean(&one));
            let views: Vec<Topology> = (0..n).map(|me| view(n, me, &edges, &one)).collect();
            for src in 0..n {
                let mut got = vec![0usize; n];
                got[src] = 1;
                let mut queue = vec![src];
                while let Some(at) = queue.pop() {
                    let v = &views[at];
                    let s = v.lookup(nm(src)).unwrap_or(0);
                    let s = if at == src { 0 } else { s };
                    for c in broadcast_children(v, s, 0) {
                        let k = (0..n).find(|&k| nm(k) == v.name(c)).unwrap();
                        prop_assert_ne!(k, src);
                        got[k] += 1;
                        prop_assert!(got[k] == 1, "{k} twice");
                        queue.push(k);
                    }
                }
                // Every peer reachable from src over symmetric links is covered.
                let mut adj = vec![BTreeSet::new(); n];
                for &(a, b) in edges.iter().chain(&edges.iter().map(|&(a, b)| (b, a)).collect::<Vec<_>>()).chain(&one) {
                    adj[a].insert(b);
                }
                let mut reach = vec![false; n];
                reach[src] = true;
                let mut stack = vec![src];
                while let Some(a) = stack.pop() {
                    for &b in &adj[a] {
                        if !reach[b] && adj[b].contains(&a) {
                            reach[b] = true;
                            stack.push(b);
                        }
                    }
                }
                for (k, &g) in got.iter().enumerate() {
                    prop_assert_eq!(reach[k], g == 1, "peer {}", k);
                }
            }
        }
    }

    proptest! {
        /// Routes kept up to date change by change (as a core does) have the
        /// distances of a fresh search, and every next hop is one of our
        /// connections at distance 1 on a shortest path.
        #[test]
        fn added_links_match_a_fresh_search(
            n in 2usize..20,
            steps in proptest::collection::vec((0usize..20, 0usize..20, 0u8..10), 1..80),
        ) {
            let mut t = Topology::new(nm(0), "x".into(), 1);
            let mut adj: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
            let mut version = vec![0u32; n];
            let (mut routes, mut depth) = (Routes::default(), Vec::new());
            unicast_into(&t, &mut routes, &mut Vec::new(), &mut depth);
            for (a, b, kind) in steps {
                let (a, b) = (a % n, b % n);
                if a == b {
                    continue;
                }
                // Mostly additions, reported by one or both ends; some removals.
                let remove = kind == 0;
                let ends: &[usize] = if kind < 3 { &[a] } else { &[a, b] };
                for &p in ends {
                    let o = if p == a { b } else { a };
                    if remove { adj[p].remove(&o); } else { adj[p].insert(o); }
                    if p == 0 {
                        let i = t.intern(nm(o));
                        t.set_own_conn(i, !remove);
                        continue;
                    }
                    version[p] += 1;
                    let peer = t.intern(nm(p));
                    let add = adj[p].iter().map(|&c| t.intern(nm(c))).collect();
                    t.apply_trusted(LocalRecord {
                        peer,
                        incarnation: 1,
                        base: 0,
                        version: version[p],
                        nickname: Some(String::new()),
                        addrs: None,
                        add,
                        del: vec![],
                        sig: crate::sign::Sig::NONE,
                        key: None,
                    });
                }
                // Some changes pile up (as between two recomputations), so
                // one update sees removals and additions together.
                if kind % 3 == 1 {
                    continue;
                }
                let old = depth.clone();
                let same = |x: Idx, y: Idx| {
                    let (dx, dy) = (old.get(x as usize), old.get(y as usize));
                    dx.is_some_and(|&d| d != UNREACHED) && dx == dy
                };
                match t.take_routing_change(same) {
                    RoutingChange::None => {}
                    RoutingChange::Grown(l) => add_links(&t, &mut routes, &mut depth, &l),
                    RoutingChange::Full => unicast_into(&t, &mut routes, &mut Vec::new(), &mut depth),
                }
                let (mut fresh, mut fd) = (Routes::default(), Vec::new());
                unicast_into(&t, &mut fresh, &mut Vec::new(), &mut fd);
                depth.resize(t.slots(), UNREACHED);
                prop_assert_eq!(&depth, &fd);
                prop_assert_eq!(routes.reachable, fresh.reachable);
                for v in 1..t.slots() as Idx {
                    prop_assert_eq!(routes.hop(v).is_some(), fresh.hop(v).is_some());
                    prop_assert_eq!(routes.known_unreachable(v), fresh.known_unreachable(v));
                    if let Some(h) = routes.hop(v) {
                        prop_assert_eq!(fd[h as usize], 1);
                        prop_assert!(t.get(0).unwrap().has_conn(h));
                    }
                }
            }
        }
    }

    #[test]
    fn one_sided_links_are_not_used() {
        // 0-1 symmetric, 1-2 reported by 1 only.
        let t = view(3, 0, &[(0, 1)], &[(1, 2)]);
        let r = unicast(&t);
        assert_eq!(r.hop(t.lookup(nm(1)).unwrap()), t.lookup(nm(1)));
        assert_eq!(r.hop(t.lookup(nm(2)).unwrap()), None);
        assert_eq!(r.reachable, 1);
        assert!(referenced(&t, &r)[t.lookup(nm(2)).unwrap() as usize]);
    }
}
