//! `lbdemo`: the pieces of `cargo xtask demo` that are not the product itself.
//!
//! - `certs`: a demo CA and a server certificate for the gateways (rcgen).
//! - `service`: a small JSON microservice (users, orders, payments...) that says who it is.
//! - `client`: sends a mix of real HTTPS requests to the VIP with a progress line, then prints
//!   what happened: requests per gateway, per service, per route and status, cache hits and
//!   rate-limit rejections, all read from the responses themselves.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

mod sample;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(about = "Demo microservices and traffic client")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write ca.pem, server.pem and server.key (for NAME) into DIR.
    Certs {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "demo.local")]
        name: String,
    },
    /// Serve JSON as microservice NAME on each --listen address.
    Service {
        #[arg(long)]
        name: String,
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// Answer every request with this many bytes of text instead of JSON (benchmarks).
        #[arg(long, conflicts_with = "json_body")]
        fixed_body: Option<usize>,
        /// Answer every request with a JSON list of user records of at most this many bytes,
        /// as an API would (benchmarks of compression on realistic content).
        #[arg(long)]
        json_body: Option<usize>,
    },
    /// Print an HS256 JWT (iss, aud, sub, one hour) signed with SECRET.
    Token {
        #[arg(long)]
        secret: String,
        #[arg(long)]
        iss: String,
        #[arg(long)]
        aud: String,
        #[arg(long, default_value = "")]
        scope: String,
    },
    /// Attach `xdp_pass` to IFACE and hold it until killed: a veth receives XDP_TX frames only
    /// when its peer runs an XDP program.
    XdpPass {
        #[arg(long)]
        iface: String,
    },
    /// Send the demo's traffic mix to the VIP and print a summary.
    Client {
        /// VIP:port of the HTTPS listener.
        #[arg(long)]
        vip: SocketAddr,
        /// TLS server name (SNI and Host).
        #[arg(long, default_value = "demo.local")]
        host: String,
        #[arg(long)]
        ca: PathBuf,
        /// Total requests.
        #[arg(long, default_value_t = 600)]
        requests: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// HS256 secret the gateways verify JWTs with.
        #[arg(long)]
        jwt_secret: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Certs { dir, name } => certs(&dir, &name),
        Cmd::Service {
            name,
            listen,
            fixed_body,
            json_body,
        } => {
            let fixed = match (fixed_body, json_body) {
                (Some(n), _) => Some(("text/plain", Bytes::from(vec![b'x'; n]))),
                (None, Some(n)) => Some(("application/json", Bytes::from(sample::records(n)))),
                (None, None) => None,
            };
            service(name, listen, fixed).await
        }
        Cmd::XdpPass { iface } => xdp_pass(&iface).await,
        Cmd::Token {
            secret,
            iss,
            aud,
            scope,
        } => {
            println!("{}", token(&secret, &iss, &aud, &scope)?);
            Ok(())
        }
        Cmd::Client {
            vip,
            host,
            ca,
            requests,
            concurrency,
            jwt_secret,
        } => client(vip, host, ca, requests, concurrency, jwt_secret).await,
    }
}

