//! The built binary: `check`, `--version`, SIGHUP reloads, SIGTERM drains.

use std::process::Command;
use std::time::Duration;

use crate::support::process::{Process, LEVEE};
use crate::support::{base_config, poll_until, temp_dir, upstream_and_route, Backend, Behavior, Client};

fn check(toml: &str) -> (bool, String) {
    let path = temp_dir("check").join("levee.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(LEVEE).args(["check", "--config"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn check_accepts_the_shipped_config_and_every_example() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![format!("{root}/config/levee.toml")];
    if let Ok(dir) = std::fs::read_dir(format!("{root}/config/examples")) {
        files.extend(
            dir.filter_map(|e| e.ok())
                .map(|e| e.path().display().to_string())
                .filter(|p| p.ends_with(".toml")),
        );
    }
    for file in files {
        let out = Command::new(LEVEE).args(["check", "--config", &file]).current_dir(root).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{file}: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("routes:") && stdout.contains("upstreams:") && stdout.contains("listeners:"));
    }
}

#[test]
fn check_names_the_key_and_line_of_each_kind_of_mistake() {
    let good = base_config() + &upstream_and_route("b", &["127.0.0.1:1".parse().unwrap()], "api", "/");
    assert!(check(&good).0, "{}", check(&good).1);
    let cases: [(String, &str); 7] = [
        (good.replace("[admin]", "[admin]\nsurprise = 1"), "admin.surprise: unknown field"),
        (
            good.replace("header_read_timeout = \"1s\"", "header_read_timeout = 5"),
            "server.header_read_timeout: invalid type",
        ),
        (
            good.replace("connect_timeout = \"300ms\"", "connect_timeout = \"soon\""),
            "upstreams.b.connect_timeout: expected a duration",
        ),
        (
            good.replace("upstream = \"b\"", "upstream = \"nope\""),
            "routes[0].upstream: no upstream named \"nope\"",
        ),
        (
            good.clone() + "[[routes]]\nname = \"api\"\nupstream = \"b\"\n",
            "routes[1].name: duplicate route name",
        ),
        (
            good.replace("[admin]", "[admin]\ntoken = \"${LEVEE_TEST_SURELY_UNSET}\""),
            "admin.token: environment variable LEVEE_TEST_SURELY_UNSET is not set",
        ),
        (
            good.clone() + "[[routes.limits]]\nrate = \"10 per second\"\n",
            "routes[0].limits[0].rate: expected \"<n>/<s|m|h>\", got \"10 per second\"",
        ),
    ];
    for (toml, expected) in cases {
        let (ok, out) = check(&toml);
        assert!(!ok, "accepted a config with: {expected}");
        assert!(out.contains(expected), "expected {expected:?} in:\n{out}");
        assert!(out.contains("(line "), "no line number in:\n{out}");
    }
}

