//! What the served certificate chain says about itself: who each certificate
//! names and when it expires.
//!
//! The SPEC's outage: a root in the served chain expired and clients failed
//! their handshakes because no one watched it. So every certificate of the
//! chain, not only the leaf, becomes a gauge
//! (`levee_tls_cert_not_after_timestamp_seconds`), a warning at start and
//! reload, a `degraded` entry of `/readyz` within [`WARN_WITHIN_DAYS`], and a
//! `levee check` failure once expired.
//!
//! [`verify_chain`] is what `levee check` asks about trust: each certificate
//! must be signed by the next one, and the last one must be a trusted root or
//! be signed by one. The path is verified by `webpki` (the verifier rustls
//! itself uses), not by code of ours, so names, signatures, validity periods,
//! basic constraints, key usage and name constraints are checked the way a
//! client checks them; revocation is not, and no server name is matched.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::metrics::TLS_CERT_NOT_AFTER;

/// Certificates expiring within this many days are reported (warning, `/readyz`).
pub const WARN_WITHIN_DAYS: i64 = 14;

const DAY: i64 = 86_400;

/// One certificate of a served chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject's common name, or the whole DN when it has none.
    pub subject: String,
    /// 0 is the leaf, then each issuer in the order the chain file lists them.
    pub position: usize,
    /// notAfter, in Unix seconds.
    pub not_after: i64,
}

impl CertInfo {
    /// Whole days until notAfter, rounded down (negative once expired).
    pub fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(DAY)
    }

    pub fn expired(&self, now: i64) -> bool {
        self.not_after <= now
    }

    /// Expires within [`WARN_WITHIN_DAYS`] (or has expired).
    pub fn expiring(&self, now: i64) -> bool {
        self.not_after - now < WARN_WITHIN_DAYS * DAY
    }

    /// notAfter as RFC 3339 (`2026-01-31T12:00:00Z`).
    pub fn not_after_rfc3339(&self) -> String {
        let t = std::time::UNIX_EPOCH
            .checked_add(std::time::Duration::from_secs(self.not_after.max(0) as u64))
            .unwrap_or(std::time::UNIX_EPOCH);
        humantime::format_rfc3339_seconds(t).to_string()
    }
}

/// Every certificate of `chain` that parses as X.509, leaf first. A certificate
/// that does not parse is left out (`report(chain).len() < chain.len()` says so).
pub fn report(chain: &[CertificateDer]) -> Vec<CertInfo> {
    chain
        .iter()
        .enumerate()
        .filter_map(|(position, der)| {
            let (_, cert) = X509Certificate::from_der(der).ok()?;
            Some(CertInfo {
                subject: short_name(cert.subject()),
                position,
                not_after: cert.validity().not_after.timestamp(),
            })
        })
        .collect()
}

fn short_name(name: &x509_parser::x509::X509Name) -> String {
    name.iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| name.to_string())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Makes `current` the served chain's report: swaps it into `served` (what
/// `/readyz` reads), sets the gauges and warns about expiring certificates.
///
/// The Prometheus recorder cannot delete a series, so a certificate that is no
/// longer served (rotated to another subject) has its gauge set to NaN: no
/// alert compares true on it, and it cannot claim a stale expiry.
pub fn publish(served: &ArcSwap<Vec<CertInfo>>, current: Vec<CertInfo>) {
    let now = unix_now();
    let previous = served.swap(Arc::new(current.clone()));
    for old in previous.iter() {
        if !current.iter().any(|c| c.subject == old.subject && c.position == old.position) {
            gauge(old).set(f64::NAN);
        }
    }
    for cert in &current {
        gauge(cert).set(cert.not_after as f64);
        if cert.expiring(now) {
            tracing::warn!(
                subject = %cert.subject,
                position = cert.position,
                not_after = %cert.not_after_rfc3339(),
                days_left = cert.days_left(now),
                "a served TLS certificate expires within {WARN_WITHIN_DAYS} days"
            );
        }
    }
}