/// An HS256 token for `sub = demo-user`, valid for an hour.
fn token(secret: &str, iss: &str, aud: &str, scope: &str) -> Result<String> {
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({
            "sub": "demo-user",
            "iss": iss,
            "aud": aud,
            "exp": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                + 3600,
            "scope": scope,
        }),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

async fn xdp_pass(iface: &str) -> Result<()> {
    use aya::programs::{Xdp, XdpMode};
    let pin_dir = std::path::Path::new("/sys/fs/bpf").join(format!("xdplb-demo-pass-{iface}"));
    lb_userspace::datapath::ensure_bpffs(std::path::Path::new("/sys/fs/bpf"))?;
    let _ = std::fs::remove_dir_all(&pin_dir);
    let mut ebpf = lb_userspace::datapath::load_helper_programs(&pin_dir)?;
    let prog: &mut Xdp = ebpf
        .program_mut(common::prog_names::PASS)
        .context("xdp_pass missing")?
        .try_into()?;
    let name = std::ffi::CString::new(iface)?;
    prog.attach(name.as_c_str(), XdpMode::Driver)
        .with_context(|| format!("attaching xdp_pass to {iface}"))?;
    // The maps are not needed once loaded; the program stays attached while we live.
    let _ = std::fs::remove_dir_all(&pin_dir);
    eprintln!("xdp_pass attached to {iface}");
    std::future::pending::<()>().await;
    Ok(())
}

fn certs(dir: &std::path::Path, name: &str) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "xdplb demo CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(vec![name.to_string()])?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(dir.join("server.pem"), cert.pem())?;
    std::fs::write(dir.join("server.key"), key.serialize_pem())?;
    Ok(())
}

