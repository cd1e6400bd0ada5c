//! The agent's model of its services: VIPs, their backends, ids and health, and the one place
//! that turns that model into datapath state.
//!
//! Every change (from the config file, the admin API or a health check) goes through a method
//! of [`Services`], which checks the request completely before it touches anything, so a bad
//! request leaves the running state as it was. When a map write fails part way through an
//! admin change, what the change had written is undone, so the agent's view and the datapath
//! still agree; the error names the change, and says so if undoing failed too (retrying the
//! change then completes it). After a change only the VIP concerned gets a new Maglev table.
//! The connection table is never flushed at runtime: a flow stays on its backend while
//! that backend keeps `BACKEND_F_ALIVE`; taking a backend down clears the flag (after the new
//! table is live) so its flows are re-picked, while a drained backend (weight 0) keeps it.

use std::net::IpAddr;

use common::{
    maglev::{build_table, MaglevBackend},
    BackendInfo, VipAddrInfo, VipKey, VipMeta, ADDR_F_ECHO_REPLY, BACKEND_F_ALIVE, MAX_BACKENDS,
    MAX_VIPS,
};
use tokio::task::AbortHandle;

mod keys;
mod reload;
mod restart;
#[cfg(test)]
mod tests;
pub use keys::addr16;
use keys::{family, vip_key, Ids};
pub use reload::ReloadSummary;

use crate::{
    api::{BackendView, Counters, HealthState, StatsView, VipView},
    config::{AgentSection, BackendSpec, MacAddr, VipId, VipSpec},
    datapath::{Datapath, DatapathError},
    health::{CheckTarget, HealthReport, HealthSpawner},
    neigh::{self, NextHop},
};

/// Why a change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("unknown VIP {0}")]
    UnknownVip(VipId),
    #[error("VIP {0} already exists")]
    DuplicateVip(VipId),
    #[error("VIP {vip} has no backend {address}")]
    UnknownBackend { vip: VipId, address: IpAddr },
    #[error("VIP {vip} already has backend {address}")]
    DuplicateBackend { vip: VipId, address: IpAddr },
    #[error("invalid {what}: {message}")]
    Invalid { what: String, message: String },
    #[error("no free {0} id (limit reached)")]
    Exhausted(&'static str),
    #[error("backend {address}: {source}")]
    Neighbour {
        address: IpAddr,
        #[source]
        source: neigh::NeighError,
    },
    #[error("datapath: {0}")]
    Datapath(#[from] DatapathError),
    #[error("Maglev table for {vip}: {message}")]
    Maglev { vip: VipId, message: String },
    /// A change failed part way in the datapath; what it had written was put back.
    #[error("{change} failed, nothing was changed: {source}")]
    Undone {
        change: String,
        #[source]
        source: Box<ServiceError>,
    },
    /// A change failed part way in the datapath and putting back what it had written failed
    /// too. What the agent lists is still there: retrying the change completes it.
    #[error(
        "{change} failed: {source}; undoing it failed too ({undo}), so the datapath may not \
         match what the agent lists until the change is retried"
    )]
    NotUndone {
        change: String,
        #[source]
        source: Box<ServiceError>,
        undo: Box<ServiceError>,
    },
    /// A reload failed part way, in a datapath write (everything else is checked before it
    /// changes anything). The failed step undid its own writes; those before it stay.
    #[error(
        "reload stopped part way: {source}; it had applied {applied} before that, and not the \
         rest of the file (reload again to retry)"
    )]
    ReloadStopped {
        applied: ReloadSummary,
        #[source]
        source: Box<ServiceError>,
    },
    /// One step of a larger change (a start-up) failed.
    #[error("{step}: {source}")]
    Step {
        step: String,
        #[source]
        source: Box<ServiceError>,
    },
}

/// A change that failed in the datapath, and why undoing what it had written failed, if it
/// did.
struct Failure {
    error: Box<ServiceError>,
    undo: Option<Box<ServiceError>>,
}

impl Failure {
    /// `error`, and how undoing what the change had written went.
    fn undone(error: impl Into<ServiceError>, undo: Result<()>) -> Self {
        Self {
            error: Box::new(error.into()),
            undo: undo.err().map(Box::new),
        }
    }

