//! Every Prometheus name of the contract, once.
//!
//! Recording goes through the `metrics` facade into an in-memory recorder that
//! `/metrics` renders; recording never blocks and never fails, so a broken
//! scraper cannot slow traffic. Labels are routes, upstreams, endpoints, reasons
//! and status codes, all bounded by the config: never a client key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use dashmap::DashMap;
use metrics::Counter;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "levee_requests_total";
pub const SHED_TOTAL: &str = "levee_shed_total";
pub const SHADOW_SHED_TOTAL: &str = "levee_shadow_shed_total";
pub const REQUEST_DURATION: &str = "levee_request_duration_seconds";
pub const UPSTREAM_REQUESTS_TOTAL: &str = "levee_upstream_requests_total";
pub const UPSTREAM_DURATION: &str = "levee_upstream_duration_seconds";
pub const CIRCUIT_STATE: &str = "levee_circuit_state";
pub const CIRCUIT_TRANSITIONS_TOTAL: &str = "levee_circuit_transitions_total";
pub const ENDPOINT_EJECTED: &str = "levee_endpoint_ejected";
pub const RETRIES_TOTAL: &str = "levee_retries_total";
pub const RETRY_BUDGET_EXHAUSTED_TOTAL: &str = "levee_retry_budget_exhausted_total";
pub const TRACKED_CLIENTS: &str = "levee_tracked_clients";
pub const STORE_UP: &str = "levee_store_up";
pub const STORM_QUARANTINED: &str = "levee_storm_quarantined_clients";
pub const AUTH_GUARD_TRIPPED: &str = "levee_auth_guard_tripped";
/// levee's addition to the contract: a route whose total rate keeps multiplying.
pub const STORM_ROUTE_ALARM: &str = "levee_storm_route_alarm";
pub const ROUTE_LAST_SUCCESS: &str = "levee_route_last_success_timestamp_seconds";
pub const ROUTE_STALE: &str = "levee_route_stale";
pub const CONFIG_RELOADS_TOTAL: &str = "levee_config_reloads_total";
pub const CONFIG_LAST_RELOAD_SUCCESS: &str = "levee_config_last_reload_success_timestamp_seconds";
pub const TLS_CERT_NOT_AFTER: &str = "levee_tls_cert_not_after_timestamp_seconds";
pub const BUILD_INFO: &str = "levee_build_info";
pub const CONNECTIONS_CLOSED_TOTAL: &str = "levee_connections_closed_total";
pub const UPGRADED_CONNECTIONS: &str = "levee_upgraded_connections";

/// Latency buckets from 100µs to 30s, in nanoseconds: a gateway's own
/// overhead and a slow backend both land in a bucket of their own.
const DURATION_BUCKETS_NS: [u64; 17] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns the handle `/metrics`
/// renders from ([`render`]). Several gateways in one process (the tests,
/// `levee demo`) share it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only when another recorder is installed already (an embedding
            // program's); levee then records into that one and renders its own, empty.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// What `/metrics` answers: the recorder's counters and gauges, then the
/// duration histograms.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut out = handle.render();
    let families = HISTOGRAMS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for family in families.iter() {
        family.render(&mut out);
    }
    out
}

// === Duration histograms ===

/// A histogram of durations in the fixed [`DURATION_BUCKETS_NS`].
///
/// Not the recorder's histogram, which keeps every sample (with a timestamp,
/// in a lock-free list) until something folds them into buckets: ~280
/// instructions to record and ~350 to fold per request, and memory that grew
/// between folds (~80 MB/min at 45k req/s while nobody scraped, until a thread
/// of its own folded them every second). Here a sample is two relaxed atomic
/// additions into memory fixed from the start, and nothing runs in between.
#[derive(Debug, Default)]
pub struct DurationHistogram {
    /// Samples per bucket (not cumulative); the last one is `+Inf`'s own.
    counts: [AtomicU64; DURATION_BUCKETS_NS.len() + 1],
    /// The samples' sum in nanoseconds (584 years before it wraps).
    sum_ns: AtomicU64,
}

