//! Micro-benchmarks of the sleeve's per-byte work, in bytes per second:
//! encapsulation (cutting a message into segment headers + slices, as the
//! sender does before its `UDP_SEGMENT` send), reassembly, and sealing and
//! opening with ChaCha20-Poly1305, for a 64 KB super-frame message and a
//! 1,400-byte one.
//!
//! `cargo bench -p mesh-proto --bench sleeve`

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use mesh_proto::name::PeerName;
use mesh_proto::reassembly::Reassembler;
use mesh_proto::seal::{Opener, Sealer, TAG_LEN};
use mesh_proto::sleeve::{
    message_header, parse_datagram, push_frame, segment_message, Segment, DATAGRAM_HEADER_LEN,
    VNET_HDR_LEN,
};
use std::hint::black_box;
use std::time::{Duration, Instant};

const A: PeerName = PeerName([2, 0, 0, 0, 0, 1]);
const B: PeerName = PeerName([2, 0, 0, 0, 0, 2]);
/// Segment payload on a 1,500-byte underlay.
const PAYLOAD: usize = 1500 - 28 - DATAGRAM_HEADER_LEN;

fn body(frame_len: usize) -> Vec<u8> {
    let mut f = vec![0x5au8; frame_len];
    f[..VNET_HDR_LEN].fill(0);
    let mut b = Vec::with_capacity(frame_len + 4 + TAG_LEN);
    push_frame(&mut b, &f).expect("frame");
    b
}

fn sizes() -> [(&'static str, usize); 2] {
    [("64KB", 65_000), ("1400B", 1_400)]
}

fn encap(c: &mut Criterion) {
    let mut g = c.benchmark_group("encap");
    for (name, len) in sizes() {
        let msg = body(len);
        g.throughput(Throughput::Bytes(msg.len() as u64));
        g.bench_with_input(BenchmarkId::new("segment", name), &msg, |b, msg| {
            let mut hdrs = Vec::with_capacity(64);
            b.iter(|| {
                let h = message_header(A, B, 0, None, 7).expect("header").emit();
                let plan = Segment::plan(msg.len(), PAYLOAD).expect("plan");
                hdrs.clear();
                hdrs.extend(plan.headers(&h));
                let bytes: usize = (0..plan.count)
                    .map(|index| msg[plan.range(index, msg.len())].len())
                    .sum();
                black_box(hdrs.len() + bytes)
            })
        });
        let dgrams = segment_message(&message_header(A, B, 0, None, 7).expect("h"), &msg, PAYLOAD)
            .expect("s");
        g.bench_with_input(
            BenchmarkId::new("reassemble", name),
            &dgrams,
            |b, dgrams| {
                let mut r = Reassembler::new(8, 8, Duration::from_secs(2));
                let now = Instant::now();
                let mut counter = 0u64;
                b.iter(|| {
                    counter += 1;
                    for d in dgrams {
                        let (_, seg, range) = parse_datagram(d).expect("parse");
                        if let Some(m) = r.push(now, 1, counter, seg, &d[range]).expect("push") {
                            r.recycle(black_box(m));
                        }
                    }
                })
            },
        );
    }
    g.finish();
}

fn seal_open(c: &mut Criterion) {
    let mut g = c.benchmark_group("chacha20poly1305");
    for (name, len) in sizes() {
        let plain = body(len);
        g.throughput(Throughput::Bytes(plain.len() as u64));
        let sealer = Sealer::new(1, &[7; 32]);
        g.bench_with_input(BenchmarkId::new("seal", name), &plain, |b, plain| {
            let mut buf = plain.clone();
            b.iter(|| {
                buf.truncate(plain.len());
                let h = message_header(A, B, 0, Some(&sealer), 0).expect("header");
                let tag = sealer
                    .seal_detached(h.counter, &h.emit(), &mut buf)
                    .expect("seal");
                black_box(tag)
            })
        });
        // Each open gets a fresh copy and a fresh opener (the replay window
        // refuses a counter twice); setting them up is not measured.
        let h = message_header(A, B, 0, Some(&sealer), 0).expect("header");
        let mut sealed = plain.clone();
        sealer
            .seal(h.counter, &h.emit(), &mut sealed)
            .expect("seal");
        g.bench_with_input(BenchmarkId::new("open", name), &sealed, |b, sealed| {
            b.iter_batched(
                || (sealed.clone(), Opener::new(1, &[7; 32])),
                |(mut buf, mut o)| black_box(o.open(h.counter, &h.emit(), &mut buf).expect("open")),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = encap, seal_open
}
criterion_main!(benches);
