//! `cargo xtask bench`: runs the benchmarks and writes their Markdown tables to
//! bench-results/<what>.md, each preceded by the command that produced it.

use std::{path::Path, process::Command};

use anyhow::{Context, Result};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Which {
    /// XDP program cost against a trivial XDP_TX program (BPF_PROG_TEST_RUN).
    L4,
    /// Real packets through xdp_lb in network namespaces, next to HAProxy in TCP mode.
    L4Live,
    /// Our L7 proxy against nginx and HAProxy on the same cores.
    L7,
    /// What the gateway policy chain (JWT + rate limit + cache miss + compression) costs.
    Policies,
    All,
}

pub fn run(root: &Path, which: Which, repeat: u32) -> Result<()> {
    let out_dir = root.join("bench-results");
    std::fs::create_dir_all(&out_dir)?;
    if matches!(which, Which::L4 | Which::All) {
        let table = bench_bin(root, "bench_l4", &[&repeat.to_string()])?;
        report(
            &out_dir,
            "l4",
            "L4 program cost",
            "cargo xtask bench l4",
            &table,
        )?;
    }
    if matches!(which, Which::L4Live | Which::All) {
        crate::apt_install_missing(&["haproxy"])?;
        let table = bench_bin(root, "bench_l4_live", &[])?;
        report(
            &out_dir,
            "l4-live",
            "L4 live",
            "cargo xtask bench l4-live",
            &table,
        )?;
    }
    if matches!(which, Which::L7 | Which::All) {
        let table = l7(root, &out_dir)?;
        report(&out_dir, "l7", "L7 proxies", "cargo xtask bench l7", &table)?;
    }
    if matches!(which, Which::Policies | Which::All) {
        let table = policy_cost(root, &out_dir)?;
        report(
            &out_dir,
            "policies",
            "Gateway policy chain cost",
            "cargo xtask bench policies",
            &table,
        )?;
    }
    Ok(())
}

/// Runs a benchmark binary of the `integration-tests` crate (release) and returns its stdout:
/// a Markdown table that names the command behind it.
fn bench_bin(root: &Path, bin: &str, args: &[&str]) -> Result<String> {
    let cmd = format!(
        "cargo run --release -p integration-tests --bin {bin} -- {}",
        args.join(" ")
    );
    eprintln!("bench: {cmd}");
    let out = Command::new("cargo")
        .current_dir(root)
        .args([
            "run",
            "--release",
            "-q",
            "-p",
            "integration-tests",
            "--bin",
            bin,
            "--",
        ])
        .args(args)
        // The table goes to stdout; keep the agent's info logs out of it.
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("running {bin}"))?;
    if !out.status.success() {
        anyhow::bail!("{bin} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(format!(
        "Command: `{cmd}`.\n\n{}",
        String::from_utf8_lossy(&out.stdout)
    ))
}

