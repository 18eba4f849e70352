//! A real HTTP backend on `127.0.0.1:0` whose behaviour the test switches, and
//! which records what it received.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub enum Behavior {
    /// 200 with a small body.
    Ok,
    /// Answers with this status.
    Status(u16),
    /// Never answers.
    Hang,
    /// Answers 200 after this long.
    Delay(Duration),
    /// Answers 200 once the test calls [`Backend::release`] (at once after
    /// it): requests stay in flight exactly as long as the test needs, with no
    /// race between a delay and a loaded machine.
    Held,
}

/// What the backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body_len: usize,
}

struct State {
    behavior: Mutex<Behavior>,
    released: tokio::sync::watch::Sender<bool>,
    requests: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
}

pub struct Backend {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start() -> Backend {
        Backend::with(Behavior::Ok).await
    }

    pub async fn with(behavior: Behavior) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            behavior: Mutex::new(behavior),
            released: tokio::sync::watch::Sender::new(false),
            requests: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), addr, req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, state, task }
    }

    pub fn set(&self, behavior: Behavior) {
        *self.state.behavior.lock().unwrap() = behavior;
    }

    /// Lets every [`Behavior::Held`] request answer, now and from now on.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The last request received.
    pub fn last(&self) -> Option<Seen> {
        self.state.seen.lock().unwrap().last().cloned()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    state: Arc<State>,
    addr: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let behavior = state.behavior.lock().unwrap().clone();
    // Read the whole body (tests bound what they send) so streaming limits trip.
    let body_len = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    {
        let mut seen = state.seen.lock().unwrap();
        if seen.len() >= 1000 {
            seen.remove(0);
        }
        seen.push(Seen { method: parts.method, uri: parts.uri, headers: parts.headers, body_len });
    }
    let status = match behavior {
        Behavior::Ok => StatusCode::OK,
        Behavior::Status(s) => StatusCode::from_u16(s).unwrap(),
        Behavior::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK
        }
        Behavior::Delay(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK
        }
        Behavior::Held => {
            let mut released = state.released.subscribe();
            let _ = released.wait_for(|r| *r).await;
            StatusCode::OK
        }
    };
    let mut rsp = Response::new(Full::new(Bytes::from(format!("hello from {addr}"))));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert("x-backend", addr.to_string().parse().unwrap());
    rsp.headers_mut().insert("x-body-len", body_len.into());
    // A hop-by-hop header the gateway must not relay.
    rsp.headers_mut().insert("keep-alive", "timeout=5".parse().unwrap());
    Ok(rsp)
}
