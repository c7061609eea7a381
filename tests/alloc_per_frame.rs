//! No work per frame that grows with the mesh: the sleeve's real per-frame
//! functions ([`Engine`]: what its sender threads call for each frame read
//! from the TAP, and its receiver for each buffer received) allocate
//! nothing once warm, and do as much for a frame among 1,000 known peers
//! as among 10.
//!
//! This test binary has a counting global allocator: each thread counts
//! its own allocations (and reallocations), so tests running in parallel
//! do not see each other's. Every path is driven by real messages: what one
//! engine sends (to an [`Io`] that keeps the datagrams in buffers reused
//! from frame to frame) is what the next one receives, as a GRO run when
//! it was sent as a GSO run. Each path is measured plain and sealed (with a
//! password), with small frames (packed) and a 62,000-byte super-frame
//! (cut into segments):
//!
//! - unicast from the TAP to a neighbour, and that neighbour's delivery to
//!   its TAP;
//! - broadcast from the TAP to 10 and to 100 neighbours;
//! - a relay: a message for a third peer, and a broadcast along the
//!   origin's tree to 100 neighbours (delivered locally too);
//! - the same with 10 and with 1,000 peers known to the routes (and a
//!   broadcast tree for each).
//!
//! The assertion is a count (allocations per frame after a warm-up: zero),
//! never a time. With `--nocapture` the test also prints nanoseconds per
//! frame (the fastest of a few batches; the test's [`Io`] copying each
//! datagram is included), and each path's figures with 10 and with 1,000
//! known peers side by side, for information only: `cargo test --release
//! --test alloc_per_frame -- --nocapture`.

use mesh::datapath::keys::SleeveKeys;
use mesh::datapath::sleeve::{Cmd, Config, Engine, Io, PeerUp, Routes};
use mesh_proto::name::PeerName;
use mesh_proto::seal::{Opener, Sealer};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The system allocator, counting each thread's allocations.
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: never panic in the allocator, also while the thread's
    // locals are being torn down.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is passed on to `System` unchanged; counting touches
// only a const-initialised thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations this thread made so far.
fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

/// One GSO run (or single datagram) an engine sent.
struct Run {
    to: SocketAddrV4,
    seg: usize,
    bytes: Vec<u8>,
}

/// What an engine sent and wrote, in buffers reused from frame to frame.
#[derive(Default)]
struct Wire {
    runs: Vec<Run>,
    /// How many of `runs` hold something.
    used: usize,
    tap_writes: u64,
    tap_bytes: u64,
}

/// An [`Io`] that keeps what its engine sends, for the next engine.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Wire>>, Arc<AtomicU64>);

impl Io for Capture {
    fn send(
        &self,
        to: SocketAddrV4,
        iov: &[IoSlice<'_>],
        segment: Option<u16>,
    ) -> io::Result<usize> {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let i = w.used;
        if i == w.runs.len() {
            w.runs.push(Run {
                to,
                seg: 0,
                bytes: Vec::with_capacity(1 << 16),
            });
        }
        let r = &mut w.runs[i];
        r.to = to;
        r.bytes.clear();
        for s in iov {
            r.bytes.extend_from_slice(s);
        }
        r.seg = segment.map_or(r.bytes.len(), usize::from);
        let n = r.bytes.len();
        w.used += 1;
        self.1.fetch_add(1, Ordering::Relaxed);
        Ok(n)
    }

    fn write_tap(&self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n: usize = iov.iter().map(|s| s.len()).sum();
        w.tap_writes += 1;
        w.tap_bytes += n as u64;
        Ok(n)
    }
}

impl Capture {
    /// Hand each run sent since the last call to `f` (its destination, its
    /// segment size, its bytes), and forget them.
    fn drain(&self, mut f: impl FnMut(SocketAddrV4, usize, &mut [u8])) {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let used = std::mem::take(&mut w.used);
        for r in &mut w.runs[..used] {
            f(r.to, r.seg, &mut r.bytes);
        }
    }

    /// Forget what was sent.
    fn discard(&self) {
        self.drain(|_, _, _| {});
    }

    fn tap_writes(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).tap_writes
    }

    fn sends(&self) -> u64 {
        self.1.load(Ordering::Relaxed)
    }
}

fn name(i: u32) -> PeerName {
    let b = i.to_be_bytes();
    PeerName([2, 0xaa, b[0], b[1], b[2], b[3]])
}

/// Peer `i`'s sleeve address (test underlay range, never used on a wire).
fn addr(i: u32) -> SocketAddr {
    let b = i.to_be_bytes();
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 18, b[2], b[3]), 6783))
}

