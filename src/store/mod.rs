//! Where rate-limit state lives: this node's memory, or Redis shared by every
//! gateway, with `on_failure` deciding what happens while Redis is away.
//!
//! The store outlives config reloads (the gateway rebuilds it only when
//! `[store]` itself changes), so a reload never hands every client a fresh
//! bucket. State is keyed by each limit's identity (rate and burst, e.g.
//! `2/s:b4`), never by its position in `[[routes.limits]]`: a reload that
//! reorders, adds or removes limits keeps the state of every limit that
//! still exists, and a changed limit starts afresh.

pub mod budget;
pub mod clock;
pub mod gcra;
pub mod memory;
pub mod redis;
pub mod refusals;
pub mod spin;

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use crate::config::{Limit, Mode, OnFailure, StoreConfig, StoreKind};
use crate::context::ClientKey;
use crate::metrics as m;
use budget::{ClientBudget, Shares};
use gcra::Gcra;
use memory::{Adopt, MemoryStore};
use redis::RedisStore;

pub use memory::MAX_LIMITS;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store is down")]
    Down,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(String),
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

/// The limits of one route, ready for both stores.
#[derive(Debug)]
pub struct RouteLimits {
    pub route: Arc<str>,
    pub limits: Vec<Limit>,
    /// Each limit's `mode` (not part of its identity: switching it keeps the state).
    pub modes: Vec<Mode>,
    /// In nanoseconds, for the memory store.
    ns: Vec<Gcra>,
    /// In microseconds, for Redis.
    us: Vec<Gcra>,
    /// `RateLimit-Policy` of each limit, e.g. `"10/s";q=20;w=2`.
    pub policies: Vec<HeaderValue>,
    /// Each limit's policy name as `RateLimit` quotes it, e.g. `"10/s"`.
    pub names: Vec<String>,
    /// Each limit's identity, `<rate>:b<burst>` (e.g. `2/s:b4`): the last part
    /// of its Redis key.
    pub identities: Vec<String>,
    /// Each limit's identity as the memory store's 32-bit id.
    ids: Vec<u32>,
    /// Where the route keeps its clients' buckets instead of the memory
    /// store's table (`RouteConfig::buckets_in_client_table`).
    table: Option<Arc<dyn ClientBuckets>>,
    /// Where they were before a recent reload moved them, if one did.
    moved: Option<Moved>,
}

/// A recent move of a route's buckets between the store's table and its
/// client table (a reload that gave it a third limit, or took its storm
/// detector away, or the reverse). Until every bucket the previous home held
/// could have filled up again (`until`), a client's first decision in the new
/// home takes its buckets from the previous one, so a move keeps the state of
/// every limit that still exists, as any reload must (SPEC: limiter state
/// belongs to a limit).
#[derive(Debug, Clone)]
pub struct Moved {
    from: Home,
    until: Instant,
}

/// Where a route's buckets were.
#[derive(Debug, Clone)]
enum Home {
    Store,
    Table(Arc<dyn ClientBuckets>),
}

impl std::fmt::Debug for dyn ClientBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientBuckets")
    }
}

/// A route's own table of its clients, which can hold the buckets of a few
/// limits in each client's entry beside the route's other per-client state
/// (`stack/clients.rs`): one entry, one key and one lookup per client where
/// the store's table would add another of each. The store decides on it
/// exactly as on its own table ([`memory::Tats::decide`]), on the table's
/// clock, in nanoseconds.
pub trait ClientBuckets: Send + Sync {
    /// Decides one request of `client` ([`memory::Tats::decide_adopting`]).
    fn decide(
        &self,
        client: &ClientKey,
        limits: &[Gcra],
        ids: &[u32],
        now: Instant,
        adopt: Adopt<'_>,
    ) -> Option<gcra::Outcome>;
    /// The client's `tat` for each of `ids` and `now` on the table's clock,
    /// or `None` when the client has no entry.
    fn peek(&self, client: &ClientKey, ids: &[u32], now: Instant) -> Option<(Vec<u64>, u64)>;
    /// Forgets the client's buckets; true when any held something.
    fn forget(&self, client: &ClientKey) -> bool;
}

