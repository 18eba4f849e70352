//! What a route remembers about each client: its storm detector's growth and
//! quarantine, its auth guard's last 2xx and, on the memory store, the
//! buckets of its limits (`RouteConfig::buckets_in_client_table`). One entry
//! in one table, so a request looks its client up once for all of them (at a
//! million clients each lookup is a cache miss) and a client costs one key
//! and one slot's slack, not one per stage.
//!
//! The table belongs to the route, not to the detector or the guard: a reload
//! that rebuilds one of them (its settings changed) keeps the other's state.
//! A rebuilt detector must start afresh, as it always did, so each growth
//! record names the detector that wrote it ([`Growth::owner`]) and a record
//! of another one reads as none. The buckets belong to their limits, as in
//! the store's own table: each `tat` is kept with its limit's id.
//!
//! Times are small: the quarantine's end and the last 2xx are 32-bit
//! deciseconds (13.6 years of uptime), the `tat`s nanoseconds on the table's
//! clock, as the memory store keeps them.
//!
//! Bounds: a [`ClockMap`] capped at one share of `store.max_clients` (the
//! node's one budget, [`crate::store::budget`]); the storm detector's sweeper
//! drops entries that hold nothing any more.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::time::Instant;

use super::storm::growth::Growth;
use crate::config::LIMITS_PER_CLIENT_ENTRY;
use crate::context::ClientKey;
use crate::store::budget::Tracked;
use crate::store::clock::ClockMap;
use crate::store::gcra::{Gcra, Outcome};
use crate::store::memory::{Adopt, Tats};
use crate::store::ClientBuckets;

/// One client on one route: 48 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteClient {
    /// The storm detector's growth and quarantine.
    pub growth: Growth,
    /// When the auth guard last saw a 2xx to this client, in deciseconds on
    /// the table's clock, rounded up (0: never).
    authorized: u32,
    /// The buckets of the route's limits, when the route keeps them here.
    pub buckets: Tats<LIMITS_PER_CLIENT_ENTRY>,
}

// The size the module docs and the README state (a slot adds the 8-byte key).
const _: () = assert!(std::mem::size_of::<RouteClient>() == 48);

impl RouteClient {
    /// When the auth guard last saw a 2xx, in the table's milliseconds (0: never).
    pub fn authorized_ms(&self) -> u64 {
        super::from_deciseconds(self.authorized)
    }

    pub fn set_authorized(&mut self, now_ms: u64) {
        self.authorized = super::to_deciseconds(now_ms);
    }

    /// The guard's record, to carry to the response ([`Authorized`]).
    pub fn authorized(&self) -> Authorized {
        Authorized(self.authorized)
    }

    /// Whether the entry holds nothing for anyone.
    pub fn is_empty(&self) -> bool {
        self.growth.owner == 0 && self.authorized == 0 && self.buckets == Tats::default()
    }
}

/// The auth guard's record of a client (its last 2xx) as the client's entry
/// held it when the request's first stage looked the client up: the storm
/// detector reads it under the lock it takes anyway and leaves it in the
/// request's [`crate::context::Exchange`], so that the guard, on a 2xx,
/// need not take the lock again only to write nearly the same time
/// ([`Authorized::lately`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Authorized(u32);

impl Authorized {
    /// Not known (no stage looked), or never authorized: the guard looks itself.
    pub const UNKNOWN: Authorized = Authorized(0);

    /// As carried in the request's exchange ([`Authorized::raw`]).
    pub fn from_raw(raw: u32) -> Self {
        Authorized(raw)
    }

    pub fn raw(self) -> u32 {
        self.0
    }

    /// Whether a 2xx at `now_ms` (the table's clock) to a client whose
    /// entry held this when its request arrived may leave the entry as it
    /// is: the record is already within a second of `now_ms`. Then the
    /// guard takes no lock.
    pub fn lately(self, now_ms: u64) -> bool {
        self.0 != 0 && super::to_deciseconds(now_ms).saturating_sub(self.0) < REWRITE_DS
    }
}

