//! One config generation, compiled and ready to serve: the route table, the upstream groups
//! with their health check tasks, and each listener's TLS and PROXY protocol settings.
//!
//! [`RuntimeState::build`] is the single place where a validated [`Config`] becomes live
//! objects; everything that can fail (certificate files, policy construction) fails here,
//! before the new generation is swapped in. Requests load the current generation from
//! [`Shared::state`] once, at their start, and keep it until they finish: that is what lets
//! in-flight requests complete on the old config during a reload.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ConfigError, ServerConfig};
use crate::metrics::Metrics;
use crate::routing::RouteTable;
use crate::upstream::client::ClientCache;
use crate::upstream::health::HealthTasks;
use crate::upstream::UpstreamGroup;

/// Settings of one listener in one generation.
pub struct ListenerSettings {
    pub name: String,
    /// The configured `ip:port`, which identifies the listener across reloads.
    pub address: String,
    pub tls: Option<TlsAcceptor>,
    pub proxy_protocol: bool,
}

/// A compiled config generation.
pub struct RuntimeState {
    pub generation: u64,
    pub server: ServerConfig,
    pub routes: RouteTable,
    pub groups: HashMap<String, Arc<UpstreamGroup>>,
    pub listeners: Vec<Arc<ListenerSettings>>,
    _health: HealthTasks,
}

/// Process-wide state shared by listeners, connections and the admin server.
pub struct Shared {
    pub state: ArcSwap<RuntimeState>,
    pub metrics: Arc<Metrics>,
    pub clients: ClientCache,
    /// Upgraded tunnels (WebSocket...), which outlive their HTTP connection: a shutdown
    /// waits for them as it does for connections.
    pub tunnels: tokio_util::task::TaskTracker,
}

impl RuntimeState {
    /// Compiles a validated config. Must run inside a tokio runtime (health checks spawn).
    /// Members present in `previous` keep their health state.
    pub fn build(
        config: &Config,
        generation: u64,
        previous: Option<&RuntimeState>,
        clients: &ClientCache,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let routes = RouteTable::build(config)?;
        let listeners = config
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let tls = l
                    .tls
                    .as_ref()
                    .map(|tls| crate::tls::build_acceptor(config, i, tls))
                    .transpose()?;
                Ok(Arc::new(ListenerSettings {
                    name: l.name.get_ref().clone(),
                    address: l.address.get_ref().clone(),
                    tls,
                    proxy_protocol: l.proxy_protocol,
                }))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let mut health = HealthTasks::default();
        let mut groups = HashMap::new();
        for (i, g) in config.upstreams.iter().enumerate() {
            let tls = g
                .tls
                .as_ref()
                .map(|tls| crate::tls::upstream_client_config(config, i, tls))
                .transpose()?;
            let group = UpstreamGroup::build(g, clients, tls, metrics);
            if let Some(old) = previous.and_then(|p| p.groups.get(&group.name)) {
                group.inherit_health(old, g.health_check.is_some());
                for member in &group.members {
                    member.publish_health(metrics);
                }
            }
            if let Some(hc) = &g.health_check {
                health.spawn(&group, hc, metrics);
            }
            groups.insert(group.name.clone(), Arc::new(group));
        }
        Ok(Self {
            generation,
            server: config.server.clone(),
            routes,
            groups,
            listeners,
            _health: health,
        })
    }
}
