//! Header parsing. Every access to packet memory goes through [`ptr_at`] / [`ptr_at_mut`],
//! which check the access against `data_end` so the verifier accepts it and a truncated packet
//! is reported instead of read past its end.

use aya_ebpf::programs::XdpContext;
use common::{AF_INET, AF_INET6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPV6_NH_FRAGMENT: u8 = 44;
pub const VLAN_HLEN: usize = 4;

/// The packet is shorter than the headers it announces.
pub struct Truncated;

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Truncated> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(Truncated);
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Truncated> {
    Ok(ptr_at::<T>(ctx, offset)? as *mut T)
}

/// What the datapath needs to know about a packet.
pub struct Packet {
    /// Length of the Ethernet header including an 802.1Q tag (14 or 18).
    pub l2_len: usize,
    /// Offset of the L4 header.
    pub l4_off: usize,
    pub family: u8,
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// IPv4 MF set or offset non-zero; IPv6 with a fragment header.
    pub fragment: bool,
    /// IPv6 with an extension header other than fragment: not balanced.
    pub unsupported: bool,
    /// Total frame length, for byte counters.
    pub len: u64,
}

/// What the L2/L3 parse found.
pub enum L3 {
    /// Not IPv4 or IPv6: not ours.
    Other,
    Ip(Packet),
}

/// Parses Ethernet (with at most one 802.1Q/802.1ad tag) and the IP header.
#[inline(always)]
pub fn parse_l3(ctx: &XdpContext) -> Result<L3, Truncated> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l2_len = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        // The tag's TCI, then the encapsulated ethertype.
        let inner = ptr_at::<[u8; 2]>(ctx, EthHdr::LEN + 2)?;
        ether_type = u16::from_be_bytes(unsafe { *inner });
        l2_len += VLAN_HLEN;
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    match ether_type {
        ETH_P_IP => {
            let ip = ptr_at::<Ipv4Hdr>(ctx, l2_len)?;
            let vihl = unsafe { (*ip).vihl };
            let ihl = ((vihl & 0x0f) as usize) << 2;
            if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
                return Err(Truncated);
            }
            let frags = u16::from_be_bytes(unsafe { (*ip).frags });
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src[..4].copy_from_slice(unsafe { &(*ip).src_addr });
            dst[..4].copy_from_slice(unsafe { &(*ip).dst_addr });
            Ok(L3::Ip(Packet {
                l2_len,
                l4_off: l2_len + ihl,
                family: AF_INET,
                proto: unsafe { (*ip).proto },
                src,
                dst,
                // MF flag or a non-zero fragment offset.
                fragment: frags & 0x3fff != 0,
                unsupported: false,
                len,
            }))
        }
        ETH_P_IPV6 => {
            let ip = ptr_at::<Ipv6Hdr>(ctx, l2_len)?;
            if unsafe { (*ip).vcf[0] } >> 4 != 6 {
                return Err(Truncated);
            }
            let nh = unsafe { (*ip).next_hdr };
            Ok(L3::Ip(Packet {
                l2_len,
                l4_off: l2_len + Ipv6Hdr::LEN,
                family: AF_INET6,
                proto: nh,
                src: unsafe { (*ip).src_addr },
                dst: unsafe { (*ip).dst_addr },
                fragment: nh == IPV6_NH_FRAGMENT,
                unsupported: !matches!(
                    nh,
                    IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6 | IPV6_NH_FRAGMENT
                ),
                len,
            }))
        }
        _ => Ok(L3::Other),
    }
}

/// Reads TCP or UDP ports (both start with source and destination port), after checking that
/// the whole fixed TCP (20 bytes) or UDP (8 bytes) header is present.
#[inline(always)]
pub fn read_ports(ctx: &XdpContext, off: usize, proto: u8) -> Result<(u16, u16), Truncated> {
    if proto == IPPROTO_TCP {
        ptr_at::<TcpHdr>(ctx, off)?;
    } else {
        ptr_at::<UdpHdr>(ctx, off)?;
    }
    let p = ptr_at::<[u8; 4]>(ctx, off)?;
    let b = unsafe { *p };
    // Kept in network byte order, as stored in the maps.
    Ok((
        u16::from_ne_bytes([b[0], b[1]]),
        u16::from_ne_bytes([b[2], b[3]]),
    ))
}

/// Whether `proto` carries ports we balance on.
#[inline(always)]
pub fn has_ports(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP
}

#[inline(always)]
pub fn is_icmp(family: u8, proto: u8) -> bool {
    (family == AF_INET && proto == IPPROTO_ICMP) || (family == AF_INET6 && proto == IPPROTO_ICMPV6)
}
