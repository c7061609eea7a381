//! Sleeve rekeying: when a sending key is replaced, and which keys a
//! receiver still opens with.
//!
//! Each direction of a connection has its own key (see [`crate::seal`]),
//! first sent in the [`Intro`](crate::control::Intro) with key id 1. Its
//! sender replaces it, over the encrypted control channel:
//!
//! 1. When its key is due ([`Policy`]: [`Policy::after_messages`] messages
//!    sealed under it, or [`Policy::after`] since it came into use), the
//!    sender draws a fresh random key and offers it with the next key id
//!    ([`next_key_id`]): `SleeveKey { key_id, key }`. It goes on sealing
//!    with the old key.
//! 2. The receiver installs it beside its current key ([`KeyRing::install`])
//!    and only then acknowledges: `SleeveKeyAck { key_id }`.
//! 3. On the acknowledgement the sender seals with the new key, counters
//!    from 0 ([`Sending::handle_ack`]). Every datagram sealed under it is
//!    already openable when it arrives.
//! 4. The receiver keeps the previous key for datagrams still in flight or
//!    reordered: until [`GRACE`] after the first message under the new key
//!    opened, and at most [`MAX_OVERLAP`] after the install. Then it is
//!    dropped, and what it sealed is refused as a key we do not hold.
//!
//! Why this holds up: control messages ride one TCP stream, so they are
//! neither lost nor reordered, and a connection that breaks takes its keys
//! with it (a new connection, e.g. with a restarted peer, starts over from
//! the intro's key id 1 with new random keys). At most one offer per
//! direction is outstanding, so a receiver holds at most two keys, and the
//! one it drops is one the sender stopped using before offering the key
//! after it. Each key is fresh and random and its counters start at 0, so no
//! (key, nonce) pair is ever used twice; each key has its own replay window.
//! A peer that ignores offers (older builds did) never acknowledges, and the
//! sender keeps its key, as before.
//!
//! Both halves are pure: time comes in as an argument, the new key from the
//! caller's random source.

use crate::seal::Opener;
use crate::sleeve::{self, Header, OpenError};
use std::time::{Duration, Instant};

/// Default: offer a new key after this many messages sealed under one key
/// (far below nonce exhaustion, [`crate::seal::REJECT_AFTER`] = 2^56, and
/// ChaCha20-Poly1305's usage limits).
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 32;
/// Default: offer a new key once one has been in use this long (as
/// WireGuard does).
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// How long the previous key is still accepted after the first message
/// under the new one opened (reordered and in-flight datagrams).
pub const GRACE: Duration = Duration::from_secs(2);
/// How long the previous key is accepted after the new one was installed,
/// at most (the sender switches one round trip after the install, and a
/// connection whose acknowledgement is stuck longer is declared dead).
pub const MAX_OVERLAP: Duration = Duration::from_secs(30);

/// When a sending key is due for replacement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Messages sealed under one key.
    pub after_messages: u64,
    /// Time one key is in use.
    pub after: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            after_messages: REKEY_AFTER_MESSAGES,
            after: REKEY_AFTER_TIME,
        }
    }
}

/// The key id after `id`: 1 to 255 in turn (0 marks plain datagrams).
pub fn next_key_id(id: u8) -> u8 {
    if id == u8::MAX {
        1
    } else {
        id + 1
    }
}

/// Why an offered key was not installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RekeyError {
    /// The offer reuses the key id in use (or the plain id 0): a peer that
    /// breaks the protocol.
    #[error("offered sleeve key id {0} is the one in use")]
    SameId(u8),
}

/// The sending half of one direction: the key in use and the one offered.
#[derive(Debug, Clone)]
pub struct Sending {
    policy: Policy,
    key_id: u8,
    since: Instant,
    offered: Option<(u8, [u8; 32])>,
    rekeys: u64,
}

impl Sending {
    /// Sealing with key `key_id` (the intro's) from `now`.
    pub fn new(now: Instant, key_id: u8, policy: Policy) -> Sending {
        Sending {
            policy,
            key_id,
            since: now,
            offered: None,
            rekeys: 0,
        }
    }

    /// The id of the key to seal with.
    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// How many times the key was replaced.
    pub fn rekeys(&self) -> u64 {
        self.rekeys
    }

    /// Whether an offer waits for its acknowledgement.
    pub fn is_offering(&self) -> bool {
        self.offered.is_some()
    }

    /// Whether to offer a new key now, `sealed` messages having been sealed
    /// under the current one. Never while an offer is outstanding.
    pub fn due(&self, now: Instant, sealed: u64) -> bool {
        self.offered.is_none()
            && (sealed >= self.policy.after_messages
                || now.saturating_duration_since(self.since) >= self.policy.after)
    }

