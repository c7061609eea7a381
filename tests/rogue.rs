//! A member that lies (issue 15, "Trust"). A raw client built on
//! `mesh-proto`'s own encoders joins h1 with the right password, as any
//! password holder can, and then:
//!
//! - pushes a topology entry for h2 at the highest incarnation and version,
//!   with no connections (signed with its own key, offered and not);
//! - pushes an entry for h1 itself the same way;
//! - pushes a name entry in h2's name (its own signed entry with the peer
//!   name bytes replaced by h2's);
//! - floods validly signed entries of 3,000 invented peers (each with its
//!   own key) at a daemon launched with `--max-peers 200`;
//! - in a second session, relays h2's IPAM record back at the top version
//!   with its claims and grants emptied.
//!
//! Honest hosts keep their entries (nickname, connections), their
//! container's name and address, their ping; h1 holds at most its bound of
//! peers, its RSS stays under 100 MB, and `mesh status`/`mesh report` work.
//! Before signed gossip (mesh 0.1), the first push made h1 show h2 as
//! "pwned" with no connections, and the flood was held whole.
//!
//! Addresses: the test's own underlay 198.18.0.0/24; the rogue (h3) runs no
//! daemon.

mod common;

use common::*;
use mesh_proto::conn::{Config, Connection, Event};
use mesh_proto::gossip::wire::{Body, ChannelMsg, Update};
use mesh_proto::handshake::Role;
use mesh_proto::handshake::{psk_from_password, StaticKey};
use mesh_proto::ipam::state::Payload;
use mesh_proto::name::PeerName;
use mesh_proto::names::NameTable;
use mesh_proto::sign::Identity;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(60);
const PASSWORD: &str = "rogue-test-s3cret";

/// A member run by the test: a control connection and nothing else.
struct Rogue {
    id: Identity,
    stream: TcpStream,
    conn: Connection,
    peer: Option<PeerName>,
    /// Why h1 closed the connection, once it did.
    closed: Option<String>,
    /// The gossip messages h1 sent us.
    heard: Vec<Vec<u8>>,
}

impl Rogue {
    /// Connect from `ns` to `addr` and finish the handshake.
    fn join(ns: &str, addr: &str) -> Rogue {
        let stream = in_netns(ns, || TcpStream::connect((addr, PORT))).expect("connect to h1");
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let seed: [u8; 32] = random_bytes(32).try_into().expect("32 bytes");
        let id = Identity::from_seed(&seed);
        let key: [u8; 32] = random_bytes(32).try_into().expect("32 bytes");
        let psk = psk_from_password(PASSWORD.as_bytes()).expect("psk");
        let conn = Connection::new(
            Config {
                role: Role::Initiator,
                key: StaticKey::from_identity(&id),
                psk: Some(psk),
                nickname: "rogue".into(),
                udp_port: PORT,
                max_frame: 1400,
                sleeve_key: Some((1, key)),
                fastdp: None,
            },
            Instant::now(),
        );
        let mut r = Rogue {
            id,
            stream,
            conn,
            peer: None,
            closed: None,
            heard: Vec::new(),
        };
        let until = Instant::now() + DEADLINE;
        while r.peer.is_none() {
            assert!(Instant::now() < until, "the rogue's handshake with h1");
            assert!(r.closed.is_none(), "h1 refused the rogue: {:?}", r.closed);
            r.pump();
        }
        r
    }

    /// Write what the connection has, read what arrived, keep time.
    fn pump(&mut self) {
        if self.closed.is_some() {
            return;
        }
        while let Some(t) = self.conn.poll_transmit() {
            if let Err(e) = self.stream.write_all(&t) {
                self.closed = Some(format!("write: {e}"));
                return;
            }
        }
        let mut buf = [0u8; 65536];
        match self.stream.read(&mut buf) {
            Ok(0) => {
                self.closed.get_or_insert_with(|| "end of stream".into());
            }
            Ok(n) => self.conn.handle_input(Instant::now(), &buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                self.closed = Some(format!("read: {e}"));
            }
        }
        self.conn.handle_timeout(Instant::now());
        while let Some(ev) = self.conn.poll_event() {
            match ev {
                Event::Established { peer, .. } => self.peer = Some(peer),
                Event::Gossip(bytes) => self.heard.push(bytes),
                Event::Closed { reason, .. } => {
                    self.closed.get_or_insert(reason);
                }
                _ => {}
            }
        }
    }

