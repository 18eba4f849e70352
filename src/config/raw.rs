//! serde structs that mirror the TOML contract of `SPEC.md` one to one.
//!
//! Every struct denies unknown keys, and every default here is the SPEC's
//! default. Value types (`Dur`, `Rate`, ...) parse themselves, so a bad value is
//! reported by serde with its key path; cross-field checks live in `validate.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::units::{ByteSize, Dur, KeySource, OptDur, OptKeySource, Rate};

fn d(s: &str) -> Dur {
    s.parse().unwrap_or_default()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub store: RawStore,
    /// Upstreams by name; routes refer to them by that name.
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// Plain-HTTP listener (HTTP/1.1 and h2c).
    pub listen: String,
    /// Connections beyond this wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// From accept (or the end of the previous request) until a complete
    /// request head, whatever the protocol (slowloris, idle and preface-only
    /// sockets).
    pub header_read_timeout: Dur,
    /// A keep-alive connection with no request in flight is closed after this
    /// (HTTP/2: GOAWAY).
    pub idle_timeout: Dur,
    /// Longest gap between two reads of a request body; past it: 408.
    pub body_read_timeout: Dur,
    /// A body up to this size (declared `Content-Length`) is read whole before
    /// the request takes an upstream slot; larger bodies stream.
    pub buffer_body_bytes: ByteSize,
    /// Request heads larger than this get 431.
    pub max_header_bytes: ByteSize,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: ByteSize,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_concurrent_streams: u32,
    /// How long in-flight requests may finish after SIGTERM.
    pub shutdown_grace: Dur,
    /// CIDRs (or single addresses) of the load balancers in front of levee.
    /// Only a peer in this list is believed about `X-Forwarded-For`: the
    /// client address (`client_key = "ip"`) is then the right-most address of
    /// the chain not in the list. Empty: the socket's address, always, so a
    /// client cannot pick its own bucket by sending the header.
    pub trusted_proxies: Vec<String>,
    /// Every connection on the proxy listeners (plain and TLS) must start with
    /// a PROXY protocol v1 or v2 header, whose source address is then the
    /// client's. For an L4 load balancer (AWS NLB, HAProxy `send-proxy`) that
    /// cannot add `X-Forwarded-For`. A connection without one is closed.
    pub proxy_protocol: bool,
    /// The optional HTTPS listener.
    pub tls: Option<RawTls>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "0.0.0.0:8080".into(),
            max_connections: 10_000,
            header_read_timeout: d("10s"),
            idle_timeout: d("60s"),
            body_read_timeout: d("15s"),
            buffer_body_bytes: ByteSize(64 << 10),
            max_header_bytes: ByteSize(16_384),
            max_body_bytes: ByteSize(10 << 20),
            h2_max_concurrent_streams: 100,
            shutdown_grace: d("30s"),
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    #[serde(default = "default_tls_listen")]
    pub listen: String,
    /// PEM file with the full chain, leaf first.
    pub cert: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// What the plain listener does on `tls_only` routes.
    #[serde(default)]
    pub plain_http: PlainHttp,
}

