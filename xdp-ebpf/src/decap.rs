//! Decapsulation for backends: an IPv4 packet with protocol 4 (IPIP) or an IPv6 packet with
//! next header 41 (IP6IP6) loses its outer header; the Ethernet header (and VLAN tag) moves up
//! in front of the inner packet, which then passes to the kernel as if it had arrived directly.
//! Everything else passes untouched.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use common::{reason, AF_INET, IPPROTO_IPIP, IPPROTO_IPV6};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    drop,
    maps::count,
    parse::{parse_l3, ptr_at, ptr_at_mut, Truncated, L3},
};

pub fn process(ctx: &XdpContext) -> u32 {
    let pkt = match parse_l3(ctx) {
        Ok(L3::Ip(pkt)) => pkt,
        _ => return xdp_action::XDP_PASS,
    };
    let expected = if pkt.family == AF_INET {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    if pkt.proto != expected || pkt.fragment {
        return xdp_action::XDP_PASS;
    }
    match strip(ctx, pkt.l2_len, pkt.l4_off - pkt.l2_len) {
        Ok(()) => {
            count(reason::DECAP_OK);
            xdp_action::XDP_PASS
        }
        Err(_) => drop(reason::DROP_MALFORMED),
    }
}

/// Removes `outer_len` bytes after the L2 header.
#[inline(always)]
fn strip(ctx: &XdpContext, l2_len: usize, outer_len: usize) -> Result<(), Truncated> {
    // The inner IP header must be there: at least its first 20 bytes.
    ptr_at::<Ipv4Hdr>(ctx, l2_len + outer_len)?;
    let eth = unsafe { *ptr_at::<EthHdr>(ctx, 0)? };
    let tag = unsafe { *ptr_at::<[u8; 4]>(ctx, EthHdr::LEN)? };
    if outer_len > 60 || unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return Err(Truncated);
    }
    let new_eth = ptr_at_mut::<EthHdr>(ctx, 0)?;
    unsafe { *new_eth = eth };
    if l2_len > EthHdr::LEN {
        let new_tag = ptr_at_mut::<[u8; 4]>(ctx, EthHdr::LEN)?;
        unsafe { *new_tag = tag };
    }
    Ok(())
}
