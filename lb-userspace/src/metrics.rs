//! Prometheus metrics on `GET /metrics` (the optional `[agent] metrics_address`).
//!
//! Nothing is counted in userspace: each scrape reads the datapath's per-CPU counters (summed
//! over CPUs) and the backends' health through [`Services`], and encodes them with
//! `prometheus-client` into a registry built for that scrape. The connection table's size is
//! not exported: counting it walks up to a million entries (`lbctl stats` shows it).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{api::HealthState, services::Services};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipLabels {
    vip: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    vip: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Renders the metrics text for one scrape.
pub fn render(services: &Services) -> anyhow::Result<String> {
    let stats = services.stats()?;
    let mut registry = Registry::with_prefix("xdplb");
    let vip_packets = Family::<VipLabels, Counter>::default();
    let vip_bytes = Family::<VipLabels, Counter>::default();
    let vip_flows = Family::<VipLabels, Counter>::default();
    let be_packets = Family::<BackendLabels, Counter>::default();
    let be_bytes = Family::<BackendLabels, Counter>::default();
    let be_flows = Family::<BackendLabels, Counter>::default();
    let be_up = Family::<BackendLabels, Gauge>::default();
    let be_weight = Family::<BackendLabels, Gauge>::default();
    let reasons = Family::<ReasonLabels, Counter>::default();
    for v in &stats.vips {
        let l = VipLabels {
            vip: v.vip.to_string(),
        };
        vip_packets.get_or_create(&l).inc_by(v.counters.packets);
        vip_bytes.get_or_create(&l).inc_by(v.counters.bytes);
        vip_flows.get_or_create(&l).inc_by(v.counters.new_flows);
        for b in &v.backends {
            let l = BackendLabels {
                vip: v.vip.to_string(),
                backend: b.address.to_string(),
            };
            be_packets.get_or_create(&l).inc_by(b.counters.packets);
            be_bytes.get_or_create(&l).inc_by(b.counters.bytes);
            be_flows.get_or_create(&l).inc_by(b.counters.new_flows);
            be_up
                .get_or_create(&l)
                .set((b.health == HealthState::Up) as i64);
            be_weight.get_or_create(&l).set(b.weight as i64);
        }
    }
    for (reason, count) in &stats.global {
        reasons
            .get_or_create(&ReasonLabels {
                reason: reason.clone(),
            })
            .inc_by(*count);
    }
    registry.register("vip_packets", "Packets forwarded for the VIP", vip_packets);
    registry.register("vip_bytes", "Bytes forwarded for the VIP", vip_bytes);
    registry.register(
        "vip_new_flows",
        "Flows picked by Maglev for the VIP",
        vip_flows,
    );
    registry.register(
        "backend_packets",
        "Packets forwarded to the backend",
        be_packets,
    );
    registry.register("backend_bytes", "Bytes forwarded to the backend", be_bytes);
    registry.register(
        "backend_new_flows",
        "New flows sent to the backend",
        be_flows,
    );
    registry.register(
        "backend_up",
        "1 when the backend passes its health checks",
        be_up,
    );
    registry.register("backend_weight", "Maglev weight (0: draining)", be_weight);
    registry.register("datapath_packets", "Datapath verdicts by reason", reasons);
    let mut out = String::new();
    encode(&mut out, &registry).context("encoding metrics")?;
    Ok(out)
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener on {addr}"))
}

/// Scrapes served at once; more connections are closed as soon as they are accepted. Each
/// holds a file descriptor, and the agent's health checks need theirs: without a bound,
/// clients holding connections open could starve them and take every backend down.
const MAX_CONNECTIONS: usize = 64;

/// How long a client has to send its request, and then to read the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, services: Arc<Mutex<Services>>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // Out of descriptors, say: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: {MAX_CONNECTIONS} connections open; closing this one");
            continue;
        };
        let services = services.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(REQUEST_TIMEOUT, scrape(stream, services)).await {
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics request failed"),
                Err(_) => tracing::debug!(%peer, "metrics request timed out"),
                Ok(Ok(())) => {}
            }
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    /// `GET` (or `HEAD`, no body) of `/metrics`, with or without a query.
    Metrics {
        head: bool,
    },
    NotFound {
        head: bool,
    },
    /// Not an HTTP/1 request line.
    Bad,
}

fn asked(head: &[u8]) -> Asked {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Asked::Bad;
    };
    if !version.starts_with(b"HTTP/1.") || !target.starts_with(b"/") {
        return Asked::Bad;
    }
    let head = match method {
        b"GET" => false,
        b"HEAD" => true,
        _ => return Asked::NotFound { head: false },
    };
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    if path == b"/metrics" {
        Asked::Metrics { head }
    } else {
        Asked::NotFound { head }
    }
}

async fn scrape(mut stream: TcpStream, services: Arc<Mutex<Services>>) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let (status, content_type, body, head) = match asked(&buf) {
        Asked::Metrics { head } => {
            let body = tokio::task::spawn_blocking(move || {
                render(&services.lock().unwrap_or_else(|p| p.into_inner()))
            })
            .await??;
            // prometheus-client writes OpenMetrics text (`_total` samples, `# EOF`).
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
                head,
            )
        }
        Asked::NotFound { head } => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "try GET /metrics\n".to_string(),
            head,
        ),
        Asked::Bad => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "not an HTTP/1 request\n".to_string(),
            false,
        ),
    };
    let head_text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head_text.as_bytes()).await?;
    if !head {
        stream.write_all(body.as_bytes()).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_by_their_request_line() {
        assert_eq!(
            asked(b"GET /metrics HTTP/1.1\r\n"),
            Asked::Metrics { head: false }
        );
        assert_eq!(
            asked(b"GET /metrics?x=1 HTTP/1.0\r\n"),
            Asked::Metrics { head: false }
        );
        assert_eq!(
            asked(b"HEAD /metrics HTTP/1.1\r\n"),
            Asked::Metrics { head: true }
        );
        assert_eq!(
            asked(b"GET /metrics/../etc HTTP/1.1\r\n"),
            Asked::NotFound { head: false }
        );
        assert_eq!(
            asked(b"GET /metricsx HTTP/1.1\r\n"),
            Asked::NotFound { head: false }
        );
        assert_eq!(
            asked(b"POST /metrics HTTP/1.1\r\n"),
            Asked::NotFound { head: false }
        );
        assert_eq!(asked(b"garbage\r\n"), Asked::Bad);
        assert_eq!(asked(b""), Asked::Bad);
    }
}
