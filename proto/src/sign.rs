//! Peer identities and signatures on replicated state.
//!
//! Every peer holds one secret: a 32-byte Ed25519 seed ([`Identity`]). From
//! it come
//!
//! - its **signing key**: every piece of state that peer writes and the mesh
//!   replicates (its topology entry, its IPAM records and tokens, its names,
//!   its Paxos votes) carries its Ed25519 signature, and receivers verify
//!   before merging, so a member can write only its own state;
//! - its **X25519 static key** for the Noise handshake (the Ed25519 secret
//!   scalar and the Montgomery form of the public key, as libsodium's
//!   `crypto_sign_ed25519_sk_to_curve25519` does), so one handshake proves
//!   both;
//! - its **name** ([`PeerName`]): six bytes of a hash of that X25519 public
//!   key, for display and as a table key.
//!
//! A [`PublicKey`] is therefore self-certifying: anyone can recompute the
//! name it gives. A [`KeyBook`] pins the first key seen for each name (from
//! an authenticated handshake or a verified signature) and refuses, and
//! reports, a second key that gives the same name: finding one takes a
//! 2^48 search, and even then it is never merged with the first.
//!
//! Signatures are over a domain tag and the message ([`Identity::sign`]),
//! so a signature made for one kind of state can never pass for another.

use crate::name::PeerName;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use std::collections::HashMap;
use std::fmt;

/// Bytes in a signature.
pub const SIG_LEN: usize = 64;
/// Bytes in a public key.
pub const KEY_LEN: usize = 32;

/// A signature on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sig(pub [u8; SIG_LEN]);

impl Sig {
    /// No signature (all zeros): never verifies.
    pub const NONE: Sig = Sig([0; SIG_LEN]);
}

impl fmt::Debug for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sig({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

impl serde::Serialize for Sig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&serde_big_array(&self.0), s)
    }
}

impl<'de> serde::Deserialize<'de> for Sig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sig, D::Error> {
        let (a, b): ([u8; 32], [u8; 32]) = serde::Deserialize::deserialize(d)?;
        let mut s = [0u8; SIG_LEN];
        s[..32].copy_from_slice(&a);
        s[32..].copy_from_slice(&b);
        Ok(Sig(s))
    }
}

/// Serde has no impls for arrays over 32: a signature goes as two halves.
fn serde_big_array(b: &[u8; SIG_LEN]) -> ([u8; 32], [u8; 32]) {
    let mut a = [0u8; 32];
    let mut c = [0u8; 32];
    a.copy_from_slice(&b[..32]);
    c.copy_from_slice(&b[32..]);
    (a, c)
}

/// A peer's Ed25519 public key (32 bytes, a valid curve point).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&self.0, s)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
        let b: [u8; KEY_LEN] = serde::Deserialize::deserialize(d)?;
        PublicKey::from_bytes(&b).map_err(|_| serde::de::Error::custom("invalid public key"))
    }
}

/// The key is not a valid Ed25519 point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid public key")]
pub struct InvalidKey;

