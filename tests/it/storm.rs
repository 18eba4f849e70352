//! The outages behind levee, replayed against a real backend: a callback bomb
//! beside a steady fleet, retry storms, and a 401 wave.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::support::gateway::metric_value;
use crate::support::{base_config, upstream_and_route, Backend, Behavior, Client, TestGateway, TestResponse};

/// A route `name` (unique per test: metrics are process-wide) keyed by
/// `x-device-id`, with the given storm and auth-guard settings.
fn route(backend: std::net::SocketAddr, name: &str, storm: &str, guard: &str) -> String {
    let upstream = format!("{name}-up");
    base_config()
        + &upstream_and_route(&upstream, &[backend], name, "/").replace(
            &format!("upstream = \"{upstream}\""),
            &format!("upstream = \"{upstream}\"\nclient_key = \"header:x-device-id\""),
        )
        + &format!("[routes.storm]\n{storm}\n[routes.auth_guard]\n{guard}\n")
}

async fn get(c: &Client, gw: &TestGateway, device: &str, path: &str) -> TestResponse {
    c.get_with(gw.http, path, &[("x-device-id", device)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_bomb_is_shed_by_64_per_second_while_50_steady_clients_keep_their_service() {
    let _exclusive = crate::support::exclusive().await;
    let backend = Backend::start().await;
    let gw =
        TestGateway::start(&route(backend.addr, "bomb-route", "quarantine = \"60s\"", "enabled = false"))
            .await;
    let started = Instant::now();
    let run_for = Duration::from_secs(7);

    // 50 steady devices at 2/s each.
    let (steady_ok, steady_total) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut fleet = Vec::new();
    for d in 0..50 {
        let (http, ok, total) = (gw.http, steady_ok.clone(), steady_total.clone());
        fleet.push(tokio::spawn(async move {
            let c = Client::new();
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            for _ in 0..20 {
                tick.tick().await;
                if started.elapsed() >= run_for {
                    break;
                }
                let rsp = c.get_with(http, "/", &[("x-device-id", &format!("steady-{d}"))]).await;
                total.fetch_add(1, Ordering::Relaxed);
                if rsp.status.is_success() {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    // The bomb: its rate is 2·2^t per second (request k at log2(k·ln2/2 + 1) s).
    let c = Client::new();
    let mut shed_at = None;
    for k in 1..20_000u64 {
        let due = (k as f64 * std::f64::consts::LN_2 / 2.0 + 1.0).log2();
        let at = started + Duration::from_secs_f64(due);
        if at > started + run_for {
            break;
        }
        tokio::time::sleep_until(at).await;
        let rsp = get(&c, &gw, "bomb", "/").await;
        if rsp.status == 429 {
            assert_eq!(rsp.reason(), Some("callback_bomb"));
            let retry = rsp.retry_after().unwrap();
            assert!((55..=60).contains(&retry), "Retry-After is the quarantine left: {retry}");
            shed_at = Some(due);
            break;
        }
    }
    for f in fleet {
        f.await.unwrap();
    }
    let shed_at = shed_at.expect("the callback bomb was never shed");
    let rate_at_shed = 2.0 * 2f64.powf(shed_at);
    assert!(rate_at_shed <= 64.0, "shed only at {rate_at_shed:.0}/s (t = {shed_at:.2}s)");
    let (ok, total) = (steady_ok.load(Ordering::Relaxed), steady_total.load(Ordering::Relaxed));
    assert!(total >= 500, "the steady fleet sent {total}");
    assert!(ok as f64 >= total as f64 * 0.999, "steady clients got {ok} of {total} 2xx");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(&metrics, "levee_shed_total", &["route=\"bomb-route\"", "reason=\"callback_bomb\""]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_200_per_second_client_and_a_one_off_burst_are_never_quarantined() {
    let _exclusive = crate::support::exclusive().await;
    let backend = Backend::start().await;
    let gw = TestGateway::start(&route(backend.addr, "steady-route", "", "enabled = false")).await;
    let c = Client::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    // Steady means steady: after a stall of the machine, no catch-up burst
    // (the default) that would look like a rate that multiplies.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..800 {
        tick.tick().await;
        let rsp = get(&c, &gw, "fast-but-steady", "/").await;
        assert_eq!(rsp.status, 200, "{:?}", rsp.reason());
    }
    // A reconnect burst: 100 different requests at once (a device syncing its
    // resources), then quiet, then normal traffic. (100 *identical* requests in
    // flight at once would be a retry storm, by the contract's definition.)
    let burst: Vec<_> = (0..100)
        .map(|i| {
            let (c, http) = (c.clone(), gw.http);
            let path = format!("/sync/{i}");
            tokio::spawn(
                async move { c.get_with(http, &path, &[("x-device-id", "reconnecting")]).await.status },
            )
        })
        .collect();
    for b in burst {
        assert_eq!(b.await.unwrap(), 200);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..5 {
        assert_eq!(get(&c, &gw, "reconnecting", "/").await.status, 200);
    }
}

/// Drives `device` as a callback bomb until it is shed; returns the refusal.
async fn bomb_until_shed(c: &Client, gw: &TestGateway, device: &str, limit: Duration) -> TestResponse {
    let started = Instant::now();
    for k in 1..50_000u64 {
        let due = (k as f64 * std::f64::consts::LN_2 / 2.0 + 1.0).log2();
        tokio::time::sleep_until(started + Duration::from_secs_f64(due)).await;
        let rsp = get(c, gw, device, "/").await;
        if rsp.status == 429 {
            return rsp;
        }
        assert!(started.elapsed() < limit, "{device} was never shed");
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_expires_and_a_relapse_doubles_it() {
    let _exclusive = crate::support::exclusive().await;
    let backend = Backend::start().await;
    let gw =
        TestGateway::start(&route(backend.addr, "relapse-route", "quarantine = \"2s\"", "enabled = false"))
            .await;
    let c = Client::new();

    let first = bomb_until_shed(&c, &gw, "fixed-its-bug", Duration::from_secs(8)).await;
    assert_eq!(first.reason(), Some("callback_bomb"));
    assert_eq!(first.retry_after(), Some(2));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(get(&c, &gw, "fixed-its-bug", "/").await.status, 200, "released after the quarantine");

    let first = bomb_until_shed(&c, &gw, "relapses", Duration::from_secs(8)).await;
    assert_eq!(first.retry_after(), Some(2));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let again = bomb_until_shed(&c, &gw, "relapses", Duration::from_secs(8)).await;
    assert_eq!(again.reason(), Some("callback_bomb"));
    assert_eq!(again.retry_after(), Some(4), "a relapse doubles the quarantine");
}

#[tokio::test]
async fn identical_requests_to_a_failing_backend_become_a_retry_storm_after_the_budget() {
    let backend = Backend::with(Behavior::Status(503)).await;
    // A window that outlasts a slow machine's ten requests: every one of them
    // is a duplicate of the first (the default, 2 s, is a race with the load).
    let storm = "duplicate_window = \"10s\"";
    let gw = TestGateway::start(&route(backend.addr, "retry-route", storm, "enabled = false")).await;
    let c = Client::new();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let rsp = get(&c, &gw, "eager", "/v1/token?x=1").await;
        statuses.push((rsp.status.as_u16(), rsp.reason().map(String::from), rsp.retry_after()));
    }
    // The original and max_duplicates = 3 retries reach the backend; then the storm is shed.
    assert!(statuses[..4].iter().all(|s| s.0 == 503 && s.1.is_none()), "{statuses:?}");
    // Retry-After starts at the duplicate window and backs off.
    assert_eq!(statuses[4], (429, Some("retry_storm".into()), Some(10)));
    assert!(statuses[5..].iter().all(|s| s.0 == 429), "{statuses:?}");
    assert!(statuses[9].2.unwrap() > 10, "Retry-After backs off: {statuses:?}");
    // Four client requests got through, each tried twice by levee's own retry
    // (`attempts = 2`, within its budget): the storm's later sends never reached it.
    assert_eq!(backend.requests(), 8);
    // Another request of the same client is not a duplicate.
    assert_eq!(get(&c, &gw, "eager", "/v1/other").await.status, 503);
    // Different bodies are different requests; the same small body is the same request.
    for i in 0..6 {
        let req = crate::support::client::get(gw.http, "/submit")
            .method("POST")
            .header("x-device-id", "poster")
            .body(format!("reading {i}").into())
            .unwrap();
        assert_eq!(c.send(req).await.status, 503, "distinct bodies are never a storm");
    }
}

#[tokio::test]
async fn honest_repeats_are_never_a_retry_storm() {
    let backend = Backend::start().await;
    let storm = "duplicate_window = \"300ms\"";
    let gw = TestGateway::start(&route(backend.addr, "poll-route", storm, "enabled = false")).await;
    let c = Client::new();
    // Polling a request that succeeds, as fast as it likes.
    for _ in 0..30 {
        assert_eq!(get(&c, &gw, "poller", "/status").await.status, 200);
    }
    // Polling a failing request, slower than the duplicate window.
    backend.set(Behavior::Status(500));
    for _ in 0..6 {
        assert_eq!(get(&c, &gw, "slow-poller", "/status").await.status, 500);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

#[tokio::test]
async fn a_401_wave_after_60_clients_succeeded_becomes_503_and_the_guard_resets() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&route(backend.addr, "guard-route", "enabled = false", "")).await;
    let c = Client::new();
    for d in 0..60 {
        assert_eq!(get(&c, &gw, &format!("dev-{d}"), "/").await.status, 200);
    }
    backend.set(Behavior::Status(401));
    let (mut passed_401, mut rewritten) = (0, 0);
    let mut tripped_at = None;
    for round in 0..3 {
        for d in 0..60 {
            let rsp = get(&c, &gw, &format!("dev-{d}"), "/").await;
            match rsp.status.as_u16() {
                401 => {
                    assert!(tripped_at.is_none(), "a 401 reached dev-{d} after the guard tripped");
                    passed_401 += 1;
                }
                503 => {
                    assert_eq!(rsp.reason(), Some("upstream_auth_anomaly"));
                    assert!(rsp.retry_after().unwrap() >= 10);
                    tripped_at.get_or_insert((round, d));
                    rewritten += 1;
                }
                other => panic!("unexpected {other}"),
            }
        }
    }
    // The guard needs evidence: 60 successes, then about 60·0.3/0.7 = 26 401s.
    assert!(passed_401 <= 27, "{passed_401} 401s passed before the guard tripped");
    assert_eq!(passed_401 + rewritten, 180);
    let metrics = gw.metrics().await;
    assert_eq!(metric_value(&metrics, "levee_auth_guard_tripped", &["route=\"guard-route\""]), Some(1.0));

    // A client that never succeeded gets its 401 unchanged.
    let stranger = get(&c, &gw, "stranger", "/").await;
    assert_eq!(stranger.status, 401);
    assert!(stranger.reason().is_none());

    // The upstream heals: successes push the share down and the guard resets.
    backend.set(Behavior::Ok);
    for round in 0..8 {
        for d in 0..60 {
            assert_eq!(get(&c, &gw, &format!("dev-{d}"), "/").await.status, 200, "round {round}");
        }
    }
    backend.set(Behavior::Status(401));
    let single = get(&c, &gw, "dev-1", "/").await;
    assert_eq!(single.status, 401, "a single 401 with a healthy upstream passes");
    let metrics = gw.metrics().await;
    assert_eq!(metric_value(&metrics, "levee_auth_guard_tripped", &["route=\"guard-route\""]), Some(0.0));
}
