//! Stage 3c: storm defence. Callback bombs (a client whose rate keeps
//! multiplying, `growth.rs`) and retry storms (the same request re-sent while
//! the last one is in flight or just failed, `duplicates.rs`). Also watches the
//! route's whole rate: when the aggregate keeps multiplying (the whole fleet has
//! the bug) the route alarms, and a client needs a single growth, not a streak,
//! to be quarantined, so the fastest-growing clients go first.
//!
//! Bounds: per-client state lives in the route's client table (a client's
//! growth shares its entry with the auth guard's record, [`RouteClients`]) and
//! in the detector's table of requests in flight or failed; each is capped at
//! its share of `store.max_clients`, the node's one budget
//! ([`crate::store::budget`]). A sweeper drops idle entries every second and
//! publishes the quarantine gauges. Cost on the request path: two map
//! operations and a few atomics.
//!
//! In `mode = "shadow"` the detector decides exactly as when it enforces (the
//! same counts, quarantines and relapse doubling: a request it would shed is
//! recorded as a shed, never as in flight or finished) and the stage reports
//! it ([`super::shadow`]) and forwards the request. The mode is the live
//! config's, not the detector's: a reload that only switches the mode keeps
//! the detector and every quarantine.

pub mod duplicates;
pub mod growth;

use std::future::{ready, Future};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{Either, FutureExt};
use http::Request;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::clients::{Authorized, RouteClients};
use super::shadow::Shadow;
use super::{Answer, Next, Stage, StageFuture};
use crate::body::{self, Body};
use crate::classify::Outcome;
use crate::config::{Mode, StormConfig};
use crate::context::{ClientKey, RequestContext};
use crate::metrics as m;
use crate::respond::{Reason, Shed};
use crate::store::budget::Tracked;
use crate::store::clock::ClockMap;
use duplicates::{Dup, DupRules};
use growth::{Growth, GrowthRules, RouteGrowth, Verdict};

/// Bodies up to this size are part of a request's fingerprint (they are read
/// before forwarding); larger or unsized bodies are left out of it.
pub const MAX_HASHED_BODY: u64 = 8 * 1024;

/// The storm detector of one route.
pub struct Storm {
    route: Arc<str>,
    pub config: StormConfig,
    growth: GrowthRules,
    dups: DupRules,
    /// This detector's name on the growth records it writes ([`Growth::owner`]).
    id: u16,
    clients: Arc<RouteClients>,
    requests: Arc<ClockMap<Dup>>,
    route_growth: RouteGrowth,
    alarm: AtomicBool,
    /// Fingerprints' seed.
    seed: foldhash::fast::RandomState,
    /// Published by the sweeper: quarantined clients by kind.
    bombs: AtomicUsize,
    storms: AtomicUsize,
}

impl Storm {
    /// A detector for `route`, keeping its clients' growth in the route's
    /// `clients` table, its table of requests capped at `max_clients` (its
    /// share of the node's budget; see [`Storm::budget_map`]); its sweeper
    /// ends when the detector is dropped.
    pub fn start(
        route: &str,
        config: &StormConfig,
        clients: Arc<RouteClients>,
        max_clients: usize,
    ) -> Arc<Self> {
        static IDS: AtomicU16 = AtomicU16::new(1);
        let interval_ms = u64::try_from(config.interval.as_millis()).unwrap_or(u64::MAX).max(1);
        let min_count = (config.min_rate.per_second() * interval_ms as f64 / 1000.0).ceil().max(1.0) as u32;
        let quarantine_ms = u64::try_from(config.quarantine.as_millis()).unwrap_or(u64::MAX).max(1);
        let storm = Arc::new(Storm {
            route: Arc::from(route),
            growth: GrowthRules {
                interval_ms,
                factor: config.growth_factor,
                intervals: u8::try_from(config.growth_intervals).unwrap_or(u8::MAX),
                min_count,
                quarantine_ms,
            },
            dups: DupRules {
                window_ms: u64::try_from(config.duplicate_window.as_millis()).unwrap_or(u64::MAX).max(1),
                max_duplicates: config.max_duplicates,
                max_backoff_ms: quarantine_ms,
            },
            // Never 0 (no owner), even after wrapping.
            id: IDS.fetch_add(1, Ordering::Relaxed).max(1),
            clients,
            requests: Arc::new(ClockMap::new(max_clients)),
            route_growth: RouteGrowth::default(),
            alarm: AtomicBool::new(false),
            seed: foldhash::fast::RandomState::default(),
            bombs: AtomicUsize::new(0),
            storms: AtomicUsize::new(0),
            config: config.clone(),
        });
        tokio::spawn(sweep(Arc::downgrade(&storm)));
        storm
    }

