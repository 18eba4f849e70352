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
//! - **Identity, not position:** each `tat` is stored with its limit's id
//!   ([`limit_id`]), so a reload that reorders, adds or removes limits keeps
//!   the state of every limit that still exists, and a changed limit starts
//!   afresh (SPEC: limiter state belongs to a limit).
//! - **Memory:** one slot is 56 bytes (key, 4 ids, 4 `tat`s); measured in
//!   `benches/store.rs` (see the README).
//! - **Not every route's buckets are here:** a route on this store with a
//!   storm detector and at most two limits keeps them in its client table,
//!   in the entry of its other per-client state (`stack/clients.rs`), and
//!   the store decides on that entry with the same [`Tats::decide`].

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use tokio::time::Instant;

use super::clock::ClockMap;
use super::gcra::{self, Gcra, Outcome};
use crate::context::ClientKey;

pub use crate::config::MAX_LIMITS;

/// The state of one client on one route: the `tat` of each limit (0: full
/// bucket), next to the id of the limit it belongs to (0: unused). `N`
/// slots: [`MAX_LIMITS`] in the store's own table, fewer where a route keeps
/// its clients' buckets in its client table (`stack/clients.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tats<const N: usize = MAX_LIMITS> {
    pub ids: [u32; N],
    pub tats: [u64; N],
}

impl<const N: usize> Default for Tats<N> {
    fn default() -> Self {
        Tats { ids: [0; N], tats: [0; N] }
    }
}

impl<const N: usize> Tats<N> {
    /// The `tat` of the limit `id` (0 when it has none: a full bucket).
    pub fn of(&self, id: u32) -> u64 {
        self.ids.iter().position(|&i| i == id && id != 0).map_or(0, |k| self.tats[k])
    }

    /// Whether any bucket is still not full at `now`.
    pub fn live(&self, now: u64) -> bool {
        self.tats.iter().any(|&t| t > now)
    }

    /// [`Tats::decide`], after taking the buckets this entry lacks from
    /// the route's previous home (`adopt`; see [`Adopt`]). `None` (and the
    /// entry unchanged) when `adopt` is [`Adopt::IfComplete`] and some limit
    /// of `ids` has no slot here.
    pub fn decide_adopting(
        &mut self,
        limits: &[Gcra],
        ids: &[u32],
        now: u64,
        adopt: Adopt<'_>,
    ) -> Option<Outcome> {
        let n = limits.len().min(ids.len()).min(N);
        let lacks = |t: &Self, id: u32| !t.ids.contains(&id);
        match adopt {
            Adopt::Never => {}
            Adopt::IfComplete if ids[..n].iter().any(|&id| lacks(self, id)) => return None,
            Adopt::IfComplete => {}
            Adopt::From(left) => {
                for (&id, &left) in ids[..n].iter().zip(left) {
                    if !lacks(self, id) {
                        continue;
                    }
                    // A free slot, or one of a limit not decided now.
                    let slot = (0..N)
                        .find(|&k| self.ids[k] == 0)
                        .or_else(|| (0..N).find(|&k| !ids[..n].contains(&self.ids[k])));
                    if let Some(k) = slot {
                        self.ids[k] = id;
                        self.tats[k] = if left > 0 { now.saturating_add(left) } else { 0 };
                    }
                }
            }
        }
        Some(self.decide(limits, ids, now))
    }