    /// The error to report for `change`.
    fn into_error(self, change: String) -> ServiceError {
        match self.undo {
            None => ServiceError::Undone {
                change,
                source: self.error,
            },
            Some(undo) => ServiceError::NotUndone {
                change,
                source: self.error,
                undo,
            },
        }
    }
}

type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// A backend of one VIP.
struct Backend {
    spec: BackendSpec,
    id: u32,
    /// The id of the VIP it belongs to (written to the datapath with it).
    vip_id: u32,
    hop: NextHop,
    health: HealthState,
    /// Consecutive check results that disagree with `health`.
    streak: u32,
    last_error: Option<String>,
    check: Option<AbortHandle>,
}

struct Vip {
    spec: VipSpec,
    key: VipKey,
    id: u32,
    backends: Vec<Backend>,
}

/// An id given to a new VIP or backend. `inherited`: the same VIP or backend had it in the
/// previous run (see `restart`), so it keeps its counters, flows and health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NewId {
    id: u32,
    inherited: bool,
}

impl NewId {
    fn fresh(id: u32) -> Self {
        Self {
            id,
            inherited: false,
        }
    }
}

/// The ids of a new VIP and of its backends, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NewIds {
    vip: NewId,
    backends: Vec<NewId>,
}

/// All services and the datapath they are written to.
pub struct Services {
    dp: Datapath,
    agent: AgentSection,
    vips: Vec<Vip>,
    vip_ids: Ids,
    backend_ids: Ids,
    health: Option<HealthSpawner>,
    /// The file to re-read on reload.
    config_path: Option<std::path::PathBuf>,
}

/// Why a backend whose next hop has no known MAC is down.
pub(super) fn unresolved_error(hop: &NextHop) -> String {
    format!(
        "no MAC for next hop {} (ARP/ND got no answer; retrying, or give `mac`)",
        hop.via
    )
}

impl Services {
    /// Wraps a loaded datapath. `health` spawns checkers (None: no health checks, for tools
    /// and tests without a runtime).
    pub fn new(dp: Datapath, agent: AgentSection, health: Option<HealthSpawner>) -> Self {
        Self {
            dp,
            agent,
            vips: Vec::new(),
            vip_ids: Ids::new(MAX_VIPS, "VIP"),
            backend_ids: Ids::new(MAX_BACKENDS, "backend"),
            health,
            config_path: None,
        }
    }

    /// Where [`Services::reload`] reads the configuration from.
    pub fn set_config_path(&mut self, path: std::path::PathBuf) {
        self.config_path = Some(path);
    }

    /// The datapath (to attach its programs).
    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    fn vip_index(&self, id: &VipId) -> Result<usize> {
        self.vips
            .iter()
            .position(|v| v.spec.id() == *id)
            .ok_or(ServiceError::UnknownVip(*id))
    }

    fn resolve(&self, b: &BackendSpec) -> Result<NextHop> {
        neigh::resolve(b.address, b.interface.as_deref(), b.mac.map(|m| m.0)).map_err(|source| {
            ServiceError::Neighbour {
                address: b.address,
                source,
            }
        })
    }

    fn backend_info(b: &Backend) -> BackendInfo {
        Self::backend_info_alive(b, b.health == HealthState::Up)
    }

    fn backend_info_alive(b: &Backend, alive: bool) -> BackendInfo {
        BackendInfo {
            addr: addr16(b.spec.address),
            mac: b.hop.mac,
            src_mac: b.hop.src_mac,
            ifindex: b.hop.ifindex,
            family: family(b.spec.address),
            flags: if alive { BACKEND_F_ALIVE } else { 0 },
            // VIP ids are below MAX_VIPS, which fits (asserted in `common`).
            vip_id: b.vip_id as u16,
        }
    }

    /// Writes a backend (and its egress port) to the datapath. Takes the datapath alone so
    /// that `b` can be borrowed from `self.vips`.
    fn write_backend(dp: &mut Datapath, b: &Backend) -> Result<()> {
        if b.hop.ifindex != 0 {
            dp.add_tx_port(b.hop.ifindex)?;
        }
        dp.set_backend(b.id, &Self::backend_info(b))?;
        Ok(())
    }

