//! Packet fixtures through the real XDP program (BPF_PROG_TEST_RUN): each test fills the maps,
//! runs crafted packets and checks the action and the exact bytes that come out.

use common::{reason, ForwardMode, VipAddrInfo, ADDR_F_ECHO_REPLY, IPPROTO_TCP, IPPROTO_UDP};
use etherparse::{IpNumber, PacketBuilder, SlicedPacket, TransportSlice, VlanId};
use integration_tests::{
    fixture::{
        inet_csum, vip_key_v4, vip_key_v6, Fixture, TestBackend, CLIENT_MAC, IPIP_SRC_V4,
        IPIP_SRC_V6, LB_MAC,
    },
    packets::{tcp4, tcp6, udp4, udp6, PAYLOAD},
    require_bpf,
};
use lb_userspace::testrun::{action_name, XDP_DROP, XDP_PASS, XDP_TX};

const VIP4: [u8; 4] = [192, 0, 2, 10];
const CLIENT4: [u8; 4] = [198, 51, 100, 7];
const VIP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];

fn backends4() -> Vec<TestBackend> {
    (0..3)
        .map(|i| TestBackend::v4(i, [10, 0, 1, 10 + i as u8]))
        .collect()
}

fn backends6() -> Vec<TestBackend> {
    (0..3)
        .map(|i| {
            let mut a = [0u8; 16];
            a[..2].copy_from_slice(&[0xfd, 0x01]);
            a[15] = 10 + i as u8;
            TestBackend::v6(i, a)
        })
        .collect()
}

/// The backend whose MAC the program wrote, by id.
fn backend_by_mac(out: &[u8], backends: &[TestBackend]) -> u32 {
    backends
        .iter()
        .find(|b| out[..6] == b.mac)
        .unwrap_or_else(|| panic!("destination MAC {:02x?} is no backend's", &out[..6]))
        .id
}

/// Input with the MACs rewritten as DSR does: what must come out, byte for byte.
fn dsr_expected(input: &[u8], backend: &TestBackend) -> Vec<u8> {
    let mut e = input.to_vec();
    e[..6].copy_from_slice(&backend.mac);
    e[6..12].copy_from_slice(&LB_MAC);
    e
}

/// Ethernet + outer IPv4 (proto 4) + the original IP packet: built independently here.
fn ipip4_expected(input: &[u8], backend: &TestBackend, l2_len: usize) -> Vec<u8> {
    let inner = &input[l2_len..];
    let mut outer = vec![0x45, inner[1]];
    outer.extend_from_slice(&((inner.len() + 20) as u16).to_be_bytes());
    outer.extend_from_slice(&[0, 0, 0, 0, 64, 4, 0, 0]);
    outer.extend_from_slice(&IPIP_SRC_V4);
    outer.extend_from_slice(&backend.addr[..4]);
    let c = inet_csum(&outer);
    outer[10..12].copy_from_slice(&c.to_be_bytes());
    let mut e = backend.mac.to_vec();
    e.extend_from_slice(&LB_MAC);
    e.extend_from_slice(&input[12..l2_len]);
    e.extend_from_slice(&outer);
    e.extend_from_slice(inner);
    e
}

fn ipip6_expected(input: &[u8], backend: &TestBackend) -> Vec<u8> {
    let inner = &input[14..];
    let mut e = backend.mac.to_vec();
    e.extend_from_slice(&LB_MAC);
    e.extend_from_slice(&[0x86, 0xdd]);
    e.extend_from_slice(&[inner[0], inner[1] & 0xf0, 0, 0]);
    e.extend_from_slice(&(inner.len() as u16).to_be_bytes());
    e.extend_from_slice(&[41, 64]);
    e.extend_from_slice(&IPIP_SRC_V6);
    e.extend_from_slice(&backend.addr);
    e.extend_from_slice(inner);
    e
}

fn assert_action(run_action: u32, want: u32, what: &str) {
    assert_eq!(
        run_action,
        want,
        "{what}: got {} want {}",
        action_name(run_action),
        action_name(want)
    );
}

