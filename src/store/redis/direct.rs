//! The decision's fast lane to Redis: one pipelined connection per master,
//! driven by a small task of its own, and the cluster's slot map to pick it.
//!
//! Why: through the `redis` crate a shared decision cost ~25,000 instructions
//! more than a memory one (callgrind, one levee on a 3+3 cluster): a hop
//! through the cluster connection's task, a second one through the node
//! connection's, a command built and packed twice, two response timers, and
//! the crate's reply parser ([`super::resp`]). Here a decision writes its
//! `EVALSHA` into the master's queue and waits for its reply: one hop.
//!
//! The lane only takes the happy path. Anything else it hands back (`None`)
//! and the caller asks the crate, as before: an error reply (`NOSCRIPT`,
//! which the crate answers by loading the script; `MOVED` after a failover or
//! a reshard; `READONLY`, `OOM`...) or a closed connection. So the
//! store's failure handling (what marks it down, `on_failure`, the probe) is
//! the crate's, unchanged. A lane that saw anything but a decision is marked
//! dead, and the store's prober builds a fresh one (a new slot map, new
//! connections) once the store is up: that is how levee follows a new master.
//!
//! Bounds: each connection has at most [`MAX_IN_FLIGHT`] commands written and
//! unanswered, a queue of as many, and replies of [`super::resp::MAX_REPLY`]
//! bytes at most; every wait is the caller's, under `store.timeout`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::resp::{self, Reply};

/// Commands written and not yet answered on one connection (and the queue
/// before it): small enough that the bytes in flight always fit the socket
/// buffers, so writing never waits on a server that waits on our reading.
pub const MAX_IN_FLIGHT: usize = 256;

/// The name the lane's connections give themselves (`CLIENT SETNAME`).
pub const CLIENT_NAME: &str = "levee-decisions";

/// How long connecting to a node (and its `AUTH`/`SELECT`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The most masters a lane is built for; a larger cluster goes through the crate.
const MAX_NODES: usize = 256;

/// Why a lane could not be built (the caller logs it and goes on through the crate).
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error("{0}: the fast lane speaks plain TCP only")]
    Unsupported(String),
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("the cluster's slot map: {0}")]
    SlotMap(String),
}

/// One command and where its reply goes.
struct Call {
    command: Vec<u8>,
    reply: oneshot::Sender<Reply>,
}

/// The fast lane: a connection per master and which one serves each slot.
pub struct Lane {
    nodes: Vec<mpsc::Sender<Call>>,
    /// Dropped with the lane: ends every connection's driver, even one
    /// waiting on a server that stopped answering.
    _stops: Vec<oneshot::Sender<()>>,
    /// The node of each of the 16,384 slots (`u16::MAX`: none); `None` for a
    /// single server, which takes every key.
    slots: Option<Box<[u16]>>,
    dead: AtomicBool,
}

impl Lane {
    /// A lane to one Redis server (`url`).
    pub async fn single(url: &str) -> Result<Lane, LaneError> {
        let (info, host, port) = plain_tcp(url)?;
        let (node, stop) = connect(&host, port, info.redis_settings(), info.redis_settings().db()).await?;
        Ok(Lane { nodes: vec![node], _stops: vec![stop], slots: None, dead: AtomicBool::new(false) })
    }

    /// A lane to every master of a cluster, from its `CLUSTER SLOTS` reply
    /// (asked through the crate) and the credentials of `url`, the first of
    /// the configured nodes (as the crate uses them).
    pub async fn cluster(url: &str, slot_map: redis::Value) -> Result<Lane, LaneError> {
        let (info, seed_host, _) = plain_tcp(url)?;
        let ranges = parse_slots(slot_map, &seed_host)?;
        let mut masters: Vec<(String, u16)> = Vec::new();
        let mut slots = vec![u16::MAX; 16384].into_boxed_slice();
        for (start, end, master) in ranges {
            let i = match masters.iter().position(|m| *m == master) {
                Some(i) => i,
                None if masters.len() < MAX_NODES => {
                    masters.push(master);
                    masters.len() - 1
                }
                None => return Err(LaneError::SlotMap(format!("more than {MAX_NODES} masters"))),
            };
            for s in start..=end.min(16383) {
                slots[usize::from(s)] = i as u16;
            }
        }
        let (mut nodes, mut stops) = (Vec::with_capacity(masters.len()), Vec::with_capacity(masters.len()));
        for (host, port) in &masters {
            let (node, stop) = connect(host, *port, info.redis_settings(), 0).await?;
            nodes.push(node);
            stops.push(stop);
        }
        Ok(Lane { nodes, _stops: stops, slots: Some(slots), dead: AtomicBool::new(false) })
    }

