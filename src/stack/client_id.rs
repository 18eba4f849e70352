//! Stage 3a: who is asking. Extracts the client key (and tenant) the route
//! configures, so that every later stage keys its state by the same identity.
//!
//! Keys are bounded whatever the client sends: a value longer than
//! [`MAX_KEY_BYTES`], or not printable ASCII, is replaced by a hash of itself;
//! a bearer token is always hashed, so the token never lives in levee's memory,
//! logs, admin API or Redis.

use std::net::IpAddr;

use http::Request;

use super::warm::Warm;
use crate::body::Body;
use crate::config::units::KeySource;
use crate::config::{KeyFallback, Priority, RouteConfig};
use crate::context::RequestContext;
use crate::respond::{Reason, Shed};

// The key type and the identity live in `context.rs`, below both this stage
// and `respond.rs`; later stages read the identity from the request's context.
pub use crate::context::{ClientKey, Identity, MAX_KEY_BYTES};

/// The route's identification rules.
#[derive(Debug, Clone)]
pub struct ClientId {
    source: KeySource,
    fallback: KeyFallback,
    tenant: Option<KeySource>,
    priority: Priority,
    /// The client's table entries to prefetch once it is known.
    warm: Option<Warm>,
}

impl ClientId {
    pub fn new(route: &RouteConfig) -> Self {
        ClientId {
            source: route.client_key.clone(),
            fallback: route.client_key_fallback,
            tenant: route.tenant_key.clone(),
            priority: route.priority,
            warm: None,
        }
    }

    /// Prefetches the client's entries in `warm`'s tables as soon as the
    /// request is identified (`warm.rs`).
    pub fn warming(mut self, warm: Option<Warm>) -> Self {
        self.warm = warm;
        self
    }

    /// Decides the identity of `req` from `client_ip` (the client's address,
    /// `RequestContext::client_ip`: behind a trusted proxy, the one it
    /// vouched for); `Err` when the key is missing and the route says
    /// `client_key_fallback = "reject"`.
    pub fn identify<B>(&self, req: &Request<B>, client_ip: IpAddr) -> Result<Identity, Shed> {
        let client = match extract(&self.source, req, client_ip) {
            Some(k) => k,
            None => match self.fallback {
                KeyFallback::Ip => ip_key(client_ip),
                KeyFallback::Reject => {
                    return Err(Shed::new(Reason::BadRequest).detail(format!(
                        "this route identifies clients by {}, which the request lacks",
                        describe(&self.source)
                    )))
                }
            },
        };
        let tenant = self.tenant.as_ref().and_then(|t| extract(t, req, client_ip));
        Ok(Identity { client, tenant, priority: self.priority })
    }
}

impl super::Check for ClientId {
    fn check(&self, req: &mut Request<Body>, cx: &RequestContext) -> Result<(), Shed> {
        let identity = self.identify(req, cx.client_ip)?;
        if let Some(warm) = &self.warm {
            warm.client(&identity.client);
        }
        // One client-id stage per stack: the context's identity is empty here.
        let _ = cx.identity.set(identity);
        Ok(())
    }
}

fn describe(source: &KeySource) -> String {
    match source {
        KeySource::Header(h) => format!("the {h} header"),
        KeySource::Query(q) => format!("the {q} query parameter"),
        KeySource::Ip => "its address".into(),
        KeySource::Bearer => "a bearer token".into(),
    }
}

fn ip_key(ip: IpAddr) -> ClientKey {
    ClientKey::from_ip(ip)
}

/// The key from `source`, or `None` when the request does not carry it (or it is empty).
fn extract<B>(source: &KeySource, req: &Request<B>, client_ip: IpAddr) -> Option<ClientKey> {
    match source {
        KeySource::Ip => Some(ip_key(client_ip)),
        KeySource::Header(name) => {
            let v = req.headers().get(name)?.as_bytes();
            (!v.is_empty()).then(|| ClientKey::from_bytes(v))
        }
        KeySource::Query(name) => {
            let value = query_param(req.uri().query()?, name)?;
            (!value.is_empty()).then(|| ClientKey::from_bytes(value.as_bytes()))
        }
        KeySource::Bearer => {
            let v = req.headers().get(http::header::AUTHORIZATION)?.as_bytes();
            let token = v.get(..7).filter(|p| p.eq_ignore_ascii_case(b"bearer ")).map(|_| &v[7..])?;
            let token = token.trim_ascii();
            (!token.is_empty()).then(|| ClientKey::hashed("bearer", token))
        }
    }
}

