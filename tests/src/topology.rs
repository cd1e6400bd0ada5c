//! The e2e test network: a "switch" namespace with a Linux bridge, and a client, a load
//! balancer and N backends, each in its own namespace with a veth (`eth0`) into the bridge.
//!
//! ```text
//!   client 10.77.0.2 ──┐
//!   lb     10.77.0.3 ──┤ br0 (switch ns)
//!   b0..   10.77.0.1x ─┘
//! ```
//!
//! Every host also has an IPv6 twin address (`fd77::<last octet>`), and the VIP has one too
//! (`fd77:100::1`). The client routes the VIPs (off-link) via the load balancer's addresses. DSR
//! backends have the VIP on `lo` and answer the client directly; IPIP backends also run
//! `xdp_decap` on `eth0`. The bridge-side peer of the load balancer's veth runs `xdp_pass`:
//! a veth only receives XDP_TX frames when its peer has an XDP program. Links to the
//! backends have a 1600-byte MTU so encapsulated 1500-byte packets fit.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    programs::{Xdp, XdpMode},
    Ebpf,
};

use crate::netns::{disable_tx_checksum, unique_name, Netns};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 100, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
/// The IPv6 twins: every host also has `fd77::<last octet>/64`.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0x100, 0, 0, 0, 0, 0, 1);
pub const LB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 3);
const LINK_MTU: &str = "1600";

/// IP of backend `i`.
pub fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 11 + i as u8)
}

/// IPv6 address of backend `i`.
pub fn backend_ip6(i: usize) -> Ipv6Addr {
    v6_twin(backend_ip(i))
}

fn v6_twin(v4: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, v4.octets()[3] as u16)
}

/// The helper programs (`xdp_pass`, `xdp_decap`) from the embedded object, loaded once per
/// topology with small maps pinned in a throwaway directory.
struct HelperPrograms {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl HelperPrograms {
    fn load() -> Self {
        let pin_dir = Path::new("/sys/fs/bpf").join(unique_name("helpers"));
        let ebpf = lb_userspace::datapath::load_helper_programs(&pin_dir)
            .expect("loading the helper programs (is bpffs mounted?)");
        Self { ebpf, pin_dir }
    }

    fn attach(&mut self, ns: &Netns, prog: &str, iface: &str) {
        let p: &mut Xdp = self.ebpf.program_mut(prog).unwrap().try_into().unwrap();
        let iface = std::ffi::CString::new(iface).unwrap();
        ns.run(|| p.attach(iface.as_c_str(), XdpMode::Driver))
            .unwrap_or_else(|e| panic!("attaching {prog} in {}: {e}", ns.name()));
    }
}

impl Drop for HelperPrograms {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// A namespace plugged into the switch.
pub struct Host {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// The name of its veth's peer in the switch namespace.
    pub port: String,
}

/// How backends receive the VIP's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendMode {
    Dsr,
    Ipip,
}

pub struct Topology {
    // Field order is drop order: programs first, then hosts, the switch last.
    /// Holds the `xdp_pass` / `xdp_decap` attachments for the topology's lifetime.
    _helpers: HelperPrograms,
    pub client: Host,
    pub lb: Host,
    pub backends: Vec<Host>,
    pub switch: Netns,
}

impl Topology {
    pub fn new(n_backends: usize, mode: BackendMode) -> Self {
        let switch = Netns::new("sw");
        switch.ip(&["link", "add", "br0", "mtu", LINK_MTU, "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let mut helpers = HelperPrograms::load();
        let client = plug(&switch, "cl", CLIENT_IP, "1500");
        client
            .ns
            .run(|| disable_tx_checksum("eth0"))
            .expect("turning off tx checksum offload on the client");
        client.ns.ip(&[
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            &LB_IP.to_string(),
        ]);
        client.ns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            &LB_IP6.to_string(),
        ]);
        let lb = plug(&switch, "lb", LB_IP, LINK_MTU);
        helpers.attach(&switch, common::prog_names::PASS, &lb.port);
        let backends: Vec<Host> = (0..n_backends)
            .map(|i| {
                let h = plug(&switch, &format!("b{i}"), backend_ip(i), LINK_MTU);
                h.ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
                h.ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"]);
                h
            })
            .collect();
        if mode == BackendMode::Ipip {
            for b in &backends {
                helpers.attach(&b.ns, common::prog_names::DECAP, "eth0");
            }
        }
        Self {
            _helpers: helpers,
            client,
            lb,
            backends,
            switch,
        }
    }

    /// Prints interface counters and IP/TCP error counters of every namespace (to diagnose a
    /// failed test).
    pub fn dump(&self) {
        let hosts = [&self.client, &self.lb].into_iter().chain(&self.backends);
        for ns in std::iter::once(&self.switch).chain(hosts.map(|h| &h.ns)) {
            let out = std::process::Command::new("ip")
                .args(["-n", ns.name(), "-s", "link"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let snmp = ns
                .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))
                .unwrap_or_default();
            let snmp: Vec<&str> = snmp
                .lines()
                .filter(|l| l.starts_with("Ip:") || l.starts_with("Tcp:"))
                .collect();
            eprintln!("== {}\n{out}{}", ns.name(), snmp.join("\n"));
        }
    }
}

/// A host namespace `tag` with `eth0` (addresses `ip/24` and its IPv6 twin) whose peer joins the bridge.
fn plug(switch: &Netns, tag: &str, ip: Ipv4Addr, mtu: &str) -> Host {
    let ns = Netns::new(tag);
    let port = format!("p-{tag}");
    switch.ip(&[
        "link",
        "add",
        &port,
        "mtu",
        LINK_MTU,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "mtu",
        mtu,
        "netns",
        ns.name(),
    ]);
    switch.ip(&["link", "set", &port, "master", "br0", "up"]);
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    let ip6 = format!("{}/64", v6_twin(ip));
    ns.ip(&["addr", "add", &ip6, "dev", "eth0", "nodad"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    Host { ns, ip, port }
}
