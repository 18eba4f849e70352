//! A client that never follows redirects, and helpers to read levee's answers.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[derive(Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    /// `x-levee-reason`, if levee answered itself.
    pub fn reason(&self) -> Option<&str> {
        self.headers.get("x-levee-reason").and_then(|v| v.to_str().ok())
    }

    pub fn retry_after(&self) -> Option<u64> {
        self.headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    /// Keeps an idle connection for half a second at most: the test configs'
    /// `header_read_timeout` is 1 s, after which levee closes an idle HTTP/1.1
    /// connection, and a request sent on it at that very moment would fail at
    /// the transport level (a race of every keep-alive client, not a fault).
    pub fn new() -> Self {
        Client {
            inner: hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .pool_idle_timeout(std::time::Duration::from_millis(500))
                .build_http(),
        }
    }

    /// HTTP/2 with prior knowledge (h2c).
    pub fn h2c() -> Self {
        Client {
            inner: hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> TestResponse {
        let rsp = self.inner.request(req).await.expect("request failed at the transport level");
        let (parts, body) = rsp.into_parts();
        let body = body.collect().await.expect("response body failed").to_bytes();
        TestResponse { status: parts.status, headers: parts.headers, body }
    }

    pub async fn get(&self, addr: SocketAddr, path: &str) -> TestResponse {
        self.send(get(addr, path).body(Full::default()).unwrap()).await
    }

    pub async fn get_with(&self, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> TestResponse {
        let mut b = get(addr, path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Full::default()).unwrap()).await
    }

    /// Any method with extra headers (a `host` given here replaces the one from `addr`).
    pub async fn request_with(
        &self,
        method: http::Method,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> TestResponse {
        let mut b = Request::builder().method(method).uri(format!("http://{addr}{path}"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Full::default()).unwrap()).await
    }

    pub async fn post(&self, addr: SocketAddr, path: &str, body: impl Into<Bytes>) -> TestResponse {
        let req = Request::post(format!("http://{addr}{path}")).body(Full::new(body.into())).unwrap();
        self.send(req).await
    }
}

pub fn get(addr: SocketAddr, path: &str) -> http::request::Builder {
    Request::get(format!("http://{addr}{path}"))
}
