//! A sharded map with a hard cap and CLOCK eviction: the bounded home of every
//! piece of per-client state in levee (limiter buckets, storm counters).
//!
//! - **Keys** are 64-bit hashes (see `MemoryStore::key`), so an entry costs its
//!   value plus 8 bytes whatever the client sent.
//! - **Cap and eviction:** 2^k shards, each an open-addressing table at most
//!   3/4 full while it grows, and sized to hold its cap at 5/8 (a table need
//!   not be a power of two: see `Shard::home`). Past the cap, CLOCK (second chance) picks the victim: a hand
//!   sweeps the slots, sparing once each slot touched since its last pass. This
//!   is the classic approximation of "least recently seen goes first" (operating
//!   systems' page replacement): a client seen since the hand last passed
//!   survives, a one-off client goes. Unlike an exact LRU list, a hit writes one
//!   bit in its own slot instead of relinking two neighbours; key, value and bit
//!   share a slot, so a decision at a million clients costs about one cache miss.
//! - **Idle expiry:** `retain` drops entries that hold no information any more
//!   (a full bucket); the gateway runs it every few seconds.
//! - **Prefetch:** a request looks its client up in more than one table (the
//!   limiter's, its route's client table); at a million clients each lookup
//!   is a cache miss, and each waits for the one before (a shard lock is a
//!   full fence). [`ClockMap::prefetch`] asks for a key's home slot without
//!   the lock, so a request can start every load when it learns who its
//!   client is (`stack::warm`) and pay for about one.

use super::spin::{Mutex, MutexGuard};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// Keys are never 0: 0 marks an empty slot.
const EMPTY: u64 = 0;
/// The top bit of a slot's tag: touched since the hand last passed. Kept in
/// the key's word (keys are hashes cut to 63 bits) so that a slot is its key
/// and its value, with no padded flag word beside them.
const REFERENCED: u64 = 1 << 63;

/// A key as the map stores it: 63 bits, never 0.
fn norm(key: u64) -> u64 {
    (key & !REFERENCED).max(1)
}

#[derive(Debug, Clone, Copy)]
struct Slot<V> {
    /// The key, and [`REFERENCED`]; [`EMPTY`] for a free slot.
    tag: u64,
    value: V,
}

impl<V> Slot<V> {
    fn key(&self) -> u64 {
        self.tag & !REFERENCED
    }

    fn referenced(&self) -> bool {
        self.tag & REFERENCED != 0
    }

    fn set_referenced(&mut self, on: bool) {
        self.tag = if on { self.tag | REFERENCED } else { self.key() };
    }
}

/// The home slot of `key` in a table of `size` slots: its high bits scaled to
/// the size (Lemire's multiply-shift), so the table need not be a power of
/// two: a full shard sits at 5/8 load, where power-of-two sizes left a million
/// clients in tables 48% full (135 → 90 bytes per limiter client).
fn home(key: u64, size: usize) -> usize {
    // Mixed first (keys are hashes, but a test's or a caller's need not be),
    // then scaled by 2^64.
    let mixed = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(mixed) * size as u128) >> 64) as usize
}

/// Asks the CPU to start loading the cache lines of `[at, at + len)`.
#[inline(always)]
fn prefetch_bytes(at: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let last = at.wrapping_add(len.saturating_sub(1));
        // SAFETY: a prefetch is a hint. It reads nothing the program can
        // observe and never faults, whatever the address, so a stale or
        // out-of-bounds one (a table resized meanwhile) is harmless. The
        // intrinsic is `unsafe` only for its `sse` target feature, which every
        // x86_64 CPU has.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(at.cast());
            _mm_prefetch::<_MM_HINT_T0>(last.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, len);
}

/// One shard: an open-addressing table (linear probing, backward-shift
/// deletion) whose slots hold key and value together, so a lookup costs one
/// cache miss, not two; the CLOCK hand walks the same slots.
#[derive(Debug)]
struct Shard<V> {
    slots: Vec<Slot<V>>,
    len: usize,
    hand: usize,
    cap: usize,
}

