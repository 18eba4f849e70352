//! `levee demo`: fake device backends, the gateway on the shipped config and a
//! simulated fleet, all in one process, with a live summary on stdout.
//!
//! The backends listen on the config's upstream endpoints; an endpoint whose
//! port is taken is moved to a free loopback port by rewriting it in the
//! config text before parsing. The scenario (`fleet.rs`) switches what the
//! backends answer and staggers the misbehaving devices so every defence shows
//! within the first minute.

pub mod backends;
pub mod fleet;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::config::{self, Config};
use crate::gateway::{Gateway, Listeners};
use backends::{Backends, Switch};
use fleet::{Fleet, Stats, Timeline};

/// The longest `--duration` accepted.
pub const MAX_DURATION_S: u64 = 3600;

/// What `levee demo` was asked.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub config: std::path::PathBuf,
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub duration: Duration,
}

pub fn main(options: DemoOptions) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Loopback instead of an unspecified address: the demo only talks to 127.0.0.1.
fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
    } else {
        addr
    }
}

/// Binds one listener per distinct upstream endpoint (a taken port moves to a
/// free loopback port, rewritten in `text`) and parses the resulting config.
async fn prepare(path: &Path, mut text: String) -> Result<(Config, Vec<TcpListener>), String> {
    let base = path.parent().unwrap_or(Path::new("."));
    let env = |name: &str| std::env::var(name).ok();
    let first = config::parse(&text, base, &env).map_err(|e| e.to_string())?;
    let mut endpoints: Vec<String> =
        first.upstreams.iter().flat_map(|u| u.endpoints.iter().map(|e| e.authority.to_string())).collect();
    endpoints.sort();
    endpoints.dedup();
    let mut listeners = Vec::new();
    for endpoint in endpoints {
        match TcpListener::bind(endpoint.as_str()).await {
            Ok(l) => listeners.push(l),
            Err(e) => {
                let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.map_err(|e| e.to_string())?;
                let moved = l.local_addr().map_err(|e| e.to_string())?.to_string();
                let quoted = format!("\"{endpoint}\"");
                if !text.contains(&quoted) {
                    return Err(format!("cannot listen on upstream endpoint {endpoint} ({e}), and it is not written literally in {} to move it", path.display()));
                }
                println!(
                    "upstream endpoint {endpoint} is taken ({e}); the fake backend serves on {moved} instead"
                );
                text = text.replace(&quoted, &format!("\"{moved}\""));
                listeners.push(l);
            }
        }
    }
    let config = config::parse(&text, base, &env).map_err(|e| e.to_string())?;
    Ok((config, listeners))
}

async fn run(options: DemoOptions) -> Result<(), String> {
    let text = std::fs::read_to_string(&options.config)
        .map_err(|e| format!("cannot read {}: {e}", options.config.display()))?;
    let (mut config, backend_listeners) = prepare(&options.config, text).await?;
    if let Some(a) = options.listen {
        config.server.listen = a;
    }
    if let Some(a) = options.admin {
        config.admin.listen = a;
    }

    let switch = Arc::new(Switch::default());
    let backends = Backends::start(backend_listeners, switch.clone());
    let listeners = Listeners::bind(&config).await.map_err(|e| e.to_string())?;
    let (Some(http), Some(admin)) = (listeners.http_addr(), listeners.admin_addr()) else {
        return Err("the listeners have no local address".into());
    };
    let gateway = Gateway::new(config, None).map_err(|e| e.to_string())?;
    let (stop_gateway, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(gateway.run(listeners, async move {
        let _ = stopped.await;
    }));

    let backend_list: Vec<String> = backends.addrs.iter().map(|a| a.to_string()).collect();
    println!("levee demo {}", env!("CARGO_PKG_VERSION"));
    println!(
        "  gateway    http://{http}  (try: curl -H 'x-device-id: me' http://{}/v1/device/me)",
        reachable(http)
    );
    println!("  admin      http://{admin}");
    println!("  dashboard  http://{}/dashboard", reachable(admin));
    println!("  backends   {}", backend_list.join(", "));
    let timeline = Arc::new(Timeline::new(options.duration));
    print_timeline(&timeline);

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                println!("Ctrl-C: stopping the demo");
                stop.store(true, Ordering::Relaxed);
            }
        });
    }
    // The scenario's switch: what the backends answer, checked ten times a second.
    let switcher = {
        let (timeline, switch) = (timeline.clone(), switch.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                switch.set(timeline.mode(start.elapsed()));
            }
        })
    };
    let fleet = Fleet::new(reachable(http), timeline.clone(), start, stop.clone());
    let printer = {
        let (timeline, stats) = (timeline.clone(), fleet.stats.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                println!("{}", progress_line(&timeline, &stats, start.elapsed()));
            }
        })
    };
    fleet.run().await;
    printer.abort();
    switcher.abort();

    let stats = fleet.stats.clone();
    drop(fleet);
    println!("{}", final_summary(&stats, start.elapsed()));
    match fetch_metrics(reachable(admin)).await {
        Some(text) => {
            println!("levee's own count (GET http://{admin}/metrics, route device-api):");
            for line in text.lines().filter(|l| {
                (l.starts_with(crate::metrics::SHED_TOTAL)
                    || l.starts_with(crate::metrics::SHADOW_SHED_TOTAL))
                    && l.contains("route=\"device-api\"")
            }) {
                println!("  {line}");
            }
        }
        None => println!("(could not read http://{admin}/metrics)"),
    }

    let _ = stop_gateway.send(());
    match tokio::time::timeout(Duration::from_secs(10), server).await {
        Ok(Ok(Ok(()))) | Err(_) => {}
        Ok(Ok(Err(e))) => return Err(e.to_string()),
        Ok(Err(e)) => return Err(format!("the gateway task failed: {e}")),
    }
    drop(backends);
    Ok(())
}

