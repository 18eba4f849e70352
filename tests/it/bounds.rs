//! Connection bounds.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{base_config, upstream_and_route, Backend, TestGateway};

#[tokio::test]
async fn max_connections_holds_further_connections_until_one_closes() {
    let backend = Backend::start().await;
    let config = base_config()
        .replace("header_read_timeout = \"1s\"", "header_read_timeout = \"10s\"\nmax_connections = 2")
        + &upstream_and_route("bounds-up", &[backend.addr], "bounds-api", "/");
    let gw = TestGateway::start(&config).await;
    let first = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let _second = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    // The kernel hands connections to levee in the order they were made, so
    // the two slots go to these two whenever levee gets to accept them.

    let mut third = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    third.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(early.is_err(), "a third connection was served past max_connections = 2");
    assert_eq!(backend.requests(), 0);

    drop(first);
    // Well below header_read_timeout (10s), which would free the other slot.
    let n = tokio::time::timeout(Duration::from_secs(6), third.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}
