//! An idle timeout for client connections: if no byte moves in either direction for the
//! configured time, the next pending read or write fails with `TimedOut` and hyper closes the
//! connection. This bounds slow or stalled clients after the request head too (bodies,
//! keep-alive gaps, upgraded tunnels).
//!
//! Activity only sets a flag: no clock read, no timer update per read or write (a timer-wheel
//! update per I/O, then a clock read per I/O, both showed up on the per-request profile). The
//! timer fires every quarter of the timeout and counts the quarters that saw no activity; the
//! fourth in a row closes the connection, so a silent connection goes after 1 to 1.25 times
//! the timeout.
//!
//! A connection with a request the proxy is still working on (policies, waiting for the
//! upstream's response head) is not idle even when no byte moves: the pipeline holds a
//! [`Busy`] guard for it, and the group's request timeout bounds that wait instead.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Requests of one connection that the proxy is working on, before their response head.
#[derive(Debug, Default)]
pub struct Busy(AtomicUsize);

impl Busy {
    /// Marks one request as in progress until the guard drops.
    pub fn enter(self: &Arc<Self>) -> BusyGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        BusyGuard(self.clone())
    }

    fn is_busy(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }
}

/// Ends one request's [`Busy`] mark when dropped.
#[derive(Debug)]
pub struct BusyGuard(Arc<Busy>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Quarters of the timeout without activity after which a connection is idle.
const QUIET_CHECKS: u32 = 4;

/// Wraps a stream with an inactivity deadline.
pub struct IdleTimeoutIo<S> {
    inner: S,
    /// A quarter of the timeout: how often the timer checks.
    period: Duration,
    busy: Arc<Busy>,
    /// A byte moved since the last check.
    active: bool,
    /// Checks in a row that found no activity.
    quiet: u32,
    /// The next check.
    check: Pin<Box<Sleep>>,
}

impl<S> IdleTimeoutIo<S> {
    /// `busy` is shared with the requests of the connection (see [`Busy`]).
    pub fn new(inner: S, timeout: Duration, busy: Arc<Busy>) -> Self {
        let period = timeout / QUIET_CHECKS;
        Self {
            inner,
            period,
            busy,
            active: false,
            quiet: 0,
            check: Box::pin(tokio::time::sleep_until(after(Instant::now(), period))),
        }
    }

    fn touch(&mut self) {
        self.active = true;
    }

    /// True once `QUIET_CHECKS` checks in a row found nothing moving and no request in
    /// progress. Otherwise the next check is armed and registered with `cx`.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.check.as_mut().poll(cx).is_ready() {
            if std::mem::take(&mut self.active) || self.busy.is_busy() {
                self.quiet = 0;
            } else {
                self.quiet += 1;
                if self.quiet >= QUIET_CHECKS {
                    return true;
                }
            }
            let next = after(Instant::now(), self.period);
            self.check.as_mut().reset(next);
        }
        false
    }
}

/// `from + period`; a silly large timeout must not overflow the clock: treat it as "never".
fn after(from: Instant, period: Duration) -> Instant {
    from.checked_add(period)
        .unwrap_or(from + Duration::from_secs(86_400 * 365))
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "client connection idle timeout")
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeoutIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.touch();
                Poll::Ready(result)
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeoutIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(result) => {
                this.touch();
                Poll::Ready(result)
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => {
                this.touch();
                Poll::Ready(result)
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