    /// Builds and installs the VIP's Maglev table from its healthy, weighted backends.
    fn install_table(&mut self, vi: usize) -> Result<()> {
        let vip = &self.vips[vi];
        let members: Vec<MaglevBackend> = vip
            .backends
            .iter()
            .filter(|b| b.health == HealthState::Up)
            .map(|b| MaglevBackend {
                identity: addr16(b.spec.address),
                weight: b.spec.weight,
                id: b.id,
            })
            .collect();
        let table =
            build_table(&members, vip.spec.table_size.get()).map_err(|e| ServiceError::Maglev {
                vip: vip.spec.id(),
                message: e.to_string(),
            })?;
        let meta = VipMeta {
            vip_id: vip.id,
            mode: vip.spec.mode as u8,
            ..VipMeta::default()
        };
        let (key, vip_name, members) = (vip.key, vip.spec.id(), members.len());
        let started = std::time::Instant::now();
        self.dp.set_vip(&key, meta, &table)?;
        tracing::debug!(vip = %vip_name, members, took = ?started.elapsed(), "Maglev table installed");
        Ok(())
    }

    /// Rewrites the VIP_ADDRS entry of `addr` from the VIPs that use it.
    fn sync_vip_addr(&mut self, addr: IpAddr) -> Result<()> {
        self.write_vip_addr(addr, None)
    }

    /// Rewrites the VIP_ADDRS entry of `addr` from the VIPs that use it, leaving out VIP
    /// `except` (one being removed).
    fn write_vip_addr(&mut self, addr: IpAddr, except: Option<usize>) -> Result<()> {
        let on_addr: Vec<&Vip> = self
            .vips
            .iter()
            .enumerate()
            .filter(|(i, v)| v.spec.address == addr && Some(*i) != except)
            .map(|(_, v)| v)
            .collect();
        let a = addr16(addr);
        if on_addr.is_empty() {
            self.dp.remove_vip_addr(&a)?;
        } else {
            let echo = on_addr.iter().any(|v| v.spec.echo_reply);
            let info = VipAddrInfo {
                flags: if echo { ADDR_F_ECHO_REPLY } else { 0 },
                refcount: on_addr.len() as u32,
            };
            self.dp.set_vip_addr(&a, &info)?;
        }
        Ok(())
    }

    fn start_check(&self, vip: &Vip, b: &mut Backend) {
        if let (Some(spawner), Some(hc)) = (&self.health, &vip.spec.health_check) {
            let target = CheckTarget {
                vip: vip.spec.id(),
                vip_id: vip.id,
                backend_id: b.id,
                address: b.spec.address,
                port: hc.port.unwrap_or(vip.spec.port),
                spec: hc.clone(),
                scope_id: b.hop.ifindex,
            };
            b.check = Some(spawner.spawn(target));
        }
    }

    fn new_backend(spec: BackendSpec, hop: NextHop, id: u32, vip_id: u32) -> Backend {
        // A next hop whose MAC is not known yet: down (out of the table) until it is.
        let unresolved = hop.mac == neigh::UNRESOLVED;
        if unresolved {
            tracing::warn!(
                backend = %spec.address,
                next_hop = %hop.via,
                "no MAC for the next hop yet (ARP/ND got no answer): down until it answers"
            );
        }
        Backend {
            last_error: unresolved.then(|| unresolved_error(&hop)),
            spec,
            id,
            vip_id,
            hop,
            health: if unresolved {
                HealthState::Down
            } else {
                HealthState::Up
            },
            streak: 0,
            check: None,
        }
    }

    /// Refuses a VIP that cannot be added, before anything changes.
    fn check_new_vip(&self, spec: &VipSpec) -> Result<()> {
        let id = spec.id();
        spec.validate(&self.agent)
            .map_err(|e| ServiceError::Invalid {
                what: format!("VIP {id}"),
                message: e.message,
            })?;
        if self.vips.iter().any(|v| v.spec.id() == id) {
            return Err(ServiceError::DuplicateVip(id));
        }
        if self.vips.len() >= MAX_VIPS as usize {
            return Err(ServiceError::Exhausted("VIP"));
        }
        if self.backend_ids.used.len() + spec.backends.len() > MAX_BACKENDS as usize {
            return Err(ServiceError::Exhausted("backend"));
        }
        Ok(())
    }

