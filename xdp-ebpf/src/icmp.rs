//! ICMP and ICMPv6 addressed to a VIP address: echo requests are answered from XDP when the
//! address has `ADDR_F_ECHO_REPLY` (else passed to the kernel), and "fragmentation needed" /
//! "packet too big" errors are steered to the backend that owns the flow quoted inside them, so
//! path MTU discovery works for direct-server-return backends. Other ICMP passes.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use common::{reason, FlowKey, VipKey, ADDR_F_ECHO_REPLY, AF_INET, IPPROTO_TCP, IPPROTO_UDP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    balance, csum, drop,
    maps::{count, VIPS, VIP_ADDRS},
    parse::{
        addr4, load_addr6, ptr_at, ptr_at_mut, read_mac, store_addr6, write_mac, Packet, Truncated,
    },
    pass, Lookup,
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_ECHO: u8 = 8;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// ICMP header length before the quoted packet.
const ICMP_HLEN: usize = 8;

/// Returns the XDP action. Not inlined, and returns a plain u32: a bigger return value would
/// travel through the caller's stack, which the verifier refuses at the callee's exit.
#[inline(never)]
pub fn handle(ctx: &XdpContext, pkt: &Packet) -> u32 {
    classify(ctx, pkt).unwrap_or_else(|_| drop(reason::DROP_MALFORMED))
}

#[inline(always)]
fn classify(ctx: &XdpContext, pkt: &Packet) -> Result<u32, Truncated> {
    let Some(addr) = (unsafe { VIP_ADDRS.get(&pkt.dst) }) else {
        return Ok(pass(reason::PASS_NOT_VIP));
    };
    let echo_reply = addr.flags & ADDR_F_ECHO_REPLY != 0;
    let hdr = ptr_at::<[u8; 4]>(ctx, pkt.l4_off)?;
    let (kind, code) = unsafe { ((*hdr)[0], (*hdr)[1]) };
    if pkt.family == AF_INET {
        match kind {
            ICMP_ECHO if echo_reply => echo_v4(ctx, pkt, code),
            ICMP_DEST_UNREACH if code == ICMP_FRAG_NEEDED => too_big(ctx, pkt),
            _ => Ok(pass(reason::PASS_ICMP)),
        }
    } else {
        match kind {
            ICMPV6_ECHO_REQUEST if echo_reply => echo_v6(ctx, pkt, code),
            ICMPV6_PKT_TOOBIG => too_big(ctx, pkt),
            _ => Ok(pass(reason::PASS_ICMP)),
        }
    }
}

#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> Result<(), Truncated> {
    let eth = ptr_at_mut::<EthHdr>(ctx, 0)?;
    unsafe {
        let src = read_mac(&raw const (*eth).src_addr);
        let dst = read_mac(&raw const (*eth).dst_addr);
        write_mac(&raw mut (*eth).src_addr, &dst);
        write_mac(&raw mut (*eth).dst_addr, &src);
    }
    Ok(())
}

#[inline(always)]
fn echo_v4(ctx: &XdpContext, pkt: &Packet, code: u8) -> Result<u32, Truncated> {
    // The whole ICMP header must be there before anything is written.
    let icmp = ptr_at_mut::<[u8; ICMP_HLEN]>(ctx, pkt.l4_off)?;
    let ip = ptr_at_mut::<Ipv4Hdr>(ctx, pkt.l2_len)?;
    swap_macs(ctx)?;
    unsafe {
        let (src, dst) = ((*ip).src_addr, (*ip).dst_addr);
        (*ip).src_addr = dst;
        (*ip).dst_addr = src;
        let old = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        (*ip).ttl = 64;
        let new = u16::from_be_bytes([(*ip).ttl, (*ip).proto]);
        let check = u16::from_be_bytes((*ip).check);
        (*ip).check = csum::replace2(check, old, new).to_be_bytes();

        let icmp = &mut *icmp;
        let check = u16::from_be_bytes([icmp[2], icmp[3]]);
        let new = csum::replace2(
            check,
            u16::from_be_bytes([ICMP_ECHO, code]),
            u16::from_be_bytes([ICMP_ECHO_REPLY, code]),
        );
        icmp[0] = ICMP_ECHO_REPLY;
        [icmp[2], icmp[3]] = new.to_be_bytes();
    }
    count(reason::ICMP_ECHO_REPLY);
    Ok(xdp_action::XDP_TX)
}

