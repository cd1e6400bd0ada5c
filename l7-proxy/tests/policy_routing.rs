//! Aggregation, API versioning, transformation and security filters over real HTTP.

mod policy_harness;

use std::collections::HashMap;
use std::time::Duration;

use policy_harness::*;
use serde_json::json;

/// Upstream that answers with what it received, tagged with `name`.
/// Like [`echo`], with `Cache-Control: max-age=60`.
async fn echo_cacheable(name: &'static str) -> Upstream {
    upstream(move |parts, _| async move {
        let body = serde_json::json!({"upstream": name, "path": parts.uri.to_string()});
        reply(
            200,
            &[
                ("content-type", "application/json"),
                ("cache-control", "max-age=60"),
            ],
            body.to_string(),
        )
    })
    .await
}

async fn echo(name: &'static str) -> Upstream {
    upstream(move |parts, body| async move {
        let headers: serde_json::Map<String, serde_json::Value> = parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
            .collect();
        let body_json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(json!(null));
        let out = json!({ "upstream": name, "path": parts.uri.to_string(), "headers": headers,
                          "body": body_json, "body_len": body.len(), "internal": "secret" });
        reply(
            200,
            &[("content-type", "application/json"), ("server", "echo")],
            out.to_string(),
        )
    })
    .await
}

