//! Outlier detection: eject an endpoint that keeps failing, for a while.
//!
//! An endpoint is ejected after `consecutive_failures` failed tries in a row
//! (5xx, timeout, connect error, bad response); any success resets the streak.
//! It stays out for `eject_for` × the number of times it was ejected (capped at
//! [`MAX_MULTIPLIER`]), so a host that keeps relapsing stays out longer. The
//! multiplier starts over once the endpoint has served, without being ejected
//! again, for as long as its last ejection lasted.
//!
//! Never more than `max_ejected` × endpoints (rounded down) are out at once,
//! and an upstream with one endpoint never ejects it: ejecting the only host
//! turns a degraded service into no service. When every endpoint is ejected
//! anyway, balancing ignores ejection (Envoy's panic mode, in [`super::balance`]).
//!
//! Cost: a success is one atomic load (and a store only after a failure); a
//! failure one `fetch_add`. While nothing is ejected, picking an endpoint reads
//! one counter and no clock. Ejections take a short lock; returns happen lazily
//! on the next pick after `ejected_until` (the gauge drops then).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use metrics::{Gauge, SharedString};
use tokio::time::Instant;

use crate::config::OutlierConfig;
use crate::metrics as m;
use crate::nanos_since;

/// The cap on the ejection multiplier: at most `eject_for` × this.
pub const MAX_MULTIPLIER: u32 = 10;

/// The health of one endpoint.
struct Health {
    consecutive: AtomicU32,
    /// While ejected: until when, in nanoseconds since `origin`; 0 when not ejected.
    ejected_until: AtomicU64,
    gauge: Gauge,
    label: SharedString,
}

/// What only ejections touch, under the lock.
#[derive(Debug, Default, Clone, Copy)]
struct History {
    /// Ejections that count towards the multiplier.
    times: u32,
    /// When the last ejection ends, and how long it lasted (nanoseconds).
    last_until: u64,
    last_len: u64,
}

pub struct Outlier {
    config: OutlierConfig,
    origin: Instant,
    endpoints: Vec<Health>,
    history: Mutex<Vec<History>>,
    /// Endpoints ejected now.
    ejected: AtomicUsize,
    /// `max_ejected` × endpoints, rounded down; 0 with one endpoint.
    max_ejected: usize,
    upstream: SharedString,
}

impl Outlier {
    pub fn new(
        config: OutlierConfig,
        upstream: SharedString,
        endpoints: &[SharedString],
        origin: Instant,
    ) -> Self {
        let n = endpoints.len();
        let max_ejected = if n <= 1 { 0 } else { ((config.max_ejected * n as f64).floor() as usize).min(n) };
        let endpoints = endpoints
            .iter()
            .map(|label| {
                let gauge = metrics::gauge!(m::ENDPOINT_EJECTED, "upstream" => upstream.clone(), "endpoint" => label.clone());
                gauge.set(0.0);
                Health {
                    consecutive: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                    gauge,
                    label: label.clone(),
                }
            })
            .collect();
        Outlier {
            config,
            origin,
            endpoints,
            history: Mutex::new(vec![History::default(); n]),
            ejected: AtomicUsize::new(0),
            max_ejected,
            upstream,
        }
    }