/// A limit's identity: what its state belongs to.
pub fn identity(limit: &Limit) -> String {
    format!("{}:b{}", limit.rate, limit.burst)
}

impl RouteLimits {
    /// Enforcing limits.
    pub fn new(route: &str, limits: &[Limit]) -> Self {
        Self::with_modes(route, limits, &[])
    }

    /// Limits with their modes (`modes[i]` of `limits[i]`; missing: enforce).
    pub fn with_modes(route: &str, limits: &[Limit], modes: &[Mode]) -> Self {
        let modes: Vec<Mode> =
            (0..limits.len().min(MAX_LIMITS)).map(|i| modes.get(i).copied().unwrap_or_default()).collect();
        let limits: Vec<Limit> = limits.iter().take(MAX_LIMITS).copied().collect();
        let ns: Vec<Gcra> = limits.iter().map(|l| Gcra::new(l, Duration::from_nanos(1))).collect();
        let policies = limits
            .iter()
            .zip(&ns)
            .map(|(l, g)| {
                let window = Duration::from_nanos(g.capacity).as_secs_f64().ceil().max(1.0) as u64;
                HeaderValue::from_str(&format!("\"{}\";q={};w={window}", l.rate, l.burst))
                    .unwrap_or(HeaderValue::from_static("\"limit\""))
            })
            .collect();
        let identities: Vec<String> = limits.iter().map(identity).collect();
        RouteLimits {
            route: Arc::from(route),
            ids: identities.iter().map(|i| memory::limit_id(i)).collect(),
            identities,
            names: limits.iter().map(|l| format!("\"{}\"", l.rate)).collect(),
            us: limits.iter().map(|l| Gcra::new(l, Duration::from_micros(1))).collect(),
            ns,
            limits,
            modes,
            policies,
            table: None,
            moved: None,
        }
    }

    /// The same limits with their clients' buckets kept in `table`.
    pub fn in_table(mut self, table: Arc<dyn ClientBuckets>) -> Self {
        self.table = Some(table);
        self
    }

    /// Whether the route's client table holds the buckets.
    pub fn in_client_table(&self) -> bool {
        self.table.is_some()
    }

    /// The same limits, the route's limits before this reload being
    /// `previous`: when their buckets lived elsewhere, clients' first
    /// decisions take them from there for as long as any could hold
    /// something ([`Moved`]); a move still under way carries over.
    pub fn after(mut self, previous: &RouteLimits, now: Instant) -> Self {
        let same = match (&previous.table, &self.table) {
            (Some(a), Some(b)) => std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)),
            (a, b) => a.is_none() && b.is_none(),
        };
        self.moved = if same {
            previous.moved.clone().filter(|m| now < m.until)
        } else if previous.is_empty() {
            None
        } else {
            // A bucket of a limit that still exists is full again within its
            // capacity (burst × interval); the margin covers the clock's
            // reads between a decision and this one.
            let longest = previous.ns.iter().map(|g| g.capacity).max().unwrap_or(0);
            let span = Duration::from_nanos(longest).saturating_add(Duration::from_secs(1));
            // (A span past what an `Instant` can hold: a year is as good as forever here.)
            let until = now.checked_add(span).or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)));
            Some(Moved { from: previous.home(), until: until.unwrap_or(now) })
        };
        self
    }

    /// Where the buckets live.
    fn home(&self) -> Home {
        self.table.clone().map_or(Home::Store, Home::Table)
    }

    /// The move under way at `now`, if any.
    fn moving(&self, now: Instant) -> Option<&Moved> {
        self.moved.as_ref().filter(|m| now < m.until)
    }

    /// The limits in `mode` alone, decided on their own (same identities,
    /// so the same state as when decided with the others).
    pub fn only(&self, mode: Mode) -> RouteLimits {
        let limits: Vec<Limit> =
            self.limits.iter().zip(&self.modes).filter(|(_, m)| **m == mode).map(|(l, _)| *l).collect();
        let only = RouteLimits::with_modes(&self.route, &limits, &vec![mode; limits.len()]);
        RouteLimits { table: self.table.clone(), moved: self.moved.clone(), ..only }
    }

    /// Whether every limit is in `mode`.
    pub fn all(&self, mode: Mode) -> bool {
        self.modes.iter().all(|m| *m == mode)
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }
}

