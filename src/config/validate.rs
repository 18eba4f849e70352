//! Raw → typed: every cross-field check, every reference resolved, every value
//! in the unit the request path uses. After this nothing holds a string still to
//! parse, and nothing downstream can panic on a config value.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::raw::{self, RawConfig};
use super::units::{KeySource, Rate};
use super::{Config, KeyPath};

pub use super::raw::{Balance, KeyFallback, OnFailure, PlainHttp, Priority, StoreKind};

/// An error found by validation: the key it concerns and what is wrong.
pub struct Invalid {
    pub path: KeyPath,
    pub message: String,
}

type Result<T> = std::result::Result<T, Invalid>;

fn invalid<T>(path: KeyPath, message: impl Into<String>) -> Result<T> {
    Err(Invalid { path, message: message.into() })
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_read_timeout: Duration,
    pub buffer_body_bytes: u64,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    pub h2_max_concurrent_streams: u32,
    pub shutdown_grace: Duration,
}

/// The HTTPS listener, with its certificate chain and key already read and parsed.
#[derive(Debug)]
pub struct Tls {
    pub listen: SocketAddr,
    pub cert_path: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub plain_http: PlainHttp,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    /// `None`: mutating calls are accepted from loopback only.
    pub token: Option<String>,
    /// Host names answered besides IP literals and `localhost`, lowercased.
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// One URL, or the nodes of a cluster.
    pub urls: Vec<String>,
    pub on_failure: OnFailure,
    pub max_clients: usize,
    pub timeout: Duration,
}

/// An upstream endpoint: `host:port`, spoken to over plain HTTP/1.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointAddr {
    pub authority: http::uri::Authority,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    pub endpoints: Vec<EndpointAddr>,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_concurrency: usize,
    pub circuit_breaker: BreakerConfig,
    pub outlier: OutlierConfig,
    pub retry: RetryConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    pub window: Duration,
    pub min_requests: u32,
    pub failure_rate: f64,
    pub open_for: Duration,
    pub half_open_requests: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    pub eject_for: Duration,
    pub max_ejected: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    pub attempts: u32,
    pub budget: f64,
    pub backoff: Duration,
    pub min_per_s: u32,
    pub on_connect: bool,
    pub on_timeout: bool,
    pub on_status: Vec<u16>,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    /// `None` matches any host.
    pub host: Option<String>,
    pub path_prefix: String,
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    pub client_key: KeySource,
    pub client_key_fallback: KeyFallback,
    pub tenant_key: Option<KeySource>,
    pub priority: Priority,
    pub tls_only: bool,
    pub expect_traffic_within: Option<Duration>,
    pub limits: Vec<Limit>,
    pub storm: StormConfig,
    pub auth_guard: AuthGuardConfig,
}

/// One `[[routes.limits]]`: GCRA with `rate` and `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub rate: Rate,
    pub burst: NonZeroU32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StormConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub growth_factor: f64,
    pub growth_intervals: u32,
    pub min_rate: Rate,
    pub duplicate_window: Duration,
    pub max_duplicates: u32,
    pub quarantine: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuthGuardConfig {
    pub enabled: bool,
    pub window: Duration,
    pub min_responses: u32,
    pub max_401_ratio: f64,
    pub recently_authorized: Duration,
}

// === validation ===

pub(super) fn validate(raw: RawConfig, base_dir: &Path, hash: String) -> Result<Config> {
    let server = server(&raw.server)?;
    let tls = match &raw.server.tls {
        Some(t) => Some(tls(t, base_dir)?),
        None => None,
    };
    let admin = Admin {
        listen: addr(&raw.admin.listen, KeyPath::root().key("admin").key("listen"))?,
        token: Some(raw.admin.token.clone()).filter(|t| !t.is_empty()),
        hosts: raw.admin.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
    };
    let store = store(&raw.store)?;
    let mut upstreams = Vec::with_capacity(raw.upstreams.len());
    for (name, u) in &raw.upstreams {
        upstreams.push(upstream(name, u)?);
    }
    let mut routes = Vec::with_capacity(raw.routes.len());
    let mut names = HashSet::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let path = KeyPath::root().key("routes").index(i);
        let route = route(r, &upstreams, path.clone())?;
        if !names.insert(route.name.clone()) {
            return invalid(path.key("name"), format!("duplicate route name {:?}", route.name));
        }
        if route.tls_only && tls.is_none() {
            return invalid(path.key("tls_only"), "tls_only needs a [server.tls] listener");
        }
        routes.push(route);
    }
    Ok(Config { server, tls, admin, store, upstreams, routes, hash })
}

