//! The one body type of the request path, and two small wrappers around it.
//!
//! Bodies are streamed both ways; only a request body of at most
//! `server.buffer_body_bytes` is read whole, before it takes an upstream slot
//! (`proxy.rs`). `Body` is a boxed stream so that relayed upstream bodies,
//! levee's own small JSON answers and wrapped bodies are one type behind the
//! route stack.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of requests and responses inside levee.
///
/// A newtype rather than an alias of `UnsyncBoxBody<Bytes, BoxError>`: with
/// the alias, `Request<Body>` carries the `dyn Error`'s elided lifetime, and
/// rustc then fails to prove that async blocks holding a generic inner
/// service's future are `Send` ("implementation of `Send` is not general
/// enough"). A named type has no lifetime to generalise over.
pub struct Body(UnsyncBoxBody<Bytes, BoxError>);

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Body")
    }
}

impl Default for Body {
    fn default() -> Self {
        empty()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body(Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync())
}

pub fn empty() -> Body {
    Body(Empty::new().map_err(|never| match never {}).boxed_unsync())
}

/// Wraps any body whose error converts into `BoxError`.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Body(body.map_err(Into::into).boxed_unsync())
}

/// The request body grew past `server.max_body_bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// The request body stalled longer than `server.body_read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("request body stalled for {0:?}")]
pub struct BodyStalled(pub Duration);

/// How a client's body failed; `respond.rs` turns it into levee's answer
/// (413, 408, 499).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Past `max_body_bytes`.
    TooLarge,
    /// A gap longer than `body_read_timeout`.
    Stalled,
    /// The client cut it off or went away.
    CutOff,
}

/// What went wrong with a client's request body, if anything. Set by
/// [`ClientBody`], read when an upstream try fails, so that the failure is
/// charged to the client (408, 413, 499) and never to the upstream.
#[derive(Debug, Default)]
pub struct BodyFault(AtomicU8);

impl BodyFault {
    const NONE: u8 = 0;
    const TOO_LARGE: u8 = 1;
    const STALLED: u8 = 2;
    const CUT_OFF: u8 = 3;

    /// The client's fault, if the body failed.
    pub fn get(&self) -> Option<Fault> {
        match self.0.load(Ordering::Relaxed) {
            Self::TOO_LARGE => Some(Fault::TooLarge),
            Self::STALLED => Some(Fault::Stalled),
            Self::CUT_OFF => Some(Fault::CutOff),
            _ => None,
        }
    }

    fn set(&self, fault: u8) {
        // The first fault is the cause; what follows is its consequence.
        let _ = self.0.compare_exchange(Self::NONE, fault, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// A client's request body, bounded from its first byte: at most `limit`
/// bytes (`Content-Length` is checked before streaming; this catches chunked
/// and HTTP/2 bodies), and at most `gap` between two frames. A body that
/// breaks any bound, or that the client cuts off, fails with an error and
/// records why in its [`BodyFault`].
pub struct ClientBody {
    inner: Body,
    remaining: u64,
    limit: u64,
    gap: Duration,
    /// The deadline of the next frame; reset on each one.
    stall: Pin<Box<tokio::time::Sleep>>,
    /// Where the fault is recorded: any shared cell that holds one (the
    /// request's `context::Exchange`).
    fault: Arc<dyn AsRef<BodyFault> + Send + Sync>,
}

impl ClientBody {
    pub fn new(
        inner: Body,
        limit: u64,
        gap: Duration,
        fault: Arc<dyn AsRef<BodyFault> + Send + Sync>,
    ) -> Self {
        let stall = Box::pin(tokio::time::sleep(gap));
        ClientBody { inner, remaining: limit, limit, gap, stall, fault }
    }

    fn fail(&self, fault: u8) {
        (*self.fault).as_ref().set(fault);
    }
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.remaining {
                        this.fail(BodyFault::TOO_LARGE);
                        return Poll::Ready(Some(Err(BodyTooLarge(this.limit).into())));
                    }
                    this.remaining -= n;
                }
                let next = tokio::time::Instant::now() + this.gap;
                this.stall.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.fail(BodyFault::CUT_OFF);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.stall.as_mut().poll(cx).is_ready() {
                    this.fail(BodyFault::STALLED);
                    return Poll::Ready(Some(Err(BodyStalled(this.gap).into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that holds `guard` until it is finished or dropped: the in-flight
/// count of an endpoint, an admission permit, anything whose lifetime is "until
/// the client has the whole response".
pub struct Guarded<G> {
    inner: Body,
    _guard: G,
}

impl<G: Unpin + Send + 'static> Guarded<G> {
    /// As a [`Body`] again, for a stage's answer (one more box).
    pub fn wrap(inner: Body, guard: G) -> Body {
        Body(Guarded::new(inner, guard).boxed_unsync())
    }

    /// As its own type, for whoever takes any body type (hyper's server):
    /// no box of its own.
    pub fn new(inner: Body, guard: G) -> Self {
        Guarded { inner, _guard: guard }
    }
}

impl<G> http_body::Body for Guarded<G>
where
    G: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
