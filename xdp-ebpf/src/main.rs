//! The XDP datapath of the L4 load balancer.
//!
//! `xdp_lb` reads top to bottom: parse → look up the VIP → find the flow or pick by Maglev →
//! rewrite or encapsulate → count → act. Packets that are not for a VIP leave with XDP_PASS
//! untouched. `xdp_decap` runs on backends and strips the IPIP / IP6IP6 header that `xdp_lb`
//! adds (this kernel has no ipip module). `xdp_pass` lets a veth peer receive XDP_TX frames.
//!
//! IP fragments addressed to a VIP address are dropped and counted (`drop_fragment`), as
//! Katran does: only the first fragment carries ports, so the others cannot be steered
//! consistently. IPv6 packets with extension headers (other than a fragment header) are passed
//! to the kernel.
#![no_std]
#![no_main]

mod csum;
mod decap;
mod forward;
mod icmp;
mod maps;
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use common::{
    maglev::flow_hash, reason, BackendInfo, FlowEntry, FlowKey, VipKey, VipMeta, BACKEND_F_ALIVE,
    NO_BACKEND, RING_SIZE_MAX, VIP_F_HASH_NO_PORTS,
};

use maps::{
    account, count, BACKENDS, BACKEND_STATS, CONN_TABLE, RINGS, VIPS, VIP_ADDRS, VIP_BY_ID,
    VIP_STATS,
};
use parse::{has_ports, is_icmp, parse_l3, read_ports, Packet, L3};

#[xdp]
pub fn xdp_lb(ctx: XdpContext) -> u32 {
    process(&ctx)
}

#[xdp]
pub fn xdp_decap(ctx: XdpContext) -> u32 {
    decap::process(&ctx)
}

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Baseline for the program-cost benchmark: transmits every packet untouched.
#[xdp]
pub fn xdp_bench_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[inline(always)]
pub(crate) fn pass(why: u32) -> u32 {
    count(why);
    xdp_action::XDP_PASS
}

#[inline(always)]
pub(crate) fn drop(why: u32) -> u32 {
    count(why);
    xdp_action::XDP_DROP
}

#[inline(always)]
fn is_vip_addr(addr: &[u8; 16]) -> bool {
    unsafe { VIP_ADDRS.get(addr) }.is_some()
}

const PARSED_IP: u32 = 0;
const PARSED_OTHER: u32 = 1;
const PARSED_TRUNCATED: u32 = 2;

/// Parses into `out` in a frame of its own, so the parse's temporaries do not sit on the stack
/// under the ICMP and balancing frames. Returns one of the `PARSED_*` codes.
#[inline(never)]
fn parse(ctx: &XdpContext, out: *mut Packet) -> u32 {
    match parse_l3(ctx) {
        Ok(L3::Ip(pkt)) => {
            unsafe { out.write(pkt) };
            PARSED_IP
        }
        Ok(L3::Other) => PARSED_OTHER,
        Err(_) => PARSED_TRUNCATED,
    }
}

fn process(ctx: &XdpContext) -> u32 {
    // Not zero-initialised: BPF has no memset, LLVM would call a byte loop for it.
    let mut slot = core::mem::MaybeUninit::<Packet>::uninit();
    match parse(ctx, slot.as_mut_ptr()) {
        PARSED_IP => {}
        PARSED_OTHER => return pass(reason::PASS_NOT_VIP),
        _ => return drop(reason::DROP_MALFORMED),
    }
    // SAFETY: `parse` wrote a whole Packet when it returned PARSED_IP.
    let pkt = unsafe { slot.assume_init_ref() };
    if pkt.fragment {
        return if is_vip_addr(&pkt.dst) {
            drop(reason::DROP_FRAGMENT)
        } else {
            pass(reason::PASS_NOT_VIP)
        };
    }
    if is_icmp(pkt.family, pkt.proto) {
        return icmp::handle(ctx, pkt);
    }
    if pkt.unsupported || !has_ports(pkt.proto) {
        return if is_vip_addr(&pkt.dst) {
            pass(reason::PASS_UNSUPPORTED)
        } else {
            pass(reason::PASS_NOT_VIP)
        };
    }
    l4(ctx, pkt)
}

