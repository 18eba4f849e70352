//! The admin listener: health, readiness, metrics, config and reload.
//!
//! It gets small handles from the gateway at start-up (the metrics handle, the
//! config status, a reload handle, the readiness flag) and never imports the
//! gateway itself.
//!
//! Every request passes [`guard`] before a handler runs: the `Host` check, the
//! `Origin` check on mutating calls, and the token. With `admin.token` set,
//! every call but `/healthz`, `/readyz`, `/metrics` and the dashboard's static
//! files needs `Authorization: Bearer <token>` (the state, events and client
//! endpoints show client keys); without one, mutating calls are accepted from
//! loopback only. The event stream takes the token in the same header: the
//! dashboard reads it with a streaming `fetch`, not `EventSource`, so a token
//! never travels in a URL (where proxies' and browsers' histories keep it).
//! Every admin response forbids framing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::body::{self, Body};
use crate::config::reload::{ConfigStatus, ReloadHandle};
use crate::listener::certs::{self, CertInfo};
use crate::listener::{ConnInfo, ConnLimits, Handler};
use crate::stack::Registry;
use crate::stats::ShedSamples;

mod clients;
mod dashboard;
mod guard;
mod state;

/// What the admin API reads and triggers; handed over by the gateway.
pub struct AdminContext {
    pub metrics: PrometheusHandle,
    pub status: Arc<ConfigStatus>,
    pub reload: ReloadHandle,
    pub ready: Arc<AtomicBool>,
    /// The live store, routes and upstreams.
    pub registry: Arc<ArcSwap<Registry>>,
    /// Recent shed decisions, for the event stream.
    pub samples: Arc<ShedSamples>,
    /// Unix seconds at start-up.
    pub started: f64,
    /// The served chain's certificates (empty without TLS), for `/readyz`.
    pub certs: Arc<ArcSwap<Vec<CertInfo>>>,
    /// `admin.hosts`, lowercased: the names answered besides IP literals and
    /// `localhost` (read at start-up, like `admin.listen`).
    pub hosts: Vec<String>,
}

pub struct Admin {
    ctx: Arc<AdminContext>,
}

impl Admin {
    pub fn new(ctx: AdminContext) -> Self {
        Admin { ctx: Arc::new(ctx) }
    }

    async fn serve(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let mut rsp = match self.admit(&req, conn) {
            Ok(()) => self.route(req).await,
            Err(refusal) => *refusal,
        };
        forbid_framing(rsp.headers_mut());
        rsp
    }