fn mac(i: u32) -> [u8; 6] {
    let b = i.to_be_bytes();
    [0x0a, 0x58, b[0], b[1], b[2], b[3]]
}

const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// A vnet header, then an Ethernet frame of `len` bytes in all.
fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[10..16].copy_from_slice(&dst);
    f[16..22].copy_from_slice(&src);
    f[22..24].copy_from_slice(&0x0800u16.to_be_bytes());
    for (i, b) in f[24..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

const SMALL: usize = 10 + 14 + 100;
const LARGE: usize = 62_000;

/// The key peer `from` seals with towards peer `to`.
fn key(from: u32, to: u32) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&from.to_be_bytes());
    k[4..8].copy_from_slice(&to.to_be_bytes());
    k
}

/// A mesh of engines for peers numbered from 0, and the peers they know.
struct Mesh {
    encrypted: bool,
    engines: HashMap<u32, (Engine, Capture)>,
}

impl Mesh {
    fn new(encrypted: bool) -> Mesh {
        Mesh {
            encrypted,
            engines: HashMap::new(),
        }
    }

    /// Engine `i`, connected to each of `neighbours` (engines or not).
    fn add(&mut self, i: u32, neighbours: impl IntoIterator<Item = u32>) {
        let cap = Capture::default();
        let cfg = Config {
            me: name(i),
            encrypted: self.encrypted,
            underlay_mtu: 1500,
        };
        let e = Engine::new(&cfg, Box::new(cap.clone())).expect("engine");
        for n in neighbours {
            let keys = self
                .encrypted
                .then(|| SleeveKeys::new(Sealer::new(1, &key(i, n)), Opener::new(1, &key(n, i))));
            e.command(Cmd::PeerUp(Box::new(PeerUp {
                name: name(n),
                addr: addr(n),
                keys,
            })));
        }
        self.engines.insert(i, (e, cap));
    }

    fn engine(&mut self, i: u32) -> &mut Engine {
        &mut self.engines.get_mut(&i).expect("engine").0
    }

    fn capture(&self, i: u32) -> Capture {
        self.engines[&i].1.clone()
    }

    /// Engine `i` reads `f` from its TAP and flushes.
    fn send(&mut self, i: u32, f: &[u8]) {
        let e = self.engine(i);
        e.tap_frame(f);
        e.flush();
    }

    /// What `from` sent goes to the engines it was sent to (the others'
    /// copies are dropped); returns the peers that received.
    fn deliver(&mut self, from: u32, now: Instant) {
        let cap = self.capture(from);
        let engines = &mut self.engines;
        cap.drain(|to, seg, bytes| {
            let to = (u32::from(to.ip().octets()[2]) << 8) | u32::from(to.ip().octets()[3]);
            if let Some((e, _)) = engines.get_mut(&to) {
                e.receive(addr(from), bytes, seg, now);
            }
        });
    }
}

/// Broadcast trees: source → its hops from here.
type Trees = Vec<(u32, Vec<u32>)>;

/// Routes as the router builds them: `unicast` destination → next hop,
/// `trees` source → its broadcast hops from here.
fn routes(unicast: &[(u32, u32)], trees: &[(u32, Vec<u32>)]) -> Routes {
    let mut r = Routes::default();
    for &(d, h) in unicast {
        r.unicast.insert(name(d), name(h));
    }
    for (s, hops) in trees {
        r.broadcast
            .insert(name(*s), hops.iter().map(|h| name(*h)).collect());
    }
    r
}

/// Routes of `known` far peers (numbered from 10,000), each reached through
/// `via`, each with a broadcast tree that goes on to `on`: what a peer of a
/// large mesh is told.
fn far_peers(known: u32, via: u32, on: &[u32]) -> (Vec<(u32, u32)>, Trees) {
    let far = 10_000..10_000 + known;
    (
        far.clone().map(|d| (d, via)).collect(),
        far.map(|s| (s, on.to_vec())).collect(),
    )
}

/// The allocations and the time of the measured part of each step.
#[derive(Default)]
struct Meter {
    allocs: u64,
    ns: u128,
}

impl Meter {
    /// Run `f`, counting this thread's allocations and the time it takes.
    fn on<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let (a, t) = (allocs(), Instant::now());
        let r = f();
        self.ns += t.elapsed().as_nanos();
        self.allocs += allocs() - a;
        r
    }
}

/// Steps run to warm up before any is measured.
const WARM: u32 = 20;
/// Steps measured, in [`BATCHES`] batches (fewer in a debug build, where
/// sealing 62,000 bytes for 100 neighbours is slow).
const N: u32 = if cfg!(debug_assertions) { 10 } else { 50 };
/// The time reported is the fastest batch's, the one least disturbed by
/// whatever else the machine is running; every batch's allocations count.
const BATCHES: u32 = 5;

