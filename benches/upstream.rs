//! The per-request cost of protecting an upstream in its healthy state: the
//! circuit breaker (closed), outlier detection (nothing ejected), the retry
//! budget's deposit and admission's permit, each alone and all together in
//! the order a request pays them.
//!
//! Not measured: the tower plumbing around them (boxed futures, `Guarded`
//! bodies), the retry stage's buffering and copying of retryable requests,
//! and contention between cores (one thread runs each bench).

use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use levee::config::Priority;
use levee::stack::client_id::ClientKey;
use levee::upstream::Upstream;
use tokio::time::Instant;

fn upstream() -> Arc<Upstream> {
    let toml = r#"
[upstreams.bench]
endpoints = ["127.0.0.1:1", "127.0.0.1:2"]

[[routes]]
name = "bench"
upstream = "bench"
"#;
    let config = levee::config::parse(toml, Path::new("."), &|_| None).expect("bench config");
    let u = config.upstreams.into_iter().next().expect("one upstream");
    Arc::new(Upstream::new(u))
}

fn healthy(c: &mut Criterion) {
    let u = upstream();
    let tenant = ClientKey::from_bytes(b"tenant-1");
    let mut g = c.benchmark_group("upstream_protection");
    g.throughput(Throughput::Elements(1));

    // The stages pass the request's arrival (read by the listener anyway) to
    // `admit` and `deposit`; the breaker reads the clock once, to record.
    let arrived = Instant::now();
    g.bench_function("breaker_closed_admit_record", |b| {
        b.iter(|| {
            let t = u.breaker.admit(arrived).expect("closed");
            u.breaker.record(t, false, Instant::now());
        })
    });
    g.bench_function("outlier_pick_check_record", |b| {
        b.iter(|| {
            assert!(!u.outlier.any_ejected());
            u.outlier.record(0, false, arrived);
        })
    });
    g.bench_function("budget_deposit", |b| b.iter(|| u.budget.deposit(arrived)));
    for (name, tenant) in [("none", None), ("one", Some(&tenant))] {
        g.bench_with_input(BenchmarkId::new("admission_acquire_release", name), &tenant, |b, tenant| {
            b.iter(|| drop(u.concurrency.acquire(Priority::Normal, *tenant).expect("admitted")))
        });
    }
    // What one healthy request pays, in the order the stack and the upstream pay it.
    for (name, tenant) in [("none", None), ("one", Some(&tenant))] {
        g.bench_with_input(BenchmarkId::new("all_per_request", name), &tenant, |b, tenant| {
            b.iter(|| {
                let permit = u.concurrency.acquire(Priority::Normal, *tenant).expect("admitted");
                // Both take the request's arrival, which the listener read anyway.
                let ticket = u.breaker.admit(arrived).expect("closed");
                u.budget.deposit(arrived);
                assert!(!u.outlier.any_ejected());
                // The upstream reads the clock after each try anyway (its latency histogram).
                u.outlier.record(0, false, arrived);
                u.breaker.record(ticket, false, Instant::now());
                drop(permit);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, healthy);
