//! The HTTP/1.1 pool (plain groups) where bodies, interim answers and timing meet connection
//! reuse, against a raw upstream written on sockets: a member that answers before it has the
//! request body (also to `Expect: 100-continue`), one that drops a request it has read,
//! interim (1xx) and upgrade (101) answers, answers dropped unread (health checks), many
//! requests at once on a multi-threaded runtime with the pool counters, a member that is down,
//! the idle timeout as an upper bound, and the bound on idle connections per member.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// An HTTP/1.1 upstream on raw sockets, answering by path (keep-alive unless said):
/// - `/early`: `200` with body `early` as soon as the head is in, then reads the request body;
/// - `/early-204`: the same with `204 No Content` (no body, which nothing reads);
/// - `/drop`: reads the whole request, then closes without an answer;
/// - `/interim`: `100 Continue` and `103 Early Hints`, then `200` with the path as body;
/// - `/upgrade`: `101` to protocol `echo`, then sends back what it reads;
/// - `/slow`: `200` with 8 bytes, 4 now and 4 after 300 ms;
/// - anything else: `200` with the path as body.
///
/// Counts the connections it accepted and the requests it read, by path, and notes when the
/// proxy closed each connection (by order of acceptance).
struct ScriptedUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<Mutex<HashMap<String, usize>>>,
    closed_at: Arc<Mutex<HashMap<usize, Instant>>>,
}

