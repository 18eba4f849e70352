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
use std::future::Future;
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
use crate::upstream::h1::{self, Conn, Framing, H1Error};

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
    /// The same, on the lean client's connection (`h1.rs`).
    #[error("invalid or broken response: {0}")]
    Exchange(H1Error),
}

/// The idle connections of one kind, most recently used last, each with
/// when it went idle: at most [`MAX_IDLE`], none kept past [`IDLE_TIMEOUT`].
struct IdleList<C> {
    list: Mutex<VecDeque<(C, Instant)>>,
}

impl<C> IdleList<C> {
    fn new() -> Self {
        IdleList { list: Mutex::new(VecDeque::new()) }
    }

    /// The most recently used connection that is young enough and `usable`;
    /// the others met on the way are dropped (closed).
    fn take(&self, usable: impl Fn(&C) -> bool) -> Option<C> {
        let now = Instant::now();
        let mut idle = self.list.lock().ok()?;
        while let Some((conn, since)) = idle.pop_back() {
            if now.saturating_duration_since(since) < IDLE_TIMEOUT && usable(&conn) {
                return Some(conn);
            }
        }
        None
    }

    /// Back after a complete response; the oldest past [`IDLE_TIMEOUT`] are
    /// closed on the way.
    fn put(&self, conn: C) {
        let now = Instant::now();
        let Ok(mut idle) = self.list.lock() else { return };
        while idle.front().is_some_and(|(_, since)| now.saturating_duration_since(*since) >= IDLE_TIMEOUT) {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back((conn, now));
        }
    }

    /// Keeps the young enough and `usable` ones (a quiet pool's, which no `put` meets).
    fn retain(&self, usable: impl Fn(&C) -> bool) {
        let now = Instant::now();
        if let Ok(mut idle) = self.list.lock() {
            idle.retain(|(conn, since)| now.saturating_duration_since(*since) < IDLE_TIMEOUT && usable(conn));
        }
    }
}

/// The idle connections of one endpoint, most recently used last: hyper's
/// (requests with a streaming body) and the lean client's (every other).
pub struct EndpointPool {
    /// `host:port`, resolved on every new connection (so DNS changes are followed).
    target: String,
    connect_timeout: Duration,
    idle: IdleList<http1::SendRequest<Body>>,
    lean: IdleList<Conn>,
}

impl EndpointPool {
    pub fn new(authority: &http::uri::Authority, connect_timeout: Duration) -> Arc<Self> {
        let target = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
        Arc::new(EndpointPool { target, connect_timeout, idle: IdleList::new(), lean: IdleList::new() })
    }

    /// Sends `req`, whose body is in memory (none, or read whole), on the
    /// lean client (`h1.rs`): a pooled connection or a new one, driven by
    /// this task. A reused connection that fails before any of the response
    /// arrived was most likely closed by the upstream's keep-alive timeout
    /// as it was reused: an idempotent request is sent once more on a new
    /// connection (nginx does the same for its cached connections); any
    /// other gets the error, as it would from hyper's client once sent.
    ///
    /// The request is taken apart before the future exists: an `async fn`
    /// kept it beside its parts.
    pub fn send_buffered(
        self: Arc<Self>,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, PoolError>> + Send + 'static {
        use http_body_util::BodyExt;
        let (parts, body) = req.into_parts();
        async move {
            // Empty or `Full`: ready at once.
            let body = body
                .collect()
                .await
                .map_err(|e| PoolError::Exchange(H1Error::Io(std::io::Error::other(e))))?
                .to_bytes();
            let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let head = h1::write_head(&parts.method, target, &parts.headers, body.len());
            let mut retried = false;
            loop {
                let pooled = if retried { None } else { self.checkout_lean() };
                let reused = pooled.is_some();
                let mut conn = match pooled {
                    Some(conn) => conn,
                    None => Conn::new(self.connect_stream().await?),
                };
                match conn.exchange(&head, &body, &parts.method).await {
                    Ok(head) => {
                        let mut lean = LeanBody {
                            conn: Some(conn),
                            framing: head.framing,
                            reuse: head.reuse,
                            pool: self.clone(),
                        };
                        if lean.framing == Framing::Done {
                            // No body: the connection is free at once.
                            lean.release();
                        }
                        let mut rsp = Response::new(crate::body::boxed(lean));
                        *rsp.status_mut() = head.status;
                        *rsp.version_mut() = head.version;
                        *rsp.headers_mut() = head.headers;
                        return Ok(rsp);
                    }
                    // (A reused connection is never a retry's: it takes a new one.)
                    Err((_, false)) if reused && parts.method.is_idempotent() => retried = true,
                    Err((error, _)) => return Err(PoolError::Exchange(error)),
                }
            }
        }
    }

