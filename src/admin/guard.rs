//! Who may talk to the admin listener (SPEC, the rules under the Admin API table).
//!
//! The admin listener is reachable by any web page the operator's browser
//! opens, so three checks run before any handler:
//!
//! - **Host**: only an IP literal (v4 or `[v6]`, any port), `localhost` or a
//!   name in `admin.hosts`. A DNS-rebinding page reaches `127.0.0.1` under its
//!   own name, so its requests carry that name and are refused. A request
//!   without a Host (and without an absolute-form authority), or with two, is
//!   refused too: a browser always sends exactly one.
//! - **Origin** on mutating calls (POST, PUT, PATCH, DELETE): when present it
//!   must be the request's own host and port; a page on another site (or on
//!   another port of the same machine) cannot reload or reset. No Origin (curl,
//!   scripts) is fine: browsers always send one on cross-site mutating calls.
//! - **Token**: with `admin.token` set, `Authorization: Bearer <token>`,
//!   compared in constant time (`subtle`) over SHA-256 digests so that neither
//!   the bytes nor the length of the token leak through timing.
//!
//! Every refusal is a JSON body; the admin listener (never the proxy) may
//! answer 400, 401 and 403.

use std::net::{Ipv4Addr, Ipv6Addr};

use http::header::{HeaderValue, AUTHORIZATION, HOST, ORIGIN, WWW_AUTHENTICATE};
use http::uri::Authority;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::json_response;
use crate::body::Body;

/// A refusal, boxed: `Result<_, Refusal>` stays small on the happy path.
pub type Refusal = Box<http::Response<Body>>;

/// The authority a request was sent to: lowercased host (IPv6 in brackets) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: Option<u16>,
}

/// The checked target of `req`, or the refusal. `hosts` is `admin.hosts`, lowercased.
pub fn host<B>(req: &Request<B>, hosts: &[String]) -> Result<Target, Refusal> {
    let mut values = req.headers().get_all(HOST).iter();
    let header = values.next();
    if values.next().is_some() {
        return Err(refuse(StatusCode::BAD_REQUEST, "bad_host", "more than one Host header".into()));
    }
    let header = match header {
        Some(v) => Some(v.to_str().ok().and_then(parse_authority).ok_or_else(|| {
            refuse(StatusCode::BAD_REQUEST, "bad_host", "the Host header is not an authority".into())
        })?),
        None => None,
    };
    // Absolute-form (and HTTP/2's :authority): the URI's authority is the target;
    // a Host header beside it must be allowed as well.
    let uri = match req.uri().authority() {
        Some(a) => Some(parse_authority(a.as_str()).ok_or_else(|| {
            refuse(StatusCode::BAD_REQUEST, "bad_host", "the request target's authority is not usable".into())
        })?),
        None => None,
    };
    let Some(effective) = uri.clone().or(header.clone()) else {
        return Err(refuse(StatusCode::BAD_REQUEST, "missing_host", "the request has no Host".into()));
    };
    for t in [uri, header].into_iter().flatten() {
        if !allowed(&t.host, hosts) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                format!(
                    "the admin listener answers IP literals, localhost and admin.hosts only, not {:?}",
                    t.host
                ),
            ));
        }
    }
    Ok(effective)
}

/// Whether `method` changes something (and so needs a same-origin `Origin`).
pub fn mutating(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
}

