//! Sockets: every connection is bounded in time from accept, whatever it sends
//! (nothing, `P`, the bare HTTP/2 preface, an idle keep-alive), and HTTP/2
//! floods end in GOAWAY without a request reaching the backend.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::h2frame::{self, frame};
use super::{closed_within, raw};
use crate::support::gateway::metric_value;
use crate::support::{base_config, exclusive, upstream_and_route, Backend, TestGateway};

#[tokio::test]
async fn silent_and_preface_only_sockets_cannot_hold_the_connection_slots() {
    let _x = exclusive().await;
    let backend = Backend::start().await;
    let config = base_config()
        .replace("header_read_timeout = \"1s\"", "header_read_timeout = \"1s\"\nmax_connections = 40")
        + &upstream_and_route("b-slots", &[backend.addr], "hostile-slots", "/");
    let gw = TestGateway::start(&config).await;
    let closed_before =
        metric_value(&gw.metrics().await, "levee_connections_closed_total", &["reason=\"header_timeout\""])
            .unwrap_or(0.0);

    // 60 attackers for 40 slots: silent, the first preface byte, the whole preface.
    let mut attackers = Vec::new();
    for i in 0..60 {
        let mut s = TcpStream::connect(gw.http).await.unwrap();
        match i % 3 {
            0 => {}
            1 => s.write_all(b"P").await.unwrap(),
            _ => s.write_all(h2frame::PREFACE).await.unwrap(),
        }
        attackers.push(s);
    }
    // A real client still gets through, once the first 40 time out.
    let started = tokio::time::Instant::now();
    let rsp = tokio::time::timeout(
        Duration::from_secs(10),
        raw(gw.http, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    )
    .await
    .expect("the gateway stayed down behind idle sockets");
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert!(started.elapsed() < Duration::from_secs(8), "served only after {:?}", started.elapsed());
    // Every attacker is closed within about two timeouts (accept may wait for a slot).
    for (i, s) in attackers.iter_mut().enumerate() {
        assert!(closed_within(s, Duration::from_secs(6)).await.is_some(), "attacker {i} still open");
    }
    let closed_after =
        metric_value(&gw.metrics().await, "levee_connections_closed_total", &["reason=\"header_timeout\""])
            .unwrap_or(0.0);
    assert!(closed_after - closed_before >= 60.0, "{closed_before} -> {closed_after}");
    assert_eq!(backend.requests(), 1);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let backend = Backend::start().await;
    let config = base_config()
        .replace("header_read_timeout = \"1s\"", "header_read_timeout = \"30s\"\nidle_timeout = \"1s\"")
        + &upstream_and_route("b-idle", &[backend.addr], "hostile-idle", "/");
    let gw = TestGateway::start(&config).await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    // The response arrives, then nothing: closed after ~1 s, long before the 30 s head timeout.
    let took = closed_within(&mut s, Duration::from_secs(10)).await.expect("idle connection never closed");
    assert!(took >= Duration::from_millis(900), "closed after {took:?}, before idle_timeout");
    assert_eq!(backend.requests(), 1);
}

/// Slowloris on a kept-alive connection: after one honest request, the next
/// head trickles in a byte at a time and never ends. `header_read_timeout`
/// counts from the end of the previous request, so the connection is closed
/// about a second after the first answer, with `idle_timeout` far away.
#[tokio::test]
async fn a_head_that_trickles_in_after_a_kept_alive_request_is_closed_after_header_read_timeout() {
    use tokio::io::AsyncReadExt;
    let backend = Backend::start().await;
    let config = base_config()
        .replace("header_read_timeout = \"1s\"", "header_read_timeout = \"1s\"\nidle_timeout = \"30s\"")
        + &upstream_and_route("b-trickle", &[backend.addr], "hostile-trickle", "/");
    let gw = TestGateway::start(&config).await;
    let timeouts = || async {
        metric_value(&gw.metrics().await, "levee_connections_closed_total", &["reason=\"header_timeout\""])
            .unwrap_or(0.0)
    };
    let before = timeouts().await;

    let started = tokio::time::Instant::now();
    let (mut rd, mut wr) = TcpStream::connect(gw.http).await.unwrap().into_split();
    wr.write_all(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    // The whole first answer: its head, then Content-Length bytes of body.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let body_len = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the first answer");
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse::<usize>().unwrap())
                .expect("a content-length");
            break end + 4 + len;
        }
    };
    while got.len() < body_len {
        let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed inside the first answer");
        got.extend_from_slice(&buf[..n]);
    }
    // The next head, a byte every 100 ms: never complete (at most 15 s of it).
    let trickle = tokio::spawn(async move {
        let head = b"GET /second HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for byte in head.iter() {
            if wr.write_all(std::slice::from_ref(byte)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let closed = closed_within(&mut rd, Duration::from_secs(8).saturating_sub(started.elapsed())).await;
    trickle.abort();
    closed.expect("a trickling head held the connection open past header_read_timeout");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}, before header_read_timeout");
    assert_eq!(backend.requests(), 1, "the unfinished head never reached the backend");
    crate::support::poll_until(Duration::from_secs(5), "the close counted as header_timeout", async || {
        (timeouts().await > before).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_idle_h2_connection_gets_goaway_after_idle_timeout() {
    let backend = Backend::start().await;
    let config = base_config()
        .replace("header_read_timeout = \"1s\"", "header_read_timeout = \"30s\"\nidle_timeout = \"1s\"")
        + &upstream_and_route("b-h2idle", &[backend.addr], "hostile-h2idle", "/");
    let gw = TestGateway::start(&config).await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    let mut hello = h2frame::start();
    hello.extend(frame(
        h2frame::HEADERS,
        h2frame::END_STREAM | h2frame::END_HEADERS,
        1,
        &h2frame::get_root(),
    ));
    s.write_all(&hello).await.unwrap();
    let started = tokio::time::Instant::now();
    let code = h2frame::read_goaway(&mut s, Duration::from_secs(10))
        .await
        .expect("no GOAWAY on an idle h2 connection");
    assert_eq!(code, 0, "a graceful GOAWAY (NO_ERROR)");
    assert!(started.elapsed() >= Duration::from_millis(900), "GOAWAY after {:?}", started.elapsed());
    assert_eq!(backend.requests(), 1);
}

/// Rapid reset as the siege sends it: HEADERS + RST_STREAM pairs in one
/// write. h2 reads them all, then hands levee the streams it accepted,
/// cancelled ones included; hyper looks for the cancellation only once
/// levee's future is pending. Each cancelled stream had run the whole stack
/// before that look (its limits, the upstream call: 31,014 reached the
/// backend in a 90 s siege, on pooled connections). Now none runs it: the
/// client's own limit is untouched by its 16 cancelled streams, so its next
/// request passes, and only that one reaches the backend.
#[tokio::test]
async fn streams_cancelled_in_the_same_write_never_run_the_stack() {
    let backend = Backend::start().await;
    let route = upstream_and_route("b-paced-reset", &[backend.addr], "hostile-paced-reset", "/").replace(
        "upstream = \"b-paced-reset\"",
        "upstream = \"b-paced-reset\"\nclient_key = \"header:x-device-id\"",
    );
    let limit = "[[routes.limits]]\nrate = \"1/m\"\nburst = 3\n";
    let gw = TestGateway::start(&(base_config() + &route + limit)).await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    let mut flood = h2frame::start();
    for i in 0..16u32 {
        let id = 2 * i + 1;
        let headers = h2frame::get_as(&format!("/reset/{i}"), "resetter");
        flood.extend(frame(h2frame::HEADERS, h2frame::END_STREAM | h2frame::END_HEADERS, id, &headers));
        flood.extend(frame(h2frame::RST_STREAM, 0, id, &8u32.to_be_bytes())); // CANCEL
    }
    s.write_all(&flood).await.unwrap();
    // Once this stream's answer is here, every stream before it on the
    // connection has been accepted and dropped.
    let kept = frame(
        h2frame::HEADERS,
        h2frame::END_STREAM | h2frame::END_HEADERS,
        33,
        &h2frame::get_as("/kept", "resetter"),
    );
    s.write_all(&kept).await.unwrap();
    let head = h2frame::read_answer_to(&mut s, 33, Duration::from_secs(10))
        .await
        .expect("no answer to the kept stream");
    assert_eq!(
        head.first(),
        Some(&h2frame::STATUS_200),
        "the cancelled streams took the client's tokens: {head:?}"
    );
    assert_eq!(backend.requests(), 1, "only the kept stream reached the backend");
}

#[tokio::test]
async fn rapid_reset_gets_goaway_and_nothing_is_forwarded() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("b-reset", &[backend.addr], "hostile-reset", "/")),
    )
    .await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    let mut flood = h2frame::start();
    for i in 0..500u32 {
        let id = 2 * i + 1;
        flood.extend(frame(
            h2frame::HEADERS,
            h2frame::END_STREAM | h2frame::END_HEADERS,
            id,
            &h2frame::get_root(),
        ));
        flood.extend(frame(h2frame::RST_STREAM, 0, id, &8u32.to_be_bytes())); // CANCEL
    }
    // The server may close mid-write; what it answered is what matters.
    let _ = s.write_all(&flood).await;
    let code =
        h2frame::read_goaway(&mut s, Duration::from_secs(10)).await.expect("no GOAWAY for a reset flood");
    assert_eq!(code, h2frame::ENHANCE_YOUR_CALM);
    assert!(
        closed_within(&mut s, Duration::from_secs(10)).await.is_some(),
        "the flooding connection stayed open"
    );
    assert_eq!(backend.requests(), 0, "a reset stream was forwarded");
    // The gateway itself is fine.
    let ok = raw(gw.http, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let m = gw.metrics().await;
    assert!(
        metric_value(&m, "levee_connections_closed_total", &["reason=\"h2_abuse\""]).unwrap_or(0.0) >= 1.0
    );
}

#[tokio::test]
async fn a_continuation_flood_gets_goaway_and_nothing_is_forwarded() {
    let backend = Backend::start().await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("b-cont", &[backend.addr], "hostile-cont", "/")),
    )
    .await;
    let mut s = TcpStream::connect(gw.http).await.unwrap();
    let mut flood = h2frame::start();
    flood.extend(frame(h2frame::HEADERS, h2frame::END_STREAM, 1, &h2frame::get_root()));
    // Header block fragments that never end: x-a: <value>, literal, new name.
    let mut fragment = vec![0x00, 0x03, b'x', b'-', b'a', 0x7f, 0x81, 0x07];
    fragment.extend(std::iter::repeat_n(b'v', 0x7f + 0x381));
    for _ in 0..2000 {
        flood.extend(frame(h2frame::CONTINUATION, 0, 1, &fragment));
    }
    let _ = s.write_all(&flood).await;
    let code = h2frame::read_goaway(&mut s, Duration::from_secs(10)).await;
    assert!(code.is_some(), "no GOAWAY for a CONTINUATION flood");
    assert!(
        closed_within(&mut s, Duration::from_secs(10)).await.is_some(),
        "the flooding connection stayed open"
    );
    assert_eq!(backend.requests(), 0);
}
