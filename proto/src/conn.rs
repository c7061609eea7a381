//! One control connection (TCP 6783) as a sans-IO state machine.
//!
//! A [`Connection`] is what `quinn-proto`'s `Connection` is to QUIC: it owns
//! the protocol of one peer connection and none of its I/O. It goes
//!
//! 1. **hellos**: both ends send an 8-byte [`Hello`] at once; the version is
//!    negotiated and the password flags compared;
//! 2. **Noise handshake** (`XX`, or `XXpsk3` with a password), both hellos as
//!    its prologue, in [`RecordKind::Handshake`] records;
//! 3. **introductions**: each side sends an [`Intro`] as its first encrypted
//!    message; when the peer's arrives, [`Event::Established`] carries it out;
//! 4. **established**: gossip both ways, with a password the sleeve rekey
//!    messages (offers and acknowledgements, [`crate::rekey`]; the caller
//!    decides when and draws the keys), heartbeats paced by [`PACE`] (a
//!    [`Beat`]: every 2 s until the peer is heard and whenever it has gone
//!    quiet, every 60 s while healthy, the dialer pinging and the acceptor
//!    answering), and the connection is declared dead after [`DEAD_AFTER`]
//!    of silence. That is the control channel's own check only: the
//!    sleeve's heartbeats, every 10 s, declare a dead peer within 15 s
//!    (`sleeve::PACE` in the daemon), and TCP's user timeout catches a
//!    stream that stops taking data;
//! 5. **closed**: once, with [`Event::Closed`], by either side, a refusal,
//!    a protocol error or a timer. Nothing happens after that.
//!
//! Its methods come in the kinds quinn-proto documents: `handle_*` for
//! inputs (bytes read from the stream in any chunking, the time, the end of
//! the stream), commands ([`Connection::send_gossip`], [`Connection::close`],
//! the rekey messages),
//! and `poll_*` for outputs (bytes to write, events, the next deadline).
//! It reads no clock and draws no randomness: `now` is an argument, and the
//! random values it sends (sleeve keys) come from its caller: the first in
//! its [`Config`], the next ones with [`Connection::offer_sleeve_key`].
//!
//! Invariants: every reason it gives is the text the daemon has always shown
//! (tests match some of them); exactly one [`Event::Closed`] is emitted, and
//! it is the last event; the input buffer holds at most one incomplete record
//! beyond the chunk being handled.

use crate::beat::{Beat, Pace};
use crate::control::{ControlMsg, FastdpOffer, Intro};
use crate::frame::{self, RecordKind};
use crate::handshake::{Handshake, HandshakeError, Role, StaticKey, Transport};
use crate::hello::{Hello, HELLO_LEN};
use crate::name::PeerName;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Deadline for the whole setup of a connection (hello, handshake and
/// introduction together, from the moment it opened): a peer that dribbles
/// its handshake holds an unauthenticated slot this long at most.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often heartbeats go: every 2 s while the connection is new or the
/// peer has gone quiet, every 60 s while it is healthy (any message from
/// the peer counts as hearing it).
pub const PACE: Pace = Pace {
    fast: Duration::from_secs(2),
    slow: Duration::from_secs(60),
    dead_after: DEAD_AFTER,
};
/// Silence after which a connection is declared dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(75);
const _: () = assert!(PACE.check());
/// The reason given when closing the redundant one of two connections.
pub const DUPLICATE: &str = "duplicate connection";

/// What the daemon tells a connection about itself.
#[derive(Debug, Clone)]
pub struct Config {
    /// Whether we dialed or accepted.
    pub role: Role,
    /// Our persistent static key.
    pub key: StaticKey,
    /// The pre-shared key derived from the password, if any.
    pub psk: Option<[u8; 32]>,
    /// Our nickname, sent in the intro.
    pub nickname: String,
    /// Our sleeve's UDP port.
    pub udp_port: u16,
    /// The largest Ethernet frame our sleeve accepts (overlay MTU + 14).
    pub max_frame: u32,
    /// With a password: the id and the random key we will seal sleeve
    /// datagrams with (the caller draws it). Must be present exactly when
    /// `psk` is.
    pub sleeve_key: Option<(u8, [u8; 32])>,
    /// Our fast-path offer to this peer, opaque here.
    pub fastdp: Option<FastdpOffer>,
}

/// How a connection ended, for the one who decides whether to dial again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// Try again later (after backoff).
    Retry,
    /// Do not try this target again (e.g. it is ourselves).
    Fatal,
    /// The peer is already connected through another connection.
    Duplicate,
}

/// What a connection reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Handshake and introductions are done: `peer` proved its key and sent
    /// `intro`. Its sleeve key, if any, matches our password setting.
    Established {
        /// The peer's name, from the key it proved.
        peer: PeerName,
        /// What it told about itself.
        intro: Intro,
    },
    /// A gossip message from the peer, opaque at this layer.
    Gossip(Vec<u8>),
    /// With sleeve keys: the peer offers a new key for its datagrams to us.
    /// Install it, then acknowledge it ([`Connection::ack_sleeve_key`]);
    /// see [`crate::rekey`].
    SleeveKey {
        /// Its id in datagram headers.
        key_id: u8,
        /// The key.
        key: [u8; 32],
    },
    /// With sleeve keys: the peer installed the key we offered as `key_id`
    /// ([`Connection::offer_sleeve_key`]); we may seal with it.
    SleeveKeyAck {
        /// The id of our offer.
        key_id: u8,
    },
    /// The connection is over; write what [`Connection::poll_transmit`]
    /// still gives (a refusal, a `Close`) and drop the stream.
    Closed {
        /// How it ended.
        kind: CloseKind,
        /// Why, in the words `mesh status` shows.
        reason: String,
        /// Whether the peer misbehaved or was refused, so that the driver
        /// logs a (rate-limited) warning.
        warn: bool,
    },
}