/// A mutating call whose `Origin` is another site is refused; no `Origin` is fine.
/// Same origin: the Origin's host equals the request's and so does the port,
/// a missing port being the default of the Origin's scheme (a TLS-terminating
/// proxy in front of the admin listener keeps working).
pub fn same_origin(headers: &HeaderMap, target: &Target) -> Result<(), Refusal> {
    let mut values = headers.get_all(ORIGIN).iter();
    let Some(origin) = values.next() else {
        return Ok(());
    };
    let cross = |detail: String| refuse(StatusCode::FORBIDDEN, "cross_origin", detail);
    if values.next().is_some() {
        return Err(cross("more than one Origin header".into()));
    }
    let text = origin.to_str().unwrap_or("");
    let uri: Option<Uri> = text.parse().ok();
    let parsed = uri.as_ref().and_then(|u| {
        let default = match u.scheme_str()? {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let t = parse_authority(u.authority()?.as_str())?;
        Some((t, default))
    });
    let Some((from, default)) = parsed else {
        return Err(cross(format!("Origin {text:?} is not this admin listener")));
    };
    if from.host == target.host && from.port.unwrap_or(default) == target.port.unwrap_or(default) {
        Ok(())
    } else {
        Err(cross(format!("a mutating call from {text:?} (another site) is refused")))
    }
}

/// `Authorization: Bearer <token>` (the scheme case-insensitive, RFC 7235).
pub fn bearer(headers: &HeaderMap, token: &str) -> Result<(), Refusal> {
    let given = headers
        .get(AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .and_then(|v| v.get(..7).filter(|p| p.eq_ignore_ascii_case(b"bearer ")).map(|_| &v[7..]))
        .map(<[u8]>::trim_ascii)
        .unwrap_or(b"");
    // Digests first: equal length whatever was sent, so the comparison's time
    // says nothing about the token's length either.
    let matches: bool = Sha256::digest(given).ct_eq(&Sha256::digest(token.as_bytes())).into();
    if matches && !given.is_empty() {
        return Ok(());
    }
    let mut rsp = refuse(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "admin.token is set: send Authorization: Bearer <admin.token>".into(),
    );
    rsp.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Err(rsp)
}

/// Host and port of an authority, lowercased; `None` with userinfo or a bad port.
fn parse_authority(value: &str) -> Option<Target> {
    if value.contains('@') {
        return None;
    }
    let a: Authority = value.parse().ok()?;
    // `Authority::port` hides a port that is not a u16 ("99999", ""): read it ourselves.
    let port = match a.as_str().strip_prefix(a.host())? {
        "" => None,
        rest => Some(rest.strip_prefix(':')?.parse::<u16>().ok()?),
    };
    let host = a.host().to_ascii_lowercase();
    (!host.is_empty()).then_some(Target { host, port })
}

/// An IP literal, `localhost`, or a configured name (a trailing dot ignored).
fn allowed(host: &str, hosts: &[String]) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok();
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    name == "localhost" || hosts.iter().any(|h| h.strip_suffix('.').unwrap_or(h) == name)
}

fn refuse(status: StatusCode, error: &str, detail: String) -> Refusal {
    Box::new(json_response(status, json!({"error": error, "detail": detail})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn hosts() -> Vec<String> {
        vec!["admin.internal".into()]
    }

    fn status(r: Result<Target, Refusal>) -> u16 {
        match r {
            Ok(_) => 200,
            Err(rsp) => rsp.status().as_u16(),
        }
    }

    #[test]
    fn ip_literals_localhost_and_configured_names_are_served() {
        for host in [
            "127.0.0.1:9901",
            "10.0.0.7",
            "[::1]:9901",
            "[fe80::1]",
            "localhost",
            "LocalHost:1",
            "Admin.Internal:9901",
            "admin.internal.",
        ] {
            assert_eq!(status(host_of(host)), 200, "{host}");
        }
        let t = host(&req("/", &[("host", "[::1]:9901")]), &hosts()).unwrap();
        assert_eq!(t, Target { host: "[::1]".into(), port: Some(9901) });
    }

    fn host_of(h: &str) -> Result<Target, Refusal> {
        host(&req("/", &[("host", h)]), &hosts())
    }

    #[test]
    fn other_names_and_odd_hosts_are_refused() {
        for h in [
            "evil.example",
            "evil.example:9901",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "2130706433x",
        ] {
            assert_eq!(status(host_of(h)), 403, "{h}");
        }
        for h in ["user@127.0.0.1", "127.0.0.1:", "127.0.0.1:99999", ""] {
            assert_eq!(status(host_of(h)), 400, "{h:?}");
        }
        assert_eq!(status(host(&req("/", &[]), &hosts())), 400, "no Host");
        let two = req("/", &[("host", "127.0.0.1"), ("host", "localhost")]);
        assert_eq!(status(host(&two, &hosts())), 400, "two Hosts");
        // Absolute form: the authority counts, and a Host beside it must pass too.
        assert_eq!(status(host(&req("http://evil.example/x", &[("host", "127.0.0.1")]), &hosts())), 403);
        assert_eq!(status(host(&req("http://127.0.0.1/x", &[("host", "evil.example")]), &hosts())), 403);
        assert_eq!(status(host(&req("http://127.0.0.1:1/x", &[]), &hosts())), 200);
    }

    #[test]
    fn origin_must_be_the_same_host_and_port() {
        let t = Target { host: "127.0.0.1".into(), port: Some(9901) };
        let check = |o: &str| same_origin(req("/", &[("origin", o)]).headers(), &t).is_ok();
        assert!(same_origin(req("/", &[]).headers(), &t).is_ok(), "no Origin (curl) is fine");
        assert!(check("http://127.0.0.1:9901"));
        assert!(!check("http://evil.example"));
        assert!(!check("http://127.0.0.1:8080"), "another port is another site");
        assert!(!check("http://localhost:9901"), "another name is another site");
        assert!(!check("null"));
        assert!(!check("file://127.0.0.1:9901"));
        let default_port = Target { host: "admin.internal".into(), port: None };
        assert!(
            same_origin(req("/", &[("origin", "https://admin.internal")]).headers(), &default_port).is_ok()
        );
        assert!(same_origin(req("/", &[("origin", "https://admin.internal:8443")]).headers(), &default_port)
            .is_err());
    }

    #[test]
    fn the_token_is_a_bearer_compared_whole() {
        let ok = |v: &str| bearer(req("/", &[("authorization", v)]).headers(), "s3cret").is_ok();
        assert!(ok("Bearer s3cret"));
        assert!(ok("bearer s3cret"));
        assert!(!ok("Bearer s3cre"));
        assert!(!ok("Bearer s3cret2"));
        assert!(!ok("Basic s3cret"));
        assert!(!ok("Bearer "));
        assert!(bearer(req("/", &[]).headers(), "s3cret").is_err());
        let rsp = bearer(req("/", &[]).headers(), "s3cret").unwrap_err();
        assert_eq!(rsp.status(), 401);
        assert_eq!(rsp.headers()[WWW_AUTHENTICATE], "Bearer");
    }
}
