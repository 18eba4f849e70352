//! Property: no config document, however hostile its values, panics the loader
//! or `levee check`. Every run is either a valid config that `check` can
//! summarise, or an error that names the key it is about.
//!
//! The generator writes documents of the contract's shape (every key of every
//! section, optional each) and fills each key with either a value of the right
//! kind (often extreme: zero, negative, `u64::MAX`, `"100000000000y"`,
//! `"4294967295/s"`) or any TOML value at all (unicode, `${ENV}` references,
//! NaN, arrays, tables). Documents are serialized by `toml`, so they are always
//! well-formed TOML: a syntax error would be a bug of the loader.

use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;
use toml::{Table, Value};

use crate::config::{load, Config, ConfigError, KeyPath};

/// What a key holds, for generating values of the right kind.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Dur,
    Rate,
    Size,
    Count,
    Float,
    /// `growth_factor`: above 1.
    Factor,
    Bool,
    Addr,
    Text,
    KeySrc,
    Url,
    Enum(&'static [&'static str]),
    /// `path_prefix`.
    Path,
    List(&'static Kind),
}

const SERVER: &[(&str, Kind)] = &[
    ("listen", Kind::Addr),
    ("max_connections", Kind::Count),
    ("header_read_timeout", Kind::Dur),
    ("idle_timeout", Kind::Dur),
    ("body_read_timeout", Kind::Dur),
    ("buffer_body_bytes", Kind::Size),
    ("max_header_bytes", Kind::Size),
    ("max_body_bytes", Kind::Size),
    ("h2_max_concurrent_streams", Kind::Count),
    ("shutdown_grace", Kind::Dur),
];
const ADMIN: &[(&str, Kind)] =
    &[("listen", Kind::Addr), ("token", Kind::Text), ("hosts", Kind::List(&Kind::Text))];
const STORE: &[(&str, Kind)] = &[
    ("kind", Kind::Enum(&["memory", "redis"])),
    ("url", Kind::Url),
    ("urls", Kind::List(&Kind::Url)),
    ("on_failure", Kind::Enum(&["local", "allow", "deny"])),
    ("max_clients", Kind::Count),
    ("timeout", Kind::Dur),
];
const UPSTREAM: &[(&str, Kind)] = &[
    ("endpoints", Kind::List(&Kind::Addr)),
    ("balance", Kind::Enum(&["p2c", "round_robin"])),
    ("connect_timeout", Kind::Dur),
    ("timeout", Kind::Dur),
    ("max_concurrency", Kind::Count),
];
const BREAKER: &[(&str, Kind)] = &[
    ("window", Kind::Dur),
    ("min_requests", Kind::Count),
    ("failure_rate", Kind::Float),
    ("open_for", Kind::Dur),
    ("half_open_requests", Kind::Count),
];
const OUTLIER: &[(&str, Kind)] =
    &[("consecutive_failures", Kind::Count), ("eject_for", Kind::Dur), ("max_ejected", Kind::Float)];
const RETRY: &[(&str, Kind)] = &[
    ("attempts", Kind::Count),
    ("budget", Kind::Float),
    ("backoff", Kind::Dur),
    ("min_per_s", Kind::Count),
    ("on", Kind::List(&Kind::Enum(&["connect", "timeout", "502", "503", "429"]))),
];
const ROUTE: &[(&str, Kind)] = &[
    ("host", Kind::Text),
    ("path_prefix", Kind::Path),
    ("client_key", Kind::KeySrc),
    ("client_key_fallback", Kind::Enum(&["ip", "reject"])),
    ("tenant_key", Kind::KeySrc),
    ("priority", Kind::Enum(&["bulk", "normal", "critical"])),
    ("tls_only", Kind::Bool),
    ("expect_traffic_within", Kind::Dur),
];
const LIMIT: &[(&str, Kind)] = &[("rate", Kind::Rate), ("burst", Kind::Count)];
const STORM: &[(&str, Kind)] = &[
    ("enabled", Kind::Bool),
    ("interval", Kind::Dur),
    ("growth_factor", Kind::Factor),
    ("growth_intervals", Kind::Count),
    ("min_rate", Kind::Rate),
    ("duplicate_window", Kind::Dur),
    ("max_duplicates", Kind::Count),
    ("quarantine", Kind::Dur),
];
const AUTH_GUARD: &[(&str, Kind)] = &[
    ("enabled", Kind::Bool),
    ("window", Kind::Dur),
    ("min_responses", Kind::Count),
    ("max_401_ratio", Kind::Float),
    ("recently_authorized", Kind::Dur),
];

