//! `Via` (RFC 9110 7.6.3) through the running proxy: the entry the upstream receives for each
//! client protocol, appended to earlier ones; turned off; on responses; through a chain of two
//! proxies; and loop detection on a proxy that forwards to itself.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::*;

/// A proxy with `[server]` lines `server`, forwarding `/` to `up` and answering `/fixed`
/// itself.
async fn via_proxy(up: &TestUpstream, server: &str) -> l7_proxy::ProxyHandle {
    let fixed = r#"[[routes]]
name = "fixed"
match = { path = { prefix = "/fixed" } }
action = { fixed = { status = 200, body = "ours" } }"#;
    forward_with(up, server, fixed, "").await
}

/// Every `Via` line the upstream saw in its last request.
fn via_seen(up: &TestUpstream) -> Vec<String> {
    up.last()
        .headers
        .get_all("via")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn requests_carry_our_entry_for_the_client_version_appended_to_earlier_ones() {
    let up = TestUpstream::start("up").await;
    let proxy = forward_all(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();

    let answer = get(&c, addr, "a", "/").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(via_seen(&up), ["1.1 l7-proxy"]);
    assert!(
        !answer.headers.contains_key("via"),
        "no Via on responses by default"
    );

    // Earlier entries, over several lines, are kept in order; ours comes last, in one line.
    let answer = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nVia: 1.0 fred, 1.1 p.example.net\r\n\
Via: HTTP/1.1 cache (Squid/6.1)\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        via_seen(&up),
        ["1.0 fred, 1.1 p.example.net, HTTP/1.1 cache (Squid/6.1), 1.1 l7-proxy"]
    );

    // The received protocol is the client's: HTTP/1.0 ...
    let answer = raw_exchange(
        addr,
        b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.contains(" 200 OK\r\n"), "{answer}");
    assert_eq!(via_seen(&up), ["1.0 l7-proxy"]);

    // ... and HTTP/2 (prior knowledge), whatever the upstream speaks.
    let mut sender = h2c_sender(addr).await;
    let req = Request::get("http://a/h2")
        .header("via", "2 edge")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(via_seen(&up), ["2 edge, 2 l7-proxy"]);
    assert_eq!(up.hits(), 4);
    proxy.shutdown().await;
}

#[tokio::test]
async fn via_false_adds_nothing_and_keeps_what_came() {
    let up = TestUpstream::start("up").await;
    let proxy = via_proxy(&up, "via = false").await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    get(&c, addr, "a", "/").await;
    assert!(via_seen(&up).is_empty(), "{:?}", via_seen(&up));
    get_with(&c, addr, "a", "/", &[("via", "1.0 fred")]).await;
    assert_eq!(via_seen(&up), ["1.0 fred"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn responses_from_upstreams_get_an_entry_when_asked_and_a_chain_lists_both_proxies() {
    // client -> inner-facing "edge" -> "core" -> upstream.
    let up = TestUpstream::start("up").await;
    let core = via_proxy(&up, "via = \"core\"\nvia_response = true").await;
    let core_addr = core.listener_addr("web").unwrap();
    let edge = start_proxy(&format!(
        r#"
[server]
via = "edge"
via_response = true
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[upstreams]]
name = "core"
members = [{{ address = "{core_addr}" }}]
[[routes]]
name = "all"
action = {{ forward = {{ group = "core" }} }}
"#
    ))
    .await;
    let addr = edge.listener_addr("web").unwrap();
    let c = client();

    let answer = get(&c, addr, "a", "/").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(via_seen(&up), ["1.1 edge, 1.1 core"]);
    // The response lists the proxies in the order it passed them.
    assert_eq!(answer.headers["via"], "1.1 core, 1.1 edge");

    // A response the proxy makes itself was not forwarded: no Via.
    let answer = get(&c, core_addr, "a", "/fixed").await;
    assert_eq!(answer.body, "ours");
    assert!(!answer.headers.contains_key("via"), "{:?}", answer.headers);
    // Nor its 502 when the upstream is gone; the edge forwards that 502 and adds its entry.
    up.kill();
    let answer = get(&c, core_addr, "a", "/").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(!answer.headers.contains_key("via"), "{:?}", answer.headers);
    let answer = get(&c, addr, "a", "/").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.headers["via"], "1.1 edge");
    edge.shutdown().await;
    core.shutdown().await;
}

#[tokio::test]
async fn loop_detection_refuses_a_request_that_came_back() {
    let up = TestUpstream::start("up").await;
    let toml = |member: &str| {
        format!(
            r#"
[server]
via = "gw-1"
via_loop_detection = true
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[upstreams]]
name = "up"
members = [{{ address = "{member}" }}]
[[routes]]
name = "all"
action = {{ forward = {{ group = "up" }} }}
"#
        )
    };
    let proxy = start_proxy(&toml(&up.addr.to_string())).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();

    // Another proxy's entry is no loop; ours is, whatever its protocol and comment.
    let answer = get_with(&c, addr, "a", "/", &[("via", "1.1 gw-2")]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(via_seen(&up), ["1.1 gw-2, 1.1 gw-1"]);
    let answer = get_with(&c, addr, "a", "/", &[("via", "1.1 gw-2, 2 GW-1 (x)")]).await;
    assert_eq!(answer.status, StatusCode::LOOP_DETECTED);
    assert_eq!(up.hits(), 1);

    // A real loop: the proxy's one member is its own listener. The request comes back once
    // with our entry and is refused there; without detection it would go round until the
    // proxy ran out of connections.
    let looped = l7_proxy::Config::from_toml_str(&toml(&addr.to_string())).unwrap();
    proxy.reload(looped).await.unwrap();
    let answer = get(&c, addr, "a", "/").await;
    assert_eq!(answer.status, StatusCode::LOOP_DETECTED);
    assert!(answer.body.contains("loop detected"), "{}", answer.body);
    assert_eq!(up.hits(), 1);
    proxy.shutdown().await;
}

/// An HTTP/2-only upstream that answers each request with the `Via` it received, as the body.
async fn h2_via_echo() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| {
                    let via = req
                        .headers()
                        .get("via")
                        .map(|v| v.as_bytes().to_vec())
                        .unwrap_or_default();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(via),
                        )))
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_h2c_upstream_gets_the_clients_version_and_its_response_entry_says_2() {
    let up = h2_via_echo().await;
    let proxy = start_proxy(&format!(
        r#"
[server]
via_response = true
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[upstreams]]
name = "grpc"
protocol = "h2c"
members = [{{ address = "{up}" }}]
[[routes]]
name = "all"
action = {{ forward = {{ group = "grpc" }} }}
"#
    ))
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let answer = get(&client(), addr, "a", "/").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.body, "1.1 l7-proxy",
        "the request's entry is the client's"
    );
    assert_eq!(
        answer.headers["via"], "2 l7-proxy",
        "the response's is the member's"
    );
    proxy.shutdown().await;
}
