//! Raw → typed: every cross-field check, every reference resolved, every value
//! in the unit the request path uses. After this nothing holds a string still to
//! parse, and nothing downstream can panic on a config value.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::raw::{self, RawConfig};
use super::units::{Dur, KeySource, Rate};
use super::{Config, Invalid, KeyPath};

pub use super::raw::{Balance, KeyFallback, Mode, OnFailure, PlainHttp, Priority, StoreKind};

type Result<T> = std::result::Result<T, Invalid>;

/// The most `[[routes.limits]]` a route may have: a client's limiter state is
/// one fixed-size entry (`store/memory.rs`) and one script call (Redis).
pub const MAX_LIMITS: usize = 4;

/// The most limits whose buckets a route keeps in its client table, in the
/// entry its storm detector and auth guard already use (`stack/clients.rs`),
/// instead of in the store's table: one entry and one lookup per client.
pub const LIMITS_PER_CLIENT_ENTRY: usize = 2;

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
    /// Whose `X-Forwarded-For` levee believes (read per request).
    pub trusted_proxies: TrustedProxies,
    /// Connections must start with a PROXY header (read per new connection).
    pub proxy_protocol: bool,
}

/// Most entries `server.trusted_proxies` may hold: every request from a
/// trusted peer walks the list once per hop, so it stays small.
pub const MAX_TRUSTED_PROXIES: usize = 1024;

/// An address block: `addr` with its host bits zero, and the prefix length.
/// IPv4-mapped IPv6 blocks and addresses are treated as IPv4, so a dual-stack
/// socket's `::ffff:10.1.2.3` is in `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `"10.0.0.0/8"`, `"2001:db8::/32"`, or a bare address (a block of one).
    /// Host bits set after the prefix (`10.0.0.1/8`) are refused: such a typo
    /// would otherwise trust a block the operator did not mean.
    pub fn parse(s: &str) -> std::result::Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (s, None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| format!("{ip:?} is not an IP address"))?;
        let (ip, max, offset) = match ip.to_canonical() {
            v4 @ IpAddr::V4(_) => (v4, 32u8, if ip.is_ipv6() { 96 } else { 0 }),
            v6 @ IpAddr::V6(_) => (v6, 128u8, 0),
        };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                let digits = !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit());
                let p: u8 = p
                    .parse()
                    .ok()
                    .filter(|_| digits)
                    .ok_or_else(|| format!("prefix {p:?} is not a number"))?;
                // An IPv4-mapped block's prefix counts the 96 bits of `::ffff:`.
                p.checked_sub(offset)
                    .filter(|p| *p <= max)
                    .ok_or_else(|| format!("prefix /{p} is out of range for {ip}"))?
            }
        };
        let cidr = Cidr { addr: ip, prefix };
        if cidr.network() != ip {
            return Err(format!("host bits set after /{prefix}; did you mean {}/{prefix}?", cidr.network()));
        }
        Ok(cidr)
    }

    /// The block's first address (`addr` with the bits after `prefix` cleared).
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let same_family =
            matches!((self.addr, ip), (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)));
        same_family && Cidr { addr: ip, prefix: self.prefix }.network() == self.addr
    }
}

/// `server.trusted_proxies`, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    pub fn new(blocks: Vec<Cidr>) -> Self {
        TrustedProxies(blocks)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
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

/// An upstream endpoint: `host:port`, over plain HTTP, or TLS for `https://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointAddr {
    pub authority: http::uri::Authority,
    pub tls: bool,
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
    /// TLS to its `https://` endpoints (`None`: it has none).
    pub tls: Option<super::UpstreamTls>,
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
    /// Proxy WebSocket upgrades, and how many a client may hold open.
    pub websocket: bool,
    pub max_upgraded_per_client: u32,
    pub limits: Vec<Limit>,
    /// The `mode` of each of `limits`, in order. Kept beside [`Limit`], not in
    /// it: a limit's value is its identity (rate and burst), and switching it
    /// between shadow and enforce must keep its state.
    pub limit_modes: Vec<Mode>,
    pub storm: StormConfig,
    pub auth_guard: AuthGuardConfig,
}