/// Writes bench-results/<name>.md and prints it.
fn report(out_dir: &Path, name: &str, title: &str, how: &str, table: &str) -> Result<()> {
    let md = format!(
        "# {title}\n\nRun with `{how}` on {} CPUs.\n\n{table}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let path = out_dir.join(format!("{name}.md"));
    std::fs::write(&path, &md)?;
    println!("{md}");
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// One proxy under test: how to start it and where it listens.
struct Proxy {
    name: &'static str,
    plain: u16,
    tls: u16,
    cmd: Vec<String>,
}

/// What one load run measured.
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    peak_rss_kib: u64,
}

const UPSTREAM: &str = "127.0.0.1:18080";
const L7_SECONDS: u32 = 8;

fn write_configs(dir: &Path) -> Result<()> {
    let d = dir.display();
    std::fs::write(
        dir.join("ours.toml"),
        format!(
            r#"[[listeners]]
name = "plain"
address = "127.0.0.1:18001"
[[listeners]]
name = "tls"
address = "127.0.0.1:18002"
[listeners.tls]
certs = [{{ cert = "{d}/server.pem", key = "{d}/server.key" }}]
[[upstreams]]
name = "up"
members = [{{ address = "{UPSTREAM}" }}]
[[routes]]
name = "all"
action = {{ forward = {{ group = "up" }} }}
"#
        ),
    )?;
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  upstream up {{ server {UPSTREAM}; keepalive 64; }}
  server {{
    listen 127.0.0.1:18011;
    listen 127.0.0.1:18012 ssl http2;
    ssl_certificate {d}/server.pem;
    ssl_certificate_key {d}/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"#
        ),
    )?;
    let pem = std::fs::read_to_string(dir.join("server.pem"))?
        + &std::fs::read_to_string(dir.join("server.key"))?;
    std::fs::write(dir.join("haproxy.pem"), pem)?;
    std::fs::write(
        dir.join("haproxy.cfg"),
        format!(
            r#"global
  nbthread 1
  maxconn 4000
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:18021
  bind 127.0.0.1:18022 ssl crt {d}/haproxy.pem alpn h2,http/1.1
  default_backend be
backend be
  http-reuse always
  server s1 {UPSTREAM}
"#
        ),
    )?;
    Ok(())
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("nothing listens on 127.0.0.1:{port}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// `wrk` latency values such as `1.23ms`, `850.00us` or `1.02s`, in ms.
fn wrk_ms(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "s" => n * 1000.0,
        _ => n,
    }
}

fn wrk(url: &str, conns: u32, close: bool) -> Result<(f64, f64, f64)> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1", "wrk", "-t1", "--latency"])
        .arg(format!("-c{conns}"))
        .arg(format!("-d{L7_SECONDS}s"));
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(url).output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rps = f64::NAN;
    let (mut p50, mut p99) = (f64::NAN, f64::NAN);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => rps = v.parse().unwrap_or(f64::NAN),
            ["50%", v] => p50 = wrk_ms(v),
            ["99%", v] => p99 = wrk_ms(v),
            _ => {}
        }
    }
    Ok((rps, p50, p99))
}

/// h2load over HTTP/2 (TLS, ALPN h2): req/s, mean and max request time in ms.
fn h2load(url: &str) -> Result<(f64, f64, f64)> {
    let out = Command::new("taskset")
        .args(["-c", "1", "h2load", "-c16", "-m10", "-t1"])
        .arg(format!("-D{L7_SECONDS}"))
        .arg(url)
        .output()
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rps = f64::NAN;
    let (mut mean, mut max) = (f64::NAN, f64::NAN);
    for line in text.lines() {
        if line.starts_with("finished in") {
            // finished in 8.00s, 12345.67 req/s, 1.2MB/s
            rps = line
                .split(',')
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
        }
        if line.starts_with("time for request:") {
            let f: Vec<&str> = line.split_whitespace().collect();
            // time for request: min max mean sd +/- sd
            if f.len() >= 6 {
                max = wrk_ms(f[4]);
                mean = wrk_ms(f[5]);
            }
        }
    }
    Ok((rps, mean, max))
}

