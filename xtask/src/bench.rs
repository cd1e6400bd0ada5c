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

/// Ports of one bench run: `base + 80` is the upstream (`+ 81` the JSON one of `bench
/// policies`); ours listens on `base + 1` (plain) and
/// `+ 2` (TLS), nginx on `+ 11`/`+ 12`, HAProxy on `+ 21`/`+ 22`. The base is 18000, or
/// `L7_BENCH_PORT_BASE` when a run needs other ports.
#[derive(Clone, Copy)]
struct Ports {
    base: u16,
}

impl Ports {
    fn from_env() -> Result<Self> {
        let base = match std::env::var("L7_BENCH_PORT_BASE") {
            Ok(v) => v
                .parse()
                .ok()
                .filter(|b: &u16| b.checked_add(100).is_some())
                .with_context(|| format!("L7_BENCH_PORT_BASE={v} is not a port below 65436"))?,
            Err(_) => 18000,
        };
        Ok(Self { base })
    }

    fn upstream(self) -> String {
        format!("127.0.0.1:{}", self.base + 80)
    }

    fn json_upstream(self) -> String {
        format!("127.0.0.1:{}", self.base + 81)
    }

    fn all(self) -> [u16; 8] {
        [1, 2, 11, 12, 21, 22, 80, 81].map(|p| self.base + p)
    }
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

const L7_SECONDS: u32 = 8;

fn write_configs(dir: &Path, ports: Ports) -> Result<()> {
    let d = dir.display();
    let upstream = ports.upstream();
    let [ours, ours_tls, nginx, nginx_tls, haproxy, haproxy_tls, _, _] = ports.all();
    std::fs::write(
        dir.join("ours.toml"),
        format!(
            r#"[[listeners]]
name = "plain"
address = "127.0.0.1:{ours}"
[[listeners]]
name = "tls"
address = "127.0.0.1:{ours_tls}"
[listeners.tls]
certs = [{{ cert = "{d}/server.pem", key = "{d}/server.key" }}]
[[upstreams]]
name = "up"
members = [{{ address = "{upstream}" }}]
[[routes]]
name = "all"
action = {{ forward = {{ group = "up" }} }}
"#
        ),
    )?;
    std::fs::write(
        dir.join("nginx.conf"),
        nginx_conf(
            &d.to_string(),
            &upstream,
            &format!(
                r#"  server {{
    listen 127.0.0.1:{nginx};
    listen 127.0.0.1:{nginx_tls} ssl http2;
    ssl_certificate {d}/server.pem;
    ssl_certificate_key {d}/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ proxy_pass http://up; }}
  }}"#
            ),
        ),
    )?;
    let pem = std::fs::read_to_string(dir.join("server.pem"))?
        + &std::fs::read_to_string(dir.join("server.key"))?;
    std::fs::write(dir.join("haproxy.pem"), pem)?;
    std::fs::write(
        dir.join("haproxy.cfg"),
        haproxy_cfg(&format!(
            r#"frontend fe
  bind 127.0.0.1:{haproxy}
  bind 127.0.0.1:{haproxy_tls} ssl crt {d}/haproxy.pem alpn h2,http/1.1
  default_backend be
backend be
  http-reuse always
  server s1 {upstream}
"#
        )),
    )?;
    Ok(())
}

/// A HAProxy config: one thread, HTTP mode, the usual timeouts, and the `proxies` sections
/// given (frontends and backends).
fn haproxy_cfg(proxies: &str) -> String {
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
{proxies}"#
    )
}

/// An nginx config: one worker in the foreground, logs to stderr, keep-alive connections to
/// the upstream group `up` at `upstream`, and the `server` blocks given.
fn nginx_conf(d: &str, upstream: &str, server: &str) -> String {
    format!(
        r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  # nginx closes a client connection (HTTP/1.1 and, since 1.19.7, HTTP/2) after
  # keepalive_requests requests, 1000 by default; h2load does not reconnect, so the HTTP/2
  # run would stop after 16000 requests. The other proxies have no such limit.
  keepalive_requests 1000000;
  upstream up {{ server {upstream}; keepalive 64; keepalive_requests 1000000; }}
  proxy_http_version 1.1;
  proxy_set_header Connection "";
{server}
}}
"#
    )
}