async fn service(
    name: String,
    listen: Vec<SocketAddr>,
    fixed: Option<(&'static str, Bytes)>,
) -> Result<()> {
    let name: Arc<str> = name.into();
    let mut tasks = Vec::new();
    for addr in listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let name = name.clone();
        let fixed = fixed.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                let fixed = fixed.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (name, fixed) = (name.clone(), fixed.clone());
                        async move {
                            match fixed {
                                Some((content_type, body)) => Ok(Response::builder()
                                    .header("content-type", content_type)
                                    .body(Full::new(body))
                                    .expect("static response")),
                                None => answer(name, addr, req).await,
                            }
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

async fn answer(
    name: Arc<str>,
    addr: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = serde_json::json!({
        "service": &*name,
        "instance": addr.to_string(),
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "items": [format!("{name}-1"), format!("{name}-2")],
    });
    let resp = Response::builder()
        .header("content-type", "application/json")
        .header("cache-control", "public, max-age=30")
        .header("x-service", &*name)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response");
    Ok(resp)
}

/// What one request of the mix is.
#[derive(Clone, Copy)]
struct Step {
    route: &'static str,
    path: &'static str,
    jwt: bool,
}

const MIX: &[Step] = &[
    Step {
        route: "/users",
        path: "/users/42",
        jwt: false,
    },
    Step {
        route: "/orders",
        path: "/orders",
        jwt: false,
    },
    Step {
        route: "/payments (JWT)",
        path: "/payments",
        jwt: true,
    },
    Step {
        route: "/payments (no JWT)",
        path: "/payments",
        jwt: false,
    },
    Step {
        route: "/summary (aggregated)",
        path: "/summary",
        jwt: false,
    },
    Step {
        route: "/v1/orders (deprecated)",
        path: "/v1/orders",
        jwt: false,
    },
    Step {
        route: "/v2/orders",
        path: "/v2/orders",
        jwt: false,
    },
    Step {
        route: "/catalog (cached)",
        path: "/catalog",
        jwt: false,
    },
    Step {
        route: "/limited (rate-limited)",
        path: "/limited",
        jwt: false,
    },
];

#[derive(Default)]
struct Tally {
    by_route: BTreeMap<(String, u16), usize>,
    by_gateway: BTreeMap<String, usize>,
    by_service: BTreeMap<String, usize>,
    cache: BTreeMap<String, usize>,
    deprecated: usize,
    errors: BTreeMap<String, usize>,
    done: usize,
}

async fn client(
    vip: SocketAddr,
    host: String,
    ca: PathBuf,
    requests: usize,
    concurrency: usize,
    jwt_secret: String,
) -> Result<()> {
    let tls = tls_config(&ca)?;
    let token = token(&jwt_secret, "xdplb-demo", "payments", "payments:read")?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (tls, host, token, tally, next) = (
            tls.clone(),
            host.clone(),
            token.clone(),
            tally.clone(),
            next.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let step = MIX[i % MIX.len()];
                // A new connection for every request: a new flow for the XDP tier to place.
                let outcome = tokio::time::timeout(
                    Duration::from_secs(5),
                    one_request(vip, &tls, &host, step, &token),
                )
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
                let mut t = tally.lock().unwrap();
                match outcome {
                    Ok(r) => {
                        *t.by_route
                            .entry((step.route.to_string(), r.status))
                            .or_default() += 1;
                        *t.by_gateway.entry(r.gateway).or_default() += 1;
                        if let Some(s) = r.service {
                            *t.by_service.entry(s).or_default() += 1;
                        }
                        if let Some(c) = r.cache {
                            *t.cache.entry(c).or_default() += 1;
                        }
                        t.deprecated += r.deprecated as usize;
                    }
                    Err(e) => *t.errors.entry(e.to_string()).or_default() += 1,
                }
                t.done += 1;
                if t.done % 20 == 0 || t.done == requests {
                    progress(t.done, requests, started.elapsed());
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    eprintln!();
    let t = tally.lock().unwrap();
    println!("\n== Requests by route and status");
    for ((route, status), n) in &t.by_route {
        println!("  {route:<26} {status}  {n:>5}");
    }
    println!("\n== Requests by L7 gateway (the XDP tier's choice, one new connection each)");
    for (g, n) in &t.by_gateway {
        println!("  {g:<26} {n:>5}");
    }
    println!("\n== Responses by microservice");
    for (s, n) in &t.by_service {
        println!("  {s:<26} {n:>5}");
    }
    println!("\n== Cache (X-Cache on /catalog)");
    for (c, n) in &t.cache {
        println!("  {c:<26} {n:>5}");
    }
    let rejected: usize = t
        .by_route
        .iter()
        .filter(|((_, s), _)| *s == 429)
        .map(|(_, n)| n)
        .sum();
    println!("\n== Rate-limit rejections (429): {rejected}");
    println!("== Responses marked Deprecation (API v1): {}", t.deprecated);
    if !t.errors.is_empty() {
        println!("\n== Client errors");
        for (e, n) in &t.errors {
            println!("  {e:<50} {n:>5}");
        }
    }
    println!(
        "\n{} requests in {:.1}s",
        t.done,
        started.elapsed().as_secs_f64()
    );
    if t.errors.values().sum::<usize>() > t.done / 10 {
        bail!("too many failed requests");
    }
    Ok(())
}

fn progress(done: usize, total: usize, elapsed: Duration) {
    let width = 40;
    let filled = done * width / total.max(1);
    eprint!(
        "\r  [{}{}] {done}/{total} requests, {:.0} req/s ",
        "#".repeat(filled),
        " ".repeat(width - filled),
        done as f64 / elapsed.as_secs_f64().max(0.001)
    );
    let _ = std::io::stderr().flush();
}

fn tls_config(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

struct Outcome {
    status: u16,
    deprecated: bool,
    gateway: String,
    service: Option<String>,
    cache: Option<String>,
}

async fn one_request(
    vip: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    host: &str,
    step: Step,
    token: &str,
) -> Result<Outcome> {
    let tcp = tokio::net::TcpStream::connect(vip).await?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::get(step.path).header("host", host);
    if step.jwt {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new()))?)
        .await?;
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let status = resp.status().as_u16();
    let gateway = header("x-gateway").unwrap_or_else(|| "(no X-Gateway header)".into());
    let mut service = header("x-service");
    let cache = header("x-cache");
    let deprecated = header("deprecation").is_some();
    let body = resp.into_body().collect().await?.to_bytes();
    if service.is_none() && status == 200 {
        // The aggregated route answers with one object keyed by service.
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
            if let Some(o) = v.as_object() {
                service = Some(format!("aggregate of {}", o.len()));
            }
        }
    }
    Ok(Outcome {
        status,
        deprecated,
        gateway,
        service,
        cache,
    })
}
