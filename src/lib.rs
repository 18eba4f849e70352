//! levee: a rate-limiting resilience gateway.
//!
//! # Layout
//!
//! Folders follow the path of a request:
//!
//! ```text
//! accept ─ listener/ ─────────────────────────────────────► closed: header_timeout | idle | h2_abuse
//!   └► proxy.rs      one authority, one path, body read ──► 400/408/413/431/426/308
//!     └► router.rs ───────────────────────────────────────► 404 no_route
//!       └► stack/  (outer → inner, order written once in stack/mod.rs)
//!           client_id      key, tenant, priority ──────────► 400 (client_key_fallback = reject)
//!                          (then prefetches its table entries: warm.rs)
//!           admission      concurrency, fair share ────────► 503 overloaded
//!           storm          growth, duplicates ─────────────► 429 callback_bomb | retry_storm
//!           rate_limit     all limits via store/ ──────────► 429 rate_limited | 503 store_unavailable
//!           circuit_breaker ───────────────────────────────► 503 circuit_open
//!           retry          budget, backoff ────────────────► 503 retry_budget
//!           └► upstream/   balance, outlier, forward ──────► 502 | 504
//!   ◄─ classify.rs         Outcome → breaker, outlier, retry, storm, staleness
//!   ◄─ respond.rs          Reason → status, headers, JSON
//! ```
//!
//! - `config/`: the TOML contract, raw → validated once; reload status.
//! - `gateway.rs`: assembles a runtime from a config, swaps it on reload, runs listeners.
//! - `runtime.rs`: one config version, ready to serve (router, route stacks, upstreams).
//! - `websocket.rs`: the upgrade cap and the relay of upgraded connections.
//! - `admin/`: health, readiness, metrics, config and reload.
//! - `demo/`: `levee demo`, fake backends and a simulated fleet against the gateway.
//! - `metrics.rs`: every Prometheus name, once.
//! - `body.rs`, `context.rs`: the body type (and the bounds on a client's
//!   body) and the per-request context.
//! - `path.rs`: one path, one meaning: the normalization routing and limits rely on.
//! - `classify.rs`: what an answer says about the upstream and the client, decided once.

/// Nanoseconds from `origin` to `now` (0 when `now` is earlier), saturating:
/// the clock of every table and window that keeps times as integers. Here,
/// at the root, so that the modules that keep such times (the store, the
/// stages, the upstream's windows, the context) name one function without
/// importing each other.
pub fn nanos_since(origin: tokio::time::Instant, now: tokio::time::Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
}

pub mod admin;
pub mod body;
pub mod classify;
pub mod cli;
pub mod config;
pub mod context;
pub mod demo;
pub mod gateway;
pub mod listener;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod respond;
pub mod router;
pub mod runtime;
pub mod stack;
pub mod stats;
pub mod store;
pub mod upstream;
pub mod websocket;
