//! Every attack from the hardening issue, as a test against the real gateway
//! and real loopback backends: what a client that wants levee down would send.
//! One file per input (sockets, bodies, paths, config, admin, store).

mod admin;
mod bodies;
mod config;
mod connections;
mod paths;
mod store;
