//! A real Redis Cluster on loopback: three masters and three replicas
//! (`redis-server --cluster-enabled yes`, joined by `redis-cli --cluster
//! create`), every process killed on drop; `kill()` takes a node away.
//!
//! A node's cluster bus listens 10,000 above its port, so both must be free:
//! ports are drawn below the kernel's ephemeral range minus 10,000, where no
//! port-0 bind (other tests' listeners, outgoing connections) can land on
//! either.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

pub struct RedisCluster {
    pub nodes: Vec<SocketAddr>,
    children: Vec<Option<Child>>,
    dir: PathBuf,
}

fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768)
}

/// A port whose bus port (+10,000) is free too, both below the ephemeral range.
fn cluster_port(taken: &[SocketAddr]) -> u16 {
    let top = ephemeral_start().saturating_sub(10_000).clamp(12_000, 45_535);
    for _ in 0..1000 {
        let port = fastrand::u16(10_000..top);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        let near = taken.iter().any(|a| a.port().abs_diff(port) < 2);
        if !near && free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

async fn conn_to(addr: SocketAddr) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://{addr}"))?;
    tokio::time::timeout(Duration::from_secs(1), client.get_multiplexed_async_connection())
        .await
        .unwrap_or_else(|_| Err(redis::RedisError::from(std::io::Error::other("connect timed out"))))
}

impl RedisCluster {
    /// Six nodes joined into a cluster, every slot served, every replica in sync.
    pub async fn spawn() -> RedisCluster {
        let dir = super::temp_dir("redis-cluster");
        let mut cluster = RedisCluster { nodes: Vec::new(), children: Vec::new(), dir };
        for _ in 0..6 {
            cluster.start_node().await;
        }
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(cluster.nodes.iter().map(|a| a.to_string()));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let out = tokio::task::spawn_blocking(move || Command::new("redis-cli").args(&args).output())
            .await
            .unwrap()
            .expect("redis-cli not found: run scripts/test-deps.sh (Debian's redis-server has it)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_healthy(Duration::from_secs(20)).await;
        cluster
    }

    /// Starts one node on a fresh port pair, retrying when the port was taken.
    async fn start_node(&mut self) {
        for _ in 0..10 {
            let port = cluster_port(&self.nodes);
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let conf = self.dir.join(format!("nodes-{port}.conf"));
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(&conf)
                .args(["--cluster-node-timeout", "2000", "--appendonly", "no", "--save", ""])
                .arg("--dir")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server not found: run scripts/test-deps.sh");
            if answers_as(addr, &mut child).await {
                self.nodes.push(addr);
                self.children.push(Some(child));
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start a cluster node");
    }

    /// `redis://` URLs of every node (levee's `store.urls`).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|a| format!("redis://{a}")).collect()
    }

    /// A plain connection to node `i` (no redirections followed).
    pub async fn conn(&self, i: usize) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        conn_to(self.nodes[i]).await
    }

    /// Whether node `i` is running (not killed).
    pub fn alive(&self, i: usize) -> bool {
        self.children[i].is_some()
    }

    /// The live nodes whose `ROLE` is master.
    pub async fn masters(&self) -> Vec<usize> {
        let mut masters = Vec::new();
        for i in (0..self.nodes.len()).filter(|&i| self.alive(i)) {
            if let Ok(mut c) = self.conn(i).await {
                let role: redis::RedisResult<Vec<redis::Value>> =
                    redis::cmd("ROLE").query_async(&mut c).await;
                if matches!(role.as_deref(), Ok([redis::Value::BulkString(r), ..]) if r == b"master") {
                    masters.push(i);
                }
            }
        }
        masters
    }

    /// The live master that serves `key` (the others answer `MOVED`).
    pub async fn owner_of(&self, key: &str) -> Option<usize> {
        for i in self.masters().await {
            let mut c = self.conn(i).await.ok()?;
            let r: redis::RedisResult<i64> = redis::cmd("EXISTS").arg(key).query_async(&mut c).await;
            if r.is_ok() {
                return Some(i);
            }
        }
        None
    }

    /// Sums a `cmdstat_<command>` `calls` count over the live nodes.
    pub async fn command_calls(&self, command: &str) -> u64 {
        let mut total = 0;
        for i in (0..self.nodes.len()).filter(|&i| self.alive(i)) {
            if let Ok(mut c) = self.conn(i).await {
                if let Ok(info) = redis::cmd("INFO").arg("commandstats").query_async::<String>(&mut c).await {
                    total += command_calls(&info, command);
                }
            }
        }
        total
    }

    /// Whether every live node says `cluster_state:ok` and every live replica
    /// is in sync with its master.
    pub async fn healthy(&self) -> bool {
        for i in (0..self.nodes.len()).filter(|&i| self.alive(i)) {
            let Ok(mut c) = self.conn(i).await else { return false };
            let info: redis::RedisResult<String> =
                redis::cmd("CLUSTER").arg("INFO").query_async(&mut c).await;
            if !info.is_ok_and(|s| s.lines().any(|l| l.trim() == "cluster_state:ok")) {
                return false;
            }
            let repl: redis::RedisResult<String> =
                redis::cmd("INFO").arg("replication").query_async(&mut c).await;
            let Ok(repl) = repl else { return false };
            if repl.lines().any(|l| l.trim() == "role:slave")
                && !repl.lines().any(|l| l.trim() == "master_link_status:up")
            {
                return false;
            }
        }
        true
    }

    /// Polls [`Self::healthy`] until `within` has passed.
    pub async fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.healthy().await {
            assert!(Instant::now() < deadline, "the cluster did not become healthy within {within:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `calls` of `cmdstat_<command>` in an `INFO commandstats` reply (0 when absent).
pub fn command_calls(info: &str, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// Whether `child` came up and owns `addr` (its `process_id`).
async fn answers_as(addr: SocketAddr, child: &mut Child) -> bool {
    for _ in 0..200 {
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        if let Ok(mut conn) = conn_to(addr).await {
            if let Ok(info) = redis::cmd("INFO").arg("server").query_async::<String>(&mut conn).await {
                let pid = format!("process_id:{}", child.id());
                return info.lines().any(|l| l.trim() == pid);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
