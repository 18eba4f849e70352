//! The lean upstream client (`src/upstream/h1.rs`) against a raw HTTP/1.1
//! backend that answers each path with bytes written by hand: every way a
//! response body can be framed, broken responses, and a kept-alive
//! connection the upstream drops as it is reused.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{base_config, upstream_and_route, Client, TestGateway};

/// What the backend saw of one request: its head as text, and its body.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    body: Vec<u8>,
}

/// A raw backend. Per path, the bytes of its answer:
/// `/chunked`, `/head` (for `HEAD`), `/nocontent`, `/continue` (a 100 before
/// a 201), `/length`, `/hop` (hop-by-hop fields, one named by `Connection`), `/close` (a body to the close, then it closes),
/// `/short` (says 10 bytes, sends 3, closes), `/garbage` (not HTTP),
/// `/early` (a 413 on the head, and a close with the body unread);
/// `/drop-second` answers the first request of a connection and closes the
/// connection, unanswered, on its second.
struct ScriptedBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl ScriptedBackend {
    async fn start() -> ScriptedBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (a, s) = (accepted.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(sock, s.clone()));
            }
        });
        ScriptedBackend { addr, accepted, seen }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("a request reached the backend")
    }
}

async fn serve(mut sock: tokio::net::TcpStream, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut requests = 0;
    loop {
        // One request: the head, then a body of its Content-Length.
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            match sock.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        if head.split(' ').nth(1) == Some("/early") {
            // Refuses the upload on its head and closes with the body
            // unread, which makes the kernel reset the connection.
            seen.lock().unwrap().push(Seen { head, body: Vec::new() });
            let _ = sock.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nbig!").await;
            return;
        }
        let length = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_string))
            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
        while buf.len() < length {
            match sock.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        seen.lock().unwrap().push(Seen { head, body });
        requests += 1;
        let answer: &[u8] = match path.as_str() {
            "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
            "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n",
            "/nocontent" => b"HTTP/1.1 204 No Content\r\n\r\n",
            "/continue" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            "/length" => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n0123456789",
            "/hop" => b"HTTP/1.1 200 OK\r\nconnection: keep-alive, x-secret\r\nkeep-alive: timeout=5\r\nx-secret: 1\r\nx-end: 1\r\ncontent-length: 2\r\n\r\nok",
            "/close" => b"HTTP/1.1 200 OK\r\n\r\nto the close",
            "/short" => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
            "/garbage" => b"HTTX/1.1 200 OK\r\n\r\n",
            "/drop-second" if requests >= 2 => return,
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        };
        if sock.write_all(answer).await.is_err() {
            return;
        }
        if matches!(path.as_str(), "/close" | "/short" | "/garbage") {
            return;
        }
    }
}

#[tokio::test]
async fn every_framing_of_a_response_is_relayed_whole_on_one_kept_alive_connection() {
    let backend = ScriptedBackend::start().await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("fr-all-up", &[backend.addr], "fr-all", "/")),
    )
    .await;
    let client = Client::new();

    let rsp = client.get(gw.http, "/chunked").await;
    assert_eq!((rsp.status.as_u16(), rsp.text().as_str()), (200, "hello world"), "chunks joined");
    assert!(rsp.headers.get("x-trailer").is_none(), "trailers are dropped, as nginx's proxy drops them");

    let rsp = client.request_with(http::Method::HEAD, gw.http, "/head", &[]).await;
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.headers["content-length"], "11", "a HEAD answer's length is relayed");
    assert!(rsp.body.is_empty());

    let rsp = client.get(gw.http, "/nocontent").await;
    assert_eq!((rsp.status.as_u16(), rsp.body.len()), (204, 0));

    let req = http::Request::put(format!("http://{}/continue", gw.http))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"abc")))
        .unwrap();
    let rsp = client.send(req).await;
    assert_eq!((rsp.status.as_u16(), rsp.text().as_str()), (201, "ok"), "the 100 before it was skipped");
    let seen = backend.last();
    assert_eq!(seen.body, b"abc");
    assert!(seen.head.to_ascii_lowercase().contains("content-length: 3"), "{}", seen.head);

    let rsp = client.get(gw.http, "/length").await;
    assert_eq!(rsp.text(), "0123456789");
    let rsp = client.get(gw.http, "/hop").await;
    assert_eq!(rsp.text(), "ok");
    for hop in ["connection", "keep-alive", "x-secret"] {
        assert!(rsp.headers.get(hop).is_none(), "{hop} is hop-by-hop (x-secret named by Connection)");
    }
    assert_eq!(rsp.headers["x-end"], "1");
    assert_eq!(backend.accepted(), 1, "six answers, one kept-alive upstream connection");

    let rsp = client.get(gw.http, "/close").await;
    assert_eq!((rsp.status.as_u16(), rsp.text().as_str()), (200, "to the close"), "a body to the close");
    let rsp = client.get(gw.http, "/length").await;
    assert_eq!(rsp.text(), "0123456789");
    assert_eq!(backend.accepted(), 2, "a connection read to its close is not reused");
}

