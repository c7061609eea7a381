//! The Noise handshake of the control channel, and the transport after it.
//!
//! Without a password: `Noise_XX_25519_ChaChaPoly_BLAKE2s`. With one:
//! `Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s`, the PSK derived from the password
//! by Argon2id ([`psk_from_password`]). Both sides prove their static keys,
//! so each learns the other's [`PeerName`] from the key it proved. The two
//! hellos are the prologue: a hello altered in flight fails the handshake.
//!
//! In `XXpsk3` the PSK enters with the third message, so a wrong password is
//! detected by the responder when it reads message 3 ([`HandshakeError::Rejected`]);
//! it then sends a plaintext refusal so the initiator can say why too.
//!
//! This is a thin wrapper over `snow`: no I/O, the caller moves the bytes.
//! (Ephemeral keys come from `snow`'s own OS-backed RNG.)

use crate::name::PeerName;

const PARAMS_XX: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
const PARAMS_XXPSK3: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";
/// The largest Noise message.
pub const MAX_MESSAGE: usize = 65535;
/// Bytes a transport message adds to its payload (the AEAD tag).
pub const TAG_LEN: usize = 16;
/// The largest payload of one transport message.
pub const MAX_PAYLOAD: usize = MAX_MESSAGE - TAG_LEN;

/// Fixed salt for the password KDF: every peer must derive the same PSK.
const PSK_SALT: &[u8] = b"mesh/psk/v1/salt";

/// Handshake failures.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer's message did not authenticate: with a password, the usual
    /// cause is that the passwords differ.
    #[error("handshake message did not authenticate (different password?)")]
    Rejected,
    /// A message arrived out of turn or malformed.
    #[error("handshake protocol error: {0}")]
    Protocol(String),
    /// A local failure (bad key material).
    #[error("handshake setup failed: {0}")]
    Setup(String),
    /// The password could not be turned into a key.
    #[error("password key derivation failed: {0}")]
    Kdf(String),
}

fn proto_err(e: snow::Error) -> HandshakeError {
    match e {
        snow::Error::Decrypt => HandshakeError::Rejected,
        other => HandshakeError::Protocol(other.to_string()),
    }
}

/// A peer's persistent X25519 static key pair.
#[derive(Clone)]
pub struct StaticKey {
    private: [u8; 32],
    public: [u8; 32],
}

impl std::fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StaticKey({})", self.name())
    }
}

impl StaticKey {
    /// A new random key pair (from the operating system's RNG, via `snow`).
    pub fn generate() -> Result<StaticKey, HandshakeError> {
        let params = PARAMS_XX
            .parse()
            .map_err(|e: snow::Error| HandshakeError::Setup(e.to_string()))?;
        let kp = snow::Builder::new(params)
            .generate_keypair()
            .map_err(|e| HandshakeError::Setup(e.to_string()))?;
        Self::from_parts(&kp.private, &kp.public)
    }

    /// The X25519 key of an [`Identity`](crate::sign::Identity) (the
    /// handshake then proves the identity's key: see [`crate::sign`]).
    pub fn from_identity(id: &crate::sign::Identity) -> StaticKey {
        StaticKey {
            private: id.x25519_private(),
            public: id.public().x25519(),
        }
    }

    /// From stored private and public halves.
    pub fn from_parts(private: &[u8], public: &[u8]) -> Result<StaticKey, HandshakeError> {
        let (Ok(private), Ok(public)) = (private.try_into(), public.try_into()) else {
            return Err(HandshakeError::Setup("key halves must be 32 bytes".into()));
        };
        Ok(StaticKey { private, public })
    }

    /// The 64-byte stored form: private then public.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[..32].copy_from_slice(&self.private);
        b[32..].copy_from_slice(&self.public);
        b
    }

    /// From the stored form.
    pub fn from_bytes(b: &[u8]) -> Result<StaticKey, HandshakeError> {
        if b.len() != 64 {
            return Err(HandshakeError::Setup(format!(
                "stored key is {} bytes, expected 64",
                b.len()
            )));
        }
        Self::from_parts(&b[..32], &b[32..])
    }

    /// The public half.
    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    /// The peer name this key gives.
    pub fn name(&self) -> PeerName {
        PeerName::from_public_key(&self.public)
    }
}

