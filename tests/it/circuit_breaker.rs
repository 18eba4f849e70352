//! The circuit breaker and outlier ejection against real backends: what the
//! client gets, and above all what the backend no longer receives.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::support::gateway::metric_value;
use crate::support::{
    base_config, closed_port, exclusive, poll_until, Backend, Behavior, Client, TestGateway, TestResponse,
};

/// One upstream `name` and a route `{name}-api` on `/` (unique per test:
/// metrics are process-wide), with no retries.
fn config(name: &str, endpoints: &[SocketAddr], extra: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    base_config()
        + &format!(
            r#"
[upstreams.{name}]
endpoints = [{}]
balance = "round_robin"
connect_timeout = "300ms"
# Short enough for the timeout test, long enough that a loaded machine never
# turns a backend's 500 into a timeout.
timeout = "1s"
{extra}

[upstreams.{name}.retry]
attempts = 1

[[routes]]
name = "{name}-api"
path_prefix = "/"
upstream = "{name}"

# Identical failing requests would be a retry storm (stage 3c); these tests
# look at the breaker alone.
[routes.storm]
enabled = false
"#,
            eps.join(", ")
        )
}

/// The window is long enough that ten requests always fall in it.
const BREAKER: &str = r#"
[upstreams.NAME.circuit_breaker]
window = "30s"
min_requests = 10
failure_rate = 0.5
open_for = "OPEN_FOR"
half_open_requests = 2

[upstreams.NAME.outlier]
consecutive_failures = 1000
"#;

/// A breaker that stays open for `open_for`: long where a test asserts that
/// it is still open (so a slow machine cannot outlast it), short where a test
/// waits for it to close.
fn breaker(name: &str, open_for: Duration) -> String {
    BREAKER.replace("NAME", name).replace("OPEN_FOR", &format!("{}ms", open_for.as_millis()))
}

/// 503 `circuit_open` with a `Retry-After` of at most the time left open plus
/// half of `open_for` (the jitter), rounded up.
fn assert_circuit_open(rsp: &TestResponse, open_for: Duration) {
    assert_eq!(rsp.status, 503, "{}", rsp.text());
    assert_eq!(rsp.reason(), Some("circuit_open"));
    let ra = rsp.retry_after().expect("Retry-After");
    let most = (open_for.as_secs_f64() * 1.5).ceil().max(1.0) as u64;
    assert!((1..=most).contains(&ra), "open_for is {open_for:?}: Retry-After {ra}");
}

async fn circuit_state(gw: &TestGateway, upstream: &str) -> Option<f64> {
    metric_value(&gw.metrics().await, "levee_circuit_state", &[&format!("upstream=\"{upstream}\"")])
}

/// Sends `min_requests` (10) requests to a backend answering 500: the breaker opens.
async fn open_circuit(gw: &TestGateway, backend: &Backend) {
    let client = Client::new();
    for _ in 0..10 {
        assert_eq!(client.get(gw.http, "/").await.status, 500);
    }
    assert_eq!(backend.requests(), 10);
}

#[tokio::test]
async fn circuit_opens_after_min_requests_and_the_backend_sees_nothing_more() {
    let open_for = Duration::from_secs(30);
    let backend = Backend::with(Behavior::Status(500)).await;
    let gw = TestGateway::start(&config("cb_opens", &[backend.addr], &breaker("cb_opens", open_for))).await;
    open_circuit(&gw, &backend).await;
    let client = Client::new();
    for _ in 0..20 {
        assert_circuit_open(&client.get(gw.http, "/").await, open_for);
    }
    assert_eq!(backend.requests(), 10, "the backend received requests while the circuit was open");
    assert_eq!(circuit_state(&gw, "cb_opens").await, Some(2.0));
}

#[tokio::test]
async fn circuit_closes_within_open_for_once_the_backend_heals() {
    // The bound below is in wall-clock time.
    let _machine = exclusive().await;
    let open_for = Duration::from_millis(500);
    let backend = Backend::with(Behavior::Status(500)).await;
    let gw = TestGateway::start(&config("cb_heals", &[backend.addr], &breaker("cb_heals", open_for))).await;
    open_circuit(&gw, &backend).await;
    let opened = Instant::now();
    backend.set(Behavior::Ok);
    let client = Client::new();
    poll_until(Duration::from_secs(5), "the circuit lets a probe through", async || {
        let rsp = client.get(gw.http, "/").await;
        if rsp.status != 200 {
            assert_circuit_open(&rsp, open_for);
        }
        (rsp.status == 200).then_some(())
    })
    .await;
    // Within open_for and a margin for a busy machine; far below the
    // closing time of a breaker that ignores open_for (never, or its window).
    assert!(opened.elapsed() < open_for * 3, "closed after {:?}", opened.elapsed());
    // The first probe succeeded; the second one closes the circuit, and then everything passes.
    for _ in 0..20 {
        assert_eq!(client.get(gw.http, "/").await.status, 200);
    }
    assert_eq!(circuit_state(&gw, "cb_heals").await, Some(0.0));
}

