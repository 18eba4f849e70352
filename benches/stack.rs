//! The whole per-route stack in-process, against a no-op innermost service:
//! client id, auth guard, admission, storm, two limits, breaker and retry, for
//! 10,000 rotating clients whose limits are never reached. Not measured: the
//! listener, routing, hyper's parsing and the upstream's I/O (the load
//! benchmark has those); `block_on` adds a little per request.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, Throughput};
use http::{Request, Response};
use levee::body::{self, Body};
use levee::context::{Exchange, RequestContext, Scheme};
use levee::respond::Shed;
use levee::stack::{self, Innermost, Next, RouteState};
use levee::store::Store;
use levee::upstream::Upstream;

use crate::threads::two_threads;

const CONFIG: &str = r#"
[upstreams.backend]
endpoints = ["127.0.0.1:9"]

[[routes]]
name = "device-api"
path_prefix = "/v1/device"
upstream = "backend"
client_key = "header:x-device-id"

[[routes.limits]]
rate = "1000/s"
[[routes.limits]]
rate = "100000/h"
"#;

/// The route of `config` built on a no-op upstream.
fn route_stack(config: &str) -> impl Next + 'static {
    let config = levee::config::parse(config, Path::new("."), &|_| None).unwrap();
    let route = &config.routes[0];
    let store = Store::start(config.store.clone());
    let state =
        RouteState::build(route, config.store.kind, config.store.max_clients, None, &Default::default());
    let upstream = Arc::new(Upstream::new(config.upstreams[0].clone()));
    // As `Upstream::forward` does, the no-op upstream reads the clock when
    // it answers and leaves the time for the stages on the way back.
    let noop = Innermost(|_: Request<Body>, cx: &RequestContext| {
        cx.exchange.answered_at(tokio::time::Instant::now());
        std::future::ready(Ok::<_, Shed>(Response::new(body::empty())))
    });
    stack::build_on(route, upstream, &state, store, noop)
}

/// The context of a request arriving now (a bodiless one: whole at once):
/// `proxy.rs` reads the clock for every request, and the storm detector and
/// the limits decide at that time.
fn arriving(ctx: &RequestContext) -> RequestContext {
    let now = tokio::time::Instant::now();
    RequestContext { started: now, whole: now, exchange: Arc::new(Exchange::new(now)), ..ctx.clone() }
}

/// Thread `t` of [`two_threads`] serves `routes[t]` on a runtime of its own,
/// each thread taking every other client of `ids`.
fn serve<'a, S: Next>(
    routes: [&'a S; 2],
    ids: &'a [http::HeaderValue],
    ctx: &'a RequestContext,
) -> impl Fn(usize, u64) + Sync + 'a {
    move |t, iters| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for n in 0..iters as usize {
            let mut req = Request::get("/v1/device/status").body(body::empty()).unwrap();
            req.headers_mut().insert("x-device-id", ids[(n * 2 + t) % ids.len()].clone());
            let rsp = rt.block_on(routes[t].run(req, &arriving(ctx)));
            black_box(rsp.map(|r| r.status()).ok());
        }
    }
}

/// A request's context as `proxy.rs` makes it, for [`arriving`] to stamp.
fn context() -> RequestContext {
    RequestContext {
        peer: "10.0.0.1:5555".parse().unwrap(),
        peer_header: http::HeaderValue::from_static("10.0.0.1"),
        client_ip: "10.0.0.1".parse().unwrap(),
        peer_trusted: false,
        scheme: Scheme::Http,
        request_id: http::HeaderValue::from_static("bench"),
        route: Arc::from("device-api"),
        started: tokio::time::Instant::now(),
        whole: tokio::time::Instant::now(),
        exchange: Arc::new(Exchange::new(tokio::time::Instant::now())),
        body_buffered: true,
        upgrade: false,
        grpc: false,
        identity: Default::default(),
    }
}

