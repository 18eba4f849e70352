//! The circuit breaker and outlier ejection against real backends: what the
//! client gets, and above all what the backend no longer receives.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::support::gateway::metric_value;
use crate::support::{base_config, closed_port, Backend, Behavior, Client, TestGateway, TestResponse};

/// One upstream `name` (unique per test: metrics are process-wide) and a
/// route `api` on `/`, with a fast breaker and no retries.
fn config(name: &str, endpoints: &[SocketAddr], extra: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    base_config()
        + &format!(
            r#"
[upstreams.{name}]
endpoints = [{}]
balance = "round_robin"
connect_timeout = "300ms"
timeout = "300ms"
{extra}

[upstreams.{name}.retry]
attempts = 1

[[routes]]
name = "api"
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

const BREAKER: &str = r#"
[upstreams.NAME.circuit_breaker]
window = "2s"
min_requests = 10
failure_rate = 0.5
open_for = "500ms"
half_open_requests = 2

[upstreams.NAME.outlier]
consecutive_failures = 1000
"#;

fn breaker(name: &str) -> String {
    BREAKER.replace("NAME", name)
}

fn assert_circuit_open(rsp: &TestResponse) {
    assert_eq!(rsp.status, 503, "{}", rsp.text());
    assert_eq!(rsp.reason(), Some("circuit_open"));
    let ra = rsp.retry_after().expect("Retry-After");
    assert!((1..=2).contains(&ra), "open_for is 500ms: Retry-After {ra}");
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
    let backend = Backend::with(Behavior::Status(500)).await;
    let gw = TestGateway::start(&config("cb_opens", &[backend.addr], &breaker("cb_opens"))).await;
    open_circuit(&gw, &backend).await;
    let client = Client::new();
    for _ in 0..20 {
        assert_circuit_open(&client.get(gw.http, "/").await);
    }
    assert_eq!(backend.requests(), 10, "the backend received requests while the circuit was open");
    assert_eq!(circuit_state(&gw, "cb_opens").await, Some(2.0));
}

#[tokio::test]
async fn circuit_closes_within_open_for_once_the_backend_heals() {
    let backend = Backend::with(Behavior::Status(500)).await;
    let gw = TestGateway::start(&config("cb_heals", &[backend.addr], &breaker("cb_heals"))).await;
    open_circuit(&gw, &backend).await;
    let opened = Instant::now();
    backend.set(Behavior::Ok);
    let client = Client::new();
    let mut refused = 0;
    loop {
        let rsp = client.get(gw.http, "/").await;
        if rsp.status == 200 {
            break;
        }
        assert_circuit_open(&rsp);
        refused += 1;
        assert!(opened.elapsed() < Duration::from_secs(2) && refused < 100, "never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(opened.elapsed() < Duration::from_millis(500 + 300), "closed after {:?}", opened.elapsed());
    // The first probe succeeded; the second one closes the circuit, and then everything passes.
    for _ in 0..20 {
        assert_eq!(client.get(gw.http, "/").await.status, 200);
    }
    assert_eq!(circuit_state(&gw, "cb_heals").await, Some(0.0));
}

#[tokio::test]
async fn a_failed_half_open_probe_reopens_the_circuit() {
    let backend = Backend::with(Behavior::Status(500)).await;
    let gw = TestGateway::start(&config("cb_reopens", &[backend.addr], &breaker("cb_reopens"))).await;
    open_circuit(&gw, &backend).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let client = Client::new();
    // The probe reaches the still-failing backend and its 500 is relayed ...
    let probe = client.get(gw.http, "/").await;
    assert_eq!(probe.status, 500);
    assert_eq!(probe.reason(), None);
    assert_eq!(backend.requests(), 11);
    // ... and the circuit is open again at once.
    for _ in 0..10 {
        assert_circuit_open(&client.get(gw.http, "/").await);
    }
    assert_eq!(backend.requests(), 11);
    assert_eq!(circuit_state(&gw, "cb_reopens").await, Some(2.0));
}

#[tokio::test]
async fn connect_errors_and_timeouts_open_the_circuit() {
    let refusing = closed_port();
    let gw = TestGateway::start(&config("cb_refused", &[refusing], &breaker("cb_refused"))).await;
    let client = Client::new();
    for _ in 0..10 {
        assert_eq!(client.get(gw.http, "/").await.reason(), Some("upstream_unreachable"));
    }
    assert_circuit_open(&client.get(gw.http, "/").await);

    let hanging = Backend::with(Behavior::Hang).await;
    let gw = TestGateway::start(&config("cb_hangs", &[hanging.addr], &breaker("cb_hangs"))).await;
    // Ten requests at once: each times out after 300ms.
    let timeouts = futures_util::future::join_all((0..10).map(|_| client.get(gw.http, "/"))).await;
    assert!(timeouts.iter().all(|r| r.reason() == Some("upstream_timeout")));
    assert_circuit_open(&client.get(gw.http, "/").await);
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
eject_for = "5s"
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