#[test]
fn tcp_v4_dsr_rewrites_macs_only() {
    require_bpf!();
    let mut f = Fixture::new();
    let bs = backends4();
    f.add_vip(
        vip_key_v4(VIP4, 80, IPPROTO_TCP),
        0,
        ForwardMode::L2Dsr,
        &bs,
        65537,
    );
    let pkt = tcp4(CLIENT4, 40000, VIP4, 80);
    let r = f.lb(&pkt);
    assert_action(r.action, XDP_TX, "TCP to VIP");
    let id = backend_by_mac(&r.packet, &bs);
    assert_eq!(r.packet, dsr_expected(&pkt, &bs[id as usize]));
    // The pick is Maglev's: the same flow hash indexes the same table.
    let s = f.dp.vip_stats(0).unwrap();
    assert_eq!((s.packets, s.bytes, s.new_flows), (1, pkt.len() as u64, 1));
    assert_eq!(f.dp.backend_stats(id).unwrap().packets, 1);
}

#[test]
fn udp_v6_dsr_rewrites_macs_only() {
    require_bpf!();
    let mut f = Fixture::new();
    let bs = backends6();
    f.add_vip(
        vip_key_v6(VIP6, 53, IPPROTO_UDP),
        1,
        ForwardMode::L2Dsr,
        &bs,
        65537,
    );
    let pkt = udp6(CLIENT6, 5353, VIP6, 53);
    let r = f.lb(&pkt);
    assert_action(r.action, XDP_TX, "UDP v6 to VIP");
    let id = backend_by_mac(&r.packet, &bs);
    assert_eq!(r.packet, dsr_expected(&pkt, &bs[id as usize]));
}

#[test]
fn tcp_v6_and_udp_v4_dsr() {
    require_bpf!();
    let mut f = Fixture::new();
    let b6 = backends6();
    let b4 = backends4();
    f.add_vip(
        vip_key_v6(VIP6, 443, IPPROTO_TCP),
        0,
        ForwardMode::L2Dsr,
        &b6,
        251,
    );
    let pkt = tcp6(CLIENT6, 1234, VIP6, 443);
    let r = f.lb(&pkt);
    assert_action(r.action, XDP_TX, "TCP v6");
    assert_eq!(
        r.packet,
        dsr_expected(&pkt, &b6[backend_by_mac(&r.packet, &b6) as usize])
    );

    let b4: Vec<_> = b4
        .into_iter()
        .map(|mut b| {
            b.id += 10;
            b.mac[5] = b.id as u8;
            b
        })
        .collect();
    f.add_vip(
        vip_key_v4(VIP4, 53, IPPROTO_UDP),
        1,
        ForwardMode::L2Dsr,
        &b4,
        251,
    );
    let pkt = udp4(CLIENT4, 999, VIP4, 53);
    let r = f.lb(&pkt);
    assert_action(r.action, XDP_TX, "UDP v4");
    let id = backend_by_mac(&r.packet, &b4);
    let b = b4.iter().find(|b| b.id == id).unwrap();
    assert_eq!(r.packet, dsr_expected(&pkt, b));
}

#[test]
fn ipip_v4_encapsulates_with_valid_outer_header() {
    require_bpf!();
    let mut f = Fixture::new();
    let bs = backends4();
    f.add_vip(
        vip_key_v4(VIP4, 80, IPPROTO_TCP),
        0,
        ForwardMode::Ipip,
        &bs,
        65537,
    );
    let pkt = tcp4(CLIENT4, 40001, VIP4, 80);
    let r = f.lb(&pkt);
    assert_action(r.action, XDP_TX, "IPIP v4");
    let id = backend_by_mac(&r.packet, &bs);
    assert_eq!(r.packet, ipip4_expected(&pkt, &bs[id as usize], 14));
    // The outer checksum verifies and the inner packet is untouched.
    assert_eq!(inet_csum(&r.packet[14..34]), 0);
    let parsed = SlicedPacket::from_ethernet(&r.packet).unwrap();
    assert!(parsed.net.is_some());
}

#[test]
fn ipip_v6_encapsulates() {
    require_bpf!();
    let mut f = Fixture::new();
    let bs = backends6();
    f.add_vip(
        vip_key_v6(VIP6, 80, IPPROTO_TCP),
        0,
        ForwardMode::Ipip,
        &bs,
        65537,
    );
    let pkt = tcp6(CLIENT6, 40001, VIP6, 80);
    let r = f.lb(&pkt);
    assert_action(r.action, XDP_TX, "IP6IP6");
    let id = backend_by_mac(&r.packet, &bs);
    assert_eq!(r.packet, ipip6_expected(&pkt, &bs[id as usize]));
}

