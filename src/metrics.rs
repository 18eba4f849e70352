//! Every Prometheus name of the contract, once.
//!
//! Recording goes through the `metrics` facade into an in-memory recorder that
//! `/metrics` renders; recording never blocks and never fails, so a broken
//! scraper cannot slow traffic. Labels are routes, upstreams, endpoints, reasons
//! and status codes, all bounded by the config: never a client key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use dashmap::DashMap;
use metrics::Counter;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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

/// Latency buckets from 100µs to 30s: a gateway's own overhead and a slow backend
/// both land in a bucket of their own.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns the handle `/metrics`
/// renders from. Several gateways in one process (the tests, `levee demo`)
/// share it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), DURATION_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only when another recorder is installed already (an embedding
            // program's); levee then records into that one and renders its own, empty.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The recorder keeps every histogram sample until something drains it, and
/// only a scrape did: with nobody scraping, memory grew by ~80 MB/min at 45k
/// req/s, exactly when the metrics pipeline is down and no alert fires. A
/// thread of its own folds the samples into the fixed buckets every second,
/// so metrics memory is bounded by one second of samples whatever the
/// scrape interval. A plain thread, not a task: it must run whatever runtime
/// (or none) the embedding program has.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new().name("levee-metrics-upkeep".into()).spawn(move || loop {
        std::thread::sleep(UPKEEP_EVERY);
        handle.run_upkeep();
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histogram memory grows until scraped");
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered, by route, status and outcome (forwarded, shed, error)."
    );
    describe_counter!(SHED_TOTAL, "Requests levee refused to forward, by route and reason.");
    describe_counter!(
        SHADOW_SHED_TOTAL,
        "Requests a defence in shadow mode would have refused (and forwarded), by route and reason."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from request head to response head, by route."
    );
    describe_counter!(
        UPSTREAM_REQUESTS_TOTAL,
        "Requests sent to upstream endpoints, by status (or error kind)."
    );
    describe_histogram!(UPSTREAM_DURATION, Unit::Seconds, "Upstream time to response head, by upstream.");
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
