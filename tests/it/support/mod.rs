#![allow(dead_code)] // helpers shared by test files; not every file uses each one
//! Real things on loopback: HTTP backends, the gateway in-process or as the
//! built binary, `redis-server`, and a client that never follows redirects.

pub mod backend;
pub mod client;
pub mod gateway;
pub mod process;
pub mod redis;
pub mod redis_cluster;

pub use backend::{Backend, Behavior};
pub use client::{Client, TestResponse};
pub use gateway::TestGateway;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use tokio::time::Instant;

/// Held by tests that load the machine (thousands of requests, timing
/// assertions), so two of them never run at once on a 2-core machine.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Runs `probe` every 20 ms until it returns `Some`, and returns that; fails
/// the test naming `what` when `within` has passed. Tests wait for the state
/// they assert (a background tick, a request in flight) with this instead of
/// sleeping and hoping: on a loaded machine a sleep is sometimes too short.
pub async fn poll_until<T>(within: Duration, what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let step = Duration::from_millis(20);
    let deadline = Instant::now() + within;
    // Each round sleeps `step`, so the count bound is never the first to trip.
    for _ in 0..=within.as_millis() / step.as_millis() + 1 {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(step).await;
    }
    panic!("not within {within:?}: {what}");
}

/// A fresh directory for one test, inside the run's own directory
/// (`levee-it-<pid>` in the system temp dir). A run's tests may read their
/// files to its end, so the run leaves its directory; the next run's first
/// test removes those of runs whose process is gone.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    static RUN: LazyLock<PathBuf> = LazyLock::new(|| {
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name();
            // `levee-it-<pid>`, and `levee-it-<pid>-<n>-<name>` of older runs.
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix("levee-it-")?.split('-').next()?.parse::<u32>().ok());
            if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        tmp.join(format!("levee-it-{}", std::process::id()))
    });
    let dir = RUN.join(format!("{}-{name}", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An address on which nothing listens: a socket bound to it and never
/// listening, kept (leaked) for the rest of the run, so that no other test's
/// listener can take the port while a test still connects to it (a released
/// port could be handed out again, and a refused connect become a 200).
pub fn closed_port() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    std::mem::forget(socket);
    addr
}

/// A port free right now, for a server started by the test (redis-server).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The `[server]` and `[admin]` sections every test config starts with:
/// loopback, port 0, short timeouts so failure tests stay fast.
pub fn base_config() -> String {
    r#"
[server]
listen = "127.0.0.1:0"
header_read_timeout = "1s"
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:0"
"#
    .to_string()
}

/// One upstream named `name` with the given endpoints and a route `route` on `prefix`.
pub fn upstream_and_route(name: &str, endpoints: &[SocketAddr], route: &str, prefix: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"
[upstreams.{name}]
endpoints = [{}]
connect_timeout = "300ms"
timeout = "1s"

[[routes]]
name = "{route}"
path_prefix = "{prefix}"
upstream = "{name}"
"#,
        eps.join(", ")
    )
}