#[test]
fn non_vip_and_unknown_port_pass_untouched() {
    require_bpf!();
    let mut f = Fixture::new();
    f.add_vip(
        vip_key_v4(VIP4, 80, IPPROTO_TCP),
        0,
        ForwardMode::L2Dsr,
        &backends4(),
        251,
    );
    for (what, pkt) in [
        ("other address", tcp4(CLIENT4, 1, [192, 0, 2, 99], 80)),
        ("unknown port", tcp4(CLIENT4, 1, VIP4, 81)),
        ("other protocol on the VIP port", udp4(CLIENT4, 1, VIP4, 80)),
        ("IPv6 to nowhere", tcp6(CLIENT6, 1, VIP6, 80)),
    ] {
        let r = f.lb(&pkt);
        assert_action(r.action, XDP_PASS, what);
        assert_eq!(r.packet, pkt, "{what}: bytes changed");
    }
    // ARP (not IP) passes too.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let r = f.lb(&arp);
    assert_action(r.action, XDP_PASS, "ARP");
    assert_eq!(r.packet, arp);
    assert!(f.dp.global_stats().unwrap()[reason::PASS_NOT_VIP as usize] >= 5);
}

#[test]
fn truncated_packets_never_reach_a_backend() {
    require_bpf!();
    let mut f = Fixture::new();
    f.add_vip(
        vip_key_v4(VIP4, 80, IPPROTO_TCP),
        0,
        ForwardMode::Ipip,
        &backends4(),
        251,
    );
    f.add_vip(
        vip_key_v6(VIP6, 80, IPPROTO_TCP),
        1,
        ForwardMode::L2Dsr,
        &backends6(),
        251,
    );
    for (family, pkt) in [
        ("v4", tcp4(CLIENT4, 5, VIP4, 80)),
        ("v6", tcp6(CLIENT6, 5, VIP6, 80)),
    ] {
        let full_headers = pkt.len() - PAYLOAD.len();
        // Every cut inside Ethernet, IP or TCP (the kernel refuses runs under 14 bytes).
        for cut in 14..full_headers {
            let r = f.lb(&pkt[..cut]);
            assert!(
                r.action == XDP_DROP,
                "{family} cut at {cut}: {} (must be dropped)",
                action_name(r.action)
            );
        }
        assert_action(f.lb(&pkt).action, XDP_TX, "complete packet");
    }
    // A header length field below 5 words is malformed.
    let mut bad = tcp4(CLIENT4, 5, VIP4, 80);
    bad[14] = 0x44;
    assert_action(f.lb(&bad).action, XDP_DROP, "IHL 4");
    // A length field pointing past the end (IHL 15) is truncated.
    bad[14] = 0x4f;
    assert_action(f.lb(&bad).action, XDP_DROP, "IHL 15");
    assert!(f.dp.global_stats().unwrap()[reason::DROP_MALFORMED as usize] > 50);
    // Nothing was counted for a VIP besides the two complete packets.
    assert_eq!(
        f.dp.vip_stats(0).unwrap().packets + f.dp.vip_stats(1).unwrap().packets,
        2
    );
}

#[test]
fn ipv4_options_are_skipped() {
    require_bpf!();
    let mut f = Fixture::new();
    let bs = backends4();
    f.add_vip(
        vip_key_v4(VIP4, 80, IPPROTO_TCP),
        0,
        ForwardMode::L2Dsr,
        &bs,
        251,
    );
    // Rebuild a packet with 4 bytes of options (IHL 6): NOP NOP NOP EOL.
    let base = tcp4(CLIENT4, 7000, VIP4, 80);
    let mut ip = base[14..34].to_vec();
    ip[0] = 0x46;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) + 4;
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    ip.extend_from_slice(&[1, 1, 1, 0]);
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = inet_csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut pkt = base[..14].to_vec();
    pkt.extend_from_slice(&ip);
    pkt.extend_from_slice(&base[34..]);
    let r = f.lb(&pkt);
    assert_action(r.action, XDP_TX, "IPv4 with options");
    // Same flow, same backend as without options.
    let plain = f.lb(&base);
    assert_eq!(r.packet[..6], plain.packet[..6]);
}

