use std::path::Path;
use std::time::Duration;

use super::*;

fn parse_with(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    parse(text, Path::new("."), &move |name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
}

const MINIMAL: &str = r#"
[upstreams.backend]
endpoints = ["127.0.0.1:3000"]

[[routes]]
name = "api"
upstream = "backend"
"#;

#[test]
fn defaults_are_the_contracts() {
    let c = parse_with(MINIMAL, &[]).unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.server.max_connections, 10_000);
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.server.max_header_bytes, 16_384);
    assert_eq!(c.server.max_body_bytes, 10 << 20);
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9901");
    assert_eq!(c.store.max_clients, 1_000_000);
    let u = &c.upstreams[0];
    assert_eq!(
        (u.connect_timeout, u.timeout, u.max_concurrency),
        (Duration::from_secs(1), Duration::from_secs(30), 1024)
    );
    assert_eq!(u.circuit_breaker.min_requests, 20);
    assert_eq!(u.retry.attempts, 2);
    assert!(u.retry.on_connect && u.retry.on_status == [502, 503, 504]);
    let r = &c.routes[0];
    assert_eq!((r.host.as_deref(), r.path_prefix.as_str(), r.priority), (None, "/", Priority::Normal));
    assert!(r.storm.enabled && r.auth_guard.enabled);
}

#[test]
fn env_vars_substitute_with_and_without_defaults() {
    let text = MINIMAL.replace("127.0.0.1:3000", "${BACKEND}")
        + "[admin]\ntoken = \"${TOKEN:-}\"\nlisten = \"${ADMIN:-127.0.0.1:9999}\"\n";
    let c = parse_with(&text, &[("BACKEND", "10.0.0.1:80")]).unwrap();
    assert_eq!(c.upstreams[0].endpoints[0].authority.as_str(), "10.0.0.1:80");
    assert_eq!(c.admin.token, None);
    assert_eq!(c.admin.listen.port(), 9999);
    let err = parse_with(&text, &[]).unwrap_err().to_string();
    assert!(
        err.starts_with("upstreams.backend.endpoints[0]: environment variable BACKEND is not set"),
        "{err}"
    );
    assert!(err.contains("(line 3, column 14)"), "{err}");
}

#[test]
fn limits_default_burst_to_the_rate_count() {
    let text = MINIMAL.to_string()
        + "[[routes.limits]]\nrate = \"50/m\"\n[[routes.limits]]\nrate = \"10/s\"\nburst = 3\n";
    let c = parse_with(&text, &[]).unwrap();
    let l = &c.routes[0].limits;
    assert_eq!((l[0].rate.per, l[0].burst.get()), (Duration::from_secs(60), 50));
    assert_eq!(l[1].burst.get(), 3);
}

#[test]
fn out_of_range_values_name_their_key() {
    for (patch, key) in [
        (
            "[upstreams.backend.circuit_breaker]\nfailure_rate = 1.5\n",
            "upstreams.backend.circuit_breaker.failure_rate",
        ),
        ("[upstreams.backend.retry]\non = [\"teapot\"]\n", "upstreams.backend.retry.on[0]"),
        ("[store]\nmax_clients = 0\n", "store.max_clients"),
    ] {
        let err = parse_with(&(MINIMAL.to_string() + patch), &[]).unwrap_err().to_string();
        assert!(err.starts_with(key), "{err}");
    }
    let err = parse_with(&MINIMAL.replace("\"api\"", "\"a b\""), &[]).unwrap_err().to_string();
    assert!(err.starts_with("routes[0].name"), "{err}");
}