fn addr(s: &str, path: KeyPath) -> Result<SocketAddr> {
    match s.parse() {
        Ok(a) => Ok(a),
        Err(_) => invalid(path, format!("expected an address such as \"0.0.0.0:8080\", got {s:?}")),
    }
}

fn positive(d: Duration, path: KeyPath) -> Result<Duration> {
    if d.is_zero() {
        return invalid(path, "must be longer than zero");
    }
    Ok(d)
}

fn ratio(v: f64, path: KeyPath, lo: f64, hi: f64) -> Result<f64> {
    if !(lo..=hi).contains(&v) {
        return invalid(path, format!("must be between {lo} and {hi}, got {v}"));
    }
    Ok(v)
}

fn at_least<T: PartialOrd + std::fmt::Display + Copy>(v: T, min: T, path: KeyPath) -> Result<T> {
    if v < min {
        return invalid(path, format!("must be at least {min}, got {v}"));
    }
    Ok(v)
}

fn server(s: &raw::RawServer) -> Result<Server> {
    let p = KeyPath::root().key("server");
    let max_header_bytes = s.max_header_bytes.0;
    if !(1024..=1 << 20).contains(&max_header_bytes) {
        return invalid(p.key("max_header_bytes"), "must be between 1024 and 1048576 bytes");
    }
    Ok(Server {
        listen: addr(&s.listen, p.key("listen"))?,
        max_connections: at_least(s.max_connections, 1, p.key("max_connections"))?,
        header_read_timeout: positive(s.header_read_timeout.0, p.key("header_read_timeout"))?,
        idle_timeout: positive(s.idle_timeout.0, p.key("idle_timeout"))?,
        body_read_timeout: positive(s.body_read_timeout.0, p.key("body_read_timeout"))?,
        buffer_body_bytes: s.buffer_body_bytes.0.min(s.max_body_bytes.0),
        max_header_bytes: max_header_bytes as usize,
        max_body_bytes: s.max_body_bytes.0,
        h2_max_concurrent_streams: match s.h2_max_concurrent_streams {
            1..=10_000 => s.h2_max_concurrent_streams,
            n => {
                return invalid(
                    p.key("h2_max_concurrent_streams"),
                    format!("must be between 1 and 10000, got {n}"),
                )
            }
        },
        shutdown_grace: s.shutdown_grace.0,
    })
}

fn tls(t: &raw::RawTls, base_dir: &Path) -> Result<Tls> {
    let p = KeyPath::root().key("server").key("tls");
    let cert_path = base_dir.join(&t.cert);
    let key_path = base_dir.join(&t.key);
    let read = |path: &Path, key: &str| {
        std::fs::read(path).or_else(|e| invalid(p.key(key), format!("cannot read {}: {e}", path.display())))
    };
    let pem = read(&cert_path, "cert")?;
    let chain: Vec<_> =
        rustls_pemfile::certs(&mut pem.as_slice()).collect::<std::result::Result<_, _>>().or_else(|e| {
            invalid(p.key("cert"), format!("{}: not a PEM certificate chain: {e}", cert_path.display()))
        })?;
    if chain.is_empty() {
        return invalid(p.key("cert"), format!("{}: holds no certificate", cert_path.display()));
    }
    let pem = read(&key_path, "key")?;
    let key = match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(k)) => k,
        _ => return invalid(p.key("key"), format!("{}: holds no PEM private key", key_path.display())),
    };
    Ok(Tls { listen: addr(&t.listen, p.key("listen"))?, cert_path, chain, key, plain_http: t.plain_http })
}