#[tokio::test]
async fn a_broken_response_is_502_and_a_body_cut_short_is_cut_short_at_the_client() {
    let backend = ScriptedBackend::start().await;
    let gw = TestGateway::start(
        &(base_config() + &upstream_and_route("fr-broken-up", &[backend.addr], "fr-broken", "/")),
    )
    .await;
    let rsp = Client::new().get(gw.http, "/garbage").await;
    assert_eq!(rsp.status, 502);
    assert_eq!(rsp.reason(), Some("bad_upstream_response"));

    // The head promised 10 bytes and the upstream closed after 3: the client
    // must not get a whole response. hyper's server, whose body fails before
    // it flushed the head, closes without a byte; had it flushed, the head
    // would say 10 and fewer would follow before the close.
    let mut sock = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    sock.write_all(b"GET /short HTTP/1.1\r\nhost: fr\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), sock.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "levee closed the client's connection");
    assert_eq!(backend.last().head.split(' ').nth(1), Some("/short"), "the request reached the upstream");
    let text = String::from_utf8_lossy(&got);
    if let Some(end) = text.find("\r\n\r\n") {
        assert!(text.to_ascii_lowercase().contains("content-length: 10"), "{text}");
        assert!(text.len() - end - 4 < 10, "a short body stays short: {text}");
    } else {
        assert!(got.is_empty(), "nothing, or a head and less than its length: {text}");
    }

    assert_eq!(Client::new().get(gw.http, "/length").await.text(), "0123456789", "levee serves on");
}

/// A kept-alive connection the upstream closes as levee reuses it (its
/// keep-alive timeout racing the reuse, unseen by levee's check): nothing
/// came back, so an idempotent request goes again on a new connection; a
/// POST gets the error, as nginx treats its cached connections.
#[tokio::test]
async fn a_reused_connection_dropped_unanswered_resends_only_idempotent_requests() {
    let backend = ScriptedBackend::start().await;
    let toml = base_config()
        + &upstream_and_route("fr-drop-up", &[backend.addr], "fr-drop", "/")
        // No retry stage: what is tested is the client's own resend.
        + "\n[upstreams.fr-drop-up.retry]\nattempts = 1\n";
    let gw = TestGateway::start(&toml).await;
    let client = Client::new();
    assert_eq!(client.get(gw.http, "/drop-second").await.status, 200);
    assert_eq!(backend.accepted(), 1);
    let rsp = client.get(gw.http, "/drop-second").await;
    assert_eq!(rsp.status, 200, "resent on a new connection: {}", rsp.text());
    assert_eq!(backend.accepted(), 2);

    let rsp = client.post(gw.http, "/drop-second", "once").await;
    assert_eq!(rsp.status, 502, "a POST is not sent twice");
    assert_eq!(rsp.reason(), Some("bad_upstream_response"));
    assert_eq!(backend.accepted(), 2, "and no new connection was opened for it");
}

/// An upstream that refuses an upload on its head (a 413) and closes with
/// the body unread, while levee still writes a body larger than the
/// sockets' buffers: the write fails on the reset, and the answer that came
/// before it is relayed, as hyper's client and nginx relay it, not a 502.
#[tokio::test]
async fn an_early_answer_to_a_large_upload_is_relayed() {
    let backend = ScriptedBackend::start().await;
    let toml = base_config().replace(
        "shutdown_grace",
        "buffer_body_bytes = \"32MiB\"\nmax_body_bytes = \"32MiB\"\nshutdown_grace",
    ) + &upstream_and_route("fr-early-up", &[backend.addr], "fr-early", "/")
        + "\n[upstreams.fr-early-up.retry]\nattempts = 1\n";
    let gw = TestGateway::start(&toml).await;
    let rsp = Client::new().post(gw.http, "/early", vec![b'x'; 24 << 20]).await;
    assert_eq!((rsp.status.as_u16(), rsp.text().as_str()), (413, "big!"), "{:?}", rsp.headers);
    assert_eq!(backend.last().head.split(' ').nth(1), Some("/early"));
    assert_eq!(Client::new().get(gw.http, "/length").await.text(), "0123456789", "levee serves on");
}
