//! One accepted connection, bounded in time from its first byte to its last.
//!
//! hyper bounds a request head once it knows the protocol, but three states
//! were bounded by nothing, and each let a laptop hold every connection slot
//! of the gateway: a socket that sends nothing (or only `P`, the first byte of
//! the HTTP/2 preface) while the protocol is being detected, an HTTP/2
//! connection that never opens a stream, and an idle HTTP/2 connection. So
//! levee detects the protocol itself, under the same deadline, and a watchdog
//! beside each connection enforces the rest:
//!
//! | state | bound | then |
//! |---|---|---|
//! | from accept to the first complete request head, any protocol | `header_read_timeout` | closed (`header_timeout`) |
//! | a later HTTP/1.1 head, from the end of the previous request | `header_read_timeout` (the same watchdog, not hyper's timer) | closed (`header_timeout`) |
//! | no request in flight, after one completed | `idle_timeout` | graceful close, GOAWAY on h2 (`idle`) |
//! | an h2 client cancelling streams faster than it completes them | 64 cancellations more than completions | GOAWAY (`h2_abuse`) |
//!
//! The h2 crate itself answers the classic floods with GOAWAY
//! `ENHANCE_YOUR_CALM`: streams reset before levee accepts them (rapid reset,
//! CVE-2023-44487), CONTINUATION floods and header lists past
//! `max_header_bytes`; those streams never reach the handler, so nothing of
//! them is forwarded. Every close is counted in
//! `levee_connections_closed_total{listener,reason}`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::future::{Either, FutureExt};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metrics::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::{ConnInfo, ConnLimits, Handler};
use crate::body::Guarded;
use crate::metrics as m;

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// After a graceful close (idle, abuse), how long the peer has to go away
/// before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Cancelled streams beyond completed ones that make an h2 client abusive.
const MAX_EXCESS_CANCELS: u32 = 64;

/// Why a connection ended: the `reason` label of `levee_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed (or broke) the connection.
    ClientClosed,
    /// No complete request head within `header_read_timeout`.
    HeaderTimeout,
    /// No request in flight for `idle_timeout`.
    Idle,
    /// An HTTP/2 flood: rapid reset, CONTINUATION, or cancellations.
    H2Abuse,
    /// The client spoke something that is not HTTP.
    ProtocolError,
    /// The TLS handshake failed or did not finish within `header_read_timeout`.
    TlsHandshake,
    /// levee is shutting down.
    Shutdown,
    /// `proxy_protocol = true` and the connection did not start with a valid
    /// PROXY header (a peer that closes first is `client_closed`, one that
    /// stays silent `header_timeout`).
    ProxyProtocol,
}

impl CloseReason {
    const ALL: [CloseReason; 8] = [
        CloseReason::ClientClosed,
        CloseReason::HeaderTimeout,
        CloseReason::Idle,
        CloseReason::H2Abuse,
        CloseReason::ProtocolError,
        CloseReason::TlsHandshake,
        CloseReason::Shutdown,
        CloseReason::ProxyProtocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::Idle => "idle",
            CloseReason::H2Abuse => "h2_abuse",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::TlsHandshake => "tls_handshake",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ProxyProtocol => "proxy_protocol",
        }
    }
}

/// `levee_connections_closed_total` handles of one listener, registered once.
pub struct Closed([Counter; 8]);

impl Closed {
    pub fn new(listener: &'static str) -> Self {
        Closed(CloseReason::ALL.map(|r| {
            metrics::counter!(m::CONNECTIONS_CLOSED_TOTAL, "listener" => listener, "reason" => r.as_str())
        }))
    }

    pub fn count(&self, reason: CloseReason) {
        self.0[reason as usize].increment(1);
    }
}

/// What the watchdog knows of a connection's requests.
struct Activity {
    accepted: Instant,
    /// Requests whose head arrived.
    started: AtomicU64,
    /// Requests whose response is not yet finished (body included).
    in_flight: AtomicU32,
    /// Milliseconds from `accepted` to the moment `in_flight` last fell to 0.
    idle_since_ms: AtomicU64,
    /// Requests answered, and requests the client cancelled before that.
    completed: AtomicU32,
    cancelled: AtomicU32,
    /// Woken when the client turns abusive.
    abuse: Notify,
    /// Woken by the first request: the watchdog's deadline changes from the
    /// first head's to the one between requests. Later requests wake nothing
    /// (the watchdog looks again once per timeout while requests run).
    first: Notify,
}

