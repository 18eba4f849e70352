//! gRPC callers behind levee: a real tonic client and server (the standard
//! health service), over h2c end to end.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::Response;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::support::{base_config, TestGateway};

/// A tonic health server on a free loopback port.
async fn health_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, service) = tonic_health::server::health_reporter();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
    addr
}

/// An h2c server whose every answer is gRPC's trailers-only `UNAVAILABLE`.
async fn unavailable_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    let rsp = Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "14")
                        .header("grpc-message", "down")
                        .body(Empty::<bytes::Bytes>::new())
                        .unwrap();
                    Ok::<_, Infallible>(rsp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn client(addr: SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    HealthClient::new(channel)
}

fn config(name: &str, backend: SocketAddr, extra_route: &str, extra_upstream: &str) -> String {
    base_config()
        + &format!(
            r#"
[upstreams.{name}]
endpoints = ["{backend}"]
{extra_upstream}

[[routes]]
name = "{name}"
path_prefix = "/"
upstream = "{name}"
client_key = "ip"
{extra_route}
[routes.storm]
enabled = false
"#
        )
}

#[tokio::test]
async fn a_limited_grpc_caller_gets_resource_exhausted_with_pushback() {
    let backend = health_server().await;
    let gw =
        TestGateway::start(&config("grpc-limited", backend, "[[routes.limits]]\nrate = \"2/m\"", "")).await;
    let mut client = client(gw.http).await;
    for _ in 0..2 {
        let rsp = client.check(HealthCheckRequest { service: String::new() }).await.unwrap();
        assert_eq!(rsp.into_inner().status, ServingStatus::Serving as i32, "relayed through levee");
    }
    let refused = client.check(HealthCheckRequest { service: String::new() }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert_eq!(refused.message(), "rate_limited");
    let md = refused.metadata();
    assert_eq!(md.get("x-levee-reason").unwrap(), "rate_limited");
    let pushback: u64 = md.get("grpc-retry-pushback-ms").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1000..=30_000).contains(&pushback), "pushback {pushback} ms for a 2/m limit");
}

#[tokio::test]
async fn grpc_unavailable_from_the_upstream_opens_the_circuit_like_a_503() {
    let backend = unavailable_server().await;
    let breaker =
        "[upstreams.grpc-down.circuit_breaker]\nmin_requests = 5\nfailure_rate = 0.5\nopen_for = \"30s\"";
    let gw = TestGateway::start(&config("grpc-down", backend, "", breaker)).await;
    let mut client = client(gw.http).await;
    for i in 0..5 {
        let relayed = client.check(HealthCheckRequest { service: String::new() }).await.unwrap_err();
        assert_eq!(relayed.code(), tonic::Code::Unavailable, "try {i}");
        assert_eq!(relayed.message(), "down", "the upstream's own answer, relayed untouched");
    }
    let refused = client.check(HealthCheckRequest { service: String::new() }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(refused.metadata().get("x-levee-reason").unwrap(), "circuit_open");
    assert!(refused.metadata().get("grpc-retry-pushback-ms").is_some());
}