    fn resolve_all(&self, backends: &[BackendSpec]) -> Result<Vec<NextHop>> {
        backends.iter().map(|b| self.resolve(b)).collect()
    }

    /// Adds a VIP with its backends; their counters start at zero.
    pub fn add_vip(&mut self, spec: VipSpec) -> Result<()> {
        self.check_new_vip(&spec)?;
        let hops = self.resolve_all(&spec.backends)?;
        self.add_vip_resolved(spec, hops)
    }

    /// [`Services::add_vip`] with its checks passed and the backends' next hops resolved.
    fn add_vip_resolved(&mut self, spec: VipSpec, hops: Vec<NextHop>) -> Result<()> {
        let vip = NewId::fresh(self.vip_ids.take()?);
        let mut backends = Vec::with_capacity(spec.backends.len());
        for _ in &spec.backends {
            match self.backend_ids.take() {
                Ok(id) => backends.push(NewId::fresh(id)),
                Err(e) => {
                    self.release_ids(&NewIds { vip, backends });
                    return Err(e);
                }
            }
        }
        self.install_vip(spec, hops, NewIds { vip, backends })
    }

    fn release_ids(&mut self, ids: &NewIds) {
        self.vip_ids.release(ids.vip.id);
        for b in &ids.backends {
            self.backend_ids.release(b.id);
        }
    }

    /// Puts a checked VIP, whose ids are taken, into the view and the datapath. On an error
    /// what was written is removed again and the ids are free; if that removal fails too, the
    /// VIP stays listed, so that `vip del` can finish it.
    fn install_vip(&mut self, mut spec: VipSpec, hops: Vec<NextHop>, ids: NewIds) -> Result<()> {
        let id = spec.id();
        let backend_specs = std::mem::take(&mut spec.backends);
        let mut backends: Vec<Backend> = backend_specs
            .into_iter()
            .zip(hops)
            .zip(&ids.backends)
            .map(|((b, hop), bid)| Self::new_backend(b, hop, bid.id, ids.vip.id))
            .collect();
        // At start-up, a backend that the previous run had taken down (ALIVE clear under the
        // id it keeps) stays down until its checks pass `rise` times.
        if spec.health_check.is_some() {
            for (b, bid) in backends.iter_mut().zip(&ids.backends) {
                if !bid.inherited {
                    continue;
                }
                let before = match self.dp.backend(b.id) {
                    Ok(before) => before,
                    Err(e) => {
                        self.release_ids(&ids);
                        return Err(e.into());
                    }
                };
                if before.flags & BACKEND_F_ALIVE == 0 {
                    b.health = HealthState::Down;
                    b.last_error = Some("down before the agent restarted".into());
                }
            }
        }
        self.vips.push(Vip {
            key: vip_key(&id),
            spec,
            id: ids.vip.id,
            backends,
        });
        let vi = self.vips.len() - 1;
        if let Err(e) = self.program_vip(vi, &ids) {
            let change = format!("adding VIP {id}");
            return Err(match self.unprogram_vip(vi) {
                Ok(()) => {
                    self.forget_vip(vi);
                    Failure::undone(e, Ok(())).into_error(change)
                }
                Err(f) => Failure::undone(e, Err(*f.error)).into_error(change),
            });
        }
        let mut backends = std::mem::take(&mut self.vips[vi].backends);
        for b in &mut backends {
            self.start_check(&self.vips[vi], b);
        }
        self.vips[vi].backends = backends;
        let vip_id = ids.vip.id;
        tracing::info!(vip = %id, vip_id, backends = self.vips[vi].backends.len(), "VIP added");
        Ok(())
    }

    /// Writes a new VIP's backends, table and address entry to the datapath. Ids that do not
    /// continue a previous run's get their counters zeroed.
    fn program_vip(&mut self, vi: usize, ids: &NewIds) -> Result<()> {
        for (b, bid) in self.vips[vi].backends.iter().zip(&ids.backends) {
            Self::write_backend(&mut self.dp, b)?;
            if !bid.inherited {
                self.dp.reset_stats(None, Some(b.id))?;
            }
        }
        if !ids.vip.inherited {
            self.dp.reset_stats(Some(self.vips[vi].id), None)?;
        }
        self.install_table(vi)?;
        self.sync_vip_addr(self.vips[vi].spec.address)
    }

