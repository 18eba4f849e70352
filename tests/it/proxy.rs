//! Forwarding: what the backend sees, what the client gets back.

use crate::support::{base_config, upstream_and_route, Backend, Client, TestGateway};

#[tokio::test]
async fn forwards_and_adds_forwarding_headers() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("px-fwd-up", &[backend.addr], "px-fwd", "/")),
    )
    .await;
    let rsp = Client::new()
        .get_with(gw.http, "/hello?x=1", &[("connection", "x-hop"), ("x-hop", "secret"), ("x-end", "1")])
        .await;
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.text(), format!("hello from {}", backend.addr));
    assert!(rsp.reason().is_none(), "a relayed response carries no x-levee-reason");
    assert!(rsp.headers.get("keep-alive").is_none(), "hop-by-hop response headers are dropped");
    let generated_id = rsp.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated_id.len(), 32);

    let seen = backend.last().unwrap();
    assert_eq!(seen.uri.path_and_query().unwrap().as_str(), "/hello?x=1");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-request-id"].to_str().unwrap(), generated_id);
    assert_eq!(seen.headers["x-end"], "1");
    assert!(seen.headers.get("x-hop").is_none(), "headers named by Connection are hop-by-hop");
    assert!(seen.headers.get("connection").is_none());
}

#[tokio::test]
async fn keeps_the_clients_request_id_and_appends_to_x_forwarded_for() {
    let backend = Backend::start().await;
    // Only a trusted proxy's chain is kept (tests/it/client_address.rs has the untrusted case).
    let config = base_config().replace("[server]", "[server]\ntrusted_proxies = [\"127.0.0.1\"]");
    let gw =
        TestGateway::start(&(config + &upstream_and_route("px-reqid-up", &[backend.addr], "px-reqid", "/")))
            .await;
    let rsp = Client::new()
        .get_with(gw.http, "/", &[("x-request-id", "req-42"), ("x-forwarded-for", "203.0.113.9")])
        .await;
    assert_eq!(rsp.headers["x-request-id"], "req-42");
    let seen = backend.last().unwrap();
    assert_eq!(seen.headers["x-request-id"], "req-42");
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("px-h2c-up", &[backend.addr], "px-h2c", "/")),
    )
    .await;
    let rsp = Client::h2c().get(gw.http, "/h2").await;
    assert_eq!(rsp.status, 200);
    let seen = backend.last().unwrap();
    assert_eq!(seen.uri.path(), "/h2");
    assert!(seen.headers.contains_key("host"), "the upstream gets a Host header from :authority");
}

#[tokio::test]
async fn longest_prefix_routes_to_its_upstream() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let config = base_config()
        + &upstream_and_route("px-prefix-a", &[a.addr], "px-prefix-root", "/")
        + &upstream_and_route("px-prefix-b", &[b.addr], "px-prefix-device", "/v1/device");
    let gw = TestGateway::start(&config).await;
    let c = Client::new();
    c.get(gw.http, "/v1/device/7").await;
    c.get(gw.http, "/v1/other").await;
    assert_eq!((a.requests(), b.requests()), (1, 1));
}

#[tokio::test]
async fn balances_over_endpoints() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    for balance in ["p2c", "round_robin"] {
        let config = base_config()
            + &upstream_and_route(
                &format!("px-balance-{balance}-up"),
                &[a.addr, b.addr],
                &format!("px-balance-{balance}"),
                "/",
            )
            .replace("connect_timeout", &format!("balance = \"{balance}\"\nconnect_timeout"));
        let gw = TestGateway::start(&config).await;
        let before = (a.requests(), b.requests());
        let c = Client::new();
        for _ in 0..40 {
            assert_eq!(c.get(gw.http, "/").await.status, 200);
        }
        let (da, db) = (a.requests() - before.0, b.requests() - before.1);
        assert_eq!(da + db, 40);
        assert!(da >= 5 && db >= 5, "{balance}: both endpoints get traffic ({da}/{db})");
    }
}

#[tokio::test]
async fn relays_upstream_statuses_unchanged_including_401_and_403() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("px-relay-up", &[backend.addr], "px-relay", "/")),
    )
    .await;
    for code in [201u16, 301, 401, 403, 404, 500, 503] {
        backend.set(crate::support::Behavior::Status(code));
        let rsp = Client::new().get(gw.http, "/").await;
        assert_eq!(rsp.status.as_u16(), code);
        assert!(rsp.reason().is_none(), "{code} is relayed, not levee's own");
    }
}

