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
