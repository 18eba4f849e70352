//! `GET /dashboard`: the live dashboard, served by levee itself. HTML, CSS and
//! JS are embedded in the binary (no network, no build step); the page reads
//! `/api/v1/state` and the `/api/v1/events` stream, and draws its charts with
//! its own small SVG code.

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::Response;

use crate::body::{self, Body};

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const STYLE: &str = include_str!("dashboard/dashboard.css");

/// The asset at `path`, if it is one of the dashboard's.
pub fn asset(path: &str) -> Option<Response<Body>> {
    let (content, kind) = match path {
        "/dashboard" | "/dashboard/" => (INDEX, "text/html; charset=utf-8"),
        "/dashboard.js" | "/dashboard/dashboard.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/dashboard.css" | "/dashboard/dashboard.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut rsp = Response::new(body::full(content));
    rsp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    rsp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(rsp)
}
