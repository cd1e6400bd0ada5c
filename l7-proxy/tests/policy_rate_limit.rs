//! Rate limiting over real HTTP: exact admitted counts and `RateLimit-*` headers with the
//! in-memory store, per-key buckets, and two gateway instances sharing one bucket through a
//! real `redis-server` started by the test.

mod policy_harness;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use policy_harness::*;

async fn ok_upstream() -> Upstream {
    upstream(|_, _| async { reply(200, &[], "ok") }).await
}

async fn limited_gateway(up: &Upstream, policy_toml: &str) -> SocketAddr {
    let chain = chain_from_toml(&format!("[[policies]]\n{policy_toml}"));
    gateway(chain, one_group("app", up.addr), "app").await
}

fn limit_headers(got: &Got) -> (Option<&str>, Option<&str>, Option<&str>) {
    (
        got.header("ratelimit-limit"),
        got.header("ratelimit-remaining"),
        got.header("ratelimit-reset"),
    )
}

#[tokio::test]
async fn local_limit_admits_exactly_the_burst_and_reports_headers() {
    let up = ok_upstream().await;
    let gw = limited_gateway(&up, "type = \"rate_limit\"\nrequests = 3\nperiod_secs = 60").await;

    let mut seen = Vec::new();
    for _ in 0..3 {
        let got = get(gw, "/", &[]).await;
        assert_eq!(got.status, 200);
        let (limit, remaining, reset) = limit_headers(&got);
        seen.push((
            limit.unwrap().to_string(),
            remaining.unwrap().to_string(),
            reset.unwrap().to_string(),
        ));
    }
    let expect = |l: &str, r: &str, s: &str| (l.to_string(), r.to_string(), s.to_string());
    assert_eq!(
        seen,
        [
            expect("3", "2", "20"),
            expect("3", "1", "40"),
            expect("3", "0", "60")
        ]
    );

    let denied = get(gw, "/", &[]).await;
    assert_eq!(denied.status, 429);
    assert_eq!(denied.header("retry-after"), Some("20"));
    assert_eq!(denied.header("ratelimit-remaining"), Some("0"));
    assert_eq!(
        up.hits(),
        3,
        "the denied request never reached the upstream"
    );
}

#[tokio::test]
async fn header_keys_get_separate_buckets() {
    let up = ok_upstream().await;
    let gw = limited_gateway(
        &up,
        "type = \"rate_limit\"\nrequests = 2\nperiod_secs = 60\nkey = \"header:x-tenant\"",
    )
    .await;
    let status = |t: &'static str| async move { get(gw, "/", &[("x-tenant", t)]).await.status };
    assert_eq!(
        [status("a").await, status("a").await, status("a").await],
        [200, 200, 429]
    );
    assert_eq!([status("b").await, status("b").await], [200, 200]);
    assert_eq!(status("b").await, 429);
}

#[tokio::test]
async fn requests_without_the_key_are_limited_by_client_ip_in_buckets_of_their_own() {
    let up = ok_upstream().await;
    let gw = limited_gateway(
        &up,
        "type = \"rate_limit\"\nrequests = 1\nperiod_secs = 60\nkey = \"header:x-tenant\"",
    )
    .await;
    // No header: limited by the client's address (not let through, not one shared bucket
    // that any client could drain by sending a placeholder value).
    assert_eq!(get(gw, "/", &[]).await.status, 200);
    assert_eq!(get(gw, "/", &[]).await.status, 429);
    // A key value equal to that address, or to the old shared placeholder, is its own bucket.
    assert_eq!(get(gw, "/", &[("x-tenant", "127.0.0.1")]).await.status, 200);
    assert_eq!(get(gw, "/", &[("x-tenant", "-")]).await.status, 200);
    assert_eq!(get(gw, "/", &[("x-tenant", "-")]).await.status, 429);
}

