//! levee's own answers. One table, [`Reason`], owns every status code, reason
//! string and `Retry-After` rule that levee generates; stages return a [`Shed`]
//! value and this module turns it into a response. Adding a defence means adding
//! a variant here, and the compiler checks that every answer is covered.
//!
//! Whose fault decides the status (pingora's `ErrorSource`): the client's → 4xx
//! (429 for going too fast), the upstream's or levee's → 5xx. Nothing here can
//! produce 401 or 403: a device that sees 401 drops its credentials.

use std::cell::RefCell;
use std::time::Duration;

use bytes::Bytes;

use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::body::{self, Body};
use crate::context::{ClientKey, X_REQUEST_ID};

pub const X_LEVEE_REASON: HeaderName = HeaderName::from_static("x-levee-reason");

/// NGINX's "client closed request": never sent (nobody is listening), only counted.
const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// Why levee answered itself. One variant per row of the SPEC's answer table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    RateLimited,
    CallbackBomb,
    RetryStorm,
    CircuitOpen,
    Overloaded,
    RetryBudget,
    UpstreamAuthAnomaly,
    StoreUnavailable,
    UpstreamUnreachable,
    BadUpstreamResponse,
    UpstreamTimeout,
    NoRoute,
    BadRequest,
    BodyTooLarge,
    HeadersTooLarge,
    TlsRequired,
    /// 308 to https on a `tls_only` route (`plain_http = "redirect"`).
    TlsRedirect,
    /// The request body stalled longer than `body_read_timeout`.
    RequestTimeout,
    /// The client already holds `max_upgraded_per_client` upgraded connections.
    TooManyConnections,
    /// The client went away or cut its body off; nobody reads this answer, but
    /// metrics and the storm detector count it (499, as NGINX logs it).
    ClientClosed,
}

impl Reason {
    pub const ALL: [Reason; 20] = [
        Reason::RateLimited,
        Reason::CallbackBomb,
        Reason::RetryStorm,
        Reason::CircuitOpen,
        Reason::Overloaded,
        Reason::RetryBudget,
        Reason::UpstreamAuthAnomaly,
        Reason::StoreUnavailable,
        Reason::UpstreamUnreachable,
        Reason::BadUpstreamResponse,
        Reason::UpstreamTimeout,
        Reason::NoRoute,
        Reason::BadRequest,
        Reason::BodyTooLarge,
        Reason::HeadersTooLarge,
        Reason::TlsRequired,
        Reason::TlsRedirect,
        Reason::RequestTimeout,
        Reason::ClientClosed,
        Reason::TooManyConnections,
    ];

    pub fn status(self) -> StatusCode {
        use Reason::*;
        match self {
            RateLimited | CallbackBomb | RetryStorm | TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
            CircuitOpen | Overloaded | RetryBudget | UpstreamAuthAnomaly | StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            UpstreamUnreachable | BadUpstreamResponse => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            NoRoute => StatusCode::NOT_FOUND,
            BadRequest => StatusCode::BAD_REQUEST,
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            TlsRequired => StatusCode::UPGRADE_REQUIRED,
            TlsRedirect => StatusCode::PERMANENT_REDIRECT,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ClientClosed => CLIENT_CLOSED,
        }
    }

    /// The `x-levee-reason` value, the JSON `error` and the `reason` metric label.
    pub fn as_str(self) -> &'static str {
        use Reason::*;
        match self {
            RateLimited => "rate_limited",
            CallbackBomb => "callback_bomb",
            RetryStorm => "retry_storm",
            CircuitOpen => "circuit_open",
            Overloaded => "overloaded",
            RetryBudget => "retry_budget",
            UpstreamAuthAnomaly => "upstream_auth_anomaly",
            StoreUnavailable => "store_unavailable",
            UpstreamUnreachable => "upstream_unreachable",
            BadUpstreamResponse => "bad_upstream_response",
            UpstreamTimeout => "upstream_timeout",
            NoRoute => "no_route",
            BadRequest => "bad_request",
            BodyTooLarge => "body_too_large",
            HeadersTooLarge => "headers_too_large",
            TlsRequired => "tls_required",
            TlsRedirect => "tls_redirect",
            RequestTimeout => "request_timeout",
            ClientClosed => "client_closed",
            TooManyConnections => "too_many_connections",
        }
    }

    /// Whether the answer carries `Retry-After`: every 429 and 503, whose whole
    /// point is to tell the client when to come back.
    pub fn has_retry_after(self) -> bool {
        matches!(self.status(), StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
    }

    /// A defence decided not to forward (counted in `levee_shed_total`), as
    /// opposed to an error on the way.
    pub fn is_shed(self) -> bool {
        self.has_retry_after()
    }
}

