//! What the plain listener does with a request for a `tls_only` route
//! (`server.tls.plain_http`): `serve` it, `redirect` it (308), or `reject` it
//! with 426 and a body that names the https URL.
//!
//! `reject` exists because machine clients do not follow redirects: in the
//! outage behind it, devices took a 308 for a failure and kept sending plain
//! HTTP for 17 hours. A 426 with a readable body is an error someone sees.

use http::header::{HeaderValue, CONNECTION, LOCATION, UPGRADE};
use http::Request;

use crate::config::PlainHttp;
use crate::respond::{Reason, Shed};

/// `None` when the request may be served over plain HTTP; else levee's answer
/// for `respond.rs`: the 308 `tls_redirect` (an answer levee makes itself, so
/// it never counts as a success and a route that only redirects goes stale),
/// or the 426 refusal.
pub fn decide<B>(policy: PlainHttp, req: &Request<B>, host: Option<&str>, https_port: u16) -> Option<Shed> {
    if policy == PlainHttp::Serve {
        return None;
    }
    let url = https_url(req, host, https_port);
    match policy {
        PlainHttp::Serve => None,
        PlainHttp::Redirect => {
            let shed =
                Shed::new(Reason::TlsRedirect).detail(format!("this route is served over HTTPS: use {url}"));
            Some(match HeaderValue::from_str(&url) {
                Ok(v) => shed.header(LOCATION, v),
                Err(_) => shed,
            })
        }
        PlainHttp::Reject => Some(
            Shed::new(Reason::TlsRequired)
                .detail(format!("this route is served over HTTPS only: use {url}"))
                .header(UPGRADE, HeaderValue::from_static("TLS/1.2, HTTP/1.1"))
                .header(CONNECTION, HeaderValue::from_static("Upgrade")),
        ),
    }
}

fn https_url<B>(req: &Request<B>, host: Option<&str>, port: u16) -> String {
    let host = host.unwrap_or("localhost");
    let bare = if host.starts_with('[') {
        host.split_once(']').map_or(host, |(h, _)| &host[..h.len() + 1])
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    if port == 443 {
        format!("https://{bare}{pq}")
    } else {
        format!("https://{bare}:{port}{pq}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_path_and_query_and_swap_the_port() {
        let req = Request::get("/v1/x?a=1").body(()).unwrap();
        assert_eq!(
            https_url(&req, Some("dev.example.com:8080"), 8443),
            "https://dev.example.com:8443/v1/x?a=1"
        );
        assert_eq!(https_url(&req, Some("dev.example.com"), 443), "https://dev.example.com/v1/x?a=1");
    }

    #[test]
    fn reject_names_the_url() {
        let req = Request::get("/p").body(()).unwrap();
        let rsp = decide(PlainHttp::Reject, &req, Some("h:80"), 8443)
            .unwrap()
            .into_response(Some("r"), http::HeaderValue::from_static("id"));
        assert_eq!(rsp.status(), 426);
        assert_eq!(rsp.headers()[UPGRADE], "TLS/1.2, HTTP/1.1");
        assert!(decide(PlainHttp::Serve, &req, Some("h"), 8443).is_none());
        let redirect = decide(PlainHttp::Redirect, &req, Some("h"), 8443)
            .unwrap()
            .into_response(Some("r"), http::HeaderValue::from_static("id"));
        assert_eq!(redirect.status(), 308);
        assert_eq!(redirect.headers()["x-levee-reason"], "tls_redirect");
        assert_eq!(redirect.headers()[LOCATION], "https://h:8443/p");
    }
}