    /// Removes a VIP: new packets to it pass to the kernel; its backends' flows end. On an
    /// error the VIP is still listed and still installed (as far as undoing could put it
    /// back: the error says).
    pub fn del_vip(&mut self, id: &VipId) -> Result<()> {
        let vi = self.vip_index(id)?;
        self.unprogram_vip(vi)
            .map_err(|f| f.into_error(format!("removing VIP {id}")))?;
        self.forget_vip(vi);
        tracing::info!(vip = %id, "VIP removed");
        Ok(())
    }

    /// Takes VIP `vi` out of the datapath and leaves the view alone: first the VIP entry (new
    /// packets pass to the kernel and its flows stop matching), then its address entry, then
    /// its backends' ALIVE flags (so that their ids carry no flow to whoever reuses them). On
    /// an error what was done is put back: the VIP is installed again with the same table.
    fn unprogram_vip(&mut self, vi: usize) -> Result<(), Failure> {
        let key = self.vips[vi].key;
        let addr = self.vips[vi].spec.address;
        self.dp
            .remove_vip(&key)
            .map_err(|e| Failure::undone(e, Ok(())))?;
        if let Err(e) = self.write_vip_addr(addr, Some(vi)) {
            let undo = self.reprogram_vip(vi, 0);
            return Err(Failure::undone(e, undo));
        }
        for bi in 0..self.vips[vi].backends.len() {
            let b = &self.vips[vi].backends[bi];
            if let Err(e) = self
                .dp
                .set_backend(b.id, &Self::backend_info_alive(b, false))
            {
                let undo = self.reprogram_vip(vi, bi);
                return Err(Failure::undone(e, undo));
            }
        }
        Ok(())
    }

    /// Undoes a partial [`Services::unprogram_vip`]: the first `retired` backends get their
    /// state back, then the address entry and the VIP entry are written again.
    fn reprogram_vip(&mut self, vi: usize, retired: usize) -> Result<()> {
        for b in &self.vips[vi].backends[..retired] {
            Self::write_backend(&mut self.dp, b)?;
        }
        self.sync_vip_addr(self.vips[vi].spec.address)?;
        self.install_table(vi)
    }

    /// Drops VIP `vi` from the view (once it is out of the datapath): its checks stop, its
    /// ids are free.
    fn forget_vip(&mut self, vi: usize) {
        let vip = self.vips.remove(vi);
        for mut b in vip.backends {
            if let Some(h) = b.check.take() {
                h.abort();
            }
            self.backend_ids.release(b.id);
        }
        self.vip_ids.release(vip.id);
    }

    pub fn add_backend(&mut self, vip: &VipId, spec: BackendSpec) -> Result<()> {
        let vi = self.vip_index(vip)?;
        self.check_new_backend(vi, &spec)?;
        let hop = self.resolve(&spec)?;
        self.add_backend_resolved(vi, spec, hop)
    }

    /// Refuses a backend that cannot be added to VIP `vi`, before anything changes.
    fn check_new_backend(&self, vi: usize, spec: &BackendSpec) -> Result<()> {
        spec.validate(&self.vips[vi].spec)
            .map_err(|message| ServiceError::Invalid {
                what: format!("backend {}", spec.address),
                message,
            })?;
        if self.vips[vi]
            .backends
            .iter()
            .any(|b| b.spec.address == spec.address)
        {
            return Err(ServiceError::DuplicateBackend {
                vip: self.vips[vi].spec.id(),
                address: spec.address,
            });
        }
        let weighted = self.vips[vi]
            .backends
            .iter()
            .filter(|b| b.spec.weight > 0)
            .count()
            + usize::from(spec.weight > 0);
        self.check_fits(vi, weighted)
    }

