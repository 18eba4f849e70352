//! `levee run | check | demo | --version`: the command line of the contract.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, Tls};
use crate::gateway::{Gateway, Listeners};
use crate::listener::certs;

const DEFAULT_CONFIG: &str = "config/levee.toml";

#[derive(Debug, Parser)]
#[command(name = "levee", version, about = "A rate-limiting resilience gateway")]
pub struct Cli {
    /// The config file (for the default `run`).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Validate the config, print a summary of listeners, routes and upstreams; exit 0 or 1.
    Check,
    /// A self-contained demonstration: fake backends, the gateway and a misbehaving fleet.
    Demo {
        /// Overrides `server.listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Overrides `admin.listen`.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// How long the fleet runs, in seconds (under 60: a compressed timeline).
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=crate::demo::MAX_DURATION_S))]
        duration: u64,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(&path),
        Command::Run => run(&path),
        Command::Demo { listen, admin, duration } => {
            let _log = init_logging("warn");
            let duration = std::time::Duration::from_secs(duration);
            crate::demo::main(crate::demo::DemoOptions { config: path, listen, admin, duration })
        }
    }
}

fn check(path: &Path) -> ExitCode {
    let report = check_report(path);
    print!("{}", report.out);
    eprint!("{}", report.err);
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What `levee check` prints, and whether the config is valid.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub ok: bool,
    /// The summary (standard output).
    pub out: String,
    /// Errors and warnings (standard error).
    pub err: String,
}

/// `levee check` without the printing: load and validate the config, summarise
/// it, and check the served chain. The binary prints this report; tests (the
/// config property test among them) call it directly.
pub fn check_report(path: &Path) -> CheckReport {
    use std::fmt::Write;
    let mut r = CheckReport::default();
    match config::load(path) {
        Ok(config) => {
            r.out = summary(path, &config);
            if let Some(tls) = &config.tls {
                if !check_chain(tls, &mut r) {
                    let _ = writeln!(r.err, "{} is not valid", path.display());
                    return r;
                }
            }
            if !check_client_certificates(&config, &mut r) {
                let _ = writeln!(r.err, "{} is not valid", path.display());
                return r;
            }
            let _ = writeln!(r.out, "ok: {} is valid", path.display());
            r.ok = true;
        }
        Err(e) => {
            let _ = writeln!(r.err, "error: {e}");
            let _ = writeln!(r.err, "{} is not valid", path.display());
        }
    }
    r
}

/// The served chain: fails when a certificate has expired; warns when one
/// expires within 14 days, and when the chain does not lead to a root this
/// machine trusts (each certificate signed by the next, the last one a trusted
/// root or signed by one; see [`certs::verify_chain`]). That the key matches
/// the leaf is part of validation, so `check` and a reload refuse it alike.
fn check_chain(tls: &Tls, r: &mut CheckReport) -> bool {
    use std::fmt::Write;
    let now = certs::unix_now();
    let report = certs::report(&tls.chain);
    let mut ok = true;
    for i in (0..tls.chain.len()).filter(|i| !report.iter().any(|c| c.position == *i)) {
        let _ = writeln!(
            r.err,
            "warning: server.tls.cert: certificate {i} of {} does not parse as X.509",
            tls.cert_path.display()
        );
    }
    let of = format!(" of {}", tls.cert_path.display());
    for c in &report {
        ok &= report_expiry("server.tls.cert", &of, c, now, r);
    }
    match certs::verify_chain(&tls.chain, &certs::system_roots()) {
        Ok(root) => {
            let _ = writeln!(r.out, "  chain leads to the trusted root {root}");
        }
        Err(e) => {
            let _ = writeln!(r.err, "warning: server.tls.cert: {e}");
        }
    }
    ok
}

/// The client certificates levee presents to `https://` upstreams: fails when
/// one has expired, warns within 14 days, like the served chain.
fn check_client_certificates(config: &Config, r: &mut CheckReport) -> bool {
    let now = certs::unix_now();
    let mut ok = true;
    for u in &config.upstreams {
        let Some(tls) = &u.tls else { continue };
        let key = format!("upstreams.{}.tls.cert", u.name);
        for c in certs::report(&tls.client_chain) {
            ok &= report_expiry(&key, "", &c, now, r);
        }
    }
    ok
}