impl<V: Copy + Default> Shard<V> {
    fn new(cap: usize) -> Self {
        Shard { slots: Vec::new(), len: 0, hand: 0, cap }
    }

    fn home(&self, key: u64) -> usize {
        home(key, self.slots.len())
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() {
            0
        } else {
            i + 1
        }
    }

    /// The position of `key`, or of the empty slot where it would go.
    fn probe(&self, key: u64) -> (usize, bool) {
        let mut i = self.home(key);
        loop {
            match self.slots[i].tag {
                EMPTY => return (i, false),
                tag if tag & !REFERENCED == key => return (i, true),
                _ => i = self.next(i),
            }
        }
    }

    fn find(&self, key: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        match self.probe(key) {
            (i, true) => Some(i),
            _ => None,
        }
    }

    /// Grows the table so that it stays at most 3/4 full: doubling, up to
    /// the size that holds the cap at 5/8. (At 2/3, a new client at the cap,
    /// the attacker's path, cost twice as much: linear probing's clusters
    /// grow fast past that.)
    fn reserve_one(&mut self) {
        if (self.len + 1) * 4 <= self.slots.len() * 3 {
            return;
        }
        let full = (self.cap * 8).div_ceil(5).max(16);
        let size = (self.slots.len() * 2).clamp(16, full.max(self.slots.len() + 1));
        let old = std::mem::replace(&mut self.slots, vec![Slot { tag: EMPTY, value: V::default() }; size]);
        self.hand = 0;
        for slot in old.into_iter().filter(|s| s.tag != EMPTY) {
            let (i, _) = self.probe(slot.key());
            self.slots[i] = slot;
        }
    }

    /// The slot of `key`, marked referenced; created with `V::default()` when
    /// absent (evicting one entry when the shard is full). A new slot starts
    /// unreferenced: a client seen once goes at the hand's next pass, and a scan
    /// of one-off clients costs O(1) per eviction instead of a lap of the ring.
    fn touch(&mut self, key: u64) -> &mut Slot<V> {
        if let Some(i) = self.find(key) {
            self.slots[i].set_referenced(true);
            return &mut self.slots[i];
        }
        while self.len >= self.cap && self.len > 0 {
            self.evict();
        }
        self.reserve_one();
        let (i, _) = self.probe(key);
        self.slots[i] = Slot { tag: key, value: V::default() };
        self.len += 1;
        &mut self.slots[i]
    }

    /// Second chance: clear referenced bits until an unreferenced slot comes
    /// round; evict it. Ends within two passes.
    fn evict(&mut self) {
        let n = self.slots.len();
        for _ in 0..2 * n + 1 {
            self.hand = if self.hand + 1 >= n { 0 } else { self.hand + 1 };
            let slot = &mut self.slots[self.hand];
            if slot.tag == EMPTY {
                continue;
            }
            if slot.referenced() {
                slot.set_referenced(false);
            } else {
                self.remove_at(self.hand);
                return;
            }
        }
    }

    /// Backward-shift deletion: later entries of the probe run move up so that
    /// lookups never need tombstones.
    fn remove_at(&mut self, mut hole: usize) {
        let mut j = hole;
        loop {
            j = self.next(j);
            let key = self.slots[j].key();
            if self.slots[j].tag == EMPTY {
                break;
            }
            let home = self.home(key);
            // Move j into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole].tag = EMPTY;
        self.len -= 1;
    }

    /// Sets the cap; past it, entries go (CLOCK order), and a table much
    /// larger than what it then holds is rebuilt smaller.
    fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(1);
        while self.len > self.cap {
            self.evict();
        }
        self.shrink_if_sparse();
    }

    /// A table four times larger than what it holds is rebuilt smaller, so
    /// memory goes back after a burst or a shrunk share.
    fn shrink_if_sparse(&mut self) {
        if self.slots.len() > 16 && self.len * 4 < self.slots.len() {
            let all = self.slots.iter().filter(|s| s.tag != EMPTY).copied().collect();
            self.rebuild(all);
        }
    }

