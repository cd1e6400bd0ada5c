//! The clients that talk to upstream members ([`GroupClient`]): plain HTTP/1.1 groups use
//! our own pool over hyper's connection API ([`super::h1`]); TLS and HTTP/2 groups use
//! hyper-util's pooling client over a connector that counts new connections and tags each
//! one, so that a response over a reused connection is counted.
//!
//! Clients are cached by their settings ([`ClientCache`]) for the life of the process, so a
//! config reload keeps the warm connection pool.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http_body_util::BodyExt;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use hyper_rustls::{FixedServerNameResolver, HttpsConnector};

use crate::config::UpstreamProtocol;
use crate::metrics::Metrics;
use crate::policy::{BoxError, ProxyBody};
use crate::tls::UpstreamTls;

use super::h1::H1Client;

/// The pooled upstream client: TLS (when the group has it) around the counting connector.
pub type UpstreamClient = Client<HttpsConnector<CountingConnector>, ProxyBody>;

/// Put in each response's extensions by the client: shared by all responses of one
/// connection.
#[derive(Clone, Debug)]
pub struct ConnReuse(Arc<AtomicBool>);

impl ConnReuse {
    /// True when an earlier response already came over this connection.
    pub fn mark_used(&self) -> bool {
        self.0.swap(true, Ordering::Relaxed)
    }
}

/// `HttpConnector` plus a connection counter. A pinned connector dials its one member
/// whatever the URI names (HTTP/2 requests carry the client's host in their URI, as
/// `:authority`).
#[derive(Clone)]
pub struct CountingConnector {
    http: HttpConnector,
    metrics: Arc<Metrics>,
    pin: Option<Uri>,
}

impl tower_service::Service<Uri> for CountingConnector {
    type Response = TrackedConn;
    type Error = crate::policy::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TrackedConn, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(self.pin.clone().unwrap_or(uri));
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let io = connecting.await.map_err(crate::policy::BoxError::from)?;
            metrics.connections_opened.inc();
            Ok(TrackedConn {
                inner: io,
                used: Arc::new(AtomicBool::new(false)),
            })
        })
    }
}

/// A TCP connection to a member, tagged with its [`ConnReuse`].
pub struct TrackedConn {
    inner: TokioIo<TcpStream>,
    used: Arc<AtomicBool>,
}

impl Connection for TrackedConn {
    fn connected(&self) -> Connected {
        self.inner.connected().extra(ConnReuse(self.used.clone()))
    }
}

impl Read for TrackedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl Write for TrackedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

/// The client of a group (or, for HTTP/2, of one member).
#[derive(Clone)]
pub enum GroupClient {
    /// Plain HTTP/1.1: our pool ([`H1Client`]).
    H1(H1Client),
    /// TLS or HTTP/2: hyper-util's pooling client.
    Pooled {
        client: Box<UpstreamClient>,
        metrics: Arc<Metrics>,
    },
}

impl GroupClient {
    /// True when requests go out in origin form (path and query only): [`GroupClient::H1`].
    /// hyper-util's client takes absolute URIs and dials the authority they name.
    pub fn origin_form(&self) -> bool {
        matches!(self, Self::H1(_))
    }

    /// Sends `req` to `member` (whose address as a URI authority is `authority`).
    pub async fn request(
        &self,
        member: SocketAddr,
        authority: &http::uri::Authority,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<ProxyBody>, BoxError> {
        match self {
            Self::H1(client) => client.request(member, authority, req).await,
            Self::Pooled { client, metrics } => {
                let resp = client.request(req).await?;
                if let Some(reuse) = resp.extensions().get::<ConnReuse>() {
                    if reuse.mark_used() {
                        metrics.pool_reused.inc();
                    }
                }
                Ok(resp.map(|b| b.map_err(BoxError::from).boxed()))
            }
        }
    }
}

/// What a client is built from: groups with equal settings share a client (and its pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientSettings {
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed within this.
    pub idle_timeout: Duration,
    /// Idle pooled connections kept per member; 0: none.
    pub max_idle_per_member: usize,
    pub protocol: UpstreamProtocol,
    /// The member every connection goes to (HTTP/2 groups have a client per member); `None`:
    /// the member the request names.
    pub pin: Option<SocketAddr>,
}

/// Clients of plain groups by their [`ClientSettings`], shared across config generations. A
/// group with TLS gets clients of its own each generation, so that a reload picks up renewed
/// certificates.
#[derive(Default)]
pub struct ClientCache {
    clients: Mutex<HashMap<ClientSettings, GroupClient>>,
}

impl ClientCache {
    pub fn get(
        &self,
        settings: ClientSettings,
        tls: Option<UpstreamTls>,
        metrics: &Arc<Metrics>,
    ) -> GroupClient {
        let pooled = |tls| GroupClient::Pooled {
            client: Box::new(build(settings, tls, metrics)),
            metrics: metrics.clone(),
        };
        if let Some(tls) = tls {
            return pooled(Some(tls));
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(settings)
            .or_insert_with(|| match settings.protocol {
                UpstreamProtocol::Http1 => {
                    GroupClient::H1(H1Client::new(settings, metrics.clone()))
                }
                _ => pooled(None),
            })
            .clone()
    }
}

fn build(
    settings: ClientSettings,
    tls: Option<UpstreamTls>,
    metrics: &Arc<Metrics>,
) -> UpstreamClient {
    let ClientSettings {
        connect_timeout,
        idle_timeout,
        max_idle_per_member,
        protocol,
        pin,
    } = settings;
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    // The TLS connector around it decides by scheme (`https` only for groups with TLS).
    http.enforce_http(false);
    let counting = CountingConnector {
        http,
        metrics: metrics.clone(),
        pin: pin.and_then(|a| format!("http://{a}/").parse().ok()),
    };
    let connector = match tls {
        // Plain groups send `http://` URIs, which pass through without TLS; the config
        // (no roots) is never used.
        None => HttpsConnector::<CountingConnector>::builder()
            .with_tls_config(crate::tls::unused_client_config())
            .https_or_http()
            .enable_http1()
            .wrap_connector(counting),
        Some(tls) => {
            let builder = HttpsConnector::<CountingConnector>::builder()
                .with_tls_config(tls.config)
                .https_only();
            // Without a configured name, the member's address (a pinned client's URIs name
            // the client's host instead).
            let name = tls
                .server_name
                .or_else(|| pin.map(|a| rustls::pki_types::ServerName::IpAddress(a.ip().into())));
            let builder = match name {
                Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(name)),
                None => builder,
            };
            match protocol {
                UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(counting),
                _ => builder.enable_http2().wrap_connector(counting),
            }
        }
    };
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle_timeout)
        // 0 turns hyper-util's pool off: every request opens a connection, as documented.
        .pool_max_idle_per_host(max_idle_per_member)
        .pool_timer(TokioTimer::new())
        .http2_only(protocol != UpstreamProtocol::Http1)
        .build(connector)
}