#[test]
fn vlan_tagged_dsr_and_ipip_keep_the_tag() {
    require_bpf!();
    let mut f = Fixture::new();
    let bs = backends4();
    f.add_vip(
        vip_key_v4(VIP4, 80, IPPROTO_TCP),
        0,
        ForwardMode::L2Dsr,
        &bs,
        251,
    );
    f.add_vip(
        vip_key_v4(VIP4, 443, IPPROTO_TCP),
        1,
        ForwardMode::Ipip,
        &bs,
        251,
    );
    let build = |dport| {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
            .single_vlan(VlanId::try_new(42).unwrap())
            .ipv4(CLIENT4, VIP4, 64)
            .tcp(3333, dport, 1, 1000)
            .write(&mut v, PAYLOAD)
            .unwrap();
        v
    };
    let pkt = build(80);
    assert_eq!(&pkt[12..14], &[0x81, 0x00]);
    let r = f.lb(&pkt);
    assert_action(r.action, XDP_TX, "VLAN DSR");
    let id = backend_by_mac(&r.packet, &bs);
    assert_eq!(r.packet, dsr_expected(&pkt, &bs[id as usize]));

    let pkt = build(443);
    let r = f.lb(&pkt);
    assert_action(r.action, XDP_TX, "VLAN IPIP");
    let id = backend_by_mac(&r.packet, &bs);
    assert_eq!(r.packet, ipip4_expected(&pkt, &bs[id as usize], 18));
}

#[test]
fn fragments_to_a_vip_are_dropped() {
    require_bpf!();
    let mut f = Fixture::new();
    f.add_vip(
        vip_key_v4(VIP4, 53, IPPROTO_UDP),
        0,
        ForwardMode::L2Dsr,
        &backends4(),
        251,
    );
    let mut frag = udp4(CLIENT4, 5000, VIP4, 53);
    frag[20] = 0x20; // MF set
    frag[24..26].copy_from_slice(&[0, 0]);
    let c = inet_csum(&frag[14..34]);
    frag[24..26].copy_from_slice(&c.to_be_bytes());
    assert_action(f.lb(&frag).action, XDP_DROP, "first fragment to VIP");
    // A fragment to another address is none of our business.
    let mut other = udp4(CLIENT4, 5000, [192, 0, 2, 200], 53);
    other[20] = 0x20;
    assert_action(f.lb(&other).action, XDP_PASS, "fragment elsewhere");
    assert_eq!(
        f.dp.global_stats().unwrap()[reason::DROP_FRAGMENT as usize],
        1
    );
}

#[test]
fn empty_table_drops() {
    require_bpf!();
    let mut f = Fixture::new();
    f.add_vip(
        vip_key_v4(VIP4, 80, IPPROTO_TCP),
        0,
        ForwardMode::L2Dsr,
        &[],
        251,
    );
    assert_action(
        f.lb(&tcp4(CLIENT4, 1, VIP4, 80)).action,
        XDP_DROP,
        "no backend",
    );
    assert_eq!(
        f.dp.global_stats().unwrap()[reason::DROP_NO_BACKEND as usize],
        1
    );
}

fn echo4() -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT4, VIP4, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut v, b"ping payload")
        .unwrap();
    v
}

