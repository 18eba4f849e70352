//! Stage 4d: levee's own retries, within the upstream's retry budget.
//!
//! A request is retried only when all of these hold:
//! - its method is idempotent: GET, HEAD, OPTIONS, PUT, DELETE;
//! - its body can be replayed: it is in memory, read whole by `proxy.rs`
//!   before the stack (empty, or at most `server.buffer_body_bytes`). A larger
//!   or chunked body is streamed once and never retried, and never waited for
//!   here, inside an admission slot;
//! - the try failed in a way listed in `retry.on` (`connect`, `timeout`, or a
//!   relayed status), and fewer than `attempts` tries were made;
//! - the budget ([`crate::upstream::retry_budget`]) allows one more retry.
//!
//! Before retry `n` levee waits a random time in `[0, backoff × 2^(n-1)]`
//! ("full jitter"), and asks the upstream for a different endpoint than the
//! previous try's when another one is usable.
//!
//! When the budget refuses, the client gets the last failure as it was: the
//! relayed upstream response, unchanged. Only when that last failure was levee's
//! own answer (502 `upstream_unreachable`, 504 `upstream_timeout`) does it
//! become 503 `retry_budget` with `Retry-After`: levee had a retry to offer and
//! withheld it to protect the upstream, and 503 says "come back later".

use std::future::{ready, Future};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{Either, FutureExt};
use http::{Method, Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use metrics::Counter;
use tokio::time::Instant;

use super::{Answer, Next, Stage, StageFuture};
use crate::body::{self, Body};
use crate::classify::Outcome;
use crate::config::RetryConfig;
use crate::context::RequestContext;
use crate::metrics as m;
use crate::respond::{self, Reason, Shed};
use crate::upstream::Upstream;

/// Whether a request with this method may be sent twice.
pub fn idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
}

/// Whether the try's outcome is one `retry.on` lists.
pub fn retryable(policy: &RetryConfig, result: &Result<Response<Body>, Shed>) -> bool {
    if !Outcome::of(result).may_retry() {
        return false;
    }
    match result {
        Ok(rsp) => policy.on_status.contains(&rsp.status().as_u16()),
        Err(shed) => match shed.reason {
            Reason::UpstreamUnreachable => policy.on_connect,
            Reason::UpstreamTimeout => policy.on_timeout,
            _ => false,
        },
    }
}

/// The wait before retry number `retry` (1-based): `rand` ∈ [0, 1) of
/// `base × 2^(retry-1)`.
pub fn backoff(base: Duration, retry: u32, rand: f64) -> Duration {
    let cap = base.saturating_mul(1u32 << retry.saturating_sub(1).min(16));
    Duration::try_from_secs_f64(cap.as_secs_f64() * rand.clamp(0.0, 1.0)).unwrap_or(cap)
}

/// The answer when the budget refuses a retry after `last`.
fn refused(last: Result<Response<Body>, Shed>) -> Result<Response<Body>, Shed> {
    match last {
        Ok(relayed) => Ok(relayed),
        Err(shed) => Err(Shed::new(Reason::RetryBudget)
            .retry_after(respond::jitter(Duration::from_secs(1), 1.0))
            .detail(format!("the upstream failed ({}) and the retry budget is spent", shed.reason.as_str()))),
    }
}

/// The stage: the request's tries, within the upstream's budget.
pub struct Retry {
    upstream: Arc<Upstream>,
    retries: Counter,
    exhausted: Counter,
}

impl Retry {
    /// `None` when the upstream allows one try only: the stage is then absent.
    pub fn new(upstream: &Arc<Upstream>) -> Option<Self> {
        if upstream.config.retry.attempts <= 1 {
            return None;
        }
        let name = upstream.name().to_string();
        Some(Retry {
            upstream: upstream.clone(),
            retries: metrics::counter!(m::RETRIES_TOTAL, "upstream" => name.clone()),
            exhausted: metrics::counter!(m::RETRY_BUDGET_EXHAUSTED_TOTAL, "upstream" => name),
        })
    }
}

