//! Load balancing algorithms, health and retries through the running proxy.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::*;

fn one_group(algorithm: &str, members: &str, extra: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
[[upstreams]]
name = "g"
algorithm = "{algorithm}"
members = {members}
{extra}
[[routes]]
name = "all"
action = {{ forward = {{ group = "g" }} }}
"#
    )
}

#[tokio::test]
async fn round_robin_is_exact() {
    let ups = [
        TestUpstream::start("u0").await,
        TestUpstream::start("u1").await,
        TestUpstream::start("u2").await,
    ];
    let proxy = start_proxy(&one_group(
        "round_robin",
        &members(&[&ups[0], &ups[1], &ups[2]]),
        "",
    ))
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    let mut names = Vec::new();
    for _ in 0..30 {
        names.push(get(&c, addr, "h", "/").await.body);
    }
    let counts = tally(names);
    assert_eq!(counts.len(), 3);
    assert!(counts.values().all(|&n| n == 10), "{counts:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn weighted_follows_weights() {
    let (a, b) = (
        TestUpstream::start("heavy").await,
        TestUpstream::start("light").await,
    );
    let members = format!(
        "[{{ address = \"{}\", weight = 3 }}, {{ address = \"{}\", weight = 1 }}]",
        a.addr, b.addr
    );
    let proxy = start_proxy(&one_group("weighted", &members, "")).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    let mut names = Vec::new();
    for _ in 0..80 {
        names.push(get(&c, addr, "h", "/").await.body);
    }
    let counts = tally(names);
    let heavy = counts["heavy"] as f64;
    assert!((55.0..=65.0).contains(&heavy), "{counts:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn least_request_spreads_load() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let proxy = start_proxy(&one_group("least_request", &members(&[&a, &b]), "")).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for _ in 0..60 {
        assert_eq!(get(&c, addr, "h", "/").await.status, 200);
    }
    assert!(
        a.hits() >= 10 && b.hits() >= 10,
        "a={} b={}",
        a.hits(),
        b.hits()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn consistent_hash_is_stable_and_moves_about_one_nth() {
    let ups = [
        TestUpstream::start("c0").await,
        TestUpstream::start("c1").await,
        TestUpstream::start("c2").await,
        TestUpstream::start("c3").await,
    ];
    let hash = "hash_on = { header = \"x-user\" }";
    let file = ConfigFile::new(&one_group(
        "consistent_hash",
        &members(&[&ups[0], &ups[1], &ups[2]]),
        hash,
    ));
    let proxy = l7_proxy::Proxy::start_from_file(&file.path).await.unwrap();
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    let keys: Vec<String> = (0..120).map(|i| format!("user-{i}")).collect();
    let mut before = Vec::new();
    for k in &keys {
        before.push(get_with(&c, addr, "h", "/", &[("x-user", k)]).await.body);
    }
    for (k, owner) in keys.iter().zip(&before).take(30) {
        assert_eq!(
            &get_with(&c, addr, "h", "/", &[("x-user", k)]).await.body,
            owner
        );
    }
    assert_eq!(tally(before.clone()).len(), 3);

    file.write(&one_group(
        "consistent_hash",
        &members(&[&ups[0], &ups[1], &ups[2], &ups[3]]),
        hash,
    ));
    proxy.reload_from_file().await.unwrap();
    let mut moved = 0;
    for (k, owner) in keys.iter().zip(&before) {
        let now = get_with(&c, addr, "h", "/", &[("x-user", k)]).await.body;
        if &now != owner {
            assert_eq!(now, "c3", "keys only move to the new member");
            moved += 1;
        }
    }
    assert!((12..=50).contains(&moved), "moved {moved} of 120");
    proxy.shutdown().await;
}

#[tokio::test]
async fn killed_upstream_is_ejected_and_gets_never_fail() {
    let ups = [
        TestUpstream::start("k0").await,
        TestUpstream::start("k1").await,
        TestUpstream::start("k2").await,
    ];
    let toml = one_group(
        "round_robin",
        &members(&[&ups[0], &ups[1], &ups[2]]),
        "passive_health = { consecutive_failures = 1, ejection_ms = 60000 }",
    );
    let proxy = start_proxy(&toml).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for _ in 0..9 {
        assert_eq!(get(&c, addr, "h", "/").await.status, 200);
    }
    ups[1].kill();
    let hits_at_kill = ups[1].hits();
    let mut names = Vec::new();
    for _ in 0..40 {
        let a = get(&c, addr, "h", "/").await;
        assert_eq!(a.status, 200, "{}", a.body);
        names.push(a.body);
    }
    assert_eq!(ups[1].hits(), hits_at_kill);
    let counts = tally(names);
    assert!(!counts.contains_key("k1"));
    let admin = proxy.admin_addr().unwrap();
    let metrics = get(&c, admin, "admin", "/metrics").await.body;
    let label = format!(
        "l7_upstream_member_healthy{{group=\"g\",member=\"{}\"}}",
        ups[1].addr
    );
    assert_eq!(metric(&metrics, &label), Some(0.0), "{metrics}");

    // A reload keeps the ejection: the dead member is not tried again.
    let config = l7_proxy::Config::from_toml_str(&toml).unwrap();
    proxy.reload(config).await.unwrap();
    let metrics = get(&c, admin, "admin", "/metrics").await.body;
    assert_eq!(metric(&metrics, &label), Some(0.0), "{metrics}");
    let retries_before = metric(&metrics, "l7_upstream_retries_total{route=\"all\"}");
    for _ in 0..10 {
        assert_eq!(get(&c, addr, "h", "/").await.status, 200);
    }
    let metrics = get(&c, admin, "admin", "/metrics").await.body;
    assert_eq!(
        metric(&metrics, "l7_upstream_retries_total{route=\"all\"}"),
        retries_before
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn group_without_healthy_member_is_503_until_health_checks_bring_it_back() {
    let up = TestUpstream::start("down").await;
    let proxy = start_proxy(&one_group(
        "round_robin",
        &members(&[&up]),
        "health_check = { path = \"/health\", interval_ms = 50, timeout_ms = 200, rise = 2, fall = 1 }",
    ))
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    assert_eq!(get(&c, addr, "h", "/").await.status, 200);
    up.kill();
    let mut last = None;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let a = get(&c, addr, "h", "/").await;
        if a.status == 503 {
            last = Some(a);
            break;
        }
    }
    let a = last.expect("group goes 503 once its only member fails health checks");
    assert!(a.body.contains("no healthy upstream"), "{}", a.body);

    // Back on the same port: health checks bring it back.
    let revived = TestUpstream::start_on("revived", up.addr).await;
    let mut back = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if get(&c, addr, "h", "/").await.body == "revived" {
            back = true;
            break;
        }
    }
    assert!(back, "member comes back after `rise` good checks");
    assert!(revived.hits() > 1, "health checks reached it");
    proxy.shutdown().await;
}

#[tokio::test]
async fn keep_alive_pool_is_reused() {
    let up = TestUpstream::start("pooled").await;
    let proxy = start_proxy(&one_group("round_robin", &members(&[&up]), "")).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for _ in 0..20 {
        assert_eq!(get(&c, addr, "h", "/").await.body, "pooled");
    }
    assert!(up.connections.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    let admin = proxy.admin_addr().unwrap();
    let metrics = get(&c, admin, "admin", "/metrics").await.body;
    let reused = metric(&metrics, "l7_upstream_pool_reused_total").unwrap();
    assert!(reused >= 18.0, "{metrics}");
    assert!(metric(&metrics, "l7_requests_total{route=\"all\",status=\"200\"}").unwrap() >= 20.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn connect_failures_retry_idempotent_requests_only() {
    let live = TestUpstream::start("live").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let members = format!(
        "[{{ address = \"{dead}\" }}, {{ address = \"{}\" }}]",
        live.addr
    );
    // No ejection, so every other request is first sent to the dead member.
    let proxy = start_proxy(&one_group(
        "round_robin",
        &members,
        "passive_health = { consecutive_failures = 0 }",
    ))
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for _ in 0..6 {
        assert_eq!(get(&c, addr, "h", "/").await.body, "live");
    }
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let req = Request::post(format!("http://{addr}/"))
            .header("host", "h")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        statuses.push(send(&c, req).await.status.as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 502, 502], "POST is never retried");
    proxy.shutdown().await;
}

#[tokio::test]
async fn slow_upstream_is_a_504() {
    let up = TestUpstream::start("slow").await;
    let proxy = start_proxy(&one_group(
        "round_robin",
        &members(&[&up]),
        "request_timeout_ms = 100",
    ))
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    let a = get_with(&c, addr, "h", "/", &[("x-delay-ms", "1000")]).await;
    assert_eq!(a.status, 504);
    assert_eq!(get(&c, addr, "h", "/").await.body, "slow");
    proxy.shutdown().await;
}

#[tokio::test]
async fn consistent_hash_on_cookie_keeps_sessions_together() {
    let ups = [
        TestUpstream::start("s0").await,
        TestUpstream::start("s1").await,
        TestUpstream::start("s2").await,
    ];
    let proxy = start_proxy(&one_group(
        "consistent_hash",
        &members(&[&ups[0], &ups[1], &ups[2]]),
        "hash_on = { cookie = \"session\" }",
    ))
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    let mut owners = Vec::new();
    for i in 0..60 {
        let cookie = format!("theme=dark; session=s{i}");
        let first = get_with(&c, addr, "h", "/", &[("cookie", &cookie)])
            .await
            .body;
        for _ in 0..3 {
            let again = get_with(&c, addr, "h", "/", &[("cookie", &cookie)])
                .await
                .body;
            assert_eq!(again, first, "session s{i} moved");
        }
        owners.push(first);
    }
    let counts = tally(owners);
    assert_eq!(
        counts.len(),
        3,
        "sessions spread over all members: {counts:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn least_request_avoids_the_busy_member() {
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let proxy = start_proxy(&one_group("least_request", &members(&[&a, &b]), "")).await;
    let addr = proxy.listener_addr("web").unwrap();
    let slow =
        tokio::spawn(
            async move { get_with(&client(), addr, "h", "/", &[("x-delay-ms", "600")]).await },
        );
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let c = client();
    let mut quick = Vec::new();
    for _ in 0..10 {
        quick.push(get(&c, addr, "h", "/").await.body);
    }
    let busy = slow.await.unwrap().body;
    assert!(
        quick.iter().all(|name| *name != busy),
        "busy={busy} quick={quick:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn request_metrics_count_by_route_status_and_member_across_reloads() {
    let up = TestUpstream::start("m").await;
    let config = |host: &str| {
        one_group("round_robin", &members(&[&up]), "").replace(
            "name = \"all\"\n",
            &format!("name = \"all\"\nmatch = {{ host = \"{host}\" }}\n"),
        )
    };
    let proxy = start_proxy(&config("a")).await;
    let addr = proxy.listener_addr("web").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, addr, "a", "/").await.status, StatusCode::OK);
    }
    for _ in 0..2 {
        assert_eq!(
            get(&c, addr, "other", "/").await.status,
            StatusCode::NOT_FOUND
        );
    }
    // A new generation of the route keeps counting into the same series.
    proxy
        .reload(l7_proxy::Config::from_toml_str(&config("a")).unwrap())
        .await
        .unwrap();
    assert_eq!(get(&c, addr, "a", "/").await.status, StatusCode::OK);
    let text = get(&c, admin, "admin", "/metrics").await.body;
    let member = format!("{{group=\"g\",member=\"{}\"}}", up.addr);
    assert_eq!(
        metric(&text, "l7_requests_total{route=\"all\",status=\"200\"}"),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "l7_requests_total{route=\"-\",status=\"404\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "l7_request_duration_seconds_count{route=\"all\"}"),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "l7_request_duration_seconds_count{route=\"-\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("l7_upstream_requests_total{member}")),
        Some(4.0),
        "{text}"
    );
    proxy.shutdown().await;
}

/// A client that aborts its upload or sends a malformed chunked body fails the request to the
/// member too; that must not count against the member, or any client could take a group
/// down. The malformed body gets 400, and the member keeps serving.
#[tokio::test]
async fn failed_client_bodies_do_not_eject_members() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    let up = TestUpstream::start("solo").await;
    let toml = one_group(
        "round_robin",
        &members(&[&up]),
        "passive_health = { consecutive_failures = 1, ejection_ms = 60000 }",
    );
    let proxy = start_proxy(&toml).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for _ in 0..3 {
        let answer = raw_exchange(
            addr,
            b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
            Duration::from_millis(500),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        let mut aborted = tokio::net::TcpStream::connect(addr).await.unwrap();
        aborted
            .write_all(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(aborted);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = get(&c, addr, "h", "/").await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "solo"));
    let admin = proxy.admin_addr().unwrap();
    let metrics = get(&c, admin, "admin", "/metrics").await.body;
    let label = format!(
        "l7_upstream_member_healthy{{group=\"g\",member=\"{}\"}}",
        up.addr
    );
    assert_eq!(metric(&metrics, &label), Some(1.0), "{metrics}");
    proxy.shutdown().await;
}

/// 5xx answers eject a member (passive health), but ejections never take a whole group down:
/// with every member ejected, they are still tried, as nginx and Envoy (panic mode) do. Else
/// any client could cause a group-wide 503 by requesting a path that fails.
#[tokio::test]
async fn ejections_never_take_the_whole_group_down() {
    let up = TestUpstream::start("only").await;
    let proxy = start_proxy(&one_group(
        "round_robin",
        &members(&[&up]),
        "passive_health = { consecutive_failures = 3, ejection_ms = 60000 }",
    ))
    .await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    for _ in 0..5 {
        let a = get_with(&c, addr, "h", "/", &[("x-want-status", "500")]).await;
        assert_eq!(a.status, 500);
    }
    let admin = proxy.admin_addr().unwrap();
    let metrics = get(&c, admin, "admin", "/metrics").await.body;
    let label = format!(
        "l7_upstream_member_healthy{{group=\"g\",member=\"{}\"}}",
        up.addr
    );
    assert_eq!(metric(&metrics, &label), Some(0.0), "ejected: {metrics}");
    let a = get(&c, addr, "h", "/").await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "only"));
    proxy.shutdown().await;
}

/// A reload that removes a group's health checks also forgets that they had found a member
/// down: nothing would ever bring it back otherwise.
#[tokio::test]
async fn a_reload_without_health_checks_brings_down_members_back() {
    let up = TestUpstream::start("down").await;
    let with_checks = one_group(
        "round_robin",
        &members(&[&up]),
        "health_check = { path = \"/health\", interval_ms = 50, timeout_ms = 200, rise = 2, fall = 1 }",
    );
    let proxy = start_proxy(&with_checks).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();
    up.kill();
    let mut down = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if get(&c, addr, "h", "/").await.status == 503 {
            down = true;
            break;
        }
    }
    assert!(down, "health checks take the member down");
    let without = one_group("round_robin", &members(&[&up]), "");
    proxy
        .reload(l7_proxy::Config::from_toml_str(&without).unwrap())
        .await
        .unwrap();
    let _revived = TestUpstream::start_on("revived", up.addr).await;
    let a = get(&c, addr, "h", "/").await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "revived"));
    proxy.shutdown().await;
}

