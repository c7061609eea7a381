//! Reassembly of sleeve messages carried in several segments (see
//! [`crate::sleeve`]).
//!
//! Bounded in every direction: at most `max_slots` messages in progress (the
//! oldest is dropped to make room), each at most `count × stride` bytes
//! where the segment header was checked against
//! [`crate::sleeve::MAX_MESSAGE`], and dropped after `timeout` without
//! completing. A message is keyed by the link it arrived on (a number the
//! caller gives each neighbour connection, so a restarted neighbour's
//! counters never meet its old ones) and its counter. A duplicate segment is
//! ignored; a segment that disagrees with its message's count or stride
//! drops the message. Buffers of completed messages can be handed back
//! ([`Reassembler::recycle`]) so that steady traffic allocates nothing.
//! Time comes in as an argument.

use crate::sleeve::Segment;
use crate::WireError;
use std::time::{Duration, Instant};

struct Slot {
    link: u64,
    counter: u64,
    count: u16,
    stride: u16,
    received: u16,
    /// Length of the message once its last segment is in.
    len: Option<usize>,
    seen: Vec<u64>,
    started: Instant,
    buf: Vec<u8>,
}

/// Messages being put back together.
pub struct Reassembler {
    slots: Vec<Slot>,
    max_slots: usize,
    timeout: Duration,
    pool: Vec<Vec<u8>>,
}

/// Buffers kept for reuse.
const POOL: usize = 16;

impl Reassembler {
    /// A reassembler holding at most `max_slots` partial messages, each for
    /// at most `timeout`.
    pub fn new(max_slots: usize, timeout: Duration) -> Reassembler {
        Reassembler {
            slots: Vec::new(),
            max_slots: max_slots.max(1),
            timeout,
            pool: Vec::new(),
        }
    }

    /// Partial messages held.
    pub fn pending(&self) -> usize {
        self.slots.len()
    }

    /// Forget the partial messages of one link (its neighbour went away).
    pub fn forget(&mut self, link: u64) {
        self.slots.retain(|s| s.link != link);
    }

    /// Give back the buffer of a completed message.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < POOL {
            self.pool.push(buf);
        }
    }

    /// Add one segment (already checked by
    /// [`crate::sleeve::parse_datagram`]); returns the whole message once
    /// every segment is in. A single-segment message is returned at once.
    pub fn push(
        &mut self,
        now: Instant,
        link: u64,
        counter: u64,
        seg: Segment,
        data: &[u8],
    ) -> Result<Option<Vec<u8>>, WireError> {
        let timeout = self.timeout;
        self.slots
            .retain(|s| now.saturating_duration_since(s.started) < timeout);
        if seg.count <= 1 {
            let mut b = self.pool.pop().unwrap_or_default();
            b.clear();
            b.extend_from_slice(data);
            return Ok(Some(b));
        }
        let i = match self
            .slots
            .iter()
            .position(|s| s.link == link && s.counter == counter)
        {
            Some(i) => {
                let s = &self.slots[i];
                if s.count != seg.count || s.stride != seg.stride {
                    let s = self.slots.swap_remove(i);
                    self.recycle(s.buf);
                    return Err(WireError::Invalid("segment disagrees with its message"));
                }
                i
            }
            None => {
                if self.slots.len() >= self.max_slots {
                    // Drop the oldest.
                    if let Some((j, _)) =
                        self.slots.iter().enumerate().min_by_key(|(_, s)| s.started)
                    {
                        let s = self.slots.swap_remove(j);
                        self.recycle(s.buf);
                    }
                }
                // Recycled buffers keep their length and old bytes: every
                // byte up to the message's end is written by its segments
                // before it is handed out, so nothing needs zeroing.
                let mut buf = self.pool.pop().unwrap_or_default();
                let need = seg.count as usize * seg.stride as usize;
                if buf.len() < need {
                    buf.resize(need, 0);
                }
                self.slots.push(Slot {
                    link,
                    counter,
                    count: seg.count,
                    stride: seg.stride,
                    received: 0,
                    len: None,
                    seen: vec![0; (seg.count as usize).div_ceil(64)],
                    started: now,
                    buf,
                });
                self.slots.len() - 1
            }
        };
        let s = &mut self.slots[i];
        let (word, bit) = (seg.index as usize / 64, 1u64 << (seg.index % 64));
        if s.seen[word] & bit != 0 {
            return Ok(None);
        }
        s.seen[word] |= bit;
        let start = seg.index as usize * seg.stride as usize;
        s.buf[start..start + data.len()].copy_from_slice(data);
        if seg.index + 1 == seg.count {
            s.len = Some(start + data.len());
        }
        s.received += 1;
        if s.received < s.count {
            return Ok(None);
        }
        let s = self.slots.swap_remove(i);
        let mut buf = s.buf;
        buf.truncate(s.len.unwrap_or(0));
        Ok(Some(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(count: u16, index: u16, stride: u16) -> Segment {
        Segment {
            count,
            index,
            stride,
        }
    }

    #[test]
    fn in_order_and_out_of_order() {
        let mut r = Reassembler::new(4, Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(r.push(t, 1, 7, seg(3, 0, 2), b"ab").unwrap(), None);
        assert_eq!(r.push(t, 1, 7, seg(3, 2, 2), b"e").unwrap(), None);
        assert_eq!(r.push(t, 1, 7, seg(3, 2, 2), b"e").unwrap(), None, "dup");
        assert_eq!(
            r.push(t, 1, 7, seg(3, 1, 2), b"cd").unwrap(),
            Some(b"abcde".to_vec())
        );
        assert_eq!(r.pending(), 0);
        assert_eq!(
            r.push(t, 1, 8, seg(1, 0, 9), b"one").unwrap(),
            Some(b"one".to_vec())
        );
    }

    #[test]
    fn links_and_counters_are_separate_and_bounded() {
        let mut r = Reassembler::new(2, Duration::from_secs(1));
        let t = Instant::now();
        r.push(t, 1, 7, seg(2, 0, 1), b"a").unwrap();
        r.push(t, 2, 7, seg(2, 0, 1), b"b").unwrap();
        assert_eq!(
            r.push(t, 2, 7, seg(2, 1, 1), b"B").unwrap(),
            Some(b"bB".to_vec())
        );
        r.push(t, 1, 8, seg(2, 0, 1), b"x").unwrap();
        r.push(t + Duration::from_millis(1), 1, 9, seg(2, 0, 1), b"y")
            .unwrap();
        // (1, 7) was the oldest and was dropped to make room.
        assert_eq!(r.push(t, 1, 7, seg(2, 1, 1), b"A").unwrap(), None);
        r.forget(1);
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn timeout_and_disagreement() {
        let mut r = Reassembler::new(4, Duration::from_secs(1));
        let t = Instant::now();
        r.push(t, 1, 7, seg(2, 0, 1), b"a").unwrap();
        r.push(t + Duration::from_secs(2), 1, 5, seg(2, 0, 1), b"z")
            .unwrap();
        assert_eq!(r.pending(), 1, "expired");
        assert!(r
            .push(t + Duration::from_secs(2), 1, 5, seg(3, 1, 1), b"z")
            .is_err());
        assert_eq!(r.pending(), 0);
    }
}
