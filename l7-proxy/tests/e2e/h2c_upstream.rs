//! `protocol = "h2c"` groups: the proxy speaks HTTP/2 to the members, as gRPC services need,
//! with trailers passed through and health checks over HTTP/2 too.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::support::*;

/// What the h2-only upstream saw: version, `te`, path and `:authority` (`Host` if any) of
/// each request.
type SeenH2 = Arc<Mutex<Vec<(Version, Option<String>, String, String)>>>;

/// An HTTP/2-only (prior knowledge) server, as a gRPC service is: it echoes the request body
/// and ends with `grpc-status: 0` in the trailers; `/health` answers 200.
async fn h2_only_upstream() -> (std::net::SocketAddr, SeenH2) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: SeenH2 = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let record = record.clone();
                    async move {
                        let te = req
                            .headers()
                            .get("te")
                            .map(|v| v.to_str().unwrap().to_string());
                        let path = req.uri().path().to_string();
                        let mut authority = req
                            .uri()
                            .authority()
                            .map_or(String::new(), |a| a.to_string());
                        if let Some(host) = req.headers().get("host") {
                            authority += &format!(" host={}", host.to_str().unwrap());
                        }
                        record
                            .lock()
                            .unwrap()
                            .push((req.version(), te, path, authority));
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        trailers.insert("grpc-message", "echoed".parse().unwrap());
                        let frames = vec![
                            Ok::<_, Infallible>(Frame::data(body)),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let body = StreamBody::new(futures_util::stream::iter(frames));
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A proxy with one plain listener, `web`, forwarding everything to the h2c group `grpc`
/// whose one member is `up`; `extra` adds lines to the group.
async fn h2c_proxy(up: std::net::SocketAddr, extra: &str) -> l7_proxy::ProxyHandle {
    start_proxy(&format!(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\
         [[upstreams]]\nname = \"grpc\"\nprotocol = \"h2c\"\nmembers = [{{ address = \"{up}\" }}]\n{extra}\n\
         [[routes]]\nname = \"all\"\naction = {{ forward = {{ group = \"grpc\" }} }}\n"
    ))
    .await
}

#[tokio::test]
async fn h2c_group_carries_grpc_style_calls_and_trailers() {
    let (up, seen) = h2_only_upstream().await;
    let (up2, seen2) = h2_only_upstream().await;
    let proxy = start_proxy(&format!(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\
         [[upstreams]]\nname = \"grpc\"\nprotocol = \"h2c\"\n\
         members = [{{ address = \"{up}\" }}, {{ address = \"{up2}\" }}]\n\
         health_check = {{ path = \"/health\", interval_ms = 20, fall = 1, rise = 1 }}\n\
         [[routes]]\nname = \"all\"\naction = {{ forward = {{ group = \"grpc\" }} }}\n"
    ))
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    // Health checks run several times meanwhile: over HTTP/1.1 they would fail against an
    // HTTP/2-only member (fall = 1) and the calls below would get 503.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    for i in 0..4 {
        let message = format!("\0\0\0\0\x05call{i}");
        let req = Request::post(format!("http://grpc.example.com/echo.Echo/Say{i}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from(message.clone())))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "call {i}");
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["grpc-message"], "echoed");
        assert_eq!(collected.to_bytes(), message.as_bytes());
    }
    for (seen, member) in [(&seen, up), (&seen2, up2)] {
        let seen = seen.lock().unwrap().clone();
        let calls: Vec<_> = seen.iter().filter(|s| s.2 != "/health").collect();
        // Round robin over the two members, each over its own connection.
        assert_eq!(calls.len(), 2, "{member}: {seen:?}");
        for (version, te, _, authority) in &calls {
            assert_eq!(*version, Version::HTTP_2);
            assert_eq!(te.as_deref(), Some("trailers"));
            // The client's host as `:authority` (RFC 9113 8.3.1), and no differing Host.
            assert_eq!(authority, "grpc.example.com", "{member}");
        }
        let checks = seen.iter().filter(|s| s.2 == "/health").count();
        assert!(checks >= 2, "health checks over HTTP/2: {seen:?}");
        assert!(seen.iter().all(|s| s.0 == Version::HTTP_2));
    }
    proxy.shutdown().await;
}

#[test]
fn unknown_protocol_is_a_config_error() {
    let text = "[[upstreams]]\nname = \"g\"\nprotocol = \"h3\"\nmembers = [{ address = \"127.0.0.1:1\" }]\n";
    let err = l7_proxy::Config::from_toml_str(text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown variant `h3`, expected one of `http1`, `h2c`, `h2`"),
        "{err}"
    );
    assert!(err.contains("line 3"), "{err}");
}

#[tokio::test]
async fn upgrades_to_an_h2c_group_are_refused_with_502() {
    let (up, _seen) = h2_only_upstream().await;
    let proxy = h2c_proxy(up, "").await;
    let addr = proxy.listener_addr("web").unwrap();
    let answer = raw_exchange(
        addr,
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        Duration::from_millis(300),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(
        answer.contains("upgrades need an HTTP/1.1 upstream; group grpc speaks HTTP/2"),
        "{answer}"
    );
    proxy.shutdown().await;
}