    /// The most recently used idle lean connection that is still open and
    /// young enough; the others met on the way are closed.
    fn checkout_lean(&self) -> Option<Conn> {
        self.lean.take(Conn::is_reusable)
    }

    /// A lean connection back to the pool after a complete response.
    fn put_lean(&self, mut conn: Conn) {
        conn.settle();
        self.lean.put(conn);
    }

    /// Sends `req` (origin-form target, `Host` set) on a pooled or a new
    /// connection. The connection goes back to the pool when the response
    /// body has been read to its end; a body dropped before that closes it
    /// (HTTP/1.1 cannot skip the rest of a response).
    ///
    /// Not an `async fn`: one would keep the request twice (the argument and
    /// the variable the loop takes it back into).
    #[allow(clippy::manual_async_fn)]
    pub fn send(
        self: Arc<Self>,
        mut req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, PoolError>> + Send + 'static {
        async move {
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
    }

    /// The most recently used idle connection that is still open and young
    /// enough; older or closed ones met on the way are dropped (closed).
    fn checkout(&self) -> Option<http1::SendRequest<Body>> {
        self.idle.take(|sender| !sender.is_closed())
    }

    /// Back to the pool after a complete response; the oldest idle
    /// connections past [`IDLE_TIMEOUT`] are closed on the way.
    fn put(&self, sender: http1::SendRequest<Body>) {
        if !sender.is_closed() {
            self.idle.put(sender);
        }
    }

    /// Closes the idle connections past [`IDLE_TIMEOUT`] (a quiet pool's
    /// connections, which no `put` meets).
    pub fn close_expired(&self) {
        self.idle.retain(|sender| !sender.is_closed());
        self.lean.retain(Conn::is_reusable);
    }

    /// A new TCP connection within `connect_timeout`.
    async fn connect_stream(&self) -> Result<TcpStream, PoolError> {
        match tokio::time::timeout(self.connect_timeout, self.open()).await {
            Ok(stream) => stream,
            Err(_) => {
                let msg =
                    format!("tcp connect to {} timed out after {:?}", self.target, self.connect_timeout);
                Err(PoolError::Connect(msg.into()))
            }
        }
    }

    /// A new hyper connection within `connect_timeout`, its task spawned.
    async fn connect(&self) -> Result<http1::SendRequest<Body>, PoolError> {
        let stream = self.connect_stream().await?;
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

/// A response body read by the lean client: hands the connection back when
/// the body ends cleanly; dropped before that, the connection closes with it.
struct LeanBody {
    /// `None` once handed back or broken.
    conn: Option<Conn>,
    framing: Framing,
    reuse: bool,
    pool: Arc<EndpointPool>,
}

impl LeanBody {
    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.reuse && conn.drained() {
                self.pool.put_lean(conn);
            }
        }
    }
}

impl HttpBody for LeanBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = h1::poll_body(conn, &mut this.framing, cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(data)) => {
                // Handed back as soon as the last byte is in: hyper's server
                // does not poll a body that says it has ended.
                if this.framing == Framing::Done {
                    this.release();
                }
                Poll::Ready(data.map(|d| Ok(Frame::data(d))))
            }
            Poll::Ready(Err(e)) => {
                this.conn = None;
                this.framing = Framing::Done;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}