pub fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _enter = rt.enter();
    let svc = route_stack(CONFIG);
    // The control for the two-thread run: a second route with state of its
    // own (its own store, upstream and metric series).
    let other = route_stack(&CONFIG.replace("device-api", "device-api-other"));
    let ids: Vec<http::HeaderValue> = (0..10_000).map(|i| format!("device-{i}").parse().unwrap()).collect();
    let ctx = context();

    let mut g = c.benchmark_group("stack");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("full_route_stack_noop_upstream", |b| {
        b.iter(|| {
            i = (i + 1) % ids.len();
            let mut req = Request::get("/v1/device/status").body(body::empty()).unwrap();
            req.headers_mut().insert("x-device-id", ids[i].clone());
            let rsp = rt.block_on(svc.run(req, &arriving(&ctx)));
            black_box(rsp.map(|r| r.status()).ok())
        })
    });
    // The same stack from two threads at once (as two workers serve one
    // route), each on its own runtime and half of the clients: what the
    // stages' shared state (the route's counters, the upstream's, the
    // metrics) costs when two cores write it. Per pair of requests.
    g.throughput(Throughput::Elements(2));
    g.bench_function("full_route_stack_noop_upstream_2_threads", |b| {
        b.iter_custom(|iters| two_threads(iters, serve([&svc, &svc], &ids, &ctx)))
    });
    // The control: two threads, each on a route of its own, sharing nothing
    // the stages write but the process (allocator, metrics registry). The
    // gap between this and the run above is what one route's shared state
    // costs; the gap between this and one thread is the machine's.
    g.bench_function("full_route_stack_noop_upstream_2_threads_2_routes", |b| {
        b.iter_custom(|iters| two_threads(iters, serve([&svc, &other], &ids, &ctx)))
    });
    g.finish();
}

/// [`CONFIG`]'s route for [`per_client`], named apart: with every
/// per-client stage (two limits, the storm detector and the auth guard, as
/// shipped), or, the control, with none of them (its client-id stage still
/// finds the client). The limits and the storm's threshold are out of any
/// client's reach: Criterion's samples grow, and with them each Zipf client's
/// rate; the detector still counts every request, as it does for a client
/// under `min_rate`.
fn per_client_config(stages: bool) -> String {
    let route = CONFIG.replace("device-api", "device-api-1m");
    if stages {
        let route = route.replace("\"1000/s\"", "\"1000000/s\"").replace("\"100000/h\"", "\"100000000/h\"");
        format!("[store]\nmax_clients = 2000000\n{route}\n[routes.storm]\nmin_rate = \"1000000/s\"\n")
    } else {
        let unlimited = route.split("[[routes.limits]]").next().unwrap_or_default();
        format!("{unlimited}\n[routes.storm]\nenabled = false\n[routes.auth_guard]\nenabled = false\n")
    }
}

/// What all per-client stages cost a request at 1,000,000 tracked clients
/// (Zipf keys), measured where they run: the whole route stack with them,
/// against the same stack without them, on the same requests. The
/// difference is their cost, with the client's entries prefetched as far
/// ahead of the first stage that reads them as on the request path (the
/// client-id stage, then the guard and admission, come between). The storm
/// bench (`storm/all_per_client_stages`) times the stages alone, with the
/// prefetch right before them: an upper bound, the miss nearly whole.
pub fn per_client(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _enter = rt.enter();
    const CLIENTS: usize = 1_000_000;
    let ids: Vec<http::HeaderValue> = (0..CLIENTS).map(|i| format!("device-{i}").parse().unwrap()).collect();
    let order = crate::store::zipf_indices(1 << 20);
    let ctx = context();
    let request = |id: &http::HeaderValue| {
        let mut req = Request::get("/v1/device/status").body(body::empty()).unwrap();
        req.headers_mut().insert("x-device-id", id.clone());
        req
    };
    let mut g = c.benchmark_group("stack");
    g.throughput(Throughput::Elements(1));
    for (name, stages) in [("no_per_client_stages", false), ("all_per_client_stages", true)] {
        let svc = route_stack(&per_client_config(stages));
        // Every client once first: the tables hold a million entries.
        for id in &ids {
            let rsp = rt.block_on(svc.run(request(id), &arriving(&ctx)));
            assert_eq!(rsp.map(|r| r.status().as_u16()).ok(), Some(200), "{name}: a client was refused");
        }
        let (mut i, mut refused) = (0usize, 0u64);
        g.bench_function(format!("{name}_1M_clients_zipf"), |b| {
            b.iter(|| {
                i = (i + 1) & ((1 << 20) - 1);
                let rsp = rt.block_on(svc.run(request(&ids[order[i]]), &arriving(&ctx)));
                let ok = matches!(&rsp, Ok(r) if r.status() == 200);
                refused += u64::from(!ok);
                black_box(ok)
            })
        });
        // Both stacks pass every request: the difference is the stages' work, not a refusal's.
        assert_eq!(refused, 0, "{name}: requests refused during the run");
        drop(svc);
    }
    g.finish();
}