impl PublicKey {
    /// From 32 bytes; a key that is not a curve point is an error.
    pub fn from_bytes(b: &[u8]) -> Result<PublicKey, InvalidKey> {
        let b: [u8; KEY_LEN] = b.try_into().map_err(|_| InvalidKey)?;
        POINTS.get(&b).ok_or(InvalidKey)?;
        Ok(PublicKey(b))
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The X25519 public key the holder proves in the Noise handshake.
    pub fn x25519(&self) -> [u8; KEY_LEN] {
        // Checked in from_bytes; a key that got here is a point.
        POINTS.get(&self.0).map_or([0; KEY_LEN], |p| p.x25519)
    }

    /// The name this key gives.
    pub fn name(&self) -> PeerName {
        POINTS
            .get(&self.0)
            .map_or_else(|| PeerName::from_public_key(&[0; KEY_LEN]), |p| p.name)
    }

    /// A short fingerprint for humans: `SHA256:`-style base64 is what ssh
    /// users know; we show 16 hex digits of a BLAKE2s hash of the key.
    pub fn fingerprint(&self) -> String {
        use blake2::{Blake2s256, Digest};
        let d = Blake2s256::digest(self.0);
        d[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `sig` is this key's signature of `msg` under `domain`
    /// (strict verification: no malleable encodings). Valid triples are
    /// remembered (see [`VerifiedCache`]): one version of a peer's entry
    /// reaches us from several neighbours, and is checked once.
    pub fn verify(&self, domain: &[u8], msg: &[u8], sig: &Sig) -> bool {
        verify_cached(&self.0, domain, msg, sig)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

/// Verify through the memo of valid triples ([`VerifiedCache`]), with the
/// key decompressed once per process ([`PointCache`]).
fn verify_cached(key: &[u8; KEY_LEN], domain: &[u8], msg: &[u8], sig: &Sig) -> bool {
    let m = tagged(domain, msg);
    let fp = triple_hash(key, &m, sig);
    if VERIFIED.contains(&fp) {
        return true;
    }
    let Some(p) = POINTS.get(key) else {
        return false;
    };
    let s = ed25519_dalek::Signature::from_bytes(&sig.0);
    let ok = p.point.verify_strict(&m, &s).is_ok();
    if ok {
        VERIFIED.insert(fp);
    }
    ok
}

/// A 128-bit hash of (key, tagged message, signature).
fn triple_hash(key: &[u8; KEY_LEN], m: &[u8], sig: &Sig) -> u128 {
    use blake2::{Blake2s256, Digest};
    let mut h = Blake2s256::new();
    h.update(key);
    h.update(sig.0);
    h.update(m);
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    u128::from_le_bytes(b)
}

/// Signatures already verified, process-wide: a pure function's memo (the
/// same bytes always verify the same way), bounded to two generations of
/// [`VerifiedCache::GENERATION`] hashes (16 bytes each: at most ~2 MiB).
/// A hit costs a BLAKE2s of the message instead of an Ed25519
/// verification (~40 µs); it also lets the simulator run thousands of
/// cores that each check the same entries.
pub struct VerifiedCache {
    gens: std::sync::Mutex<(
        std::collections::HashSet<u128>,
        std::collections::HashSet<u128>,
    )>,
}

impl VerifiedCache {
    /// Hashes per generation.
    pub const GENERATION: usize = 65_536;

    fn contains(&self, h: &u128) -> bool {
        let g = self.gens.lock().unwrap_or_else(|e| e.into_inner());
        g.0.contains(h) || g.1.contains(h)
    }

    fn insert(&self, h: u128) {
        let mut g = self.gens.lock().unwrap_or_else(|e| e.into_inner());
        if g.0.len() >= Self::GENERATION {
            g.1 = std::mem::take(&mut g.0);
        }
        g.0.insert(h);
    }
}

/// What a key's bytes give, computed once: the decompressed point (a
/// verification then skips the decompression, a good third of its cost),
/// its X25519 form and its name.
#[derive(Clone, Copy)]
struct KeyPoint {
    point: VerifyingKey,
    x25519: [u8; KEY_LEN],
    name: PeerName,
}

/// Keys already decompressed, process-wide: a pure function's memo, like
/// [`VerifiedCache`], bounded to two generations of
/// [`PointCache::GENERATION`] keys (~240 bytes each: at most ~8 MiB, one
/// generation holding every key of a mesh of `--max-peers` peers). Every
/// whole entry on the wire carries its owner's key, checked to be a point
/// on decoding; without the memo each one costs a decompression, and
/// every topology (thousands in a simulator) would keep its own copy of
/// every point.
struct PointCache {
    /// The current generation and the one before.
    gens: std::sync::Mutex<(PointGen, PointGen)>,
}

/// One generation of [`PointCache`].
type PointGen = HashMap<[u8; KEY_LEN], KeyPoint>;

impl PointCache {
    /// Keys per generation.
    const GENERATION: usize = 16_384;

    /// The key's point, name and X25519 form (None: not a point).
    fn get(&self, key: &[u8; KEY_LEN]) -> Option<KeyPoint> {
        {
            let mut g = self.gens.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = g.0.get(key) {
                return Some(*p);
            }
            if let Some(p) = g.1.remove(key) {
                g.0.insert(*key, p);
                return Some(p);
            }
        }
        let point = VerifyingKey::from_bytes(key).ok()?;
        let x25519 = point.to_montgomery().to_bytes();
        let p = KeyPoint {
            point,
            x25519,
            name: PeerName::from_public_key(&x25519),
        };
        let mut g = self.gens.lock().unwrap_or_else(|e| e.into_inner());
        if g.0.len() >= Self::GENERATION {
            g.1 = std::mem::take(&mut g.0);
        }
        g.0.insert(*key, p);
        Some(p)
    }
}

static POINTS: std::sync::LazyLock<PointCache> = std::sync::LazyLock::new(|| PointCache {
    gens: std::sync::Mutex::new(Default::default()),
});

static VERIFIED: std::sync::LazyLock<VerifiedCache> = std::sync::LazyLock::new(|| VerifiedCache {
    gens: std::sync::Mutex::new(Default::default()),
});

fn tagged(domain: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + 1 + msg.len());
    m.extend_from_slice(domain);
    m.push(0);
    m.extend_from_slice(msg);
    m
}

/// A peer's secret identity.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
    public: PublicKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.name())
    }
}

impl Identity {
    /// From a 32-byte secret seed.
    pub fn from_seed(seed: &[u8; 32]) -> Identity {
        let key = SigningKey::from_bytes(seed);
        let public = PublicKey(key.verifying_key().to_bytes());
        Identity { key, public }
    }

