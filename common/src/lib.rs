//! The contract between the XDP datapath (`xdp-ebpf`) and userspace (`lb-userspace`).
//!
//! Every BPF map's name, key, value and size is defined here and nowhere else. The types are
//! `#[repr(C)]` with explicit padding so that the kernel program and the agent agree on the
//! byte layout; with the `user` feature they also implement `aya::Pod` so the agent can read
//! and write them through aya's typed maps.
//!
//! Addresses are stored as they appear on the wire (network byte order): an IPv4 address
//! occupies the first four bytes of a 16-byte `addr` and the rest is zero.
#![cfg_attr(not(test), no_std)]

pub mod maglev;

/// Names of the maps in the eBPF object. Userspace looks them up by these names.
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const VIP_BY_ID: &str = "VIP_BY_ID";
    pub const BACKENDS: &str = "BACKENDS";
    pub const RINGS: &str = "RINGS";
    pub const CONN_TABLE: &str = "CONN_TABLE";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const LB_CONFIG: &str = "LB_CONFIG";
    pub const TX_PORTS: &str = "TX_PORTS";
}

/// Names of the XDP programs in the eBPF object.
pub mod prog_names {
    /// The load balancer: attach to the interfaces that receive VIP traffic.
    pub const LB: &str = "xdp_lb";
    /// IPIP/IP6IP6 decapsulation: attach on backends that receive encapsulated traffic.
    pub const DECAP: &str = "xdp_decap";
    /// Passes everything. Attach to the peer of a veth so that XDP_TX/REDIRECT frames
    /// can be received (veth needs NAPI on the receiving side).
    pub const PASS: &str = "xdp_pass";
    /// Returns XDP_TX and does nothing else: the baseline of the program-cost benchmark.
    pub const BENCH_TX: &str = "xdp_bench_tx";
}

/// Most VIPs one datapath serves.
pub const MAX_VIPS: u32 = 64;
/// Most backends across all VIPs. Backend ids are indexes below this.
pub const MAX_BACKENDS: u32 = 4096;
/// Largest Maglev table size (a prime). Each ring slot in [`map_names::RINGS`] is this long.
pub const RING_SIZE_MAX: u32 = 65537;
/// Default Maglev table size M, as in the paper.
pub const RING_SIZE_DEFAULT: u32 = 65537;
/// Each VIP owns two ring slots: the datapath reads one while the agent writes the other.
pub const RING_SLOTS: u32 = MAX_VIPS * 2;
/// Entries in the connection table (LRU).
pub const CONN_TABLE_SIZE: u32 = 1 << 20;
/// Most egress interfaces for XDP_REDIRECT.
pub const MAX_TX_PORTS: u32 = 64;
/// Marks a ring entry with no backend (empty backend set).
pub const NO_BACKEND: u32 = u32::MAX;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// How a VIP's packets reach the chosen backend.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardMode {
    /// Rewrite the Ethernet destination to the backend's MAC and transmit (direct server return).
    L2Dsr = 0,
    /// Prepend an outer IPv4 (IPIP) or IPv6 (IP6IP6) header addressed to the backend.
    Ipip = 1,
}

impl ForwardMode {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::L2Dsr),
            1 => Some(Self::Ipip),
            _ => None,
        }
    }
}

/// Key of [`map_names::VIPS`]: a service address, port and L4 protocol.
///
/// The `align` attributes on this and the other address-carrying types add no padding (the
/// sizes are asserted below); they let the datapath copy addresses as words, not byte loops.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// Always zero (part of the hash key).
    pub _pad: [u8; 4],
}

/// Value of [`map_names::VIPS`]. Replaced whole (hash map update) so the datapath never sees
/// a half-written VIP; switching `ring` is how a new Maglev table goes live.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipMeta {
    /// Index into per-VIP stats and the VIP's pair of ring slots.
    pub vip_id: u32,
    /// The live ring slot (`vip_id * 2` or `vip_id * 2 + 1`).
    pub ring: u32,
    /// Maglev table size M for this VIP (prime, at most [`RING_SIZE_MAX`]).
    pub ring_size: u32,
    /// [`ForwardMode`] as u8.
    pub mode: u8,
    /// `VIP_F_*` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// Value of [`map_names::VIP_BY_ID`] (array indexed by `vip_id`): a copy of a VIP's key and
/// entry. Established flows find their VIP here, by the id in their connection-table entry,
/// instead of through a second hash lookup; `key` must match the packet, so a deleted VIP
/// (zeroed slot) or a reused id stops matching.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipSlot {
    pub key: VipKey,
    pub meta: VipMeta,
}

/// Hash only the source and destination addresses (no ports): all of a client's flows go to
/// one backend.
pub const VIP_F_HASH_NO_PORTS: u8 = 1 << 0;

/// Value of [`map_names::VIP_ADDRS`], keyed by a 16-byte address: what to do with packets to
/// a VIP address that match no VIP port (ICMP echo, fragments).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipAddrInfo {
    /// `ADDR_F_*` bits.
    pub flags: u32,
    /// Number of VIPs on this address (the agent removes the entry at zero).
    pub refcount: u32,
}

/// Answer ICMP echo requests to this VIP address from XDP (otherwise they pass to the kernel).
pub const ADDR_F_ECHO_REPLY: u32 = 1 << 0;

