//! The HTTPS listener (HTTP/1.1 and h2 by ALPN) and the plain-HTTP policy for
//! `tls_only` routes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};

use crate::support::{base_config, temp_dir, upstream_and_route, Backend, Client, TestGateway};

/// A self-signed certificate for `localhost`, written as PEM files.
fn write_cert(dir: &Path) -> CertificateDer<'static> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    cert.cert.der().clone()
}

/// Routes `{name}-secure` (tls_only) and `{name}-open` on upstream `{name}-up`
/// (unique per gateway: metrics are process-wide).
fn tls_config(name: &str, dir: &Path, backend: SocketAddr, plain_http: &str) -> String {
    let upstream = format!("{name}-up");
    base_config()
        + &format!(
            r#"
[server.tls]
listen = "127.0.0.1:0"
cert = "{}"
key = "{}"
plain_http = "{plain_http}"
"#,
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        )
        + &upstream_and_route(&upstream, &[backend], &format!("{name}-secure"), "/secure").replace(
            &format!("upstream = \"{upstream}\""),
            &format!("upstream = \"{upstream}\"\ntls_only = true"),
        )
        + &format!("\n[[routes]]\nname = \"{name}-open\"\npath_prefix = \"/\"\nupstream = \"{upstream}\"\n")
}

/// One HTTPS GET over a fresh connection; returns (status, negotiated ALPN).
async fn https_get(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    alpn: &[&[u8]],
    path: &str,
) -> (u16, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let negotiated = tls.get_ref().1.alpn_protocol().unwrap_or_default().to_vec();
    let req = Request::get(format!("https://localhost:{}{path}", addr.port()))
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let io = TokioIo::new(tls);
    let status = if negotiated == b"h2" {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        let rsp = send.send_request(req).await.unwrap();
        let status = rsp.status().as_u16();
        rsp.into_body().collect().await.unwrap();
        status
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let rsp = send.send_request(req).await.unwrap();
        let status = rsp.status().as_u16();
        rsp.into_body().collect().await.unwrap();
        status
    };
    (status, negotiated)
}

#[tokio::test]
async fn https_serves_http1_and_h2_by_alpn() {
    let dir = temp_dir("tls");
    let ca = write_cert(&dir);
    let backend = Backend::start().await;
    let gw = TestGateway::start(&tls_config("tls-alpn", &dir, backend.addr, "reject")).await;
    let https = gw.https.unwrap();
    assert_eq!(https_get(https, &ca, &[b"h2", b"http/1.1"], "/secure/x").await, (200, b"h2".to_vec()));
    assert_eq!(https_get(https, &ca, &[b"http/1.1"], "/secure/x").await, (200, b"http/1.1".to_vec()));
    assert_eq!(backend.last().unwrap().headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn plain_http_on_a_tls_only_route_follows_the_policy() {
    let dir = temp_dir("tls-policy");
    write_cert(&dir);
    let backend = Backend::start().await;

    let gw = TestGateway::start(&tls_config("tls-reject", &dir, backend.addr, "reject")).await;
    let https_port = gw.https.unwrap().port();
    let rsp = Client::new().get(gw.http, "/secure/data?x=1").await;
    assert_eq!(rsp.status, 426);
    assert_eq!(rsp.reason(), Some("tls_required"));
    assert_eq!(rsp.headers["upgrade"], "TLS/1.2, HTTP/1.1");
    let detail = rsp.json()["detail"].as_str().unwrap().to_string();
    assert!(detail.contains(&format!("https://127.0.0.1:{https_port}/secure/data?x=1")), "{detail}");
    assert_eq!(backend.requests(), 0);
    // Routes without tls_only are served over plain HTTP.
    assert_eq!(Client::new().get(gw.http, "/open").await.status, 200);
    drop(gw);

    let gw = TestGateway::start(&tls_config("tls-redirect", &dir, backend.addr, "redirect")).await;
    let rsp = Client::new().get(gw.http, "/secure/data").await;
    assert_eq!(rsp.status, 308);
    assert_eq!(
        rsp.headers["location"],
        format!("https://127.0.0.1:{}/secure/data", gw.https.unwrap().port())
    );
    drop(gw);

    let gw = TestGateway::start(&tls_config("tls-serve", &dir, backend.addr, "serve")).await;
    assert_eq!(Client::new().get(gw.http, "/secure/data").await.status, 200);
}