    fn ms(&self, now: Instant) -> u64 {
        self.clients.ms(now)
    }

    /// The client's growth, if this detector wrote it.
    fn growth_of(&self, client: &ClientKey) -> Option<Growth> {
        self.clients.peek(client).map(|c| c.growth).filter(|g| g.owner == self.id)
    }

    /// A request's fingerprint: method, path, query and (small) body.
    pub fn fingerprint(
        &self,
        client: &ClientKey,
        method: &http::Method,
        uri: &http::Uri,
        body: Option<&[u8]>,
    ) -> u64 {
        let mut h = self.seed.build_hasher();
        h.write_u64(client.hash64());
        h.write(method.as_str().as_bytes());
        // Path and query as one slice (as they arrived: `/a?b`), one write.
        h.write(uri.path_and_query().map_or(uri.path(), |pq| pq.as_str()).as_bytes());
        if let Some(b) = body {
            h.write_u8(0);
            h.write(b);
        }
        h.finish()
    }

    /// Decides one request: `Err` sheds it, `Ok` admits it (then call
    /// [`Storm::finish`]) with the auth guard's record of the client as its
    /// entry held it, which the request carries to the guard ([`Authorized`]).
    pub fn observe(&self, client: &ClientKey, fingerprint: u64, now: Instant) -> Result<Authorized, Shed> {
        let now_ms = self.ms(now);
        let streak = self.route_growth.observe(&self.growth, now_ms, client.hash64());
        let alarm = streak >= u32::from(self.growth.intervals);
        if super::flipped(&self.alarm, alarm) {
            metrics::gauge!(m::STORM_ROUTE_ALARM, "route" => self.route.to_string()).set(if alarm {
                1.0
            } else {
                0.0
            });
            if alarm {
                tracing::warn!(route = %self.route, streak, "the route's total rate keeps multiplying: shedding its fastest-growing clients first");
            } else {
                tracing::info!(route = %self.route, "the route's total rate stopped multiplying");
            }
        }
        let needed = if alarm { 1 } else { self.growth.intervals };
        let (verdict, authorized) = self.clients.with(client, |c| {
            if c.growth.owner != self.id {
                c.growth = Growth::new(self.id);
            }
            (self.growth.observe(&mut c.growth, now_ms, needed), c.authorized())
        });
        match verdict {
            Verdict::Pass => {}
            Verdict::Quarantined { left_ms, new } => {
                if new {
                    // No client key at info/warn (SPEC, admin rules): the key is in the admin API's top offenders.
                    tracing::warn!(route = %self.route, quarantine_ms = left_ms, "callback bomb: a client quarantined");
                    tracing::debug!(route = %self.route, client = client.as_str(), quarantine_ms = left_ms, "callback bomb: client quarantined");
                }
                return Err(Shed::new(Reason::CallbackBomb)
                    .retry_after(Duration::from_millis(left_ms))
                    .detail(
                        "your request rate keeps multiplying; this client is quarantined on this route",
                    ));
            }
        }
        if let Some(backoff_ms) = self.requests.with(fingerprint, |d| self.dups.arrive(d, now_ms)) {
            return Err(Shed::new(Reason::RetryStorm)
                .retry_after(Duration::from_millis(backoff_ms))
                .detail("the same request was re-sent too often while failing or in flight; back off"));
        }
        Ok(authorized)
    }

    /// The admitted request with `fingerprint` finished. A fingerprint with
    /// nothing in flight and no failure holds nothing: the next arrival of it
    /// decides exactly as on a fresh entry (polling is never a retry), so its
    /// slot goes now. The table then holds requests in flight and recent
    /// failures, not every request of every client.
    pub fn finish(&self, fingerprint: u64, failed: bool) {
        self.requests.update_or_remove(fingerprint, |d| {
            self.dups.finish(d, failed);
            d.in_flight > 0 || d.failed
        });
    }

