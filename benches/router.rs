//! The router's match with 10 and 1,000 routes (hosts and prefixes of realistic shape).

use criterion::{BenchmarkId, Criterion, Throughput};
use levee::router::Router;
use std::hint::black_box;

fn table(n: usize) -> Router<usize> {
    Router::new((0..n).map(|i| {
        let host = (i % 10 == 0).then(|| format!("tenant{i}.example.com"));
        let prefix = format!("/v{}/service{}/resource{}", i % 3, i, i % 7);
        (host, prefix, i)
    }))
}

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("router");
    g.throughput(Throughput::Elements(1));
    for n in [10usize, 1000] {
        let r = table(n);
        let hit = format!("/v{}/service{}/resource{}/items/42", (n / 2) % 3, n / 2, (n / 2) % 7);
        g.bench_with_input(BenchmarkId::new("match_hit", n), &hit, |b, path| {
            b.iter(|| black_box(r.find(Some("api.example.com:8080"), black_box(path))))
        });
        g.bench_with_input(BenchmarkId::new("match_miss", n), &"/nothing/here/at/all", |b, path| {
            b.iter(|| black_box(r.find(Some("api.example.com"), black_box(path))))
        });
    }
    g.finish();
}
