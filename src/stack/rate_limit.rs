//! Stage 3d: every `[[routes.limits]]` of the route, through the store.
//!
//! A refusal is 429 `rate_limited` with `Retry-After` (the real time until the
//! request would pass, rounded up) and the IETF `RateLimit-Policy` /
//! `RateLimit` headers of the tightest limit; allowed responses carry them too.
//! `q` is the burst and `w` the seconds a full burst takes to refill; `r` the
//! requests left and `t` the seconds until the bucket is full again.
//!
//! **Shadow limits** (`mode = "shadow"`). The enforcing limits are decided
//! together first, exactly as on a route without shadow limits: a refusal is
//! a 429, and the shadow limits are then not consulted (the request consumes
//! nothing, as when every limit enforces). An admitted request is then
//! decided by the shadow limits together, on the same state and with the same
//! arithmetic as if they enforced; when they would refuse, the refusal is
//! recorded ([`super::shadow`]), the request consumes nothing from them (as a
//! refused request would) and is forwarded. So:
//! - a shadow limit consumes tokens exactly as an enforcing one does, and
//!   keeps its state when a reload switches its mode (its identity is rate and
//!   burst): on a route whose limits are all in shadow, switching them to
//!   enforce sheds exactly what shadow mode reported;
//! - adding a shadow limit never loosens an enforcing one: every forwarded
//!   request is charged to every enforcing limit. (Deciding all limits as one,
//!   as if all enforced, would not charge the enforcing limits for the
//!   requests a shadow limit would refuse, so a client far above a new shadow
//!   limit would never meet the old enforcing one.) The price, on a route with
//!   both: the enforcing limits also count requests the shadow limit would
//!   have shed, so after a switch to enforce they may shed a little more than
//!   reported, only while they themselves are near their bound.
//!
//! Shadow limits add no `RateLimit` headers: a client must not change its
//! behaviour because of a limit that is only being tried.

use std::cell::RefCell;
use std::future::{ready, Future};
use std::sync::Arc;

use futures_util::future::{Either, FutureExt};
use http::header::{HeaderName, HeaderValue};
use http::Request;
use tokio::time::Instant;

use super::shadow::Shadow;
use super::{Answer, Next, Stage};
use crate::body::Body;
use crate::config::Mode;
use crate::context::{ClientKey, RequestContext};
use crate::respond::{retry_after_secs, Reason, Shed};
use crate::store::{Decision, RouteLimits, Store, StoreError};

pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The route's limits split by mode (either may be absent).
struct Split {
    enforce: Option<Arc<RouteLimits>>,
    shadow: Option<Arc<RouteLimits>>,
    report: Arc<Shadow>,
}

/// The stage: one decision of the enforcing limits, then of the shadow ones.
pub struct RateLimit {
    split: Split,
    store: Arc<Store>,
}

impl RateLimit {
    /// `None` for a route without limits: the stage is then absent.
    pub fn new(limits: Arc<RouteLimits>, store: Arc<Store>, report: Arc<Shadow>) -> Option<Self> {
        if limits.is_empty() {
            return None;
        }
        let split = if limits.all(Mode::Enforce) {
            Split { enforce: Some(limits), shadow: None, report }
        } else {
            let part = |mode| Some(Arc::new(limits.only(mode))).filter(|l| !l.is_empty());
            Split { enforce: part(Mode::Enforce), shadow: part(Mode::Shadow), report }
        };
        Some(RateLimit { split, store })
    }
}

/// The enforcing limits' verdict on an admitted request: the limits and
/// their decision, for the response's headers (`None`: no enforcing limit).
type Admitted<'a> = Option<(&'a RouteLimits, Decision)>;

impl Stage for RateLimit {
    /// Decided without an `.await` whenever the store can (the memory store,
    /// a refusal remembered from Redis): the future is then the next stage's
    /// plus a decision. A request that must wait on Redis takes the boxed
    /// [`RateLimit::ask_redis`], so the fast path does not carry its state.
    fn call<'a, N: Next>(
        &'a self,
        req: Request<Body>,
        cx: &'a RequestContext,
        next: &'a N,
    ) -> impl Future<Output = Answer> + Send + 'a {
        let mut req = req;
        // Who, borrowed from the context; and when (`stack::identity`).
        let (client, now) = match super::identity(cx) {
            Ok(identity) => (&identity.client, cx.whole),
            Err(shed) => return Either::Left(Either::Left(ready(Err(shed)))),
        };
        let admitted = match &self.split.enforce {
            None => None,
            Some(limits) => match self.store.check_now(limits, client, now) {
                Some(decided) => match verdict(limits, decided, client) {
                    Ok(admitted) => admitted,
                    Err(shed) => return Either::Left(Either::Left(ready(Err(shed)))),
                },
                None => return Either::Right(Box::pin(self.ask_redis(req, cx, client, None, next))),
            },
        };
        if let Some(limits) = &self.split.shadow {
            match self.store.check_now(limits, client, now) {
                Some(decided) => self.report(decided, client, &mut req),
                None => {
                    return Either::Right(Box::pin(self.ask_redis(req, cx, client, Some(admitted), next)))
                }
            }
        }
        Either::Left(Either::Right(next.run(req, cx).map(move |answer| with_headers(answer, admitted))))
    }
}

