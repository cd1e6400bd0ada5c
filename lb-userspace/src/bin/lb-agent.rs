//! `lb-agent`: runs the XDP load balancer described by a TOML file until SIGTERM / SIGINT.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use lb_userspace::{
    agent::{self, AgentOptions},
    config::Config,
};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// XDP L4 load balancer agent.
///
/// Loads the XDP datapath with its maps pinned under /sys/fs/bpf/<pin_name> (mounting bpffs
/// if needed), programs the VIPs and backends of the configuration, attaches `xdp_lb` to the
/// configured interfaces, health-checks backends, and serves the admin API (for `lbctl`) on
/// a Unix socket and optional Prometheus metrics. A restarted agent reuses the pinned
/// connection table and replaces the attached program in place, so established flows keep
/// their backends. SIGHUP (or `lbctl reload`) re-reads the file and applies the difference.
/// Log level: RUST_LOG (default "info").
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// The configuration file (TOML: [agent], [[vip]], [[vip.backend]]).
    #[arg(
        short,
        long,
        env = "XDPLB_CONFIG",
        default_value = "/etc/xdplb/lb.toml"
    )]
    config: PathBuf,
    /// On shutdown, leave XDP attached (with the pinned maps) so traffic keeps flowing
    /// until the next agent takes over.
    #[arg(long)]
    keep_attached: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Log output format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Mount point of bpffs.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-agent: {}", lb_userspace::error_text(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    // Checked before `--check` answers, so that it passes nothing a start would refuse.
    if config.agent.interfaces.is_empty() {
        anyhow::bail!(
            "{}: [agent] interfaces is empty; name the interfaces that receive VIP traffic",
            args.config.display()
        );
    }
    let mut named = std::collections::HashSet::new();
    if let Some(twice) = config.agent.interfaces.iter().find(|i| !named.insert(*i)) {
        anyhow::bail!(
            "{}: [agent] interfaces names {twice:?} twice",
            args.config.display()
        );
    }
    if args.check {
        println!(
            "{}: OK ({} VIPs, {} backends)",
            args.config.display(),
            config.vips.len(),
            config.vips.iter().map(|v| v.backends.len()).sum::<usize>()
        );
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let opts = AgentOptions {
        keep_attached: args.keep_attached,
        bpffs_root: args.bpffs,
        config_path: Some(args.config.clone()),
        ..AgentOptions::default()
    };
    rt.block_on(agent::run(config, opts, shutdown_signal()))
}