/// Peak RSS of `pid` and all its descendants: nginx serves from a worker process, a child of
/// the master we started.
fn peak_rss_kib(pid: u32) -> u64 {
    let own: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    own + children(pid).into_iter().map(peak_rss_kib).sum::<u64>()
}

/// Child processes of `pid` (threads of a process share its parent, so the main thread's
/// list is the process's).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Stops a proxy and waits for it. SIGTERM first: nginx's master only stops its workers on a
/// signal it can catch, and a SIGKILLed master leaves a worker that keeps the ports.
fn stop(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The upstream answering 1 KiB of text, on CPU 1 next to the load generator (proxies get
/// CPU 0 alone).
fn start_upstream(bin: &Path, addr: &str) -> Result<std::process::Child> {
    start_upstream_with(bin, addr, &["--fixed-body", "1024"])
}

/// An upstream on CPU 1 answering every request with the body `body_args` ask lbdemo for.
fn start_upstream_with(bin: &Path, addr: &str, body_args: &[&str]) -> Result<std::process::Child> {
    Command::new("taskset")
        .args(["-c", "1"])
        .arg(bin.join("lbdemo"))
        .args(["service", "--name", "up", "--listen", addr])
        .args(body_args)
        .spawn()
        .context("starting the upstream (lbdemo service)")
}

/// Fails when something already listens on a bench port: the run would measure that instead.
fn ensure_ports_free(ports: Ports) -> Result<()> {
    for port in ports.all() {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            anyhow::bail!(
                "127.0.0.1:{port} is already in use (a proxy or upstream left from an earlier \
                 run?); stop it or set L7_BENCH_PORT_BASE to use other ports"
            );
        }
    }
    Ok(())
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

/// Starts proxy `p` on CPU 0, runs the three loads against it and stops it.
fn measure(p: &Proxy, dir: &Path) -> Result<[Sample; 3]> {
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
    stop(&mut child);
    result
}

/// Rounds per proxy: `L7_BENCH_ROUNDS`, 3 by default.
fn bench_rounds() -> Result<u32> {
    match std::env::var("L7_BENCH_ROUNDS") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| format!("L7_BENCH_ROUNDS={v} is not a positive number")),
        Err(_) => Ok(3),
    }
}

/// For each of the three loads, the round with the median req/s (the upper one of an even
/// count); peak RSS is the highest seen in any round.
fn median_per_test(mut rounds: Vec<[Sample; 3]>) -> [Sample; 3] {
    let peak = rounds
        .iter()
        .flatten()
        .map(|s| s.peak_rss_kib)
        .max()
        .unwrap_or(0);
    std::array::from_fn(|test| {
        rounds.sort_by(|a, b| a[test].rps.total_cmp(&b[test].rps));
        let mid = &rounds[rounds.len() / 2][test];
        Sample {
            rps: mid.rps,
            p50_ms: mid.p50_ms,
            p99_ms: mid.p99_ms,
            peak_rss_kib: peak,
        }
    })
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

/// Runs `wrk` on CPU 1 against `url` for `seconds` with extra request `headers`; returns its
/// report.
fn wrk_report(url: &str, conns: u32, seconds: u32, headers: &[&str]) -> Result<String> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1", "wrk", "-t1", "--latency"])
        .arg(format!("-c{conns}"))
        .arg(format!("-d{seconds}s"));
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().context("running wrk")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// req/s, p50 and p99 in ms from a `wrk --latency` report.
fn wrk_figures(report: &str) -> (f64, f64, f64) {
    let mut rps = f64::NAN;
    let (mut p50, mut p99) = (f64::NAN, f64::NAN);
    for line in report.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => rps = v.parse().unwrap_or(f64::NAN),
            ["50%", v] => p50 = wrk_ms(v),
            ["99%", v] => p99 = wrk_ms(v),
            _ => {}
        }
    }
    (rps, p50, p99)
}

