//! Routing, actions and header handling through the running proxy.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

#[tokio::test]
async fn routing_precedence_and_prefix_strip() {
    let (exact, wild, any, api) = (
        TestUpstream::start("exact").await,
        TestUpstream::start("wild").await,
        TestUpstream::start("any").await,
        TestUpstream::start("api").await,
    );
    let toml = format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

[[upstreams]]
name = "exact"
members = {}
[[upstreams]]
name = "wild"
members = {}
[[upstreams]]
name = "any"
members = {}
[[upstreams]]
name = "api"
members = {}

[[routes]]
name = "any"
action = {{ forward = {{ group = "any" }} }}

[[routes]]
name = "wild"
match = {{ host = "*.example.com" }}
action = {{ forward = {{ group = "wild" }} }}

[[routes]]
name = "exact"
match = {{ host = "a.example.com" }}
action = {{ forward = {{ group = "exact" }} }}

[[routes]]
name = "api"
match = {{ host = "a.example.com", path = {{ prefix = "/api" }} }}
action = {{ forward = {{ group = "api", strip_prefix = "/api" }} }}
"#,
        members(&[&exact]),
        members(&[&wild]),
        members(&[&any]),
        members(&[&api])
    );
    let proxy = start_proxy(&toml).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();

    let a = get(&c, addr, "a.example.com", "/page").await;
    assert_eq!((a.status.as_u16(), a.body.as_str()), (200, "exact"));
    let a = get(&c, addr, "b.example.com:8080", "/page").await;
    assert_eq!(a.body, "wild");
    let a = get(&c, addr, "example.com", "/page").await;
    assert_eq!(a.body, "any", "a wildcard does not match the apex");
    let a = get(&c, addr, "A.Example.COM", "/api/users?id=7").await;
    assert_eq!(a.body, "api");
    assert_eq!(api.last().path_and_query, "/users?id=7");
    let a = get(&c, addr, "a.example.com", "/apis").await;
    assert_eq!(a.body, "exact", "prefix /api does not match /apis");
    proxy.shutdown().await;
}

#[tokio::test]
async fn no_route_is_404_and_redirect_and_fixed_actions_answer() {
    let proxy = start_proxy(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

[[routes]]
name = "old"
match = { host = "old.example.com" }
action = { redirect = { status = 301, location = "https://new.example.com/" } }

[[routes]]
name = "teapot"
match = { host = "tea.example.com", path = { exact = "/pot" }, methods = ["GET"] }
action = { fixed = { status = 418, body = "short and stout", headers = { x-kind = "teapot" } } }
"#,
    )
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    let a = get(&c, addr, "nothing.example.com", "/x").await;
    assert_eq!(a.status, 404);
    assert!(
        a.body.contains("no route matches nothing.example.com/x"),
        "{}",
        a.body
    );
    let a = get(&c, addr, "old.example.com", "/").await;
    assert_eq!(a.status, 301);
    assert_eq!(a.headers["location"], "https://new.example.com/");
    let a = get(&c, addr, "tea.example.com", "/pot").await;
    assert_eq!(a.status, 418);
    assert_eq!(a.body, "short and stout");
    assert_eq!(a.headers["x-kind"], "teapot");
    assert_eq!(get(&c, addr, "tea.example.com", "/pot/x").await.status, 404);
    proxy.shutdown().await;
}

