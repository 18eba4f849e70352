//! `levee demo`: the built binary, a compressed timeline, every defence shown.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::exclusive;
use crate::support::process::LEVEE;

#[tokio::test]
async fn demo_shows_every_defence_and_keeps_the_steady_devices_served() {
    let _machine = exclusive().await;
    let started = Instant::now();
    let child = tokio::process::Command::new(LEVEE)
        .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--duration", "25"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the demo did not finish within 60 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = format!("{stdout}\n--- stderr ---\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "exit {:?}:\n{all}", out.status);
    assert!(started.elapsed() < Duration::from_secs(40), "took {:?}", started.elapsed());

    // The real bound addresses, not the requested port 0.
    let addr_of = |label: &str| -> std::net::SocketAddr {
        let line =
            stdout.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("{all}"));
        let url = line.split_whitespace().nth(1).unwrap();
        url.trim_start_matches("http://").trim_end_matches("/dashboard").parse().unwrap()
    };
    let (http, admin) = (addr_of("gateway"), addr_of("admin"));
    assert!(http.port() != 0 && admin.port() != 0, "{all}");
    assert!(stdout.contains(&format!("dashboard  http://{admin}/dashboard")), "{all}");
    assert!(stdout.lines().filter(|l| l.starts_with('[')).count() >= 20, "no live summary:\n{all}");

    // levee's own /metrics, as the demo printed them at the end.
    let shed = |reason: &str| -> u64 {
        let prefix = format!("levee_shed_total{{route=\"device-api\",reason=\"{reason}\"}} ");
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(shed("callback_bomb") > 0, "{all}");
    assert!(shed("retry_storm") + shed("circuit_open") > 0, "{all}");
    assert!(shed("upstream_auth_anomaly") > 0, "{all}");
    assert!(shed("rate_limited") > 0, "{all}");
    // The 3/s limit in shadow mode (config/levee.toml) reported, never shed.
    assert!(
        stdout.lines().any(|l| l
            .trim()
            .starts_with("levee_shadow_shed_total{route=\"device-api\",reason=\"rate_limited\"}")),
        "{all}"
    );

    let rate: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("steady devices success rate: "))
        .and_then(|r| r.split('%').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no success rate:\n{all}"));
    assert!(rate >= 99.0, "steady devices success rate {rate}%:\n{all}");
}
