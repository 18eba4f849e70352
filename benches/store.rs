//! The memory store: one decision with 1 and 1,000,000 tracked clients (keys
//! drawn from a Zipf distribution, s = 1), contended from 2 threads, and the
//! bytes one tracked client costs. Not measured here: making and hashing the
//! client key (counted in `client_key_made_and_hashed` and `key_derived`), and the Redis store (its round trip is in the
//! load benchmark's `redis` mode, where a real server answers).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use levee::config::units::Rate;
use levee::config::Limit;
use levee::context::ClientKey;
use levee::store::gcra::Gcra;
use levee::store::memory::MemoryStore;
use levee::store::redis::resp;
use std::hint::black_box;

const CLIENTS: usize = 1_000_000;
/// The memory store's ids of the two limits (their identities, see `limits`).
pub const IDS: [u32; 2] = [0x1001, 0x1002];

pub fn limits() -> [Gcra; 2] {
    let l = |count, per_s, burst| Limit {
        rate: Rate { count: NonZeroU32::new(count).unwrap(), per: Duration::from_secs(per_s) },
        burst: NonZeroU32::new(burst).unwrap(),
    };
    [
        Gcra::new(&l(10, 1, 20), Duration::from_nanos(1)),
        Gcra::new(&l(5000, 3600, 5000), Duration::from_nanos(1)),
    ]
}

/// `n` key indices following Zipf(s = 1) over `CLIENTS` keys, by inverse CDF.
pub fn zipf_indices(n: usize) -> Vec<usize> {
    let mut cdf = Vec::with_capacity(CLIENTS);
    let mut sum = 0.0;
    for k in 1..=CLIENTS {
        sum += 1.0 / k as f64;
        cdf.push(sum);
    }
    let mut rng = fastrand::Rng::with_seed(7);
    (0..n)
        .map(|_| {
            let u = rng.f64() * sum;
            cdf.partition_point(|&c| c < u).min(CLIENTS - 1)
        })
        .collect()
}

fn filled(store: &MemoryStore, keys: &[u64], limits: &[Gcra]) {
    for (i, &k) in keys.iter().enumerate() {
        store.check(k, limits, &IDS, 1 + i as u64);
    }
}

pub fn bench(c: &mut Criterion) {
    let limits = limits();
    let store = MemoryStore::new(CLIENTS);
    let keys: Vec<u64> = (0..CLIENTS)
        .map(|i| store.key("device-api", &ClientKey::from_text(&format!("device-{i}"))))
        .collect();

    // Memory per tracked client, from the allocator's own count.
    let before = crate::alloc::live_bytes();
    filled(&store, &keys, &limits);
    let bytes = crate::alloc::live_bytes() - before;
    println!(
        "memory store: {} clients tracked, {} bytes allocated, {:.1} bytes per client",
        store.len(),
        bytes,
        bytes as f64 / store.len() as f64
    );

    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(1));
    let one = MemoryStore::new(CLIENTS);
    let k = one.key("device-api", &ClientKey::from_text("one"));
    let mut now = 1u64;
    g.bench_function(BenchmarkId::new("decision", "1_client"), |b| {
        b.iter(|| {
            now += 1_000;
            black_box(one.check(k, &limits, &IDS, now))
        })
    });

    // The key sequence is drawn beforehand and read in order, so the harness
    // adds no cache miss of its own.
    let order: Vec<u64> = zipf_indices(1 << 20).into_iter().map(|i| keys[i]).collect();
    let mut i = 0usize;
    let mut now = CLIENTS as u64 + 1;
    g.bench_function(BenchmarkId::new("decision", "1M_clients_zipf"), |b| {
        b.iter(|| {
            i = (i + 1) & ((1 << 20) - 1);
            now += 1_000;
            black_box(store.check(order[i], &limits, &IDS, now))
        })
    });

    // The attacker's path: a client never seen before on every decision, the
    // table at its cap, so each one evicts (CLOCK) to make room.
    let mut fresh = 0u64;
    g.bench_function(BenchmarkId::new("decision", "new_client_each_at_the_1M_cap"), |b| {
        b.iter(|| {
            fresh += 1;
            now += 1_000;
            black_box(store.check(fresh.wrapping_mul(0x9E37_79B9_7F4A_7C15), &limits, &IDS, now))
        })
    });

    // A request hashes its client's key once, when the key is made; each
    // table derives its own key from that hash.
    g.bench_function("client_key_made_and_hashed", |b| {
        b.iter(|| black_box(ClientKey::from_bytes(black_box(b"device-123456"))))
    });
    let client = ClientKey::from_text("device-123456");
    g.bench_function("key_derived", |b| {
        b.iter(|| black_box(store.key(black_box("device-api"), black_box(&client))))
    });

    // Two threads on one store: the cost per decision must not collapse.
    let shared = Arc::new(store);
    let order = Arc::new(order);
    g.throughput(Throughput::Elements(2));
    // criterion times custom loops with std::time::Instant.
    #[allow(clippy::disallowed_types)]
    g.bench_function(BenchmarkId::new("decision", "1M_clients_zipf_2_threads"), |b| {
        b.iter_custom(|iters| {
            let started = std::time::Instant::now();
            let threads: Vec<_> = (0..2)
                .map(|t| {
                    let (s, order) = (shared.clone(), order.clone());
                    std::thread::spawn(move || {
                        let limits = limits;
                        for n in 0..iters as usize {
                            let key = order[(n * 2 + t) & ((1 << 20) - 1)];
                            black_box(s.check(key, &limits, &IDS, 10_000_000 + n as u64 * 1_000));
                        }
                    })
                })
                .collect();
            for th in threads {
                th.join().unwrap();
            }
            started.elapsed()
        })
    });
    g.finish();

    // The background sweep over the 1,000,000 tracked clients, none of them
    // due (the worst case: every shard is rebuilt). It yields after each of
    // the table's 64 shards, so a worker stalls for a 64th of this at most.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut g = c.benchmark_group("store_sweep");
    g.sample_size(10);
    g.bench_function("1M_clients_none_due_whole_table", |b| {
        b.iter(|| black_box(rt.block_on(shared.sweep(1))))
    });
    g.finish();

    // The Redis fast lane's share of a decision on levee's side: writing the
    // EVALSHA (2 limits) and reading its five-integer reply. The round trip
    // is the load benchmark's (`redis`, `cluster` modes).
    let mut g = c.benchmark_group("redis_lane");
    g.throughput(Throughput::Elements(1));
    let keys = levee::store::redis::RedisStore::keys(
        "device-api",
        "device-42",
        &["2/s:b4".into(), "5000/h:b5000".into()],
    );
    let sha = "ebf608a95f27400d678bc611a19d8f61b18e0e5b";
    let args = [500_000u64, 2_000_000, 720_000, 3_600_000_000];
    let mut out = Vec::with_capacity(256);
    g.bench_function("write_evalsha_2_limits", |b| {
        b.iter(|| {
            out.clear();
            resp::evalsha(&mut out, sha, black_box(&keys), &args);
            black_box(out.len())
        })
    });
    let reply = b"*5\r\n:1\r\n:0\r\n:1\r\n:3\r\n:1500000\r\n";
    g.bench_function("read_decision_reply", |b| b.iter(|| black_box(resp::parse(black_box(reply)))));
    g.finish();
}