enum State {
    /// Waiting for the peer's hello.
    Hello,
    /// The Noise handshake.
    Handshake(Box<Handshake>),
    /// Our intro is sent; waiting for theirs.
    Intro(Box<Transport>),
    /// Gossip and heartbeats.
    Established(Box<Transport>),
    /// Over.
    Closed,
}

/// One control connection's protocol: see the module docs.
pub struct Connection {
    config: Config,
    state: State,
    ours: [u8; HELLO_LEN],
    peer: Option<PeerName>,
    inbuf: Vec<u8>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    /// The deadline of the current setup step.
    setup_deadline: Instant,
    /// Heartbeats (the dialer leads).
    beat: Beat,
}

impl Connection {
    /// A new connection at `now`; our hello is ready in
    /// [`Connection::poll_transmit`] at once.
    pub fn new(config: Config, now: Instant) -> Connection {
        let ours = Hello::ours(config.psk.is_some()).emit();
        let beat = Beat::new(PACE, matches!(config.role, Role::Initiator));
        let mut transmits = VecDeque::new();
        transmits.push_back(ours.to_vec());
        Connection {
            config,
            state: State::Hello,
            ours,
            peer: None,
            inbuf: Vec::new(),
            transmits,
            events: VecDeque::new(),
            setup_deadline: now + SETUP_TIMEOUT,
            beat,
        }
    }

    /// The peer's name, once the handshake has proved it.
    pub fn peer(&self) -> Option<PeerName> {
        self.peer
    }

