//! Request smuggling, malformed input and slow clients, over raw sockets.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

async fn proxy_with_upstream(extra_server: &str) -> (l7_proxy::ProxyHandle, TestUpstream) {
    let up = TestUpstream::start("victim").await;
    let proxy = forward_with(&up, extra_server, "", "").await;
    (proxy, up)
}

#[tokio::test]
async fn smuggling_attempts_get_400_and_never_reach_upstream() {
    let (proxy, up) = proxy_with_upstream("").await;
    let addr = proxy.listener_addr("web").unwrap();
    let attacks: &[&[u8]] = &[
        // CL.TE
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        // TE.CL, with the TE second
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        // Duplicate, differing Content-Length
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        // Duplicate, equal Content-Length (still ambiguous to some parsers)
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        // Obfuscated Transfer-Encoding values
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        // Two Host headers: which one routes?
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        // HTTP/1.1 without Host, or with one that is no host[:port] (RFC 9112 3.2)
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a:port\r\n\r\n",
        // Invalid bytes in header names and values
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Bad\x01Name: v\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Bad: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Bad: a\rb\r\n\r\n",
        // Bare LF line endings mixed with CRLF and a non-numeric length
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello",
    ];
    for (i, attack) in attacks.iter().enumerate() {
        let answer = raw_exchange(addr, attack, Duration::from_millis(500)).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "attack {i} ({:?}) answered {answer:?}",
            String::from_utf8_lossy(attack)
        );
    }
    assert_eq!(up.hits(), 0, "no attack reached the upstream");
    // A well-formed request on the same proxy still works.
    let ok = raw_exchange(
        addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        Duration::from_secs(2),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(up.hits(), 1);
    // HTTP/1.0 needs no Host; an absolute target names the host itself.
    for fine in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        b"GET http://a/ HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n",
    ] {
        let ok = raw_exchange(addr, fine, Duration::from_secs(2)).await;
        assert!(
            ok.contains(" 200 OK"),
            "{:?}: {ok}",
            String::from_utf8_lossy(fine)
        );
    }
    assert_eq!(up.hits(), 4);
    proxy.shutdown().await;
}

/// After a request refused for its framing, the connection is closed (as nginx does): where
/// that request's body ends, and so where the next request starts, is in doubt.
#[tokio::test]
async fn a_connection_ends_after_a_request_refused_for_its_framing() {
    let (proxy, up) = proxy_with_upstream("").await;
    let addr = proxy.listener_addr("web").unwrap();
    let answer = raw_exchange(
        addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello\
          GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert_eq!(up.hits(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn slow_client_with_half_a_header_is_cut_off() {
    let (proxy, up) = proxy_with_upstream("header_read_timeout_ms = 300").await;
    let addr = proxy.listener_addr("web").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    // The proxy must close the connection (maybe after a 408) long before this guard.
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Err(_) => panic!("slow client was not cut off"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    let got = String::from_utf8_lossy(&got);
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 408"), "{got}");
    assert_eq!(up.hits(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn idle_client_connection_is_closed() {
    let (proxy, _up) = proxy_with_upstream("idle_timeout_ms = 300").await;
    let addr = proxy.listener_addr("web").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Keep-alive connection, then silence: the proxy closes it.
    let end = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    assert!(matches!(end, Ok(Ok(0)) | Ok(Err(_))), "{end:?}");
    proxy.shutdown().await;
}

/// The keep-alive wait between requests is idle time (idle_timeout_ms), not head-reading
/// time: a connection quiet for longer than header_read_timeout_ms serves its next request.
/// A head must still end within header_read_timeout_ms of its first byte.
#[tokio::test]
async fn keep_alive_lasts_the_idle_timeout_and_heads_the_header_timeout() {
    let (proxy, up) = proxy_with_upstream(
        "header_read_timeout_ms = 300
idle_timeout_ms = 5000",
    )
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        // Three header timeouts of keep-alive silence.
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    assert_eq!(up.hits(), 2);
    // Half a head, then silence: cut off after the header timeout, not the idle one.
    s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    let started = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the half head was not cut off");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn garbage_input_never_kills_the_proxy() {
    let (proxy, _up) = proxy_with_upstream("header_read_timeout_ms = 500").await;
    let addr = proxy.listener_addr("web").unwrap();
    let inputs: Vec<Vec<u8>> = vec![
        vec![0u8; 2048],
        (0..=255u8).cycle().take(70_000).collect(),
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00garbage".to_vec(),
        b"GET /\xff\xfe HTTP/1.1\r\nHost: \xff\r\n\r\n".to_vec(),
        format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(100_000)).into_bytes(),
    ];
    for input in inputs {
        let _ = raw_exchange(addr, &input, Duration::from_millis(300)).await;
    }
    let c = client();
    assert_eq!(get(&c, addr, "a", "/").await.body, "victim");
    proxy.shutdown().await;
}

#[tokio::test]
async fn proxy_protocol_sets_the_client_address() {
    let up = TestUpstream::start("pp").await;
    let proxy = start_proxy(&format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
proxy_protocol = true
[[upstreams]]
name = "up"
members = {}
[[routes]]
name = "all"
action = {{ forward = {{ group = "up" }} }}
"#,
        members(&[&up])
    ))
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let answer = raw_exchange(
        addr,
        b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 80\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.last().headers["x-forwarded-for"], "203.0.113.9");
    let answer = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_millis(500),
    )
    .await;
    assert!(answer.is_empty(), "no PROXY header, no service: {answer}");
    assert_eq!(up.hits(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn idle_timeout_does_not_cut_a_request_waiting_for_its_upstream() {
    // The client sent its whole request and waits; the upstream takes longer than the client
    // idle timeout but answers within the group's request timeout. The idle timeout is for
    // silent connections, not for requests the proxy itself is still working on.
    let (proxy, up) = proxy_with_upstream("idle_timeout_ms = 300").await;
    let addr = proxy.listener_addr("web").unwrap();
    let answer = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Delay-Ms: 1000\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with("victim"), "{answer:?}");
    assert_eq!(up.hits(), 1);
    // Over HTTP/2 as well.
    let mut sender = h2c_sender(addr).await;
    let req = http::Request::get("http://a/")
        .header("x-delay-ms", "1000")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.expect("h2 answer");
    assert_eq!(resp.status(), 200);
    // A silent connection is still closed.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(end, Ok(Ok(0)) | Ok(Err(_))), "{end:?}");
    proxy.shutdown().await;
}

/// A head over the 64 KiB the framing guard parses is still timed from its first byte: sent
/// a byte at a time after that, it is cut off after header_read_timeout_ms, not kept open for
/// as long as each byte resets the idle timer.
#[tokio::test]
async fn an_oversized_head_sent_slowly_is_cut_off() {
    let (proxy, _up) =
        proxy_with_upstream("header_read_timeout_ms = 300\nidle_timeout_ms = 5000").await;
    let addr = proxy.listener_addr("web").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 70_000));
    s.write_all(&head).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let cut = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if s.write_all(b"a").await.is_err() {
                return;
            }
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await
            {
                return;
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "a slow oversized head was not cut off");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    proxy.shutdown().await;
}
