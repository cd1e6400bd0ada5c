//! Test fixtures: upstream servers that say who they are, a proxy started in-process from
//! TOML, plain and TLS clients, certificates from rcgen.

#![allow(dead_code)] // each test module uses a subset of the helpers

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What an upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: http::Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
}

/// An upstream HTTP/1.1 server that answers with its name (body and `x-upstream` header),
/// or with the request body for paths under `/echo`.
/// `x-want-status: 503` makes it answer with that status. Upgrade requests get `101` and an
/// echo of whatever bytes follow.
pub struct TestUpstream {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<AtomicUsize>,
    kill: watch::Sender<bool>,
}

impl TestUpstream {
    pub async fn start(name: &str) -> Self {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on a given address (to bring a killed upstream back on its port).
    pub async fn start_on(name: &str, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (kill, kill_rx) = watch::channel(false);
        let up_name = name.to_string();
        let (seen2, conns2) = (seen.clone(), connections.clone());
        tokio::spawn(async move {
            let mut kill_rx2 = kill_rx.clone();
            loop {
                let accepted = tokio::select! {
                    _ = kill_rx2.changed() => return,
                    a = listener.accept() => a,
                };
                let Ok((stream, _)) = accepted else { continue };
                conns2.fetch_add(1, Ordering::SeqCst);
                let (name, seen) = (up_name.clone(), seen2.clone());
                let mut kill_rx = kill_rx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(name.clone(), seen.clone(), req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        _ = kill_rx.changed() => {}
                    }
                });
            }
        });
        Self {
            name: name.to_string(),
            addr,
            seen,
            connections,
            kill,
        }
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw a request")
    }

    /// Closes the listener and every connection.
    pub fn kill(&self) {
        let _ = self.kill.send(true);
    }
}

async fn handle(
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    seen.lock().unwrap().push(Seen {
        method: req.method().clone(),
        path_and_query: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: req.headers().clone(),
    });
    if let Some(proto) = req.headers().get(http::header::UPGRADE).cloned() {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", proto)
            .header("x-upstream", &name)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    let status = req
        .headers()
        .get("x-want-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .unwrap_or(200);
    if let Some(ms) = req
        .headers()
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let echo = req.uri().path().starts_with("/echo");
    let hop = req.uri().path().starts_with("/hop");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut resp = Response::builder()
        .status(status)
        .header("x-upstream", &name);
    if hop {
        // Connection-scoped headers the proxy must not pass on.
        resp = resp
            .header("connection", "x-private-hop")
            .header("x-private-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic");
    }
    Ok(resp
        .body(Full::new(if echo { body } else { Bytes::from(name) }))
        .unwrap())
}

/// A TOML `members = [...]` list for these upstreams.
pub fn members(ups: &[&TestUpstream]) -> String {
    let list: Vec<String> = ups
        .iter()
        .map(|u| format!("{{ address = \"{}\" }}", u.addr))
        .collect();
    format!("[{}]", list.join(", "))
}

/// A proxy with one plain listener, `web`, that forwards every request to `up`.
pub async fn forward_all(up: &TestUpstream) -> l7_proxy::ProxyHandle {
    forward_with(up, "", "", "").await
}

/// A proxy with one plain listener, `web`, whose one route forwards the requests for `host`
/// to `up` (any other host gets 404).
pub async fn forward_host(up: &TestUpstream, host: &str) -> l7_proxy::ProxyHandle {
    forward_with(up, "", "", &format!("match = {{ host = \"{host}\" }}\n")).await
}

/// A proxy with one plain listener, `web`: the `[server]` settings `server`, the routes
/// `routes` (whole `[[routes]]` tables), then route `all` with the `match` line(s) `matcher`,
/// forwarding to `up` (group `up`).
pub async fn forward_with(
    up: &TestUpstream,
    server: &str,
    routes: &str,
    matcher: &str,
) -> l7_proxy::ProxyHandle {
    start_proxy(&format!(
        r#"
[server]
{server}
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[upstreams]]
name = "up"
members = {}
{routes}
[[routes]]
name = "all"
{matcher}action = {{ forward = {{ group = "up" }} }}
"#,
        members(&[up])
    ))
    .await
}

pub async fn start_proxy(toml: &str) -> l7_proxy::ProxyHandle {
    let config = l7_proxy::Config::from_toml_str(toml).expect("test config is valid");
    l7_proxy::Proxy::start(config).await.expect("proxy starts")
}

/// A config file in a fresh temp directory, for reload tests.
pub struct ConfigFile {
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn new(toml: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "l7-proxy-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("proxy.toml");
        std::fs::write(&path, toml).unwrap();
        Self { path }
    }

    pub fn write(&self, toml: &str) {
        std::fs::write(&self.path, toml).unwrap();
    }

    pub fn dir(&self) -> PathBuf {
        self.path.parent().unwrap().to_path_buf()
    }
}

impl Drop for ConfigFile {
    /// The directory goes with the file, with anything a test put beside it.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.dir());
    }
}

