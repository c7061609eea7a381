//! Messages inside the encrypted control channel.
//!
//! Each Noise transport payload is one [`ControlMsg`], serialized with
//! `postcard`. The layout of this enum is fixed for a protocol version (see
//! [`crate::hello`]): a change to it is a new version, negotiated before any
//! message is sent, so a mesh can be upgraded peer by peer. Decoding rejects
//! trailing bytes and caps every length by the record's own size.

use crate::WireError;
use serde::{Deserialize, Serialize};

/// A message on the control channel (protocol version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMsg {
    /// The first message each side sends after the handshake.
    Intro(Intro),
    /// Liveness, sent periodically.
    Heartbeat,
    /// A new sleeve key offered by the sender of that direction: it seals
    /// with it once the receiver acknowledged it (see [`crate::rekey`]).
    SleeveKey {
        /// The key id carried in sealed datagram headers.
        key_id: u8,
        /// The ChaCha20-Poly1305 key.
        key: [u8; 32],
    },
    /// The sender is closing the connection, and why.
    Close {
        /// A human-readable reason.
        reason: String,
    },
    /// A gossip message (the topology and other channels), opaque at this layer.
    Gossip(Vec<u8>),
    /// The receiver of a direction installed the offered key `key_id`: the
    /// sender may seal with it. Appended after the version-2 layout and
    /// sent only in answer to a `SleeveKey`, which builds that do not know
    /// this variant never send, so the protocol version stays 2.
    SleeveKeyAck {
        /// The id of the key installed.
        key_id: u8,
    },
}

/// What a peer tells about itself once the handshake is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intro {
    /// A human-friendly name (the host name by default).
    pub nickname: String,
    /// The UDP port its sleeve listens on.
    pub udp_port: u16,
    /// The largest Ethernet frame (without the vnet header) it accepts on the
    /// sleeve: the overlay MTU plus 14.
    pub max_frame: u32,
    /// When encryption is on: the id and key the sender will seal sleeve
    /// datagrams with (each direction has its own random key).
    pub sleeve_key: Option<(u8, [u8; 32])>,
    /// The sender's offer of the kernel VXLAN fast path to this peer, when
    /// it has the device and may use it with this peer (no password, or the
    /// peer in its trusted subnets). The fast path is used when both offer.
    pub fastdp: Option<FastdpOffer>,
}

/// What a peer needs to send to our fast path and to trust its probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FastdpOffer {
    /// The VXLAN network identifier of our device (both ends must agree).
    pub vni: u32,
    /// Our VXLAN UDP port.
    pub port: u16,
    /// Our bridge's MAC: where fast-path probes are addressed.
    pub mac: [u8; 6],
    /// The key our probes are tagged with (see [`crate::fastdp`]).
    pub probe_key: crate::fastdp::ProbeKey,
}

/// The longest nickname accepted.
pub const MAX_NICKNAME: usize = 64;