pub fn l7(root: &Path, out_dir: &Path) -> Result<String> {
    crate::apt_install_missing(&["nginx-light", "haproxy", "wrk", "nghttp2-client"])?;
    crate::run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "-q",
        "-p",
        "l7-proxy",
        "-p",
        "demo",
    ]))?;
    let bin = root.join("target/release");
    let dir = out_dir.join("l7-work");
    std::fs::create_dir_all(&dir)?;
    crate::run(
        Command::new(bin.join("lbdemo"))
            .arg("certs")
            .arg("--dir")
            .arg(&dir)
            .args(["--name", "localhost"]),
    )?;
    write_configs(&dir)?;
    // The upstream runs on CPU 1 next to the load generator; each proxy gets CPU 0 alone.
    let mut upstream = Command::new("taskset")
        .args(["-c", "1"])
        .arg(bin.join("lbdemo"))
        .args([
            "service",
            "--name",
            "up",
            "--listen",
            UPSTREAM,
            "--fixed-body",
            "1024",
        ])
        .spawn()?;
    wait_port(18080)?;
    let d = dir.display().to_string();
    let proxies = [
        Proxy {
            name: "l7-proxy (ours)",
            plain: 18001,
            tls: 18002,
            cmd: vec![
                bin.join("l7-proxy").display().to_string(),
                "--config".into(),
                format!("{d}/ours.toml"),
                "--log".into(),
                "warn".into(),
            ],
        },
        Proxy {
            name: "nginx",
            plain: 18011,
            tls: 18012,
            cmd: vec!["nginx".into(), "-c".into(), format!("{d}/nginx.conf")],
        },
        Proxy {
            name: "HAProxy",
            plain: 18021,
            tls: 18022,
            cmd: vec!["haproxy".into(), "-f".into(), format!("{d}/haproxy.cfg")],
        },
    ];
    type Row = (String, [Sample; 3]);
    let mut rows: Vec<Row> = Vec::new();
    for p in &proxies {
        eprintln!("bench l7: {}", p.name);
        let mut child = Command::new("taskset")
            .args(["-c", "0"])
            .args(&p.cmd)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{}.log", p.plain)))?)
            .spawn()
            .with_context(|| format!("starting {}", p.name))?;
        let result = (|| -> Result<[Sample; 3]> {
            wait_port(p.plain)?;
            wait_port(p.tls)?;
            // Warm up pools and caches.
            let _ = Command::new("wrk")
                .args(["-t1", "-c8", "-d1s"])
                .arg(format!("http://127.0.0.1:{}/", p.plain))
                .output();
            let (rps, p50, p99) = wrk(&format!("http://127.0.0.1:{}/", p.plain), 32, false)?;
            let keepalive = Sample {
                rps,
                p50_ms: p50,
                p99_ms: p99,
                peak_rss_kib: peak_rss_kib(child.id()),
            };
            let (rps, p50, p99) = wrk(&format!("https://127.0.0.1:{}/", p.tls), 16, true)?;
            let handshakes = Sample {
                rps,
                p50_ms: p50,
                p99_ms: p99,
                peak_rss_kib: peak_rss_kib(child.id()),
            };
            let (rps, mean, max) = h2load(&format!("https://127.0.0.1:{}/", p.tls))?;
            let h2 = Sample {
                rps,
                p50_ms: mean,
                p99_ms: max,
                peak_rss_kib: peak_rss_kib(child.id()),
            };
            Ok([keepalive, handshakes, h2])
        })();
        let _ = child.kill();
        let _ = child.wait();
        rows.push((p.name.to_string(), result?));
    }
    let _ = upstream.kill();
    let _ = upstream.wait();

    let mut md = String::from(
        "| proxy | HTTP/1.1 keep-alive 1 KiB req/s | p50 / p99 ms | vs nginx | HTTPS new connection (handshakes/s) | p50 / p99 ms | vs nginx | HTTP/2 (TLS) req/s | mean / max ms | vs nginx | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let nginx = rows
        .iter()
        .find(|r| r.0 == "nginx")
        .map(|r| [r.1[0].rps, r.1[1].rps, r.1[2].rps]);
    for (name, s) in &rows {
        let ratio = |i: usize| nginx.map(|n| s[i].rps / n[i]).unwrap_or(f64::NAN);
        md += &format!(
            "| {name} | {:.0} | {:.2} / {:.2} | {:.2}x | {:.0} | {:.2} / {:.2} | {:.2}x | {:.0} | {:.2} / {:.2} | {:.2}x | {:.1} |\n",
            s[0].rps, s[0].p50_ms, s[0].p99_ms, ratio(0),
            s[1].rps, s[1].p50_ms, s[1].p99_ms, ratio(1),
            s[2].rps, s[2].p50_ms, s[2].p99_ms, ratio(2),
            s.iter().map(|x| x.peak_rss_kib).max().unwrap_or(0) as f64 / 1024.0,
        );
    }
    md += &format!(
        "\nEach proxy alone on CPU 0 (one worker/thread: nginx `worker_processes 1`, HAProxy `nbthread 1`, ours a tokio runtime pinned by taskset); wrk/h2load and the 1 KiB upstream share CPU 1. \
HTTP/1.1: `wrk -t1 -c32 -d{L7_SECONDS}s --latency`; HTTPS new connections: the same with `-c16 -H 'Connection: close'` (one TLS handshake per request); HTTP/2: `h2load -c16 -m10 -D{L7_SECONDS}`.\n"
    );
    Ok(md)
}

