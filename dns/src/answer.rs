//! Answering one query from a snapshot of the names: the hot path.
//!
//! The query is parsed with hickory-proto (header, the one question, the
//! additional section for EDNS), which rejects every malformed input with an
//! error. The answer is then written by hand: the question's bytes are
//! copied from the query (keeping the client's letter case, which 0x20
//! randomisation needs), and every answer's owner name is a compression
//! pointer to offset 12, the question's name. No allocation happens on this
//! path: the output buffer is the caller's and is reused.
//!
//! Decisions, in order: responses and runts are dropped; other opcodes get
//! NOTIMP; several questions or answers in a query get FORMERR; EDNS
//! versions other than 0 get BADVERS; classes other than IN (or ANY) get
//! REFUSED. Then the name: a known name (a single label gets the domain
//! appended) is answered (A records, or nothing for other types); the
//! reverse name of a known address gets PTR records; any other name in our
//! domain gets NXDOMAIN; the rest, unknown single labels included, is
//! forwarded upstream.

use crate::snapshot::Snapshot;
use hickory_proto::op::{Header, Message, OpCode};

use hickory_proto::op::Query;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use std::net::Ipv4Addr;

/// Smallest UDP payload every client accepts.
pub const MIN_UDP_PAYLOAD: usize = 512;
/// The EDNS UDP payload size we advertise and honour at most.
pub const EDNS_PAYLOAD: u16 = 1232;
/// Largest response over TCP.
pub const MAX_TCP_PAYLOAD: usize = 65535;

const NOERROR: u8 = 0;
const FORMERR: u8 = 1;
/// Response code for an upstream failure.
pub(crate) const SERVFAIL: u8 = 2;
const NXDOMAIN: u8 = 3;
const NOTIMP: u8 = 4;
const REFUSED: u8 = 5;
/// BADVERS is extended rcode 16: 0 in the header, 1 in the OPT record.
const BADVERS_HIGH: u8 = 1;

const A: u16 = 1;
const PTR: u16 = 12;
const OPT: u16 = 41;
const ANY: u16 = 255;
const IN: u16 = 1;

/// Which transport a query came by (it sets the size limit of the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: 512 bytes, or the client's EDNS size up to [`EDNS_PAYLOAD`].
    Udp,
    /// TCP: up to 65535 bytes.
    Tcp,
}

/// What to do with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Send the bytes written to the output buffer back to the client.
    Reply,
    /// Not ours: send the query to the upstream servers.
    Forward,
    /// Send nothing (not a query, or too short to answer).
    Drop,
}

/// A small xorshift generator for answer order: not for secrets.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The parts of a well-formed query the answer needs.
struct Parsed {
    id: u16,
    rd: bool,
    cd: bool,
    /// End of the question in the query.
    qend: usize,
    qtype: u16,
    qclass: u16,
    /// The client's EDNS payload size, when it sent EDNS.
    edns: Option<u16>,
    edns_version: u8,
    /// The name, lowercase, dotted, with the trailing dot.
    key: [u8; 320],
    key_len: usize,
    labels: usize,
    /// A label held a dot or a byte outside printable ASCII.
    odd: bool,
}

enum Fail {
    Drop,
    /// Answer with this rcode and no question.
    Reply(u8),
}

fn parse(query: &[u8]) -> Result<Parsed, Fail> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return Err(Fail::Drop);
    }
    let mut d = BinDecoder::new(query);
    let header = Header::read(&mut d).map_err(|_| Fail::Drop)?;
    if header.metadata.op_code != OpCode::Query {
        return Err(Fail::Reply(NOTIMP));
    }
    let c = header.counts;
    if c.queries != 1 || c.answers != 0 || c.authorities != 0 || c.additionals > 4 {
        return Err(Fail::Reply(FORMERR));
    }
    let q = Query::read(&mut d).map_err(|_| Fail::Reply(FORMERR))?;
    let qend = d.index();
    let mut edns = None;
    let mut edns_version = 0;
    if c.additionals > 0 {
        let (_, e, _) = Message::read_records(&mut d, c.additionals as usize, true, OpCode::Query)
            .map_err(|_| Fail::Reply(FORMERR))?;
        if let Some(e) = e {
            edns = Some(e.max_payload());
            edns_version = e.version();
        }
    }
    let mut p = Parsed {
        id: header.metadata.id,
        rd: header.metadata.recursion_desired,
        cd: header.metadata.checking_disabled,
        qend,
        qtype: u16::from(q.query_type()),
        qclass: u16::from(q.query_class()),
        edns,
        edns_version,
        key: [0; 320],
        key_len: 0,
        labels: 0,
        odd: false,
    };
    for label in q.name().iter() {
        for &b in label {
            if b == b'.' || !(0x21..0x7f).contains(&b) {
                p.odd = true;
            }
            p.key[p.key_len] = b.to_ascii_lowercase();
            p.key_len += 1;
        }
        p.key[p.key_len] = b'.';
        p.key_len += 1;
        p.labels += 1;
    }
    Ok(p)
}

