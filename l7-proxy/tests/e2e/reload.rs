//! Hot reload (admin endpoint and API), invalid reloads, listener changes, graceful shutdown.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

fn config_to(target: &TestUpstream, other: &TestUpstream, extra_listener: &str) -> String {
    format!(
        r#"
[admin]
address = "127.0.0.1:0"

[[listeners]]
name = "web"
address = "127.0.0.1:0"
{extra_listener}

[[upstreams]]
name = "target"
members = {}
[[upstreams]]
name = "other"
members = {}

[[routes]]
name = "all"
action = {{ forward = {{ group = "target" }} }}
"#,
        members(&[target]),
        members(&[other])
    )
}

async fn admin_reload(c: &PlainClient, admin: std::net::SocketAddr) -> Answer {
    let req = Request::post(format!("http://{admin}/-/reload"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(c, req).await
}

#[tokio::test]
async fn reload_under_load_has_zero_failed_requests() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let file = ConfigFile::new(&config_to(&a, &b, ""));
    let proxy = l7_proxy::Proxy::start_from_file(&file.path).await.unwrap();
    let addr = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let req = Request::get(format!("http://{addr}/"))
                    .header("host", "h")
                    .header("x-delay-ms", "5")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                match c.request(req).await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let c = client();
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let (target, other) = if i % 2 == 0 { (&b, &a) } else { (&a, &b) };
        file.write(&config_to(target, other, ""));
        let answer = admin_reload(&c, admin).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 20);
    assert!(a.hits() > 0 && b.hits() > 0, "both generations served");
    assert_eq!(proxy.generation(), 7);
    assert_eq!(
        proxy.listener_addr("web"),
        Some(addr),
        "listener kept across reloads"
    );
    // Last config (i = 5) targets `a`.
    assert_eq!(get(&c, addr, "h", "/").await.body, "a");
    let metrics = get(&c, admin, "admin", "/metrics").await.body;
    assert_eq!(
        metric(&metrics, "l7_config_reloads_total{result=\"ok\"}"),
        Some(6.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn invalid_reload_keeps_the_old_config() {
    let (a, b) = (
        TestUpstream::start("old").await,
        TestUpstream::start("new").await,
    );
    let good = config_to(&a, &b, "");
    let file = ConfigFile::new(&good);
    let proxy = l7_proxy::Proxy::start_from_file(&file.path).await.unwrap();
    let addr = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let c = client();

    // Semantic error: the route names a group that does not exist.
    file.write(&good.replace("group = \"target\"", "group = \"missing\""));
    let answer = admin_reload(&c, admin).await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.body.contains("routes[0].action.forward.group"),
        "{}",
        answer.body
    );
    assert!(answer.body.contains("line 19"), "{}", answer.body);
    assert_eq!(get(&c, addr, "h", "/").await.body, "old");

    // Syntax error.
    file.write("[[listeners]\nname = ");
    let answer = admin_reload(&c, admin).await;
    assert_eq!(answer.status, 400);
    assert!(answer.body.contains("line 1"), "{}", answer.body);
    assert_eq!(get(&c, addr, "h", "/").await.body, "old");

    // A listener address that cannot be bound.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra = format!(
        "[[listeners]]\nname = \"busy\"\naddress = \"{}\"\n",
        busy.local_addr().unwrap()
    );
    file.write(&config_to(&b, &a, &extra));
    assert!(admin_reload(&c, admin).await.body.contains("binding"));
    assert_eq!(get(&c, addr, "h", "/").await.body, "old");
    assert_eq!(proxy.generation(), 1);
    let metrics = get(&c, admin, "admin", "/metrics").await.body;
    assert_eq!(
        metric(&metrics, "l7_config_reloads_total{result=\"error\"}"),
        Some(3.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn reload_adds_and_removes_listeners() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let file = ConfigFile::new(&config_to(&a, &b, ""));
    let proxy = l7_proxy::Proxy::start_from_file(&file.path).await.unwrap();
    let extra = "[[listeners]]\nname = \"extra\"\naddress = \"127.0.0.2:0\"\n";
    file.write(&config_to(&a, &b, extra));
    proxy.reload_from_file().await.unwrap();
    let extra_addr = proxy.listener_addr("extra").expect("new listener is bound");
    let c = client();
    assert_eq!(get(&c, extra_addr, "h", "/").await.body, "a");

    file.write(&config_to(&a, &b, ""));
    proxy.reload_from_file().await.unwrap();
    assert_eq!(proxy.listener_addr("extra"), None);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(extra_addr).await.is_err());
    proxy.shutdown().await;
}

#[tokio::test]
async fn shutdown_drains_requests_in_flight() {
    let (a, b) = (
        TestUpstream::start("slow").await,
        TestUpstream::start("b").await,
    );
    let proxy = start_proxy(&config_to(&a, &b, "")).await;
    let addr = proxy.listener_addr("web").unwrap();
    let in_flight =
        tokio::spawn(
            async move { get_with(&client(), addr, "h", "/", &[("x-delay-ms", "300")]).await },
        );
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.shutdown().await;
    let answer = in_flight.await.unwrap();
    assert_eq!(
        (answer.status.as_u16(), answer.body.as_str()),
        (200, "slow")
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}
