//! Per-client token buckets in memory: 429s with honest headers, neighbours
//! unaffected, admin reset, bounded memory, hostile keys.

use std::time::Duration;

use crate::support::gateway::metric_value;
use crate::support::process::Process;
use crate::support::{
    base_config, exclusive, poll_until, temp_dir, upstream_and_route, Backend, Client, TestGateway,
};

/// One route `route` (unique per test: metrics are process-wide) on `/`, keyed
/// by `x-device-id`, with the given limit lines.
fn limited(route: &str, backend: std::net::SocketAddr, limits: &str) -> String {
    let upstream = format!("{route}-up");
    base_config()
        + &upstream_and_route(&upstream, &[backend], route, "/").replace(
            &format!("upstream = \"{upstream}\""),
            &format!("upstream = \"{upstream}\"\nclient_key = \"header:x-device-id\""),
        )
        + limits
        // Storm detection is stage 3c; these tests look at the limits alone.
        + "[routes.storm]\nenabled = false\n"
}

async fn as_device(gw: &TestGateway, id: &str) -> crate::support::TestResponse {
    Client::new().get_with(gw.http, "/", &[("x-device-id", id)]).await
}

#[tokio::test]
async fn a_limited_client_gets_429_with_headers_while_its_neighbour_gets_200() {
    // Three requests must fall within one refill (500 ms): wall-clock time.
    let _machine = exclusive().await;
    let backend = Backend::start().await;
    let gw = TestGateway::start(&limited(
        "rl-noisy",
        backend.addr,
        "[[routes.limits]]\nrate = \"2/s\"\nburst = 2\n",
    ))
    .await;
    for _ in 0..2 {
        assert_eq!(as_device(&gw, "noisy").await.status, 200);
    }
    let rsp = as_device(&gw, "noisy").await;
    assert_eq!(rsp.status, 429);
    assert_eq!(rsp.reason(), Some("rate_limited"));
    assert_eq!(rsp.retry_after(), Some(1));
    assert_eq!(rsp.json()["retry_after_s"], 1);
    assert_eq!(rsp.headers["ratelimit-policy"], "\"2/s\";q=2;w=1");
    assert_eq!(rsp.headers["ratelimit"], "\"2/s\";r=0;t=1");
    assert_eq!(backend.requests(), 2, "the refused request never reached the backend");

    let quiet = as_device(&gw, "quiet").await;
    assert_eq!(quiet.status, 200);
    assert_eq!(quiet.headers["ratelimit"], "\"2/s\";r=1;t=1");

    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(&metrics, "levee_shed_total", &["route=\"rl-noisy\"", "reason=\"rate_limited\""]),
        Some(1.0)
    );
}

#[tokio::test]
async fn the_tightest_of_several_limits_decides_and_is_advertised() {
    // Retry-After is exact only if the four requests fall within a second.
    let _machine = exclusive().await;
    let backend = Backend::start().await;
    let limits = "[[routes.limits]]\nrate = \"100/s\"\n[[routes.limits]]\nrate = \"3/m\"\n";
    let gw = TestGateway::start(&limited("rl-tightest", backend.addr, limits)).await;
    for _ in 0..3 {
        assert_eq!(as_device(&gw, "d").await.status, 200);
    }
    let rsp = as_device(&gw, "d").await;
    assert_eq!(rsp.status, 429);
    assert_eq!(rsp.headers["ratelimit-policy"], "\"3/m\";q=3;w=60");
    assert_eq!(rsp.retry_after(), Some(20), "one request refills in 60s/3");
}

#[tokio::test]
async fn a_client_that_waits_the_advertised_retry_after_passes_and_an_early_one_does_not() {
    // One request every 3 s: the early request comes back after a third of
    // that, with seconds to spare on a slow machine; Retry-After is exact only
    // if the refusal comes within a second of the first request.
    let _machine = exclusive().await;
    let backend = Backend::start().await;
    let gw = TestGateway::start(&limited(
        "rl-wait",
        backend.addr,
        "[[routes.limits]]\nrate = \"20/m\"\nburst = 1\n",
    ))
    .await;
    assert_eq!(as_device(&gw, "d").await.status, 200);
    let refused = as_device(&gw, "d").await;
    assert_eq!(refused.status, 429);
    let wait = refused.retry_after().unwrap();
    assert_eq!(wait, 3);
    let early = Duration::from_secs(1);
    tokio::time::sleep(early).await;
    assert_eq!(as_device(&gw, "d").await.status, 429, "came back early");
    tokio::time::sleep(Duration::from_secs(wait) - early).await;
    assert_eq!(as_device(&gw, "d").await.status, 200, "waited exactly Retry-After");
}

