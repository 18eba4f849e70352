//! One `[upstreams.NAME]`: its endpoints, their in-flight counts, the pooled
//! client, and the innermost service of every route stack that points at it.

pub mod balance;
pub mod forward;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use metrics::{Counter, Histogram, SharedString};
use tokio::time::Instant;

use crate::body::{Body, Guarded};
use crate::config::UpstreamConfig;
use crate::context::RequestContext;
use crate::metrics as m;
use crate::respond::{Reason, Shed};
use forward::{ForwardError, HttpClient};

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
    client: HttpClient,
    rr: AtomicUsize,
    name: SharedString,
    duration: Histogram,
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Self {
        let name = SharedString::from(config.name.clone());
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| Endpoint {
                authority: e.authority.clone(),
                in_flight: AtomicUsize::new(0),
                label: SharedString::from(e.authority.to_string()),
            })
            .collect();
        Upstream {
            client: forward::client(config.connect_timeout),
            duration: metrics::histogram!(m::UPSTREAM_DURATION, "upstream" => name.clone()),
            endpoints,
            rr: AtomicUsize::new(0),
            name,
            config,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Picks an endpoint by the configured balance policy.
    fn pick(&self) -> Option<usize> {
        balance::pick(
            self.config.balance,
            self.endpoints.len(),
            &self.rr,
            |i| self.endpoints[i].in_flight.load(Ordering::Relaxed),
            |_| true,
        )
    }

    /// Sends the request to one endpoint and maps a failure to levee's answer.
    pub async fn forward(self: Arc<Self>, req: Request<Body>) -> Result<Response<Body>, Shed> {
        let Some(idx) = self.pick() else {
            return Err(Shed::new(Reason::UpstreamUnreachable).detail("the upstream has no endpoints"));
        };
        let ctx = req.extensions().get::<RequestContext>().cloned();
        let Some(ctx) = ctx else {
            return Err(Shed::new(Reason::BadRequest).detail("request without context"));
        };
        let endpoint = &self.endpoints[idx];
        let guard = InFlight::enter(self.clone(), idx);
        let start = Instant::now();
        let result = forward::send(&self.client, &endpoint.authority, req, &ctx, self.config.timeout).await;
        self.duration.record(start.elapsed().as_secs_f64());
        match result {
            Ok(rsp) => {
                self.count(idx, status_label(rsp.status().as_u16())).increment(1);
                let (parts, body) = rsp.into_parts();
                Ok(Response::from_parts(parts, Guarded::wrap(body, guard)))
            }
            Err(e) => {
                let (label, reason) = match &e {
                    ForwardError::Connect(_) => ("connect_error", Reason::UpstreamUnreachable),
                    ForwardError::Timeout(_) => ("timeout", Reason::UpstreamTimeout),
                    ForwardError::BadResponse(_) => ("bad_response", Reason::BadUpstreamResponse),
                };
                self.count(idx, SharedString::const_str(label)).increment(1);
                tracing::debug!(upstream = %self.name, endpoint = %endpoint.authority, error = %e, "upstream try failed");
                Err(Shed::new(reason))
            }
        }
    }

    fn count(&self, idx: usize, status: SharedString) -> Counter {
        metrics::counter!(m::UPSTREAM_REQUESTS_TOTAL,
            "upstream" => self.name.clone(),
            "endpoint" => self.endpoints[idx].label.clone(),
            "status" => status)
    }
}

fn status_label(code: u16) -> SharedString {
    match code {
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

/// The innermost service of a route stack: the upstream pool.
#[derive(Clone)]
pub struct UpstreamService(pub Arc<Upstream>);

impl tower::Service<Request<Body>> for UpstreamService {
    type Response = Response<Body>;
    type Error = Shed;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Shed>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Shed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        Box::pin(self.0.clone().forward(req))
    }
}