/// A rate-limit decision for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Refused: how long until the request would pass.
    pub retry_after: Duration,
    /// The limit whose policy the headers describe (`None`: no state was
    /// consulted, as with `on_failure = "allow"`).
    pub tightest: Option<usize>,
    pub remaining: u32,
    /// Until the tightest bucket is full again.
    pub reset: Duration,
}

/// A client's state on one limit, for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LimitState {
    pub rate: String,
    pub burst: u32,
    pub remaining: u32,
    pub full_in_s: f64,
}

pub struct Store {
    pub config: StoreConfig,
    memory: Arc<MemoryStore>,
    redis: Option<Arc<RedisStore>>,
    /// `max_clients` over the limiter and every route's per-client maps.
    budget: Arc<ClientBudget>,
}

impl Store {
    /// Creates the store and its background work (idle sweeping, Redis
    /// probing), which ends when the store is dropped. Needs a tokio runtime.
    pub fn start(config: StoreConfig) -> Arc<Self> {
        let memory = Arc::new(MemoryStore::new(config.max_clients));
        let redis = (config.kind == StoreKind::Redis)
            .then(|| RedisStore::start(config.urls.clone(), config.timeout, config.max_clients / 2));
        if redis.is_none() {
            metrics::gauge!(m::STORE_UP).set(1.0);
        }
        let budget = Arc::new(ClientBudget::new(config.max_clients));
        tokio::spawn(sweep(
            Arc::downgrade(&memory),
            Arc::downgrade(&budget),
            redis.as_ref().map(Arc::downgrade),
        ));
        Arc::new(Store { config, memory, redis, budget })
    }

    /// Splits `max_clients` for `routes` (a config load or reload): the
    /// limiter's share applies now, as does every live route map's; the maps
    /// of the routes about to be built take theirs through [`Store::budget`].
    pub fn plan_budget(&self, routes: &[crate::config::RouteConfig]) -> Shares {
        let shares = self.budget.plan(self.config.max_clients, self.config.kind, routes);
        match &self.redis {
            // The limiter's share is split between its two maps: the local
            // buckets (`on_failure = "local"`) and the remembered refusals.
            Some(redis) => {
                let refusals = shares.limiter / 2;
                self.memory.set_capacity(shares.limiter - refusals);
                redis.refusals.set_capacity(refusals);
            }
            None => self.memory.set_capacity(shares.limiter),
        }
        shares
    }

    /// The node's budget, which every per-client map of the routes joins.
    pub fn budget(&self) -> &Arc<ClientBudget> {
        &self.budget
    }

    /// Whether the configured store answers (memory always does).
    pub fn is_up(&self) -> bool {
        self.redis.as_ref().is_none_or(|r| r.is_up())
    }

    pub fn kind(&self) -> StoreKind {
        self.config.kind
    }

    /// Decides one request of `client` on `limits`' route. `Err` only when
    /// Redis is unreachable and `on_failure = "deny"`.
    pub async fn check(
        &self,
        limits: &RouteLimits,
        client: &ClientKey,
        now: Instant,
    ) -> Result<Decision, StoreError> {
        match self.check_now(limits, client, now) {
            Some(decided) => decided,
            None => self.check_redis(limits, client, now).await,
        }
    }

    /// The decision when it needs no round trip (the memory store, a refusal
    /// remembered from Redis, Redis down), or `None`: ask Redis
    /// ([`Store::check_redis`]), and nothing else: a `None` may be the one
    /// request let past a remembered refusal that just expired, which asking
    /// again would refuse. The request path decides most requests here
    /// without an `.await`, so its future holds no Redis call.
    pub fn check_now(
        &self,
        limits: &RouteLimits,
        client: &ClientKey,
        now: Instant,
    ) -> Option<Result<Decision, StoreError>> {
        match &self.redis {
            None => Some(Ok(self.check_local(limits, client, now))),
            Some(redis) if redis.is_up() => remembered(redis, limits, client, now).map(Ok),
            Some(_) => Some(self.on_failure(limits, client, now)),
        }
    }

