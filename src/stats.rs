//! Bounded live statistics for the admin API and the dashboard: per-route
//! counters by outcome and reason, the last success (staleness), the top
//! offending clients, and a sample of recent shed decisions.
//!
//! Client keys appear here and only here (never in metric labels), in two
//! bounded structures: a space-saving summary of [`TOP_K`] entries per route
//! and a ring of [`SAMPLES`] recent sheds, admitted at most [`SAMPLES_PER_S`]
//! per second.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::metrics::unix_now;
use crate::respond::Reason;

/// Offenders kept per route.
pub const TOP_K: usize = 16;
/// Recent shed decisions kept for the event stream.
pub const SAMPLES: usize = 256;
/// Shed decisions sampled per second at most.
pub const SAMPLES_PER_S: u32 = 20;

/// One route's counters; shared by every config version of the route.
#[derive(Debug)]
pub struct RouteStats {
    pub forwarded: AtomicU64,
    pub shed: AtomicU64,
    pub error: AtomicU64,
    by_reason: [AtomicU64; Reason::ALL.len()],
    /// What defences in shadow mode would have shed (the requests were forwarded).
    pub shadow: AtomicU64,
    shadow_by_reason: [AtomicU64; Reason::ALL.len()],
    /// Unix milliseconds of the last 2xx/3xx; starts at creation so a route
    /// that never saw traffic goes stale after its `expect_traffic_within`.
    last_success_ms: AtomicU64,
    seen_success: AtomicBool,
    pub stale: AtomicBool,
    offenders: Mutex<Vec<Offender>>,
}

/// A client in the top-offenders summary.
#[derive(Debug, Clone, Serialize)]
pub struct Offender {
    pub client: String,
    /// Sheds counted (space-saving: may overcount by the evicted entry's count).
    pub shed: u64,
    pub reason: &'static str,
}

impl Default for RouteStats {
    fn default() -> Self {
        RouteStats {
            forwarded: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            error: AtomicU64::new(0),
            by_reason: std::array::from_fn(|_| AtomicU64::new(0)),
            shadow: AtomicU64::new(0),
            shadow_by_reason: std::array::from_fn(|_| AtomicU64::new(0)),
            last_success_ms: AtomicU64::new((unix_now() * 1000.0) as u64),
            seen_success: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            offenders: Mutex::new(Vec::with_capacity(TOP_K)),
        }
    }
}

impl RouteStats {
    /// A relayed response.
    pub fn forwarded(&self, status: u16) {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        if status < 400 {
            self.last_success_ms.store((unix_now() * 1000.0) as u64, Ordering::Relaxed);
            self.seen_success.store(true, Ordering::Relaxed);
        }
    }