    /// Whether a request may use the lane (it has not failed).
    pub fn alive(&self) -> bool {
        !self.dead.load(Ordering::Relaxed)
    }

    /// Whether every connection is still open: the prober's check, so that a
    /// lane a server closed while idle is rebuilt before a decision needs it.
    pub fn connected(&self) -> bool {
        self.alive() && self.nodes.iter().all(|n| !n.is_closed())
    }

    /// Marks the lane dead: requests go through the crate until the prober
    /// builds a new one.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Relaxed);
    }

    /// Runs `EVALSHA` for `keys` (one slot) and returns its integers, or
    /// `None` when the caller must ask the crate instead (the lane is then
    /// dead, but for `NOSCRIPT`, which a crate call repairs).
    pub async fn evalsha(&self, sha: &str, keys: &[String], args: &[u64]) -> Option<Vec<i64>> {
        let node = match &self.slots {
            None => self.nodes.first()?,
            Some(slots) => {
                let i = *slots.get(usize::from(resp::key_slot(keys.first()?)))?;
                self.nodes.get(usize::from(i))?
            }
        };
        let mut command = Vec::new();
        resp::evalsha(&mut command, sha, keys, args);
        let (tx, rx) = oneshot::channel();
        // A full queue waits (the caller's `store.timeout` bounds it, and a
        // server that slow is judged by it); a closed one means the connection
        // ended.
        if node.send(Call { command, reply: tx }).await.is_err() {
            self.kill();
            return None;
        }
        match rx.await {
            Ok(Reply::Ints(v)) => Some(v),
            Ok(Reply::Error(e)) if e.starts_with("NOSCRIPT") => None,
            _ => {
                self.kill();
                None
            }
        }
    }
}

/// `url`'s settings, host and port, when it names a plain TCP server (all
/// the lane speaks).
fn plain_tcp(url: &str) -> Result<(redis::ConnectionInfo, String, u16), LaneError> {
    let info = url.into_connection_info().map_err(|e| LaneError::Connect(url.into(), e.to_string()))?;
    let ConnectionAddr::Tcp(host, port) = info.addr() else {
        return Err(LaneError::Unsupported(url.into()));
    };
    let (host, port) = (host.clone(), *port);
    Ok((info, host, port))
}

