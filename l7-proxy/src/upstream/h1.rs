//! The client of plain HTTP/1.1 groups: hyper's connection API (`hyper::client::conn::http1`)
//! under a pool of idle connections per member.
//!
//! hyper-util's pooling client (still used for TLS and HTTP/2 groups) costs more per request
//! than the rest of the forward phase: it hashes a pool key per request, builds and boxes a
//! large checkout-or-connect future, and spawns a task per response that waits for the body
//! to end before it puts the connection back. Here a connection goes back to its member's
//! idle list when the response body reports its end (or is dropped at its end), found by
//! member address, without a task or a clock read; a background task closes connections
//! before they have been idle for longer than the idle timeout. A connection that may stay
//! busy after its response (a request body still being sent, a response body dropped before
//! its end) goes back by a task that waits until hyper says it is ready: the rare case.
//!
//! Each member keeps at most `max_idle_per_member` idle connections (nginx's `keepalive`): a
//! connection that comes back to a full list is closed instead.
//!
//! A pooled connection may have been closed by the member meanwhile: a request that could not
//! be written to it is sent again on another connection (as hyper-util does). One that was
//! written as the member closed the connection (its keep-alive timeout firing as the request
//! came: Node's is 5 s) fails with "closed before message completed"; if it may go out twice
//! (idempotent, RFC 9110 9.2.2, and without a body) it is sent again once, on a new
//! connection, as nginx does for a cached connection; otherwise it fails and the forward
//! phase's retry policy decides.
//!
//! Sending a request again needs a copy of its head, and a header map copied per request costs
//! about 0.5% of throughput on this, the hottest path. So the copy is made only for a
//! connection that has been idle across a tick of the reaper's clock, which ticks at least
//! every second: only such a connection can have been timed out by a member whose keep-alive
//! timeout is a second or more. Under load connections go out again microseconds after they
//! come back, and nearly no request pays for a copy. The trade-off: a member that closes
//! connections idle for less than a tick (1 s, or a quarter of the group's idle timeout when
//! that is under 4 s) is not covered, and its requests fail as before.

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::metrics::Metrics;
use crate::policy::{BoxError, ProxyBody};

use super::client::ClientSettings;
use super::is_idempotent;

/// Pooled HTTP/1.1 connections to the members of plain groups, by member address. Shared by
/// the groups (and config generations) with the same settings.
#[derive(Clone)]
pub struct H1Client {
    inner: Arc<Inner>,
}

struct Inner {
    connect_timeout: Duration,
    max_idle_per_member: usize,
    metrics: Arc<Metrics>,
    idle: Mutex<HashMap<SocketAddr, Vec<IdleConn>>>,
    /// Advanced by the reaper every `tick_period`; idle connections remember the tick they
    /// came back at.
    tick: AtomicU64,
    tick_period: Duration,
    /// Ticks of idleness after which the reaper closes a connection.
    ticks_per_timeout: u64,
    reaper_started: AtomicBool,
}

struct IdleConn {
    sender: SendRequest<ProxyBody>,
    since_tick: u64,
}

/// The longest tick of the reaper's clock: a connection idle across a tick may have been idle
/// this long, and only then is a request's head copied to be sent again (see the module doc).
const MAX_TICK: Duration = Duration::from_secs(1);

/// The fewest ticks per idle timeout.
const MIN_TICKS_PER_TIMEOUT: u32 = 4;

/// The reaper's period and how many of its ticks make the idle timeout: `n` ticks of
/// `idle_timeout / n`, with `n` at least 4 and the period at most [`MAX_TICK`]. A connection
/// comes back during some tick and is closed at the `n`th tick after that one: after 3/4 to
/// all of the timeout idle (`(n - 1) / n` to 1), never later. That bound is what the timeout
/// is for: set below a member's keep-alive timeout, it keeps the pool from sending a request
/// on a connection just as the member closes it.
fn reaper_clock(idle_timeout: Duration) -> (Duration, u32) {
    let ticks = idle_timeout
        .as_nanos()
        .div_ceil(MAX_TICK.as_nanos())
        .max(MIN_TICKS_PER_TIMEOUT.into());
    let ticks = u32::try_from(ticks).unwrap_or(u32::MAX);
    // Not 0, which `tokio::time::interval` refuses (the config refuses a 0 timeout anyway).
    let period = (idle_timeout / ticks).max(Duration::from_millis(1));
    (period, ticks)
}