impl RateLimit {
    /// The decisions that wait on Redis, then the next stage. `admitted` is
    /// the enforcing limits' verdict when it was made already, and then the
    /// shadow limits are the ones [`Store::check_now`] handed to Redis;
    /// otherwise the enforcing ones were. A limit set `check_now` handed on
    /// goes straight to Redis: asking `check_now` again would find the
    /// remembered refusal it just let one request past (`refusals.rs`).
    async fn ask_redis<'a, N: Next>(
        &'a self,
        mut req: Request<Body>,
        cx: &'a RequestContext,
        client: &'a ClientKey,
        admitted: Option<Admitted<'a>>,
        next: &'a N,
    ) -> Answer {
        let (admitted, shadow_handed_on) = match (admitted, &self.split.enforce) {
            (Some(admitted), _) => (admitted, true),
            (None, None) => (None, false),
            (None, Some(limits)) => {
                let decided = self.store.check_redis(limits, client, Instant::now()).await;
                (verdict(limits, decided, client)?, false)
            }
        };
        if let Some(limits) = &self.split.shadow {
            let now = Instant::now();
            let decided = match shadow_handed_on {
                true => self.store.check_redis(limits, client, now).await,
                false => self.store.check(limits, client, now).await,
            };
            self.report(decided, client, &mut req);
        }
        with_headers(next.run(req, cx).await, admitted)
    }

    /// Records what the shadow limits would have done.
    fn report(&self, decided: Result<Decision, StoreError>, client: &ClientKey, req: &mut Request<Body>) {
        let would = match decided {
            Ok(d) if !d.allowed => Some(Shed::new(Reason::RateLimited).retry_after(d.retry_after)),
            Ok(_) => None,
            Err(_) => Some(unreachable()),
        };
        if let Some(shed) = would {
            self.split.report.record(&shed, client.as_str(), Some(req));
        }
    }
}

/// The enforcing limits' decision as the request's fate: a 429 with the
/// tightest limit's headers, a 503 when the store is unreachable under
/// `on_failure = "deny"`, or admitted.
fn verdict<'a>(
    limits: &'a RouteLimits,
    decided: Result<Decision, StoreError>,
    client: &ClientKey,
) -> Result<Admitted<'a>, Shed> {
    let decision = decided.map_err(|_| unreachable())?;
    if decision.allowed {
        return Ok(Some((limits, decision)));
    }
    let mut shed = Shed::new(Reason::RateLimited).retry_after(decision.retry_after).client(client.clone());
    shed.headers = headers(limits, &decision).map_or_else(Vec::new, Vec::from);
    Err(shed)
}

/// The 503 of an unreachable store under `on_failure = "deny"`.
fn unreachable() -> Shed {
    Shed::new(Reason::StoreUnavailable)
        .retry_after(std::time::Duration::from_secs(1))
        .detail("the rate-limit store is unreachable")
}

/// An admitted request's response carries its enforcing limits' headers.
fn with_headers(answer: Answer, admitted: Admitted<'_>) -> Answer {
    let mut rsp = answer?;
    if let Some((limits, decision)) = admitted {
        for (name, value) in headers(limits, &decision).into_iter().flatten() {
            rsp.headers_mut().insert(name, value);
        }
    }
    Ok(rsp)
}

/// `RateLimit-Policy` and `RateLimit` for the decision's tightest limit.
fn headers(limits: &RouteLimits, d: &Decision) -> Option<[(HeaderName, HeaderValue); 2]> {
    let i = d.tightest?;
    let (policy, name) = (limits.policies.get(i)?, limits.names.get(i)?);
    // `t`: seconds until the bucket is full again (allowed), or until the
    // request would pass (refused); rounded up, 0 only for an untouched bucket.
    let t = match (d.allowed, d.reset.is_zero()) {
        (true, true) => 0,
        (true, false) => retry_after_secs(Some(d.reset)),
        (false, _) => retry_after_secs(Some(d.retry_after)),
    };
    let value = match d.allowed {
        true => ratelimit(name, u64::from(d.remaining), t),
        false => refused_ratelimit(name, t),
    };
    Some([(RATELIMIT_POLICY, policy.clone()), (RATELIMIT, value)])
}