/// nginx's `return 301 https://$host$request_uri;`: a redirect's location takes the
/// request's scheme, host, path and query.
#[tokio::test]
async fn redirect_location_takes_the_request_s_parts() {
    let proxy = start_proxy(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

[[routes]]
name = "to-https"
match = { host = "*.example.com" }
action = { redirect = { status = 308, location = "https://${host}${request_uri}" } }

[[routes]]
name = "moved"
match = { host = "old.test", path = { prefix = "/docs" } }
action = { redirect = { location = "${scheme}://new.test/v2${path}?from=old&${query}#$${x}" } }
"#,
    )
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    let a = get(&c, addr, "Shop.Example.com:8080", "/a/./b?x=1&y=%20").await;
    assert_eq!(a.status, 308);
    assert_eq!(
        a.headers["location"],
        "https://shop.example.com/a/b?x=1&y=%20"
    );
    let a = get(&c, addr, "shop.example.com", "/").await;
    assert_eq!(a.headers["location"], "https://shop.example.com/");
    let a = get(&c, addr, "old.test", "/docs/intro?lang=en").await;
    assert_eq!(a.status, 302);
    assert_eq!(
        a.headers["location"],
        "http://new.test/v2/docs/intro?from=old&lang=en#${x}"
    );
    proxy.shutdown().await;

    // An unknown variable is a config error naming the field and line.
    let bad =
        "[[routes]]\nname = \"r\"\naction = { redirect = { location = \"https://${hots}/\" } }\n";
    match l7_proxy::Config::from_toml_str(bad) {
        Err(l7_proxy::ConfigError::Invalid {
            field,
            line,
            message,
        }) => {
            assert_eq!(
                (field.as_str(), line),
                ("routes[0].action.redirect.location", 3)
            );
            assert!(message.contains("unknown variable ${hots}"), "{message}");
            assert!(message.contains("${request_uri}"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn forwarding_headers_set_and_hop_by_hop_removed() {
    let up = TestUpstream::start("up").await;
    let proxy = forward_all(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    let a = get_with(
        &c,
        addr,
        "svc.example.com",
        "/",
        &[
            ("x-forwarded-for", "198.51.100.1"),
            ("connection", "x-secret"),
            ("x-secret", "do-not-forward"),
            ("x-request-id", "client-id-1"),
        ],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["x-request-id"], "client-id-1");
    let seen = up.last().headers;
    assert_eq!(seen["x-forwarded-for"], "198.51.100.1, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(
        seen["forwarded"],
        "for=127.0.0.1;proto=http;host=\"svc.example.com\""
    );
    assert_eq!(seen["x-request-id"], "client-id-1");
    assert_eq!(seen["host"], "svc.example.com");
    assert!(!seen.contains_key("x-secret"));

    // `host=` is the Host as received, port included (RFC 7239 5.3); routing ignores the
    // port.
    let a = get(&c, addr, "svc.example.com:8443", "/").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        up.last().headers["forwarded"],
        "for=127.0.0.1;proto=http;host=\"svc.example.com:8443\""
    );

    let a = get(&c, addr, "svc.example.com", "/hop").await;
    assert_eq!(a.upstream(), "up");
    for name in ["x-private-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            !a.headers.contains_key(name),
            "{name} leaked: {:?}",
            a.headers
        );
    }

    let a = get(&c, addr, "svc.example.com", "/").await;
    let generated = a.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 36, "uuid v4: {generated}");
    assert_eq!(up.last().headers["x-request-id"], generated.as_str());
    proxy.shutdown().await;
}

/// An h2c upgrade would give the client an HTTP/2 connection straight to the upstream, past
/// the proxy's routes ("h2c smuggling"): it goes on as a plain request instead.
#[tokio::test]
async fn h2c_upgrade_is_not_tunnelled() {
    let up = TestUpstream::start("up").await;
    let proxy = forward_all(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    for upgrade in ["h2c", "websocket, H2C"] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!(
                "GET /x HTTP/1.1\r\nHost: up.example.com\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                 Upgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed before a response");
            head.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{upgrade}: {head}");
        let seen = up.last().headers;
        assert!(!seen.contains_key("upgrade"), "{upgrade}: {seen:?}");
        assert!(!seen.contains_key("http2-settings"), "{upgrade}: {seen:?}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    let up = TestUpstream::start("ws").await;
    let proxy = forward_all(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before 101");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s.write_all(b"hello through the tunnel").await.unwrap();
    let mut echoed = vec![0u8; 24];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"hello through the tunnel");
    assert_eq!(up.last().headers["upgrade"], "websocket");

    // A shutdown drains the tunnel as it drains connections: it keeps working, and the
    // shutdown ends once it closes (not after the whole drain timeout).
    let shutdown = proxy.shutdown();
    tokio::pin!(shutdown);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut shutdown)
            .await
            .is_err(),
        "the shutdown did not wait for the open tunnel"
    );
    s.write_all(b"still open").await.unwrap();
    let mut echoed = vec![0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"still open");
    drop(s);
    tokio::time::timeout(Duration::from_secs(3), shutdown)
        .await
        .expect("the shutdown ends once the tunnel closes");
}

#[tokio::test]
async fn access_log_has_one_structured_line_per_request() {
    capture_logs();
    let up = TestUpstream::start("logged").await;
    let proxy = start_proxy(&format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[upstreams]]
name = "up"
members = {}
[[routes]]
name = "logged-route"
action = {{ forward = {{ group = "up" }} }}
"#,
        members(&[&up])
    ))
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    let a = get_with(
        &c,
        addr,
        "log.example.com",
        "/some/path?q=1",
        &[("x-request-id", "log-test-1")],
    )
    .await;
    assert_eq!(a.body, "logged");
    let mut entries = Vec::new();
    for _ in 0..100 {
        entries = access_log_for("log-test-1");
        if !entries.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(entries.len(), 1, "{entries:?}");
    let e = &entries[0];
    assert_eq!(e["method"], "GET");
    assert_eq!(e["host"], "log.example.com");
    assert_eq!(e["path"], "/some/path");
    assert_eq!(e["status"], 200);
    assert_eq!(e["bytes"], 6);
    assert_eq!(e["complete"], true);
    assert_eq!(e["route"], "logged-route");
    assert_eq!(e["upstream"], up.addr.to_string());
    assert_eq!(
        e["client"].as_str().unwrap().split(':').next(),
        Some("127.0.0.1")
    );
    assert!(e["duration_ms"].as_f64().unwrap() >= 0.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn routing_and_upstream_see_the_same_path_and_host() {
    let (api, b) = (
        TestUpstream::start("api").await,
        TestUpstream::start("b").await,
    );
    let proxy = start_proxy(&format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[upstreams]]
name = "api"
members = {}
[[upstreams]]
name = "b"
members = {}
[[routes]]
name = "admin"
match = {{ path = {{ prefix = "/admin" }} }}
action = {{ fixed = {{ status = 403, body = "no" }} }}
[[routes]]
name = "api"
match = {{ path = {{ prefix = "/api" }} }}
action = {{ forward = {{ group = "api" }} }}
[[routes]]
name = "b"
match = {{ host = "b.example.com" }}
action = {{ forward = {{ group = "b" }} }}
"#,
        members(&[&api]),
        members(&[&b])
    ))
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let quiet = Duration::from_millis(300);
    let answer = raw_exchange(
        addr,
        b"GET /api/../admin/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        quiet,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let answer = raw_exchange(
        addr,
        b"GET /api/./v1/../users HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        quiet,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(api.last().path_and_query, "/api/users");
    let answer = raw_exchange(
        addr,
        b"GET /api/%2e%2e/admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        quiet,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Absolute-form target: its authority is both the routing host and the upstream Host.
    let answer = raw_exchange(
        addr,
        b"GET http://b.example.com/x HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\n\r\n",
        quiet,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(b.last().headers["host"], "b.example.com");
    assert_eq!(api.hits(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn h2_prior_knowledge_on_a_plain_listener() {
    let up = TestUpstream::start("h2c").await;
    let proxy = forward_host(&up, "h2.example.com").await;
    let addr = proxy.listener_addr("web").unwrap();
    let mut sender = h2c_sender(addr).await;
    let req = http::Request::get("http://h2.example.com/over/h2?x=1")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-upstream"], "h2c");
    let seen = up.last();
    assert_eq!(seen.path_and_query, "/over/h2?x=1");
    assert_eq!(seen.headers["host"], "h2.example.com");
    assert!(
        !seen.headers.contains_key("te"),
        "hop-by-hop TE is not forwarded"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn request_bodies_arrive_intact_over_h1_and_h2() {
    let up = TestUpstream::start("echo").await;
    let proxy = forward_all(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let big: String = (0..50_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();

    let req = http::Request::post(format!("http://{addr}/echo"))
        .header("host", "h")
        .body(http_body_util::Full::new(bytes::Bytes::from(big.clone())))
        .unwrap();
    assert_eq!(send(&client(), req).await.body, big);

    let chunked = raw_exchange(
        addr,
        b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 200"), "{chunked}");
    assert!(chunked.ends_with("hello world"), "{chunked}");
    // GET with a chunked body (an Elasticsearch `_search`): hyper would drop it unless told.
    let get = raw_exchange(
        addr,
        b"GET /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nc\r\n{\"query\":{}}\r\n0\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(get.starts_with("HTTP/1.1 200"), "{get}");
    assert!(get.ends_with("{\"query\":{}}"), "{get}");

    let mut sender = h2c_sender(addr).await;
    let req = http::Request::post("http://h/echo/h2")
        .body(http_body_util::Full::new(bytes::Bytes::from(big.clone())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, big.as_bytes());
    proxy.shutdown().await;
}

#[tokio::test]
async fn every_forwarded_for_line_is_kept_in_order() {
    // A proxy in front (HAProxy's `option forwardfor`, for one) adds its own header line
    // after the client's; dropping any line but the first loses the address it vouches for
    // and leaves the client's claim in its place.
    let up = TestUpstream::start("up").await;
    let proxy = forward_all(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let answer = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: a\r\n\
X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 203.0.113.7, 198.51.100.2\r\n\
Forwarded: for=6.6.6.6\r\nForwarded: for=203.0.113.7\r\n\
Connection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = up.last().headers;
    let xff: Vec<_> = seen.get_all("x-forwarded-for").iter().collect();
    assert_eq!(
        xff,
        ["6.6.6.6, 203.0.113.7, 198.51.100.2, 127.0.0.1"],
        "{seen:?}"
    );
    let fwd: Vec<_> = seen.get_all("forwarded").iter().collect();
    assert_eq!(
        fwd,
        ["for=6.6.6.6, for=203.0.113.7, for=127.0.0.1;proto=http;host=\"a\""],
        "{seen:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn h2_cookie_fields_reach_an_h1_upstream_as_one_header() {
    // Browsers send each cookie as its own `cookie` field over HTTP/2 (RFC 9113 8.2.3);
    // an HTTP/1.1 upstream must get them joined into one `Cookie` header with "; ".
    let up = TestUpstream::start("up").await;
    let proxy = forward_all(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let mut sender = h2c_sender(addr).await;
    let req = http::Request::get("http://h2.example.com/")
        .header("cookie", "sid=abc")
        .header("cookie", "theme=dark")
        .header("cookie", "lang=en")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = up.last().headers;
    let cookies: Vec<_> = seen.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["sid=abc; theme=dark; lang=en"], "{seen:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn strip_prefix_only_strips_whole_path_segments() {
    let up = TestUpstream::start("api").await;
    let proxy = start_proxy(&format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[upstreams]]
name = "api"
members = {}
[[routes]]
name = "api-host"
match = {{ host = "api.example.com" }}
action = {{ forward = {{ group = "api", strip_prefix = "/api" }} }}
"#,
        members(&[&up])
    ))
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for (path, forwarded) in [
        ("/api/users?x=1", "/users?x=1"),
        ("/api", "/"),
        ("/api?x=1", "/?x=1"),
        ("/apiary/bees", "/apiary/bees"),
        ("/apix?y=2", "/apix?y=2"),
        ("/other", "/other"),
    ] {
        let a = get(&c, addr, "api.example.com", path).await;
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(up.last().path_and_query, forwarded, "{path}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn percent_encoded_letters_cannot_dodge_a_route() {
    // `/%61dmin` is `/admin` to the upstream (RFC 3986 6.2.2.2: an encoded unreserved
    // character is the character), so it must not slip past the route that guards /admin.
    let up = TestUpstream::start("app").await;
    let proxy = admin_guarded(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for path in ["/%61dmin/users", "/%41%44%4D%49%4E", "/ad%6Din"] {
        let a = get(&c, addr, "a", path).await;
        // `/ADMIN` is another path (paths are case-sensitive); only the exact spelling is
        // guarded.
        if path == "/%41%44%4D%49%4E" {
            assert_eq!(a.status, 200, "{path}");
            assert_eq!(up.last().path_and_query, "/ADMIN");
        } else {
            assert_eq!((a.status.as_u16(), a.body.as_str()), (403, "no"), "{path}");
        }
    }
    // What is forwarded is the decoded form the route saw; reserved characters stay encoded.
    let a = get(&c, addr, "a", "/files/%7Eann/a%2Fb%20c?q=%61").await;
    assert_eq!(a.status, 200);
    assert_eq!(up.last().path_and_query, "/files/~ann/a%2Fb%20c?q=%61");
    assert_eq!(up.hits(), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn repeated_slashes_cannot_dodge_a_route() {
    // Most upstreams read `//admin` as `/admin` (nginx merges slashes by default), so the
    // route that guards /admin must see it that way too.
    let up = TestUpstream::start("app").await;
    let proxy = admin_guarded(&up).await;
    let addr = proxy.listener_addr("web").unwrap();
    let quiet = Duration::from_millis(300);
    for target in ["//admin/x", "///admin", "/.//admin"] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let answer = raw_exchange(addr, request.as_bytes(), quiet).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{target}: {answer}");
    }
    let c = client();
    let a = get(&c, addr, "a", "/api//v1///users/?q=a//b").await;
    assert_eq!(a.status, 200);
    assert_eq!(up.last().path_and_query, "/api/v1/users/?q=a//b");
    assert_eq!(up.hits(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn connection_cannot_strip_the_host_or_the_request_id() {
    // `Connection` may name the client's own extension headers, not the Host the request was
    // routed by (the upstream would see the member's address and serve its default site)
    // nor the request id the proxy answers with.
    let up = TestUpstream::start("up").await;
    let proxy = forward_host(&up, "shop.example.com").await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    let a = get_with(
        &c,
        addr,
        "shop.example.com",
        "/",
        &[
            ("connection", "host, x-request-id, x-ext"),
            ("x-request-id", "abc-1"),
            ("x-ext", "1"),
        ],
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = up.last().headers;
    assert_eq!(seen["host"], "shop.example.com", "{seen:?}");
    assert!(!seen.contains_key("x-ext"), "{seen:?}");
    let answered = a.headers["x-request-id"].to_str().unwrap();
    assert_eq!(
        seen.get("x-request-id").map(|v| v.to_str().unwrap()),
        Some(answered),
        "the upstream and the client see the same request id"
    );
    proxy.shutdown().await;
}

/// A proxy whose `/admin` prefix answers a fixed 403 and which forwards the rest to `up`.
async fn admin_guarded(up: &TestUpstream) -> l7_proxy::ProxyHandle {
    start_proxy(&format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[upstreams]]
name = "app"
members = {}
[[routes]]
name = "admin"
match = {{ path = {{ prefix = "/admin" }} }}
action = {{ fixed = {{ status = 403, body = "no" }} }}
[[routes]]
name = "app"
action = {{ forward = {{ group = "app" }} }}
"#,
        members(&[up])
    ))
    .await
}