/// Strings that have broken parsers before, or might.
const WEIRD: &[&str] = &[
    "",
    " ",
    "-1",
    "0",
    "NaN",
    "\u{202e}evil",
    "\u{0}",
    "ñ\u{1F4A5}",
    "${LEVEE_PROPTEST_UNSET}",
    "${LEVEE_PROPTEST_UNSET:-5s}",
    "${",
    "$${x}",
    "header:",
    "query:",
    "header:x y",
    "redis://",
    "http://",
    "127.0.0.1",
    ":80",
    "[::1]:0",
    "0.0.0.0:99999",
];

fn weird() -> BoxedStrategy<String> {
    prop_oneof![
        proptest::sample::select(WEIRD).prop_map(str::to_string),
        "\\PC{0,12}",
        "[a-z0-9:/_.-]{0,16}",
    ]
    .boxed()
}

fn integer() -> BoxedStrategy<i64> {
    prop_oneof![
        proptest::sample::select(
            &[
                0,
                1,
                -1,
                i64::MAX,
                i64::MIN,
                u32::MAX as i64,
                u32::MAX as i64 + 1,
                1 << 30,
                1 << 40,
                1_000_000,
                100_000_001,
            ][..]
        ),
        0i64..2_000,
        any::<i64>(),
    ]
    .boxed()
}

/// Any TOML value at all.
fn any_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        integer().prop_map(Value::Integer),
        prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(-0.0),
            Just(f64::MAX),
            any::<f64>()
        ]
        .prop_map(Value::Float),
        any::<bool>().prop_map(Value::Boolean),
        weird().prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| Value::Table(m.into_iter().collect())),
        ]
    })
    .boxed()
}

fn duration_text() -> BoxedStrategy<String> {
    let units = &["ns", "us", "ms", "s", "m", "h", "d", "days", "w", "months", "y", ""][..];
    prop_oneof![
        proptest::sample::select(
            &[
                "100000000000y",
                "18446744073709551615s",
                "18446744073709551615ns",
                "99999999999999999999s",
                "0s",
                "1ns",
                "-5s",
                "1h",
                "1h 1ns",
                "365days",
                "366days",
                "30days",
                "",
            ][..]
        )
        .prop_map(str::to_string),
        (any::<u64>(), proptest::sample::select(units)).prop_map(|(n, u)| format!("{n}{u}")),
        (0u64..100_000, proptest::sample::select(units)).prop_map(|(n, u)| format!("{n}{u}")),
    ]
    .boxed()
}

/// A value of the right kind for `kind`: mostly an ordinary one, so that
/// documents get past their first key and reach the checks of the later ones,
/// `check`'s summary and the TLS files; often one at or past its bounds.
fn typed(kind: Kind, h: u32) -> BoxedStrategy<Value> {
    prop_oneof![100 => sane(kind), h => extreme(kind, h)].boxed()
}

fn text(options: &'static [&'static str]) -> BoxedStrategy<Value> {
    proptest::sample::select(options).prop_map(|s| Value::String(s.to_string())).boxed()
}

/// An ordinary, valid value of `kind`.
fn sane(kind: Kind) -> BoxedStrategy<Value> {
    match kind {
        Kind::Dur => text(&["1s", "250ms", "10s", "1m", "5m", "1h", "2days"]),
        Kind::Rate => text(&["10/s", "5/s", "100/m", "5000/h", "1/h"]),
        Kind::Size => {
            prop_oneof![(1024i64..65_536).prop_map(Value::Integer), text(&["64KiB", "1MiB", "16384"])].boxed()
        }
        Kind::Count => (1i64..=10).prop_map(Value::Integer).boxed(),
        Kind::Float => (0.1f64..0.9).prop_map(Value::Float).boxed(),
        Kind::Factor => (1.1f64..10.0).prop_map(Value::Float).boxed(),
        Kind::Bool => any::<bool>().prop_map(Value::Boolean).boxed(),
        Kind::Addr => any::<u16>().prop_map(|p| Value::String(format!("127.0.0.1:{p}"))).boxed(),
        Kind::Text => text(&["*", "example.com", "API.test", "tok\u{e9}n"]),
        Kind::KeySrc => text(&["ip", "bearer", "header:x-device-id", "query:device"]),
        Kind::Url => text(&["redis://127.0.0.1:6379", "rediss://cache.test:6380/1"]),
        Kind::Enum(options) => text(options),
        Kind::Path => text(&["/", "/v1", "/v1/device", "/\u{1F4A5}"]),
        Kind::List(inner) => proptest::collection::vec(sane(*inner), 1..3).prop_map(Value::Array).boxed(),
    }
}

