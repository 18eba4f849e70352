//! Hostile input: config. A certificate served with someone else's key, and
//! durations too large for `Duration`/`Instant` arithmetic: `levee check`
//! refuses both naming the key, a reload to either is rejected while the
//! running config keeps serving, and nothing panics.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::support::process::LEVEE;
use crate::support::{base_config, temp_dir, upstream_and_route, Backend, Client, TestGateway};

/// A self-signed certificate for `localhost` and its key, as `NAME.crt` and
/// `NAME.key` in `dir`.
fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (crt, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&crt, c.cert.pem()).unwrap();
    std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
    (crt, key, c.cert.der().clone())
}

fn tls_config(crt: &Path, key: &Path, backend: SocketAddr, route: &str) -> String {
    base_config()
        + &format!(
            "\n[server.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
            crt.display(),
            key.display()
        )
        + &upstream_and_route(&format!("{route}-up"), &[backend], route, "/")
}

/// `levee check` on `toml`: (exit code, stdout + stderr).
fn check(toml: &str) -> (Option<i32>, String) {
    let path = temp_dir("hostile-config-check").join("levee.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(LEVEE).args(["check", "--config"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
    (out.status.code(), text)
}

#[test]
fn check_refuses_a_key_that_belongs_to_another_certificate() {
    let dir = temp_dir("hostile-config-keys");
    let (crt, key, _) = write_pair(&dir, "levee");
    let (_, other_key, _) = write_pair(&dir, "other");
    let backend: SocketAddr = "127.0.0.1:9".parse().unwrap();

    let (code, text) = check(&tls_config(&crt, &key, backend, "keys-ok"));
    assert_eq!(code, Some(0), "the matching pair is valid: {text}");

    let (code, text) = check(&tls_config(&crt, &other_key, backend, "keys-bad"));
    assert_eq!(code, Some(1), "{text}");
    let error = text.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{text}"));
    let expected = format!(
        "error: server.tls.key: {} does not match the certificate in {}",
        other_key.display(),
        crt.display()
    );
    assert!(error.starts_with(&expected), "{error}");
    assert!(!text.contains("is valid"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_rejects_extreme_durations_and_sizes_naming_the_key_without_panicking() {
    let backend: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let good = base_config() + &upstream_and_route("extreme-up", &[backend], "extreme", "/");
    assert_eq!(check(&good).0, Some(0), "{}", check(&good).1);
    for (find, replace, key) in [
        (
            "header_read_timeout = \"1s\"",
            "header_read_timeout = \"100000000000y\"",
            "server.header_read_timeout",
        ),
        ("shutdown_grace = \"5s\"", "shutdown_grace = \"18446744073709551615s\"", "server.shutdown_grace"),
        (
            "shutdown_grace = \"5s\"",
            "shutdown_grace = \"5s\"\nbody_read_timeout = \"2h\"",
            "server.body_read_timeout",
        ),
        (
            "shutdown_grace = \"5s\"",
            "shutdown_grace = \"5s\"\nidle_timeout = \"9999h\"",
            "server.idle_timeout",
        ),
        (
            "shutdown_grace = \"5s\"",
            "shutdown_grace = \"5s\"\nbuffer_body_bytes = \"8GiB\"",
            "server.buffer_body_bytes",
        ),
        (
            "shutdown_grace = \"5s\"",
            "shutdown_grace = \"5s\"\nh2_max_concurrent_streams = 4294967295",
            "server.h2_max_concurrent_streams",
        ),
        ("\ntimeout = \"1s\"", "\ntimeout = \"18446744073709551615s\"", "upstreams.extreme-up.timeout"),
        (
            "connect_timeout = \"300ms\"",
            "connect_timeout = \"5000000h\"",
            "upstreams.extreme-up.connect_timeout",
        ),
        (
            "upstream = \"extreme-up\"",
            "upstream = \"extreme-up\"\nexpect_traffic_within = \"100000000000y\"",
            "routes[0].expect_traffic_within",
        ),
        (
            "upstream = \"extreme-up\"",
            "upstream = \"extreme-up\"\n[[routes.limits]]\nrate = \"4294967295/s\"",
            "routes[0].limits[0].rate",
        ),
        (
            "upstream = \"extreme-up\"",
            "upstream = \"extreme-up\"\n[[routes.limits]]\nrate = \"1/h\"\nburst = 4294967295",
            "routes[0].limits[0].burst",
        ),
        (
            "upstream = \"extreme-up\"",
            "upstream = \"extreme-up\"\n[routes.storm]\nquarantine = \"18446744073709551615s\"",
            "routes[0].storm.quarantine",
        ),
    ] {
        assert!(good.contains(find), "{find}");
        let (code, text) = check(&good.replacen(find, replace, 1));
        assert_eq!(code, Some(1), "{key}: {text}");
        assert!(!text.contains("panicked"), "{key}: {text}");
        let error = text.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{text}"));
        assert!(error.starts_with(&format!("error: {key}: ")), "{error}");
        assert!(error.contains("at most") || error.contains("between"), "{error}");
    }
}

/// One HTTPS GET trusting only `ca`; returns the status and the leaf certificate served.
async fn https_get(addr: SocketAddr, ca: &CertificateDer<'static>) -> (u16, CertificateDer<'static>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("https://localhost:{}/", addr.port()))
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let rsp = send.send_request(req).await.unwrap();
    let status = rsp.status().as_u16();
    rsp.into_body().collect().await.unwrap();
    (status, leaf)
}

#[tokio::test]
async fn a_reload_to_a_foreign_key_or_an_extreme_duration_is_rejected_and_the_gateway_keeps_serving() {
    let dir = temp_dir("hostile-config-reload");
    let (crt, key, der) = write_pair(&dir, "levee");
    let (_, other_key, _) = write_pair(&dir, "other");
    let backend = Backend::start().await;
    let good = tls_config(&crt, &key, backend.addr, "reload-keys");
    let gw = TestGateway::start(&good).await;
    let https = gw.https.unwrap();
    assert_eq!(https_get(https, &der).await, (200, der.clone()));

    let foreign = tls_config(&crt, &other_key, backend.addr, "reload-keys");
    let extreme = good.replace("header_read_timeout = \"1s\"", "header_read_timeout = \"100000000000y\"");
    for (bad, says) in [
        (
            foreign,
            format!(
                "server.tls.key: {} does not match the certificate in {}",
                other_key.display(),
                crt.display()
            ),
        ),
        (extreme, "server.header_read_timeout: ".to_string()),
    ] {
        gw.write_config(&bad);
        let rsp = gw.reload().await;
        assert_eq!(rsp.status, 422, "{}", rsp.text());
        assert_eq!(rsp.json()["result"], "rejected");
        let error = rsp.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(error.starts_with(&says), "{error}");

        // The running config serves on: the same certificate over HTTPS, and plain HTTP.
        assert_eq!(https_get(https, &der).await, (200, der.clone()));
        assert_eq!(Client::new().get(gw.http, "/still-here").await.status, 200);
        let config = Client::new().get(gw.admin, "/api/v1/config").await.json();
        assert_eq!(config["last_reload"]["result"], "rejected", "{config}");
    }
    assert!(backend.requests() >= 3);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}
