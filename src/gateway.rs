//! Assembles a running gateway from a validated [`Config`], swaps it on reload,
//! and runs the listeners until shutdown.
//!
//! A reload builds a whole new [`Runtime`] (router, route stacks, upstreams)
//! and swaps it in with one atomic store; requests in flight finish on the
//! runtime they started with. A config that fails validation is never
//! half-applied: the running one keeps serving and the failure is reported in
//! the log, in `GET /api/v1/config` and in `levee_config_reloads_total`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::admin::{Admin, AdminContext};
use crate::config::reload::{ConfigStatus, ReloadHandle, ReloadResult};
use crate::config::{self, Config};
use crate::listener::certs::{self as cert_report, CertInfo};
use crate::listener::{self, tls::CertResolver};
use crate::proxy::Proxy;
pub use crate::runtime::Runtime;
use crate::stack::Registry;
use crate::stats::ShedSamples;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("server.tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// The sockets a gateway serves on, bound before it starts (so tests can bind
/// `127.0.0.1:0` and read the ports).
pub struct Listeners {
    pub http: TcpListener,
    pub https: Option<TcpListener>,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Self, GatewayError> {
        async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, GatewayError> {
            TcpListener::bind(addr).await.map_err(|source| GatewayError::Bind { what, addr, source })
        }
        Ok(Listeners {
            http: bind("server.listen", config.server.listen).await?,
            https: match &config.tls {
                Some(t) => Some(bind("server.tls.listen", t.listen).await?),
                None => None,
            },
            admin: bind("admin.listen", config.admin.listen).await?,
        })
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.local_addr().ok()
    }
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|l| l.local_addr().ok())
    }
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }
}

/// A gateway: the live runtime plus what outlives a reload.
pub struct Gateway {
    runtime: Arc<ArcSwap<Runtime>>,
    registry: Arc<ArcSwap<Registry>>,
    samples: Arc<ShedSamples>,
    config_path: Option<PathBuf>,
    status: Arc<ConfigStatus>,
    metrics: PrometheusHandle,
    certs: Option<Arc<CertResolver>>,
    /// The served chain's certificates, for `/readyz`.
    cert_report: Arc<ArcSwap<Vec<CertInfo>>>,
    ready: Arc<AtomicBool>,
    reload: ReloadHandle,
    reload_rx: mpsc::Receiver<oneshot::Sender<ReloadResult>>,
}

impl Gateway {
    /// Builds a gateway from a validated config. `config_path` is what reloads re-read.
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Result<Self, GatewayError> {
        let metrics = crate::metrics::install();
        let certs = match &config.tls {
            Some(t) => Some(Arc::new(CertResolver::new(t)?)),
            None => None,
        };
        let cert_report = Arc::new(ArcSwap::from_pointee(Vec::new()));
        if let Some(t) = &config.tls {
            cert_report::publish(&cert_report, cert_report::report(&t.chain));
        }
        let status = Arc::new(ConfigStatus::new(config.hash.clone(), config.admin.token.clone()));
        let (reload, reload_rx) = ReloadHandle::channel();
        let store = Store::start(config.store.clone());
        let (runtime, registry) = Runtime::build(config, store, None);
        let samples = registry.samples.clone();
        Ok(Gateway {
            runtime: Arc::new(ArcSwap::from_pointee(runtime)),
            registry: Arc::new(ArcSwap::from_pointee(registry)),
            samples,
            config_path,
            status,
            metrics,
            certs,
            cert_report,
            ready: Arc::new(AtomicBool::new(false)),
            reload,
            reload_rx,
        })
    }

    /// Asks for a reload of the config file (what SIGHUP and the admin API do).
    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload.clone()
    }

    /// Serves on `listeners` until `shutdown` completes, then drains within
    /// `server.shutdown_grace`.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), GatewayError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (grace, max_connections) = {
            let rt = self.runtime.load();
            (rt.config.server.shutdown_grace, rt.config.server.max_connections)
        };
        let https_port = listeners.https_addr().map(|a| a.port());
        let tls = match (&self.certs, listeners.https) {
            (Some(certs), Some(l)) => Some((l, listener::tls::acceptor(certs.clone())?)),
            _ => None,
        };

        let proxy =
            Arc::new(Proxy::new(self.runtime.clone(), https_port, self.samples.clone(), stop_rx.clone()));
        let admin = Arc::new(Admin::new(AdminContext {
            metrics: self.metrics.clone(),
            status: self.status.clone(),
            reload: self.reload.clone(),
            ready: self.ready.clone(),
            registry: self.registry.clone(),
            samples: self.samples.clone(),
            started: crate::metrics::unix_now(),
            certs: self.cert_report.clone(),
            hosts: self.runtime.load().config.admin.hosts.clone(),
        }));

        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(listener::serve(
            "http",
            listeners.http,
            None,
            proxy.clone(),
            max_connections,
            stop_rx.clone(),
            grace,
        ));
        if let Some((l, acceptor)) = tls {
            tasks.spawn(listener::serve(
                "https",
                l,
                Some(acceptor),
                proxy.clone(),
                max_connections,
                stop_rx.clone(),
                grace,
            ));
        }
        // The admin listener keeps its own small bound: it must answer while the proxy is saturated.
        tasks.spawn(listener::serve("admin", listeners.admin, None, admin, 256, stop_rx.clone(), grace));

        let reloader = Reloader {
            runtime: self.runtime.clone(),
            registry: self.registry.clone(),
            config_path: self.config_path.clone(),
            status: self.status.clone(),
            certs: self.certs.clone(),
            cert_report: self.cert_report.clone(),
        };
        let mut reload_rx = self.reload_rx;
        let reload_task = tokio::spawn(async move {
            while let Some(reply) = reload_rx.recv().await {
                let _ = reply.send(reloader.reload());
            }
        });

        let watcher = tokio::spawn(watch_staleness(self.registry.clone()));
        self.ready.store(true, Ordering::Relaxed);
        tracing::info!(config = %self.status.info().hash, "levee is serving");
        shutdown.await;
        self.ready.store(false, Ordering::Relaxed);
        tracing::info!(?grace, "shutting down: no new connections; draining in-flight requests");
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        reload_task.abort();
        watcher.abort();
        tracing::info!("levee stopped");
        Ok(())
    }
}