    /// Starts loading the slot [`Store::check_now`] will read for `client` on
    /// `route` into the cache: a hint, sent as soon as the client is known
    /// (`stack::warm`), so this lookup's cache miss overlaps the others'.
    pub fn prefetch(&self, route: &str, client: &ClientKey) {
        match &self.redis {
            Some(redis) if redis.is_up() => redis.refusals.prefetch(route, client),
            _ => self.memory.prefetch(self.memory.key(route, client)),
        }
    }

    /// The Redis decision [`Store::check_now`] could not make.
    pub async fn check_redis(
        &self,
        limits: &RouteLimits,
        client: &ClientKey,
        now: Instant,
    ) -> Result<Decision, StoreError> {
        let Some(redis) = &self.redis else { return Ok(self.check_local(limits, client, now)) };
        let keys = RedisStore::keys(&limits.route, client.as_str(), &limits.identities);
        match redis.check(&keys, &limits.us).await {
            Ok(o) => {
                let d = Decision {
                    allowed: o.allowed,
                    retry_after: Duration::from_micros(o.wait_us),
                    tightest: Some(o.tightest.min(limits.us.len().saturating_sub(1))),
                    remaining: o.remaining,
                    reset: Duration::from_micros(o.reset_us),
                };
                remember(redis, limits, client, now, &d);
                Ok(d)
            }
            Err(e) => {
                tracing::debug!(error = %e, "Redis decision failed; on_failure applies");
                self.on_failure(limits, client, now)
            }
        }
    }

    /// `store.on_failure` for a decision Redis could not make.
    fn on_failure(
        &self,
        limits: &RouteLimits,
        client: &ClientKey,
        now: Instant,
    ) -> Result<Decision, StoreError> {
        match self.config.on_failure {
            OnFailure::Local => Ok(self.check_local(limits, client, now)),
            OnFailure::Allow => Ok(Decision {
                allowed: true,
                retry_after: Duration::ZERO,
                tightest: None,
                remaining: 0,
                reset: Duration::ZERO,
            }),
            OnFailure::Deny => Err(StoreError::Down),
        }
    }