/// Derive the 32-byte PSK from a password with Argon2id (19 MiB, 2 passes).
pub fn psk_from_password(password: &[u8]) -> Result<[u8; 32], HandshakeError> {
    use argon2::{Algorithm, Argon2, Params, Version};
    let params =
        Params::new(19 * 1024, 2, 1, Some(32)).map_err(|e| HandshakeError::Kdf(e.to_string()))?;
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(password, PSK_SALT, &mut out)
        .map_err(|e| HandshakeError::Kdf(e.to_string()))?;
    Ok(out)
}

/// Which end of the connection we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We dialed.
    Initiator,
    /// We accepted.
    Responder,
}

/// A handshake in progress.
pub struct Handshake {
    state: snow::HandshakeState,
}

impl Handshake {
    /// Start a handshake. `prologue` must be the same bytes on both sides
    /// (the initiator's hello followed by the responder's).
    pub fn new(
        role: Role,
        key: &StaticKey,
        psk: Option<&[u8; 32]>,
        prologue: &[u8],
    ) -> Result<Handshake, HandshakeError> {
        let setup = |e: snow::Error| HandshakeError::Setup(e.to_string());
        let name = if psk.is_some() {
            PARAMS_XXPSK3
        } else {
            PARAMS_XX
        };
        let mut b = snow::Builder::new(name.parse().map_err(setup)?)
            .local_private_key(&key.private)
            .map_err(setup)?
            .prologue(prologue)
            .map_err(setup)?;
        if let Some(psk) = psk {
            b = b.psk(3, psk).map_err(setup)?;
        }
        let state = match role {
            Role::Initiator => b.build_initiator(),
            Role::Responder => b.build_responder(),
        }
        .map_err(setup)?;
        Ok(Handshake { state })
    }

    /// Whether the next move is ours (write) rather than theirs (read).
    pub fn is_my_turn(&self) -> bool {
        self.state.is_my_turn()
    }

    /// Whether all three messages have passed.
    pub fn is_finished(&self) -> bool {
        self.state.is_handshake_finished()
    }

    /// Write our next handshake message (with an empty payload).
    pub fn write(&mut self) -> Result<Vec<u8>, HandshakeError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let n = self.state.write_message(&[], &mut buf).map_err(proto_err)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Read the peer's next handshake message.
    pub fn read(&mut self, msg: &[u8]) -> Result<(), HandshakeError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        self.state.read_message(msg, &mut buf).map_err(proto_err)?;
        Ok(())
    }

    /// Finish: the transport and the peer's proven name.
    pub fn finish(self) -> Result<Transport, HandshakeError> {
        let remote: [u8; 32] = self
            .state
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| HandshakeError::Protocol("no remote static key".into()))?;
        let state = self.state.into_transport_mode().map_err(proto_err)?;
        Ok(Transport { state, remote })
    }
}

/// The encrypted control channel after the handshake.
pub struct Transport {
    state: snow::TransportState,
    remote: [u8; 32],
}

impl Transport {
    /// The peer's static public key.
    pub fn remote_key(&self) -> &[u8; 32] {
        &self.remote
    }

    /// The peer's name, from the key it proved.
    pub fn remote_name(&self) -> PeerName {
        PeerName::from_public_key(&self.remote)
    }