/// Re-reads, validates and swaps the config.
struct Reloader {
    runtime: Arc<ArcSwap<Runtime>>,
    registry: Arc<ArcSwap<Registry>>,
    config_path: Option<PathBuf>,
    status: Arc<ConfigStatus>,
    certs: Option<Arc<CertResolver>>,
    cert_report: Arc<ArcSwap<Vec<CertInfo>>>,
}

impl Reloader {
    fn reload(&self) -> ReloadResult {
        let result = self.try_reload();
        match &result {
            Ok(hash) => {
                tracing::info!(config = %hash, "config reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload rejected; the running config keeps serving");
                self.status.rejected(e.clone());
            }
        }
        result
    }

    fn try_reload(&self) -> ReloadResult {
        let path = self.config_path.as_ref().ok_or("this gateway was started without a config file")?;
        let config = config::load(path).map_err(|e| e.to_string())?;
        let current = self.runtime.load();
        check_restart_only(&current.config, &config);
        let served = match (&self.certs, &config.tls) {
            (Some(certs), Some(tls)) => {
                certs.update(tls).map_err(|e| format!("server.tls: {e}"))?;
                Some(cert_report::report(&tls.chain))
            }
            _ => None,
        };
        let hash = config.hash.clone();
        let token = config.admin.token.clone();
        // Client state survives a reload unless [store] itself changed.
        let store = if current.store.config == config.store {
            current.store.clone()
        } else {
            tracing::info!("[store] changed: starting a new store (client state starts afresh)");
            Store::start(config.store.clone())
        };
        let (runtime, registry) = Runtime::build(config, store, Some(&self.registry.load()));
        self.runtime.store(Arc::new(runtime));
        self.registry.store(Arc::new(registry));
        self.status.applied(hash.clone(), token);
        if let Some(report) = served {
            cert_report::publish(&self.cert_report, report);
        }
        Ok(hash)
    }
}

/// Warns about settings that a reload cannot change on open sockets.
fn check_restart_only(old: &Config, new: &Config) {
    let restart = |what: &str| tracing::warn!("{what} changed: it applies after a restart");
    if old.server.listen != new.server.listen {
        restart("server.listen");
    }
    if old.admin.listen != new.admin.listen {
        restart("admin.listen");
    }
    if old.admin.hosts != new.admin.hosts {
        restart("admin.hosts");
    }
    if old.server.max_connections != new.server.max_connections {
        restart("server.max_connections");
    }
    if old.tls.as_ref().map(|t| t.listen) != new.tls.as_ref().map(|t| t.listen) {
        restart("server.tls.listen");
    }
}

/// Every second: a route with `expect_traffic_within` that saw no success for
/// that long is stale (metric, `/readyz`, dashboard; one log line per
/// transition), and `levee_route_last_success_timestamp_seconds` is published.
async fn watch_staleness(registry: Arc<ArcSwap<Registry>>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let registry = registry.load();
        let now = crate::metrics::unix_now();
        for (state, config) in registry.routes.iter().zip(&registry.configs) {
            let route = state.name.to_string();
            if let Some(at) = state.stats.last_success() {
                metrics::gauge!(crate::metrics::ROUTE_LAST_SUCCESS, "route" => route.clone()).set(at);
            }
            let Some(within) = config.expect_traffic_within else { continue };
            let silent = state.stats.silent_for(now);
            let stale = silent > within.as_secs_f64();
            // The gauge first: whoever sees the flag flip sees the metric too.
            metrics::gauge!(crate::metrics::ROUTE_STALE, "route" => route.clone()).set(if stale {
                1.0
            } else {
                0.0
            });
            if state.stats.stale.swap(stale, Ordering::Relaxed) != stale {
                if stale {
                    tracing::error!(route = %route, silent_for_s = silent.round(), "route is stale: no successful request within expect_traffic_within");
                } else {
                    tracing::info!(route = %route, "route has traffic again");
                }
            }
        }
    }
}