impl RouteConfig {
    /// Whether the route keeps its clients' buckets in its client table: on
    /// the memory store (Redis holds them otherwise), with a storm detector
    /// (the table exists, and its sweeper drops full buckets) and at most
    /// [`LIMITS_PER_CLIENT_ENTRY`] limits.
    pub fn buckets_in_client_table(&self, store: StoreKind) -> bool {
        store == StoreKind::Memory
            && self.storm.enabled
            && !self.limits.is_empty()
            && self.limits.len() <= LIMITS_PER_CLIENT_ENTRY
    }
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
    /// Read per request from the live config: a detector whose other settings
    /// are unchanged keeps its state when only the mode changes.
    pub mode: Mode,
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
    /// Read per request from the live config, like [`StormConfig::mode`].
    pub mode: Mode,
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
        upstreams.push(upstream(name, u, base_dir)?);
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

// === bounds ===
//
// Every duration, size and count has an upper bound, so that no value a config
// file can hold reaches `Instant`/`Duration` arithmetic, a semaphore or an
// allocation as something that overflows or panics later, on the request path.
// The bounds are generous for real use and far from any overflow.

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
/// Timeouts: the longest anything may wait on a peer.
const MAX_TIMEOUT: Duration = HOUR;
/// Sliding windows and open/ejection times of the breaker and outlier detection.
const MAX_WINDOW: Duration = DAY;
/// Quarantines and "recently authorized": per-client memory kept that long at most.
const MAX_MEMORY: Duration = Duration::from_secs(7 * 86_400);
/// `expect_traffic_within`: a route may be expected to see traffic monthly.
const MAX_EXPECT_TRAFFIC: Duration = Duration::from_secs(30 * 86_400);
/// A limit's capacity (`burst` × emission interval): how long a client's state lives.
pub const MAX_LIMIT_CAPACITY: Duration = Duration::from_secs(30 * 86_400);
/// Request bodies (`max_body_bytes`, `buffer_body_bytes`).
const MAX_BODY_BYTES: u64 = 1 << 30;
/// Counts of requests, responses, failures and the like.
const MAX_COUNT: u32 = 1_000_000;

/// A non-zero duration no longer than `max`.
fn positive(d: Duration, max: Duration, path: KeyPath) -> Result<Duration> {
    if d.is_zero() {
        return invalid(path, "must be longer than zero");
    }
    at_most(d, max, path)
}

/// A duration (zero allowed) no longer than `max`.
fn at_most(d: Duration, max: Duration, path: KeyPath) -> Result<Duration> {
    if d > max {
        return invalid(path, format!("must be at most {}, got {}", Dur(max), Dur(d)));
    }
    Ok(d)
}

fn ratio(v: f64, path: KeyPath, lo: f64, hi: f64) -> Result<f64> {
    if !(lo..=hi).contains(&v) {
        return invalid(path, format!("must be between {lo} and {hi}, got {v}"));
    }
    Ok(v)
}

/// A count within `lo..=hi`.
fn between<T: PartialOrd + std::fmt::Display + Copy>(v: T, lo: T, hi: T, path: KeyPath) -> Result<T> {
    if v < lo || v > hi {
        return invalid(path, format!("must be between {lo} and {hi}, got {v}"));
    }
    Ok(v)
}

/// A size in bytes no larger than `max`.
fn bytes_at_most(v: u64, max: u64, path: KeyPath) -> Result<u64> {
    if v > max {
        return invalid(path, format!("must be at most {max} bytes, got {v}"));
    }
    Ok(v)
}

/// A limit's capacity (`burst` emission intervals) within [`MAX_LIMIT_CAPACITY`],
/// so that `burst × interval` cannot overflow the stores' tick arithmetic and a
/// client's state never has to be kept for longer than a month. (The rate
/// itself is bounded where it parses: at most one event per microsecond, so the
/// emission interval is at least one tick in both stores.)
fn limit(rate: Rate, burst: u32, path: KeyPath) -> Result<Limit> {
    let Some(burst) = NonZeroU32::new(burst) else {
        return invalid(path.key("burst"), "must be at least 1");
    };
    let interval = rate.per / rate.count.get();
    let capacity = interval.checked_mul(burst.get()).unwrap_or(Duration::MAX);
    if capacity > MAX_LIMIT_CAPACITY {
        return invalid(
            path.key("burst"),
            format!(
                "burst {burst} at {rate} holds {} of state per client; at most {} is allowed",
                Dur(capacity),
                Dur(MAX_LIMIT_CAPACITY)
            ),
        );
    }
    Ok(Limit { rate, burst })
}

fn server(s: &raw::RawServer) -> Result<Server> {
    let p = KeyPath::root().key("server");
    let max_header_bytes = s.max_header_bytes.0;
    if !(1024..=1 << 20).contains(&max_header_bytes) {
        return invalid(p.key("max_header_bytes"), "must be between 1024 and 1048576 bytes");
    }
    let max_body_bytes = bytes_at_most(s.max_body_bytes.0, MAX_BODY_BYTES, p.key("max_body_bytes"))?;
    let buffer_body_bytes = bytes_at_most(s.buffer_body_bytes.0, MAX_BODY_BYTES, p.key("buffer_body_bytes"))?;
    Ok(Server {
        listen: addr(&s.listen, p.key("listen"))?,
        max_connections: between(s.max_connections, 1, 1_000_000, p.key("max_connections"))?,
        header_read_timeout: positive(s.header_read_timeout.0, MAX_TIMEOUT, p.key("header_read_timeout"))?,
        idle_timeout: positive(s.idle_timeout.0, MAX_TIMEOUT, p.key("idle_timeout"))?,
        body_read_timeout: positive(s.body_read_timeout.0, MAX_TIMEOUT, p.key("body_read_timeout"))?,
        buffer_body_bytes: buffer_body_bytes.min(max_body_bytes),
        max_header_bytes: max_header_bytes as usize,
        max_body_bytes,
        h2_max_concurrent_streams: between(
            s.h2_max_concurrent_streams,
            1,
            10_000,
            p.key("h2_max_concurrent_streams"),
        )?,
        shutdown_grace: at_most(s.shutdown_grace.0, MAX_TIMEOUT, p.key("shutdown_grace"))?,
        trusted_proxies: trusted_proxies(&s.trusted_proxies, p.key("trusted_proxies"))?,
        proxy_protocol: s.proxy_protocol,
    })
}

fn trusted_proxies(list: &[String], p: KeyPath) -> Result<TrustedProxies> {
    if list.len() > MAX_TRUSTED_PROXIES {
        return invalid(p, format!("at most {MAX_TRUSTED_PROXIES} entries, got {}", list.len()));
    }
    let mut blocks = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        match Cidr::parse(entry.trim()) {
            Ok(c) => blocks.push(c),
            Err(why) => {
                return invalid(
                    p.index(i),
                    format!("expected a CIDR such as \"10.0.0.0/8\", got {entry:?}: {why}"),
                )
            }
        }
    }
    Ok(TrustedProxies::new(blocks))
}

