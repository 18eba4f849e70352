//! levee in-process, from a TOML string, through the library's own
//! `Gateway::run(listeners, shutdown)`; shut down on drop.

use std::net::SocketAddr;
use std::path::PathBuf;

use levee::gateway::{Gateway, Listeners};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{temp_dir, Client, TestResponse};

pub struct TestGateway {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestGateway {
    pub async fn start(toml: &str) -> TestGateway {
        let dir = temp_dir("gw");
        let config_path = dir.join("levee.toml");
        std::fs::write(&config_path, toml).unwrap();
        let config = levee::config::load(&config_path).unwrap_or_else(|e| panic!("test config invalid: {e}"));
        let listeners = Listeners::bind(&config).await.unwrap();
        let (http, https, admin) =
            (listeners.http_addr().unwrap(), listeners.https_addr(), listeners.admin_addr().unwrap());
        let gateway = Gateway::new(config, Some(config_path.clone())).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            gateway
                .run(listeners, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        TestGateway { http, https, admin, config_path, shutdown: Some(tx), task: Some(task) }
    }

    /// Replaces the config file (a reload then reads it).
    pub fn write_config(&self, toml: &str) {
        std::fs::write(&self.config_path, toml).unwrap();
    }

    pub async fn reload(&self) -> TestResponse {
        Client::new().post(self.admin, "/api/v1/reload", "").await
    }

    pub async fn metrics(&self) -> String {
        Client::new().get(self.admin, "/metrics").await.text()
    }

    /// Stops accepting and waits for in-flight requests to drain.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(dir) = self.config_path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The value of a metric line whose name and labels contain all of `parts`.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}
