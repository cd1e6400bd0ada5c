//! Reloading the configuration file into running services (`lbctl reload`, SIGHUP).
//!
//! The new file is read and validated whole first; a file with an error changes nothing.
//! Then the difference is applied VIP by VIP through the same methods the admin API uses, so
//! a VIP whose backends did not change keeps its table, and established flows keep their
//! backends unless that backend was removed. `[agent]` settings other than the IPIP source
//! addresses need a restart.

use serde::Serialize;

use super::{HealthState, Result, ServiceError, Services};
use crate::config::{Config, VipSpec};

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReloadSummary {
    pub vips_added: usize,
    pub vips_removed: usize,
    pub vips_changed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub backends_changed: usize,
}

impl Services {
    /// Re-reads the file the agent started from and applies the difference.
    pub fn reload(&mut self) -> Result<ReloadSummary> {
        let path = self
            .config_path
            .clone()
            .ok_or_else(|| ServiceError::Invalid {
                what: "reload".into(),
                message: "the agent was not started from a file".into(),
            })?;
        let config = Config::load(&path).map_err(|e| ServiceError::Invalid {
            what: "configuration".into(),
            message: e.to_string(),
        })?;
        self.apply(config)
    }

    /// Applies `config` (already validated) to the running services.
    pub fn apply(&mut self, config: Config) -> Result<ReloadSummary> {
        self.preflight(&config)?;
        let mut summary = ReloadSummary::default();
        if config.agent.interfaces != self.agent.interfaces
            || config.agent.admin_socket != self.agent.admin_socket
            || config.agent.metrics_address != self.agent.metrics_address
            || config.agent.pin_name != self.agent.pin_name
            || config.agent.xdp_mode != self.agent.xdp_mode
        {
            tracing::warn!("[agent] changes other than the IPIP sources apply at the next restart");
        }
        let ipip_changed = config.agent.ipip_src_v4 != self.agent.ipip_src_v4
            || config.agent.ipip_src_v6 != self.agent.ipip_src_v6;
        self.agent.ipip_src_v4 = config.agent.ipip_src_v4;
        self.agent.ipip_src_v6 = config.agent.ipip_src_v6;
        if ipip_changed {
            self.dp.set_config(&crate::agent::lb_config(&self.agent))?;
        }

        let wanted: Vec<_> = config.vips.iter().map(VipSpec::id).collect();
        let gone: Vec<_> = self
            .vips
            .iter()
            .map(|v| v.spec.id())
            .filter(|id| !wanted.contains(id))
            .collect();
        for id in gone {
            self.del_vip(&id)?;
            summary.vips_removed += 1;
        }
        for spec in config.vips {
            match self.vips.iter().position(|v| v.spec.id() == spec.id()) {
                None => {
                    self.add_vip(spec, true)?;
                    summary.vips_added += 1;
                }
                Some(vi) => self.update_vip(vi, spec, &mut summary)?,
            }
        }
        tracing::info!(?summary, "configuration reloaded");
        Ok(summary)
    }

    /// What can fail in `config` without touching anything is tried before anything changes:
    /// every backend that will be added (or whose `mac` / `interface` changes) must resolve,
    /// and the backends must fit the id space. Otherwise a reload could remove VIPs and
    /// backends and then stop halfway at a backend it cannot reach.
    fn preflight(&self, config: &Config) -> Result<()> {
        let total: usize = config.vips.iter().map(|v| v.backends.len()).sum();
        if total > common::MAX_BACKENDS as usize {
            return Err(ServiceError::Exhausted("backend"));
        }
        for spec in &config.vips {
            let current = self.vips.iter().find(|v| v.spec.id() == spec.id());
            for b in &spec.backends {
                let existing =
                    current.and_then(|v| v.backends.iter().find(|x| x.spec.address == b.address));
                let needs_resolving = match existing {
                    None => true,
                    Some(x) => x.spec.mac != b.mac || x.spec.interface != b.interface,
                };
                if needs_resolving {
                    self.resolve(b)?;
                }
            }
        }
        Ok(())
    }

    /// Brings an existing VIP to `spec`: its own settings, then its backends.
    fn update_vip(&mut self, vi: usize, spec: VipSpec, summary: &mut ReloadSummary) -> Result<()> {
        let id = spec.id();
        let mut settings = spec.clone();
        settings.backends = Vec::new();
        let mut current = self.vips[vi].spec.clone();
        current.backends = Vec::new();
        if settings != current {
            settings
                .validate(&self.agent)
                .map_err(|e| ServiceError::Invalid {
                    what: format!("VIP {id}"),
                    message: e.message,
                })?;
            let checks_changed = settings.health_check != current.health_check;
            self.vips[vi].spec = settings;
            if checks_changed {
                self.restart_checks(vi);
            }
            self.install_table(vi)?;
            self.sync_vip_addr(id.address)?;
            summary.vips_changed += 1;
        }

        let wanted: Vec<_> = spec.backends.iter().map(|b| b.address).collect();
        let gone: Vec<_> = self.vips[vi]
            .backends
            .iter()
            .map(|b| b.spec.address)
            .filter(|a| !wanted.contains(a))
            .collect();
        for address in gone {
            self.del_backend(&id, address)?;
            summary.backends_removed += 1;
        }
        for b in spec.backends {
            let vi = self.vip_index(&id)?;
            let Some(bi) = self.vips[vi]
                .backends
                .iter()
                .position(|x| x.spec.address == b.address)
            else {
                self.add_backend(&id, b)?;
                summary.backends_added += 1;
                continue;
            };
            let current = self.vips[vi].backends[bi].spec.clone();
            if current == b {
                continue;
            }
            if current.mac != b.mac || current.interface != b.interface {
                let hop = self.resolve(&b)?;
                self.vips[vi].backends[bi].hop = hop;
                self.vips[vi].backends[bi].spec.mac = b.mac;
                self.vips[vi].backends[bi].spec.interface = b.interface.clone();
                Self::write_backend(&mut self.dp, &self.vips[vi].backends[bi])?;
            }
            if current.weight != b.weight {
                self.set_weight(&id, b.address, b.weight)?;
            }
            summary.backends_changed += 1;
        }
        Ok(())
    }

    /// Restarts the VIP's health checkers with its (new) check; without one, every backend
    /// counts as up.
    fn restart_checks(&mut self, vi: usize) {
        let mut backends = std::mem::take(&mut self.vips[vi].backends);
        let unchecked = self.vips[vi].spec.health_check.is_none();
        for b in &mut backends {
            if let Some(h) = b.check.take() {
                h.abort();
            }
            b.streak = 0;
            if unchecked && b.health == HealthState::Down {
                b.health = HealthState::Up;
                b.last_error = None;
            }
            self.start_check(&self.vips[vi], b);
        }
        self.vips[vi].backends = backends;
        for b in &self.vips[vi].backends {
            // ALIVE follows the (possibly changed) health.
            let _ = Self::write_backend(&mut self.dp, b);
        }
    }
}