#[inline(always)]
fn echo_v6(ctx: &XdpContext, pkt: &Packet, code: u8) -> Result<u32, Truncated> {
    let icmp = ptr_at_mut::<[u8; ICMP_HLEN]>(ctx, pkt.l4_off)?;
    let ip = ptr_at_mut::<Ipv6Hdr>(ctx, pkt.l2_len)?;
    swap_macs(ctx)?;
    unsafe {
        // Swapping source and destination leaves the pseudo-header sum unchanged.
        let src = load_addr6(&raw const (*ip).src_addr);
        let dst = load_addr6(&raw const (*ip).dst_addr);
        store_addr6(&raw mut (*ip).src_addr, dst);
        store_addr6(&raw mut (*ip).dst_addr, src);
        (*ip).hop_limit = 64;
        let icmp = &mut *icmp;
        let check = u16::from_be_bytes([icmp[2], icmp[3]]);
        let new = csum::replace2(
            check,
            u16::from_be_bytes([ICMPV6_ECHO_REQUEST, code]),
            u16::from_be_bytes([ICMPV6_ECHO_REPLY, code]),
        );
        icmp[0] = ICMPV6_ECHO_REPLY;
        [icmp[2], icmp[3]] = new.to_be_bytes();
    }
    count(reason::ICMP_ECHO_REPLY);
    Ok(xdp_action::XDP_TX)
}

/// The quoted packet went from the VIP to the client; the flow it belongs to runs the other
/// way. Steer the error to that flow's backend without creating a connection entry.
#[inline(always)]
fn too_big(ctx: &XdpContext, pkt: &Packet) -> Result<u32, Truncated> {
    let inner_off = pkt.l4_off + ICMP_HLEN;
    let (vsrc, vdst, proto, ports_off) = if pkt.family == AF_INET {
        let ip = ptr_at::<Ipv4Hdr>(ctx, inner_off)?;
        let ihl = ((unsafe { (*ip).vihl } & 0x0f) as usize) << 2;
        if ihl < Ipv4Hdr::LEN {
            return Err(Truncated);
        }
        (
            addr4(unsafe { (*ip).src_addr }),
            addr4(unsafe { (*ip).dst_addr }),
            unsafe { (*ip).proto },
            inner_off + ihl,
        )
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, inner_off)?;
        (
            load_addr6(unsafe { &raw const (*ip).src_addr }),
            load_addr6(unsafe { &raw const (*ip).dst_addr }),
            unsafe { (*ip).next_hdr },
            inner_off + Ipv6Hdr::LEN,
        )
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(pass(reason::PASS_ICMP));
    }
    // ICMP quotes at least 8 bytes of the L4 header: enough for the ports.
    let ports = ptr_at::<[u8; 4]>(ctx, ports_off)?;
    let p = unsafe { *ports };
    let vport = u16::from_ne_bytes([p[0], p[1]]);
    let cport = u16::from_ne_bytes([p[2], p[3]]);
    let key = VipKey {
        addr: vsrc,
        port: vport,
        proto,
        family: pkt.family,
        _pad: [0; 4],
    };
    let Some(vip) = (unsafe { VIPS.get(&key) }) else {
        return Ok(pass(reason::PASS_ICMP));
    };
    let flow = FlowKey {
        src: vdst,
        dst: vsrc,
        sport: cport,
        dport: vport,
        proto,
        family: pkt.family,
        _pad: [0; 2],
    };
    let action = balance(ctx, pkt, vip, &flow, Lookup::NoTrack);
    if action == xdp_action::XDP_TX || action == xdp_action::XDP_REDIRECT {
        count(reason::ICMP_PTB_FORWARDED);
    }
    Ok(action)
}