#[tokio::test]
async fn a_failed_half_open_probe_reopens_the_circuit() {
    // Long enough that the ten requests after the probe all fall in it.
    let open_for = Duration::from_secs(2);
    let backend = Backend::with(Behavior::Status(500)).await;
    let gw =
        TestGateway::start(&config("cb_reopens", &[backend.addr], &breaker("cb_reopens", open_for))).await;
    open_circuit(&gw, &backend).await;
    let client = Client::new();
    // Refused until open_for has passed; then the probe reaches the
    // still-failing backend and its 500 is relayed ...
    let probe = poll_until(Duration::from_secs(10), "the circuit lets a probe through", async || {
        let rsp = client.get(gw.http, "/").await;
        if rsp.reason() == Some("circuit_open") {
            assert_circuit_open(&rsp, open_for);
            return None;
        }
        Some(rsp)
    })
    .await;
    assert_eq!(probe.status, 500);
    assert_eq!(probe.reason(), None);
    assert_eq!(backend.requests(), 11);
    // ... and the circuit is open again at once.
    for _ in 0..10 {
        assert_circuit_open(&client.get(gw.http, "/").await, open_for);
    }
    assert_eq!(backend.requests(), 11);
    assert_eq!(circuit_state(&gw, "cb_reopens").await, Some(2.0));
}

#[tokio::test]
async fn connect_errors_and_timeouts_open_the_circuit() {
    let open_for = Duration::from_secs(30);
    let refusing = closed_port();
    let gw = TestGateway::start(&config("cb_refused", &[refusing], &breaker("cb_refused", open_for))).await;
    let client = Client::new();
    for _ in 0..10 {
        assert_eq!(client.get(gw.http, "/").await.reason(), Some("upstream_unreachable"));
    }
    assert_circuit_open(&client.get(gw.http, "/").await, open_for);

    let hanging = Backend::with(Behavior::Hang).await;
    let gw = TestGateway::start(&config("cb_hangs", &[hanging.addr], &breaker("cb_hangs", open_for))).await;
    // Ten requests at once: each times out after 1s.
    let timeouts = futures_util::future::join_all((0..10).map(|_| client.get(gw.http, "/"))).await;
    assert!(timeouts.iter().all(|r| r.reason() == Some("upstream_timeout")));
    assert_circuit_open(&client.get(gw.http, "/").await, open_for);
    assert_eq!(hanging.requests(), 10);
}

#[tokio::test]
async fn one_bad_endpoint_of_two_is_ejected_and_success_stays_high() {
    let good = Backend::start().await;
    let bad = Backend::with(Behavior::Status(500)).await;
    let outlier = r#"
[upstreams.ol_eject.circuit_breaker]
min_requests = 1000

[upstreams.ol_eject.outlier]
consecutive_failures = 3
# Longer than the test, however slow the machine: the endpoint stays out.
eject_for = "5m"
max_ejected = 0.5
"#;
    let gw = TestGateway::start(&config("ol_eject", &[good.addr, bad.addr], outlier)).await;
    let client = Client::new();
    let mut ok = 0;
    for _ in 0..100 {
        if client.get(gw.http, "/").await.status == 200 {
            ok += 1;
        }
    }
    assert!(ok >= 97, "{ok} of 100 succeeded");
    assert_eq!(bad.requests(), 3, "ejected after 3 consecutive failures");
    let metrics = gw.metrics().await;
    let ejected = |ep: SocketAddr| {
        metric_value(
            &metrics,
            "levee_endpoint_ejected",
            &["upstream=\"ol_eject\"", &format!("endpoint=\"{ep}\"")],
        )
    };
    assert_eq!(ejected(bad.addr), Some(1.0));
    assert_eq!(ejected(good.addr), Some(0.0));
}

#[tokio::test]
async fn the_only_endpoint_is_never_ejected() {
    let backend = Backend::with(Behavior::Status(500)).await;
    let outlier = r#"
[upstreams.ol_single.circuit_breaker]
min_requests = 1000

[upstreams.ol_single.outlier]
consecutive_failures = 2
max_ejected = 1.0
"#;
    let gw = TestGateway::start(&config("ol_single", &[backend.addr], outlier)).await;
    let client = Client::new();
    for _ in 0..10 {
        assert_eq!(client.get(gw.http, "/").await.status, 500);
    }
    assert_eq!(backend.requests(), 10);
}