fn wrk(url: &str, conns: u32, close: bool) -> Result<(f64, f64, f64)> {
    let headers: &[&str] = if close { &["Connection: close"] } else { &[] };
    Ok(wrk_figures(&wrk_report(url, conns, L7_SECONDS, headers)?))
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
    crate::cargo_release(root, &["l7-proxy", "demo"])?;
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
    let ports = Ports::from_env()?;
    ensure_ports_free(ports)?;
    write_configs(&dir, ports)?;
    let upstream_addr = ports.upstream();
    let [ours, ours_tls, nginx, nginx_tls, haproxy, haproxy_tls, upstream_port, _] = ports.all();
    // The upstream runs on CPU 1 next to the load generator; each proxy gets CPU 0 alone.
    let mut upstream = start_upstream(&bin, &upstream_addr)?;
    wait_port(upstream_port)?;
    let d = dir.display().to_string();
    let proxies = [
        Proxy {
            name: "l7-proxy (ours)",
            plain: ours,
            tls: ours_tls,
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
            plain: nginx,
            tls: nginx_tls,
            cmd: vec!["nginx".into(), "-c".into(), format!("{d}/nginx.conf")],
        },
        Proxy {
            name: "HAProxy",
            plain: haproxy,
            tls: haproxy_tls,
            cmd: vec!["haproxy".into(), "-f".into(), format!("{d}/haproxy.cfg")],
        },
    ];
    // Other work on the machine comes and goes: a proxy measured during a busy minute loses to
    // one measured during a quiet one. Rounds interleave the proxies and each cell reports
    // the round with the median req/s.
    let rounds = bench_rounds()?;
    type Row = (String, [Sample; 3]);
    let mut runs: Vec<Vec<[Sample; 3]>> = proxies.iter().map(|_| Vec::new()).collect();
    let measured = (|| -> Result<()> {
        for round in 1..=rounds {
            for (p, samples) in proxies.iter().zip(&mut runs) {
                eprintln!("bench l7: {} (round {round}/{rounds})", p.name);
                samples.push(measure(p, &dir)?);
            }
        }
        Ok(())
    })();
    stop(&mut upstream);
    measured?;
    let rows: Vec<Row> = proxies
        .iter()
        .zip(runs)
        .map(|(p, samples)| (p.name.to_string(), median_per_test(samples)))
        .collect();

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
        "\nEach proxy alone on CPU 0 (one worker/thread: nginx `worker_processes 1`, HAProxy `nbthread 1`, ours a current-thread tokio runtime, as it picks when pinned to one CPU); wrk/h2load and the 1 KiB upstream share CPU 1. \
Each cell is the median of {rounds} rounds that interleave the proxies. \
HTTP/1.1: `wrk -t1 -c32 -d{L7_SECONDS}s --latency`; HTTPS new connections: the same with `-c16 -H 'Connection: close'` (one TLS handshake per request); HTTP/2: `h2load -c16 -m10 -D{L7_SECONDS}`.\n"
    );
    Ok(md)
}

/// Rounds of `bench policies`: each round runs every route once, plain first.
const POLICY_ROUNDS: usize = 8;
/// Seconds of one `bench policies` run.
const POLICY_SECONDS: u32 = 3;
/// What browsers send (Chrome, Firefox); each route's `algorithms` picks the encoding.
const BROWSER_ACCEPT_ENCODING: &str = "Accept-Encoding: gzip, deflate, br, zstd";