    /// The table of requests, for the node's budget to cap and count (the
    /// route's client table joins it on its own).
    pub fn budget_map(&self) -> Arc<dyn Tracked> {
        self.requests.clone()
    }

    /// Whether the route's aggregate rate is multiplying.
    pub fn alarming(&self) -> bool {
        self.alarm.load(Ordering::Relaxed)
    }

    pub fn route(&self) -> &str {
        &self.route
    }

    /// Quarantined clients now: (callback bombs, retry storms).
    pub fn quarantined(&self) -> (usize, usize) {
        (self.bombs.load(Ordering::Relaxed), self.storms.load(Ordering::Relaxed))
    }

    /// The client's storm state, for the admin API; `None` when not tracked.
    pub fn client_state(&self, client: &ClientKey, now: Instant) -> Option<serde_json::Value> {
        let g = self.growth_of(client)?;
        let now_ms = self.ms(now);
        let left = g.quarantined_until().saturating_sub(now_ms);
        Some(serde_json::json!({
            "requests_this_interval": g.cur,
            "requests_last_interval": g.prev,
            "growth_streak": g.streak,
            "quarantined_for_s": left as f64 / 1000.0,
            "relapses": g.strikes,
        }))
    }

    /// Lifts the client's quarantine and forgets its growth; true when it
    /// was tracked. The auth guard's record of it stays.
    pub fn reset(&self, client: &ClientKey) -> bool {
        let mut tracked = false;
        self.clients.update_or_remove(client, |c| {
            tracked = c.growth.owner == self.id;
            if tracked {
                c.growth = Growth::default();
            }
            !c.is_empty()
        });
        tracked
    }
}

/// Drops idle state every second and publishes the quarantine gauges.
async fn sweep(storm: Weak<Storm>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(s) = storm.upgrade() else { return };
        let now = Instant::now();
        let (now_ms, ticks) = (s.ms(now), s.clients.ticks(now));
        let (interval, window) = (s.growth.interval_ms, s.dups.window_ms);
        let bombs = AtomicUsize::new(0);
        s.clients
            .retain_yielding(|c| {
                let (g, until) = (&c.growth, c.growth.quarantined_until());
                let mine = g.owner == s.id;
                let quarantined = mine && until > now_ms;
                bombs.fetch_add(usize::from(quarantined), Ordering::Relaxed);
                // Keep what can still matter: a quarantine (and its relapse
                // window), recent counts, the auth guard's record, or a
                // bucket of the route's limits not yet full. (A growth
                // record kept only for the guard decides as a fresh one: its
                // interval is long past and its quarantine beyond relapse.)
                let recent = u64::from(g.interval).saturating_add(2).saturating_mul(interval) >= now_ms;
                let relapse = until != 0 && until.saturating_add(s.growth.relapse_window_ms()) > now_ms;
                (mine && (quarantined || recent || relapse))
                    || s.clients.authorized_lately(c, now_ms)
                    || c.buckets.live(ticks)
            })
            .await;
        let storms = AtomicUsize::new(0);
        s.requests
            .retain_yielding(|d| {
                let active = now_ms.saturating_sub(d.last_seen) <= window;
                storms.fetch_add(usize::from(active && d.retries > s.dups.max_duplicates), Ordering::Relaxed);
                active || d.in_flight > 0
            })
            .await;
        let (bombs, storms) = (bombs.into_inner(), storms.into_inner());
        s.bombs.store(bombs, Ordering::Relaxed);
        s.storms.store(storms, Ordering::Relaxed);
        let route = s.route.to_string();
        metrics::gauge!(m::STORM_QUARANTINED, "route" => route.clone(), "kind" => "callback_bomb")
            .set(bombs as f64);
        metrics::gauge!(m::STORM_QUARANTINED, "route" => route, "kind" => "retry_storm").set(storms as f64);
    }
}

// === the stage ===

/// The stage: observes each request before any state is spent on it.
pub struct Detect {
    storm: Arc<Storm>,
    /// The live config's `mode` (the detector may be an older config's).
    mode: Mode,
    report: Arc<Shadow>,
}

