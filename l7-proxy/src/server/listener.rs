//! Client-facing listeners: the accept phase of the pipeline.
//!
//! Each listener runs one accept loop ([`ListenerHandle::spawn`]). A connection reads the
//! PROXY header when configured, does the TLS handshake when configured (both bounded by the
//! header read timeout), then is served by hyper-util's auto builder, which speaks HTTP/1.1
//! and HTTP/2 (by ALPN on TLS, by preface on plain TCP) with upgrades enabled.
//!
//! The listener's settings sit behind an `ArcSwap`, so a reload can change TLS certificates
//! or PROXY protocol without closing the socket. Stopping a listener closes the socket, then
//! asks its connections to finish (graceful shutdown) and waits at most the drain timeout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::framing_guard::FramingGuard;
use super::idle::{Busy, IdleTimeoutIo};
use super::proxy_protocol;
use crate::pipeline::headers::ForwardingValues;
use crate::pipeline::{self, ConnInfo};
use crate::state::{ListenerSettings, Shared};

/// A running listener.
pub struct ListenerHandle {
    pub local_addr: SocketAddr,
    pub settings: Arc<ArcSwap<ListenerSettings>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ListenerHandle {
    /// Starts accepting on a bound socket.
    pub fn spawn(
        listener: TcpListener,
        settings: Arc<ListenerSettings>,
        shared: Arc<Shared>,
    ) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let settings = Arc::new(ArcSwap::new(settings));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, settings.clone(), shared, stop_rx));
        Ok(Self {
            local_addr,
            settings,
            stop,
            task,
        })
    }

    /// Stops accepting; the returned task finishes once connections drained.
    pub fn stop(self) -> JoinHandle<()> {
        let _ = self.stop.send(true);
        self.task
    }
}

async fn accept_loop(
    listener: TcpListener,
    settings: Arc<ArcSwap<ListenerSettings>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(serve_connection(
                        stream,
                        peer,
                        settings.load_full(),
                        shared.clone(),
                        graceful.watcher(),
                    ));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    drop(listener);
    let drain = Duration::from_millis(shared.state.load().server.drain_timeout_ms);
    let name = settings.load().name.clone();
    tracing::info!(listener = %name, connections = graceful.count(), "listener stopped, draining");
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = %name, "drain deadline passed, closing remaining connections");
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    settings: Arc<ListenerSettings>,
    shared: Arc<Shared>,
    watcher: Watcher,
) {
    let _ = stream.set_nodelay(true);
    // The two timeouts of the generation the connection starts under, without copying its
    // whole server config.
    let (handshake_timeout, idle) = {
        let state = shared.state.load();
        (
            Duration::from_millis(*state.server.header_read_timeout_ms.get_ref()),
            Duration::from_millis(*state.server.idle_timeout_ms.get_ref()),
        )
    };
    let mut client_addr = peer;
    if settings.proxy_protocol {
        match tokio::time::timeout(handshake_timeout, proxy_protocol::read_header(&mut stream))
            .await
        {
            Ok(Ok(Some(addr))) => client_addr = addr,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "bad PROXY header");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "PROXY header timed out");
                return;
            }
        }
    }
    let busy = Arc::new(Busy::default());
    match &settings.tls {
        None => {
            let (io, framing) = FramingGuard::new(
                IdleTimeoutIo::new(stream, idle, busy.clone()),
                Some(handshake_timeout),
            );
            let conn = ConnInfo {
                client_addr,
                tls: false,
                framing: Some(framing),
                busy: Some(busy),
                forwarding: Arc::new(ForwardingValues::new(client_addr, false)),
                tunnels: Some(shared.tunnels.clone()),
            };
            serve_http(io, conn, shared, watcher, idle.max(handshake_timeout)).await
        }
        Some(acceptor) => {
            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let (io, framing) = FramingGuard::new(
                        IdleTimeoutIo::new(tls, idle, busy.clone()),
                        Some(handshake_timeout),
                    );
                    let conn = ConnInfo {
                        client_addr,
                        tls: true,
                        framing: Some(framing),
                        busy: Some(busy),
                        forwarding: Arc::new(ForwardingValues::new(client_addr, true)),
                        tunnels: Some(shared.tunnels.clone()),
                    };
                    serve_http(io, conn, shared, watcher, idle.max(handshake_timeout)).await
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn serve_http<I>(
    io: I,
    conn: ConnInfo,
    shared: Arc<Shared>,
    watcher: Watcher,
    head_backstop: Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Heads are timed by the FramingGuard, from their first byte. hyper's timer also runs
        // between requests, so it is set to the idle timeout (or the header timeout, if
        // longer): it only bounds heads the guard no longer follows (after it stopped on a
        // connection that did not upgrade after all), without closing keep-alive
        // connections sooner than the idle timeout would.
        .header_read_timeout(head_backstop);
    builder.http2().timer(TokioTimer::new());
    let peer = conn.client_addr;
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(pipeline::handle(shared, conn, req).await) }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(%peer, error = %e, "client connection ended with error");
    }
}
