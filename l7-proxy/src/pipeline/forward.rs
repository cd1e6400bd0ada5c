//! The upstream pick and forward phases: choose a member of the group, send the request with
//! the group's pooled client, and retry idempotent requests without a body on another member
//! when the first could not be reached (within the group's retry budget). WebSocket and other
//! HTTP/1.1 upgrades are tunnelled once the member answers `101`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::{empty_body, text_response};
use crate::config::UpstreamProtocol;
use crate::metrics::{Metrics, RouteLabels};
use crate::policy::ProxyBody;
use crate::upstream::{is_idempotent, UpstreamGroup};

/// What the forward phase produced.
pub struct Forwarded {
    pub response: Response<ProxyBody>,
    /// The member that answered (or the last one tried).
    pub member: Option<SocketAddr>,
    /// The response is the member's; else the proxy's own (no member, unreachable, timeout).
    pub from_member: bool,
}

/// Sends `req` (already rewritten: path, headers) to a member of `group`.
pub async fn forward(
    group: &UpstreamGroup,
    req: Request<ProxyBody>,
    client_ip: IpAddr,
    route: &str,
    metrics: &Metrics,
    client_upgrade: Option<OnUpgrade>,
    tunnels: Option<&tokio_util::task::TaskTracker>,
) -> Forwarded {
    let h2 = group.protocol != UpstreamProtocol::Http1;
    if client_upgrade.is_some() && h2 {
        return Forwarded {
            response: text_response(
                StatusCode::BAD_GATEWAY,
                format!(
                    "upgrades need an HTTP/1.1 upstream; group {} speaks HTTP/2\n",
                    group.name
                ),
            ),
            member: None,
            from_member: false,
        };
    }
    group.deposit_retry_budget();
    let hash = group.request_hash(req.headers(), client_ip);
    let retryable =
        client_upgrade.is_none() && is_idempotent(req.method()) && req.body().is_end_stream();
    // The headers are kept for another attempt only if there can be one: a retry needs
    // attempts left and another member.
    let may_send_again = retryable && group.retries.attempts > 0 && group.members.len() > 1;
    let (mut parts, body) = req.into_parts();
    // A request body that fails (the client aborts, or sends a malformed chunk) fails the
    // upstream request too; that is not the member's fault, and must not eject it.
    let (body, watch) = if body.is_end_stream() {
        (body, None)
    } else {
        let watch = Arc::new(BodyWatch::new());
        let watched = WatchedBody {
            inner: body,
            watch: watch.clone(),
            silence: None,
            limit: group.request_timeout,
        };
        (BodyExt::boxed(watched), Some(watch))
    };
    if !h2 {
        // Only `TE: trailers` is left (see `sanitize`); it means something to HTTP/2 (gRPC).
        parts.headers.remove(http::header::TE);
    }
    let mut body = Some(body);
    let mut tried: Vec<usize> = Vec::new();
    let mut client_upgrade = client_upgrade;
    loop {
        let Some(index) = group.pick(hash, &tried) else {
            let response = if tried.is_empty() {
                text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no healthy upstream in group {}\n", group.name),
                )
            } else {
                text_response(StatusCode::BAD_GATEWAY, "upstream unreachable\n".into())
            };
            let member = tried.last().map(|&i| group.members[i].addr);
            return Forwarded {
                response,
                member,
                from_member: false,
            };
        };
        tried.push(index);
        let member = &group.members[index];
        let client = group.client_for(index);
        let target = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let uri = if client.origin_form() {
            Ok(Uri::from(target))
        } else {
            // HTTP/2 carries the host as `:authority`, taken from the URI: the client's host,
            // as an intermediary must send it (RFC 9113 8.3.1; the member's client is pinned
            // to it). HTTP/1.1 keeps `Host`, and the URI names the member to dial.
            let authority = h2
                .then(|| parts.headers.get(http::header::HOST))
                .flatten()
                .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
                .unwrap_or_else(|| member.authority.clone());
            Uri::builder()
                .scheme(group.scheme.clone())
                .authority(authority)
                .path_and_query(target)
                .build()
        };
        let Ok(uri) = uri else {
            return Forwarded {
                response: text_response(StatusCode::BAD_REQUEST, "bad request target\n".into()),
                member: None,
                from_member: false,
            };
        };
        let mut upstream_req = Request::new(body.take().unwrap_or_else(empty_body));
        *upstream_req.method_mut() = parts.method.clone();
        *upstream_req.uri_mut() = uri;
        *upstream_req.version_mut() = if h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *upstream_req.headers_mut() = if may_send_again {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        if h2 {
            upstream_req.headers_mut().remove(http::header::HOST);
        } else if watch.is_some()
            && !upstream_req
                .headers()
                .contains_key(http::header::CONTENT_LENGTH)
        {
            // A body of unknown length: hyper chunks it for most methods, but sends GET and
            // HEAD (as Elasticsearch's `_search` is sent) with no body at all unless told.
            upstream_req.headers_mut().insert(
                http::header::TRANSFER_ENCODING,
                http::HeaderValue::from_static("chunked"),
            );
        }

        let in_flight = member.start_request();
        member.count_request(metrics);
        let sent = within_request_timeout(
            client.request(member.addr, &member.authority, upstream_req),
            group.request_timeout,
            watch.as_deref(),
        );
        match sent.await {
            Ok(Ok(mut resp)) => {
                member.record_outcome(!resp.status().is_server_error(), &group.passive, metrics);
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client_side) = client_upgrade.take() {
                        tunnel(client_side, hyper::upgrade::on(&mut resp), tunnels);
                    }
                }
                return Forwarded {
                    // The member counts as busy until the body is done (least_request).
                    response: resp.map(|b| {
                        b.map_err(move |e| {
                            let _still_in_flight = &in_flight;
                            e
                        })
                        .boxed()
                    }),
                    member: Some(member.addr),
                    from_member: true,
                };
            }
            Ok(Err(err))
                if watch
                    .as_ref()
                    .is_some_and(|w| w.failed.load(Ordering::Relaxed)) =>
            {
                // The client's body failed: 400 (nginx answers a malformed body so; a client
                // that went away sees nothing), or 408 when it stopped sending; no retry, and
                // the member keeps its health.
                tracing::debug!(member = %member.addr, error = %err, "request body from the client failed");
                let response = if watch
                    .as_ref()
                    .is_some_and(|w| w.silent.load(Ordering::Relaxed))
                {
                    text_response(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request body stopped arriving\n".into(),
                    )
                } else {
                    text_response(
                        StatusCode::BAD_REQUEST,
                        "the request body could not be read\n".into(),
                    )
                };
                return Forwarded {
                    response,
                    member: Some(member.addr),
                    from_member: false,
                };
            }
            Ok(Err(err)) => {
                member.record_outcome(false, &group.passive, metrics);
                tracing::warn!(member = %member.addr, group = %group.name, error = %err, "upstream request failed");
                if retryable
                    && tried.len() <= group.retries.attempts as usize
                    && group.withdraw_retry()
                {
                    metrics
                        .retries
                        .get_or_create(&RouteLabels {
                            route: route.to_string(),
                        })
                        .inc();
                    continue;
                }
                return Forwarded {
                    response: text_response(
                        StatusCode::BAD_GATEWAY,
                        "upstream unreachable\n".into(),
                    ),
                    member: Some(member.addr),
                    from_member: false,
                };
            }
            Err(_) => {
                member.record_outcome(false, &group.passive, metrics);
                return Forwarded {
                    response: text_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream timed out\n".into(),
                    ),
                    member: Some(member.addr),
                    from_member: false,
                };
            }
        }
    }
}