#[test]
fn icmp_echo_is_answered_only_when_asked() {
    require_bpf!();
    let mut f = Fixture::new();
    let key = vip_key_v4(VIP4, 80, IPPROTO_TCP);
    f.add_vip(key, 0, ForwardMode::L2Dsr, &backends4(), 251);
    let pkt = echo4();
    assert_action(f.lb(&pkt).action, XDP_PASS, "echo without reply flag");

    f.dp.set_vip_addr(
        &key.addr,
        &VipAddrInfo {
            flags: ADDR_F_ECHO_REPLY,
            refcount: 1,
        },
    )
    .unwrap();
    let r = f.lb(&pkt);
    assert_action(r.action, XDP_TX, "echo with reply flag");
    assert_eq!(&r.packet[..6], &CLIENT_MAC);
    assert_eq!(&r.packet[6..12], &LB_MAC);
    let parsed = SlicedPacket::from_ethernet(&r.packet).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = parsed.net else {
        panic!("not IPv4")
    };
    assert_eq!(ip.header().source(), VIP4);
    assert_eq!(ip.header().destination(), CLIENT4);
    assert_eq!(inet_csum(&r.packet[14..34]), 0, "IPv4 checksum");
    let Some(TransportSlice::Icmpv4(icmp)) = parsed.transport else {
        panic!("not ICMP")
    };
    assert_eq!(icmp.type_u8(), 0);
    assert_eq!(inet_csum(&r.packet[34..]), 0, "ICMP checksum");
    assert_eq!(icmp.payload(), b"ping payload");

    // ICMPv6 echo to a v6 VIP.
    let k6 = vip_key_v6(VIP6, 80, IPPROTO_TCP);
    f.add_vip(k6, 1, ForwardMode::L2Dsr, &backends6(), 251);
    f.dp.set_vip_addr(
        &k6.addr,
        &VipAddrInfo {
            flags: ADDR_F_ECHO_REPLY,
            refcount: 1,
        },
    )
    .unwrap();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(CLIENT6, VIP6, 64)
        .icmpv6_echo_request(9, 2)
        .write(&mut v, b"v6 ping")
        .unwrap();
    let r = f.lb(&v);
    assert_action(r.action, XDP_TX, "ICMPv6 echo");
    let parsed = SlicedPacket::from_ethernet(&r.packet).unwrap();
    let Some(etherparse::NetSlice::Ipv6(ip)) = &parsed.net else {
        panic!("not IPv6")
    };
    assert_eq!(ip.header().source(), VIP6);
    let Some(TransportSlice::Icmpv6(icmp)) = parsed.transport else {
        panic!("not ICMPv6")
    };
    assert_eq!(icmp.type_u8(), 129);
    // Verify the checksum over the pseudo-header.
    let expected = etherparse::Icmpv6Header::from_slice(icmp.slice())
        .unwrap()
        .0
        .icmp_type
        .calc_checksum(VIP6, CLIENT6, icmp.payload())
        .unwrap();
    assert_eq!(icmp.checksum(), expected);
    // Other ICMP to the VIP passes.
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT4, VIP4, 64)
        .icmpv4_raw(13, 0, [0; 4])
        .write(&mut v, &[])
        .unwrap();
    assert_action(f.lb(&v).action, XDP_PASS, "ICMP timestamp");
}

#[test]
fn frag_needed_goes_to_the_flows_backend() {
    require_bpf!();
    let mut f = Fixture::new();
    let bs = backends4();
    f.add_vip(
        vip_key_v4(VIP4, 80, IPPROTO_TCP),
        0,
        ForwardMode::L2Dsr,
        &bs,
        65537,
    );
    // Open 20 flows and remember where each went.
    for port in 30000..30020u16 {
        let flow = f.lb(&tcp4(CLIENT4, port, VIP4, 80));
        let owner = backend_by_mac(&flow.packet, &bs);
        // A router between the backend and the client reports that the backend's reply
        // (VIP:80 -> client:port) was too big.
        let mut quoted = Vec::new();
        PacketBuilder::ipv4(VIP4, CLIENT4, 64)
            .tcp(80, port, 1, 1000)
            .write(&mut quoted, &[])
            .unwrap();
        let mut icmp = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
            .ipv4([203, 0, 113, 1], VIP4, 64)
            .icmpv4_raw(3, 4, [0, 0, 0x05, 0xdc])
            .write(&mut icmp, &quoted[..28])
            .unwrap();
        let r = f.lb(&icmp);
        assert_action(r.action, XDP_TX, "frag needed");
        assert_eq!(backend_by_mac(&r.packet, &bs), owner, "port {port}");
    }
    assert_eq!(
        f.dp.global_stats().unwrap()[reason::ICMP_PTB_FORWARDED as usize],
        20
    );
}