    /// Decides one request at `now` (ticks) against `limits` (at most `N`;
    /// `ids[i]` is the [`limit_id`] of `limits[i]`) and records it when
    /// allowed. The entry is rewritten with these limits first; the state of
    /// other limits (a reload in progress, a limit removed and maybe coming
    /// back, the route's limits of the other mode) is kept in the free slots
    /// while it still holds anything.
    pub fn decide(&mut self, limits: &[Gcra], ids: &[u32], now: u64) -> Outcome {
        let n = limits.len().min(ids.len()).min(N);
        if self.ids[..n] == ids[..n] && self.ids[n..].iter().all(|&id| id == 0) {
            // The entry holds exactly these limits, in this order (every
            // request but the first after a reload): the rewrite below would
            // copy it unchanged, so decide in place.
            return gcra::decide(&limits[..n], &mut self.tats[..n], now);
        }
        let mut next = Tats::<N>::default();
        for (i, &id) in ids[..n].iter().enumerate() {
            next.ids[i] = id;
            next.tats[i] = self.of(id);
        }
        let out = gcra::decide(&limits[..n], &mut next.tats[..n], now);
        let mut free = n;
        for (&id, &tat) in self.ids.iter().zip(&self.tats) {
            if free < N && id != 0 && tat > now && !ids[..n].contains(&id) {
                next.ids[free] = id;
                next.tats[free] = tat;
                free += 1;
            }
        }
        *self = next;
        out
    }
}

/// What a decision does with the limits an entry has no bucket for, while
/// a reload's move of the route's buckets from one home to the other (the
/// store's table, the route's client table) is recent: their state may still
/// be in the previous home (`store::Moved`).
#[derive(Debug, Clone, Copy)]
pub enum Adopt<'a> {
    /// A missing bucket is a full one (no move under way).
    Never,
    /// Decide only when every bucket is here; otherwise change nothing.
    IfComplete,
    /// A missing bucket takes the state the previous home had for it: the
    /// ticks left until it is full (`left[i]` of `ids[i]`; 0: full).
    From(&'a [u64]),
}

/// The memory store's id of a limit: a hash of its identity (`2/s:b4`), never 0.
/// Fixed (not seeded): limits come from the config, not from clients.
pub fn limit_id(identity: &str) -> u32 {
    // FNV-1a, 32 bits.
    let h = identity.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    h.max(1)
}

/// A table's key for `client` on `route`: the route's name and the client's
/// hash ([`ClientKey::hash64`]) under the table's own seed.
pub(super) fn route_client_key(seed: &foldhash::fast::RandomState, route: &str, client: &ClientKey) -> u64 {
    let mut h = seed.build_hasher();
    h.write(route.as_bytes());
    h.write_u8(0xff);
    h.write_u64(client.hash64());
    h.finish()
}

/// Per-node GCRA state for every (route, client), capped at its share of `max_clients`.
pub struct MemoryStore {
    map: Arc<ClockMap<Tats>>,
    epoch: Instant,
    seed: foldhash::fast::RandomState,
}

impl MemoryStore {
    pub fn new(max_clients: usize) -> Self {
        MemoryStore {
            map: Arc::new(ClockMap::new(max_clients)),
            epoch: Instant::now(),
            seed: foldhash::fast::RandomState::default(),
        }
    }

    /// The store's key for a client on a route.
    pub fn key(&self, route: &str, client: &ClientKey) -> u64 {
        route_client_key(&self.seed, route, client)
    }

    /// Nanoseconds since the store was created: the store's clock.
    pub fn ticks(&self, now: Instant) -> u64 {
        crate::nanos_since(self.epoch, now).max(1)
    }

    /// Decides one request of `key` at `now` (ticks) against `limits`
    /// ([`Tats::decide`]).
    pub fn check(&self, key: u64, limits: &[Gcra], ids: &[u32], now: u64) -> Outcome {
        self.map.with(key, |entry| entry.decide(limits, ids, now))
    }

    /// [`MemoryStore::check`] during a move of the route's buckets
    /// ([`Tats::decide_adopting`]).
    pub fn check_adopting(
        &self,
        key: u64,
        limits: &[Gcra],
        ids: &[u32],
        now: u64,
        adopt: Adopt<'_>,
    ) -> Option<Outcome> {
        self.map.with(key, |entry| entry.decide_adopting(limits, ids, now, adopt))
    }

    /// Starts loading `key`'s slot into the cache ([`ClockMap::prefetch`]).
    pub fn prefetch(&self, key: u64) {
        self.map.prefetch(key);
    }

