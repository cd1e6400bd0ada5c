//! The admin API on a Unix socket (mode 0600): JSON lines, one [`Request`] in, one
//! [`Response`] out, as many as the client sends on one connection.
//!
//! The server hands each request to [`handle`], which runs it against [`Services`] under the
//! shared lock on a blocking thread (changes may resolve MAC addresses, which waits on ARP).
//! [`call`] is the client side, used by `lbctl` and the tests.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream as StdUnixStream},
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::Context;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    api::{Request, Response},
    services::{ServiceError, Services},
};

/// Runs one request.
pub fn handle(services: &Mutex<Services>, req: Request) -> Response {
    let mut s = services.lock().unwrap_or_else(|p| p.into_inner());
    match req {
        Request::VipAdd { vip } => reply(s.add_vip(vip)),
        Request::VipDel { vip } => reply(s.del_vip(&vip)),
        Request::VipList => reply(Ok::<_, ServiceError>(s.list_vips())),
        Request::BackendAdd { vip, backend } => reply(s.add_backend(&vip, backend)),
        Request::BackendDel { vip, address } => reply(s.del_backend(&vip, address)),
        Request::BackendWeight {
            vip,
            address,
            weight,
        } => reply(s.set_weight(&vip, address, weight)),
        Request::BackendList { vip } => reply(s.list_backends(vip.as_ref())),
        Request::Stats => reply(s.stats().and_then(|mut stats| {
            stats.flows = Some(s.count_flows()?);
            Ok(stats)
        })),
        Request::Health => reply(s.stats()),
        Request::Reload => reply(s.reload()),
    }
}

/// A result as a response: the value as JSON (`()` is `null`), or the error's message.
fn reply<T: serde::Serialize>(result: Result<T, ServiceError>) -> Response {
    let data = result
        .map_err(|e| e.to_string())
        .and_then(|v| serde_json::to_value(v).map_err(|e| e.to_string()));
    match data {
        Ok(data) => Response::Ok { data },
        Err(message) => Response::Error { message },
    }
}

/// Binds the socket (replacing a stale one) with mode 0600. A socket that another process
/// still serves (another agent with the same `admin_socket`), or a path that is not a socket
/// at all, is left alone and the bind fails.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
        Ok(meta) if !meta.file_type().is_socket() => anyhow::bail!(
            "admin_socket {} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Ok(_) if StdUnixStream::connect(path).is_ok() => anyhow::bail!(
            "admin_socket {} is in use by another process (another lb-agent?); \
             give each agent its own admin_socket",
            path.display()
        ),
        Ok(_) => match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
        },
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

/// Serves connections until the task is dropped.
pub async fn serve(listener: UnixListener, services: Arc<Mutex<Services>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, services.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Longest request line accepted (a VIP with thousands of backends fits many times over); a
/// longer one is answered with an error and the connection is closed, so a client cannot make
/// the agent buffer without bound.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

async fn connection(stream: UnixStream, services: Arc<Mutex<Services>>) {
    let (read, mut write) = stream.into_split();
    let mut reader = TokioBufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = MAX_REQUEST_BYTES as u64 + 1;
        match (&mut reader).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') && line.len() > MAX_REQUEST_BYTES {
            let response = Response::Error {
                message: format!("bad request: longer than {MAX_REQUEST_BYTES} bytes"),
            };
            let mut out = serde_json::to_string(&response).unwrap_or_default();
            out.push('\n');
            let _ = write.write_all(out.as_bytes()).await;
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => {
                tracing::debug!(?req, "admin request");
                let services = services.clone();
                tokio::task::spawn_blocking(move || handle(&services, req))
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        message: format!("request failed: {e}"),
                    })
            }
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let mut out = serde_json::to_string(&response).unwrap_or_default();
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// How long a client waits for the agent's reply by default: far above the slowest request
/// (a reload that rewrites many Maglev tables and resolves backends), but not for ever when
/// the agent is stuck.
pub const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Client: sends one request and waits up to `timeout` for its response.
pub fn call(
    socket: &Path,
    req: &Request,
    timeout: std::time::Duration,
) -> anyhow::Result<Response> {
    let mut stream = StdUnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the agent at {} (is lb-agent running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let stuck = |e: std::io::Error, what: &str| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            anyhow::anyhow!(
                "the agent at {} did not answer within {timeout:?} ({what}); is it stuck? \
                 See its log (--reply-timeout waits longer)",
                socket.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("{what} the agent"))
        }
    };
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| stuck(e, "sending the request to"))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| stuck(e, "reading the reply from"))?;
    serde_json::from_str(&reply).with_context(|| format!("bad reply from the agent: {reply:?}"))
}

/// Client: like [`call`] (with [`REPLY_TIMEOUT`]), but an error response becomes `Err` and
/// the payload is returned.
pub fn call_ok(socket: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    call_ok_within(socket, req, REPLY_TIMEOUT)
}

/// [`call_ok`] waiting up to `timeout`.
pub fn call_ok_within(
    socket: &Path,
    req: &Request,
    timeout: std::time::Duration,
) -> anyhow::Result<serde_json::Value> {
    match call(socket, req, timeout)? {
        Response::Ok { data } => Ok(data),
        Response::Error { message } => Err(anyhow::anyhow!(message)),
    }
}

#[cfg(test)]
mod client_tests {
    use super::*;

    /// A stuck agent (accepts, reads, never answers) gets a clear error after the timeout
    /// instead of hanging lbctl for ever.
    #[test]
    fn a_silent_agent_times_out_with_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("lbctl-timeout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("stuck.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let holder = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1500));
            drop(conn);
        });
        let started = std::time::Instant::now();
        let err = call_ok_within(
            &socket,
            &Request::VipList,
            std::time::Duration::from_millis(200),
        )
        .unwrap_err()
        .to_string();
        assert!(started.elapsed() < std::time::Duration::from_millis(1200));
        assert!(err.contains("did not answer within 200ms"), "{err}");
        holder.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
