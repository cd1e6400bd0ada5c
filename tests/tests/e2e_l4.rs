//! End-to-end tests of the L4 load balancer: real TCP connections from a client namespace
//! through `xdp_lb` (attached by an in-process agent) to backend namespaces, in DSR and IPIP
//! modes. See `integration_tests::topology` for the network.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;
use common::{VipAddrInfo, VipKey, VipMeta};
use integration_tests::{
    agent::AgentHandle,
    netns::{skip_reason, unique_name},
    servers::{ask_once, udp_ask, Conn, NameServer, UdpNameServer},
    topology::{backend_ip, backend_ip6, BackendMode, Topology, LB_IP, LB_IP6, VIP, VIP6},
};
use lb_userspace::{
    api::{HealthState, Request},
    config::{BackendSpec, Config, VipId, XdpModeSetting},
};

const PORT: u16 = 80;

fn vip_addr() -> SocketAddr {
    SocketAddr::from((VIP, PORT))
}

fn vip_id() -> VipId {
    format!("{VIP}:{PORT}/tcp").parse().unwrap()
}

macro_rules! skip_unless_possible {
    () => {
        if let Some(why) = skip_reason() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

/// A config for this test's topology: one VIP on port 80 with the first `n` backends.
fn config(mode: BackendMode, n: usize, health: &str) -> Config {
    config_text(
        mode,
        n,
        &format!("protocol = \"tcp\"\nport = {PORT}\nhealth_check = {health}"),
    )
}

/// A config whose VIP section ends with `vip_fields` (protocol, port, health check...).
fn config_text(mode: BackendMode, n: usize, vip_fields: &str) -> Config {
    let pin = unique_name("pin");
    let socket = PathBuf::from(format!("/tmp/{pin}.sock"));
    let mode = match mode {
        BackendMode::Dsr => "dsr",
        BackendMode::Ipip => "ipip",
    };
    let mut text = format!(
        r#"
[agent]
interfaces = ["eth0"]
pin_name = "{pin}"
admin_socket = "{}"
ipip_src_v4 = "{LB_IP}"

[[vip]]
address = "{VIP}"
mode = "{mode}"
{vip_fields}
"#,
        socket.display()
    );
    for i in 0..n {
        text.push_str(&format!(
            "\n[[vip.backend]]\naddress = \"{}\"\n",
            backend_ip(i)
        ));
    }
    Config::parse(&text, "test.toml".as_ref()).expect("test config")
}

/// Removes the agent's pinned maps and links, and its lock file, when the test ends.
struct PinCleanup(String);

impl Drop for PinCleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(PathBuf::from("/sys/fs/bpf").join(&self.0));
        let _ = std::fs::remove_file(format!("/run/xdplb-{}.lock", self.0));
    }
}

fn pins(cfg: &Config) -> PinCleanup {
    PinCleanup(cfg.agent.pin_name.clone())
}

fn servers(topo: &Topology) -> Vec<NameServer> {
    topo.backends
        .iter()
        .enumerate()
        .map(|(i, b)| NameServer::start(&b.ns, &format!("b{i}"), PORT))
        .collect()
}

/// Runs `ask` `n` times in the client's namespace; counts the answers (backend names, or
/// `error: ...`).
fn tally(
    topo: &Topology,
    n: usize,
    ask: impl Fn() -> std::io::Result<String> + Sync,
) -> BTreeMap<String, usize> {
    topo.client.ns.run(|| {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let name = ask().unwrap_or_else(|e| format!("error: {e}"));
            *counts.entry(name).or_insert(0) += 1;
        }
        counts
    })
}

/// Opens `n` short connections to the VIP; counts answers per backend name.
fn spread(topo: &Topology, n: usize) -> BTreeMap<String, usize> {
    tally(topo, n, || ask_once(vip_addr()))
}

/// `n` connections to the VIP reach exactly `backends` (each at least once, no other).
fn assert_reaches(topo: &Topology, n: usize, backends: &[&str]) {
    let counts = spread(topo, n);
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        backends,
        "{counts:?}"
    );
}

/// Every connection reached one of `backends`, each within `tolerance` (0.10: 10%) of the
/// mean. With n flows a backend's share varies by about sqrt(n/k) flows, so 10% needs
/// thousands of flows to be a reliable check.
fn assert_balanced(counts: &BTreeMap<String, usize>, backends: &[&str], n: usize, tolerance: f64) {
    let mean = n as f64 / backends.len() as f64;
    for b in backends {
        let c = *counts.get(*b).unwrap_or(&0) as f64;
        assert!(
            (c - mean).abs() <= mean * tolerance,
            "backend {b} got {c} of {n} connections (mean {mean}): {counts:?}"
        );
    }
    let total: usize = backends.iter().map(|b| counts.get(*b).unwrap_or(&0)).sum();
    assert_eq!(
        total, n,
        "some connections failed or hit others: {counts:?}"
    );
}

/// Long-lived connections, at least `per_backend` on each of `names`.
fn long_conns(topo: &Topology, names: &[&str], per_backend: usize) -> Vec<(String, Conn)> {
    topo.client.ns.run(|| {
        let mut conns: Vec<(String, Conn)> = Vec::new();
        for _ in 0..500 {
            let done = names
                .iter()
                .all(|n| conns.iter().filter(|(b, _)| b == n).count() >= per_backend);
            if done {
                return conns;
            }
            let mut c = Conn::connect(vip_addr()).expect("connect");
            let name = c.ask().expect("ask");
            conns.push((name, c));
        }
        panic!("could not get {per_backend} connections on each of {names:?}");
    })
}

/// Every long connection still answers, from the backend it started on.
fn assert_conns_keep_backend(conns: &mut [(String, Conn)], skip: &str) {
    for (name, c) in conns.iter_mut().filter(|(n, _)| n != skip) {
        // A payload of some size, to move bytes as well.
        let payload = "x".repeat(3000);
        let got = c
            .ask_with(&payload)
            .unwrap_or_else(|e| panic!("connection to {name} broke: {e}"));
        assert_eq!(&got, name, "an established connection moved");
    }
}

