//! Several gateways, one limit: the Redis store against a real `redis-server`,
//! including Redis dying under load and coming back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::support::gateway::metric_value;
use crate::support::redis::{lane_clients, wait_lane_decision, Redis};
use crate::support::{base_config, upstream_and_route, Backend, Client, TestGateway};

/// A route named `route` (unique per test: metrics and Redis keys carry it).
fn config(
    backend: std::net::SocketAddr,
    redis: &Redis,
    route: &str,
    limit: &str,
    on_failure: &str,
) -> String {
    base_config()
        + &upstream_and_route(&format!("{route}-up"), &[backend], route, "/").replace(
            &format!("upstream = \"{route}-up\""),
            &format!("upstream = \"{route}-up\"\nclient_key = \"header:x-device-id\""),
        )
        + limit
        // Storm detection is stage 3c; these tests look at the limits alone.
        + "[routes.storm]\nenabled = false\n"
        + &format!(
            "\n[store]\nkind = \"redis\"\nurl = \"{}\"\non_failure = \"{on_failure}\"\ntimeout = \"100ms\"\n",
            redis.url()
        )
}

async fn redis_conn(redis: &Redis) -> redis::aio::MultiplexedConnection {
    redis.conn().await.unwrap()
}

/// Whether this gateway's store is up (`/api/v1/state`; the `levee_store_up`
/// gauge is process-wide, shared by every in-process gateway).
async fn store_up(gw: &TestGateway) -> bool {
    Client::new().get(gw.admin, "/api/v1/state").await.json()["store"]["up"] == true
}