/// Answer `query` from `snap` into `out` (cleared first).
pub(crate) fn respond(
    snap: &Snapshot,
    query: &[u8],
    transport: Transport,
    out: &mut Vec<u8>,
    rng: &mut Rng,
) -> Outcome {
    out.clear();
    let mut p = match parse(query) {
        Ok(p) => p,
        Err(Fail::Drop) => return Outcome::Drop,
        Err(Fail::Reply(rcode)) => {
            header_only(query, rcode, out);
            return Outcome::Reply;
        }
    };
    let limit = match transport {
        Transport::Tcp => MAX_TCP_PAYLOAD,
        Transport::Udp => p.edns.map_or(MIN_UDP_PAYLOAD, |s| {
            (s as usize).clamp(MIN_UDP_PAYLOAD, EDNS_PAYLOAD as usize)
        }),
    };
    if p.edns.is_some() && p.edns_version != 0 {
        start(&p, query, 0, false, out);
        end(&p, out, BADVERS_HIGH);
        return Outcome::Reply;
    }
    if p.qclass != IN && p.qclass != ANY {
        start(&p, query, REFUSED, false, out);
        end(&p, out, 0);
        return Outcome::Reply;
    }
    if p.odd || p.labels == 0 {
        return Outcome::Forward;
    }
    // A single label is a name in our domain.
    if p.labels == 1 {
        let d = &snap.domain;
        if p.key_len + d.len() <= p.key.len() {
            p.key[p.key_len..p.key_len + d.len()].copy_from_slice(d);
            p.key_len += d.len();
        }
    }
    let key = &p.key[..p.key_len];
    if let Some(addrs) = snap.names.get(key) {
        start(&p, query, NOERROR, true, out);
        if p.qtype == A || p.qtype == ANY {
            a_records(snap.ttl, addrs, out, rng);
        }
        return finish(&p, limit, out);
    }
    if let Some(addr) = reverse_addr(key) {
        if let Some(names) = snap.reverse.get(&addr) {
            start(&p, query, NOERROR, true, out);
            if p.qtype == PTR || p.qtype == ANY {
                ptr_records(snap.ttl, names, out);
            }
            return finish(&p, limit, out);
        }
        return Outcome::Forward;
    }
    if p.labels == 1 {
        return Outcome::Forward;
    }
    let d = &snap.domain[..];
    if key == d {
        start(&p, query, NOERROR, true, out);
        return finish(&p, limit, out);
    }
    if key.len() > d.len() && key.ends_with(d) && key[key.len() - d.len() - 1] == b'.' {
        start(&p, query, NXDOMAIN, true, out);
        return finish(&p, limit, out);
    }
    Outcome::Forward
}

/// An answer with `rcode` and the question of `query`, for a query that
/// was forwarded and failed. Returns false (writing nothing) when `query`
/// is not a query.
pub(crate) fn error_reply(query: &[u8], rcode: u8, out: &mut Vec<u8>) -> bool {
    out.clear();
    match parse(query) {
        Ok(p) => {
            start(&p, query, rcode, false, out);
            end(&p, out, 0);
            true
        }
        Err(Fail::Drop) => false,
        Err(Fail::Reply(rc)) => {
            header_only(query, rc, out);
            true
        }
    }
}

/// An upstream's answer too large for the client's UDP limit: the
/// question with TC set instead, so that the client retries over TCP.
pub(crate) fn truncated_reply(query: &[u8], out: &mut Vec<u8>) -> bool {
    if !error_reply(query, NOERROR, out) {
        return false;
    }
    out[2] |= 0x02;
    true
}

/// The UDP size limit for a query's answer.
pub(crate) fn udp_limit(query: &[u8]) -> usize {
    match parse(query) {
        Ok(p) => p.edns.map_or(MIN_UDP_PAYLOAD, |s| {
            (s as usize).clamp(MIN_UDP_PAYLOAD, 65535)
        }),
        Err(_) => MIN_UDP_PAYLOAD,
    }
}

fn header_only(query: &[u8], rcode: u8, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&query[..2]);
    // QR, the query's opcode and RD; RA.
    out.push(0x80 | (query[2] & 0x79));
    out.push(0x80 | rcode);
    out.extend_from_slice(&[0; 8]);
}

/// Header and question; answer count 0 for now.
fn start(p: &Parsed, query: &[u8], rcode: u8, aa: bool, out: &mut Vec<u8>) {
    let aa = if aa { 0x04 } else { 0 };
    let cd = if p.cd { 0x10 } else { 0 };
    out.extend_from_slice(&p.id.to_be_bytes());
    out.push(0x80 | aa | p.rd as u8);
    out.push(0x80 | cd | rcode);
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&query[12..p.qend]);
}

