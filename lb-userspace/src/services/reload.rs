//! Reloading the configuration file into running services (`lbctl reload`, SIGHUP).
//!
//! A reload checks everything it can before it changes anything, so a file that cannot be
//! applied changes nothing: the file is read and validated, every VIP and backend is checked
//! again against the new `[agent]` section (sizes, weights, fit in the Maglev table), the VIP
//! and backend counts against the id space, and every backend to add (or whose `mac` /
//! `interface` changes) is resolved; the next hops found then are the ones written.
//!
//! The difference is then applied through the same methods the admin API uses, in an order
//! in which every step fits: first what goes (VIPs, then backends), which frees ids before new
//! ones are taken; then what changes, VIP by VIP, drains before the VIP's own settings (a
//! smaller table fits once the removed and drained backends are out) and the other weights
//! after; last what is new. A VIP whose backends did not change keeps its table, and
//! established flows keep their backends unless that backend was removed. Only a datapath
//! write can still fail part way: each step undoes its own writes, and the error names the VIP
//! or backend and says what the reload had applied before it. `[agent]` settings other than
//! the IPIP source addresses need a restart.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use common::{MAX_BACKENDS, MAX_VIPS};
use serde::Serialize;

use super::{Failure, HealthState, Result, ServiceError, Services};
use crate::{
    config::{BackendSpec, Config, VipId, VipSpec},
    neigh::NextHop,
};

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReloadSummary {
    pub vips_added: usize,
    pub vips_removed: usize,
    pub vips_changed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub backends_changed: usize,
    /// `[agent]` settings that changed but apply only at the next restart.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub needs_restart: Vec<String>,
}

impl std::fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VIPs +{} -{} ~{}, backends +{} -{} ~{}",
            self.vips_added,
            self.vips_removed,
            self.vips_changed,
            self.backends_added,
            self.backends_removed,
            self.backends_changed
        )
    }
}