#[test]
fn version_prints_the_crate_version() {
    let out = Command::new(LEVEE).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rejects_a_broken_config_then_applies_the_fixed_one() {
    let backend = Backend::start().await;
    let good = base_config() + &upstream_and_route("bin-hup-up", &[backend.addr], "bin-hup-api", "/");
    let path = temp_dir("hup").join("levee.toml");
    std::fs::write(&path, &good).unwrap();
    let p = Process::start(&path);
    let c = Client::new();
    assert_eq!(c.get(p.http, "/").await.status, 200);

    std::fs::write(&path, good.replace("upstream = \"bin-hup-up\"", "upstream = \"gone\"")).unwrap();
    p.signal("HUP");
    let last = poll_until(Duration::from_secs(20), "levee reports the SIGHUP reload", async || {
        let config = c.get(p.admin, "/api/v1/config").await.json();
        (!config["last_reload"].is_null()).then_some(config)
    })
    .await;
    assert_eq!(last["last_reload"]["result"], "rejected");
    assert!(last["last_reload"]["error"].as_str().unwrap().contains("routes[0].upstream"));
    assert_eq!(c.get(p.http, "/").await.status, 200, "the running config keeps serving");

    let fixed = good.clone() + &upstream_and_route("bin-hup-up2", &[backend.addr], "bin-hup-extra", "/extra");
    std::fs::write(&path, &fixed).unwrap();
    p.signal("HUP");
    poll_until(Duration::from_secs(20), "levee applies the fixed config", async || {
        let config = c.get(p.admin, "/api/v1/config").await.json();
        (config["last_reload"]["result"] == "applied").then_some(())
    })
    .await;
    assert_eq!(c.get(p.http, "/extra/x").await.status, 200, "the new route serves");
    let metrics = c.get(p.admin, "/metrics").await.text();
    assert!(metrics.contains("levee_config_reloads_total{result=\"rejected\"} 1"), "{metrics}");
    assert!(metrics.contains("levee_config_reloads_total{result=\"applied\"} 1"));
}

/// levee says it serves only once its signal handlers are in place: a SIGHUP
/// sent the moment the line appears is a reload, never the default action,
/// which kills the process. (The handler used to be installed by a spawned
/// task, which a busy machine could run after the line.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_sent_the_moment_levee_says_it_serves_reloads_it_and_does_not_kill_it() {
    let backend = Backend::start().await;
    let good = base_config() + &upstream_and_route("bin-early-up", &[backend.addr], "bin-early-api", "/");
    let path = temp_dir("early-hup").join("levee.toml");
    std::fs::write(&path, &good).unwrap();
    let p = Process::start(&path);
    p.signal("HUP");
    let c = Client::new();
    poll_until(Duration::from_secs(20), "levee reports the SIGHUP reload", async || {
        let config = c.get(p.admin, "/api/v1/config").await.json();
        (config["last_reload"]["result"] == "applied").then_some(())
    })
    .await;
    assert_eq!(c.get(p.http, "/").await.status, 200, "levee is alive and serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_zero() {
    sigterm_drains("term", &[]).await;
}

/// One worker runs on tokio's current-thread runtime (`cli.rs`): the same
/// signals, the same drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_on_a_current_thread_runtime_serves_and_drains_on_sigterm() {
    sigterm_drains("term-one", &[("LEVEE_WORKERS", "1")]).await;
}

async fn sigterm_drains(name: &str, env: &[(&str, &str)]) {
    // The backend answers only when the test says so: the request is in
    // flight for certain when levee gets its SIGTERM, and still when levee
    // has acted on it.
    let backend = Backend::with(Behavior::Held).await;
    let path = temp_dir(name).join("levee.toml");
    // The test upstream's 1 s timeout would race the steps below on a busy
    // machine (the request answered 504 before the backend is released): the
    // request is held as long as the test needs.
    let route =
        upstream_and_route(&format!("bin-{name}-up"), &[backend.addr], &format!("bin-{name}-api"), "/")
            .replace("timeout = \"1s\"", "timeout = \"60s\"");
    assert!(route.contains("timeout = \"60s\""));
    std::fs::write(&path, base_config() + &route).unwrap();
    let mut p = Process::start_with_env(&path, env);
    let http = p.http;
    let in_flight = tokio::spawn(async move { Client::new().get(http, "/slow").await });
    poll_until(Duration::from_secs(20), "the request reaches the backend", async || {
        (backend.requests() == 1).then_some(())
    })
    .await;
    p.signal("TERM");
    // levee stops accepting (it closes its listener) before it drains.
    poll_until(Duration::from_secs(20), "levee closes its listener after SIGTERM", async || {
        tokio::net::TcpStream::connect(http).await.is_err().then_some(())
    })
    .await;
    assert!(!in_flight.is_finished(), "the request finished before the backend answered");
    backend.release();
    let rsp = in_flight.await.unwrap();
    assert_eq!(rsp.status, 200, "the in-flight request was cut off");
    let status =
        tokio::task::block_in_place(|| p.wait_exit(Duration::from_secs(5))).expect("levee did not exit");
    assert!(status.success(), "{status:?}");
}
