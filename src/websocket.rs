//! WebSocket: an `Upgrade: websocket` request passes through the route's
//! stack like any request (limits count connection attempts, a reconnect
//! storm is a storm), then levee relays both directions until either side
//! closes.
//!
//! - The upgraded connection holds no upstream concurrency slot: the 101's
//!   empty body ends at once, and the admission permit with it.
//! - Each route caps the upgraded connections a client holds open
//!   (`max_upgraded_per_client`, 429 `too_many_connections`); the map of
//!   counts holds only clients with an open connection, so it is bounded by
//!   `max_connections`.
//! - The relay reads at most [`BUF`] bytes from a side before it has written
//!   them to the other (backpressure: a slow reader slows its writer, and
//!   nothing queues in levee).
//! - On shutdown the relay goes on for `shutdown_grace`, then ends each
//!   direction at a frame boundary with a close frame (1001, going away), so
//!   both peers see a clean WebSocket close rather than a cut socket.
//!
//! HTTP/2 extended CONNECT (RFC 8441) is not offered: hyper's server supports
//! it, but the upstream side would need an HTTP/2 connection per upstream
//! that allows it, and every WebSocket client falls back to HTTP/1.1; levee
//! answers an h2 CONNECT like any request it does not recognise.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{HeaderValue, CONNECTION, UPGRADE};
use http::{HeaderMap, Method, Request, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use metrics::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::metrics as m;

/// Bytes read from one side before they are written to the other.
const BUF: usize = 16 * 1024;

/// How long a direction may take to reach a frame boundary once closing.
const CLOSE_WITHIN: Duration = Duration::from_secs(2);

/// Whether `req` asks for a WebSocket upgrade (HTTP/1.1, GET, `Connection:
/// upgrade`, `Upgrade: websocket`).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.method() == Method::GET
        && has_token(req.headers(), CONNECTION, "upgrade")
        && has_token(req.headers(), UPGRADE, "websocket")
}

fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Puts back the two hop-by-hop headers an upgrade needs (forwarding removes
/// them with the rest).
pub fn restore_upgrade_headers(headers: &mut HeaderMap) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
}

// === per-route accounting ===

/// The open upgraded connections of one route, per client.
pub struct Upgraded {
    per_client: Mutex<HashMap<Arc<str>, u32>>,
    max_per_client: u32,
    open: Gauge,
}

impl Upgraded {
    pub fn new(route: &str, max_per_client: u32) -> Arc<Self> {
        Arc::new(Upgraded {
            per_client: Mutex::new(HashMap::new()),
            max_per_client,
            open: metrics::gauge!(m::UPGRADED_CONNECTIONS, "route" => route.to_string()),
        })
    }

    /// A slot for one more connection of `client`, or `None` at its cap.
    pub fn acquire(self: &Arc<Self>, client: Arc<str>) -> Option<Slot> {
        let mut map = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(client.clone()).or_insert(0);
        if *n >= self.max_per_client {
            return None;
        }
        *n += 1;
        drop(map);
        self.open.increment(1.0);
        Some(Slot { upgraded: self.clone(), client })
    }
}

/// One open (or opening) upgraded connection; given back when dropped.
pub struct Slot {
    upgraded: Arc<Upgraded>,
    client: Arc<str>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.upgraded.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.client);
            }
        }
        drop(map);
        self.upgraded.open.decrement(1.0);
    }
}

// === the relay ===

/// Relays the two upgraded connections until either side closes, holding
/// `slot` throughout; on shutdown, closes both with 1001 after `grace`.
pub fn relay(
    client: OnUpgrade,
    upstream: OnUpgrade,
    slot: Slot,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    tokio::spawn(async move {
        let _slot = slot;
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade did not complete");
                return;
            }
        };
        let closing = async move {
            let _ = shutdown.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        if let Err(e) = pump(TokioIo::new(client), TokioIo::new(upstream), closing).await {
            tracing::debug!(error = %e, "websocket relay ended with an error");
        }
    });
}