#[tokio::test]
async fn streams_request_bodies() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("px-stream-up", &[backend.addr], "px-stream", "/")),
    )
    .await;
    let rsp = Client::new().post(gw.http, "/upload", vec![7u8; 300_000]).await;
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.headers["x-body-len"], "300000");
    let seen = backend.last().unwrap();
    assert_eq!((seen.method.as_str(), seen.body_len), ("POST", 300_000));
}

/// A raw HTTP/1.1 backend that answers every request `200 ok` on a kept-alive
/// connection, counts the connections it accepts, and closes a connection
/// that stays idle for `idle_close` (an upstream's keep-alive timeout).
/// [`CountingBackend::trickling`] sends the head at once and its body `ok`
/// a byte at a time, `pause` apart.
struct CountingBackend {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingBackend {
    async fn start(idle_close: std::time::Duration) -> CountingBackend {
        CountingBackend::trickling(idle_close, std::time::Duration::ZERO).await
    }

    async fn trickling(idle_close: std::time::Duration, pause: std::time::Duration) -> CountingBackend {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (a, c) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = match tokio::time::timeout(idle_close, sock.read(&mut chunk)).await {
                            Ok(Ok(n)) if n > 0 => n,
                            _ => break,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let rsp: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            // Trickling: the head at once, then each body byte after a pause.
                            let (now, later) =
                                if pause.is_zero() { (rsp, &rsp[..0]) } else { rsp.split_at(rsp.len() - 2) };
                            let mut written = sock.write_all(now).await.is_ok();
                            for byte in later.chunks(1) {
                                tokio::time::sleep(pause).await;
                                written = written && sock.write_all(byte).await.is_ok();
                            }
                            if !written {
                                break;
                            }
                        }
                    }
                    drop(sock);
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        CountingBackend { addr, accepted, closed }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let backend = CountingBackend::start(std::time::Duration::from_secs(30)).await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("px-pool-up", &[backend.addr], "px-pool", "/")),
    )
    .await;
    let client = Client::new();
    for i in 0..50 {
        let rsp = client.get(gw.http, &format!("/pool/{i}")).await;
        assert_eq!(rsp.status, 200, "request {i}");
        assert_eq!(rsp.text(), "ok");
    }
    assert_eq!(backend.accepted(), 1, "50 requests one after another share one pooled connection");
}

/// The upstream `timeout` (1 s here) bounds the wait for the response head
/// only: a body that takes longer arrives whole, and its connection goes back
/// to the pool for the next request (its deadline was cleared with the head).
#[tokio::test]
async fn a_body_slower_than_the_timeout_after_a_timely_head_arrives_whole_on_a_reused_connection() {
    let pause = std::time::Duration::from_millis(700);
    let backend = CountingBackend::trickling(std::time::Duration::from_secs(30), pause).await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("px-trickle-up", &[backend.addr], "px-trickle", "/")),
    )
    .await;
    let client = Client::new();
    for round in 1..=2 {
        let started = tokio::time::Instant::now();
        let rsp = client.get(gw.http, &format!("/trickle/{round}")).await;
        assert_eq!(rsp.status, 200, "round {round}: {}", rsp.text());
        assert_eq!(rsp.text(), "ok", "round {round}: the whole body");
        assert!(started.elapsed() >= pause * 2, "round {round}: the body took two pauses");
    }
    assert_eq!(backend.accepted(), 1, "the second request reused the first one's connection");
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_replaced_without_an_error() {
    let backend = CountingBackend::start(std::time::Duration::from_millis(150)).await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("px-stale-up", &[backend.addr], "px-stale", "/")),
    )
    .await;
    let client = Client::new();
    for round in 1..=3 {
        assert_eq!(client.get(gw.http, "/stale").await.status, 200, "round {round}");
        // The upstream's keep-alive timeout closes the pooled connection.
        crate::support::poll_until(
            std::time::Duration::from_secs(5),
            "the backend closed the idle connection",
            async || (backend.closed() >= round).then_some(()),
        )
        .await;
    }
    assert_eq!(client.get(gw.http, "/stale").await.status, 200);
    assert_eq!(backend.accepted(), 4, "each closed connection was replaced by a new one");
}
