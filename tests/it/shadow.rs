//! Shadow mode: a limit, storm detector or auth guard in `mode = "shadow"`
//! decides as if it enforced, reports what it would have shed (metrics, the
//! state API, `x-levee-shadow` upstream) and forwards; a reload switching it
//! to enforce keeps its state and sheds what shadow mode reported.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::gateway::metric_value;
use crate::support::{base_config, upstream_and_route, Backend, Behavior, Client, TestGateway, TestResponse};

/// A route keyed by `x-device-id`, with `extra` TOML appended to it.
fn route(backend: std::net::SocketAddr, name: &str, extra: &str) -> String {
    base_config()
        + &upstream_and_route("b", &[backend], name, "/")
            .replace("upstream = \"b\"", "upstream = \"b\"\nclient_key = \"header:x-device-id\"")
        + extra
}

async fn get(c: &Client, gw: &TestGateway, device: &str) -> TestResponse {
    c.get_with(gw.http, "/", &[("x-device-id", device)]).await
}

/// The `x-levee-shadow` values of the backend's last request.
fn shadow_marks(backend: &Backend) -> Vec<String> {
    let last = backend.last().expect("the backend saw a request");
    last.headers.get_all("x-levee-shadow").iter().map(|v| v.to_str().unwrap().to_string()).collect()
}

/// The route's entry in `/api/v1/state`.
async fn route_state(gw: &TestGateway, name: &str) -> serde_json::Value {
    let state = Client::new().get(gw.admin, "/api/v1/state").await.json();
    state["routes"].as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap()
}

const NO_STORM_NO_GUARD: &str = "[routes.storm]\nenabled = false\n[routes.auth_guard]\nenabled = false\n";

#[tokio::test]
async fn a_shadow_limit_forwards_reports_and_enforces_the_same_state_after_a_reload() {
    let backend = Backend::start().await;
    let limit =
        |mode: &str| format!("[[routes.limits]]\nrate = \"3/m\"\nmode = \"{mode}\"\n{NO_STORM_NO_GUARD}");
    let gw = TestGateway::start(&route(backend.addr, "shadow-limit", &limit("shadow"))).await;
    let c = Client::new();
    for i in 0..10 {
        let rsp = get(&c, &gw, "eager").await;
        assert_eq!(rsp.status, 200, "request {i}: shadow mode forwards");
        assert!(rsp.headers.get("ratelimit").is_none(), "a shadow limit tells the client nothing");
        let want: &[&str] = if i < 3 { &[] } else { &["rate_limited"] };
        assert_eq!(shadow_marks(&backend), want, "request {i}");
    }
    assert_eq!(backend.requests(), 10);
    // A client cannot send its own mark upstream.
    let forged = c.get_with(gw.http, "/", &[("x-device-id", "other"), ("x-levee-shadow", "forged")]).await;
    assert_eq!(forged.status, 200);
    assert!(shadow_marks(&backend).is_empty());

    let metrics = gw.metrics().await;
    let labels = ["route=\"shadow-limit\"", "reason=\"rate_limited\""];
    assert_eq!(metric_value(&metrics, "levee_shadow_shed_total", &labels), Some(7.0));
    assert_eq!(metric_value(&metrics, "levee_shed_total", &["route=\"shadow-limit\""]).unwrap_or(0.0), 0.0);
    let state = route_state(&gw, "shadow-limit").await;
    assert_eq!(state["requests"]["shadow"], 7);
    assert_eq!(state["requests"]["shed"], 0);
    assert_eq!(state["shadow_by_reason"]["rate_limited"], 7);
    assert_eq!(state["shadow_mode"], true);

    // Switched to enforce: the same bucket, empty since the third request.
    gw.write_config(&route(backend.addr, "shadow-limit", &limit("enforce")));
    assert_eq!(gw.reload().await.status, 200);
    let rsp = get(&c, &gw, "eager").await;
    assert_eq!(rsp.status, 429, "the state survived the mode switch");
    assert_eq!(rsp.reason(), Some("rate_limited"));
    assert_eq!(backend.requests(), 11, "the refused request never reached the backend");
    assert_eq!(route_state(&gw, "shadow-limit").await["shadow_mode"], false);
}

