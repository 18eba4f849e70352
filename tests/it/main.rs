//! levee's integration tests: one binary (it compiles and links once), real
//! backends, the real gateway, real sockets on loopback.

mod support;

mod binary;
mod bounds;
mod errors;
mod proxy;
mod rate_limit;
mod redis_store;
mod reload;
mod storm;
mod tls;
