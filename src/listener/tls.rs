//! The HTTPS listener's TLS: rustls (ring), HTTP/2 and HTTP/1.1 by ALPN.
//!
//! The certificate is served through a resolver that reads the current chain
//! from an `ArcSwap`, so a config reload rotates the certificate without
//! restarting the listener or dropping connections.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::Tls;

/// Serves whichever certificate the last applied config holds.
#[derive(Debug)]
pub struct CertResolver(ArcSwap<CertifiedKey>);

impl CertResolver {
    pub fn new(tls: &Tls) -> Result<Self, rustls::Error> {
        Ok(CertResolver(ArcSwap::from_pointee(certified_key(tls)?)))
    }

    /// Swaps in the certificate of a newly applied config.
    pub fn update(&self, tls: &Tls) -> Result<(), rustls::Error> {
        self.0.store(Arc::new(certified_key(tls)?));
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Pairs the chain with its signing key; fails when the key type is
/// unsupported or the key is not the leaf certificate's (validation already
/// refused such a config; this keeps the listener from ever serving one).
pub fn certified_key(tls: &Tls) -> Result<CertifiedKey, rustls::Error> {
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(tls.chain.clone(), tls.key.clone_key(), &provider)
}

/// The acceptor for the HTTPS listener.
pub fn acceptor(resolver: Arc<CertResolver>) -> Result<TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
