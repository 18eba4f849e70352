//! One `[upstreams.NAME]`: its endpoints, their in-flight counts, the pooled
//! client, and the innermost service of every route stack that points at it.
//!
//! It also holds what protects it, one of each per upstream and shared by every
//! route that uses it: the circuit breaker, outlier detection per endpoint, the
//! retry budget and the in-flight count that admission decides on. The stages
//! in `stack/` act on them; this module only feeds outlier detection, which
//! judges each try on each endpoint.

pub mod balance;
pub mod circuit_breaker;
pub mod concurrency;
pub mod forward;
pub mod h1;
pub mod outlier;
pub mod pool;
pub mod retry_budget;
pub mod window;

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::future::{Either, FutureExt};
use http::{Request, Response};
use metrics::SharedString;
use tokio::time::Instant;

use crate::body::{Body, Guarded};
use crate::classify::Outcome;
use crate::config::UpstreamConfig;
use crate::context::{Exchange, RequestContext};
use crate::metrics::{self as m, CounterCache};
use crate::respond::{Reason, Shed};
use circuit_breaker::CircuitBreaker;
use concurrency::Concurrency;
use forward::{Clients, ForwardError};
use outlier::Outlier;
use retry_budget::RetryBudget;

/// One endpoint of an upstream.
#[derive(Debug)]
pub struct Endpoint {
    pub authority: http::uri::Authority,
    /// Requests sent and not yet answered in full (body included): p2c's load.
    pub in_flight: AtomicUsize,
    label: SharedString,
}