/// The value of the first `name` parameter in `query`, decoded by the one rule
/// levee uses for query strings (client keys and the admin API alike):
/// `application/x-www-form-urlencoded` through `form_urlencoded::parse`, so
/// `+` is a space, names are decoded too, and the first occurrence wins.
/// Bytes that are not UTF-8 become U+FFFD, which is not printable ASCII: such
/// a key is hashed by [`ClientKey::from_bytes`] like any other odd key.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> IpAddr {
        "10.1.2.3".parse().unwrap()
    }

    fn req(uri: &str, headers: &[(&str, &[u8])]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, http::HeaderValue::from_bytes(v).unwrap());
        }
        b.body(()).unwrap()
    }

    #[test]
    fn header_query_ip() {
        let h = KeySource::Header(http::HeaderName::from_static("x-device-id"));
        assert_eq!(extract(&h, &req("/", &[("x-device-id", b"dev-1")]), peer()).unwrap().as_str(), "dev-1");
        assert!(extract(&h, &req("/", &[("x-device-id", b"")]), peer()).is_none());
        let q = KeySource::Query("device".into());
        // A space is not printable ASCII: the key is hashed, the same way every time.
        let spaced = extract(&q, &req("/?a=1&device=d%207", &[]), peer()).unwrap();
        assert!(spaced.as_str().starts_with("h:"));
        assert_eq!(spaced, extract(&q, &req("/?device=d%207", &[]), peer()).unwrap());
        assert_eq!(extract(&q, &req("/?device=abc", &[]), peer()).unwrap().as_str(), "abc");
        assert_eq!(extract(&KeySource::Ip, &req("/", &[]), peer()).unwrap().as_str(), "10.1.2.3");
    }

    #[test]
    fn query_keys_follow_form_urlencoding_and_the_first_occurrence_wins() {
        let q = KeySource::Query("device".into());
        let key = |uri: &str| extract(&q, &req(uri, &[]), peer()).map(|k| k.as_str().to_string());
        // A second `device=` cannot override the first (one rule, everywhere).
        assert_eq!(key("/?device=first&device=second").as_deref(), Some("first"));
        // Names are decoded too: `dev%69ce` is `device`.
        assert_eq!(key("/?dev%69ce=abc").as_deref(), Some("abc"));
        // `+` is a space, as `%20` is: the same (hashed) key either way.
        assert_eq!(key("/?device=a+b"), key("/?device=a%20b"));
        assert!(key("/?device=a+b").unwrap().starts_with("h:"));
        // Percent-escapes of printable ASCII decode to the same key as the plain spelling.
        assert_eq!(key("/?device=%61bc").as_deref(), Some("abc"));
        // A prefix of the name is another parameter; an empty value is no key.
        assert_eq!(key("/?devices=abc"), None);
        assert_eq!(key("/?device=&device=late"), None);
        assert_eq!(key("/?device"), None);
        // Invalid UTF-8 after decoding is hashed, never kept.
        assert!(key("/?device=%FF%FE").unwrap().starts_with("h:"));
        // Long values are bounded.
        let long = format!("/?device={}", "a".repeat(4 * MAX_KEY_BYTES));
        assert!(key(&long).unwrap().len() <= MAX_KEY_BYTES);
    }

    #[test]
    fn bearer_tokens_are_never_kept() {
        let k = extract(&KeySource::Bearer, &req("/", &[("authorization", b"Bearer s3cret-token")]), peer())
            .unwrap();
        assert!(k.as_str().starts_with("bearer:"));
        assert!(!k.as_str().contains("s3cret"));
        assert!(extract(&KeySource::Bearer, &req("/", &[("authorization", b"Basic abc")]), peer()).is_none());
    }

    #[test]
    fn hostile_keys_are_hashed_and_bounded() {
        let long = vec![b'a'; 65536];
        let k = ClientKey::from_bytes(&long);
        assert!(k.as_str().len() <= MAX_KEY_BYTES);
        let invalid_utf8 = ClientKey::from_bytes(&[0xff, 0xfe, b'x']);
        assert!(invalid_utf8.as_str().starts_with("h:"));
        assert_ne!(ClientKey::from_bytes(b"a"), ClientKey::from_bytes(b"b"));
    }

    #[test]
    fn missing_key_follows_fallback() {
        let mut route_id = ClientId {
            source: KeySource::Header(http::HeaderName::from_static("x-device-id")),
            fallback: KeyFallback::Ip,
            tenant: None,
            priority: Priority::Normal,
            warm: None,
        };
        assert_eq!(route_id.identify(&req("/", &[]), peer()).unwrap().client.as_str(), "10.1.2.3");
        route_id.fallback = KeyFallback::Reject;
        assert_eq!(route_id.identify(&req("/", &[]), peer()).unwrap_err().reason, Reason::BadRequest);
    }
}
