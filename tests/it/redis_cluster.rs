//! Scaling out for real: refusals that cost Redis nothing (counted with
//! `INFO commandstats`), resets that reach every replica, and a real 3-master,
//! 3-replica Redis Cluster shared by three gateways that survives losing a master.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::support::redis::{wait_lane_decision, Redis};
use crate::support::redis_cluster::{command_calls, RedisCluster};
use crate::support::{base_config, upstream_and_route, Backend, Client, TestGateway};

/// A route `route` keyed by `x-device-id`, with `limits`, on a Redis store
/// at `urls` (one URL: a single server; several: a cluster).
fn config(
    backend: std::net::SocketAddr,
    urls: &[String],
    route: &str,
    limits: &str,
    on_failure: &str,
) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    base_config()
        + &upstream_and_route("b", &[backend], route, "/")
            .replace("upstream = \"b\"", "upstream = \"b\"\nclient_key = \"header:x-device-id\"")
        + limits
        + "[routes.storm]\nenabled = false\n"
        + &format!(
            "\n[store]\nkind = \"redis\"\nurls = [{}]\non_failure = \"{on_failure}\"\ntimeout = \"100ms\"\n",
            urls.join(", ")
        )
}

/// Whether this gateway's store is up, from `/api/v1/state` (the
/// `levee_store_up` gauge is process-wide, shared by in-process gateways).
async fn store_up(gw: &TestGateway) -> bool {
    Client::new().get(gw.admin, "/api/v1/state").await.json()["store"]["up"] == true
}