    /// Whether the introductions are done and the connection not closed.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    /// Whether the connection is over.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Bytes read from the stream, in any chunking.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
        if self.is_closed() {
            return;
        }
        // The buffer is taken out while its records are handled, so that
        // they are handled in place.
        let mut buf = std::mem::take(&mut self.inbuf);
        buf.extend_from_slice(bytes);
        let mut used = 0;
        while !self.is_closed() {
            let rest = &buf[used..];
            if let State::Hello = self.state {
                let Some(theirs) = rest.first_chunk::<HELLO_LEN>() else {
                    break;
                };
                used += HELLO_LEN;
                self.on_hello(theirs);
                continue;
            }
            match frame::parse(rest) {
                Ok(None) => break,
                Ok(Some((record, n))) => {
                    used += n;
                    self.on_record(now, record.kind, record.payload);
                }
                Err(e) => {
                    let what = self.step_name();
                    self.fail(CloseKind::Retry, format!("{what}: {e}"), true);
                }
            }
        }
        if !self.is_closed() {
            buf.drain(..used);
            self.inbuf = buf;
        }
    }

    /// The stream ended (`error` is the I/O error's text, e.g. `early eof`).
    pub fn handle_read_error(&mut self, _now: Instant, error: &str) {
        if self.is_closed() {
            return;
        }
        let what = self.step_name();
        self.fail(CloseKind::Retry, format!("{what}: {error}"), false);
    }

    /// The time has come (at or after [`Connection::poll_timeout`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.state {
            State::Closed => {}
            State::Hello | State::Handshake(_) | State::Intro(_) => {
                if now >= self.setup_deadline {
                    let what = self.step_name();
                    self.fail(CloseKind::Retry, format!("{what}: timed out"), false);
                }
            }
            State::Established(_) => {
                if self.beat.dead(now) {
                    let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
                    let reason = format!("no heartbeat from {peer} for {}s", DEAD_AFTER.as_secs());
                    self.fail(CloseKind::Retry, reason, false);
                    return;
                }
                if self.beat.due(now) {
                    self.send_heartbeat(now);
                }
            }
        }
    }

    /// When [`Connection::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Closed => None,
            State::Established(_) => {
                let due = self.beat.next_due().unwrap_or(self.setup_deadline);
                Some(self.beat.dead_at().map_or(due, |d| d.min(due)))
            }
            _ => Some(self.setup_deadline),
        }
    }

    /// Send a gossip message (ignored unless the handshake is done and the
    /// connection open).
    pub fn send_gossip(&mut self, bytes: Vec<u8>) {
        if matches!(self.state, State::Established(_) | State::Intro(_)) {
            self.send_msg(&ControlMsg::Gossip(bytes));
        }
    }

    /// Offer the peer a new key for our sleeve datagrams to it (ignored
    /// unless established with sleeve keys).
    pub fn offer_sleeve_key(&mut self, key_id: u8, key: [u8; 32]) {
        if self.config.sleeve_key.is_some() && self.is_established() {
            self.send_msg(&ControlMsg::SleeveKey { key_id, key });
        }
    }

    /// Tell the peer its offered key `key_id` is installed (ignored unless
    /// established with sleeve keys).
    pub fn ack_sleeve_key(&mut self, key_id: u8) {
        if self.config.sleeve_key.is_some() && self.is_established() {
            self.send_msg(&ControlMsg::SleeveKeyAck { key_id });
        }
    }

    /// Close the connection, telling the peer why when there is an
    /// encrypted channel to tell it on. [`DUPLICATE`] closes with
    /// [`CloseKind::Duplicate`], anything else with [`CloseKind::Retry`].
    pub fn close(&mut self, reason: &str) {
        if self.is_closed() {
            return;
        }
        if matches!(self.state, State::Established(_) | State::Intro(_)) {
            let mut r = reason.to_string();
            truncate_utf8(&mut r, frame::MAX_REFUSAL);
            self.send_msg(&ControlMsg::Close { reason: r });
        }
        if self.is_closed() {
            return;
        }
        let kind = if reason == DUPLICATE {
            CloseKind::Duplicate
        } else {
            CloseKind::Retry
        };
        self.fail(kind, reason.to_string(), false);
    }

    /// The next bytes to write to the stream.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The step a failure is attributed to, as today's messages name it.
    fn step_name(&self) -> &'static str {
        match self.state {
            State::Hello => "reading hello",
            State::Handshake(_) => "handshake",
            State::Intro(_) => "waiting for the peer's intro",
            State::Established(_) | State::Closed => "connection lost",
        }
    }

    fn fail(&mut self, kind: CloseKind, reason: String, warn: bool) {
        self.state = State::Closed;
        self.events.push_back(Event::Closed { kind, reason, warn });
    }

    fn refuse(&mut self, reason: &str) {
        let mut r = reason.as_bytes().to_vec();
        r.truncate(frame::MAX_REFUSAL);
        let mut out = Vec::with_capacity(r.len() + frame::RECORD_HEADER_LEN);
        if frame::emit(RecordKind::Refusal, &r, &mut out).is_ok() {
            self.transmits.push_back(out);
        }
    }

    fn on_hello(&mut self, theirs_bytes: &[u8; HELLO_LEN]) {
        let theirs = match Hello::parse(theirs_bytes) {
            Ok(h) => h,
            Err(e) => {
                return self.fail(CloseKind::Retry, format!("not a mesh peer: {e}"), true);
            }
        };
        let ours = Hello::ours(self.config.psk.is_some());
        if let Err(e) = ours.negotiate(&theirs) {
            let reason = e.to_string();
            self.refuse(&reason);
            return self.fail(CloseKind::Retry, reason, true);
        }
        if theirs.password != ours.password {
            let reason = password_reason(ours.password, theirs.password);
            return self.fail(CloseKind::Retry, reason, true);
        }
        let mut prologue = Vec::with_capacity(2 * HELLO_LEN);
        match self.config.role {
            Role::Initiator => {
                prologue.extend_from_slice(&self.ours);
                prologue.extend_from_slice(theirs_bytes);
            }
            Role::Responder => {
                prologue.extend_from_slice(theirs_bytes);
                prologue.extend_from_slice(&self.ours);
            }
        }
        let hs = match Handshake::new(
            self.config.role,
            &self.config.key,
            self.config.psk.as_ref(),
            &prologue,
        ) {
            Ok(h) => h,
            Err(e) => return self.fail(CloseKind::Fatal, e.to_string(), false),
        };
        self.state = State::Handshake(Box::new(hs));
        self.advance_handshake();
    }

    /// Write our handshake messages while it is our turn; finish when done.
    fn advance_handshake(&mut self) {
        loop {
            let State::Handshake(hs) = &mut self.state else {
                return;
            };
            if hs.is_finished() {
                break;
            }
            if !hs.is_my_turn() {
                return;
            }
            let msg = match hs.write() {
                Ok(m) => m,
                Err(e) => return self.fail(CloseKind::Retry, e.to_string(), false),
            };
            let mut out = Vec::with_capacity(msg.len() + frame::RECORD_HEADER_LEN);
            if let Err(e) = frame::emit(RecordKind::Handshake, &msg, &mut out) {
                return self.fail(CloseKind::Retry, format!("handshake: {e}"), false);
            }
            self.transmits.push_back(out);
        }
        let State::Handshake(hs) = std::mem::replace(&mut self.state, State::Closed) else {
            return;
        };
        let transport = match hs.finish() {
            Ok(t) => t,
            Err(e) => return self.fail(CloseKind::Retry, e.to_string(), false),
        };
        let peer = transport.remote_name();
        if peer == self.config.key.name() {
            return self.fail(
                CloseKind::Fatal,
                "connected to ourselves (this address is our own)".into(),
                false,
            );
        }
        self.peer = Some(peer);
        self.state = State::Intro(Box::new(transport));
        let intro = ControlMsg::Intro(Intro {
            nickname: self.config.nickname.clone(),
            udp_port: self.config.udp_port,
            max_frame: self.config.max_frame,
            sleeve_key: self.config.sleeve_key,
            fastdp: self.config.fastdp.clone(),
        });
        self.send_msg(&intro);
    }

    fn on_record(&mut self, now: Instant, kind: RecordKind, payload: &[u8]) {
        match &mut self.state {
            State::Hello | State::Closed => {}
            State::Handshake(hs) => {
                match kind {
                    RecordKind::Handshake => {}
                    RecordKind::Refusal => {
                        let reason =
                            format!("refused by peer: {}", String::from_utf8_lossy(payload));
                        return self.fail(CloseKind::Retry, reason, false);
                    }
                    RecordKind::Transport => {
                        return self.fail(
                            CloseKind::Retry,
                            "protocol error: transport record during handshake".into(),
                            true,
                        )
                    }
                }
                match hs.read(payload) {
                    Ok(()) => self.advance_handshake(),
                    Err(HandshakeError::Rejected) => {
                        let reason = password_reason(true, true);
                        self.refuse(&reason);
                        self.fail(CloseKind::Retry, reason, true);
                    }
                    Err(e) => {
                        self.fail(CloseKind::Retry, format!("handshake failed: {e}"), true);
                    }
                }
            }
            State::Intro(t) => {
                let msg = match kind {
                    RecordKind::Transport => t
                        .open(payload)
                        .map_err(|e| e.to_string())
                        .and_then(|b| ControlMsg::decode(&b).map_err(|e| e.to_string())),
                    RecordKind::Refusal => Err(format!(
                        "refused by peer: {}",
                        String::from_utf8_lossy(payload)
                    )),
                    RecordKind::Handshake => {
                        Err("protocol error: handshake record after the handshake".into())
                    }
                };
                let intro = match msg {
                    Ok(ControlMsg::Intro(i)) => i,
                    Ok(other) => {
                        let reason = format!("protocol error: expected intro, got {other:?}");
                        return self.fail(CloseKind::Retry, reason, true);
                    }
                    Err(e) => {
                        let reason = format!("waiting for the peer's intro: {e}");
                        return self.fail(CloseKind::Retry, reason, true);
                    }
                };
                if intro.sleeve_key.is_some() != self.config.sleeve_key.is_some() {
                    return self.fail(
                        CloseKind::Retry,
                        "protocol error: sleeve key missing".into(),
                        true,
                    );
                }
                let State::Intro(t) = std::mem::replace(&mut self.state, State::Closed) else {
                    return;
                };
                self.state = State::Established(t);
                self.beat.heard(now);
                let Some(peer) = self.peer else {
                    return self.fail(CloseKind::Retry, "protocol error: no peer".into(), false);
                };
                self.events.push_back(Event::Established { peer, intro });
                // The first heartbeat goes at once, as the daemon's ticker
                // always did.
                self.handle_timeout(now);
            }
            State::Established(t) => {
                if kind != RecordKind::Transport {
                    return self.fail(
                        CloseKind::Retry,
                        "protocol error: unexpected record".into(),
                        true,
                    );
                }
                let msg = t
                    .open(payload)
                    .map_err(|e| e.to_string())
                    .and_then(|b| ControlMsg::decode(&b).map_err(|e| e.to_string()));
                match msg {
                    Ok(ControlMsg::Heartbeat) => {
                        self.beat.heard(now);
                        if self.beat.should_answer(now) {
                            self.send_heartbeat(now);
                        }
                    }
                    Ok(ControlMsg::Intro(_)) => self.beat.heard(now),
                    Ok(ControlMsg::SleeveKey { key_id, key }) => {
                        self.beat.heard(now);
                        if self.config.sleeve_key.is_some() {
                            self.events.push_back(Event::SleeveKey { key_id, key });
                        }
                    }
                    Ok(ControlMsg::SleeveKeyAck { key_id }) => {
                        self.beat.heard(now);
                        if self.config.sleeve_key.is_some() {
                            self.events.push_back(Event::SleeveKeyAck { key_id });
                        }
                    }
                    Ok(ControlMsg::Gossip(bytes)) => {
                        self.beat.heard(now);
                        self.events.push_back(Event::Gossip(bytes));
                    }
                    Ok(ControlMsg::Close { reason }) => {
                        if reason == DUPLICATE {
                            self.fail(CloseKind::Duplicate, DUPLICATE.into(), false);
                        } else {
                            self.fail(CloseKind::Retry, format!("closed by peer: {reason}"), false);
                        }
                    }
                    Err(e) => {
                        self.fail(
                            CloseKind::Retry,
                            format!("malformed control message: {e}"),
                            true,
                        );
                    }
                }
            }
        }
    }

    /// Send a heartbeat, and note it as our beat.
    fn send_heartbeat(&mut self, now: Instant) {
        self.beat.sent(now);
        self.send_msg(&ControlMsg::Heartbeat);
    }

    /// Seal and queue one message; a failure closes the connection.
    fn send_msg(&mut self, msg: &ControlMsg) {
        let (State::Intro(t) | State::Established(t)) = &mut self.state else {
            return;
        };
        let sealed = msg
            .encode()
            .map_err(|e| e.to_string())
            .and_then(|b| t.seal(&b).map_err(|e| e.to_string()))
            .and_then(|s| {
                let mut out = Vec::with_capacity(s.len() + frame::RECORD_HEADER_LEN);
                frame::emit(RecordKind::Transport, &s, &mut out)
                    .map(|()| out)
                    .map_err(|e| e.to_string())
            });
        match sealed {
            Ok(out) => self.transmits.push_back(out),
            Err(e) => self.fail(CloseKind::Retry, format!("connection lost: {e}"), false),
        }
    }
}