    /// The public key.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// Our name.
    pub fn name(&self) -> PeerName {
        self.public.name()
    }

    /// The X25519 private scalar for the Noise handshake (clamped by X25519
    /// itself; its public key is [`PublicKey::x25519`]).
    pub fn x25519_private(&self) -> [u8; 32] {
        self.key.to_scalar_bytes()
    }

    /// Sign `msg` under `domain`.
    pub fn sign(&self, domain: &[u8], msg: &[u8]) -> Sig {
        Sig(self.key.sign(&tagged(domain, msg)).to_bytes())
    }
}

/// Two different keys give one name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key does not give the name it is presented for.
    #[error("key {} does not belong to peer {name}", .key.fingerprint())]
    WrongName {
        /// The name claimed.
        name: PeerName,
        /// The key presented.
        key: PublicKey,
    },
    /// Another key already holds this name here.
    #[error("two keys claim peer name {name}: {} (kept) and {} (refused)", .kept.fingerprint(), .refused.fingerprint())]
    Collision {
        /// The name.
        name: PeerName,
        /// The key pinned first.
        kept: PublicKey,
        /// The key refused.
        refused: PublicKey,
    },
    /// We know no key for this peer, and none came with the data.
    #[error("no key known for peer {0}")]
    Unknown(PeerName),
    /// The signature does not verify.
    #[error("bad signature by peer {0}")]
    BadSignature(PeerName),
}

/// Pinned keys by value, process-wide, as weak references: every book
/// that pins a key holds one allocation of it (a simulator's thousands of
/// books, each holding every peer's key, would otherwise hold thousands of
/// copies). Dead slots are swept when the table doubles.
static SHARED_KEYS: std::sync::Mutex<Option<crate::intern::Weaks<PublicKey, PublicKey>>> =
    std::sync::Mutex::new(None);

fn shared_key(k: PublicKey) -> std::sync::Arc<PublicKey> {
    let mut g = SHARED_KEYS.lock().unwrap_or_else(|e| e.into_inner());
    g.get_or_insert_with(|| crate::intern::Weaks::new(1024))
        .intern(k, k)
}

/// The public keys of the peers we know, pinned per name.
#[derive(Debug, Default, Clone)]
pub struct KeyBook {
    /// Shared between books ([`shared_key`]): eight bytes a peer here,
    /// for the names not in `table`.
    keys: HashMap<PeerName, std::sync::Arc<PublicKey>, crate::gossip::topology::NameHash>,
    /// Names interned in one order shared with other books (a
    /// simulator's cores, [`KeyBook::share_names`]): their keys are kept
    /// by position in `by_pos`, eight bytes a name, no hash table.
    table: Option<std::sync::Arc<crate::gossip::topology::NameTable>>,
    /// The keys of `table`'s names, by position.
    by_pos: Vec<Option<std::sync::Arc<PublicKey>>>,
    /// How many of `by_pos` are set.
    pinned_by_pos: usize,
    /// Names for which a second key was refused (for status output).
    collisions: HashMap<PeerName, PublicKey>,
}

impl KeyBook {
    /// An empty book.
    pub fn new() -> KeyBook {
        KeyBook::default()
    }

    /// Keep the keys of `table`'s names by position rather than in a hash
    /// table (a memory hint for a simulator whose cores intern names in
    /// one order; nothing else changes).
    pub fn share_names(&mut self, table: std::sync::Arc<crate::gossip::topology::NameTable>) {
        let old = std::mem::take(&mut self.keys);
        self.by_pos = vec![None; table.len()];
        self.pinned_by_pos = 0;
        self.table = Some(table);
        for (n, k) in old {
            self.put(n, k);
        }
    }