/// An error for a certificate of `key` that has expired (false), a warning
/// for one that expires within 14 days; `of` names its file, if worth saying.
fn report_expiry(key: &str, of: &str, c: &certs::CertInfo, now: i64, r: &mut CheckReport) -> bool {
    use std::fmt::Write;
    let what = format!("{key}: certificate {} ({}){of}", c.position, c.subject);
    if c.expired(now) {
        let _ = writeln!(r.err, "error: {what} expired on {}", c.not_after_rfc3339());
        return false;
    }
    if c.expiring(now) {
        let _ = writeln!(
            r.err,
            "warning: {what} expires on {}, in {} days",
            c.not_after_rfc3339(),
            c.days_left(now)
        );
    }
    true
}

/// The human summary `levee check` prints.
pub fn summary(path: &Path, c: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "config {} (version {})", path.display(), c.hash);
    let _ = writeln!(s, "listeners:");
    let _ = writeln!(s, "  http   {}  (HTTP/1.1, h2c)", c.server.listen);
    if let Some(t) = &c.tls {
        let _ = writeln!(
            s,
            "  https  {}  (HTTP/1.1, h2; {} certificate(s); plain_http = {:?})",
            t.listen,
            t.chain.len(),
            t.plain_http
        );
        let now = certs::unix_now();
        for c in certs::report(&t.chain) {
            let _ = writeln!(
                s,
                "    [{}] {}  notAfter {} ({} days left)",
                c.position,
                c.subject,
                c.not_after_rfc3339(),
                c.days_left(now)
            );
        }
    }
    let _ = writeln!(
        s,
        "  admin  {}  ({})",
        c.admin.listen,
        if c.admin.token.is_some() { "token" } else { "loopback-only mutations" }
    );
    let _ = writeln!(
        s,
        "store: {:?}, max_clients {}, on_failure {:?}",
        c.store.kind, c.store.max_clients, c.store.on_failure
    );
    let _ = writeln!(s, "upstreams:");
    for u in &c.upstreams {
        let eps: Vec<String> = u.endpoints.iter().map(|e| e.authority.to_string()).collect();
        let _ = writeln!(
            s,
            "  {:<16} {:?} [{}] timeout {:?}, max_concurrency {}",
            u.name,
            u.balance,
            eps.join(", "),
            u.timeout,
            u.max_concurrency
        );
    }
    let _ = writeln!(s, "routes:");
    for r in &c.routes {
        let limits: Vec<String> = r.limits.iter().map(|l| format!("{} burst {}", l.rate, l.burst)).collect();
        let _ = writeln!(
            s,
            "  {:<16} {}{} -> {}  key {}  priority {:?}{}{}",
            r.name,
            r.host.as_deref().unwrap_or("*"),
            r.path_prefix,
            c.upstreams[r.upstream].name,
            r.client_key,
            r.priority,
            if limits.is_empty() { String::new() } else { format!("  limits [{}]", limits.join(", ")) },
            if r.tls_only { "  tls_only" } else { "" },
        );
    }
    s
}

fn run(path: &Path) -> ExitCode {
    let _log = init_logging("info");
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!(
                "levee did not start: fix {} (`levee check --config {}` validates it)",
                path.display(),
                path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    // LEVEE_WORKERS pins the number of worker threads (the load benchmark gives
    // levee and nginx the same CPU allotment); default: one per core. One
    // worker runs on a current-thread runtime: a work-stealing scheduler with
    // a single worker pays for queues, atomics and a second thread (the one
    // that blocks on the main future) and steals nothing (README: "Speed").
    let workers =
        std::env::var("LEVEE_WORKERS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|n| *n > 0);
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if let Some(n) = workers.filter(|n| *n > 1) {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        // Every handler is installed first, before levee says it serves: a
        // signal that arrived before a spawned task got round to installing
        // its handler would have killed levee (the default action).
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let shutdown = shutdown_signal();
        let listeners = Listeners::bind(&config).await?;
        eprintln!(
            "levee {} serving http on {}, admin on {}",
            env!("CARGO_PKG_VERSION"),
            listeners.http_addr().map_or("?".into(), |a| a.to_string()),
            listeners.admin_addr().map_or("?".into(), |a| a.to_string()),
        );
        let gateway = Gateway::new(config, Some(path.to_path_buf()))?;
        let reload = gateway.reload_handle();
        if let Ok(mut hup) = hup {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the config");
                    let _ = reload.reload().await;
                }
            });
        }
        gateway.run(listeners, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let signals = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = signals else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

/// Logs go to stderr through a bounded, lossy queue: a stalled or closed log
/// sink drops lines rather than blocking a request.
fn init_logging(default_filter: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_env("LEVEE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(writer).try_init();
    guard
}

// The loader and `levee check` against random documents: here, above both.
#[cfg(test)]
mod proptests;