/// A value of the right kind at or past its bounds, or malformed.
fn extreme(kind: Kind, h: u32) -> BoxedStrategy<Value> {
    match kind {
        Kind::Dur => duration_text().prop_map(Value::String).boxed(),
        Kind::Rate => {
            let units = &["s", "m", "h", "d", ""][..];
            let count = prop_oneof![
                Just(0u64),
                Just(1_000_000),
                Just(1_000_001),
                Just(u64::from(u32::MAX)),
                1u64..5000,
                any::<u64>()
            ];
            (count, proptest::sample::select(units))
                .prop_map(|(n, u)| Value::String(format!("{n}/{u}")))
                .boxed()
        }
        Kind::Size => {
            let units = &["", "B", "KiB", "MiB", "GiB", "KB", "MB", "GB", "TB"][..];
            prop_oneof![
                integer().prop_map(Value::Integer),
                (any::<u64>(), proptest::sample::select(units))
                    .prop_map(|(n, u)| Value::String(format!("{n}{u}"))),
                (0u64..2048, proptest::sample::select(units))
                    .prop_map(|(n, u)| Value::String(format!("{n}{u}"))),
            ]
            .boxed()
        }
        Kind::Count => integer().prop_map(Value::Integer).boxed(),
        Kind::Float | Kind::Factor => prop_oneof![
            (-1.0f64..3.0).prop_map(Value::Float),
            Just(Value::Float(f64::NAN)),
            Just(Value::Float(1e308)),
            Just(Value::Integer(1)),
        ]
        .boxed(),
        Kind::Bool => any::<bool>().prop_map(Value::Boolean).boxed(),
        Kind::Addr => prop_oneof![
            any::<u16>().prop_map(|p| Value::String(format!("127.0.0.1:{p}"))),
            any::<u32>().prop_map(|p| Value::String(format!("localhost:{p}"))),
            weird().prop_map(Value::String),
        ]
        .boxed(),
        Kind::Text => weird().prop_map(Value::String).boxed(),
        Kind::KeySrc => prop_oneof![
            proptest::sample::select(&["ip", "bearer", "header:x-device-id", "query:device", ""][..])
                .prop_map(|s| Value::String(s.to_string())),
            weird().prop_map(|s| Value::String(format!("header:{s}"))),
            weird().prop_map(|s| Value::String(format!("query:{s}"))),
        ]
        .boxed(),
        Kind::Url => prop_oneof![
            any::<u32>().prop_map(|p| Value::String(format!("redis://127.0.0.1:{p}"))),
            weird().prop_map(|s| Value::String(format!("rediss://{s}"))),
            weird().prop_map(Value::String),
        ]
        .boxed(),
        Kind::Enum(_) => {
            prop_oneof![text(&["200", "999", "Memory", "p2C"]), weird().prop_map(Value::String)].boxed()
        }
        Kind::Path => {
            prop_oneof![text(&["v1", "", "//x/../y", "/%2e%2e/"]), weird().prop_map(Value::String)].boxed()
        }
        Kind::List(inner) => proptest::collection::vec(value(*inner, h), 0..4).prop_map(Value::Array).boxed(),
    }
}

/// Mostly a value of the key's kind, sometimes anything.
fn value(kind: Kind, h: u32) -> BoxedStrategy<Value> {
    prop_oneof![1000 => typed(kind, h), 2 * h => any_value()].boxed()
}

/// A table with each key of `spec` present or not.
fn table(spec: &'static [(&'static str, Kind)], h: u32) -> BoxedStrategy<Table> {
    let fields: Vec<_> = spec
        .iter()
        .map(|(key, kind)| {
            proptest::option::weighted(0.25, value(*kind, h))
                .prop_map(move |v| v.map(|v| (key.to_string(), v)))
        })
        .collect();
    fields.prop_map(|fs| fs.into_iter().flatten().collect()).boxed()
}

