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
//! - **Cap and eviction:** 2^k shards (Mutex each, so two threads rarely meet),
//!   each an exact LRU over a slab (a hash map to slot indices, and a doubly
//!   linked list through the slots). Past the cap, the least recently seen client
//!   goes first. A client evicted early only gets a full bucket back: the cap
//!   trades accuracy for bounded memory, never the other way round.
//! - **Idle expiry:** a client whose buckets are all full again holds no
//!   information; `sweep` drops it (the gateway runs it every few seconds).
//! - **Memory:** one slot is 48 bytes (key, 4 `tat`s, 2 links) plus ~17 bytes
//!   of hash map; measured in `benches/store.rs` (see the README).

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Mutex;

use tokio::time::Instant;

use super::gcra::{self, Gcra, Outcome};

/// The most limits one route may have (the state of each lives inline).
pub const MAX_LIMITS: usize = 4;

const NIL: u32 = u32::MAX;

/// The `tat` of each limit of one client on one route (0: full bucket).
pub type Tats = [u64; MAX_LIMITS];

#[derive(Debug, Clone, Copy)]
struct Slot {
    key: u64,
    tats: Tats,
    prev: u32,
    next: u32,
}

/// One shard: an exact LRU list over a slab.
#[derive(Debug)]
struct Shard {
    index: HashMap<u64, u32, BuildHasherDefault<IdentityHasher>>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Most recently seen.
    head: u32,
    /// Least recently seen: evicted first.
    tail: u32,
    cap: usize,
}

impl Shard {
    fn new(cap: usize) -> Self {
        Shard { index: HashMap::default(), slots: Vec::new(), free: Vec::new(), head: NIL, tail: NIL, cap }
    }

    fn unlink(&mut self, i: u32) {
        let Slot { prev, next, .. } = self.slots[i as usize];
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        self.slots[i as usize].prev = NIL;
        self.slots[i as usize].next = self.head;
        if self.head != NIL {
            self.slots[self.head as usize].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }

    /// The slot of `key`, marked most recently seen; inserted (evicting the least
    /// recently seen past the cap) when absent.
    fn touch(&mut self, key: u64) -> u32 {
        if let Some(&i) = self.index.get(&key) {
            if self.head != i {
                self.unlink(i);
                self.push_front(i);
            }
            return i;
        }
        if self.index.len() >= self.cap && self.tail != NIL {
            let victim = self.tail;
            self.remove_slot(victim);
        }
        let slot = Slot { key, tats: [0; MAX_LIMITS], prev: NIL, next: NIL };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(key, i);
        self.push_front(i);
        i
    }

    fn remove_slot(&mut self, i: u32) {
        self.unlink(i);
        self.index.remove(&self.slots[i as usize].key);
        self.free.push(i);
    }

    fn remove(&mut self, key: u64) -> bool {
        match self.index.get(&key) {
            Some(&i) => {
                self.remove_slot(i);
                true
            }
            None => false,
        }
    }

    /// Drops every client whose buckets are all full at `now`.
    fn sweep(&mut self, now: u64) -> usize {
        let idle: Vec<u32> = self
            .index
            .values()
            .copied()
            .filter(|&i| self.slots[i as usize].tats.iter().all(|&t| t <= now))
            .collect();
        for &i in &idle {
            self.remove_slot(i);
        }
        // Give memory back after a wave of clients left.
        if self.index.is_empty() {
            *self = Shard::new(self.cap);
        }
        idle.len()
    }
}

/// The keys are already uniform 64-bit hashes: hashing them again is waste.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Per-node GCRA state for every (route, client), capped at `max_clients`.
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    mask: u64,
    max_clients: usize,
    epoch: Instant,
    seed: foldhash::fast::RandomState,
}

impl MemoryStore {
    pub fn new(max_clients: usize) -> Self {
        let max_clients = max_clients.max(1);
        // About 1k clients per shard, 1 to 64 shards.
        let shards = (max_clients / 1024).clamp(1, 64).next_power_of_two().min(64);
        let per_shard = (max_clients / shards).max(1);
        MemoryStore {
            shards: (0..shards).map(|_| Mutex::new(Shard::new(per_shard))).collect(),
            mask: shards as u64 - 1,
            max_clients: per_shard * shards,
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

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Shard> {
        // The high bits pick the shard; the map uses the whole key.
        let i = ((key >> 40) & self.mask) as usize;
        self.shards[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Decides one request of `key` at `now` (ticks) against `limits` (at most
    /// [`MAX_LIMITS`]) and records it when allowed.
    pub fn check(&self, key: u64, limits: &[Gcra], now: u64) -> Outcome {
        let n = limits.len().min(MAX_LIMITS);
        let mut shard = self.shard(key);
        let i = shard.touch(key) as usize;
        let slot = &mut shard.slots[i];
        gcra::decide(&limits[..n], &mut slot.tats[..n], now)
    }

    /// The state of `key`, if tracked.
    pub fn peek(&self, key: u64) -> Option<Tats> {
        let shard = self.shard(key);
        shard.index.get(&key).map(|&i| shard.slots[i as usize].tats)
    }

    /// Forgets `key`; true when it was tracked.
    pub fn remove(&self, key: u64) -> bool {
        self.shard(key).remove(key)
    }

    /// Drops every client whose buckets are full again; returns how many.
    pub fn sweep(&self, now: u64) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).sweep(now)).sum()
    }

    /// Tracked (route, client) states.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).index.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The effective cap (`max_clients` rounded down to a multiple of the shard count).
    pub fn capacity(&self) -> usize {
        self.max_clients
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
