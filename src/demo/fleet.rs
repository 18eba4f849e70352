//! The simulated fleet and its timeline: well-behaved devices, one device whose
//! callback bug doubles its rate every second, a noisy device over its limit,
//! and impatient devices that re-send a failed request at once.
//!
//! Every actor is bounded: a fixed number of devices, a capped rate, a capped
//! number of tries per request, one shared bound on requests in flight, a
//! timeout per request, and the demo's deadline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::backends::Mode;

/// Well-behaved devices, about one request a second each.
pub const STEADY_DEVICES: usize = 50;
/// Devices that re-send a failed request at once (up to [`MAX_TRIES`] tries).
pub const IMPATIENT_DEVICES: usize = 5;
const MAX_TRIES: u32 = 12;
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// The callback bomb doubles its rate every second up to this many per second.
const BOMB_MAX_RATE: u32 = 64;
/// The noisy device's steady rate (its limit is 10/s, burst 20).
const NOISY_RATE: u32 = 30;
/// Requests in flight at once, over the whole fleet.
const MAX_IN_FLIGHT: usize = 512;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// When each thing happens, as offsets from the start.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub total: Duration,
    pub bomb: (Duration, Duration),
    pub noisy: (Duration, Duration),
    pub failing: (Duration, Duration),
    /// After the backend recovers: the breaker closes again (its `open_for` is 5 s).
    pub recovered: Duration,
    pub unauthorized: (Duration, Duration),
}

impl Timeline {
    /// The full timeline for runs of a minute or more (everything is seen in
    /// the first 50 s), a compressed one for shorter runs.
    pub fn new(total: Duration) -> Timeline {
        let s = Duration::from_secs;
        if total >= s(60) {
            Timeline {
                total,
                bomb: (s(3), s(18)),
                noisy: (s(8), s(16)),
                failing: (s(20), s(30)),
                recovered: s(37),
                unauthorized: (s(38), s(48)),
            }
        } else {
            Timeline {
                total,
                bomb: (s(2), s(12)),
                noisy: (s(3), s(6)),
                failing: (s(6), s(10)),
                recovered: s(16),
                unauthorized: (s(16), s(22)),
            }
        }
    }

    fn within(t: Duration, (a, b): (Duration, Duration)) -> bool {
        t >= a && t < b
    }

    /// What the backends do at `t`.
    pub fn mode(&self, t: Duration) -> Mode {
        if Self::within(t, self.failing) {
            Mode::Failing
        } else if Self::within(t, self.unauthorized) {
            Mode::Unauthorized
        } else {
            Mode::Healthy
        }
    }

    /// Inside an injected outage (or the breaker's recovery after one), where
    /// nobody can be served and the steady devices' success rate does not count.
    pub fn outage(&self, t: Duration) -> bool {
        Self::within(t, (self.failing.0, self.recovered))
            || Self::within(t, (self.unauthorized.0, self.unauthorized.1 + Duration::from_secs(1)))
    }

    /// A one-line description of what is going on at `t`.
    pub fn phase(&self, t: Duration) -> String {
        let mut parts = Vec::new();
        if Self::within(t, self.bomb) {
            parts.push("callback bomb (rate doubling every second)");
        }
        if Self::within(t, self.noisy) {
            parts.push("noisy device over its 10/s limit");
        }
        if Self::within(t, self.failing) {
            parts.push("backend failing (503), impatient devices retry");
        } else if Self::within(t, (self.failing.1, self.recovered)) {
            parts.push("backend recovered, breaker closing");
        }
        if Self::within(t, self.unauthorized) {
            parts.push("backend answers 401 to everyone");
        }
        if parts.is_empty() {
            "steady fleet".to_string()
        } else {
            parts.join(" + ")
        }
    }
}

/// What the fleet saw.
#[derive(Debug, Default)]
pub struct Stats {
    pub sent: AtomicU64,
    /// Transport errors and timeouts.
    pub errors: AtomicU64,
    /// Not sent: the fleet's in-flight bound was reached.
    pub skipped: AtomicU64,
    by_status: Mutex<BTreeMap<u16, u64>>,
    by_reason: Mutex<BTreeMap<String, u64>>,
    /// Steady devices outside outages: answered 2xx / sent.
    pub steady_ok: AtomicU64,
    pub steady_total: AtomicU64,
    /// Steady devices over the whole run.
    pub steady_all_ok: AtomicU64,
    pub steady_all_total: AtomicU64,
}

impl Stats {
    pub fn by_status(&self) -> BTreeMap<u16, u64> {
        self.by_status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn by_reason(&self) -> BTreeMap<String, u64> {
        self.by_reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn answered(&self, status: StatusCode, reason: Option<&str>) {
        *self.by_status.lock().unwrap_or_else(|p| p.into_inner()).entry(status.as_u16()).or_default() += 1;
        if let Some(r) = reason {
            let mut map = self.by_reason.lock().unwrap_or_else(|p| p.into_inner());
            match map.get_mut(r) {
                Some(n) => *n += 1,
                None => {
                    map.insert(r.to_string(), 1);
                }
            }
        }
    }
}

/// The fleet: a pooled client towards the gateway, and what it saw.
#[derive(Clone)]
pub struct Fleet {
    client: Client<HttpConnector, Empty<Bytes>>,
    gateway: SocketAddr,
    timeline: Arc<Timeline>,
    start: Instant,
    stop: Arc<AtomicBool>,
    in_flight: Arc<Semaphore>,
    pub stats: Arc<Stats>,
}

/// Who sent a request, for the statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Steady,
    Other,
}

impl Fleet {
    pub fn new(gateway: SocketAddr, timeline: Arc<Timeline>, start: Instant, stop: Arc<AtomicBool>) -> Fleet {
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build_http();
        Fleet {
            client,
            gateway,
            timeline,
            start,
            stop,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            stats: Arc::new(Stats::default()),
        }
    }

    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && self.elapsed() < self.timeline.total
    }

