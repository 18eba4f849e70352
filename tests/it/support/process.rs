//! The built `levee` binary as a child process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const LEVEE: &str = env!("CARGO_BIN_EXE_levee");

/// A running `levee run` process, killed on drop.
pub struct Process {
    pub child: Child,
    pub http: SocketAddr,
    pub admin: SocketAddr,
}

impl Process {
    pub fn start(config_path: &std::path::Path) -> Process {
        Process::start_with_env(config_path, &[])
    }

    /// `levee run` with extra environment variables (such as `LEVEE_WORKERS`).
    pub fn start_with_env(config_path: &std::path::Path, env: &[(&str, &str)]) -> Process {
        let mut child = Command::new(LEVEE)
            .args(["run", "--config"])
            .arg(config_path)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        // "levee X serving http on ADDR, admin on ADDR"
        let line = lines.next().unwrap().unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        let http =
            words[words.iter().position(|w| *w == "on").unwrap() + 1].trim_end_matches(',').parse().unwrap();
        let admin = words.last().unwrap().parse().unwrap();
        // Keep draining stderr so the process never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Process { child, http, admin }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args(["-s", sig, &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let step = Duration::from_millis(20);
        for _ in 0..=within.as_millis() / step.as_millis() {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(step);
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}
