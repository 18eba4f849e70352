//! Hostile input: the store. Limiter state must belong to a limit, not to its
//! position (a reload that swaps two limits must not turn hourly state into
//! per-second state), and `store.max_clients` must bound the whole node's
//! per-client state however many routes keep some.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::redis::Redis;
use crate::support::{base_config, upstream_and_route, Backend, Client, TestGateway};

const PER_SECOND: &str = "[[routes.limits]]\nrate = \"2/s\"\nburst = 2\n";
const HOURLY: &str = "[[routes.limits]]\nrate = \"100/h\"\nburst = 100\n";

/// One route `route` keyed on `x-device-id`, with `limits` in that order.
fn limited(backend: std::net::SocketAddr, route: &str, limits: &[&str], store: &str) -> String {
    base_config()
        + &upstream_and_route(&format!("{route}-b"), &[backend], route, "/")
            .replace("upstream = \"", "client_key = \"header:x-device-id\"\nupstream = \"")
        + &limits.concat()
        + "[routes.storm]\nenabled = false\n"
        + store
}

/// The reload: `2/s` and `100/h` swapped after the client spent its
/// per-second burst. Before the fix the swapped reload read the per-second
/// state as hourly state (and the other way round): a client that had waited
/// 2.5 s was refused with `Retry-After: 69`.
async fn a_reorder_reload_keeps_each_limits_state(route: &str, store: &str, redis: Option<&Redis>) {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&limited(backend.addr, route, &[PER_SECOND, HOURLY], store)).await;
    if redis.is_some() {
        wait_store_up(&gw).await;
    }
    let c = Client::new();
    let device = [("x-device-id", "reorder")];
    assert_eq!(c.get_with(gw.http, "/", &device).await.status, 200);
    assert_eq!(c.get_with(gw.http, "/", &device).await.status, 200);
    let refused = c.get_with(gw.http, "/", &device).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.retry_after(), Some(1), "the per-second limit refused");

    gw.write_config(&limited(backend.addr, route, &[HOURLY, PER_SECOND], store));
    let rsp = gw.reload().await;
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(rsp.json()["result"], "applied");

    // The per-second bucket refills within a second; the hourly one must not
    // be consulted as if it were per-second state.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rsp = c.get_with(gw.http, "/", &device).await;
        if rsp.status == 200 {
            break;
        }
        assert_eq!(rsp.status, 429, "{}", rsp.text());
        assert!(
            rsp.retry_after().is_some_and(|s| s <= 1),
            "refused with Retry-After {:?}: hourly state read as per-second state",
            rsp.retry_after()
        );
        assert!(Instant::now() < deadline, "the per-second limit never refilled after the reorder");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The hourly state was kept: 3 of its 100 spent, not a fresh bucket.
    let state = c.get(gw.admin, &format!("/api/v1/clients/reorder?route={route}")).await;
    assert_eq!(state.status, 200, "{}", state.text());
    let json = state.json();
    let limits = json["routes"][0]["limits"].as_array().expect("limits").clone();
    let hourly = limits.iter().find(|l| l["rate"] == "100/h").expect("the hourly limit's state");
    assert_eq!(hourly["remaining"], 97, "{json}");
    let second = limits.iter().find(|l| l["rate"] == "2/s").expect("the per-second limit's state");
    assert!(second["remaining"].as_u64().unwrap() <= 1, "{json}");

    if let Some(redis) = redis {
        // In Redis too each limit's key names the limit, not its position.
        let mut conn = redis_conn(redis).await;
        let key = format!("levee:{{{route}:reorder}}:100/h:b100");
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
        assert!(ttl > 100_000, "{key} holds the hourly state (PTTL {ttl} ms)");
    }
}

#[tokio::test]
async fn a_reorder_reload_keeps_each_limits_state_in_memory() {
    a_reorder_reload_keeps_each_limits_state("reorder-mem", "", None).await;
}