impl DurationHistogram {
    pub fn record(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // The first bucket whose bound the sample does not exceed (`le`).
        let i = DURATION_BUCKETS_NS.partition_point(|&le| le < ns);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// One histogram name and its series, one per label value.
struct Family {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    series: Vec<(String, Arc<DurationHistogram>)>,
}

/// Every duration histogram, by name. Series are added when a route or an
/// upstream is built (a label value the config bounds) and kept, as the
/// recorder keeps its own: a reload that keeps a name keeps its series.
static HISTOGRAMS: Mutex<Vec<Family>> = Mutex::new(Vec::new());

/// `levee_request_duration_seconds{route}`.
pub fn request_duration(route: &str) -> Arc<DurationHistogram> {
    duration_histogram(REQUEST_DURATION, "Time from request head to response head, by route.", "route", route)
}

/// `levee_upstream_duration_seconds{upstream}`.
pub fn upstream_duration(upstream: &str) -> Arc<DurationHistogram> {
    duration_histogram(
        UPSTREAM_DURATION,
        "Upstream time to response head, by upstream.",
        "upstream",
        upstream,
    )
}

fn duration_histogram(
    name: &'static str,
    help: &'static str,
    label: &'static str,
    value: &str,
) -> Arc<DurationHistogram> {
    let mut families = HISTOGRAMS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let i = match families.iter().position(|f| f.name == name) {
        Some(i) => i,
        None => {
            families.push(Family { name, help, label, series: Vec::new() });
            families.len() - 1
        }
    };
    let family = &mut families[i];
    if let Some((_, h)) = family.series.iter().find(|(v, _)| v == value) {
        return h.clone();
    }
    let h = Arc::new(DurationHistogram::default());
    family.series.push((value.to_string(), h.clone()));
    h
}

impl Family {
    /// Prometheus's text format, as the recorder writes its histograms.
    fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let name = self.name;
        // Writing into a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {}", self.help);
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (value, h) in &self.series {
            let label = format!("{}=\"{}\"", self.label, escape_label_value(value));
            let mut cumulative = 0u64;
            for (&le, count) in DURATION_BUCKETS_NS.iter().zip(&h.counts) {
                cumulative += count.load(Ordering::Relaxed);
                let le = le as f64 / 1e9;
                let _ = writeln!(out, "{name}_bucket{{{label},le=\"{le}\"}} {cumulative}");
            }
            cumulative += h.counts[DURATION_BUCKETS_NS.len()].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{label},le=\"+Inf\"}} {cumulative}");
            let sum = h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "{name}_sum{{{label}}} {sum}");
            let _ = writeln!(out, "{name}_count{{{label}}} {cumulative}");
        }
        out.push('\n');
    }
}

/// A label value as the text format needs it: `\`, `"` and line feeds escaped.
fn escape_label_value(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered, by route, status and outcome (forwarded, shed, error)."
    );
    describe_counter!(SHED_TOTAL, "Requests levee refused to forward, by route and reason.");
    describe_counter!(
        SHADOW_SHED_TOTAL,
        "Requests a defence in shadow mode would have refused (and forwarded), by route and reason."
    );
    describe_counter!(
        UPSTREAM_REQUESTS_TOTAL,
        "Requests sent to upstream endpoints, by status (or error kind)."
    );
    describe_gauge!(CIRCUIT_STATE, "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open.");
    describe_counter!(CIRCUIT_TRANSITIONS_TOTAL, "Circuit breaker state changes, by upstream and new state.");
    describe_gauge!(ENDPOINT_EJECTED, "1 while an endpoint is ejected by outlier detection.");
    describe_counter!(RETRIES_TOTAL, "Retries levee sent, by upstream.");
    describe_counter!(RETRY_BUDGET_EXHAUSTED_TOTAL, "Retries refused by the retry budget, by upstream.");
    describe_gauge!(TRACKED_CLIENTS, "Client states held in this node's memory store.");
    describe_gauge!(STORE_UP, "1 when the rate-limit store answers, 0 while on_failure applies.");
    describe_gauge!(STORM_QUARANTINED, "Clients quarantined by the storm detector, by route and kind.");
    describe_gauge!(
        STORM_ROUTE_ALARM,
        "1 while a route's total rate keeps multiplying (the whole fleet has the bug)."
    );
    describe_gauge!(AUTH_GUARD_TRIPPED, "1 while the auth guard rewrites upstream 401s to 503 on a route.");
    describe_gauge!(ROUTE_LAST_SUCCESS, "Unix time of the route's last 2xx/3xx answer.");
    describe_gauge!(ROUTE_STALE, "1 when a route saw no success within expect_traffic_within.");
    describe_counter!(CONFIG_RELOADS_TOTAL, "Config reloads, by result (applied, rejected).");
    describe_gauge!(CONFIG_LAST_RELOAD_SUCCESS, "Unix time of the last applied config.");
    describe_gauge!(TLS_CERT_NOT_AFTER, "notAfter of every certificate of every served chain.");
    describe_gauge!(BUILD_INFO, "Always 1; the version label says which levee runs.");
    describe_gauge!(UPGRADED_CONNECTIONS, "Open upgraded (WebSocket) connections, by route.");
    describe_counter!(
        CONNECTIONS_CLOSED_TOTAL,
        "Client connections levee closed, by listener and reason (idle, header_timeout, h2_abuse, ...)."
    );
}

