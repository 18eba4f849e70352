//! The Redis store: several gateways, one limit.
//!
//! One `EVALSHA` of `gcra.lua` per decision evaluates every limit of one client
//! on one route atomically; each limit's state is one key holding its GCRA `tat`
//! and expiring by itself when the bucket is full again. A key names its
//! limit's identity, not its position (`levee:{route:client}:2/s:b4`), so a
//! reload that reorders limits finds each limit's own state. The keys of a
//! client share a hash tag (`{route:client}`), so the script runs on one node
//! of a Redis Cluster. Connections are multiplexed: every concurrent decision
//! shares one pipelined connection per node.
//!
//! Failure handling is a small breaker around the store: a decision waits at
//! most `store.timeout`; the first error that means "not serving" or timeout
//! marks the store down, after which requests stop trying Redis at all (no
//! stall) while a background task probes it every 250 ms and marks it up again
//! when it answers. "Not serving" is a connection error, a timeout, or a reply
//! from a server that cannot take the decision ([`not_serving`]): read-only
//! (a demoted master), out of memory, loading, master or cluster down, busy
//! with a script. The probe is a real decision on a probe key, not a `PING`:
//! a read-only or full server answers `PING` and refuses every write. It
//! writes in the slot of the last decision that failed, so on a Redis Cluster
//! the store is up again when that part of the cluster answers (a killed
//! master's replica has taken over), not as soon as any master does.
//!
//! A decision takes a fast lane when it can ([`direct`]): its own pipelined
//! connection per master, a third of the crate's cost per decision. The lane
//! takes only the happy path; anything else (an error reply, a closed
//! connection) is asked again through the crate, so the failure handling
//! above is the crate's. After a failover the prober builds a new lane from
//! the cluster's new slot map.
//!
//! Refusals cost Redis nothing: a refusal Redis decided is remembered on the
//! node until its retry time ([`Refusals`]). An admin reset forgets it here and
//! publishes the (route, client) on [`RESET_CHANNEL`]; every node subscribes
//! (one node of a cluster is enough: classic pub/sub reaches every node) and
//! forgets it too. After any gap in the subscription a reset may have been
//! missed, so the node forgets every refusal when it (re)subscribes.

mod direct;
pub mod resp;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::Script;

use self::direct::{Lane, LaneError};
use super::gcra::Gcra;
use super::refusals::Refusals;
use super::StoreError;
use crate::config::MAX_LIMITS;
use crate::context::ClientKey;
use crate::metrics as m;

const PROBE_EVERY: Duration = Duration::from_millis(250);

/// The pub/sub channel on which a reset reaches every replica.
pub const RESET_CHANNEL: &str = "levee:reset";

/// How often the subscriber checks its connection (and the store's life).
const SUBSCRIBER_PING_EVERY: Duration = Duration::from_secs(2);

const PEEK: &str = r"
local t = redis.call('TIME')
local r = {tonumber(t[1]) * 1000000 + tonumber(t[2])}
for i = 1, #KEYS do r[i + 1] = tonumber(redis.call('GET', KEYS[i]) or '0') or 0 end
return r";

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// What one decision returned, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct RedisOutcome {
    pub allowed: bool,
    pub wait_us: u64,
    pub tightest: usize,
    pub remaining: u32,
    pub reset_us: u64,
}

pub struct RedisStore {
    urls: Vec<String>,
    conn: ArcSwapOption<Conn>,
    /// The decisions' fast lane, when built and not failed.
    lane: ArcSwapOption<Lane>,
    /// Set when the URLs name something the lane cannot speak (TLS, a Unix
    /// socket): decisions then always go through the crate.
    lane_off: AtomicBool,
    /// A lane is being built (by a task of its own, so that the probe never
    /// waits for it).
    lane_building: AtomicBool,
    up: AtomicBool,
    timeout: Duration,
    gcra: Script,
    peek: Script,
    /// Refusals Redis decided, until their retry time.
    pub refusals: Refusals,
    /// The hash tag of the last decision that failed: the probe writes in its
    /// slot, so that on a cluster the store is up again when the part that
    /// failed answers, not when any master does.
    failed_tag: std::sync::Mutex<Option<String>>,
}

