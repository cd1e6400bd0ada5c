//! `Expect` (RFC 9110 10.1.1) through the running proxy: `100-continue` gets its interim
//! response before the client sends the body, and the body reaches the upstream; any other
//! expectation is answered `417` and never reaches the upstream.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// Reads from `stream` until `buf` holds a whole response head (or `deadline` passes).
async fn read_head(stream: &mut tokio::net::TcpStream, deadline: Duration) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let _ = tokio::time::timeout(deadline, async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// One HTTP/2 request with prior knowledge; the status and the body.
async fn h2_send(addr: std::net::SocketAddr, req: Request<Full<Bytes>>) -> (StatusCode, String) {
    let mut sender = h2c_sender(addr).await;
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn expect_100_continue_gets_its_interim_answer_and_the_body_flows() {
    let up = TestUpstream::start("up").await;
    let proxy = forward_all(&up).await;
    let addr = proxy.listener_addr("web").unwrap();

    // A client that waits for `100 Continue` before it sends the body, as curl does.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\
Expect: 100-Continue\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let interim = read_head(&mut stream, Duration::from_secs(5)).await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "{interim:?}"
    );
    stream.write_all(b"hello world").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("answer in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&rest);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nhello world"), "{answer}");
    // The expectation goes upstream with the request, as received (it is not hop-by-hop).
    assert_eq!(up.last().headers["expect"], "100-Continue");

    // A client that sends the body at once (hyper's) gets it through as well.
    let req = Request::post(format!("http://{addr}/echo/now"))
        .header("host", "h")
        .header("expect", "100-continue")
        .body(Full::new(Bytes::from_static(b"right away")))
        .unwrap();
    let answer = send(&client(), req).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "right away");

    // And over HTTP/2.
    let req = Request::post("http://h/echo/h2")
        .header("expect", "100-continue")
        .body(Full::new(Bytes::from_static(b"over h2")))
        .unwrap();
    assert_eq!(
        h2_send(addr, req).await,
        (StatusCode::OK, "over h2".to_string())
    );
    assert_eq!(up.hits(), 3);
    proxy.shutdown().await;
}

#[tokio::test]
async fn other_expectations_get_417_and_never_reach_the_upstream() {
    let up = TestUpstream::start("up").await;
    let proxy = forward_all(&up).await;
    let addr = proxy.listener_addr("web").unwrap();

    let req = Request::post(format!("http://{addr}/echo"))
        .header("host", "h")
        .header("expect", "foo")
        .body(Full::new(Bytes::from_static(b"body")))
        .unwrap();
    let answer = send(&client(), req).await;
    assert_eq!(answer.status, StatusCode::EXPECTATION_FAILED);
    assert!(answer.body.contains("100-continue"), "{}", answer.body);

    // `100-continue` beside an unknown one, or on another line, is still unmet; so is a
    // waiting client's: it gets the 417 instead of `100 Continue`.
    for head in [
        &b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: 100-continue, foo\r\n\r\n"[..],
        b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: 100-continue\r\nExpect: x=1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nExpect: foo\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: h\r\nExpect: foo\r\n\r\n",
    ] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(head).await.unwrap();
        let answer = read_head(&mut stream, Duration::from_secs(5)).await;
        assert!(
            answer.starts_with("HTTP/1.")
                && answer
                    .get(8..)
                    .is_some_and(|rest| rest.starts_with(" 417 Expectation Failed\r\n")),
            "{}: {answer:?}",
            String::from_utf8_lossy(head)
        );
    }

    let req = Request::post("http://h/echo")
        .header("expect", "foo")
        .body(Full::new(Bytes::from_static(b"body")))
        .unwrap();
    assert_eq!(h2_send(addr, req).await.0, StatusCode::EXPECTATION_FAILED);

    assert_eq!(up.hits(), 0, "no unmet expectation reached the upstream");
    proxy.shutdown().await;
}