    /// Whether any endpoint is ejected (then [`Outlier::refresh`] and
    /// [`Outlier::is_ejected`] matter; otherwise every endpoint is usable).
    pub fn any_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire) > 0
    }

    pub fn is_ejected(&self, idx: usize) -> bool {
        self.endpoints.get(idx).is_some_and(|h| h.ejected_until.load(Ordering::Acquire) != 0)
    }

    /// Returns the endpoints whose ejection has ended by `now`.
    pub fn refresh(&self, now: Instant) {
        if !self.any_ejected() {
            return;
        }
        let at = nanos_since(self.origin, now);
        for h in &self.endpoints {
            let until = h.ejected_until.load(Ordering::Acquire);
            if until != 0
                && until <= at
                && h.ejected_until.compare_exchange(until, 0, Ordering::AcqRel, Ordering::Acquire).is_ok()
            {
                h.consecutive.store(0, Ordering::Release);
                self.ejected.fetch_sub(1, Ordering::AcqRel);
                h.gauge.set(0.0);
                tracing::info!(upstream = %self.upstream, endpoint = %h.label, "endpoint returned from ejection");
            }
        }
    }

    /// Records the outcome of one try on endpoint `idx`; returns how long it
    /// was ejected for, when this failure ejected it.
    pub fn record(&self, idx: usize, failed: bool, now: Instant) -> Option<Duration> {
        let h = self.endpoints.get(idx)?;
        if !failed {
            if h.consecutive.load(Ordering::Relaxed) != 0 {
                h.consecutive.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let streak = h.consecutive.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if streak < self.config.consecutive_failures {
            return None;
        }
        self.eject(idx, now)
    }

    fn eject(&self, idx: usize, now: Instant) -> Option<Duration> {
        let h = &self.endpoints[idx];
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if h.ejected_until.load(Ordering::Acquire) != 0
            || self.ejected.load(Ordering::Acquire) >= self.max_ejected
        {
            return None;
        }
        let at = nanos_since(self.origin, now);
        let past = &mut history[idx];
        if at >= past.last_until.saturating_add(past.last_len) {
            past.times = 0;
        }
        past.times = (past.times + 1).min(MAX_MULTIPLIER);
        let len = self.config.eject_for.saturating_mul(past.times);
        let len_nanos = u64::try_from(len.as_nanos()).unwrap_or(u64::MAX);
        // At least 1: 0 means "not ejected".
        let until = at.saturating_add(len_nanos).max(1);
        past.last_until = until;
        past.last_len = len_nanos;
        h.ejected_until.store(until, Ordering::Release);
        h.consecutive.store(0, Ordering::Release);
        self.ejected.fetch_add(1, Ordering::AcqRel);
        h.gauge.set(1.0);
        tracing::warn!(upstream = %self.upstream, endpoint = %h.label, ejected_for = ?len, times = past.times,
            "endpoint ejected after consecutive failures");
        Some(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlier(n: usize, max_ejected: f64, start: Instant) -> Outlier {
        let config =
            OutlierConfig { consecutive_failures: 3, eject_for: Duration::from_secs(10), max_ejected };
        let labels: Vec<_> = (0..n).map(|i| SharedString::from(format!("e{i}"))).collect();
        Outlier::new(config, SharedString::const_str("u"), &labels, start)
    }

    fn fail(o: &Outlier, idx: usize, times: u32, at: Instant) -> Option<Duration> {
        (0..times).map(|_| o.record(idx, true, at)).last().flatten()
    }

    #[test]
    fn ejects_after_consecutive_failures_and_a_success_resets_the_streak() {
        let start = Instant::now();
        let o = outlier(2, 0.5, start);
        fail(&o, 0, 2, start);
        o.record(0, false, start);
        assert_eq!(fail(&o, 0, 2, start), None);
        assert!(!o.is_ejected(0));
        assert_eq!(o.record(0, true, start), Some(Duration::from_secs(10)));
        assert!(o.is_ejected(0) && o.any_ejected());
    }

    #[test]
    fn returns_after_eject_for() {
        let start = Instant::now();
        let o = outlier(2, 0.5, start);
        fail(&o, 0, 3, start);
        o.refresh(start + Duration::from_millis(9999));
        assert!(o.is_ejected(0));
        o.refresh(start + Duration::from_secs(10));
        assert!(!o.is_ejected(0) && !o.any_ejected());
    }

    #[test]
    fn relapses_stay_out_longer_up_to_the_cap() {
        let start = Instant::now();
        let o = outlier(2, 0.5, start);
        let mut t = start;
        let mut lens = Vec::new();
        for _ in 0..12 {
            let len = fail(&o, 0, 3, t).unwrap();
            lens.push(len.as_secs());
            t += len;
            o.refresh(t);
        }
        assert_eq!(lens, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 100, 100]);
    }

    #[test]
    fn the_multiplier_starts_over_after_a_healthy_stretch() {
        let start = Instant::now();
        let o = outlier(2, 0.5, start);
        fail(&o, 0, 3, start); // 10s
        let back = start + Duration::from_secs(10);
        o.refresh(back);
        assert_eq!(fail(&o, 0, 3, back + Duration::from_secs(5)), Some(Duration::from_secs(20)));
        let back = back + Duration::from_secs(25);
        o.refresh(back);
        // Healthy for 20s, as long as the last ejection lasted: back to 1×.
        assert_eq!(fail(&o, 0, 3, back + Duration::from_secs(20)), Some(Duration::from_secs(10)));
    }

    #[test]
    fn never_more_than_max_ejected() {
        let start = Instant::now();
        let o = outlier(4, 0.5, start);
        assert!(fail(&o, 0, 3, start).is_some());
        assert!(fail(&o, 1, 3, start).is_some());
        assert_eq!(fail(&o, 2, 3, start), None, "2 of 4 are out already");
        assert!(!o.is_ejected(2));
        // Once one returns, the next failure of the still-failing endpoint ejects it.
        o.refresh(start + Duration::from_secs(10));
        assert!(o.record(2, true, start + Duration::from_secs(10)).is_some());
    }

    #[test]
    fn a_single_endpoint_is_never_ejected() {
        let start = Instant::now();
        let o = outlier(1, 1.0, start);
        assert_eq!(fail(&o, 0, 100, start), None);
        assert!(!o.is_ejected(0));
        // Three of three with max_ejected 0.5: at most one.
        let o = outlier(3, 0.5, start);
        assert_eq!(o.max_ejected, 1);
    }
}
