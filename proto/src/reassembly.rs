//! Reassembly of sleeve messages carried in several segments (see
//! [`crate::sleeve`]).
//!
//! Bounded in every direction, and fair between neighbours. A message is
//! keyed by the link it arrived on (a number the caller gives each
//! neighbour connection, so a restarted neighbour's counters never meet its
//! old ones) and an id within the link (the caller's: the key id and the
//! counter). Each link holds at most `per_link` partial messages: a new one
//! beyond that drops the oldest *of that link*, so one noisy neighbour
//! (sending first segments it never completes) only ever evicts its own.
//! All links together hold at most `total`; when that is reached, a new
//! message drops the oldest partial message of the link that holds the
//! most, never of a link holding fewer. Each message is at most
//! `count × stride` bytes where the segment header was checked against
//! [`crate::sleeve::MAX_MESSAGE`] (`count × stride ≤ MAX_MESSAGE + stride`,
//! so at most [`MAX_SLOT_BYTES`]), and dropped after `timeout` without
//! completing. Worst-case memory: `total × MAX_SLOT_BYTES` (128 slots, the
//! daemon's, ≈ 16.8 MB), whatever the number of links; with fewer than
//! `total / per_link` busy links, `links × per_link × MAX_SLOT_BYTES`.
//!
//! A duplicate segment is ignored; a segment that disagrees with its
//! message's count or stride drops the message (an error). Messages given
//! up (evicted or timed out) are counted ([`Reassembler::take_dropped`]).
//! Buffers of completed messages can be handed back
//! ([`Reassembler::recycle`]), and the segment bitmaps of finished slots
//! are kept, so that steady traffic allocates nothing.
//! Time comes in as an argument.

use crate::sleeve::Segment;
use crate::WireError;
use std::time::{Duration, Instant};

struct Slot {
    link: u64,
    id: u64,
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
    per_link: usize,
    total: usize,
    timeout: Duration,
    pool: Vec<Vec<u8>>,
    /// Segment bitmaps of finished slots, for reuse.
    seen_pool: Vec<Vec<u64>>,
    dropped: u64,
}

/// Buffers kept for reuse.
const POOL: usize = 16;

/// The most bytes one partial message holds: a segment header passes
/// [`crate::sleeve::parse_datagram`] only with `count × stride ≤
/// MAX_MESSAGE + stride`, and a stride is a u16.
pub const MAX_SLOT_BYTES: usize = crate::sleeve::MAX_MESSAGE + u16::MAX as usize;

impl Reassembler {
    /// A reassembler holding at most `per_link` partial messages of one
    /// link and `total` in all, each for at most `timeout`.
    pub fn new(per_link: usize, total: usize, timeout: Duration) -> Reassembler {
        Reassembler {
            slots: Vec::new(),
            per_link: per_link.max(1),
            total: total.max(1),
            timeout,
            pool: Vec::new(),
            seen_pool: Vec::new(),
            dropped: 0,
        }
    }

    /// Partial messages held.
    pub fn pending(&self) -> usize {
        self.slots.len()
    }

    /// Partial messages held for one link.
    pub fn pending_on(&self, link: u64) -> usize {
        self.slots.iter().filter(|s| s.link == link).count()
    }

