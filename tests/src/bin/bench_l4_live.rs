//! Live L4 benchmark (`cargo xtask bench l4-live` runs it): real packets through the XDP load
//! balancer in network namespaces, next to HAProxy in TCP mode on the same machine.
//!
//! Two workloads, both from the client namespace of the test topology (client, LB and three
//! backends on one bridge; see `integration_tests::topology`):
//!
//! - **TCP transactions**: client threads each connect, send 64 bytes, read the 64-byte echo
//!   and close, as fast as they can. Once through the VIP (xdp_lb, L2 DSR: the LB handles only
//!   the client-to-server half), once through HAProxy (`mode tcp`, one thread) listening in the
//!   LB namespace. Report: transactions/s and failures.
//! - **UDP packets**: sender threads blast 64-byte datagrams at the VIP from many source ports;
//!   report datagrams sent, forwarded by XDP (its VIP counter) and not forwarded. HAProxy does
//!   not forward UDP, so this row has no peer.
//!
//! Every process shares the same cores, so the figures compare the two LB paths under one
//! load, not absolute capacity.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use integration_tests::{
    agent::AgentHandle,
    netns::{skip_reason, unique_name, Netns},
    topology::{backend_ip, BackendMode, Topology, LB_IP, VIP},
};
use lb_userspace::config::Config;

const PORT: u16 = 7000;
const HAPROXY_PORT: u16 = 7100;
const UDP_PORT: u16 = 7200;
const SECONDS: u64 = 5;
const CLIENT_THREADS: usize = 8;