/// The same proxy serves, for two upstream bodies, plain routes (no policy) and routes with
/// policies: the full chain (jwt, rate_limit with a limit far above the load, cache that
/// misses because the upstream does not allow caching, and compression with gzip's fixed
/// codes first, then gzip with fitted codes, zstd or brotli), and, to show where the cost
/// lies, the chain without compression and compression alone. One body is a 925-byte JSON list of user records, which compresses as API
/// responses do; the other is 1 KiB of one repeated letter, which compresses to almost
/// nothing and so shows each codec's fixed cost per response. For reference, nginx (gzip
/// level 1) and HAProxy (its libslz gzip) proxy and compress the JSON body in the same
/// rounds, each against its own plain run. wrk sends the same token and a browser's
/// Accept-Encoding to all. Each of [`POLICY_ROUNDS`] rounds runs every route; a route's cost
/// is the median over rounds of its ratio to that round's plain run of the same body and
/// proxy, in requests per second and in the proxy's CPU time per request (its schedstat).
pub fn policy_cost(root: &Path, out_dir: &Path) -> Result<String> {
    crate::apt_install_missing(&["wrk", "nginx-light", "haproxy"])?;
    crate::cargo_release(root, &["l7-proxy", "demo"])?;
    let ports = Ports::from_env()?;
    ensure_ports_free(ports)?;
    let proxy_port = ports.base + 31;
    let [_, _, nginx_port, _, haproxy_port, _, _, _] = ports.all();
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
    let jwt = format!(
        r#"{{ type = "jwt", jwks_file = "{d}/jwks.json", algorithms = ["HS256"], issuers = ["bench"], audiences = ["bench"] }}"#
    );
    let rate_limit =
        r#"{ type = "rate_limit", requests = 1000000000, period_secs = 1, key = "jwt_sub" }"#;
    let compress =
        |alg: &str| format!(r#"{{ type = "compress", algorithms = ["{alg}"], min_size = 256 }}"#);
    // gzip with fixed Huffman codes (as HAProxy's libslz): the fastest gzip we have.
    let fixed =
        r#"{ type = "compress", algorithms = ["gzip"], min_size = 256, gzip_strategy = "fixed" }"#;
    let cache = r#"{ type = "cache", max_bytes = 16777216 }"#;
    let chain_with = |compress: &str| format!("{jwt}, {rate_limit}, {compress}, {cache}");
    let chain = |alg: &str| chain_with(&compress(alg));
    let ours = |path, group, policies: String, label| PolicyRoute {
        server: Server::Ours,
        path,
        group,
        baseline: policies.is_empty(),
        policies,
        label,
    };
    let reference = |server, path, baseline, label| PolicyRoute {
        server,
        path,
        group: "json",
        policies: String::new(),
        baseline,
        label,
    };
    // Each body's and each proxy's plain route first.
    let routes = vec![
        ours("plain", "json", String::new(), "plain proxying"),
        ours(
            "nogzip",
            "json",
            format!("{jwt}, {rate_limit}, {cache}"),
            "jwt + rate_limit + cache (miss)",
        ),
        ours(
            "gzip",
            "json",
            fixed.to_string(),
            "compress (gzip, fixed codes) alone",
        ),
        ours(
            "chain-fixed",
            "json",
            chain_with(fixed),
            "**full chain: jwt + rate_limit + cache (miss) + compress (gzip with fixed Huffman codes, `gzip_strategy = \"fixed\"`)**",
        ),
        ours(
            "chain",
            "json",
            chain("gzip"),
            "full chain, gzip -1 with codes fitted to each body (zlib, the default strategy)",
        ),
        ours(
            "chain-zstd",
            "json",
            chain("zstd"),
            "full chain, zstd (level 1) instead of gzip",
        ),
        ours(
            "chain-zstd-fast",
            "json",
            chain_with(
                r#"{ type = "compress", algorithms = ["zstd"], min_size = 256, zstd_level = -1 }"#,
            ),
            "full chain, zstd -1 (its fastest usual mode)",
        ),
        ours(
            "chain-br",
            "json",
            chain("br"),
            "full chain, brotli (quality 4) instead of gzip",
        ),
        ours("text-plain", "text", String::new(), "plain proxying"),
        ours(
            "text-chain",
            "text",
            chain_with(fixed),
            "full chain (gzip, fixed codes)",
        ),
        ours(
            "text-chain-zstd",
            "text",
            chain("zstd"),
            "full chain, zstd (level 1)",
        ),
        reference(Server::Nginx, "plain", true, "nginx: plain proxying"),
        reference(
            Server::Nginx,
            "gzip",
            false,
            "nginx: gzip (`gzip_comp_level 1`)",
        ),
        reference(Server::Haproxy, "plain", true, "HAProxy: plain proxying"),
        reference(
            Server::Haproxy,
            "gzip",
            false,
            "HAProxy: gzip (libslz, fixed Huffman codes)",
        ),
    ];
    let mut config = format!(
        "[[listeners]]\nname = \"plain\"\naddress = \"127.0.0.1:{proxy_port}\"\n\
         [[upstreams]]\nname = \"text\"\nmembers = [{{ address = \"{}\" }}]\n\
         [[upstreams]]\nname = \"json\"\nmembers = [{{ address = \"{}\" }}]\n",
        ports.upstream(),
        ports.json_upstream()
    );
    for r in routes.iter().filter(|r| r.server == Server::Ours) {
        config += &format!(
            "[[routes]]\nname = \"{path}\"\nmatch = {{ path = {{ prefix = \"/{path}/\" }} }}\n\
             action = {{ forward = {{ group = \"{group}\" }} }}\npolicies = [{policies}]\n",
            path = r.path,
            group = r.group,
            policies = r.policies,
        );
    }
    std::fs::write(dir.join("chain.toml"), config)?;
    write_reference_configs(&dir, ports)?;
    let mut text_upstream = start_upstream(&bin, &ports.upstream())?;
    let mut json_upstream =
        start_upstream_with(&bin, &ports.json_upstream(), &["--json-body", "1024"])?;
    wait_port(ports.base + 80)?;
    wait_port(ports.base + 81)?;
    let on_cpu0 = |cmd: &[&str], log: &str| -> Result<std::process::Child> {
        Command::new("taskset")
            .args(["-c", "0"])
            .args(cmd)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join(log))?)
            .spawn()
            .with_context(|| format!("starting {}", cmd[0]))
    };
    let chain_toml = dir.join("chain.toml").display().to_string();
    let mut servers = Vec::new();
    let result = (|| -> Result<Vec<Vec<Run>>> {
        let ours_bin = bin.join("l7-proxy").display().to_string();
        let ours_cmd = [ours_bin.as_str(), "--config", &chain_toml, "--log", "warn"];
        servers.push(on_cpu0(&ours_cmd, "l7-proxy.log")?);
        let nginx_conf = format!("{d}/nginx.conf");
        servers.push(on_cpu0(&["nginx", "-c", &nginx_conf], "nginx.log")?);
        let haproxy_cfg = format!("{d}/haproxy.cfg");
        servers.push(on_cpu0(&["haproxy", "-f", &haproxy_cfg], "haproxy.log")?);
        for port in [proxy_port, nginx_port, haproxy_port] {
            wait_port(port)?;
        }
        // The process that serves: nginx's worker, a child of the master we started; ours
        // and HAProxy (`nbthread 1`) serve from the process itself.
        let nginx_worker = children(servers[1].id())
            .first()
            .copied()
            .context("nginx started no worker")?;
        let serving = |s: Server| match s {
            Server::Ours => (proxy_port, servers[0].id()),
            Server::Nginx => (nginx_port, nginx_worker),
            Server::Haproxy => (haproxy_port, servers[2].id()),
        };
        let auth = format!("Authorization: Bearer {token}");
        let run = |r: &PolicyRoute, seconds: u32| -> Result<Run> {
            let (port, pid) = serving(r.server);
            let url = format!("http://127.0.0.1:{port}/{}/x", r.path);
            let headers = [auth.as_str(), BROWSER_ACCEPT_ENCODING];
            let (before, split_before) = (cpu_ns(pid)?, user_system_s(pid)?);
            let report = wrk_report(&url, 32, seconds, &headers)?;
            let cpu = cpu_ns(pid)? - before;
            let split = user_system_s(pid)?;
            if report.contains("Non-2xx") {
                anyhow::bail!("{url} answered errors:\n{report}");
            }
            let (requests, bytes) = wrk_totals(&report);
            Ok(Run {
                rps: wrk_figures(&report).0,
                cpu_us: cpu / 1000.0 / requests,
                user_us: (split.0 - split_before.0) * 1e6 / requests,
                system_us: (split.1 - split_before.1) * 1e6 / requests,
                bytes: bytes / requests,
            })
        };
        for r in routes.iter().filter(|r| r.baseline) {
            run(r, 2)?; // warm-up
        }
        let mut figures = vec![Vec::new(); routes.len()];
        for _ in 0..POLICY_ROUNDS {
            for (r, runs) in routes.iter().zip(&mut figures) {
                runs.push(run(r, POLICY_SECONDS)?);
            }
        }
        Ok(figures)
    })();
    for server in &mut servers {
        stop(server);
    }
    stop(&mut text_upstream);
    stop(&mut json_upstream);
    let figures = result?;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut md = String::from(
        "| body | route | req/s | vs plain | proxy CPU per request | vs plain | of which user / kernel | bytes per response |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (r, runs) in routes.iter().zip(&figures) {
        // The plain run of the same body through the same proxy, in the same rounds.
        let plain = routes
            .iter()
            .position(|p| p.server == r.server && p.group == r.group && p.baseline)
            .map(|i| &figures[i])
            .context("each body and proxy has a plain route")?;
        let body = match r.group {
            "json" => "JSON, 925 B",
            _ => "`x` × 1024",
        };
        let rps = median(runs.iter().map(|r| r.rps).collect());
        let cpu = median(runs.iter().map(|r| r.cpu_us).collect());
        let bytes = median(runs.iter().map(|r| r.bytes).collect());
        let user = median(runs.iter().map(|r| r.user_us).collect());
        let system = median(runs.iter().map(|r| r.system_us).collect());
        let rps_ratio = median(runs.iter().zip(plain).map(|(r, p)| r.rps / p.rps).collect());
        let cpu_ratio = median(
            runs.iter()
                .zip(plain)
                .map(|(r, p)| p.cpu_us / r.cpu_us)
                .collect(),
        );
        md += &format!(
            "| {body} | {} | {rps:.0} | {rps_ratio:.3}x (cost {:.1}%) | {cpu:.1} µs | {cpu_ratio:.3}x (cost {:.1}%) | {user:.1} / {system:.1} µs | {bytes:.0} |\n",
            r.label,
            (1.0 - rps_ratio) * 100.0,
            (1.0 - cpu_ratio) * 100.0
        );
    }
    md += &format!(
        "\nOne l7-proxy on CPU 0; wrk (`-t1 -c32`, the same JWT and `{BROWSER_ACCEPT_ENCODING}` on every route) and the upstreams on CPU 1. {POLICY_ROUNDS} rounds of {POLICY_SECONDS} s runs, every route in each round; req/s and CPU per request are medians, and each ratio is the median over rounds of the ratio to that round's plain run of the same body through the same proxy. \"vs plain\" in CPU is plain's CPU per request divided by the route's (the throughput one core would reach). User and kernel time come from the process's `/proc/PID/stat` (sampled at the scheduler tick, so they add up to the CPU column only roughly): the policies run in user space, and the kernel's share per request (sockets, and waking wrk and the upstream on CPU 1, which idle more often the slower the proxy is) grows with the user time a route adds. Bytes per response are wrk's, headers included. The JSON body (`lbdemo service --json-body 1024`) is a list of user records with random ids, which gzip -1 shrinks to 44%; the `x` body compresses to almost nothing, so its rows show what each codec costs per response before any real work. nginx (`worker_processes 1`) and HAProxy (`nbthread 1`) wait on CPU 0 too, idle except in their own rows; nginx compresses with `gzip_comp_level 1` and `gzip_min_length 256`, HAProxy with `compression algo gzip` (libslz in Debian's build).\n"
    );
    Ok(md)
}

