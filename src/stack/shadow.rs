//! Shadow mode: what a defence in `mode = "shadow"` does instead of refusing.
//!
//! A shadow limit, storm detector or auth guard decides exactly as if it
//! enforced (the same state, quarantines and relapse doubling), and when it
//! would have refused, [`Shadow::record`] reports it and the request goes on:
//! `levee_shadow_shed_total{route,reason}`, the route's `shadow` counters and
//! the event stream (a sample with `"shadow": true`), the `x-levee-shadow:
//! <reason>` request header sent upstream (one value per defence that would
//! have refused), and a log line at most once per client per minute.
//!
//! The log limiter is bounded: a fixed table of [`LOG_SLOTS`] minute stamps
//! indexed by a hash of the client. Two clients sharing a slot share its
//! minute, so a line may be skipped, never repeated within the minute.
//!
//! A client cannot fake the header: on a route with a shadow stage on the
//! request side, [`Strip`] removes any `x-levee-shadow` the client sent.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use http::header::{HeaderName, HeaderValue};
use http::Request;
use metrics::{Counter, SharedString};
use tokio::time::Instant;

use super::Check;
use crate::body::Body;
use crate::context::RequestContext;
use crate::metrics as m;
use crate::respond::{Reason, Shed};
use crate::stats::{RouteStats, ShedSamples};

/// The request header that tells the upstream what shadow mode would have shed.
pub const X_LEVEE_SHADOW: HeaderName = HeaderName::from_static("x-levee-shadow");

/// Minute stamps kept per route for the log limiter (8 bytes each).
pub const LOG_SLOTS: usize = 512;

/// One route's shadow reporting; outlives reloads with the route's stats.
pub struct Shadow {
    route: Arc<str>,
    stats: Arc<RouteStats>,
    samples: Arc<ShedSamples>,
    /// `levee_shadow_shed_total` handles, by position in [`Reason::ALL`].
    counters: [OnceLock<Counter>; Reason::ALL.len()],
    /// Per slot: the minute (since `epoch`, plus one) of the last log line.
    logged: Box<[AtomicU64]>,
    epoch: Instant,
    seed: foldhash::fast::RandomState,
}

impl Shadow {
    pub fn new(route: &str, stats: Arc<RouteStats>, samples: Arc<ShedSamples>) -> Arc<Self> {
        Arc::new(Shadow {
            route: Arc::from(route),
            stats,
            samples,
            counters: std::array::from_fn(|_| OnceLock::new()),
            logged: (0..LOG_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            seed: foldhash::fast::RandomState::default(),
        })
    }

    /// A defence in shadow mode would have answered `shed` to `client`:
    /// count it, sample it, log it (rate-limited), and mark `req` (when it is
    /// still on its way upstream) with `x-levee-shadow`.
    pub fn record(&self, shed: &Shed, client: &str, req: Option<&mut Request<Body>>) {
        let reason = shed.reason;
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.counters[i]
                .get_or_init(|| {
                    metrics::counter!(m::SHADOW_SHED_TOTAL,
                        "route" => SharedString::from(self.route.clone()),
                        "reason" => reason.as_str())
                })
                .increment(1);
        }
        self.stats.shadowed(reason);
        self.samples.record_shadow(&self.route, reason, Some(client));
        if let Some(req) = req {
            req.headers_mut().append(X_LEVEE_SHADOW, HeaderValue::from_static(reason.as_str()));
        }
        if self.first_this_minute(client, Instant::now()) {
            // No client key at info (SPEC, admin rules): it is in the debug line and the event stream.
            tracing::info!(route = %self.route, reason = reason.as_str(), "shadow mode: a client would have been shed (forwarded)");
            tracing::debug!(route = %self.route, reason = reason.as_str(), client, "shadow mode: client would have been shed");
        }
    }

    /// Whether this is the first line for `client` in the current minute.
    fn first_this_minute(&self, client: &str, now: Instant) -> bool {
        let mut h = self.seed.build_hasher();
        h.write(client.as_bytes());
        let slot = &self.logged[(h.finish() % LOG_SLOTS as u64) as usize];
        let minute = now.saturating_duration_since(self.epoch).as_secs() / 60 + 1;
        let last = slot.load(Ordering::Relaxed);
        last != minute && slot.compare_exchange(last, minute, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

/// Removes a client's own `x-levee-shadow`, so the upstream only ever sees levee's.
pub struct Strip;

impl Check for Strip {
    fn check(&self, req: &mut Request<Body>, _: &RequestContext) -> Result<(), Shed> {
        if req.headers().contains_key(X_LEVEE_SHADOW) {
            req.headers_mut().remove(X_LEVEE_SHADOW);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_log_line_is_once_per_client_per_minute() {
        let s = Shadow::new("t", Arc::default(), Arc::default());
        let now = Instant::now();
        assert!(s.first_this_minute("a", now));
        assert!(!s.first_this_minute("a", now + Duration::from_secs(30)));
        assert!(s.first_this_minute("a", now + Duration::from_secs(61)));
        let logged = (0..10_000).filter(|i| s.first_this_minute(&format!("c{i}"), now)).count();
        assert!(logged <= LOG_SLOTS, "{logged}");
    }

    #[tokio::test]
    async fn a_record_counts_samples_and_marks_the_request() {
        let stats = Arc::new(RouteStats::default());
        let samples = Arc::new(ShedSamples::default());
        let s = Shadow::new("shadow-unit", stats.clone(), samples.clone());
        let mut req = Request::new(crate::body::empty());
        s.record(&Shed::new(Reason::RateLimited), "c1", Some(&mut req));
        s.record(&Shed::new(Reason::CallbackBomb), "c1", Some(&mut req));
        let marks: Vec<_> = req.headers().get_all(X_LEVEE_SHADOW).iter().collect();
        assert_eq!(marks, ["rate_limited", "callback_bomb"]);
        assert_eq!(stats.shadow_by_reason()["rate_limited"], 1);
        assert_eq!(stats.shed.load(Ordering::Relaxed), 0, "a shadow shed is not a shed");
        let events = samples.since(0);
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.shadow));
    }
}