/// A live upstream: built from config, shared by every route that uses it.
pub struct Upstream {
    pub config: UpstreamConfig,
    pub endpoints: Vec<Endpoint>,
    clients: Clients,
    rr: AtomicUsize,
    name: SharedString,
    duration: Arc<m::DurationHistogram>,
    /// Decides whether requests may reach this upstream at all.
    pub breaker: CircuitBreaker,
    /// Which endpoints are ejected; fed by every try.
    pub outlier: Outlier,
    /// How many retries the `retry` stage may still send.
    pub budget: RetryBudget,
    /// In-flight requests, by priority and tenant (the `admission` stage).
    pub concurrency: Arc<Concurrency>,
    /// `levee_upstream_requests_total` handles by (endpoint, status).
    counters: CounterCache,
    /// When a connect failure was last logged at warn (ms since `origin`, 0: never).
    last_connect_warning_ms: AtomicU64,
    origin: Instant,
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Self {
        if let Some(tls) = &config.tls {
            crate::listener::certs::publish_client_chain(&config.name, &tls.client_chain);
        }
        let name = SharedString::from(config.name.clone());
        let origin = Instant::now();
        let labels: Vec<SharedString> =
            config.endpoints.iter().map(|e| SharedString::from(e.authority.to_string())).collect();
        let endpoints = config
            .endpoints
            .iter()
            .zip(&labels)
            .map(|(e, label)| Endpoint {
                authority: e.authority.clone(),
                in_flight: AtomicUsize::new(0),
                label: label.clone(),
            })
            .collect();
        Upstream {
            breaker: CircuitBreaker::new(config.circuit_breaker.clone(), name.clone(), origin),
            outlier: Outlier::new(config.outlier.clone(), name.clone(), &labels, origin),
            budget: RetryBudget::new(&config.retry, origin),
            concurrency: Arc::new(Concurrency::new(config.max_concurrency)),
            counters: Default::default(),
            clients: Clients::new(config.connect_timeout, config.tls.as_ref(), &config.endpoints),
            duration: m::upstream_duration(&name),
            endpoints,
            rr: AtomicUsize::new(0),
            last_connect_warning_ms: AtomicU64::new(0),
            origin,
            name,
            config,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Picks an endpoint by the configured balance policy, skipping ejected
    /// endpoints, and `avoid` too when another endpoint is usable.
    fn pick(&self, avoid: Option<usize>) -> Option<usize> {
        let n = self.endpoints.len();
        let load = |i: usize| self.endpoints[i].in_flight.load(Ordering::Relaxed);
        if avoid.is_none() && !self.outlier.any_ejected() {
            // The common case: nothing to skip, no clock read.
            return balance::pick(self.config.balance, n, &self.rr, load, |_| true);
        }
        self.outlier.refresh(Instant::now());
        let healthy = |i: usize| !self.outlier.is_ejected(i);
        let other = |i: usize| healthy(i) && Some(i) != avoid;
        if avoid.is_some() && (0..n).any(other) {
            balance::pick(self.config.balance, n, &self.rr, load, other)
        } else {
            balance::pick(self.config.balance, n, &self.rr, load, healthy)
        }
    }

    /// Sends the request to one endpoint and maps a failure to levee's answer.
    /// The endpoint is picked and the send made before the future exists:
    /// the future is the send and what [`answered`](Self::answered) needs,
    /// held once. It is boxed on every proxied request (`stack::Forward`),
    /// so its size is paid in a cold allocation's cache lines; as `async`
    /// code it kept the request once per level and a copy of its context.
    pub fn forward(
        self: Arc<Self>,
        req: Request<Body>,
        cx: &RequestContext,
    ) -> impl Future<Output = Result<Response<Body>, Shed>> + Send + 'static {
        let idx = match self.pick_for(cx) {
            Ok(idx) => idx,
            Err(shed) => return Either::Left(std::future::ready(Err(shed))),
        };
        let exchange = cx.exchange.clone();
        let guard = InFlight::enter(self.clone(), idx);
        let start = Instant::now();
        let sent =
            forward::send(&self.clients, idx, &self.config.endpoints[idx], req, cx, self.config.timeout);
        Either::Right(sent.map(move |result| self.answered(idx, &exchange, guard, start, result)))
    }

    /// The try's outcome counted (metrics, outlier detection, the warning of
    /// a refused connection) and turned into the stack's answer.
    fn answered(
        &self,
        idx: usize,
        exchange: &Exchange,
        guard: InFlight,
        start: Instant,
        result: Result<Response<Body>, ForwardError>,
    ) -> Result<Response<Body>, Shed> {
        let now = Instant::now();
        exchange.answered_at(now);
        self.duration.record(now.duration_since(start));
        let endpoint = &self.endpoints[idx];
        match result {
            Ok(rsp) => {
                if let Some(failed) = Outcome::of_response(&rsp).upstream_failed() {
                    self.outlier.record(idx, failed, now);
                }
                self.count(idx, rsp.status().as_u16());
                let (parts, body) = rsp.into_parts();
                Ok(Response::from_parts(parts, Guarded::wrap(body, guard)))
            }
            Err(e) => {
                // The try failed because the client's body did (too large,
                // stalled, cut off): the client's fault, never the endpoint's.
                if let Some(fault) = exchange.body_fault() {
                    self.count(idx, error_code("client_fault"));
                    return Err(Shed::new(Reason::from(fault)));
                }
                self.outlier.record(idx, true, now);
                let (label, reason) = match &e {
                    ForwardError::Connect(_) => ("connect_error", Reason::UpstreamUnreachable),
                    ForwardError::Timeout(_) => ("timeout", Reason::UpstreamTimeout),
                    ForwardError::BadResponse(_) => ("bad_response", Reason::BadUpstreamResponse),
                };
                self.count(idx, error_code(label));
                if matches!(e, ForwardError::Connect(_)) && self.connect_warning_due(now) {
                    // A refused connection or a certificate the upstream's TLS
                    // config does not trust: an operator must see why, once in a while.
                    tracing::warn!(upstream = %self.name, endpoint = %endpoint.authority, error = %error_chain(&e), "cannot connect to the upstream");
                } else {
                    tracing::debug!(upstream = %self.name, endpoint = %endpoint.authority, error = %error_chain(&e), "upstream try failed");
                }
                Err(Shed::new(reason))
            }
        }
    }

    /// The endpoint for a request (another than a retry's last, when one is
    /// healthy), left in its exchange for the retry stage.
    fn pick_for(&self, cx: &RequestContext) -> Result<usize, Shed> {
        let Some(idx) = self.pick(cx.exchange.to_avoid()) else {
            return Err(Shed::new(Reason::UpstreamUnreachable).detail("the upstream has no endpoints"));
        };
        cx.exchange.picked(idx);
        Ok(idx)
    }

    /// Whether a connect failure may be logged at warn now: at most once per
    /// 10 s per upstream, so a dead upstream cannot flood the log.
    fn connect_warning_due(&self, now: Instant) -> bool {
        let now_ms =
            u64::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX).max(1);
        let last = self.last_connect_warning_ms.load(Ordering::Relaxed);
        (last == 0 || now_ms.saturating_sub(last) >= 10_000)
            && self
                .last_connect_warning_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Counts one try in `levee_upstream_requests_total`. Handles are cached per
    /// (endpoint, status) so the hot path does one map lookup, not a label hash
    /// and a registry search. Errors use codes below 100 (see [`error_code`]).
    fn count(&self, idx: usize, code: u16) {
        self.counters.increment((idx as u64) << 16 | u64::from(code), || {
            metrics::counter!(m::UPSTREAM_REQUESTS_TOTAL,
                "upstream" => self.name.clone(),
                "endpoint" => self.endpoints[idx].label.clone(),
                "status" => status_label(code))
        });
    }
}

/// An error and its causes, `: `-separated (a TLS failure's reason is a few
/// causes down: "client error (Connect): invalid peer certificate: UnknownIssuer").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The pseudo status of a try that got no response, for the metric cache.
fn error_code(label: &str) -> u16 {
    match label {
        "connect_error" => 1,
        "timeout" => 2,
        "client_fault" => 4,
        _ => 3,
    }
}

fn status_label(code: u16) -> SharedString {
    match code {
        1 => SharedString::const_str("connect_error"),
        2 => SharedString::const_str("timeout"),
        3 => SharedString::const_str("bad_response"),
        4 => SharedString::const_str("client_fault"),
        200 => SharedString::const_str("200"),
        204 => SharedString::const_str("204"),
        404 => SharedString::const_str("404"),
        500 => SharedString::const_str("500"),
        502 => SharedString::const_str("502"),
        503 => SharedString::const_str("503"),
        c => SharedString::from(c.to_string()),
    }
}

/// Holds one unit of an endpoint's in-flight count until dropped.
struct InFlight {
    upstream: Arc<Upstream>,
    idx: usize,
}

impl InFlight {
    fn enter(upstream: Arc<Upstream>, idx: usize) -> Self {
        upstream.endpoints[idx].in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { upstream, idx }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.endpoints[self.idx].in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
