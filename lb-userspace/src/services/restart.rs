//! Start-up over the maps a previous run left pinned: which ids the configured VIPs and
//! backends get, and what of the previous run's state goes.
//!
//! Ids index the per-id maps (BACKENDS, VIP_BY_ID, the counters), and a connection-table
//! entry names its flow's VIP and backend by id. So a VIP that the previous run had (same
//! address, port and protocol) keeps its id, and so does a backend it had (same VIP, same
//! address): their established flows and counters carry over, whatever else the file changed.
//! New VIPs and backends get ids that no kept one needs, ids the previous run did not use
//! where there are any; their counters start at zero. When some id of the previous run is not
//! kept, the connection table is walked once, before anything is installed, and every entry
//! that is not a kept VIP's flow on a kept backend is deleted: no new VIP or backend inherits
//! the flows of the one that had its id before. (Numbering from 0 in file order, as runtime
//! changes do, would give a new backend the id of one the file dropped, with its flows and
//! counters, and shift the ids of the backends after it onto each other's flows.)

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use common::{BackendInfo, VipKey, BACKEND_F_ALIVE, MAX_BACKENDS, MAX_VIPS};

use super::{addr16, family, vip_key, NewId, NewIds, Result, ServiceError, Services};
use crate::{config::VipSpec, datapath::Datapath};

/// What a previous run left in the maps.
#[derive(Debug, Default)]
pub(super) struct Previous {
    /// Each VIP entry's key and id.
    pub(super) vips: HashMap<VipKey, u32>,
    /// The BACKENDS array, by id (all zero: an id no run has used since it was last cleared).
    pub(super) backends: Vec<BackendInfo>,
}

impl Previous {
    fn read(dp: &Datapath) -> Result<Self> {
        let vips = dp
            .vips()?
            .into_iter()
            .map(|(key, meta)| (key, meta.vip_id))
            .collect();
        let backends = (0..MAX_BACKENDS)
            .map(|id| dp.backend(id))
            .collect::<Result<_, _>>()?;
        Ok(Self { vips, backends })
    }

    fn used_backend(&self, id: u32) -> bool {
        self.backends
            .get(id as usize)
            .is_some_and(|b| *b != BackendInfo::default())
    }

    /// The id the previous run gave `address` as a backend of VIP id `vip` (a live one first,
    /// as a backend removed at runtime leaves its entry behind with ALIVE clear).
    fn backend_id(&self, vip: u32, address: IpAddr, taken: &BTreeSet<u32>) -> Option<u32> {
        let (addr, fam) = (addr16(address), family(address));
        self.backends
            .iter()
            .zip(0u32..)
            .filter(|(b, id)| {
                b.addr == addr
                    && b.family == fam
                    && u32::from(b.vip_id) == vip
                    && !taken.contains(id)
            })
            .min_by_key(|(b, id)| (b.flags & BACKEND_F_ALIVE == 0, *id))
            .map(|(_, id)| id)
    }
}

/// The ids for `vips` (in order), given what the previous run left: kept VIPs and backends
/// first, then new ones on the smallest ids that nothing kept needs, preferring ids the
/// previous run did not use.
pub(super) fn plan(
    prev: &Previous,
    vips: &[VipSpec],
    vip_limit: u32,
    backend_limit: u32,
) -> Result<Vec<NewIds>> {
    let mut vip_taken = BTreeSet::new();
    let mut backend_taken = BTreeSet::new();
    let kept: Vec<(Option<u32>, Vec<Option<u32>>)> = vips
        .iter()
        .map(|spec| {
            let vip = prev
                .vips
                .get(&vip_key(&spec.id()))
                .copied()
                .filter(|id| *id < vip_limit && vip_taken.insert(*id));
            let backends = spec
                .backends
                .iter()
                .map(|b| {
                    let id = prev
                        .backend_id(vip?, b.address, &backend_taken)
                        .filter(|id| *id < backend_limit)?;
                    backend_taken.insert(id);
                    Some(id)
                })
                .collect();
            (vip, backends)
        })
        .collect();
    let vips_used_before: HashSet<u32> = prev.vips.values().copied().collect();
    kept.into_iter()
        .map(|(vip, backends)| {
            let vip = match vip {
                Some(id) => NewId {
                    id,
                    inherited: true,
                },
                None => NewId::fresh(pick(&mut vip_taken, vip_limit, "VIP", |id| {
                    vips_used_before.contains(&id)
                })?),
            };
            let backends = backends
                .into_iter()
                .map(|b| {
                    Ok(match b {
                        Some(id) => NewId {
                            id,
                            inherited: true,
                        },
                        None => NewId::fresh(pick(
                            &mut backend_taken,
                            backend_limit,
                            "backend",
                            |id| prev.used_backend(id),
                        )?),
                    })
                })
                .collect::<Result<_>>()?;
            Ok(NewIds { vip, backends })
        })
        .collect()
}