    /// Encrypt one payload of at most [`MAX_PAYLOAD`] bytes.
    pub fn seal(&mut self, payload: &[u8]) -> Result<Vec<u8>, HandshakeError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(HandshakeError::Protocol(format!(
                "payload of {} bytes exceeds {MAX_PAYLOAD}",
                payload.len()
            )));
        }
        let mut buf = vec![0u8; payload.len() + TAG_LEN];
        let n = self
            .state
            .write_message(payload, &mut buf)
            .map_err(proto_err)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Decrypt one message.
    pub fn open(&mut self, msg: &[u8]) -> Result<Vec<u8>, HandshakeError> {
        let mut buf = vec![0u8; msg.len()];
        let n = self.state.read_message(msg, &mut buf).map_err(proto_err)?;
        buf.truncate(n);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        psk_a: Option<[u8; 32]>,
        psk_b: Option<[u8; 32]>,
    ) -> Result<(Transport, Transport), HandshakeError> {
        let (ka, kb) = (StaticKey::generate()?, StaticKey::generate()?);
        let mut a = Handshake::new(Role::Initiator, &ka, psk_a.as_ref(), b"p")?;
        let mut b = Handshake::new(Role::Responder, &kb, psk_b.as_ref(), b"p")?;
        b.read(&a.write()?)?;
        a.read(&b.write()?)?;
        b.read(&a.write()?)?;
        assert!(a.is_finished() && b.is_finished());
        let (ta, tb) = (a.finish()?, b.finish()?);
        assert_eq!(ta.remote_name(), kb.name());
        assert_eq!(tb.remote_name(), ka.name());
        Ok((ta, tb))
    }

    #[test]
    fn an_identitys_key_is_what_the_handshake_proves() {
        let (ia, ib) = (
            crate::sign::Identity::from_seed(&[5; 32]),
            crate::sign::Identity::from_seed(&[6; 32]),
        );
        let (ka, kb) = (StaticKey::from_identity(&ia), StaticKey::from_identity(&ib));
        let mut a = Handshake::new(Role::Initiator, &ka, None, b"p").unwrap();
        let mut b = Handshake::new(Role::Responder, &kb, None, b"p").unwrap();
        b.read(&a.write().unwrap()).unwrap();
        a.read(&b.write().unwrap()).unwrap();
        b.read(&a.write().unwrap()).unwrap();
        let (ta, tb) = (a.finish().unwrap(), b.finish().unwrap());
        assert_eq!(*ta.remote_key(), ib.public().x25519());
        assert_eq!(*tb.remote_key(), ia.public().x25519());
        assert_eq!(ta.remote_name(), ib.name());
    }

    #[test]
    fn xx_round_trip() {
        let (mut a, mut b) = run(None, None).unwrap();
        let m = a.seal(b"hello").unwrap();
        assert_eq!(b.open(&m).unwrap(), b"hello");
        let m = b.seal(b"back").unwrap();
        assert_eq!(a.open(&m).unwrap(), b"back");
        // Tampering is detected.
        let mut m = a.seal(b"x").unwrap();
        m[0] ^= 1;
        assert!(b.open(&m).is_err());
    }

    #[test]
    fn psk_match_and_mismatch() {
        let p1 = psk_from_password(b"s3cret").unwrap();
        let p2 = psk_from_password(b"wrong").unwrap();
        assert_eq!(p1, psk_from_password(b"s3cret").unwrap());
        assert_ne!(p1, p2);
        run(Some(p1), Some(p1)).unwrap();
        assert!(matches!(
            run(Some(p1), Some(p2)),
            Err(HandshakeError::Rejected)
        ));
    }

    #[test]
    fn prologue_mismatch_fails() {
        let (ka, kb) = (
            StaticKey::generate().unwrap(),
            StaticKey::generate().unwrap(),
        );
        let mut a = Handshake::new(Role::Initiator, &ka, None, b"one").unwrap();
        let mut b = Handshake::new(Role::Responder, &kb, None, b"two").unwrap();
        b.read(&a.write().unwrap()).unwrap();
        assert!(a.read(&b.write().unwrap()).is_err());
    }

    #[test]
    fn garbage_is_an_error() {
        let k = StaticKey::generate().unwrap();
        let mut b = Handshake::new(Role::Responder, &k, None, b"").unwrap();
        assert!(b.read(&[1, 2, 3]).is_err());
        let mut b = Handshake::new(Role::Responder, &k, None, b"").unwrap();
        assert!(b.read(&[0u8; 200]).is_err() || !b.is_finished());
    }

    #[test]
    fn key_storage() {
        let k = StaticKey::generate().unwrap();
        let k2 = StaticKey::from_bytes(&k.to_bytes()).unwrap();
        assert_eq!(k.name(), k2.name());
        assert!(StaticKey::from_bytes(&[0; 10]).is_err());
    }
}