    /// Offer `key` (fresh from the caller's random source): the key id to
    /// send it with on the control channel (`SleeveKey`). Replaces an
    /// outstanding offer.
    pub fn offer(&mut self, key: [u8; 32]) -> u8 {
        let key_id = next_key_id(self.key_id);
        self.offered = Some((key_id, key));
        key_id
    }

    /// The peer acknowledged `key_id` at `now`: when it is our offer, the
    /// id and key to seal with from now on.
    pub fn handle_ack(&mut self, now: Instant, key_id: u8) -> Option<(u8, [u8; 32])> {
        match self.offered {
            Some((id, key)) if id == key_id => {
                self.offered = None;
                self.key_id = id;
                self.since = now;
                self.rekeys += 1;
                Some((id, key))
            }
            _ => None,
        }
    }

    /// When the current key becomes due by age (none while offering).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.offered
            .is_none()
            .then(|| self.since + self.policy.after)
    }
}

/// The receiving half of one direction: the peer's current key and, for a
/// while after a rekey, its previous one.
pub struct KeyRing {
    current: Opener,
    /// Whether a message under `current` has opened.
    current_seen: bool,
    /// The previous key and when it stops being accepted.
    previous: Option<(Opener, Instant)>,
    installs: u64,
}

impl KeyRing {
    /// Opening with the intro's key.
    pub fn new(opener: Opener) -> KeyRing {
        KeyRing {
            current: opener,
            current_seen: false,
            previous: None,
            installs: 0,
        }
    }

    /// The id of the newest key.
    pub fn key_id(&self) -> u8 {
        self.current.key_id()
    }

    /// How many keys were installed after the first.
    pub fn rekeys(&self) -> u64 {
        self.installs
    }

    /// The ids of the keys accepted at `now`, newest first.
    pub fn accepted(&self, now: Instant) -> Vec<u8> {
        let mut ids = vec![self.current.key_id()];
        if let Some((o, until)) = &self.previous {
            if now < *until {
                ids.push(o.key_id());
            }
        }
        ids
    }

    /// The peer offered `key` as `key_id` at `now`: it becomes the newest
    /// key, the current one the previous (and the one before is dropped).
    /// Acknowledge only once this returned `Ok`.
    pub fn install(&mut self, now: Instant, key_id: u8, key: &[u8; 32]) -> Result<(), RekeyError> {
        if key_id == 0 || key_id == self.current.key_id() {
            return Err(RekeyError::SameId(key_id));
        }
        let old = std::mem::replace(&mut self.current, Opener::new(key_id, key));
        self.previous = Some((old, now + MAX_OVERLAP));
        self.current_seen = false;
        self.installs += 1;
        Ok(())
    }

    /// Open a whole sealed message at `now` with the key its header names,
    /// as [`sleeve::open_message`] does with one key: the plaintext length.
    pub fn open_message(
        &mut self,
        now: Instant,
        header: &Header,
        msg: &mut [u8],
    ) -> Result<usize, OpenError> {
        self.open_with(now, header, |o| sleeve::open_message(header, msg, Some(o)))
    }

    /// Open a sealed probe acknowledgement at `now` with the key its header
    /// names, as [`sleeve::open_probe_ack`] does with one key: the size.
    pub fn open_probe_ack(
        &mut self,
        now: Instant,
        header: &Header,
        body: &mut [u8],
    ) -> Result<u64, OpenError> {
        self.open_with(now, header, |o| {
            sleeve::open_probe_ack(header, body, Some(o))
        })
    }

