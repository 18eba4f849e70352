//! Reloading: a rejected config keeps the running one serving, with not a single
//! failed request; an accepted one takes effect atomically.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::gateway::metric_value;
use crate::support::{base_config, poll_until, upstream_and_route, Backend, Client, TestGateway};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_reload_loses_no_request_and_a_fixed_one_applies() {
    let _exclusive = crate::support::exclusive().await;
    let backend = Backend::start().await;
    let good = base_config() + &upstream_and_route("rld-up", &[backend.addr], "rld-api", "/");
    let gw = TestGateway::start(&good).await;
    let before = gw.metrics().await;
    let rejected_before =
        metric_value(&before, "levee_config_reloads_total", &["result=\"rejected\""]).unwrap_or(0.0);

    // Traffic flows the whole time; every answer must be a 200.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed, addr) = (stop.clone(), ok.clone(), failed.clone(), gw.http);
        tokio::spawn(async move {
            let c = Client::new();
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if c.get(addr, "/").await.status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // The reloads happen while traffic flows.
    poll_until(Duration::from_secs(20), "traffic flows", async || {
        (ok.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;
    for broken in [
        good.replace("upstream = \"rld-up\"", "upstream = \"missing\""),
        good.clone() + "\n[surprise]\nkey = 1\n",
        good.replace("timeout = \"1s\"", "timeout = \"soon\""),
        "this is not toml [".to_string(),
    ] {
        gw.write_config(&broken);
        let rsp = gw.reload().await;
        assert_eq!(rsp.status, 422, "{}", rsp.text());
        assert_eq!(rsp.json()["result"], "rejected");
        assert!(rsp.json()["error"].as_str().unwrap().len() > 5);
    }
    let config = Client::new().get(gw.admin, "/api/v1/config").await.json();
    assert_eq!(config["last_reload"]["result"], "rejected");
    assert!(config["last_reload"]["error"].is_string());

    // The fix adds a route; it must apply.
    let fixed = good.clone() + &upstream_and_route("rld-up2", &[backend.addr], "rld-new", "/new");
    gw.write_config(&fixed);
    let rsp = gw.reload().await;
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(rsp.json()["result"], "applied");
    let config = Client::new().get(gw.admin, "/api/v1/config").await.json();
    assert_eq!(config["last_reload"]["result"], "applied");
    assert_eq!(config["hash"], rsp.json()["hash"]);

    // And it keeps flowing on the applied config.
    let applied_at = ok.load(Ordering::Relaxed);
    poll_until(Duration::from_secs(20), "traffic flows after the reload", async || {
        (ok.load(Ordering::Relaxed) > applied_at + 10).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "a request failed during the reloads");

    let rsp = Client::new().get(gw.http, "/new/x").await;
    assert_eq!(rsp.status, 200);
    let after = gw.metrics().await;
    let rejected = metric_value(&after, "levee_config_reloads_total", &["result=\"rejected\""]).unwrap();
    assert!(rejected - rejected_before >= 4.0);
    assert!(metric_value(&after, "levee_config_reloads_total", &["result=\"applied\""]).unwrap() >= 1.0);
    assert!(after.contains("levee_requests_total{route=\"rld-api\",status=\"200\",outcome=\"forwarded\"}"));
    assert!(after.contains("levee_build_info{version="));
    assert!(after.contains("levee_request_duration_seconds_bucket{route=\"rld-api\""));
    assert!(after.contains("levee_upstream_duration_seconds_bucket{upstream=\"rld-up\""));
    assert!(after.contains("levee_upstream_requests_total{upstream=\"rld-up\""));
}

#[tokio::test]
async fn admin_reload_is_protected_by_the_token() {
    let backend = Backend::start().await;
    let config = base_config().replace("[admin]", "[admin]\ntoken = \"t0ken\"")
        + &upstream_and_route("rld-token-up", &[backend.addr], "rld-token", "/");
    let gw = TestGateway::start(&config).await;
    let rsp = gw.reload().await;
    assert_eq!(rsp.status, 401);
    let req = http::Request::post(format!("http://{}/api/v1/reload", gw.admin))
        .header("authorization", "Bearer t0ken")
        .body(Default::default())
        .unwrap();
    assert_eq!(Client::new().send(req).await.status, 200);
}

#[tokio::test]
async fn health_and_readiness() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("rld-health-up", &[backend.addr], "rld-health", "/")),
    )
    .await;
    let c = Client::new();
    assert_eq!(c.get(gw.admin, "/healthz").await.status, 200);
    let ready = c.get(gw.admin, "/readyz").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["ready"], true);
    assert_eq!(c.get(gw.admin, "/nope").await.status, 404);
}
