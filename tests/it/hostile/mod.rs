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

    /// The client's connection start: preface and empty SETTINGS.
    pub fn start() -> Vec<u8> {
        let mut b = PREFACE.to_vec();
        b.extend(frame(SETTINGS, 0, 0, &[]));
        b
    }

    /// Reads frames until GOAWAY (its error code) or the end of the stream.
    pub async fn read_goaway(s: &mut tokio::net::TcpStream, within: std::time::Duration) -> Option<u32> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + within;
        let mut head = [0u8; 9];
        loop {
            match tokio::time::timeout_at(deadline, s.read_exact(&mut head)).await {
                Ok(Ok(_)) => {}
                _ => return None,
            }
            let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            match tokio::time::timeout_at(deadline, s.read_exact(&mut payload)).await {
                Ok(Ok(_)) => {}
                _ => return None,
            }
            if head[3] == GOAWAY && payload.len() >= 8 {
                return Some(u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]));
            }
        }
    }
}