/// An echo server on [::]:PORT (the VIP on lo and the backend's own address) in `ns`.
fn echo_server(ns: &Netns, stop: Arc<AtomicBool>) {
    let listener = ns
        .run(|| TcpListener::bind(("::", PORT)))
        .expect("binding the echo server");
    listener.set_nonblocking(true).unwrap();
    let listener = Arc::new(listener);
    for _ in 0..2 {
        let (l, stop) = (listener.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        if let Ok(n) = s.read(&mut buf) {
                            let _ = s.write_all(&buf[..n]);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
    }
}

/// Runs TCP transactions against `target` from the client namespace for SECONDS.
fn transactions(client: &Netns, target: SocketAddr) -> (f64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|_| {
            let (ok, failed) = (ok.clone(), failed.clone());
            client.spawn(move || {
                let msg = [7u8; 64];
                let mut buf = [0u8; 64];
                while Instant::now() < deadline {
                    let r = (|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
                        s.set_read_timeout(Some(Duration::from_secs(1)))?;
                        s.write_all(&msg)?;
                        s.read_exact(&mut buf)?;
                        Ok(())
                    })();
                    match r {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    (
        ok.load(Ordering::Relaxed) as f64 / SECONDS as f64,
        failed.load(Ordering::Relaxed),
    )
}

/// Blasts UDP at the VIP; returns datagrams sent.
fn udp_flood(client: &Netns) -> u64 {
    let sent = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let sent = sent.clone();
            client.spawn(move || {
                // 64 sockets per thread: 128 flows spread by Maglev.
                let socks: Vec<UdpSocket> = (0..64)
                    .map(|_| UdpSocket::bind("0.0.0.0:0").unwrap())
                    .collect();
                let target = SocketAddr::from((VIP, UDP_PORT));
                let msg = [t as u8; 64];
                let mut n = 0u64;
                while Instant::now() < deadline {
                    for s in &socks {
                        if s.send_to(&msg, target).is_ok() {
                            n += 1;
                        }
                    }
                }
                sent.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    sent.load(Ordering::Relaxed)
}

fn main() {
    if let Some(why) = skip_reason() {
        eprintln!("bench_l4_live: cannot run here: {why}");
        std::process::exit(1);
    }
    let topo = Topology::new(3, BackendMode::Dsr);
    let stop = Arc::new(AtomicBool::new(false));
    for b in &topo.backends {
        echo_server(&b.ns, stop.clone());
    }
    let pin = unique_name("benchpin");
    let mut text = format!(
        "[agent]\ninterfaces = [\"eth0\"]\npin_name = \"{pin}\"\nadmin_socket = \"/tmp/{pin}.sock\"\n\n\
         [[vip]]\naddress = \"{VIP}\"\nport = {PORT}\nprotocol = \"tcp\"\nmode = \"dsr\"\n"
    );
    for i in 0..3 {
        text += &format!("[[vip.backend]]\naddress = \"{}\"\n", backend_ip(i));
    }
    text += &format!(
        "\n[[vip]]\naddress = \"{VIP}\"\nport = {UDP_PORT}\nprotocol = \"udp\"\nmode = \"dsr\"\n"
    );
    for i in 0..3 {
        text += &format!("[[vip.backend]]\naddress = \"{}\"\n", backend_ip(i));
    }
    let config = Config::parse(&text, "bench.toml".as_ref()).expect("bench config");
    let agent = AgentHandle::start(&topo.lb.ns, config, false);

    // HAProxy in TCP mode in the LB namespace, to the same echo servers.
    let dir = std::env::temp_dir().join(unique_name("haproxy"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = format!(
        "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n\
         frontend fe\n  bind {LB_IP}:{HAPROXY_PORT}\n  default_backend be\nbackend be\n  balance roundrobin\n"
    );
    for i in 0..3 {
        cfg += &format!("  server b{i} {}:{PORT}\n", backend_ip(i));
    }
    std::fs::write(dir.join("haproxy.cfg"), cfg).unwrap();
    let mut haproxy = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", topo.lb.ns.name()))
        .args(["haproxy", "-f"])
        .arg(dir.join("haproxy.cfg"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting haproxy (apt-get install haproxy)");
    std::thread::sleep(Duration::from_millis(500));

    let vip_packets = |agent: &AgentHandle| -> (u64, u64) {
        let s = serde_json::to_value(agent.stats()).unwrap();
        let mut tcp = 0;
        let mut udp = 0;
        for v in s["vips"].as_array().into_iter().flatten() {
            let p = v["counters"]["packets"].as_u64().unwrap_or(0);
            if v["vip"].as_str().unwrap_or("").ends_with("/udp") {
                udp += p;
            } else {
                tcp += p;
            }
        }
        (tcp, udp)
    };

    let (xdp_tps, xdp_fail) = transactions(&topo.client.ns, SocketAddr::from((VIP, PORT)));
    let (tcp_pkts, _) = vip_packets(&agent);
    let (ha_tps, ha_fail) = transactions(&topo.client.ns, SocketAddr::from((LB_IP, HAPROXY_PORT)));
    let (_, udp_before) = vip_packets(&agent);
    let sent = udp_flood(&topo.client.ns);
    std::thread::sleep(Duration::from_millis(200));
    let (_, udp_after) = vip_packets(&agent);
    let forwarded = udp_after - udp_before;

    let _ = haproxy.kill();
    let _ = haproxy.wait();
    stop.store(true, Ordering::Relaxed);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = agent.stop();
    let _ = std::fs::remove_dir_all(std::path::Path::new("/sys/fs/bpf").join(&pin));

    println!("| path | TCP transactions/s (connect, 64 B echo, close) | failed | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| xdp_lb, L2 DSR ({tcp_pkts} packets forwarded) | {xdp_tps:.0} | {xdp_fail} | {:.2}x |",
        xdp_tps / ha_tps
    );
    println!("| HAProxy 2.6, mode tcp, 1 thread | {ha_tps:.0} | {ha_fail} | 1.00x |");
    println!();
    println!("| UDP flood at the VIP ({SECONDS} s, 128 flows) | datagrams |");
    println!("|---|---:|");
    println!("| sent by the client | {sent} |");
    println!(
        "| forwarded by xdp_lb (XDP_TX) | {forwarded} ({:.0}/s) |",
        forwarded as f64 / SECONDS as f64
    );
    println!("| not forwarded | {} |", sent.saturating_sub(forwarded));
    println!();
    println!(
        "{CLIENT_THREADS} client threads, {SECONDS} s per run; client, LB, HAProxy and the three echo backends share the machine's {} CPUs.",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
}