    fn send(&mut self, body: &Body) {
        self.conn.send_gossip(body.encode());
        self.pump();
    }

    /// Keep the connection alive for `d`.
    fn idle(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.pump();
        }
    }
}

/// A whole entry for `victim` far ahead of its own, no connections,
/// signed by `signer`.
fn forged_entry(victim: PeerName, signer: &Identity, offer: bool) -> Body {
    let mut u = Update {
        push: true,
        names: vec![],
        recs: vec![],
    };
    u.push_whole_signed(victim, 1 << 40, 1_000_000, "pwned", &[], signer, offer);
    Body::Update(u)
}

/// Validly signed whole entries of `n` invented peers, each listing a
/// connection to `hub`, in messages of 100.
fn invented_peers(n: usize, hub: PeerName) -> Vec<Body> {
    let new = || Update {
        push: true,
        names: vec![],
        recs: vec![],
    };
    let mut out = Vec::new();
    let mut upd = new();
    for i in 0..n {
        let mut seed = [0x77u8; 32];
        seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let id = Identity::from_seed(&seed);
        upd.push_whole_signed(id.name(), 1, 1, &format!("fake{i}"), &[hub], &id, true);
        if upd.recs.len() == 100 {
            out.push(Body::Update(std::mem::replace(&mut upd, new())));
        }
    }
    if !upd.recs.is_empty() {
        out.push(Body::Update(upd));
    }
    out
}

