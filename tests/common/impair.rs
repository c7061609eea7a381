//! A bad network without `netem`: an impairment relay between a host and the
//! underlay switch.
//!
//! This kernel has no `netem` qdisc, so an impaired host's switch-side veth
//! end `hN` is not put into the bridge. A second veth pair `rN`/`bN` (both in
//! the switch namespace, `bN` in `br0`) stands in for it, and a [`Relay`] —
//! a thread of the test process with one packet socket on `hN` and one on
//! `rN`, both opened inside the switch namespace — pumps every frame across.
//!
//! The relay does all of the impairment itself (not nftables `numgen`), per
//! frame and independently of every other frame, on frames **leaving** the
//! host (`hN` → `rN`): dropped with probability `loss`; otherwise held for a
//! delay drawn uniformly from `delay ± jitter` (so frames overtake each
//! other: reordering), and with probability `duplicate` sent a second time
//! after a delay of its own. Frames towards the host pass at once. Between
//! two impaired hosts every frame therefore crosses exactly one impairment,
//! its sender's, and each path sees the stated figures. Delays are kept in a
//! timer heap on the relay thread, which sleeps only in `poll` until the
//! earliest due frame or the next frame in (at most [`TICK`]); nothing
//! sleeps per frame. [`Relay::cut`] drops everything both ways (frames
//! already held included): the partition.
//!
//! The sockets copy frames, not the kernel's offload metadata, so the
//! host's `eth0` sends with checksum, segmentation and receive offloads off
//! (every frame the relay sees is a whole, checksummed Ethernet frame).
//!
//! The randomness is a splitmix64 seeded from the OS and printed, with the
//! relay's counters, when the relay stops. The thread stops and is joined
//! when the [`Relay`] is dropped (the `World` drops its relays before it
//! deletes the namespaces).

use super::consts::*;
use super::frames::Link;
use super::process::random_bytes;
use std::collections::BinaryHeap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

/// The longest the relay thread waits in `poll`, so it notices a stop.
const TICK: Duration = Duration::from_millis(20);
/// The largest frame the relay reads (offloads are off: at most the MTU).
const MAX_FRAME: usize = 65536;

/// What an impaired host's outgoing frames suffer, each independently.
#[derive(Clone, Copy, Debug)]
pub struct Impairment {
    /// Probability that a frame is dropped.
    pub loss: f64,
    /// Mean delay of a frame.
    pub delay: Duration,
    /// A frame's delay is uniform in `delay - jitter ..= delay + jitter`.
    pub jitter: Duration,
    /// Probability that a frame is sent twice (each copy delayed on its own).
    pub duplicate: f64,
}

impl Impairment {
    /// No impairment at all (the relay only pumps, until cut).
    pub const NONE: Impairment = Impairment {
        loss: 0.0,
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        duplicate: 0.0,
    };
}

/// What a relay did so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct RelayStats {
    /// Frames from the host.
    pub out_frames: u64,
    /// Frames towards the host.
    pub in_frames: u64,
    /// Frames dropped by `loss`.
    pub lost: u64,
    /// Extra copies sent by `duplicate`.
    pub duplicated: u64,
    /// Frames delivered after a frame that came in later (from the host).
    pub reordered: u64,
    /// Frames (or held copies) dropped because the relay was cut.
    pub cut: u64,
    /// Frames the kernel refused to send.
    pub send_errors: u64,
    /// The most frames held at once.
    pub max_held: u64,
}

struct Shared {
    stop: AtomicBool,
    cut: AtomicBool,
    stats: Mutex<RelayStats>,
}

