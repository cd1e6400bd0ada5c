//! Gateway policies end to end through the real proxy (`l7_proxy::Proxy::start`): routes from
//! a TOML config carry `policies = [...]`, requests go through a real listener, route match,
//! policy chain, upstream pick and forward.

mod policy_harness;

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, EncodingKey, Header};
use policy_harness::*;
use serde_json::json;

const SECRET: &[u8] = b"e2e-secret-e2e-secret";

fn token(sub: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let t = encode(
        &Header::default(),
        &json!({ "sub": sub, "exp": exp, "aud": "shop" }),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    format!("Bearer {t}")
}

/// The test JWKS in a temporary file, removed when the returned path is dropped.
fn jwks_path() -> tempfile::TempPath {
    use base64::Engine;
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
    temp_file(
        json!({ "keys": [{ "kty": "oct", "k": k }] })
            .to_string()
            .as_bytes(),
    )
}

#[tokio::test]
async fn policies_run_inside_the_proxy() {
    let catalog_text = "item ".repeat(2000);
    let body = catalog_text.clone();
    let api = upstream(move |parts, _| {
        let body = body.clone();
        async move {
            let user = parts
                .headers
                .get("x-user")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            match parts.uri.path() {
                "/catalog" => reply(
                    200,
                    &[
                        ("content-type", "text/plain"),
                        ("cache-control", "public, max-age=60"),
                    ],
                    body,
                ),
                _ => reply(
                    200,
                    &[("content-type", "text/plain")],
                    format!("hello {user}"),
                ),
            }
        }
    })
    .await;
    let v1 = upstream(|p, _| async move { reply(200, &[], format!("v1 {}", p.uri.path())) }).await;
    let v2 = upstream(|p, _| async move { reply(200, &[], format!("v2 {}", p.uri.path())) }).await;
    let profile = upstream(|_, _| async { reply(200, &[], r#"{"name":"alice"}"#) }).await;
    let broken = upstream(|_, _| async { reply(503, &[], "down") }).await;

    let jwks = jwks_path();
    let config = format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

[[upstreams]]
name = "api"
members = [{{ address = "{api}" }}]

[[upstreams]]
name = "api-v1"
members = [{{ address = "{v1}" }}]

[[upstreams]]
name = "api-v2"
members = [{{ address = "{v2}" }}]

[[routes]]
name = "versioned"
match = {{ headers = {{ "x-api" = "versioned" }} }}
action = {{ forward = {{ group = "api-v1" }} }}
policies = [
  {{ type = "version", default = "v1", versions = {{ v1 = {{ upstream = "api-v1", deprecated = true }}, v2 = {{ upstream = "api-v2" }} }} }},
]

[[routes]]
name = "dashboard"
match = {{ path = {{ exact = "/dashboard" }} }}
action = {{ forward = {{ group = "api" }} }}
policies = [
  {{ type = "aggregate", on_error = "partial", calls = [
      {{ key = "profile", url = "http://{profile}/profile" }},
      {{ key = "orders", url = "http://{broken}/orders", timeout_ms = 500 }},
  ] }},
]

[[routes]]
name = "shop"
action = {{ forward = {{ group = "api" }} }}
policies = [
  {{ type = "cors", origins = ["https://shop.example"] }},
  {{ type = "jwt", jwks_file = "{jwks}", audiences = ["shop"], forward_claims = {{ sub = "x-user" }} }},
  {{ type = "rate_limit", requests = 5, period_secs = 60, key = "jwt_sub" }},
  {{ type = "compress", min_size = 100 }},
  {{ type = "cache" }},
]
"#,
        api = api.addr,
        v1 = v1.addr,
        v2 = v2.addr,
        profile = profile.addr,
        broken = broken.addr,
        jwks = jwks.display(),
    );
    let config = l7_proxy::Config::from_toml_str(&config).expect("config");
    let proxy = l7_proxy::Proxy::start(config).await.expect("proxy starts");
    let addr = proxy.listener_addr("web").unwrap();

    // Auth first: no token never reaches the upstream, and still gets CORS headers.
    let got = get(addr, "/hello", &[("origin", "https://shop.example")]).await;
    assert_eq!(got.status, 401);
    assert_eq!(
        got.header("access-control-allow-origin"),
        Some("https://shop.example")
    );
    assert_eq!(api.hits(), 0);

    let alice = token("alice");
    let got = get(addr, "/hello", &[("authorization", &alice)]).await;
    assert_eq!(got.status, 200);
    assert_eq!(&got.body[..], b"hello alice");
    assert_eq!(got.header("ratelimit-remaining"), Some("4"));

    // Cached and compressed: the second request is a hit, and both decode to the original.
    let ae = [
        ("authorization", alice.as_str()),
        ("accept-encoding", "gzip"),
    ];
    let first = get(addr, "/catalog", &ae).await;
    let second = get(addr, "/catalog", &ae).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(second.header("x-cache"), Some("HIT"));
    for got in [&first, &second] {
        assert_eq!(got.header("content-encoding"), Some("gzip"));
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&got.body[..])
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, catalog_text);
    }
    assert_eq!(api.hits(), 2, "/hello and one /catalog");

    // Rate limit per subject: alice has used 3 of 5.
    let statuses: Vec<u16> = futures_util::future::join_all((0..3).map(|_| async {
        get(addr, "/hello", &[("authorization", &alice)])
            .await
            .status
    }))
    .await;
    let mut sorted = statuses.clone();
    sorted.sort();
    assert_eq!(sorted, [200, 200, 429]);
    assert_eq!(
        get(addr, "/hello", &[("authorization", &token("bob"))])
            .await
            .status,
        200
    );

    // Versioning re-targets the upstream group chosen by the route.
    // (The route's own strip_prefix applies after the policies; the version policy strips.)
    let versioned = [("x-api", "versioned")];
    let got = get(addr, "/v2/items", &versioned).await;
    assert_eq!(&got.body[..], b"v2 /items");
    let got = get(addr, "/items", &versioned).await;
    assert_eq!(&got.body[..], b"v1 /items");
    assert_eq!(got.header("deprecation"), Some("true"));

    // Aggregation answers from two other services, one of them failing.
    let got = get(addr, "/dashboard", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-aggregate-errors"), Some("orders"));
    let body = got.json();
    assert_eq!(body["profile"], json!({"name": "alice"}));
    assert_eq!(body["orders"], json!(null));
    assert_eq!(body["_errors"]["orders"], "status 503");

    proxy.shutdown().await;
}

#[tokio::test]
async fn invalid_policy_config_is_rejected_at_load() {
    let config = r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

[[upstreams]]
name = "api"
members = [{ address = "127.0.0.1:9" }]

[[routes]]
name = "bad"
action = { forward = { group = "api" } }
policies = [{ type = "transform", path_rewrite = { pattern = "(", replacement = "" } }]
"#;
    let result = match l7_proxy::Config::from_toml_str(config) {
        Err(e) => Err(e.to_string()),
        Ok(c) => l7_proxy::Proxy::start(c)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    let err = result.expect_err("an invalid regex must not load");
    assert!(err.contains("path_rewrite"), "{err}");
}
