//! Bodies: a stalled body costs its own connection, never an upstream slot,
//! and a body the client breaks never counts against the upstream.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::raw;
use crate::support::gateway::metric_value;
use crate::support::{base_config, exclusive, Backend, Client, TestGateway};

fn config(name: &str, backend: std::net::SocketAddr, server_extra: &str, upstream_extra: &str) -> String {
    base_config().replace("shutdown_grace", &format!("{server_extra}\nshutdown_grace"))
        + &format!(
            r#"
[upstreams.{name}]
endpoints = ["{backend}"]
connect_timeout = "300ms"
timeout = "2s"
{upstream_extra}

[[routes]]
name = "{name}"
path_prefix = "/"
upstream = "{name}"
[routes.storm]
enabled = false
"#
        )
}

#[tokio::test]
async fn stalled_bodies_do_not_take_upstream_slots() {
    let _x = exclusive().await;
    let backend = Backend::start().await;
    let gw = TestGateway::start(&config(
        "hostile-stall",
        backend.addr,
        "body_read_timeout = \"1s\"",
        "max_concurrency = 20",
    ))
    .await;
    // 19 PUTs that announce 20,000 bytes and send none: the attack that held
    // every slot of max_concurrency = 20 for as long as the attacker liked.
    let mut stalled = Vec::new();
    for _ in 0..19 {
        let mut s = TcpStream::connect(gw.http).await.unwrap();
        s.write_all(b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: 20000\r\n\r\n").await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Meanwhile everyone else is served: no 503 overloaded.
    let client = Client::new();
    for i in 0..20 {
        let rsp = client.get(gw.http, &format!("/ok/{i}")).await;
        assert_eq!(rsp.status, 200, "request {i}: {:?} {}", rsp.reason(), rsp.text());
    }
    // Each stalled body gets 408 request_timeout and its connection closed.
    for s in &mut stalled {
        let mut out = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read_to_end(s, &mut out));
        let _ = read.await.expect("a stalled body was never answered");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("x-levee-reason: request_timeout"), "{text}");
    }
    assert_eq!(backend.requests(), 20, "no stalled PUT reached the backend");
}

#[tokio::test]
async fn a_large_body_that_stalls_midway_is_408_and_not_the_upstreams_fault() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(&config(
        "hostile-midstall",
        backend.addr,
        "body_read_timeout = \"1s\"\nbuffer_body_bytes = \"1KiB\"",
        "[upstreams.hostile-midstall.circuit_breaker]\nmin_requests = 2\nfailure_rate = 0.5",
    ))
    .await;
    for _ in 0..4 {
        let mut s = TcpStream::connect(gw.http).await.unwrap();
        s.write_all(b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: 20000\r\n\r\n").await.unwrap();
        s.write_all(&[b'x'; 4000]).await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut out),
        );
        let _ = read.await.expect("never answered");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
    let rsp = Client::new().get(gw.http, "/after").await;
    assert_eq!(rsp.status, 200, "{:?}", rsp.reason());
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, "levee_circuit_state", &["upstream=\"hostile-midstall\""]), Some(0.0));
}

#[tokio::test]
async fn oversized_and_cut_off_bodies_never_open_the_circuit() {
    let _x = exclusive().await;
    let backend = Backend::start().await;
    let gw = TestGateway::start(&config(
        "hostile-faults",
        backend.addr,
        "max_body_bytes = \"4KiB\"\nbuffer_body_bytes = \"1KiB\"",
        "[upstreams.hostile-faults.circuit_breaker]\nmin_requests = 5\nfailure_rate = 0.5\n\
         [upstreams.hostile-faults.outlier]\nconsecutive_failures = 3",
    ))
    .await;
    for i in 0..25 {
        // Chunked, no Content-Length: streamed to the upstream until it outgrows 4 KiB.
        let mut req = format!(
            "POST /big/{i} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        for _ in 0..12 {
            req.extend_from_slice(b"400\r\n");
            req.extend_from_slice(&[b'x'; 0x400]);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        let rsp = raw(gw.http, &req).await;
        assert!(rsp.starts_with("HTTP/1.1 413"), "{rsp}");
    }
    for i in 0..25 {
        // Announces 3,000 bytes (streamed: over buffer_body_bytes), sends 1,500, vanishes.
        let mut s = TcpStream::connect(gw.http).await.unwrap();
        s.write_all(format!("PUT /cut/{i} HTTP/1.1\r\nHost: t\r\nContent-Length: 3000\r\n\r\n").as_bytes())
            .await
            .unwrap();
        s.write_all(&[b'x'; 1500]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(s);
    }
    // Healthy requests after them are served: the circuit stayed closed.
    let client = Client::new();
    for i in 0..10 {
        let rsp = client.get(gw.http, &format!("/healthy/{i}")).await;
        assert_eq!(rsp.status, 200, "request {i}: {:?}", rsp.reason());
    }
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, "levee_circuit_state", &["upstream=\"hostile-faults\""]), Some(0.0));
    assert_eq!(
        metric_value(&m, "levee_endpoint_ejected", &["upstream=\"hostile-faults\""]).unwrap_or(0.0),
        0.0,
        "the endpoint was ejected for the clients' faults"
    );
}
