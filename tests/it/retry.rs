//! levee's own retries against real backends: which requests are retried,
//! where, and how the budget bounds what a failing backend receives.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::time::Instant;

use crate::support::gateway::metric_value;
use crate::support::{base_config, closed_port, Backend, Behavior, Client, TestGateway};

/// One upstream `name` (unique per test: metrics are process-wide) with the
/// given `[retry]` keys, a breaker and outlier detection that stay out of the
/// way, and a route `{name}-api` on `/` (unique too).
fn config(name: &str, endpoints: &[SocketAddr], retry: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    base_config()
        + &format!(
            r#"
[upstreams.{name}]
endpoints = [{}]
balance = "round_robin"
connect_timeout = "300ms"
timeout = "1s"

[upstreams.{name}.circuit_breaker]
min_requests = 100000

[upstreams.{name}.outlier]
consecutive_failures = 100000

[upstreams.{name}.retry]
backoff = "1ms"
{retry}

[[routes]]
name = "{name}-api"
path_prefix = "/"
upstream = "{name}"

# Identical failing requests would be a retry storm (stage 3c); these tests
# look at levee's own retries alone.
[routes.storm]
enabled = false
"#,
            eps.join(", ")
        )
}

async fn metric(gw: &TestGateway, name: &str, upstream: &str) -> f64 {
    metric_value(&gw.metrics().await, name, &[&format!("upstream=\"{upstream}\"")]).unwrap_or(0.0)
}

#[tokio::test]
async fn a_get_that_cannot_connect_is_retried_on_the_other_endpoint() {
    let good = Backend::start().await;
    let gw = TestGateway::start(&config("rt_other", &[closed_port(), good.addr], "min_per_s = 1000")).await;
    let client = Client::new();
    for _ in 0..20 {
        let rsp = client.get(gw.http, "/").await;
        assert_eq!(rsp.status, 200, "{}", rsp.text());
    }
    assert_eq!(good.requests(), 20);
    assert!(metric(&gw, "levee_retries_total", "rt_other").await >= 1.0);
}

#[tokio::test]
async fn post_is_never_retried_get_is() {
    let backend = Backend::with(Behavior::Status(503)).await;
    let gw = TestGateway::start(&config("rt_post", &[backend.addr], "attempts = 3\nmin_per_s = 1000")).await;
    let client = Client::new();
    for _ in 0..5 {
        let rsp = client.post(gw.http, "/", "payload").await;
        assert_eq!(rsp.status, 503);
        assert_eq!(rsp.reason(), None, "the upstream's 503 is relayed");
    }
    assert_eq!(backend.requests(), 5, "POST was retried");
    for _ in 0..5 {
        assert_eq!(client.get(gw.http, "/").await.status, 503);
    }
    assert_eq!(backend.requests(), 5 + 5 * 3);
}

#[tokio::test]
async fn a_small_put_body_is_replayed_a_large_one_is_not_retried() {
    let backend = Backend::with(Behavior::Status(503)).await;
    let gw = TestGateway::start(&config("rt_body", &[backend.addr], "min_per_s = 1000")).await;
    let client = Client::new();
    let put = |len: usize| {
        Request::put(format!("http://{}/", gw.http)).body(Full::new(Bytes::from(vec![b'x'; len]))).unwrap()
    };
    assert_eq!(client.send(put(1000)).await.status, 503);
    assert_eq!(backend.requests(), 2);
    assert_eq!(backend.last().unwrap().body_len, 1000, "the retry carried the whole body");
    assert_eq!(client.send(put(100 * 1024)).await.status, 503);
    assert_eq!(backend.requests(), 3, "a body over 64 KiB is streamed once, never retried");
    assert_eq!(backend.last().unwrap().body_len, 100 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_to_a_failing_backend_stay_within_the_budget() {
    let backend = Backend::with(Behavior::Status(503)).await;
    let gw = TestGateway::start(&config(
        "rt_budget",
        &[backend.addr],
        "attempts = 3\nbudget = 0.2\nmin_per_s = 2",
    ))
    .await;
    let client = Client::new();
    let started = Instant::now();
    let sent: usize = 400;
    let workers = 8;
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (client, addr) = (client.clone(), gw.http);
            tokio::spawn(async move {
                for _ in 0..sent / workers {
                    let rsp = client.get(addr, "/").await;
                    assert_eq!(rsp.status, 503);
                    assert_eq!(rsp.reason(), None, "a refused retry relays the upstream's answer");
                    if started.elapsed() > Duration::from_secs(10) {
                        break;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64().ceil();
    let received = backend.requests() as f64;
    // Without a budget: 3 × 400 = 1200. With it: 400 + 20% + the floor (2/s).
    let bound = 1.2 * sent as f64 + 2.0 * (secs + 1.0) + 10.0;
    assert!(received <= bound, "the backend received {received} requests for {sent} (bound {bound})");
    assert!(received > sent as f64, "no retries at all");
    assert!(metric(&gw, "levee_retry_budget_exhausted_total", "rt_budget").await > 0.0);
}

#[tokio::test]
async fn a_refused_retry_after_levee_s_own_error_is_503_retry_budget() {
    let gw = TestGateway::start(&config("rt_refused", &[closed_port()], "budget = 0.0\nmin_per_s = 0")).await;
    let rsp = Client::new().get(gw.http, "/").await;
    assert_eq!(rsp.status, 503, "{}", rsp.text());
    assert_eq!(rsp.reason(), Some("retry_budget"));
    assert!(rsp.retry_after().is_some_and(|s| (1..=2).contains(&s)));
    assert_eq!(metric(&gw, "levee_retry_budget_exhausted_total", "rt_refused").await, 1.0);
    assert_eq!(metric(&gw, "levee_retries_total", "rt_refused").await, 0.0);
}
