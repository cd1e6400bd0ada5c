//! Starting, reloading and stopping the proxy: the public entry points.
//!
//! [`Proxy::start`] compiles the config into a [`RuntimeState`], binds every listener (and the
//! optional admin listener) and returns a [`ProxyHandle`]. [`ProxyHandle::reload`] builds the
//! new generation completely — routes, groups, certificates, policies, new sockets — before
//! anything changes; if any step fails the error is returned (and logged) and the old
//! generation keeps serving. On success the state is swapped atomically, listeners whose
//! address is unchanged keep their socket and get the new TLS / PROXY settings, new
//! addresses start accepting, and removed ones stop accepting and drain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::server::admin;
use crate::server::listener::ListenerHandle;
use crate::state::{ListenerSettings, RuntimeState, Shared};
use crate::upstream::client::ClientCache;

/// Why the proxy could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("binding {address}: {source}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no config file to reload from (the proxy was started from an in-memory config)")]
    NoConfigFile,
}

/// Entry point.
pub struct Proxy;

impl Proxy {
    /// Starts the proxy with a loaded config. Must be called inside a tokio runtime.
    pub async fn start(config: Config) -> Result<ProxyHandle, ProxyError> {
        Self::start_inner(config, None).await
    }

    /// Loads `path` and starts the proxy; reloads (SIGHUP, `POST /-/reload`) re-read `path`.
    pub async fn start_from_file(path: impl AsRef<Path>) -> Result<ProxyHandle, ProxyError> {
        let path = path.as_ref().to_path_buf();
        let config = Config::from_file(&path)?;
        Self::start_inner(config, Some(path)).await
    }

    /// Loads `path` and builds everything a start or reload builds from it (routes, policies
    /// with their key files, TLS certificates and keys), without binding any socket: what
    /// `l7-proxy --check` reports, as `nginx -t` does. Must run inside a tokio runtime.
    pub fn check_file(path: impl AsRef<Path>) -> Result<(), ProxyError> {
        let config = Config::from_file(path.as_ref())?;
        let metrics = Arc::new(Metrics::new());
        RuntimeState::build(&config, 1, None, &ClientCache::default(), &metrics)?;
        Ok(())
    }

    async fn start_inner(config: Config, path: Option<PathBuf>) -> Result<ProxyHandle, ProxyError> {
        let metrics = Arc::new(Metrics::new());
        let clients = ClientCache::default();
        let state = RuntimeState::build(&config, 1, None, &clients, &metrics)?;
        let admin_listener = match &config.admin {
            Some(admin) => Some(bind(admin.address.get_ref()).await?),
            None => None,
        };
        let shared = Arc::new(Shared {
            state: ArcSwap::from_pointee(state),
            metrics,
            clients,
            tunnels: tokio_util::task::TaskTracker::new(),
        });
        let inner = Arc::new(ProxyInner {
            shared,
            listeners: Mutex::new(HashMap::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(1),
            config_path: path,
            admin_addr: admin_listener.as_ref().and_then(|l| l.local_addr().ok()),
            admin_task: Mutex::new(None),
        });
        let bound = inner.bind_missing(&inner.shared.state.load_full()).await?;
        inner.install_listeners(bound);
        if let Some(listener) = admin_listener {
            let task = tokio::spawn(admin::serve(listener, Arc::downgrade(&inner)));
            *lock(&inner.admin_task) = Some(task);
        }
        Ok(ProxyHandle { inner })
    }
}

async fn bind(address: &str) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| ProxyError::Bind {
            address: address.to_string(),
            source,
        })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The proxy's internals, shared by the handle and the admin server.
pub struct ProxyInner {
    pub(crate) shared: Arc<Shared>,
    /// Running listeners by configured address.
    listeners: Mutex<HashMap<String, ListenerHandle>>,
    /// Serialises reloads.
    reload_lock: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    config_path: Option<PathBuf>,
    admin_addr: Option<SocketAddr>,
    admin_task: Mutex<Option<JoinHandle<()>>>,
}

impl ProxyInner {
    /// Binds the addresses of `state` that have no running listener yet. Nothing changes on
    /// failure.
    async fn bind_missing(
        &self,
        state: &RuntimeState,
    ) -> Result<Vec<(TcpListener, Arc<ListenerSettings>)>, ProxyError> {
        let missing: Vec<_> = {
            let running = lock(&self.listeners);
            state
                .listeners
                .iter()
                .filter(|l| !running.contains_key(&l.address))
                .cloned()
                .collect()
        };
        let mut bound = Vec::new();
        for settings in missing {
            bound.push((bind(&settings.address).await?, settings));
        }
        Ok(bound)
    }

