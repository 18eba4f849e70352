//! levee's own answers are never a sign of life: a route that only redirects
//! goes stale (the 17-hour outage), and its 308 says why.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::{base_config, temp_dir, Backend, Client, TestGateway};

#[tokio::test]
async fn a_route_that_only_redirects_goes_stale_and_the_308_says_tls_redirect() {
    let backend = Backend::start().await;
    let dir = temp_dir("redirect");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let config = base_config()
        + &format!(
            r#"
[server.tls]
listen = "127.0.0.1:0"
cert = "{}"
key = "{}"
plain_http = "redirect"

[upstreams.hostile-redirect]
endpoints = ["{}"]

[[routes]]
name = "hostile-redirect"
path_prefix = "/"
upstream = "hostile-redirect"
tls_only = true
expect_traffic_within = "1s"
"#,
            dir.join("cert.pem").display(),
            dir.join("key.pem").display(),
            backend.addr
        );
    let gw = TestGateway::start(&config).await;
    let c = Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Devices keep sending plain HTTP, and get redirected every time.
        let rsp = c.get(gw.http, "/v1/data").await;
        assert_eq!(rsp.status, 308);
        assert_eq!(rsp.reason(), Some("tls_redirect"));
        assert!(rsp.headers["location"].to_str().unwrap().starts_with("https://"));
        let state = c.get(gw.admin, "/api/v1/state").await.json();
        let route =
            state["routes"].as_array().unwrap().iter().find(|r| r["name"] == "hostile-redirect").cloned();
        if route.is_some_and(|r| r["stale"] == true) {
            break;
        }
        assert!(Instant::now() < deadline, "a route answered only by redirects never went stale");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(backend.requests(), 0);
    let _ = std::fs::remove_dir_all(dir);
}
