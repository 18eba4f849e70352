//! The storm detector and the auth guard on the request path with 1,000,000
//! tracked clients (Zipf keys), then every per-client stage of a route
//! together (two limits, storm, guard: the "all per-client stages",
//! the limits' buckets in the same entry as on a route on the memory store),
//! and the memory they cost per client. Not measured: reading a small body
//! for the fingerprint (the bench hashes method, path and query only).
//!
//! The clients' keys are drawn beforehand and read in order, as a request
//! holds its key (made and hashed once by the client-id stage, see
//! `store::client_key_made_and_hashed`): fetching it from a table of a million
//! keys would add cache misses no request has.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use http::{Method, StatusCode, Uri};
use levee::config::units::Rate;
use levee::config::{AuthGuardConfig, Mode, StormConfig};
use levee::context::ClientKey;
use levee::stack::auth_guard::AuthGuard;
use levee::stack::clients::{Authorized, RouteClients};
use levee::stack::storm::Storm;
use levee::store::gcra::Gcra;
use levee::store::memory::Adopt;
use levee::store::ClientBuckets;
use tokio::time::Instant;

use crate::threads::two_threads;

const CLIENTS: usize = 1_000_000;

fn storm_config() -> StormConfig {
    StormConfig {
        enabled: true,
        mode: Mode::Enforce,
        interval: Duration::from_secs(1),
        growth_factor: 2.0,
        growth_intervals: 3,
        min_rate: "5/s".parse::<Rate>().unwrap(),
        duplicate_window: Duration::from_secs(2),
        max_duplicates: 3,
        quarantine: Duration::from_secs(60),
    }
}

fn guard_config() -> AuthGuardConfig {
    AuthGuardConfig {
        enabled: true,
        mode: Mode::Enforce,
        window: Duration::from_secs(10),
        min_responses: 50,
        max_401_ratio: 0.3,
        recently_authorized: Duration::from_secs(600),
    }
}

/// The auth guard's shared part, its route-wide window of responses, from one
/// thread and from two at once (every worker of a route writes it on every
/// response): 10,000 clients, whose entries stay in the cache, so what is
/// timed is the window, not the client table's misses.
pub fn guard_threads(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _enter = rt.enter();
    let clients: Vec<ClientKey> = (0..10_000).map(|i| ClientKey::from_text(&format!("device-{i}"))).collect();
    let guard = AuthGuard::new("bench-guard", &guard_config(), RouteClients::new(CLIENTS));
    let now = Instant::now();
    let mut g = c.benchmark_group("auth_guard");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function(BenchmarkId::new("observe", "1_thread"), |b| {
        b.iter(|| {
            i = (i + 1) % clients.len();
            black_box(guard.observe(&clients[i], StatusCode::OK, now))
        })
    });
    g.throughput(Throughput::Elements(2));
    g.bench_function(BenchmarkId::new("observe", "2_threads_one_route"), |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |t, iters| {
                for n in 0..iters as usize {
                    let client = &clients[(n * 2 + t) % clients.len()];
                    black_box(guard.observe(client, StatusCode::OK, now));
                }
            })
        })
    });
    g.finish();

    // The storm detector the same way: every request of a route counts in
    // the route's aggregate rate (its own client's entry is per client).
    let storm = Storm::start("bench-storm-threads", &storm_config(), RouteClients::new(CLIENTS), CLIENTS);
    let uri: Uri = "/v1/device/status".parse().unwrap();
    let mut g = c.benchmark_group("storm_threads");
    g.throughput(Throughput::Elements(1));
    g.bench_function(BenchmarkId::new("observe_and_finish", "1_thread"), |b| {
        b.iter(|| {
            i = (i + 1) % clients.len();
            let fp = storm.fingerprint(&clients[i], &Method::GET, &uri, None);
            let verdict = storm.observe(&clients[i], fp, now).is_ok();
            storm.finish(fp, false);
            black_box(verdict)
        })
    });
    g.throughput(Throughput::Elements(2));
    g.bench_function(BenchmarkId::new("observe_and_finish", "2_threads_one_route"), |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |t, iters| {
                for n in 0..iters as usize {
                    let client = &clients[(n * 2 + t) % clients.len()];
                    let fp = storm.fingerprint(client, &Method::GET, &uri, None);
                    black_box(storm.observe(client, fp, now).is_ok());
                    storm.finish(fp, false);
                }
            })
        })
    });
    g.finish();
}