impl Stage for Retry {
    /// The first try is the next stage's future plus a copy of the request's
    /// head; only a request that is retried (or has a body to keep) boxes
    /// the retry loop, so a request that succeeds carries none of its state.
    fn call<'a, N: Next>(
        &'a self,
        req: Request<Body>,
        cx: &'a RequestContext,
        next: &'a N,
    ) -> impl Future<Output = Answer> + Send + 'a {
        // The request deposits at its arrival, a clock read the listener made already.
        self.upstream.budget.deposit(cx.started);
        if !(cx.body_buffered && idempotent(req.method())) {
            return Either::Left(next.run(req, cx));
        }
        if !req.body().is_end_stream() {
            return Either::Right(Either::Right(Box::pin(self.with_body(req, cx, next)) as StageFuture<'a>));
        }
        let head = Head::of(&req);
        let first = next.run(req, cx);
        Either::Right(Either::Left(first.then(move |result| {
            if !self.retries_after(1, &result) {
                return Either::Left(ready(result));
            }
            Either::Right(Box::pin(self.again(head, Bytes::new(), result, cx, next)) as StageFuture<'a>)
        })))
    }
}

impl Retry {
    /// Whether the outcome of try number `tries` calls for another (the
    /// budget aside).
    fn retries_after(&self, tries: u32, result: &Answer) -> bool {
        let policy = &self.upstream.config.retry;
        tries < policy.attempts && retryable(policy, result)
    }

    /// Reads the body (in memory already) so every try can send it, then tries.
    async fn with_body<N: Next>(&self, req: Request<Body>, cx: &RequestContext, next: &N) -> Answer {
        let (parts, body) = req.into_parts();
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return Err(Shed::new(Reason::BadRequest).detail("the request body could not be read")),
        };
        let req = Request::from_parts(parts, body::full(bytes.clone()));
        let head = Head::of(&req);
        let first = next.run(req, cx).await;
        self.again(head, bytes, first, cx, next).await
    }

    /// The tries after the first, while its outcome is retryable and the
    /// budget allows.
    async fn again<N: Next>(
        &self,
        head: Head,
        bytes: Bytes,
        mut result: Answer,
        cx: &RequestContext,
        next: &N,
    ) -> Answer {
        let policy = &self.upstream.config.retry;
        let mut tries = 1;
        while self.retries_after(tries, &result) {
            if !self.upstream.budget.withdraw(Instant::now()) {
                self.exhausted.increment(1);
                return refused(result);
            }
            self.retries.increment(1);
            // Let go of the failed response (and its endpoint's in-flight count) before waiting.
            drop(result);
            cx.exchange.avoid_last_picked();
            tokio::time::sleep(backoff(policy.backoff, tries, fastrand::f64())).await;
            tries += 1;
            result = next.run(head.request(&bytes), cx).await;
        }
        result
    }
}

/// What a retry sends again: the request's head, before the upstream
/// rewrote it for its endpoint (`forward::prepare_request` is not
/// idempotent). Kept for every request that may be retried; the context
/// goes with every try as it is (`Next::run`).
struct Head {
    method: Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Head {
    fn of<B>(req: &Request<B>) -> Head {
        Head {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    /// A retry's request: the head and the kept body.
    fn request(&self, bytes: &Bytes) -> Request<Body> {
        let mut req = Request::new(body::full(bytes.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryConfig {
        RetryConfig {
            attempts: 3,
            budget: 0.2,
            backoff: Duration::from_millis(25),
            min_per_s: 5,
            on_connect: true,
            on_timeout: false,
            on_status: vec![502, 503],
        }
    }

    fn status(code: u16) -> Result<Response<Body>, Shed> {
        let mut rsp = Response::new(body::empty());
        *rsp.status_mut() = http::StatusCode::from_u16(code).unwrap();
        Ok(rsp)
    }

    #[test]
    fn only_idempotent_methods() {
        for m in [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE] {
            assert!(idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!idempotent(&m), "{m}");
        }
    }

    #[test]
    fn only_the_outcomes_listed_in_on() {
        let p = policy();
        assert!(retryable(&p, &status(503)));
        assert!(!retryable(&p, &status(500)));
        assert!(!retryable(&p, &status(200)));
        assert!(retryable(&p, &Err(Shed::new(Reason::UpstreamUnreachable))));
        assert!(!retryable(&p, &Err(Shed::new(Reason::UpstreamTimeout))), "timeout is not in `on`");
        assert!(!retryable(&p, &Err(Shed::new(Reason::BadUpstreamResponse))));
    }

    #[test]
    fn backoff_is_full_jitter_over_an_exponential_cap() {
        let base = Duration::from_millis(25);
        assert_eq!(backoff(base, 1, 0.0), Duration::ZERO);
        assert_eq!(backoff(base, 1, 0.5), Duration::from_micros(12_500));
        assert_eq!(backoff(base, 3, 0.5), Duration::from_millis(50));
        assert!(backoff(base, 3, 0.999) < Duration::from_millis(100));
        assert!(backoff(Duration::MAX, 10, 0.999) <= Duration::MAX);
    }

    #[test]
    fn a_refused_retry_relays_the_upstream_answer_or_says_retry_budget() {
        let relayed = refused(status(503)).unwrap();
        assert_eq!(relayed.status(), 503);
        assert!(relayed.headers().get(respond::X_LEVEE_REASON).is_none());
        let own = refused(Err(Shed::new(Reason::UpstreamUnreachable))).unwrap_err();
        assert_eq!(own.reason, Reason::RetryBudget);
        assert!(own.retry_after.is_some());
    }
}