#[tokio::test]
async fn a_reorder_reload_keeps_each_limits_state_in_redis() {
    let redis = Redis::spawn().await;
    let store = format!("\n[store]\nkind = \"redis\"\nurl = \"{}\"\non_failure = \"deny\"\n", redis.url());
    a_reorder_reload_keeps_each_limits_state("reorder-redis", &store, Some(&redis)).await;
}

async fn redis_conn(redis: &Redis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn wait_store_up(gw: &TestGateway) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Client::new().get(gw.admin, "/api/v1/state").await.json()["store"]["up"] != true {
        assert!(Instant::now() < deadline, "the Redis store never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stored TAT far beyond `now + capacity` (a failover to a server whose clock
/// is behind) owes the client at most its burst, not the distance.
#[tokio::test]
async fn redis_caps_a_far_future_tat_at_the_limits_capacity() {
    let redis = Redis::spawn().await;
    let backend = Backend::start().await;
    let store = format!("\n[store]\nkind = \"redis\"\nurl = \"{}\"\non_failure = \"deny\"\n", redis.url());
    let gw = TestGateway::start(&limited(backend.addr, "tatcap", &[PER_SECOND], &store)).await;
    wait_store_up(&gw).await;
    let mut conn = redis_conn(&redis).await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let an_hour_ahead = secs * 1_000_000 + micros + 3_600_000_000;
    let key = "levee:{tatcap:skewed}:2/s:b2";
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(an_hour_ahead)
        .arg("PX")
        .arg(3_600_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let c = Client::new();
    let device = [("x-device-id", "skewed")];
    let refused = c.get_with(gw.http, "/", &device).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.retry_after(), Some(1), "owed one interval, not an hour");
    let ttl: i64 = redis::cmd("PTTL").arg(key).query_async(&mut conn).await.unwrap();
    assert!(ttl <= 1000, "the capped TAT is stored (PTTL {ttl} ms)");
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.get_with(gw.http, "/", &device).await.status != 200 {
        assert!(Instant::now() < deadline, "the client stayed refused past its capacity");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Six routes with storm detection and the auth guard, 20,000 distinct
/// clients, `max_clients = 1000`: every per-client entry of the node together
/// (limiter, storm, guard) stays within 1000. Before, each route's three maps
/// and the limiter were capped at 1000 each: 19,000 entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_bounds_the_whole_node_over_six_routes_with_storm_and_guard() {
    let backend = Backend::start().await;
    let mut toml = base_config() + "\n[store]\nmax_clients = 1000\n";
    for r in 0..6 {
        toml += &upstream_and_route(
            &format!("budget-b{r}"),
            &[backend.addr],
            &format!("budget-{r}"),
            &format!("/r{r}/"),
        )
        .replace("upstream = \"", "client_key = \"header:x-device-id\"\nupstream = \"");
        toml += "[[routes.limits]]\nrate = \"100/s\"\nburst = 100\n";
        toml += "[routes.storm]\nenabled = true\n[routes.auth_guard]\nenabled = true\n";
    }
    let gw = TestGateway::start(&toml).await;
    let clients = 20_000usize;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let http = gw.http;
        tasks.push(tokio::spawn(async move {
            let c = Client::new();
            for i in (t..clients).step_by(8) {
                let id = format!("budget-client-{i}");
                let rsp = c.get_with(http, &format!("/r{}/x", i % 6), &[("x-device-id", &id)]).await;
                assert_eq!(rsp.status, 200, "{}", rsp.text());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let state = Client::new().get(gw.admin, "/api/v1/state").await.json();
    let tracked = state["store"]["tracked_clients"].as_u64().unwrap();
    assert!(tracked <= 1000, "{tracked} per-client entries with max_clients = 1000");
    // The budget is shared, not starved. Twelve shares of 83: each route's
    // client table (its clients' buckets, growth and last 2xx in one entry)
    // and its storm detector's request table, which finished requests leave
    // empty. The six client tables fill theirs: 498.
    let filled = 6 * (1000 / 12);
    assert!(tracked >= filled * 9 / 10, "only {tracked} entries: the client tables do not use their shares");
}
