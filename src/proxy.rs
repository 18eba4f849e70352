//! The entry of every proxied request: request bounds, routing, the plain-HTTP
//! policy, the route's stack, and levee's answer and metrics. This is the
//! outermost frame of the request path drawn in `lib.rs`.

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST, UPGRADE};
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use futures_util::future::Either;
use http_body::Body as _;
use http_body_util::BodyExt;

use crate::body::{self, Body, ClientBody, Fault};
use crate::context::{new_request_id, Exchange, RequestContext, Scheme};
use crate::listener::{plain_http, ConnInfo, ConnLimits, Handler};
use crate::metrics::CounterCache;
use crate::respond::{Reason, Shed};
use crate::runtime::{record, Label, Route, Runtime};
use crate::stack::Next;
use crate::stats::ShedSamples;
use crate::upstream::forward::X_REQUEST_ID;
use crate::websocket::Slot;
use tokio::sync::watch;

/// The proxy listener's handler.
pub struct Proxy {
    runtime: Arc<ArcSwap<Runtime>>,
    /// Requests that matched no route, or failed before routing.
    unrouted: CounterCache,
    unrouted_name: Arc<str>,
    /// The HTTPS listener's bound port, for redirects and 426 bodies (the
    /// configured port may be 0 in tests).
    https_port: Option<u16>,
    /// Recent shed decisions, for the event stream.
    samples: Arc<ShedSamples>,
    /// Raised on shutdown: WebSocket relays close after the grace period.
    shutdown: watch::Receiver<bool>,
}

impl Proxy {
    pub fn new(
        runtime: Arc<ArcSwap<Runtime>>,
        https_port: Option<u16>,
        samples: Arc<ShedSamples>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Proxy {
            runtime,
            unrouted: CounterCache::default(),
            unrouted_name: Arc::from("none"),
            https_port,
            samples,
            shutdown,
        }
    }

