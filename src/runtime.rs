//! One config version, ready to serve: the router over its compiled routes
//! (config, stack, metric handles), the upstreams and the store. The gateway
//! builds one per config and swaps it on reload; the proxy and the admin API
//! read the current one through the shared `ArcSwap`, without knowing the
//! gateway.

use std::sync::{Arc, OnceLock};

use metrics::{Counter, SharedString};

use crate::config::{Config, RouteConfig};
use crate::metrics::{self as m, CounterCache};
use crate::respond::Reason;
use crate::router::Router;
use crate::stack::client_id::ClientId;
use crate::stack::{self, Registry, RouteService, RouteState};
use crate::stats::RouteStats;
use crate::store::Store;
use crate::upstream::Upstream;
use crate::websocket::Upgraded;

/// Everything one config version serves with.
pub struct Runtime {
    pub config: Config,
    pub router: Router<Route>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub store: Arc<Store>,
}

impl Runtime {
    /// Builds the runtime of `config` on `store` (which outlives runtimes), and
    /// the registry the admin API reads clients through.
    /// `previous` is the registry of the running config: route state whose
    /// settings did not change carries over (quarantines survive a reload).
    pub fn build(config: Config, store: Arc<Store>, previous: Option<&Registry>) -> (Runtime, Registry) {
        // An upstream whose settings did not change keeps its breaker, outlier,
        // budget and in-flight state across a reload.
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| {
                let same = previous.and_then(|p| p.upstreams.iter().find(|o| o.config == *u));
                same.cloned().unwrap_or_else(|| Arc::new(Upstream::new(u.clone())))
            })
            .collect();
        let mut registry = Registry {
            store: store.clone(),
            routes: Vec::with_capacity(config.routes.len()),
            upstreams: upstreams.clone(),
            configs: config.routes.clone(),
            samples: previous.map(|p| p.samples.clone()).unwrap_or_default(),
        };
        // One budget: `max_clients` split over the limiter and every route's maps.
        let shares = store.plan_budget(&config.routes);
        let router = Router::new(config.routes.iter().map(|r: &RouteConfig| {
            let before = previous.and_then(|p| p.routes.iter().find(|s| *s.name == *r.name));
            let state = Arc::new(RouteState::build(
                r,
                store.kind(),
                shares.per_map,
                before.map(|s| &**s),
                &registry.samples,
            ));
            let storm = state.storm.iter().map(|s| s.budget_map());
            for map in storm.chain(state.clients.iter().map(|c| c.budget_map())) {
                store.budget().adopt(&map);
            }
            registry.routes.push(state.clone());
            let service = stack::build(r, upstreams[r.upstream].clone(), &state, store.clone());
            (r.host.clone(), r.path_prefix.clone(), Route::new(r.clone(), service, state.stats.clone()))
        }));
        (Runtime { config, router, upstreams, store }, registry)
    }
}

/// A route of the live runtime: its config, its stack and its metric handles.
pub struct Route {
    pub config: RouteConfig,
    pub name: Arc<str>,
    pub(crate) service: RouteService,
    pub(crate) duration: Arc<m::DurationHistogram>,
    /// `levee_requests_total` handles by (status, outcome): registered once per
    /// combination seen, so the hot path compares a few words, not a label hash.
    requests: CounterCache,
    /// `levee_shed_total` handles by reason (`Reason as usize`), registered
    /// at the first refusal of each: a refusal is the hot path of a client
    /// being shed, and takes no lock here.
    shed: [OnceLock<Counter>; Reason::ALL.len()],
    /// Live counters for the admin API (they outlive this config version).
    pub(crate) stats: Arc<RouteStats>,
    /// Who a WebSocket upgrade is from (the stack's own rule), for the cap.
    pub(crate) client_id: ClientId,
    /// Open upgraded connections per client.
    pub(crate) upgraded: Arc<Upgraded>,
}

/// The `outcome` label of `levee_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Label {
    /// The upstream's response, relayed.
    Forwarded,
    /// A defence refused the request (429, 503).
    Shed,
    /// Something failed on the way (4xx for bad requests, 502, 504).
    Error,
}

impl Label {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Label::Forwarded => "forwarded",
            Label::Shed => "shed",
            Label::Error => "error",
        }
    }
}

impl Route {
    pub fn new(config: RouteConfig, service: RouteService, stats: Arc<RouteStats>) -> Self {
        let name: Arc<str> = Arc::from(config.name.as_str());
        Route {
            duration: m::request_duration(&name),
            name,
            service,
            requests: CounterCache::default(),
            shed: Default::default(),
            stats,
            client_id: ClientId::new(&config),
            upgraded: Upgraded::new(&config.name, config.max_upgraded_per_client),
            config,
        }
    }

    pub(crate) fn count_shed(&self, reason: Reason) {
        if let Some(slot) = self.shed.get(reason as usize) {
            slot.get_or_init(|| {
                metrics::counter!(m::SHED_TOTAL, "route" => SharedString::from(self.name.clone()), "reason" => reason.as_str())
            })
            .increment(1);
        }
    }

    pub(crate) fn count(&self, status: u16, outcome: Label) {
        record(&self.requests, &self.name, status, outcome);
    }
}

/// One request in `levee_requests_total` (`route` is "none" for requests no route took).
pub(crate) fn record(cache: &CounterCache, route: &Arc<str>, status: u16, outcome: Label) {
    cache.increment(u64::from(status) << 2 | outcome as u64, || {
        metrics::counter!(m::REQUESTS_TOTAL,
            "route" => SharedString::from(route.clone()),
            "status" => status.to_string(),
            "outcome" => outcome.as_str())
    });
}
