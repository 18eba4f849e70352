//! The per-route stack, outer → inner. The order is written here once; a stage
//! never knows what comes before or after it.
//!
//! ```text
//!   request ─► client_id        who is asking (key, tenant, priority)   ─► 400 bad_request
//!              admission        upstream concurrency, fair share         ─► 503 overloaded        (issue 4)
//!              storm            callback bombs, retry storms             ─► 429                   (issue 5)
//!              rate_limit       every [[routes.limits]] via the store    ─► 429 rate_limited / 503 store_unavailable
//!              circuit_breaker  per upstream                             ─► 503 circuit_open      (issue 4)
//!              retry            budget, backoff                          ─► 503 retry_budget      (issue 4)
//!              upstream         balance, forward                         ─► 502 / 504
//! ```
//!
//! A stage that is not configured for a route is absent from its stack, not a
//! no-op in it. Every stage's error is a [`Shed`]: the outermost caller turns it
//! into levee's answer through `respond.rs`.

pub mod admission;
pub mod auth_guard;
pub mod circuit_breaker;
pub mod client_id;
pub mod rate_limit;
pub mod retry;
pub mod shadow;
pub mod storm;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder};

use crate::body::Body;
use crate::config::{AuthGuardConfig, Mode, RouteConfig, StormConfig};
use crate::context::RequestContext;
use crate::respond::{Reason, Shed};
use crate::stats::{RouteStats, ShedSamples};
use crate::store::{RouteLimits, Store};
use crate::upstream::{Upstream, UpstreamService};
use auth_guard::AuthGuard;
use shadow::Shadow;
use storm::Storm;

/// A route's whole stack, type-erased so `Route` is one concrete type.
pub type RouteService = BoxCloneSyncService<Request<Body>, Response<Body>, Shed>;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The state of one route that outlives a config reload (when its settings do
/// not change): its limits (whose buckets live in the store), its storm
/// detector and its auth guard. The admin API reads clients through it.
pub struct RouteState {
    pub name: Arc<str>,
    /// Counters, last success and offenders, for the admin API and dashboard.
    pub stats: Arc<RouteStats>,
    pub limits: Arc<RouteLimits>,
    pub storm: Option<Arc<Storm>>,
    pub guard: Option<Arc<AuthGuard>>,
    /// What the route's defences in shadow mode would have shed.
    pub shadow: Arc<Shadow>,
}

impl RouteState {
    /// The state of `route`, reusing `previous` (the same route in the running
    /// config) where its settings are unchanged, so a reload keeps quarantines.
    /// The `mode` is not a setting of the detector or the guard: switching it
    /// keeps their state (the stages read it from the live config), so what
    /// shadow mode reported is what enforcing sheds.
    pub fn build(
        route: &RouteConfig,
        max_clients: usize,
        previous: Option<&RouteState>,
        samples: &Arc<ShedSamples>,
    ) -> RouteState {
        let storm = route.storm.enabled.then(|| match previous.and_then(|p| p.storm.as_ref()) {
            Some(s) if StormConfig { mode: route.storm.mode, ..s.config.clone() } == route.storm => s.clone(),
            _ => Storm::start(&route.name, &route.storm, max_clients),
        });
        let guard = route.auth_guard.enabled.then(|| match previous.and_then(|p| p.guard.as_ref()) {
            Some(g)
                if AuthGuardConfig { mode: route.auth_guard.mode, ..g.config.clone() }
                    == route.auth_guard =>
            {
                g.clone()
            }
            _ => AuthGuard::new(&route.name, &route.auth_guard, max_clients),
        });
        let stats: Arc<RouteStats> = previous.map(|p| p.stats.clone()).unwrap_or_default();
        RouteState {
            name: Arc::from(route.name.as_str()),
            shadow: match previous {
                Some(p) => p.shadow.clone(),
                None => Shadow::new(&route.name, stats.clone(), samples.clone()),
            },
            stats,
            limits: Arc::new(RouteLimits::with_modes(&route.name, &route.limits, &route.limit_modes)),
            storm,
            guard,
        }
    }
}

/// What the admin API needs to inspect and reset clients: the live store and
/// every route's state. Swapped on reload.
pub struct Registry {
    pub store: Arc<Store>,
    pub routes: Vec<Arc<RouteState>>,
    /// The live upstreams (circuit and ejection state).
    pub upstreams: Vec<Arc<Upstream>>,
    /// The live route configs, in `routes` order.
    pub configs: Vec<RouteConfig>,
    /// Recent shed decisions (real and shadow), for the event stream; one
    /// ring for the gateway's life, handed from registry to registry.
    pub samples: Arc<ShedSamples>,
}

/// Builds the stack of one route.
pub fn build(
    route: &RouteConfig,
    upstream: Arc<Upstream>,
    state: &RouteState,
    store: Arc<Store>,
) -> RouteService {
    let pool = UpstreamService(upstream.clone());
    build_on(route, upstream, state, store, pool)
}

/// The stack of one route on any innermost service: the upstream pool in
/// production, a no-op in `benches/stack.rs` (the stack's own cost).
pub fn build_on<S>(
    route: &RouteConfig,
    upstream: Arc<Upstream>,
    state: &RouteState,
    store: Arc<Store>,
    inner: S,
) -> RouteService
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Shed> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    // A client's own `x-levee-shadow` must not reach the upstream as levee's.
    let shadow_requests = route.limit_modes.contains(&Mode::Shadow)
        || (route.storm.enabled && route.storm.mode == Mode::Shadow);
    let svc = ServiceBuilder::new()
        .option_layer(shadow_requests.then(|| CheckLayer::new(shadow::Strip)))
        // 3a: every later stage keys its state by this identity.
        .layer(CheckLayer::new(client_id::ClientId::new(route)))
        // Response side: sees every relayed response, so it sits outside the
        // stages that shed; turns a 401 wave to authorized clients into 503.
        .option_layer(auth_guard::AuthGuardLayer::new(
            state.guard.clone(),
            route.auth_guard.mode,
            state.shadow.clone(),
        ))
        // 3b: shed before any work when the upstream is full: priorities, tenant fair share.
        .layer(admission::AdmissionLayer::new(route, &upstream))
        // 3c: callback bombs and retry storms, before any state is spent on them.
        .option_layer(storm::StormLayer::new(state.storm.clone(), route.storm.mode, state.shadow.clone()))
        // 3d: every [[routes.limits]], through the store; absent without limits.
        .option_layer(rate_limit::RateLimitLayer::new(state.limits.clone(), store, state.shadow.clone()))
        // 3e: refuse without touching a failing upstream; sees each request's final outcome.
        .layer(circuit_breaker::CircuitBreakerLayer::new(upstream.clone()))
        // 3f: retry idempotent failures within the upstream's budget (absent with attempts = 1).
        .option_layer(retry::RetryLayer::new(&upstream))
        // 4: the upstream pool: balance, forward, time out.
        .service(inner);
    BoxCloneSyncService::new(svc)
}

