//! Test harness for the policy integration tests: a tiny upstream HTTP server, a gateway that
//! runs a [`PolicyChain`] around a real forwarding HTTP client, and a client helper. Everything
//! listens on 127.0.0.1 with an ephemeral port.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use l7_proxy::policy::{build_chain, BoxError, PolicyChain, PolicyConfig, ProxyBody, RequestCtx};
use tokio::net::TcpListener;

/// What an upstream handler sees: the request head and its whole body.
pub type Handler = Arc<
    dyn Fn(http::request::Parts, Bytes) -> BoxFuture<'static, Response<Full<Bytes>>> + Send + Sync,
>;

pub struct Upstream {
    pub addr: SocketAddr,
    /// Requests served so far.
    pub hits: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Starts an upstream server running `handler` for each request.
pub async fn upstream<F, Fut>(handler: F) -> Upstream
where
    F: Fn(http::request::Parts, Bytes) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let handler: Handler = Arc::new(move |p, b| Box::pin(handler(p, b)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let handler = handler.clone();
                    let counter = counter.clone();
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        Ok::<_, Infallible>(handler(parts, body).await)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream { addr, hits }
}

/// A response with `body` and `headers`.
pub fn reply(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        resp.headers_mut().append(
            http::HeaderName::try_from(*k).unwrap(),
            http::HeaderValue::try_from(*v).unwrap(),
        );
    }
    resp
}

/// A temporary file holding `contents` (a JWKS for a `jwks_file`), removed when the returned
/// path is dropped. Policies read such files while the chain is built.
pub fn temp_file(contents: &[u8]) -> tempfile::TempPath {
    let mut file = tempfile::NamedTempFile::new().expect("temporary file");
    std::io::Write::write_all(&mut file, contents).expect("writing the temporary file");
    file.into_temp_path()
}

/// Parses a policy list written as the TOML a route would hold.
pub fn chain_from_toml(policies_toml: &str) -> PolicyChain {
    #[derive(serde::Deserialize)]
    struct Route {
        policies: Vec<PolicyConfig>,
    }
    let route: Route = toml::from_str(policies_toml).expect("policy TOML");
    build_chain(&route.policies).expect("build_chain")
}

/// Starts a gateway that runs `chain` and forwards to `groups[ctx.upstream_group]`
/// (`default_group` before any policy changes it).
pub async fn gateway(
    chain: PolicyChain,
    groups: HashMap<String, SocketAddr>,
    default_group: &str,
) -> SocketAddr {
    gateway_for_route(chain, groups, default_group, "test-route").await
}

/// [`gateway`] whose requests match the route named `route`.
pub async fn gateway_for_route(
    chain: PolicyChain,
    groups: HashMap<String, SocketAddr>,
    default_group: &str,
    route: &str,
) -> SocketAddr {
    let route = route.to_string();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let groups = Arc::new(groups);
    let default_group = default_group.to_string();
    let client: Client<HttpConnector, ProxyBody> =
        Client::builder(TokioExecutor::new()).build_http();
    let next_id = Arc::new(AtomicUsize::new(1));
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let (chain, groups, client, default_group, next_id, route) = (
                chain.clone(),
                groups.clone(),
                client.clone(),
                default_group.clone(),
                next_id.clone(),
                route.clone(),
            );
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (chain, groups, client) = (chain.clone(), groups.clone(), client.clone());
                    let mut ctx = RequestCtx::new(
                        peer,
                        format!("req-{}", next_id.fetch_add(1, Ordering::SeqCst)),
                        route.clone(),
                        default_group.clone(),
                        false,
                        std::time::Instant::now(),
                    );
                    async move {
                        let req = req.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
                        let resp = chain
                            .handle(req, &mut ctx, |req, group| async move {
                                forward(&client, &groups, req, &group).await
                            })
                            .await;
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn forward(
    client: &Client<HttpConnector, ProxyBody>,
    groups: &HashMap<String, SocketAddr>,
    mut req: Request<ProxyBody>,
    group: &str,
) -> Response<ProxyBody> {
    let Some(addr) = groups.get(group) else {
        return l7_proxy::policy::respond::error_response(StatusCode::BAD_GATEWAY, "no such group");
    };
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *req.uri_mut() = format!("http://{addr}{pq}").parse().unwrap();
    match client.request(req).await {
        Ok(resp) => resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()),
        Err(e) => {
            l7_proxy::policy::respond::error_response(StatusCode::BAD_GATEWAY, &e.to_string())
        }
    }
}

/// A response as the test client saw it.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends `method path` with `headers` and `body` to `addr` on a fresh connection.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Got {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Got {
    send(addr, "GET", path, headers, Bytes::new()).await
}

/// Upstream groups map with one group.
pub fn one_group(name: &str, addr: SocketAddr) -> HashMap<String, SocketAddr> {
    HashMap::from([(name.to_string(), addr)])
}

/// An Argon2id PHC string for `password`, with `m_kib` KiB of memory and `t` passes (cheap
/// settings keep tests fast; the string carries them) and a fixed salt.
pub fn argon2id_phc(password: &str, m_kib: u32, t: u32) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(m_kib, t, 1, None).unwrap(),
    );
    let salt = SaltString::encode_b64(b"fixed test salt!").unwrap();
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}