impl Activity {
    fn new(accepted: Instant) -> Self {
        Activity {
            accepted,
            started: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            completed: AtomicU32::new(0),
            cancelled: AtomicU32::new(0),
            abuse: Notify::new(),
            first: Notify::new(),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if self.started.fetch_add(1, Ordering::AcqRel) == 0 {
            self.first.notify_one();
        }
        InFlight(self.clone())
    }

    fn abusive(&self) -> bool {
        let cancelled = self.cancelled.load(Ordering::Relaxed);
        cancelled > self.completed.load(Ordering::Relaxed).saturating_add(MAX_EXCESS_CANCELS)
    }

    /// The next moment the watchdog must look, or the verdict now.
    ///
    /// `h1`: on HTTP/1.1 every later head is due `header_read_timeout` after
    /// the end of the request before it too (SPEC), which this watchdog
    /// enforces instead of hyper's timer (see `serve`). HTTP/2 has no such
    /// rule: an h2 connection without requests is bounded by `idle_timeout`.
    fn check(&self, now: Instant, limits: &ConnLimits, h1: bool) -> Result<Instant, CloseReason> {
        if self.started.load(Ordering::Acquire) == 0 {
            let deadline = self.accepted + limits.header_read_timeout;
            return if now >= deadline { Err(CloseReason::HeaderTimeout) } else { Ok(deadline) };
        }
        // How long the connection may go without a request in flight, and
        // what the close is called then.
        let (patience, reason) = if h1 && limits.header_read_timeout < limits.idle_timeout {
            (limits.header_read_timeout, CloseReason::HeaderTimeout)
        } else {
            (limits.idle_timeout, CloseReason::Idle)
        };
        if self.in_flight.load(Ordering::Acquire) > 0 {
            // Requests are bounded by their own timeouts. Look again within
            // `patience`: a request that ends meanwhile starts the count, and
            // the look after that (at its end + `patience`) is then on time.
            return Ok(now + patience);
        }
        let idle_since = self.accepted + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        let deadline = idle_since + patience;
        if now >= deadline {
            Err(reason)
        } else {
            Ok(deadline)
        }
    }
}

/// One request of the connection, until its response is finished or dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.idle_since_ms.store(ms, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Marks a request cancelled unless its handler finished.
struct Answering {
    activity: Arc<Activity>,
    done: bool,
}

impl Drop for Answering {
    fn drop(&mut self) {
        let counter = if self.done { &self.activity.completed } else { &self.activity.cancelled };
        counter.fetch_add(1, Ordering::Relaxed);
        if !self.done && self.activity.abusive() {
            self.activity.abuse.notify_one();
        }
    }
}

/// Serves one accepted connection (after TLS, if any) until it ends, and says why.
pub async fn serve<I, H>(
    mut io: I,
    conn: ConnInfo,
    limits: ConnLimits,
    handler: Arc<H>,
    shutdown: watch::Receiver<bool>,
    accepted: Instant,
) -> CloseReason
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let deadline = accepted + limits.header_read_timeout;
    let (h2, prefix) = match tokio::time::timeout_at(deadline, detect(&mut io)).await {
        Err(_) => return CloseReason::HeaderTimeout,
        Ok(None) => return CloseReason::ClientClosed,
        Ok(Some(detected)) => detected,
    };
    let io = TokioIo::new(Prefixed { prefix, io });
    let activity = Arc::new(Activity::new(accepted));
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req| {
            let answer = handler.clone().handle(req, conn.clone());
            let in_flight = activity.begin();
            // Dropped unanswered (the client went away), it counts a cancel.
            let answering = Answering { activity: activity.clone(), done: false };
            // Combinators, not an async block: a block keeps the future it
            // captured beside the one it awaits, twice the request's state
            // (4.4 KB), and hyper copies the whole of it into its box on
            // every request.
            let answered = answer.map(move |rsp| {
                let mut answering = answering;
                answering.done = true;
                let (parts, body) = rsp.into_parts();
                Ok::<_, std::convert::Infallible>(http::Response::from_parts(
                    parts,
                    // Unboxed: hyper takes any body type.
                    Guarded::new(body, in_flight),
                ))
            });
            if h2 {
                // A stream's stack waits one turn of the runtime, so that
                // its connection reads what followed its HEADERS first.
                // hyper checks for a RST_STREAM only while the service's
                // future is pending: without this turn, a rapid-reset
                // client's cancelled streams ran the whole stack and
                // reached the upstream before their cancellation was read
                // (31,014 in a 90 s siege). Dropped now, they cost a task
                // and the handler's routing (`Handler::handle` routes
                // before its future exists, and answers a request it
                // refuses before routing at once; the stack runs in the
                // future).
                Either::Left(tokio::task::yield_now().then(move |()| answered))
            } else {
                Either::Right(answered)
            }
        })
    };
    if h2 {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        watch(conn, |c| c.graceful_shutdown(), &activity, &limits, false, shutdown).await
    } else {
        let mut builder = http1::Builder::new();
        builder
            // The watchdog times every head (`Activity::check`): it wakes once
            // per timeout and looks at what happened, where hyper's own timer
            // was a boxed sleep armed and dropped on tokio's wheel for every
            // request (callgrind: 1.3k of a proxied request's 44k instructions,
            // 1.4k of a refusal's 22k). That timer was hyper's only use of a
            // `Timer` on HTTP/1.1, so the builder gets none.
            .header_read_timeout(None)
            // hyper refuses buffers under 8 KiB; the handler checks the exact limit.
            .max_buf_size(limits.max_header_bytes.max(8192) + 1024);
        // Upgrades (WebSocket) hand the socket to the relay in `websocket.rs`.
        let conn = builder.serve_connection(io, service).with_upgrades();
        tokio::pin!(conn);
        watch(conn, |c| c.graceful_shutdown(), &activity, &limits, true, shutdown).await
    }
}