/// Milliseconds from `epoch` to `now`, plus one so that 0 can mean "never":
/// the clock of the storm detector and the auth guard.
pub(crate) fn millis_since(epoch: tokio::time::Instant, now: tokio::time::Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX).saturating_add(1)
}

/// The request's context, which the listener always sets.
pub fn context<B>(req: &Request<B>) -> Result<&RequestContext, Shed> {
    req.extensions()
        .get::<RequestContext>()
        .ok_or_else(|| Shed::new(Reason::BadRequest).detail("request without context"))
}

// === Check: a stage that only says yes or no ===

/// A synchronous decision taken before the request goes further. It may add
/// what it learned to the request's extensions.
pub trait Check: Send + Sync + 'static {
    fn check(&self, req: &mut Request<Body>) -> Result<(), Shed>;
}

/// The thin tower adapter around a [`Check`], so the decision itself is tested
/// without tower.
pub struct CheckLayer<C>(Arc<C>);

impl<C> CheckLayer<C> {
    pub fn new(check: C) -> Self {
        CheckLayer(Arc::new(check))
    }
}

impl<C, S> Layer<S> for CheckLayer<C> {
    type Service = CheckService<C, S>;
    fn layer(&self, inner: S) -> Self::Service {
        CheckService { check: self.0.clone(), inner }
    }
}

pub struct CheckService<C, S> {
    check: Arc<C>,
    inner: S,
}

impl<C, S: Clone> Clone for CheckService<C, S> {
    fn clone(&self) -> Self {
        CheckService { check: self.check.clone(), inner: self.inner.clone() }
    }
}

impl<C, S> Service<Request<Body>> for CheckService<C, S>
where
    C: Check,
    S: Service<Request<Body>, Response = Response<Body>, Error = Shed> + Send,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Shed;
    type Future = BoxFuture<Result<Response<Body>, Shed>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Shed>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        match self.check.check(&mut req) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(shed) => Box::pin(std::future::ready(Err(shed))),
        }
    }
}
