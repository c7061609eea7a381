//! Reassembly of frames carried as fragments (see [`crate::sleeve`]).
//!
//! Bounded in every direction: at most `max_slots` frames in progress (the
//! oldest is dropped to make room), each at most [`MAX_FRAME`] bytes,
//! allocated only once a fragment has passed validation, and dropped after
//! `timeout` without completing. Overlapping or inconsistent fragments drop
//! their frame. Time comes in as an argument.

use crate::name::PeerName;
use crate::sleeve::MAX_FRAME;
use crate::WireError;
use std::time::{Duration, Instant};

struct Slot {
    src: PeerName,
    id: u32,
    total: u32,
    started: Instant,
    buf: Vec<u8>,
    /// (offset, len) of the pieces received, unordered.
    pieces: Vec<(u32, u32)>,
    received: u32,
}

/// Frames being put back together.
pub struct Reassembler {
    slots: Vec<Slot>,
    max_slots: usize,
    timeout: Duration,
}

/// The most pieces one frame may arrive in.
const MAX_PIECES: usize = 256;

impl Reassembler {
    /// A reassembler holding at most `max_slots` partial frames, each for at
    /// most `timeout`.
    pub fn new(max_slots: usize, timeout: Duration) -> Reassembler {
        Reassembler {
            slots: Vec::new(),
            max_slots: max_slots.max(1),
            timeout,
        }
    }

    /// Partial frames held.
    pub fn pending(&self) -> usize {
        self.slots.len()
    }

    /// Add one fragment; returns the whole frame once complete.
    pub fn push(
        &mut self,
        now: Instant,
        src: PeerName,
        id: u32,
        total: u32,
        offset: u32,
        data: &[u8],
    ) -> Result<Option<Vec<u8>>, WireError> {
        if total as usize > MAX_FRAME {
            return Err(WireError::TooLong {
                what: "fragmented frame",
                len: total as usize,
                max: MAX_FRAME,
            });
        }
        let len = u32::try_from(data.len()).map_err(|_| WireError::Invalid("fragment length"))?;
        let end = offset
            .checked_add(len)
            .ok_or(WireError::Invalid("fragment offset"))?;
        if len == 0 || end > total {
            return Err(WireError::Invalid("fragment outside its frame"));
        }
        let timeout = self.timeout;
        self.slots
            .retain(|s| now.saturating_duration_since(s.started) < timeout);
        let idx = match self.slots.iter().position(|s| s.src == src && s.id == id) {
            Some(i) => i,
            None => {
                if self.slots.len() >= self.max_slots {
                    // Drop the oldest.
                    if let Some(oldest) =
                        (0..self.slots.len()).min_by_key(|&i| self.slots[i].started)
                    {
                        self.slots.swap_remove(oldest);
                    }
                }
                self.slots.push(Slot {
                    src,
                    id,
                    total,
                    started: now,
                    buf: vec![0u8; total as usize],
                    pieces: Vec::new(),
                    received: 0,
                });
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[idx];
        let overlaps = slot.pieces.iter().any(|&(o, l)| offset < o + l && o < end);
        if slot.total != total || overlaps || slot.pieces.len() >= MAX_PIECES {
            self.slots.swap_remove(idx);
            return Err(WireError::Invalid("inconsistent fragment"));
        }
        slot.buf[offset as usize..end as usize].copy_from_slice(data);
        slot.pieces.push((offset, len));
        slot.received += len;
        if slot.received == slot.total {
            let slot = self.slots.swap_remove(idx);
            return Ok(Some(slot.buf));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: PeerName = PeerName([2, 0, 0, 0, 0, 9]);

    #[test]
    fn out_of_order_completes() {
        let mut r = Reassembler::new(4, Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(r.push(t, P, 1, 6, 3, b"def").unwrap(), None);
        assert_eq!(
            r.push(t, P, 1, 6, 0, b"abc").unwrap(),
            Some(b"abcdef".to_vec())
        );
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn rejects_bad_fragments() {
        let mut r = Reassembler::new(4, Duration::from_secs(1));
        let t = Instant::now();
        assert!(r.push(t, P, 1, 6, 5, b"xy").is_err());
        assert!(r.push(t, P, 1, 6, 0, b"").is_err());
        assert!(r.push(t, P, 1, u32::MAX, 0, b"x").is_err());
        assert!(r.push(t, P, 1, 6, u32::MAX, b"x").is_err());
        r.push(t, P, 2, 6, 0, b"abc").unwrap();
        assert!(r.push(t, P, 2, 6, 2, b"cd").is_err()); // overlap
        assert_eq!(r.pending(), 0);
        r.push(t, P, 3, 6, 0, b"abc").unwrap();
        assert!(r.push(t, P, 3, 7, 3, b"def").is_err()); // total changed
    }

    #[test]
    fn bounded_and_expiring() {
        let mut r = Reassembler::new(2, Duration::from_secs(1));
        let t = Instant::now();
        for id in 0..10 {
            r.push(t, P, id, 4, 0, b"ab").unwrap();
        }
        assert_eq!(r.pending(), 2);
        r.push(t + Duration::from_secs(2), P, 99, 4, 0, b"ab")
            .unwrap();
        assert_eq!(r.pending(), 1);
        // The expired frame's second half no longer completes anything.
        assert_eq!(
            r.push(t + Duration::from_secs(2), P, 9, 4, 2, b"cd")
                .unwrap(),
            None
        );
    }
}
