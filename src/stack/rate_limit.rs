//! Stage 3d: every `[[routes.limits]]` of the route, through the store.
//!
//! A refusal is 429 `rate_limited` with `Retry-After` (the real time until the
//! request would pass, rounded up) and the IETF `RateLimit-Policy` /
//! `RateLimit` headers of the tightest limit; allowed responses carry them too.
//! `q` is the burst and `w` the seconds a full burst takes to refill; `r` the
//! requests left and `t` the seconds until the bucket is full again.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::client_id::Identity;
use super::BoxFuture;
use crate::body::Body;
use crate::respond::{retry_after_secs, Reason, Shed};
use crate::store::{Decision, RouteLimits, Store};

pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

#[derive(Clone)]
pub struct RateLimitLayer {
    limits: Arc<RouteLimits>,
    store: Arc<Store>,
}

impl RateLimitLayer {
    /// `None` for a route without limits: the stage is then absent.
    pub fn new(limits: Arc<RouteLimits>, store: Arc<Store>) -> Option<Self> {
        (!limits.is_empty()).then_some(RateLimitLayer { limits, store })
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit { limits: self.limits.clone(), store: self.store.clone(), inner }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    limits: Arc<RouteLimits>,
    store: Arc<Store>,
    inner: S,
}

impl<S> Service<Request<Body>> for RateLimit<S>
where
    S: Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Shed,
            Future = BoxFuture<Result<Response<Body>, Shed>>,
        > + Clone
        + Send
        + 'static,
{
    type Response = Response<Body>;
    type Error = Shed;
    type Future = BoxFuture<Result<Response<Body>, Shed>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Shed>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The clone is the one that is not ready; keep the ready one (tower's idiom).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (limits, store) = (self.limits.clone(), self.store.clone());
        Box::pin(async move {
            let Some(client) = req.extensions().get::<Identity>().map(|i| i.client.clone()) else {
                return Err(Shed::new(Reason::BadRequest).detail("request without identity"));
            };
            let decision = match store.check(&limits, client.as_str(), Instant::now()).await {
                Ok(d) => d,
                Err(_) => {
                    return Err(Shed::new(Reason::StoreUnavailable)
                        .retry_after(std::time::Duration::from_secs(1))
                        .detail("the rate-limit store is unreachable"))
                }
            };
            if !decision.allowed {
                let mut shed =
                    Shed::new(Reason::RateLimited).retry_after(decision.retry_after).client(client);
                shed.headers.extend(headers(&limits, &decision));
                return Err(shed);
            }
            let mut rsp = inner.call(req).await?;
            for (name, value) in headers(&limits, &decision) {
                rsp.headers_mut().insert(name, value);
            }
            Ok(rsp)
        })
    }
}

/// `RateLimit-Policy` and `RateLimit` for the decision's tightest limit.
fn headers(limits: &RouteLimits, d: &Decision) -> Vec<(HeaderName, HeaderValue)> {
    let Some(i) = d.tightest else { return Vec::new() };
    let (Some(policy), Some(name)) = (limits.policies.get(i), limits.names.get(i)) else { return Vec::new() };
    // `t`: seconds until the bucket is full again (allowed), or until the
    // request would pass (refused); rounded up, 0 only for an untouched bucket.
    let t = match (d.allowed, d.reset.is_zero()) {
        (true, true) => 0,
        (true, false) => retry_after_secs(Some(d.reset)),
        (false, _) => retry_after_secs(Some(d.retry_after)),
    };
    let value = HeaderValue::from_str(&format!("{name};r={};t={t}", d.remaining))
        .unwrap_or(HeaderValue::from_static("\"limit\""));
    vec![(RATELIMIT_POLICY, policy.clone()), (RATELIMIT, value)]
}