/// Which proxy serves a `bench policies` route.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    Ours,
    Nginx,
    Haproxy,
}

/// One route of `bench policies`: where wrk sends it and how the table names it.
struct PolicyRoute {
    server: Server,
    /// The path prefix, `/path/`.
    path: &'static str,
    /// The upstream: "json" or "text".
    group: &'static str,
    /// Our policies (TOML inline tables); empty for the reference proxies.
    policies: String,
    /// The plain route the others of its body and proxy are compared with.
    baseline: bool,
    label: &'static str,
}

/// What one wrk run of a `bench policies` route measured.
#[derive(Clone, Copy)]
struct Run {
    rps: f64,
    /// The proxy's CPU time per request, µs.
    cpu_us: f64,
    /// Of which in user space and in the kernel, µs (from `/proc/PID/stat`).
    user_us: f64,
    system_us: f64,
    /// Bytes per response, headers included.
    bytes: f64,
}

/// Nanoseconds process `pid`'s main thread has run on a CPU (its schedstat).
fn cpu_ns(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("reading the schedstat of process {pid}"))
}

/// Seconds process `pid` (all its threads) has run in user space and in the kernel: fields 14
/// and 15 of `/proc/PID/stat`, in clock ticks of 1/100 s (Linux's `USER_HZ` on x86).
fn user_system_s(pid: u32) -> Result<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis,
    // where field 3 comes first.
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |field: usize| -> Result<f64> {
        fields
            .get(field - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .map(|t| t / 100.0)
            .with_context(|| format!("reading field {field} of /proc/{pid}/stat"))
    };
    Ok((ticks(14)?, ticks(15)?))
}