/// Every duration, size and count has an upper bound; past it the error names
/// the key and the bound, and extreme values never reach `Duration`/`Instant`
/// arithmetic.
#[test]
fn every_duration_size_and_count_has_an_upper_bound() {
    let cases: &[(&str, &str, &str)] = &[
        ("[server]\nbody_read_timeout = \"2h\"\n", "server.body_read_timeout", "must be at most 1h, got 2h"),
        ("[server]\nheader_read_timeout = \"61m\"\n", "server.header_read_timeout", "at most 1h"),
        ("[server]\nidle_timeout = \"1day\"\n", "server.idle_timeout", "at most 1h"),
        ("[server]\nshutdown_grace = \"3h\"\n", "server.shutdown_grace", "at most 1h"),
        ("[server]\nbuffer_body_bytes = \"2GiB\"\n", "server.buffer_body_bytes", "at most 1073741824 bytes"),
        ("[server]\nmax_body_bytes = \"1025MiB\"\n", "server.max_body_bytes", "at most 1073741824 bytes"),
        ("[server]\nmax_connections = 1000001\n", "server.max_connections", "between 1 and 1000000"),
        (
            "[server]\nh2_max_concurrent_streams = 10001\n",
            "server.h2_max_concurrent_streams",
            "between 1 and 10000",
        ),
        ("[store]\nmax_clients = 100000001\n", "store.max_clients", "between 1 and 100000000"),
        ("[store]\ntimeout = \"2m\"\n", "store.timeout", "at most 1m"),
        (
            "[upstreams.backend]\nconnect_timeout = \"2h\"\n",
            "upstreams.backend.connect_timeout",
            "at most 1h",
        ),
        ("[upstreams.backend]\ntimeout = \"2h\"\n", "upstreams.backend.timeout", "at most 1h"),
        ("[upstreams.backend]\nmax_concurrency = 1000001\n", "upstreams.backend.max_concurrency", "between"),
        (
            "[upstreams.backend.circuit_breaker]\nwindow = \"25h\"\n",
            "upstreams.backend.circuit_breaker.window",
            "at most 1day",
        ),
        (
            "[upstreams.backend.circuit_breaker]\nopen_for = \"25h\"\n",
            "upstreams.backend.circuit_breaker.open_for",
            "at most 1day",
        ),
        (
            "[upstreams.backend.circuit_breaker]\nmin_requests = 1000001\n",
            "upstreams.backend.circuit_breaker.min_requests",
            "between",
        ),
        (
            "[upstreams.backend.circuit_breaker]\nhalf_open_requests = 10001\n",
            "upstreams.backend.circuit_breaker.half_open_requests",
            "between",
        ),
        (
            "[upstreams.backend.outlier]\neject_for = \"2days\"\n",
            "upstreams.backend.outlier.eject_for",
            "at most 1day",
        ),
        (
            "[upstreams.backend.outlier]\nconsecutive_failures = 1000001\n",
            "upstreams.backend.outlier.consecutive_failures",
            "between",
        ),
        ("[upstreams.backend.retry]\nbackoff = \"61s\"\n", "upstreams.backend.retry.backoff", "at most 1m"),
        (
            "[upstreams.backend.retry]\nmin_per_s = 1000001\n",
            "upstreams.backend.retry.min_per_s",
            "between 0 and 1000000",
        ),
        (
            "[upstreams.backend.retry]\nattempts = 11\n",
            "upstreams.backend.retry.attempts",
            "between 1 and 10",
        ),
        ("expect_traffic_within = \"31days\"\n", "routes[0].expect_traffic_within", "at most 30days"),
        ("expect_traffic_within = \"0s\"\n", "routes[0].expect_traffic_within", "longer than zero"),
        ("[[routes.limits]]\nrate = \"1000001/s\"\n", "routes[0].limits[0].rate", "at most 1000000/s"),
        ("[[routes.limits]]\nrate = \"1/h\"\nburst = 721\n", "routes[0].limits[0].burst", "at most 30days"),
        (
            "[[routes.limits]]\nrate = \"1/h\"\nburst = 4294967295\n",
            "routes[0].limits[0].burst",
            "per client",
        ),
        ("[routes.storm]\ninterval = \"61m\"\n", "routes[0].storm.interval", "at most 1h"),
        ("[routes.storm]\ngrowth_intervals = 101\n", "routes[0].storm.growth_intervals", "between 1 and 100"),
        ("[routes.storm]\nmin_rate = \"4294967295/s\"\n", "routes[0].storm.min_rate", "at most 1000000/s"),
        ("[routes.storm]\nduplicate_window = \"25h\"\n", "routes[0].storm.duplicate_window", "at most 1day"),
        ("[routes.storm]\nmax_duplicates = 1000001\n", "routes[0].storm.max_duplicates", "between"),
        ("[routes.storm]\nquarantine = \"8days\"\n", "routes[0].storm.quarantine", "at most 7days"),
        ("[routes.auth_guard]\nwindow = \"25h\"\n", "routes[0].auth_guard.window", "at most 1day"),
        ("[routes.auth_guard]\nmin_responses = 1000001\n", "routes[0].auth_guard.min_responses", "between"),
        (
            "[routes.auth_guard]\nrecently_authorized = \"8days\"\n",
            "routes[0].auth_guard.recently_authorized",
            "at most 7days",
        ),
        // Values humantime parses into durations that overflow an `Instant`.
        ("[server]\nbody_read_timeout = \"100000000000y\"\n", "server.body_read_timeout", "at most 365 days"),
        (
            "[upstreams.backend.circuit_breaker]\nopen_for = \"18446744073709551615s\"\n",
            "upstreams.backend.circuit_breaker.open_for",
            "at most 365 days",
        ),
        (
            "[server]\nshutdown_grace = \"99999999999999999999999s\"\n",
            "server.shutdown_grace",
            "expected a duration",
        ),
    ];
    for (patch, key, says) in cases {
        // Keys of the upstream's own table go into the table MINIMAL already opens.
        let text = match patch.strip_prefix("[upstreams.backend]\n") {
            Some(line) => MINIMAL.replace("\"127.0.0.1:3000\"]\n", &format!("\"127.0.0.1:3000\"]\n{line}")),
            None => MINIMAL.to_string() + patch,
        };
        let err = parse_with(&text, &[]).map(|_| ()).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{key}: ")), "{patch}: {err}");
        assert!(err.contains(says), "{patch}: {err}");
    }
}