/// Why two peers' passwords do not match, in the words `mesh status` shows.
pub fn password_reason(ours: bool, theirs: bool) -> String {
    match (ours, theirs) {
        (true, false) => "password mismatch: we have a password and the peer has none".into(),
        (false, true) => "password mismatch: the peer has a password and we have none".into(),
        _ => "password mismatch: the handshake did not authenticate (different passwords)".into(),
    }
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    //! Two connections driven against each other by a [`Pair`] that shuttles
    //! bytes (in small, odd chunks) and advances a fake clock.

    use super::*;

    const PSK_A: [u8; 32] = [1; 32];
    const PSK_B: [u8; 32] = [2; 32];

    fn config(role: Role, key: &StaticKey, psk: Option<[u8; 32]>) -> Config {
        Config {
            role,
            key: key.clone(),
            psk,
            nickname: format!("{role:?}").to_lowercase(),
            udp_port: 6783,
            max_frame: 1414,
            sleeve_key: psk.map(|_| (1, [role as u8 + 7; 32])),
            fastdp: None,
        }
    }

    fn key() -> StaticKey {
        StaticKey::generate().expect("a key")
    }

    /// One end: its connection, what it reported, and every record it sent.
    struct End {
        conn: Connection,
        events: Vec<Event>,
        sent: Vec<Vec<u8>>,
        /// A silent end receives nothing, sends nothing, sees no time.
        silent: bool,
    }

    impl End {
        fn new(conn: Connection) -> End {
            End {
                conn,
                events: Vec::new(),
                sent: Vec::new(),
                silent: false,
            }
        }

        fn closed(&self) -> Option<(CloseKind, &str)> {
            self.events.iter().find_map(|e| match e {
                Event::Closed { kind, reason, .. } => Some((*kind, reason.as_str())),
                _ => None,
            })
        }

        fn gossip(&self) -> Vec<Vec<u8>> {
            self.events
                .iter()
                .filter_map(|e| match e {
                    Event::Gossip(g) => Some(g.clone()),
                    _ => None,
                })
                .collect()
        }

        fn established(&self) -> Option<(PeerName, Intro)> {
            self.events.iter().find_map(|e| match e {
                Event::Established { peer, intro } => Some((*peer, intro.clone())),
                _ => None,
            })
        }
    }

    /// Two connections and a fake clock.
    struct Pair {
        now: Instant,
        a: End,
        b: End,
        /// Bytes per delivered chunk.
        chunk: usize,
    }

    impl Pair {
        fn new(a: Config, b: Config) -> Pair {
            let now = Instant::now();
            Pair {
                now,
                a: End::new(Connection::new(a, now)),
                b: End::new(Connection::new(b, now)),
                chunk: 7,
            }
        }

        /// A dialer with `ka` and an acceptor with `kb`, driven until quiet.
        fn connect(
            ka: &StaticKey,
            kb: &StaticKey,
            pa: Option<[u8; 32]>,
            pb: Option<[u8; 32]>,
        ) -> Pair {
            let mut p = Pair::new(
                config(Role::Initiator, ka, pa),
                config(Role::Responder, kb, pb),
            );
            p.drive();
            p
        }

        /// Move bytes both ways until neither end has more to say.
        fn drive(&mut self) {
            for _ in 0..1000 {
                let ab = Self::step(self.now, &mut self.a, &mut self.b, self.chunk);
                let ba = Self::step(self.now, &mut self.b, &mut self.a, self.chunk);
                if !ab && !ba {
                    return;
                }
            }
            panic!("the pair never went quiet");
        }

        fn step(now: Instant, from: &mut End, to: &mut End, chunk: usize) -> bool {
            let mut moved = false;
            while let Some(e) = from.conn.poll_event() {
                from.events.push(e);
                moved = true;
            }
            while let Some(bytes) = from.conn.poll_transmit() {
                moved = true;
                if from.silent {
                    continue;
                }
                from.sent.push(bytes.clone());
                if !to.silent {
                    for c in bytes.chunks(chunk) {
                        to.conn.handle_input(now, c);
                    }
                }
            }
            moved
        }

        /// Advance the clock by `d`, firing due timers, and drive.
        fn advance(&mut self, d: Duration) {
            self.now += d;
            for end in [&mut self.a, &mut self.b] {
                if end.silent {
                    continue;
                }
                if end.conn.poll_timeout().is_some_and(|t| t <= self.now) {
                    end.conn.handle_timeout(self.now);
                }
            }
            self.drive();
        }
    }

    fn heartbeats_in(sent: &[Vec<u8>]) -> usize {
        // A sealed heartbeat is one byte of plaintext plus the tag.
        sent.iter()
            .filter(|r| r.len() == frame::RECORD_HEADER_LEN + 1 + crate::handshake::TAG_LEN)
            .count()
    }

    #[test]
    fn handshake_completes_without_password() {
        let (ka, kb) = (key(), key());
        let p = Pair::connect(&ka, &kb, None, None);
        let (peer_a, intro_a) = p.a.established().expect("a established");
        let (peer_b, intro_b) = p.b.established().expect("b established");
        assert_eq!(peer_a, kb.name());
        assert_eq!(peer_b, ka.name());
        assert_eq!(intro_a.nickname, "responder");
        assert_eq!(intro_b.nickname, "initiator");
        assert_eq!(intro_a.sleeve_key, None);
        assert!(p.a.conn.is_established() && p.b.conn.is_established());
        assert_eq!(p.a.conn.peer(), Some(kb.name()));
        assert_eq!(p.a.closed(), None);
        assert_eq!(p.b.closed(), None);
    }

    /// A key offer reaches the peer as an event, its acknowledgement comes
    /// back as one; without a password both are ignored.
    #[test]
    fn sleeve_key_offer_and_ack_are_events() {
        let (ka, kb) = (key(), key());
        let mut p = Pair::connect(&ka, &kb, Some(PSK_A), Some(PSK_A));
        p.a.conn.offer_sleeve_key(2, [5; 32]);
        p.drive();
        assert!(p.b.events.contains(&Event::SleeveKey {
            key_id: 2,
            key: [5; 32]
        }));
        p.b.conn.ack_sleeve_key(2);
        p.drive();
        assert!(p.a.events.contains(&Event::SleeveKeyAck { key_id: 2 }));
        assert_eq!(p.a.closed(), None);
        assert_eq!(p.b.closed(), None);

        let mut p = Pair::connect(&ka, &kb, None, None);
        let before = p.a.sent.len();
        p.a.conn.offer_sleeve_key(2, [5; 32]);
        p.a.conn.ack_sleeve_key(2);
        p.drive();
        assert_eq!(p.a.sent.len(), before);
        assert!(!p
            .b
            .events
            .iter()
            .any(|e| matches!(e, Event::SleeveKey { .. } | Event::SleeveKeyAck { .. })));
    }

    #[test]
    fn handshake_completes_with_password_and_carries_sleeve_keys() {
        let (ka, kb) = (key(), key());
        let p = Pair::connect(&ka, &kb, Some(PSK_A), Some(PSK_A));
        let (_, intro_a) = p.a.established().expect("a established");
        let (_, intro_b) = p.b.established().expect("b established");
        assert_eq!(
            intro_a.sleeve_key,
            Some((1, [Role::Responder as u8 + 7; 32]))
        );
        assert_eq!(
            intro_b.sleeve_key,
            Some((1, [Role::Initiator as u8 + 7; 32]))
        );
    }

    #[test]
    fn handshake_completes_byte_by_byte() {
        let (ka, kb) = (key(), key());
        let mut p = Pair::new(
            config(Role::Initiator, &ka, Some(PSK_A)),
            config(Role::Responder, &kb, Some(PSK_A)),
        );
        p.chunk = 1;
        p.drive();
        assert!(p.a.established().is_some() && p.b.established().is_some());
    }

    #[test]
    fn different_passwords_are_refused_on_both_ends() {
        let (ka, kb) = (key(), key());
        let p = Pair::connect(&ka, &kb, Some(PSK_A), Some(PSK_B));
        let text = "password mismatch: the handshake did not authenticate (different passwords)";
        assert_eq!(p.b.closed(), Some((CloseKind::Retry, text)));
        assert_eq!(
            p.a.closed(),
            Some((
                CloseKind::Retry,
                &*format!("waiting for the peer's intro: refused by peer: {text}")
            ))
        );
        assert!(p.a.established().is_none() && p.b.established().is_none());
    }

    #[test]
    fn a_missing_password_is_refused_on_both_ends() {
        let (ka, kb) = (key(), key());
        let p = Pair::connect(&ka, &kb, Some(PSK_A), None);
        assert_eq!(
            p.a.closed(),
            Some((
                CloseKind::Retry,
                "password mismatch: we have a password and the peer has none"
            ))
        );
        assert_eq!(
            p.b.closed(),
            Some((
                CloseKind::Retry,
                "password mismatch: the peer has a password and we have none"
            ))
        );
    }

    #[test]
    fn version_mismatch_is_refused_with_both_ranges() {
        let now = Instant::now();
        let mut c = Connection::new(config(Role::Responder, &key(), None), now);
        let future = Hello {
            min_version: 9,
            max_version: 9,
            password: false,
        };
        c.handle_input(now, &future.emit());
        let reason = format!(
            "no common protocol version: we speak {}..={} (mesh 0.3), peer speaks 9..=9 (mesh a later release); every peer of a mesh must run a release that shares one (README: Upgrading)",
            crate::PROTOCOL_MIN_VERSION,
            crate::PROTOCOL_VERSION
        );
        assert_eq!(
            c.poll_event(),
            Some(Event::Closed {
                kind: CloseKind::Retry,
                reason: reason.clone(),
                warn: true
            })
        );
        assert_eq!(c.poll_transmit(), Some(Hello::ours(false).emit().to_vec()));
        let refusal = c.poll_transmit().expect("a refusal");
        let (record, _) = frame::parse(&refusal).unwrap().unwrap();
        assert_eq!(record.kind, RecordKind::Refusal);
        assert_eq!(record.payload, reason.as_bytes());
        assert!(c.is_closed() && c.poll_timeout().is_none());
    }

    #[test]
    fn not_a_mesh_peer() {
        let now = Instant::now();
        let mut c = Connection::new(config(Role::Initiator, &key(), None), now);
        c.handle_input(now, b"GET / HTTP/1.1\r\n");
        assert!(matches!(
            c.poll_event(),
            Some(Event::Closed { kind: CloseKind::Retry, reason, warn: true })
                if reason == "not a mesh peer: bad magic in hello"
        ));
    }

    #[test]
    fn connected_to_ourselves_is_fatal() {
        let k = key();
        let p = Pair::connect(&k, &k, None, None);
        let text = "connected to ourselves (this address is our own)";
        assert_eq!(p.a.closed(), Some((CloseKind::Fatal, text)));
        assert_eq!(p.b.closed(), Some((CloseKind::Fatal, text)));
    }

    #[test]
    fn a_restart_is_a_new_session_that_refuses_the_old_sessions_records() {
        let (ka, kb) = (key(), key());
        let mut old = Pair::connect(&ka, &kb, None, None);
        old.a.conn.send_gossip(b"from the old session".to_vec());
        old.drive();
        assert_eq!(old.b.gossip(), vec![b"from the old session".to_vec()]);
        // b restarts: a new connection (the same keys, same intros).
        let mut new = Pair::connect(&ka, &kb, None, None);
        assert!(new.a.established().is_some() && new.b.established().is_some());
        // The first transport record of a is its intro, the same plaintext
        // at the same nonce in both sessions: different bytes mean
        // different keys.
        let first_transport = |sent: &[Vec<u8>]| {
            sent.iter()
                .find(|r| r[0] == 2)
                .cloned()
                .expect("a transport record")
        };
        assert_ne!(first_transport(&old.a.sent), first_transport(&new.a.sent));
        // The old session's gossip record, replayed into the new session,
        // is refused.
        let stale = old.a.sent.last().cloned().expect("the gossip record");
        new.b.conn.handle_input(new.now, &stale);
        new.drive();
        assert!(new.b.gossip().is_empty());
        let (kind, reason) = new.b.closed().expect("closed");
        assert_eq!(kind, CloseKind::Retry);
        assert!(
            reason.starts_with("malformed control message: "),
            "{reason}"
        );
    }

    #[test]
    fn a_replayed_record_is_refused() {
        let (ka, kb) = (key(), key());
        let mut p = Pair::connect(&ka, &kb, Some(PSK_A), Some(PSK_A));
        p.a.conn.send_gossip(b"once".to_vec());
        p.drive();
        let replay = p.a.sent.last().cloned().expect("the gossip record");
        p.b.conn.handle_input(p.now, &replay);
        p.drive();
        assert_eq!(p.b.gossip(), vec![b"once".to_vec()]);
        let (kind, reason) = p.b.closed().expect("closed");
        assert_eq!(kind, CloseKind::Retry);
        assert!(
            reason.starts_with("malformed control message: "),
            "{reason}"
        );
    }

    #[test]
    fn a_silent_peer_is_dead_after_dead_after_and_not_before() {
        let (ka, kb) = (key(), key());
        let mut p = Pair::connect(&ka, &kb, None, None);
        p.b.silent = true;
        let step = Duration::from_millis(500);
        let mut waited = Duration::ZERO;
        while waited + step < DEAD_AFTER {
            p.advance(step);
            waited += step;
            assert_eq!(p.a.closed(), None, "closed after only {waited:?}");
        }
        p.advance(DEAD_AFTER - waited);
        let reason = format!("no heartbeat from {} for 75s", kb.name());
        assert_eq!(p.a.closed(), Some((CloseKind::Retry, &*reason)));
        assert!(p.a.conn.is_closed());
    }

    #[test]
    fn heartbeats_keep_an_idle_connection_alive() {
        let (ka, kb) = (key(), key());
        let mut p = Pair::connect(&ka, &kb, None, None);
        let (a0, b0) = (heartbeats_in(&p.a.sent), heartbeats_in(&p.b.sent));
        for _ in 0..600 {
            p.advance(Duration::from_secs(1));
        }
        assert_eq!(p.a.closed(), None);
        assert_eq!(p.b.closed(), None);
        assert!(p.a.conn.is_established() && p.b.conn.is_established());
        // Healthy: the dialer pings every 60 s and the acceptor answers,
        // so ten minutes cost about ten of each, not 300.
        let (a, b) = (heartbeats_in(&p.a.sent) - a0, heartbeats_in(&p.b.sent) - b0);
        assert!((9..=11).contains(&a), "dialer sent {a}");
        assert!((9..=11).contains(&b), "acceptor sent {b}");
    }

    #[test]
    fn garbage_mid_stream_closes_with_a_protocol_error() {
        let (ka, kb) = (key(), key());
        let mut p = Pair::connect(&ka, &kb, None, None);
        p.b.conn.handle_input(p.now, &[9, 9, 9, 9]);
        p.drive();
        assert!(matches!(
            p.b.events.last(),
            Some(Event::Closed { kind: CloseKind::Retry, reason, warn: true })
                if reason == "connection lost: unknown control record kind 9"
        ));
        // A well-framed transport record of garbage.
        let mut p = Pair::connect(&ka, &kb, None, None);
        p.a.conn.handle_input(
            p.now,
            &[
                2, 0, 20, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
            ],
        );
        p.drive();
        let (kind, reason) = p.a.closed().expect("closed");
        assert_eq!(kind, CloseKind::Retry);
        assert!(
            reason.starts_with("malformed control message: "),
            "{reason}"
        );
        // A handshake record after the handshake.
        let mut p = Pair::connect(&ka, &kb, None, None);
        p.a.conn.handle_input(p.now, &[1, 0, 1, 0]);
        p.drive();
        assert_eq!(
            p.a.closed(),
            Some((CloseKind::Retry, "protocol error: unexpected record"))
        );
    }

    #[test]
    fn gossip_passes_both_ways() {
        let (ka, kb) = (key(), key());
        let mut p = Pair::connect(&ka, &kb, Some(PSK_A), Some(PSK_A));
        p.a.conn.send_gossip(b"a1".to_vec());
        p.b.conn.send_gossip(b"b1".to_vec());
        p.a.conn.send_gossip(vec![7; 40_000]);
        p.drive();
        assert_eq!(p.b.gossip(), vec![b"a1".to_vec(), vec![7; 40_000]]);
        assert_eq!(p.a.gossip(), vec![b"b1".to_vec()]);
        // Too big for one record: the connection ends, it does not panic.
        p.a.conn.send_gossip(vec![0; 70_000]);
        p.drive();
        assert_eq!(p.a.closed().map(|c| c.0), Some(CloseKind::Retry));
    }

    #[test]
    fn close_duplicate_is_a_duplicate_on_both_ends() {
        let (ka, kb) = (key(), key());
        let mut p = Pair::connect(&ka, &kb, None, None);
        p.a.conn.close(DUPLICATE);
        p.drive();
        assert_eq!(p.a.closed(), Some((CloseKind::Duplicate, DUPLICATE)));
        assert_eq!(p.b.closed(), Some((CloseKind::Duplicate, DUPLICATE)));
    }

    #[test]
    fn close_with_a_reason_is_retried_by_the_peer() {
        let (ka, kb) = (key(), key());
        let mut p = Pair::connect(&ka, &kb, None, None);
        p.a.conn.close("shutting down");
        p.drive();
        assert_eq!(p.a.closed(), Some((CloseKind::Retry, "shutting down")));
        assert_eq!(
            p.b.closed(),
            Some((CloseKind::Retry, "closed by peer: shutting down"))
        );
        // Exactly one Closed, and it is the last event.
        assert!(matches!(p.b.events.last(), Some(Event::Closed { .. })));
        assert_eq!(
            p.b.events
                .iter()
                .filter(|e| matches!(e, Event::Closed { .. }))
                .count(),
            1
        );
    }

    #[test]
    fn each_setup_step_times_out() {
        let now = Instant::now();
        let mut c = Connection::new(config(Role::Initiator, &key(), None), now);
        c.handle_timeout(now + SETUP_TIMEOUT - Duration::from_millis(1));
        assert_eq!(c.poll_event(), None);
        assert_eq!(c.poll_timeout(), Some(now + SETUP_TIMEOUT));
        c.handle_timeout(now + SETUP_TIMEOUT);
        assert_eq!(
            c.poll_event(),
            Some(Event::Closed {
                kind: CloseKind::Retry,
                reason: "reading hello: timed out".into(),
                warn: false
            })
        );
        // A responder that got a hello but no handshake message.
        let mut c = Connection::new(config(Role::Responder, &key(), None), now);
        c.handle_input(now, &Hello::ours(false).emit());
        c.handle_timeout(now + SETUP_TIMEOUT);
        assert!(
            matches!(c.poll_event(), Some(Event::Closed { reason, .. }) if reason == "handshake: timed out")
        );
        // The deadline covers the whole setup: a hello sent just before it
        // does not buy the handshake another ten seconds.
        let mut c = Connection::new(config(Role::Responder, &key(), None), now);
        c.handle_input(
            now + SETUP_TIMEOUT - Duration::from_millis(10),
            &Hello::ours(false).emit(),
        );
        c.handle_timeout(now + SETUP_TIMEOUT);
        assert!(
            matches!(c.poll_event(), Some(Event::Closed { reason, .. }) if reason == "handshake: timed out")
        );
        // The end of the stream.
        let mut c = Connection::new(config(Role::Responder, &key(), None), now);
        c.handle_read_error(now, "early eof");
        assert!(
            matches!(c.poll_event(), Some(Event::Closed { reason, .. }) if reason == "reading hello: early eof")
        );
    }

    proptest::proptest! {
        #[test]
        fn any_chunking_completes_the_handshake(chunk in 1usize..200, password: bool) {
            let (ka, kb) = (key(), key());
            let psk = password.then_some(PSK_A);
            let mut p = Pair::new(
                config(Role::Initiator, &ka, psk),
                config(Role::Responder, &kb, psk),
            );
            p.chunk = chunk;
            p.drive();
            p.a.conn.send_gossip(vec![3; 1000]);
            p.drive();
            proptest::prop_assert!(p.a.established().is_some() && p.b.established().is_some());
            proptest::prop_assert_eq!(p.b.gossip(), vec![vec![3; 1000]]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            after_hello: bool,
        ) {
            let now = Instant::now();
            let mut c = Connection::new(config(Role::Responder, &key(), None), now);
            if after_hello {
                c.handle_input(now, &Hello::ours(false).emit());
            }
            c.handle_input(now, &garbage);
            c.handle_timeout(now + SETUP_TIMEOUT);
            let mut closed = 0;
            while let Some(e) = c.poll_event() {
                closed += usize::from(matches!(e, Event::Closed { .. }));
            }
            proptest::prop_assert_eq!(closed, 1);
            while c.poll_transmit().is_some() {}
        }
    }
}
