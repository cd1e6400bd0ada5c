//! The client that talks to upstream members, HTTP/1.1 or (for `protocol = "h2c"` groups)
//! HTTP/2: hyper-util's pooling client over a connector that counts new connections and tags
//! each one, so the pipeline can tell whether a response came over a reused connection.
//!
//! Clients are cached by their timeout settings ([`ClientCache`]) for the life of the process,
//! so a config reload keeps the warm connection pool.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::UpstreamProtocol;
use crate::metrics::Metrics;
use crate::policy::ProxyBody;

/// The pooled upstream client.
pub type UpstreamClient = Client<CountingConnector, ProxyBody>;

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

/// `HttpConnector` plus a connection counter.
#[derive(Clone)]
pub struct CountingConnector {
    http: HttpConnector,
    metrics: Arc<Metrics>,
}

impl tower_service::Service<Uri> for CountingConnector {
    type Response = TrackedConn;
    type Error = crate::policy::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TrackedConn, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
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

/// Clients by (connect timeout, pool idle timeout, protocol), shared across config
/// generations.
#[derive(Default)]
pub struct ClientCache {
    clients: Mutex<HashMap<(Duration, Duration, UpstreamProtocol), UpstreamClient>>,
}

impl ClientCache {
    pub fn get(
        &self,
        connect_timeout: Duration,
        idle_timeout: Duration,
        protocol: UpstreamProtocol,
        metrics: &Arc<Metrics>,
    ) -> UpstreamClient {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry((connect_timeout, idle_timeout, protocol))
            .or_insert_with(|| {
                let mut http = HttpConnector::new();
                http.set_connect_timeout(Some(connect_timeout));
                http.set_nodelay(true);
                http.enforce_http(true);
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(idle_timeout)
                    .pool_timer(TokioTimer::new())
                    .http2_only(protocol == UpstreamProtocol::H2c)
                    .build(CountingConnector {
                        http,
                        metrics: metrics.clone(),
                    })
            })
            .clone()
    }
}