    /// Answers one request. What needs no waiting (the head's bounds,
    /// routing, the context) is done here, when hyper hands the request
    /// over, and a request refused by then is answered at once; the future
    /// keeps only what its waits need: the routed request and its context,
    /// then the stack's future, which borrows the context. As an `async fn`,
    /// it kept its arguments, two more copies of the request and every
    /// routing local for its whole life (2.2 KB), and hyper copies the
    /// future whole into its box on every request.
    fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        let started = Instant::now();
        let rt = self.runtime.load_full();
        let (request_id, grpc, admitted) = self.admit(&rt, req, &conn, started);
        match admitted {
            Ok(Admitted::Ready(routed)) => Either::Left(self.dispatch(rt, routed, request_id, grpc, started)),
            // Boxed: a request without a body carries none of the read's state.
            Ok(Admitted::Buffer(buffering)) => Either::Right(Either::Left(Box::pin(async move {
                let read = buffering.read(&rt.config.server).await;
                match read {
                    Ok(routed) => self.dispatch(rt, routed, request_id, grpc, started).await,
                    Err((index, shed)) => {
                        let route = rt.router.routes().get(index);
                        self.answer(Err((route, shed)), request_id, grpc, started)
                    }
                }
            }))),
            Err((index, shed)) => {
                let route = index.and_then(|index| rt.router.routes().get(index));
                let answer = self.answer(Err((route, shed)), request_id, grpc, started);
                Either::Right(Either::Right(std::future::ready(answer)))
            }
        }
    }

    /// A routed request through its route's stack, and levee's answer. The
    /// request's parts are taken apart before the future exists, so that it
    /// holds each once: the context stays where it was captured, lent to
    /// the stack (an async block that took them apart itself would keep
    /// them twice, the captured value and the bindings).
    fn dispatch(
        self: Arc<Self>,
        rt: Arc<Runtime>,
        routed: Routed,
        request_id: HeaderValue,
        grpc: bool,
        started: Instant,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        let Routed { index, req, upgrade, context } = routed;
        async move {
            let server = &rt.config.server;
            let dispatched: Dispatched<'_> = match rt.router.routes().get(index) {
                None => Err((None, Shed::new(Reason::NoRoute))),
                Some(route) => match route.service.run(req, &context).await {
                    Ok(mut rsp) => {
                        if let Some((slot, client_side)) = upgrade {
                            if rsp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                                let upstream_side = hyper::upgrade::on(&mut rsp);
                                crate::websocket::relay(
                                    client_side,
                                    upstream_side,
                                    slot,
                                    self.shutdown.clone(),
                                    server.shutdown_grace,
                                );
                            }
                        }
                        Ok((route, rsp))
                    }
                    // The upstream try failed because of the client's body: its fault.
                    Err(shed) => Err((
                        Some(route),
                        context.exchange.body_fault().map_or(shed, |f| client_fault(f, server)),
                    )),
                },
            };
            self.answer(dispatched, request_id, grpc, started)
        }
    }

    /// Everything [`serve`](Self::serve) decides before its first wait: the
    /// head's bounds, the route, the plain-HTTP policy, an upgrade's slot,
    /// the body's handling and the request's context. `Err` carries levee's
    /// own answer and the index of the route it concerns, if one matched.
    /// Also the request's id (the client's, or a new one) and whether it is
    /// a gRPC call, which every answer needs.
    fn admit(
        &self,
        rt: &Runtime,
        req: Request<Incoming>,
        conn: &ConnInfo,
        started: Instant,
    ) -> (HeaderValue, bool, Result<Admitted, Refused>) {
        let head = Head::scan(&req);
        let request_id = head
            .request_id
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .cloned()
            .unwrap_or_else(new_request_id);
        let grpc = head.grpc;
        let server = &rt.config.server;
        // A block, not a function of its own: the head borrows the request
        // until the request is taken apart.
        let admitted = 'admit: {
            if head.bytes > server.max_header_bytes {
                break 'admit Err((
                    None,
                    Shed::new(Reason::HeadersTooLarge)
                        .detail(format!("request head exceeds {} bytes", server.max_header_bytes)),
                ));
            }
            let host = match authority(&req, &head) {
                Ok(host) => host,
                Err(shed) => break 'admit Err((None, shed)),
            };
            let path = match crate::path::normalize(req.uri().path()) {
                Ok(path) => path,
                Err(e) => break 'admit Err((None, Shed::new(Reason::BadRequest).detail(e.to_string()))),
            };
            let Some(index) = rt.router.find_index(host, &path) else {
                break 'admit Err((None, Shed::new(Reason::NoRoute)));
            };
            let refused = |shed: Shed| (Some(index), shed);
            let Some(route) = rt.router.routes().get(index) else {
                break 'admit Err((None, Shed::new(Reason::NoRoute)));
            };
            let declared = match head
                .content_length
                .map(|v| v.to_str().ok().and_then(|s| s.parse::<u64>().ok()))
            {
                Some(None) => {
                    break 'admit Err(refused(Shed::new(Reason::BadRequest).detail("invalid Content-Length")))
                }
                Some(Some(n)) if n > server.max_body_bytes => {
                    break 'admit Err(refused(body_too_large(server.max_body_bytes)));
                }
                Some(Some(n)) => Some(n),
                None => None,
            };
            if route.config.tls_only && conn.scheme == Scheme::Http {
                if let Some(tls) = &rt.config.tls {
                    let port = self.https_port.unwrap_or(tls.listen.port());
                    if let Some(answer) = plain_http::decide(tls.plain_http, &req, host, port) {
                        break 'admit Err(refused(answer));
                    }
                }
            }

            let normalized = match path {
                std::borrow::Cow::Owned(normal) => Some(normal),
                std::borrow::Cow::Borrowed(_) => None,
            };
            let client_ip = crate::context::client_ip(conn.peer.ip(), req.headers(), &server.trusted_proxies);
            let may_upgrade = route.config.websocket && head.upgrade;
            let mut req = req;
            let upgrade = match may_upgrade && crate::websocket::is_upgrade(&req) {
                false => None,
                true => match self.upgrade_slot(route, &req, client_ip) {
                    Ok(slot) => Some((slot, hyper::upgrade::on(&mut req))),
                    Err(shed) => break 'admit Err(refused(shed)),
                },
            };
            let (mut parts, incoming) = req.into_parts();
            if let Some(normal) = normalized {
                // The upstream receives the path levee routed and limited on.
                parts.uri = with_path(&parts.uri, &normal);
            }
            let exchange = Arc::new(Exchange::new(started));
            let bodiless = incoming.is_end_stream();
            let (body, read_whole) = match bodiless {
                true => (body::empty(), false),
                false => {
                    let body = ClientBody::new(
                        body::boxed(incoming),
                        server.max_body_bytes,
                        server.body_read_timeout,
                        exchange.clone(),
                    );
                    // Read a small body whole before it takes an admission slot or a
                    // breaker probe (NGINX's request buffering): a client that stalls
                    // it holds its own connection, never anyone else's slot.
                    (body::boxed(body), declared.is_some_and(|n| n <= server.buffer_body_bytes))
                }
            };
            let context = RequestContext {
                peer: conn.peer,
                peer_header: conn.peer_header.clone(),
                client_ip,
                peer_trusted: server.trusted_proxies.contains(conn.peer.ip()),
                scheme: conn.scheme,
                request_id: request_id.clone(),
                route: route.name.clone(),
                started,
                // A body read whole took time since the head came (`Buffering::read`).
                whole: started,
                exchange,
                body_buffered: bodiless || read_whole,
                upgrade: upgrade.is_some(),
                grpc,
                identity: Default::default(),
            };
            let req = Request::from_parts(parts, body);
            let routed = Routed { index, req, upgrade, context };
            Ok(match read_whole {
                false => Admitted::Ready(routed),
                true => Admitted::Buffer(Box::new(Buffering(routed))),
            })
        };
        (request_id, grpc, admitted)
    }

    /// levee's answer: the upstream's response with the request id, or
    /// levee's own; and the request counted for its route.
    fn answer(
        &self,
        dispatched: Dispatched<'_>,
        request_id: HeaderValue,
        grpc: bool,
        started: Instant,
    ) -> Response<Body> {
        match dispatched {
            Ok((route, mut rsp)) => {
                route.count(rsp.status().as_u16(), Label::Forwarded);
                route.stats.forwarded(rsp.status().as_u16());
                route.duration.record(started.elapsed());
                rsp.headers_mut().insert(X_REQUEST_ID, request_id);
                rsp
            }
            Err((route, shed)) => {
                let reason = shed.reason;
                let outcome = if reason.is_shed() { Label::Shed } else { Label::Error };
                let client = shed.client.clone();
                // The answer carries the request id from the start (`respond::Answer::shared`).
                let rsp = if grpc {
                    shed.into_grpc_response(route.map(|r| &*r.name), request_id)
                } else {
                    shed.into_response(route.map(|r| &*r.name), request_id)
                };
                match route {
                    Some(r) => {
                        r.count(rsp.status().as_u16(), outcome);
                        r.duration.record(started.elapsed());
                        let client = client.as_ref().map(|c| c.as_str());
                        r.stats.answered(reason, client);
                        if reason.is_shed() {
                            r.count_shed(reason);
                            self.samples.record(&r.name, reason, client);
                        }
                    }
                    None => record(&self.unrouted, &self.unrouted_name, rsp.status().as_u16(), outcome),
                }
                rsp
            }
        }
    }
}

