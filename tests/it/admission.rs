//! Admission against a real, slow backend: priorities are shed in order, and a
//! flooding tenant is shed while a quiet one keeps its service.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::support::{base_config, Backend, Behavior, Client, TestGateway, TestResponse};

fn upstream(name: &str, backend: SocketAddr, max_concurrency: usize) -> String {
    base_config()
        + &format!(
            r#"
[upstreams.{name}]
endpoints = ["{backend}"]
timeout = "5s"
max_concurrency = {max_concurrency}

[upstreams.{name}.retry]
attempts = 1
"#
        )
}

fn route(name: &str, prefix: &str, upstream: &str, extra: &str) -> String {
    format!(
        r#"
[[routes]]
name = "{name}"
path_prefix = "{prefix}"
upstream = "{upstream}"
{extra}

# Concurrent identical requests would be a retry storm (stage 3c); these
# tests look at admission alone.
[routes.storm]
enabled = false
"#
    )
}

fn assert_overloaded(rsp: &TestResponse) {
    assert_eq!(rsp.status, 503, "{}", rsp.text());
    assert_eq!(rsp.reason(), Some("overloaded"));
    let ra = rsp.retry_after().expect("Retry-After");
    assert!((1..=2).contains(&ra), "Retry-After {ra}");
}

/// Waits until the backend has received `n` requests (they are then in flight).
async fn wait_for(backend: &Backend, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while backend.requests() < n {
        assert!(Instant::now() < deadline, "the backend saw {} of {n} requests", backend.requests());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn spawn_gets(client: &Client, addr: SocketAddr, path: &str, n: usize) -> Vec<JoinHandle<TestResponse>> {
    (0..n)
        .map(|_| {
            let (client, path) = (client.clone(), path.to_string());
            tokio::spawn(async move { client.get(addr, &path).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_is_shed_before_normal_before_critical_on_a_saturated_upstream() {
    let backend = Backend::with(Behavior::Delay(Duration::from_millis(800))).await;
    let config = upstream("adm_prio", backend.addr, 10)
        + &route("bulk", "/bulk", "adm_prio", "priority = \"bulk\"")
        + &route("normal", "/normal", "adm_prio", "priority = \"normal\"")
        + &route("critical", "/critical", "adm_prio", "priority = \"critical\"");
    let gw = TestGateway::start(&config).await;
    let client = Client::new();

    // Bulk is admitted below 70% of 10.
    let mut held = spawn_gets(&client, gw.http, "/bulk", 7);
    wait_for(&backend, 7).await;
    let asked = Instant::now();
    assert_overloaded(&client.get(gw.http, "/bulk").await);
    assert!(asked.elapsed() < Duration::from_millis(300), "a shed is immediate, not queued");
    // Normal below 90%.
    held.extend(spawn_gets(&client, gw.http, "/normal", 2));
    wait_for(&backend, 9).await;
    assert_overloaded(&client.get(gw.http, "/normal").await);
    // Critical up to 100%.
    held.extend(spawn_gets(&client, gw.http, "/critical", 1));
    wait_for(&backend, 10).await;
    assert_overloaded(&client.get(gw.http, "/critical").await);
    assert_eq!(backend.requests(), 10, "a shed request reached the backend");

    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    // Permits are back once the bodies are done.
    assert_eq!(client.get(gw.http, "/bulk").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_is_shed_while_a_quiet_tenant_keeps_its_share() {
    let backend = Backend::with(Behavior::Delay(Duration::from_millis(10))).await;
    let config = upstream("adm_tenant", backend.addr, 20)
        + &route("api", "/", "adm_tenant", "tenant_key = \"header:x-tenant\"");
    let gw = TestGateway::start(&config).await;
    let client = Client::new();
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let flood_shed = Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (0..30)
        .map(|_| {
            let (client, addr, stop, shed) = (client.clone(), gw.http, stop.clone(), flood_shed.clone());
            tokio::spawn(async move {
                for _ in 0..10_000 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(10) {
                        break;
                    }
                    let rsp = client.get_with(addr, "/", &[("x-tenant", "flood")]).await;
                    if rsp.status == 503 {
                        assert_overloaded(&rsp);
                        shed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // Let the flood fill the upstream first.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut quiet_ok = 0;
    let quiet_sent = 100;
    for _ in 0..quiet_sent {
        let rsp = client.get_with(gw.http, "/", &[("x-tenant", "quiet")]).await;
        if rsp.status == 200 {
            quiet_ok += 1;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    assert!(quiet_ok * 100 >= quiet_sent * 99, "the quiet tenant got {quiet_ok} of {quiet_sent}");
    assert!(flood_shed.load(Ordering::Relaxed) > 0, "the flooding tenant was never shed");
}
