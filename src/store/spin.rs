//! The lock of a [`super::clock::ClockMap`] shard: a test-and-test-and-set
//! spin lock whose release is a plain store.
//!
//! Why not `parking_lot`'s mutex, which the shards had: a request takes a
//! shard lock three to five times (the storm detector's client entry and
//! request table, the limits, the auth guard), each for a few dozen
//! instructions. An uncontended `parking_lot` lock costs two locked
//! read-modify-writes, one to take it and one to release it, because the
//! release must learn whether a waiter is parked. Here the release is a
//! `store(Release)`, a plain `mov` on x86: one locked instruction per
//! operation instead of two. The per-client stages went from 174 to 154 ns
//! a request at a million clients (103 to 88 ns in cache,
//! `storm/all_per_client_stages`).
//!
//! What a waiter gives up is being parked. It is safe here because every
//! critical section is short and bounded: a hit is a probe, a new entry at
//! the cap evicts within two laps of one shard, a growth rehashes one
//! shard, and the sweep holds one shard at a time (a 64th of the table,
//! `ClockMap::retain_yielding`). A waiter spins on a plain load (no cache
//! line ping-pong) for a few hundred nanoseconds, then yields its core at
//! each check, so a holder that the kernel descheduled gets a CPU back
//! instead of competing with spinners: the same bound as a parked waiter,
//! without the futex on the fast path.

use std::sync::atomic::{AtomicBool, Ordering};

/// Checks of the lock word spent spinning before a waiter starts yielding.
const SPINS: u32 = 64;

/// The raw lock: `true` while held.
pub struct RawSpinLock(AtomicBool);

// SAFETY: `lock` returns only after swapping `false` → `true` with Acquire,
// so one holder at a time; `unlock` (called only by the holder, as
// `lock_api` guarantees) publishes the holder's writes with Release.
unsafe impl lock_api::RawMutex for RawSpinLock {
    #[allow(clippy::declare_interior_mutable_const)] // `lock_api`'s pattern for a lock's initial state
    const INIT: RawSpinLock = RawSpinLock(AtomicBool::new(false));
    /// A guard is not `Send`, as parking_lot's is not by default: a future
    /// that held one across an `.await` does not compile for
    /// `tokio::spawn`. (A task that waited with the lock held would leave
    /// any other task of its worker waiting for it for good, as with any
    /// blocking lock.)
    type GuardMarker = lock_api::GuardNoSend;

    #[inline]
    fn lock(&self) {
        if !self.0.swap(true, Ordering::Acquire) {
            return;
        }
        self.lock_contended();
    }

    #[inline]
    fn try_lock(&self) -> bool {
        !self.0.swap(true, Ordering::Acquire)
    }

    #[inline]
    unsafe fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }

    #[inline]
    fn is_locked(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl RawSpinLock {
    /// Waits for the holder: reads (shared, no write traffic) until the lock
    /// looks free, then tries to take it again.
    #[cold]
    fn lock_contended(&self) {
        let mut checks = 0u32;
        loop {
            while self.0.load(Ordering::Relaxed) {
                if checks < SPINS {
                    checks += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            if !self.0.swap(true, Ordering::Acquire) {
                return;
            }
        }
    }
}

pub type Mutex<T> = lock_api::Mutex<RawSpinLock, T>;
pub type MutexGuard<'a, T> = lock_api::MutexGuard<'a, RawSpinLock, T>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// Increments from several threads at once, each a read and a write
    /// under the lock: none is lost, which is what a lock is for.
    #[test]
    fn no_increment_is_lost_under_contention() {
        let (threads, each) = (4u64, 50_000u64);
        let counter = Arc::new(Mutex::new(0u64));
        std::thread::scope(|s| {
            for _ in 0..threads {
                let counter = counter.clone();
                s.spawn(move || {
                    for _ in 0..each {
                        let mut n = counter.lock();
                        // A read and a later write: a lost update shows.
                        let seen = *n;
                        std::hint::black_box(&seen);
                        *n = seen + 1;
                    }
                });
            }
        });
        assert_eq!(*counter.lock(), threads * each);
    }

    /// A waiter gets the lock once a holder that keeps it for a long time
    /// (descheduled, say) lets go, and not before.
    #[test]
    fn a_waiter_gets_the_lock_when_a_slow_holder_lets_go() {
        let lock = Arc::new(Mutex::new(0u32));
        let held = lock.lock();
        assert!(lock.try_lock().is_none(), "held");
        let waiter = {
            let lock = lock.clone();
            std::thread::spawn(move || *lock.lock() += 1)
        };
        // The waiter is past its spinning and yielding by now.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "the waiter waits while the lock is held");
        drop(held);
        waiter.join().expect("the waiter ends");
        assert_eq!(*lock.lock(), 1);
        assert!(!lock.is_locked(), "released");
    }
}
