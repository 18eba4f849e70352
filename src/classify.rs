//! What one answer says, decided once. Every reader of "did it fail?" (the
//! circuit breaker, outlier detection, retry, the storm detector, the auth
//! guard, staleness and the request metrics) reads an [`Outcome`] from here,
//! so that they cannot disagree, and so that the one rule that matters most is
//! written once: **a client's fault is never held against the upstream**.
//!
//! Before this module, "failed" was decided in six places, and a body that was
//! too large, too slow or cut off by the client failed the upstream try and was
//! counted by the breaker and the outlier detector: 25 oversized uploads and 25
//! vanishing clients opened the circuit for everyone.

use http::{Response, StatusCode};

use crate::body::Body;
use crate::respond::{Reason, Shed, GRPC_STATUS};

/// The meaning of one answer (a try's, or the request's final one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The upstream answered 1xx, 2xx or 3xx.
    Success,
    /// The upstream answered 401: healthy transport, a question for the auth guard.
    Unauthorized,
    /// The upstream answered another 4xx: the upstream is healthy, the request was not.
    Rejected,
    /// The upstream failed: a relayed 5xx, no connection, no head in time, a
    /// broken response, or levee's own retry refused after such a failure.
    UpstreamFailure,
    /// The client failed: a body too large, too slow or cut off, a client
    /// that went away. Counts against the client only.
    ClientFault,
    /// levee answered before forwarding (a shed, a bad request, a redirect):
    /// says nothing about the upstream.
    Refused,
}

/// The mark of a relayed gRPC answer whose head says `grpc-status: 14`.
#[derive(Debug, Clone, Copy)]
struct GrpcUnavailable;

/// Reads a gRPC answer's `grpc-status` once, where it arrives from the
/// upstream (`upstream/forward.rs`), and marks an `UNAVAILABLE` on the
/// response for [`Outcome::of_response`]. Each of the answer's readers (the
/// upstream's counters, the breaker, retry, the storm detector) asked the
/// header map for it, four lookups on every relayed response, gRPC or not;
/// an unmarked response's empty extensions answer at once.
pub fn read_grpc_status(parts: &mut http::response::Parts) {
    if parts.headers.get(GRPC_STATUS).is_some_and(|v| v.as_bytes() == b"14") {
        parts.extensions.insert(GrpcUnavailable);
    }
}

impl Outcome {
    /// The one table.
    pub fn of(result: &Result<Response<Body>, Shed>) -> Outcome {
        match result {
            Ok(rsp) => Outcome::of_response(rsp),
            Err(shed) => Outcome::of_reason(shed.reason),
        }
    }

    /// A relayed response: its status, and for gRPC its `grpc-status` when
    /// the answer is trailers-only (as gRPC errors are): `UNAVAILABLE` (14)
    /// is the upstream failing, just like an HTTP 503 ([`read_grpc_status`]
    /// marks it where the answer arrives). A `grpc-status` in trailers after
    /// messages is not seen here (the head decides).
    pub fn of_response<B>(rsp: &Response<B>) -> Outcome {
        let outcome = Outcome::of_status(rsp.status());
        if outcome == Outcome::Success && rsp.extensions().get::<GrpcUnavailable>().is_some() {
            return Outcome::UpstreamFailure;
        }
        outcome
    }

    /// A relayed status.
    pub fn of_status(status: StatusCode) -> Outcome {
        match status.as_u16() {
            401 => Outcome::Unauthorized,
            400..=499 => Outcome::Rejected,
            500..=599 => Outcome::UpstreamFailure,
            _ => Outcome::Success,
        }
    }

    /// levee's own answer.
    pub fn of_reason(reason: Reason) -> Outcome {
        use Reason::*;
        match reason {
            UpstreamUnreachable | UpstreamTimeout | BadUpstreamResponse | RetryBudget => {
                Outcome::UpstreamFailure
            }
            BodyTooLarge | RequestTimeout | ClientClosed => Outcome::ClientFault,
            RateLimited | CallbackBomb | RetryStorm | TooManyConnections | CircuitOpen | Overloaded
            | UpstreamAuthAnomaly | StoreUnavailable | NoRoute | BadRequest | HeadersTooLarge
            | TlsRequired | TlsRedirect => Outcome::Refused,
        }
    }

    /// For the circuit breaker and outlier detection: `Some(true)` the
    /// upstream failed, `Some(false)` it is healthy, `None` nothing is known
    /// (and a half-open probe is given back).
    pub fn upstream_failed(self) -> Option<bool> {
        match self {
            Outcome::UpstreamFailure => Some(true),
            Outcome::Success | Outcome::Unauthorized | Outcome::Rejected => Some(false),
            Outcome::ClientFault | Outcome::Refused => None,
        }
    }

    /// For the storm detector: a request whose repetition is a retry (it did
    /// not succeed: the upstream failed, levee refused it, or the client broke it).
    pub fn is_failure_for_client(self) -> bool {
        matches!(self, Outcome::UpstreamFailure | Outcome::ClientFault | Outcome::Refused)
    }

    /// For staleness: a route is alive while the upstream answers it. Only a
    /// relayed answer below 400 counts; a 308 levee makes itself never does.
    pub fn is_success(self) -> bool {
        self == Outcome::Success
    }

    /// For retry: whether another try may help at all (the policy then
    /// decides which failures it retries).
    pub fn may_retry(self) -> bool {
        self == Outcome::UpstreamFailure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_faults_never_count_against_the_upstream() {
        for r in Reason::ALL {
            let o = Outcome::of_reason(r);
            if matches!(r, Reason::BodyTooLarge | Reason::RequestTimeout | Reason::ClientClosed) {
                assert_eq!(o, Outcome::ClientFault, "{r:?}");
            }
            if o != Outcome::UpstreamFailure {
                assert_eq!(o.upstream_failed(), None, "{r:?} says nothing about the upstream");
                assert!(!o.may_retry(), "{r:?}");
            }
        }
    }

    #[test]
    fn relayed_statuses() {
        assert_eq!(Outcome::of_status(StatusCode::OK), Outcome::Success);
        assert_eq!(Outcome::of_status(StatusCode::PERMANENT_REDIRECT), Outcome::Success);
        assert_eq!(Outcome::of_status(StatusCode::UNAUTHORIZED), Outcome::Unauthorized);
        assert_eq!(Outcome::of_status(StatusCode::NOT_FOUND), Outcome::Rejected);
        assert_eq!(Outcome::of_status(StatusCode::NOT_FOUND).upstream_failed(), Some(false));
        assert_eq!(Outcome::of_status(StatusCode::BAD_GATEWAY).upstream_failed(), Some(true));
    }

    #[test]
    fn grpc_unavailable_is_an_upstream_failure() {
        let relayed = |status: &'static str| {
            let mut rsp = Response::new(crate::body::empty());
            rsp.headers_mut().insert(GRPC_STATUS, http::HeaderValue::from_static(status));
            let (mut parts, body) = rsp.into_parts();
            read_grpc_status(&mut parts);
            Response::from_parts(parts, body)
        };
        assert_eq!(Outcome::of_response(&relayed("14")), Outcome::UpstreamFailure);
        assert_eq!(Outcome::of_response(&relayed("5")), Outcome::Success);
        assert_eq!(Outcome::of_response(&relayed("0")), Outcome::Success);
    }

    #[test]
    fn levee_answers_are_never_a_success() {
        for r in Reason::ALL {
            assert!(!Outcome::of_reason(r).is_success(), "{r:?}");
        }
    }
}
