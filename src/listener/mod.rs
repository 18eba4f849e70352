//! Stage 1: accept. Plain HTTP/1.1 and h2c, or TLS with ALPN, on one accept
//! loop per listener, with the bounds a gateway needs before any request exists:
//!
//! - `max_connections`: beyond it levee stops accepting (the kernel's backlog
//!   holds the rest) rather than accepting and failing;
//! - every socket is bounded in time from accept (`conn.rs`): the TLS
//!   handshake, protocol detection and the first head by
//!   `header_read_timeout`, an idle connection by `idle_timeout`, HTTP/2
//!   floods by GOAWAY; TCP keepalive finds peers that vanished;
//! - `max_header_bytes`: hyper's read buffer is bounded by it (431), and the
//!   handler checks the exact size again for a JSON answer;
//! - `proxy_protocol`: the PROXY header is read first, under the same
//!   deadline, before TLS and protocol detection (`proxy_protocol.rs`);
//! - shutdown: stop accepting, let connections finish within the grace period.

pub mod certs;
pub mod conn;
pub mod plain_http;
pub mod proxy_protocol;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use conn::CloseReason;

use crate::body::Body;
use crate::context::Scheme;

/// What the listener knows of the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address: the socket's, or the PROXY header's source.
    pub peer: SocketAddr,
    pub scheme: Scheme,
    /// The peer's address as `X-Forwarded-For` writes it: made once per
    /// connection, where each forwarded request had formatted and copied it.
    pub peer_header: http::HeaderValue,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, scheme: Scheme) -> Self {
        ConnInfo { peer, scheme, peer_header: crate::context::ip_header(peer.ip().to_canonical()) }
    }
}

/// Per-connection bounds, read when a connection is accepted (so a reload
/// applies to new connections).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub h2_max_concurrent_streams: u32,
    /// Every connection must start with a PROXY protocol header.
    pub proxy_protocol: bool,
}

impl ConnLimits {
    /// The admin listener's: the SPEC's defaults.
    pub fn admin() -> Self {
        ConnLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
            h2_max_concurrent_streams: 100,
            // The admin listener is reached directly, never through a load balancer.
            proxy_protocol: false,
        }
    }
}

/// Answers requests; the gateway and the admin API each implement it.
///
/// `handle`'s future is the implementation's own type, not a box: the
/// connection's service holds it inline, and hyper keeps that service's
/// future in one box per HTTP/1.1 connection, reused by every request on it.
/// A boxed future here cost an allocation per request, and its first write
/// missed the cache (callgrind: the largest single source of L1 data misses).
/// So the future should be small: `handle` may do the request's synchronous
/// work (checks, routing) before the future exists, as hyper polls it at once.
pub trait Handler: Send + Sync + 'static {
    fn limits(&self) -> ConnLimits;
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send + 'static;
}

/// Accepts on `listener` until `shutdown` turns true, then waits up to `grace`
/// for open connections to finish their requests. `name` is the `listener`
/// label of `levee_connections_closed_total` (`http`, `https`, `admin`).
pub async fn serve<H: Handler>(
    name: &'static str,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<H>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let max_connections = u32::try_from(max_connections).unwrap_or(u32::MAX).max(1);
    let slots = Arc::new(Semaphore::new(max_connections as usize));
    let closed = Arc::new(conn::Closed::new(name));
    loop {
        let permit = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let accepted = Instant::now();
        let _ = stream.set_nodelay(true);
        // A peer that vanished without a FIN (a device that lost power) is
        // found and its slot freed, even on a connection with a long request.
        let keepalive =
            TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10));
        let _ = SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let limits = handler.limits();
        let handler = handler.clone();
        let tls = tls.clone();
        let closed = closed.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let reason = connection(stream, peer, tls, limits, handler, shutdown, accepted).await;
            closed.count(reason);
        });
    }
    drop(listener);
    // Every open connection holds a slot: all slots back means all closed.
    if tokio::time::timeout(grace, slots.acquire_many(max_connections)).await.is_err() {
        tracing::warn!(?grace, "connections still open after the shutdown grace period; closing them");
    }
}

/// One accepted connection: its PROXY header if required, its TLS handshake
/// if any, then its requests; all before the first request head under
/// `header_read_timeout` from `accepted`.
async fn connection<H: Handler>(
    stream: TcpStream,
    mut peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    limits: ConnLimits,
    handler: Arc<H>,
    shutdown: watch::Receiver<bool>,
    accepted: Instant,
) -> CloseReason {
    let deadline = accepted + limits.header_read_timeout;
    let mut stream = stream;
    let mut replay = bytes::Bytes::new();
    if limits.proxy_protocol {
        match tokio::time::timeout_at(deadline, proxy_protocol::read(&mut stream)).await {
            Err(_) => return CloseReason::HeaderTimeout,
            Ok(Err(proxy_protocol::ReadError::Closed)) => return CloseReason::ClientClosed,
            Ok(Err(proxy_protocol::ReadError::Invalid(e))) => {
                tracing::debug!(%peer, error = %e, "connection without a valid PROXY header closed");
                return CloseReason::ProxyProtocol;
            }
            Ok(Ok((header, rest))) => {
                // UNKNOWN / LOCAL: the socket's own address stands.
                if let Some(source) = header.source {
                    peer = source;
                }
                replay = rest;
            }
        }
    }
    let stream = conn::Prefixed::new(replay, stream);
    match tls {
        None => {
            let info = ConnInfo::new(peer, Scheme::Http);
            conn::serve(stream, info, limits, handler, shutdown, accepted).await
        }
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls_stream)) => {
                let info = ConnInfo::new(peer, Scheme::Https);
                conn::serve(tls_stream, info, limits, handler, shutdown, accepted).await
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                CloseReason::TlsHandshake
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                CloseReason::TlsHandshake
            }
        },
    }
}

/// Completes once shutdown is signalled (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