impl H1Client {
    pub fn new(settings: ClientSettings, metrics: Arc<Metrics>) -> Self {
        let (tick_period, ticks_per_timeout) = reaper_clock(settings.idle_timeout);
        Self {
            inner: Arc::new(Inner {
                connect_timeout: settings.connect_timeout,
                max_idle_per_member: settings.max_idle_per_member,
                metrics,
                idle: Mutex::new(HashMap::new()),
                tick: AtomicU64::new(0),
                tick_period,
                ticks_per_timeout: ticks_per_timeout.into(),
                reaper_started: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `req` to `member`. The request goes out in origin form (path and query), as
    /// HTTP/1.1 sends it to an origin server; one without `Host` gets the member's address.
    pub async fn request(
        &self,
        member: SocketAddr,
        authority: &http::uri::Authority,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, BoxError> {
        if req.uri().scheme().is_some() {
            let target = req.uri().path_and_query().cloned();
            *req.uri_mut() = target.map_or_else(|| http::Uri::from_static("/"), http::Uri::from);
        }
        if !req.headers().contains_key(http::header::HOST) {
            if let Ok(host) = http::HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(http::header::HOST, host);
            }
        }
        // Whether the response can end before the request is written (an early answer).
        let sends_body = !req.body().is_end_stream();
        let may_go_out_twice = !sends_body && is_idempotent(req.method());
        // After a replay: the member closed a pooled connection, take no other.
        let mut new_connection_only = false;
        loop {
            let pooled = if new_connection_only {
                None
            } else {
                self.inner.checkout(member)
            };
            let reused = pooled.is_some();
            // The head to send again with, if the member may have timed the connection out.
            let mut replay = None;
            let mut sender = match pooled {
                Some(idle) => {
                    if may_go_out_twice && self.inner.idle_across_a_tick(&idle) {
                        replay = Some(RequestHead::copy(&req));
                    }
                    idle.sender
                }
                None => self.inner.connect(member).await?,
            };
            // A pooled connection may still be finishing its previous response, or be
            // closed: wait for the first, skip the second.
            if let Err(e) = poll_fn(|cx| sender.poll_ready(cx)).await {
                if reused {
                    continue;
                }
                return Err(e.into());
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    if reused {
                        self.inner.metrics.pool_reused.inc();
                    }
                    // An upgraded connection (101) belongs to the tunnel now.
                    let back =
                        (resp.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| Release {
                            sender,
                            inner: self.inner.clone(),
                            member,
                            sends_body,
                        });
                    return Ok(
                        resp.map(|body| http_body_util::BodyExt::boxed(PooledBody { body, back }))
                    );
                }
                Err(mut e) => match e.take_message() {
                    // Not written: the connection was closed under us. Send it on another.
                    Some(unsent) if reused => req = unsent,
                    _ => {
                        let error = e.into_error();
                        match replay {
                            Some(head) if closed_before_answer(&error) => {
                                let why = "member closed the pooled connection; sending again";
                                tracing::debug!(%member, %error, "{why}");
                                self.inner.metrics.pool_replayed.inc();
                                req = head.into_request();
                                new_connection_only = true;
                            }
                            _ => return Err(error.into()),
                        }
                    }
                },
            }
        }
    }
}

/// What a request without a body needs to go out again: its head (the extensions, which
/// hyper's HTTP/1.1 client does not read, stay behind).
struct RequestHead {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl RequestHead {
    fn copy(req: &Request<ProxyBody>) -> Self {
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    fn into_request(self) -> Request<ProxyBody> {
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// True when the member closed the connection where its answer should have come: hyper read
/// the connection's end (or a reset) after writing the request, before any response head.
fn closed_before_answer(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() || error.is_canceled() {
        return true;
    }
    let io = std::error::Error::source(error).and_then(|e| e.downcast_ref::<std::io::Error>());
    io.is_some_and(|e| {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe)
    })
}

impl Inner {
    fn checkout(&self, member: SocketAddr) -> Option<IdleConn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&member)?;
        // Most recently used first: the rest may go idle long enough to be closed.
        while let Some(conn) = list.pop() {
            if !conn.sender.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    /// True when a tick has passed since `conn` came back. False means it has been idle for
    /// less than a tick (at most 1 s), too short for a member's keep-alive timeout of a second
    /// or more to have closed it.
    fn idle_across_a_tick(&self, conn: &IdleConn) -> bool {
        conn.since_tick < self.tick.load(Ordering::Relaxed)
    }

    async fn connect(&self, member: SocketAddr) -> Result<SendRequest<ProxyBody>, BoxError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(member))
            .await
            .map_err(|_| format!("connecting to {member} timed out"))?
            .map_err(|e| format!("connecting to {member}: {e}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%member, error = %e, "upstream connection ended with error");
            }
        });
        self.metrics.connections_opened.inc();
        Ok(sender)
    }

    /// Puts a connection whose response is done back in its member's idle list. One that may
    /// be busy for a while yet and is not ready (`may_be_busy`: see [`PooledBody::release`])
    /// goes back once hyper says it is ready, or never if hyper closes it.
    fn release(
        self: &Arc<Self>,
        member: SocketAddr,
        mut sender: SendRequest<ProxyBody>,
        may_be_busy: bool,
    ) {
        if sender.is_closed() {
            return;
        }
        // Otherwise a connection is ready as soon as hyper's task has seen the response's end
        // (a checkout waits for that moment).
        if may_be_busy && !sender.is_ready() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let inner = self.clone();
                runtime.spawn(async move {
                    if poll_fn(|cx| sender.poll_ready(cx)).await.is_ok() {
                        inner.push_idle(member, sender);
                    }
                });
            }
            return;
        }
        self.push_idle(member, sender);
    }

    /// Adds a connection to its member's idle list, or closes it (drops its sender) when the
    /// list has `max_idle_per_member` already.
    fn push_idle(self: &Arc<Self>, member: SocketAddr, sender: SendRequest<ProxyBody>) {
        if self.max_idle_per_member == 0 {
            return;
        }
        self.start_reaper();
        let since_tick = self.tick.load(Ordering::Relaxed);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(member).or_default();
        if list.len() < self.max_idle_per_member {
            list.push(IdleConn { sender, since_tick });
            return;
        }
        // Dropping the sender closes the connection; outside the lock.
        drop(idle);
    }

    /// Starts the task that closes connections idle for 3/4 to all of the idle timeout (see
    /// [`reaper_clock`]), once, when the first connection goes idle (inside the runtime,
    /// then). It ends with the client.
    fn start_reaper(self: &Arc<Self>) {
        if self.reaper_started.load(Ordering::Relaxed)
            || self.reaper_started.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(self);
        let period = self.tick_period;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let now = inner.tick.fetch_add(1, Ordering::Relaxed) + 1;
                let closed: Vec<IdleConn> = {
                    let mut idle = inner.idle.lock().unwrap_or_else(|e| e.into_inner());
                    let mut closed = Vec::new();
                    idle.retain(|_, list| {
                        let (keep, old): (Vec<_>, Vec<_>) = list.drain(..).partition(|c| {
                            !c.sender.is_closed()
                                && now.saturating_sub(c.since_tick) < inner.ticks_per_timeout
                        });
                        *list = keep;
                        closed.extend(old);
                        !list.is_empty()
                    });
                    closed
                };
                // Dropping a sender closes its connection; outside the lock.
                drop(closed);
            }
        });
    }
}