    fn check_local(&self, limits: &RouteLimits, client: &ClientKey, now: Instant) -> Decision {
        let decide = |adopt: Adopt<'_>| match &limits.table {
            Some(table) => table.decide(client, &limits.ns, &limits.ids, now, adopt),
            None => {
                let key = self.memory.key(&limits.route, client);
                self.memory.check_adopting(key, &limits.ns, &limits.ids, self.memory.ticks(now), adopt)
            }
        };
        let o = match limits.moving(now) {
            None => decide(Adopt::Never),
            // Each client asks the previous home once: when its entry here
            // lacks a bucket. What it takes leaves the old home, so a move
            // back within the window finds the buckets here, not a stale copy.
            Some(moved) => decide(Adopt::IfComplete).or_else(|| {
                let left = self.left_in(&moved.from, limits, client, now);
                self.forget_in(&moved.from, limits, client);
                decide(Adopt::From(&left))
            }),
        };
        // Only `Adopt::IfComplete` declines, and its `None` is answered above;
        // a decline here would be a bug, answered as a fresh client would be.
        let o = o.unwrap_or_else(|| gcra::decide(&limits.ns, &mut vec![0; limits.ns.len()], 0));
        Decision {
            allowed: o.allowed,
            retry_after: Duration::from_nanos(o.wait),
            tightest: Some(o.tightest),
            remaining: o.remaining,
            reset: Duration::from_nanos(o.reset),
        }
    }

    /// Forgets `client`'s buckets on `limits`' route in `home`; true when
    /// any were tracked.
    fn forget_in(&self, home: &Home, limits: &RouteLimits, client: &ClientKey) -> bool {
        match home {
            Home::Table(table) => table.forget(client),
            Home::Store => self.memory.remove(self.memory.key(&limits.route, client)),
        }
    }

    /// The `tat` `home` holds for `client` on each of `limits`, and `now` on
    /// that home's clock; `None` when the client has no entry there.
    fn tats_in(
        &self,
        home: &Home,
        limits: &RouteLimits,
        client: &ClientKey,
        now: Instant,
    ) -> Option<(Vec<u64>, u64)> {
        match home {
            Home::Table(table) => table.peek(client, &limits.ids, now),
            Home::Store => self
                .memory
                .peek(self.memory.key(&limits.route, client))
                .map(|entry| (limits.ids.iter().map(|&id| entry.of(id)).collect(), self.memory.ticks(now))),
        }
    }

    /// What `home` holds for `client` on each of `limits`: ticks until each
    /// bucket is full again (0: full or unknown). Times as distances, since
    /// each table keeps its own clock.
    fn left_in(&self, home: &Home, limits: &RouteLimits, client: &ClientKey, now: Instant) -> Vec<u64> {
        let (tats, at) = self.tats_in(home, limits, client, now).unwrap_or_default();
        (0..limits.ids.len()).map(|i| tats.get(i).map_or(0, |&t| t.saturating_sub(at))).collect()
    }

    /// The client's state on each limit, or `None` when nothing is tracked.
    pub async fn peek(
        &self,
        limits: &RouteLimits,
        client: &ClientKey,
        now: Instant,
    ) -> Option<Vec<LimitState>> {
        let (tats, now_ticks, gcras) = match &self.redis {
            Some(redis) if redis.is_up() => {
                let keys = RedisStore::keys(&limits.route, client.as_str(), &limits.identities);
                let (now, tats) = redis.peek(&keys).await.ok()?;
                (tats, now, &limits.us)
            }
            _ => {
                let here = self.tats_in(&limits.home(), limits, client, now);
                // A bucket not yet taken from the previous home of a recent
                // move is where the next decision will find it.
                let (mut tats, at) = here.unwrap_or_else(|| (vec![0; limits.ids.len()], 1));
                if let Some(moved) = limits.moving(now) {
                    let left = self.left_in(&moved.from, limits, client, now);
                    for (t, &left) in tats.iter_mut().zip(&left) {
                        if *t <= at && left > 0 {
                            *t = at + left;
                        }
                    }
                }
                (tats, at, &limits.ns)
            }
        };
        if tats.iter().all(|&t| t <= now_ticks) {
            return None;
        }
        let tick = if gcras.as_ptr() == limits.us.as_ptr() { 1_000 } else { 1 };
        Some(
            limits
                .limits
                .iter()
                .zip(gcras)
                .zip(&tats)
                .map(|((l, g), &tat)| LimitState {
                    rate: l.rate.to_string(),
                    burst: l.burst.get(),
                    remaining: g.remaining(tat, now_ticks),
                    full_in_s: Duration::from_nanos(g.reset(tat, now_ticks).saturating_mul(tick))
                        .as_secs_f64(),
                })
                .collect(),
        )
    }

    /// Resets the client on the route (in Redis, in this node's memory and
    /// refusal memory, and in every other replica's refusal memory through
    /// pub/sub). Returns whether anything was tracked.
    pub async fn reset(&self, limits: &RouteLimits, client: &ClientKey) -> bool {
        // The route's home, and the one its buckets left in a recent move,
        // which the client's next decision would take them back from.
        let mut found = self.forget_in(&limits.home(), limits, client);
        if let Some(moved) = &limits.moved {
            found |= self.forget_in(&moved.from, limits, client);
        }
        if let Some(redis) = &self.redis {
            found |= redis.refusals.forget(&limits.route, client);
            let keys = RedisStore::keys(&limits.route, client.as_str(), &limits.identities);
            found |= redis.delete(&keys).await.is_ok_and(|n| n > 0);
            redis.announce_reset(&limits.route, client.as_str()).await;
        }
        found
    }

    /// Per-client entries held in this node's memory: the limiter's and
    /// every route's storm and auth guard maps, which `max_clients` caps together.
    pub fn tracked(&self) -> usize {
        self.memory.len() + self.budget.tracked() + self.redis.as_ref().map_or(0, |r| r.refusals.len())
    }

    /// Bytes the node's per-client tables hold, slack included: the
    /// limiter's, the remembered refusals' and every route's.
    pub fn bytes(&self) -> usize {
        self.memory.bytes() + self.budget.bytes() + self.redis.as_ref().map_or(0, |r| r.refusals.bytes())
    }

    /// The limiter's entries alone.
    pub fn tracked_limiter(&self) -> usize {
        self.memory.len()
    }
}

