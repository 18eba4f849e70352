//! The client's address behind a load balancer: the PROXY protocol (v1 and v2,
//! plain and TLS) and `trusted_proxies` with `X-Forwarded-For`, each seen by a
//! route keyed on `client_key = "ip"` and by the backend's `x-forwarded-for`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::gateway::metric_value;
use crate::support::{base_config, temp_dir, upstream_and_route, Backend, Client, TestGateway};

/// `server_lines` added to `[server]`; one route `route` on `/` keyed by the
/// client's address, 2 requests a minute each.
fn config(server_lines: &str, backend: SocketAddr, upstream: &str, route: &str) -> String {
    base_config().replace("shutdown_grace = \"5s\"", &format!("shutdown_grace = \"5s\"\n{server_lines}"))
        + &upstream_and_route(upstream, &[backend], route, "/")
            .replace(&format!("upstream = \"{upstream}\""), &format!("upstream = \"{upstream}\"\nclient_key = \"ip\""))
        + "[[routes.limits]]\nrate = \"2/m\"\nburst = 2\n"
        // The storm detector would key on the same address; these tests look at the limit.
        + "[routes.storm]\nenabled = false\n"
}

/// A PROXY v1 line claiming `src` (IPv4).
fn v1(src: &str) -> Vec<u8> {
    format!("PROXY TCP4 {src} 127.0.0.1 40000 8080\r\n").into_bytes()
}

/// A PROXY v2 PROXY header over TCP/IPv4 claiming `src`, with one TLV.
fn v2(src: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x11, 0x00, 12 + 6]);
    h.extend(src);
    h.extend([127, 0, 0, 1]);
    h.extend(40000u16.to_be_bytes());
    h.extend(8080u16.to_be_bytes());
    h.extend([0xEA, 0x00, 0x03, b'v', b'p', b'c']);
    h
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

/// Writes `bytes` on `io` and reads until the server closes it (at most 10 s).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, bytes: &[u8]) -> String {
    io.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `header` then a GET on a fresh connection; the status, or 0 if closed unanswered.
async fn proxied(addr: SocketAddr, header: &[u8]) -> u16 {
    let answer = exchange(TcpStream::connect(addr).await.unwrap(), &[header, GET].concat()).await;
    status_of(&answer)
}

fn status_of(answer: &str) -> u16 {
    answer.strip_prefix("HTTP/1.1 ").and_then(|s| s.get(..3)).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn seen_xff(backend: &Backend) -> String {
    let last = backend.last().expect("the backend saw no request");
    let all: Vec<&str> =
        last.headers.get_all("x-forwarded-for").iter().map(|v| v.to_str().unwrap()).collect();
    all.join(" | ")
}

async fn closed_for_proxy_protocol(gw: &TestGateway, listener: &str) -> f64 {
    let labels = [format!("listener=\"{listener}\""), "reason=\"proxy_protocol\"".to_string()];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    metric_value(&gw.metrics().await, "levee_connections_closed_total", &labels).unwrap_or(0.0)
}

/// Polls the counter until it grew by `by` (the close is counted just after the socket closes).
async fn wait_closed_count(gw: &TestGateway, listener: &str, before: f64, by: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = closed_for_proxy_protocol(gw, listener).await;
        if now - before >= by || tokio::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn proxy_protocol_sources_get_their_own_buckets_and_reach_the_backend() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&config("proxy_protocol = true", backend.addr, "b-pp", "addr-pp")).await;

    // 203.0.113.7 by v1: two pass, the third is limited.
    for _ in 0..2 {
        assert_eq!(proxied(gw.http, &v1("203.0.113.7")).await, 200);
    }
    assert_eq!(seen_xff(&backend), "203.0.113.7");
    assert_eq!(proxied(gw.http, &v1("203.0.113.7")).await, 429);
    // 198.51.100.9 by v2 has a bucket of its own, and the backend sees it.
    assert_eq!(proxied(gw.http, &v2([198, 51, 100, 9])).await, 200);
    assert_eq!(seen_xff(&backend), "198.51.100.9");
    assert_eq!(proxied(gw.http, &v2([198, 51, 100, 9])).await, 200);
    assert_eq!(proxied(gw.http, &v2([198, 51, 100, 9])).await, 429);
    // v1 UNKNOWN (a health check): the socket's address, loopback, a third bucket.
    assert_eq!(proxied(gw.http, b"PROXY UNKNOWN\r\n").await, 200);
    assert_eq!(seen_xff(&backend), "127.0.0.1");
    assert_eq!(backend.requests(), 5);
}