impl RedisStore {
    /// Creates the store (down until the first connection succeeds) and starts
    /// its connector/prober, which ends when the store is dropped.
    pub fn start(urls: Vec<String>, timeout: Duration, max_refusals: usize) -> Arc<Self> {
        let store = Arc::new(RedisStore {
            urls,
            conn: ArcSwapOption::empty(),
            lane: ArcSwapOption::empty(),
            lane_off: AtomicBool::new(false),
            lane_building: AtomicBool::new(false),
            up: AtomicBool::new(false),
            timeout,
            gcra: Script::new(include_str!("gcra.lua")),
            peek: Script::new(PEEK),
            refusals: Refusals::new(max_refusals, timeout),
            failed_tag: std::sync::Mutex::new(None),
        });
        metrics::gauge!(m::STORE_UP).set(0.0);
        tokio::spawn(probe(Arc::downgrade(&store)));
        tokio::spawn(subscribe(Arc::downgrade(&store)));
        store
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn mark(&self, up: bool, why: &str) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            metrics::gauge!(m::STORE_UP).set(if up { 1.0 } else { 0.0 });
            if up {
                // Redis may have lost state meanwhile (a restart, a failover
                // before replication): its word from before no longer holds.
                self.refusals.clear();
                tracing::info!(urls = ?self.urls, "Redis store is up: limits are shared again");
            } else {
                // The prober builds a new one when the store is up again:
                // after a failover, to the new masters.
                if let Some(lane) = self.lane.load().as_ref() {
                    lane.kill();
                }
                tracing::warn!(urls = ?self.urls, error = why, "Redis store is down: on_failure applies");
            }
        }
    }

    /// Redis keys of one client on one route, one per limit (by identity,
    /// see [`super::identity`]).
    /// (Pieces pushed, not `format!`: a tenth of its cost, on every decision.)
    pub fn keys(route: &str, client: &str, identities: &[String]) -> Vec<String> {
        identities
            .iter()
            .map(|id| {
                let mut key = String::with_capacity(10 + route.len() + client.len() + id.len());
                for piece in ["levee:{", route, ":", client, "}:", id] {
                    key.push_str(piece);
                }
                key
            })
            .collect()
    }

    /// One decision. Fails fast when the store is down.
    pub async fn check(&self, keys: &[String], limits: &[Gcra]) -> Result<RedisOutcome, StoreError> {
        let mut conn = self.connection()?;
        let n = keys.len().min(limits.len()).min(MAX_LIMITS);
        let mut args = [0u64; 2 * MAX_LIMITS];
        for (pair, g) in args.chunks_exact_mut(2).zip(&limits[..n]) {
            pair.copy_from_slice(&[g.interval, g.capacity]);
        }
        let decide = async {
            if let Some(lane) = self.lane.load_full().filter(|l| l.alive()) {
                if let Some(reply) = lane.evalsha(self.gcra.get_hash(), &keys[..n], &args[..2 * n]).await {
                    return Ok(reply);
                }
            }
            let mut inv = self.gcra.prepare_invoke();
            for (k, pair) in keys[..n].iter().zip(args.chunks_exact(2)) {
                inv.key(k).arg(pair[0]).arg(pair[1]);
            }
            inv.invoke_async::<Vec<i64>>(&mut conn).await
        };
        let reply: Vec<i64> = match self.guard(decide).await {
            Ok(reply) => reply,
            Err(e) => {
                if let Some(tag) = keys.first().and_then(|k| resp::hash_tag(k)) {
                    *self.failed_tag.lock().unwrap_or_else(|p| p.into_inner()) = Some(tag.to_string());
                }
                return Err(e);
            }
        };
        match reply.as_slice() {
            [allowed, wait, tightest, remaining, reset] => Ok(RedisOutcome {
                allowed: *allowed == 1,
                wait_us: u64::try_from(*wait).unwrap_or(0),
                tightest: usize::try_from(*tightest).unwrap_or(0),
                remaining: u32::try_from(*remaining).unwrap_or(0),
                reset_us: u64::try_from(*reset).unwrap_or(0),
            }),
            _ => Err(StoreError::Protocol(format!("unexpected reply {reply:?}"))),
        }
    }

    /// Redis's clock and each limit's `tat` (0 when absent), microseconds.
    pub async fn peek(&self, keys: &[String]) -> Result<(u64, Vec<u64>), StoreError> {
        let mut conn = self.connection()?;
        let mut inv = self.peek.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        let reply: Vec<i64> = self.guard(inv.invoke_async(&mut conn)).await?;
        let mut it = reply.into_iter().map(|v| u64::try_from(v).unwrap_or(0));
        let now = it.next().ok_or_else(|| StoreError::Protocol("empty reply".into()))?;
        Ok((now, it.collect()))
    }

    /// Deletes the keys; returns how many existed.
    pub async fn delete(&self, keys: &[String]) -> Result<u64, StoreError> {
        let mut conn = self.connection()?;
        let mut cmd = redis::cmd("DEL");
        for k in keys {
            cmd.arg(k);
        }
        self.guard(cmd.query_async(&mut conn)).await
    }

    /// Tells every replica (and this node, through its own subscription) that
    /// `client` was reset on `route`. Best effort: a replica that misses it
    /// forgets all its refusals when it subscribes again.
    pub async fn announce_reset(&self, route: &str, client: &str) {
        let Ok(mut conn) = self.connection() else { return };
        let message = serde_json::json!({ "route": route, "client": client }).to_string();
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(RESET_CHANNEL).arg(message);
        if let Err(e) = self.guard(cmd.query_async::<i64>(&mut conn)).await {
            tracing::warn!(error = %e, "could not announce a reset to the other replicas");
        }
    }

    fn connection(&self) -> Result<Conn, StoreError> {
        if !self.is_up() {
            return Err(StoreError::Down);
        }
        self.conn.load_full().map(|c| (*c).clone()).ok_or(StoreError::Down)
    }

    /// Bounds a call by the store timeout; a connection-level failure marks the store down.
    async fn guard<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if not_serving(&e) {
                    self.mark(false, &e.to_string());
                }
                Err(StoreError::Redis(e.to_string()))
            }
            Err(_) => {
                self.mark(false, "timeout");
                Err(StoreError::Timeout(self.timeout))
            }
        }
    }

    async fn connect(&self) -> redis::RedisResult<Conn> {
        if self.urls.len() > 1 {
            let client = redis::cluster::ClusterClient::builder(self.urls.clone())
                .connection_timeout(Duration::from_secs(1))
                .response_timeout(self.timeout.max(Duration::from_millis(100)))
                .build()?;
            Ok(Conn::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(self.urls[0].as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(self.timeout.max(Duration::from_millis(100))))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            Ok(Conn::Single(ConnectionManager::new_with_config(client, config).await?))
        }
    }

    /// Builds the decisions' fast lane: to the one server, or to every
    /// master of the cluster's current slot map (asked through the crate).
    async fn build_lane(&self) -> Result<Lane, LaneError> {
        if self.urls.len() == 1 {
            return Lane::single(&self.urls[0]).await;
        }
        let Some(conn) = self.conn.load_full() else {
            return Err(LaneError::SlotMap("not connected".into()));
        };
        let mut conn = (*conn).clone();
        let mut slots = redis::cmd("CLUSTER");
        slots.arg("SLOTS");
        let map = tokio::time::timeout(Duration::from_secs(1), slots.query_async::<redis::Value>(&mut conn))
            .await
            .map_err(|_| LaneError::SlotMap("timed out".into()))?
            .map_err(|e| LaneError::SlotMap(e.to_string()))?;
        Lane::cluster(&self.urls[0], map).await
    }

    /// Builds a lane (the prober calls it when the store is up and has none
    /// that works); true when one was built. A URL the lane cannot speak
    /// turns it off for good.
    async fn refresh_lane(&self) -> bool {
        match tokio::time::timeout(Duration::from_secs(3), self.build_lane()).await {
            Ok(Ok(lane)) => {
                self.lane.store(Some(Arc::new(lane)));
                tracing::debug!(urls = ?self.urls, "Redis fast lane built");
                true
            }
            Ok(Err(LaneError::Unsupported(url))) => {
                self.lane_off.store(true, Ordering::Relaxed);
                tracing::info!(
                    url,
                    "decisions go through the redis crate: the fast lane speaks plain TCP only"
                );
                false
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "Redis fast lane not built; decisions go through the crate meanwhile");
                false
            }
            Err(_) => {
                tracing::debug!("Redis fast lane timed out; decisions go through the crate meanwhile");
                false
            }
        }
    }

    /// Whether decisions take the fast lane now (for tests and the curious).
    pub fn lane_ready(&self) -> bool {
        self.lane.load().as_ref().is_some_and(|l| l.connected())
    }

    /// Whether Redis takes a decision again: one run of the GCRA script on a
    /// probe key (a write, so a read-only or full server does not pass).
    async fn ping(&self) -> bool {
        let Some(conn) = self.conn.load_full() else { return false };
        let mut conn = (*conn).clone();
        let tag = self.failed_tag.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let key = format!("levee:{{{}}}:up", tag.as_deref().unwrap_or("probe"));
        let mut inv = self.gcra.prepare_invoke();
        // Expires within a second by itself (its capacity is 1 s).
        inv.key(key).arg(1).arg(1_000_000);
        let probe = inv.invoke_async::<Vec<i64>>(&mut conn);
        matches!(tokio::time::timeout(Duration::from_secs(1), probe).await, Ok(Ok(_)))
    }
}