/// Next hops resolved before a reload changes anything, by VIP and backend address.
type Hops = HashMap<(VipId, IpAddr), NextHop>;

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

    /// Applies `config` to the running services (see the module doc).
    pub fn apply(&mut self, config: Config) -> Result<ReloadSummary> {
        let mut hops = self.preflight(&config)?;
        let (new, old) = (&config.agent, &self.agent);
        let needs_restart: Vec<String> = [
            ("interfaces", new.interfaces != old.interfaces),
            ("admin_socket", new.admin_socket != old.admin_socket),
            (
                "metrics_address",
                new.metrics_address != old.metrics_address,
            ),
            ("pin_name", new.pin_name != old.pin_name),
            ("xdp_mode", new.xdp_mode != old.xdp_mode),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(field, _)| field.to_string())
        .collect();
        if !needs_restart.is_empty() {
            tracing::warn!(
                fields = ?needs_restart,
                "[agent] changes other than the IPIP sources apply at the next restart"
            );
        }
        let mut summary = ReloadSummary {
            needs_restart,
            ..ReloadSummary::default()
        };
        match self.apply_checked(config, &mut hops, &mut summary) {
            Ok(()) => {
                tracing::info!(?summary, "configuration reloaded");
                Ok(summary)
            }
            Err(e) => {
                tracing::error!(applied = %summary, error = %e, "reload stopped part way");
                Err(ServiceError::ReloadStopped {
                    applied: summary,
                    source: Box::new(e),
                })
            }
        }
    }

    /// Everything about `config` that can be checked without changing anything: each VIP
    /// against the new `[agent]` section, with its backends and their fit in its table; that
    /// no VIP appears twice; the VIP and backend counts (a reload removes before it adds, so
    /// the new totals are the peaks); and the next hop of every backend that will be added or
    /// whose `mac` / `interface` changes, which is returned to be written as found.
    fn preflight(&self, config: &Config) -> Result<Hops> {
        if config.vips.len() > MAX_VIPS as usize {
            return Err(ServiceError::Exhausted("VIP"));
        }
        let total: usize = config.vips.iter().map(|v| v.backends.len()).sum();
        if total > MAX_BACKENDS as usize {
            return Err(ServiceError::Exhausted("backend"));
        }
        let mut seen = HashSet::new();
        for spec in &config.vips {
            let id = spec.id();
            if !seen.insert(id) {
                return Err(ServiceError::Invalid {
                    what: format!("VIP {id}"),
                    message: "the same VIP appears twice".into(),
                });
            }
            spec.validate(&config.agent)
                .map_err(|e| ServiceError::Invalid {
                    what: match e.backend {
                        Some(j) => format!("backend {} of VIP {id}", spec.backends[j].address),
                        None => format!("VIP {id}"),
                    },
                    message: e.message,
                })?;
        }
        let mut hops = Hops::new();
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
                    hops.insert((spec.id(), b.address), self.resolve(b)?);
                }
            }
        }
        Ok(hops)
    }

    /// Applies a checked `config`, counting in `summary` what it has done.
    fn apply_checked(
        &mut self,
        config: Config,
        hops: &mut Hops,
        summary: &mut ReloadSummary,
    ) -> Result<()> {
        // What goes: VIPs, then the backends of the VIPs that stay.
        let wanted: HashSet<VipId> = config.vips.iter().map(VipSpec::id).collect();
        let gone: Vec<VipId> = self
            .vips
            .iter()
            .map(|v| v.spec.id())
            .filter(|id| !wanted.contains(id))
            .collect();
        for id in gone {
            self.del_vip(&id)?;
            summary.vips_removed += 1;
        }
        for spec in &config.vips {
            let Ok(vi) = self.vip_index(&spec.id()) else {
                continue;
            };
            let gone: Vec<IpAddr> = self.vips[vi]
                .backends
                .iter()
                .map(|b| b.spec.address)
                .filter(|a| !spec.backends.iter().any(|b| b.address == *a))
                .collect();
            for address in gone {
                self.del_backend(&spec.id(), address)?;
                summary.backends_removed += 1;
            }
        }

        // IPIP sources the file sets go in before a VIP turns to (or arrives in) IPIP mode;
        // those it drops go at the end, once no VIP uses them.
        let (v4, v6) = (config.agent.ipip_src_v4, config.agent.ipip_src_v6);
        self.set_ipip_sources(v4.or(self.agent.ipip_src_v4), v6.or(self.agent.ipip_src_v6))?;

        // What changes.
        for spec in &config.vips {
            if let Ok(vi) = self.vip_index(&spec.id()) {
                self.update_vip(vi, spec, hops, summary)?;
            }
        }

        // What is new: backends of the VIPs that stay, then VIPs.
        for mut spec in config.vips {
            let id = spec.id();
            let Ok(vi) = self.vip_index(&id) else {
                let found = spec
                    .backends
                    .iter()
                    .map(|b| take_hop(hops, id, b.address))
                    .collect::<Result<Vec<_>>>()?;
                self.check_new_vip(&spec)?;
                self.add_vip_resolved(spec, found)?;
                summary.vips_added += 1;
                continue;
            };
            for b in std::mem::take(&mut spec.backends) {
                if self.vips[vi]
                    .backends
                    .iter()
                    .any(|x| x.spec.address == b.address)
                {
                    continue;
                }
                let hop = take_hop(hops, id, b.address)?;
                self.check_new_backend(vi, &b)?;
                self.add_backend_resolved(vi, b, hop)?;
                summary.backends_added += 1;
            }
        }
        self.set_ipip_sources(v4, v6)
    }

    /// Writes the IPIP source addresses, if they change.
    fn set_ipip_sources(&mut self, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> Result<()> {
        if (v4, v6) == (self.agent.ipip_src_v4, self.agent.ipip_src_v6) {
            return Ok(());
        }
        let mut agent = self.agent.clone();
        agent.ipip_src_v4 = v4;
        agent.ipip_src_v6 = v6;
        self.dp
            .set_config(&crate::agent::lb_config(&agent))
            .map_err(|e| {
                Failure::undone(e, Ok(())).into_error("setting the IPIP source addresses".into())
            })?;
        self.agent = agent;
        Ok(())
    }

    /// Brings an existing VIP's own settings and kept backends to `spec`: drains first, then
    /// the VIP's settings, then next hops and the other weights.
    fn update_vip(
        &mut self,
        vi: usize,
        spec: &VipSpec,
        hops: &mut Hops,
        summary: &mut ReloadSummary,
    ) -> Result<()> {
        let id = spec.id();
        let changed: Vec<&BackendSpec> = spec
            .backends
            .iter()
            .filter(|b| {
                self.vips[vi]
                    .backends
                    .iter()
                    .any(|x| x.spec.address == b.address && x.spec != **b)
            })
            .collect();
        for b in &changed {
            let bi = self.backend_index(vi, b.address)?;
            if b.weight == 0 && self.vips[vi].backends[bi].spec.weight != 0 {
                self.set_weight(&id, b.address, 0)?;
            }
        }
        let mut settings = spec.clone();
        settings.backends = Vec::new();
        if settings != self.vips[vi].spec {
            self.set_vip_settings(vi, settings)?;
            summary.vips_changed += 1;
        }
        for b in changed {
            let bi = self.backend_index(vi, b.address)?;
            let current = self.vips[vi].backends[bi].spec.clone();
            if current.mac != b.mac || current.interface != b.interface {
                let hop = take_hop(hops, id, b.address)?;
                self.set_next_hop(vi, bi, b, hop)?;
            }
            if current.weight != b.weight {
                self.set_weight(&id, b.address, b.weight)?;
            }
            summary.backends_changed += 1;
        }
        Ok(())
    }

    /// Gives VIP `vi` new settings of its own (same id, backends unchanged). On an error the
    /// old ones are put back.
    fn set_vip_settings(&mut self, vi: usize, settings: VipSpec) -> Result<()> {
        let id = settings.id();
        let checks_changed = settings.health_check != self.vips[vi].spec.health_check;
        let old_spec = std::mem::replace(&mut self.vips[vi].spec, settings);
        let old_health: Vec<(HealthState, Option<String>)> = self.vips[vi]
            .backends
            .iter()
            .map(|b| (b.health, b.last_error.clone()))
            .collect();
        // Without a check every backend counts as up.
        let mut revived = Vec::new();
        if self.vips[vi].spec.health_check.is_none() {
            for (bi, b) in self.vips[vi].backends.iter_mut().enumerate() {
                // One whose next hop has no MAC yet stays down: the neighbour refresh
                // brings it up once ARP/ND answers.
                if b.health == HealthState::Down && b.hop.mac != crate::neigh::UNRESOLVED {
                    b.health = HealthState::Up;
                    b.last_error = None;
                    revived.push(bi);
                }
            }
        }
        if let Err(e) = self.write_vip_state(vi, &revived) {
            self.vips[vi].spec = old_spec;
            for (b, (health, last_error)) in self.vips[vi].backends.iter_mut().zip(old_health) {
                b.health = health;
                b.last_error = last_error;
            }
            let undo = self.write_vip_state(vi, &revived);
            return Err(Failure::undone(e, undo).into_error(format!("changing VIP {id}")));
        }
        if checks_changed {
            self.restart_checks(vi);
        }
        Ok(())
    }

    /// Writes VIP `vi`'s backends at `backends` (their ALIVE flag first, so that the table
    /// only names live ones), its table and its address entry.
    fn write_vip_state(&mut self, vi: usize, backends: &[usize]) -> Result<()> {
        for &bi in backends {
            Self::write_backend(&mut self.dp, &self.vips[vi].backends[bi])?;
        }
        self.install_table(vi)?;
        self.sync_vip_addr(self.vips[vi].spec.address)
    }

    /// Gives backend `bi` of VIP `vi` the `mac` and `interface` of `spec`, reached through
    /// `hop`. On an error the old ones are put back.
    fn set_next_hop(
        &mut self,
        vi: usize,
        bi: usize,
        spec: &BackendSpec,
        hop: NextHop,
    ) -> Result<()> {
        let b = &mut self.vips[vi].backends[bi];
        let old = (
            b.hop,
            b.spec.mac,
            b.spec.interface.clone(),
            b.health,
            b.last_error.clone(),
        );
        b.hop = hop;
        b.spec.mac = spec.mac;
        b.spec.interface = spec.interface.clone();
        // A next hop that does not answer ARP/ND: the backend is down until it does (see
        // `Services::new_backend`), out of the table rather than sent to a zero MAC.
        let unresolved = hop.mac == crate::neigh::UNRESOLVED && b.health == HealthState::Up;
        if unresolved {
            b.health = HealthState::Down;
            b.last_error = Some(super::unresolved_error(&hop));
        }
        let written =
            Self::write_backend(&mut self.dp, &self.vips[vi].backends[bi]).and_then(|()| {
                if unresolved {
                    self.install_table(vi)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = written {
            let b = &mut self.vips[vi].backends[bi];
            (b.hop, b.spec.mac, b.spec.interface, b.health, b.last_error) = old;
            let undo =
                Self::write_backend(&mut self.dp, &self.vips[vi].backends[bi]).and_then(|()| {
                    if unresolved {
                        self.install_table(vi)
                    } else {
                        Ok(())
                    }
                });
            let vip = self.vips[vi].spec.id();
            return Err(Failure::undone(e, undo).into_error(format!(
                "changing the next hop of backend {} of VIP {vip}",
                spec.address
            )));
        }
        Ok(())
    }

    /// Restarts the VIP's health checkers with its (new) check.
    fn restart_checks(&mut self, vi: usize) {
        let mut backends = std::mem::take(&mut self.vips[vi].backends);
        for b in &mut backends {
            if let Some(h) = b.check.take() {
                h.abort();
            }
            b.streak = 0;
            self.start_check(&self.vips[vi], b);
        }
        self.vips[vi].backends = backends;
    }
}

/// The next hop resolved for a backend before the reload began.
fn take_hop(hops: &mut Hops, vip: VipId, address: IpAddr) -> Result<NextHop> {
    hops.remove(&(vip, address))
        .ok_or_else(|| ServiceError::Invalid {
            what: format!("backend {address} of VIP {vip}"),
            message: "its next hop was not resolved before the reload began".into(),
        })
}
