//! Sending a packet to its backend: L2 DSR (rewrite MACs) or IPIP / IP6IP6 encapsulation,
//! then XDP_TX out of the ingress interface or XDP_REDIRECT to the backend's interface.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use common::{reason, BackendInfo, ForwardMode, VipMeta, AF_INET, IPPROTO_IPIP, IPPROTO_IPV6};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    csum,
    maps::{count, LB_CONFIG, TX_PORTS},
    parse::{ptr_at, ptr_at_mut, write_mac, Packet, Truncated},
};

/// Forwards the packet to `backend` as the VIP's mode says; returns the XDP action.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, vip: &VipMeta, backend: &BackendInfo) -> u32 {
    let rewritten = if vip.mode == ForwardMode::Ipip as u8 {
        encapsulate(ctx, pkt, backend)
    } else {
        rewrite_macs(ctx, backend)
    };
    if rewritten.is_err() {
        aya_log_ebpf::warn!(ctx, "encapsulation to backend failed: packet dropped");
        count(reason::DROP_ENCAP_FAILED);
        return xdp_action::XDP_DROP;
    }
    transmit(ctx, backend)
}

#[inline(always)]
fn rewrite_macs(ctx: &XdpContext, backend: &BackendInfo) -> Result<(), Truncated> {
    let eth = ptr_at_mut::<EthHdr>(ctx, 0)?;
    unsafe {
        write_mac(&raw mut (*eth).dst_addr, &backend.mac);
        write_mac(&raw mut (*eth).src_addr, &backend.src_mac);
    }
    Ok(())
}

/// XDP_TX when the backend is reached through the ingress interface, else XDP_REDIRECT.
#[inline(always)]
fn transmit(ctx: &XdpContext, backend: &BackendInfo) -> u32 {
    if backend.ifindex == 0 || backend.ifindex == ctx.ingress_ifindex() as u32 {
        count(reason::TX);
        return xdp_action::XDP_TX;
    }
    count(reason::REDIRECT);
    TX_PORTS
        .redirect(backend.ifindex, xdp_action::XDP_DROP as u64)
        .unwrap_or(xdp_action::XDP_DROP)
}

/// Prepends an outer IPv4 (protocol 4) or IPv6 (next header 41) header addressed to the
/// backend, keeping the Ethernet header (and its VLAN tag) in front of it.
#[inline(always)]
fn encapsulate(ctx: &XdpContext, pkt: &Packet, backend: &BackendInfo) -> Result<(), Truncated> {
    let cfg = LB_CONFIG.get(0).ok_or(Truncated)?;
    // The tag and the ethertype that follow the MACs, read before the headers move.
    let l2_tail = *unsafe { &*ptr_at::<[u8; 6]>(ctx, 12)? };
    if pkt.family == AF_INET {
        let inner = ptr_at::<Ipv4Hdr>(ctx, pkt.l2_len)?;
        let inner_len = u16::from_be_bytes(unsafe { (*inner).tot_len });
        let tos = unsafe { (*inner).tos };
        let mut outer = Ipv4Hdr {
            vihl: 0x45,
            tos,
            tot_len: (inner_len.wrapping_add(Ipv4Hdr::LEN as u16)).to_be_bytes(),
            id: [0, 0],
            frags: [0, 0],
            ttl: 64,
            proto: IPPROTO_IPIP,
            check: [0, 0],
            src_addr: cfg.ipip_src_v4,
            dst_addr: [
                backend.addr[0],
                backend.addr[1],
                backend.addr[2],
                backend.addr[3],
            ],
        };
        outer.check = csum::ipv4_header(&outer).to_be_bytes();
        grow_head(ctx, Ipv4Hdr::LEN)?;
        write_l2(ctx, pkt.l2_len, backend, &l2_tail)?;
        let dst = ptr_at_mut::<Ipv4Hdr>(ctx, pkt.l2_len)?;
        unsafe { *dst = outer };
    } else {
        let inner = ptr_at::<Ipv6Hdr>(ctx, pkt.l2_len)?;
        let payload = u16::from_be_bytes(unsafe { (*inner).payload_len });
        let vcf = unsafe { (*inner).vcf };
        let outer = Ipv6Hdr {
            // Keep the inner traffic class; no flow label.
            vcf: [vcf[0], vcf[1] & 0xf0, 0, 0],
            payload_len: payload.wrapping_add(Ipv6Hdr::LEN as u16).to_be_bytes(),
            next_hdr: IPPROTO_IPV6,
            hop_limit: 64,
            src_addr: cfg.ipip_src_v6,
            dst_addr: backend.addr,
        };
        grow_head(ctx, Ipv6Hdr::LEN)?;
        write_l2(ctx, pkt.l2_len, backend, &l2_tail)?;
        let dst = ptr_at_mut::<Ipv6Hdr>(ctx, pkt.l2_len)?;
        unsafe { *dst = outer };
    }
    Ok(())
}

#[inline(always)]
fn grow_head(ctx: &XdpContext, len: usize) -> Result<(), Truncated> {
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(len as i32)) } != 0 {
        return Err(Truncated);
    }
    Ok(())
}

/// Writes the Ethernet header (and VLAN tag when `l2_len` is 18) at the start of the packet.
#[inline(always)]
fn write_l2(
    ctx: &XdpContext,
    l2_len: usize,
    backend: &BackendInfo,
    tail: &[u8; 6],
) -> Result<(), Truncated> {
    let eth = ptr_at_mut::<EthHdr>(ctx, 0)?;
    unsafe {
        write_mac(&raw mut (*eth).dst_addr, &backend.mac);
        write_mac(&raw mut (*eth).src_addr, &backend.src_mac);
        (*eth).ether_type = u16::from_ne_bytes([tail[0], tail[1]]);
    }
    if l2_len > EthHdr::LEN {
        let tag = ptr_at_mut::<[u8; 4]>(ctx, EthHdr::LEN)?;
        unsafe { *tag = [tail[2], tail[3], tail[4], tail[5]] };
    }
    Ok(())
}
