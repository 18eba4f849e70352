//! Pooled keep-alive HTTP/1.1 connections to one plain-HTTP endpoint, on
//! hyper's connection API (`hyper::client::conn::http1`).
//!
//! hyper-util's legacy client does the same for any URI: it hashes the
//! request's (scheme, authority) into a shared pool map on every request,
//! converts the target to origin form, and keeps a waiter list per key. An
//! endpoint's pool here is known before the request arrives, so a checkout is
//! one short lock and a `pop`, and the request is sent in origin form as built.
//! TLS endpoints, gRPC (HTTP/2) and upgrades stay on the legacy client
//! (`forward.rs`): they are not the hot path and need its connectors.
//!
//! Kept from the legacy client: the connect timeout, `TCP_NODELAY`, TCP
//! keepalive (60 s), an idle timeout (90 s), at most [`MAX_IDLE`] idle
//! connections per endpoint, and one transparent retry on a fresh connection
//! when a pooled one turns out closed before it took the request (the
//! upstream's keep-alive timeout racing the reuse).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::Body;

/// Idle connections kept per endpoint, as the legacy client's `pool_max_idle_per_host`.
pub const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed instead of reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const KEEPALIVE: Duration = Duration::from_secs(60);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request got no response head from the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection: resolution, refusal, or `connect_timeout`.
    #[error("connect failed: {0}")]
    Connect(BoxError),
    /// The connection failed while sending the request or reading the head.
    #[error("invalid or broken response: {0}")]
    Send(hyper::Error),
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// The idle connections of one endpoint, most recently used last.
pub struct EndpointPool {
    /// `host:port`, resolved on every new connection (so DNS changes are followed).
    target: String,
    connect_timeout: Duration,
    idle: Mutex<VecDeque<Idle>>,
}

impl EndpointPool {
    pub fn new(authority: &http::uri::Authority, connect_timeout: Duration) -> Arc<Self> {
        let target = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
        Arc::new(EndpointPool { target, connect_timeout, idle: Mutex::new(VecDeque::new()) })
    }

    /// Sends `req` (origin-form target, `Host` set) on a pooled or a new
    /// connection. The connection goes back to the pool when the response
    /// body has been read to its end; a body dropped before that closes it
    /// (HTTP/1.1 cannot skip the rest of a response).
    pub async fn send(self: &Arc<Self>, mut req: Request<Body>) -> Result<Response<Body>, PoolError> {
        let mut retried = false;
        loop {
            let pooled = if retried { None } else { self.checkout() };
            let reused = pooled.is_some();
            let mut sender = match pooled {
                Some(sender) => sender,
                None => self.connect().await?,
            };
            let sent = match sender.ready().await {
                Ok(()) => sender.try_send_request(req).await.map_err(|mut e| {
                    let unsent = e.take_message();
                    (e.into_error(), unsent)
                }),
                // Closed while idle: the request was never handed over.
                Err(error) => Err((error, Some(req))),
            };
            match sent {
                Ok(rsp) => {
                    let (parts, incoming) = rsp.into_parts();
                    let body = PooledBody { inner: incoming, sender: Some(sender), pool: self.clone() };
                    return Ok(Response::from_parts(parts, crate::body::boxed(body)));
                }
                Err((error, unsent)) => match unsent {
                    // Never written: a pooled connection closed under it
                    // (the upstream's keep-alive timeout). Once more, on a new one.
                    Some(back) if reused && !retried => {
                        req = back;
                        retried = true;
                    }
                    _ => return Err(PoolError::Send(error)),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open and young
    /// enough; older or closed ones met on the way are dropped (closed).
    fn checkout(&self) -> Option<http1::SendRequest<Body>> {
        let now = Instant::now();
        let mut idle = self.idle.lock().ok()?;
        while let Some(conn) = idle.pop_back() {
            if !conn.sender.is_closed() && now.saturating_duration_since(conn.since) < IDLE_TIMEOUT {
                return Some(conn.sender);
            }
        }
        None
    }

    /// Back to the pool after a complete response; the oldest idle
    /// connections past [`IDLE_TIMEOUT`] are closed on the way.
    fn put(&self, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let Ok(mut idle) = self.idle.lock() else { return };
        while idle.front().is_some_and(|c| now.saturating_duration_since(c.since) >= IDLE_TIMEOUT) {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { sender, since: now });
        }
    }

    /// Closes the idle connections past [`IDLE_TIMEOUT`] (a quiet pool's
    /// connections, which no `put` meets).
    pub fn close_expired(&self) {
        let now = Instant::now();
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|c| !c.sender.is_closed() && now.saturating_duration_since(c.since) < IDLE_TIMEOUT);
        }
    }

    /// A new connection within `connect_timeout`, its task spawned.
    async fn connect(&self) -> Result<http1::SendRequest<Body>, PoolError> {
        let stream = match tokio::time::timeout(self.connect_timeout, self.open()).await {
            Ok(stream) => stream?,
            Err(_) => {
                let msg =
                    format!("tcp connect to {} timed out after {:?}", self.target, self.connect_timeout);
                return Err(PoolError::Connect(msg.into()));
            }
        };
        let (sender, conn) =
            http1::handshake(TokioIo::new(stream)).await.map_err(|e| PoolError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// The endpoint's addresses in order, the first that accepts.
    async fn open(&self) -> Result<TcpStream, PoolError> {
        let addrs = tokio::net::lookup_host(self.target.as_str())
            .await
            .map_err(|e| PoolError::Connect(format!("cannot resolve {}: {e}", self.target).into()))?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let keepalive = socket2::TcpKeepalive::new().with_time(KEEPALIVE);
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                    return Ok(stream);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(PoolError::Connect(match last {
            Some(e) => format!("tcp connect to {} failed: {e}", self.target).into(),
            None => format!("{} resolved to no address", self.target).into(),
        }))
    }
}

/// Closes idle connections past their timeout every 30 s while the pools
/// live (a pool that gets no traffic meets none of its connections).
pub fn sweep_idle(pools: &[Option<Arc<EndpointPool>>]) {
    let weak: Vec<std::sync::Weak<EndpointPool>> = pools.iter().flatten().map(Arc::downgrade).collect();
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
    if weak.is_empty() {
        return;
    }
    rt.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        tick.tick().await;
        loop {
            tick.tick().await;
            let mut alive = false;
            for pool in weak.iter().filter_map(std::sync::Weak::upgrade) {
                pool.close_expired();
                alive = true;
            }
            if !alive {
                return;
            }
        }
    });
}

/// The response body of a pooled connection: hands the connection back when
/// the body ends.
struct PooledBody {
    inner: Incoming,
    sender: Option<http1::SendRequest<Body>>,
    pool: Arc<EndpointPool>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.put(sender);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.sender = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // hyper's server does not poll a body that says it has ended.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
