//! A real `redis-server` on a loopback port, killed on drop; `kill()` and
//! `restart()` test what levee does when its store goes away and comes back.
//!
//! The port is kept across a restart: it is drawn below the kernel's ephemeral
//! range (`ip_local_port_range`), where nothing that binds port 0 (every other
//! test's listener, every outgoing connection) can land while the server is
//! down, and a restart checks that the server answering is the one it started
//! (its `process_id`), retrying while the port is briefly held.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

pub struct Redis {
    pub addr: SocketAddr,
    child: Option<Child>,
}

/// The first port of the kernel's ephemeral range (32768 when unknown).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768)
}

/// A free port below the ephemeral range, so that no port-0 bind takes it.
fn reserved_port() -> SocketAddr {
    let top = ephemeral_start().max(12_000);
    for _ in 0..1000 {
        let port = fastrand::u16(10_000..top);
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap();
        }
    }
    panic!("no free port below the ephemeral range");
}

impl Redis {
    pub async fn spawn() -> Redis {
        let mut r = Redis { addr: reserved_port(), child: None };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Starts (again) on the same port and waits until it answers as itself.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = Command::new("redis-server")
                .args([
                    "--port",
                    &self.addr.port().to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect(
                    "redis-server not found: run scripts/test-deps.sh (it installs Debian's redis-server)",
                );
            if self.answers_as(&mut child).await {
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(Instant::now() < deadline, "redis-server did not start on {}", self.addr);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether `child` came up and owns the port (not another server on it).
    async fn answers_as(&self, child: &mut Child) -> bool {
        for _ in 0..200 {
            if !matches!(child.try_wait(), Ok(None)) {
                return false; // it exited: the port was taken
            }
            if let Ok(mut conn) = self.conn().await {
                let info: redis::RedisResult<String> =
                    redis::cmd("INFO").arg("server").query_async(&mut conn).await;
                if let Ok(info) = info {
                    let pid = format!("process_id:{}", child.id());
                    return info.lines().any(|l| l.trim() == pid);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// A fresh connection of the test's own.
    pub async fn conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?.get_multiplexed_async_connection().await
    }

    /// SIGKILL: the store vanishes mid-conversation.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The ids and last commands of the decisions' own connections on `redis`
/// (`CLIENT SETNAME levee-decisions`: the store's fast lane).
pub async fn lane_clients(conn: &mut redis::aio::MultiplexedConnection) -> Vec<(u64, String)> {
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(conn).await.unwrap();
    list.lines()
        .filter(|l| l.split(' ').any(|f| f == "name=levee-decisions"))
        .map(|l| {
            let field =
                |k: &str| l.split(' ').find_map(|f| f.strip_prefix(k)).unwrap_or_default().to_string();
            (field("id=").parse().unwrap(), field("cmd="))
        })
        .collect()
}

/// Sends requests of `device` to `http` (each must be answered 200) until a
/// lane connection on `conn`'s server other than `not` has run a decision;
/// its id. At most 10 s.
pub async fn wait_lane_decision(
    http: SocketAddr,
    device: &[(&str, &str)],
    conn: &mut redis::aio::MultiplexedConnection,
    not: Option<u64>,
) -> u64 {
    let c = super::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(c.get_with(http, "/", device).await.status, 200);
        let lanes = lane_clients(conn).await;
        if let Some((id, _)) = lanes.iter().find(|(id, cmd)| cmd == "evalsha" && Some(*id) != not) {
            return *id;
        }
        assert!(Instant::now() < deadline, "no fast lane (other than {not:?}) ran a decision: {lanes:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