fn print_timeline(t: &Timeline) {
    let span = |(a, b): (Duration, Duration)| format!("{}-{} s", a.as_secs(), b.as_secs());
    let rows = [
        ("0 s".to_string(), format!("{} steady devices, ~1 request/s each", fleet::STEADY_DEVICES), "200"),
        (
            format!("{} s", t.bomb.0.as_secs()),
            "a device with a callback bug doubles its rate every second".to_string(),
            "429 callback_bomb",
        ),
        (span(t.noisy), "a noisy device sends 30/s against its 10/s limit".to_string(), "429 rate_limited"),
        (
            span(t.noisy),
            "  ... and a 3/s limit in shadow mode reports what it would shed".to_string(),
            "200, levee_shadow_shed_total",
        ),
        (
            span(t.failing),
            format!("the backend fails (503); {} impatient devices retry at once", fleet::IMPATIENT_DEVICES),
            "429 retry_storm, 503 circuit_open",
        ),
        (
            span(t.unauthorized),
            "the backend answers 401 to everyone".to_string(),
            "503 upstream_auth_anomaly",
        ),
    ];
    println!("scenario ({} s):", t.total.as_secs());
    for (when, what, answer) in rows {
        println!("  {when:<9} {what:<62} -> {answer}");
    }
    if t.total < t.unauthorized.1 {
        println!(
            "  (the run ends before the last phases: --duration {} or more shows them all)",
            t.unauthorized.1.as_secs() + 1
        );
    }
}

fn counts<K: std::fmt::Display>(map: &std::collections::BTreeMap<K, u64>, sep: &str) -> String {
    if map.is_empty() {
        return "-".into();
    }
    map.iter().map(|(k, v)| format!("{k}{sep}{v}")).collect::<Vec<_>>().join(" ")
}

fn percent(ok: u64, total: u64) -> String {
    if total == 0 {
        "-".into()
    } else {
        format!("{:.2}%", ok as f64 * 100.0 / total as f64)
    }
}

fn progress_line(t: &Timeline, stats: &Stats, elapsed: Duration) -> String {
    let o = Ordering::Relaxed;
    format!(
        "[{:>3}s/{}s] {} | sent {} | status {} | reason {} | steady ok {}",
        elapsed.as_secs(),
        t.total.as_secs(),
        t.phase(elapsed),
        stats.sent.load(o),
        counts(&stats.by_status(), ":"),
        counts(&stats.by_reason(), ":"),
        percent(stats.steady_ok.load(o), stats.steady_total.load(o)),
    )
}

fn final_summary(stats: &Stats, elapsed: Duration) -> String {
    let o = Ordering::Relaxed;
    let mut s = String::new();
    s += &format!("demo finished after {} s\n", elapsed.as_secs());
    s += &format!(
        "requests sent: {} (transport errors {}, not sent over the in-flight bound {})\n",
        stats.sent.load(o),
        stats.errors.load(o),
        stats.skipped.load(o)
    );
    s += &format!("answers by status: {}\n", counts(&stats.by_status(), " "));
    s += &format!("answers by x-levee-reason: {}\n", counts(&stats.by_reason(), " "));
    s += &format!(
        "steady devices success rate: {} ({}/{} outside the injected outages; {} over the whole run)",
        percent(stats.steady_ok.load(o), stats.steady_total.load(o)),
        stats.steady_ok.load(o),
        stats.steady_total.load(o),
        percent(stats.steady_all_ok.load(o), stats.steady_all_total.load(o)),
    );
    s
}

async fn fetch_metrics(admin: SocketAddr) -> Option<String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let uri: http::Uri = format!("http://{admin}/metrics").parse().ok()?;
    let fetch = async {
        let rsp = client.get(uri).await.ok()?;
        let body = rsp.into_body().collect().await.ok()?.to_bytes();
        String::from_utf8(body.to_vec()).ok()
    };
    tokio::time::timeout(Duration::from_secs(5), fetch).await.ok().flatten()
}