    /// levee's own answer; `client` is known for per-client refusals.
    pub fn answered(&self, reason: Reason, client: Option<&str>) {
        if !reason.is_shed() {
            self.error.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.shed.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.by_reason[i].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(client) = client {
            self.offend(client, reason);
        }
    }

    /// A defence in shadow mode would have answered `reason` (the request
    /// was forwarded; it is not in `shed`, nor in the top offenders).
    pub fn shadowed(&self, reason: Reason) {
        self.shadow.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.shadow_by_reason[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Space-saving (Metwally et al.): a tracked client counts up; a new one
    /// replaces the smallest entry and inherits its count.
    fn offend(&self, client: &str, reason: Reason) {
        let mut top = self.offenders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = top.iter_mut().find(|o| o.client == client) {
            o.shed += 1;
            o.reason = reason.as_str();
        } else if top.len() < TOP_K {
            top.push(Offender { client: client.to_string(), shed: 1, reason: reason.as_str() });
        } else if let Some(min) = top.iter_mut().min_by_key(|o| o.shed) {
            *min = Offender { client: client.to_string(), shed: min.shed + 1, reason: reason.as_str() };
        }
    }

    /// The top offenders, most shed first.
    pub fn offenders(&self) -> Vec<Offender> {
        let mut top = self.offenders.lock().unwrap_or_else(|p| p.into_inner()).clone();
        top.sort_by_key(|o| std::cmp::Reverse(o.shed));
        top
    }

    /// Forgets a client (after an operator reset it).
    pub fn forgive(&self, client: &str) {
        self.offenders.lock().unwrap_or_else(|p| p.into_inner()).retain(|o| o.client != client);
    }

    /// Shed counts by reason, non-zero only.
    pub fn shed_by_reason(&self) -> serde_json::Map<String, serde_json::Value> {
        by_reason(&self.by_reason)
    }

    /// What shadow mode would have shed, by reason, non-zero only.
    pub fn shadow_by_reason(&self) -> serde_json::Map<String, serde_json::Value> {
        by_reason(&self.shadow_by_reason)
    }

    /// Unix seconds of the last success, if there was one.
    pub fn last_success(&self) -> Option<f64> {
        self.seen_success
            .load(Ordering::Relaxed)
            .then(|| self.last_success_ms.load(Ordering::Relaxed) as f64 / 1000.0)
    }

    /// Seconds since the last success (or since the route was created).
    pub fn silent_for(&self, now: f64) -> f64 {
        (now - self.last_success_ms.load(Ordering::Relaxed) as f64 / 1000.0).max(0.0)
    }
}

/// Non-zero counts by reason, as the admin API shows them.
fn by_reason(counts: &[AtomicU64; Reason::ALL.len()]) -> serde_json::Map<String, serde_json::Value> {
    Reason::ALL
        .iter()
        .zip(counts)
        .filter_map(|(r, n)| {
            let n = n.load(Ordering::Relaxed);
            (n > 0).then(|| (r.as_str().to_string(), n.into()))
        })
        .collect()
}

/// One sampled shed decision.
#[derive(Debug, Clone, Serialize)]
pub struct ShedEvent {
    pub seq: u64,
    pub at: f64,
    pub route: String,
    pub reason: &'static str,
    pub client: Option<String>,
    /// What levee answered, or would have answered in shadow mode.
    pub status: u16,
    /// A defence in shadow mode would have shed this; the request was forwarded.
    pub shadow: bool,
}

/// The last [`SAMPLES`] shed decisions, at most [`SAMPLES_PER_S`] a second.
#[derive(Debug, Default)]
pub struct ShedSamples {
    inner: Mutex<SamplesInner>,
}

#[derive(Debug, Default)]
struct SamplesInner {
    ring: VecDeque<ShedEvent>,
    seq: u64,
    second: u64,
    this_second: u32,
}

impl ShedSamples {
    pub fn record(&self, route: &str, reason: Reason, client: Option<&str>) {
        self.push(route, reason, client, false);
    }

    /// What a defence in shadow mode would have shed (and forwarded).
    pub fn record_shadow(&self, route: &str, reason: Reason, client: Option<&str>) {
        self.push(route, reason, client, true);
    }

    fn push(&self, route: &str, reason: Reason, client: Option<&str>, shadow: bool) {
        let now = unix_now();
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let second = now as u64;
        if second != s.second {
            s.second = second;
            s.this_second = 0;
        }
        if s.this_second >= SAMPLES_PER_S {
            return;
        }
        s.this_second += 1;
        s.seq += 1;
        let event = ShedEvent {
            seq: s.seq,
            at: now,
            route: route.to_string(),
            reason: reason.as_str(),
            client: client.map(str::to_string),
            status: reason.status().as_u16(),
            shadow,
        };
        if s.ring.len() >= SAMPLES {
            s.ring.pop_front();
        }
        s.ring.push_back(event);
    }

    /// Events after `seq`, oldest first.
    pub fn since(&self, seq: u64) -> Vec<ShedEvent> {
        let s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.ring.iter().filter(|e| e.seq > seq).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_saving_keeps_the_heavy_hitters_in_bounded_space() {
        let s = RouteStats::default();
        for i in 0..10_000 {
            s.answered(Reason::RateLimited, Some(&format!("one-off-{i}")));
            if i % 3 == 0 {
                s.answered(Reason::CallbackBomb, Some("bomb"));
            }
        }
        let top = s.offenders();
        assert!(top.len() <= TOP_K);
        assert_eq!(top[0].client, "bomb");
        assert_eq!(top[0].reason, "callback_bomb");
        assert_eq!(s.shed_by_reason()["callback_bomb"], 3334);
    }

    #[test]
    fn samples_are_bounded_per_second_and_in_total() {
        let s = ShedSamples::default();
        for _ in 0..100 {
            s.record("r", Reason::RetryStorm, Some("c"));
        }
        let got = s.since(0);
        assert!(got.len() <= SAMPLES_PER_S as usize * 2, "{}", got.len());
        assert!(s.since(got.last().unwrap().seq).is_empty());
    }
}