#[tokio::test]
async fn an_operator_inspects_and_resets_a_client_through_the_admin_api() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&limited(
        "rl-admin",
        backend.addr,
        "[[routes.limits]]\nrate = \"1/m\"\nburst = 1\n",
    ))
    .await;
    let c = Client::new();
    assert_eq!(c.get(gw.admin, "/api/v1/clients/dev%2F7").await.status, 404, "not tracked yet");
    assert_eq!(as_device(&gw, "dev/7").await.status, 200);
    assert_eq!(as_device(&gw, "dev/7").await.status, 429);

    let state = c.get(gw.admin, "/api/v1/clients/dev%2F7?route=rl-admin").await;
    assert_eq!(state.status, 200, "{}", state.text());
    let json = state.json();
    assert_eq!(json["routes"][0]["route"], "rl-admin");
    assert_eq!(json["routes"][0]["limits"][0]["remaining"], 0);
    assert!(json["routes"][0]["limits"][0]["full_in_s"].as_f64().unwrap() > 50.0);

    let req = http::Request::delete(format!("http://{}/api/v1/clients/dev%2F7?route=rl-admin", gw.admin))
        .body(Default::default())
        .unwrap();
    let reset = c.send(req).await;
    assert_eq!(reset.status, 200, "{}", reset.text());
    assert_eq!(reset.json()["reset"][0], "rl-admin");
    assert_eq!(as_device(&gw, "dev/7").await.status, 200, "reset gives a full bucket");
    assert_eq!(c.get(gw.admin, "/api/v1/clients/unknown").await.status, 404);
}

#[tokio::test]
async fn hostile_keys_are_answered_cleanly() {
    let backend = Backend::start().await;
    let config = limited("rl-hostile", backend.addr, "[[routes.limits]]\nrate = \"100/s\"\n")
        .replace("header_read_timeout", "max_header_bytes = \"128KiB\"\nheader_read_timeout");
    let gw = TestGateway::start(&config).await;
    let huge = "k".repeat(64 * 1024);
    let rsp = as_device(&gw, &huge).await;
    assert_eq!(rsp.status, 200);
    // Invalid UTF-8 bytes in the key header.
    let req = crate::support::client::get(gw.http, "/")
        .header("x-device-id", http::HeaderValue::from_bytes(&[0xff, 0xfe, 0x80, b'a']).unwrap())
        .body(Default::default())
        .unwrap();
    assert_eq!(Client::new().send(req).await.status, 200);
    // Empty: falls back to the peer address.
    assert_eq!(as_device(&gw, "").await.status, 200);
    // The huge key is tracked by its hash, never by its 64 KiB.
    let metrics = gw.metrics().await;
    assert!(!metrics.contains("kkkkkkkk"));

    let reject = limited("rl-reject", backend.addr, "").replace(
        "client_key = \"header:x-device-id\"",
        "client_key = \"header:x-device-id\"\nclient_key_fallback = \"reject\"",
    );
    let gw = TestGateway::start(&reject).await;
    let rsp = Client::new().get(gw.http, "/").await;
    assert_eq!(rsp.status, 400);
    assert_eq!(rsp.reason(), Some("bad_request"));
    assert!(rsp.json()["detail"].as_str().unwrap().contains("x-device-id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_clients_keep_tracked_clients_at_the_cap_and_memory_flat() {
    let _exclusive = crate::support::exclusive().await;
    let backend = Backend::start().await;
    let path = temp_dir("cap").join("levee.toml");
    let config = limited("rl-cap", backend.addr, "[[routes.limits]]\nrate = \"10/m\"\n")
        + "\n[store]\nmax_clients = 10000\n";
    std::fs::write(&path, config).unwrap();
    let p = Process::start(&path);
    let http = p.http;

    let send = |from: usize, to: usize| async move {
        let c = Client::new();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                for i in (from + t..to).step_by(8) {
                    let rsp = c.get_with(http, "/", &[("x-device-id", &format!("device-{i}"))]).await;
                    assert_eq!(rsp.status, 200);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    };
    send(0, 20_000).await;
    let rss_at_20k = p.rss_kib();
    send(20_000, 100_000).await;
    let rss_at_100k = p.rss_kib();

    // The gauge is published every second: wait for a value taken after the
    // last request (it then stays at the cap: nothing expires in 10/m's minutes).
    let c = Client::new();
    let tracked = poll_until(Duration::from_secs(20), "levee_tracked_clients reaches the cap", async || {
        let metrics = c.get(p.admin, "/metrics").await.text();
        metric_value(&metrics, "levee_tracked_clients", &[]).filter(|t| *t >= 9_000.0)
    })
    .await;
    assert!((9_000.0..=10_000.0).contains(&tracked), "tracked {tracked}");
    assert!(
        rss_at_100k < rss_at_20k + 8 * 1024,
        "memory grew from {rss_at_20k} KiB to {rss_at_100k} KiB past the cap"
    );
}