#[test]
fn established_flows_stay_when_the_table_changes() {
    require_bpf!();
    let mut f = Fixture::new();
    let bs = backends4();
    let key = vip_key_v4(VIP4, 80, IPPROTO_TCP);
    f.add_vip(key, 0, ForwardMode::L2Dsr, &bs, 251);
    let owners = flow_owners(&mut f, &bs);
    // Backend 0 is drained from the table (weight 0) but stays alive: its flows stay.
    f.set_table(key, 0, ForwardMode::L2Dsr, &bs[1..], 251);
    for (i, port) in (20000..20060u16).enumerate() {
        let r = f.lb(&tcp4(CLIENT4, port, VIP4, 80));
        assert_eq!(
            backend_by_mac(&r.packet, &bs),
            owners[i],
            "established flow moved"
        );
    }
    // New flows avoid it.
    for port in 40000..40100u16 {
        let r = f.lb(&tcp4(CLIENT4, port, VIP4, 80));
        assert_ne!(
            backend_by_mac(&r.packet, &bs),
            0,
            "new flow to drained backend"
        );
    }
    // When backend 0 dies, its flows are re-picked; the others stay where they were.
    f.set_backend(&bs[0], 0, false);
    for (i, port) in (20000..20060u16).enumerate() {
        let got = backend_by_mac(&f.lb(&tcp4(CLIENT4, port, VIP4, 80)).packet, &bs);
        if owners[i] == 0 {
            assert_ne!(got, 0);
        } else {
            assert_eq!(got, owners[i]);
        }
    }
    assert!(owners.contains(&0), "test needs some flows on backend 0");
    assert!(f.dp.global_stats().unwrap()[reason::CONN_REPICK as usize] > 0);
}

#[test]
fn backend_id_reused_by_another_vip_does_not_keep_old_flows() {
    require_bpf!();
    let mut f = Fixture::new();
    let bs = backends4();
    let key = vip_key_v4(VIP4, 80, IPPROTO_TCP);
    f.add_vip(key, 0, ForwardMode::L2Dsr, &bs, 251);
    let owners = flow_owners(&mut f, &bs);
    assert!(owners.contains(&0), "test needs some flows on backend 0");
    // Backend 0 leaves VIP 0 (table rebuilt without it); its id, alive again, now serves
    // VIP 1. VIP 0's flows that were on it must be re-picked among VIP 0's backends.
    f.set_table(key, 0, ForwardMode::L2Dsr, &bs[1..], 251);
    f.set_backend(&bs[0], 1, true);
    for (i, port) in (20000..20060u16).enumerate() {
        let got = backend_by_mac(&f.lb(&tcp4(CLIENT4, port, VIP4, 80)).packet, &bs);
        if owners[i] == 0 {
            assert_ne!(got, 0, "a flow of VIP 0 went to VIP 1's backend");
        } else {
            assert_eq!(got, owners[i], "an established flow moved");
        }
    }
}

#[test]
fn decap_strips_the_outer_header() {
    require_bpf!();
    let mut f = Fixture::new();
    let bs = backends4();
    f.add_vip(
        vip_key_v4(VIP4, 80, IPPROTO_TCP),
        0,
        ForwardMode::Ipip,
        &bs,
        251,
    );
    let pkt = tcp4(CLIENT4, 4444, VIP4, 80);
    let encapsulated = f.lb(&pkt).packet;
    let r = f.run(common::prog_names::DECAP, &encapsulated);
    assert_action(r.action, XDP_PASS, "decap");
    // The backend sees the client's packet with the LB's MACs in front.
    assert_eq!(&r.packet[14..], &pkt[14..]);
    assert_eq!(&r.packet[..12], &encapsulated[..12]);
    assert_eq!(&r.packet[12..14], &[0x08, 0x00]);

    // IP6IP6 too.
    let b6 = backends6();
    f.add_vip(
        vip_key_v6(VIP6, 80, IPPROTO_TCP),
        1,
        ForwardMode::Ipip,
        &b6,
        251,
    );
    let pkt6 = tcp6(CLIENT6, 4444, VIP6, 80);
    let enc6 = f.lb(&pkt6).packet;
    let r = f.run(common::prog_names::DECAP, &enc6);
    assert_action(r.action, XDP_PASS, "decap v6");
    assert_eq!(&r.packet[14..], &pkt6[14..]);

    // Plain traffic passes untouched; a truncated outer packet is dropped.
    let r = f.run(common::prog_names::DECAP, &pkt);
    assert_eq!((r.action, &r.packet), (XDP_PASS, &pkt));
    let r = f.run(common::prog_names::DECAP, &encapsulated[..14 + 20 + 10]);
    assert_action(r.action, XDP_DROP, "truncated inner header");
    assert_eq!(IpNumber::IPV4.0, 4);
}

