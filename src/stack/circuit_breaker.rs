//! Stage 4c: the upstream's circuit breaker around the call. Refuses with 503
//! `circuit_open` while the breaker says so, without touching the upstream, and
//! tells the breaker how each admitted request ended. The decisions themselves
//! live in [`crate::upstream::circuit_breaker`].
//!
//! The outcome is the one the client gets, after any retries: a request that
//! failed once and succeeded on a retry is a success here (outlier detection
//! sees each try on its endpoint). A failure is a 5xx, relayed or levee's own
//! for the upstream (502, 504, and 503 `retry_budget`); an answer that says
//! nothing about the upstream (a bad request body, a client that went away)
//! is not counted, and frees its probe slot when the breaker is half-open.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use futures_util::FutureExt;
use http::{Request, Response};
use tokio::time::Instant;

use super::{Answer, Next, Stage};
use crate::body::Body;
use crate::classify::Outcome;
use crate::context::{Exchange, RequestContext};
use crate::respond::{Reason, Shed};
use crate::upstream::circuit_breaker::Ticket;
use crate::upstream::Upstream;

/// What an answer says about the upstream: `Some(true)` a failure,
/// `Some(false)` a success, `None` nothing ([`Outcome::upstream_failed`]).
pub fn failed(result: &Result<Response<Body>, Shed>) -> Option<bool> {
    Outcome::of(result).upstream_failed()
}

/// The refusal: `Retry-After` is the time left open plus up to half of
/// `open_for` at random, so refused clients do not all return at once.
fn refusal(remaining: Duration, open_for: Duration) -> Shed {
    let spread = open_for.mul_f64(fastrand::f64() * 0.5);
    Shed::new(Reason::CircuitOpen)
        .retry_after(remaining.saturating_add(spread))
        .detail("the upstream is failing; levee stopped sending it requests for a while")
}

/// The stage, around everything nearer the upstream (retries included).
pub struct Breaker {
    upstream: Arc<Upstream>,
}

impl Breaker {
    pub fn new(upstream: Arc<Upstream>) -> Self {
        Breaker { upstream }
    }
}

impl Stage for Breaker {
    fn call<'a, N: Next>(
        &'a self,
        req: Request<Body>,
        cx: &'a RequestContext,
        next: &'a N,
    ) -> impl Future<Output = Answer> + Send + 'a {
        let breaker = &self.upstream.breaker;
        // The moment the request was whole stands for "now": no stage before
        // this one waits, and it saves a clock read on every request.
        match breaker.admit(cx.whole) {
            Ok(ticket) => {
                let pending =
                    Pending { upstream: &self.upstream, ticket: Some(ticket), exchange: &cx.exchange };
                // `map`, not an async block: see `Option<S>` in `stack/mod.rs`.
                Either::Left(next.run(req, cx).map(move |result| {
                    pending.finish(failed(&result));
                    result
                }))
            }
            Err(refused) => {
                Either::Right(std::future::ready(Err(refusal(refused.remaining, breaker.config().open_for))))
            }
        }
    }
}

/// An admitted request whose outcome the breaker has not heard yet; dropped
/// unfinished (the client went away), it frees its probe slot.
struct Pending<'a> {
    upstream: &'a Upstream,
    ticket: Option<Ticket>,
    /// Where the upstream leaves the time of its answer, the outcome's "now".
    exchange: &'a Exchange,
}

impl Pending<'_> {
    fn finish(mut self, failed: Option<bool>) {
        if let (Some(ticket), Some(failed)) = (self.ticket, failed) {
            self.ticket = None;
            // The upstream's answer time, read by the upstream anyway; the
            // clock only for an answer no try gave (a 503 `retry_budget`).
            let now = self.exchange.answered().unwrap_or_else(Instant::now);
            self.upstream.breaker.record(ticket, failed, now);
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.upstream.breaker.cancel(ticket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Result<Response<Body>, Shed> {
        let mut rsp = Response::new(crate::body::empty());
        *rsp.status_mut() = http::StatusCode::from_u16(code).unwrap();
        Ok(rsp)
    }

    #[test]
    fn what_counts_as_a_failure() {
        assert_eq!(failed(&status(200)), Some(false));
        assert_eq!(failed(&status(404)), Some(false), "the client's problem, not the upstream's");
        assert_eq!(failed(&status(500)), Some(true));
        assert_eq!(failed(&status(503)), Some(true));
        for r in [Reason::UpstreamUnreachable, Reason::UpstreamTimeout, Reason::BadUpstreamResponse] {
            assert_eq!(failed(&Err(Shed::new(r))), Some(true), "{r:?}");
        }
        assert_eq!(failed(&Err(Shed::new(Reason::BadRequest))), None);
        assert_eq!(failed(&Err(Shed::new(Reason::BodyTooLarge))), None);
    }

    #[test]
    fn refusal_says_when_to_come_back() {
        let shed = refusal(Duration::from_millis(1500), Duration::from_secs(4));
        assert_eq!(shed.reason, Reason::CircuitOpen);
        let ra = shed.retry_after.unwrap();
        assert!(ra >= Duration::from_millis(1500) && ra < Duration::from_millis(3500), "{ra:?}");
        let huge = refusal(Duration::MAX, Duration::MAX);
        assert_eq!(huge.retry_after, Some(Duration::MAX));
    }
}