/// A 2xx within this many deciseconds of the last one recorded is not
/// written again: a client's last 2xx is kept to the second, against a
/// `recently_authorized` of minutes.
const REWRITE_DS: u32 = 10;

/// The per-client table of one route.
pub struct RouteClients {
    map: Arc<ClockMap<RouteClient>>,
    epoch: Instant,
    seed: foldhash::fast::RandomState,
    /// The auth guard's `recently_authorized` in milliseconds (0: no guard):
    /// how long the sweep keeps an entry for the guard's sake.
    recent_ms: AtomicU64,
}

impl RouteClients {
    pub fn new(max_clients: usize) -> Arc<Self> {
        Arc::new(RouteClients {
            map: Arc::new(ClockMap::new(max_clients)),
            epoch: Instant::now(),
            seed: foldhash::fast::RandomState::default(),
            recent_ms: AtomicU64::new(0),
        })
    }

    /// Milliseconds on the table's clock (never 0), which every time stored
    /// in it uses but the buckets'.
    pub fn ms(&self, now: Instant) -> u64 {
        super::millis_since(self.epoch, now)
    }

    /// Nanoseconds on the table's clock (never 0): the buckets' time.
    pub fn ticks(&self, now: Instant) -> u64 {
        crate::nanos_since(self.epoch, now).max(1)
    }

    /// The table's key of `client`.
    fn key(&self, client: &ClientKey) -> u64 {
        self.seed.hash_one(client.hash64())
    }

    /// Runs `f` on the client's entry (created empty), marking it recently seen.
    pub fn with<R>(&self, client: &ClientKey, f: impl FnOnce(&mut RouteClient) -> R) -> R {
        self.map.with(self.key(client), f)
    }

    /// The client's entry, if tracked.
    pub fn peek(&self, client: &ClientKey) -> Option<RouteClient> {
        self.map.peek(self.key(client))
    }

    /// Changes the client's entry if tracked; drops it when `f` says it holds
    /// nothing any more.
    pub fn update_or_remove(&self, client: &ClientKey, f: impl FnOnce(&mut RouteClient) -> bool) {
        self.map.update_or_remove(self.key(client), f);
    }

    /// Starts loading the client's slot into the cache (a hint, see `stack::warm`).
    pub fn prefetch(&self, client: &ClientKey) {
        self.map.prefetch(self.key(client));
    }

    /// The auth guard's window, for the sweep (set when a guard is built).
    pub fn guard_keeps_for(&self, recent_ms: u64) {
        self.recent_ms.store(recent_ms, Ordering::Relaxed);
    }

    /// Whether the client had a 2xx within the guard's `recently_authorized`
    /// at `now_ms`: the guard's test of a response, and the sweep's of whether
    /// the guard still needs the entry.
    pub fn authorized_lately(&self, c: &RouteClient, now_ms: u64) -> bool {
        c.authorized != 0
            && now_ms.saturating_sub(c.authorized_ms()) <= self.recent_ms.load(Ordering::Relaxed)
    }

    /// Keeps only the entries for which `keep` is true, a shard at a time.
    pub async fn retain_yielding(&self, keep: impl Fn(&RouteClient) -> bool) -> usize {
        self.map.retain_yielding(keep).await
    }

    /// The table, for the node's budget to cap and count.
    pub fn budget_map(&self) -> Arc<dyn Tracked> {
        self.map.clone()
    }
}

impl ClientBuckets for RouteClients {
    fn decide(
        &self,
        client: &ClientKey,
        limits: &[Gcra],
        ids: &[u32],
        now: Instant,
        adopt: Adopt<'_>,
    ) -> Option<Outcome> {
        let now = self.ticks(now);
        self.with(client, |c| c.buckets.decide_adopting(limits, ids, now, adopt))
    }

    fn peek(&self, client: &ClientKey, ids: &[u32], now: Instant) -> Option<(Vec<u64>, u64)> {
        let c = self.peek(client)?;
        Some((ids.iter().map(|&id| c.buckets.of(id)).collect(), self.ticks(now)))
    }

