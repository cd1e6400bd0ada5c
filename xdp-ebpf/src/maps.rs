//! The maps of the datapath. Names, keys, values and sizes come from `common`; the agent
//! finds them by name. Stateful maps are pinned by name so that a restarted agent (which loads
//! with a pin path) picks up the connection table and configuration as they were.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use common::{
    BackendInfo, FlowEntry, FlowKey, LbConfig, TrafficStats, VipAddrInfo, VipKey, VipMeta, VipSlot,
    CONN_TABLE_SIZE, MAX_BACKENDS, MAX_TX_PORTS, MAX_VIPS, RING_SIZE_MAX, RING_SLOTS,
};

#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::pinned(MAX_VIPS, 0);

#[map]
pub static VIP_BY_ID: Array<VipSlot> = Array::pinned(MAX_VIPS, 0);

#[map]
pub static VIP_ADDRS: HashMap<[u8; 16], VipAddrInfo> = HashMap::pinned(MAX_VIPS, 0);

#[map]
pub static BACKENDS: Array<BackendInfo> = Array::pinned(MAX_BACKENDS, 0);

/// `RING_SLOTS` Maglev tables of `RING_SIZE_MAX` backend ids each, laid end to end.
#[map]
pub static RINGS: Array<u32> = Array::pinned(RING_SLOTS * RING_SIZE_MAX, 0);

/// BPF_F_NO_COMMON_LRU: each CPU evicts from its own LRU list, so inserts take no shared lock.
#[map]
pub static CONN_TABLE: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::pinned(CONN_TABLE_SIZE, BPF_F_NO_COMMON_LRU);

#[map]
pub static VIP_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_VIPS, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_BACKENDS, 0);

#[map]
pub static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::pinned(common::reason::COUNT, 0);

#[map]
pub static LB_CONFIG: Array<LbConfig> = Array::pinned(1, 0);

/// Egress interfaces for backends that sit behind another interface (key: ifindex).
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);

const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

#[inline(always)]
pub fn count(reason: u32) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(reason) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn account(stats: &PerCpuArray<TrafficStats>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(s) = stats.get_ptr_mut(index) {
        let s = unsafe { &mut *s };
        s.packets += 1;
        s.bytes += bytes;
        if new_flow {
            s.new_flows += 1;
        }
    }
}