#[tokio::test]
async fn aggregation_combines_and_reports_slow_and_failing_calls() {
    let user = upstream(|parts, _| async move {
        let auth = parts
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        reply(
            200,
            &[("content-type", "application/json")],
            json!({"name": "alice", "auth": auth, "q": parts.uri.query()}).to_string(),
        )
    })
    .await;
    let slow = upstream(|_, _| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        reply(200, &[], "{}")
    })
    .await;
    let failing = upstream(|_, _| async { reply(500, &[], "boom") }).await;
    let route_upstream = echo("route").await;
    let policy = |on_error: &str| {
        format!(
            r#"
            [[policies]]
            type = "aggregate"
            on_error = "{on_error}"
            forward_headers = ["authorization"]
            forward_query = true
            calls = [
              {{ key = "user", url = "http://{}/user", timeout_ms = 1000 }},
              {{ key = "orders", url = "http://{}/orders", timeout_ms = 200 }},
              {{ key = "stock", url = "http://{}/stock" }},
            ]
            "#,
            user.addr, slow.addr, failing.addr
        )
    };
    let partial = gateway(
        chain_from_toml(&policy("partial")),
        one_group("app", route_upstream.addr),
        "app",
    )
    .await;
    let got = get(partial, "/dash?id=7", &[("authorization", "Bearer t")]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-aggregate-errors"), Some("orders,stock"));
    let body = got.json();
    assert_eq!(
        body["user"],
        json!({"name": "alice", "auth": "Bearer t", "q": "id=7"})
    );
    assert_eq!(body["orders"], json!(null));
    assert_eq!(body["stock"], json!(null));
    assert!(body["_errors"]["orders"]
        .as_str()
        .unwrap()
        .contains("timed out"));
    assert_eq!(body["_errors"]["stock"], "status 500");

    let fail = gateway(
        chain_from_toml(&policy("fail")),
        one_group("app", route_upstream.addr),
        "app",
    )
    .await;
    let got = get(fail, "/dash", &[]).await;
    assert_eq!(got.status, 502);
    let body = got.json();
    assert_eq!(body["error"], "aggregate call failed");
    assert_eq!(
        body["failed"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["orders", "stock"]
    );
    assert_eq!(
        route_upstream.hits(),
        0,
        "aggregation always answers itself"
    );
}

#[tokio::test]
async fn aggregation_takes_a_success_without_content_as_null() {
    let empty = upstream(|_, _| async { reply(204, &[], "") }).await;
    let user = upstream(|_, _| async { reply(200, &[], r#"{"name":"alice"}"#) }).await;
    let route_upstream = echo("route").await;
    let chain = chain_from_toml(&format!(
        r#"
        [[policies]]
        type = "aggregate"
        on_error = "fail"
        calls = [
          {{ key = "user", url = "http://{}/user" }},
          {{ key = "flags", url = "http://{}/flags" }},
        ]
        "#,
        user.addr, empty.addr
    ));
    let gw = gateway(chain, one_group("app", route_upstream.addr), "app").await;
    let got = get(gw, "/dash", &[]).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(
        got.json(),
        json!({"user": {"name": "alice"}, "flags": null})
    );
    assert_eq!(got.header("x-aggregate-errors"), None);
}

#[tokio::test]
async fn versions_select_upstream_groups() {
    let (v1, v2) = (echo("v1").await, echo("v2").await);
    let chain = chain_from_toml(
        r#"
        [[policies]]
        type = "version"
        default = "v1"
        versions = { v1 = { upstream = "api-v1", deprecated = true, sunset = "Sat, 01 May 2027 00:00:00 GMT" }, v2 = { upstream = "api-v2" } }
        "#,
    );
    let groups = HashMap::from([
        ("api-v1".to_string(), v1.addr),
        ("api-v2".to_string(), v2.addr),
    ]);
    let gw = gateway(chain, groups, "unset").await;

    let got = get(gw, "/v2/users?id=1", &[]).await.json();
    assert_eq!(
        (got["upstream"].as_str(), got["path"].as_str()),
        (Some("v2"), Some("/users?id=1"))
    );

    let got = get(gw, "/v1/users", &[]).await;
    assert_eq!(got.header("deprecation"), Some("true"));
    assert_eq!(got.header("sunset"), Some("Sat, 01 May 2027 00:00:00 GMT"));
    assert_eq!(got.json()["path"], "/users");

    let got = get(gw, "/users", &[]).await;
    assert_eq!(got.json()["upstream"], "v1", "default version");
    assert_eq!(got.json()["path"], "/users");

    let got = get(gw, "/users", &[("accept-version", "2")]).await;
    assert_eq!(got.json()["upstream"], "v2");
    assert_eq!(got.header("deprecation"), None);

    let got = get(
        gw,
        "/users",
        &[("accept", "application/vnd.x+json; version=2")],
    )
    .await;
    assert_eq!(got.json()["upstream"], "v2");

    assert_eq!(
        get(gw, "/users", &[("accept-version", "9")]).await.status,
        400
    );
    assert_eq!(v1.hits() + v2.hits(), 5);

    // A version chosen by headers (or by default) varies by them; one chosen by the path not.
    let got = get(gw, "/users", &[("accept-version", "2")]).await;
    assert_eq!(got.header("vary"), Some("accept-version, Accept"));
    assert_eq!(get(gw, "/v2/users", &[]).await.header("vary"), None);
    // `/2/...` is an ordinary path, and other media types' version parameters are not API
    // versions (a Prometheus scrape is not refused).
    let got = get(gw, "/2/users", &[]).await.json();
    assert_eq!(
        (got["upstream"].as_str(), got["path"].as_str()),
        (Some("v1"), Some("/2/users"))
    );
    let scrape = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let got = get(gw, "/metrics", &[("accept", scrape)]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["upstream"], "v1");
}

#[tokio::test]
async fn a_cache_before_version_keeps_header_selected_versions_apart() {
    let (v1, v2) = (echo_cacheable("v1").await, echo_cacheable("v2").await);
    let chain = chain_from_toml(
        r#"
        [[policies]]
        type = "cache"
        [[policies]]
        type = "version"
        default = "v1"
        versions = { v1 = { upstream = "api-v1" }, v2 = { upstream = "api-v2" } }
        "#,
    );
    let groups = HashMap::from([
        ("api-v1".to_string(), v1.addr),
        ("api-v2".to_string(), v2.addr),
    ]);
    let gw = gateway(chain, groups, "unset").await;
    let ask = |v: &'static str| async move {
        let got = get(gw, "/users", &[("accept-version", v)]).await;
        (
            got.json()["upstream"].as_str().unwrap().to_string(),
            got.header("x-cache").unwrap().to_string(),
        )
    };
    assert_eq!(ask("1").await, ("v1".to_string(), "MISS".to_string()));
    assert_eq!(ask("2").await, ("v2".to_string(), "MISS".to_string()));
    assert_eq!(ask("2").await, ("v2".to_string(), "HIT".to_string()));
    assert_eq!(ask("1").await, ("v1".to_string(), "HIT".to_string()));
}

#[tokio::test]
async fn transform_edits_headers_path_and_json_bodies() {
    let up = echo("app").await;
    let chain = chain_from_toml(
        r#"
        [[policies]]
        type = "transform"
        max_body_bytes = 4096
        request_headers = { set = { "x-client" = "${client_ip}", "x-route" = "${route}" }, add = { "x-req" = "${request_id}" }, remove = ["x-secret"] }
        response_headers = { set = { "x-served-by" = "gw" }, remove = ["server"] }
        path_rewrite = { pattern = "^/api/(.*)$", replacement = "/internal/$1" }
        request_json = { remove = ["password"], rename = { user = "username" }, add = { source = "${route}", n = 1 } }
        response_json = { remove = ["internal"], add = { via = "gateway" } }
        "#,
    );
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    let got = send(
        gw,
        "POST",
        "/api/users?x=1",
        &[("content-type", "application/json"), ("x-secret", "s")],
        r#"{"user":"alice","password":"hunter2"}"#,
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-served-by"), Some("gw"));
    assert_eq!(got.header("server"), None);
    let body = got.json();
    assert_eq!(body["via"], "gateway");
    assert_eq!(body.get("internal"), None);
    assert_eq!(body["path"], "/internal/users?x=1");
    assert_eq!(body["headers"]["x-client"], "127.0.0.1");
    assert_eq!(body["headers"]["x-route"], "test-route");
    assert!(body["headers"]["x-req"]
        .as_str()
        .unwrap()
        .starts_with("req-"));
    assert_eq!(body["headers"].get("x-secret"), None);
    assert_eq!(
        body["body"],
        json!({"username": "alice", "source": "test-route", "n": 1})
    );

    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(5000));
    let got = send(
        gw,
        "POST",
        "/api/users",
        &[("content-type", "application/json")],
        big,
    )
    .await;
    assert_eq!(got.status, 413);
    assert_eq!(up.hits(), 1);

    // HEAD: the upstream's Content-Length is that of the unedited body a GET would get; the
    // edited length is unknown, so none is sent (it was 0, the empty body's).
    let get = send(gw, "GET", "/api/users", &[], "").await;
    assert_eq!(get.status, 200);
    assert_eq!(
        get.header("content-length"),
        Some(get.body.len().to_string().as_str())
    );
    let head = send(gw, "HEAD", "/api/users", &[], "").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), None);
    assert!(head.body.is_empty());
    assert_eq!(head.header("x-served-by"), Some("gw"));
}

/// POSTs `chunks` with chunked transfer encoding (no Content-Length).
async fn send_chunked(addr: std::net::SocketAddr, chunks: Vec<&'static str>) -> Got {
    use http_body_util::{BodyExt, StreamBody};
    let frames =
        futures_util::stream::iter(chunks.into_iter().map(|c| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(c)))
        }));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<StreamBody<_>>();
    let req = http::Request::post(format!("http://{addr}/"))
        .body(StreamBody::new(frames))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Got {
        status,
        headers,
        body,
    }
}