    fn retain(&mut self, keep: &impl Fn(&V) -> bool) -> usize {
        let before = self.len;
        // Walk from just after an empty slot: no probe run crosses the walk's
        // start, so a backward shift only ever moves an entry the walk has not
        // reached into the hole, and `keep` is asked once per entry (the storm
        // sweep counts in it). Deleting in place costs a removal, not a
        // rebuild that re-probes every entry kept (3% of a refusal's
        // instructions when a sweep removed a few entries each second).
        let Some(start) = self.slots.iter().position(|s| s.tag == EMPTY) else {
            return 0; // an empty table (a table is never full)
        };
        let mut i = self.next(start);
        let mut steps = 1;
        while steps < self.slots.len() {
            if self.slots[i].tag != EMPTY && !keep(&self.slots[i].value) {
                // Slot `i` now holds the next entry of its run, or nothing.
                self.remove_at(i);
                continue;
            }
            i = self.next(i);
            steps += 1;
        }
        self.shrink_if_sparse();
        before - self.len
    }

    /// A fresh table for the cap, holding `entries`.
    fn rebuild(&mut self, entries: Vec<Slot<V>>) {
        *self = Shard::new(self.cap);
        for slot in entries {
            self.reserve_one();
            let (i, _) = self.probe(slot.key());
            self.slots[i] = slot;
            self.len += 1;
        }
    }
}

/// A shard, and where its slots are for [`ClockMap::prefetch`] (which reads
/// them without the lock: a hint may be stale, never unsafe).
struct Cell<V> {
    shard: Mutex<Shard<V>>,
    slots_at: AtomicPtr<Slot<V>>,
    slots_len: AtomicUsize,
}

impl<V> Cell<V> {
    fn lock(&self) -> MutexGuard<'_, Shard<V>> {
        self.shard.lock()
    }

    /// Publishes where `shard` (this cell's, locked) keeps its slots, after
    /// an operation that may have moved them: one compare when they did not.
    fn publish(&self, shard: &mut Shard<V>) {
        let (at, len) = (shard.slots.as_mut_ptr(), shard.slots.len());
        if self.slots_at.load(Ordering::Relaxed) != at || self.slots_len.load(Ordering::Relaxed) != len {
            self.slots_at.store(at, Ordering::Relaxed);
            self.slots_len.store(len, Ordering::Relaxed);
        }
    }
}

/// A map from 64-bit keys to `V`, never holding more than `capacity()` entries.
pub struct ClockMap<V> {
    shards: Box<[Cell<V>]>,
    mask: u64,
    cap: AtomicUsize,
}

impl<V: Copy + Default> ClockMap<V> {
    pub fn new(max_entries: usize) -> Self {
        let max_entries = max_entries.max(1);
        // About a thousand entries per shard, 1 to 64 shards.
        let shards = (max_entries / 1024).clamp(1, 64).next_power_of_two().min(64);
        let per_shard = (max_entries / shards).max(1);
        ClockMap {
            shards: (0..shards)
                .map(|_| Cell {
                    shard: Mutex::new(Shard::new(per_shard)),
                    slots_at: AtomicPtr::new(std::ptr::null_mut()),
                    slots_len: AtomicUsize::new(0),
                })
                .collect(),
            mask: shards as u64 - 1,
            cap: AtomicUsize::new(per_shard * shards),
        }
    }

    /// Changes the cap (a reload re-splits the node's budget, see
    /// [`super::budget`]); entries past the new cap are evicted now.
    pub fn set_capacity(&self, max_entries: usize) {
        let shards = self.shards.len();
        let per_shard = (max_entries / shards).max(1);
        for cell in self.shards.iter() {
            let mut shard = cell.lock();
            shard.set_cap(per_shard);
            cell.publish(&mut shard);
        }
        self.cap.store(per_shard * shards, Ordering::Relaxed);
    }

