//! WebSocket through levee: a real tokio-tungstenite client and echo server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::support::gateway::metric_value;
use crate::support::{base_config, TestGateway};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An echo server; records the close codes it receives.
async fn echo_server() -> (SocketAddr, Arc<Mutex<Vec<u16>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closes = Arc::new(Mutex::new(Vec::new()));
    let seen = closes.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    match msg {
                        Message::Close(frame) => {
                            seen.lock().unwrap().push(frame.map_or(1005, |f| u16::from(f.code)));
                            break;
                        }
                        m @ (Message::Text(_) | Message::Binary(_)) if ws.send(m.clone()).await.is_err() => {
                            break
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, closes)
}

fn config(name: &str, backend: SocketAddr, route_extra: &str) -> String {
    config_with_storm(name, backend, route_extra, "enabled = false")
}

fn config_with_storm(name: &str, backend: SocketAddr, route_extra: &str, storm: &str) -> String {
    base_config().replace("shutdown_grace = \"5s\"", "shutdown_grace = \"1s\"")
        + &format!(
            r#"
[upstreams.{name}]
endpoints = ["{backend}"]

[[routes]]
name = "{name}"
path_prefix = "/"
upstream = "{name}"
client_key = "header:x-device-id"
{route_extra}
[routes.storm]
{storm}
"#
        )
}

async fn connect(gw: &TestGateway, device: &str) -> Result<Ws, WsError> {
    let mut req = format!("ws://{}/push", gw.http).into_client_request().unwrap();
    req.headers_mut().insert("x-device-id", device.parse().unwrap());
    tokio_tungstenite::connect_async(req).await.map(|(ws, _)| ws)
}

/// The status and `x-levee-reason` of a refused handshake.
fn refusal(result: Result<Ws, WsError>) -> (u16, String) {
    match result {
        Err(WsError::Http(rsp)) => (
            rsp.status().as_u16(),
            rsp.headers().get("x-levee-reason").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default(),
        ),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, the handshake succeeded"),
    }
}

async fn open_gauge(gw: &TestGateway, route: &str) -> f64 {
    let label = format!("route=\"{route}\"");
    metric_value(&gw.metrics().await, "levee_upgraded_connections", &[&label]).unwrap_or(0.0)
}

#[tokio::test]
async fn a_websocket_is_relayed_both_ways_and_counted() {
    let (backend, _) = echo_server().await;
    let gw = TestGateway::start(&config("ws-echo", backend, "")).await;
    let mut ws = connect(&gw, "dev-echo").await.unwrap();
    for text in ["hello", "through", "levee"] {
        ws.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    let big = vec![7u8; 200_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echoed.into_data().len(), big.len());
    assert_eq!(open_gauge(&gw, "ws-echo").await, 1.0);
    ws.close(None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_gauge(&gw, "ws-echo").await != 0.0 {
        assert!(Instant::now() < deadline, "the closed connection is still counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_client_holds_at_most_max_upgraded_per_client() {
    let (backend, _) = echo_server().await;
    let gw = TestGateway::start(&config("ws-cap", backend, "max_upgraded_per_client = 2")).await;
    let first = connect(&gw, "dev-cap").await.unwrap();
    let _second = connect(&gw, "dev-cap").await.unwrap();
    assert_eq!(refusal(connect(&gw, "dev-cap").await), (429, "too_many_connections".into()));
    // Another device is not affected.
    let _other = connect(&gw, "dev-cap-other").await.unwrap();
    // Closing one gives its slot back.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match connect(&gw, "dev-cap").await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "the slot never came back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn reconnect_attempts_count_against_the_routes_limits() {
    let (backend, _) = echo_server().await;
    let gw = TestGateway::start(&config("ws-limit", backend, "[[routes.limits]]\nrate = \"3/m\"")).await;
    for _ in 0..3 {
        let mut ws = connect(&gw, "dev-reconnect").await.unwrap();
        ws.close(None).await.unwrap();
    }
    assert_eq!(refusal(connect(&gw, "dev-reconnect").await), (429, "rate_limited".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_is_quarantined_as_a_callback_bomb() {
    let _x = crate::support::exclusive().await;
    let (backend, _) = echo_server().await;
    let gw = TestGateway::start(&config_with_storm("ws-bomb", backend, "", "quarantine = \"60s\"")).await;
    // A device whose reconnect loop doubles its rate every second (2/s, 4/s, ...).
    // On a starved machine the loop can send in bursts that break a growth
    // streak; it then starts over as a new device (at most 3 times): this test
    // proves that reconnects are seen like any request, tests/it/storm.rs
    // bounds how fast.
    for attempt in 0..3 {
        let device = format!("dev-reconnect-bomb-{attempt}");
        let started = Instant::now();
        for k in 1..10_000u64 {
            let due = (k as f64 * std::f64::consts::LN_2 / 2.0 + 1.0).log2();
            tokio::time::sleep_until(started + Duration::from_secs_f64(due)).await;
            match connect(&gw, &device).await {
                Ok(mut ws) => {
                    let _ = ws.close(None).await;
                }
                refused => {
                    assert_eq!(refusal(refused), (429, "callback_bomb".into()));
                    // Another device still connects while this one is quarantined.
                    assert!(connect(&gw, "dev-calm").await.is_ok());
                    return;
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
    }
    panic!("a doubling reconnect loop was never quarantined in 3 tries");
}

#[tokio::test]
async fn shutdown_closes_relayed_websockets_with_going_away() {
    let (backend, closes) = echo_server().await;
    let gw = TestGateway::start(&config("ws-shutdown", backend, "")).await;
    let mut ws = connect(&gw, "dev-shutdown").await.unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));
    let stopping = tokio::spawn(gw.shutdown());
    // After the 1 s grace, both peers get a close frame 1001.
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("no close frame") {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("the relay ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !closes.lock().unwrap().contains(&1001) {
        assert!(Instant::now() < deadline, "the upstream got no 1001: {:?}", closes.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stopping.await.unwrap();
}