/// `table(spec)` with sub-tables under their names, each present or not.
fn with_children(
    base: BoxedStrategy<Table>,
    children: Vec<(&'static str, BoxedStrategy<Value>)>,
) -> BoxedStrategy<Table> {
    let kids: Vec<_> = children
        .into_iter()
        .map(|(name, s)| {
            proptest::option::weighted(0.4, s).prop_map(move |v| v.map(|v| (name.to_string(), v)))
        })
        .collect();
    (base, kids)
        .prop_map(|(mut t, kids)| {
            t.extend(kids.into_iter().flatten());
            t
        })
        .boxed()
}

/// One of `sane` mostly; one of `odd` `h` times in 100.
fn pick(sane: &'static [&'static str], odd: &'static [&'static str], h: u32) -> BoxedStrategy<&'static str> {
    prop_oneof![100 => proptest::sample::select(sane), h => proptest::sample::select(odd)].boxed()
}

fn upstream_name(h: u32) -> BoxedStrategy<&'static str> {
    pick(&["backend", "b-2"], &["\u{1F4A5}", "", "backend"], h)
}

/// The files a `[server.tls]` may name (made once per test run): a matching
/// certificate and key first, then another pair, an empty file, a missing file
/// and a directory.
struct Files {
    dir: PathBuf,
    paths: Vec<String>,
}

impl Files {
    /// A path for `cert` (`first` = 0) or `key` (1): mostly the matching pair.
    fn pick(&self, first: usize, h: u32) -> BoxedStrategy<Value> {
        let good = self.paths[first].clone();
        prop_oneof![
            100 => Just(Value::String(good)),
            h => proptest::sample::select(self.paths.clone()).prop_map(Value::String),
        ]
        .boxed()
    }
}

