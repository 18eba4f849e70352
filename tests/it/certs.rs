//! Certificate expiry: every certificate of the served chain is a gauge, a
//! `/readyz` degraded entry within 14 days, and a `levee check` failure once
//! expired.

use std::path::Path;
use std::process::Command;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use time::{Duration, OffsetDateTime};

use crate::support::gateway::metric_value;
use crate::support::process::LEVEE;
use crate::support::{base_config, temp_dir, upstream_and_route, Backend, Client, TestGateway};

const NOT_AFTER: &str = "levee_tls_cert_not_after_timestamp_seconds";
const DAY: f64 = 86_400.0;

/// Writes a self-signed certificate named `cn` expiring at `not_after` as
/// `cert.pem`/`key.pem` in `dir`.
fn write_cert(dir: &Path, cn: &str, not_after: OffsetDateTime) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.not_before = OffsetDateTime::now_utc() - Duration::days(30);
    params.not_after = not_after;
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

fn tls_config(dir: &Path, backend: std::net::SocketAddr) -> String {
    base_config()
        + &format!(
            "\n[server.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        )
        + &upstream_and_route("certs-up", &[backend], "certs-all", "/")
}

fn certificate_entries(readyz: &serde_json::Value, subject: &str) -> Vec<serde_json::Value> {
    readyz["degraded"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["part"] == "certificate" && d["subject"] == subject)
        .cloned()
        .collect()
}

#[tokio::test]
async fn served_certificate_expiry_is_a_metric_and_a_readyz_degradation() {
    let dir = temp_dir("certs-gw");
    let soon = OffsetDateTime::now_utc() + Duration::days(5);
    write_cert(&dir, "expires-soon.test", soon);
    let backend = Backend::start().await;
    let gw = TestGateway::start(&tls_config(&dir, backend.addr)).await;

    let labels = ["listener=\"https\"", "subject=\"expires-soon.test\"", "position=\"0\""];
    let value = metric_value(&gw.metrics().await, NOT_AFTER, &labels).expect("the gauge is exported");
    assert!((value - soon.unix_timestamp() as f64).abs() <= DAY, "{value} vs {soon}");

    let rsp = Client::new().get(gw.admin, "/readyz").await;
    assert_eq!(rsp.status, 200, "an expiring certificate degrades, it does not unready");
    let entries = certificate_entries(&rsp.json(), "expires-soon.test");
    assert_eq!(entries.len(), 1, "{}", rsp.text());
    assert_eq!(entries[0]["position"], 0);
    let days = entries[0]["days_left"].as_i64().unwrap();
    assert!((4..=5).contains(&days), "days_left {days}");

    // A reload that applies a renewed certificate updates both.
    let renewed = OffsetDateTime::now_utc() + Duration::days(90);
    write_cert(&dir, "expires-soon.test", renewed);
    assert_eq!(gw.reload().await.status, 200);
    let value = metric_value(&gw.metrics().await, NOT_AFTER, &labels).unwrap();
    assert!((value - renewed.unix_timestamp() as f64).abs() <= DAY, "{value} vs {renewed}");
    let rsp = Client::new().get(gw.admin, "/readyz").await;
    assert!(certificate_entries(&rsp.json(), "expires-soon.test").is_empty(), "{}", rsp.text());
}

fn check(dir: &Path) -> (Option<i32>, String) {
    let path = dir.join("levee.toml");
    std::fs::write(&path, tls_config(dir, "127.0.0.1:9".parse().unwrap())).unwrap();
    let out = Command::new(LEVEE).args(["check", "--config"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn check_fails_on_an_expired_certificate_and_warns_on_one_expiring_soon() {
    let dir = temp_dir("certs-expired");
    let expired = OffsetDateTime::now_utc() - Duration::days(2);
    write_cert(&dir, "expired.test", expired);
    let (code, text) = check(&dir);
    assert_eq!(code, Some(1), "{text}");
    let error = text.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{text}"));
    assert!(error.contains("server.tls.cert"), "{error}");
    assert!(error.contains("expired.test"), "{error}");
    assert!(error.contains(&expired.date().to_string()), "{error}");

    let dir = temp_dir("certs-soon");
    let soon = OffsetDateTime::now_utc() + Duration::days(5);
    write_cert(&dir, "soon.test", soon);
    let (code, text) = check(&dir);
    assert_eq!(code, Some(0), "{text}");
    let warning = text
        .lines()
        .find(|l| l.starts_with("warning:") && l.contains("soon.test"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(warning.contains("server.tls.cert") && warning.contains(&soon.date().to_string()), "{warning}");
    // The summary lists the certificate with its notAfter; a self-signed
    // certificate is not trusted by the machine, which is a warning only.
    assert!(text.contains(&format!("[0] soon.test  notAfter {}", soon.date())), "{text}");
    assert!(text.contains("not signed by a root this machine trusts"), "{text}");
}