/// Copies both ways until a side closes or `closing` completes; then ends
/// each direction at a frame boundary with a close frame.
async fn pump<C, U>(
    client: C,
    upstream: U,
    closing: impl std::future::Future<Output = ()>,
) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut upstream_rd, mut upstream_wr) = tokio::io::split(upstream);
    let mut up = Direction::new(); // client → upstream (masked frames)
    let mut down = Direction::new(); // upstream → client
    let (mut buf_up, mut buf_down) = (vec![0u8; BUF], vec![0u8; BUF]);
    tokio::pin!(closing);
    let mut close_by: Option<tokio::time::Instant> = None;
    loop {
        if close_by.is_some() {
            if !up.closed && up.frames.at_boundary() {
                upstream_wr.write_all(&close_frame_masked()).await?;
                up.closed = true;
            }
            if !down.closed && down.frames.at_boundary() {
                client_wr.write_all(&CLOSE_GOING_AWAY).await?;
                down.closed = true;
            }
            if up.closed && down.closed {
                break;
            }
        }
        let deadline = close_by.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            n = client_rd.read(&mut buf_up), if !up.closed => {
                let n = n?;
                if n == 0 { break; }
                up.frames.advance(&buf_up[..n]);
                upstream_wr.write_all(&buf_up[..n]).await?;
            }
            n = upstream_rd.read(&mut buf_down), if !down.closed => {
                let n = n?;
                if n == 0 { break; }
                down.frames.advance(&buf_down[..n]);
                client_wr.write_all(&buf_down[..n]).await?;
            }
            _ = &mut closing, if close_by.is_none() => {
                close_by = Some(tokio::time::Instant::now() + CLOSE_WITHIN);
            }
            _ = tokio::time::sleep_until(deadline), if close_by.is_some() => break,
        }
    }
    let _ = client_wr.shutdown().await;
    let _ = upstream_wr.shutdown().await;
    Ok(())
}

struct Direction {
    frames: Frames,
    closed: bool,
}

impl Direction {
    fn new() -> Self {
        Direction { frames: Frames::default(), closed: false }
    }
}

/// Close 1001 (going away), from levee as the server: unmasked.
const CLOSE_GOING_AWAY: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];

/// Close 1001 from levee as the upstream's client: masked (RFC 6455 §5.3).
fn close_frame_masked() -> [u8; 8] {
    let mask = fastrand::u32(..).to_be_bytes();
    [0x88, 0x82, mask[0], mask[1], mask[2], mask[3], 0x03 ^ mask[0], 0xE9 ^ mask[1]]
}

/// Where one direction of a WebSocket stream is: inside a frame header
/// (with `have` of its bytes seen) or inside a payload (`left` bytes to go).
/// Only ever reads headers, never buffers a payload.
#[derive(Debug, Default)]
struct Frames {
    header: [u8; 14],
    have: usize,
    left: u64,
}

impl Frames {
    /// Between two frames: a close frame may go here.
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = usize::try_from(self.left).unwrap_or(usize::MAX).min(bytes.len());
                self.left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if let Some(payload) = self.header_done() {
                self.have = 0;
                self.left = payload;
            }
        }
    }

    /// The payload length once the header is complete.
    fn header_done(&self) -> Option<u64> {
        if self.have < 2 {
            return None;
        }
        let masked = self.header[1] & 0x80 != 0;
        let code = self.header[1] & 0x7f;
        let ext = match code {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let len = 2 + ext + if masked { 4 } else { 0 };
        if self.have < len {
            return None;
        }
        Some(match code {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => u64::from_be_bytes(self.header[2..10].try_into().unwrap_or([0; 8])),
            n => u64::from(n),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(masked: bool, payload_len: usize) -> Vec<u8> {
        let mut f = vec![0x82];
        let m = if masked { 0x80 } else { 0 };
        match payload_len {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(7u8, payload_len));
        f
    }

    #[test]
    fn boundaries_are_found_whatever_the_chunking() {
        let mut stream = Vec::new();
        for (masked, len) in [(true, 5), (false, 0), (true, 300), (false, 70_000), (true, 125)] {
            stream.extend(frame(masked, len));
        }
        for chunk in [1, 2, 3, 7, 64, 4096, stream.len()] {
            let mut f = Frames::default();
            for piece in stream.chunks(chunk) {
                f.advance(piece);
            }
            assert!(f.at_boundary(), "chunk {chunk}");
        }
        let mut f = Frames::default();
        f.advance(&stream[..stream.len() - 1]);
        assert!(!f.at_boundary());
    }

    #[test]
    fn upgrade_requests_are_recognised() {
        let req = Request::get("/ws")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "WebSocket")
            .body(())
            .unwrap();
        assert!(is_upgrade(&req));
        let plain = Request::get("/ws").header("upgrade", "websocket").body(()).unwrap();
        assert!(!is_upgrade(&plain), "Upgrade without Connection: upgrade");
        let h2c =
            Request::get("/").header("connection", "upgrade").header("upgrade", "h2c").body(()).unwrap();
        assert!(!is_upgrade(&h2c));
    }

    #[test]
    fn a_client_holds_at_most_its_cap_and_slots_come_back() {
        let u = Upgraded::new("ws-unit", 2);
        let key: Arc<str> = Arc::from("dev");
        let a = u.acquire(key.clone()).unwrap();
        let _b = u.acquire(key.clone()).unwrap();
        assert!(u.acquire(key.clone()).is_none());
        assert!(u.acquire(Arc::from("other")).is_some());
        drop(a);
        assert!(u.acquire(key).is_some());
        assert!(u.per_client.lock().unwrap().len() <= 2);
    }
}