/// One relay thread between a host's veth end and the bridge; stops and is
/// joined when dropped.
pub struct Relay {
    /// Which host it serves, for messages.
    pub what: String,
    seed: u64,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Opens packet sockets on `host_side` and `switch_side` in namespace
    /// `ns` and starts pumping between them with `imp` on frames from
    /// `host_side`.
    #[track_caller]
    pub fn start(ns: &str, host_side: &str, switch_side: &str, imp: Impairment) -> Relay {
        assert!(
            (0.0..=1.0).contains(&imp.loss) && (0.0..=1.0).contains(&imp.duplicate),
            "probabilities in 0..=1: {imp:?}"
        );
        assert!(imp.jitter <= imp.delay, "jitter beyond the delay: {imp:?}");
        let what = format!("relay {host_side}<->{switch_side} in {ns}");
        let host = Link::open(ns, host_side);
        let switch = Link::open(ns, switch_side);
        let seed = u64::from_le_bytes(random_bytes(8).try_into().expect("eight bytes"));
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            stats: Mutex::new(RelayStats::default()),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("relay-{host_side}"))
            .spawn(move || pump(&host, &switch, imp, seed, &s))
            .expect("spawn relay thread");
        eprintln!("{what}: {imp:?}, seed {seed:#018x}");
        Relay {
            what,
            seed,
            shared,
            thread: Some(thread),
        }
    }

    /// Cuts (`true`: every frame both ways is dropped) or heals the link.
    pub fn cut(&self, on: bool) {
        self.shared.cut.store(on, Ordering::SeqCst);
    }

    /// The counters so far.
    pub fn stats(&self) -> RelayStats {
        *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Nothing in here may panic (the World drops relays while unwinding).
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("{}: its thread panicked", self.what);
            }
        }
        eprintln!(
            "{} stopped (seed {:#018x}): {:?}",
            self.what,
            self.seed,
            self.stats()
        );
    }
}

/// A frame held until `at`; `seq` orders frames due at the same instant
/// and tells a reordering.
struct Held {
    at: Instant,
    seq: u64,
    frame: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest must come out
    /// first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// splitmix64: small, seeded, good enough for coin flips.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in `delay - jitter ..= delay + jitter`.
    fn delay(&mut self, imp: &Impairment) -> Duration {
        let spread = imp.jitter.as_nanos() as f64 * 2.0;
        (imp.delay - imp.jitter) + Duration::from_nanos((self.unit() * spread) as u64)
    }
}

/// The relay thread: until told to stop, moves frames from `host` (with
/// `imp`) and from `switch` (at once), and sends held frames when due.
fn pump(host: &Link, switch: &Link, imp: Impairment, seed: u64, shared: &Shared) {
    let mut rng = Rng(seed);
    let mut held: BinaryHeap<Held> = BinaryHeap::new();
    let mut buf = vec![0u8; MAX_FRAME];
    let mut next_seq: u64 = 0;
    let mut last_sent_seq: Option<u64> = None;
    let mut st = RelayStats::default();
    while !shared.stop.load(Ordering::SeqCst) {
        let cut = shared.cut.load(Ordering::SeqCst);
        // Held frames that are due.
        let now = Instant::now();
        while held.peek().is_some_and(|h| h.at <= now) {
            let Some(h) = held.pop() else { break };
            if cut {
                st.cut += 1;
                continue;
            }
            if last_sent_seq.is_some_and(|last| h.seq < last) {
                st.reordered += 1;
            }
            last_sent_seq = Some(last_sent_seq.map_or(h.seq, |l| l.max(h.seq)));
            if !switch.try_send(&h.frame) {
                st.send_errors += 1;
            }
        }
        *shared.stats.lock().unwrap_or_else(|e| e.into_inner()) = st;
        // Wait for a frame, the next due one, or the tick.
        let wait = held
            .peek()
            .map_or(TICK, |h| h.at.saturating_duration_since(now).min(TICK));
        let mut fds = [
            libc::pollfd {
                fd: host.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: switch.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Round up: a frame is never sent early.
        let ms = wait.as_micros().div_ceil(1000) as i32;
        // SAFETY: two live pollfds, and their count.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if r <= 0 {
            continue;
        }
        // Read again: a cut or heal while in `poll` applies to what it woke for.
        let cut = shared.cut.load(Ordering::SeqCst);
        // Towards the host: at once, unless cut.
        while let Some(n) = switch.try_recv_incoming(&mut buf) {
            st.in_frames += 1;
            if cut {
                st.cut += 1;
            } else if !host.try_send(&buf[..n]) {
                st.send_errors += 1;
            }
        }
        // From the host: lost, or held (maybe twice).
        let now = Instant::now();
        while let Some(n) = host.try_recv_incoming(&mut buf) {
            st.out_frames += 1;
            if cut {
                st.cut += 1;
                continue;
            }
            if rng.chance(imp.loss) {
                st.lost += 1;
                continue;
            }
            let copies = if rng.chance(imp.duplicate) { 2 } else { 1 };
            st.duplicated += copies - 1;
            let seq = next_seq;
            next_seq += 1;
            for _ in 0..copies {
                held.push(Held {
                    at: now + rng.delay(&imp),
                    seq,
                    frame: buf[..n].to_vec(),
                });
            }
        }
        st.max_held = st.max_held.max(held.len() as u64);
    }
}