impl ControlMsg {
    /// Serialize.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        postcard::to_allocvec(self).map_err(|_| WireError::Invalid("control message encoding"))
    }

    /// Parse one message occupying all of `b`.
    pub fn decode(b: &[u8]) -> Result<ControlMsg, WireError> {
        let (msg, rest): (ControlMsg, &[u8]) =
            postcard::take_from_bytes(b).map_err(|_| WireError::Invalid("control message"))?;
        if !rest.is_empty() {
            return Err(WireError::Trailing(rest.len()));
        }
        if let ControlMsg::Intro(i) = &msg {
            if i.nickname.len() > MAX_NICKNAME {
                return Err(WireError::TooLong {
                    what: "nickname",
                    len: i.nickname.len(),
                    max: MAX_NICKNAME,
                });
            }
        }
        if let ControlMsg::Close { reason } = &msg {
            if reason.len() > crate::frame::MAX_REFUSAL {
                return Err(WireError::TooLong {
                    what: "close reason",
                    len: reason.len(),
                    max: crate::frame::MAX_REFUSAL,
                });
            }
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fixed_bytes() {
        // Heartbeat is variant 1: a single varint byte.
        assert_eq!(ControlMsg::Heartbeat.encode().unwrap(), vec![1]);
        assert_eq!(ControlMsg::decode(&[1]).unwrap(), ControlMsg::Heartbeat);
        // The rekey acknowledgement is variant 5, after the older ones.
        let ack = ControlMsg::SleeveKeyAck { key_id: 7 };
        assert_eq!(ack.encode().unwrap(), vec![5, 7]);
        assert_eq!(ControlMsg::decode(&[5, 7]).unwrap(), ack);
        let offer = ControlMsg::SleeveKey {
            key_id: 2,
            key: [3; 32],
        };
        assert_eq!(&offer.encode().unwrap()[..3], &[2, 2, 3]);
        let intro = ControlMsg::Intro(Intro {
            nickname: "h1".into(),
            udp_port: 6783,
            max_frame: 1419,
            sleeve_key: None,
            fastdp: None,
        });
        let b = intro.encode().unwrap();
        // variant 0, "h1", port 6783 = varint 0xff 0x34, 1419 = 0x8b 0x0b, None, None
        assert_eq!(b, vec![0, 2, b'h', b'1', 0xff, 0x34, 0x8b, 0x0b, 0, 0]);
        assert_eq!(ControlMsg::decode(&b).unwrap(), intro);
        let intro = ControlMsg::Intro(Intro {
            nickname: "h1".into(),
            udp_port: 6783,
            max_frame: 1419,
            sleeve_key: None,
            fastdp: Some(FastdpOffer {
                vni: 1,
                port: 6784,
                mac: [2, 0, 0, 0, 0, 1],
                probe_key: [9; 16],
            }),
        });
        let b = intro.encode().unwrap();
        // ..., Some, vni 1, port 6784 = 0x80 0x35, mac, key
        assert_eq!(&b[8..14], &[0, 1, 1, 0x80, 0x35, 2]);
        assert_eq!(b.len(), 13 + 6 + 16);
        // A truncated offer is an error, not a default.
        assert!(ControlMsg::decode(&b[..b.len() - 1]).is_err());
        assert!(ControlMsg::decode(&b[..9]).is_err());
        assert_eq!(ControlMsg::decode(&b).unwrap(), intro);
    }

    #[test]
    fn malformed() {
        assert!(ControlMsg::decode(&[]).is_err());
        assert!(ControlMsg::decode(&[9]).is_err());
        assert!(matches!(
            ControlMsg::decode(&[1, 0]),
            Err(WireError::Trailing(1))
        ));
        // A string length far beyond the buffer.
        assert!(ControlMsg::decode(&[3, 0xff, 0xff, 0xff, 0x0f]).is_err());
        let long = ControlMsg::Intro(Intro {
            nickname: "x".repeat(100),
            udp_port: 1,
            max_frame: 1,
            sleeve_key: None,
            fastdp: None,
        });
        assert!(ControlMsg::decode(&long.encode().unwrap()).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(nick in "[a-z0-9-]{0,64}", port: u16, max_frame: u32, key: Option<(u8, [u8; 32])>, reason in ".{0,100}", fd: Option<(u32, [u8; 6], [u8; 16])>) {
            let fastdp = fd.map(|(vni, mac, probe_key)| FastdpOffer { vni, port, mac, probe_key });
            for m in [
                ControlMsg::Intro(Intro { nickname: nick.clone(), udp_port: port, max_frame, sleeve_key: key, fastdp }),
                ControlMsg::Heartbeat,
                ControlMsg::SleeveKey { key_id: port as u8, key: [port as u8; 32] },
                ControlMsg::Close { reason: reason.clone() },
                ControlMsg::Gossip(reason.clone().into_bytes()),
                ControlMsg::SleeveKeyAck { key_id: port as u8 },
            ] {
                prop_assert_eq!(ControlMsg::decode(&m.encode().unwrap()).unwrap(), m);
            }
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ControlMsg::decode(&b);
        }
    }
}
