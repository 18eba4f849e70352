//! Every attack from the hardening issue, as a test against the real gateway
//! and real loopback backends: what a client that wants levee down would send.
//! One file per input (sockets, bodies, paths, config, admin, store).

mod admin;
mod answers;
mod bodies;
mod config;
mod connections;
mod paths;
mod store;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `bytes` on a fresh connection and reads until the server closes it
/// (or 10 s pass); the answer as text.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// How long until the server closes `s` (EOF or reset), reading and dropping
/// whatever it sends; `None` if it is still open after `within`.
pub async fn closed_within<R: AsyncRead + Unpin>(s: &mut R, within: Duration) -> Option<Duration> {
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(started + within, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Raw HTTP/2 frames, written by hand so the tests send exactly what an
/// attacker would, which no well-behaved client library does.
pub mod h2frame {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// `GET /` for authority `t`, HPACK with static-table indices only.
    pub fn get_root() -> Vec<u8> {
        // :method GET, :scheme http, :path /, then :authority "t" as a literal.
        vec![0x82, 0x86, 0x84, 0x01, 0x01, b't']
    }

    /// `GET path` for authority `t` from device `device` (`x-device-id`): the
    /// path as a literal (`:path`'s static-table name), as a flood with a new
    /// path per stream sends it.
    pub fn get_as(path: &str, device: &str) -> Vec<u8> {
        let lit = |b: &mut Vec<u8>, s: &str| {
            assert!(s.len() < 127);
            b.push(s.len() as u8);
            b.extend_from_slice(s.as_bytes());
        };
        let mut b = vec![0x82, 0x86, 0x04];
        lit(&mut b, path);
        b.extend_from_slice(&[0x01, 0x01, b't', 0x00]);
        lit(&mut b, "x-device-id");
        lit(&mut b, device);
        b
    }

    /// Reads frames until the whole answer on `stream` is here (a frame on
    /// it that ends the stream); its response head's HPACK block, or `None`
    /// on the end of the connection or after `within`.
    pub async fn read_answer_to(
        s: &mut tokio::net::TcpStream,
        stream: u32,
        within: std::time::Duration,
    ) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut block = None;
        loop {
            let (head, payload) = next_frame(s, deadline).await?;
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if id != stream {
                continue;
            }
            if head[3] == HEADERS && block.is_none() {
                block = Some(payload);
            }
            if (head[3] == HEADERS || head[3] == DATA) && head[4] & END_STREAM != 0 {
                return block;
            }
        }
    }

    /// HPACK's indexed `:status: 200` (static table entry 8), which h2
    /// encodes first in a 200's head.
    pub const STATUS_200: u8 = 0x88;

    /// The client's connection start: preface and empty SETTINGS.
    pub fn start() -> Vec<u8> {
        let mut b = PREFACE.to_vec();
        b.extend(frame(SETTINGS, 0, 0, &[]));
        b
    }

    /// Reads frames until GOAWAY (its error code) or the end of the stream.
    pub async fn read_goaway(s: &mut tokio::net::TcpStream, within: std::time::Duration) -> Option<u32> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (head, payload) = next_frame(s, deadline).await?;
            if head[3] == GOAWAY && payload.len() >= 8 {
                return Some(u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]));
            }
        }
    }

    /// The next frame (its 9-byte head and its payload); `None` on the end
    /// of the connection or after `deadline`.
    async fn next_frame(
        s: &mut tokio::net::TcpStream,
        deadline: tokio::time::Instant,
    ) -> Option<([u8; 9], Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 9];
        tokio::time::timeout_at(deadline, s.read_exact(&mut head)).await.ok()?.ok()?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        tokio::time::timeout_at(deadline, s.read_exact(&mut payload)).await.ok()?.ok()?;
        Some((head, payload))
    }
}
