//! `[upstreams.NAME.tls]`: how levee speaks TLS to `https://` endpoints,
//! validated once into a ready rustls client config.
//!
//! Trust: the system roots (rustls-native-certs), or only the `ca` bundle
//! when one is given (a private CA should not widen trust to every public
//! one). SNI and the verified name: `server_name`, else the endpoint's host.
//! A client certificate (`cert` + `key`) for upstreams that want mTLS, its
//! key checked against it like the listener's: both read their files through
//! [`cert_and_key`]. Files are read at load, so a reload re-reads them; a
//! changed file changes the upstream's identity (`fingerprint`) and so its
//! connection pool.

use std::hash::{BuildHasher, Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;

use super::raw::RawUpstreamTls;
use super::{Invalid, KeyPath};

/// The TLS side of one upstream, ready to use.
#[derive(Clone)]
pub struct UpstreamTls {
    /// The rustls client config (roots, client certificate), ALPN unset: each
    /// connector sets its own (`http/1.1`, or `h2` for gRPC).
    pub client: Arc<ClientConfig>,
    /// SNI and the name verified, instead of the endpoint's host.
    pub server_name: Option<ServerName<'static>>,
    /// The client certificate chain, for expiry reporting.
    pub client_chain: Vec<CertificateDer<'static>>,
    /// A hash of the settings and of the files' contents.
    fingerprint: u64,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

/// Builds the client side of TLS for an upstream from its `[upstreams.NAME.tls]`
/// (absent: system roots, no client certificate).
pub fn build(raw: Option<&RawUpstreamTls>, base_dir: &Path, p: &KeyPath) -> Result<UpstreamTls, Invalid> {
    let invalid = |key: &str, message: String| Invalid { path: p.key(key), message };
    let mut fingerprint = foldhash::fast::FixedState::with_seed(0).build_hasher();
    let empty = RawUpstreamTls::default();
    let raw = raw.unwrap_or(&empty);
    let read = |file: &str, key: &str| {
        let path = base_dir.join(file);
        std::fs::read(&path)
            .map(|b| (path.clone(), b))
            .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
    };

    let mut roots = rustls::RootCertStore::empty();
    if raw.ca.is_empty() {
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            return Err(invalid("ca", "no system root certificates found; set ca to a PEM bundle".into()));
        }
    } else {
        let (path, pem) = read(&raw.ca, "ca")?;
        pem.hash(&mut fingerprint);
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid("ca", format!("{}: not a PEM certificate bundle: {e}", path.display())))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(invalid("ca", format!("{}: holds no usable CA certificate", path.display())));
        }
    }

    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("ca", format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots);
    let (client, client_chain) = match (raw.cert.is_empty(), raw.key.is_empty()) {
        (true, true) => (builder.with_no_client_auth(), Vec::new()),
        (false, false) => {
            let cert_path = base_dir.join(&raw.cert);
            let (chain, key) = cert_and_key(&cert_path, &base_dir.join(&raw.key), p)?;
            chain.hash(&mut fingerprint);
            key.secret_der().hash(&mut fingerprint);
            let client = builder
                .with_client_auth_cert(chain.clone(), key)
                .map_err(|e| invalid("cert", format!("{}: {e}", cert_path.display())))?;
            (client, chain)
        }
        (true, false) => return Err(invalid("cert", "key is set: cert must be set too".into())),
        (false, true) => return Err(invalid("key", "cert is set: key must be set too".into())),
    };

    let server_name = if raw.server_name.is_empty() {
        None
    } else {
        let name = ServerName::try_from(raw.server_name.clone()).map_err(|_| {
            invalid("server_name", format!("not a DNS name or IP address: {:?}", raw.server_name))
        })?;
        Some(name)
    };
    (&raw.ca, &raw.cert, &raw.key, &raw.server_name).hash(&mut fingerprint);
    Ok(UpstreamTls { client: Arc::new(client), server_name, client_chain, fingerprint: fingerprint.finish() })
}

/// A certificate chain (leaf first) and its private key, from PEM files, the
/// key checked against the leaf: the listener's `cert`/`key` and an
/// upstream's client certificate alike. Errors name `p.cert` or `p.key`.
pub(super) fn cert_and_key(
    cert_path: &Path,
    key_path: &Path,
    p: &KeyPath,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Invalid> {
    let fail = |key: &str, message: String| Invalid { path: p.key(key), message };
    let read = |path: &Path, key: &str| {
        std::fs::read(path).map_err(|e| fail(key, format!("cannot read {}: {e}", path.display())))
    };
    let pem = read(cert_path, "cert")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| fail("cert", format!("{}: not a PEM certificate chain: {e}", cert_path.display())))?;
    if chain.is_empty() {
        return Err(fail("cert", format!("{}: holds no certificate", cert_path.display())));
    }
    let pem = read(key_path, "key")?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|_| fail("key", format!("{}: holds no PEM private key", key_path.display())))?;
    key_matches(&chain, &key, cert_path, key_path, p)?;
    Ok((chain, key))
}

/// The private key must be the leaf certificate's: a key of another
/// certificate would load, then fail every handshake. rustls compares the
/// key's public half with the leaf's SubjectPublicKeyInfo. Used for the
/// listener's certificate and for upstream client certificates alike.
fn key_matches(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
    p: &KeyPath,
) -> Result<(), Invalid> {
    use rustls::sign::CertifiedKey;
    use rustls::{Error, InconsistentKeys};
    let fail = |key: &str, message: String| Err(Invalid { path: p.key(key), message });
    let signing = match rustls::crypto::ring::sign::any_supported_type(key) {
        Ok(k) => k,
        Err(e) => return fail("key", format!("{}: unsupported private key: {e}", key_path.display())),
    };
    let (keys, certs) = (key_path.display(), cert_path.display());
    match CertifiedKey::new(chain.to_vec(), signing).keys_match() {
        Ok(()) => Ok(()),
        Err(Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            fail("key", format!("{keys} does not match the certificate in {certs}"))
        }
        Err(Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            fail("key", format!("{keys}: cannot tell whether this key matches the certificate in {certs}"))
        }
        Err(e) => fail("cert", format!("{certs}: the first certificate (the leaf) is not valid X.509: {e}")),
    }
}