/// Run `step` [`WARM`] times, then [`N`] times, each step measuring its
/// part with the [`Meter`] it is given: allocations per step, and
/// nanoseconds per step.
fn measure(mut step: impl FnMut(&mut Meter)) -> (f64, f64) {
    let mut warm = Meter::default();
    for _ in 0..WARM {
        step(&mut warm);
    }
    let per = N / BATCHES;
    let (mut a, mut best) = (0, f64::INFINITY);
    for _ in 0..BATCHES {
        let mut m = Meter::default();
        for _ in 0..per {
            step(&mut m);
        }
        a += m.allocs;
        best = best.min(m.ns as f64 / f64::from(per));
    }
    (a as f64 / f64::from(per * BATCHES), best)
}

/// What was measured, printed as a table and checked at the end.
#[derive(Default)]
struct Report(Vec<(String, f64, f64)>);

impl Report {
    fn add(&mut self, what: String, (allocs, ns): (f64, f64)) {
        println!("{what:<66} {allocs:>5.2} allocs/frame {ns:>10.0} ns/frame");
        self.0.push((what, allocs, ns));
    }

    /// Each path's nanoseconds per frame with 10 and with 1,000 known
    /// peers side by side (for information only: never asserted).
    fn print_scaling(&self) {
        println!(
            "\n{:<56} {:>11} {:>11} {:>6}",
            "ns/frame", "10 known", "1000 known", "ratio"
        );
        for (what, _, ns10) in &self.0 {
            let Some(path) = what.strip_suffix(", 10 known") else {
                continue;
            };
            let far = format!("{path}, 1000 known");
            if let Some((_, _, ns1000)) = self.0.iter().find(|(w, _, _)| *w == far) {
                println!(
                    "{path:<56} {ns10:>11.0} {ns1000:>11.0} {:>6.2}",
                    ns1000 / ns10
                );
            }
        }
    }

    fn assert_none(&self) {
        let bad: Vec<_> = self.0.iter().filter(|(_, a, _)| *a != 0.0).collect();
        assert!(
            bad.is_empty(),
            "allocations per frame in steady state: {:?}",
            bad.iter().map(|(w, a, _)| (w, a)).collect::<Vec<_>>()
        );
    }
}

fn mode(encrypted: bool) -> &'static str {
    if encrypted {
        "sealed"
    } else {
        "plain"
    }
}

/// Peer 1 and peer 2, neighbours, among `known` peers of the mesh
/// reached through 2: unicast from 1's TAP to a MAC learnt behind 2, and
/// 2's delivery to its TAP.
fn unicast(report: &mut Report, encrypted: bool, known: u32) {
    let mut m = Mesh::new(encrypted);
    m.add(1, [2]);
    m.add(2, [1]);
    let (uni, trees) = far_peers(known, 2, &[]);
    let mut r1 = uni.clone();
    r1.push((2, 2));
    let mut t1 = trees.clone();
    t1.push((1, vec![2]));
    t1.push((2, vec![]));
    m.engine(1).command(Cmd::Routes(routes(&r1, &t1)));
    m.engine(2)
        .command(Cmd::Routes(routes(&[(1, 1)], &[(2, vec![1]), (1, vec![])])));
    let now = Instant::now();
    // 1 learns 2's MAC from a broadcast of 2's.
    m.send(2, &frame(BROADCAST_MAC, mac(2), SMALL));
    m.deliver(2, now);
    assert_eq!(m.capture(1).tap_writes(), 1, "1 got 2's broadcast");
    for len in [SMALL, LARGE] {
        let f = frame(mac(2), mac(1), len);
        let before = m.capture(2).tap_writes();
        let what = format!(
            "{} unicast tap->peer {len} B, {known} known",
            mode(encrypted)
        );
        report.add(
            what,
            measure(|t| {
                t.on(|| m.send(1, &f));
                m.capture(1).discard();
            }),
        );
        let what = format!(
            "{} unicast peer->tap {len} B, {known} known",
            mode(encrypted)
        );
        // Each step sends a frame from 1 (not measured) and receives it at 2.
        report.add(
            what,
            measure(|t| {
                m.send(1, &f);
                t.on(|| m.deliver(1, now));
            }),
        );
        assert_eq!(
            m.capture(2).tap_writes() - before,
            u64::from(WARM + N),
            "every frame reached 2's TAP"
        );
    }
}