/// Reads until the protocol is known: `Some(true)` for the HTTP/2 preface,
/// `Some(false)` for anything else (HTTP/1.1, or garbage hyper will answer
/// 400), `None` when the peer closed first. The bytes read are handed back.
async fn detect<I: AsyncRead + Unpin>(io: &mut I) -> Option<(bool, Bytes)> {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    loop {
        match io.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Some((false, buf.freeze()));
        }
        if n == H2_PREFACE.len() {
            return Some((true, buf.freeze()));
        }
    }
}

/// Drives `conn` beside the watchdog until it ends; `close` starts a graceful
/// close. `h1`: times every head, not only the first ([`Activity::check`]).
async fn watch<C>(
    mut conn: Pin<&mut C>,
    close: impl Fn(Pin<&mut C>),
    activity: &Activity,
    limits: &ConnLimits,
    h1: bool,
    mut shutdown: watch::Receiver<bool>,
) -> CloseReason
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    // Set once a graceful close began: why, and when to give up on the peer.
    let mut closing: Option<(CloseReason, Option<Instant>)> = None;
    let mut first_seen = false;
    // The header deadline bounds the client, not levee: a head already in the
    // socket's buffer when levee first gets to the connection (a busy worker,
    // a starved machine) is read before the deadline is enforced. Closing
    // without reading would also make the kernel reset the connection under
    // the unread request.
    let mut read_once = false;
    loop {
        let now = Instant::now();
        let wake = match closing {
            Some((_, Some(hard))) => hard,
            Some((_, None)) => now + limits.idle_timeout,
            None => match activity.check(now, limits, h1) {
                Ok(at) => at,
                Err(CloseReason::HeaderTimeout) if read_once => return CloseReason::HeaderTimeout,
                Err(CloseReason::HeaderTimeout) => now,
                Err(reason) => {
                    close(conn.as_mut());
                    closing = Some((reason, Some(now + CLOSE_GRACE)));
                    continue;
                }
            },
        };
        let (want_first, open) = (!first_seen, closing.is_none());
        let signal = &mut shutdown;
        let woke = {
            let watchdog = std::pin::pin!(async move {
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep_until(wake) => Watchdog::Deadline,
                    _ = activity.first.notified(), if want_first => Watchdog::FirstRequest,
                    _ = activity.abuse.notified(), if open => Watchdog::Abuse,
                    _ = signal.wait_for(|s| *s), if open => Watchdog::Shutdown,
                }
            });
            // The connection first: it reads what the peer sent before a
            // deadline that passed meanwhile is looked at.
            ConnFirst::new(conn.as_mut(), watchdog).await
        };
        match woke {
            Woke::Conn(ended) => {
                return match (closing, ended) {
                    (Some((reason, _)), _) => reason,
                    (None, Ok(())) => CloseReason::ClientClosed,
                    (None, Err(e)) => close_reason(&e),
                };
            }
            Woke::Watchdog(Watchdog::Deadline) => {
                if let Some((reason, Some(_))) = closing {
                    if reason != CloseReason::Idle || activity.in_flight.load(Ordering::Acquire) == 0 {
                        return reason;
                    }
                    // A request slipped in before the close: let it finish.
                    closing = Some((reason, Some(Instant::now() + CLOSE_GRACE)));
                }
            }
            Woke::Watchdog(Watchdog::FirstRequest) => first_seen = true,
            Woke::Watchdog(Watchdog::Abuse) => {
                close(conn.as_mut());
                closing = Some((CloseReason::H2Abuse, Some(Instant::now() + CLOSE_GRACE)));
            }
            Woke::Watchdog(Watchdog::Shutdown) => {
                // In-flight requests finish; the listener bounds the wait by the grace.
                close(conn.as_mut());
                closing = Some((CloseReason::Shutdown, None));
            }
        }
        read_once = true;
    }
}