/// Value of [`map_names::BACKENDS`] (array indexed by backend id).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendInfo {
    /// The backend's IP (the IPIP outer destination).
    pub addr: [u8; 16],
    /// Next-hop MAC: the Ethernet destination written on forwarded frames.
    pub mac: [u8; 6],
    /// MAC of the egress interface: the Ethernet source written on forwarded frames.
    pub src_mac: [u8; 6],
    /// Egress ifindex for XDP_REDIRECT through [`map_names::TX_PORTS`]; 0 means XDP_TX out of
    /// the interface the packet came in on.
    pub ifindex: u32,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// The VIP this backend id belongs to (each backend id serves one VIP). An established
    /// flow stays on its backend only while the backend's `vip_id` is the flow's: an id freed
    /// by one VIP and reused by another VIP's backend must not capture the first VIP's flows.
    pub vip_id: u16,
}

/// The backend exists and is healthy: flows pinned to it keep going to it. A flow whose backend
/// lacks this bit (or belongs to another VIP) is re-picked from the Maglev table.
pub const BACKEND_F_ALIVE: u8 = 1 << 0;

/// Key of [`map_names::CONN_TABLE`]: the 5-tuple as seen on the client's packet.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Value of [`map_names::CONN_TABLE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEntry {
    pub backend_id: u32,
    pub vip_id: u32,
}

/// Per-CPU counters of one VIP or backend ([`map_names::VIP_STATS`], [`map_names::BACKEND_STATS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Value of [`map_names::LB_CONFIG`] (array of one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbConfig {
    /// Outer source address of IPIP packets.
    pub ipip_src_v4: [u8; 4],
    /// Outer source address of IP6IP6 packets.
    pub ipip_src_v6: [u8; 16],
    /// `CFG_F_*` bits.
    pub flags: u32,
}

/// Indexes of [`map_names::GLOBAL_STATS`] (per-CPU u64 counters): why each packet got its verdict.
pub mod reason {
    /// Not addressed to a VIP (or not IP): passed to the kernel untouched.
    pub const PASS_NOT_VIP: u32 = 0;
    /// Too short for the headers it claims: dropped if it could be VIP traffic, else passed.
    pub const DROP_MALFORMED: u32 = 1;
    /// An IP fragment addressed to a VIP: dropped (see README, "IP fragments").
    pub const DROP_FRAGMENT: u32 = 2;
    /// The VIP's Maglev table is empty (no healthy backend).
    pub const DROP_NO_BACKEND: u32 = 3;
    /// Forwarded by XDP_TX.
    pub const TX: u32 = 4;
    /// Forwarded by XDP_REDIRECT.
    pub const REDIRECT: u32 = 5;
    /// ICMP echo request to a VIP answered from XDP.
    pub const ICMP_ECHO_REPLY: u32 = 6;
    /// ICMP to a VIP address that we pass to the kernel (echo without the reply flag, others).
    pub const PASS_ICMP: u32 = 7;
    /// ICMP "fragmentation needed" / "packet too big" steered to the flow's backend.
    pub const ICMP_PTB_FORWARDED: u32 = 8;
    /// bpf_xdp_adjust_head failed (encapsulation impossible).
    pub const DROP_ENCAP_FAILED: u32 = 9;
    /// An established flow was found in the connection table.
    pub const CONN_HIT: u32 = 10;
    /// A flow was not in the connection table and was picked by Maglev.
    pub const CONN_MISS: u32 = 11;
    /// A flow's backend had gone away and it was re-picked.
    pub const CONN_REPICK: u32 = 12;
    /// Decap program: an IPIP/IP6IP6 packet was decapsulated.
    pub const DECAP_OK: u32 = 13;
    /// Packet to a VIP address and port with a protocol, family or IPv6 extension header
    /// we do not balance: passed to the kernel.
    pub const PASS_UNSUPPORTED: u32 = 14;
    pub const COUNT: u32 = 16;

    /// Human names, indexed by reason.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_vip",
        "drop_malformed",
        "drop_fragment",
        "drop_no_backend",
        "tx",
        "redirect",
        "icmp_echo_reply",
        "pass_icmp",
        "icmp_ptb_forwarded",
        "drop_encap_failed",
        "conn_hit",
        "conn_miss",
        "conn_repick",
        "decap_ok",
        "pass_unsupported",
        "unused",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for VipSlot {}
    unsafe impl aya::Pod for VipAddrInfo {}
    unsafe impl aya::Pod for BackendInfo {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for TrafficStats {}
    unsafe impl aya::Pod for LbConfig {}
}

/// Compile-time layout checks: the kernel and userspace must agree on these sizes.
const _: () = {
    assert!(core::mem::size_of::<VipKey>() == 24);
    assert!(core::mem::size_of::<VipMeta>() == 16);
    assert!(core::mem::size_of::<VipSlot>() == 40);
    assert!(core::mem::size_of::<BackendInfo>() == 36);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<FlowEntry>() == 8);
    assert!(core::mem::size_of::<TrafficStats>() == 24);
    assert!(core::mem::size_of::<LbConfig>() == 24);
    assert!(core::mem::align_of::<VipKey>() == 8);
    assert!(core::mem::align_of::<FlowKey>() == 8);
    assert!(MAX_VIPS <= u16::MAX as u32);
};