/// Peer 1 with `fan` neighbours (2, 3, ...), among `known` peers:
/// broadcasts from its TAP go to every neighbour.
fn broadcast(report: &mut Report, encrypted: bool, fan: u32, known: u32) {
    let mut m = Mesh::new(encrypted);
    let hops: Vec<u32> = (2..2 + fan).collect();
    m.add(1, hops.clone());
    // The far peers' broadcasts reach 1 from 2 and go on to 3.
    let (mut uni, mut trees) = far_peers(known, 2, &[3]);
    uni.extend(hops.iter().map(|&h| (h, h)));
    trees.push((1, hops.clone()));
    m.engine(1).command(Cmd::Routes(routes(&uni, &trees)));
    for len in [SMALL, LARGE] {
        let f = frame(BROADCAST_MAC, mac(1), len);
        let cap = m.capture(1);
        let sends = cap.sends();
        let what = format!(
            "{} broadcast tap->{fan} peers {len} B, {known} known",
            mode(encrypted)
        );
        report.add(
            what,
            measure(|t| {
                t.on(|| m.send(1, &f));
                cap.discard();
            }),
        );
        assert_eq!(cap.sends() - sends, u64::from((WARM + N) * fan));
    }
}

/// Peers 1 — 2 — 3 in a line, 2 also connected to `fan` - 1 more
/// neighbours (4, 5, ...), among `known` peers: 2 relays a message from 1
/// for 3, and floods 1's broadcasts to its `fan` other neighbours (and
/// delivers them).
fn relay(report: &mut Report, encrypted: bool, fan: u32, known: u32) {
    let mut m = Mesh::new(encrypted);
    let others: Vec<u32> = (4..3 + fan).collect();
    m.add(1, [2]);
    m.add(2, [1, 3].into_iter().chain(others.clone()));
    m.add(3, [2]);
    // The far peers' broadcasts reach 2 from 3 and go on to 1.
    let (uni, trees) = far_peers(known, 3, &[1]);
    let mut u2 = uni.clone();
    u2.extend([(1, 1), (3, 3)]);
    u2.extend(others.iter().map(|&o| (o, o)));
    let mut t2 = trees.clone();
    let mut on: Vec<u32> = vec![3];
    on.extend(&others);
    t2.push((1, on));
    t2.push((3, vec![1]));
    m.engine(2).command(Cmd::Routes(routes(&u2, &t2)));
    m.engine(1).command(Cmd::Routes(routes(
        &[(2, 2), (3, 2)],
        &[(1, vec![2]), (3, vec![])],
    )));
    m.engine(3).command(Cmd::Routes(routes(
        &[(2, 2), (1, 2)],
        &[(3, vec![2]), (1, vec![])],
    )));
    let now = Instant::now();
    // 1 learns 3's MAC from a broadcast of 3's, relayed by 2.
    m.send(3, &frame(BROADCAST_MAC, mac(3), SMALL));
    m.deliver(3, now);
    m.deliver(2, now);
    assert_eq!(m.capture(1).tap_writes(), 1, "1 got 3's broadcast");
    for dst in [mac(3), BROADCAST_MAC] {
        for len in [SMALL, LARGE] {
            let f = frame(dst, mac(1), len);
            let (sends, taps) = (m.capture(2).sends(), m.capture(2).tap_writes());
            // Each step sends a frame from 1 (not measured) and relays it
            // at 2.
            let measured = measure(|t| {
                m.send(1, &f);
                t.on(|| m.deliver(1, now));
                m.capture(2).discard();
            });
            let out = if dst == BROADCAST_MAC { fan } else { 1 };
            let what = if dst == BROADCAST_MAC {
                format!("relay broadcast 1->2->{fan} peers")
            } else {
                format!("relay unicast 1->2->3 (2 has {} neighbours)", fan + 1)
            };
            report.add(
                format!("{} {what} {len} B, {known} known", mode(encrypted)),
                measured,
            );
            assert_eq!(
                m.capture(2).sends() - sends,
                u64::from((WARM + N) * out),
                "2 relayed every message"
            );
            let local = if dst == BROADCAST_MAC { WARM + N } else { 0 };
            assert_eq!(
                m.capture(2).tap_writes() - taps,
                u64::from(local),
                "2 delivered every broadcast, and nothing else"
            );
        }
    }
}

/// Zero allocations per frame once warm, on every path, plain and sealed,
/// with 10 and with 1,000 known peers.
#[test]
fn no_allocation_per_frame() {
    let mut report = Report::default();
    for encrypted in [false, true] {
        for known in [10, 1_000] {
            unicast(&mut report, encrypted, known);
            broadcast(&mut report, encrypted, 10, known);
            broadcast(&mut report, encrypted, 100, known);
            relay(&mut report, encrypted, 2, known);
            relay(&mut report, encrypted, 100, known);
        }
    }
    report.print_scaling();
    report.assert_none();
}
