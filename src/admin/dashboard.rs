//! `GET /dashboard`: the live dashboard, served by levee itself. HTML, CSS and
//! JS are embedded in the binary (no network, no build step); the page reads
//! `/api/v1/state` and the `/api/v1/events` stream, and draws its charts with
//! its own small SVG code.
//!
//! The files load without the admin token (they hold no data); with
//! `admin.token` set the page asks the operator for it, keeps it in
//! `sessionStorage` and sends it as `Authorization: Bearer` on every API call,
//! the event stream included (read with `fetch`, see the admin module's doc).
//! The page may not be framed, and its own policy allows nothing but this
//! listener: the script, the stylesheet and the API.

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use http::Response;

use crate::body::{self, Body};

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const STYLE: &str = include_str!("dashboard/dashboard.css");

/// The page's policy: its own script, stylesheet and API, nothing else, and no
/// framing. Inline `style` attributes stay allowed (bar widths and swatches
/// are set that way); inline scripts do not.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn lookup(path: &str) -> Option<(&'static str, &'static str)> {
    Some(match path {
        "/dashboard" | "/dashboard/" => (INDEX, "text/html; charset=utf-8"),
        "/dashboard.js" | "/dashboard/dashboard.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/dashboard.css" | "/dashboard/dashboard.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return None,
    })
}

/// Whether `path` is one of the dashboard's static files (served without the token).
pub fn is_asset(path: &str) -> bool {
    lookup(path).is_some()
}

/// The asset at `path`, if it is one of the dashboard's.
pub fn asset(path: &str) -> Option<Response<Body>> {
    let (content, kind) = lookup(path)?;
    let mut rsp = Response::new(body::full(content));
    let h = rsp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    Some(rsp)
}
