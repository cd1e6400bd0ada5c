//! Runs `lb_userspace::agent::run` in-process, on a runtime whose threads live in the load
//! balancer's namespace, and talks to it over its admin socket.

use std::{
    path::PathBuf,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_userspace::{
    admin,
    agent::{self, AgentOptions},
    api::{BackendView, Request, StatsView},
    config::Config,
};
use tokio::sync::oneshot;

use crate::netns::Netns;

pub struct AgentHandle {
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Routes `tracing` output (and the agent's logs) to the test's captured output, once.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

impl AgentHandle {
    /// Starts the agent in `ns` and waits until its admin socket answers.
    pub fn start(ns: &Netns, config: Config, keep_attached: bool) -> Self {
        Self::try_start(ns, config, keep_attached)
            .unwrap_or_else(|e| panic!("agent exited during start-up: {e:#}"))
    }

    /// Like [`AgentHandle::start`], but returns the agent's error if it exits during start-up.
    pub fn try_start(ns: &Netns, config: Config, keep_attached: bool) -> anyhow::Result<Self> {
        let opts = AgentOptions {
            keep_attached,
            ..AgentOptions::default()
        };
        Self::start_with(ns, config, opts)
    }

    /// Starts the agent from a file, which `lbctl reload` re-reads.
    pub fn start_from_file(ns: &Netns, path: &std::path::Path) -> Self {
        let config = Config::load(path).expect("test config");
        let opts = AgentOptions {
            config_path: Some(path.to_owned()),
            ..AgentOptions::default()
        };
        Self::start_with(ns, config, opts)
            .unwrap_or_else(|e| panic!("agent exited during start-up: {e:#}"))
    }

    fn start_with(ns: &Netns, config: Config, opts: AgentOptions) -> anyhow::Result<Self> {
        init_logs();
        let socket = config.agent.admin_socket.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let thread = ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(agent::run(config, opts, async {
                let _ = rx.await;
            }))
        });
        let mut handle = Self {
            socket,
            stop: Some(tx),
            thread: Some(thread),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if admin::call_ok(&handle.socket, &Request::VipList).is_ok() {
                return Ok(handle);
            }
            if handle.thread.as_ref().unwrap().is_finished() {
                let r = handle.thread.take().unwrap().join().unwrap();
                return Err(r.err().unwrap_or_else(|| anyhow::anyhow!("agent stopped")));
            }
            assert!(Instant::now() < deadline, "agent did not start in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent and returns how it ended.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().expect("agent thread panicked"),
            None => Ok(()),
        }
    }

    pub fn call(&self, req: &Request) -> anyhow::Result<serde_json::Value> {
        admin::call_ok(&self.socket, req)
    }

    pub fn stats(&self) -> StatsView {
        serde_json::from_value(self.call(&Request::Stats).unwrap()).unwrap()
    }

    pub fn backends(&self) -> Vec<BackendView> {
        serde_json::from_value(self.call(&Request::BackendList { vip: None }).unwrap()).unwrap()
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
