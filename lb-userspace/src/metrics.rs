//! Prometheus metrics on `GET /metrics` (the optional `[agent] metrics_address`).
//!
//! Nothing is counted in userspace: each scrape reads the datapath's per-CPU counters (summed
//! over CPUs) and the backends' health through [`Services`], and encodes them with
//! `prometheus-client` into a registry built for that scrape. The connection table's size is
//! not exported: counting it walks up to a million entries (`lbctl stats` shows it).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
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

/// Serves `/metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, services: Arc<Mutex<Services>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let services = services.clone();
        tokio::spawn(async move {
            if let Err(e) = scrape(stream, services).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
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
    let request = String::from_utf8_lossy(&buf);
    let (status, body) = if request.starts_with("GET /metrics") {
        let body = tokio::task::spawn_blocking(move || {
            render(&services.lock().unwrap_or_else(|p| p.into_inner()))
        })
        .await??;
        ("200 OK", body)
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    Ok(())
}
