//! Paths and authority: no spelling of a limited path reaches another route,
//! the upstream receives the path levee limited, and a request has one authority.

use super::raw;
use crate::support::{base_config, Backend, Client, TestGateway};

fn config(backend: std::net::SocketAddr, name: &str) -> String {
    base_config()
        + &format!(
            r#"
[upstreams.{name}]
endpoints = ["{backend}"]

[[routes]]
name = "{name}-device"
path_prefix = "/v1/device"
upstream = "{name}"
client_key = "header:x-device-id"
[[routes.limits]]
rate = "5/m"
[routes.storm]
enabled = false

[[routes]]
name = "{name}-default"
path_prefix = "/"
upstream = "{name}"
[routes.storm]
enabled = false
"#
        )
}

#[tokio::test]
async fn no_spelling_of_a_limited_path_escapes_its_limit() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&config(backend.addr, "hostile-paths")).await;
    let client = Client::new();
    let dev = [("x-device-id", "dev-spell")];
    for _ in 0..5 {
        assert_eq!(client.get_with(gw.http, "/v1/device/x", &dev).await.status, 200);
    }
    for spelling in [
        "/v1/device/x",
        "//v1/device/x",
        "/v1//device/x",
        "/v1/%64evice/x",
        "/v1/device/../device/x",
        "/v1/./device/x",
        "/v1/other/../device/x",
        "/%76%31/device/x",
    ] {
        let req = format!(
            "GET {spelling} HTTP/1.1\r\nHost: t\r\nx-device-id: dev-spell\r\nConnection: close\r\n\r\n"
        );
        let rsp = raw(gw.http, req.as_bytes()).await;
        assert!(rsp.starts_with("HTTP/1.1 429"), "{spelling} escaped the limit: {rsp}");
        assert!(rsp.contains("x-levee-reason: rate_limited"), "{rsp}");
        assert!(rsp.contains("\"route\":\"hostile-paths-device\""), "{rsp}");
    }
    // Another device, a spelled path: routed and forwarded as the one path.
    let req = "GET /v1//%64evice/./y/../x?q=1 HTTP/1.1\r\nHost: t\r\nx-device-id: dev-other\r\nConnection: close\r\n\r\n";
    let rsp = raw(gw.http, req.as_bytes()).await;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert_eq!(backend.last().unwrap().uri.to_string(), "/v1/device/x?q=1");
}

#[tokio::test]
async fn structure_changing_spellings_are_400() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&config(backend.addr, "hostile-encoded")).await;
    for path in
        ["/v1%2Fdevice/x", "/v1/%2E%2E/admin", "/v1/..;/admin", "/../etc/passwd", "/v1/device%5Cx", "/a/%00"]
    {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let rsp = raw(gw.http, req.as_bytes()).await;
        assert!(rsp.starts_with("HTTP/1.1 400"), "{path}: {rsp}");
        assert!(rsp.contains("x-levee-reason: bad_request"), "{path}: {rsp}");
    }
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn one_request_has_one_authority() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&config(backend.addr, "hostile-authority")).await;
    // An absolute-form target naming another host than Host.
    let rsp =
        raw(gw.http, b"GET http://other.example/v1/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
    assert!(rsp.starts_with("HTTP/1.1 400"), "{rsp}");
    assert!(rsp.contains("x-levee-reason: bad_request"), "{rsp}");
    // Two Host headers.
    let rsp =
        raw(gw.http, b"GET /v1/x HTTP/1.1\r\nHost: t\r\nHost: other.example\r\nConnection: close\r\n\r\n")
            .await;
    assert!(rsp.starts_with("HTTP/1.1 400"), "{rsp}");
    assert_eq!(backend.requests(), 0);
    // An absolute-form target that agrees with Host is fine, and forwarded with that Host.
    let rsp = raw(gw.http, b"GET http://t/v1/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert_eq!(backend.last().unwrap().headers["host"], "t");
}
