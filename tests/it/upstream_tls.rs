//! TLS to the upstream: a real rustls server with a certificate from a test
//! CA (rcgen), verified against `ca`, with and without a client certificate.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

use crate::support::{base_config, temp_dir, Client, TestGateway};

/// A CA that signs certificates, written as `<name>-ca.pem` in `dir`.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), cert.pem()).unwrap();
        Ca { cert, key }
    }

    /// A leaf for `names`, signed by this CA: (chain DER, key DER, PEMs).
    fn leaf(&self, names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>, String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.der().clone(), der, cert.pem(), key.serialize_pem())
    }
}

/// An HTTPS backend answering `200 tls-ok`; with `client_ca`, it requires a
/// client certificate signed by that CA.
async fn https_backend(ca: &Ca, client_ca: Option<&Ca>) -> SocketAddr {
    let (cert, key, _, _) = ca.leaf(&["localhost"]);
    let builder =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(client_ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(client_ca.cert.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(vec![cert], key).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"tls-ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

fn config(name: &str, backend: SocketAddr, tls: &str) -> String {
    base_config()
        + &format!(
            r#"
[upstreams.{name}]
endpoints = ["https://{backend}"]
connect_timeout = "2s"

[upstreams.{name}.tls]
{tls}

[[routes]]
name = "{name}"
path_prefix = "/"
upstream = "{name}"
"#
        )
}

#[tokio::test]
async fn an_https_upstream_is_verified_against_its_ca_and_served() {
    let dir = temp_dir("up-tls");
    let ca = Ca::new(&dir, "good");
    let other = Ca::new(&dir, "other");
    let backend = https_backend(&ca, None).await;

    let trusted = format!("ca = \"{}\"\nserver_name = \"localhost\"", dir.join("good-ca.pem").display());
    let gw = TestGateway::start(&config("uptls-ok", backend, &trusted)).await;
    let rsp = Client::new().get(gw.http, "/x").await;
    assert_eq!(rsp.status, 200, "{:?} {}", rsp.reason(), rsp.text());
    assert_eq!(rsp.text(), "tls-ok");
    drop(gw);

    // Another CA: the upstream cannot be trusted, so it is unreachable.
    let wrong = format!("ca = \"{}\"\nserver_name = \"localhost\"", dir.join("other-ca.pem").display());
    let gw = TestGateway::start(&config("uptls-wrong-ca", backend, &wrong)).await;
    let rsp = Client::new().get(gw.http, "/x").await;
    assert_eq!(rsp.status, 502);
    assert_eq!(rsp.reason(), Some("upstream_unreachable"));
    drop(gw);

    // The right CA, the wrong name.
    let misnamed = format!("ca = \"{}\"\nserver_name = \"api.example\"", dir.join("good-ca.pem").display());
    let gw = TestGateway::start(&config("uptls-wrong-name", backend, &misnamed)).await;
    assert_eq!(Client::new().get(gw.http, "/x").await.reason(), Some("upstream_unreachable"));
    drop(other);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_upstream_that_requires_mtls_gets_levees_client_certificate() {
    let dir = temp_dir("up-mtls");
    let ca = Ca::new(&dir, "mtls");
    let clients = Ca::new(&dir, "clients");
    let backend = https_backend(&ca, Some(&clients)).await;
    let ca_line = format!("ca = \"{}\"\nserver_name = \"localhost\"", dir.join("mtls-ca.pem").display());

    // Without a client certificate the upstream refuses the handshake.
    let gw = TestGateway::start(&config("uptls-no-client-cert", backend, &ca_line)).await;
    let rsp = Client::new().get(gw.http, "/x").await;
    assert_eq!(rsp.status, 502, "{}", rsp.text());
    drop(gw);

    // With one signed by the CA the upstream trusts, it serves.
    let (_, _, cert_pem, key_pem) = clients.leaf(&["levee.test"]);
    std::fs::write(dir.join("client.pem"), cert_pem).unwrap();
    std::fs::write(dir.join("client.key"), key_pem).unwrap();
    let with_cert = format!(
        "{ca_line}\ncert = \"{}\"\nkey = \"{}\"",
        dir.join("client.pem").display(),
        dir.join("client.key").display()
    );
    let gw = TestGateway::start(&config("uptls-client-cert", backend, &with_cert)).await;
    let rsp = Client::new().get(gw.http, "/x").await;
    assert_eq!(rsp.status, 200, "{:?} {}", rsp.reason(), rsp.text());
    // Its expiry is reported like the served chain's.
    let not_after = crate::support::gateway::metric_value(
        &gw.metrics().await,
        "levee_tls_cert_not_after_timestamp_seconds",
        &["listener=\"upstream:uptls-client-cert\""],
    )
    .expect("no expiry gauge for the upstream client certificate");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(not_after > now, "{not_after}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_tls_section_without_https_endpoints_or_a_foreign_client_key_is_a_config_error() {
    let dir = temp_dir("up-tls-config");
    let plain = base_config()
        + "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n[upstreams.u.tls]\nserver_name = \"x\"\n\
           [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"u\"\n";
    std::fs::write(dir.join("a.toml"), plain).unwrap();
    let err = levee::config::load(&dir.join("a.toml")).unwrap_err().to_string();
    assert!(err.contains("upstreams.u.tls"), "{err}");

    let ca = Ca::new(&dir, "cfg");
    let (_, _, cert_pem, _) = ca.leaf(&["a"]);
    let (_, _, _, other_key) = ca.leaf(&["b"]);
    std::fs::write(dir.join("c.pem"), cert_pem).unwrap();
    std::fs::write(dir.join("c.key"), other_key).unwrap();
    let mismatched = base_config()
        + &format!(
            "[upstreams.u]\nendpoints = [\"https://127.0.0.1:1\"]\n[upstreams.u.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"u\"\n",
            dir.join("cfg-ca.pem").display(),
            dir.join("c.pem").display(),
            dir.join("c.key").display()
        );
    std::fs::write(dir.join("b.toml"), mismatched).unwrap();
    let err = levee::config::load(&dir.join("b.toml")).unwrap_err().to_string();
    assert!(err.contains("upstreams.u.tls.key") && err.contains("does not match"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