    /// Makes the running listeners match the current state's: starts the newly bound ones,
    /// gives kept ones their new settings, stops removed ones.
    fn install_listeners(&self, bound: Vec<(TcpListener, Arc<ListenerSettings>)>) {
        let state = self.shared.state.load_full();
        let mut running = lock(&self.listeners);
        for (socket, settings) in bound {
            let address = settings.address.clone();
            match ListenerHandle::spawn(socket, settings, self.shared.clone()) {
                Ok(handle) => {
                    tracing::info!(listener = %handle.settings.load().name, addr = %handle.local_addr, "listening");
                    running.insert(address, handle);
                }
                Err(e) => tracing::error!(%address, error = %e, "listener socket unusable"),
            }
        }
        for settings in &state.listeners {
            if let Some(handle) = running.get(&settings.address) {
                handle.settings.store(settings.clone());
            }
        }
        let removed: Vec<String> = running
            .keys()
            .filter(|a| !state.listeners.iter().any(|l| &l.address == *a))
            .cloned()
            .collect();
        for address in removed {
            if let Some(handle) = running.remove(&address) {
                tracing::info!(%address, "listener removed by reload");
                drop(handle.stop());
            }
        }
    }

    /// Applies a new config; on error the running one stays.
    async fn reload(&self, config: Config) -> Result<u64, ProxyError> {
        let _guard = self.reload_lock.lock().await;
        let result = self.apply(config).await;
        self.shared.metrics.record_reload(result.is_ok());
        match &result {
            Ok(generation) => tracing::info!(generation, "config reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "config reload rejected; keeping the running config")
            }
        }
        result
    }

    async fn apply(&self, config: Config) -> Result<u64, ProxyError> {
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        let previous = self.shared.state.load_full();
        let state = Arc::new(RuntimeState::build(
            &config,
            generation,
            Some(&previous),
            &self.shared.clients,
            &self.shared.metrics,
        )?);
        // Bind new addresses before swapping, so a bind failure leaves everything as it was.
        let bound = self.bind_missing(&state).await?;
        self.shared.state.store(state);
        self.install_listeners(bound);
        self.generation.store(generation, Ordering::Relaxed);
        Ok(generation)
    }

    pub(crate) async fn reload_from_file(&self) -> Result<u64, ProxyError> {
        let Some(path) = &self.config_path else {
            return Err(ProxyError::NoConfigFile);
        };
        match Config::from_file(path) {
            Ok(config) => self.reload(config).await,
            Err(e) => {
                self.shared.metrics.record_reload(false);
                tracing::error!(error = %e, "config reload rejected; keeping the running config");
                Err(e.into())
            }
        }
    }
}

/// A running proxy. Cloning gives another handle to the same proxy.
#[derive(Clone)]
pub struct ProxyHandle {
    inner: Arc<ProxyInner>,
}

impl ProxyHandle {
    /// The bound address of the listener named `name` (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        lock(&self.inner.listeners)
            .values()
            .find(|h| h.settings.load().name == name)
            .map(|h| h.local_addr)
    }

    /// All listeners: name → bound address.
    pub fn listener_addrs(&self) -> HashMap<String, SocketAddr> {
        lock(&self.inner.listeners)
            .values()
            .map(|h| (h.settings.load().name.clone(), h.local_addr))
            .collect()
    }

    /// The admin listener's bound address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.inner.admin_addr
    }

    /// Generation of the config in service (1 at start, +1 per successful reload).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Relaxed)
    }

    /// Replaces the config. On error nothing changes.
    pub async fn reload(&self, config: Config) -> Result<u64, ProxyError> {
        self.inner.reload(config).await
    }

    /// Re-reads the config file given to [`Proxy::start_from_file`] and applies it.
    pub async fn reload_from_file(&self) -> Result<u64, ProxyError> {
        self.inner.reload_from_file().await
    }

    /// The Prometheus text of all metrics.
    pub fn metrics_text(&self) -> String {
        self.inner.shared.metrics.encode()
    }

    /// Graceful shutdown: stop accepting everywhere, then let connections finish within the
    /// drain timeout.
    pub async fn shutdown(&self) {
        if let Some(task) = lock(&self.inner.admin_task).take() {
            task.abort();
        }
        let handles: Vec<ListenerHandle> = lock(&self.inner.listeners)
            .drain()
            .map(|(_, h)| h)
            .collect();
        let tasks: Vec<JoinHandle<()>> = handles.into_iter().map(ListenerHandle::stop).collect();
        // Tunnels (WebSocket...) drain within the same deadline as the connections. They are
        // waited for once the connections are done: a connection still draining may yet
        // upgrade and start one.
        let shared = &self.inner.shared;
        let drain = std::time::Duration::from_millis(shared.state.load().server.drain_timeout_ms);
        let deadline = tokio::time::Instant::now() + drain;
        for task in tasks {
            let _ = task.await;
        }
        shared.tunnels.close();
        if tokio::time::timeout_at(deadline, shared.tunnels.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tunnels = shared.tunnels.len(),
                "drain deadline passed, closing remaining tunnels"
            );
        }
    }
}