/// `request_timeout_ms` counts from the end of the client's upload (as Envoy's route
/// timeout): an upload slower than it reaches the member whole. A client that stops sending
/// gets 408 after that long, and the member is not blamed.
#[tokio::test]
async fn request_timeout_counts_from_the_end_of_the_upload() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = TestUpstream::start("echo").await;
    let proxy = start_proxy(&one_group(
        "round_robin",
        &members(&[&up]),
        "request_timeout_ms = 600\npassive_health = { consecutive_failures = 1, ejection_ms = 60000 }",
    ))
    .await;
    let addr = proxy.listener_addr("web").unwrap();

    // Five parts, 300 ms apart: 1.2 s in all, twice the timeout.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    for part in ["ab", "cd", "ef", "gh", "ij"] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        slow.write_all(part.as_bytes()).await.unwrap();
    }
    let mut answer = String::new();
    slow.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("abcdefghij"), "{answer}");

    // Three bytes of ten, then silence.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );

    let c = client();
    let metrics = get(&c, proxy.admin_addr().unwrap(), "admin", "/metrics")
        .await
        .body;
    let label = format!(
        "l7_upstream_member_healthy{{group=\"g\",member=\"{}\"}}",
        up.addr
    );
    assert_eq!(
        metric(&metrics, &label),
        Some(1.0),
        "not ejected: {metrics}"
    );
    proxy.shutdown().await;
}
