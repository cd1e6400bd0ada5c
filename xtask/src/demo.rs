//! `cargo xtask demo`: the whole pipeline in network namespaces on this machine.
//!
//! ```text
//!                      ┌──────────── xdemo-sw (bridge br0) ─────────────┐
//!  xdemo-client ───────┤                                                 ├── xdemo-gw1 ─┐
//!  10.77.0.2           │  xdemo-lb 10.77.0.3: lb-agent, xdp_lb on eth0   ├── xdemo-gw2 ─┼─▶ xdemo-svc 10.77.0.20
//!  VIP via 10.77.0.3   └─────────────────────────────────────────────────┘   (l7-proxy)  │   users, orders, payments,
//!                                                                                         │   orders-v2, catalog, redis
//! ```
//!
//! The client sends HTTPS to the VIP 10.77.100.1:443. The XDP program in `xdemo-lb` picks a
//! gateway by Maglev and rewrites the MACs (L2 DSR); each gateway holds the VIP on `lo`,
//! terminates TLS, applies its routes and policies, and answers the client directly. The
//! configs it writes to /tmp/xdplb-demo are the documented samples (`demo/configs`).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

const PREFIX: &str = "xdemo-";
const VIP: &str = "10.77.100.1";
const JWT_SECRET: &str = "demo-secret-change-me";
const WORK: &str = "/tmp/xdplb-demo";

static STOP: AtomicBool = AtomicBool::new(false);

fn ns(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn sh(args: &[&str]) -> Result<()> {
    crate::run(Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()))
}

/// Runs `args` inside namespace `name` (network namespace only: bpffs stays visible).
fn in_ns(name: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", ns(name))).args(args);
    c
}

fn sh_ns(name: &str, args: &[&str]) -> Result<()> {
    crate::run(in_ns(name, args).stdout(Stdio::null()))
}

/// Removes every namespace of the demo and the processes in them.
pub fn down() -> Result<()> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if !name.starts_with(PREFIX) {
            continue;
        }
        let pids = Command::new("ip").args(["netns", "pids", name]).output()?;
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let _ = Command::new("kill").arg(pid).status();
        }
        std::thread::sleep(Duration::from_millis(200));
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let _ = Command::new("kill")
                .args(["-9", pid])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        eprintln!("demo: removed namespace {name}");
    }
    let _ = std::fs::remove_dir_all("/sys/fs/bpf/xdplb-demo");
    Ok(())
}

/// Processes started by the demo, stopped on drop.
struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Procs {
    fn spawn(&mut self, what: &str, ns_name: &str, bin: &Path, args: &[&str]) -> Result<()> {
        let log = std::fs::File::create(Path::new(WORK).join(format!("{what}.log")))?;
        let mut all = vec![bin.to_str().context("binary path")?];
        all.extend_from_slice(args);
        let child = in_ns(ns_name, &all)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        self.0.push((what.to_string(), child));
        Ok(())
    }

    /// Fails if a process has exited (its log says why).
    fn check(&mut self) -> Result<()> {
        for (what, c) in &mut self.0 {
            if let Some(status) = c.try_wait()? {
                let log = std::fs::read_to_string(Path::new(WORK).join(format!("{what}.log")))
                    .unwrap_or_default();
                bail!("{what} exited ({status}):\n{log}");
            }
        }
        Ok(())
    }
}

pub fn run(root: &Path, keep: bool) -> Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("\ndemo: interrupted, tearing down");
        STOP.store(true, Ordering::SeqCst);
    })
    .context("installing the Ctrl-C handler")?;
    step("building lb-agent, lbctl, l7-proxy and the demo services (release)");
    crate::cargo_release(root, &["lb-userspace", "l7-proxy", "demo"])?;
    let bin = root.join("target/release");
    down()?;
    std::fs::create_dir_all(WORK)?;
    let result = run_demo(root, &bin, keep);
    step("tearing down");
    down()?;
    result
}

fn step(what: &str) {
    eprintln!("\n\x1b[1m==> {what}\x1b[0m");
}

fn interrupted() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Hosts on the bridge: (namespace, address).
const HOSTS: &[(&str, &str)] = &[
    ("client", "10.77.0.2"),
    ("lb", "10.77.0.3"),
    ("gw1", "10.77.0.11"),
    ("gw2", "10.77.0.12"),
    ("svc", "10.77.0.20"),
];

fn topology() -> Result<()> {
    step("creating namespaces: a bridge, a client, the load balancer, two gateways, the services");
    sh(&["ip", "netns", "add", &ns("sw")])?;
    sh_ns("sw", &["ip", "link", "add", "br0", "type", "bridge"])?;
    sh_ns("sw", &["ip", "link", "set", "br0", "up"])?;
    sh_ns("sw", &["ip", "link", "set", "lo", "up"])?;
    for (name, addr) in HOSTS {
        let n = ns(name);
        sh(&["ip", "netns", "add", &n])?;
        let port = format!("p-{name}");
        sh(&[
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            &n,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &ns("sw"),
        ])?;
        sh_ns("sw", &["ip", "link", "set", &port, "master", "br0", "up"])?;
        sh_ns(
            name,
            &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"],
        )?;
        sh_ns(name, &["ip", "link", "set", "eth0", "up"])?;
        sh_ns(name, &["ip", "link", "set", "lo", "up"])?;
        // veth computes no checksums for XDP_TX'd frames: have the senders fill them in.
        let _ = sh_ns(name, &["ethtool", "-K", "eth0", "tx", "off"]);
    }
    // The client reaches the VIP through the load balancer.
    sh_ns(
        "client",
        &[
            "ip",
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            "10.77.0.3",
        ],
    )?;
    // Gateways hold the VIP on lo (DSR) and must not answer ARP for it.
    for gw in ["gw1", "gw2"] {
        sh_ns(
            gw,
            &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
        )?;
        sh_ns(gw, &["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1"])?;
        sh_ns(gw, &["sysctl", "-qw", "net.ipv4.conf.all.arp_announce=2"])?;
    }
    Ok(())
}