#[tokio::test]
async fn without_a_valid_proxy_header_a_connection_is_closed_unanswered_and_counted() {
    let backend = Backend::start().await;
    let gw =
        TestGateway::start(&config("proxy_protocol = true", backend.addr, "b-pp-bad", "addr-pp-bad")).await;
    let before = closed_for_proxy_protocol(&gw, "http").await;

    // A plain request, a TLS ClientHello's first bytes, a forged v1 line, and
    // a v2 header declaring more than levee reads.
    let mut oversized = v2([1, 2, 3, 4]);
    oversized[14..16].copy_from_slice(&4096u16.to_be_bytes());
    for header in [&b""[..], b"\x16\x03\x01\x00\x05hello", b"PROXY TCP4 1.2.3.4 x 1 2\r\n", &oversized] {
        let answer = exchange(TcpStream::connect(gw.http).await.unwrap(), &[header, GET].concat()).await;
        assert_eq!(answer, "", "answered without a PROXY header: {header:?}");
    }
    let after = wait_closed_count(&gw, "http", before, 4.0).await;
    assert!(after - before >= 4.0, "{before} -> {after}");
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn the_proxy_header_comes_before_the_tls_handshake() {
    let backend = Backend::start().await;
    let dir = temp_dir("pp-tls");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let tls = format!(
        "\n[server.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    let text = config("proxy_protocol = true", backend.addr, "b-pp-tls", "addr-pp-tls").replacen(
        "\n[admin]",
        &format!("{tls}\n[admin]"),
        1,
    );
    let gw = TestGateway::start(&text).await;
    let https = gw.https.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    for expected in [200, 200, 429] {
        let mut tcp = TcpStream::connect(https).await.unwrap();
        tcp.write_all(&v2([192, 0, 2, 44])).await.unwrap();
        let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
        assert_eq!(status_of(&exchange(tls, GET).await), expected);
    }
    assert_eq!(seen_xff(&backend), "192.0.2.44");

    // A ClientHello without the header: closed before any handshake, counted.
    let before = closed_for_proxy_protocol(&gw, "https").await;
    let tcp = TcpStream::connect(https).await.unwrap();
    assert!(connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.is_err());
    let after = wait_closed_count(&gw, "https", before, 1.0).await;
    assert!(after - before >= 1.0, "{before} -> {after}");
    assert_eq!(backend.requests(), 2);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_the_client() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&config(
        "trusted_proxies = [\"127.0.0.0/8\"]",
        backend.addr,
        "b-trusted",
        "addr-trusted",
    ))
    .await;
    let client = Client::new();
    let from = |xff: &'static str| {
        let client = &client;
        let gw = &gw;
        async move { client.get_with(gw.http, "/", &[("x-forwarded-for", xff)]).await }
    };

    for _ in 0..2 {
        assert_eq!(from("203.0.113.7").await.status, 200);
    }
    // The chain is passed on, with the trusted peer appended.
    assert_eq!(seen_xff(&backend), "203.0.113.7, 127.0.0.1");
    // The chain's trusted hop is skipped: this is 203.0.113.7 again, limited.
    let limited = from("203.0.113.7, 127.0.0.5").await;
    assert_eq!((limited.status.as_u16(), limited.reason()), (429, Some("rate_limited")));
    // A different forwarded client has its own bucket.
    for _ in 0..2 {
        assert_eq!(from("198.51.100.9").await.status, 200);
    }
    assert_eq!(from("198.51.100.9").await.status, 429);
    assert_eq!(backend.requests(), 4);
}

#[tokio::test]
async fn without_trusted_proxies_a_forged_forwarded_for_changes_nothing() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&config("", backend.addr, "b-forged", "addr-forged")).await;
    let client = Client::new();
    for forged in ["203.0.113.7", "198.51.100.9"] {
        let rsp = client.get_with(gw.http, "/", &[("x-forwarded-for", forged)]).await;
        assert_eq!(rsp.status, 200);
        // The upstream sees the real peer only, never the forged chain.
        assert_eq!(seen_xff(&backend), "127.0.0.1");
    }
    // All three share the loopback bucket.
    let rsp = client.get_with(gw.http, "/", &[("x-forwarded-for", "192.0.2.1")]).await;
    assert_eq!((rsp.status.as_u16(), rsp.reason()), (429, Some("rate_limited")));
    assert_eq!(backend.requests(), 2);
}