/// Waits until `n` consecutive new connections all succeed and avoid `dead`; returns when.
fn wait_avoids(topo: &Topology, dead: &str, n: usize, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let counts = spread(topo, n);
        if counts.keys().all(|k| k != dead && !k.starts_with("error")) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "new connections still reach {dead} or fail after {limit:?}: {counts:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_health(agent: &AgentHandle, addr: std::net::IpAddr, want: HealthState, limit: Duration) {
    let start = Instant::now();
    loop {
        let b = agent.backends();
        if b.iter().any(|b| b.address == addr && b.health == want) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "backend {addr} not {want} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Balance across 3 backends, then a backend dies: new connections avoid it within 3 s,
/// established connections to the others are untouched; it comes back when it recovers.
fn balance_and_failover(mode: BackendMode, health: &str) {
    let topo = Topology::new(3, mode);
    let mut srv = servers(&topo);
    let cfg = config(mode, 3, health);
    let _pins = pins(&cfg);
    let agent = AgentHandle::start(&topo.lb.ns, cfg.clone(), false);

    if let Err(e) = topo.client.ns.run(|| ask_once(vip_addr())) {
        topo.dump();
        panic!(
            "first connection failed: {e}; datapath: {:?}",
            agent.stats()
        );
    }
    let n = 3000;
    let counts = spread(&topo, n);
    assert_balanced(&counts, &["b0", "b1", "b2"], n, 0.10);
    let stats = agent.stats();
    assert!(stats.vips[0].counters.new_flows >= n as u64, "{stats:?}");

    let mut conns = long_conns(&topo, &["b0", "b1", "b2"], 2);
    srv[1].stop();
    let took = wait_avoids(&topo, "b1", 60, Duration::from_secs(4));
    assert!(
        took <= Duration::from_secs(3),
        "took {took:?} to avoid a dead backend"
    );
    assert_conns_keep_backend(&mut conns, "b1");
    wait_health(
        &agent,
        backend_ip(1).into(),
        HealthState::Down,
        Duration::from_secs(1),
    );

    // A restarted agent keeps the dead backend down (it does not wait for `fall` again).
    agent.stop().unwrap();
    let agent = AgentHandle::start(&topo.lb.ns, cfg, false);
    let b1 = agent
        .backends()
        .into_iter()
        .find(|b| b.address == backend_ip(1));
    assert_eq!(b1.map(|b| b.health), Some(HealthState::Down));
    let counts = spread(&topo, 60);
    assert!(counts.keys().all(|k| k == "b0" || k == "b2"), "{counts:?}");
    assert_conns_keep_backend(&mut conns, "b1");

    // Recovery: back in the table after `rise` good checks.
    srv[1] = NameServer::start(&topo.backends[1].ns, "b1", PORT);
    wait_health(
        &agent,
        backend_ip(1).into(),
        HealthState::Up,
        Duration::from_secs(5),
    );
    let counts = spread(&topo, 300);
    assert!(counts.get("b1").copied().unwrap_or(0) > 50, "{counts:?}");
    assert_conns_keep_backend(&mut conns, "b1");
    agent.stop().unwrap();
}

#[test]
fn e2e_dsr_balance_and_failover() {
    skip_unless_possible!();
    balance_and_failover(BackendMode::Dsr, r#"{ type = "http", path = "/health" }"#);
}

#[test]
fn e2e_ipip_balance_and_failover() {
    skip_unless_possible!();
    balance_and_failover(BackendMode::Ipip, r#"{ type = "tcp" }"#);
}

/// Adding a backend moves no established connection; a drained backend keeps its
/// connections and gets no new ones; established connections survive agent restarts (with
/// the program left attached, and with a detach and re-attach).
#[test]
fn e2e_dsr_add_drain_and_restart() {
    skip_unless_possible!();
    let topo = Topology::new(3, BackendMode::Dsr);
    let _srv = servers(&topo);
    let cfg = config(BackendMode::Dsr, 2, r#"{ type = "tcp" }"#);
    let _pins = pins(&cfg);
    let agent = AgentHandle::start(&topo.lb.ns, cfg.clone(), true);

    let counts = spread(&topo, 300);
    assert_balanced(&counts, &["b0", "b1"], 300, 0.35);
    let mut conns = long_conns(&topo, &["b0", "b1"], 3);

    agent
        .call(&Request::BackendAdd {
            vip: vip_id(),
            backend: BackendSpec {
                address: backend_ip(2).into(),
                mac: None,
                weight: 1,
                interface: None,
            },
        })
        .unwrap();
    let counts = spread(&topo, 600);
    assert!(counts.get("b2").copied().unwrap_or(0) > 120, "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 600, "{counts:?}");
    assert!(!counts.keys().any(|k| k.starts_with("error")), "{counts:?}");
    assert_conns_keep_backend(&mut conns, "");

    agent
        .call(&Request::BackendWeight {
            vip: vip_id(),
            address: backend_ip(0).into(),
            weight: 0,
        })
        .unwrap();
    let counts = spread(&topo, 300);
    assert!(
        !counts.contains_key("b0") && counts.values().sum::<usize>() == 300,
        "{counts:?}"
    );
    assert!(!counts.keys().any(|k| k.starts_with("error")), "{counts:?}");
    assert_conns_keep_backend(&mut conns, "");
    let drained = agent.backends();
    assert_eq!(drained[0].weight, 0);
    assert!(drained[0].counters.packets > 0);

    // Restart with the program left attached: the next agent takes over the link.
    agent.stop().unwrap();
    assert_conns_keep_backend(&mut conns, "");
    let agent = AgentHandle::start(&topo.lb.ns, cfg.clone(), false);
    assert_conns_keep_backend(&mut conns, "");
    let counts = spread(&topo, 300);
    assert_balanced(&counts, &["b0", "b1"], 300, 0.35);

    // A VIP added at runtime is not in the file: the next agent removes it from the maps.
    let extra: lb_userspace::config::VipSpec = serde_json::from_value(serde_json::json!({
        "address": "10.77.100.2", "port": 80, "protocol": "tcp", "table_size": 251,
    }))
    .unwrap();
    agent.call(&Request::VipAdd { vip: extra }).unwrap();
    assert_eq!(pinned_len::<VipKey, VipMeta>(&cfg, "VIPS"), 2);
    assert_eq!(pinned_len::<[u8; 16], VipAddrInfo>(&cfg, "VIP_ADDRS"), 2);

    // Restart with a detach: the pinned connection table still holds the flows.
    agent.stop().unwrap();
    let agent = AgentHandle::start(&topo.lb.ns, cfg.clone(), false);
    assert_conns_keep_backend(&mut conns, "");
    let stats = agent.stats();
    assert!(stats.global["conn_hit"] > 0, "{stats:?}");
    assert_eq!(pinned_len::<VipKey, VipMeta>(&cfg, "VIPS"), 1);
    assert_eq!(pinned_len::<[u8; 16], VipAddrInfo>(&cfg, "VIP_ADDRS"), 1);
    agent.stop().unwrap();
}

/// A restart with a file that dropped the first backend: each backend the file keeps keeps
/// its id, so its established connections stay on it (the connection table names backends by
/// id) and its counters stay its own.
#[test]
fn e2e_restart_with_a_changed_config_keeps_the_kept_backends() {
    skip_unless_possible!();
    let topo = Topology::new(3, BackendMode::Dsr);
    let _srv = servers(&topo);
    let cfg = config(BackendMode::Dsr, 3, r#"{ type = "tcp" }"#);
    let _pins = pins(&cfg);
    let agent = AgentHandle::start(&topo.lb.ns, cfg.clone(), false);
    let mut conns = long_conns(&topo, &["b0", "b1", "b2"], 2);
    let before = agent.backends();
    agent.stop().unwrap();

    let mut next = cfg.clone();
    next.vips[0].backends.remove(0);
    let agent = AgentHandle::start(&topo.lb.ns, next, false);
    conns.retain(|(name, _)| name != "b0");
    assert_conns_keep_backend(&mut conns, "");
    for b in agent.backends() {
        let was = before.iter().find(|x| x.address == b.address).unwrap();
        assert_eq!(b.id, was.id, "backend {} changed id", b.address);
        assert!(
            b.counters.packets > was.counters.packets,
            "backend {}: {:?} after, {:?} before",
            b.address,
            b.counters,
            was.counters
        );
    }
    let counts = spread(&topo, 100);
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b1", "b2"],
        "{counts:?}"
    );
    agent.stop().unwrap();
}

/// Number of keys in one of the agent's pinned hash maps.
fn pinned_len<K: aya::Pod, V: aya::Pod>(cfg: &Config, map: &str) -> usize {
    let path = PathBuf::from("/sys/fs/bpf")
        .join(&cfg.agent.pin_name)
        .join(map);
    let data = aya::maps::MapData::from_pin(&path).expect("opening a pinned map");
    let map = aya::maps::Map::HashMap(data);
    let hash: aya::maps::HashMap<_, K, V> = aya::maps::HashMap::try_from(&map).unwrap();
    hash.keys().count()
}

/// A start-up that fails (an interface that does not exist) says why and leaves nothing
/// attached or listening.
#[test]
fn e2e_failed_start_leaves_nothing() {
    skip_unless_possible!();
    let topo = Topology::new(1, BackendMode::Dsr);
    let mut cfg = config(BackendMode::Dsr, 1, r#"{ type = "tcp" }"#);
    cfg.agent.interfaces = vec!["eth0".into(), "nope0".into()];
    let _pins = pins(&cfg);
    let e = AgentHandle::try_start(&topo.lb.ns, cfg.clone(), false)
        .err()
        .expect("the agent started without its interface");
    assert!(
        format!("{e:#}").contains("\"nope0\" does not exist"),
        "{e:#}"
    );
    assert!(!cfg.agent.admin_socket.exists(), "admin socket left behind");
    let links = std::process::Command::new("ip")
        .args(["-n", topo.lb.ns.name(), "link", "show", "eth0"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("prog/xdp"), "XDP left attached: {links}");
}

/// `xdp_mode`: native fails on an interface without driver XDP (`lo`) and says how to fall
/// back; `auto` falls back to generic mode there and stays native elsewhere.
#[test]
fn e2e_xdp_mode_auto_falls_back() {
    skip_unless_possible!();
    let topo = Topology::new(1, BackendMode::Dsr);
    let _srv = servers(&topo);
    let link = |iface: &str| {
        let out = std::process::Command::new("ip")
            .args(["-n", topo.lb.ns.name(), "link", "show", iface])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut cfg = config(BackendMode::Dsr, 1, r#"{ type = "tcp" }"#);
    cfg.agent.interfaces = vec!["eth0".into(), "lo".into()];
    let _pins = pins(&cfg);
    let e = AgentHandle::try_start(&topo.lb.ns, cfg.clone(), false)
        .err()
        .expect("native XDP attached to lo");
    assert!(format!("{e:#}").contains("xdp_mode = \"auto\""), "{e:#}");
    assert!(!link("eth0").contains("prog/xdp"), "{}", link("eth0"));

    cfg.agent.xdp_mode = XdpModeSetting::Auto;
    let agent = AgentHandle::start(&topo.lb.ns, cfg, false);
    assert!(link("lo").contains("xdpgeneric"), "{}", link("lo"));
    assert!(link("eth0").contains(" xdp "), "{}", link("eth0"));
    assert_eq!(spread(&topo, 20).keys().collect::<Vec<_>>(), ["b0"]);
    agent.stop().unwrap();
    assert!(!link("lo").contains("prog/xdp"), "{}", link("lo"));
}

/// `lbctl reload` applies the difference to the file: a removed backend leaves, an added one
/// joins, the others keep their connections; a broken file changes nothing.
#[test]
fn e2e_reload_applies_the_difference() {
    skip_unless_possible!();
    let topo = Topology::new(3, BackendMode::Dsr);
    let _srv = servers(&topo);
    let cfg = config(BackendMode::Dsr, 2, r#"{ type = "tcp" }"#);
    let _pins = pins(&cfg);
    let path = PathBuf::from(format!("/tmp/{}.toml", cfg.agent.pin_name));
    let _file = FileCleanup(path.clone());
    let text = |backends: &[usize], table: u32| {
        let mut t = format!(
            "[agent]\ninterfaces = [\"eth0\"]\npin_name = \"{}\"\nadmin_socket = \"{}\"\n\n\
             [[vip]]\naddress = \"{VIP}\"\nport = {PORT}\nprotocol = \"tcp\"\ntable_size = {table}\n\
             health_check = {{ type = \"tcp\" }}\n",
            cfg.agent.pin_name,
            cfg.agent.admin_socket.display()
        );
        for i in backends {
            t.push_str(&format!(
                "\n[[vip.backend]]\naddress = \"{}\"\n",
                backend_ip(*i)
            ));
        }
        t
    };
    std::fs::write(&path, text(&[0, 1], 65537)).unwrap();
    let agent = AgentHandle::start_from_file(&topo.lb.ns, &path);
    let mut conns = long_conns(&topo, &["b0", "b1"], 2);

    std::fs::write(&path, text(&[1, 2], 65537)).unwrap();
    let out = lbctl(&agent, &["reload"]).unwrap();
    assert!(out.contains("backends +1 -1"), "{out}");
    let counts = spread(&topo, 300);
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b1", "b2"],
        "{counts:?}"
    );
    conns.retain(|(name, _)| name == "b1");
    assert_conns_keep_backend(&mut conns, "");

    let before = layout(&agent);
    std::fs::write(&path, text(&[0], 100)).unwrap();
    let e = lbctl(&agent, &["reload"]).unwrap_err();
    assert!(e.to_string().contains("not a prime"), "{e}");
    assert_eq!(before, layout(&agent));

    // A valid file whose new backend cannot be reached (its interface does not exist): the
    // reload fails before it removes anything, the running state stays whole.
    let mut unreachable = text(&[1], 65537);
    unreachable.push_str("\n[[vip.backend]]\naddress = \"10.77.0.99\"\ninterface = \"nope0\"\n");
    std::fs::write(&path, unreachable).unwrap();
    let e = lbctl(&agent, &["reload"]).unwrap_err();
    assert!(e.to_string().contains("\"nope0\" does not exist"), "{e}");
    assert_eq!(
        before,
        layout(&agent),
        "a failed reload applied part of the file"
    );
    let counts = spread(&topo, 100);
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b1", "b2"],
        "{counts:?}"
    );

    // An [agent] change applies at the next restart, and the reply says so.
    let moved = text(&[1, 2], 65537).replace(
        "interfaces = [\"eth0\"]",
        "interfaces = [\"eth0\"]\nmetrics_address = \"127.0.0.1:9199\"",
    );
    std::fs::write(&path, moved).unwrap();
    let out = lbctl(&agent, &["reload"]).unwrap();
    assert!(
        out.contains("not applied until lb-agent restarts: [agent] metrics_address"),
        "{out}"
    );
    agent.stop().unwrap();
}

/// Removes a file when the test ends.
struct FileCleanup(PathBuf);

impl Drop for FileCleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runtime changes through the admin API show in traffic; bad requests are refused with a
/// message naming the problem and change nothing; metrics are served.
#[test]
fn e2e_admin_api_and_metrics() {
    skip_unless_possible!();
    let topo = Topology::new(3, BackendMode::Dsr);
    let _srv = servers(&topo);
    let _srv8080: Vec<NameServer> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| NameServer::start(&b.ns, &format!("b{i}-8080"), 8080))
        .collect();
    let mut cfg = config(BackendMode::Dsr, 1, r#"{ type = "tcp" }"#);
    cfg.agent.metrics_address = Some("127.0.0.1:9100".parse().unwrap());
    let _pins = pins(&cfg);
    let agent = AgentHandle::start(&topo.lb.ns, cfg, false);

    // A second VIP on port 8080, built at runtime.
    let vip2: VipId = format!("{VIP}:8080/tcp").parse().unwrap();
    let spec: lb_userspace::config::VipSpec = serde_json::from_value(serde_json::json!({
        "address": VIP.to_string(), "port": 8080, "protocol": "tcp", "table_size": 4099,
        "health_check": { "type": "http", "path": "/" },
    }))
    .unwrap();
    agent.call(&Request::VipAdd { vip: spec }).unwrap();
    for i in [1, 2] {
        agent
            .call(&Request::BackendAdd {
                vip: vip2,
                backend: BackendSpec {
                    address: backend_ip(i).into(),
                    mac: None,
                    weight: 1,
                    interface: Some("eth0".into()),
                },
            })
            .unwrap();
    }
    let counts = tally(&topo, 200, || ask_once(SocketAddr::from((VIP, 8080))));
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["b1-8080", "b2-8080"]);
    assert_eq!(spread(&topo, 50).keys().collect::<Vec<_>>(), ["b0"]);

    // Bad requests: refused, named, and nothing changes.
    let before = layout(&agent);
    let unknown: VipId = format!("{VIP}:81/tcp").parse().unwrap();
    let bad = [
        (
            Request::BackendAdd {
                vip: unknown,
                backend: BackendSpec {
                    address: backend_ip(1).into(),
                    mac: None,
                    weight: 1,
                    interface: None,
                },
            },
            "unknown VIP",
        ),
        (
            Request::BackendAdd {
                vip: vip2,
                backend: BackendSpec {
                    address: backend_ip(1).into(),
                    mac: None,
                    weight: 1,
                    interface: None,
                },
            },
            "already has backend 10.77.0.12",
        ),
        (
            Request::BackendAdd {
                vip: vip2,
                backend: BackendSpec {
                    address: backend_ip(0).into(),
                    mac: None,
                    weight: 1,
                    interface: Some("nope0".into()),
                },
            },
            "\"nope0\" does not exist",
        ),
        (
            Request::BackendDel {
                vip: vip2,
                address: backend_ip(0).into(),
            },
            "has no backend 10.77.0.11",
        ),
        (Request::VipDel { vip: unknown }, "unknown VIP"),
    ];
    for (req, want) in bad {
        let e = agent.call(&req).unwrap_err().to_string();
        assert!(e.contains(want), "{req:?}: {e}");
    }
    for (raw, want) in [
        (
            r#"{"op":"backend_del","vip":"10.77.100.1:80/tcp","address":"10.77.0.300"}"#,
            "invalid IP address",
        ),
        (
            r#"{"op":"vip_add","vip":{"address":"10.77.100.2","port":80,"protocol":"tcp","table_size":1000}}"#,
            "not a prime",
        ),
    ] {
        let e = raw_call(&agent, raw);
        assert!(e.contains(want), "{raw}: {e}");
    }
    assert_eq!(
        before,
        layout(&agent),
        "a refused request changed the state"
    );

    // Metrics.
    let body = topo.lb.ns.run(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9100").unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{body}"
    );
    assert!(
        body.contains(
            r#"xdplb_backend_new_flows_total{vip="10.77.100.1:8080/tcp",backend="10.77.0.12"}"#
        ),
        "{body}"
    );
    // Connections that send nothing are capped (64 at once): the rest are closed at once,
    // so they cannot use up the descriptors that health checks need.
    let closed_at_once = topo.lb.ns.run(|| {
        use std::io::Read;
        let held: Vec<std::net::TcpStream> = (0..96)
            .map(|_| std::net::TcpStream::connect("127.0.0.1:9100").unwrap())
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(300));
        held.iter()
            .filter(|s| {
                let mut s: &std::net::TcpStream = s;
                s.set_read_timeout(Some(std::time::Duration::from_millis(200)))
                    .unwrap();
                matches!(s.read(&mut [0u8; 16]), Ok(0))
            })
            .count()
    });
    assert!(
        closed_at_once >= 32,
        "{closed_at_once} of 96 closed at once"
    );
    assert!(
        body.contains(r#"xdplb_backend_up{vip="10.77.100.1:80/tcp",backend="10.77.0.11"} 1"#),
        "{body}"
    );

    // The CLI: add and remove a backend of the port-80 VIP, seen in traffic and listings.
    let v80 = vip_id().to_string();
    let b3 = backend_ip(2).to_string();
    lbctl(&agent, &["backend", "add", &v80, &b3]).unwrap();
    let counts = spread(&topo, 200);
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b0", "b2"],
        "{counts:?}"
    );
    let listing = lbctl(&agent, &["backend", "list", &v80]).unwrap();
    assert!(
        listing.starts_with("VIP ") && listing.contains(&b3),
        "{listing}"
    );
    let stats = lbctl(&agent, &["stats"]).unwrap();
    assert!(stats.contains("conn_miss"), "{stats}");
    let health = lbctl(&agent, &["--json", "health"]).unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(&health).is_ok(),
        "{health}"
    );
    lbctl(&agent, &["backend", "drain", &v80, &b3]).unwrap();
    lbctl(&agent, &["backend", "del", &v80, &b3]).unwrap();
    assert_eq!(spread(&topo, 50).keys().collect::<Vec<_>>(), ["b0"]);
    let e = lbctl(&agent, &["backend", "del", &v80, &b3]).unwrap_err();
    assert_eq!(e.exit_code(), 1);
    assert!(e.to_string().contains("has no backend 10.77.0.13"), "{e}");
    let e = lbctl(
        &agent,
        &["vip", "add", "10.77.100.9:80/tcp", "--table-size", "100"],
    )
    .unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(lb_userspace::cli::Args::try_parse_from([
        "lbctl",
        "backend",
        "add",
        &v80,
        "10.77.0.300"
    ])
    .is_err());

    // Removing the VIP takes it out of the datapath.
    agent.call(&Request::VipDel { vip: vip2 }).unwrap();
    let stats = agent.stats();
    assert_eq!(stats.vips.len(), 1);
    let gone = topo
        .client
        .ns
        .run(|| ask_once(SocketAddr::from((VIP, 8080))));
    assert!(gone.is_err(), "VIP still answers after removal: {gone:?}");
    agent.stop().unwrap();
}

/// The VIPs and their backends (address, id, weight): what a refused request must not change.
fn layout(agent: &AgentHandle) -> Vec<String> {
    let vips: Vec<lb_userspace::api::VipView> =
        serde_json::from_value(agent.call(&Request::VipList).unwrap()).unwrap();
    vips.iter()
        .flat_map(|v| {
            v.backends
                .iter()
                .map(move |b| format!("{} {} id={} weight={}", v.vip, b.address, b.id, b.weight))
        })
        .collect()
}

/// Runs `lbctl ARGS` in-process against the agent; returns what it printed.
fn lbctl(agent: &AgentHandle, args: &[&str]) -> Result<String, lb_userspace::cli::CliError> {
    let socket = agent.socket.to_string_lossy().into_owned();
    let argv = ["lbctl", "--socket", socket.as_str()]
        .into_iter()
        .chain(args.iter().copied());
    let parsed = lb_userspace::cli::Args::try_parse_from(argv).expect("lbctl arguments");
    let mut out = Vec::new();
    lb_userspace::cli::execute(parsed, &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

/// Sends one raw JSON line to the admin socket; returns the error message of the reply.
fn raw_call(agent: &AgentHandle, line: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    match serde_json::from_str(&reply).unwrap() {
        lb_userspace::api::Response::Error { message } => message,
        ok => panic!("{line} was accepted: {ok:?}"),
    }
}

/// A UDP VIP, with the program attached in generic (SKB) mode: datagrams from new flows
/// reach all backends and the answers come back from the VIP.
#[test]
fn e2e_udp_generic_mode() {
    skip_unless_possible!();
    let topo = Topology::new(3, BackendMode::Dsr);
    let addr = SocketAddr::from((VIP, 5353));
    let _srv = udp_servers(&topo, addr);
    let mut cfg = config_text(BackendMode::Dsr, 3, "protocol = \"udp\"\nport = 5353");
    cfg.agent.xdp_mode = XdpModeSetting::Generic;
    let _pins = pins(&cfg);
    let agent = AgentHandle::start(&topo.lb.ns, cfg, false);
    let n = 600;
    let counts = tally(&topo, n, || udp_ask(addr));
    assert_eq!(counts.values().sum::<usize>(), n);
    for b in ["b0", "b1", "b2"] {
        assert!(
            counts.get(b).copied().unwrap_or(0) > n / 5,
            "{b} got too few flows: {counts:?}"
        );
    }
    // A reused source port is the same flow, so count packets, not new flows.
    let stats = agent.stats();
    assert_eq!(stats.vips[0].counters.packets, n as u64, "{stats:?}");
    agent.stop().unwrap();
}

/// IPv6 VIPs, one in DSR mode and one in IP6IP6 mode, on the same backends.
#[test]
fn e2e_ipv6_dsr_and_ipip() {
    skip_unless_possible!();
    let topo = Topology::new(3, BackendMode::Ipip);
    let _srv80 = servers(&topo);
    let _srv81: Vec<NameServer> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| NameServer::start(&b.ns, &format!("b{i}"), 81))
        .collect();
    let pin = unique_name("pin");
    let mut text = format!(
        r#"
[agent]
interfaces = ["eth0"]
pin_name = "{pin}"
admin_socket = "/tmp/{pin}.sock"
ipip_src_v6 = "{LB_IP6}"

[[vip]]
address = "{VIP6}"
port = 80
protocol = "tcp"
health_check = {{ type = "tcp" }}
{backends}
[[vip]]
address = "{VIP6}"
port = 81
protocol = "tcp"
mode = "ipip"
{backends}
"#,
        backends = (0..3)
            .map(|i| format!("[[vip.backend]]\naddress = \"{}\"\n", backend_ip6(i)))
            .collect::<String>(),
    );
    text = text.replace("\n\n\n", "\n\n");
    let cfg = Config::parse(&text, "v6.toml".as_ref()).expect("v6 config");
    let _pins = pins(&cfg);
    let agent = AgentHandle::start(&topo.lb.ns, cfg, false);
    for port in [80, 81] {
        let addr = SocketAddr::from((VIP6, port));
        let n = 600;
        let counts = tally(&topo, n, || ask_once(addr));
        for b in ["b0", "b1", "b2"] {
            assert!(
                counts.get(b).copied().unwrap_or(0) > n / 5,
                "port {port}: {b} got too few: {counts:?}"
            );
        }
        assert_eq!(counts.values().sum::<usize>(), n);
        assert!(
            !counts.keys().any(|k| k.starts_with("error")),
            "port {port}: {counts:?}"
        );
    }
    let stats = agent.stats();
    assert!(stats.global["tx"] >= 1200, "{stats:?}");
    agent.stop().unwrap();
}

/// An agent with no interfaces and no VIPs in a namespace of its own: enough for tests of
/// the admin API alone.
fn bare_agent(ns: &integration_tests::netns::Netns) -> (AgentHandle, PinCleanup) {
    let pin = unique_name("pin");
    let text = format!("[agent]\npin_name = \"{pin}\"\nadmin_socket = \"/tmp/{pin}.sock\"\n");
    let cfg = Config::parse(&text, "bare.toml".as_ref()).expect("bare config");
    let cleanup = pins(&cfg);
    (AgentHandle::start(ns, cfg, false), cleanup)
}

/// Sends raw bytes to the admin socket (from another thread, ignoring write errors: the
/// agent may close first) and returns the first reply line, or "" if the agent closed
/// without one. Fails the test if nothing comes within 10 s.
fn raw_exchange(agent: &AgentHandle, bytes: Vec<u8>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&bytes);
    });
    let mut reply = String::new();
    let read = BufReader::new(&s).read_line(&mut reply);
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    read.unwrap_or_else(|e| panic!("no reply from the agent: {e}"));
    reply
}

/// The admin socket survives hostile clients: one that connects and never sends does not
/// block others; an endless line is refused (not buffered without bound); a line that is
/// not UTF-8 gets an error reply, not a silent hang-up.
#[test]
fn e2e_admin_socket_hostile_clients() {
    skip_unless_possible!();
    let ns = integration_tests::netns::Netns::new("adm");
    let (agent, _pins) = bare_agent(&ns);
    let _idle = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();

    let huge = vec![b'x'; 3 << 20];
    let reply = raw_exchange(&agent, huge);
    assert!(reply.contains("longer than"), "{reply:?}");

    let reply = raw_exchange(&agent, b"{\"op\":\"vip_list\xff\"}\n".to_vec());
    assert!(reply.contains("bad request"), "{reply:?}");

    // Still serving, the idle client still connected.
    assert!(agent.call(&Request::VipList).is_ok());
    agent.stop().unwrap();
}

/// A second agent (another pin_name) configured with the socket of a running one must not
/// take it over, and an admin_socket path that is not a socket must not be deleted.
#[test]
fn e2e_admin_socket_is_not_stolen() {
    skip_unless_possible!();
    let ns = integration_tests::netns::Netns::new("adm2");
    let (first, _pins) = bare_agent(&ns);

    let pin = unique_name("pin");
    let second = |socket: &std::path::Path| {
        let text = format!(
            "[agent]\npin_name = \"{pin}\"\nadmin_socket = \"{}\"\n",
            socket.display()
        );
        let cfg = Config::parse(&text, "second.toml".as_ref()).unwrap();
        // The start-up wait may be answered by the first agent: the second one's own
        // result is what `stop` returns.
        match AgentHandle::try_start(&ns, cfg, false) {
            Ok(handle) => handle.stop(),
            Err(e) => Err(e),
        }
    };
    let _second_pins = PinCleanup(pin.clone());
    let e = second(&first.socket).expect_err("a second agent took over the admin socket");
    assert!(format!("{e:#}").contains("in use"), "{e:#}");
    assert!(
        first.call(&Request::VipList).is_ok(),
        "the first agent lost its socket"
    );

    let file = PathBuf::from(format!("/tmp/{pin}.toml"));
    let _file = FileCleanup(file.clone());
    std::fs::write(&file, "precious").unwrap();
    let e = second(&file).expect_err("an agent replaced a regular file with its socket");
    assert!(format!("{e:#}").contains("not a socket"), "{e:#}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    first.stop().unwrap();
}

/// A backend id freed by one VIP and reused by another VIP's new backend must not capture
/// the first VIP's established flows: they are re-picked among their own VIP's backends.
/// (UDP flows live in the connection table until evicted, so this is the common case.)
#[test]
fn e2e_reused_backend_id_does_not_capture_another_vips_flows() {
    skip_unless_possible!();
    let topo = Topology::new(3, BackendMode::Dsr);
    let addr = SocketAddr::from((VIP, 5353));
    let _srv = udp_servers(&topo, addr);
    // VIP A (5353/udp): b0 (id 0) and b1 (id 1). VIP B (5354/udp): no backend yet.
    let mut cfg = config_text(BackendMode::Dsr, 2, "protocol = \"udp\"\nport = 5353");
    let mut b_spec = cfg.vips[0].clone();
    b_spec.port = 5354;
    b_spec.backends.clear();
    cfg.vips.push(b_spec);
    let _pins = pins(&cfg);
    let agent = AgentHandle::start(&topo.lb.ns, cfg, false);

    // Client flows (fixed source ports) on VIP A, some on b0.
    let socks: Vec<std::net::UdpSocket> = topo.client.ns.run(|| {
        (0..24)
            .map(|_| {
                let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                s.connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                s
            })
            .collect()
    });
    let ask = |s: &std::net::UdpSocket| {
        s.send(b"which").unwrap();
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let owners: Vec<String> = socks.iter().map(ask).collect();
    assert!(owners.iter().any(|o| o == "b0"), "{owners:?}");
    assert!(owners.iter().all(|o| o == "b0" || o == "b1"), "{owners:?}");

    // b0 leaves VIP A; b2 joins VIP B and gets the freed id 0.
    let vip_a = format!("{VIP}:5353/udp");
    let vip_b = format!("{VIP}:5354/udp");
    lbctl(
        &agent,
        &["backend", "del", &vip_a, &backend_ip(0).to_string()],
    )
    .unwrap();
    lbctl(
        &agent,
        &["backend", "add", &vip_b, &backend_ip(2).to_string()],
    )
    .unwrap();
    let b2 = agent
        .backends()
        .into_iter()
        .find(|b| b.address == backend_ip(2))
        .unwrap();
    assert_eq!(b2.id, 0, "the test expects the freed id to be reused");

    // VIP A's flows now all reach b1, its only backend; none reaches VIP B's b2.
    let after: Vec<String> = socks.iter().map(ask).collect();
    assert!(after.iter().all(|o| o == "b1"), "{after:?}");
    let stats = agent.stats();
    let vip_b_view = stats.vips.iter().find(|v| v.vip.port == 5354).unwrap();
    assert_eq!(vip_b_view.backends[0].counters.packets, 0, "{stats:?}");
    agent.stop().unwrap();
}

/// A weight change the Maglev table cannot take (more weighted backends than entries) is
/// refused and leaves the backend's weight as it was, in the agent's view and the maps.
#[test]
fn e2e_refused_weight_change_changes_nothing() {
    skip_unless_possible!();
    let ns = integration_tests::netns::Netns::new("wt");
    // A link for the backends' route (no dummy driver here: a veth pair inside the namespace).
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "d0"]);
    ns.ip(&["link", "set", "d1", "up"]);
    ns.ip(&["link", "set", "d0", "up"]);
    let (agent, _pins) = bare_agent(&ns);
    let vip = "10.99.100.1:80/tcp";
    lbctl(&agent, &["vip", "add", vip, "--table-size", "3"]).unwrap();
    let add = |i: u8, weight: &str| {
        let addr = format!("10.99.0.{}", 10 + i);
        let mac = format!("02:00:00:00:00:{i:02x}");
        lbctl(
            &agent,
            &[
                "backend",
                "add",
                vip,
                &addr,
                "--weight",
                weight,
                "--mac",
                &mac,
                "--interface",
                "d0",
            ],
        )
    };
    for i in 1..=3 {
        add(i, "1").unwrap();
    }
    // A fourth, drained from the start, fits (it takes no table entry).
    add(4, "0").unwrap();
    let before = layout(&agent);
    let e = lbctl(&agent, &["backend", "weight", vip, "10.99.0.14", "1"]).unwrap_err();
    assert!(e.to_string().contains("table"), "{e}");
    assert_eq!(before, layout(&agent), "a refused weight change was kept");
    // A fifth weighted backend is refused up front, too.
    let e = add(5, "1").unwrap_err();
    assert!(e.to_string().contains("table"), "{e}");
    assert_eq!(before, layout(&agent));
    agent.stop().unwrap();
}

/// A UDP name server on `addr` in each backend's namespace, named `b0`, `b1`, ...
fn udp_servers(topo: &Topology, addr: SocketAddr) -> Vec<UdpNameServer> {
    topo.backends
        .iter()
        .enumerate()
        .map(|(i, b)| UdpNameServer::start(&b.ns, &format!("b{i}"), addr))
        .collect()
}

/// A backend whose MAC changes (a replaced NIC, a moved VM) gets its traffic at the new MAC
/// once the kernel's neighbour table knows it: the agent follows that table, where it kept
/// the MAC it resolved at start and every frame to the backend was lost while its health
/// checks (sent by the kernel) passed.
#[test]
fn e2e_dsr_follows_a_backend_mac_change() {
    skip_unless_possible!();
    let topo = Topology::new(2, BackendMode::Dsr);
    let _srv = servers(&topo);
    let cfg = config(BackendMode::Dsr, 2, r#"{ type = "tcp" }"#);
    let _pins = pins(&cfg);
    let agent = AgentHandle::start(&topo.lb.ns, cfg, false);
    assert_reaches(&topo, 60, &["b0", "b1"]);

    let new_mac = "02:31:00:00:00:11";
    topo.backends[1]
        .ns
        .ip(&["link", "set", "eth0", "address", new_mac]);
    // What the kernel learns from the backend's next ARP traffic, at once.
    topo.lb.ns.ip(&[
        "neigh",
        "replace",
        &backend_ip(1).to_string(),
        "lladdr",
        new_mac,
        "dev",
        "eth0",
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    loop {
        let b1 = agent
            .backends()
            .into_iter()
            .find(|b| b.address == backend_ip(1))
            .expect("backend 1");
        if b1.mac == new_mac {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent still sends to {} 12 s after the MAC changed",
            b1.mac
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_reaches(&topo, 60, &["b0", "b1"]);
    agent.stop().unwrap();
}

/// A backend named by its IPv6 link-local address (with the interface it is on): its health
/// checks and the neighbour probe carry the interface as the address's scope, without which
/// every check failed with EINVAL and the backend never came up.
#[test]
fn e2e_ipv6_link_local_backend() {
    skip_unless_possible!();
    let topo = Topology::new(1, BackendMode::Dsr);
    let _srv = servers(&topo);
    // The kernel's link-local address, once duplicate address detection is done with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let link_local: std::net::Ipv6Addr = loop {
        let out = std::process::Command::new("ip")
            .args(["-n", topo.backends[0].ns.name(), "-j", "-6", "addr", "show"])
            .args(["dev", "eth0", "scope", "link"])
            .output()
            .expect("ip addr");
        let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        let ready = links[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["local"].is_string() && a["tentative"].as_bool() != Some(true))
            .and_then(|a| a["local"].as_str()?.parse().ok());
        if let Some(addr) = ready {
            break addr;
        }
        assert!(
            Instant::now() < deadline,
            "no usable link-local address on b0: {links}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let pin = unique_name("pin");
    let text = format!(
        r#"
[agent]
interfaces = ["eth0"]
pin_name = "{pin}"
admin_socket = "/tmp/{pin}.sock"

[[vip]]
address = "{VIP6}"
port = {PORT}
protocol = "tcp"
health_check = {{ type = "tcp", interval = "200ms" }}

[[vip.backend]]
address = "{link_local}"
interface = "eth0"
"#
    );
    let cfg = Config::parse(&text, "ll.toml".as_ref()).expect("link-local config");
    let _pins = pins(&cfg);
    let agent = AgentHandle::start(&topo.lb.ns, cfg, false);
    // A backend starts up; five checks later (fall is 3), it must still be.
    std::thread::sleep(Duration::from_millis(1000));
    let b0 = agent
        .backends()
        .into_iter()
        .find(|b| b.address == std::net::IpAddr::from(link_local))
        .expect("the link-local backend");
    assert_eq!(
        (b0.health, b0.last_error.as_deref()),
        (HealthState::Up, None),
        "{b0:?}"
    );
    let counts = tally(&topo, 30, || ask_once(SocketAddr::from((VIP6, PORT))));
    assert_eq!(counts.get("b0").copied(), Some(30), "{counts:?}");
    agent.stop().unwrap();
}

/// Takes backend `i`'s address off its interface, so that nothing answers ARP for it (a
/// machine that is off); returns the address.
fn silence_backend(topo: &Topology, i: usize) -> std::net::Ipv4Addr {
    let ip = backend_ip(i);
    topo.backends[i]
        .ns
        .ip(&["addr", "del", &format!("{ip}/24"), "dev", "eth0"]);
    ip
}

/// Backend `ip` is down because its next hop has no MAC.
fn assert_down_without_mac(agent: &AgentHandle, ip: std::net::Ipv4Addr) {
    let b = agent
        .backends()
        .into_iter()
        .find(|b| b.address == ip)
        .expect("the backend");
    assert_eq!(b.health, HealthState::Down, "{b:?}");
    assert!(
        b.last_error.as_deref().unwrap_or("").contains("no MAC"),
        "{b:?}"
    );
}

/// A backend whose next hop does not answer ARP (a machine that is off) no longer stops the
/// agent from starting: it is down, with the reason, and comes up by itself once it answers.
#[test]
fn e2e_unresolved_backend_is_down_until_it_answers() {
    skip_unless_possible!();
    let topo = Topology::new(2, BackendMode::Dsr);
    let _srv = servers(&topo);
    let b1 = silence_backend(&topo, 1);
    let cfg = config_text(
        BackendMode::Dsr,
        2,
        &format!("protocol = \"tcp\"\nport = {PORT}"),
    );
    let _pins = pins(&cfg);
    let agent = AgentHandle::start(&topo.lb.ns, cfg, false);
    assert_down_without_mac(&agent, b1);
    assert_reaches(&topo, 30, &["b0"]);

    topo.backends[1]
        .ns
        .ip(&["addr", "add", &format!("{b1}/24"), "dev", "eth0"]);
    wait_health(&agent, b1.into(), HealthState::Up, Duration::from_secs(15));
    assert_reaches(&topo, 60, &["b0", "b1"]);
    agent.stop().unwrap();
}

/// A second agent on an interface that the first one's program holds is refused with the
/// cause (the interface is taken), whatever its xdp_mode, and the first keeps the interface.
#[test]
fn e2e_second_agent_on_a_taken_interface_says_so() {
    skip_unless_possible!();
    let topo = Topology::new(1, BackendMode::Dsr);
    let _srv = servers(&topo);
    let cfg = config(BackendMode::Dsr, 1, r#"{ type = "tcp" }"#);
    let _pins = pins(&cfg);
    let first = AgentHandle::start(&topo.lb.ns, cfg, false);
    let pin = unique_name("pin");
    let _second_pins = PinCleanup(pin.clone());
    for mode in ["auto", "native"] {
        let text = format!(
            "[agent]\ninterfaces = [\"eth0\"]\npin_name = \"{pin}\"\nadmin_socket = \"/tmp/{pin}.sock\"\nxdp_mode = \"{mode}\"\n"
        );
        let cfg = Config::parse(&text, "second.toml".as_ref()).unwrap();
        let e = match AgentHandle::try_start(&topo.lb.ns, cfg, false) {
            Ok(handle) => handle
                .stop()
                .expect_err("a second agent took the interface"),
            Err(e) => e,
        };
        assert!(
            format!("{e:#}").contains("it already has an XDP program"),
            "{mode}: {e:#}"
        );
    }
    assert_reaches(&topo, 20, &["b0"]);
    first.stop().unwrap();
}

/// A reload that drops a backend's `mac` while its next hop does not answer ARP leaves it
/// down with the reason, out of the table, rather than up with no MAC to send to.
#[test]
fn e2e_reload_to_an_unresolved_next_hop_takes_the_backend_down() {
    skip_unless_possible!();
    let topo = Topology::new(2, BackendMode::Dsr);
    let _srv = servers(&topo);
    let b1 = silence_backend(&topo, 1);
    let pin = unique_name("pin");
    let _pins = PinCleanup(pin.clone());
    let path = PathBuf::from(format!("/tmp/{pin}.toml"));
    let _file = FileCleanup(path.clone());
    let text = |b1_mac: &str| {
        format!(
            "[agent]\ninterfaces = [\"eth0\"]\npin_name = \"{pin}\"\nadmin_socket = \"/tmp/{pin}.sock\"\n\n\
             [[vip]]\naddress = \"{VIP}\"\nport = {PORT}\nprotocol = \"tcp\"\n\n\
             [[vip.backend]]\naddress = \"{}\"\n\n[[vip.backend]]\naddress = \"{b1}\"\n{b1_mac}",
            backend_ip(0)
        )
    };
    std::fs::write(&path, text("mac = \"02:31:00:00:00:99\"\n")).unwrap();
    let agent = AgentHandle::start_from_file(&topo.lb.ns, &path);
    std::fs::write(&path, text("")).unwrap();
    lbctl(&agent, &["reload"]).unwrap();
    assert_down_without_mac(&agent, b1);
    assert_reaches(&topo, 30, &["b0"]);
    agent.stop().unwrap();
}
