//! Hostile input: admin. What a web page in the operator's browser (DNS
//! rebinding, cross-site requests, framing) or a caller without the token
//! would try against the admin listener (SPEC, the rules under the Admin API
//! table). Route names start with `hadm-`: the metrics recorder is shared.

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{base_config, upstream_and_route, Backend, Client, TestGateway, TestResponse};

const TOKEN: &str = "hadm-s3cret";

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// A limited route keyed by `x-device-id`, and `[admin]` with `extra` lines.
fn config(backend: SocketAddr, route: &str, prefix: &str, admin: &str) -> String {
    base_config().replace("[admin]", &format!("[admin]\n{admin}"))
        + &upstream_and_route(&format!("{route}-up"), &[backend], route, prefix)
            .replace("path_prefix", "client_key = \"header:x-device-id\"\npath_prefix")
        + "[[routes.limits]]\nrate = \"1/m\"\n"
}

fn assert_refused(rsp: &TestResponse, status: u16, error: &str, what: &str) {
    assert_eq!(rsp.status, status, "{what}: {}", rsp.text());
    assert_eq!(rsp.json()["error"], error, "{what}: {}", rsp.text());
    assert!(rsp.headers["content-type"].to_str().unwrap().contains("application/json"), "{what}");
}

/// The status and head of `GET /api/v1/events` (the body never ends: not read).
async fn events_status(admin: SocketAddr, headers: &[(&str, &str)]) -> (u16, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut req = http::Request::get(format!("http://{admin}/api/v1/events"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let rsp =
        tokio::time::timeout(Duration::from_secs(5), client.request(req.body(Default::default()).unwrap()))
            .await
            .expect("the event stream's head within 5 s")
            .unwrap();
    let kind = rsp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (rsp.status().as_u16(), kind)
}

/// Sends `raw` on a fresh connection and returns the status of the answer.
async fn raw_status(addr: SocketAddr, raw: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"))
}

#[tokio::test]
async fn with_a_token_every_call_but_probes_metrics_and_the_page_needs_it() {
    let backend = Backend::start().await;
    let toml = config(backend.addr, "hadm-token", "/tok", &format!("token = \"{TOKEN}\""));
    let gw = TestGateway::start(&toml).await;
    let c = Client::new();
    // A tracked client, so that its key exists to be leaked.
    assert_eq!(c.get_with(gw.http, "/tok/x", &[("x-device-id", "hadm-device-7")]).await.status, 200);
    let client_path = "/api/v1/clients/hadm-device-7?route=hadm-token";

    let protected: [(Method, &str); 5] = [
        (Method::GET, "/api/v1/state"),
        (Method::GET, client_path),
        (Method::GET, "/api/v1/config"),
        (Method::POST, "/api/v1/reload"),
        (Method::DELETE, client_path),
    ];
    for (method, path) in &protected {
        for auth in [None, Some("Bearer wrong"), Some("Bearer "), Some(TOKEN), Some("Basic aGFkbS1zM2NyZXQ=")]
        {
            let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
            let rsp = c.request_with(method.clone(), gw.admin, path, &headers).await;
            assert_refused(&rsp, 401, "unauthorized", &format!("{method} {path} with {auth:?}"));
            assert_eq!(rsp.headers["www-authenticate"], "Bearer");
            assert!(!rsp.text().contains("hadm-device-7"), "a 401 shows the client key");
        }
    }
    assert_eq!(events_status(gw.admin, &[]).await.0, 401, "events without the token");
    assert_eq!(events_status(gw.admin, &[("authorization", "Bearer nope")]).await.0, 401);

    // With the token: every call answers (DELETE last: it resets the client).
    let auth = bearer();
    let with = [("authorization", auth.as_str())];
    let state = c.request_with(Method::GET, gw.admin, "/api/v1/state", &with).await;
    assert_eq!(state.status, 200, "{}", state.text());
    assert!(state.json()["routes"].as_array().unwrap().iter().any(|r| r["name"] == "hadm-token"));
    let client = c.request_with(Method::GET, gw.admin, client_path, &with).await;
    assert_eq!(client.status, 200, "{}", client.text());
    assert_eq!(client.json()["client"], "hadm-device-7");
    assert_eq!(c.request_with(Method::GET, gw.admin, "/api/v1/config", &with).await.status, 200);
    let reload = c.request_with(Method::POST, gw.admin, "/api/v1/reload", &with).await;
    assert_eq!(
        (reload.status.as_u16(), reload.json()["result"].clone()),
        (200, "applied".into()),
        "{}",
        reload.text()
    );
    assert_eq!(c.request_with(Method::DELETE, gw.admin, client_path, &with).await.status, 200);
    // The scheme is case-insensitive (RFC 7235).
    let lower = format!("bearer {TOKEN}");
    assert_eq!(
        c.request_with(Method::GET, gw.admin, "/api/v1/config", &[("authorization", &lower)]).await.status,
        200
    );
    let (status, kind) = events_status(gw.admin, &with).await;
    assert_eq!((status, kind.as_str()), (200, "text/event-stream"));

    // Probes, the scraper and the page itself need no token.
    for path in ["/healthz", "/readyz", "/metrics", "/dashboard", "/dashboard.js", "/dashboard.css"] {
        assert_eq!(c.get(gw.admin, path).await.status, 200, "{path} without the token");
    }
    // Anything else is behind the token, even a path that does not exist.
    assert_eq!(c.get(gw.admin, "/api/v1/nope").await.status, 401);
}

#[tokio::test]
async fn only_ip_literals_localhost_and_admin_hosts_are_served() {
    let backend = Backend::start().await;
    let gw =
        TestGateway::start(&config(backend.addr, "hadm-host", "/host", "hosts = [\"Admin.Example\"]")).await;
    let c = Client::new();
    let port = gw.admin.port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        format!("[::1]:{port}"),
        format!("admin.example:{port}"),
        "ADMIN.EXAMPLE".to_string(),
    ] {
        for path in ["/healthz", "/api/v1/state"] {
            let rsp = c.get_with(gw.admin, path, &[("host", &host)]).await;
            assert_eq!(rsp.status, 200, "Host {host} {path}: {}", rsp.text());
        }
    }
    // DNS rebinding: a page on evil.example whose name now points at 127.0.0.1.
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("admin.example.evil.example:{port}"),
    ] {
        for path in ["/healthz", "/api/v1/state", "/dashboard", "/metrics"] {
            let rsp = c.get_with(gw.admin, path, &[("host", &host)]).await;
            assert_refused(&rsp, 403, "host_not_allowed", &format!("Host {host} {path}"));
        }
    }
    // A rebinding page cannot reload either, token or not.
    let before = c.get(gw.admin, "/api/v1/config").await.json();
    let rsp = c.request_with(Method::POST, gw.admin, "/api/v1/reload", &[("host", "evil.example")]).await;
    assert_refused(&rsp, 403, "host_not_allowed", "reload from a foreign Host");
    assert_eq!(c.get(gw.admin, "/api/v1/config").await.json()["last_reload"], before["last_reload"]);

    // Absolute form: the authority in the request line is the target.
    let absolute =
        "GET http://evil.example/api/v1/state HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(gw.admin, absolute).await, 403, "absolute-form foreign authority");
    // No Host, or two: a browser never sends either.
    assert_eq!(raw_status(gw.admin, "GET /api/v1/state HTTP/1.1\r\nConnection: close\r\n\r\n").await, 400);
    let two = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(gw.admin, two).await, 400, "two Host headers");
    let local = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(gw.admin, local).await, 200);
}