fn write(name: &str, text: &str) -> Result<PathBuf> {
    let p = Path::new(WORK).join(name);
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

fn run_demo(root: &Path, bin: &Path, keep: bool) -> Result<()> {
    topology()?;
    let mut procs = Procs(Vec::new());
    let lbdemo = bin.join("lbdemo");
    crate::run(Command::new(&lbdemo).args(["certs", "--dir", WORK]))?;
    // The gateways verify the client's HS256 tokens with this key.
    use base64::Engine as _;
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(JWT_SECRET);
    write(
        "jwks.json",
        &format!(r#"{{"keys":[{{"kty":"oct","alg":"HS256","k":"{k}"}}]}}"#),
    )?;

    step("starting the microservices in xdemo-svc");
    for (name, port) in [
        ("users", 8001),
        ("orders", 8002),
        ("payments", 8003),
        ("orders-v2", 8004),
        ("catalog", 8005),
        ("limited", 8006),
    ] {
        let listen = format!("10.77.0.20:{port}");
        procs.spawn(
            name,
            "svc",
            &lbdemo,
            &["service", "--name", name, "--listen", &listen],
        )?;
    }
    if Path::new("/usr/bin/redis-server").exists() {
        procs.spawn(
            "redis",
            "svc",
            Path::new("/usr/bin/redis-server"),
            // An isolated namespace and no password: protected mode would refuse the gateways.
            &[
                "--bind",
                "10.77.0.20",
                "--port",
                "6379",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
        )?;
    }

    step("starting the L7 gateways (l7-proxy with TLS, routes and policies)");
    let template = std::fs::read_to_string(root.join("demo/configs/gateway.toml"))
        .context("reading demo/configs/gateway.toml")?;
    for (gw, ip) in [("gw1", "10.77.0.11"), ("gw2", "10.77.0.12")] {
        let cfg = template
            .replace("@GATEWAY@", gw)
            .replace("@GW_IP@", ip)
            .replace("@WORK@", WORK)
            .replace("@JWT_SECRET@", JWT_SECRET);
        let path = write(&format!("{gw}.toml"), &cfg)?;
        procs.spawn(
            gw,
            gw,
            &bin.join("l7-proxy"),
            &["--config", path.to_str().unwrap()],
        )?;
    }

    step("starting lb-agent with XDP on xdemo-lb/eth0 (L2 DSR to the gateways)");
    // The bridge port facing the load balancer must run an XDP program to receive XDP_TX.
    procs.spawn("xdp-pass", "sw", &lbdemo, &["xdp-pass", "--iface", "p-lb"])?;
    let lb_cfg = std::fs::read_to_string(root.join("demo/configs/lb.toml"))
        .context("reading demo/configs/lb.toml")?
        .replace("@WORK@", WORK);
    let lb_path = write("lb.toml", &lb_cfg)?;
    procs.spawn(
        "lb-agent",
        "lb",
        &bin.join("lb-agent"),
        &["--config", lb_path.to_str().unwrap()],
    )?;

    step("waiting for the agent's health checks to find both gateways");
    let lbctl = bin.join("lbctl");
    let sock = format!("{WORK}/lb.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        interrupted()?;
        procs.check()?;
        let out = in_ns(
            "lb",
            &[
                lbctl.to_str().unwrap(),
                "--socket",
                &sock,
                "--json",
                "health",
            ],
        )
        .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && text.matches("\"health\": \"up\"").count() >= 2 {
            break;
        }
        if Instant::now() > deadline {
            bail!("gateways not healthy after 30 s: {text}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    crate::run(&mut in_ns(
        "lb",
        &[lbctl.to_str().unwrap(), "--socket", &sock, "health"],
    ))?;

    step("sending traffic from xdemo-client to https://demo.local (VIP 10.77.100.1)");
    interrupted()?;
    let ca = format!("{WORK}/ca.pem");
    let client = in_ns(
        "client",
        &[
            lbdemo.to_str().unwrap(),
            "client",
            "--vip",
            &format!("{VIP}:443"),
            "--ca",
            &ca,
            "--jwt-secret",
            JWT_SECRET,
        ],
    )
    .status()?;
    procs.check()?;

    step("XDP tier: lbctl stats (per VIP and gateway, and datapath counters)");
    crate::run(&mut in_ns(
        "lb",
        &[lbctl.to_str().unwrap(), "--socket", &sock, "stats"],
    ))?;

    step("L7 tier: selected Prometheus metrics of each gateway");
    for (gw, addr) in [("gw1", "10.77.0.11"), ("gw2", "10.77.0.12")] {
        let out = in_ns(gw, &["curl", "-s", &format!("http://{addr}:9901/metrics")]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!("-- {gw}");
        for line in text.lines().filter(|l| {
            !l.starts_with('#')
                && (l.contains("requests_total") || l.contains("cache") || l.contains("rate_limit"))
        }) {
            println!("  {line}");
        }
    }
    if !client.success() {
        bail!("the demo client failed");
    }
    if keep {
        step("the topology is up: try `nsenter --net=/run/netns/xdemo-client curl -k --resolve demo.local:443:10.77.100.1 https://demo.local/users/1`; Ctrl-C tears it down");
        while !STOP.load(Ordering::SeqCst) {
            procs.check()?;
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    Ok(())
}