    /// Sets the cap (the limiter's share of the node's budget).
    pub fn set_capacity(&self, max_clients: usize) {
        self.map.set_capacity(max_clients);
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
    /// A shard at a time, letting requests run between shards.
    pub async fn sweep(&self, now: u64) -> usize {
        self.map.retain_yielding(|tats| tats.live(now)).await
    }

    /// Bytes the table holds (slots used or not).
    pub fn bytes(&self) -> usize {
        self.map.bytes()
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

    const ID: [u32; 1] = [7];

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
        let (a, b) = (s.key("r", &ClientKey::from_text("a")), s.key("r", &ClientKey::from_text("b")));
        assert!(s.check(a, &l, &ID, 1).allowed);
        assert!(s.check(a, &l, &ID, 1).allowed);
        assert!(!s.check(a, &l, &ID, 1).allowed);
        assert!(s.check(b, &l, &ID, 1).allowed, "b is not limited by a");
        assert_ne!(
            s.key("r1", &ClientKey::from_text("a")),
            s.key("r2", &ClientKey::from_text("a")),
            "routes keep separate state"
        );
    }

    #[test]
    fn the_cap_holds_and_the_least_recently_seen_go_first() {
        let s = MemoryStore::new(1000);
        let l = [limit(1, 1)];
        let keep = s.key("r", &ClientKey::from_text("regular"));
        for i in 0..100_000u64 {
            s.check(s.key("r", &ClientKey::from_text(&i.to_string())), &l, &ID, 1);
            if i % 100 == 0 {
                s.check(keep, &l, &ID, 1);
            }
        }
        assert!(s.len() <= s.capacity(), "{} > {}", s.len(), s.capacity());
        assert!(s.len() >= s.capacity() * 9 / 10, "tracked {} of {}", s.len(), s.capacity());
        assert!(s.peek(keep).is_some(), "a client seen often survives");
        assert!(
            s.peek(s.key("r", &ClientKey::from_text("0"))).is_none(),
            "the first one-off client was evicted"
        );
    }

    #[tokio::test]
    async fn full_buckets_are_swept() {
        let s = MemoryStore::new(100);
        let l = [limit(10, 10)]; // 100ms interval
        let k = s.key("r", &ClientKey::from_text("c"));
        s.check(k, &l, &ID, 1_000);
        assert_eq!(s.sweep(1_000).await, 0, "not full yet");
        assert_eq!(s.sweep(1_000 + 100_000_000).await, 1);
        assert!(s.is_empty());
    }

    #[test]
    fn remove_resets_a_client() {
        let s = MemoryStore::new(10);
        let l = [limit(1, 1)];
        let k = s.key("r", &ClientKey::from_text("c"));
        assert!(s.check(k, &l, &ID, 5).allowed);
        assert!(!s.check(k, &l, &ID, 5).allowed);
        assert!(s.remove(k));
        assert!(!s.remove(k));
        assert!(s.check(k, &l, &ID, 5).allowed);
    }
}

#[cfg(test)]
mod identity_tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use super::*;
    use crate::config::units::Rate;
    use crate::config::Limit;

    fn g(count: u32, per_s: u64, burst: u32) -> Gcra {
        Gcra::new(
            &Limit {
                rate: Rate { count: NonZeroU32::new(count).unwrap(), per: Duration::from_secs(per_s) },
                burst: NonZeroU32::new(burst).unwrap(),
            },
            Duration::from_nanos(1),
        )
    }