/// The bounds themselves are accepted: they are limits, not traps.
#[test]
fn values_at_their_bounds_are_accepted() {
    let text = MINIMAL.to_string()
        + "expect_traffic_within = \"30days\"\n\
           [[routes.limits]]\nrate = \"1000000/s\"\n\
           [[routes.limits]]\nrate = \"1/h\"\nburst = 720\n\
           [routes.storm]\nquarantine = \"7days\"\ngrowth_intervals = 100\n\
           [routes.auth_guard]\nrecently_authorized = \"7days\"\n\
           [server]\nbody_read_timeout = \"1h\"\nmax_body_bytes = \"1GiB\"\nbuffer_body_bytes = \"1GiB\"\n\
           max_connections = 1000000\nshutdown_grace = \"0s\"\n\
           [store]\nmax_clients = 100000000\ntimeout = \"1m\"\n\
           [upstreams.backend.circuit_breaker]\nwindow = \"1day\"\n\
           [upstreams.backend.retry]\nbackoff = \"0s\"\nmin_per_s = 0\n";
    let c = parse_with(&text, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.routes[0].expect_traffic_within, Some(Duration::from_secs(30 * 86_400)));
    assert_eq!(c.routes[0].limits[1].burst.get(), 720);
    assert_eq!(c.server.max_body_bytes, 1 << 30);
    assert_eq!(c.store.max_clients, 100_000_000);
}

/// Writes a fresh self-signed certificate for `localhost` and its key.
fn write_cert(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (crt, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&crt, c.cert.pem()).unwrap();
    std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
    (crt, key)
}

fn tls_text(crt: &Path, key: &Path) -> String {
    format!("{MINIMAL}[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n", crt.display(), key.display())
}

#[test]
fn a_tls_key_must_match_its_certificate() {
    let dir = std::env::temp_dir().join(format!("levee-config-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (crt, key) = write_cert(&dir, "levee");
    let (_, other_key) = write_cert(&dir, "other");
    let c = parse_with(&tls_text(&crt, &key), &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.tls.as_ref().map(|t| t.chain.len()), Some(1));

    let err = parse_with(&tls_text(&crt, &other_key), &[]).map(|_| ()).unwrap_err().to_string();
    let expected = format!(
        "server.tls.key: {} does not match the certificate in {}",
        other_key.display(),
        crt.display()
    );
    assert!(err.starts_with(&expected), "{err}");

    // A key file without a key, and a certificate file without a certificate.
    let err = parse_with(&tls_text(&crt, &crt), &[]).map(|_| ()).unwrap_err().to_string();
    assert!(err.starts_with("server.tls.key: ") && err.contains("holds no PEM private key"), "{err}");
    let err = parse_with(&tls_text(&key, &key), &[]).map(|_| ()).unwrap_err().to_string();
    assert!(err.starts_with("server.tls.cert: ") && err.contains("holds no certificate"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
