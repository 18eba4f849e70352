//! The dashboard in a real (headless) browser: levee serves the page, the page
//! reads the admin API, and the rendered DOM names the routes, the shed reason
//! and, unmissably, the route that went silent.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::support::{base_config, poll_until, temp_dir, upstream_and_route, Backend, Client, TestGateway};

/// A client key an attacker chose: it must reach the page as text, never as markup.
const EVIL: &str = "<i>evil</i>";

/// Kill chromium (and everything it started) after this long.
const CHROMIUM_LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_routes_shed_reasons_offenders_and_a_stale_route_alarm() {
    // A browser is heavy on 2 cores: keep timing-sensitive tests away.
    let _one_at_a_time = crate::support::exclusive().await;
    let backend = Backend::start().await;
    let config = base_config()
        + &upstream_and_route("dash-up", &[backend.addr], "dash-device-api", "/v1/device")
            .replace("upstream = \"dash-up\"", "upstream = \"dash-up\"\nclient_key = \"header:x-device-id\"")
        + "[[routes.limits]]\nrate = \"1/m\"\nburst = 1\n"
        + "[routes.storm]\nenabled = false\n"
        + "\n[[routes]]\nname = \"dash-silent-telemetry\"\npath_prefix = \"/v1/telemetry\"\nupstream = \"dash-up\"\n\
           expect_traffic_within = \"1s\"\n"
        + "\n[[routes]]\nname = \"dash-shadow-trial\"\npath_prefix = \"/v1/trial\"\nupstream = \"dash-up\"\n\
           [[routes.limits]]\nrate = \"1/m\"\nmode = \"shadow\"\n";
    let gw = TestGateway::start(&config).await;
    let c = Client::new();

    // Traffic: one pass and two 429 rate_limited for the noisy client.
    for expected in [200, 429, 429] {
        let rsp = c.get_with(gw.http, "/v1/device/x", &[("x-device-id", EVIL)]).await;
        assert_eq!(rsp.status, expected, "{}", rsp.text());
    }
    assert_eq!(c.get_with(gw.http, "/v1/device/x", &[("x-device-id", "quiet-1")]).await.status, 200);
    // A shadow limit: both forwarded, the second would have been shed.
    for _ in 0..2 {
        assert_eq!(c.get(gw.http, "/v1/trial").await.status, 200);
    }

    // The page and its assets: embedded, typed, and nothing fetched from elsewhere.
    for (path, kind) in
        [("/dashboard", "text/html"), ("/dashboard.js", "javascript"), ("/dashboard.css", "text/css")]
    {
        let rsp = c.get(gw.admin, path).await;
        assert_eq!(rsp.status, 200, "{path}");
        let ct = rsp.headers["content-type"].to_str().unwrap();
        assert!(ct.contains(kind), "{path}: content-type {ct}");
        let text = rsp.text();
        let foreign = text.replace("http://www.w3.org/2000/svg", "");
        assert!(
            !foreign.contains("http://") && !foreign.contains("https://"),
            "{path} refers to another site"
        );
        assert!(!text.contains("innerHTML"), "{path}: data goes into the DOM as text only");
    }

    // The silent route goes stale after 1s (checked every second).
    poll_until(Duration::from_secs(20), "dash-silent-telemetry is stale in /api/v1/state", async || {
        let state = c.get(gw.admin, "/api/v1/state").await.json();
        let route = state["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "dash-silent-telemetry")
            .cloned();
        route.is_some_and(|r| r["stale"] == true).then_some(())
    })
    .await;

    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let dom = render(&format!("http://{}/dashboard", gw.admin), &screenshot).await;

    // The state was rendered (not the "waiting" placeholder).
    assert!(!dom.contains("Waiting for data"), "the page never rendered the state:\n{dom}");
    assert!(dom.contains("dash-device-api"), "route name missing:\n{dom}");
    assert!(dom.contains("dash-silent-telemetry"), "stale route name missing:\n{dom}");
    assert!(dom.contains("rate_limited"), "shed reason missing:\n{dom}");
    assert!(dom.contains("would shed total"), "shadow mode's would-shed count missing:\n{dom}");

    // The stale alarm: a banner in the alarms region naming the silent route.
    let alarms = section(&dom, "id=\"alarm-list\"", "</section>");
    assert!(alarms.contains("alarm-stale"), "no stale banner in the alarms region:\n{alarms}");
    assert!(
        alarms.contains("STALE ROUTE dash-silent-telemetry"),
        "the banner does not name the route:\n{alarms}"
    );
    assert!(!alarms.contains("STALE ROUTE dash-device-api"), "a route with traffic flagged stale:\n{alarms}");

    // The top offender, escaped, with a labelled Reset button.
    assert!(!dom.contains(EVIL), "a client key reached the page as markup:\n{dom}");
    assert!(dom.contains("&lt;i&gt;evil&lt;/i&gt;"), "top offender missing:\n{dom}");
    assert!(
        dom.contains("aria-label=\"Reset client &lt;i&gt;evil&lt;/i&gt; on route dash-device-api\""),
        "no Reset button for the offender:\n{dom}"
    );
    assert!(screenshot.exists(), "chromium wrote no screenshot");
    eprintln!("dashboard screenshot: {}", screenshot.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_token_the_dashboard_asks_for_it_and_shows_no_data_without_it() {
    let _one_at_a_time = crate::support::exclusive().await;
    let backend = Backend::start().await;
    let config = base_config().replace("[admin]", "[admin]\ntoken = \"dash-s3cret\"")
        + &upstream_and_route("dash-tok-up", &[backend.addr], "dash-token-route", "/v1/dash").replace(
            "upstream = \"dash-tok-up\"",
            "upstream = \"dash-tok-up\"\nclient_key = \"header:x-device-id\"",
        )
        + "[[routes.limits]]\nrate = \"1/m\"\n";
    let gw = TestGateway::start(&config).await;
    let c = Client::new();
    for expected in [200, 429] {
        let rsp = c.get_with(gw.http, "/v1/dash/x", &[("x-device-id", "dash-secret-device")]).await;
        assert_eq!(rsp.status, expected);
    }
    // The page loads without the token; its data does not.
    assert_eq!(c.get(gw.admin, "/dashboard").await.status, 200);
    assert_eq!(c.get(gw.admin, "/api/v1/state").await.status, 401);

    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-token.png");
    let dom = render(&format!("http://{}/dashboard", gw.admin), &screenshot).await;
    let form = section(&dom, "id=\"auth\"", "</form>");
    assert!(!form.contains("hidden"), "the token form stays hidden:\n{form}");
    assert!(form.contains("type=\"password\""), "no token input:\n{form}");
    assert!(dom.contains("admin token needed"), "the status does not say a token is needed:\n{dom}");
    assert!(!dom.contains("dash-token-route"), "state reached the page without the token:\n{dom}");
    assert!(!dom.contains("dash-secret-device"), "a client key reached the page without the token:\n{dom}");
}

/// `html` from the first `start` to the next `end` after it.
fn section<'a>(html: &'a str, start: &str, end: &str) -> &'a str {
    let from = html.find(start).unwrap_or_else(|| panic!("{start} not in the page:\n{html}"));
    let rest = &html[from..];
    &rest[..rest.find(end).unwrap_or(rest.len())]
}

/// Loads `url` in headless chromium with a fresh profile, lets the page run
/// for 5 s of virtual time, saves a screenshot and returns the rendered DOM.
async fn render(url: &str, screenshot: &Path) -> String {
    let profile = temp_dir("chromium");
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        // Below the page's delay before it opens the event stream (an open
        // stream would hold virtual time still): it polls meanwhile.
        "--virtual-time-budget=5000",
        "--window-size=1400,1000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!("--screenshot={}", screenshot.display()))
    .arg("--dump-dom")
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0)
    .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("chromium is not installed: run scripts/test-deps.sh (it installs Debian's chromium)")
        }
        Err(e) => panic!("cannot start chromium: {e}"),
    };
    let pid = child.id().expect("chromium pid");
    let out = match tokio::time::timeout(CHROMIUM_LIMIT, child.wait_with_output()).await {
        Ok(out) => out.expect("waiting for chromium"),
        Err(_) => {
            // The whole process group: chromium's renderers and zygotes too.
            let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
            let _ = std::fs::remove_dir_all(&profile);
            panic!("chromium did not finish within {CHROMIUM_LIMIT:?}");
        }
    };
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed ({}):\n{}\n{dom}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}
