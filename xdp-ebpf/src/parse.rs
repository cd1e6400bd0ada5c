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
    // The helper, not data_end - data: LLVM may zero-extend data_end with shifts, and the
    // verifier forbids arithmetic on it.
    let len = unsafe { aya_ebpf::helpers::bpf_xdp_get_buff_len(ctx.ctx) };
    match ether_type {
        ETH_P_IP => {
            let ip = ptr_at::<Ipv4Hdr>(ctx, l2_len)?;
            let vihl = unsafe { (*ip).vihl };
            let ihl = ((vihl & 0x0f) as usize) << 2;
            if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
                return Err(Truncated);
            }
            let frags = u16::from_be_bytes(unsafe { (*ip).frags });
            let src = addr4(unsafe { (*ip).src_addr });
            let dst = addr4(unsafe { (*ip).dst_addr });
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
                src: load_addr6(unsafe { &raw const (*ip).src_addr }),
                dst: load_addr6(unsafe { &raw const (*ip).dst_addr }),
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

/// An IPv4 address in the 16-byte form the maps use, built from words: byte-array
/// initialisation would become calls to a byte-at-a-time memset/memcpy in BPF.
#[inline(always)]
pub fn addr4(b: [u8; 4]) -> [u8; 16] {
    let words = [u32::from_ne_bytes(b), 0u32, 0, 0];
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

/// A 16-byte address read from the packet as eight 16-bit words. IP headers sit at even
/// offsets behind Ethernet, so these loads are aligned; byte-wise copies would need a register
/// per byte and spill the stack.
#[inline(always)]
pub fn load_addr6(p: *const [u8; 16]) -> [u8; 16] {
    let w = p as *const u16;
    let words: [u16; 8] = unsafe {
        [
            w.read(),
            w.add(1).read(),
            w.add(2).read(),
            w.add(3).read(),
            w.add(4).read(),
            w.add(5).read(),
            w.add(6).read(),
            w.add(7).read(),
        ]
    };
    unsafe { core::mem::transmute::<[u16; 8], [u8; 16]>(words) }
}

/// Writes a 16-byte address into the packet as eight 16-bit words (see [`load_addr6`]).
#[inline(always)]
pub fn store_addr6(p: *mut [u8; 16], addr: [u8; 16]) {
    let words = unsafe { core::mem::transmute::<[u8; 16], [u16; 8]>(addr) };
    let w = p as *mut u16;
    for (i, word) in words.iter().enumerate() {
        unsafe { w.add(i).write(*word) };
    }
}

/// Writes a MAC address into the packet (one u32 and one u16 store).
#[inline(always)]
pub fn write_mac(dst: *mut [u8; 6], mac: &[u8; 6]) {
    let src = mac.as_ptr();
    let d = dst as *mut u8;
    unsafe {
        let hi = (src as *const u32).read_unaligned();
        let lo = (src.add(4) as *const u16).read_unaligned();
        (d as *mut u32).write_unaligned(hi);
        (d.add(4) as *mut u16).write_unaligned(lo);
    }
}

/// Reads a MAC address (from the packet or a map value) into a register-friendly copy.
#[inline(always)]
pub fn read_mac(src: *const [u8; 6]) -> [u8; 6] {
    let s = src as *const u8;
    let mut out = [0u8; 6];
    unsafe {
        let hi = (s as *const u32).read_unaligned();
        let lo = (s.add(4) as *const u16).read_unaligned();
        (out.as_mut_ptr() as *mut u32).write_unaligned(hi);
        (out.as_mut_ptr().add(4) as *mut u16).write_unaligned(lo);
    }
    out
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