/// The same proxy serves `/plain/` (no policy) and `/chain/` (jwt, rate_limit with a limit
/// far above the load, cache that misses because the upstream does not allow caching, and
/// gzip compression of the 1 KiB text body); wrk sends the same token and Accept-Encoding to
/// both. Runs alternate, three each, and the table reports the medians.
pub fn policy_cost(root: &Path, out_dir: &Path) -> Result<String> {
    crate::apt_install_missing(&["wrk"])?;
    crate::run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "-q",
        "-p",
        "l7-proxy",
        "-p",
        "demo",
    ]))?;
    let bin = root.join("target/release");
    let dir = out_dir.join("policies-work");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let secret = "bench-secret";
    std::fs::write(
        dir.join("jwks.json"),
        r#"{"keys":[{"kty":"oct","alg":"HS256","k":"YmVuY2gtc2VjcmV0"}]}"#,
    )?;
    let out = Command::new(bin.join("lbdemo"))
        .args([
            "token", "--secret", secret, "--iss", "bench", "--aud", "bench",
        ])
        .output()?;
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    std::fs::write(
        dir.join("chain.toml"),
        format!(
            r#"[[listeners]]
name = "plain"
address = "127.0.0.1:18031"
[[upstreams]]
name = "up"
members = [{{ address = "{UPSTREAM}" }}]
[[routes]]
name = "plain"
match = {{ path = {{ prefix = "/plain/" }} }}
action = {{ forward = {{ group = "up" }} }}
[[routes]]
name = "chain"
match = {{ path = {{ prefix = "/chain/" }} }}
action = {{ forward = {{ group = "up" }} }}
policies = [
  {{ type = "jwt", jwks_file = "{d}/jwks.json", algorithms = ["HS256"], issuers = ["bench"], audiences = ["bench"] }},
  {{ type = "rate_limit", requests = 1000000000, period_secs = 1, key = "jwt_sub" }},
  {{ type = "compress", algorithms = ["gzip"], min_size = 256 }},
  {{ type = "cache", max_bytes = 16777216 }},
]
"#
        ),
    )?;
    let mut upstream = Command::new("taskset")
        .args(["-c", "1"])
        .arg(bin.join("lbdemo"))
        .args([
            "service",
            "--name",
            "up",
            "--listen",
            UPSTREAM,
            "--fixed-body",
            "1024",
        ])
        .spawn()?;
    wait_port(18080)?;
    let mut proxy = Command::new("taskset")
        .args(["-c", "0"])
        .arg(bin.join("l7-proxy"))
        .arg("--config")
        .arg(dir.join("chain.toml"))
        .args(["--log", "warn"])
        .spawn()?;
    let result = (|| -> Result<(Vec<f64>, Vec<f64>)> {
        wait_port(18031)?;
        let auth = format!("Authorization: Bearer {token}");
        let run = |path: &str| -> Result<f64> {
            let out = Command::new("taskset")
                .args(["-c", "1", "wrk", "-t1", "-c32"])
                .arg(format!("-d{}s", L7_SECONDS / 2))
                .args(["-H", &auth, "-H", "Accept-Encoding: gzip"])
                .arg(format!("http://127.0.0.1:18031{path}"))
                .output()
                .context("running wrk")?;
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("Non-2xx") {
                anyhow::bail!("{path} answered errors:\n{text}");
            }
            Ok(text
                .lines()
                .find_map(|l| l.strip_prefix("Requests/sec:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(f64::NAN))
        };
        let (mut plain, mut chain) = (Vec::new(), Vec::new());
        run("/plain/x")?;
        for _ in 0..3 {
            plain.push(run("/plain/x")?);
            chain.push(run("/chain/x")?);
        }
        Ok((plain, chain))
    })();
    let _ = proxy.kill();
    let _ = proxy.wait();
    let _ = upstream.kill();
    let _ = upstream.wait();
    let (mut plain, mut chain) = result?;
    plain.sort_by(f64::total_cmp);
    chain.sort_by(f64::total_cmp);
    let (p, c) = (plain[1], chain[1]);
    Ok(format!(
        "| route | req/s (median of 3) | vs plain |\n|---|---:|---:|\n\
         | plain proxying | {p:.0} | 1.00x |\n\
         | jwt + rate_limit + cache (miss) + compress (gzip) | {c:.0} | {:.2}x (cost {:.0}%) |\n\n\
         One l7-proxy on CPU 0; wrk (`-t1 -c32`, same JWT and `Accept-Encoding: gzip` on both routes) and the 1 KiB text upstream on CPU 1. Runs alternate between the routes.\n",
        c / p,
        (1.0 - c / p) * 100.0
    ))
}
