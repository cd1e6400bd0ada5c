//! Program-cost benchmark of the XDP load balancer (`cargo xtask bench l4` runs it).
//!
//! Runs `xdp_lb` and a trivial program that only returns XDP_TX over the same packets with
//! BPF_PROG_TEST_RUN and prints a Markdown table of ns/packet for both and their ratio. Both
//! are measured in the same run, alternating, so the ratio holds on a noisy machine.
//!
//! Cases: an established flow (connection-table hit), new flows (table miss, Maglev pick and
//! insert: each run uses a packet of a flow never seen before, so those runs are one packet per
//! syscall for both programs), IPIP encapsulation, and IPv6.

use std::time::Duration;

use common::{ForwardMode, IPPROTO_TCP};
use integration_tests::{
    fixture::{vip_key_v4, vip_key_v6, Fixture, TestBackend},
    packets::{tcp4, tcp6},
};
use lb_userspace::testrun::{run_xdp, XDP_TX};

const VIP4: [u8; 4] = [192, 0, 2, 10];
const VIP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// Mean ns/packet of `prog` over `packet`, repeated in the kernel.
fn repeated(f: &mut Fixture, prog: &str, packet: &[u8], repeat: u32) -> f64 {
    let r = run_xdp(f.dp.xdp(prog).unwrap(), packet, repeat).unwrap();
    assert_eq!(r.action, XDP_TX, "{prog} must transmit");
    ns(r.duration)
}

/// Mean ns/packet over distinct packets, one run each.
fn distinct(f: &mut Fixture, prog: &str, packets: &[Vec<u8>]) -> f64 {
    let p = f.dp.xdp(prog).unwrap();
    let total: f64 = packets
        .iter()
        .map(|pkt| {
            let r = run_xdp(p, pkt, 1).unwrap();
            assert_eq!(r.action, XDP_TX);
            ns(r.duration)
        })
        .sum();
    total / packets.len() as f64
}

fn main() {
    let repeat: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("repeat count"))
        .unwrap_or(1_000_000);
    let mut f = Fixture::new();
    let b4: Vec<_> = (0..16)
        .map(|i| TestBackend::v4(i, [10, 0, 1, 10 + i as u8]))
        .collect();
    f.add_vip(
        vip_key_v4(VIP4, 80, IPPROTO_TCP),
        0,
        ForwardMode::L2Dsr,
        &b4,
        65537,
    );
    // A backend id serves one VIP (the datapath checks it), so the IPIP VIP gets its own ids
    // for the same addresses.
    let b4_ipip: Vec<_> = (0..16)
        .map(|i| TestBackend::v4(16 + i, [10, 0, 1, 10 + i as u8]))
        .collect();
    f.add_vip(
        vip_key_v4(VIP4, 8080, IPPROTO_TCP),
        1,
        ForwardMode::Ipip,
        &b4_ipip,
        65537,
    );
    let b6: Vec<_> = (0..16)
        .map(|i| {
            let mut a = [0u8; 16];
            a[..2].copy_from_slice(&[0xfd, 1]);
            a[15] = i as u8 + 10;
            TestBackend::v6(100 + i, a)
        })
        .collect();
    f.add_vip(
        vip_key_v6(VIP6, 80, IPPROTO_TCP),
        2,
        ForwardMode::L2Dsr,
        &b6,
        65537,
    );

    let lb = common::prog_names::LB;
    let base = common::prog_names::BENCH_TX;
    let mut rows: Vec<(String, f64, f64)> = Vec::new();

    // Cases whose output is a valid input again (a MAC rewrite), so the kernel can repeat
    // them on one buffer.
    let client6 = [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
    let cases: [(&str, Vec<u8>); 2] = [
        (
            "established flow, DSR (conn-table hit)",
            tcp4([198, 51, 100, 1], 40000, VIP4, 80),
        ),
        ("established flow, IPv6 DSR", tcp6(client6, 40000, VIP6, 80)),
    ];
    for (name, pkt) in cases {
        // Warm: the first run inserts the flow.
        repeated(&mut f, lb, &pkt, 1);
        let mut lb_ns = 0.0;
        let mut base_ns = 0.0;
        // Alternate in rounds so drift on a shared machine hits both alike.
        for _ in 0..5 {
            base_ns += repeated(&mut f, base, &pkt, repeat / 5);
            lb_ns += repeated(&mut f, lb, &pkt, repeat / 5);
        }
        rows.push((name.into(), lb_ns / 5.0, base_ns / 5.0));
    }

    // Encapsulation changes the buffer, so each run gets a fresh copy (one run per syscall,
    // for both programs).
    let encap = vec![tcp4([198, 51, 100, 1], 40000, VIP4, 8080); 20_000];
    let lb_ns = distinct(&mut f, lb, &encap);
    let base_ns = distinct(&mut f, base, &encap);
    rows.push((
        "established flow, IPIP encap (20000 runs, 1 each)".into(),
        lb_ns,
        base_ns,
    ));

    let flows = 20_000u32;
    let new_flows: Vec<Vec<u8>> = (0..flows)
        .map(|i| {
            tcp4(
                [198, 18, (i >> 8) as u8, i as u8],
                1024 + (i % 60000) as u16,
                VIP4,
                80,
            )
        })
        .collect();
    let lb_ns = distinct(&mut f, lb, &new_flows);
    let base_ns = distinct(&mut f, base, &new_flows);
    rows.push((
        format!("new flow, DSR (miss + Maglev + insert; {flows} flows, 1 run each)"),
        lb_ns,
        base_ns,
    ));

    println!("| case | xdp_lb ns/pkt | trivial XDP_TX ns/pkt | ratio |");
    println!("|---|---:|---:|---:|");
    for (name, lb, base) in rows {
        println!("| {name} | {lb:.1} | {base:.1} | {:.2}x |", lb / base);
    }
    println!();
    println!(
        "BPF_PROG_TEST_RUN, {repeat} repetitions per repeated case (5 alternating rounds), kernel {}.",
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );
}