/// A request ready for its route's stack: routed, with its context, which
/// the future holds and lends to the stack.
struct Routed {
    /// The route's place in the runtime's router.
    index: usize,
    req: Request<Body>,
    /// The upgraded-connection slot and the client's side of the upgrade.
    upgrade: Option<(Slot, hyper::upgrade::OnUpgrade)>,
    context: RequestContext,
}

/// levee's own answer before the stack, and the index of the route it
/// concerns (if one matched).
type Refused = (Option<usize>, Shed);

/// What [`Proxy::admit`] hands the wait: the request, or first its body.
/// The common request (no body to read) is held inline; boxing it would
/// cost the allocation this layout saves.
#[allow(clippy::large_enum_variant)]
enum Admitted {
    Ready(Routed),
    /// A small body to read whole first (boxed: a request without one
    /// carries none of this).
    Buffer(Box<Buffering>),
}

/// A routed request whose body is read whole before the stack; its
/// context's `whole` is set once the body is in.
struct Buffering(Routed);

impl Buffering {
    async fn read(self: Box<Self>, server: &crate::config::Server) -> Result<Routed, (usize, Shed)> {
        let Routed { index, req, upgrade, mut context } = self.0;
        let (parts, body) = req.into_parts();
        match body.collect().await {
            Ok(collected) => {
                context.whole = Instant::now();
                let req = Request::from_parts(parts, body::full(collected.to_bytes()));
                Ok(Routed { index, req, upgrade, context })
            }
            Err(_) => {
                let fault = context.exchange.body_fault().unwrap_or(Fault::CutOff);
                Err((index, client_fault(fault, server)))
            }
        }
    }
}