/// Whether an error means Redis is not serving decisions (the store goes down
/// and `on_failure` applies) rather than one bad call. By kind where the crate
/// has one; `OOM` and `BUSY` have none, so by the server's error code.
/// `NOSCRIPT` is not here: the script invocation reloads the script itself.
pub fn not_serving(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind as S};
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error() {
        return true;
    }
    match e.kind() {
        ErrorKind::Server(S::ReadOnly | S::BusyLoading | S::MasterDown | S::ClusterDown | S::TryAgain) => {
            true
        }
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound => true,
        _ => matches!(e.code(), Some("OOM" | "BUSY" | "READONLY" | "LOADING" | "MASTERDOWN")),
    }
}

/// Follows resets announced on [`RESET_CHANNEL`] for as long as the store
/// lives: one subscription at a time, to one of `urls` in turn, reconnecting
/// with a backoff (100 ms doubling to 5 s) when it fails or stops answering.
async fn subscribe(store: Weak<RedisStore>) {
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    let mut backoff = Duration::from_millis(100);
    for attempt in 0usize.. {
        let Some(url) = store.upgrade().map(|s| s.urls[attempt % s.urls.len()].clone()) else { return };
        match tokio::time::timeout(Duration::from_secs(2), subscription(&url)).await {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(100);
                // Resets may have been announced while nobody listened here.
                let Some(s) = store.upgrade() else { return };
                s.refusals.clear();
                drop(s);
                follow(&store, pubsub).await;
                tracing::debug!(url, "reset subscription lost; resubscribing");
            }
            Ok(Err(e)) => tracing::debug!(url, error = %e, "reset subscription failed"),
            Err(_) => tracing::debug!(url, "reset subscription timed out"),
        }
        if store.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn subscription(url: &str) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = redis::Client::open(url)?.get_async_pubsub().await?;
    pubsub.subscribe(RESET_CHANNEL).await?;
    Ok(pubsub)
}

