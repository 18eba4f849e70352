//! Sending one request to one endpoint: hop-by-hop headers removed both ways
//! (RFC 9110 §7.6.1), `x-forwarded-for` / `x-forwarded-proto` / `x-request-id`
//! added, the response head awaited within `timeout`, bodies streamed.

use std::future::Future;
use std::time::Duration;

use futures_util::future::{Either, FutureExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};

use std::sync::Arc;

use crate::body::{self, Body, BoxError};
use crate::classify;
use crate::config::{EndpointAddr, UpstreamTls};
use crate::context::RequestContext;
use crate::upstream::pool::{self, EndpointPool, PoolError};

pub use crate::context::{X_FORWARDED_FOR, X_FORWARDED_PROTO, X_REQUEST_ID};

pub type HttpClient = Client<HttpConnector, Body>;

/// Why a try failed before a response head arrived. Built from the pool's
/// and hyper-util's error kinds, never from error text.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("connect failed: {0}")]
    Connect(BoxError),
    #[error("no response head within {0:?}")]
    Timeout(Duration),
    #[error("invalid or broken response: {0}")]
    BadResponse(BoxError),
}

/// The clients of one upstream: pooled keep-alive HTTP/1.1 for everything
/// but gRPC, which needs HTTP/2 end to end (trailers, streams): gRPC calls go
/// over HTTP/2 (h2c with prior knowledge, or ALPN `h2` over TLS),
/// multiplexed on few connections. TLS only where the upstream has
/// `https://` endpoints: a plain upstream pays nothing for it.
///
/// Plain HTTP/1.1 requests (the hot path) go through one [`EndpointPool`] per
/// `http://` endpoint; TLS, gRPC and upgrades through hyper-util's client.
pub struct Clients {
    http1: Transport,
    h2: Transport,
    /// By endpoint index; `None` for `https://` endpoints.
    pools: Vec<Option<Arc<EndpointPool>>>,
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Body>;

enum Transport {
    Plain(HttpClient),
    Tls(HttpsClient),
}

impl Transport {
    fn request(&self, req: Request<Body>) -> hyper_util::client::legacy::ResponseFuture {
        match self {
            Transport::Plain(c) => c.request(req),
            Transport::Tls(c) => c.request(req),
        }
    }
}

impl Clients {
    pub fn new(connect_timeout: Duration, tls: Option<&UpstreamTls>, endpoints: &[EndpointAddr]) -> Self {
        let pools: Vec<Option<Arc<EndpointPool>>> = endpoints
            .iter()
            .map(|e| (!e.tls).then(|| EndpointPool::new(&e.authority, connect_timeout)))
            .collect();
        pool::sweep_idle(&pools);
        let (http1, h2) = match tls {
            None => (
                Transport::Plain(client(connector(connect_timeout), false)),
                Transport::Plain(client(connector(connect_timeout), true)),
            ),
            Some(tls) => (
                Transport::Tls(client(tls_connector(connect_timeout, tls, false), false)),
                Transport::Tls(client(tls_connector(connect_timeout, tls, true), true)),
            ),
        };
        Clients { http1, h2, pools }
    }

    /// The pool of endpoint `idx`, for a plain-HTTP endpoint.
    pub fn pool(&self, idx: usize) -> Option<&Arc<EndpointPool>> {
        self.pools.get(idx).and_then(Option::as_ref)
    }
}

fn connector(connect_timeout: Duration) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector
}

/// TLS for `https://` endpoints (plain HTTP for the others of a mixed
/// upstream): SNI and verification by `server_name` or the endpoint's host,
/// ALPN `http/1.1`, or `h2` for the gRPC client.
fn tls_connector(connect_timeout: Duration, tls: &UpstreamTls, h2: bool) -> HttpsConnector<HttpConnector> {
    let mut tcp = connector(connect_timeout);
    tcp.enforce_http(false);
    let builder = HttpsConnectorBuilder::new().with_tls_config((*tls.client).clone()).https_or_http();
    let builder = match &tls.server_name {
        Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(name.clone())),
        None => builder,
    };
    if h2 {
        builder.enable_http2().wrap_connector(tcp)
    } else {
        builder.enable_http1().wrap_connector(tcp)
    }
}

fn client<C>(connector: C, h2: bool) -> Client<C, Body>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .http2_only(h2)
        .build(connector)
}