impl From<crate::body::Fault> for Reason {
    fn from(fault: crate::body::Fault) -> Reason {
        match fault {
            crate::body::Fault::TooLarge => Reason::BodyTooLarge,
            crate::body::Fault::Stalled => Reason::RequestTimeout,
            crate::body::Fault::CutOff => Reason::ClientClosed,
        }
    }
}

/// A decision not to forward, or a failure on the way: a value, not an error.
#[derive(Debug, Clone)]
pub struct Shed {
    pub reason: Reason,
    /// When the client may come back; rounded up to whole seconds, at least 1.
    pub retry_after: Option<Duration>,
    /// A short human explanation for the JSON body (never a client key or secret).
    pub detail: Option<String>,
    /// Extra headers, such as `RateLimit-Policy` on a 429.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The client this refusal concerns, for the top-offenders summary (never a
    /// metric label, never in the response).
    pub client: Option<ClientKey>,
}

impl Shed {
    pub fn new(reason: Reason) -> Self {
        Shed { reason, retry_after: None, detail: None, headers: Vec::new(), client: None }
    }

    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }

    pub fn client(mut self, client: ClientKey) -> Self {
        self.client = Some(client);
        self
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Builds the response: status, `x-levee-reason`, `Retry-After`, the
    /// request's `x-request-id` and the JSON body.
    pub fn into_response(self, route: Option<&str>, request_id: HeaderValue) -> Response<Body> {
        let retry_after_s = self.reason.has_retry_after().then(|| retry_after_secs(self.retry_after));
        let answer = Answer { reason: self.reason, route, retry_after_s, detail: self.detail.as_deref() };
        let (headers, json) = answer.shared(self.headers, request_id);
        let mut rsp = Response::new(body::full(json));
        *rsp.status_mut() = self.reason.status();
        *rsp.headers_mut() = headers;
        rsp
    }
}

/// What an answer says, before it is built.
#[derive(Clone, Copy)]
struct Answer<'a> {
    reason: Reason,
    route: Option<&'a str>,
    retry_after_s: Option<u64>,
    detail: Option<&'a str>,
}

/// The last answer [`Answer::shared`] built on this thread, and what it said.
struct LastAnswer {
    reason: Reason,
    route: Option<Box<str>>,
    retry_after_s: Option<u64>,
    extra: Vec<(HeaderName, HeaderValue)>,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer<'_> {
    /// The headers and the JSON body. A client being shed is answered the
    /// same way request after request (one route, one reason, the same whole
    /// seconds, the same `RateLimit` headers), so each thread keeps the last
    /// answer it built without a detail and hands out copies of it: reference
    /// counts instead of a serialization, a number formatted, and a header
    /// hashed into the map five times over per refusal. With a detail it is
    /// built each time.
    ///
    /// The request id goes in here, not after: a copy's entries are exactly
    /// as many as the original's (no room to spare), so adding a header to it
    /// would reallocate them, where replacing the copied `x-request-id` does not.
    fn shared(self, extra: Vec<(HeaderName, HeaderValue)>, request_id: HeaderValue) -> (HeaderMap, Bytes) {
        thread_local! {
            static LAST: RefCell<Option<LastAnswer>> = const { RefCell::new(None) };
        }
        if self.detail.is_some() {
            return self.build(extra, request_id);
        }
        LAST.with(|last| {
            let Ok(mut last) = last.try_borrow_mut() else { return self.build(extra, request_id) };
            if let Some(l) = last.as_ref() {
                if l.reason == self.reason
                    && l.retry_after_s == self.retry_after_s
                    && l.route.as_deref() == self.route
                    && l.extra == extra
                {
                    let mut headers = l.headers.clone();
                    set_request_id(&mut headers, request_id);
                    return (headers, l.body.clone());
                }
            }
            let (headers, body) = self.build(extra.clone(), request_id);
            *last = Some(LastAnswer {
                reason: self.reason,
                route: self.route.map(Box::from),
                retry_after_s: self.retry_after_s,
                extra,
                headers: headers.clone(),
                body: body.clone(),
            });
            (headers, body)
        })
    }

