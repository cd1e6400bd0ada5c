//! The gateway policies' own CPU cost, in process: one request through a route's policy chain
//! around a stand-in upstream that answers at once, with no sockets. The upstream's body is
//! either 1 KiB of one letter (`/x`), which compresses to nothing and so shows the fixed costs,
//! or the 925-byte JSON list of user records that `lbdemo service --json-body 1024` serves
//! (`/json`), which compresses as API responses do. Each chain runs beside the empty chain
//! (plain proxying) in the same run; compare their times (the difference is what the policies
//! cost per request). `cargo xtask bench policies` measures
//! the same chains through a real proxy with wrk. `fixed_deflate/json` times the fixed-code
//! deflate alone on the JSON body: the codec's share of `json/gzip_fixed`.
//!
//! Run with `cargo bench -p l7-proxy --bench policy_chain`.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::BodyExt;
use l7_proxy::policy::{build_chain, respond, PolicyChain, PolicyConfig, RequestCtx};

#[path = "../../demo/src/sample.rs"]
mod sample;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn chain(policies: &str) -> PolicyChain {
    let table: toml::Table = toml::from_str(&format!("p = [{policies}]")).expect("policy list");
    let configs: Vec<PolicyConfig> = table["p"].clone().try_into().expect("policy configs");
    build_chain(&configs).expect("chain")
}

fn token(secret: &[u8]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = serde_json::json!({ "sub": "bench", "iss": "bench", "aud": "bench", "exp": exp });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("token")
}

fn policy_chain(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("policy-chain-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("jwks.json");
    // "bench-secret", base64url.
    std::fs::write(
        &jwks,
        r#"{"keys":[{"kty":"oct","alg":"HS256","k":"YmVuY2gtc2VjcmV0"}]}"#,
    )
    .unwrap();
    let auth = format!("Bearer {}", token(b"bench-secret"));
    let jwt = format!(
        r#"{{ type = "jwt", jwks_file = "{}", algorithms = ["HS256"], issuers = ["bench"], audiences = ["bench"] }}"#,
        jwks.display()
    );
    let rate_limit =
        r#"{ type = "rate_limit", requests = 1000000000, period_secs = 1, key = "jwt_sub" }"#;
    let cache = r#"{ type = "cache", max_bytes = 16777216 }"#;
    let compress =
        |alg: &str| format!(r#"{{ type = "compress", algorithms = ["{alg}"], min_size = 256 }}"#);
    let full_chain = |alg: &str| format!("{jwt}, {rate_limit}, {}, {cache}", compress(alg));
    let x = ("text/plain", Bytes::from(vec![b'x'; 1024]));
    let json = ("application/json", Bytes::from(sample::records(1024)));
    // (name, policies, upstream body).
    let chains = [
        ("plain", String::new(), &x),
        ("jwt", jwt.clone(), &x),
        ("rate_limit", rate_limit.to_string(), &x),
        ("cache_miss", cache.to_string(), &x),
        ("gzip", compress("gzip"), &x),
        (
            "jwt+rate_limit+cache",
            format!("{jwt}, {rate_limit}, {cache}"),
            &x,
        ),
        ("full_chain_gzip", full_chain("gzip"), &x),
        ("full_chain_zstd", full_chain("zstd"), &x),
        ("json/plain", String::new(), &json),
        ("json/gzip", compress("gzip"), &json),
        ("json/zstd", compress("zstd"), &json),
        (
            "json/gzip_fixed",
            compress("gzip").replace(" }", r#", gzip_strategy = "fixed" }"#),
            &json,
        ),
        ("json/full_chain_gzip", full_chain("gzip"), &json),
        ("json/full_chain_zstd", full_chain("zstd"), &json),
        (
            "json/full_chain_gzip_fixed",
            full_chain("gzip").replace(
                r#"min_size = 256 }"#,
                r#"min_size = 256, gzip_strategy = "fixed" }"#,
            ),
            &json,
        ),
        (
            "json/4x_methods",
            [r#"{ type = "methods", allow = ["GET"] }"#; 4].join(", "),
            &json,
        ),
        (
            "json/jwt+rate_limit+cache",
            format!("{jwt}, {rate_limit}, {cache}"),
            &json,
        ),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("policy_chain");
    for (name, policies, (content_type, body)) in &chains {
        let chain = chain(policies);
        let one = || async {
            let req = Request::get("http://bench.example/x")
                .header("host", "bench.example")
                .header("authorization", auth.as_str())
                .header("accept-encoding", "gzip, deflate, br, zstd")
                .body(respond::empty())
                .unwrap();
            let mut ctx = RequestCtx::new(
                "192.0.2.1:40000".parse().unwrap(),
                "req".into(),
                "bench".into(),
                "up".into(),
                false,
                std::time::Instant::now(),
            );
            let resp = chain
                .handle(req, &mut ctx, |_, _| async {
                    Response::builder()
                        .header("content-type", *content_type)
                        .header("content-length", body.len())
                        .body(respond::full(body.clone()))
                        .unwrap()
                })
                .await;
            let (parts, body) = resp.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            (parts.status, bytes.len())
        };
        group.bench_function(*name, |b| b.iter(|| rt.block_on(one())));
    }
    group.finish();
    std::fs::remove_dir_all(&dir).ok();
}

/// The fixed-code deflate alone on the JSON body: the codec's share of `json/gzip_fixed`.
fn fixed_deflate(c: &mut Criterion) {
    let json = sample::records(1024);
    let mut out = Vec::with_capacity(l7_proxy::policy::fixed_deflate::bound(json.len()));
    c.bench_function("fixed_deflate/json", |b| {
        b.iter(|| {
            out.clear();
            l7_proxy::policy::fixed_deflate::deflate_into(std::hint::black_box(&json), &mut out);
            out.len()
        })
    });
}

criterion_group!(benches, policy_chain, fixed_deflate);
criterion_main!(benches);
