//! Records on the control channel, after the hello.
//!
//! ```text
//! +------+-----------+-----------------+
//! | kind | len (u16) | payload (len)   |
//! +------+-----------+-----------------+
//! ```
//!
//! `kind` 1: a Noise handshake message; 2: a Noise transport message (an
//! encrypted [`crate::control::ControlMsg`]); 3: a refusal, a short UTF-8
//! reason sent in the clear before closing (e.g. a failed handshake, which
//! leaves no shared key to encrypt it with). Payloads are capped at the Noise
//! maximum of 65,535 bytes by the length field itself; refusals at
//! [`MAX_REFUSAL`].

use crate::WireError;

/// Bytes before the payload.
pub const RECORD_HEADER_LEN: usize = 3;
/// The largest payload.
pub const MAX_RECORD: usize = u16::MAX as usize;
/// The largest refusal reason.
pub const MAX_REFUSAL: usize = 512;

/// What a record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A Noise handshake message.
    Handshake,
    /// A Noise transport message.
    Transport,
    /// A plaintext refusal reason.
    Refusal,
}

impl RecordKind {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            1 => Ok(RecordKind::Handshake),
            2 => Ok(RecordKind::Transport),
            3 => Ok(RecordKind::Refusal),
            value => Err(WireError::Unknown {
                what: "control record kind",
                value,
            }),
        }
    }
    fn to_u8(self) -> u8 {
        match self {
            RecordKind::Handshake => 1,
            RecordKind::Transport => 2,
            RecordKind::Refusal => 3,
        }
    }
}

/// A parsed record, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Its kind.
    pub kind: RecordKind,
    /// Its payload.
    pub payload: &'a [u8],
}

/// Parse a record header: its kind and payload length. The caller then reads
/// exactly that many bytes.
pub fn parse_header(b: &[u8; RECORD_HEADER_LEN]) -> Result<(RecordKind, usize), WireError> {
    let kind = RecordKind::from_u8(b[0])?;
    let len = u16::from_be_bytes([b[1], b[2]]) as usize;
    if kind == RecordKind::Refusal && len > MAX_REFUSAL {
        return Err(WireError::TooLong {
            what: "refusal",
            len,
            max: MAX_REFUSAL,
        });
    }
    Ok((kind, len))
}

/// Parse one whole record from the front of `b`, returning it and the bytes
/// consumed; `Ok(None)` if `b` does not yet hold a whole record.
pub fn parse(b: &[u8]) -> Result<Option<(Record<'_>, usize)>, WireError> {
    let Some(head) = b.first_chunk::<RECORD_HEADER_LEN>() else {
        return Ok(None);
    };
    let (kind, len) = parse_header(head)?;
    let end = RECORD_HEADER_LEN + len;
    if b.len() < end {
        return Ok(None);
    }
    Ok(Some((
        Record {
            kind,
            payload: &b[RECORD_HEADER_LEN..end],
        },
        end,
    )))
}

/// Append a record to `out`.
pub fn emit(kind: RecordKind, payload: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
    let max = if kind == RecordKind::Refusal {
        MAX_REFUSAL
    } else {
        MAX_RECORD
    };
    if payload.len() > max {
        return Err(WireError::TooLong {
            what: "control record",
            len: payload.len(),
            max,
        });
    }
    out.push(kind.to_u8());
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fixed_bytes() {
        let b = [2, 0, 3, 0xaa, 0xbb, 0xcc, 9];
        let (r, used) = parse(&b).unwrap().unwrap();
        assert_eq!(used, 6);
        assert_eq!(r.kind, RecordKind::Transport);
        assert_eq!(r.payload, &[0xaa, 0xbb, 0xcc]);
        let mut out = Vec::new();
        emit(RecordKind::Transport, &[0xaa, 0xbb, 0xcc], &mut out).unwrap();
        assert_eq!(out, &b[..6]);
    }

    #[test]
    fn incomplete_and_malformed() {
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&[1, 0]), Ok(None));
        assert_eq!(parse(&[1, 0, 2, 0]), Ok(None));
        assert!(parse(&[0, 0, 0]).is_err());
        assert!(parse(&[9, 0, 0]).is_err());
        assert!(parse(&[3, 0xff, 0xff]).is_err());
        let mut out = Vec::new();
        assert!(emit(RecordKind::Refusal, &[0; 600], &mut out).is_err());
        assert!(emit(RecordKind::Handshake, &vec![0; 70000], &mut out).is_err());
        assert!(out.is_empty());
    }

    proptest! {
        #[test]
        fn round_trip(kind in 1u8..=3, payload in proptest::collection::vec(any::<u8>(), 0..600)) {
            let kind = RecordKind::from_u8(kind).unwrap();
            let mut out = Vec::new();
            if emit(kind, &payload, &mut out).is_ok() {
                let (r, used) = parse(&out).unwrap().unwrap();
                prop_assert_eq!(used, out.len());
                prop_assert_eq!(r.kind, kind);
                prop_assert_eq!(r.payload, &payload[..]);
            }
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = parse(&b);
        }
    }
}
