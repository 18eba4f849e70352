//! What the admin API and `/metrics` say about the config: its version, when it
//! was loaded, and how the last reload went. The gateway owns reloading; this
//! module only holds its results and the handle that asks for one, so the admin
//! API never depends on the gateway (the cycle STYLE.md 9.1a designs out).

use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::metrics as m;

#[derive(Debug, Clone, Serialize)]
pub struct LastReload {
    /// `applied` or `rejected`.
    pub result: &'static str,
    /// Unix seconds.
    pub at: f64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigInfo {
    pub hash: String,
    /// Unix seconds.
    pub loaded_at: f64,
    pub last_reload: Option<LastReload>,
}

/// Shared between the gateway (writer) and the admin API (reader).
#[derive(Debug)]
pub struct ConfigStatus {
    info: Mutex<ConfigInfo>,
    admin_token: Mutex<Option<String>>,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl ConfigStatus {
    pub fn new(hash: String, admin_token: Option<String>) -> Self {
        metrics::gauge!(m::CONFIG_LAST_RELOAD_SUCCESS).set(m::unix_now());
        ConfigStatus {
            info: Mutex::new(ConfigInfo { hash, loaded_at: unix(SystemTime::now()), last_reload: None }),
            admin_token: Mutex::new(admin_token),
        }
    }

    pub fn info(&self) -> ConfigInfo {
        self.info.lock().map(|i| i.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn admin_token(&self) -> Option<String> {
        self.admin_token.lock().map(|t| t.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn applied(&self, hash: String, admin_token: Option<String>) {
        let now = SystemTime::now();
        if let Ok(mut info) = self.info.lock() {
            info.hash = hash;
            info.loaded_at = unix(now);
            info.last_reload = Some(LastReload { result: "applied", at: unix(now), error: None });
        }
        if let Ok(mut t) = self.admin_token.lock() {
            *t = admin_token;
        }
        metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "applied").increment(1);
        metrics::gauge!(m::CONFIG_LAST_RELOAD_SUCCESS).set(m::unix_now());
    }

    pub fn rejected(&self, error: String) {
        if let Ok(mut info) = self.info.lock() {
            info.last_reload =
                Some(LastReload { result: "rejected", at: unix(SystemTime::now()), error: Some(error) });
        }
        metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "rejected").increment(1);
    }
}

/// The outcome of one reload: the new config's hash, or why it was rejected.
pub type ReloadResult = Result<String, String>;

/// Asks the gateway to reload its config file; cheap to clone.
#[derive(Debug, Clone)]
pub struct ReloadHandle(mpsc::Sender<oneshot::Sender<ReloadResult>>);

impl ReloadHandle {
    pub fn channel() -> (Self, mpsc::Receiver<oneshot::Sender<ReloadResult>>) {
        // Reloads are serialized; a few queued requests are plenty.
        let (tx, rx) = mpsc::channel(8);
        (ReloadHandle(tx), rx)
    }

    /// Requests a reload and waits for its result.
    pub async fn reload(&self) -> ReloadResult {
        let (tx, rx) = oneshot::channel();
        self.0.send(tx).await.map_err(|_| "the gateway is shutting down".to_string())?;
        rx.await.map_err(|_| "the gateway is shutting down".to_string())?
    }
}