/// Rewrites `req` for endpoint `idx` and sends it; the response head must
/// arrive within `timeout`. The rewrite is done before the future exists,
/// which keeps only the rewritten request and the wait: as an `async fn`,
/// it held the request twice, and its caller a copy of the whole context to
/// read beside the request it rewrote (the future, copied into a box on
/// every request, was 2.6 KB).
pub fn send(
    clients: &Clients,
    idx: usize,
    endpoint: &EndpointAddr,
    req: Request<Body>,
    cx: &RequestContext,
    timeout: Duration,
) -> impl Future<Output = Result<Response<Body>, ForwardError>> + Send + 'static {
    let (mut head, body) = req.into_parts();
    let (grpc, upgrade, buffered) = (cx.grpc, cx.upgrade, cx.body_buffered);
    let pool = clients.pool(idx).filter(|_| !grpc && !upgrade);
    let version = if grpc { Version::HTTP_2 } else { Version::HTTP_11 };
    prepare_request(&mut head, cx, endpoint, version, pool.is_none());
    let req = Request::from_parts(head, body);
    // Combinators, not an async block: each branch's future is made here and
    // held once (an async block would keep the request beside the send that
    // took it, in every state).
    let sent = match pool.cloned() {
        // A body in memory (none, or read whole) goes on the lean client;
        // a streaming one on hyper's (`pool.rs`).
        Some(pool) if buffered => {
            Either::Left(Either::Left(tokio::time::timeout(timeout, pool.send_buffered(req)).map(pooled)))
        }
        Some(pool) => Either::Left(Either::Right(tokio::time::timeout(timeout, pool.send(req)).map(pooled))),
        None => {
            let client = if grpc { &clients.h2 } else { &clients.http1 };
            Either::Right(tokio::time::timeout(timeout, client.request(req)).map(legacy))
        }
    };
    sent.map(move |sent| {
        let (mut parts, body) =
            sent.map_err(|timed_out| timed_out.unwrap_or(ForwardError::Timeout(timeout)))?.into_parts();
        if grpc {
            classify::read_grpc_status(&mut parts);
        }
        remove_hop_by_hop(&mut parts.headers);
        if upgrade && parts.status == http::StatusCode::SWITCHING_PROTOCOLS {
            crate::websocket::restore_upgrade_headers(&mut parts.headers);
        }
        // The client's protocol is levee's business, not the upstream's (an HTTP/1.0
        // upstream must not downgrade an HTTP/1.1 client).
        parts.version = Version::HTTP_11;
        Ok(Response::from_parts(parts, body))
    })
}

/// A send that ended, or `Err(None)` when its time ran out.
type Sent = Result<Response<Body>, Option<ForwardError>>;

/// An [`EndpointPool`]'s answer, within the timeout or not.
fn pooled(sent: Result<Result<Response<Body>, PoolError>, tokio::time::error::Elapsed>) -> Sent {
    match sent {
        Err(_) => Err(None),
        Ok(Err(PoolError::Connect(e))) => Err(Some(ForwardError::Connect(e))),
        Ok(Err(PoolError::Send(e))) => Err(Some(ForwardError::BadResponse(e.into()))),
        Ok(Err(PoolError::Exchange(e))) => Err(Some(ForwardError::BadResponse(e.into()))),
        Ok(Ok(rsp)) => Ok(rsp),
    }
}

/// hyper-util's client's answer (TLS and gRPC upstreams, upgrades), within
/// the timeout or not.
fn legacy(
    sent: Result<
        Result<Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
        tokio::time::error::Elapsed,
    >,
) -> Sent {
    match sent {
        Err(_) => Err(None),
        Ok(Err(e)) if e.is_connect() => Err(Some(ForwardError::Connect(e.into()))),
        Ok(Err(e)) => Err(Some(ForwardError::BadResponse(e.into()))),
        Ok(Ok(rsp)) => Ok(rsp.map(body::boxed)),
    }
}