    fn position(&self, name: PeerName) -> Option<usize> {
        self.table
            .as_ref()
            .and_then(|t| t.position(name))
            .map(|p| p as usize)
    }

    fn find(&self, name: PeerName) -> Option<&std::sync::Arc<PublicKey>> {
        match self.position(name) {
            Some(p) => self.by_pos[p].as_ref(),
            None => self.keys.get(&name),
        }
    }

    fn put(&mut self, name: PeerName, key: std::sync::Arc<PublicKey>) {
        match self.position(name) {
            Some(p) => {
                if self.by_pos[p].replace(key).is_none() {
                    self.pinned_by_pos += 1;
                }
            }
            None => {
                self.keys.insert(name, key);
            }
        }
    }

    /// The key pinned for `name`.
    pub fn get(&self, name: PeerName) -> Option<PublicKey> {
        self.find(name).map(|k| **k)
    }

    /// Pin `key` for `name` (a key proven some other way, e.g. our own).
    /// A key that does not give `name`, or differs from the one pinned, is
    /// refused.
    pub fn pin(&mut self, name: PeerName, key: PublicKey) -> Result<(), KeyError> {
        if key.name() != name {
            return Err(KeyError::WrongName { name, key });
        }
        match self.find(name) {
            Some(k) if **k == key => Ok(()),
            Some(k) => Err(KeyError::Collision {
                name,
                kept: **k,
                refused: key,
            }),
            None => {
                self.put(name, shared_key(key));
                Ok(())
            }
        }
    }

    /// Verify a signature by `name`: with the pinned key, or, for a peer
    /// not pinned yet, with `offered`, which is pinned once it has signed
    /// (a key is pinned only on a valid signature: the negated point of a
    /// peer's key gives the same name but cannot sign). A second key that
    /// signs validly for a pinned name is a collision: recorded, refused.
    pub fn verify(
        &mut self,
        name: PeerName,
        offered: Option<PublicKey>,
        domain: &[u8],
        msg: &[u8],
        sig: &Sig,
    ) -> Result<(), KeyError> {
        match (self.find(name).map(|k| **k), offered) {
            (Some(k), Some(o)) if k != o => {
                if k.verify(domain, msg, sig) {
                    return Ok(());
                }
                if o.name() == name && o.verify(domain, msg, sig) {
                    self.collisions.insert(name, o);
                    return Err(KeyError::Collision {
                        name,
                        kept: k,
                        refused: o,
                    });
                }
                Err(KeyError::BadSignature(name))
            }
            (Some(k), _) => {
                if verify_cached(k.as_bytes(), domain, msg, sig) {
                    Ok(())
                } else {
                    Err(KeyError::BadSignature(name))
                }
            }
            (None, Some(o)) => {
                if o.name() != name {
                    return Err(KeyError::WrongName { name, key: o });
                }
                if !o.verify(domain, msg, sig) {
                    return Err(KeyError::BadSignature(name));
                }
                self.put(name, shared_key(o));
                Ok(())
            }
            (None, None) => Err(KeyError::Unknown(name)),
        }
    }

    /// Forget a peer's key (the peer is gone for good).
    pub fn forget(&mut self, name: PeerName) {
        match self.position(name) {
            Some(p) => {
                if self.by_pos[p].take().is_some() {
                    self.pinned_by_pos -= 1;
                }
            }
            None => {
                self.keys.remove(&name);
            }
        }
    }