#[tokio::test]
async fn stacked_limits_report_the_one_that_refuses_first() {
    let up = ok_upstream().await;
    let chain = chain_from_toml(
        "[[policies]]\ntype = \"rate_limit\"\nrequests = 100\n\n\
         [[policies]]\ntype = \"rate_limit\"\nrequests = 2\n",
    );
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    let got = get(gw, "/", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(limit_headers(&got), (Some("2"), Some("1"), Some("30")));
    assert_eq!(get(gw, "/", &[]).await.status, 200);
    let denied = get(gw, "/", &[]).await;
    assert_eq!(denied.status, 429);
    assert_eq!(limit_headers(&denied), (Some("2"), Some("0"), Some("60")));
    assert_eq!(denied.header("retry-after"), Some("30"));

    // The outer limit is the stricter one: its headers win.
    let chain = chain_from_toml(
        "[[policies]]\ntype = \"rate_limit\"\nrequests = 1\n\n\
         [[policies]]\ntype = \"rate_limit\"\nrequests = 50\n",
    );
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    let got = get(gw, "/", &[]).await;
    assert_eq!(limit_headers(&got), (Some("1"), Some("0"), Some("60")));
}

#[tokio::test]
async fn limit_by_jwt_subject_after_jwt_policy() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let up = ok_upstream().await;
    // "c2VjcmV0LXNlY3JldC1zZWNyZXQ" is base64url("secret-secret-secret").
    let jwks = temp_file(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQ"}]}"#);
    let chain = chain_from_toml(&format!(
        "[[policies]]\ntype = \"jwt\"\njwks_file = \"{}\"\n\n[[policies]]\ntype = \"rate_limit\"\nrequests = 1\nkey = \"jwt_sub\"",
        jwks.display()
    ));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let token = |sub: &str| {
        let t = encode(
            &Header::default(),
            &serde_json::json!({ "sub": sub, "exp": exp }),
            &EncodingKey::from_secret(b"secret-secret-secret"),
        )
        .unwrap();
        format!("Bearer {t}")
    };
    let (alice, bob) = (token("alice"), token("bob"));
    assert_eq!(get(gw, "/", &[("authorization", &alice)]).await.status, 200);
    assert_eq!(get(gw, "/", &[("authorization", &alice)]).await.status, 429);
    assert_eq!(get(gw, "/", &[("authorization", &bob)]).await.status, 200);
}

/// A `redis-server` child on a free port, killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_redis() -> Option<RedisServer> {
    start_redis_on(free_port())
}

