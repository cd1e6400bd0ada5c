//! Packet builders shared by the fixtures and the program-cost benchmark.

use etherparse::PacketBuilder;

use crate::fixture::{CLIENT_MAC, LB_MAC};

pub const PAYLOAD: &[u8] = b"hello, backend";

pub fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .syn()
        .write(&mut v, PAYLOAD)
        .expect("build TCP/IPv4");
    v
}

pub fn udp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut v, PAYLOAD)
        .expect("build UDP/IPv4");
    v
}

pub fn tcp6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .write(&mut v, PAYLOAD)
        .expect("build TCP/IPv6");
    v
}

pub fn udp6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src, dst, 64)
        .udp(sport, dport)
        .write(&mut v, PAYLOAD)
        .expect("build UDP/IPv6");
    v
}