#[tokio::test]
async fn a_cross_site_reload_is_refused_and_the_config_kept() {
    let backend = Backend::start().await;
    // No token: the shipped default, where mutating calls from loopback are accepted.
    let toml = config(backend.addr, "hadm-csrf", "/csrf", "");
    let gw = TestGateway::start(&toml).await;
    let c = Client::new();
    let before = c.get(gw.admin, "/api/v1/config").await.json();
    assert_eq!(c.get(gw.http, "/hadm-new/x").await.status, 404, "no route yet");
    // The file changes: a reload would add a route.
    gw.write_config(
        &(toml.clone()
            + &upstream_and_route("hadm-csrf-new-up", &[backend.addr], "hadm-csrf-new", "/hadm-new")),
    );

    let same = format!("http://127.0.0.1:{}", gw.admin.port());
    for origin in
        ["http://evil.example", "https://evil.example", "null", "http://127.0.0.1:1", "http://localhost"]
    {
        let rsp = c.request_with(Method::POST, gw.admin, "/api/v1/reload", &[("origin", origin)]).await;
        assert_refused(&rsp, 403, "cross_origin", &format!("reload from Origin {origin}"));
        let rsp = c
            .request_with(
                Method::DELETE,
                gw.admin,
                "/api/v1/clients/x?route=hadm-csrf",
                &[("origin", origin)],
            )
            .await;
        assert_refused(&rsp, 403, "cross_origin", &format!("reset from Origin {origin}"));
    }
    let now = c.get(gw.admin, "/api/v1/config").await.json();
    assert_eq!(now["hash"], before["hash"], "a cross-site POST reloaded the config");
    assert!(now["last_reload"].is_null(), "a reload was attempted: {now}");
    assert_eq!(c.get(gw.http, "/hadm-new/x").await.status, 404, "the new route is served");
    // A GET with a foreign Origin reads nothing it could not read anyway: only mutations are refused.
    assert_eq!(c.get_with(gw.admin, "/healthz", &[("origin", "http://evil.example")]).await.status, 200);

    // The dashboard's own page (same origin) may reload.
    let rsp = c.request_with(Method::POST, gw.admin, "/api/v1/reload", &[("origin", &same)]).await;
    assert_eq!(
        (rsp.status.as_u16(), rsp.json()["result"].clone()),
        (200, "applied".into()),
        "{}",
        rsp.text()
    );
    assert_ne!(c.get(gw.admin, "/api/v1/config").await.json()["hash"], before["hash"]);
    assert_eq!(c.get(gw.http, "/hadm-new/x").await.status, 200, "the reloaded route");
    // And so may curl (no Origin).
    assert_eq!(gw.reload().await.status, 200);
}