    fn forget(&self, client: &ClientKey) -> bool {
        let mut held = false;
        self.update_or_remove(client, |c| {
            held = c.buckets != Tats::default();
            c.buckets = Tats::default();
            !c.is_empty()
        });
        held
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{Method, StatusCode, Uri};

    use super::*;
    use crate::config::{AuthGuardConfig, RouteConfig, StormConfig};
    use crate::stack::auth_guard::AuthGuard;
    use crate::stack::storm::Storm;

    /// A route as shipped: storm detector (1 s intervals, growth ×2 three
    /// times above 5/s) and auth guard (recently authorized: 10 min) on.
    fn route() -> RouteConfig {
        let toml = "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n\
                    [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"u\"\n";
        crate::config::parse(toml, std::path::Path::new("."), &|_| None).unwrap().routes.remove(0)
    }

    fn storm_config(quarantine: Duration) -> StormConfig {
        StormConfig { quarantine, ..route().storm }
    }

    fn guard_config() -> AuthGuardConfig {
        route().auth_guard
    }

    /// Sends a client doubling its rate (2/s, 4/s, ...), one rate per second
    /// of the detector's intervals, until `storm` sheds it.
    async fn bomb(storm: &Storm, client: &ClientKey) {
        let uri: Uri = "/bomb".parse().unwrap();
        // Paused time stands still until a sleep: this is the table's epoch.
        let start = Instant::now();
        for (second, rate) in [2u64, 4, 8, 16, 32, 64, 128].into_iter().enumerate() {
            for k in 0..rate {
                let at = start + Duration::from_millis(second as u64 * 1000 + k * 1000 / rate);
                tokio::time::sleep_until(at).await;
                let fp = storm.fingerprint(client, &Method::GET, &uri, None);
                if storm.observe(client, fp, Instant::now()).is_err() {
                    return;
                }
                storm.finish(fp, false);
            }
        }
        panic!("the bomb was never quarantined");
    }

    /// A reload that rebuilds the detector (its settings changed) starts it
    /// afresh, as when each had its own table; the guard's record of the
    /// client, in the same entry, stays.
    #[tokio::test(start_paused = true)]
    async fn a_rebuilt_detector_starts_afresh_and_the_guards_record_stays() {
        let table = RouteClients::new(1000);
        let guard = AuthGuard::new("clients-t", &guard_config(), table.clone());
        // (The table's epoch and the bomb's start are the same paused instant.)
        let old = Storm::start("clients-t", &storm_config(Duration::from_secs(60)), table.clone(), 1000);
        let client = ClientKey::from_text("clients-bomb");
        guard.observe(&client, StatusCode::OK, Instant::now());
        bomb(&old, &client).await;
        let uri: Uri = "/other".parse().unwrap();
        let fp = old.fingerprint(&client, &Method::GET, &uri, None);
        assert!(old.observe(&client, fp, Instant::now()).is_err(), "quarantined by the old detector");

        let new = Storm::start("clients-t", &storm_config(Duration::from_secs(30)), table.clone(), 1000);
        assert!(
            new.client_state(&client, Instant::now()).is_none(),
            "the old detector's record reads as none"
        );
        let fp = new.fingerprint(&client, &Method::GET, &uri, None);
        assert!(new.observe(&client, fp, Instant::now()).is_ok(), "the new detector starts afresh");
        new.finish(fp, false);
        assert!(table.peek(&client).is_some_and(|c| c.authorized_ms() != 0), "the guard's record stays");
        assert!(new.reset(&client));
        assert!(table.peek(&client).is_some_and(|c| c.authorized_ms() != 0), "a storm reset keeps it too");
    }

    /// The sweep keeps an entry while the guard needs it, though the detector
    /// no longer does, and drops it once neither does.
    #[tokio::test(start_paused = true)]
    async fn the_sweep_keeps_an_entry_while_either_part_needs_it() {
        let table = RouteClients::new(1000);
        let guard = AuthGuard::new("clients-s", &guard_config(), table.clone());
        let storm = Storm::start("clients-s", &storm_config(Duration::from_secs(60)), table.clone(), 1000);
        let (authorized, unknown) =
            (ClientKey::from_text("clients-ok"), ClientKey::from_text("clients-none"));
        let uri: Uri = "/x".parse().unwrap();
        for client in [&authorized, &unknown] {
            let fp = storm.fingerprint(client, &Method::GET, &uri, None);
            storm.observe(client, fp, Instant::now()).unwrap();
            storm.finish(fp, false);
        }
        guard.observe(&authorized, StatusCode::OK, Instant::now());
        guard.observe(&unknown, StatusCode::UNAUTHORIZED, Instant::now());
        // Past the detector's horizon (a few intervals), within the guard's 600 s.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(table.peek(&unknown).is_none(), "nothing holds it: swept");
        assert!(table.peek(&authorized).is_some(), "the guard still needs it");
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(table.peek(&authorized).is_none(), "swept once the guard's window passed");
    }

    /// A route's limits (two at most) decided in its client table, as the
    /// store decides them in its own: each bucket kept with its limit's id,
    /// reset without touching the detector's record, and swept once full.
    #[tokio::test(start_paused = true)]
    async fn the_buckets_live_in_the_entry_beside_the_growth() {
        use crate::config::units::Rate;
        use crate::config::Limit;
        use crate::store::{RouteLimits, Store};
        use std::num::NonZeroU32;
        let table = RouteClients::new(1000);
        let storm = Storm::start("clients-b", &storm_config(Duration::from_secs(60)), table.clone(), 1000);
        let limit = |count, secs| Limit {
            rate: Rate { count: NonZeroU32::new(count).unwrap(), per: Duration::from_secs(secs) },
            burst: NonZeroU32::new(count).unwrap(),
        };
        let (per_second, per_hour) = (limit(2, 1), limit(100, 3600));
        let limits = RouteLimits::new("clients-b", &[per_second, per_hour]).in_table(table.clone());
        let store =
            Store::start(crate::config::parse("", std::path::Path::new("."), &|_| None).unwrap().store);
        let client = ClientKey::from_text("clients-b-device");
        let now = Instant::now();
        let mut decisions = Vec::new();
        for _ in 0..3 {
            decisions.push(store.check(&limits, &client, now).await.unwrap().allowed);
        }
        assert_eq!(decisions, [true, true, false], "a burst of 2, then refused");
        assert_eq!(store.tracked_limiter(), 0, "nothing in the store's own table");
        let fp = storm.fingerprint(&client, &Method::GET, &"/b".parse().unwrap(), None);
        storm.observe(&client, fp, now).unwrap();
        storm.finish(fp, false);
        let entry = table.peek(&client).expect("one entry");
        assert_eq!(entry.growth.cur, 1, "the detector's count beside the buckets");
        assert!(entry.buckets.live(table.ticks(now)));

        // Reordered, as a reload may: each bucket follows its limit.
        let reordered = RouteLimits::new("clients-b", &[per_hour, per_second]).in_table(table.clone());
        assert!(!store.check(&reordered, &client, now).await.unwrap().allowed, "still refused");
        let states = store.peek(&reordered, &client, now).await.expect("tracked");
        assert_eq!((states[0].remaining, states[1].remaining), (98, 0), "hourly 98 left, per second none");

        // The admin's reset forgets the buckets, not the detector's record.
        assert!(store.reset(&limits, &client).await);
        assert!(store.check(&limits, &client, now).await.unwrap().allowed, "a full bucket again");
        assert_eq!(table.peek(&client).map(|c| c.growth.cur), Some(1));

        // Swept once the buckets are full and the detector no longer needs it.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(table.peek(&client).is_some(), "the hourly bucket is not full yet");
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(table.peek(&client).is_none(), "swept once every bucket is full");
    }
}