/// Reports the client certificate levee presents to upstream `name`: the
/// same gauge as the served chain's, `listener="upstream:<name>"`, and the
/// same warning when it expires within 14 days. Called when the upstream is
/// built (at start and on each reload that changes it).
pub fn publish_client_chain(name: &str, chain: &[CertificateDer]) {
    let now = unix_now();
    let listener = format!("upstream:{name}");
    for cert in report(chain) {
        metrics::gauge!(
            TLS_CERT_NOT_AFTER,
            "listener" => listener.clone(),
            "subject" => cert.subject.clone(),
            "position" => cert.position.to_string(),
        )
        .set(cert.not_after as f64);
        if cert.expiring(now) {
            tracing::warn!(
                upstream = name,
                subject = %cert.subject,
                not_after = %cert.not_after_rfc3339(),
                days_left = cert.days_left(now),
                "the client certificate for an upstream expires within {WARN_WITHIN_DAYS} days"
            );
        }
    }
}

fn gauge(cert: &CertInfo) -> metrics::Gauge {
    metrics::gauge!(
        TLS_CERT_NOT_AFTER,
        "listener" => "https",
        "subject" => cert.subject.clone(),
        "position" => cert.position.to_string(),
    )
}

/// The roots this machine trusts (`rustls-native-certs`: on Linux the system
/// bundle, or `SSL_CERT_FILE` / `SSL_CERT_DIR` when set).
pub fn system_roots() -> Vec<CertificateDer<'static>> {
    rustls_native_certs::load_native_certs().certs
}

/// Checks that `chain` leads to one of `roots` (see the module doc for what is
/// and is not checked). `Ok` names the root; `Err` says where the chain breaks.
///
/// Two steps, both through webpki:
/// 1. The chain is internally consistent: certificate `i` is signed by
///    certificate `i + 1` all the way up. webpki verifies a path only up to a
///    trust anchor, so the chain's own last certificate serves as the anchor of
///    this step (for each `k`, the leaf must verify through `chain[1..k]` up to
///    `chain[k]`; the first `k` that fails names where the chain breaks).
/// 2. The chain leads to a trusted root: its last certificate is one of
///    `roots`, or the whole chain verifies with `roots` as the anchors.
pub fn verify_chain(chain: &[CertificateDer], roots: &[CertificateDer]) -> Result<String, String> {
    let mut names = Vec::with_capacity(chain.len());
    for (i, der) in chain.iter().enumerate() {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| format!("certificate {i} is not valid X.509: {e}"))?;
        names.push((short_name(cert.subject()), cert.issuer().to_string()));
    }
    let (Some(leaf), Some(last)) = (chain.first(), chain.last()) else {
        return Err("the chain is empty".into());
    };
    let leaf =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("certificate 0 is not valid: {e}"))?;
    let now = UnixTime::now();
    for k in 1..chain.len() {
        let anchor = webpki::anchor_from_trusted_cert(&chain[k])
            .map_err(|e| format!("certificate {k} ({}) is not valid: {e}", names[k].0))?;
        if let Err(e) = verify(&leaf, &[anchor], &chain[1..k], now) {
            let i = k - 1;
            return Err(match e {
                webpki::Error::UnknownIssuer
                | webpki::Error::InvalidSignatureForPublicKey
                | webpki::Error::CaUsedAsEndEntity => format!(
                    "certificate {i} ({}) is not signed by certificate {k} ({}): the chain is out of order or incomplete",
                    names[i].0, names[k].0
                ),
                e => format!("the chain up to certificate {k} ({}) does not verify: {e}", names[k].0),
            });
        }
    }
    let (last_name, last_issuer) = &names[chain.len() - 1];
    if roots.iter().any(|r| r.as_ref() == last.as_ref()) {
        return Ok(last_name.clone());
    }
    // Roots that do not parse as trust anchors are skipped, as rustls skips them.
    let (trusted, anchors): (Vec<_>, Vec<_>) =
        roots.iter().filter_map(|r| Some((r, webpki::anchor_from_trusted_cert(r).ok()?))).unzip();
    match verify(&leaf, &anchors, &chain[1..], now) {
        Ok(i) => Ok(trusted
            .get(i)
            .and_then(|r| X509Certificate::from_der(r).ok())
            .map_or_else(|| "a trusted root".into(), |(_, root)| short_name(root.subject()))),
        Err(webpki::Error::UnknownIssuer) => Err(format!(
            "the chain ends at {last_name} (issued by {last_issuer}), which is not signed by a root this machine trusts"
        )),
        Err(e) => Err(format!("the chain does not verify against the roots this machine trusts: {e}")),
    }
}