#[tokio::test]
async fn no_admin_answer_can_be_framed() {
    let backend = Backend::start().await;
    let gw =
        TestGateway::start(&config(backend.addr, "hadm-frame", "/frame", &format!("token = \"{TOKEN}\"")))
            .await;
    let c = Client::new();
    let auth = bearer();
    let answers = [
        ("dashboard", c.get(gw.admin, "/dashboard").await),
        ("script", c.get(gw.admin, "/dashboard.js").await),
        ("stylesheet", c.get(gw.admin, "/dashboard.css").await),
        ("state", c.get_with(gw.admin, "/api/v1/state", &[("authorization", &auth)]).await),
        ("healthz", c.get(gw.admin, "/healthz").await),
        ("401", c.get(gw.admin, "/api/v1/state").await),
        ("403", c.get_with(gw.admin, "/healthz", &[("host", "evil.example")]).await),
    ];
    for (what, rsp) in &answers {
        let csp = rsp.headers.get("content-security-policy").map(|v| v.to_str().unwrap()).unwrap_or("");
        assert!(csp.contains("frame-ancestors 'none'"), "{what}: CSP {csp:?}");
        assert_eq!(rsp.headers.get("x-frame-options").map(|v| v.to_str().unwrap()), Some("DENY"), "{what}");
    }
    // The page allows nothing from elsewhere.
    let page = &answers[0].1;
    assert_eq!(page.status, 200);
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
}
