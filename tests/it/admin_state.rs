//! `/api/v1/state`, `/api/v1/events` and stale routes.

use std::time::Duration;

use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::support::gateway::metric_value;
use crate::support::{base_config, upstream_and_route, Backend, Client, TestGateway};

/// Route and upstream names are unique per test: the metrics recorder (the
/// stale gauge among them) is shared by every in-process gateway.
fn config(backend: std::net::SocketAddr, api: &str, quiet: &str) -> String {
    base_config()
        + &upstream_and_route(&format!("{api}-up"), &[backend], api, "/api").replace(
            &format!("upstream = \"{api}-up\""),
            &format!("upstream = \"{api}-up\"\nclient_key = \"header:x-device-id\"\n[[routes.limits]]\nrate = \"1/m\"\n"),
        )
        + &upstream_and_route(&format!("{quiet}-up"), &[backend], quiet, "/quiet").replace(
            &format!("upstream = \"{quiet}-up\""),
            &format!("upstream = \"{quiet}-up\"\nexpect_traffic_within = \"1s\""),
        )
}

#[tokio::test]
async fn the_state_snapshot_shows_counters_reasons_offenders_and_upstreams() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&config(backend.addr, "state-api-1", "state-quiet-1")).await;
    let c = Client::new();
    for _ in 0..3 {
        c.get_with(gw.http, "/api/x", &[("x-device-id", "greedy")]).await;
    }
    let state = c.get(gw.admin, "/api/v1/state").await.json();
    let route =
        state["routes"].as_array().unwrap().iter().find(|r| r["name"] == "state-api-1").unwrap().clone();
    assert_eq!(route["requests"]["forwarded"], 1);
    assert_eq!(route["requests"]["shed"], 2);
    assert_eq!(route["shed_by_reason"]["rate_limited"], 2);
    assert_eq!(route["top_offenders"][0]["client"], "greedy");
    assert_eq!(route["top_offenders"][0]["reason"], "rate_limited");
    assert!(route["last_success"].as_f64().unwrap() > 1.7e9);
    let upstream = state["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "state-api-1-up")
        .unwrap()
        .clone();
    assert_eq!(upstream["circuit"], "closed");
    assert_eq!(upstream["endpoints"][0]["ejected"], false);
    assert_eq!(state["store"]["kind"], "memory");
    assert_eq!(state["config"]["hash"].as_str().unwrap().len(), 12);
}

#[tokio::test]
async fn events_stream_state_every_second_and_sampled_sheds() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&config(backend.addr, "state-api-2", "state-quiet-2")).await;
    let c = Client::new();
    for _ in 0..2 {
        c.get_with(gw.http, "/api/x", &[("x-device-id", "greedy")]).await;
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let rsp = client.get(format!("http://{}/api/v1/events", gw.admin).parse().unwrap()).await.unwrap();
    assert_eq!(rsp.headers()["content-type"], "text/event-stream");
    let mut body = rsp.into_body();
    let mut text = String::new();
    let started = Instant::now();
    while text.matches("event: state").count() < 2 && started.elapsed() < Duration::from_secs(5) {
        let frame =
            tokio::time::timeout(Duration::from_secs(3), body.frame()).await.unwrap().unwrap().unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(text.matches("event: state").count() >= 2, "{text}");
    assert!(text.contains("event: shed\ndata: {"), "{text}");
    assert!(text.contains("\"reason\":\"rate_limited\""));
}

#[tokio::test]
async fn a_silent_route_turns_stale_and_back() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&config(backend.addr, "state-api-3", "state-quiet")).await;
    let c = Client::new();
    // The watcher ticks once a second at its own phase: wait for each state
    // with a deadline instead of guessing when the tick lands.
    let deadline = Instant::now() + Duration::from_secs(5);
    let ready = loop {
        let ready = c.get(gw.admin, "/readyz").await.json();
        if ready["degraded"].as_array().unwrap().iter().any(|d| d["route"] == "state-quiet") {
            break ready;
        }
        assert!(Instant::now() < deadline, "the silent route is never listed: {ready}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stale = ready["degraded"].as_array().unwrap().iter().find(|d| d["route"] == "state-quiet");
    assert_eq!(stale.unwrap()["part"], "stale_route");
    assert_eq!(c.get(gw.admin, "/readyz").await.status, 200, "stale degrades, it does not unready");
    let metrics = gw.metrics().await;
    assert_eq!(metric_value(&metrics, "levee_route_stale", &["route=\"state-quiet\""]), Some(1.0));
    let state = c.get(gw.admin, "/api/v1/state").await.json();
    let quiet =
        state["routes"].as_array().unwrap().iter().find(|r| r["name"] == "state-quiet").unwrap().clone();
    assert_eq!(quiet["stale"], true);

    // Traffic again: the route is no longer stale by the watcher's next tick.
    // It keeps getting traffic while we wait: with `expect_traffic_within = "1s"`
    // a single request would let it turn stale again one tick later (the
    // flake this loop replaces: one request, then a check 1.2 s later).
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        assert_eq!(c.get(gw.http, "/quiet/ping").await.status, 200);
        let metrics = gw.metrics().await;
        if metric_value(&metrics, "levee_route_stale", &["route=\"state-quiet\""]) == Some(0.0) {
            break metrics;
        }
        assert!(Instant::now() < deadline, "the route never left the stale state:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        metric_value(&metrics, "levee_route_last_success_timestamp_seconds", &["route=\"state-quiet\""])
            .unwrap()
            > 1.7e9
    );
    assert_eq!(c.get(gw.http, "/quiet/ping").await.status, 200);
    let ready = c.get(gw.admin, "/readyz").await.json();
    assert!(
        !ready["degraded"].as_array().unwrap().iter().any(|d| d["route"] == "state-quiet"),
        "a route with traffic is still listed as stale: {ready}"
    );
}