/// Returns the connection to the pool.
struct Release {
    sender: SendRequest<ProxyBody>,
    inner: Arc<Inner>,
    member: SocketAddr,
    /// The request had a body (see [`PooledBody::release`]).
    sends_body: bool,
}

/// A member's response body that gives its connection back to the pool once it has ended.
/// Dropped before its end (the client went away, a health check read only the status), the
/// connection goes back if hyper can still keep it (see [`PooledBody::release`]).
struct PooledBody {
    body: Incoming,
    back: Option<Release>,
}

impl PooledBody {
    /// Gives the connection back, at the body's end (`ended`) or when the body is dropped
    /// before it. It may then be busy for a while, and goes back only once ready:
    /// - with a request body, which the member may have answered early (a 401 or 413) while
    ///   the client still sends it, for as long as the client likes; the next request must
    ///   not wait behind that upload;
    /// - dropped before its end: hyper reads the rest of the body if it has already arrived
    ///   and keeps the connection (as hyper-util's pool did, so that health checks, which
    ///   read only the status, do not dial each time), else closes it.
    fn release(&mut self, ended: bool) {
        if let Some(r) = self.back.take() {
            r.inner.release(r.member, r.sender, r.sends_body || !ended);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(None) => {
                this.release(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.body.is_end_stream() {
                    this.release(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.back = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body (204, 304, HEAD, length 0) may never be polled: it has ended.
        let ended = self.body.is_end_stream();
        self.release(ended);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reaper_ticks_at_least_every_second_and_four_times_per_timeout() {
        let ms = Duration::from_millis;
        for (timeout, period, ticks) in [
            (ms(200), ms(50), 4),
            (ms(2_000), ms(500), 4),
            (ms(4_900), ms(980), 5),
            (ms(5_000), ms(1_000), 5),
            (ms(60_000), ms(1_000), 60),
            (ms(1), ms(1), 4),
        ] {
            assert_eq!(reaper_clock(timeout), (period, ticks), "{timeout:?}");
            // Closed at the last tick, idle for (ticks - 1) to `ticks` periods: never past the
            // timeout, and at least 3/4 of it (but for the 1 ms floor).
            if timeout >= ms(4) {
                assert!(period * ticks <= timeout, "{timeout:?}");
                assert!(period * (ticks - 1) * 4 >= timeout * 3, "{timeout:?}");
            }
        }
    }
}