impl Files {
    fn make() -> Files {
        let dir = std::env::temp_dir().join(format!("levee-config-proptest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut paths = Vec::new();
        for name in ["a", "b"] {
            let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
                .unwrap_or_else(|e| panic!("rcgen: {e}"));
            for (ext, text) in [("crt", c.cert.pem()), ("key", c.key_pair.serialize_pem())] {
                let p = dir.join(format!("{name}.{ext}"));
                std::fs::write(&p, text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                paths.push(p.display().to_string());
            }
        }
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap_or_else(|e| panic!("{}: {e}", empty.display()));
        paths.push(empty.display().to_string());
        paths.push(dir.join("missing.pem").display().to_string());
        paths.push(dir.display().to_string());
        Files { dir, paths }
    }
}

fn tls(files: &Files, h: u32) -> BoxedStrategy<Value> {
    (
        files.pick(0, h),
        files.pick(1, h),
        proptest::option::of(value(Kind::Addr, h)),
        proptest::option::of(value(Kind::Enum(&["serve", "redirect", "reject"]), h)),
    )
        .prop_map(|(cert, key, listen, plain)| {
            let mut t = Table::new();
            t.insert("cert".into(), cert);
            t.insert("key".into(), key);
            // Never bind a real port in `check`; the listen key is validated only.
            t.insert("listen".into(), listen.unwrap_or_else(|| Value::String("127.0.0.1:0".into())));
            if let Some(p) = plain {
                t.insert("plain_http".into(), p);
            }
            Value::Table(t)
        })
        .boxed()
}

fn document(files: &Files, h: u32) -> BoxedStrategy<Table> {
    let server = with_children(table(SERVER, h), vec![("tls", tls(files, h))]);
    let upstream = with_children(
        table(UPSTREAM, h),
        vec![
            ("circuit_breaker", table(BREAKER, h).prop_map(Value::Table).boxed()),
            ("outlier", table(OUTLIER, h).prop_map(Value::Table).boxed()),
            ("retry", table(RETRY, h).prop_map(Value::Table).boxed()),
        ],
    );
    // Keys without a default are there in most documents.
    let upstream = (upstream, typed(Kind::List(&Kind::Addr), h)).prop_map(|(mut t, endpoints)| {
        t.entry("endpoints").or_insert(endpoints);
        t
    });
    let upstreams = proptest::collection::btree_map(upstream_name(h), upstream, usize::from(h < 10)..3);
    let limit = (table(LIMIT, h), typed(Kind::Rate, h)).prop_map(|(mut t, rate)| {
        t.entry("rate").or_insert(rate);
        Value::Table(t)
    });
    let limits = proptest::collection::vec(limit, 0..=5);
    let route = (
        with_children(
            table(ROUTE, h),
            vec![
                ("storm", table(STORM, h).prop_map(Value::Table).boxed()),
                ("auth_guard", table(AUTH_GUARD, h).prop_map(Value::Table).boxed()),
            ],
        ),
        pick(&["api", "web", "x.y_z-1"], &["a b", "", "\u{e9}"], h),
        upstream_name(h),
        limits,
    )
        .prop_map(|(mut t, name, upstream, limits)| {
            t.insert("name".into(), Value::String(name.into()));
            t.insert("upstream".into(), Value::String(upstream.into()));
            t.insert("limits".into(), Value::Array(limits));
            Value::Table(t)
        });
    // Route names repeat (a duplicate is an error) only in hostile documents.
    let routes = proptest::collection::vec(route, 0..3).prop_map(move |mut routes| {
        if h < 10 {
            for (i, r) in routes.iter_mut().enumerate() {
                if let Some(Value::String(name)) = r.get_mut("name") {
                    name.push_str(&format!("-{i}"));
                }
            }
        }
        routes
    });
    let unknown = proptest::option::weighted(0.05, ("[a-z]{1,6}", any_value()));
    (
        proptest::option::weighted(0.7, server),
        proptest::option::weighted(0.5, table(ADMIN, h)),
        proptest::option::weighted(0.5, table(STORE, h)),
        upstreams,
        routes,
        unknown,
    )
        .prop_map(move |(server, admin, store, upstreams, routes, unknown)| {
            let mut doc = Table::new();
            if let Some(s) = server {
                doc.insert("server".into(), Value::Table(s));
            }
            if let Some(a) = admin {
                doc.insert("admin".into(), Value::Table(a));
            }
            if let Some(s) = store {
                doc.insert("store".into(), Value::Table(s));
            }
            let ups: Table = upstreams.into_iter().map(|(k, v)| (k.to_string(), Value::Table(v))).collect();
            // A route names an upstream of the document unless it is hostile.
            let mut routes = routes;
            if let (true, Some(first)) = (h < 10, ups.keys().next()) {
                for r in routes.iter_mut().filter_map(Value::as_table_mut) {
                    if !r.get("upstream").and_then(Value::as_str).is_some_and(|u| ups.contains_key(u)) {
                        r.insert("upstream".into(), Value::String(first.clone()));
                    }
                }
            }
            doc.insert("upstreams".into(), Value::Table(ups));
            doc.insert("routes".into(), Value::Array(routes));
            if let Some((k, v)) = unknown {
                doc.entry(k).or_insert(v);
            }
            doc
        })
        .boxed()
}

/// The error names a key: its message starts with a key path.
fn names_a_key(e: &ConfigError) -> bool {
    match e {
        ConfigError::Invalid { path, .. } | ConfigError::MissingEnv { path, .. } => *path != KeyPath::root(),
        ConfigError::Read { .. } | ConfigError::Syntax(_) => false,
    }
}

/// Whatever the loader accepts holds no value that can overflow downstream:
/// every limit has an emission interval of at least one tick and a capacity
/// that did not saturate, in both stores' units.
fn accepted_values_are_in_range(config: &Config) {
    for r in &config.routes {
        for l in &r.limits {
            for tick in [Duration::from_nanos(1), Duration::from_micros(1)] {
                let g = crate::store::gcra::Gcra::new(l, tick);
                assert!(g.interval >= 1 && g.capacity < u64::MAX / 2, "{} {l:?}: {g:?}", r.name);
            }
        }
        if let Some(d) = r.expect_traffic_within {
            assert!(tokio::time::Instant::now().checked_add(d).is_some());
        }
    }
}

#[test]
fn random_documents_never_panic_the_loader_or_check() {
    let files = Files::make();
    let path = files.dir.join("levee.toml");
    let config = ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() };
    // Per document, how hostile its values are (per 100 ordinary ones): a few
    // bad values let most documents pass and reach `check`'s summary and the
    // TLS checks; many make sure each key meets extreme values.
    let documents = prop_oneof![document(&files, 1), document(&files, 5), document(&files, 40)];
    proptest!(config, |(doc in documents)| {
        let text = toml::to_string(&doc).map_err(|e| TestCaseError::fail(format!("serialize: {e}")))?;
        std::fs::write(&path, &text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match load(&path) {
            Ok(config) => accepted_values_are_in_range(&config),
            Err(e) => prop_assert!(names_a_key(&e), "the error names no key: {e}\n{text}"),
        }
        let report = super::check_report(&path);
        prop_assert!(report.ok || report.err.starts_with("error: "), "{report:?}");
    });
    let _ = std::fs::remove_dir_all(&files.dir);
}