/// What became of a client's request body on its way upstream.
struct BodyWatch {
    /// Reading it failed (the client aborted, sent a malformed chunk, or went silent).
    failed: AtomicBool,
    /// It failed because the client sent nothing for the group's request timeout.
    silent: AtomicBool,
    /// The last read is waiting for the client.
    waiting: AtomicBool,
    /// When it last moved (a frame passed, or it ended), in ms since `start`.
    moved_ms: AtomicU64,
    start: tokio::time::Instant,
}

impl BodyWatch {
    fn new() -> Self {
        Self {
            failed: AtomicBool::new(false),
            silent: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            moved_ms: AtomicU64::new(0),
            start: tokio::time::Instant::now(),
        }
    }

    fn moved_at(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.moved_ms.load(Ordering::Relaxed))
    }
}

/// A client's request body on its way upstream, noting what becomes of it in a [`BodyWatch`];
/// a client silent for `limit` fails it (nginx's `client_body_timeout`).
struct WatchedBody {
    inner: ProxyBody,
    watch: Arc<BodyWatch>,
    /// Started when a read waits for the client; gone once a frame comes.
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
}

impl Body for WatchedBody {
    type Data = bytes::Bytes;
    type Error = crate::policy::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let watch = &this.watch;
        match &polled {
            Poll::Pending => {
                watch.waiting.store(true, Ordering::Relaxed);
                let limit = this.limit;
                let silence = this
                    .silence
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if silence.as_mut().poll(cx).is_ready() {
                    watch.silent.store(true, Ordering::Relaxed);
                    watch.failed.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(format!(
                        "the client sent no body bytes for {} ms",
                        limit.as_millis()
                    )
                    .into())));
                }
            }
            Poll::Ready(frame) => {
                this.silence = None;
                watch.waiting.store(false, Ordering::Relaxed);
                let ms = watch.start.elapsed().as_millis() as u64;
                watch.moved_ms.store(ms, Ordering::Relaxed);
                if let Some(Err(_)) = frame {
                    watch.failed.store(true, Ordering::Relaxed);
                }
            }
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