/// nginx and HAProxy configs for the reference rows of `bench policies`: `/plain/` proxies the
/// JSON upstream as it is, `/gzip/` compresses it.
fn write_reference_configs(dir: &Path, ports: Ports) -> Result<()> {
    let d = dir.display();
    let upstream = ports.json_upstream();
    let [_, _, nginx, _, haproxy, _, _, _] = ports.all();
    std::fs::write(
        dir.join("nginx.conf"),
        nginx_conf(
            &d.to_string(),
            &upstream,
            &format!(
                r#"  server {{
    listen 127.0.0.1:{nginx};
    location /plain/ {{ proxy_pass http://up; }}
    location /gzip/ {{
      proxy_pass http://up;
      gzip on;
      gzip_comp_level 1;
      gzip_min_length 256;
      gzip_types application/json;
      gzip_proxied any;
      gzip_vary on;
    }}
  }}"#
            ),
        ),
    )?;
    std::fs::write(
        dir.join("haproxy.cfg"),
        haproxy_cfg(&format!(
            r#"frontend fe
  bind 127.0.0.1:{haproxy}
  use_backend gzip if {{ path_beg /gzip/ }}
  default_backend plain
backend plain
  http-reuse always
  server s1 {upstream}
backend gzip
  http-reuse always
  compression algo gzip
  compression type application/json
  server s1 {upstream}
"#
        )),
    )?;
    Ok(())
}