    fn cell(&self, key: u64) -> &Cell<V> {
        // The high bits pick the shard; the map uses the whole key.
        &self.shards[((key >> 40) & self.mask) as usize]
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, Shard<V>> {
        self.cell(key).lock()
    }

    /// Runs `f` on the value of `key` (created as `V::default()` when absent)
    /// under the shard's lock, marking it recently seen.
    pub fn with<R>(&self, key: u64, f: impl FnOnce(&mut V) -> R) -> R {
        let key = norm(key);
        let cell = self.cell(key);
        let mut shard = cell.lock();
        let out = f(&mut shard.touch(key).value);
        cell.publish(&mut shard);
        out
    }

    /// Starts loading the home slot of `key` into the cache, without the
    /// lock, so that a lookup of it soon after finds it there. A hint: the
    /// slot may have moved since (then the lookup pays its miss as usual).
    pub fn prefetch(&self, key: u64) {
        let key = norm(key);
        let cell = self.cell(key);
        let len = cell.slots_len.load(Ordering::Relaxed);
        if len > 0 {
            let at = cell.slots_at.load(Ordering::Relaxed).wrapping_add(home(key, len));
            prefetch_bytes(at.cast(), std::mem::size_of::<Slot<V>>());
        }
    }

    /// Runs `f` on the value of `key` if it is present (an absent key stays
    /// absent), under the shard's lock; removes the entry when `f` returns
    /// false (it holds nothing worth a slot any more).
    pub fn update_or_remove(&self, key: u64, f: impl FnOnce(&mut V) -> bool) {
        let key = norm(key);
        let mut shard = self.shard(key);
        if let Some(i) = shard.find(key) {
            if !f(&mut shard.slots[i].value) {
                shard.remove_at(i);
            }
        }
    }

    /// The value of `key`, if present; does not count as seeing it.
    pub fn peek(&self, key: u64) -> Option<V> {
        let key = norm(key);
        let shard = self.shard(key);
        shard.find(key).map(|i| shard.slots[i].value)
    }

    /// Removes `key`; true when it was present.
    pub fn remove(&self, key: u64) -> bool {
        let key = norm(key);
        let mut shard = self.shard(key);
        match shard.find(key) {
            Some(i) => {
                shard.remove_at(i);
                true
            }
            None => false,
        }
    }

    /// Keeps only the entries for which `keep` is true; returns how many went.
    pub fn retain(&self, keep: impl Fn(&V) -> bool) -> usize {
        (0..self.shards.len()).map(|shard| self.retain_shard(shard, &keep)).sum()
    }

    /// [`ClockMap::retain`] a shard at a time, yielding to the runtime after
    /// each: a background sweep of a full table (a million entries) must not
    /// hold up the requests of the worker it runs on, which on a one-worker
    /// runtime are all of them. The longest stall is one shard's pass, at
    /// most a 64th of the table.
    pub async fn retain_yielding(&self, keep: impl Fn(&V) -> bool) -> usize {
        let mut gone = 0;
        for shard in 0..self.shards.len() {
            gone += self.retain_shard(shard, &keep);
            tokio::task::yield_now().await;
        }
        gone
    }

    fn retain_shard(&self, shard: usize, keep: &impl Fn(&V) -> bool) -> usize {
        self.shards.get(shard).map_or(0, |cell| {
            let mut shard = cell.lock();
            let gone = shard.retain(keep);
            cell.publish(&mut shard);
            gone
        })
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|cell| cell.lock().len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the tables hold (allocated slots, used or not), for the budget's
    /// measurement: what one tracked entry costs, table slack included.
    pub fn bytes(&self) -> usize {
        let slots: usize = self.shards.iter().map(|cell| cell.lock().slots.len()).sum();
        slots * std::mem::size_of::<Slot<V>>()
    }

    /// The hard cap (the requested one, rounded down to a multiple of the shard count).
    pub fn capacity(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_yielding_sweep_lets_the_worker_serve_between_shards() {
        let m: ClockMap<u64> = ClockMap::new(64 * 1024);
        assert_eq!(m.shards.len(), 64);
        for k in 0..10_000u64 {
            m.with(k.wrapping_mul(0x9E37_79B9_7F4A_7C15), |v| *v = k);
        }
        // Another task on the same one-thread runtime, counting its turns.
        let turns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = turns.clone();
        let other = tokio::spawn(async move {
            loop {
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        });
        tokio::task::yield_now().await;
        let before = turns.load(Ordering::Relaxed);
        let gone = m.retain_yielding(|v| v % 2 == 0).await;
        let during = turns.load(Ordering::Relaxed) - before;
        other.abort();
        assert_eq!(gone, 5_000);
        assert_eq!(m.len(), 5_000);
        assert!(during >= 63, "the other task ran {during} times during a 64-shard sweep");
    }

    #[test]
    fn the_cap_holds_and_recently_seen_entries_survive() {
        let m: ClockMap<u32> = ClockMap::new(1000);
        let regular = u64::MAX / 3;
        for i in 1..100_000u64 {
            m.with(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), |v| *v += 1);
            if i % 100 == 1 {
                m.with(regular, |v| *v += 1);
            }
        }
        assert!(m.len() <= m.capacity());
        assert!(m.len() >= m.capacity() * 9 / 10, "{} of {}", m.len(), m.capacity());
        assert_eq!(m.peek(regular), Some(1000), "an entry seen often survives (touched 1000 times)");
        assert_eq!(m.peek(0x9E37_79B9_7F4A_7C15), None, "the first one-off entry was evicted");
    }

    #[test]
    fn retain_and_remove() {
        let m: ClockMap<u32> = ClockMap::new(10);
        m.with(1, |v| *v = 1);
        m.with(2, |v| *v = 2);
        assert_eq!(m.retain(|v| *v > 1), 1);
        assert_eq!(m.peek(1), None);
        assert!(m.remove(2));
        assert!(!m.remove(2));
        assert!(m.is_empty());
    }

    /// A sweep asks about each entry exactly once (the storm sweep counts
    /// quarantines in `keep`), whether or not something goes, and what stays
    /// stays findable.
    #[test]
    fn retain_asks_once_per_entry_and_keeps_the_rest_findable() {
        let m: ClockMap<u64> = ClockMap::new(4096);
        let keys: Vec<u64> = (1..=1000u64).map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
        for (i, &k) in keys.iter().enumerate() {
            m.with(k, |v| *v = i as u64);
        }
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let all = |_: &u64| {
            asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            true
        };
        assert_eq!(m.retain(all), 0);
        assert_eq!(asked.swap(0, std::sync::atomic::Ordering::Relaxed), 1000);
        let odd = |v: &u64| {
            asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            v % 2 == 1
        };
        assert_eq!(m.retain(odd), 500);
        assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 1000);
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(m.peek(k), (i % 2 == 1).then_some(i as u64));
        }
    }
}

#[cfg(test)]
mod table_tests {
    use super::*;

