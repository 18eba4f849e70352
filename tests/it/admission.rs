//! Admission against a real, slow backend: priorities are shed in order, and a
//! flooding tenant is shed while a quiet one keeps its service.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::support::{
    base_config, exclusive, poll_until, Backend, Behavior, Client, TestGateway, TestResponse,
};

fn upstream(name: &str, backend: SocketAddr, max_concurrency: usize) -> String {
    base_config()
        + &format!(
            r#"
[upstreams.{name}]
endpoints = ["{backend}"]
# Held requests wait for the test, however slow the machine: never a timeout.
timeout = "60s"
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
    poll_until(Duration::from_secs(20), &format!("the backend sees {n} requests in flight"), async || {
        (backend.requests() >= n).then_some(())
    })
    .await;
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
    // One bound below is in wall-clock time (a shed is immediate).
    let _machine = exclusive().await;
    // The backend holds every request until the sheds are checked: they are
    // in flight for certain, however long a loaded machine takes.
    let backend = Backend::with(Behavior::Held).await;
    let config = upstream("adm_prio", backend.addr, 10)
        + &route("adm-prio-bulk", "/bulk", "adm_prio", "priority = \"bulk\"")
        + &route("adm-prio-normal", "/normal", "adm_prio", "priority = \"normal\"")
        + &route("adm-prio-critical", "/critical", "adm_prio", "priority = \"critical\"");
    let gw = TestGateway::start(&config).await;
    let client = Client::new();

    // Bulk is admitted below 70% of 10.
    let mut held = spawn_gets(&client, gw.http, "/bulk", 7);
    wait_for(&backend, 7).await;
    let asked = Instant::now();
    assert_overloaded(&client.get(gw.http, "/bulk").await);
    // A queued request would wait until the backend is released: any answer
    // within seconds is a shed, not a queue.
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "a shed is immediate, not queued: {:?}",
        asked.elapsed()
    );
    // Normal below 90%.
    held.extend(spawn_gets(&client, gw.http, "/normal", 2));
    wait_for(&backend, 9).await;
    assert_overloaded(&client.get(gw.http, "/normal").await);
    // Critical up to 100%.
    held.extend(spawn_gets(&client, gw.http, "/critical", 1));
    wait_for(&backend, 10).await;
    assert_overloaded(&client.get(gw.http, "/critical").await);
    assert_eq!(backend.requests(), 10, "a shed request reached the backend");

    backend.release();
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    // Permits are back once the bodies are done (the gateway drops a permit
    // with the body, a moment after the client has read its last byte).
    poll_until(Duration::from_secs(10), "a bulk request is admitted again", async || {
        let rsp = client.get(gw.http, "/bulk").await;
        if rsp.status != 200 {
            assert_overloaded(&rsp);
        }
        (rsp.status == 200).then_some(())
    })
    .await;
    assert_eq!(backend.requests(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_is_shed_while_a_quiet_tenant_keeps_its_share() {
    // 30 clients in a loop load the machine.
    let _machine = exclusive().await;
    let backend = Backend::with(Behavior::Delay(Duration::from_millis(10))).await;
    let config = upstream("adm_tenant", backend.addr, 20)
        + &route("adm-tenant-api", "/", "adm_tenant", "tenant_key = \"header:x-tenant\"");
    let gw = TestGateway::start(&config).await;
    let client = Client::new();
    // A safety bound only: the flood runs until `stop`.
    let limit = Duration::from_secs(60);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let flood_shed = Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (0..30)
        .map(|_| {
            let (client, addr, stop, shed) = (client.clone(), gw.http, stop.clone(), flood_shed.clone());
            tokio::spawn(async move {
                for _ in 0..1_000_000 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > limit {
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
    // The flood has filled its share of the upstream once it is shed.
    poll_until(Duration::from_secs(20), "the flooding tenant is shed", async || {
        (flood_shed.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;
    let shed_before = flood_shed.load(Ordering::Relaxed);

    let mut quiet_ok = 0;
    let quiet_sent = 100;
    for _ in 0..quiet_sent {
        let rsp = client.get_with(gw.http, "/", &[("x-tenant", "quiet")]).await;
        if rsp.status == 200 {
            quiet_ok += 1;
        }
    }
    let shed_during = flood_shed.load(Ordering::Relaxed) - shed_before;
    let flood_ran_throughout = flood.iter().all(|f| !f.is_finished());
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    assert!(flood_ran_throughout, "the flood stopped before the quiet tenant was done");
    assert!(quiet_ok * 100 >= quiet_sent * 99, "the quiet tenant got {quiet_ok} of {quiet_sent}");
    assert!(shed_during > 0, "the flooding tenant was not shed while the quiet one was served");
}