/// `send` within the group's request timeout, which counts from the end of the client's
/// body (as Envoy's route timeout does) rather than from its start: an upload slower than the
/// timeout is not the member's fault. While the body streams, the member must take each part
/// within the timeout of the last one; a client that goes silent fails its own body instead
/// ([`WatchedBody`]). `Err` is a timeout to blame on the member.
async fn within_request_timeout<F: Future>(
    send: F,
    timeout: Duration,
    watch: Option<&BodyWatch>,
) -> Result<F::Output, ()> {
    let Some(watch) = watch else {
        return tokio::time::timeout(timeout, send).await.map_err(|_| ());
    };
    let mut send = std::pin::pin!(send);
    let mut deadline = tokio::time::Instant::now() + timeout;
    loop {
        tokio::select! {
            out = &mut send => return Ok(out),
            () = tokio::time::sleep_until(deadline) => {
                let now = tokio::time::Instant::now();
                if watch.waiting.load(Ordering::Relaxed) && !watch.failed.load(Ordering::Relaxed) {
                    // Waiting for the client, whose silence fails the body on its own clock.
                    deadline = now + timeout;
                    continue;
                }
                let next = watch.moved_at() + timeout;
                if next > now {
                    deadline = next;
                    continue;
                }
                return Err(());
            }
        }
    }
}

/// Joins the client's and the member's upgraded connections and copies bytes both ways, as a
/// task of `tunnels` (which a shutdown waits for, up to its drain timeout).
fn tunnel(client: OnUpgrade, upstream: OnUpgrade, tunnels: Option<&tokio_util::task::TaskTracker>) {
    let copy = async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(error = %e, "upgraded connection ended with error");
        }
    };
    match tunnels {
        Some(tracker) => drop(tracker.spawn(copy)),
        None => drop(tokio::spawn(copy)),
    }
}