    /// How many partial messages were given up (evicted to make room, or
    /// timed out) since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Drop the oldest partial message of `link`, or of the link holding
    /// the most when `link` is `None`.
    fn evict(&mut self, link: Option<u64>) {
        let link = match link {
            Some(l) => l,
            None => {
                let mut counts: std::collections::HashMap<u64, usize> = Default::default();
                for s in &self.slots {
                    *counts.entry(s.link).or_insert(0) += 1;
                }
                // The most slots; among equals, the one with the oldest.
                let Some(l) = self
                    .slots
                    .iter()
                    .max_by_key(|s| {
                        (
                            counts.get(&s.link).copied().unwrap_or(0),
                            std::cmp::Reverse(s.started),
                        )
                    })
                    .map(|s| s.link)
                else {
                    return;
                };
                l
            }
        };
        if let Some((j, _)) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.link == link)
            .min_by_key(|(_, s)| s.started)
        {
            let s = self.slots.swap_remove(j);
            self.retire_seen(s.seen);
            self.recycle(s.buf);
            self.dropped += 1;
        }
    }

    /// Forget the partial messages of one link (its neighbour went away).
    pub fn forget(&mut self, link: u64) {
        self.slots.retain(|s| s.link != link);
    }

    /// Keep a finished slot's segment bitmap for the next slot.
    fn retire_seen(&mut self, seen: Vec<u64>) {
        if self.seen_pool.len() < POOL {
            self.seen_pool.push(seen);
        }
    }

    /// Give back the buffer of a completed message.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < POOL {
            self.pool.push(buf);
        }
    }

    /// Add one segment (already checked by
    /// [`crate::sleeve::parse_datagram`]) of message `id` of `link`;
    /// returns the whole message once every segment is in. A
    /// single-segment message is returned at once.
    pub fn push(
        &mut self,
        now: Instant,
        link: u64,
        id: u64,
        seg: Segment,
        data: &[u8],
    ) -> Result<Option<Vec<u8>>, WireError> {
        let timeout = self.timeout;
        let mut i = 0;
        while i < self.slots.len() {
            if now.saturating_duration_since(self.slots[i].started) < timeout {
                i += 1;
                continue;
            }
            let s = self.slots.swap_remove(i);
            self.retire_seen(s.seen);
            self.recycle(s.buf);
            self.dropped += 1;
        }
        if seg.count <= 1 {
            let mut b = self.pool.pop().unwrap_or_default();
            b.clear();
            b.extend_from_slice(data);
            return Ok(Some(b));
        }
        let i = match self.slots.iter().position(|s| s.link == link && s.id == id) {
            Some(i) => {
                let s = &self.slots[i];
                if s.count != seg.count || s.stride != seg.stride {
                    let s = self.slots.swap_remove(i);
                    self.retire_seen(s.seen);
                    self.recycle(s.buf);
                    return Err(WireError::Invalid("segment disagrees with its message"));
                }
                i
            }
            None => {
                if self.pending_on(link) >= self.per_link {
                    self.evict(Some(link));
                } else if self.slots.len() >= self.total {
                    self.evict(None);
                }
                // Recycled buffers keep their length and old bytes: every
                // byte up to the message's end is written by its segments
                // before it is handed out, so nothing needs zeroing.
                let mut seen = self.seen_pool.pop().unwrap_or_default();
                seen.clear();
                seen.resize((seg.count as usize).div_ceil(64), 0);
                let mut buf = self.pool.pop().unwrap_or_default();
                let need = seg.count as usize * seg.stride as usize;
                if buf.len() < need {
                    buf.resize(need, 0);
                }
                self.slots.push(Slot {
                    link,
                    id,
                    count: seg.count,
                    stride: seg.stride,
                    received: 0,
                    len: None,
                    seen,
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
        self.retire_seen(s.seen);
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
        let mut r = Reassembler::new(4, 4, Duration::from_secs(1));
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
        let mut r = Reassembler::new(2, 4, Duration::from_secs(1));
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
        // (1, 7) was link 1's oldest and was dropped to make room.
        assert_eq!(r.take_dropped(), 1);
        assert_eq!(r.push(t, 1, 7, seg(2, 1, 1), b"A").unwrap(), None);
        r.forget(1);
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn timeout_and_disagreement() {
        let mut r = Reassembler::new(4, 4, Duration::from_secs(1));
        let t = Instant::now();
        r.push(t, 1, 7, seg(2, 0, 1), b"a").unwrap();
        r.push(t + Duration::from_secs(2), 1, 5, seg(2, 0, 1), b"z")
            .unwrap();
        assert_eq!(r.pending(), 1, "expired");
        assert_eq!(r.take_dropped(), 1);
        assert_eq!(r.take_dropped(), 0);
        assert!(r
            .push(t + Duration::from_secs(2), 1, 5, seg(3, 1, 1), b"z")
            .is_err());
        assert_eq!(r.pending(), 0);
    }

    /// One link flooding first segments of ever new messages evicts only
    /// its own: another link's message, started before and after the
    /// flood, still completes.
    #[test]
    fn a_noisy_link_does_not_evict_another() {
        let mut r = Reassembler::new(16, 128, Duration::from_secs(2));
        let t = Instant::now();
        assert_eq!(r.push(t, 2, 1, seg(3, 0, 2), b"ab").unwrap(), None);
        for i in 0..10_000u64 {
            let at = t + Duration::from_micros(i);
            assert_eq!(r.push(at, 1, i, seg(4, 0, 2), b"xx").unwrap(), None);
            assert!(r.pending_on(1) <= 16);
        }
        assert_eq!(r.pending_on(1), 16);
        assert_eq!(r.take_dropped(), 10_000 - 16);
        let later = t + Duration::from_millis(20);
        assert_eq!(r.push(later, 2, 1, seg(3, 2, 2), b"e").unwrap(), None);
        assert_eq!(
            r.push(later, 2, 1, seg(3, 1, 2), b"cd").unwrap(),
            Some(b"abcde".to_vec())
        );
        assert_eq!(r.take_dropped(), 0, "link 2 lost nothing");
    }

    /// Many links each within their quota: the global bound drops from the
    /// link holding the most, never from one holding fewer.
    #[test]
    fn the_global_bound_takes_from_the_largest_link() {
        let mut r = Reassembler::new(4, 6, Duration::from_secs(2));
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        r.push(ms(0), 9, 1, seg(2, 0, 1), b"a").unwrap();
        for i in 0..4 {
            r.push(ms(1 + i), 1, i, seg(2, 0, 1), b"x").unwrap();
        }
        r.push(ms(5), 2, 0, seg(2, 0, 1), b"y").unwrap();
        assert_eq!(r.pending(), 6);
        // Link 3's first message: link 1 (4 held) gives up its oldest.
        r.push(ms(6), 3, 0, seg(2, 0, 1), b"z").unwrap();
        assert_eq!((r.pending(), r.pending_on(1), r.pending_on(9)), (6, 3, 1));
        assert_eq!(r.take_dropped(), 1);
        assert_eq!(
            r.push(ms(7), 9, 1, seg(2, 1, 1), b"b").unwrap(),
            Some(b"ab".to_vec())
        );
    }

    proptest::proptest! {
        /// Whatever segments arrive, from however many links, the bounds
        /// hold after every step; what completes is what was sent.
        #[test]
        fn bounds_hold(
            steps in proptest::collection::vec((0u64..6, 0u64..40, 1u16..5, 0u16..5, 0u64..3000), 1..400),
        ) {
            let (per_link, total) = (3, 8);
            let mut r = Reassembler::new(per_link, total, Duration::from_secs(1));
            let t = Instant::now();
            for (link, id, count, index, ms) in steps {
                let index = index % count;
                let data = [id as u8; 4];
                let len = if index + 1 == count { 1 } else { 4 };
                let got = r.push(t + Duration::from_millis(ms), link, id, seg(count, index, 4), &data[..len]);
                if let Ok(Some(m)) = got {
                    proptest::prop_assert!(m.iter().all(|b| *b == id as u8));
                }
                proptest::prop_assert!(r.pending() <= total);
                for l in 0..6 {
                    proptest::prop_assert!(r.pending_on(l) <= per_link);
                }
            }
        }
    }
}