/// The request count and bytes read of a wrk report (`N requests in 3.00s, 2.5MB read`).
fn wrk_totals(report: &str) -> (f64, f64) {
    report
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [n, "requests", "in", _, read, "read"] = f[..] else {
                return None;
            };
            let (value, unit) = read.split_at(read.find(|c: char| c.is_ascii_alphabetic())?);
            let scale = match unit {
                "B" => 1.0,
                "KB" => 1024.0,
                "MB" => 1024.0 * 1024.0,
                "GB" => 1024.0 * 1024.0 * 1024.0,
                _ => return None,
            };
            Some((n.parse().ok()?, value.parse::<f64>().ok()? * scale))
        })
        .unwrap_or((f64::NAN, f64::NAN))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference configs of `bench policies` are valid for the installed nginx and HAProxy
    /// (checked when they are installed, as `bench policies` installs them).
    #[test]
    fn reference_configs_pass_the_proxies_own_checks() {
        let dir = std::env::temp_dir().join(format!("xtask-ref-configs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let result = (|| -> Result<()> {
            write_reference_configs(&dir, Ports { base: 18000 })?;
            let nginx = std::fs::read_to_string(dir.join("nginx.conf"))?;
            assert!(nginx.contains("location /gzip/ {\n      proxy_pass http://up;"));
            assert_eq!(nginx.matches('{').count(), nginx.matches('}').count());
            for (tool, args) in [
                ("nginx", ["-t", "-q", "-c"]),
                ("haproxy", ["-c", "-q", "-f"]),
            ] {
                let conf = dir.join(if tool == "nginx" {
                    "nginx.conf"
                } else {
                    "haproxy.cfg"
                });
                let installed = ["/usr/sbin", "/usr/bin"]
                    .iter()
                    .any(|d| Path::new(d).join(tool).exists());
                if !installed {
                    eprintln!(
                        "{tool} is not installed: its check of {} skipped",
                        conf.display()
                    );
                    continue;
                }
                let out = Command::new(tool).args(args).arg(&conf).output()?;
                assert!(
                    out.status.success(),
                    "{tool} refused {}: {}",
                    conf.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result.unwrap();
    }

    #[test]
    fn wrk_totals_reads_requests_and_binary_units() {
        let report =
            "Running 3s test @ http://127.0.0.1:18031/plain/x\n  1 threads and 32 connections\n  \
                      124370 requests in 3.00s, 127.52MB read\nRequests/sec:  41456.19\n";
        let (n, bytes) = wrk_totals(report);
        assert_eq!(n, 124370.0);
        assert_eq!(bytes, 127.52 * 1024.0 * 1024.0);
        assert_eq!(
            wrk_totals("  10 requests in 1.00s, 512B read\n"),
            (10.0, 512.0)
        );
        assert!(wrk_totals("no summary here").0.is_nan());
    }
}