    /// The issue's reload: `2/s` and `100/h` swapped. The hourly state must not
    /// be read as per-second state (nor the other way round).
    #[test]
    fn a_reorder_keeps_each_limits_state_and_a_changed_limit_starts_afresh() {
        let s = MemoryStore::new(100);
        let k = s.key("r", &ClientKey::from_text("c"));
        let (second, hour) = (g(2, 1, 2), g(100, 3600, 100));
        let (sid, hid) = (limit_id("2/s:b2"), limit_id("100/h:b100"));
        let t0 = 1_000_000_000;
        assert!(s.check(k, &[second, hour], &[sid, hid], t0).allowed);
        assert!(s.check(k, &[second, hour], &[sid, hid], t0).allowed);
        assert!(!s.check(k, &[second, hour], &[sid, hid], t0).allowed);
        let hourly = s.peek(k).unwrap().of(hid);
        // Reordered, 2.5 s later: the per-second bucket has refilled.
        let t1 = t0 + 2_500_000_000;
        let out = s.check(k, &[hour, second], &[hid, sid], t1);
        assert!(out.allowed, "{out:?}");
        let after = s.peek(k).unwrap();
        assert_eq!(after.of(hid), hourly.max(t1) + hour.interval, "the hourly state carried over");
        assert_eq!(hour.remaining(after.of(hid), t1), 97);
        // A changed limit (burst 2 → 5) starts afresh; the removed one's state
        // stays in a free slot while it holds anything.
        let changed = limit_id("2/s:b5");
        assert!(s.check(k, &[g(2, 1, 5)], &[changed], t1).allowed);
        let e = s.peek(k).unwrap();
        assert_eq!(e.of(changed), t1 + second.interval);
        assert_eq!(e.of(hid), after.of(hid), "the hourly limit's state is kept meanwhile");
    }

    proptest::proptest! {
        /// Why a route's two limits may live in its client entry
        /// (`Tats<2>`, `stack/clients.rs`) instead of the store's table
        /// (`Tats<4>`): any sequence of decisions on them, both together,
        /// either alone (a route with a shadow limit decides its modes apart)
        /// or reordered (a reload), gives the same outcomes in both.
        #[test]
        fn two_slots_decide_as_four_for_two_limits(
            steps in proptest::collection::vec((0usize..4, 0u64..400_000_000), 1..60),
        ) {
            let (a, b) = (g(5, 1, 3), g(100, 60, 10));
            let (ia, ib) = (limit_id("5/s:b3"), limit_id("100/m:b10"));
            let (mut two, mut four) = (Tats::<2>::default(), Tats::<4>::default());
            let mut now = 1;
            for (pick, dt) in steps {
                now += dt;
                let (limits, ids): (&[Gcra], &[u32]) = match pick {
                    0 => (&[a, b], &[ia, ib]),
                    1 => (&[b, a], &[ib, ia]),
                    2 => (&[a], &[ia]),
                    _ => (&[b], &[ib]),
                };
                proptest::prop_assert_eq!(two.decide(limits, ids, now), four.decide(limits, ids, now));
                proptest::prop_assert_eq!((two.of(ia), two.of(ib)), (four.of(ia), four.of(ib)));
            }
        }
    }

    /// During a move, an entry that lacks a bucket declines to decide (and
    /// changes nothing) until it is handed the previous home's state, which
    /// it then decides on; a bucket it has is never overwritten.
    #[test]
    fn a_moved_bucket_is_adopted_once() {
        let (a, b) = (g(1, 60, 1), g(100, 3600, 100));
        let (ia, ib) = (limit_id("1/m:b1"), limit_id("100/h:b100"));
        let mut t = Tats::<2>::default();
        let now = 5_000_000_000;
        assert_eq!(t.decide_adopting(&[a, b], &[ia, ib], now, Adopt::IfComplete), None);
        assert_eq!(t, Tats::default(), "unchanged");
        // The previous home: the per-minute bucket empty for 30 s more.
        let left = [30_000_000_000, 0];
        let o = t.decide_adopting(&[a, b], &[ia, ib], now, Adopt::From(&left)).unwrap();
        assert!(!o.allowed, "refused on the adopted state");
        assert_eq!(t.of(ia), now + 30_000_000_000);
        let o = t.decide_adopting(&[a, b], &[ia, ib], now, Adopt::From(&[0, 0])).unwrap();
        assert!(!o.allowed, "a bucket it has is kept");
        assert!(t.decide_adopting(&[a, b], &[ia, ib], now, Adopt::IfComplete).is_some());
    }

    #[test]
    fn limit_ids_differ_and_are_never_zero() {
        let ids: std::collections::HashSet<u32> =
            ["2/s:b2", "2/s:b4", "100/h:b100", "2/m:b2", "20/s:b2"].iter().map(|i| limit_id(i)).collect();
        assert_eq!(ids.len(), 5);
        assert!(!ids.contains(&0));
    }
}