    /// Names for which a second key was refused, with that key.
    pub fn collisions(&self) -> impl Iterator<Item = (PeerName, PublicKey)> + '_ {
        self.collisions.iter().map(|(n, k)| (*n, *k))
    }

    /// Number of pinned keys.
    pub fn len(&self) -> usize {
        self.keys.len() + self.pinned_by_pos
    }

    /// No keys pinned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> Identity {
        Identity::from_seed(&[b; 32])
    }

    #[test]
    fn sign_and_verify_with_domains() {
        let a = id(1);
        let s = a.sign(b"topo", b"hello");
        assert!(a.public().verify(b"topo", b"hello", &s));
        assert!(!a.public().verify(b"ipam", b"hello", &s));
        assert!(!a.public().verify(b"topo", b"hellO", &s));
        assert!(!id(2).public().verify(b"topo", b"hello", &s));
        assert!(!a.public().verify(b"topo", b"hello", &Sig::NONE));
    }

    #[test]
    fn the_x25519_key_matches_the_noise_handshake() {
        let a = id(7);
        let sk = crate::handshake::StaticKey::from_identity(&a);
        assert_eq!(*sk.public(), a.public().x25519());
        assert_eq!(sk.name(), a.name());
    }

    #[test]
    fn key_book_pins_on_signatures_and_reports_collisions() {
        let mut kb = KeyBook::new();
        let a = id(1);
        let b = id(2);
        let sig = a.sign(b"d", b"m");
        // Unknown peer, no key offered.
        assert_eq!(
            kb.verify(a.name(), None, b"d", b"m", &sig),
            Err(KeyError::Unknown(a.name()))
        );
        // A key that does not give the name.
        assert!(matches!(
            kb.verify(a.name(), Some(b.public()), b"d", b"m", &b.sign(b"d", b"m")),
            Err(KeyError::WrongName { .. })
        ));
        // A bad signature pins nothing.
        assert!(kb
            .verify(a.name(), Some(a.public()), b"d", b"x", &sig)
            .is_err());
        assert_eq!(kb.get(a.name()), None);
        assert!(kb
            .verify(a.name(), Some(a.public()), b"d", b"m", &sig)
            .is_ok());
        assert_eq!(kb.get(a.name()), Some(a.public()));
        assert!(kb.verify(a.name(), None, b"d", b"m", &sig).is_ok());
        assert_eq!(
            kb.verify(a.name(), None, b"d", b"m", &b.sign(b"d", b"m")),
            Err(KeyError::BadSignature(a.name()))
        );
        assert!(kb.pin(b.name(), b.public()).is_ok());
        assert!(kb.pin(b.name(), a.public()).is_err());
        assert_eq!(kb.len(), 2);
        assert_eq!(kb.collisions().count(), 0);
    }

    #[test]
    fn a_key_book_sharing_names_keeps_the_same_keys() {
        let (a, b, c) = (id(1), id(2), id(3));
        let mut kb = KeyBook::new();
        assert!(kb.pin(a.name(), a.public()).is_ok());
        assert!(kb.pin(c.name(), c.public()).is_ok());
        // b and a in the table, c not.
        kb.share_names(crate::gossip::topology::NameTable::new(&[
            b.name(),
            a.name(),
        ]));
        assert_eq!(kb.len(), 2);
        assert_eq!(kb.get(a.name()), Some(a.public()));
        assert_eq!(kb.get(c.name()), Some(c.public()));
        assert_eq!(kb.get(b.name()), None);
        let sig = b.sign(b"d", b"m");
        assert!(kb
            .verify(b.name(), Some(b.public()), b"d", b"m", &sig)
            .is_ok());
        assert_eq!(kb.get(b.name()), Some(b.public()));
        assert!(kb.pin(b.name(), a.public()).is_err());
        assert_eq!(kb.len(), 3);
        kb.forget(a.name());
        kb.forget(c.name());
        assert_eq!(kb.get(a.name()), None);
        assert_eq!(kb.get(c.name()), None);
        assert_eq!(kb.len(), 1);
    }

    #[test]
    fn the_negated_key_gives_the_same_name_but_cannot_sign() {
        use ed25519_dalek::VerifyingKey;
        let a = id(9);
        let point = VerifyingKey::from_bytes(a.public().as_bytes())
            .expect("point")
            .to_edwards();
        let neg = PublicKey::from_bytes(&(-point).compress().to_bytes()).expect("neg");
        assert_ne!(neg, a.public());
        assert_eq!(neg.name(), a.name());
        let mut kb = KeyBook::new();
        // Offered first with a signature it cannot have made: not pinned.
        assert!(kb
            .verify(a.name(), Some(neg), b"d", b"m", &a.sign(b"d", b"m"))
            .is_err());
        assert!(kb
            .verify(a.name(), Some(a.public()), b"d", b"m", &a.sign(b"d", b"m"))
            .is_ok());
    }

    #[test]
    fn invalid_keys_are_refused() {
        // Not every 32-byte string is a point.
        let bad = (0u8..=255)
            .map(|i| [i; 32])
            .find(|b| PublicKey::from_bytes(b).is_err());
        assert!(bad.is_some());
        assert!(PublicKey::from_bytes(&[1; 31]).is_err());
    }

    #[test]
    fn serde_round_trip() {
        let a = id(3);
        let s = a.sign(b"x", b"y");
        let bytes = postcard::to_allocvec(&(a.public(), s)).expect("encode");
        let (k, s2): (PublicKey, Sig) = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(k, a.public());
        assert_eq!(s2, s);
    }
}
