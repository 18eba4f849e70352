//! Stage 3b: admission to the upstream's concurrency. A thin adapter around
//! [`Concurrency::acquire`](crate::upstream::concurrency::Concurrency::acquire),
//! where the rules (priority thresholds, tenant fair share, no queue) are written
//! and tested. A refusal is 503 `overloaded` with `Retry-After` of 1–2 s at
//! random; an admitted request holds its permit until the response body is
//! finished, since an upstream streaming a body is still busy with it.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use tower::{Layer, Service};

use super::client_id::Identity;
use super::BoxFuture;
use crate::body::{Body, Guarded};
use crate::config::{Priority, RouteConfig};
use crate::respond::{self, Reason, Shed};
use crate::upstream::concurrency::{Concurrency, Refusal};
use crate::upstream::Upstream;

fn overloaded(refusal: Refusal) -> Shed {
    let detail = match refusal {
        Refusal::Capacity => "the upstream is at its concurrency limit for this route's priority",
        Refusal::TenantShare => "the upstream is busy and this tenant holds its fair share of it",
    };
    Shed::new(Reason::Overloaded).retry_after(respond::jitter(Duration::from_secs(1), 1.0)).detail(detail)
}

pub struct AdmissionLayer {
    concurrency: Arc<Concurrency>,
    priority: Priority,
}

impl AdmissionLayer {
    pub fn new(route: &RouteConfig, upstream: &Upstream) -> Self {
        AdmissionLayer { concurrency: upstream.concurrency.clone(), priority: route.priority }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService { concurrency: self.concurrency.clone(), priority: self.priority, inner }
    }
}

#[derive(Clone)]
pub struct AdmissionService<S> {
    concurrency: Arc<Concurrency>,
    priority: Priority,
    inner: S,
}

impl<S> Service<Request<Body>> for AdmissionService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Shed> + Send,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Shed;
    type Future = BoxFuture<Result<Response<Body>, Shed>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Shed>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let tenant = req.extensions().get::<Identity>().and_then(|i| i.tenant.as_ref());
        let permit = match self.concurrency.acquire(self.priority, tenant) {
            Ok(permit) => permit,
            Err(refusal) => return Box::pin(std::future::ready(Err(overloaded(refusal)))),
        };
        // `map` rather than an `async` block: rustc cannot prove such a block
        // `Send` over the generic inner future (rust-lang/rust#64552).
        Box::pin(
            self.inner
                .call(req)
                .map(move |result| result.map(|rsp| rsp.map(|body| Guarded::wrap(body, permit)))),
        )
    }
}