#[test]
fn flows_spread_over_backends_like_the_table() {
    require_bpf!();
    let mut f = Fixture::new();
    let bs = backends4();
    f.add_vip(
        vip_key_v4(VIP4, 80, IPPROTO_TCP),
        0,
        ForwardMode::L2Dsr,
        &bs,
        65537,
    );
    let mut counts = [0u32; 3];
    for i in 0..3000u32 {
        let src = [198, 51, (i >> 8) as u8, i as u8];
        let r = f.lb(&tcp4(src, 10000 + (i % 5000) as u16, VIP4, 80));
        counts[backend_by_mac(&r.packet, &bs) as usize] += 1;
    }
    for c in counts {
        assert!((900..=1100).contains(&c), "uneven spread {counts:?}");
    }
    let total: u64 = (0..3)
        .map(|i| f.dp.backend_stats(i).unwrap().new_flows)
        .sum();
    assert_eq!(total, 3000);
}

#[test]
fn removed_vip_stops_its_established_flows() {
    require_bpf!();
    let mut f = Fixture::new();
    let bs = backends4();
    let key = vip_key_v4(VIP4, 80, IPPROTO_TCP);
    f.add_vip(key, 3, ForwardMode::L2Dsr, &bs, 251);
    let pkt = tcp4(CLIENT4, 1111, VIP4, 80);
    assert_action(f.lb(&pkt).action, XDP_TX, "flow established");
    f.dp.remove_vip(&key).unwrap();
    let r = f.lb(&pkt);
    assert_action(r.action, XDP_PASS, "flow of a removed VIP");
    assert_eq!(r.packet, pkt);
    // The id reused by another VIP does not capture the old flow either.
    let other = vip_key_v4(VIP4, 8080, IPPROTO_TCP);
    f.add_vip(other, 3, ForwardMode::L2Dsr, &bs, 251);
    assert_action(f.lb(&pkt).action, XDP_PASS, "old flow after id reuse");
    // Re-adding the VIP serves the flow again.
    f.add_vip(key, 4, ForwardMode::Ipip, &bs, 251);
    let r = f.lb(&pkt);
    assert_action(r.action, XDP_TX, "flow after re-add");
    assert_eq!(&r.packet[12..14], &[0x08, 0x00]);
    assert_eq!(r.packet[14 + 9], 4, "now encapsulated (IPIP mode)");
}

/// Collects the program's aya-log records.
#[derive(Clone, Default)]
struct Records(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Records {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        self.0
            .lock()
            .unwrap()
            .push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}

#[test]
fn rare_drops_are_logged_through_aya_log() {
    require_bpf!();
    let mut f = Fixture::new();
    let records = Records::default();
    let mut logger =
        aya_log::EbpfLogger::init_with_logger(f.dp.ebpf_mut(), records.clone()).unwrap();
    f.add_vip(
        vip_key_v4(VIP4, 80, IPPROTO_TCP),
        5,
        ForwardMode::L2Dsr,
        &[],
        251,
    );
    assert_action(
        f.lb(&tcp4(CLIENT4, 1, VIP4, 80)).action,
        XDP_DROP,
        "no backend",
    );
    logger.flush();
    let got = records.0.lock().unwrap().clone();
    assert!(
        got.iter()
            .any(|l| l.starts_with("WARN") && l.contains("VIP 5 has no backend")),
        "{got:?}"
    );
}

/// The backend (index into `bs`) of each of 60 TCP flows to VIP4:80 from CLIENT4 (source
/// ports 20000..20060), in port order; the first call pins them in the connection table.
fn flow_owners(f: &mut Fixture, bs: &[TestBackend]) -> Vec<u32> {
    (20000..20060u16)
        .map(|port| backend_by_mac(&f.lb(&tcp4(CLIENT4, port, VIP4, 80)).packet, bs))
        .collect()
}