/// TCP and UDP: an established flow goes straight to its backend (one hash lookup: the
/// connection table); anything else looks up the VIP and balances. A separate frame from
/// `process` (see `balance`).
#[inline(never)]
fn l4(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let Ok((sport, dport)) = read_ports(ctx, pkt.l4_off, pkt.proto) else {
        return if is_vip_addr(&pkt.dst) {
            drop(reason::DROP_MALFORMED)
        } else {
            pass(reason::PASS_NOT_VIP)
        };
    };
    let key = VipKey {
        addr: pkt.dst,
        port: dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 4],
    };
    let flow = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport,
        dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    };
    let entry = unsafe { CONN_TABLE.get(&flow) };
    if let Some(e) = entry {
        if let Some(slot) = VIP_BY_ID.get(e.vip_id) {
            if slot.key == key {
                if let Some(b) = BACKENDS.get(e.backend_id) {
                    if b.flags & BACKEND_F_ALIVE != 0 && b.vip_id as u32 == e.vip_id {
                        count(reason::CONN_HIT);
                        return deliver(ctx, pkt, &slot.meta, e.backend_id, b, false);
                    }
                }
            }
        }
    }
    let Some(vip) = (unsafe { VIPS.get(&key) }) else {
        return pass(reason::PASS_NOT_VIP);
    };
    let lookup = if entry.is_some() {
        Lookup::Stale
    } else {
        Lookup::Missed
    };
    balance(ctx, pkt, vip, &flow, lookup)
}

/// What is known of the flow's connection-table entry when balancing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Looked up, absent: pick and record.
    Missed,
    /// Looked up, present but its backend or VIP is gone: re-pick and record.
    Stale,
    /// Not looked up yet: look, keep the flow on its backend if the entry is valid, but never
    /// record a new one (ICMP errors steered to a flow's backend).
    NoTrack,
}

/// Picks the flow's backend and delivers the packet to it.
/// Not inlined: its stack frame must not add to its callers' (the verifier caps the total).
#[inline(never)]
pub(crate) fn balance(
    ctx: &XdpContext,
    pkt: &Packet,
    vip: &VipMeta,
    flow: &FlowKey,
    lookup: Lookup,
) -> u32 {
    match select_backend(vip, flow, lookup) {
        Some((id, backend, new_flow)) => deliver(ctx, pkt, vip, id, backend, new_flow),
        None => {
            // Rare (an empty table): worth a line in the agent's log.
            aya_log_ebpf::warn!(ctx, "VIP {} has no backend: packet dropped", vip.vip_id);
            drop(reason::DROP_NO_BACKEND)
        }
    }
}

/// Forwards the packet to its backend and counts it.
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    pkt: &Packet,
    vip: &VipMeta,
    backend_id: u32,
    backend: &BackendInfo,
    new_flow: bool,
) -> u32 {
    let action = forward::forward(ctx, pkt, vip, backend);
    if action != xdp_action::XDP_DROP {
        account(&VIP_STATS, vip.vip_id, pkt.len, new_flow);
        account(&BACKEND_STATS, backend_id, pkt.len, new_flow);
    }
    action
}

/// The connection table first (established flows stay on their backend while it is alive),
/// then the VIP's live Maglev table.
#[inline(always)]
fn select_backend(
    vip: &VipMeta,
    flow: &FlowKey,
    lookup: Lookup,
) -> Option<(u32, &'static BackendInfo, bool)> {
    match lookup {
        Lookup::NoTrack => {
            if let Some(entry) = unsafe { CONN_TABLE.get(flow) } {
                let id = entry.backend_id;
                if entry.vip_id == vip.vip_id {
                    if let Some(b) = BACKENDS.get(id) {
                        if b.flags & BACKEND_F_ALIVE != 0 && b.vip_id as u32 == vip.vip_id {
                            count(reason::CONN_HIT);
                            return Some((id, b, false));
                        }
                    }
                }
                count(reason::CONN_REPICK);
            } else {
                count(reason::CONN_MISS);
            }
        }
        Lookup::Missed => count(reason::CONN_MISS),
        Lookup::Stale => count(reason::CONN_REPICK),
    }
    let hash = if vip.flags & VIP_F_HASH_NO_PORTS != 0 {
        flow_hash(&flow.src, &flow.dst, 0, 0, flow.proto)
    } else {
        flow_hash(&flow.src, &flow.dst, flow.sport, flow.dport, flow.proto)
    };
    if vip.ring_size == 0 || vip.ring_size > RING_SIZE_MAX {
        return None;
    }
    let slot = vip
        .ring
        .wrapping_mul(RING_SIZE_MAX)
        .wrapping_add(hash % vip.ring_size);
    let id = *RINGS.get(slot)?;
    if id == NO_BACKEND {
        return None;
    }
    let b = BACKENDS.get(id)?;
    if lookup != Lookup::NoTrack {
        let entry = FlowEntry {
            backend_id: id,
            vip_id: vip.vip_id,
        };
        let _ = CONN_TABLE.insert(flow, &entry, 0);
    }
    Some((id, b, true))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
