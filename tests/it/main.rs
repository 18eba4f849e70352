//! levee's integration tests: one binary (it compiles and links once), real
//! backends, the real gateway, real sockets on loopback.

mod support;

mod admin_state;
mod admission;
mod binary;
mod bounds;
mod certs;
mod circuit_breaker;
mod client_address;
mod dashboard;
mod demo;
mod ecosystem;
mod errors;
mod grpc;
mod hostile;
mod proxy;
mod rate_limit;
mod redis_cluster;
mod redis_store;
mod reload;
mod retry;
mod shadow;
mod storm;
mod tls;
mod upstream_framing;
mod upstream_tls;
mod websocket;
