//! `l7-proxy --config proxy.toml`: runs the reverse proxy until SIGTERM or SIGINT.
//! SIGHUP reloads the config file; an invalid file is logged and the running config kept.

use std::path::PathBuf;

/// mimalloc: per-request allocations (headers, bodies, futures) were ~7% of the proxy's CPU in
/// glibc malloc/free, mostly freeing and coalescing.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

/// HTTP/1.1 + HTTP/2 reverse proxy with TLS termination, load balancing and gateway policies.
///
/// Signals: SIGHUP reloads the config file (an invalid file is rejected and the running
/// config keeps serving); SIGTERM or SIGINT stop accepting and drain connections for up to
/// `server.drain_timeout_ms`.
#[derive(Debug, Parser)]
#[command(name = "l7-proxy", version, about, long_about)]
struct Args {
    /// Path of the TOML config file (see examples/proxy.toml for every field).
    #[arg(short, long, env = "L7_PROXY_CONFIG", value_name = "FILE")]
    config: PathBuf,

    /// Only load and validate the config, print the result and exit (0 when valid).
    #[arg(long)]
    check: bool,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Log filter in `RUST_LOG` syntax (the RUST_LOG variable wins when set).
    #[arg(long, default_value = "info")]
    log: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_tracing(args: &Args) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The runtime for the CPUs this process may run on. Pinned to one CPU (as under
/// `taskset -c 0`), a current-thread runtime does the same work as a one-worker multi-thread
/// runtime without handing I/O events and tasks between the worker and the main thread, and
/// without the atomics of work stealing; with more CPUs there is one worker per CPU.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(cpus);
        builder
    };
    builder.enable_all().build()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args);
    runtime()
        .context("starting the tokio runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.check {
        l7_proxy::Proxy::check_file(&args.config)
            .with_context(|| format!("checking {}", args.config.display()))?;
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let proxy = l7_proxy::Proxy::start_from_file(&args.config)
        .await
        .with_context(|| format!("starting with {}", args.config.display()))?;
    for (name, addr) in proxy.listener_addrs() {
        tracing::info!(listener = %name, %addr, "ready");
    }
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                // Errors are logged by the reload itself; the old config keeps serving.
                let _ = proxy.reload_from_file().await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("shutting down: draining connections");
    proxy.shutdown().await;
    Ok(())
}
