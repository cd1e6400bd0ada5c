//! The keep-alive pool of plain HTTP/1.1 groups, against a raw upstream that closes
//! connections the ways real servers do: after its own idle timeout, after `Connection:
//! close`, and with a response body the client never finishes reading.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// An HTTP/1.1 upstream written on sockets, answering by path:
/// - `/short-keepalive`: `200` with the path as body, then closes the connection if no next
///   request comes within 50 ms (as a server with a short keep-alive timeout);
/// - `/close`: `200` with `Connection: close`, then closes;
/// - `/stall`: `200` announcing 10 MB, sends 64 KiB of `s` and stalls until the peer goes;
/// - anything else: `200` with the path as body (none for `HEAD`), keep-alive.
///
/// Counts connections accepted and connections the peer (the proxy) closed.
struct RawUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed_by_peer: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed_by_peer = Arc::new(AtomicUsize::new(0));
        let (a, c) = (accepted.clone(), closed_by_peer.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, c.clone()));
            }
        });
        Self {
            addr,
            accepted,
            closed_by_peer,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits up to 2 s until the proxy has closed `n` connections; false if it has not.
    async fn wait_closed_by_peer(&self, n: usize) -> bool {
        for _ in 0..40 {
            if self.closed_by_peer.load(Ordering::SeqCst) >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

async fn serve(stream: TcpStream, closed_by_peer: Arc<AtomicUsize>) {
    let mut stream = BufReader::new(stream);
    let mut wait = None;
    loop {
        // The request head: the request line, then headers up to an empty line.
        let mut line = String::new();
        let read = match wait {
            Some(limit) => match tokio::time::timeout(limit, stream.read_line(&mut line)).await {
                Ok(read) => read,
                Err(_) => return, // our keep-alive timeout: close
            },
            None => stream.read_line(&mut line).await,
        };
        match read {
            Ok(0) | Err(_) => {
                closed_by_peer.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(_) => {}
        }
        let head_only = line.starts_with("HEAD ");
        let path = line.split(' ').nth(1).unwrap_or("/").to_string();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if stream.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        let s = stream.get_mut();
        match path.as_str() {
            "/close" => {
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\n/close",
                    )
                    .await;
                return;
            }
            "/stall" => {
                let head = "HTTP/1.1 200 OK\r\ncontent-length: 10000000\r\n\r\n";
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&[b's'; 65536]).await;
                // Until the proxy gives up on this connection.
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                closed_by_peer.fetch_add(1, Ordering::SeqCst);
                return;
            }
            _ => {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", path.len());
                let _ = s.write_all(head.as_bytes()).await;
                if !head_only {
                    let _ = s.write_all(path.as_bytes()).await;
                }
                if path == "/short-keepalive" {
                    wait = Some(Duration::from_millis(50));
                }
            }
        }
    }
}

async fn proxy_to(up: &RawUpstream, group_extra: &str) -> l7_proxy::ProxyHandle {
    crate::upstream_pool_bodies::proxy_with(up.addr, group_extra).await
}

/// A POST (never retried by the proxy) with a small body.
async fn post(c: &PlainClient, proxy: SocketAddr, path: &str) -> Answer {
    send(
        c,
        Request::post(format!("http://{proxy}{path}"))
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn a_member_closing_its_idle_connection_costs_no_request() {
    let up = RawUpstream::start().await;
    let proxy = proxy_to(&up, "").await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for round in 0..3 {
        let answer = post(&c, addr, "/short-keepalive").await;
        assert_eq!(answer.status, StatusCode::OK, "round {round}: {answer:?}");
        assert_eq!(answer.body, "/short-keepalive");
        // The member closes the pooled connection meanwhile.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(up.accepted(), 3, "a new connection after each close");
    proxy.shutdown().await;
}

#[tokio::test]
async fn connection_close_answers_are_not_pooled() {
    let up = RawUpstream::start().await;
    let proxy = proxy_to(&up, "").await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for _ in 0..3 {
        let answer = post(&c, addr, "/close").await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        assert_eq!(answer.body, "/close");
    }
    assert_eq!(up.accepted(), 3);
    proxy.shutdown().await;
}

#[tokio::test]
async fn sequential_requests_share_one_connection_with_empty_bodies_too() {
    let up = RawUpstream::start().await;
    let proxy = proxy_to(&up, "").await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for i in 0..5 {
        let path = format!("/r{i}");
        assert_eq!(post(&c, addr, &path).await.body, path);
        // HEAD: the answer has no body, which nothing reads.
        let head = send(
            &c,
            Request::head(format!("http://{addr}{path}"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.body, "");
    }
    assert_eq!(up.accepted(), 1, "every request over the first connection");
    proxy.shutdown().await;
}

#[tokio::test]
async fn idle_connections_close_after_the_group_idle_timeout() {
    let up = RawUpstream::start().await;
    let proxy = proxy_to(&up, "idle_timeout_ms = 200").await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    assert_eq!(post(&c, addr, "/a").await.body, "/a");
    let closed = up.wait_closed_by_peer(1).await;
    assert!(closed, "the proxy closed the idle pooled connection");
    // The next request dials again.
    assert_eq!(post(&c, addr, "/b").await.body, "/b");
    assert_eq!(up.accepted(), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_response_the_client_abandons_never_leaks_into_the_next_one() {
    let up = RawUpstream::start().await;
    let proxy = proxy_to(&up, "").await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    // The client reads the head and some of the body, then goes away.
    let resp = c
        .request(
            Request::post(format!("http://{addr}/stall"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first[0], b's');
    drop(body);
    // The member's connection, mid-body, is closed rather than pooled...
    let closed = up.wait_closed_by_peer(1).await;
    assert!(closed, "the half-read upstream connection is closed");
    // ...and the next request gets its own answer over a new one.
    let answer = post(&client(), addr, "/after").await;
    assert_eq!(answer.body, "/after");
    assert_eq!(up.accepted(), 2);
    proxy.shutdown().await;
}