    /// The admin rules, before any handler: Host, then Origin on mutating calls,
    /// then the token (or, without one, loopback only for mutating calls).
    fn admit<B>(&self, req: &Request<B>, conn: ConnInfo) -> Result<(), guard::Refusal> {
        let target = guard::host(req, &self.ctx.hosts)?;
        let mutating = guard::mutating(req.method());
        if mutating {
            guard::same_origin(req.headers(), &target)?;
        }
        match self.ctx.status.admin_token() {
            Some(_) if public(req.method(), req.uri().path()) => Ok(()),
            Some(token) => guard::bearer(req.headers(), &token),
            None if mutating && !conn.peer.ip().is_loopback() => Err(Box::new(json_response(
                StatusCode::FORBIDDEN,
                json!({"error": "forbidden", "detail": "admin.token is empty: mutating calls are accepted from loopback only"}),
            ))),
            None => Ok(()),
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, json!({"status": "ok"})),
            (&Method::GET, "/readyz") => self.readyz(),
            (&Method::GET, "/metrics") => {
                let mut rsp = Response::new(body::full(crate::metrics::render(&self.ctx.metrics)));
                rsp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
                rsp
            }
            (&Method::GET, "/api/v1/config") => json_response(StatusCode::OK, json!(self.ctx.status.info())),
            (&Method::GET, p) if p.starts_with("/dashboard") => dashboard::asset(p).unwrap_or_else(|| {
                json_response(StatusCode::NOT_FOUND, json!({"error": "not_found", "path": path}))
            }),
            (&Method::GET, "/api/v1/state") => json_response(StatusCode::OK, state::snapshot(&self.ctx)),
            (&Method::GET, "/api/v1/events") => state::events(self.ctx.clone()),
            (&Method::POST, "/api/v1/reload") => match self.ctx.reload.reload().await {
                Ok(hash) => json_response(StatusCode::OK, json!({"result": "applied", "hash": hash})),
                Err(error) => json_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"result": "rejected", "error": error}),
                ),
            },
            (&Method::GET, p) if p.starts_with(clients::PREFIX) => match clients::parse(p, req.uri().query())
            {
                Some((key, route)) => clients::get(&self.ctx.registry, &key, route.as_deref()).await,
                None => json_response(StatusCode::NOT_FOUND, json!({"error": "not_found", "path": path})),
            },
            (&Method::DELETE, p) if p.starts_with(clients::PREFIX) => {
                match clients::parse(p, req.uri().query()) {
                    Some((key, route)) => clients::delete(&self.ctx.registry, &key, route.as_deref()).await,
                    None => json_response(StatusCode::NOT_FOUND, json!({"error": "not_found", "path": path})),
                }
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/api/v1/config" | "/api/v1/reload") => {
                json_response(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "method_not_allowed"}))
            }
            _ => json_response(StatusCode::NOT_FOUND, json!({"error": "not_found", "path": path})),
        }
    }

    fn readyz(&self) -> Response<Body> {
        let ready = self.ctx.ready.load(Ordering::Relaxed);
        let mut degraded: Vec<serde_json::Value> = Vec::new();
        let registry = self.ctx.registry.load();
        if !registry.store.is_up() {
            degraded
                .push(json!({"part": "store", "detail": "Redis is unreachable: store.on_failure applies"}));
        }
        for u in &registry.upstreams {
            let circuit = u.breaker.state().as_str();
            if circuit != "closed" {
                degraded.push(json!({"part": "circuit", "upstream": u.name(), "state": circuit}));
            }
        }
        let now = crate::metrics::unix_now();
        for (state, config) in registry.routes.iter().zip(&registry.configs) {
            if state.stats.stale.load(Ordering::Relaxed) {
                degraded.push(json!({
                    "part": "stale_route",
                    "route": &*state.name,
                    "silent_for_s": state.stats.silent_for(now).round(),
                    "expect_traffic_within_s": config.expect_traffic_within.map(|d| d.as_secs_f64()),
                }));
            }
        }
        let now_s = certs::unix_now();
        for cert in self.ctx.certs.load().iter().filter(|c| c.expiring(now_s)) {
            degraded.push(json!({
                "part": "certificate",
                "subject": cert.subject,
                "position": cert.position,
                "not_after": cert.not_after_rfc3339(),
                "days_left": cert.days_left(now_s),
            }));
        }
        let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        json_response(
            status,
            json!({"ready": ready, "config": self.ctx.status.info().hash, "degraded": degraded}),
        )
    }
}

/// Calls that need no token: probes and scrapers (which carry none) and the
/// dashboard's static files (the page asks for the token itself).
fn public(method: &Method, path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
        || (method == Method::GET && dashboard::is_asset(path))
}

/// No admin page may be framed (clickjacking the Reset buttons): CSP
/// `frame-ancestors 'none'` for today's browsers, `X-Frame-Options` for older ones.
fn forbid_framing(headers: &mut http::HeaderMap) {
    headers
        .entry(HeaderName::from_static("content-security-policy"))
        .or_insert(HeaderValue::from_static("frame-ancestors 'none'"));
    headers.insert(HeaderName::from_static("x-frame-options"), HeaderValue::from_static("DENY"));
    headers.insert(HeaderName::from_static("x-content-type-options"), HeaderValue::from_static("nosniff"));
}

pub fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut rsp = Response::new(body::full(value.to_string()));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    rsp
}

impl Handler for Admin {
    fn limits(&self) -> ConnLimits {
        ConnLimits::admin()
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        self.serve(req, conn).await
    }
}