async fn wait_store(gw: &TestGateway, up: bool, within: Duration) {
    let deadline = Instant::now() + within;
    while store_up(gw).await != up {
        assert!(Instant::now() < deadline, "the store never went {}", if up { "up" } else { "down" });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn evalsha_calls(redis: &Redis) -> u64 {
    let mut conn = redis.conn().await.unwrap();
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.unwrap();
    command_calls(&info, "evalsha")
}

fn device(id: &str) -> [(&'static str, &str); 1] {
    [("x-device-id", id)]
}

/// The contract's numbers: a client refused by Redis costs Redis nothing
/// until its retry time (≤ 0.01 scripts per request), answered with the same
/// 429, `Retry-After` and `RateLimit` headers; a fleet under its limits costs
/// one script per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_refused_client_costs_redis_nothing_and_a_fleet_one_script_per_request() {
    let backend = Backend::start().await;
    let redis = Redis::spawn().await;
    let limits = "[[routes.limits]]\nrate = \"10/m\"\nburst = 1\n";
    let gw = TestGateway::start(&config(backend.addr, &[redis.url()], "rc-hot", limits, "deny")).await;
    wait_store(&gw, true, Duration::from_secs(10)).await;
    let c = Client::new();

    assert_eq!(c.get_with(gw.http, "/", &device("hot")).await.status, 200);
    // Redis decides the first refusal...
    let first = c.get_with(gw.http, "/", &device("hot")).await;
    assert_eq!(first.status, 429);
    let before = evalsha_calls(&redis).await;
    // ...and the node every later one, with the same answer counted down.
    let n = 2000;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (http, first_policy) = (gw.http, first.headers["ratelimit-policy"].clone());
        tasks.push(tokio::spawn(async move {
            let c = Client::new();
            for i in 0..n / 4 {
                let rsp = c.get_with(http, "/", &device("hot")).await;
                assert_eq!(rsp.status, 429, "request {t}/{i}");
                assert_eq!(rsp.reason(), Some("rate_limited"));
                let retry = rsp.retry_after().expect("Retry-After");
                assert!((1..=6).contains(&retry), "Retry-After {retry}: at most Redis's 6 s");
                assert_eq!(rsp.headers["ratelimit-policy"], first_policy);
                let ratelimit = rsp.headers["ratelimit"].to_str().unwrap().to_string();
                assert!(ratelimit.starts_with("\"10/m\";r=0;t="), "{ratelimit}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let hot = evalsha_calls(&redis).await - before;
    let per_request = hot as f64 / n as f64;
    println!("hot refused client: {hot} scripts for {n} requests ({per_request:.4} per request)");
    assert!(per_request <= 0.01, "{hot} scripts for {n} refused requests");
    assert!(backend.requests() == 1, "only the first request reached the backend");

    // A fleet under its limits: one script per request, no more.
    let before = evalsha_calls(&redis).await;
    let fleet = 500;
    for i in 0..fleet {
        let id = format!("fleet-{i}");
        assert_eq!(c.get_with(gw.http, "/", &device(&id)).await.status, 200);
    }
    let scripts = evalsha_calls(&redis).await - before;
    println!("fleet under its limits: {scripts} scripts for {fleet} requests");
    assert_eq!(scripts, fleet, "one script per request");
}

/// Under concurrency, at the limit: the request that takes the last token
/// leaves a refusal until the next one, and when a refusal runs out one
/// request asks Redis while the node's others wait on it. So a hot client
/// with 16 requests in flight costs about one script per token it gets, not
/// one per waiting request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_client_with_requests_in_flight_costs_about_one_script_per_token() {
    let backend = Backend::start().await;
    let redis = Redis::spawn().await;
    let limits = "[[routes.limits]]\nrate = \"20/s\"\nburst = 1\n";
    let gw = TestGateway::start(&config(backend.addr, &[redis.url()], "rc-flight", limits, "deny")).await;
    wait_store(&gw, true, Duration::from_secs(10)).await;
    let before = evalsha_calls(&redis).await;
    let (admitted, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let started = Instant::now();
    let window = Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (http, admitted, refused) = (gw.http, admitted.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let c = Client::new();
            for _ in 0..5000 {
                if started.elapsed() >= window {
                    break;
                }
                match c.get_with(http, "/", &device("flight")).await.status.as_u16() {
                    200 => admitted.fetch_add(1, Ordering::Relaxed),
                    429 => refused.fetch_add(1, Ordering::Relaxed),
                    other => panic!("status {other}"),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let scripts = evalsha_calls(&redis).await - before;
    let (admitted, refused) = (admitted.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    println!("{admitted} admitted, {refused} refused in {elapsed:.2} s: {scripts} scripts");
    assert!(admitted as f64 <= 2.0 + 20.0 * elapsed, "{admitted} admitted: the limit holds");
    assert!(refused >= 4 * admitted, "the client must be hot for this to mean anything: {refused} refused");
    // The first wave of 16 before anything is remembered, then per token one
    // request that asks, plus one or two when it asks a little early (the node
    // counts from the request's arrival, Redis from the script's run; here
    // about 2 per token). Before these two rules: 500 scripts for 30 admitted
    // and 21,007 refused on the same machine.
    assert!(
        scripts as usize <= 16 + 6 * admitted,
        "{scripts} scripts for {admitted} admitted and {refused} refused requests"
    );
}

/// A reset on one replica reaches the others through Redis pub/sub: the
/// client, refused and remembered on both, passes on the other one at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_on_one_replica_drops_the_remembered_refusal_on_every_replica() {
    let backend = Backend::start().await;
    let redis = Redis::spawn().await;
    let limits = "[[routes.limits]]\nrate = \"1/m\"\nburst = 1\n";
    let toml = config(backend.addr, &[redis.url()], "rc-reset", limits, "deny");
    let (a, b) = (TestGateway::start(&toml).await, TestGateway::start(&toml).await);
    wait_store(&a, true, Duration::from_secs(10)).await;
    wait_store(&b, true, Duration::from_secs(10)).await;
    // Both replicas listen for resets before the test resets anything.
    let mut conn = redis.conn().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let subs: (String, i64) =
            redis::cmd("PUBSUB").arg("NUMSUB").arg("levee:reset").query_async(&mut conn).await.unwrap();
        if subs.1 >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the replicas never subscribed to levee:reset");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = Client::new();
    assert_eq!(c.get_with(a.http, "/", &device("r")).await.status, 200);
    assert_eq!(c.get_with(a.http, "/", &device("r")).await.status, 429);
    assert_eq!(c.get_with(b.http, "/", &device("r")).await.status, 429);
    // Remembered on both: refusals no longer reach Redis.
    let before = evalsha_calls(&redis).await;
    for gw in [&a, &b, &a, &b] {
        let rsp = c.get_with(gw.http, "/", &device("r")).await;
        assert_eq!(rsp.status, 429);
        assert!(rsp.retry_after().is_some_and(|s| (1..=60).contains(&s)));
    }
    assert_eq!(evalsha_calls(&redis).await, before, "remembered refusals cost Redis nothing");

    let req = http::Request::delete(format!("http://{}/api/v1/clients/r", a.admin))
        .body(Default::default())
        .unwrap();
    let rsp = c.send(req).await;
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    // The other replica learns it from the message (refusing locally until
    // then), and Redis, reset, lets the client through.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rsp = c.get_with(b.http, "/", &device("r")).await;
        if rsp.status == 200 {
            break;
        }
        assert_eq!(rsp.status, 429);
        assert!(Instant::now() < deadline, "the reset never reached the other replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The replica that reset forgot too: Redis decides (b took the token).
    let before = evalsha_calls(&redis).await;
    assert_eq!(c.get_with(a.http, "/", &device("r")).await.status, 429);
    assert_eq!(evalsha_calls(&redis).await, before + 1, "Redis decided, not a stale memory");
}

/// Three gateways share one limit through a real Redis Cluster: a client
/// hammering all three gets its limit once in total (±10%), and refusals stay
/// off Redis there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_share_one_limit_through_a_redis_cluster() {
    let _exclusive = crate::support::exclusive().await;
    let backend = Backend::start().await;
    let cluster = RedisCluster::spawn().await;
    let limits = "[[routes.limits]]\nrate = \"60/m\"\nburst = 60\n";
    let toml = config(backend.addr, &cluster.urls(), "rc-three", limits, "deny");
    let gws =
        [TestGateway::start(&toml).await, TestGateway::start(&toml).await, TestGateway::start(&toml).await];
    for gw in &gws {
        wait_store(gw, true, Duration::from_secs(10)).await;
    }
    let scripts_before = cluster.command_calls("evalsha").await;
    let allowed = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let run_for = Duration::from_secs(2);
    let mut tasks = Vec::new();
    for gw in &gws {
        for _ in 0..2 {
            let (http, allowed, sent) = (gw.http, allowed.clone(), sent.clone());
            tasks.push(tokio::spawn(async move {
                let c = Client::new();
                for _ in 0..100_000 {
                    if started.elapsed() >= run_for {
                        break;
                    }
                    let rsp = c.get_with(http, "/", &device("shared")).await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    match rsp.status.as_u16() {
                        200 => {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                        429 => assert_eq!(rsp.reason(), Some("rate_limited")),
                        other => panic!("unexpected {other}: {}", rsp.text()),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = 60.0 + elapsed;
    let got = allowed.load(Ordering::Relaxed) as f64;
    assert!((got - expected).abs() <= expected * 0.10, "allowed {got}, expected {expected:.0} ± 10%");
    let scripts = cluster.command_calls("evalsha").await - scripts_before;
    let sent = sent.load(Ordering::Relaxed);
    println!("cluster: {got} allowed of {sent} requests in {elapsed:.1} s; {scripts} scripts");
    // One script per admitted request, plus about one per gateway each time
    // a remembered refusal falls due (every second here), plus slack for races.
    assert!((scripts as f64) <= got + 3.0 * (elapsed + 1.0) + 20.0, "{scripts} scripts for {sent} requests");

    // Every gateway follows resets: subscribed on some node of the cluster
    // (a PUBLISH on any node reaches the subscribers of every node).
    let mut subscribers = 0;
    for i in 0..cluster.nodes.len() {
        let mut conn = cluster.conn(i).await.unwrap();
        let subs: (String, i64) =
            redis::cmd("PUBSUB").arg("NUMSUB").arg("levee:reset").query_async(&mut conn).await.unwrap();
        subscribers += subs.1;
    }
    assert_eq!(subscribers, 3, "each gateway subscribes to levee:reset once");
}

/// Every key of one client lives in one slot (its hash tag), so one script
/// decides all its limits on one node of the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_of_one_client_stay_in_one_slot_of_the_cluster() {
    let backend = Backend::start().await;
    let cluster = RedisCluster::spawn().await;
    let limits = "[[routes.limits]]\nrate = \"10/s\"\nburst = 10\n[[routes.limits]]\nrate = \"1000/h\"\n";
    let gw = TestGateway::start(&config(backend.addr, &cluster.urls(), "rc-slot", limits, "deny")).await;
    wait_store(&gw, true, Duration::from_secs(10)).await;
    let c = Client::new();
    for id in ["dev-1", "dev-2", "dev-3"] {
        assert_eq!(c.get_with(gw.http, "/", &device(id)).await.status, 200);
    }
    for id in ["dev-1", "dev-2", "dev-3"] {
        let pattern = format!("levee:{{rc-slot:{id}}}:*");
        let mut found = Vec::new();
        for m in cluster.masters().await {
            let mut conn = cluster.conn(m).await.unwrap();
            let mut cursor = 0u64;
            for _ in 0..1000 {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                found.extend(keys.into_iter().map(|k| (m, k)));
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        assert_eq!(found.len(), 2, "one key per limit for {id}: {found:?}");
        assert_eq!(found[0].0, found[1].0, "both keys of {id} on one master: {found:?}");
        let mut conn = cluster.conn(found[0].0).await.unwrap();
        let mut slots = Vec::new();
        for (_, k) in &found {
            let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(k).query_async(&mut conn).await.unwrap();
            slots.push(slot);
        }
        assert_eq!(slots[0], slots[1], "{found:?} in slots {slots:?}");
    }
}

/// A master killed under load: requests follow `on_failure` and none waits
/// longer than `store.timeout` (plus a busy machine's margin); its replica
/// takes over; levee finds the new master by itself and decides through
/// Redis again; `levee_store_up` (this gateway's, from `/api/v1/state`) is 0
/// while decisions fail and 1 after, without flapping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_fails_over_under_load_and_levee_follows_the_new_master() {
    let _exclusive = crate::support::exclusive().await;
    let backend = Backend::start().await;
    let mut cluster = RedisCluster::spawn().await;
    // Generous (never refuses here) and slow to refill, so that each decision
    // moves the key's tat 36 ms later and the key lives long enough to read.
    let limits = "[[routes.limits]]\nrate = \"100000/h\"\nburst = 100000\n";
    let gw = TestGateway::start(&config(backend.addr, &cluster.urls(), "rc-failover", limits, "local")).await;
    wait_store(&gw, true, Duration::from_secs(10)).await;
    let c = Client::new();
    let key = "levee:{rc-failover:f}:100000/h:b100000";
    assert_eq!(c.get_with(gw.http, "/", &device("f")).await.status, 200);
    let victim = cluster.owner_of(key).await.expect("a master serves the key");

    // Load over many clients (so over every master), and a sampler of store_up.
    let stop = Arc::new(AtomicBool::new(false));
    let slowest = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(AtomicUsize::new(0));
    let hard_stop = Instant::now() + Duration::from_secs(30);
    let mut tasks = Vec::new();
    for t in 0..3 {
        let (http, stop, slowest, bad) = (gw.http, stop.clone(), slowest.clone(), bad.clone());
        tasks.push(tokio::spawn(async move {
            let c = Client::new();
            for i in 0..1_000_000 {
                if stop.load(Ordering::Relaxed) || Instant::now() >= hard_stop {
                    break;
                }
                let id = if i % 5 == 0 { "f".to_string() } else { format!("dev-{t}-{}", i % 50) };
                let started = Instant::now();
                let rsp = c.get_with(http, "/", &device(&id)).await;
                slowest.fetch_max(started.elapsed().as_millis() as usize, Ordering::Relaxed);
                if rsp.status != 200 {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let samples: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let sampler = {
        let (admin, stop, samples) = (gw.admin, stop.clone(), samples.clone());
        tokio::spawn(async move {
            let c = Client::new();
            while !stop.load(Ordering::Relaxed) && Instant::now() < hard_stop {
                let up = c.get(admin, "/api/v1/state").await.json()["store"]["up"] == true;
                samples.lock().unwrap().push((Instant::now(), up));
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    cluster.kill(victim);

    wait_store(&gw, false, Duration::from_secs(10)).await;
    // The replica takes over (node timeout 2 s, then an election).
    let deadline = Instant::now() + Duration::from_secs(20);
    let promoted = loop {
        if let Some(m) = cluster.owner_of(key).await {
            break m;
        }
        assert!(Instant::now() < deadline, "no replica took over the killed master's slots");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(promoted, victim);
    // levee follows by itself.
    wait_store(&gw, true, Duration::from_secs(15)).await;
    let up_at = Instant::now();
    let mut conn = cluster.conn(promoted).await.unwrap();
    let tat = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move { redis::cmd("GET").arg(key).query_async::<Option<u64>>(&mut conn).await.unwrap() }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let first = loop {
        assert_eq!(c.get_with(gw.http, "/", &device("f")).await.status, 200);
        if let Some(t) = tat(&mut conn).await {
            break t;
        }
        assert!(Instant::now() < deadline, "decisions never reached the new master");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for _ in 0..5 {
        assert_eq!(c.get_with(gw.http, "/", &device("f")).await.status, 200);
    }
    let later = tat(&mut conn).await.unwrap_or(0);
    assert!(later > first, "the new master decides again: tat {first} -> {later}");
    // ... and through the fast lane again, rebuilt from the new slot map.
    wait_lane_decision(gw.http, &device("f"), &mut conn, None).await;
    // Up for good: keep the load on for a while and watch store_up.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    sampler.await.unwrap();

    assert_eq!(bad.load(Ordering::Relaxed), 0, "on_failure = local: no request failed");
    let slowest = slowest.load(Ordering::Relaxed);
    assert!(slowest < 100 + 1000, "a request took {slowest} ms; the store timeout is 100 ms");
    let samples = samples.lock().unwrap();
    assert!(samples.iter().filter(|(t, _)| *t < killed_at).all(|(_, up)| *up), "up before the kill");
    assert!(samples.iter().any(|(t, up)| *t > killed_at && !up), "down while the master was gone");
    // A sample taken before `up_at` may still be in flight: allow 100 ms.
    let flaps: Vec<_> =
        samples.iter().filter(|(t, up)| *t > up_at + Duration::from_millis(100) && !up).collect();
    assert!(flaps.is_empty(), "store_up went 0 again after the failover: {} samples", flaps.len());
    println!(
        "failover: down to up in {:.1} s, slowest request {slowest} ms",
        (up_at - killed_at).as_secs_f64()
    );
}
