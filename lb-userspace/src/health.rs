//! Health checks: one tokio task per backend probes it every `interval` (TCP connect or
//! HTTP GET, each bounded by `timeout`) and sends every result to one channel.
//!
//! The checker does not decide anything: the agent's loop feeds the results to
//! [`crate::services::Services::health_report`], which counts consecutive results against
//! `rise` / `fall` and changes the datapath. Keeping the decision in one place means a
//! backend's state changes under the same lock as every other change.

use std::net::{IpAddr, SocketAddr};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::AbortHandle,
    time::timeout,
};

use crate::config::{CheckKind, HealthCheckSpec, VipId};

/// What one checker probes, and the ids its reports carry.
#[derive(Debug, Clone)]
pub struct CheckTarget {
    pub vip: VipId,
    pub vip_id: u32,
    pub backend_id: u32,
    pub address: IpAddr,
    pub port: u16,
    pub spec: HealthCheckSpec,
    /// The interface the backend is reached on (its index): the scope of an IPv6 link-local
    /// address, which a socket cannot reach without one.
    pub scope_id: u32,
}

/// One probe's outcome.
#[derive(Debug, Clone)]
pub struct HealthReport {
    pub vip_id: u32,
    pub backend_id: u32,
    pub address: IpAddr,
    /// `Err` carries why the probe failed.
    pub result: Result<(), String>,
}

/// Starts checkers on a runtime; their reports go to one channel.
#[derive(Clone)]
pub struct HealthSpawner {
    rt: tokio::runtime::Handle,
    tx: mpsc::UnboundedSender<HealthReport>,
}

impl HealthSpawner {
    pub fn new(rt: tokio::runtime::Handle, tx: mpsc::UnboundedSender<HealthReport>) -> Self {
        Self { rt, tx }
    }

    /// Spawns the checker; abort the handle to stop it.
    pub fn spawn(&self, target: CheckTarget) -> AbortHandle {
        let tx = self.tx.clone();
        self.rt.spawn(run(target, tx)).abort_handle()
    }
}

async fn run(target: CheckTarget, tx: mpsc::UnboundedSender<HealthReport>) {
    let mut tick = tokio::time::interval(target.spec.interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let addr = crate::neigh::scoped(target.address, target.port, target.scope_id);
    loop {
        tick.tick().await;
        let result = match timeout(target.spec.timeout.0, probe(addr, &target.spec)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", target.spec.timeout.0)),
        };
        tracing::trace!(vip = %target.vip, backend = %addr, ?result, "health check");
        let report = HealthReport {
            vip_id: target.vip_id,
            backend_id: target.backend_id,
            address: target.address,
            result,
        };
        if tx.send(report).is_err() {
            return;
        }
    }
}

/// One probe.
pub async fn probe(addr: SocketAddr, spec: &HealthCheckSpec) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    match spec.kind {
        CheckKind::Tcp => Ok(()),
        CheckKind::Http => http_get(&mut stream, addr, &spec.path, spec.expect_status).await,
    }
}

/// Sends `GET path` and compares the status line's code with `expect`.
async fn http_get(
    stream: &mut TcpStream,
    addr: SocketAddr,
    path: &str,
    expect: u16,
) -> Result<(), String> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: xdplb-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("sending request: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    // The status line is all we need.
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading response: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or("");
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {line:?}"))?;
    if code == expect {
        Ok(())
    } else {
        Err(format!("HTTP status {code}, expected {expect}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;
    use std::time::Duration;
    use tokio::net::TcpListener;

    fn spec(kind: CheckKind) -> HealthCheckSpec {
        HealthCheckSpec {
            kind,
            port: None,
            path: "/health".into(),
            expect_status: 200,
            interval: HumanDuration(Duration::from_secs(1)),
            timeout: HumanDuration(Duration::from_millis(500)),
            rise: 2,
            fall: 2,
        }
    }

    async fn http_server(status: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn tcp_and_http_probes() {
        let ok = http_server("200 OK").await;
        let bad = http_server("503 Service Unavailable").await;
        assert!(probe(ok, &spec(CheckKind::Tcp)).await.is_ok());
        assert!(probe(ok, &spec(CheckKind::Http)).await.is_ok());
        let e = probe(bad, &spec(CheckKind::Http)).await.unwrap_err();
        assert!(e.contains("503"), "{e}");
        // Nothing listens on a port we just released.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(probe(closed, &spec(CheckKind::Tcp)).await.is_err());
    }
}