    /// `build` puts the request id first: [`set_request_id`] finds it there.
    fn build(self, extra: Vec<(HeaderName, HeaderValue)>, request_id: HeaderValue) -> (HeaderMap, Bytes) {
        let body = answer_json(self.reason, self.route, self.retry_after_s, self.detail);
        // Room for all of them at once, not grown twice.
        let mut h = HeaderMap::with_capacity(6 + extra.len());
        h.insert(X_REQUEST_ID, request_id);
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(X_LEVEE_REASON, HeaderValue::from_static(self.reason.as_str()));
        if let Some(secs) = self.retry_after_s {
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.reason == Reason::RequestTimeout {
            // The rest of the stalled body may still arrive: the connection cannot be reused.
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        for (name, value) in extra {
            h.append(name, value);
        }
        (h, Bytes::from(body))
    }
}

/// Replaces the request id of a copied answer. [`Answer::build`] inserted it
/// first, and a map iterates in insertion order, so it is found without
/// hashing its name (the lookup cost a refusal ~250 instructions); an answer
/// built otherwise gets it by name.
fn set_request_id(headers: &mut HeaderMap, request_id: HeaderValue) {
    match headers.iter_mut().next() {
        Some((name, value)) if *name == X_REQUEST_ID => *value = request_id,
        _ => {
            headers.insert(X_REQUEST_ID, request_id);
        }
    }
}

/// The JSON body of an answer, written directly (a refusal is the hot path of
/// a client being shed; a `serde_json::Value` would build a map per answer).
/// serde_json writes the values, so strings are escaped as everywhere else.
fn answer_json(
    reason: Reason,
    route: Option<&str>,
    retry_after_s: Option<u64>,
    detail: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(80 + route.map_or(0, str::len) + detail.map_or(0, str::len));
    // Writing into a Vec cannot fail.
    out.extend_from_slice(b"{\"error\":\"");
    out.extend_from_slice(reason.as_str().as_bytes());
    out.extend_from_slice(b"\",\"route\":");
    let _ = serde_json::to_writer(&mut out, &route);
    out.extend_from_slice(b",\"retry_after_s\":");
    let _ = serde_json::to_writer(&mut out, &retry_after_s);
    if let Some(detail) = detail {
        out.extend_from_slice(b",\"detail\":");
        let _ = serde_json::to_writer(&mut out, detail);
    }
    out.push(b'}');
    out
}

// === gRPC callers ===

/// Whether a request with this `Content-Type` is a gRPC call (`application/grpc...`).
pub fn is_grpc_type(content_type: &HeaderValue) -> bool {
    content_type.as_bytes().starts_with(b"application/grpc")
}

pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// gRPC's `RESOURCE_EXHAUSTED` and `UNAVAILABLE`.
const GRPC_RESOURCE_EXHAUSTED: u16 = 8;
pub const GRPC_UNAVAILABLE: u16 = 14;

impl Shed {
    /// levee's answer in gRPC's vocabulary, for a gRPC caller: a client maps
    /// an HTTP 429 or 503 to `UNAVAILABLE`/`UNKNOWN` with no back-off hint, but
    /// honours `grpc-status` 8 or 14 with `grpc-retry-pushback-ms`. A
    /// "trailers-only" response: HTTP 200, the status in the headers, no
    /// message. Answers other than 429 and 503 keep their HTTP status, which
    /// gRPC clients map themselves.
    pub fn into_grpc_response(self, route: Option<&str>, request_id: HeaderValue) -> Response<Body> {
        let code = match self.reason.status() {
            StatusCode::TOO_MANY_REQUESTS => GRPC_RESOURCE_EXHAUSTED,
            StatusCode::SERVICE_UNAVAILABLE => GRPC_UNAVAILABLE,
            _ => return self.into_response(route, request_id),
        };
        let pushback_ms = retry_after_secs(self.retry_after).saturating_mul(1000);
        let mut rsp = Response::new(body::empty());
        let h = rsp.headers_mut();
        h.insert(X_REQUEST_ID, request_id);
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(GRPC_STATUS, HeaderValue::from(code));
        // A reason is lower-case ASCII: no percent-encoding needed.
        h.insert(GRPC_MESSAGE, HeaderValue::from_static(self.reason.as_str()));
        h.insert(GRPC_RETRY_PUSHBACK_MS, HeaderValue::from(pushback_ms));
        h.insert(X_LEVEE_REASON, HeaderValue::from_static(self.reason.as_str()));
        for (name, value) in self.headers {
            h.append(name, value);
        }
        rsp
    }
}

/// `Retry-After` in whole seconds: rounded up, at least 1.
pub fn retry_after_secs(d: Option<Duration>) -> u64 {
    let d = d.unwrap_or(Duration::from_secs(1));
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// Adds up to `max_share` of `d` at random, so that clients told to come back
/// do not all come back in the same second.
pub fn jitter(d: Duration, max_share: f64) -> Duration {
    d + d.mul_f64(fastrand::f64() * max_share)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_slot_below_the_count_of_reasons() {
        // `Route::count_shed` keeps one counter per reason at `reason as usize`.
        let mut slots: Vec<usize> = Reason::ALL.into_iter().map(|r| r as usize).collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..Reason::ALL.len()).collect::<Vec<_>>());
    }

    #[test]
    fn a_shared_answer_is_the_one_built_afresh_for_it() {
        // Each answer must be exactly the one built afresh for it, whatever came before.
        let policy =
            |v: &'static str| vec![(HeaderName::from_static("ratelimit"), HeaderValue::from_static(v))];
        let calls = [
            (Reason::RateLimited, Some("shared-a"), Some(1), None, policy("\"1/s\";r=0;t=1")),
            (Reason::RateLimited, Some("shared-a"), Some(1), None, policy("\"1/s\";r=0;t=1")),
            (Reason::RateLimited, Some("shared-a"), Some(1), None, policy("\"1/s\";r=0;t=2")),
            (Reason::RateLimited, Some("shared-a"), Some(2), None, policy("\"1/s\";r=0;t=2")),
            (Reason::RateLimited, Some("shared-b"), Some(2), None, policy("\"1/s\";r=0;t=2")),
            (Reason::CallbackBomb, Some("shared-b"), Some(2), None, vec![]),
            (Reason::CallbackBomb, Some("shared-b"), Some(2), Some("a detail"), vec![]),
            (Reason::CallbackBomb, Some("shared-b"), Some(2), None, vec![]),
            (Reason::RequestTimeout, Some("shared-b"), None, None, vec![]),
            (Reason::NoRoute, None, None, None, vec![]),
            (Reason::NoRoute, Some("shared-b"), None, None, vec![]),
            (Reason::NoRoute, None, None, None, vec![]),
        ];
        for (i, (reason, route, retry_after_s, detail, extra)) in calls.into_iter().enumerate() {
            let answer = Answer { reason, route, retry_after_s, detail };
            // Each request's own id, never the one of the answer it was copied from.
            let id = HeaderValue::from(i);
            let (headers, body) = answer.shared(extra.clone(), id.clone());
            assert_eq!((&headers, &body), (&answer.build(extra, id).0, &body), "answer {i}");
            assert_eq!(headers.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(), [&HeaderValue::from(i)]);
        }
    }

    #[test]
    fn a_request_id_is_replaced_where_it_stands_or_added() {
        let mut first = HeaderMap::new();
        first.insert(X_REQUEST_ID, HeaderValue::from_static("old"));
        first.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        set_request_id(&mut first, HeaderValue::from_static("new"));
        assert_eq!(first.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(), ["new"]);
        assert_eq!(first.len(), 2);
        let mut elsewhere = HeaderMap::new();
        elsewhere.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        elsewhere.insert(X_REQUEST_ID, HeaderValue::from_static("old"));
        set_request_id(&mut elsewhere, HeaderValue::from_static("new"));
        assert_eq!(elsewhere.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(), ["new"]);
        assert_eq!(elsewhere[CONTENT_TYPE], "application/json");
        assert_eq!(elsewhere.len(), 2);
    }

    #[test]
    fn the_answer_body_is_json_whatever_the_route_name_and_detail_hold() {
        let odd = ["api", "", "quo\"te", "back\\slash", "tab\tnew\nline\u{1}", "ünï €", "</script>"];
        for route in odd {
            for detail in [None, Some("x"), Some("say \"no\"\r\n\\")] {
                let text = String::from_utf8(answer_json(Reason::RateLimited, Some(route), Some(3), detail))
                    .unwrap();
                let v: serde_json::Value =
                    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
                assert_eq!(v["error"], "rate_limited");
                assert_eq!(v["route"], route);
                assert_eq!(v["retry_after_s"], 3);
                assert_eq!(v.get("detail").and_then(|d| d.as_str()), detail);
            }
        }
        let v: serde_json::Value =
            serde_json::from_slice(&answer_json(Reason::NoRoute, None, None, None)).unwrap();
        assert!(v["route"].is_null() && v["retry_after_s"].is_null());
    }

    #[test]
    fn never_401_or_403() {
        for r in Reason::ALL {
            assert!(![401, 403].contains(&r.status().as_u16()), "{r:?}");
        }
    }

    #[test]
    fn refusals_always_say_when_to_come_back() {
        for r in Reason::ALL {
            let rsp = Shed::new(r).into_response(Some("api"), HeaderValue::from_static("id-1"));
            assert_eq!(rsp.headers()[X_REQUEST_ID], "id-1");
            assert_eq!(rsp.headers()[X_LEVEE_REASON], r.as_str());
            let code = rsp.status().as_u16();
            assert_eq!(rsp.headers().contains_key(RETRY_AFTER), code == 429 || code == 503, "{r:?}");
        }
    }

    #[test]
    fn grpc_callers_get_grpc_status_and_pushback() {
        let id = || HeaderValue::from_static("grpc-id");
        let rsp = Shed::new(Reason::RateLimited)
            .retry_after(Duration::from_millis(1500))
            .into_grpc_response(None, id());
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.headers()["grpc-status"], "8");
        assert_eq!(rsp.headers()["grpc-retry-pushback-ms"], "2000");
        assert_eq!(rsp.headers()["grpc-message"], "rate_limited");
        assert_eq!(rsp.headers()[X_LEVEE_REASON], "rate_limited");
        assert_eq!(rsp.headers()[X_REQUEST_ID], "grpc-id");
        let rsp = Shed::new(Reason::CircuitOpen).into_grpc_response(None, id());
        assert_eq!(rsp.headers()["grpc-status"], "14");
        assert_eq!(rsp.headers()["grpc-retry-pushback-ms"], "1000");
        // Not a refusal: the HTTP answer, which gRPC clients map themselves.
        assert_eq!(Shed::new(Reason::NoRoute).into_grpc_response(None, id()).status(), 404);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Some(Duration::from_millis(1))), 1);
        assert_eq!(retry_after_secs(Some(Duration::from_millis(1500))), 2);
        assert_eq!(retry_after_secs(Some(Duration::from_secs(3))), 3);
        assert_eq!(retry_after_secs(Some(Duration::ZERO)), 1);
        assert_eq!(retry_after_secs(None), 1);
    }
}