#[tokio::test]
async fn security_filters_answer_403_413_405_and_cors() {
    let up = echo("app").await;
    let gw_for = |toml: &str| {
        let chain = chain_from_toml(toml);
        let addr = up.addr;
        async move { gateway(chain, one_group("app", addr), "app").await }
    };

    let denied = gw_for("[[policies]]\ntype = \"ip_filter\"\ndeny = [\"127.0.0.0/8\"]").await;
    assert_eq!(get(denied, "/", &[]).await.status, 403);
    let not_allowed = gw_for("[[policies]]\ntype = \"ip_filter\"\nallow = [\"10.0.0.0/8\"]").await;
    assert_eq!(get(not_allowed, "/", &[]).await.status, 403);
    let allowed =
        gw_for("[[policies]]\ntype = \"ip_filter\"\nallow = [\"127.0.0.1/32\", \"::1/128\"]").await;
    assert_eq!(get(allowed, "/", &[]).await.status, 200);
    // IPv4-mapped IPv6 networks match the IPv4 clients they stand for.
    let mapped =
        gw_for("[[policies]]\ntype = \"ip_filter\"\ndeny = [\"::ffff:127.0.0.0/104\"]").await;
    assert_eq!(get(mapped, "/", &[]).await.status, 403);

    let limited = gw_for("[[policies]]\ntype = \"body_limit\"\nmax_bytes = 10").await;
    assert_eq!(
        send(limited, "POST", "/", &[], "x".repeat(20)).await.status,
        413
    );
    let ok = send(limited, "POST", "/", &[], "12345").await;
    assert_eq!(ok.json()["body_len"], 5);
    let hits = up.hits();
    assert_eq!(
        send_chunked(limited, vec!["123456", "789012"]).await.status,
        413
    );
    assert_eq!(
        up.hits(),
        hits,
        "an oversized chunked body never reaches the upstream"
    );
    let ok = send_chunked(limited, vec!["1234", "5678"]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["body_len"], 8);

    let methods = gw_for("[[policies]]\ntype = \"methods\"\nallow = [\"GET\", \"head\"]").await;
    let got = send(methods, "DELETE", "/", &[], "").await;
    assert_eq!(got.status, 405);
    assert_eq!(got.header("allow"), Some("GET, HEAD"));
    assert_eq!(get(methods, "/", &[]).await.status, 200);
    // Allowing GET allows HEAD.
    let get_post = gw_for("[[policies]]\ntype = \"methods\"\nallow = [\"GET\", \"POST\"]").await;
    assert_eq!(send(get_post, "HEAD", "/", &[], "").await.status, 200);
    let got = send(get_post, "PUT", "/", &[], "").await;
    assert_eq!(got.status, 405);
    assert_eq!(got.header("allow"), Some("GET, POST, HEAD"));

    let hits_before = up.hits();
    let cors = gw_for(
        "[[policies]]\ntype = \"cors\"\norigins = [\"https://app.example\"]\nmethods = [\"GET\", \"PUT\"]\nheaders = [\"content-type\"]\nexpose_headers = [\"x-total\"]\nmax_age_secs = 60",
    )
    .await;
    let pre = send(
        cors,
        "OPTIONS",
        "/items",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "PUT"),
        ],
        "",
    )
    .await;
    assert_eq!(pre.status, 204);
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(pre.header("access-control-allow-methods"), Some("GET, PUT"));
    assert_eq!(
        pre.header("access-control-allow-headers"),
        Some("content-type")
    );
    assert_eq!(pre.header("access-control-max-age"), Some("60"));
    assert_eq!(up.hits(), hits_before, "preflight answered by the gateway");

    let got = get(cors, "/items", &[("origin", "https://app.example")]).await;
    assert_eq!(
        got.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(got.header("access-control-expose-headers"), Some("x-total"));
    assert!(got.header("vary").unwrap().contains("Origin"));
    let got = get(cors, "/items", &[("origin", "https://evil.example")]).await;
    assert_eq!(got.header("access-control-allow-origin"), None);
    // Responses to a refused origin or to no origin vary by Origin too: a cache must not give
    // them to an allowed origin.
    assert_eq!(got.header("vary"), Some("Origin"));
    assert_eq!(
        get(cors, "/items", &[]).await.header("vary"),
        Some("Origin")
    );

    // Without a configured `headers` list, a preflight allows the headers it asks for.
    let open_headers = gw_for(
        "[[policies]]\ntype = \"cors\"\norigins = [\"https://app.example\"]\nmethods = [\"GET\", \"POST\"]",
    )
    .await;
    let pre = send(
        open_headers,
        "OPTIONS",
        "/items",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "content-type, authorization",
            ),
        ],
        "",
    )
    .await;
    assert_eq!(pre.status, 204);
    assert_eq!(
        pre.header("access-control-allow-headers"),
        Some("content-type, authorization")
    );
    let vary: Vec<&str> = pre
        .headers
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(vary, ["Origin", "Access-Control-Request-Headers"]);
}