pub type PlainClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> PlainClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response, read fully.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn upstream(&self) -> &str {
        self.headers
            .get("x-upstream")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

pub async fn send(client: &PlainClient, req: Request<Full<Bytes>>) -> Answer {
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("response in time")
        .expect("request succeeds");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// `GET http://{proxy}{path}` with `Host: {host}`.
pub async fn get(client: &PlainClient, proxy: SocketAddr, host: &str, path: &str) -> Answer {
    get_with(client, proxy, host, path, &[]).await
}

pub async fn get_with(
    client: &PlainClient,
    proxy: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = Request::get(format!("http://{proxy}{path}")).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(client, req.body(Full::new(Bytes::new())).unwrap()).await
}

/// An HTTP/2 client connection with prior knowledge (h2c) to `addr`, driven by a task.
pub async fn h2c_sender(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// Writes raw bytes and reads until the server closes or goes quiet for `quiet`.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], quiet: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(quiet, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Counts of answers by upstream name.
pub fn tally(names: impl IntoIterator<Item = String>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for n in names {
        *counts.entry(n).or_insert(0) += 1;
    }
    counts
}

/// The value of a metric line that starts with `prefix` (labels included).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A test CA that issues server and client certificates.
pub struct TestPki {
    pub ca_pem: String,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl TestPki {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = params.self_signed(&ca_key).unwrap();
        Self {
            ca_pem: ca_cert.pem(),
            ca_cert,
            ca_key,
        }
    }

    /// (certificate PEM, key PEM) for these DNS names.
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes an issued pair into `dir` as `{stem}.crt` / `{stem}.key`; returns the paths.
    pub fn write(&self, dir: &std::path::Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key) = self.issue(names);
        let (cp, kp) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&cp, cert).unwrap();
        std::fs::write(&kp, key).unwrap();
        (cp, kp)
    }

    /// A client config trusting this CA.
    pub fn client_config(
        &self,
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
        client_cert: Option<(String, String)>,
    ) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// TLS handshake with the proxy, sending `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// One request over an established TLS stream, HTTP/2 if ALPN chose it, else HTTP/1.1.
pub async fn tls_get(stream: TlsStream, host: &str, path: &str) -> Result<Answer, hyper::Error> {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    let resp = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        let req = Request::get(format!("https://{host}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.send_request(req).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.send_request(req).await?
    };
    let version = resp.version();
    let (mut parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    parts
        .headers
        .insert("x-test-version", format!("{version:?}").parse().unwrap());
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Captures the proxy's JSON logs for this test binary (installed once, shared by tests).
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn capture_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_env_filter("l7_proxy::access=info")
            .with_writer(|| LogWriter)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

/// Access log entries (their `fields`) whose request id is `id`.
pub fn access_log_for(id: &str) -> Vec<serde_json::Value> {
    let logs = LOGS.lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["request_id"] == id)
        .map(|v| v["fields"].clone())
        .collect()
}