    /// Run `open` with the key `header` names: the previous one while it is
    /// accepted, else the current one (which refuses other ids).
    fn open_with<T>(
        &mut self,
        now: Instant,
        header: &Header,
        open: impl FnOnce(&mut Opener) -> Result<T, OpenError>,
    ) -> Result<T, OpenError> {
        if self
            .previous
            .as_ref()
            .is_some_and(|(_, until)| now >= *until)
        {
            self.previous = None;
        }
        if let Some((old, _)) = self.previous.as_mut() {
            if old.key_id() == header.key_id && header.key_id != 0 {
                return open(old);
            }
        }
        let n = open(&mut self.current)?;
        if !self.current_seen {
            self.current_seen = true;
            if let Some((_, until)) = self.previous.as_mut() {
                *until = (*until).min(now + GRACE);
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ControlMsg;
    use crate::name::PeerName;
    use crate::seal::{SealError, Sealer};
    use crate::sleeve::{message_header, seal_message};

    const A: PeerName = PeerName([2, 0, 0, 0, 0, 1]);
    const B: PeerName = PeerName([2, 0, 0, 0, 0, 2]);

    fn policy(n: u64) -> Policy {
        Policy {
            after_messages: n,
            after: Duration::from_secs(60),
        }
    }

    /// One message sealed by `s`: its header and sealed bytes.
    fn sealed(s: &Sealer, byte: u8) -> (Header, Vec<u8>) {
        let h = message_header(A, B, 0, Some(s), 0).expect("header");
        let mut m = vec![byte; 40];
        seal_message(&h, Some(s), &mut m).expect("seal");
        (h, m)
    }

    fn opens(
        r: &mut KeyRing,
        now: Instant,
        (h, m): &(Header, Vec<u8>),
    ) -> Result<usize, OpenError> {
        r.open_message(now, h, &mut m.clone())
    }

    #[test]
    fn key_ids_cycle_and_skip_zero() {
        assert_eq!(next_key_id(1), 2);
        assert_eq!(next_key_id(254), 255);
        assert_eq!(next_key_id(255), 1);
    }

    /// Due by count or by age, never twice while offering; the ack of the
    /// offer (and only it) switches the key and restarts the clock.
    #[test]
    fn sending_state_machine() {
        let t0 = Instant::now();
        let mut s = Sending::new(t0, 1, policy(100));
        assert!(!s.due(t0, 99));
        assert!(s.due(t0, 100));
        assert!(s.due(t0 + Duration::from_secs(60), 0));
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(60)));
        assert_eq!(s.offer([7; 32]), 2);
        assert!(s.is_offering());
        assert!(!s.due(t0 + Duration::from_secs(600), u64::MAX));
        assert_eq!(s.poll_timeout(), None);
        // An ack of something else changes nothing.
        assert_eq!(s.handle_ack(t0, 1), None);
        assert_eq!(s.handle_ack(t0, 3), None);
        assert_eq!(s.key_id(), 1);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(s.handle_ack(t1, 2), Some((2, [7; 32])));
        assert_eq!((s.key_id(), s.rekeys(), s.is_offering()), (2, 1, false));
        // A second ack is stale.
        assert_eq!(s.handle_ack(t1, 2), None);
        assert!(!s.due(t1 + Duration::from_secs(59), 0));
        assert!(s.due(t1 + Duration::from_secs(60), 0));
    }

    /// Both keys open during the overlap; the previous one stops GRACE
    /// after the first message under the new one (or MAX_OVERLAP after the
    /// install when none comes), and is then refused as unknown.
    #[test]
    fn overlap_then_old_key_refused() {
        let t0 = Instant::now();
        let (old, new) = (Sealer::new(1, &[1; 32]), Sealer::new(2, &[2; 32]));
        let mut r = KeyRing::new(Opener::new(1, &[1; 32]));
        assert_eq!(opens(&mut r, t0, &sealed(&old, 1)), Ok(40));
        r.install(t0, 2, &[2; 32]).expect("install");
        assert_eq!(r.accepted(t0), vec![2, 1]);
        // In-flight old datagrams still open before the new key is used.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(opens(&mut r, t1, &sealed(&old, 2)), Ok(40));
        assert_eq!(opens(&mut r, t1, &sealed(&new, 3)), Ok(40));
        // Reordered: an old one after the first new one, within the grace.
        let late = sealed(&old, 4);
        assert_eq!(
            opens(&mut r, t1 + GRACE - Duration::from_millis(1), &late),
            Ok(40)
        );
        // After the grace, the old key is gone.
        let t2 = t1 + GRACE;
        assert_eq!(
            opens(&mut r, t2, &sealed(&old, 5)),
            Err(OpenError::NoKey(1))
        );
        assert_eq!(r.accepted(t2), vec![2]);
        assert_eq!(opens(&mut r, t2, &sealed(&new, 6)), Ok(40));

        // No message under the new key: the old one lasts MAX_OVERLAP.
        let mut r = KeyRing::new(Opener::new(1, &[1; 32]));
        r.install(t0, 2, &[2; 32]).expect("install");
        let old2 = Sealer::new(1, &[1; 32]);
        assert_eq!(
            opens(
                &mut r,
                t0 + MAX_OVERLAP - Duration::from_millis(1),
                &sealed(&old2, 1)
            ),
            Ok(40)
        );
        assert_eq!(
            opens(&mut r, t0 + MAX_OVERLAP, &sealed(&old2, 2)),
            Err(OpenError::NoKey(1))
        );
    }

    /// Each key has its own replay window: a replay is refused under the
    /// old key during the overlap, under the new one, and (as unknown)
    /// after the overlap; counters restarting at 0 under the new key are
    /// not mistaken for replays.
    #[test]
    fn replay_across_key_change() {
        let t0 = Instant::now();
        let old = Sealer::new(1, &[1; 32]);
        let mut r = KeyRing::new(Opener::new(1, &[1; 32]));
        let first_old = sealed(&old, 1);
        assert_eq!(first_old.0.counter, 0);
        assert_eq!(opens(&mut r, t0, &first_old), Ok(40));
        r.install(t0, 2, &[2; 32]).expect("install");
        assert_eq!(
            opens(&mut r, t0, &first_old),
            Err(OpenError::Seal(SealError::Replay(0)))
        );
        let new = Sealer::new(2, &[2; 32]);
        let first_new = sealed(&new, 2);
        assert_eq!(first_new.0.counter, 0);
        assert_eq!(opens(&mut r, t0, &first_new), Ok(40));
        assert_eq!(
            opens(&mut r, t0, &first_new),
            Err(OpenError::Seal(SealError::Replay(0)))
        );
        assert_eq!(
            opens(&mut r, t0 + GRACE, &first_old),
            Err(OpenError::NoKey(1))
        );
        // The previous key's id with the new key's bytes (or the reverse)
        // is forged: the header is authenticated.
        let (mut h, m) = sealed(&new, 3);
        h.key_id = 1;
        let mut r2 = KeyRing::new(Opener::new(1, &[1; 32]));
        r2.install(t0, 2, &[2; 32]).expect("install");
        assert_eq!(
            r2.open_message(t0, &h, &mut m.clone()),
            Err(OpenError::Seal(SealError::Forged))
        );
    }

    /// An offer of the id in use (or of 0) is refused, and the ring keeps
    /// at most two keys: a third install drops the oldest.
    #[test]
    fn install_rules() {
        let t0 = Instant::now();
        let mut r = KeyRing::new(Opener::new(1, &[1; 32]));
        assert_eq!(r.install(t0, 1, &[9; 32]), Err(RekeyError::SameId(1)));
        assert_eq!(r.install(t0, 0, &[9; 32]), Err(RekeyError::SameId(0)));
        r.install(t0, 2, &[2; 32]).expect("2");
        r.install(t0, 3, &[3; 32]).expect("3");
        assert_eq!(r.accepted(t0), vec![3, 2]);
        assert_eq!((r.key_id(), r.rekeys()), (3, 2));
        assert_eq!(
            opens(&mut r, t0, &sealed(&Sealer::new(1, &[1; 32]), 1)),
            Err(OpenError::NoKey(1))
        );
    }

    /// Two ends over a datagram channel that loses and reorders, the
    /// control messages in order with a 5 ms delay, a threshold of 16
    /// messages: through more than a hundred rekeys (key ids wrapping past
    /// 255), every datagram that arrives opens.
    #[test]
    fn many_rekeys_over_lossy_reordering_channel() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut sending = Sending::new(t0, 1, policy(16));
        let mut sealer = Sealer::new(1, &[1; 32]);
        let mut ring = KeyRing::new(Opener::new(1, &[1; 32]));
        // (arrival ms, header, bytes) of datagrams; (arrival ms, message)
        // of control messages each way.
        let mut air: Vec<(u64, Header, Vec<u8>)> = Vec::new();
        let mut to_rx: Vec<(u64, ControlMsg)> = Vec::new();
        let mut to_tx: Vec<(u64, ControlMsg)> = Vec::new();
        let (mut opened, mut lost) = (0, 0);
        for t in 0..4000u64 {
            let now = ms(t);
            // Sender: rekey when due, one message per ms.
            if sending.due(now, sealer.sealed()) {
                let key = [(t % 251) as u8 + 1; 32];
                let key_id = sending.offer(key);
                to_rx.push((t + 5, ControlMsg::SleeveKey { key_id, key }));
            }
            for (_, m) in to_tx.iter().filter(|(at, _)| *at == t) {
                if let ControlMsg::SleeveKeyAck { key_id } = m {
                    if let Some((id, k)) = sending.handle_ack(now, *key_id) {
                        sealer = Sealer::new(id, &k);
                    }
                }
            }
            let (h, m) = sealed(&sealer, t as u8);
            if rand() % 10 == 0 {
                lost += 1;
            } else {
                air.push((t + 1 + rand() % 3, h, m));
            }
            // Receiver.
            for (_, m) in to_rx.iter().filter(|(at, _)| *at == t) {
                if let ControlMsg::SleeveKey { key_id, key } = m {
                    ring.install(now, *key_id, key).expect("install");
                    to_tx.push((t + 5, ControlMsg::SleeveKeyAck { key_id: *key_id }));
                }
            }
            for (_, h, m) in air.iter().filter(|(at, _, _)| *at == t) {
                match ring.open_message(now, h, &mut m.clone()) {
                    Ok(_) => opened += 1,
                    Err(e) => panic!("datagram under key {} refused at {t} ms: {e}", h.key_id),
                }
            }
        }
        assert!(sending.rekeys() > 100, "only {} rekeys", sending.rekeys());
        // The last offer may still wait for its acknowledgement.
        assert!(ring.rekeys() - sending.rekeys() <= 1);
        let in_flight = air.iter().filter(|(at, _, _)| *at >= 4000).count();
        assert_eq!(opened + lost + in_flight, 4000);
    }
}