impl Detect {
    /// `None` when `[routes.storm] enabled = false`: the stage is then absent.
    pub fn new(storm: Option<Arc<Storm>>, mode: Mode, report: Arc<Shadow>) -> Option<Self> {
        storm.filter(|s| s.config.enabled).map(|storm| Detect { storm, mode, report })
    }
}

/// Marks the request finished even if the client goes away mid-flight.
struct InFlight<'a> {
    storm: &'a Storm,
    fingerprint: u64,
    failed: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.storm.finish(self.fingerprint, self.failed);
    }
}

impl Stage for Detect {
    /// A request without a body to hash is observed without an `.await`, so
    /// its future is the next stage's and a guard; one whose body must be
    /// read first takes a boxed path.
    fn call<'a, N: Next>(
        &'a self,
        req: Request<Body>,
        cx: &'a RequestContext,
        next: &'a N,
    ) -> impl Future<Output = Answer> + Send + 'a {
        // Who (and when: `stack::identity`), and whether there is a body to hash.
        let client = match super::identity(cx) {
            Ok(identity) => &identity.client,
            Err(shed) => return Either::Left(Either::Left(ready(Err(shed)))),
        };
        if !hashes_body(cx.body_buffered, &req) {
            return Either::Left(Either::Right(self.pass(req, cx, client, None, next)));
        }
        Either::Right(Box::pin(async move {
            let (req, body) = small_body(req).await?;
            self.pass(req, cx, client, Some(&body), next).await
        }) as StageFuture<'a>)
    }
}

impl Detect {
    /// Observes the request: refused (enforce), or on to the next stage,
    /// marked in flight until its answer says whether it failed.
    fn pass<'a, N: Next>(
        &'a self,
        mut req: Request<Body>,
        cx: &'a RequestContext,
        client: &ClientKey,
        body: Option<&[u8]>,
        next: &'a N,
    ) -> impl Future<Output = Answer> + Send + 'a {
        let fingerprint = self.storm.fingerprint(client, req.method(), req.uri(), body);
        let in_flight = match self.storm.observe(client, fingerprint, cx.whole) {
            Ok(authorized) => {
                // Nothing to hand on (no guard on the route, or a client it
                // never saw): the exchange says unknown already.
                if authorized != Authorized::UNKNOWN {
                    cx.exchange.saw_authorized(authorized.raw());
                }
                Some(InFlight { storm: &self.storm, fingerprint, failed: true })
            }
            Err(shed) if self.mode == Mode::Enforce => {
                return Either::Left(ready(Err(shed.client(client.clone()))))
            }
            Err(shed) => {
                // Shadow: recorded, and the request goes on as if unseen.
                self.report.record(&shed, client.as_str(), Some(&mut req));
                None
            }
        };
        Either::Right(next.run(req, cx).map(move |result| {
            if let Some(mut in_flight) = in_flight {
                in_flight.failed = Outcome::of(&result).is_failure_for_client();
            }
            result
        }))
    }
}

/// Whether the request has a small body, `buffered` before the stack
/// (`RequestContext::body_buffered`), that its fingerprint includes
/// ([`small_body`] reads it).
fn hashes_body(buffered: bool, req: &Request<Body>) -> bool {
    let len = http_body::Body::size_hint(req.body()).exact();
    buffered && len.is_some_and(|n| n > 0 && n <= MAX_HASHED_BODY)
}

/// Takes the small body that `proxy.rs` already read whole ([`hashes_body`]),
/// so it can be part of the fingerprint, and puts it back. A streamed body is
/// never waited for here: this stage runs inside an admission slot, and a
/// client that stalls its body must not hold one.
async fn small_body(req: Request<Body>) -> Result<(Request<Body>, Bytes), Shed> {
    let (parts, b) = req.into_parts();
    // In memory already: this completes at once.
    match b.collect().await {
        Ok(collected) => {
            let bytes = collected.to_bytes();
            Ok((Request::from_parts(parts, body::full(bytes.clone())), bytes))
        }
        Err(_) => Err(Shed::new(Reason::BadRequest).detail("the request body could not be read")),
    }
}
