//! The keep-alive pool of plain HTTP/1.1 groups, against a raw upstream that closes
//! connections the ways real servers do: after its own idle timeout, after `Connection:
//! close`, just as a request arrives on a pooled connection, and with a response body the
//! client never finishes reading.

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
/// - `/first-only`: on a connection's first request, `200` with `connection N` as body (N
///   counts connections from 0), keep-alive; a later request on it is read, then the
///   connection closed without an answer (a keep-alive timeout firing as the request came);
/// - anything else: `200` with the path as body (none for `HEAD`), keep-alive.
///
/// Counts connections accepted, connections the peer (the proxy) closed and requests read
/// and dropped.
struct RawUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed_by_peer: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed_by_peer = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (a, c, d) = (accepted.clone(), closed_by_peer.clone(), dropped.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, index, c.clone(), d.clone()));
            }
        });
        Self {
            addr,
            accepted,
            closed_by_peer,
            dropped,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
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

async fn serve(
    stream: TcpStream,
    index: usize,
    closed_by_peer: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
) {
    let mut stream = BufReader::new(stream);
    let mut wait = None;
    for served in 0.. {
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
            "/first-only" if served > 0 => {
                dropped.fetch_add(1, Ordering::SeqCst);
                return;
            }
            "/first-only" => {
                let body = format!("connection {index}");
                let len = body.len();
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n{body}");
                let _ = s.write_all(answer.as_bytes()).await;
            }
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

/// A member may close a pooled connection just as the proxy writes a request on it (its
/// keep-alive timeout fires; Node's is 5 s): hyper then fails the written request with "closed
/// before message completed". A request that can safely go out twice (idempotent, no body)
/// goes out again once, on a new connection, as nginx does; one with a body fails (502: this
/// group has no retries and one member).
#[tokio::test]
async fn a_request_the_member_closes_its_pooled_connection_on_is_sent_again_if_idempotent() {
    let up = RawUpstream::start().await;
    // The pool's clock ticks every quarter of this (500 ms); the copy that a request needs to
    // go out again is kept when its connection has been idle across a tick.
    let proxy = proxy_to(&up, "idle_timeout_ms = 2000").await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    let first_only = || {
        Request::get(format!("http://{addr}/first-only"))
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(&c, first_only()).await.body, "connection 0");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let again = send(&c, first_only()).await;
    assert_eq!(
        (again.status, again.body.as_str()),
        (StatusCode::OK, "connection 1"),
        "the GET went out again on a new connection"
    );
    assert_eq!(
        up.dropped(),
        1,
        "the member read it on the pooled connection"
    );
    assert_eq!(up.accepted(), 2);

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let answer = post(&c, addr, "/first-only").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{answer:?}");
    assert_eq!(up.dropped(), 2);
    assert_eq!(up.accepted(), 2, "the POST was not sent again");

    let text = get(&c, proxy.admin_addr().unwrap(), "admin", "/metrics").await;
    let replayed = metric(&text.body, "l7_upstream_pool_replayed_total");
    assert_eq!(replayed, Some(1.0), "counted");
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