/// Connects to one node, authenticates, names the connection, selects `db`,
/// and starts its driver: the node's queue, and the driver's stop.
async fn connect(
    host: &str,
    port: u16,
    settings: &RedisConnectionInfo,
    db: i64,
) -> Result<(mpsc::Sender<Call>, oneshot::Sender<()>), LaneError> {
    let name = format!("{host}:{port}");
    let fail = |e: String| LaneError::Connect(name.clone(), e);
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    stream.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
    // Each command of the handshake, and whether its refusal fails the
    // connection: a name is a courtesy an ACL may deny.
    let mut hello = Vec::new();
    let mut must: Vec<bool> = Vec::with_capacity(3);
    if let Some(password) = settings.password() {
        let mut words = vec!["AUTH"];
        words.extend(settings.username());
        words.push(password);
        resp::command(&mut hello, &words);
        must.push(true);
    }
    // Named, so that an operator's `CLIENT LIST` tells levee's decisions apart.
    resp::command(&mut hello, &["CLIENT", "SETNAME", CLIENT_NAME]);
    must.push(false);
    if db != 0 {
        resp::command(&mut hello, &["SELECT", &db.to_string()]);
        must.push(true);
    }
    let handshake = async {
        stream.write_all(&hello).await.map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(256);
        let mut answers = must.iter();
        let mut next = answers.next();
        while let Some(&required) = next {
            match resp::parse(&buf).map_err(|e| e.to_string())? {
                Some((reply, used)) => {
                    if required && reply != Reply::Status {
                        return Err(format!("the handshake was answered {reply:?}"));
                    }
                    buf.advance(used);
                    next = answers.next();
                }
                None => {
                    if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                        return Err("closed during the handshake".into());
                    }
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(fail)?;
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(drive(stream, rx, stopped));
    Ok((tx, stop))
}

/// Writes the queued commands and hands each reply to its caller, in order,
/// until the connection fails, a reply cannot be read, or the lane is gone
/// (`stopped`). Then the callers still waiting get nothing (their channel
/// closes) and go through the crate.
async fn drive(mut stream: TcpStream, mut calls: mpsc::Receiver<Call>, mut stopped: oneshot::Receiver<()>) {
    let mut waiting: VecDeque<oneshot::Sender<Reply>> = VecDeque::with_capacity(MAX_IN_FLIGHT);
    let mut out = Vec::with_capacity(16 * 1024);
    let mut input = BytesMut::with_capacity(16 * 1024);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => return,
            // Read even while nothing is asked: a server that closes an idle
            // connection (its `timeout`, a failover) ends the driver at once,
            // and the next decision goes through the crate without first
            // writing into a dead socket.
            read = stream.read_buf(&mut input) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
                loop {
                    match resp::parse(&input) {
                        Ok(Some((reply, used))) => {
                            input.advance(used);
                            // A reply nobody asked for: the stream is not ours to read.
                            let Some(caller) = waiting.pop_front() else { return };
                            let _ = caller.send(reply);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "Redis fast lane closed");
                            return;
                        }
                    }
                }
            }
            call = calls.recv(), if waiting.len() < MAX_IN_FLIGHT => {
                let Some(call) = call else { return };
                out.clear();
                out.extend_from_slice(&call.command);
                waiting.push_back(call.reply);
                // The first call woke this task, which tokio then runs next
                // (its LIFO slot): without stepping aside once, every write
                // would carry one command, and Redis would read, run and
                // answer them one system call at a time. After the other
                // ready requests have run, their calls go in the same write.
                tokio::task::yield_now().await;
                while waiting.len() < MAX_IN_FLIGHT {
                    let Ok(call) = calls.try_recv() else { break };
                    out.extend_from_slice(&call.command);
                    waiting.push_back(call.reply);
                }
                if stream.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A range of slots and the master (host, port) serving it.
type SlotRange = (u16, u16, (String, u16));

/// `(first slot, last slot, master)` of each range of a `CLUSTER SLOTS`
/// reply. A master announced without an address (`""` or `?`) is reached at
/// `seed_host`, as Redis documents.
fn parse_slots(reply: redis::Value, seed_host: &str) -> Result<Vec<SlotRange>, LaneError> {
    use redis::Value as V;
    let bad = |what: &str| LaneError::SlotMap(what.to_string());
    let V::Array(ranges) = reply else { return Err(bad("not an array")) };
    let int = |v: &V| match v {
        V::Int(i) => u16::try_from(*i).ok(),
        _ => None,
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in &ranges {
        let V::Array(fields) = range else { return Err(bad("a range that is not an array")) };
        let (Some(start), Some(end), Some(V::Array(master))) =
            (fields.first().and_then(int), fields.get(1).and_then(int), fields.get(2))
        else {
            return Err(bad("a range without its bounds and master"));
        };
        let host = match master.first() {
            Some(V::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(V::SimpleString(s)) => s.clone(),
            _ => return Err(bad("a master without a host")),
        };
        let host = if host.is_empty() || host == "?" { seed_host.to_string() } else { host };
        let Some(port) = master.get(1).and_then(int) else { return Err(bad("a master without a port")) };
        out.push((start, end, (host, port)));
    }
    if out.is_empty() {
        return Err(bad("no slot is served"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use redis::Value as V;

    use super::*;

    fn master(host: &str, port: i64) -> V {
        V::Array(vec![V::BulkString(host.as_bytes().to_vec()), V::Int(port), V::BulkString(b"id".to_vec())])
    }

    #[test]
    fn a_slot_map_names_each_ranges_master() {
        let reply = V::Array(vec![
            V::Array(vec![V::Int(0), V::Int(5460), master("10.0.0.1", 7000), master("10.0.0.4", 7003)]),
            V::Array(vec![V::Int(5461), V::Int(16383), master("", 7001)]),
        ]);
        assert_eq!(
            parse_slots(reply, "seed").unwrap(),
            vec![(0, 5460, ("10.0.0.1".into(), 7000)), (5461, 16383, ("seed".into(), 7001))]
        );
        assert!(parse_slots(V::Array(vec![]), "seed").is_err(), "no slot served");
        assert!(parse_slots(V::Int(1), "seed").is_err());
        assert!(parse_slots(V::Array(vec![V::Array(vec![V::Int(0)])]), "seed").is_err());
    }
}
