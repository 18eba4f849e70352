//! The memory store: per-node GCRA state, bounded by `store.max_clients`.
//!
//! Why not governor's keyed store: it has no cap and no eviction, the very
//! bug behind the outage where per-client state grew 0.09 GB/min. This store is
//! small instead:
//!
//! - **Keys** are 64-bit hashes of (route, client key) under a per-process
//!   random seed, so a key costs 8 bytes whatever the client sent and cannot be
//!   aimed at one bucket. Two clients collide with probability ~n²/2⁶⁵
//!   (3·10⁻⁸ for a million clients): they would share a bucket.
//! - **Cap and eviction:** a [`ClockMap`]: 2^k shards (a Mutex each, so two
//!   threads rarely meet), CLOCK eviction past the cap (the least recently seen
//!   go first, approximately). A client evicted early only gets a full bucket
//!   back: the cap trades accuracy for bounded memory, never the other way round.
//! - **Idle expiry:** a client whose buckets are all full again holds no
//!   information; `sweep` drops it (the gateway runs it every few seconds).
//! - **Memory:** one slot is 48 bytes (key, 4 `tat`s, flags) plus the hash map's
//!   index entry; measured in `benches/store.rs` (see the README).

use std::hash::{BuildHasher, Hasher};

use tokio::time::Instant;

use super::clock::ClockMap;
use super::gcra::{self, Gcra, Outcome};

/// The most limits one route may have (the state of each lives inline).
pub const MAX_LIMITS: usize = 4;

/// The `tat` of each limit of one client on one route (0: full bucket).
pub type Tats = [u64; MAX_LIMITS];

/// Per-node GCRA state for every (route, client), capped at `max_clients`.
pub struct MemoryStore {
    map: ClockMap<Tats>,
    epoch: Instant,
    seed: foldhash::fast::RandomState,
}

impl MemoryStore {
    pub fn new(max_clients: usize) -> Self {
        MemoryStore {
            map: ClockMap::new(max_clients),
            epoch: Instant::now(),
            seed: foldhash::fast::RandomState::default(),
        }
    }

    /// The store's key for a client on a route.
    pub fn key(&self, route: &str, client: &str) -> u64 {
        let mut h = self.seed.build_hasher();
        h.write(route.as_bytes());
        h.write_u8(0xff);
        h.write(client.as_bytes());
        h.finish()
    }

    /// Nanoseconds since the store was created: the store's clock.
    pub fn ticks(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    /// Decides one request of `key` at `now` (ticks) against `limits` (at most
    /// [`MAX_LIMITS`]) and records it when allowed.
    pub fn check(&self, key: u64, limits: &[Gcra], now: u64) -> Outcome {
        let n = limits.len().min(MAX_LIMITS);
        self.map.with(key, |tats| gcra::decide(&limits[..n], &mut tats[..n], now))
    }

    /// The state of `key`, if tracked.
    pub fn peek(&self, key: u64) -> Option<Tats> {
        self.map.peek(key)
    }

    /// Forgets `key`; true when it was tracked.
    pub fn remove(&self, key: u64) -> bool {
        self.map.remove(key)
    }

    /// Drops every client whose buckets are full again; returns how many.
    pub fn sweep(&self, now: u64) -> usize {
        self.map.retain(|tats| tats.iter().any(|&t| t > now))
    }

    /// Tracked (route, client) states.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The effective cap (`max_clients` rounded down to a multiple of the shard count).
    pub fn capacity(&self) -> usize {
        self.map.capacity()
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use super::*;
    use crate::config::units::Rate;
    use crate::config::Limit;

    fn limit(count: u32, burst: u32) -> Gcra {
        Gcra::new(
            &Limit {
                rate: Rate { count: NonZeroU32::new(count).unwrap(), per: Duration::from_secs(1) },
                burst: NonZeroU32::new(burst).unwrap(),
            },
            Duration::from_nanos(1),
        )
    }

    #[test]
    fn clients_have_their_own_buckets() {
        let s = MemoryStore::new(100);
        let l = [limit(1, 2)];
        let (a, b) = (s.key("r", "a"), s.key("r", "b"));
        assert!(s.check(a, &l, 1).allowed);
        assert!(s.check(a, &l, 1).allowed);
        assert!(!s.check(a, &l, 1).allowed);
        assert!(s.check(b, &l, 1).allowed, "b is not limited by a");
        assert_ne!(s.key("r1", "a"), s.key("r2", "a"), "routes keep separate state");
    }

    #[test]
    fn the_cap_holds_and_the_least_recently_seen_go_first() {
        let s = MemoryStore::new(1000);
        let l = [limit(1, 1)];
        let keep = s.key("r", "regular");
        for i in 0..100_000u64 {
            s.check(s.key("r", &i.to_string()), &l, 1);
            if i % 100 == 0 {
                s.check(keep, &l, 1);
            }
        }
        assert!(s.len() <= s.capacity(), "{} > {}", s.len(), s.capacity());
        assert!(s.len() >= s.capacity() * 9 / 10, "tracked {} of {}", s.len(), s.capacity());
        assert!(s.peek(keep).is_some(), "a client seen often survives");
        assert!(s.peek(s.key("r", "0")).is_none(), "the first one-off client was evicted");
    }

    #[test]
    fn full_buckets_are_swept() {
        let s = MemoryStore::new(100);
        let l = [limit(10, 10)]; // 100ms interval
        let k = s.key("r", "c");
        s.check(k, &l, 1_000);
        assert_eq!(s.sweep(1_000), 0, "not full yet");
        assert_eq!(s.sweep(1_000 + 100_000_000), 1);
        assert!(s.is_empty());
    }

    #[test]
    fn remove_resets_a_client() {
        let s = MemoryStore::new(10);
        let l = [limit(1, 1)];
        let k = s.key("r", "c");
        assert!(s.check(k, &l, 5).allowed);
        assert!(!s.check(k, &l, 5).allowed);
        assert!(s.remove(k));
        assert!(!s.remove(k));
        assert!(s.check(k, &l, 5).allowed);
    }
}