/// A refusal Redis decided for this client and these limits that still holds:
/// answered here, at no cost to Redis (see [`refusals`]).
fn remembered(
    redis: &RedisStore,
    limits: &RouteLimits,
    client: &ClientKey,
    now: Instant,
) -> Option<Decision> {
    let r = redis.refusals.get(&limits.route, client, refusals::fingerprint(&limits.ids), now)?;
    Some(Decision {
        allowed: false,
        retry_after: r.retry_after,
        tightest: Some(r.tightest),
        remaining: 0,
        reset: r.reset,
    })
}

/// Remembers a refusal Redis decided, until its retry time; and an admission
/// that took the tightest limit's last token, as a refusal until its next
/// token (`refusals.rs`).
fn remember(redis: &RedisStore, limits: &RouteLimits, client: &ClientKey, now: Instant, d: &Decision) {
    let Some(tightest) = d.tightest else { return };
    let retry_after = match (d.allowed, d.remaining, limits.us.get(tightest)) {
        (false, _, _) => d.retry_after,
        (true, 0, Some(g)) => next_token(g, d.reset),
        (true, _, _) => {
            redis.refusals.admitted(&limits.route, client);
            return;
        }
    };
    let refused = refusals::Remembered { retry_after, reset: d.reset, tightest };
    redis.refusals.remember(&limits.route, client, refusals::fingerprint(&limits.ids), now, refused);
}

/// How long after a decision that left `reset` until the bucket is full the
/// next request can pass limit `g` (GCRA, in microseconds as Redis keeps
/// them): `reset + T − b·T`, zero when a token is left.
fn next_token(g: &Gcra, reset: Duration) -> Duration {
    let reset_us = u64::try_from(reset.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(reset_us.saturating_add(g.interval).saturating_sub(g.capacity))
}

/// Drops idle clients every few seconds and publishes `levee_tracked_clients`
/// (every per-client entry of the node, the number `max_clients` caps).
async fn sweep(memory: Weak<MemoryStore>, budget: Weak<ClientBudget>, redis: Option<Weak<RedisStore>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        let (Some(memory), Some(budget)) = (memory.upgrade(), budget.upgrade()) else { return };
        if n % 5 == 0 {
            memory.sweep(memory.ticks(Instant::now())).await;
        }
        n += 1;
        let refusals = redis.as_ref().and_then(Weak::upgrade).map_or(0, |r| r.refusals.len());
        metrics::gauge!(m::TRACKED_CLIENTS).set((memory.len() + budget.tracked() + refusals) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_the_last_token_the_next_passes_one_interval_later() {
        // 10/s burst 3, in microseconds as Redis keeps them: T = 100 ms, capacity 300 ms.
        let limit = Limit { rate: "10/s".parse().unwrap(), burst: std::num::NonZeroU32::new(3).unwrap() };
        let g = Gcra::new(&limit, Duration::from_micros(1));
        let (mut tat, now) = (0u64, 1_000_000u64);
        for _ in 0..3 {
            match g.check(tat, now) {
                gcra::Verdict::Allow { tat: t } => tat = t,
                gcra::Verdict::Deny { .. } => panic!("the burst passes"),
            }
        }
        assert_eq!(g.remaining(tat, now), 0);
        let wait = next_token(&g, Duration::from_micros(g.reset(tat, now)));
        assert_eq!(wait, Duration::from_millis(100));
        let at = now + u64::try_from(wait.as_micros()).unwrap();
        assert!(matches!(g.check(tat, at - 1), gcra::Verdict::Deny { .. }), "refused just before");
        assert!(matches!(g.check(tat, at), gcra::Verdict::Allow { .. }), "admitted from then on");
    }
}