    /// Removing in place while walking (backward shifts into the walk's
    /// position, probe runs that wrap round the table's end) keeps every
    /// remaining key findable and asks about each entry exactly once.
    #[test]
    fn retain_in_place_keeps_probe_runs_intact() {
        let mut rng = fastrand::Rng::with_seed(11);
        for round in 0..200 {
            let mut shard: Shard<u64> = Shard::new(600);
            let mut live = std::collections::HashSet::new();
            for _ in 0..rng.usize(1..600) {
                // Few distinct homes: long runs, some wrapping round the end.
                let key = rng.u64(1..2000);
                shard.touch(key).value = key;
                live.insert(key);
            }
            let asked = std::cell::RefCell::new(Vec::new());
            let modulus = rng.u64(2..5);
            let gone = shard.retain(&|v: &u64| {
                asked.borrow_mut().push(*v);
                v % modulus != 0
            });
            let mut asked = asked.into_inner();
            asked.sort_unstable();
            let mut expected: Vec<u64> = live.iter().copied().collect();
            expected.sort_unstable();
            assert_eq!(asked, expected, "round {round}: each entry asked once");
            let kept: std::collections::HashSet<u64> =
                live.iter().copied().filter(|k| k % modulus != 0).collect();
            assert_eq!(gone, live.len() - kept.len());
            assert_eq!(shard.len, kept.len());
            for key in 1..2000 {
                let found = shard.find(key).map(|i| shard.slots[i].value);
                assert_eq!(found, kept.contains(&key).then_some(key), "round {round}, key {key}");
            }
        }
    }

