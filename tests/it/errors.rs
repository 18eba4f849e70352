//! Every status the gateway core owns, produced by a real situation, with the
//! contract's headers and JSON body.

use std::time::Duration;

use crate::support::{
    base_config, closed_port, exclusive, upstream_and_route, Backend, Behavior, Client, TestGateway,
    TestResponse,
};

/// The contract's body: `{"error", "route", "retry_after_s"}`, and the reason header.
fn assert_levee_answer(rsp: &TestResponse, status: u16, reason: &str, route: Option<&str>) {
    assert_eq!(rsp.status.as_u16(), status, "body: {}", rsp.text());
    assert_eq!(rsp.reason(), Some(reason));
    assert_eq!(rsp.headers["content-type"], "application/json");
    let json = rsp.json();
    assert_eq!(json["error"], reason);
    assert_eq!(json["route"].as_str(), route);
    assert!(json.get("retry_after_s").is_some());
    assert!(rsp.headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn no_route_is_404() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("err-noroute-up", &[backend.addr], "err-noroute", "/api")),
    )
    .await;
    let rsp = Client::new().get(gw.http, "/elsewhere").await;
    assert_levee_answer(&rsp, 404, "no_route", None);
    // The same answer again (handed out as a copy of the last one built):
    // each carries its own request's id.
    for id in ["err-noroute-1", "err-noroute-2", "err-noroute-3"] {
        let rsp = Client::new().get_with(gw.http, "/elsewhere", &[("x-request-id", id)]).await;
        assert_levee_answer(&rsp, 404, "no_route", None);
        assert_eq!(rsp.headers.get_all("x-request-id").iter().collect::<Vec<_>>(), [id]);
    }
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn connect_refused_is_502_upstream_unreachable() {
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("err-refused-up", &[closed_port()], "err-refused", "/")),
    )
    .await;
    let rsp = Client::new().get(gw.http, "/").await;
    assert_levee_answer(&rsp, 502, "upstream_unreachable", Some("err-refused"));
    assert!(rsp.headers.get("retry-after").is_none());
}

#[tokio::test]
async fn hanging_upstream_is_504_after_the_timeout() {
    // The upper bound is in wall-clock time.
    let _machine = exclusive().await;
    let backend = Backend::with(Behavior::Hang).await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("err-hang-up", &[backend.addr], "err-hang", "/")),
    )
    .await;
    let started = tokio::time::Instant::now();
    let rsp = Client::new().get(gw.http, "/").await;
    assert_levee_answer(&rsp, 504, "upstream_timeout", Some("err-hang"));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "timeout is 1s, took {took:?}"
    );
}

/// The same bound on a pooled connection that served a request and then sat
/// idle past its first request's deadline (so its task's watchdog had gone
/// back to its idle rounds), and the next request after the 504 is served.
#[tokio::test]
async fn a_hang_on_a_pooled_connection_is_504_after_the_timeout_and_the_next_request_is_served() {
    let _machine = exclusive().await;
    let backend = Backend::start().await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("err-rehang-up", &[backend.addr], "err-rehang", "/")),
    )
    .await;
    let client = Client::new();
    assert_eq!(client.get(gw.http, "/first").await.status, 200, "the connection is pooled");
    // The scenario, not a wait for a state: the pooled connection sits idle
    // past the first request's deadline.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    backend.set(Behavior::Hang);
    let started = tokio::time::Instant::now();
    let rsp = client.get(gw.http, "/hangs").await;
    assert_levee_answer(&rsp, 504, "upstream_timeout", Some("err-rehang"));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(3),
        "timeout is 1s, took {took:?}"
    );
    backend.set(Behavior::Ok);
    let rsp = client.get(gw.http, "/after").await;
    assert_eq!(rsp.status, 200, "body: {}", rsp.text());
    assert_eq!(backend.requests(), 3);
}

#[tokio::test]
async fn declared_body_over_the_limit_is_413_before_forwarding() {
    let backend = Backend::start().await;
    let config = base_config().replace("shutdown_grace", "max_body_bytes = \"1KiB\"\nshutdown_grace")
        + &upstream_and_route("err-declared-up", &[backend.addr], "err-declared", "/");
    let gw = TestGateway::start(&config).await;
    let rsp = Client::new().post(gw.http, "/", vec![0u8; 2048]).await;
    assert_levee_answer(&rsp, 413, "body_too_large", Some("err-declared"));
    assert_eq!(backend.requests(), 0);
    let ok = Client::new().post(gw.http, "/", vec![0u8; 1024]).await;
    assert_eq!(ok.status, 200);
}

#[tokio::test]
async fn streamed_chunked_body_over_the_limit_is_413() {
    let backend = Backend::start().await;
    let config = base_config().replace("shutdown_grace", "max_body_bytes = \"1KiB\"\nshutdown_grace")
        + &upstream_and_route("err-chunked-up", &[backend.addr], "err-chunked", "/");
    let gw = TestGateway::start(&config).await;
    let mut req =
        b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..8 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'x'; 0x200]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let rsp = raw(gw.http, &req).await;
    assert!(rsp.starts_with("HTTP/1.1 413"), "{rsp}");
    assert!(rsp.contains("x-levee-reason: body_too_large"), "{rsp}");
}

#[tokio::test]
async fn head_over_max_header_bytes_is_431() {
    let backend = Backend::start().await;
    let config = base_config().replace("shutdown_grace", "max_header_bytes = 2048\nshutdown_grace")
        + &upstream_and_route("err-head-up", &[backend.addr], "err-head", "/");
    let gw = TestGateway::start(&config).await;
    let big = "v".repeat(3000);
    let rsp = Client::new().get_with(gw.http, "/", &[("x-big", &big)]).await;
    assert_levee_answer(&rsp, 431, "headers_too_large", None);
    // Far past hyper's buffer: the parser answers 431 itself, before a request exists.
    let huge = format!("GET / HTTP/1.1\r\nHost: t\r\nx-huge: {}\r\n\r\n", "v".repeat(64 * 1024));
    let rsp = raw(gw.http, huge.as_bytes()).await;
    assert!(rsp.starts_with("HTTP/1.1 431"), "{rsp}");
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn malformed_requests_get_400_and_the_gateway_keeps_serving() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("err-malformed-up", &[backend.addr], "err-malformed", "/")),
    )
    .await;
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /\x01path HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nx-bin: \x00\x01\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: t\r\n\r\n",
    ] {
        let rsp = raw(gw.http, bad).await;
        assert!(
            rsp.starts_with("HTTP/1.1 400") || rsp.starts_with("HTTP/1.1 505"),
            "{:?} -> {rsp:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let rsp = Client::new().get_with(gw.http, "/", &[("content-length", "abc")]).await;
    assert_eq!(rsp.status, 400);
    assert_eq!(backend.requests(), 0);
    assert_eq!(Client::new().get(gw.http, "/").await.status, 200);
}

#[tokio::test]
async fn slowloris_is_disconnected_after_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The upper bound is in wall-clock time.
    let _machine = exclusive().await;
    let backend = Backend::start().await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("err-slowloris-up", &[backend.addr], "err-slowloris", "/")),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let started = tokio::time::Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: t\r\nx-slow: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed = false;
    // One byte every 200ms: the 1s header_read_timeout must cut it off long before the end.
    for byte in head.iter() {
        if s.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {} // hyper may answer 408 before closing
            Err(_) => {}
        }
    }
    assert!(closed, "the slow client was never disconnected");
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    assert_eq!(backend.requests(), 0);
}

/// Sends raw bytes and reads the answer until the server closes or goes quiet.
pub async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() > 64 * 1024 {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