    /// [`Services::add_backend`] with its checks passed and its next hop resolved.
    fn add_backend_resolved(&mut self, vi: usize, spec: BackendSpec, hop: NextHop) -> Result<()> {
        let vip = self.vips[vi].spec.id();
        let address = spec.address;
        let id = self.backend_ids.take()?;
        let b = Self::new_backend(spec, hop, id, self.vips[vi].id);
        self.vips[vi].backends.push(b);
        let bi = self.vips[vi].backends.len() - 1;
        let programmed = Self::write_backend(&mut self.dp, &self.vips[vi].backends[bi])
            .and_then(|()| Ok(self.dp.reset_stats(None, Some(id))?))
            .and_then(|()| self.install_table(vi));
        if let Err(e) = programmed {
            // Leave nothing half-installed.
            let b = self.vips[vi].backends.pop().expect("just pushed");
            let undo = self.install_table(vi).and_then(|()| {
                Ok(self
                    .dp
                    .set_backend(b.id, &Self::backend_info_alive(&b, false))?)
            });
            self.backend_ids.release(b.id);
            return Err(Failure::undone(e, undo)
                .into_error(format!("adding backend {address} to VIP {vip}")));
        }
        let mut b = self.vips[vi].backends.pop().expect("just pushed");
        self.start_check(&self.vips[vi], &mut b);
        self.vips[vi].backends.push(b);
        tracing::info!(vip = %vip, backend = %address, "backend added");
        Ok(())
    }

    /// Refuses a change that would leave the VIP with more weighted backends than its Maglev
    /// table has entries. Counted whatever their health, so that a backend coming back up
    /// can always be put in the table.
    fn check_fits(&self, vi: usize, weighted: usize) -> Result<()> {
        let size = self.vips[vi].spec.table_size.get();
        if weighted > size as usize {
            return Err(ServiceError::Maglev {
                vip: self.vips[vi].spec.id(),
                message: format!(
                    "{weighted} backends with weight do not fit a table of size {size}"
                ),
            });
        }
        Ok(())
    }

    fn backend_index(&self, vi: usize, address: IpAddr) -> Result<usize> {
        self.vips[vi]
            .backends
            .iter()
            .position(|b| b.spec.address == address)
            .ok_or(ServiceError::UnknownBackend {
                vip: self.vips[vi].spec.id(),
                address,
            })
    }

    /// Removes a backend: out of the table first, then its flows are re-picked (its ALIVE
    /// flag goes). On an error the backend is still listed and still installed (as far as
    /// undoing could put it back: the error says).
    pub fn del_backend(&mut self, vip: &VipId, address: IpAddr) -> Result<()> {
        let vi = self.vip_index(vip)?;
        let bi = self.backend_index(vi, address)?;
        let change = || format!("removing backend {address} from VIP {vip}");
        let mut b = self.vips[vi].backends.remove(bi);
        if let Err(e) = self.install_table(vi) {
            // The old table is still live (`Datapath::set_vip` switches last).
            self.vips[vi].backends.insert(bi, b);
            return Err(Failure::undone(e, Ok(())).into_error(change()));
        }
        if let Err(e) = self
            .dp
            .set_backend(b.id, &Self::backend_info_alive(&b, false))
        {
            self.vips[vi].backends.insert(bi, b);
            let undo = self.install_table(vi);
            return Err(Failure::undone(e, undo).into_error(change()));
        }
        if let Some(h) = b.check.take() {
            h.abort();
        }
        self.backend_ids.release(b.id);
        tracing::info!(vip = %vip, backend = %address, "backend removed");
        Ok(())
    }

    /// Changes a backend's weight; 0 drains it: no new flows, its established flows stay.
    pub fn set_weight(&mut self, vip: &VipId, address: IpAddr, weight: u32) -> Result<()> {
        let vi = self.vip_index(vip)?;
        let bi = self.backend_index(vi, address)?;
        let mut spec = self.vips[vi].backends[bi].spec.clone();
        spec.weight = weight;
        spec.validate(&self.vips[vi].spec)
            .map_err(|message| ServiceError::Invalid {
                what: format!("backend {address}"),
                message,
            })?;
        let weighted = self.vips[vi]
            .backends
            .iter()
            .enumerate()
            .filter(|(i, b)| {
                if *i == bi {
                    weight > 0
                } else {
                    b.spec.weight > 0
                }
            })
            .count();
        self.check_fits(vi, weighted)?;
        let old = std::mem::replace(&mut self.vips[vi].backends[bi].spec.weight, weight);
        if let Err(e) = self.install_table(vi) {
            // The old table is still live (`Datapath::set_vip` switches last).
            self.vips[vi].backends[bi].spec.weight = old;
            return Err(Failure::undone(e, Ok(())).into_error(format!(
                "setting the weight of backend {address} of VIP {vip}"
            )));
        }
        tracing::info!(vip = %vip, backend = %address, weight, "backend weight set");
        Ok(())
    }