pub fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _enter = rt.enter();
    let clients: Vec<ClientKey> =
        (0..CLIENTS).map(|i| ClientKey::from_text(&format!("device-{i}"))).collect();
    let uri: Uri = "/v1/device/status?x=1".parse().unwrap();

    let before = crate::alloc::live_bytes();
    // One table for all, as a route on the memory store with at most two
    // limits has (`stack/clients.rs`): one entry per client.
    let table = RouteClients::new(CLIENTS);
    let storm = Storm::start("bench", &storm_config(), table.clone(), CLIENTS);
    let guard = AuthGuard::new("bench", &guard_config(), table.clone());
    let limits = crate::store::limits();
    let now = Instant::now();
    for client in &clients {
        table.decide(client, &limits, &crate::store::IDS, now, Adopt::Never);
        let fp = storm.fingerprint(client, &Method::GET, &uri, None);
        let _ = storm.observe(client, fp, now);
        storm.finish(fp, false);
        guard.observe(client, StatusCode::OK, now);
    }
    let bytes = crate::alloc::live_bytes() - before;
    println!(
        "all per-client stages (2 limits, storm, guard) in one entry per client: {CLIENTS} clients, {bytes} bytes allocated, {:.1} bytes per client",
        bytes as f64 / CLIENTS as f64
    );
    let zipf = crate::store::zipf_indices(1 << 20);
    let order: Vec<ClientKey> = zipf.iter().map(|&i| clients[i].clone()).collect();
    // The same stages on the 1,000 hottest of the same million entries,
    // which stay in the cache: what the stages cost without the memory
    // stall, which is the rest of the 1M figure.
    let cached: Vec<ClientKey> = zipf.iter().map(|&i| clients[i % 1000].clone()).collect();
    drop((clients, zipf));
    // One request through the route's per-client stages, in the stack's
    // order (`stack::compose`): the storm detector, then the limits (if
    // any); on the way back the detector, then the guard.
    // The time as the stages see it. They read no clock: the storm detector
    // and the limits decide when the request was whole, which `proxy.rs`
    // reads for every request, limited or not, before the client is known
    // (`RequestContext::whole`); the guard takes the time of the upstream's
    // answer, which the upstream reads for its histogram
    // (`context::Exchange`). Neither read is the per-client stages' cost, so
    // the bench reads the clock once every 64 requests, for a time that moves.
    let mut now = Instant::now();
    let mut request = |n: usize, client: &ClientKey, limits: Option<&[Gcra; 2]>| {
        if n % 64 == 0 {
            now = Instant::now();
        }
        // As the request path does (`stack::warm`): every table's slot is
        // asked for as soon as the client is known.
        table.prefetch(client);
        let fp = storm.fingerprint(client, &Method::GET, &uri, None);
        let seen = storm.observe(client, fp, now);
        let limited = limits.map(|l| table.decide(client, l, &crate::store::IDS, now, Adopt::Never));
        storm.finish(fp, false);
        // What the detector saw of the guard's record, as the request's
        // exchange carries it to the guard.
        let seen = seen.unwrap_or(Authorized::UNKNOWN);
        (limited, seen, guard.observe_seen(client, StatusCode::OK, now, seen))
    };
    let mut g = c.benchmark_group("storm");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function(BenchmarkId::new("storm_and_guard", "1M_clients_zipf"), |b| {
        b.iter(|| {
            i = (i + 1) & ((1 << 20) - 1);
            black_box(request(i, &order[i], None))
        })
    });
    for (name, order) in [("1M_clients_zipf", &order), ("1k_clients_in_cache", &cached)] {
        g.bench_function(BenchmarkId::new("all_per_client_stages", name), |b| {
            b.iter(|| {
                i = (i + 1) & ((1 << 20) - 1);
                black_box(request(i, &order[i], Some(&limits)))
            })
        });
    }
    g.finish();
}