/// The request as the upstream gets it: `Host`, the target (absolute form for
/// hyper-util's client, which picks its pool by it; origin form for an
/// [`EndpointPool`], which writes it as is), version, hop-by-hop headers and
/// the forwarding headers, which come from the request's context.
fn prepare_request(
    head: &mut http::request::Parts,
    ctx: &RequestContext,
    endpoint: &EndpointAddr,
    version: Version,
    absolute: bool,
) {
    let http::request::Parts { uri: target, version: sent_version, headers, .. } = head;
    // HTTP/2 clients carry the host in :authority; HTTP/1.1 upstreams need Host.
    if !headers.contains_key(header::HOST) {
        // An HTTP/1.0 request may have neither: the endpoint's, as hyper-util's client would.
        let authority = target.authority().unwrap_or(&endpoint.authority);
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            headers.insert(header::HOST, host);
        }
    }
    let uri = &*target;
    let origin_form = uri.scheme().is_none() && uri.authority().is_none() && uri.path_and_query().is_some();
    if absolute || !origin_form {
        let mut parts = http::uri::Parts::default();
        if absolute {
            parts.scheme =
                Some(if endpoint.tls { http::uri::Scheme::HTTPS } else { http::uri::Scheme::HTTP });
            parts.authority = Some(endpoint.authority.clone());
        }
        parts.path_and_query =
            Some(uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
        if let Ok(uri) = Uri::from_parts(parts) {
            *target = uri;
        }
    }
    *sent_version = version;

    remove_hop_by_hop(headers);
    if ctx.upgrade {
        crate::websocket::restore_upgrade_headers(headers);
    }
    // Only a trusted proxy's chain is passed on (NGINX's realip, Envoy's
    // xff_num_trusted_hops): from anyone else it is replaced, so a client
    // cannot forge its place in the chain the upstream reads.
    let peer_ip = ctx.peer_header.clone();
    let prior: Vec<&str> = if ctx.peer_trusted {
        headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect()
    } else {
        Vec::new()
    };
    let xff = if prior.is_empty() {
        Some(peer_ip)
    } else {
        let chain = format!("{}, {}", prior.join(", "), ctx.peer.ip().to_canonical());
        HeaderValue::from_str(&chain).ok().or(Some(peer_ip))
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(ctx.scheme.as_str()));
    headers.insert(X_REQUEST_ID, ctx.request_id.clone());
}

/// The headers that are hop-by-hop whatever `Connection` says (RFC 9110
/// §7.6.1, and the legacy `keep-alive` and `proxy-connection`).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Which of [`HOP_BY_HOP`] `name` is.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    HOP_BY_HOP.iter().position(|h| h == name)
}

/// The header names a `Connection` value lists: its tokens but the `close`
/// and `keep-alive` options (a value that is not text names nothing).
fn connection_tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value.to_str().unwrap_or("").split(',').map(str::trim).filter(|t| {
        !t.is_empty() && !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive")
    })
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1: those named by
/// `Connection`, and the well-known ones. `TE: trailers` is the one TE value
/// that may pass, and only on requests; hyper manages framing itself.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the headers: which well-known ones are present, and
    // whether `Connection` names any other. Usually nothing on a request and
    // `Connection: keep-alive` alone on a response; each removal or lookup is
    // a hash and a probe, so only what is there is looked up and removed.
    let mut present = 0u16;
    let mut names_others = false;
    for (name, value) in headers.iter() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
            names_others |= i == 0 && connection_tokens(value).next().is_some();
        }
    }
    if present == 0 {
        // A header named by `Connection` needs a `Connection` header.
        return;
    }
    if names_others {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(connection_tokens)
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            match hop_by_hop_index(&name) {
                Some(i) => present |= 1 << i,
                None => {
                    headers.remove(name);
                }
            }
        }
    }
    let keep_te_trailers = present & (1 << 5) != 0
        && headers
            .get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if keep_te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_those_named_by_connection() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert!(h.get("x-secret-hop").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-end-to-end").unwrap(), "1");
    }

    #[test]
    fn only_hop_by_hop_headers_go_whatever_their_case_and_options() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.insert("x-b", HeaderValue::from_static("3"));
        let before = h.clone();
        remove_hop_by_hop(&mut h);
        assert_eq!(h, before, "nothing hop-by-hop: untouched");

        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h, before, "a response's `Connection: keep-alive` goes, nothing else");

        h.insert(header::CONNECTION, HeaderValue::from_static("close, X-A, ,upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("deflate"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic x"));
        remove_hop_by_hop(&mut h);
        assert!(h.get("x-a").is_none(), "named by Connection, in another case");
        assert_eq!(h.get("x-b").unwrap(), "3");
        for name in HOP_BY_HOP {
            assert!(h.get(&name).is_none(), "{name}");
        }
    }
}