    /// Applies one check result; flips the backend after `rise` / `fall` agreeing results.
    /// Follows the kernel's neighbour table (`table`, from [`neigh::neighbours`]): a backend
    /// (or its gateway) whose MAC changed, as when a NIC is replaced or a VM moves, would
    /// otherwise keep getting frames at the old MAC, lost while its health checks (sent by
    /// the kernel, which knows the new one) pass. Backends given a `mac` keep it. Returns how
    /// many backends changed.
    ///
    /// A backend whose next hop never answered ([`neigh::UNRESOLVED`]) is solicited again, and
    /// once its MAC is known it goes up (with health checks, once they pass `rise` times).
    pub fn refresh_next_hops(&mut self, table: &neigh::Neighbours) -> usize {
        let mut changed = 0;
        for vi in 0..self.vips.len() {
            let name = self.vips[vi].spec.id();
            let checked = self.vips[vi].spec.health_check.is_some();
            let mut table_changed = false;
            for b in &mut self.vips[vi].backends {
                if b.spec.mac.is_some() {
                    continue;
                }
                let unresolved = b.hop.mac == neigh::UNRESOLVED;
                let Some(&mac) = table.get(&(b.hop.via, b.hop.ifindex)) else {
                    if unresolved {
                        neigh::solicit(&b.hop);
                    }
                    continue;
                };
                if mac == b.hop.mac {
                    continue;
                }
                tracing::warn!(
                    vip = %name,
                    backend = %b.spec.address,
                    next_hop = %b.hop.via,
                    old = %crate::config::MacAddr(b.hop.mac),
                    new = %crate::config::MacAddr(mac),
                    "next hop MAC changed"
                );
                // Written from a copy, kept only once the datapath has it: a failed write is
                // tried again on the next pass.
                let mut next = Backend {
                    hop: NextHop { mac, ..b.hop },
                    check: None,
                    spec: b.spec.clone(),
                    last_error: b.last_error.clone(),
                    ..*b
                };
                if unresolved {
                    next.last_error = None;
                    if !checked {
                        next.health = HealthState::Up;
                    }
                }
                if let Err(e) = Self::write_backend(&mut self.dp, &next) {
                    tracing::warn!(backend = %b.spec.address, error = %e, "writing the new next hop");
                    continue;
                }
                table_changed |= next.health != b.health;
                (b.hop, b.health, b.last_error) = (next.hop, next.health, next.last_error);
                changed += 1;
            }
            if table_changed {
                if let Err(e) = self.install_table(vi) {
                    tracing::warn!(vip = %name, error = %e, "installing the table");
                }
            }
        }
        changed
    }