fn start_redis_on(port: u16) -> Option<RedisServer> {
    let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let child = Command::new(bin)
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = RedisServer { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(server);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("redis-server did not start on port {port}");
}

#[tokio::test]
async fn two_instances_share_one_redis_bucket() {
    let Some(redis) = start_redis() else {
        eprintln!("SKIPPED: redis-server not found in /usr/bin or /usr/local/bin");
        return;
    };
    let up = ok_upstream().await;
    let policy = format!(
        "type = \"rate_limit\"\nrequests = 4\nperiod_secs = 60\nkey = \"header:x-user\"\n\
         redis_url = \"redis://127.0.0.1:{}/\"\nredis_prefix = \"test-{}\"\non_redis_error = \"fail_closed\"\nredis_timeout_ms = 2000",
        redis.port,
        std::process::id()
    );
    // Two independent chains, as two proxy processes would have.
    let gw1 = limited_gateway(&up, &policy).await;
    let gw2 = limited_gateway(&up, &policy).await;
    let mut remaining = Vec::new();
    for gw in [gw1, gw2, gw1, gw2] {
        let got = get(gw, "/", &[("x-user", "carol")]).await;
        assert_eq!(got.status, 200, "{:?}", got.body);
        assert_eq!(got.header("ratelimit-limit"), Some("4"));
        remaining.push(got.header("ratelimit-remaining").unwrap().to_string());
    }
    assert_eq!(remaining, ["3", "2", "1", "0"]);
    for gw in [gw1, gw2] {
        let denied = get(gw, "/", &[("x-user", "carol")]).await;
        assert_eq!(denied.status, 429);
        assert_eq!(denied.header("retry-after"), Some("15"));
    }
    // Another key has its own bucket in the same Redis.
    assert_eq!(get(gw2, "/", &[("x-user", "dave")]).await.status, 200);
    assert_eq!(up.hits(), 5);

    // Redis goes away: fail_closed answers 503.
    drop(redis);
    let got = get(gw1, "/", &[("x-user", "erin")]).await;
    assert_eq!(got.status, 503);
}

#[tokio::test]
async fn redis_buckets_are_per_route_unless_a_prefix_is_shared() {
    let Some(redis) = start_redis() else {
        eprintln!("SKIPPED: redis-server not found in /usr/bin or /usr/local/bin");
        return;
    };
    let up = ok_upstream().await;
    let policy = |prefix: &str| {
        format!(
            "[[policies]]\ntype = \"rate_limit\"\nrequests = 1\nperiod_secs = 60\n\
             redis_url = \"redis://127.0.0.1:{}/\"\non_redis_error = \"fail_closed\"\n{prefix}",
            redis.port
        )
    };
    let on_route = |route: &'static str, prefix: &'static str| {
        let chain = chain_from_toml(&policy(prefix));
        let groups = one_group("app", up.addr);
        async move { gateway_for_route(chain, groups, "app", route).await }
    };
    // No prefix: the same route on two instances shares a bucket, another route does not.
    let (a1, a2, b) = (
        on_route("a", "").await,
        on_route("a", "").await,
        on_route("b", "").await,
    );
    assert_eq!(get(a1, "/", &[]).await.status, 200);
    assert_eq!(get(a2, "/", &[]).await.status, 429);
    assert_eq!(get(b, "/", &[]).await.status, 200);
    // Two limits of one route count in buckets of their own: the first two requests pass
    // both (sharing a key, the second request would be the fourth step on it).
    let stacked = gateway_for_route(
        chain_from_toml(&format!(
            "{}\n{}",
            policy("").replace("requests = 1", "requests = 2"),
            policy("").replace("requests = 1", "requests = 5")
        )),
        one_group("app", up.addr),
        "app",
        "stacked",
    )
    .await;
    let statuses = [
        get(stacked, "/", &[]).await.status,
        get(stacked, "/", &[]).await.status,
        get(stacked, "/", &[]).await.status,
    ];
    assert_eq!(statuses, [200, 200, 429]);
    // The same explicit prefix shares buckets across routes.
    let (c, d) = (
        on_route("c", "redis_prefix = \"shared\"").await,
        on_route("d", "redis_prefix = \"shared\"").await,
    );
    assert_eq!(get(c, "/", &[]).await.status, 200);
    assert_eq!(get(d, "/", &[]).await.status, 429);
}

/// A Redis that goes away and comes back (a restart, a failover) is used again: requests are
/// limited through it as before, not failed (or let through unlimited) for good.
#[tokio::test]
async fn rate_limiting_resumes_once_redis_is_back() {
    let Some(redis) = start_redis() else {
        eprintln!("SKIPPED: redis-server not found in /usr/bin or /usr/local/bin");
        return;
    };
    let port = redis.port;
    let up = ok_upstream().await;
    let policy = |mode: &str| {
        format!(
            "type = \"rate_limit\"\nrequests = 3\nperiod_secs = 60\n\
             redis_url = \"redis://127.0.0.1:{port}/\"\nredis_prefix = \"back-{mode}-{}\"\n\
             on_redis_error = \"{mode}\"\nredis_timeout_ms = 1000",
            std::process::id()
        )
    };
    let closed = limited_gateway(&up, &policy("fail_closed")).await;
    let open = limited_gateway(&up, &policy("fail_open")).await;
    for gw in [closed, open] {
        let got = get(gw, "/", &[]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("ratelimit-remaining"), Some("2"));
    }

    drop(redis);
    let got = get(closed, "/", &[]).await;
    assert_eq!(got.status, 503);
    let got = get(open, "/", &[]).await;
    assert_eq!((got.status, got.header("ratelimit-limit")), (200, None));
    // While Redis is down, a request learns it at once rather than after redis_timeout_ms.
    let started = Instant::now();
    assert_eq!(get(closed, "/", &[]).await.status, 503);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    let _redis = start_redis_on(port).expect("redis-server restarts");
    for gw in [closed, open] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = get(gw, "/", &[]).await;
            // The restarted Redis has no buckets: this key's starts full again.
            if got.status == 200 && got.header("ratelimit-remaining") == Some("2") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still {} with remaining {:?} 10 s after Redis came back",
                got.status,
                got.header("ratelimit-remaining")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn unreachable_redis_fails_open_or_closed_as_configured() {
    let up = ok_upstream().await;
    let port = free_port(); // nothing listens here
    let base = format!(
        "type = \"rate_limit\"\nrequests = 1\nredis_url = \"redis://127.0.0.1:{port}/\"\nredis_timeout_ms = 300\n"
    );
    let open = limited_gateway(&up, &format!("{base}on_redis_error = \"fail_open\"")).await;
    let closed = limited_gateway(&up, &format!("{base}on_redis_error = \"fail_closed\"")).await;
    for _ in 0..2 {
        let got = get(open, "/", &[]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("ratelimit-limit"), None);
    }
    assert_eq!(get(closed, "/", &[]).await.status, 503);
}