fn store(s: &raw::RawStore) -> Result<StoreConfig> {
    let p = KeyPath::root().key("store");
    let urls = if s.urls.is_empty() { vec![s.url.clone()] } else { s.urls.clone() };
    if s.kind == StoreKind::Redis {
        for (i, u) in urls.iter().enumerate() {
            let key = if s.urls.is_empty() { p.key("url") } else { p.key("urls").index(i) };
            if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                return invalid(key, format!("expected a redis:// or rediss:// URL, got {u:?}"));
            }
            if let Err(e) = redis::Client::open(u.as_str()) {
                return invalid(key, format!("not a valid Redis URL ({e}): {u:?}"));
            }
        }
    }
    Ok(StoreConfig {
        kind: s.kind,
        urls,
        on_failure: s.on_failure,
        max_clients: at_least(s.max_clients, 1, p.key("max_clients"))?,
        timeout: positive(s.timeout.0, p.key("timeout"))?,
    })
}

fn upstream(name: &str, u: &raw::RawUpstream) -> Result<UpstreamConfig> {
    let p = KeyPath::root().key("upstreams").key(name);
    if u.endpoints.is_empty() {
        return invalid(p.key("endpoints"), "needs at least one endpoint");
    }
    let mut endpoints = Vec::with_capacity(u.endpoints.len());
    for (i, e) in u.endpoints.iter().enumerate() {
        let ep = p.key("endpoints").index(i);
        if e.starts_with("https://") {
            return invalid(
                ep,
                "https:// endpoints are not supported yet; terminate TLS in front of the backend or use http",
            );
        }
        let bare = e.strip_prefix("http://").unwrap_or(e).trim_end_matches('/');
        let authority: http::uri::Authority = match bare.parse() {
            Ok(a) => a,
            Err(_) => return invalid(ep, format!("expected \"host:port\", got {e:?}")),
        };
        if authority.port_u16().is_none() {
            return invalid(ep, format!("expected \"host:port\" with a port, got {e:?}"));
        }
        endpoints.push(EndpointAddr { authority });
    }
    let cb = &u.circuit_breaker;
    let cbp = p.key("circuit_breaker");
    let circuit_breaker = BreakerConfig {
        window: positive(cb.window.0, cbp.key("window"))?,
        min_requests: at_least(cb.min_requests, 1, cbp.key("min_requests"))?,
        failure_rate: ratio(cb.failure_rate, cbp.key("failure_rate"), 0.01, 1.0)?,
        open_for: positive(cb.open_for.0, cbp.key("open_for"))?,
        half_open_requests: at_least(cb.half_open_requests, 1, cbp.key("half_open_requests"))?,
    };
    let o = &u.outlier;
    let op = p.key("outlier");
    let outlier = OutlierConfig {
        consecutive_failures: at_least(o.consecutive_failures, 1, op.key("consecutive_failures"))?,
        eject_for: positive(o.eject_for.0, op.key("eject_for"))?,
        max_ejected: ratio(o.max_ejected, op.key("max_ejected"), 0.0, 1.0)?,
    };
    let r = &u.retry;
    let rp = p.key("retry");
    let (mut on_connect, mut on_timeout, mut on_status) = (false, false, Vec::new());
    for (i, what) in r.on.iter().enumerate() {
        match what.as_str() {
            "connect" => on_connect = true,
            "timeout" => on_timeout = true,
            s => match s.parse::<u16>() {
                Ok(code) if (500..600).contains(&code) || code == 429 => on_status.push(code),
                _ => {
                    return invalid(
                        rp.key("on").index(i),
                        format!(
                            "expected \"connect\", \"timeout\" or a 5xx status such as \"503\", got {s:?}"
                        ),
                    )
                }
            },
        }
    }
    if !(1..=10).contains(&r.attempts) {
        return invalid(rp.key("attempts"), format!("must be between 1 and 10, got {}", r.attempts));
    }
    let retry = RetryConfig {
        attempts: r.attempts,
        budget: ratio(r.budget, rp.key("budget"), 0.0, 10.0)?,
        backoff: r.backoff.0,
        min_per_s: r.min_per_s,
        on_connect,
        on_timeout,
        on_status,
    };
    Ok(UpstreamConfig {
        name: name.to_string(),
        endpoints,
        balance: u.balance,
        connect_timeout: positive(u.connect_timeout.0, p.key("connect_timeout"))?,
        timeout: positive(u.timeout.0, p.key("timeout"))?,
        max_concurrency: at_least(u.max_concurrency, 1, p.key("max_concurrency"))?,
        circuit_breaker,
        outlier,
        retry,
    })
}