/// Verifies `leaf` through `intermediates` up to one of `anchors`, for a TLS
/// server; `Ok` is the index of the anchor reached.
fn verify(
    leaf: &webpki::EndEntityCert,
    anchors: &[TrustAnchor],
    intermediates: &[CertificateDer],
    now: UnixTime,
) -> Result<usize, webpki::Error> {
    let path = leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        anchors,
        intermediates,
        now,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )?;
    let reached = path.anchor();
    Ok(anchors
        .iter()
        .position(|a| {
            a.subject == reached.subject && a.subject_public_key_info == reached.subject_public_key_info
        })
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    fn params(cn: &str, ca: bool) -> CertificateParams {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        p
    }

    #[test]
    fn report_names_each_certificate_with_its_expiry() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = params("Test Root", true);
        ca_params.not_after = rcgen::date_time_ymd(2040, 1, 2);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params = params("leaf.test", false);
        leaf_params.not_after = rcgen::date_time_ymd(2030, 6, 1);
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();

        let chain = [leaf.der().clone(), ca.der().clone()];
        let r = report(&chain);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].subject.as_str(), r[0].position), ("leaf.test", 0));
        assert_eq!((r[1].subject.as_str(), r[1].position), ("Test Root", 1));
        assert_eq!(r[0].not_after, 1_906_502_400); // 2030-06-01T00:00:00Z
        assert_eq!(r[0].not_after_rfc3339(), "2030-06-01T00:00:00Z");

        assert_eq!(r[0].days_left(r[0].not_after - 5 * DAY - 1), 5);
        assert_eq!(r[0].days_left(r[0].not_after + 1), -1);
        assert!(r[0].expiring(r[0].not_after - 13 * DAY));
        assert!(!r[0].expiring(r[0].not_after - 14 * DAY));
        assert!(r[0].expired(r[0].not_after));

        assert_eq!(verify_chain(&chain, &[ca.der().clone()]), Ok("Test Root".to_string()));
        assert_eq!(verify_chain(&chain[..1], &[ca.der().clone()]), Ok("Test Root".to_string()));
        assert!(verify_chain(&chain, &[]).is_err());
        // Out of order: the root first.
        assert!(verify_chain(&[ca.der().clone(), leaf.der().clone()], &[ca.der().clone()]).is_err());
    }

    #[test]
    fn chains_are_verified_through_webpki_and_say_where_they_break() {
        let root_key = KeyPair::generate().unwrap();
        let root = params("Test Root", true).self_signed(&root_key).unwrap();
        let inter_key = KeyPair::generate().unwrap();
        let inter = params("Test Intermediate", true).signed_by(&inter_key, &root, &root_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = params("leaf.test", false).signed_by(&leaf_key, &inter, &inter_key).unwrap();
        let (leaf, inter, root) = (leaf.der().clone(), inter.der().clone(), root.der().clone());
        let roots = [root.clone()];

        assert_eq!(verify_chain(&[leaf.clone(), inter.clone()], &roots), Ok("Test Root".to_string()));
        assert_eq!(
            verify_chain(&[leaf.clone(), inter.clone(), root.clone()], &roots),
            Ok("Test Root".to_string())
        );
        // The intermediate left out: the leaf is not signed by the next certificate.
        let err = verify_chain(&[leaf.clone(), root.clone()], &roots).unwrap_err();
        assert!(
            err.starts_with("certificate 0 (leaf.test) is not signed by certificate 1 (Test Root)"),
            "{err}"
        );
        // The intermediate and the root swapped.
        let err = verify_chain(&[leaf.clone(), root.clone(), inter.clone()], &roots).unwrap_err();
        assert!(err.starts_with("certificate 0 (leaf.test) is not signed by certificate 1"), "{err}");
        // Internally consistent, but no trusted root above it.
        let err = verify_chain(&[leaf.clone(), inter.clone()], &[]).unwrap_err();
        assert!(
            err.contains("Test Intermediate") && err.contains("not signed by a root this machine trusts"),
            "{err}"
        );
        assert!(verify_chain(&[], &roots).is_err());
    }
}
