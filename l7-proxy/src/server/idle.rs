//! An idle timeout for client connections: if no byte moves in either direction for the
//! configured time, the next pending read or write fails with `TimedOut` and hyper closes the
//! connection. This bounds slow or stalled clients after the request head too (bodies,
//! keep-alive gaps, upgraded tunnels).
//!
//! Activity only records the time; the timer is moved when it fires early. Resetting a tokio
//! timer on every read and write costs a timer-wheel update each time, which showed up on the
//! per-request profile.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Wraps a stream with an inactivity deadline.
pub struct IdleTimeoutIo<S> {
    inner: S,
    timeout: Duration,
    /// When a byte last moved.
    last_activity: Instant,
    /// Fires at or before `last_activity + timeout`; moved forward when it fires early.
    deadline: Pin<Box<Sleep>>,
}

impl<S> IdleTimeoutIo<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            timeout,
            last_activity: now,
            deadline: Box::pin(tokio::time::sleep_until(deadline_after(now, timeout))),
        }
    }

    fn touch(&mut self) {
        self.last_activity = Instant::now();
    }

    /// True once nothing moved for the whole timeout. Otherwise the timer is (re)armed for
    /// the real deadline and registered with `cx`.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return false;
            }
            let due = deadline_after(self.last_activity, self.timeout);
            if due <= Instant::now() {
                return true;
            }
            self.deadline.as_mut().reset(due);
        }
    }
}

/// `from + timeout`; a silly large timeout must not overflow the clock: treat it as "never".
fn deadline_after(from: Instant, timeout: Duration) -> Instant {
    from.checked_add(timeout)
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
