//! The fake device backends: small hyper servers on the upstream endpoints of
//! the config, answering 200 JSON, whose behaviour the scenario switches.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What every fake backend answers right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// 200 with a small JSON body.
    Healthy = 0,
    /// 503: the backend is down.
    Failing = 1,
    /// 401 to everyone: the backend lost its credential store.
    Unauthorized = 2,
}

/// The switch shared by all backends, and what they answered.
#[derive(Debug, Default)]
pub struct Switch {
    mode: AtomicU8,
    pub served: AtomicU64,
}

impl Switch {
    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
    }

    pub fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Relaxed) {
            1 => Mode::Failing,
            2 => Mode::Unauthorized,
            _ => Mode::Healthy,
        }
    }
}

/// Running backends; they stop when this is dropped.
pub struct Backends {
    pub addrs: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Backends {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Backends {
    /// Serves on the given bound listeners.
    pub fn start(listeners: Vec<TcpListener>, switch: Arc<Switch>) -> Backends {
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for listener in listeners {
            let Ok(addr) = listener.local_addr() else { continue };
            addrs.push(addr);
            let switch = switch.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else { return };
                    let switch = switch.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| handle(switch.clone(), addr, req));
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            }));
        }
        Backends { addrs, tasks }
    }
}

async fn handle(
    switch: Arc<Switch>,
    addr: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    switch.served.fetch_add(1, Ordering::Relaxed);
    let (status, body) = match switch.mode() {
        Mode::Healthy => {
            (StatusCode::OK, format!(r#"{{"ok":true,"path":"{}","backend":"{addr}"}}"#, req.uri().path()))
        }
        Mode::Failing => (StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"backend down"}"#.to_string()),
        Mode::Unauthorized => (StatusCode::UNAUTHORIZED, r#"{"error":"invalid credentials"}"#.to_string()),
    };
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    Ok(rsp)
}