#[tokio::test]
async fn mixed_limits_an_enforcing_one_still_refuses_and_a_shadow_one_only_reports() {
    let backend = Backend::start().await;
    let limits = format!(
        "[[routes.limits]]\nrate = \"2/m\"\nmode = \"shadow\"\n[[routes.limits]]\nrate = \"5/m\"\n{NO_STORM_NO_GUARD}"
    );
    let gw = TestGateway::start(&route(backend.addr, "shadow-mixed", &limits)).await;
    let c = Client::new();
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let rsp = get(&c, &gw, "mixed").await;
        statuses.push(rsp.status.as_u16());
        if rsp.status == 200 {
            // Only the enforcing limit speaks to the client.
            assert!(rsp.headers["ratelimit-policy"].to_str().unwrap().contains("5/m"));
        }
    }
    // Every forwarded request counts against the enforcing limit: 5 pass, whatever the shadow one says.
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
    let metrics = gw.metrics().await;
    let labels = ["route=\"shadow-mixed\"", "reason=\"rate_limited\""];
    assert_eq!(metric_value(&metrics, "levee_shadow_shed_total", &labels), Some(3.0));
    assert_eq!(metric_value(&metrics, "levee_shed_total", &labels), Some(2.0));
}

#[tokio::test]
async fn a_shadow_retry_storm_is_reported_and_forwarded() {
    let backend = Backend::with(Behavior::Status(503)).await;
    let storm = "[routes.storm]\nmode = \"shadow\"\n[routes.auth_guard]\nenabled = false\n";
    let extra = format!("{storm}[upstreams.b.retry]\nattempts = 1\n");
    let gw = TestGateway::start(&route(backend.addr, "shadow-retry", &extra)).await;
    let c = Client::new();
    for i in 0..8 {
        let rsp = c.get_with(gw.http, "/v1/token?x=1", &[("x-device-id", "eager")]).await;
        assert_eq!(rsp.status, 503, "request {i}: the backend's own answer");
        assert!(rsp.reason().is_none(), "request {i}: relayed, not levee's");
        // The original and max_duplicates = 3 retries pass; then each would be a storm.
        let want: &[&str] = if i < 4 { &[] } else { &["retry_storm"] };
        assert_eq!(shadow_marks(&backend), want, "request {i}");
    }
    assert_eq!(backend.requests(), 8);
    let metrics = gw.metrics().await;
    let labels = ["route=\"shadow-retry\"", "reason=\"retry_storm\""];
    assert_eq!(metric_value(&metrics, "levee_shadow_shed_total", &labels), Some(4.0));
    assert_eq!(metric_value(&metrics, "levee_shed_total", &["route=\"shadow-retry\""]).unwrap_or(0.0), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_callback_bomb_is_forwarded_and_its_quarantine_survives_the_switch_to_enforce() {
    let _exclusive = crate::support::exclusive().await;
    let backend = Backend::start().await;
    let storm = |mode: &str| {
        format!(
            "[routes.storm]\nmode = \"{mode}\"\nquarantine = \"60s\"\n[routes.auth_guard]\nenabled = false\n"
        )
    };
    let gw = TestGateway::start(&route(backend.addr, "shadow-bomb", &storm("shadow"))).await;
    let c = Client::new();
    // The bomb: its rate is 2·2^t per second, until the backend sees it marked.
    // On a starved machine the client can send in bursts that break a growth
    // streak; then the bomb starts over as a new device (at most 3 times):
    // what this test proves is shadow mode's handling, not detection latency
    // (tests/it/storm.rs bounds that).
    let mut device = String::new();
    let mut marked = false;
    for attempt in 0..3 {
        device = format!("bomb-{attempt}");
        let started = Instant::now();
        for k in 1..50_000u64 {
            let due = (k as f64 * std::f64::consts::LN_2 / 2.0 + 1.0).log2();
            tokio::time::sleep_until(started + Duration::from_secs_f64(due)).await;
            let rsp = get(&c, &gw, &device).await;
            assert_eq!(rsp.status, 200, "shadow mode never sheds the bomb");
            if shadow_marks(&backend) == ["callback_bomb"] {
                marked = true;
                break;
            }
            if started.elapsed() > Duration::from_secs(8) {
                break;
            }
        }
        if marked {
            break;
        }
    }
    assert!(marked, "the bomb was never detected in 3 tries");
    // Still quarantined (in shadow): the next request is marked too.
    assert_eq!(get(&c, &gw, &device).await.status, 200);
    assert_eq!(shadow_marks(&backend), ["callback_bomb"]);
    let metrics = gw.metrics().await;
    let labels = ["route=\"shadow-bomb\"", "reason=\"callback_bomb\""];
    assert!(metric_value(&metrics, "levee_shadow_shed_total", &labels).unwrap() >= 2.0);
    // The sweeper publishes the quarantines every second.
    let deadline = Instant::now() + Duration::from_secs(3);
    while route_state(&gw, "shadow-bomb").await["storm"]["quarantined"]["callback_bomb"] != 1 {
        assert!(Instant::now() < deadline, "the shadow quarantine never showed in the state API");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Enforce by reload: the detector and its quarantine are kept.
    gw.write_config(&route(backend.addr, "shadow-bomb", &storm("enforce")));
    assert_eq!(gw.reload().await.status, 200);
    let rsp = get(&c, &gw, &device).await;
    assert_eq!(rsp.status, 429);
    assert_eq!(rsp.reason(), Some("callback_bomb"));
    assert!((50..=60).contains(&rsp.retry_after().unwrap()), "the quarantine left: {:?}", rsp.retry_after());
    assert_eq!(get(&c, &gw, "steady").await.status, 200);
}

#[tokio::test]
async fn a_shadow_auth_guard_relays_the_401s_and_reports_the_503s() {
    let backend = Backend::start().await;
    let extra = "[routes.storm]\nenabled = false\n[routes.auth_guard]\nmode = \"shadow\"\n";
    let gw = TestGateway::start(&route(backend.addr, "shadow-guard", extra)).await;
    let c = Client::new();
    for d in 0..60 {
        assert_eq!(get(&c, &gw, &format!("dev-{d}")).await.status, 200);
    }
    backend.set(Behavior::Status(401));
    for d in 0..60 {
        let rsp = get(&c, &gw, &format!("dev-{d}")).await;
        assert_eq!(rsp.status, 401, "dev-{d}: shadow mode relays the upstream's 401");
        assert!(rsp.reason().is_none());
    }
    let metrics = gw.metrics().await;
    assert_eq!(metric_value(&metrics, "levee_auth_guard_tripped", &["shadow-guard"]), Some(1.0));
    // About 60·0.3/0.7 = 26 401s pass before the guard trips; it would have rewritten the rest.
    let labels = ["route=\"shadow-guard\"", "reason=\"upstream_auth_anomaly\""];
    let would = metric_value(&metrics, "levee_shadow_shed_total", &labels).unwrap();
    assert!((30.0..=40.0).contains(&would), "{would}");
    assert_eq!(metric_value(&metrics, "levee_shed_total", &["route=\"shadow-guard\""]).unwrap_or(0.0), 0.0);
    let state = route_state(&gw, "shadow-guard").await;
    assert_eq!(state["shadow_by_reason"]["upstream_auth_anomaly"], would as u64);
    assert_eq!(state["auth_guard"]["tripped"], true);
}