    pub fn health_report(&mut self, r: HealthReport) -> Result<()> {
        let Some(vi) = self.vips.iter().position(|v| v.id == r.vip_id) else {
            return Ok(());
        };
        let Some(hc) = self.vips[vi].spec.health_check.clone() else {
            return Ok(());
        };
        let Some(bi) = self.vips[vi]
            .backends
            .iter()
            .position(|b| b.id == r.backend_id && b.spec.address == r.address)
        else {
            return Ok(());
        };
        let vip = self.vips[vi].spec.id();
        let b = &mut self.vips[vi].backends[bi];
        let agrees = (b.health == HealthState::Up) == r.result.is_ok();
        if let Err(e) = &r.result {
            b.last_error = Some(e.clone());
        }
        if agrees {
            b.streak = 0;
            return Ok(());
        }
        b.streak += 1;
        let needed = if b.health == HealthState::Up {
            hc.fall
        } else {
            hc.rise
        };
        if b.streak < needed {
            return Ok(());
        }
        b.streak = 0;
        let address = b.spec.address;
        if b.health == HealthState::Up {
            b.health = HealthState::Down;
            let info = Self::backend_info(b);
            let id = b.id;
            tracing::warn!(
                vip = %vip,
                backend = %address,
                error = b.last_error.as_deref().unwrap_or(""),
                "backend down"
            );
            // New table first, then its flows re-pick from it.
            self.install_table(vi)?;
            self.dp.set_backend(id, &info)?;
        } else {
            // A backend that comes back may be a new machine behind the same address: look
            // its MAC up again (keeping the old one if the lookup fails).
            let spec = b.spec.clone();
            if spec.mac.is_none() {
                match self.resolve(&spec) {
                    Ok(hop) if hop.mac == neigh::UNRESOLVED => {
                        tracing::warn!(backend = %address, "no answer to ARP/ND: keeping the old MAC");
                    }
                    Ok(hop) => self.vips[vi].backends[bi].hop = hop,
                    Err(e) => tracing::warn!(backend = %address, error = %e, "keeping the old MAC"),
                }
            }
            let b = &mut self.vips[vi].backends[bi];
            if b.hop.mac == neigh::UNRESOLVED {
                // Answering health checks, but its MAC is still unknown: frames would go
                // nowhere. It stays down; the neighbour refresh brings it up.
                b.last_error = Some(unresolved_error(&b.hop));
                return Ok(());
            }
            b.health = HealthState::Up;
            b.last_error = None;
            tracing::info!(vip = %vip, backend = %address, "backend up");
            Self::write_backend(&mut self.dp, &self.vips[vi].backends[bi])?;
            self.install_table(vi)?;
        }
        Ok(())
    }

    fn backend_view(&self, vip: &Vip, b: &Backend) -> BackendView {
        BackendView {
            vip: vip.spec.id(),
            address: b.spec.address,
            id: b.id,
            weight: b.spec.weight,
            health: b.health,
            last_error: if b.health == HealthState::Down {
                b.last_error.clone()
            } else {
                None
            },
            mac: MacAddr(b.hop.mac).to_string(),
            ifindex: b.hop.ifindex,
            counters: self
                .dp
                .backend_stats(b.id)
                .map(Counters::from)
                .unwrap_or_default(),
        }
    }

    fn vip_view(&self, v: &Vip) -> VipView {
        VipView {
            vip: v.spec.id(),
            id: v.id,
            mode: v.spec.mode,
            table_size: v.spec.table_size.get(),
            echo_reply: v.spec.echo_reply,
            health_check: v.spec.health_check.clone(),
            counters: self
                .dp
                .vip_stats(v.id)
                .map(Counters::from)
                .unwrap_or_default(),
            backends: v.backends.iter().map(|b| self.backend_view(v, b)).collect(),
        }
    }

    /// Entries in the connection table (walks up to a million keys: for operators, not for
    /// every metrics scrape).
    pub fn count_flows(&self) -> Result<usize> {
        Ok(self.dp.flow_count()?)
    }

    pub fn list_vips(&self) -> Vec<VipView> {
        self.vips.iter().map(|v| self.vip_view(v)).collect()
    }

    pub fn list_backends(&self, vip: Option<&VipId>) -> Result<Vec<BackendView>> {
        if let Some(id) = vip {
            self.vip_index(id)?;
        }
        Ok(self
            .vips
            .iter()
            .filter(|v| vip.is_none_or(|id| v.spec.id() == *id))
            .flat_map(|v| v.backends.iter().map(|b| self.backend_view(v, b)))
            .collect())
    }

    /// Counters of every VIP and backend and the global reasons. `flows` is left out: counting
    /// the connection table walks it, which [`Services::count_flows`] does on request.
    pub fn stats(&self) -> Result<StatsView> {
        let global = self.dp.global_stats()?;
        Ok(StatsView {
            vips: self.list_vips(),
            global: common::reason::NAMES
                .iter()
                .zip(global)
                .filter(|(n, _)| **n != "unused")
                .map(|(n, c)| (n.to_string(), c))
                .collect(),
            flows: None,
        })
    }
}