    /// Runs every device until the deadline or the stop flag, then waits
    /// (bounded) for the requests still in flight.
    pub async fn run(&self) {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..STEADY_DEVICES {
            let f = self.clone();
            tasks.spawn(async move { f.steady(i).await });
        }
        for i in 0..IMPATIENT_DEVICES {
            let f = self.clone();
            tasks.spawn(async move { f.impatient(i).await });
        }
        let f = self.clone();
        tasks.spawn(async move { f.bomb().await });
        let f = self.clone();
        tasks.spawn(async move { f.noisy().await });
        while tasks.join_next().await.is_some() {}
        let all = u32::try_from(MAX_IN_FLIGHT).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, self.in_flight.acquire_many(all)).await;
    }

    /// Sleeps until `at` (from the start), or less when stopping; false when the demo is over.
    async fn sleep_until(&self, at: Duration) -> bool {
        while self.running() {
            let now = self.elapsed();
            if now >= at {
                return true;
            }
            tokio::time::sleep((at - now).min(Duration::from_millis(250))).await;
        }
        false
    }

    /// One request a second, a new one each time.
    async fn steady(&self, i: usize) {
        let device = format!("dev-{i:03}");
        let mut at = Duration::from_millis(fastrand::u64(0..1000));
        let mut seq = 0u64;
        while self.sleep_until(at).await {
            seq += 1;
            let path = format!("/v1/device/{device}/telemetry?seq={seq}");
            self.spawn_request(device.clone(), path, Kind::Steady);
            at += Duration::from_millis(900 + fastrand::u64(0..200));
        }
    }

    /// One request a second; a failed one is re-sent at once, the same request, up to `MAX_TRIES` times.
    async fn impatient(&self, i: usize) {
        let device = format!("impatient-{i}");
        let mut at = Duration::from_millis(fastrand::u64(0..1000));
        let mut seq = 0u64;
        while self.sleep_until(at).await {
            seq += 1;
            let path = format!("/v1/device/{device}/sync?seq={seq}");
            for _ in 0..MAX_TRIES {
                let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                    self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                    break;
                };
                let status = self.request(&device, &path, Kind::Other).await;
                drop(permit);
                if status.is_some_and(|s| s.is_success() || s.is_client_error() && s != 429)
                    || !self.running()
                {
                    break;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            at = self.elapsed().max(at) + Duration::from_secs(1);
        }
    }

    /// Its callback registers another callback: 1, 2, 4, ... requests a second.
    async fn bomb(&self) {
        let device = "dev-callback-bug".to_string();
        let (from, to) = self.timeline.bomb;
        let mut rate = 1u32;
        let mut second = from;
        let mut seq = 0u64;
        while second < to && self.sleep_until(second).await {
            for k in 0..rate {
                if !self.sleep_until(second + Duration::from_secs(1) * k / rate).await {
                    return;
                }
                seq += 1;
                self.spawn_request(
                    device.clone(),
                    format!("/v1/device/{device}/oauth/callback?n={seq}"),
                    Kind::Other,
                );
            }
            rate = (rate * 2).min(BOMB_MAX_RATE);
            second += Duration::from_secs(1);
        }
    }

    /// A steady 30 requests a second: three times its limit.
    async fn noisy(&self) {
        let device = "dev-noisy".to_string();
        let (from, to) = self.timeline.noisy;
        let step = Duration::from_secs(1) / NOISY_RATE;
        let mut at = from;
        let mut seq = 0u64;
        while at < to && self.sleep_until(at).await {
            seq += 1;
            self.spawn_request(
                device.clone(),
                format!("/v1/device/{device}/upload?chunk={seq}"),
                Kind::Other,
            );
            at += step;
        }
    }

    fn spawn_request(&self, device: String, path: String, kind: Kind) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let f = self.clone();
        tokio::spawn(async move {
            f.request(&device, &path, kind).await;
            drop(permit);
        });
    }

    /// Sends one request and records its answer; `None` on a transport error or timeout.
    async fn request(&self, device: &str, path: &str, kind: Kind) -> Option<StatusCode> {
        let sent_at = self.elapsed();
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        let req = Request::get(format!("http://{}{path}", self.gateway))
            .header("x-device-id", device)
            .body(Empty::new())
            .ok()?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let rsp = self.client.request(req).await.ok()?;
            let status = rsp.status();
            let reason = rsp
                .headers()
                .get(crate::respond::X_LEVEE_REASON)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            rsp.into_body().collect().await.ok()?;
            Some((status, reason))
        })
        .await
        .ok()
        .flatten();
        let status = match answer {
            Some((status, reason)) => {
                self.stats.answered(status, reason.as_deref());
                Some(status)
            }
            None => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        if kind == Kind::Steady {
            let ok = u64::from(status.is_some_and(|s| s.is_success()));
            self.stats.steady_all_total.fetch_add(1, Ordering::Relaxed);
            self.stats.steady_all_ok.fetch_add(ok, Ordering::Relaxed);
            if !self.timeline.outage(sent_at) && !self.timeline.outage(self.elapsed()) {
                self.stats.steady_total.fetch_add(1, Ordering::Relaxed);
                self.stats.steady_ok.fetch_add(ok, Ordering::Relaxed);
            }
        }
        status
    }
}