    /// Inserts and removals in a random order keep every remaining key findable
    /// (backward-shift deletion is easy to get subtly wrong).
    #[test]
    fn removals_keep_probe_runs_intact() {
        let mut shard: Shard<u64> = Shard::new(10_000);
        let mut rng = fastrand::Rng::with_seed(3);
        let mut live = std::collections::HashSet::new();
        for _ in 0..20_000 {
            // Small keys collide a lot in a small table: long probe runs.
            let key = rng.u64(1..3000);
            if rng.bool() {
                shard.touch(key).value = key;
                live.insert(key);
            } else if let Some(i) = shard.find(key) {
                shard.remove_at(i);
                live.remove(&key);
            }
            assert_eq!(shard.len, live.len());
        }
        for key in 1..3000 {
            assert_eq!(shard.find(key).map(|i| shard.slots[i].value), live.contains(&key).then_some(key));
        }
    }
}

impl<V: Copy + Default + Send> super::budget::Tracked for ClockMap<V> {
    fn tracked(&self) -> usize {
        self.len()
    }
    fn bytes(&self) -> usize {
        ClockMap::bytes(self)
    }
    fn set_capacity(&self, max_entries: usize) {
        ClockMap::set_capacity(self, max_entries);
    }
}

#[cfg(test)]
mod capacity_tests {
    use super::*;

    /// What `prefetch` reads without the lock is where each shard's slots
    /// are now, through growth, sweeps and a shrunk cap (a stale view would
    /// only make the hint useless, but silently).
    #[test]
    fn the_prefetch_view_follows_every_table_move() {
        let m: ClockMap<u64> = ClockMap::new(64 * 1024);
        let agrees = |m: &ClockMap<u64>| {
            m.shards.iter().all(|cell| {
                let mut shard = cell.lock();
                let (at, len) = (shard.slots.as_mut_ptr(), shard.slots.len());
                len == 0
                    || (cell.slots_at.load(Ordering::Relaxed) == at
                        && cell.slots_len.load(Ordering::Relaxed) == len)
            })
        };
        for i in 1..=50_000u64 {
            m.with(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), |v| *v = i);
            m.prefetch(i);
        }
        assert!(agrees(&m), "after growth");
        m.retain(|v| v % 16 == 0);
        assert!(agrees(&m), "after a sweep that shrank the tables");
        m.set_capacity(64);
        assert!(agrees(&m), "after a smaller cap");
        m.prefetch(12345);
    }

    #[test]
    fn shrinking_the_cap_evicts_at_once_and_gives_the_table_back() {
        let m: ClockMap<u64> = ClockMap::new(10_000);
        for i in 1..=10_000u64 {
            m.with(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), |v| *v = i);
        }
        assert!(m.len() >= m.capacity() * 9 / 10);
        m.set_capacity(100);
        assert!(m.len() <= 100, "{}", m.len());
        let slots: usize = m.shards.iter().map(|cell| cell.lock().slots.len()).sum();
        assert!(slots <= 100 * 4, "the table shrank with the cap: {slots} slots");
        for i in 1..=1000u64 {
            m.with(i, |v| *v = i);
        }
        assert!(m.len() <= m.capacity());
    }
}