/// Applies reset messages until the connection ends, stops answering a ping,
/// or the store is dropped.
async fn follow(store: &Weak<RedisStore>, pubsub: redis::aio::PubSub) {
    use futures_util::StreamExt;
    let (mut sink, mut stream) = pubsub.split();
    let mut tick = tokio::time::interval(SUBSCRIBER_PING_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return };
                let Some(s) = store.upgrade() else { return };
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(msg.get_payload_bytes()) else {
                    tracing::debug!("ignoring a malformed reset message");
                    continue;
                };
                if let (Some(route), Some(client)) = (v["route"].as_str(), v["client"].as_str()) {
                    s.refusals.forget(route, &ClientKey::from_text(client));
                }
            }
            _ = tick.tick() => {
                if store.strong_count() == 0 {
                    return;
                }
                let ping = sink.ping::<redis::Value>();
                if !matches!(tokio::time::timeout(Duration::from_secs(2), ping).await, Ok(Ok(_))) {
                    return;
                }
            }
        }
    }
}

/// Connects, then watches: while the store is down, ping every `PROBE_EVERY`.
/// Also drops refusals whose retry time has passed, every few seconds.
async fn probe(store: Weak<RedisStore>) {
    for n in 0u64.. {
        let Some(s) = store.upgrade() else { return };
        if n % 20 == 0 {
            s.refusals.sweep(tokio::time::Instant::now()).await;
        }
        if s.conn.load().is_none() {
            match tokio::time::timeout(Duration::from_secs(2), s.connect()).await {
                Ok(Ok(conn)) => {
                    s.conn.store(Some(Arc::new(conn)));
                    s.mark(true, "");
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "Redis connect failed"),
                Err(_) => tracing::debug!("Redis connect timed out"),
            }
        } else if !s.is_up() && s.ping().await {
            s.mark(true, "");
        }
        if s.is_up()
            && !s.lane_ready()
            && !s.lane_off.load(Ordering::Relaxed)
            && !s.lane_building.swap(true, Ordering::Relaxed)
        {
            let s = s.clone();
            tokio::spawn(async move {
                if !s.refresh_lane().await {
                    // Once a second while it fails.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                s.lane_building.store(false, Ordering::Relaxed);
            });
        }
        drop(s);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

// === impl ConnectionLike for Conn ===

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
