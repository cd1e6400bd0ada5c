//! Typed access to the loaded XDP datapath: the one place in userspace that reads and writes
//! the maps whose layout `common` defines.
//!
//! A [`Datapath`] is the loaded object with its maps pinned under a directory on bpffs, so a
//! restarted agent that loads with the same directory finds the connection table and the
//! configuration as they were. VIP updates are atomic for the datapath: a new Maglev table is
//! written into the VIP's idle ring slot first, and only then is the VIP's entry (one hash-map
//! element, replaced whole by the kernel) switched to that slot.

use std::path::{Path, PathBuf};

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp},
    Ebpf, EbpfError, EbpfLoader,
};
use common::{
    map_names as names, reason, BackendInfo, FlowEntry, FlowKey, LbConfig, TrafficStats,
    VipAddrInfo, VipKey, VipMeta, VipSlot, CONN_TABLE_SIZE, MAX_BACKENDS, MAX_VIPS, RING_SIZE_MAX,
};

/// Errors from the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the XDP object: {0}")]
    Load(#[from] EbpfError),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}: {source}")]
    Program {
        name: String,
        #[source]
        source: ProgramError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(String),
    #[error("VIP id {0} is out of range (at most {MAX_VIPS} VIPs)")]
    VipIdOutOfRange(u32),
    #[error("backend id {0} is out of range (at most {MAX_BACKENDS} backends)")]
    BackendIdOutOfRange(u32),
    #[error("Maglev table of {0} entries is larger than {RING_SIZE_MAX}")]
    TableTooLarge(usize),
    #[error("map TX_PORTS: {0}")]
    TxPort(String),
    #[error("counting possible CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("creating pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// The loaded XDP object and its maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// Writes the tests make fail, to check that callers undo what they had done.
    #[cfg(test)]
    pub(crate) faults: faults::Faults,
}

impl Datapath {
    /// Loads the embedded object, pinning (or reusing already pinned) maps under `pin_dir`,
    /// which must be on a bpffs mount. Programs are loaded into the kernel but not attached.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(pin_dir).map_err(|source| DatapathError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(crate::EBPF_OBJECT)?;
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            #[cfg(test)]
            faults: faults::Faults::default(),
        };
        for name in [
            common::prog_names::LB,
            common::prog_names::DECAP,
            common::prog_names::PASS,
            common::prog_names::BENCH_TX,
        ] {
            dp.xdp(name)?
                .load()
                .map_err(|source| DatapathError::Program {
                    name: name.into(),
                    source,
                })?;
        }
        Ok(dp)
    }

    /// Where the maps are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The underlying aya object (to attach programs, read logs).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// One of the XDP programs (`common::prog_names`).
    pub fn xdp(&mut self, name: &str) -> Result<&mut Xdp> {
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| DatapathError::Missing(format!("program {name}")))?;
        prog.try_into().map_err(|source| DatapathError::Program {
            name: name.into(),
            source,
        })
    }

    /// A map to write to (every write goes through here).
    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        #[cfg(test)]
        self.faults.check(name)?;
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| DatapathError::Missing(format!("map {name}")))
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| DatapathError::Missing(format!("map {name}")))
    }

    pub fn set_config(&mut self, cfg: &LbConfig) -> Result<()> {
        let mut m: Array<&mut MapData, LbConfig> =
            Array::try_from(self.map_mut(names::LB_CONFIG)?).map_err(map_err(names::LB_CONFIG))?;
        m.set(0, cfg, 0).map_err(map_err(names::LB_CONFIG))
    }

    /// Writes backend `id`. Write a new id before any table refers to it.
    pub fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<()> {
        if id >= MAX_BACKENDS {
            return Err(DatapathError::BackendIdOutOfRange(id));
        }
        let mut m: Array<&mut MapData, BackendInfo> =
            Array::try_from(self.map_mut(names::BACKENDS)?).map_err(map_err(names::BACKENDS))?;
        m.set(id, info, 0).map_err(map_err(names::BACKENDS))
    }

    pub fn backend(&self, id: u32) -> Result<BackendInfo> {
        let m: Array<&MapData, BackendInfo> =
            Array::try_from(self.map(names::BACKENDS)?).map_err(map_err(names::BACKENDS))?;
        m.get(&id, 0).map_err(map_err(names::BACKENDS))
    }

    /// The VIP's entry, if it exists.
    pub fn vip(&self, key: &VipKey) -> Result<Option<VipMeta>> {
        let m: HashMap<&MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map(names::VIPS)?).map_err(map_err(names::VIPS))?;
        match m.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::VIPS)(e)),
        }
    }

    /// The keys of all VIPs in the map (those a previous run left included).
    pub fn vip_keys(&self) -> Result<Vec<VipKey>> {
        let m: HashMap<&MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map(names::VIPS)?).map_err(map_err(names::VIPS))?;
        m.keys()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(map_err(names::VIPS))
    }

    /// Installs `table` for the VIP and makes it live atomically: the table goes into the
    /// VIP's idle ring slot, then the VIP's copy in VIP_BY_ID (which established flows read
    /// for the mode only), then the VIP entry switches to the new slot. `meta.ring` and
    /// `meta.ring_size` are set here; the other fields are the caller's. On an error the live
    /// entries are as they were (the idle slot may hold part of the new table).
    pub fn set_vip(&mut self, key: &VipKey, mut meta: VipMeta, table: &[u32]) -> Result<VipMeta> {
        if meta.vip_id >= MAX_VIPS {
            return Err(DatapathError::VipIdOutOfRange(meta.vip_id));
        }
        if table.len() > RING_SIZE_MAX as usize {
            return Err(DatapathError::TableTooLarge(table.len()));
        }
        let first = meta.vip_id * 2;
        let old = self.vip(key)?;
        let slot = match old {
            Some(old) if old.vip_id == meta.vip_id && old.ring == first => first + 1,
            _ => first,
        };
        {
            let mut rings: Array<&mut MapData, u32> =
                Array::try_from(self.map_mut(names::RINGS)?).map_err(map_err(names::RINGS))?;
            let base = slot * RING_SIZE_MAX;
            for (i, id) in table.iter().enumerate() {
                rings
                    .set(base + i as u32, id, 0)
                    .map_err(map_err(names::RINGS))?;
            }
        }
        meta.ring = slot;
        meta.ring_size = table.len() as u32;
        let old_slot = self.vip_slot(meta.vip_id)?;
        self.set_vip_slot(meta.vip_id, &VipSlot { key: *key, meta })?;
        let inserted = self
            .vips_map_mut()
            .and_then(|mut m| m.insert(key, &meta, 0).map_err(map_err(names::VIPS)));
        if let Err(e) = inserted {
            if let Err(undo) = self.set_vip_slot(meta.vip_id, &old_slot) {
                tracing::error!(vip_id = meta.vip_id, error = %undo, "restoring VIP_BY_ID after a failed VIP write");
            }
            return Err(e);
        }
        Ok(meta)
    }

    fn vips_map_mut(&mut self) -> Result<HashMap<&mut MapData, VipKey, VipMeta>> {
        HashMap::try_from(self.map_mut(names::VIPS)?).map_err(map_err(names::VIPS))
    }

    /// The VIP id's entry in VIP_BY_ID (all zero when unused).
    fn vip_slot(&self, vip_id: u32) -> Result<VipSlot> {
        let m: Array<&MapData, VipSlot> =
            Array::try_from(self.map(names::VIP_BY_ID)?).map_err(map_err(names::VIP_BY_ID))?;
        m.get(&vip_id, 0).map_err(map_err(names::VIP_BY_ID))
    }

    /// The copy that established flows find by id (see `common::VipSlot`).
    fn set_vip_slot(&mut self, vip_id: u32, slot: &VipSlot) -> Result<()> {
        let mut m: Array<&mut MapData, VipSlot> =
            Array::try_from(self.map_mut(names::VIP_BY_ID)?).map_err(map_err(names::VIP_BY_ID))?;
        m.set(vip_id, slot, 0).map_err(map_err(names::VIP_BY_ID))
    }

    /// Removes the VIP; its established flows stop matching (the id's slot is cleared). On an
    /// error the VIP is left as it was.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        let Some(meta) = self.vip(key)? else {
            return Ok(());
        };
        let old_slot = self.vip_slot(meta.vip_id)?;
        self.set_vip_slot(meta.vip_id, &VipSlot::default())?;
        let removed = self.vips_map_mut().and_then(|mut m| match m.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::VIPS)(e)),
        });
        if let Err(e) = removed {
            if let Err(undo) = self.set_vip_slot(meta.vip_id, &old_slot) {
                tracing::error!(vip_id = meta.vip_id, error = %undo, "restoring VIP_BY_ID after a failed VIP removal");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Every VIP entry (those a previous run left included) with its id and live table.
    pub fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>> {
        let m: HashMap<&MapData, VipKey, VipMeta> =
            HashMap::try_from(self.map(names::VIPS)?).map_err(map_err(names::VIPS))?;
        m.iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(map_err(names::VIPS))
    }

    /// The VIP's live Maglev table, if the VIP exists.
    #[cfg(test)]
    pub(crate) fn live_table(&self, key: &VipKey) -> Result<Option<Vec<u32>>> {
        let Some(meta) = self.vip(key)? else {
            return Ok(None);
        };
        let rings: Array<&MapData, u32> =
            Array::try_from(self.map(names::RINGS)?).map_err(map_err(names::RINGS))?;
        let base = meta.ring * RING_SIZE_MAX;
        (0..meta.ring_size)
            .map(|i| rings.get(&(base + i), 0).map_err(map_err(names::RINGS)))
            .collect::<Result<_>>()
            .map(Some)
    }

    /// Marks (or updates) a VIP address: ICMP and fragment handling look here.
    pub fn set_vip_addr(&mut self, addr: &[u8; 16], info: &VipAddrInfo) -> Result<()> {
        let mut m: HashMap<&mut MapData, [u8; 16], VipAddrInfo> =
            HashMap::try_from(self.map_mut(names::VIP_ADDRS)?)
                .map_err(map_err(names::VIP_ADDRS))?;
        m.insert(addr, info, 0).map_err(map_err(names::VIP_ADDRS))
    }

    /// The addresses in VIP_ADDRS (those a previous run left included).
    pub fn vip_addrs(&self) -> Result<Vec<[u8; 16]>> {
        let m: HashMap<&MapData, [u8; 16], VipAddrInfo> =
            HashMap::try_from(self.map(names::VIP_ADDRS)?).map_err(map_err(names::VIP_ADDRS))?;
        m.keys()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(map_err(names::VIP_ADDRS))
    }

    pub fn remove_vip_addr(&mut self, addr: &[u8; 16]) -> Result<()> {
        let mut m: HashMap<&mut MapData, [u8; 16], VipAddrInfo> =
            HashMap::try_from(self.map_mut(names::VIP_ADDRS)?)
                .map_err(map_err(names::VIP_ADDRS))?;
        match m.remove(addr) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::VIP_ADDRS)(e)),
        }
    }

    /// Lets XDP_REDIRECT send to `ifindex` (backends behind another interface).
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        let mut m: aya::maps::DevMapHash<&mut MapData> =
            aya::maps::DevMapHash::try_from(self.map_mut(names::TX_PORTS)?)
                .map_err(map_err(names::TX_PORTS))?;
        m.insert(ifindex, ifindex, None, 0)
            .map_err(|e| DatapathError::TxPort(e.to_string()))
    }

    /// The connection-table entry of a flow, if any.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowEntry>> {
        let m: HashMap<&MapData, FlowKey, FlowEntry> =
            HashMap::try_from(self.map(names::CONN_TABLE)?).map_err(map_err(names::CONN_TABLE))?;
        match m.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::CONN_TABLE)(e)),
        }
    }

    /// Deletes the connection-table entries that `keep` refuses; returns how many. Walks the
    /// whole table (up to [`CONN_TABLE_SIZE`] entries): for start-up, not for every change.
    /// Flows the datapath records while it walks are not all seen.
    pub fn forget_flows(&mut self, keep: impl Fn(&FlowEntry) -> bool) -> Result<usize> {
        let stale: Vec<FlowKey> = {
            let m: HashMap<&MapData, FlowKey, FlowEntry> =
                HashMap::try_from(self.map(names::CONN_TABLE)?)
                    .map_err(map_err(names::CONN_TABLE))?;
            // An entry evicted under the walk makes the kernel start again from the first key:
            // the bound keeps a busy table from holding the walk for ever.
            m.iter()
                .take(2 * CONN_TABLE_SIZE as usize)
                .filter_map(|kv| match kv {
                    Ok((k, v)) => (!keep(&v)).then_some(Ok(k)),
                    Err(e) => Some(Err(e)),
                })
                .collect::<std::result::Result<_, _>>()
                .map_err(map_err(names::CONN_TABLE))?
        };
        let mut m: HashMap<&mut MapData, FlowKey, FlowEntry> =
            HashMap::try_from(self.map_mut(names::CONN_TABLE)?)
                .map_err(map_err(names::CONN_TABLE))?;
        let mut forgotten = 0;
        for k in &stale {
            match m.remove(k) {
                Ok(()) => forgotten += 1,
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(names::CONN_TABLE)(e)),
            }
        }
        Ok(forgotten)
    }

    /// Number of entries in the connection table (walks it: for stats, not hot paths).
    pub fn flow_count(&self) -> Result<usize> {
        let m: HashMap<&MapData, FlowKey, FlowEntry> =
            HashMap::try_from(self.map(names::CONN_TABLE)?).map_err(map_err(names::CONN_TABLE))?;
        Ok(m.keys().filter(|k| k.is_ok()).count())
    }

    fn traffic(&self, name: &'static str, index: u32) -> Result<TrafficStats> {
        let m: PerCpuArray<&MapData, TrafficStats> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        let per_cpu = m.get(&index, 0).map_err(map_err(name))?;
        Ok(per_cpu
            .iter()
            .fold(TrafficStats::default(), |acc, s| TrafficStats {
                packets: acc.packets + s.packets,
                bytes: acc.bytes + s.bytes,
                new_flows: acc.new_flows + s.new_flows,
            }))
    }

    /// Counters of one VIP, summed over CPUs.
    pub fn vip_stats(&self, vip_id: u32) -> Result<TrafficStats> {
        self.traffic(names::VIP_STATS, vip_id)
    }

    /// Counters of one backend, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<TrafficStats> {
        self.traffic(names::BACKEND_STATS, id)
    }

    /// Zeroes a VIP's or backend's counters (when an id is reused).
    pub fn reset_stats(&mut self, vip_id: Option<u32>, backend_id: Option<u32>) -> Result<()> {
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        for (name, index) in [
            (names::VIP_STATS, vip_id),
            (names::BACKEND_STATS, backend_id),
        ] {
            if let Some(index) = index {
                let mut m: PerCpuArray<&mut MapData, TrafficStats> =
                    PerCpuArray::try_from(self.map_mut(name)?).map_err(map_err(name))?;
                let zero = aya::maps::PerCpuValues::try_from(vec![
                    TrafficStats::default();
                    ncpus.get() as usize
                ])
                .map_err(DatapathError::Cpus)?;
                m.set(index, zero, 0).map_err(map_err(name))?;
            }
        }
        Ok(())
    }

    /// Global counters by reason (`common::reason`), summed over CPUs.
    pub fn global_stats(&self) -> Result<[u64; reason::COUNT as usize]> {
        let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(names::GLOBAL_STATS)?)
            .map_err(map_err(names::GLOBAL_STATS))?;
        let mut out = [0u64; reason::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = m
                .get(&(i as u32), 0)
                .map_err(map_err(names::GLOBAL_STATS))?
                .iter()
                .sum();
        }
        Ok(out)
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at `mount_point` unless one is already there (pinning needs it). Calls within
/// one process are serialised, so two of them never stack two mounts (the second would hide
/// what was pinned in the first).
pub fn ensure_bpffs(mount_point: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MOUNTING.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(mount_point)?;
    let c_path = CString::new(mount_point.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = CString::new("bpf").expect("no NUL");
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            c_path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Loads only the helper programs (`xdp_pass`, `xdp_decap`) from the embedded object, for
/// hosts that do not balance: backends that decapsulate, and veth peers that must receive
/// XDP_TX frames. The maps they share with `xdp_lb` are created tiny in `pin_dir`, which the
/// caller may remove once the programs are attached; `pin_dir`'s parent gets a bpffs mount if
/// it is not on one.
pub fn load_helper_programs(pin_dir: &Path) -> Result<Ebpf> {
    if let Some(root) = pin_dir.parent() {
        ensure_bpffs(root).map_err(|source| DatapathError::PinDir {
            path: root.to_owned(),
            source,
        })?;
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| DatapathError::PinDir {
        path: pin_dir.to_owned(),
        source,
    })?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .map_max_entries(names::CONN_TABLE, 16)
        .map_max_entries(names::RINGS, 16)
        .load(crate::EBPF_OBJECT)?;
    for name in [common::prog_names::PASS, common::prog_names::DECAP] {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or_else(|| DatapathError::Missing(format!("program {name}")))?
            .try_into()
            .map_err(|source| DatapathError::Program {
                name: name.into(),
                source,
            })?;
        prog.load().map_err(|source| DatapathError::Program {
            name: name.into(),
            source,
        })?;
    }
    Ok(ebpf)
}

/// Map writes that fail on purpose, so that tests can check what a change does when the
/// datapath refuses one of its writes.
#[cfg(test)]
pub(crate) mod faults {
    use super::{DatapathError, MapError};

    #[derive(Debug, Default)]
    pub(crate) struct Faults {
        map: Option<&'static str>,
        /// Writes to `map` that still succeed before the failures start.
        after: u32,
        /// Writes that fail after those; then writes succeed again.
        failures: u32,
    }

    impl Faults {
        /// The next `failures` writes to `map`, after `after` successful ones, fail.
        pub(crate) fn fail(&mut self, map: &'static str, after: u32, failures: u32) {
            *self = Self {
                map: Some(map),
                after,
                failures,
            };
        }

        pub(super) fn check(&mut self, name: &'static str) -> Result<(), DatapathError> {
            if self.map != Some(name) || self.failures == 0 {
                return Ok(());
            }
            if self.after > 0 {
                self.after -= 1;
                return Ok(());
            }
            self.failures -= 1;
            Err(DatapathError::Map {
                name,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_elem",
                    io_error: std::io::Error::from_raw_os_error(libc::EIO),
                }),
            })
        }
    }
}