/// A routed request's response, or levee's own answer and the route it
/// concerns (if one matched).
type Dispatched<'r> = Result<(&'r Route, Response<Body>), (Option<&'r Route>, Shed)>;

impl Proxy {
    /// A slot for one more upgraded connection of this request's client, or
    /// 429 `too_many_connections` when it holds `max_upgraded_per_client`.
    fn upgrade_slot<B>(
        &self,
        route: &Route,
        req: &Request<B>,
        client_ip: std::net::IpAddr,
    ) -> Result<Slot, Shed> {
        let identity = route.client_id.identify(req, client_ip)?;
        let client = identity.client.clone();
        route.upgraded.acquire(Arc::from(client.as_str())).ok_or_else(|| {
            Shed::new(Reason::TooManyConnections)
                .retry_after(crate::respond::jitter(std::time::Duration::from_secs(1), 1.0))
                .detail(format!(
                    "this client already holds {} upgraded connections on this route",
                    route.config.max_upgraded_per_client
                ))
                .client(client)
        })
    }
}

/// levee's answer to a request whose body failed.
fn client_fault(fault: Fault, server: &crate::config::Server) -> Shed {
    match fault {
        Fault::TooLarge => body_too_large(server.max_body_bytes),
        Fault::Stalled => Shed::new(Reason::RequestTimeout)
            .detail(format!("the request body stalled for more than {:?}", server.body_read_timeout)),
        Fault::CutOff => Shed::new(Reason::ClientClosed).detail("the client cut its request body off"),
    }
}

/// The one authority of a request (SPEC: "One authority"): the absolute-form
/// target's or `:authority`, else `Host`. A request with two `Host` headers,
/// or whose target and `Host` disagree, is refused: a front proxy and levee
/// could otherwise each route it on a different one.
fn authority<'a, B>(req: &'a Request<B>, head: &Head<'a>) -> Result<Option<&'a str>, Shed> {
    if head.hosts > 1 {
        return Err(Shed::new(Reason::BadRequest).detail("more than one Host header"));
    }
    let header = match head.host.map(|h| h.to_str()) {
        Some(Ok(h)) => Some(h),
        Some(Err(_)) => return Err(Shed::new(Reason::BadRequest).detail("invalid Host header")),
        None => None,
    };
    match (req.uri().authority(), header) {
        (Some(target), Some(h)) if !same_authority(target, h) => {
            Err(Shed::new(Reason::BadRequest).detail("the request target's authority and Host disagree"))
        }
        (Some(target), _) => Ok(Some(target.as_str())),
        (None, Some(h)) => Ok(Some(h)),
        (None, None) => Ok(None),
    }
}

/// Whether `Host` names what the target's authority names: the same host
/// (case-insensitively), and the same port when both say one (`Host:
/// localhost` beside `:authority: localhost:8443` is one server to a router
/// that routes on host names).
fn same_authority(target: &http::uri::Authority, host: &str) -> bool {
    let Ok(host) = host.parse::<http::uri::Authority>() else {
        return false;
    };
    target.host().eq_ignore_ascii_case(host.host())
        && match (target.port_u16(), host.port_u16()) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
}

/// `uri` with its path replaced by `path` (query, scheme and authority kept).
fn with_path(uri: &http::Uri, path: &str) -> http::Uri {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    match http::uri::PathAndQuery::try_from(pq) {
        Ok(pq) => parts.path_and_query = Some(pq),
        Err(_) => return uri.clone(),
    }
    http::Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

fn body_too_large(limit: u64) -> Shed {
    Shed::new(Reason::BodyTooLarge).detail(format!("request body exceeds {limit} bytes"))
}

/// What `serve` reads of a request's headers, found in the one pass that
/// measures its head: a lookup by name hashes the name and probes the map,
/// and `serve` made five (request id, `Content-Type`, `Host`,
/// `Content-Length`, `Upgrade`) on every request.
struct Head<'a> {
    /// The head's size as sent on the wire: request line and header lines
    /// (approximately, for HTTP/2).
    bytes: usize,
    request_id: Option<&'a HeaderValue>,
    /// The first `Host`, and how many there are.
    host: Option<&'a HeaderValue>,
    hosts: usize,
    /// The first `Content-Length` (hyper refuses a request whose values differ).
    content_length: Option<&'a HeaderValue>,
    /// A gRPC call (`content-type: application/grpc...`).
    grpc: bool,
    /// An `Upgrade` header is present: the request may ask for a WebSocket.
    upgrade: bool,
}

impl<'a> Head<'a> {
    fn scan<B>(req: &'a Request<B>) -> Self {
        let line =
            req.method().as_str().len() + req.uri().path_and_query().map_or(1, |p| p.as_str().len()) + 12;
        let mut head = Head {
            bytes: line,
            request_id: None,
            host: None,
            hosts: 0,
            content_length: None,
            grpc: false,
            upgrade: false,
        };
        for (name, value) in req.headers() {
            head.bytes += name.as_str().len() + value.len() + 4;
            if name == HOST {
                head.host = head.host.or(Some(value));
                head.hosts += 1;
            } else if name == CONTENT_LENGTH {
                head.content_length = head.content_length.or(Some(value));
            } else if name == CONTENT_TYPE {
                head.grpc |= crate::respond::is_grpc_type(value);
            } else if name == UPGRADE {
                head.upgrade = true;
            } else if name == X_REQUEST_ID {
                head.request_id = head.request_id.or(Some(value));
            }
        }
        head
    }
}

impl Handler for Proxy {
    fn limits(&self) -> ConnLimits {
        let server = &self.runtime.load().config.server;
        ConnLimits {
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            max_header_bytes: server.max_header_bytes,
            h2_max_concurrent_streams: server.h2_max_concurrent_streams,
            proxy_protocol: server.proxy_protocol,
        }
    }

    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        self.serve(req, conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one pass over the head finds what `serve` reads: the first of
    /// each header, every `Host` counted, the size as a client sent it.
    #[test]
    fn one_pass_over_the_head_finds_what_serve_reads() {
        let req = Request::builder()
            .method("PUT")
            .uri("/v1/x?q=1")
            .header("host", "a.example")
            .header("x-request-id", "id-1")
            .header("host", "b.example")
            .header("content-length", "5")
            .header("content-type", "application/grpc+proto")
            .header("x-request-id", "id-2")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        let head = Head::scan(&req);
        assert_eq!(head.hosts, 2);
        assert_eq!(head.host.unwrap(), "a.example");
        assert_eq!(head.request_id.unwrap(), "id-1");
        assert_eq!(head.content_length.unwrap(), "5");
        assert!(head.grpc && head.upgrade);
        // "PUT /v1/x?q=1 HTTP/1.1\r\n", then "name: value\r\n" for each header.
        let lines = [
            "PUT /v1/x?q=1 HTTP/1.1",
            "host: a.example",
            "x-request-id: id-1",
            "host: b.example",
            "content-length: 5",
            "content-type: application/grpc+proto",
            "x-request-id: id-2",
            "upgrade: websocket",
        ];
        assert_eq!(head.bytes, lines.iter().map(|l| l.len() + 2).sum::<usize>());

        let plain = Request::builder().uri("/").header("content-type", "text/plain").body(()).unwrap();
        let head = Head::scan(&plain);
        assert!(head.host.is_none() && head.request_id.is_none() && head.content_length.is_none());
        assert!(!head.grpc && !head.upgrade);
    }

    /// A request's whole future, the route's stack inside it, is what hyper
    /// keeps in its per-connection box: its size is copied there on every
    /// request. 2,280 bytes while routing was an async fn of its own (the
    /// request held twice, each level copied into the next) and the body
    /// read was inline; 1,432 (debug build) with the stack boxed apart;
    /// 1,392 with the stack inline, routing done before the future exists;
    /// 1,072 with the context lent to the stack beside the request, each
    /// part of the routed request held once (`dispatch`).
    #[test]
    fn the_future_of_a_request_stays_small() {
        fn future_size<F, Fut>(_: F) -> usize
        where
            F: FnOnce(Arc<Proxy>, Request<Incoming>, ConnInfo) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        let size = future_size(Proxy::serve);
        assert!(size <= 1280, "the request's future is {size} bytes");
    }
}