fn default_tls_listen() -> String {
    "0.0.0.0:8443".into()
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PlainHttp {
    #[default]
    Serve,
    Redirect,
    Reject,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub listen: String,
    /// When set, every admin call but `/healthz`, `/readyz` and `/metrics`
    /// needs `Authorization: Bearer <token>`; when empty, mutating calls are
    /// accepted from loopback only.
    pub token: String,
    /// Host names the admin listener answers to besides IP literals and
    /// `localhost` (DNS-rebinding defence).
    pub hosts: Vec<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin { listen: "127.0.0.1:9901".into(), token: String::new(), hosts: Vec::new() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    pub kind: StoreKind,
    pub url: String,
    /// A Redis Cluster: several node URLs. Takes precedence over `url`.
    pub urls: Vec<String>,
    pub on_failure: OnFailure,
    /// Per-node cap on tracked client states; the least recently seen go first.
    pub max_clients: usize,
    /// How long a decision may wait on Redis before `on_failure` applies (levee's addition).
    pub timeout: Dur,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            kind: StoreKind::Memory,
            url: "redis://127.0.0.1:6379".into(),
            urls: Vec::new(),
            on_failure: OnFailure::Local,
            max_clients: 1_000_000,
            timeout: d("50ms"),
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreKind {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OnFailure {
    #[default]
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// `host:port`, http unless prefixed `https://`.
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Per try, until the whole response head.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// In-flight requests to this upstream.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    #[serde(default)]
    pub circuit_breaker: RawCircuitBreaker,
    #[serde(default)]
    pub outlier: RawOutlier,
    #[serde(default)]
    pub retry: RawRetry,
    /// TLS to `https://` endpoints.
    pub tls: Option<RawUpstreamTls>,
}

/// `[upstreams.NAME.tls]`: only for `https://` endpoints; all optional.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstreamTls {
    /// PEM bundle to verify the upstream with, instead of the system roots.
    pub ca: String,
    /// SNI and the name verified; default: the endpoint's host.
    pub server_name: String,
    /// Client certificate chain and key, for upstreams that want mTLS.
    pub cert: String,
    pub key: String,
}

fn default_connect_timeout() -> Dur {
    d("1s")
}
fn default_timeout() -> Dur {
    d("30s")
}
fn default_max_concurrency() -> usize {
    1024
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Balance {
    #[default]
    P2c,
    RoundRobin,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCircuitBreaker {
    pub window: Dur,
    pub min_requests: u32,
    pub failure_rate: f64,
    pub open_for: Dur,
    pub half_open_requests: u32,
}

impl Default for RawCircuitBreaker {
    fn default() -> Self {
        RawCircuitBreaker {
            window: d("10s"),
            min_requests: 20,
            failure_rate: 0.5,
            open_for: d("5s"),
            half_open_requests: 3,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOutlier {
    pub consecutive_failures: u32,
    pub eject_for: Dur,
    pub max_ejected: f64,
}

impl Default for RawOutlier {
    fn default() -> Self {
        RawOutlier { consecutive_failures: 5, eject_for: d("30s"), max_ejected: 0.5 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetry {
    /// Total tries, idempotent methods only.
    pub attempts: u32,
    /// Retries may add at most this share to the request rate.
    pub budget: f64,
    pub backoff: Dur,
    /// Retries always allowed per second, whatever the budget says.
    pub min_per_s: u32,
    /// `connect`, `timeout`, or a status code such as `"503"`.
    pub on: Vec<String>,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            attempts: 2,
            budget: 0.2,
            backoff: d("25ms"),
            min_per_s: 5,
            on: ["connect", "502", "503", "504"].map(String::from).to_vec(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Unique; used in metrics, logs and the dashboard.
    pub name: String,
    /// Exact host or `"*"`.
    #[serde(default = "star")]
    pub host: String,
    /// Longest prefix wins; ties: first declared.
    #[serde(default = "slash")]
    pub path_prefix: String,
    pub upstream: String,
    #[serde(default = "default_client_key")]
    pub client_key: KeySource,
    #[serde(default)]
    pub client_key_fallback: KeyFallback,
    #[serde(default)]
    pub tenant_key: OptKeySource,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub tls_only: bool,
    #[serde(default)]
    pub expect_traffic_within: OptDur,
    /// Proxy `Upgrade: websocket` requests on this route.
    #[serde(default = "yes")]
    pub websocket: bool,
    /// Open upgraded connections per client on this route; past it: 429.
    #[serde(default = "default_max_upgraded")]
    pub max_upgraded_per_client: u32,
    #[serde(default)]
    pub limits: Vec<RawLimit>,
    #[serde(default)]
    pub storm: RawStorm,
    #[serde(default)]
    pub auth_guard: RawAuthGuard,
}

fn yes() -> bool {
    true
}
fn default_max_upgraded() -> u32 {
    4
}
fn star() -> String {
    "*".into()
}
fn slash() -> String {
    "/".into()
}
fn default_client_key() -> KeySource {
    KeySource::Ip
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyFallback {
    #[default]
    Ip,
    Reject,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Priority {
    Bulk,
    #[default]
    Normal,
    Critical,
}

/// `mode` of a limit, a storm detector or an auth guard.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Mode {
    /// Refuse what the defence decides to refuse.
    #[default]
    Enforce,
    /// Decide exactly as `enforce`, report what would have been refused
    /// (metrics, state API, `x-levee-shadow` upstream), and forward anyway.
    Shadow,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    pub rate: Rate,
    /// Default: the rate's count.
    pub burst: Option<u32>,
    #[serde(default)]
    pub mode: Mode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStorm {
    pub enabled: bool,
    pub mode: Mode,
    pub interval: Dur,
    pub growth_factor: f64,
    pub growth_intervals: u32,
    pub min_rate: Rate,
    pub duplicate_window: Dur,
    pub max_duplicates: u32,
    pub quarantine: Dur,
}

impl Default for RawStorm {
    fn default() -> Self {
        RawStorm {
            enabled: true,
            mode: Mode::Enforce,
            interval: d("1s"),
            growth_factor: 2.0,
            growth_intervals: 3,
            min_rate: "5/s"
                .parse()
                .unwrap_or(Rate { count: std::num::NonZeroU32::MIN, per: std::time::Duration::from_secs(1) }),
            duplicate_window: d("2s"),
            max_duplicates: 3,
            quarantine: d("60s"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuthGuard {
    pub enabled: bool,
    pub mode: Mode,
    pub window: Dur,
    pub min_responses: u32,
    pub max_401_ratio: f64,
    pub recently_authorized: Dur,
}

impl Default for RawAuthGuard {
    fn default() -> Self {
        RawAuthGuard {
            enabled: true,
            mode: Mode::Enforce,
            window: d("10s"),
            min_responses: 50,
            max_401_ratio: 0.3,
            recently_authorized: d("10m"),
        }
    }
}
