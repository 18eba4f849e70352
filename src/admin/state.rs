//! `GET /api/v1/state` (a JSON snapshot) and `GET /api/v1/events` (Server-Sent
//! Events: the snapshot every second, and the shed decisions sampled since the
//! last one). Counters are cumulative; consumers difference them for rates.
//!
//! A slow event consumer is dropped, never buffered: each stream has a queue of
//! [`QUEUE`] messages, and a message that does not fit ends the stream.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::Response;
use http_body::Frame;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::AdminContext;
use crate::body::{self, Body, BoxError};
use crate::config::Mode;
use crate::metrics::unix_now;

/// Messages an event stream may have queued before it is dropped.
const QUEUE: usize = 8;

/// The whole snapshot.
pub fn snapshot(ctx: &AdminContext) -> serde_json::Value {
    let registry = ctx.registry.load();
    let now = unix_now();
    let routes: Vec<_> = registry
        .routes
        .iter()
        .zip(&registry.configs)
        .map(|(state, config)| {
            let stats = &state.stats;
            let (bombs, storms) = state.storm.as_ref().map(|s| s.quarantined()).unwrap_or_default();
            json!({
                "name": &*state.name,
                "upstream": registry.upstreams.get(config.upstream).map(|u| u.name().to_string()),
                "priority": format!("{:?}", config.priority).to_lowercase(),
                "requests": {
                    "forwarded": stats.forwarded.load(Ordering::Relaxed),
                    "shed": stats.shed.load(Ordering::Relaxed),
                    "error": stats.error.load(Ordering::Relaxed),
                    // Would have been shed by a defence in shadow mode (and were forwarded).
                    "shadow": stats.shadow.load(Ordering::Relaxed),
                },
                "shed_by_reason": stats.shed_by_reason(),
                "shadow_by_reason": stats.shadow_by_reason(),
                // Some defence of the route is in `mode = "shadow"`.
                "shadow_mode": config.limit_modes.contains(&Mode::Shadow)
                    || (config.storm.enabled && config.storm.mode == Mode::Shadow)
                    || (config.auth_guard.enabled && config.auth_guard.mode == Mode::Shadow),
                "last_success": stats.last_success(),
                "expect_traffic_within_s": config.expect_traffic_within.map(|d| d.as_secs_f64()),
                "stale": stats.stale.load(Ordering::Relaxed),
                "storm": {
                    "enabled": state.storm.is_some(),
                    "alarm": state.storm.as_ref().is_some_and(|s| s.alarming()),
                    "quarantined": {"callback_bomb": bombs, "retry_storm": storms},
                },
                "auth_guard": {
                    "enabled": state.guard.is_some(),
                    "tripped": state.guard.as_ref().is_some_and(|g| g.tripped()),
                },
                "top_offenders": stats.offenders(),
            })
        })
        .collect();
    let upstreams: Vec<_> = registry
        .upstreams
        .iter()
        .map(|u| {
            let endpoints: Vec<_> = u
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    json!({
                        "address": e.authority.to_string(),
                        "ejected": u.outlier.is_ejected(i),
                        "in_flight": e.in_flight.load(Ordering::Relaxed),
                    })
                })
                .collect();
            json!({
                "name": u.name(),
                "circuit": u.breaker.state().as_str(),
                "in_flight": u.concurrency.in_flight(),
                "max_concurrency": u.config.max_concurrency,
                "endpoints": endpoints,
            })
        })
        .collect();
    let cert_now = crate::listener::certs::unix_now();
    let certificates: Vec<_> = ctx
        .certs
        .load()
        .iter()
        .map(|c| {
            json!({
                "subject": c.subject,
                "position": c.position,
                "not_after": c.not_after,
                "days_left": c.days_left(cert_now),
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "now": now,
        "uptime_s": now - ctx.started,
        "config": ctx.status.info(),
        "store": {
            "kind": format!("{:?}", registry.store.kind()).to_lowercase(),
            "up": registry.store.is_up(),
            "tracked_clients": registry.store.tracked(),
        },
        "routes": routes,
        "upstreams": upstreams,
        "certificates": certificates,
    })
}

/// The SSE stream: a producer task feeds a bounded queue that the body drains.
pub fn events(ctx: Arc<AdminContext>) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(Instant::now(), Duration::from_secs(1));
        let mut last_seq = 0;
        loop {
            tick.tick().await;
            let mut message = format!("event: state\ndata: {}\n\n", snapshot(&ctx));
            for event in ctx.samples.since(last_seq) {
                last_seq = event.seq;
                if let Ok(data) = serde_json::to_string(&event) {
                    message.push_str(&format!("event: shed\ndata: {data}\n\n"));
                }
            }
            // Full: the consumer is not reading; drop it rather than buffer.
            if tx.try_send(Bytes::from(message)).is_err() {
                return;
            }
        }
    });
    let mut rsp = Response::new(body::boxed(Sse(rx)));
    let h = rsp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    rsp
}

struct Sse(mpsc::Receiver<Bytes>);

impl http_body::Body for Sse {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}
