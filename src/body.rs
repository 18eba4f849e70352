//! The one body type of the request path, and two small wrappers around it.
//!
//! Bodies are streamed both ways and never buffered whole. `Body` is a boxed
//! stream so that relayed upstream bodies, levee's own small JSON answers and
//! wrapped bodies are one type behind the route stack.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

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

/// Counts the bytes of a streamed request body and fails it past `limit`,
/// raising `tripped` so the caller can answer 413 rather than 502 when the
/// upstream request fails because of it. `Content-Length` is checked before
/// streaming starts; this catches chunked bodies.
pub struct Limited {
    inner: Body,
    remaining: u64,
    limit: u64,
    tripped: Arc<AtomicBool>,
}

impl Limited {
    pub fn new(inner: Body, limit: u64, tripped: Arc<AtomicBool>) -> Self {
        Limited { inner, remaining: limit, limit, tripped }
    }
}

impl http_body::Body for Limited {
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
                        this.tripped.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(BodyTooLarge(this.limit).into())));
                    }
                    this.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
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
    pub fn wrap(inner: Body, guard: G) -> Body {
        Body(Guarded { inner, _guard: guard }.boxed_unsync())
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
