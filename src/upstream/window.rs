//! A sliding window of counts: a ring of [`BUCKETS`] time buckets, each one
//! atomic word. The circuit breaker counts outcomes in it, the retry budget
//! deposits and withdrawals, the auth guard (`stack/auth_guard.rs`) responses
//! and 401s.
//!
//! Why this shape: memory is fixed (one `u64` per bucket, whatever the traffic),
//! adding is one compare-and-swap with no lock, and a count over the window is
//! a sum of [`BUCKETS`] words. Each word packs the bucket's tick (upper 32 bits)
//! with its count (lower 32 bits), so a bucket that is reused for a newer tick
//! is reset by the same CAS that adds to it: there is no separate "rotate" step
//! that could race with an add.
//!
//! Precision: the window slides by whole buckets, so a count covers between
//! `window - window / BUCKETS` and `window` of the past. Ticks are 32 bits and
//! wrap; a bucket exactly 2^32 ticks old would be read as current, which at the
//! smallest bucket of a 10 ms window takes 500 days of silence.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::nanos_since;

/// Buckets per window.
pub const BUCKETS: usize = 10;

/// Turns instants into bucket ticks for a window of a given length.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
    bucket_nanos: u64,
}

impl Clock {
    pub fn new(origin: Instant, window: Duration) -> Self {
        let bucket_nanos = (window.as_nanos() / BUCKETS as u128).clamp(1, u128::from(u64::MAX)) as u64;
        Clock { origin, bucket_nanos }
    }

    /// The tick `now` falls in; instants before the origin fall in tick 0.
    pub fn tick(&self, now: Instant) -> u32 {
        (nanos_since(self.origin, now) / self.bucket_nanos) as u32
    }
}

/// How far behind a bucket's tick an add may be and still count as late
/// (dropped) rather than as a bucket 2^32 ticks old come round again (reset):
/// 2^16 ticks, 65 s at the smallest bucket of a 10 ms window. Ticks wrap, so
/// "behind" is a guess either way; a thread is not descheduled that long,
/// and a bucket left alone for 2^32 - 2^16 ticks (50 days at 1 ms) drops
/// adds for at most 2^16 ticks before counting again.
const LATE_TICKS: u32 = 1 << 16;

/// One count over a sliding window.
#[derive(Debug, Default)]
pub struct Ring {
    slots: [AtomicU64; BUCKETS],
}

fn pack(tick: u32, count: u32) -> u64 {
    (u64::from(tick) << 32) | u64::from(count)
}

fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

impl Ring {
    /// Adds `n` in the bucket of `tick`, resetting the bucket if it held an
    /// older tick. A late add, whose bucket a newer tick has taken since (its
    /// time was read a lap or more before, by a thread that was descheduled
    /// or by the upstream that answered: `context::Exchange`), is dropped:
    /// it is out of every window still to be summed, and resetting the
    /// bucket would lose the newer counts.
    pub fn add(&self, tick: u32, n: u32) {
        let slot = &self.slots[tick as usize % BUCKETS];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
            let (t, c) = unpack(word);
            if t == tick {
                Some(pack(tick, c.saturating_add(n)))
            } else if c > 0 && t.wrapping_sub(tick) < LATE_TICKS {
                None
            } else {
                Some(pack(tick, n))
            }
        });
    }

    /// Takes back one that [`Ring::add`] put in the bucket of `tick`, if that
    /// bucket still holds `tick`.
    pub fn undo(&self, tick: u32) {
        let slot = &self.slots[tick as usize % BUCKETS];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
            let (t, c) = unpack(word);
            (t == tick && c > 0).then(|| pack(tick, c - 1))
        });
    }

    /// The count over the window that ends with the bucket of `tick`.
    pub fn sum(&self, tick: u32) -> u64 {
        self.slots
            .iter()
            .map(|slot| unpack(slot.load(Ordering::Acquire)))
            .filter(|&(t, _)| (tick.wrapping_sub(t) as usize) < BUCKETS)
            .map(|(_, c)| u64::from(c))
            .sum()
    }

    /// Forgets every count.
    pub fn clear(&self) {
        for slot in &self.slots {
            // Tick 0 with count 0 and "no bucket" are the same thing: an empty bucket.
            slot.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_slide_out_bucket_by_bucket() {
        let start = Instant::now();
        let clock = Clock::new(start, Duration::from_secs(1));
        let ring = Ring::default();
        ring.add(clock.tick(start), 3);
        ring.add(clock.tick(start + Duration::from_millis(450)), 2);
        assert_eq!(ring.sum(clock.tick(start + Duration::from_millis(999))), 5);
        // At 1s the first bucket (0..100ms) has left the window; the second has not.
        assert_eq!(ring.sum(clock.tick(start + Duration::from_millis(1000))), 2);
        assert_eq!(ring.sum(clock.tick(start + Duration::from_millis(1399))), 2);
        assert_eq!(ring.sum(clock.tick(start + Duration::from_millis(1400))), 0);
    }

    #[test]
    fn a_reused_bucket_starts_from_zero() {
        let start = Instant::now();
        let clock = Clock::new(start, Duration::from_secs(1));
        let ring = Ring::default();
        ring.add(clock.tick(start), 7);
        // Same slot, ten buckets later.
        let later = clock.tick(start + Duration::from_secs(1));
        ring.add(later, 1);
        assert_eq!(ring.sum(later), 1);
    }

    #[test]
    fn a_late_add_never_resets_a_newer_bucket() {
        let ring = Ring::default();
        ring.add(23, 4);
        // Tick 13 shares tick 23's slot, a lap earlier: out of the window, dropped.
        ring.add(13, 1);
        assert_eq!(ring.sum(23), 4);
        ring.add(3, 1);
        assert_eq!(ring.sum(23), 4);
        // A newer tick still takes the slot over.
        ring.add(33, 2);
        assert_eq!(ring.sum(33), 2);
        // So does any tick when the slot is empty, and a newer tick across the ticks' wrap.
        let empty = Ring::default();
        empty.add(u32::MAX - 5, 1);
        assert_eq!(empty.sum(u32::MAX - 5), 1);
        let wrapped = Ring::default();
        wrapped.add(u32::MAX - 3, 1);
        wrapped.add(2, 1); // six ticks later, the same slot
        assert_eq!(wrapped.sum(2), 1);
    }

    #[test]
    fn undo_takes_back_only_from_the_same_tick() {
        let ring = Ring::default();
        ring.add(4, 2);
        ring.undo(4);
        assert_eq!(ring.sum(4), 1);
        ring.undo(14); // the slot holds tick 4, not 14: nothing to undo
        assert_eq!(ring.sum(4), 1);
        ring.clear();
        assert_eq!(ring.sum(4), 0);
    }

    #[test]
    fn extreme_windows_do_not_panic() {
        let start = Instant::now();
        for window in [Duration::from_nanos(1), Duration::MAX] {
            let clock = Clock::new(start, window);
            let ring = Ring::default();
            let t = clock.tick(start + Duration::from_secs(3600));
            ring.add(t, u32::MAX);
            ring.add(t, 5);
            assert_eq!(ring.sum(t), u64::from(u32::MAX));
        }
    }
}
