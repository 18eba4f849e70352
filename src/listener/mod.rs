//! Stage 1: accept. Plain HTTP/1.1 and h2c, or TLS with ALPN, on one accept
//! loop per listener, with the bounds a gateway needs before any request exists:
//!
//! - `max_connections`: beyond it levee stops accepting (the kernel's backlog
//!   holds the rest) rather than accepting and failing;
//! - `header_read_timeout`: a client that trickles its head (slowloris), or
//!   never finishes a TLS handshake, is disconnected;
//! - `max_header_bytes`: hyper's read buffer is bounded by it (431), and the
//!   handler checks the exact size again for a JSON answer;
//! - shutdown: stop accepting, let connections finish within the grace period.

pub mod certs;
pub mod plain_http;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::body::Body;
use crate::context::Scheme;
use crate::stack::BoxFuture;

/// What the listener knows of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub scheme: Scheme,
}

/// Per-connection bounds, read when a connection is accepted (so a reload
/// applies to new connections).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Answers requests; the gateway and the admin API each implement it.
pub trait Handler: Send + Sync + 'static {
    fn limits(&self) -> ConnLimits;
    fn handle(self: Arc<Self>, req: Request<Incoming>, conn: ConnInfo) -> BoxFuture<Response<Body>>;
}

/// Accepts on `listener` until `shutdown` turns true, then waits up to `grace`
/// for open connections to finish their requests.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<H>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(max_connections));
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
        let _ = stream.set_nodelay(true);
        let limits = handler.limits();
        let handler = handler.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => {
                    let conn = ConnInfo { peer, scheme: Scheme::Http };
                    serve_conn(TokioIo::new(stream), conn, limits, handler, watcher).await;
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(tls_stream)) => {
                            let conn = ConnInfo { peer, scheme: Scheme::Https };
                            serve_conn(TokioIo::new(tls_stream), conn, limits, handler, watcher).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(?grace, "connections still open after the shutdown grace period; closing them");
    }
}

/// Completes once shutdown is signalled (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn serve_conn<I, H>(
    io: I,
    conn: ConnInfo,
    limits: ConnLimits,
    handler: Arc<H>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: Handler,
{
    let service = hyper::service::service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler.handle(req, conn).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper refuses buffers under 8 KiB; the handler checks the exact limit.
        .max_buf_size(limits.max_header_bytes.max(8192) + 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let connection = builder.serve_connection(io, service).into_owned();
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
    }
}
