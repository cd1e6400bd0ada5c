//! Internet checksums (RFC 1071) and their incremental update (RFC 1624).

use network_types::ip::Ipv4Hdr;

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Checksum of a 20-byte IPv4 header (its `check` field must be zero).
#[inline(always)]
pub fn ipv4_header(h: &Ipv4Hdr) -> u16 {
    let w = |b: [u8; 2]| u16::from_be_bytes(b) as u32;
    let sum = w([h.vihl, h.tos])
        + w(h.tot_len)
        + w(h.id)
        + w(h.frags)
        + w([h.ttl, h.proto])
        + w(h.check)
        + w([h.src_addr[0], h.src_addr[1]])
        + w([h.src_addr[2], h.src_addr[3]])
        + w([h.dst_addr[0], h.dst_addr[1]])
        + w([h.dst_addr[2], h.dst_addr[3]]);
    !fold(sum)
}

/// New checksum after one 16-bit word of the covered data changed from `old` to `new`
/// (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')). All values in host order.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + new as u32;
    !fold(sum)
}
