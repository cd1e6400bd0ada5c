//! The agent's lifetime: load the datapath, fill it from the configuration, attach, serve the
//! admin API, metrics and health checks, and on shutdown detach (or stay attached).
//!
//! [`run`] is the whole agent as a library call, so the `lb-agent` binary and the end-to-end
//! tests run the same code. It must run on a multi-threaded tokio runtime whose threads are in
//! the network namespace of the interfaces it attaches to.

use std::{
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context;
use common::LbConfig;
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinSet};

use crate::{
    admin,
    attach::{self, Attachment},
    config::{AgentSection, Config},
    datapath::Datapath,
    health::HealthSpawner,
    metrics,
    services::{addr16, Services},
};

/// How the agent runs (the command line's part; the rest is [`Config`]).
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Leave the program attached (and its link pinned) on shutdown.
    pub keep_attached: bool,
    /// Where bpffs is (mounted if needed); maps are pinned under `<root>/<pin_name>`.
    pub bpffs_root: PathBuf,
    /// Where `xdplb-<pin_name>.lock` keeps a second agent on the same maps from starting.
    pub lock_dir: PathBuf,
    /// The file `config` came from: `lbctl reload` and SIGHUP re-read it.
    pub config_path: Option<PathBuf>,
}

/// An exclusive `flock` held for the agent's lifetime: two agents on one pin directory would
/// fight over the maps, the links and the admin socket.
struct InstanceLock {
    _file: std::fs::File,
}

impl InstanceLock {
    fn acquire(dir: &std::path::Path, pin_name: &str) -> anyhow::Result<Self> {
        use std::os::fd::AsRawFd;
        let path = dir.join(format!("xdplb-{pin_name}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            anyhow::bail!(
                "another lb-agent is running with pin_name {pin_name:?} (it holds {})",
                path.display()
            );
        }
        Ok(Self { _file: file })
    }
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            keep_attached: false,
            bpffs_root: PathBuf::from("/sys/fs/bpf"),
            lock_dir: PathBuf::from("/run"),
            config_path: None,
        }
    }
}

/// The datapath's global settings from `[agent]`.
pub(crate) fn lb_config(agent: &AgentSection) -> LbConfig {
    let mut cfg = LbConfig::default();
    if let Some(v4) = agent.ipip_src_v4 {
        cfg.ipip_src_v4 = v4.octets();
    }
    if let Some(v6) = agent.ipip_src_v6 {
        cfg.ipip_src_v6 = addr16(v6.into());
    }
    cfg
}

/// Forwards the XDP program's aya-log records to `log`, which tracing-subscriber picks up.
async fn forward_program_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's fd and keeps it open while `AsyncFd` holds it.
    let Ok(mut fd) = (unsafe { AsyncFd::register(logger) }) else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    config: Config,
    opts: AgentOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let _lock = InstanceLock::acquire(&opts.lock_dir, &config.agent.pin_name)?;
    crate::datapath::ensure_bpffs(&opts.bpffs_root)
        .with_context(|| format!("mounting bpffs at {}", opts.bpffs_root.display()))?;
    let pin_dir = opts.bpffs_root.join(&config.agent.pin_name);
    let mut dp = Datapath::load(&pin_dir)
        .with_context(|| format!("loading the XDP datapath (maps in {})", pin_dir.display()))?;
    dp.set_config(&lb_config(&config.agent))?;
    let mut tasks = JoinSet::new();
    match aya_log::EbpfLogger::init(dp.ebpf_mut()) {
        Ok(logger) => {
            tasks.spawn(forward_program_logs(logger));
        }
        Err(e) => tracing::debug!(error = %e, "the XDP program has no log records"),
    }

    let (health_tx, mut health_rx) = mpsc::unbounded_channel();
    let spawner = HealthSpawner::new(tokio::runtime::Handle::current(), health_tx);
    let mut services = Services::new(dp, config.agent.clone(), Some(spawner));
    if let Some(path) = &opts.config_path {
        services.set_config_path(path.clone());
    }
    // Resolving backends may wait on ARP.
    tokio::task::block_in_place(|| services.start(&config.vips))
        .context("loading the configuration into the datapath")?;

    // Bind before attaching: a port in use must fail the start, not leave XDP half set up.
    // (Metrics first: the admin socket is a file to clean up if a later step fails.)
    let metrics_listener = match config.agent.metrics_address {
        Some(addr) => Some((addr, metrics::bind(addr).await?)),
        None => None,
    };
    let admin_listener = admin::bind(&config.agent.admin_socket)?;

    let mut attachments: Vec<Attachment> = Vec::new();
    for iface in &config.agent.interfaces {
        match attach::attach(
            services.datapath_mut(),
            common::prog_names::LB,
            iface,
            config.agent.xdp_mode,
        ) {
            Ok(a) => attachments.push(a),
            Err(e) => {
                for a in attachments {
                    a.release(opts.keep_attached);
                }
                let _ = std::fs::remove_file(&config.agent.admin_socket);
                return Err(e);
            }
        }
    }
    let services = Arc::new(Mutex::new(services));
    tasks.spawn(admin::serve(admin_listener, services.clone()));
    if let Some((addr, listener)) = metrics_listener {
        tracing::info!(%addr, "serving metrics on /metrics");
        tasks.spawn(metrics::serve(listener, services.clone()));
    }
    tasks.spawn(follow_neighbours(services.clone()));
    tracing::info!(
        socket = %config.agent.admin_socket.display(),
        vips = config.vips.len(),
        interfaces = ?config.agent.interfaces,
        "agent running"
    );

    let result = apply_health_until(
        &services,
        &mut health_rx,
        opts.config_path.is_some(),
        shutdown,
    )
    .await;
    tasks.shutdown().await;
    for a in attachments {
        a.release(opts.keep_attached);
    }
    let _ = std::fs::remove_file(&config.agent.admin_socket);
    tracing::info!("agent stopped");
    result
}

/// How often backends' next-hop MACs are compared with the kernel's neighbour table.
const NEIGHBOUR_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Every [`NEIGHBOUR_REFRESH`], brings the backends' next-hop MACs in line with the kernel's
/// neighbour table ([`Services::refresh_next_hops`]).
async fn follow_neighbours(services: Arc<Mutex<Services>>) {
    let mut tick = tokio::time::interval(NEIGHBOUR_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let table = match tokio::task::spawn_blocking(crate::neigh::neighbours).await {
            Ok(Ok(table)) => table,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "reading the neighbour table");
                continue;
            }
            Err(_) => continue,
        };
        // Failed writes are logged there and tried again on the next pass.
        services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refresh_next_hops(&table);
    }
}

/// Feeds health-check results to the services until `shutdown` completes; with a config
/// path, SIGHUP reloads it.
async fn apply_health_until(
    services: &Arc<Mutex<Services>>,
    health_rx: &mut mpsc::UnboundedReceiver<crate::health::HealthReport>,
    has_config_path: bool,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            Some(()) = hangup.recv(), if has_config_path => {
                let services = services.clone();
                let reloaded = tokio::task::spawn_blocking(move || {
                    services.lock().unwrap_or_else(|p| p.into_inner()).reload()
                })
                .await?;
                if let Err(e) = reloaded {
                    tracing::error!(error = %e, "SIGHUP: reload failed");
                }
            }
            Some(report) = health_rx.recv() => {
                let services = services.clone();
                let applied = tokio::task::spawn_blocking(move || {
                    services.lock().unwrap_or_else(|p| p.into_inner()).health_report(report)
                })
                .await?;
                if let Err(e) = applied {
                    tracing::error!(error = %e, "applying a health change");
                }
            }
        }
    }
}
