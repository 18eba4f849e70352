//! What levee knows about a request besides the request itself. The listener
//! creates a [`RequestContext`] and puts it in the request's extensions; stages
//! read it and add what they learn (the client key) as extensions of their own.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;

use crate::body::BodyFault;

/// The scheme the client spoke to levee with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestContext {
    pub peer: SocketAddr,
    pub scheme: Scheme,
    /// The `x-request-id` kept from the client or generated.
    pub request_id: http::HeaderValue,
    pub route: Arc<str>,
    pub started: Instant,
    /// Why the client's body failed, if it did (`body::ClientBody`).
    pub body_fault: Arc<BodyFault>,
    /// The body is in memory (empty, or read whole before the stack): it can
    /// be hashed by the storm detector and replayed by a retry. A streamed
    /// body is sent once and never waited for inside the stack.
    pub body_buffered: bool,
    /// A WebSocket upgrade levee relays: forwarding keeps its `Upgrade`.
    pub upgrade: bool,
}

/// A new request id: 128 random bits in hex.
pub fn new_request_id() -> http::HeaderValue {
    let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    http::HeaderValue::from_str(&id).unwrap_or(http::HeaderValue::from_static("0"))
}