/// Counter handles by a small key (a status and an outcome; an endpoint and a
/// status), so that counting a request looks up no labels. The first
/// [`CounterCache::HOT`] keys seen take a fixed slot each, found by comparing
/// a word per slot with no lock and no hash (a route sees a handful of
/// statuses); any further key goes to a map. Registering a handle (the label
/// hash and the registry's search) happens once per key.
#[derive(Default)]
pub struct CounterCache {
    hot: [HotSlot; CounterCache::HOT],
    rest: DashMap<u64, Counter, foldhash::fast::RandomState>,
}

#[derive(Default)]
struct HotSlot {
    /// The key plus one; 0: free.
    tag: AtomicU64,
    counter: OnceLock<Counter>,
}

impl CounterCache {
    pub const HOT: usize = 8;

    /// Adds one to the counter of `key`, registering it with `register` the
    /// first time the key is seen.
    pub fn increment(&self, key: u64, register: impl FnOnce() -> Counter) {
        let tag = key.saturating_add(1);
        for slot in &self.hot {
            let seen = match slot.tag.load(Ordering::Acquire) {
                0 => match slot.tag.compare_exchange(0, tag, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => tag,
                    Err(other) => other,
                },
                seen => seen,
            };
            if seen == tag {
                // A racing first use of the same key waits for one registration.
                slot.counter.get_or_init(register).increment(1);
                return;
            }
        }
        self.rest.entry(key).or_insert_with(register).increment(1);
    }
}

/// Seconds since the Unix epoch, for timestamp gauges.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use super::*;

    /// The rendered text of one histogram family.
    fn rendered(name: &str) -> String {
        let families = HISTOGRAMS.lock().unwrap();
        let mut out = String::new();
        families.iter().filter(|f| f.name == name).for_each(|f| f.render(&mut out));
        out
    }

    /// A sample counts in the first bucket whose bound it does not exceed
    /// (Prometheus's `le`), buckets are cumulative, and `_count` is `+Inf`'s.
    #[test]
    fn durations_land_in_le_buckets_and_render_as_prometheus_histograms() {
        use std::time::Duration;
        const NAME: &str = "levee_test_one_duration_seconds";
        let h = duration_histogram(NAME, "A test.", "route", "metrics-a\"b");
        for d in
            [Duration::from_micros(100), Duration::from_micros(101), Duration::from_secs(31), Duration::MAX]
        {
            h.record(d);
        }
        assert!(
            Arc::ptr_eq(&h, &duration_histogram(NAME, "A test.", "route", "metrics-a\"b")),
            "one series per value"
        );
        let text = rendered(NAME);
        let label = "route=\"metrics-a\\\"b\"";
        for line in [
            "# HELP levee_test_one_duration_seconds A test.".to_string(),
            "# TYPE levee_test_one_duration_seconds histogram".to_string(),
            format!("{NAME}_bucket{{{label},le=\"0.0001\"}} 1"),
            format!("{NAME}_bucket{{{label},le=\"0.00025\"}} 2"),
            format!("{NAME}_bucket{{{label},le=\"1\"}} 2"),
            format!("{NAME}_bucket{{{label},le=\"30\"}} 2"),
            format!("{NAME}_bucket{{{label},le=\"+Inf\"}} 4"),
            format!("{NAME}_count{{{label}}} 4"),
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
        assert_eq!(text.lines().filter(|l| l.contains("_bucket")).count(), DURATION_BUCKETS_NS.len() + 1);
        assert!(text.lines().any(|l| l.starts_with(&format!("{NAME}_sum{{{label}}} "))), "{text}");
    }

    /// Every key counts into its own handle, registered once, whether it took
    /// a hot slot or went to the map.
    #[test]
    fn each_key_is_registered_once_and_counted_in_its_own_handle() {
        const KEYS: u64 = CounterCache::HOT as u64 + 4;
        let cache = CounterCache::default();
        let handles: Vec<Arc<AtomicU64>> = (0..KEYS).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let registered = AtomicUsize::new(0);
        for round in 1..=3u64 {
            for key in 0..KEYS {
                for _ in 0..=key {
                    cache.increment(key, || {
                        registered.fetch_add(1, Ordering::Relaxed);
                        Counter::from_arc(handles[key as usize].clone())
                    });
                }
            }
            assert_eq!(registered.load(Ordering::Relaxed), KEYS as usize, "round {round}");
            for key in 0..KEYS {
                assert_eq!(handles[key as usize].load(Ordering::Relaxed), round * (key + 1), "key {key}");
            }
        }
    }
}
