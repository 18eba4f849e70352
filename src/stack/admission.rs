//! Stage 3b: admission to the upstream's concurrency. A thin adapter around
//! [`Concurrency::acquire`](crate::upstream::concurrency::Concurrency::acquire),
//! where the rules (priority thresholds, tenant fair share, no queue) are written
//! and tested. A refusal is 503 `overloaded` with `Retry-After` of 1–2 s at
//! random; an admitted request holds its permit until the response body is
//! finished, since an upstream streaming a body is still busy with it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use futures_util::FutureExt;
use http::Request;

use super::{Answer, Next, Stage};
use crate::body::{Body, Guarded};
use crate::config::{Priority, RouteConfig};
use crate::context::RequestContext;
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

/// The stage: the upstream's in-flight count, by this route's priority.
pub struct Admission {
    concurrency: Arc<Concurrency>,
    priority: Priority,
}

impl Admission {
    pub fn new(route: &RouteConfig, upstream: &Upstream) -> Self {
        Admission { concurrency: upstream.concurrency.clone(), priority: route.priority }
    }
}

impl Stage for Admission {
    fn call<'a, N: Next>(
        &'a self,
        req: Request<Body>,
        cx: &'a RequestContext,
        next: &'a N,
    ) -> impl Future<Output = Answer> + Send + 'a {
        let tenant = super::identity(cx).ok().and_then(|i| i.tenant.as_ref());
        match self.concurrency.acquire(self.priority, tenant) {
            // `map`, not an async block: one level less to move the future below through.
            Ok(permit) => Either::Left(
                next.run(req, cx)
                    .map(move |answer| answer.map(|rsp| rsp.map(|body| Guarded::wrap(body, permit)))),
            ),
            Err(refusal) => Either::Right(std::future::ready(Err(overloaded(refusal)))),
        }
    }
}