fn route(r: &raw::RawRoute, upstreams: &[UpstreamConfig], p: KeyPath) -> Result<RouteConfig> {
    let valid_name = !r.name.is_empty()
        && r.name.len() <= 64
        && r.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !valid_name {
        return invalid(
            p.key("name"),
            format!("expected 1-64 characters of [A-Za-z0-9-_.], got {:?}", r.name),
        );
    }
    if !r.path_prefix.starts_with('/') {
        return invalid(p.key("path_prefix"), format!("must start with '/', got {:?}", r.path_prefix));
    }
    let host = match r.host.trim() {
        "*" => None,
        "" => return invalid(p.key("host"), "expected a host name or \"*\""),
        h => Some(h.to_ascii_lowercase()),
    };
    let Some(upstream) = upstreams.iter().position(|u| u.name == r.upstream) else {
        let known: Vec<_> = upstreams.iter().map(|u| u.name.as_str()).collect();
        return invalid(
            p.key("upstream"),
            format!("no upstream named {:?} (known: {})", r.upstream, known.join(", ")),
        );
    };
    if r.limits.len() > crate::store::MAX_LIMITS {
        return invalid(p.key("limits"), format!("at most {} limits per route", crate::store::MAX_LIMITS));
    }
    let mut limits = Vec::with_capacity(r.limits.len());
    for (i, l) in r.limits.iter().enumerate() {
        let burst = l.burst.unwrap_or(l.rate.count.get());
        let Some(burst) = NonZeroU32::new(burst) else {
            return invalid(p.key("limits").index(i).key("burst"), "must be at least 1");
        };
        limits.push(Limit { rate: l.rate, burst });
    }
    let s = &r.storm;
    let sp = p.key("storm");
    let storm = StormConfig {
        enabled: s.enabled,
        interval: positive(s.interval.0, sp.key("interval"))?,
        growth_factor: ratio(s.growth_factor, sp.key("growth_factor"), 1.1, 1000.0)?,
        growth_intervals: at_least(s.growth_intervals, 1, sp.key("growth_intervals"))?,
        min_rate: s.min_rate,
        duplicate_window: positive(s.duplicate_window.0, sp.key("duplicate_window"))?,
        max_duplicates: at_least(s.max_duplicates, 1, sp.key("max_duplicates"))?,
        quarantine: positive(s.quarantine.0, sp.key("quarantine"))?,
    };
    let a = &r.auth_guard;
    let ap = p.key("auth_guard");
    let auth_guard = AuthGuardConfig {
        enabled: a.enabled,
        window: positive(a.window.0, ap.key("window"))?,
        min_responses: at_least(a.min_responses, 1, ap.key("min_responses"))?,
        max_401_ratio: ratio(a.max_401_ratio, ap.key("max_401_ratio"), 0.0, 1.0)?,
        recently_authorized: positive(a.recently_authorized.0, ap.key("recently_authorized"))?,
    };
    Ok(RouteConfig {
        name: r.name.clone(),
        host,
        path_prefix: r.path_prefix.clone(),
        upstream,
        client_key: r.client_key.clone(),
        client_key_fallback: r.client_key_fallback,
        tenant_key: r.tenant_key.0.clone(),
        priority: r.priority,
        tls_only: r.tls_only,
        expect_traffic_within: r.expect_traffic_within.0,
        limits,
        storm,
        auth_guard,
    })
}
