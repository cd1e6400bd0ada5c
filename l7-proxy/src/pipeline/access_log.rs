//! The access log phase: one structured `tracing` line per request (target
//! `l7_proxy::access`), written when the response body has been sent — or dropped, when the
//! client went away — so `bytes` and `duration_ms` cover the whole exchange. The request
//! metrics are recorded earlier, when the response head is ready.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::policy::{BoxError, ProxyBody};
use crate::routing::Route;

/// Everything the log line says about a request, except the body size.
#[derive(Debug)]
pub struct AccessRecord {
    pub method: http::Method,
    pub host: String,
    pub path: String,
    pub status: u16,
    /// The route matched; `None` for requests that matched none (`-` in logs and metrics).
    pub route: Option<Arc<Route>>,
    pub upstream: Option<std::net::SocketAddr>,
    pub request_id: String,
    pub client: std::net::SocketAddr,
    pub started: Instant,
}

impl AccessRecord {
    /// Counts the request and its time to response head.
    pub fn record_metrics(&self, metrics: &Metrics) {
        let series = match &self.route {
            Some(route) => &route.metrics,
            None => &metrics.unmatched,
        };
        series.record(metrics, self.status, self.started.elapsed());
    }

    fn route_name(&self) -> &str {
        self.route.as_ref().map_or("-", |r| r.name.as_str())
    }

    fn emit(&self, bytes: u64, complete: bool) {
        // With the access log filtered out, skip formatting the fields.
        if !tracing::enabled!(target: "l7_proxy::access", tracing::Level::INFO) {
            return;
        }
        let upstream = self.upstream.map(|a| a.to_string());
        tracing::info!(
            target: "l7_proxy::access",
            method = %self.method,
            host = %self.host,
            path = %self.path,
            status = self.status,
            bytes,
            complete,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            upstream = upstream.as_deref().unwrap_or("-"),
            request_id = %self.request_id,
            route = %self.route_name(),
            client = %self.client,
            "request"
        );
    }
}

/// A response body that counts what it sends and logs the request when it ends.
pub struct LoggedBody {
    inner: ProxyBody,
    bytes: u64,
    ended: bool,
    record: Option<AccessRecord>,
}

impl LoggedBody {
    pub fn new(inner: ProxyBody, record: AccessRecord) -> Self {
        Self {
            inner,
            bytes: 0,
            ended: false,
            record: Some(record),
        }
    }

    fn finish(&mut self) {
        if let Some(record) = self.record.take() {
            record.emit(self.bytes, self.ended || self.inner.is_end_stream());
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                this.ended = true;
                this.finish();
            }
            Poll::Ready(Some(Err(_))) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.finish();
    }
}