/// The `RateLimit` value `{name};r={remaining};t={t}`.
fn ratelimit(name: &str, remaining: u64, t: u64) -> HeaderValue {
    // Written by hand into a stack buffer: this header is on every limited
    // response, and `write!` costs more than the rest of the decision.
    let mut buf = [0u8; 256];
    let value = match ratelimit_value(&mut buf, name.as_bytes(), remaining, t) {
        Some(len) => HeaderValue::from_bytes(&buf[..len]).ok(),
        // A very long policy name: the heap, once.
        None => HeaderValue::from_str(&format!("{name};r={remaining};t={t}")).ok(),
    };
    value.unwrap_or(HeaderValue::from_static("\"limit\""))
}

/// The `RateLimit` value of a refusal (`r=0`). A client being shed is refused
/// the same way request after request (same limit, same whole seconds), so
/// each thread keeps the last value it built and hands out copies (a
/// reference count) while name and `t` repeat, as `respond.rs` does for the
/// rest of the answer, which it then finds unchanged too. (Allowed responses
/// count `r` down, request by request: kept per thread, their value repeated
/// too rarely to pay.)
fn refused_ratelimit(name: &str, t: u64) -> HeaderValue {
    thread_local! {
        static LAST: RefCell<Option<(Box<str>, u64, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with(|last| {
        let Ok(mut last) = last.try_borrow_mut() else { return ratelimit(name, 0, t) };
        match last.as_ref() {
            Some((n, secs, value)) if *secs == t && **n == *name => value.clone(),
            _ => {
                let value = ratelimit(name, 0, t);
                *last = Some((Box::from(name), t, value.clone()));
                value
            }
        }
    })
}

/// `{name};r={remaining};t={t}` into `buf`; its length, or `None` when it does not fit.
fn ratelimit_value(buf: &mut [u8], name: &[u8], remaining: u64, t: u64) -> Option<usize> {
    fn put(buf: &mut [u8], at: &mut usize, bytes: &[u8]) -> Option<()> {
        buf.get_mut(*at..*at + bytes.len())?.copy_from_slice(bytes);
        *at += bytes.len();
        Some(())
    }
    fn put_u64(buf: &mut [u8], at: &mut usize, mut n: u64) -> Option<()> {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        put(buf, at, &digits[i..])
    }
    let mut at = 0;
    put(buf, &mut at, name)?;
    put(buf, &mut at, b";r=")?;
    put_u64(buf, &mut at, remaining)?;
    put(buf, &mut at, b";t=")?;
    put_u64(buf, &mut at, t)?;
    Some(at)
}

#[cfg(test)]
mod value_tests {
    use super::{ratelimit, ratelimit_value, refused_ratelimit};

    /// A refusal's value, copied from the thread's last one, is the value
    /// built afresh, for every name and `t` in any order.
    #[test]
    fn a_refusals_copied_value_is_the_one_it_would_build() {
        for (name, t) in
            [("\"10/s\"", 1), ("\"10/s\"", 1), ("\"10/s\"", 2), ("\"100/h\"", 2), ("\"10/s\"", 1)]
        {
            for _ in 0..2 {
                assert_eq!(refused_ratelimit(name, t), ratelimit(name, 0, t), "{name} t={t}");
            }
        }
        assert_eq!(refused_ratelimit("\"10/s\"", 3), "\"10/s\";r=0;t=3");
    }

    #[test]
    fn the_ratelimit_value_is_written_like_format_and_never_overflows() {
        let mut buf = [0u8; 64];
        for (r, t) in [(0, 0), (7, 1), (1000, 60), (u64::MAX, u64::MAX)] {
            let len = ratelimit_value(&mut buf, b"\"1000-per-1s\"", r, t).unwrap();
            assert_eq!(std::str::from_utf8(&buf[..len]).unwrap(), format!("\"1000-per-1s\";r={r};t={t}"));
        }
        let mut small = [0u8; 16];
        assert_eq!(ratelimit_value(&mut small, b"\"a-long-policy-name\"", 1, 1), None);
        assert_eq!(ratelimit_value(&mut small, b"p", u64::MAX, 1), None);
    }
}