fn a_records(ttl: u32, addrs: &[Ipv4Addr], out: &mut Vec<u8>, rng: &mut Rng) {
    let first = out.len();
    for a in addrs {
        out.extend_from_slice(&[0xc0, 0x0c, 0, A as u8, 0, IN as u8]);
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&a.octets());
    }
    // Fisher–Yates over the 16-byte records, in place.
    let n = addrs.len();
    for i in (1..n).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        if i != j {
            let (lo, hi) = out[first..].split_at_mut(i * 16);
            lo[j * 16..j * 16 + 16].swap_with_slice(&mut hi[..16]);
        }
    }
    set_answers(out, n);
}

fn ptr_records(ttl: u32, names: &[Box<[u8]>], out: &mut Vec<u8>) {
    for wire in names {
        out.extend_from_slice(&[0xc0, 0x0c, 0, PTR as u8, 0, IN as u8]);
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(wire.len() as u16).to_be_bytes());
        out.extend_from_slice(wire);
    }
    set_answers(out, names.len());
}

fn set_answers(out: &mut [u8], n: usize) {
    let n = n.min(u16::MAX as usize) as u16;
    out[6..8].copy_from_slice(&n.to_be_bytes());
}

/// Append our OPT record when the client sent one.
fn end(p: &Parsed, out: &mut Vec<u8>, rcode_high: u8) {
    if p.edns.is_some() {
        out.extend_from_slice(&[0, 0, OPT as u8]);
        out.extend_from_slice(&EDNS_PAYLOAD.to_be_bytes());
        out.extend_from_slice(&[rcode_high, 0, 0, 0, 0, 0]);
        out[10..12].copy_from_slice(&1u16.to_be_bytes());
    }
}

/// OPT, then truncation to the limit: over it, the answers go and TC is set.
fn finish(p: &Parsed, limit: usize, out: &mut Vec<u8>) -> Outcome {
    let opt = if p.edns.is_some() { 11 } else { 0 };
    if out.len() + opt > limit {
        out.truncate(12 + (p.qend - 12));
        out[2] |= 0x02;
        set_answers(out, 0);
    }
    end(p, out, 0);
    Outcome::Reply
}

/// The address of a reverse name `d.c.b.a.in-addr.arpa.`.
fn reverse_addr(key: &[u8]) -> Option<Ipv4Addr> {
    let head = key.strip_suffix(b".in-addr.arpa.")?;
    let mut o = [0u8; 4];
    let mut parts = head.split(|&b| b == b'.');
    for i in (0..4).rev() {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let v = part
            .iter()
            .fold(0u32, |acc, &b| acc * 10 + (b - b'0') as u32);
        o[i] = u8::try_from(v).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(o))
}

#[cfg(test)]
mod tests {
    use super::Rng;
    use super::*;
    use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_addr(b"4.3.19.198.in-addr.arpa."),
            Some(Ipv4Addr::new(198, 19, 3, 4))
        );
        for bad in [
            &b"3.19.198.in-addr.arpa."[..],
            b"256.3.19.198.in-addr.arpa.",
            b"a.3.19.198.in-addr.arpa.",
            b"1.4.3.19.198.in-addr.arpa.",
            b".3.19.198.in-addr.arpa.",
        ] {
            assert_eq!(reverse_addr(bad), None);
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let snap = Snapshot::for_tests();
            let mut out = Vec::new();
            let mut rng = Rng::new(1);
            for t in [Transport::Udp, Transport::Tcp] {
                let o = respond(&snap, &bytes, t, &mut out, &mut rng);
                if o == Outcome::Reply {
                    prop_assert!(out.len() >= 12);
                    prop_assert_eq!(&out[..2], &bytes[..2]);
                }
                let _ = error_reply(&bytes, SERVFAIL, &mut out);
                let _ = truncated_reply(&bytes, &mut out);
            }
        }

        #[test]
        fn mutated_queries_never_panic(pos in 0usize..64, val in any::<u8>(), cut in 0usize..64) {
            // A valid query for a known name, one byte changed, then cut.
            let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
            q.extend_from_slice(b"\x02c1\x04mesh\x05local\x00\x00\x01\x00\x01");
            q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
            let n = q.len();
            q[pos % n] = val;
            q.truncate(n - cut.min(n));
            let snap = Snapshot::for_tests();
            let mut out = Vec::new();
            let mut rng = Rng::new(7);
            let _ = respond(&snap, &q, Transport::Udp, &mut out, &mut rng);
            prop_assert!(out.len() <= 1232);
        }
    }
}