/// The smallest id below `limit` not taken, one that `used_before` refuses if there is one.
fn pick(
    taken: &mut BTreeSet<u32>,
    limit: u32,
    what: &'static str,
    used_before: impl Fn(u32) -> bool,
) -> Result<u32> {
    let id = (0..limit)
        .filter(|id| !taken.contains(id))
        .min_by_key(|id| (used_before(*id), *id))
        .ok_or(ServiceError::Exhausted(what))?;
    taken.insert(id);
    Ok(id)
}

impl Services {
    /// Installs the configured `vips` over what a previous run left in the pinned maps (see
    /// the module doc), then removes that run's leftovers.
    pub fn start(&mut self, vips: &[VipSpec]) -> Result<()> {
        let prev = Previous::read(&self.dp)?;
        let plan = plan(&prev, vips, MAX_VIPS, MAX_BACKENDS)?;

        // VIPs the file no longer has go first, before their ids and ring slots are reused.
        let keys: HashSet<VipKey> = vips.iter().map(|v| vip_key(&v.id())).collect();
        for key in prev.vips.keys().filter(|k| !keys.contains(k)) {
            self.dp.remove_vip(key)?;
            tracing::info!(?key, "removed a VIP left by a previous run");
        }

        // Then the flows that no kept VIP and backend own, before any id changes hands.
        let kept: HashSet<(u32, u32)> = plan
            .iter()
            .filter(|ids| ids.vip.inherited)
            .flat_map(|ids| {
                ids.backends
                    .iter()
                    .filter(|b| b.inherited)
                    .map(|b| (ids.vip.id, b.id))
            })
            .collect();
        let kept_vips: HashSet<u32> = kept.iter().map(|(vip, _)| *vip).collect();
        let kept_backends: HashSet<u32> = kept.iter().map(|(_, b)| *b).collect();
        let vip_gone = prev.vips.values().any(|id| !kept_vips.contains(id));
        let backend_gone =
            (0..MAX_BACKENDS).any(|id| prev.used_backend(id) && !kept_backends.contains(&id));
        if vip_gone || backend_gone {
            let started = std::time::Instant::now();
            let forgotten = self
                .dp
                .forget_flows(|e| kept.contains(&(e.vip_id, e.backend_id)))?;
            tracing::info!(
                flows = forgotten,
                took = ?started.elapsed(),
                "forgot the flows of VIPs and backends the configuration no longer has"
            );
        }

        for (spec, ids) in vips.iter().zip(plan) {
            let id = spec.id();
            self.start_vip(spec.clone(), ids)
                .map_err(|e| ServiceError::Step {
                    step: format!("setting up VIP {id}"),
                    source: Box::new(e),
                })?;
        }
        self.remove_leftovers()
    }

    /// Adds one configured VIP with the ids planned for it.
    fn start_vip(&mut self, spec: VipSpec, ids: NewIds) -> Result<()> {
        self.check_new_vip(&spec)?;
        let hops = self.resolve_all(&spec.backends)?;
        self.vip_ids.claim(ids.vip.id)?;
        for (i, b) in ids.backends.iter().enumerate() {
            if let Err(e) = self.backend_ids.claim(b.id) {
                self.vip_ids.release(ids.vip.id);
                for taken in &ids.backends[..i] {
                    self.backend_ids.release(taken.id);
                }
                return Err(e);
            }
        }
        self.install_vip(spec, hops, ids)
    }

    /// Removes VIPs and VIP addresses this agent does not serve, and clears the entries of
    /// backend ids it does not use (their flows are gone: see [`Services::start`]), so that
    /// the next start-up sees them as unused.
    fn remove_leftovers(&mut self) -> Result<()> {
        let keys: HashSet<VipKey> = self.vips.iter().map(|v| v.key).collect();
        for key in self.dp.vip_keys()? {
            if !keys.contains(&key) {
                self.dp.remove_vip(&key)?;
                tracing::info!(?key, "removed a VIP left by a previous run");
            }
        }
        let addrs: HashSet<[u8; 16]> = self.vips.iter().map(|v| v.key.addr).collect();
        for addr in self.dp.vip_addrs()? {
            if !addrs.contains(&addr) {
                self.dp.remove_vip_addr(&addr)?;
            }
        }
        for id in 0..MAX_BACKENDS {
            if self.backend_ids.used.contains(&id) {
                continue;
            }
            if self.dp.backend(id)? != BackendInfo::default() {
                self.dp.set_backend(id, &BackendInfo::default())?;
            }
        }
        Ok(())
    }
}