/// What woke the watchdog.
enum Watchdog {
    Deadline,
    FirstRequest,
    Abuse,
    Shutdown,
}

/// Which of [`ConnFirst`]'s two futures finished.
enum Woke<C, W> {
    Conn(C),
    Watchdog(W),
}

/// Polls the connection on every wake of its task, and the watchdog (a
/// timer, two notifications and the shutdown signal) only when one of them
/// woke it. A `select!` polled all five on every wake, and the connection's
/// task wakes twice a request (the client's bytes, the upstream's answer):
/// ~700 instructions per request for futures that had nothing to say.
struct ConnFirst<'a, C, W> {
    conn: Pin<&'a mut C>,
    watchdog: Pin<&'a mut W>,
    /// Set when the watchdog's waker fired (and at first, so it registers).
    watchdog_woken: Arc<WatchdogWaker>,
    /// `watchdog_woken` as a waker, made once (not an `Arc` clone per poll).
    waker: std::task::Waker,
}

struct WatchdogWaker {
    woken: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for WatchdogWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<'a, C: Future, W: Future> ConnFirst<'a, C, W> {
    fn new(conn: Pin<&'a mut C>, watchdog: Pin<&'a mut W>) -> Self {
        let watchdog_woken = Arc::new(WatchdogWaker {
            woken: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        });
        let waker = std::task::Waker::from(watchdog_woken.clone());
        ConnFirst { conn, watchdog, watchdog_woken, waker }
    }
}

impl<C: Future, W: Future> Future for ConnFirst<'_, C, W> {
    type Output = Woke<C::Output, W::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(ended) = this.conn.as_mut().poll(cx) {
            return Poll::Ready(Woke::Conn(ended));
        }
        this.watchdog_woken.task.register(cx.waker());
        if this.watchdog_woken.woken.swap(false, Ordering::AcqRel) {
            let mut watchdog_cx = Context::from_waker(&this.waker);
            if let Poll::Ready(event) = this.watchdog.as_mut().poll(&mut watchdog_cx) {
                return Poll::Ready(Woke::Watchdog(event));
            }
        }
        Poll::Pending
    }
}

/// Why hyper ended a connection with an error.
fn close_reason(e: &hyper::Error) -> CloseReason {
    if e.is_timeout() {
        return CloseReason::HeaderTimeout;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) {
                return CloseReason::H2Abuse;
            }
            return if h2.is_io() { CloseReason::ClientClosed } else { CloseReason::ProtocolError };
        }
        source = err.source();
    }
    if e.is_parse() || e.is_parse_too_large() {
        CloseReason::ProtocolError
    } else {
        CloseReason::ClientClosed
    }
}