impl ScriptedUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(HashMap::new()));
        let closed_at = Arc::new(Mutex::new(HashMap::new()));
        let (a, r, c) = (accepted.clone(), requests.clone(), closed_at.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                let r = r.clone();
                tokio::spawn(async move {
                    if serve(stream, r).await {
                        c.lock().unwrap().insert(index, Instant::now());
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            requests,
            closed_at,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn requests(&self, path: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Waits up to 2 s until it has read `n` requests for `path`.
    async fn wait_requests(&self, path: &str, n: usize) {
        for _ in 0..40 {
            if self.requests(path) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many connections the proxy has closed between requests.
    fn closed(&self) -> usize {
        self.closed_at.lock().unwrap().len()
    }

    /// When the proxy closed the `index`th connection (waits up to 2 s for it).
    async fn wait_connection_closed(&self, index: usize) -> Instant {
        for _ in 0..400 {
            if let Some(at) = self.closed_at.lock().unwrap().get(&index) {
                return *at;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("connection {index} still open after 2 s");
    }
}

/// Serves one connection; true when the proxy closed it between requests.
async fn serve(stream: TcpStream, requests: Arc<Mutex<HashMap<String, usize>>>) -> bool {
    let mut stream = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
            return true;
        }
        let path = line.split(' ').nth(1).unwrap_or("/").to_string();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if stream.read_line(&mut header).await.unwrap_or(0) == 0 {
                return false;
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
        let early: Option<&[u8]> = match path.as_str() {
            "/early" => Some(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly"),
            "/early-204" => Some(b"HTTP/1.1 204 No Content\r\n\r\n"),
            _ => None,
        };
        if let Some(answer) = early {
            if stream.get_mut().write_all(answer).await.is_err() {
                return false;
            }
        }
        let mut body = vec![0u8; length];
        if stream.read_exact(&mut body).await.is_err() {
            return false;
        }
        *requests.lock().unwrap().entry(path.clone()).or_insert(0) += 1;
        let s = stream.get_mut();
        let written = match path.as_str() {
            "/early" | "/early-204" => Ok(()),
            "/drop" => return false,
            "/upgrade" => {
                let switch = b"HTTP/1.1 101 Switching Protocols\r\n\
                               connection: upgrade\r\nupgrade: echo\r\n\r\n";
                if stream.get_mut().write_all(switch).await.is_err() {
                    return false;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    if stream.get_mut().write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                return false;
            }
            "/interim" => {
                s.write_all(
                    b"HTTP/1.1 100 Continue\r\n\r\n\
                      HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
                      HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n/interim",
                )
                .await
            }
            "/slow" => {
                let first = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nslow")
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                match first {
                    Ok(()) => s.write_all(b"body").await,
                    e => e,
                }
            }
            _ => {
                // In one write, as a short answer usually comes.
                let len = path.len();
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n{path}");
                s.write_all(answer.as_bytes()).await
            }
        };
        if written.is_err() {
            return false;
        }
    }
}

async fn proxy_to(up: &ScriptedUpstream) -> l7_proxy::ProxyHandle {
    proxy_with(up.addr, "").await
}

/// A proxy (with an admin listener) forwarding everything to `member`, with `group_extra` in
/// the group and no retries.
pub async fn proxy_with(member: SocketAddr, group_extra: &str) -> l7_proxy::ProxyHandle {
    start_proxy(&format!(
        r#"
[admin]
address = "127.0.0.1:0"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[upstreams]]
name = "up"
members = [{{ address = "{}" }}]
retries = {{ attempts = 0 }}
{group_extra}
[[routes]]
name = "all"
action = {{ forward = {{ group = "up" }} }}
"#,
        member
    ))
    .await
}

/// The `(opened, reused)` upstream connection counters of the proxy.
async fn pool_counters(proxy: &l7_proxy::ProxyHandle) -> (f64, f64) {
    let admin = proxy.admin_addr().unwrap();
    let text = get(&client(), admin, "admin", "/metrics").await.body;
    let opened = metric(&text, "l7_upstream_connections_opened_total").unwrap_or(0.0);
    let reused = metric(&text, "l7_upstream_pool_reused_total").unwrap_or(0.0);
    (opened, reused)
}

/// `n` requests for `/slow` (its body ends 300 ms after its head) through `proxy` at once;
/// their answers.
async fn slow_burst(c: &PlainClient, proxy: SocketAddr, n: usize) -> Vec<Answer> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let c = c.clone();
        tasks.spawn(async move {
            let slow = Request::get(format!("http://{proxy}/slow")).body(Full::default());
            send(&c, slow.unwrap()).await
        });
    }
    tasks.join_all().await
}

/// Reads from `stream` until `end` has arrived (up to 5 s); what came.
async fn read_until(stream: &mut TcpStream, end: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let reading = async {
        while !String::from_utf8_lossy(&out).contains(end) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), reading).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A member may answer before it has the request body (an early 401, 413 or redirect) while
/// the client is still sending it. That connection is busy until the body is through: the
/// next request must not wait behind the upload, and the connection serves again after it.
#[tokio::test]
async fn a_connection_still_sending_a_request_body_is_not_lent_to_the_next_request() {
    // The answer's body ends the exchange (200), or the answer has none (204).
    early_answer_during_upload("/early", "HTTP/1.1 200", "early").await;
    early_answer_during_upload("/early-204", "HTTP/1.1 204", "\r\n\r\n").await;
}

async fn early_answer_during_upload(path: &str, status_line: &str, answer_end: &str) {
    let up = ScriptedUpstream::start().await;
    let proxy = proxy_to(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let mut uploader = TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nhalf.");
    uploader.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until(&mut uploader, answer_end).await;
    assert!(answer.starts_with(status_line), "{path}: {answer}");
    assert!(answer.ends_with(answer_end), "{path}: {answer}");

    // The upload is still open; another client's request goes out on another connection.
    let c = client();
    let next = tokio::time::timeout(
        Duration::from_secs(3),
        c.request(
            Request::get(format!("http://{addr}/next"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await;
    let next = next.expect("the next request does not wait behind the upload");
    assert_eq!(next.unwrap().status(), StatusCode::OK, "{path}");
    assert_eq!(up.accepted(), 2, "{path}");

    // Once the body is through, the first connection is back in the pool, next to the second.
    uploader.write_all(b"done.").await.unwrap();
    up.wait_requests(path, 1).await;
    assert_eq!(
        up.requests(path),
        1,
        "{path}: the upload reached the member"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Two slow answers at once need both.
    let slow = || {
        Request::get(format!("http://{addr}/slow"))
            .body(Full::default())
            .unwrap()
    };
    let (one, two) = tokio::join!(send(&c, slow()), send(&c, slow()));
    assert_eq!(
        (one.body.as_str(), two.body.as_str()),
        ("slowbody", "slowbody")
    );
    assert_eq!(
        up.accepted(),
        2,
        "{path}: both pooled connections served again"
    );
    proxy.shutdown().await;
}

/// A request the member read and then dropped (closing the connection) was written: the
/// pool must not send it again on another connection unless it may go out twice (idempotent
/// and without a body: see upstream_pool's test of that case).
#[tokio::test]
async fn a_request_the_member_read_and_dropped_is_not_sent_again() {
    let up = ScriptedUpstream::start().await;
    let proxy = proxy_to(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    let get = |path: &str| Request::get(format!("http://{addr}{path}")).body(Full::default());
    for round in 0..2 {
        assert_eq!(send(&c, get("/warm").unwrap()).await.body, "/warm");
        // Over the pooled connection: a POST with a body, then a PATCH without one (neither
        // idempotent; the proxy retries neither here).
        let dropped = if round == 0 {
            let post = Request::post(format!("http://{addr}/drop"));
            send(
                &c,
                post.body(Full::new(Bytes::from_static(b"once"))).unwrap(),
            )
            .await
        } else {
            let patch = Request::patch(format!("http://{addr}/drop"));
            send(&c, patch.body(Full::default()).unwrap()).await
        };
        assert_eq!(dropped.status, StatusCode::BAD_GATEWAY, "round {round}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        up.requests("/drop"),
        2,
        "each dropped request reached the member once"
    );
    assert_eq!(up.accepted(), 2);
    let (opened, reused) = pool_counters(&proxy).await;
    // Each /warm opened one; each /drop reused it and failed (uncounted).
    assert_eq!((opened, reused), (2.0, 0.0));
    proxy.shutdown().await;
}

/// Interim answers (`100 Continue`, `103 Early Hints`) before the final one leave the
/// connection reusable, with or without a request body.
#[tokio::test]
async fn interim_answers_keep_the_connection_in_the_pool() {
    let up = ScriptedUpstream::start().await;
    let proxy = proxy_to(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for _ in 0..2 {
        let get = Request::get(format!("http://{addr}/interim")).body(Full::default());
        let answer = send(&c, get.unwrap()).await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (StatusCode::OK, "/interim")
        );
        let post = Request::post(format!("http://{addr}/interim"))
            .body(Full::new(Bytes::from_static(b"payload")));
        let answer = send(&c, post.unwrap()).await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (StatusCode::OK, "/interim")
        );
    }
    assert_eq!(up.requests("/interim"), 4);
    assert_eq!(up.accepted(), 1);
    assert_eq!(pool_counters(&proxy).await, (1.0, 3.0));
    proxy.shutdown().await;
}

/// Many requests at once on a multi-threaded runtime (as the proxy runs with more than one
/// CPU): each gets a connection of its own, none waits behind another's body, a second wave
/// reuses them all, and the counters add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_each_get_a_connection_and_the_counters_add_up() {
    const AT_ONCE: usize = 32;
    let up = ScriptedUpstream::start().await;
    let proxy = proxy_to(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for wave in 0..2 {
        let started = Instant::now();
        for answer in slow_burst(&c, addr, AT_ONCE).await {
            assert_eq!(
                (answer.status, answer.body.as_str()),
                (StatusCode::OK, "slowbody")
            );
        }
        // Each answer takes 300 ms; one after another would take 32 times that.
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "wave {wave} took {took:?}");
    }
    let accepted = up.accepted();
    assert!(
        accepted <= AT_ONCE,
        "{accepted} connections for {AT_ONCE} at once"
    );
    let (opened, reused) = pool_counters(&proxy).await;
    assert_eq!(opened, accepted as f64);
    assert_eq!(
        opened + reused,
        (2 * AT_ONCE) as f64,
        "each request opened or reused one"
    );
    proxy.shutdown().await;
}

/// A burst opens as many connections to a member as it needs; once it is over, at most
/// `max_idle_per_member` stay open (nginx's `keepalive`), the rest are closed as their
/// exchanges end, and the next burst dials those again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_leaves_at_most_max_idle_per_member_connections_open() {
    const AT_ONCE: usize = 6;
    const KEPT: usize = 2;
    let up = ScriptedUpstream::start().await;
    let proxy = proxy_with(up.addr, &format!("max_idle_per_member = {KEPT}")).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for wave in 1..=2 {
        for answer in slow_burst(&c, addr, AT_ONCE).await {
            assert_eq!(answer.body, "slowbody", "wave {wave}");
        }
        // Each wave needs AT_ONCE connections; all but KEPT of them are new after the first.
        assert_eq!(up.accepted(), AT_ONCE + (wave - 1) * (AT_ONCE - KEPT));
        let closed = wave * (AT_ONCE - KEPT);
        for _ in 0..40 {
            if up.closed() >= closed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // And no more than those.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(up.closed(), closed, "wave {wave}: {KEPT} kept open");
    }
    let opened = (AT_ONCE + AT_ONCE - KEPT) as f64;
    assert_eq!(pool_counters(&proxy).await, (opened, KEPT as f64));
    proxy.shutdown().await;
}

/// `max_idle_per_member = 0` keeps no idle connection: every request opens its own, and the
/// proxy closes it after the answer.
#[tokio::test]
async fn max_idle_per_member_0_opens_a_connection_per_request() {
    let up = ScriptedUpstream::start().await;
    let proxy = proxy_with(up.addr, "max_idle_per_member = 0").await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for i in 0..3 {
        let path = format!("/r{i}");
        let get = Request::get(format!("http://{addr}{path}")).body(Full::default());
        assert_eq!(send(&c, get.unwrap()).await.body, path);
        up.wait_connection_closed(i).await;
    }
    assert_eq!(up.accepted(), 3);
    assert_eq!(pool_counters(&proxy).await, (3.0, 0.0));
    proxy.shutdown().await;
}

/// A member that is down (nothing listens): the request fails at once with 502.
#[tokio::test]
async fn a_member_that_is_down_fails_fast() {
    let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = free.local_addr().unwrap();
    drop(free);
    let proxy = proxy_with(down, "").await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    let started = Instant::now();
    let get = Request::get(format!("http://{addr}/x")).body(Full::default());
    let answer = send(&c, get.unwrap()).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(pool_counters(&proxy).await, (0.0, 0.0));
    proxy.shutdown().await;
}

/// A client that sends `Expect: 100-continue` and waits for the `100` before its body, to a
/// member that answers early: the client gets the `100` and the answer, sends its body
/// afterwards, and the connection serves its next request.
#[tokio::test]
async fn an_expect_100_continue_upload_answered_early_keeps_its_connection() {
    let up = ScriptedUpstream::start().await;
    let proxy = proxy_to(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let mut uploader = TcpStream::connect(addr).await.unwrap();
    uploader
        .write_all(
            b"POST /early HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n",
        )
        .await
        .unwrap();
    let answers = read_until(&mut uploader, "early").await;
    assert!(
        answers.starts_with("HTTP/1.1 100 Continue\r\n\r\n"),
        "{answers}"
    );
    assert!(answers.contains("HTTP/1.1 200 OK"), "{answers}");
    uploader.write_all(b"body").await.unwrap();
    up.wait_requests("/early", 1).await;
    uploader
        .write_all(b"GET /next HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let next = read_until(&mut uploader, "/next").await;
    assert!(next.starts_with("HTTP/1.1 200 OK"), "{next}");
    assert_eq!(up.requests("/early"), 1);
    assert_eq!(up.accepted(), 1, "the upload's connection served /next");
    assert_eq!(pool_counters(&proxy).await, (1.0, 1.0));
    proxy.shutdown().await;
}

/// The group's idle timeout is what keeps pooled connections clear of the members' own
/// keep-alive timeout (set below it, a member never closes a connection the proxy is about to
/// use): a pooled connection is closed within the timeout, never after it.
#[tokio::test]
async fn pooled_connections_close_within_the_idle_timeout() {
    let up = ScriptedUpstream::start().await;
    let proxy = proxy_with(up.addr, "idle_timeout_ms = 200").await;
    let addr = proxy.listener_addr("web").unwrap();
    for round in 0..4 {
        // A fresh connection to the proxy each round, so that it is the upstream side that
        // closes; its close is seen by a read on a clone of the upstream's accepted socket.
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let path = format!("/r{round}");
        let req = format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let answer = read_until(&mut conn, &path).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let answered = Instant::now();
        let closed = up.wait_connection_closed(round).await;
        let idle = closed.duration_since(answered);
        assert!(
            idle >= Duration::from_millis(140) && idle <= Duration::from_millis(230),
            "round {round}: closed after {idle:?} idle (timeout 200 ms)"
        );
    }
    proxy.shutdown().await;
}

/// An upgraded connection (`101`) belongs to its tunnel: it never goes back to the pool, and
/// the next request opens another while the tunnel keeps working.
#[tokio::test]
async fn an_upgraded_connection_is_never_pooled() {
    let up = ScriptedUpstream::start().await;
    let proxy = proxy_to(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let mut tunnel = TcpStream::connect(addr).await.unwrap();
    tunnel
        .write_all(
            b"GET /upgrade HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let switched = read_until(&mut tunnel, "\r\n\r\n").await;
    assert!(switched.starts_with("HTTP/1.1 101"), "{switched}");
    tunnel.write_all(b"ping").await.unwrap();
    assert_eq!(read_until(&mut tunnel, "ping").await, "ping");

    let c = client();
    let get = || {
        Request::get(format!("http://{addr}/after"))
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(&c, get()).await.body, "/after");
    assert_eq!(send(&c, get()).await.body, "/after");
    assert_eq!(up.accepted(), 2, "a connection of its own for /after");
    tunnel.write_all(b"pong").await.unwrap();
    assert_eq!(read_until(&mut tunnel, "pong").await, "pong");
    assert_eq!(pool_counters(&proxy).await, (2.0, 1.0));
    // Closed first: a shutdown waits for open tunnels (up to its drain timeout).
    drop(tunnel);
    proxy.shutdown().await;
}

/// A response dropped before its body was read (as health checks do with theirs) leaves a
/// connection hyper can still keep: a short body that has already arrived is drained, and
/// the connection serves again; health checks every 50 ms do not dial every 50 ms.
#[tokio::test]
async fn health_checks_that_drop_a_short_answer_reuse_their_connection() {
    let up = ScriptedUpstream::start().await;
    let proxy = proxy_with(
        up.addr,
        "health_check = { path = \"/health\", interval_ms = 50, timeout_ms = 1000 }",
    )
    .await;
    up.wait_requests("/health", 10).await;
    assert!(up.requests("/health") >= 10);
    assert_eq!(up.accepted(), 1, "one connection for the health checks");
    proxy.shutdown().await;
}