/// What `host` reports of peer `name`: nickname, established connections.
fn seen(host: &Host, name: &str) -> Option<(String, usize)> {
    let r = report(host);
    r["peers"].as_array()?.iter().find_map(|p| {
        (p["name"] == name).then(|| {
            let conns = p["connections"]
                .as_array()
                .map_or(0, |c| c.iter().filter(|c| c["established"] == true).count());
            (p["nickname"].as_str().unwrap_or("").to_string(), conns)
        })
    })
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_lying_member_changes_no_one_elses_state_and_its_flood_is_bounded() {
    let Some(mut w) = World::new("rogue") else {
        return;
    };
    let (h1, h2, h3) = (w.add_host(), w.add_host(), w.add_host());
    let (c1, c2) = (w.add_container("c1"), w.add_container("c2"));
    let n1 = w.launch(&h1, &["--password", PASSWORD, "--max-peers", "200"]);
    let n2 = w.launch(&h2, &["--password", PASSWORD, "198.18.0.1"]);
    w.attach_net(&h1, &c1, "10.32.0.0/12");
    let ip2 = w.attach_net(&h2, &c2, "10.32.0.0/12");
    wait_ping(&c1, &ip2, DEADLINE);
    wait_until(DEADLINE, "h1 sees h2's entry with its connection", || {
        seen(&h1, &n2).is_some_and(|(_, c)| c >= 1)
    });
    let h2_at_h1 = seen(&h1, &n2);
    let h2_at_h2 = seen(&h2, &n2);
    let h1_at_h2 = seen(&h2, &n1);
    let names_before = wait_for(DEADLINE, "h1 resolves c2", || {
        let out = h1.mesh(&["dns-lookup", "c2"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains(&ip2) {
            Ok(text)
        } else {
            Err(show(&out))
        }
    });

    let mut rogue = Rogue::join(&h3.ns, "198.18.0.1");
    let victim: PeerName = n2.parse().expect("h2's name");
    let me: PeerName = n1.parse().expect("h1's name");
    let signer = rogue.id.clone();
    for (who, offer) in [(victim, true), (victim, false), (me, true)] {
        rogue.send(&forged_entry(who, &signer, offer));
    }
    for m in invented_peers(3_000, rogue.id.name()) {
        rogue.send(&m);
    }
    rogue.idle(Duration::from_secs(3));
    assert!(
        rogue.closed.is_none(),
        "forged topology entries are refused quietly: {:?}",
        rogue.closed
    );
    // A name entry in h2's name: the rogue's own signed entry with its
    // peer name replaced by h2's.
    let mut own = NameTable::new(rogue.id.clone());
    own.add("c-rogue", "10.32.0.66".parse().expect("ip"), "c2")
        .expect("a name");
    let mut payload = own.take_delta().expect("a delta");
    let rogue_name = rogue.id.name().0;
    let at = payload
        .windows(6)
        .position(|w| w == rogue_name)
        .expect("the peer name in the payload");
    payload[at..at + 6].copy_from_slice(&victim.0);
    rogue.send(&Body::Channel(ChannelMsg {
        channel: mesh_proto::names::CHANNEL.into(),
        payload,
    }));
    let until = Instant::now() + DEADLINE;
    while rogue.closed.is_none() && Instant::now() < until {
        rogue.pump();
    }
    let why = rogue.closed.clone().unwrap_or_default();
    assert!(
        why.contains("refused entries of peer"),
        "h1 ends the connection of a member that forges names: {why:?}"
    );

    // Honest state is untouched, everywhere.
    wait_until(DEADLINE, "h1 logs the refusals", || {
        h1.log_tail(400).contains("gossip refused")
    });
    assert_eq!(seen(&h1, &n2), h2_at_h1, "h2's entry as h1 sees it");
    assert_eq!(seen(&h2, &n2), h2_at_h2, "h2's own entry");
    assert_eq!(
        seen(&h2, &n1).map(|s| s.0),
        h1_at_h2.map(|s| s.0),
        "h1's entry at h2"
    );
    assert_eq!(h1.mesh_ok(&["dns-lookup", "c2"]), names_before, "c2 at h1");
    assert!(ping(&c1.ns, &ip2), "c1 still reaches c2");
    let peers = report(&h1)["peers"].as_array().map_or(0, |p| p.len());
    assert!(peers <= 200, "h1 holds {peers} peers, over --max-peers 200");

    // A second session: h2's genuine IPAM record, as h1 relays it, taken
    // over at the top version with its claims and grants emptied (what
    // made h2 own nothing before), under h2's own signature.
    let owned = |h: &Host| -> Option<u64> {
        report(h)["ipam"]["peers"]
            .as_array()?
            .iter()
            .find(|p| p["peer"] == n2.as_str())?["owned"]
            .as_u64()
    };
    let owned_before = (owned(&h1), owned(&h2));
    assert!(owned_before.0.is_some_and(|o| o > 0), "{owned_before:?}");
    let mut rogue = Rogue::join(&h3.ns, "198.18.0.1");
    let until = Instant::now() + DEADLINE;
    let state = loop {
        assert!(Instant::now() < until, "h1 sends its IPAM state");
        rogue.pump();
        let found = rogue.heard.iter().find_map(|m| match Body::decode(m) {
            Ok(Body::Channel(c)) if c.channel == "ipam" => Payload::decode(&c.payload)
                .ok()
                .filter(|p| p.records.iter().any(|r| r.peer == victim)),
            _ => None,
        });
        if let Some(p) = found {
            break p;
        }
    };
    let mut forged = state.clone();
    forged.records.retain(|r| r.peer == victim);
    for r in &mut forged.records {
        r.record.version = u64::MAX / 2;
        r.record.held.clear();
        r.record.grants.clear();
    }
    rogue.send(&Body::Channel(ChannelMsg {
        channel: "ipam".into(),
        payload: forged.encode(),
    }));
    let until = Instant::now() + DEADLINE;
    while rogue.closed.is_none() && Instant::now() < until {
        rogue.pump();
    }
    assert!(
        rogue.closed.is_some(),
        "h1 ends the connection of a member that forges IPAM records"
    );
    assert_eq!((owned(&h1), owned(&h2)), owned_before, "h2's space");
    let c3 = w.add_container("c3");
    let ip3 = w.attach_net(&h2, &c3, "10.32.0.0/12");
    wait_ping(&c1, &ip3, DEADLINE);

    let pid = h1.daemon_pid().expect("h1's daemon");
    let rss = rss_kib(pid);
    assert!(rss < 100 * 1024, "h1's RSS is {rss} KiB after the flood");
    assert!(h1.try_status().is_ok(), "mesh status on h1");
    eprintln!("h1 after the flood: {peers} peers, RSS {rss} KiB");
}