/// An IO that first replays the bytes read while detecting the protocol (or
/// past the PROXY header).
pub(super) struct Prefixed<I> {
    prefix: Bytes,
    io: I,
}

impl<I> Prefixed<I> {
    pub(super) fn new(prefix: Bytes, io: I) -> Self {
        Prefixed { prefix, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use http::{Request, Response};
    use hyper::body::Incoming;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::body::Body;
    use crate::context::Scheme;

    struct Ok200;

    impl Handler for Ok200 {
        fn limits(&self) -> ConnLimits {
            limits()
        }
        async fn handle(self: Arc<Self>, _req: Request<Incoming>, _conn: ConnInfo) -> Response<Body> {
            Response::new(crate::body::full(Bytes::from_static(b"ok")))
        }
    }

    fn limits() -> ConnLimits {
        ConnLimits {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
            h2_max_concurrent_streams: 100,
            proxy_protocol: false,
        }
    }

    /// The header deadline bounds the client, not levee: a head that was in
    /// levee's socket buffer before the deadline is answered even when levee
    /// (a busy worker, a starved machine) first looks at the connection after
    /// it. Before, the watchdog gave up without reading, and the kernel reset
    /// the connection under the unread request: a flake of the full suite on
    /// a loaded machine.
    #[tokio::test]
    async fn a_head_that_arrived_in_time_is_answered_however_late_levee_looks() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        // Accepted 3 s ago, with the head waiting since then.
        let accepted = Instant::now() - Duration::from_secs(3);
        let conn = ConnInfo::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 1)), Scheme::Http);
        let (_tx, shutdown) = watch::channel(false);
        let served = tokio::spawn(serve(server, conn, limits(), Arc::new(Ok200), shutdown, accepted));
        let mut answer = vec![0u8; 1024];
        let n =
            tokio::time::timeout(Duration::from_secs(5), client.read(&mut answer)).await.unwrap().unwrap();
        let head = String::from_utf8_lossy(&answer[..n]);
        assert!(head.starts_with("HTTP/1.1 200"), "answered {head:?}");
        drop(client);
        assert_eq!(served.await.unwrap(), CloseReason::ClientClosed);
    }

    /// And a client that sent nothing is still closed at the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_still_closed_at_the_header_deadline() {
        let (_client, server) = tokio::io::duplex(1024);
        let conn = ConnInfo::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 1)), Scheme::Http);
        let (_tx, shutdown) = watch::channel(false);
        let started = Instant::now();
        let reason = serve(server, conn, limits(), Arc::new(Ok200), shutdown, started).await;
        assert_eq!(reason, CloseReason::HeaderTimeout);
        assert_eq!(Instant::now() - started, Duration::from_secs(1));
    }

    /// A future that wakes its own task `times` times, counting its polls, then ends.
    struct SelfWaking {
        polls: Arc<AtomicU32>,
        times: u32,
    }

    impl Future for SelfWaking {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.polls.fetch_add(1, Ordering::Relaxed) >= self.times {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// The connection is polled on every wake; the watchdog once to register,
    /// then only when its own waker fires, and what it says is not lost.
    #[tokio::test]
    async fn the_watchdog_is_polled_only_when_it_woke() {
        let (conn_polls, watchdog_polls) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let mut conn = std::pin::pin!(SelfWaking { polls: conn_polls.clone(), times: 50 });
        let counted = watchdog_polls.clone();
        let mut quiet = std::pin::pin!(std::future::poll_fn(move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
            Poll::<()>::Pending
        }));
        let woke = ConnFirst::new(conn.as_mut(), quiet.as_mut()).await;
        assert!(matches!(woke, Woke::Conn(())));
        assert_eq!(conn_polls.load(Ordering::Relaxed), 51);
        assert_eq!(watchdog_polls.load(Ordering::Relaxed), 1, "polled once, to register its wakers");

        let notify = Arc::new(Notify::new());
        let mut busy = std::pin::pin!(std::future::pending::<()>());
        let mut notified = std::pin::pin!(notify.notified());
        let waiting = ConnFirst::new(busy.as_mut(), notified.as_mut());
        let notifier = notify.clone();
        tokio::spawn(async move { notifier.notify_one() });
        let woke = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the watchdog's wake was lost");
        assert!(matches!(woke, Woke::Watchdog(())));
    }
}