fn tls(t: &raw::RawTls, base_dir: &Path) -> Result<Tls> {
    let p = KeyPath::root().key("server").key("tls");
    let cert_path = base_dir.join(&t.cert);
    let key_path = base_dir.join(&t.key);
    let (chain, key) = super::upstream_tls::cert_and_key(&cert_path, &key_path, &p)?;
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
        max_clients: between(s.max_clients, 1, 100_000_000, p.key("max_clients"))?,
        timeout: positive(s.timeout.0, MINUTE, p.key("timeout"))?,
    })
}

fn upstream(name: &str, u: &raw::RawUpstream, base_dir: &Path) -> Result<UpstreamConfig> {
    let p = KeyPath::root().key("upstreams").key(name);
    if u.endpoints.is_empty() {
        return invalid(p.key("endpoints"), "needs at least one endpoint");
    }
    let mut endpoints = Vec::with_capacity(u.endpoints.len());
    for (i, e) in u.endpoints.iter().enumerate() {
        let ep = p.key("endpoints").index(i);
        let tls = e.starts_with("https://");
        let bare = e
            .strip_prefix("https://")
            .or_else(|| e.strip_prefix("http://"))
            .unwrap_or(e)
            .trim_end_matches('/');
        let authority: http::uri::Authority = match bare.parse() {
            Ok(a) => a,
            Err(_) => return invalid(ep, format!("expected \"host:port\", got {e:?}")),
        };
        if authority.port_u16().is_none() {
            return invalid(ep, format!("expected \"host:port\" with a port, got {e:?}"));
        }
        endpoints.push(EndpointAddr { authority, tls });
    }
    let tls = if endpoints.iter().any(|e| e.tls) {
        Some(super::upstream_tls::build(u.tls.as_ref(), base_dir, &p.key("tls"))?)
    } else if u.tls.is_some() {
        return invalid(p.key("tls"), "only for https:// endpoints, and this upstream has none");
    } else {
        None
    };
    let cb = &u.circuit_breaker;
    let cbp = p.key("circuit_breaker");
    let circuit_breaker = BreakerConfig {
        window: positive(cb.window.0, MAX_WINDOW, cbp.key("window"))?,
        min_requests: between(cb.min_requests, 1, MAX_COUNT, cbp.key("min_requests"))?,
        failure_rate: ratio(cb.failure_rate, cbp.key("failure_rate"), 0.01, 1.0)?,
        open_for: positive(cb.open_for.0, MAX_WINDOW, cbp.key("open_for"))?,
        half_open_requests: between(cb.half_open_requests, 1, 10_000, cbp.key("half_open_requests"))?,
    };
    let o = &u.outlier;
    let op = p.key("outlier");
    let outlier = OutlierConfig {
        consecutive_failures: between(o.consecutive_failures, 1, MAX_COUNT, op.key("consecutive_failures"))?,
        eject_for: positive(o.eject_for.0, MAX_WINDOW, op.key("eject_for"))?,
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
    let retry = RetryConfig {
        attempts: between(r.attempts, 1, 10, rp.key("attempts"))?,
        budget: ratio(r.budget, rp.key("budget"), 0.0, 10.0)?,
        backoff: at_most(r.backoff.0, MINUTE, rp.key("backoff"))?,
        min_per_s: between(r.min_per_s, 0, MAX_COUNT, rp.key("min_per_s"))?,
        on_connect,
        on_timeout,
        on_status,
    };
    Ok(UpstreamConfig {
        name: name.to_string(),
        endpoints,
        balance: u.balance,
        connect_timeout: positive(u.connect_timeout.0, MAX_TIMEOUT, p.key("connect_timeout"))?,
        timeout: positive(u.timeout.0, MAX_TIMEOUT, p.key("timeout"))?,
        max_concurrency: between(u.max_concurrency, 1, 1_000_000, p.key("max_concurrency"))?,
        circuit_breaker,
        outlier,
        retry,
        tls,
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
    if r.limits.len() > MAX_LIMITS {
        return invalid(p.key("limits"), format!("at most {} limits per route", MAX_LIMITS));
    }
    let mut limits = Vec::with_capacity(r.limits.len());
    for (i, l) in r.limits.iter().enumerate() {
        let burst = l.burst.unwrap_or(l.rate.count.get());
        limits.push(limit(l.rate, burst, p.key("limits").index(i))?);
    }
    let limit_modes = r.limits.iter().map(|l| l.mode).collect();
    let s = &r.storm;
    let sp = p.key("storm");
    let storm = StormConfig {
        enabled: s.enabled,
        mode: s.mode,
        interval: positive(s.interval.0, HOUR, sp.key("interval"))?,
        growth_factor: ratio(s.growth_factor, sp.key("growth_factor"), 1.1, 1000.0)?,
        growth_intervals: between(s.growth_intervals, 1, 100, sp.key("growth_intervals"))?,
        min_rate: s.min_rate,
        duplicate_window: positive(s.duplicate_window.0, MAX_WINDOW, sp.key("duplicate_window"))?,
        max_duplicates: between(s.max_duplicates, 1, MAX_COUNT, sp.key("max_duplicates"))?,
        quarantine: positive(s.quarantine.0, MAX_MEMORY, sp.key("quarantine"))?,
    };
    let a = &r.auth_guard;
    let ap = p.key("auth_guard");
    let auth_guard = AuthGuardConfig {
        enabled: a.enabled,
        mode: a.mode,
        window: positive(a.window.0, MAX_WINDOW, ap.key("window"))?,
        min_responses: between(a.min_responses, 1, MAX_COUNT, ap.key("min_responses"))?,
        max_401_ratio: ratio(a.max_401_ratio, ap.key("max_401_ratio"), 0.0, 1.0)?,
        recently_authorized: positive(a.recently_authorized.0, MAX_MEMORY, ap.key("recently_authorized"))?,
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
        expect_traffic_within: match r.expect_traffic_within.0 {
            Some(d) => Some(positive(d, MAX_EXPECT_TRAFFIC, p.key("expect_traffic_within"))?),
            None => None,
        },
        websocket: r.websocket,
        max_upgraded_per_client: between(
            r.max_upgraded_per_client,
            1,
            10_000,
            p.key("max_upgraded_per_client"),
        )?,
        limits,
        limit_modes,
        storm,
        auth_guard,
    })
}

#[cfg(test)]
mod trusted_proxies_tests {
    use std::path::Path;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_contain_their_block_in_both_families() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.255.1.2")) && !c.contains(ip("11.0.0.1")));
        // IPv4-mapped IPv6 is IPv4, on both sides.
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert_eq!(Cidr::parse("::ffff:10.0.0.0/104").unwrap(), c);
        assert!(!c.contains(ip("2001:db8::1")));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        // A bare address is a block of one; /0 is everything of its family.
        let one = Cidr::parse("127.0.0.5").unwrap();
        assert!(one.contains(ip("127.0.0.5")) && !one.contains(ip("127.0.0.6")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("203.0.113.7")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
    }

    #[test]
    fn malformed_cidrs_are_refused() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/08x",
            "10.0.0.1/8",
            "ten/8",
            "::/129",
            "10.0.0.0/8/8",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_name_the_key_and_the_index() {
        let text = r#"
[server]
trusted_proxies = ["10.0.0.0/8", "10.0.0.0/40"]
proxy_protocol = true

[upstreams.backend]
endpoints = ["127.0.0.1:3000"]

[[routes]]
name = "api"
upstream = "backend"
"#;
        let err = crate::config::parse(text, Path::new("."), &|_| None).unwrap_err().to_string();
        assert!(err.contains("server.trusted_proxies[1]: expected a CIDR such as \"10.0.0.0/8\""), "{err}");
        let ok = text.replace("10.0.0.0/40", "192.168.0.0/16");
        let c = crate::config::parse(&ok, Path::new("."), &|_| None).unwrap();
        assert!(c.server.proxy_protocol);
        assert!(c.server.trusted_proxies.contains(ip("192.168.3.4")));
        let many: Vec<String> =
            (0..=MAX_TRUSTED_PROXIES).map(|i| format!("\"10.0.{}.{}\"", i / 256, i % 256)).collect();
        let too_many = text.replace(r#"["10.0.0.0/8", "10.0.0.0/40"]"#, &format!("[{}]", many.join(", ")));
        let err = crate::config::parse(&too_many, Path::new("."), &|_| None).unwrap_err().to_string();
        assert!(err.contains("server.trusted_proxies"), "{err}");
    }
}

#[cfg(test)]
mod mode_tests {
    use std::path::Path;

    use super::*;

    fn route(extra: &str) -> std::result::Result<Config, crate::config::ConfigError> {
        let toml = format!(
            "[upstreams.b]\nendpoints = [\"127.0.0.1:9\"]\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"b\"\n{extra}"
        );
        crate::config::parse(&toml, Path::new("."), &|_| None)
    }

    #[test]
    fn mode_defaults_to_enforce_and_is_kept_beside_the_limit_not_in_it() {
        let c = route("[[routes.limits]]\nrate = \"3/m\"\n[[routes.limits]]\nrate = \"1/s\"\nmode = \"shadow\"\n[routes.storm]\nmode = \"shadow\"\n")
            .unwrap();
        let r = &c.routes[0];
        assert_eq!(r.limit_modes, [Mode::Enforce, Mode::Shadow]);
        assert_eq!((r.storm.mode, r.auth_guard.mode), (Mode::Shadow, Mode::Enforce));
        let e = route("[routes.auth_guard]\nmode = \"dry-run\"\n").unwrap_err().to_string();
        assert!(e.contains("mode") || e.contains("dry-run"), "{e}");
    }
}