/// Waits until the gateway's store is `up` (it connects and probes in the background).
async fn wait_store(gw: &TestGateway, up: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while store_up(gw).await != up {
        assert!(Instant::now() < deadline, "the Redis store never went {}", if up { "up" } else { "down" });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_store_up(gw: &TestGateway) {
    wait_store(gw, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_on_one_redis_enforce_one_limit() {
    let _exclusive = crate::support::exclusive().await;
    let backend = Backend::start().await;
    let redis = Redis::spawn().await;
    let toml =
        config(backend.addr, &redis, "rs-three", "[[routes.limits]]\nrate = \"50/s\"\nburst = 50\n", "local");
    let gws =
        [TestGateway::start(&toml).await, TestGateway::start(&toml).await, TestGateway::start(&toml).await];
    for gw in &gws {
        wait_store_up(gw).await;
    }
    let allowed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let run_for = Duration::from_secs(2);
    let mut tasks = Vec::new();
    for gw in &gws {
        for _ in 0..2 {
            let (http, allowed) = (gw.http, allowed.clone());
            tasks.push(tokio::spawn(async move {
                let c = Client::new();
                for _ in 0..100_000 {
                    if started.elapsed() >= run_for {
                        break;
                    }
                    let rsp = c.get_with(http, "/", &[("x-device-id", "shared")]).await;
                    match rsp.status.as_u16() {
                        200 => {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                        429 => {}
                        other => panic!("unexpected {other}"),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = 50.0 + 50.0 * elapsed;
    let got = allowed.load(Ordering::Relaxed) as f64;
    assert!((got - expected).abs() <= expected * 0.10, "allowed {got}, expected {expected:.0} ± 10%");
    assert!(got <= expected * 1.10, "three gateways must not triple the allowance");
}

#[tokio::test]
async fn state_expires_by_itself_and_survives_a_gateway_restart_only_until_refilled() {
    let backend = Backend::start().await;
    let redis = Redis::spawn().await;
    let toml =
        config(backend.addr, &redis, "rs-expire", "[[routes.limits]]\nrate = \"1/s\"\nburst = 1\n", "local");
    let gw = TestGateway::start(&toml).await;
    wait_store_up(&gw).await;
    let c = Client::new();
    assert_eq!(c.get_with(gw.http, "/", &[("x-device-id", "d")]).await.status, 200);
    let mut conn = redis_conn(&redis).await;
    // The key names the limit (rate and burst), not its position.
    let key = "levee:{rs-expire:d}:1/s:b1";
    let ttl: i64 = redis::cmd("PTTL").arg(key).query_async(&mut conn).await.unwrap();
    assert!(ttl > 0 && ttl <= 1000, "the key expires when the bucket is full again (PTTL {ttl})");
    drop(gw);

    // A new gateway (a restart) sees the shared state...
    let gw = TestGateway::start(&toml).await;
    wait_store_up(&gw).await;
    assert_eq!(c.get_with(gw.http, "/", &[("x-device-id", "d")]).await.status, 429);
    // ...but never longer than the refill time: nothing to clear by hand.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let exists: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut conn).await.unwrap();
        if exists == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the key never expired by itself");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.get_with(gw.http, "/", &[("x-device-id", "d")]).await.status, 200);

    // The admin API reads and resets the shared state.
    let state = c.get(gw.admin, "/api/v1/clients/d").await;
    assert_eq!(state.status, 200, "{}", state.text());
    assert_eq!(state.json()["store"], "redis");
    let req = http::Request::delete(format!("http://{}/api/v1/clients/d", gw.admin))
        .body(Default::default())
        .unwrap();
    assert_eq!(c.send(req).await.status, 200);
    let exists: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut conn).await.unwrap();
    assert_eq!(exists, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_falls_back_to_local_without_errors_or_stalls_and_recovers() {
    let _exclusive = crate::support::exclusive().await;
    let backend = Backend::start().await;
    let mut redis = Redis::spawn().await;
    let toml = config(
        backend.addr,
        &redis,
        "rs-killed",
        "[[routes.limits]]\nrate = \"1000/s\"\nburst = 1000\n",
        "local",
    );
    let gw = TestGateway::start(&toml).await;
    wait_store_up(&gw).await;

    let slowest = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(AtomicUsize::new(0));
    let stop_at = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (http, slowest, bad) = (gw.http, slowest.clone(), bad.clone());
        tasks.push(tokio::spawn(async move {
            let c = Client::new();
            for i in 0..100_000 {
                if Instant::now() >= stop_at {
                    break;
                }
                let started = Instant::now();
                let rsp = c.get_with(http, "/", &[("x-device-id", &format!("dev-{t}-{}", i % 50))]).await;
                slowest.fetch_max(started.elapsed().as_millis() as usize, Ordering::Relaxed);
                if rsp.status != 200 {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "a Redis outage with on_failure = local must not fail a request"
    );
    // No stall: a request waits for Redis at most store.timeout (100 ms). The
    // bound allows a busy 2-core machine a second on top; a request stuck on a
    // dead Redis (TCP retransmits, no timeout) would take far longer.
    let slowest = slowest.load(Ordering::Relaxed);
    assert!(slowest < 100 + 1000, "a request took {slowest} ms; the store timeout is 100 ms");
    let ready = Client::new().get(gw.admin, "/readyz").await;
    assert_eq!(ready.status, 200, "a store outage degrades, it does not make levee unready");
    assert_eq!(ready.json()["degraded"][0]["part"], "store");

    // Back by itself: limits are shared again.
    redis.restart().await;
    wait_store_up(&gw).await;
    let mut conn = redis_conn(&redis).await;
    let mut exists = 0;
    for _ in 0..20 {
        let rsp = Client::new().get_with(gw.http, "/", &[("x-device-id", "after")]).await;
        assert_eq!(rsp.status, 200);
        exists = redis::cmd("EXISTS")
            .arg("levee:{rs-killed:after}:1000/s:b1000")
            .query_async(&mut conn)
            .await
            .unwrap();
        if exists == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(exists, 1, "decisions go to Redis again");
}

#[tokio::test]
async fn on_failure_deny_answers_503_store_unavailable_and_allow_lets_traffic_through() {
    let backend = Backend::start().await;
    let mut redis = Redis::spawn().await;
    let limit = "[[routes.limits]]\nrate = \"1/m\"\nburst = 1\n";
    let deny = TestGateway::start(&config(backend.addr, &redis, "rs-deny", limit, "deny")).await;
    let allow = TestGateway::start(&config(backend.addr, &redis, "rs-allow", limit, "allow")).await;
    wait_store_up(&deny).await;
    wait_store_up(&allow).await;
    redis.kill();
    let c = Client::new();
    // The first request after the kill may spend the store timeout finding out.
    let _ = c.get_with(deny.http, "/", &[("x-device-id", "x")]).await;
    let rsp = c.get_with(deny.http, "/", &[("x-device-id", "x")]).await;
    assert_eq!(rsp.status, 503);
    assert_eq!(rsp.reason(), Some("store_unavailable"));
    assert!(rsp.retry_after().is_some());
    for _ in 0..3 {
        let rsp = c.get_with(allow.http, "/", &[("x-device-id", "x")]).await;
        assert_eq!(rsp.status, 200, "allow lets every request through while Redis is away");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levee_store_up_follows_redis() {
    // A process of its own: the gauge is process-wide.
    let backend = Backend::start().await;
    let mut redis = Redis::spawn().await;
    let path = crate::support::temp_dir("store-up").join("levee.toml");
    std::fs::write(
        &path,
        config(backend.addr, &redis, "rs-gauge", "[[routes.limits]]\nrate = \"10/s\"\n", "local"),
    )
    .unwrap();
    let p = crate::support::process::Process::start(&path);
    let c = Client::new();
    let store_up = || async { metric_value(&c.get(p.admin, "/metrics").await.text(), "levee_store_up", &[]) };
    for _ in 0..100 {
        if store_up().await == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store_up().await, Some(1.0));
    redis.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while store_up().await != Some(0.0) {
        assert!(Instant::now() < deadline, "levee_store_up stayed 1 with Redis killed");
        let _ = c.get_with(p.http, "/", &[("x-device-id", "a")]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while store_up().await != Some(1.0) {
        assert!(Instant::now() < deadline, "the store never reconnected by itself");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every reply that means "this Redis cannot take decisions" marks the store
/// down, as a dead connection does: out of memory (`OOM`), a demoted master
/// (`READONLY`). `on_failure` applies meanwhile; it is up again once a
/// decision can be written. The probe writes, so it does not flap back up on
/// a server that answers `PING` but refuses every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_and_readonly_replies_mark_the_store_down_until_redis_writes_again() {
    let backend = Backend::start().await;
    let redis = Redis::spawn().await;
    let limit = "[[routes.limits]]\nrate = \"100/s\"\nburst = 100\n";
    let gw = TestGateway::start(&config(backend.addr, &redis, "rs-notserving", limit, "deny")).await;
    wait_store_up(&gw).await;
    let c = Client::new();
    let device = [("x-device-id", "w")];
    assert_eq!(c.get_with(gw.http, "/", &device).await.status, 200);
    let mut admin = redis_conn(&redis).await;
    let config_set = |k: &'static str, v: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg(k).arg(v);
        cmd
    };

    // Out of memory: writes fail with OOM.
    let _: () = config_set("maxmemory-policy", "noeviction").query_async(&mut admin).await.unwrap();
    let _: () = config_set("maxmemory", "1").query_async(&mut admin).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rsp = c.get_with(gw.http, "/", &device).await;
        if rsp.status == 503 {
            assert_eq!(rsp.reason(), Some("store_unavailable"), "on_failure = deny applies");
            break;
        }
        assert_eq!(rsp.status, 200, "{}", rsp.text());
        assert!(Instant::now() < deadline, "OOM replies never marked the store down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!store_up(&gw).await, "the store is down while Redis is out of memory");
    // Several probe rounds (every 250 ms) later it is still down: PING would pass.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!store_up(&gw).await, "the probe must not mark a full Redis up");
    let _: () = config_set("maxmemory", "0").query_async(&mut admin).await.unwrap();
    wait_store(&gw, true).await;
    assert_eq!(c.get_with(gw.http, "/", &device).await.status, 200);

    // A demoted master: a replica of a master that is not there refuses writes with READONLY.
    let closed = crate::support::closed_port();
    let _: () =
        redis::cmd("REPLICAOF").arg("127.0.0.1").arg(closed.port()).query_async(&mut admin).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rsp = c.get_with(gw.http, "/", &device).await;
        if rsp.status == 503 {
            assert_eq!(rsp.reason(), Some("store_unavailable"));
            break;
        }
        assert_eq!(rsp.status, 200, "{}", rsp.text());
        assert!(Instant::now() < deadline, "READONLY replies never marked the store down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!store_up(&gw).await);
    let _: () = redis::cmd("REPLICAOF").arg("NO").arg("ONE").query_async(&mut admin).await.unwrap();
    wait_store(&gw, true).await;
    assert_eq!(c.get_with(gw.http, "/", &device).await.status, 200);
}

/// Decisions take the store's fast lane, its own pipelined connection; a
/// lane whose connection dies is rebuilt by itself, and a script Redis has
/// forgotten is loaded again, without one decision failing meanwhile
/// (`on_failure = "deny"`: a failed decision would be a 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_take_the_fast_lane_which_survives_a_killed_connection_and_a_flushed_script() {
    let backend = Backend::start().await;
    let redis = Redis::spawn().await;
    let limit = "[[routes.limits]]\nrate = \"1000/s\"\nburst = 1000\n";
    // A generous timeout: a busy machine's stall must not pass for a failure.
    let toml = config(backend.addr, &redis, "rs-lane", limit, "deny").replace("\"100ms\"", "\"2s\"");
    let gw = TestGateway::start(&toml).await;
    wait_store_up(&gw).await;
    let mut conn = redis_conn(&redis).await;
    let c = Client::new();
    let device = [("x-device-id", "lane")];
    let first = wait_lane_decision(gw.http, &device, &mut conn, None).await;

    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(first)
        .query_async::<()>(&mut redis_conn(&redis).await)
        .await
        .unwrap();
    let second = wait_lane_decision(gw.http, &device, &mut conn, Some(first)).await;
    assert_ne!(first, second);

    redis::cmd("SCRIPT").arg("FLUSH").query_async::<()>(&mut redis_conn(&redis).await).await.unwrap();
    for _ in 0..20 {
        assert_eq!(c.get_with(gw.http, "/", &device).await.status, 200);
    }
    let lanes = lane_clients(&mut redis_conn(&redis).await).await;
    assert!(
        lanes.iter().any(|(id, _)| *id == second),
        "NOSCRIPT did not cost the lane its connection: {lanes:?}"
    );
    assert!(store_up(&gw).await);
}

/// The client ids of the connections whose `CLIENT SETNAME` the ACL refused
/// (`ACL LOG`).
async fn setname_refused_ids(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let log: Vec<Vec<redis::Value>> = redis::cmd("ACL").arg("LOG").query_async(conn).await.unwrap();
    log.iter()
        .filter_map(|entry| {
            let texts: Vec<String> = entry
                .iter()
                .map(|v| match v {
                    redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                    redis::Value::SimpleString(s) => s.clone(),
                    _ => String::new(),
                })
                .collect();
            let field = |k: &str| texts.iter().position(|t| t == k).and_then(|i| texts.get(i + 1));
            (field("object")? == "client|setname").then_some(())?;
            field("client-info")?.split(' ').find_map(|f| f.strip_prefix("id=")).map(str::to_string)
        })
        .collect()
}

/// The fast lane logs in as the URL says (ACL user and password), uses its
/// database, and does without a name when the ACL forbids `CLIENT SETNAME`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_lane_logs_in_selects_the_database_and_does_without_a_name() {
    let backend = Backend::start().await;
    let redis = Redis::spawn().await;
    let mut admin = redis_conn(&redis).await;
    redis::cmd("ACL")
        .arg(&["SETUSER", "lane", "on", ">lane-secret", "~*", "&*", "+@all", "-client|setname"][..])
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    // Slow to refill: each decision keeps its key for an hour, to be found.
    let limit = "[[routes.limits]]\nrate = \"10/h\"\nburst = 1000\n";
    let url = format!("redis://lane:lane-secret@{}/2", redis.addr);
    let toml = config(backend.addr, &redis, "rs-acl", limit, "deny")
        .replace(&redis.url(), &url)
        .replace("\"100ms\"", "\"2s\"");
    let gw = TestGateway::start(&toml).await;
    wait_store_up(&gw).await;
    let c = Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(c.get_with(gw.http, "/", &[("x-device-id", "acl")]).await.status, 200);
        // The lane's connections are those whose `CLIENT SETNAME` the ACL
        // refused (its log names them); one of them, logged in as lane on
        // database 2, decides.
        let refused = setname_refused_ids(&mut admin).await;
        let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut admin).await.unwrap();
        let lane = list.lines().any(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            refused.iter().any(|id| fields.contains(&format!("id={id}").as_str()))
                && ["user=lane", "db=2", "cmd=evalsha"].iter().all(|f| fields.contains(f))
        });
        if lane {
            break;
        }
        assert!(Instant::now() < deadline, "no fast lane logged in as lane on db 2:\n{list}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis::cmd("SELECT").arg(2).query_async::<()>(&mut admin).await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("levee:{rs-acl:*").query_async(&mut admin).await.unwrap();
    assert_eq!(keys.len(), 1, "the decision's key is in database 2: {keys:?}");
}

/// A server that closes idle connections (`timeout`) closes the lane's too:
/// levee builds a new one by itself, before a decision needs it, and no
/// decision fails (`on_failure = "deny"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_the_server_closed_while_idle_is_rebuilt_before_it_is_needed() {
    let backend = Backend::start().await;
    let redis = Redis::spawn().await;
    let limit = "[[routes.limits]]\nrate = \"1000/s\"\nburst = 1000\n";
    let toml = config(backend.addr, &redis, "rs-idle", limit, "deny").replace("\"100ms\"", "\"2s\"");
    let gw = TestGateway::start(&toml).await;
    wait_store_up(&gw).await;
    let mut admin = redis_conn(&redis).await;
    let device = [("x-device-id", "idle")];
    let first = wait_lane_decision(gw.http, &device, &mut admin, None).await;
    // Idle connections go after 1 s (the test's own one keeps talking).
    redis::cmd("CONFIG").arg("SET").arg("timeout").arg(1).query_async::<()>(&mut admin).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let lanes = lane_clients(&mut admin).await;
        if lanes.iter().all(|(id, _)| *id != first) && !lanes.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the closed lane was not rebuilt: {lanes:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    redis::cmd("CONFIG").arg("SET").arg("timeout").arg(0).query_async::<()>(&mut admin).await.unwrap();
    // (A lane closed just before may be rebuilt meanwhile: the helper polls.)
    wait_lane_decision(gw.http, &device, &mut admin, Some(first)).await;
}
