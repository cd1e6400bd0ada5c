//! Response cache over real HTTP: HIT/MISS, expiry, Vary, 304 answers and upstream
//! revalidation, Cache-Control rules, size limit, and coalescing of concurrent misses
//! (counted at the upstream).

mod policy_harness;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use policy_harness::*;

const CACHE: &str = "[[policies]]\ntype = \"cache\"\nmax_body_bytes = 4096";

/// Upstream whose answer depends on the path; bodies carry a serial number so a cached body is
/// recognisable.
async fn cache_gateway() -> (Upstream, SocketAddr, Arc<AtomicUsize>) {
    let serial = Arc::new(AtomicUsize::new(0));
    let not_modified = Arc::new(AtomicUsize::new(0));
    let (s, nm) = (serial.clone(), not_modified.clone());
    let up = upstream(move |parts, _| {
        let n = s.fetch_add(1, Ordering::SeqCst) + 1;
        let nm = nm.clone();
        async move {
            let h = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            match parts.uri.path() {
                "/fresh" => reply(
                    200,
                    &[("cache-control", "max-age=60")],
                    format!("fresh {n}"),
                ),
                "/short" => reply(200, &[("cache-control", "max-age=1")], format!("short {n}")),
                "/nostore" => reply(
                    200,
                    &[("cache-control", "no-store")],
                    format!("nostore {n}"),
                ),
                "/private" => reply(
                    200,
                    &[("cache-control", "private, max-age=60")],
                    format!("private {n}"),
                ),
                "/lang" => reply(
                    200,
                    &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
                    format!("{} {n}", h("accept-language")),
                ),
                "/etag" => {
                    if h("if-none-match") == "\"v1\"" {
                        nm.fetch_add(1, Ordering::SeqCst);
                        reply(
                            304,
                            &[("etag", "\"v1\""), ("cache-control", "max-age=1")],
                            "",
                        )
                    } else {
                        reply(
                            200,
                            &[("etag", "\"v1\""), ("cache-control", "max-age=1")],
                            format!("etag {n}"),
                        )
                    }
                }
                "/cookie" => reply(
                    200,
                    &[("cache-control", "max-age=60"), ("set-cookie", "sid=1")],
                    format!("cookie {n}"),
                ),
                "/big" => reply(200, &[("cache-control", "max-age=60")], vec![b'x'; 10_000]),
                "/slow" => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    reply(200, &[("cache-control", "max-age=60")], format!("slow {n}"))
                }
                _ => reply(404, &[], "no"),
            }
        }
    })
    .await;
    let gw = gateway(chain_from_toml(CACHE), one_group("app", up.addr), "app").await;
    (up, gw, not_modified)
}

fn text(got: &Got) -> String {
    String::from_utf8_lossy(&got.body).into_owned()
}

#[tokio::test]
async fn miss_then_hit_with_age() {
    let (up, gw, _) = cache_gateway().await;
    let first = get(gw, "/fresh", &[]).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let second = get(gw, "/fresh", &[]).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert!(second.header("age").is_some());
    assert_eq!(text(&second), text(&first));
    // Another query string is another key.
    assert_eq!(
        get(gw, "/fresh?x=1", &[]).await.header("x-cache"),
        Some("MISS")
    );
    // POST bypasses the cache.
    let post = send(gw, "POST", "/fresh", &[], "body").await;
    assert_eq!(post.header("x-cache"), None);
    // A request with no-store bypasses it too.
    let bypass = get(gw, "/fresh", &[("cache-control", "no-store")]).await;
    assert_eq!(bypass.header("x-cache"), None);
    assert_eq!(up.hits(), 4);
}

#[tokio::test]
async fn entries_expire_after_max_age() {
    let (up, gw, _) = cache_gateway().await;
    assert_eq!(get(gw, "/short", &[]).await.header("x-cache"), Some("MISS"));
    assert_eq!(get(gw, "/short", &[]).await.header("x-cache"), Some("HIT"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = get(gw, "/short", &[]).await;
    assert_eq!(after.header("x-cache"), Some("MISS"));
    assert_eq!(text(&after), "short 2");
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn no_store_private_cookie_and_oversized_responses_are_not_stored() {
    let (up, gw, _) = cache_gateway().await;
    for path in ["/nostore", "/private", "/cookie", "/big"] {
        let a = get(gw, path, &[]).await;
        let b = get(gw, path, &[]).await;
        assert_eq!(b.header("x-cache"), Some("MISS"), "{path}");
        if path == "/big" {
            assert_eq!(
                b.body.len(),
                10_000,
                "an oversized body passes through whole"
            );
        } else {
            assert_ne!(text(&a), text(&b), "{path}");
        }
    }
    assert_eq!(up.hits(), 8);
}

#[tokio::test]
async fn vary_keeps_one_entry_per_header_value() {
    let (up, gw, _) = cache_gateway().await;
    let lang = |l: &'static str| async move { get(gw, "/lang", &[("accept-language", l)]).await };
    assert_eq!(lang("en").await.header("x-cache"), Some("MISS"));
    assert_eq!(lang("fr").await.header("x-cache"), Some("MISS"));
    let en = lang("en").await;
    let fr = lang("fr").await;
    assert_eq!(en.header("x-cache"), Some("HIT"));
    assert_eq!(fr.header("x-cache"), Some("HIT"));
    assert!(text(&en).starts_with("en "));
    assert!(text(&fr).starts_with("fr "));
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn etag_answers_304_and_stale_entries_revalidate() {
    let (up, gw, not_modified) = cache_gateway().await;
    let first = get(gw, "/etag", &[]).await;
    assert_eq!(text(&first), "etag 1");
    // Fresh entry, matching validator: 304 straight from the cache.
    let cond = get(gw, "/etag", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(cond.status, 304);
    assert_eq!(cond.header("x-cache"), Some("HIT"));
    assert_eq!(cond.header("etag"), Some("\"v1\""));
    assert!(cond.body.is_empty());
    assert_eq!(up.hits(), 1);

    // Stale: the gateway revalidates with If-None-Match and serves the stored body on 304.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let revalidated = get(gw, "/etag", &[]).await;
    assert_eq!(revalidated.status, 200);
    assert_eq!(revalidated.header("x-cache"), Some("REVALIDATED"));
    assert_eq!(text(&revalidated), "etag 1");
    assert_eq!(not_modified.load(Ordering::SeqCst), 1);
    // The refreshed entry is fresh again.
    assert_eq!(get(gw, "/etag", &[]).await.header("x-cache"), Some("HIT"));
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn concurrent_misses_reach_the_upstream_once() {
    let (up, gw, _) = cache_gateway().await;
    let requests = (0..10).map(|_| tokio::spawn(async move { get(gw, "/slow", &[]).await }));
    let mut bodies = Vec::new();
    let mut misses = 0;
    for r in requests {
        let got = r.await.unwrap();
        assert_eq!(got.status, 200);
        if got.header("x-cache") == Some("MISS") {
            misses += 1;
        }
        bodies.push(text(&got));
    }
    assert_eq!(up.hits(), 1, "coalesced into one upstream request");
    assert_eq!(misses, 1);
    assert!(bodies.iter().all(|b| b == "slow 1"), "{bodies:?}");
}

/// A key whose response cannot be stored stops coalescing (requests no longer queue behind
/// one another: all of them are at the upstream together), and becomes cacheable again as
/// soon as the upstream allows it.
#[tokio::test]
async fn uncacheable_keys_skip_coalescing_until_a_storable_response() {
    use std::sync::atomic::AtomicBool;
    let cacheable = Arc::new(AtomicBool::new(false));
    let (in_flight, max_in_flight) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c, now, max) = (cacheable.clone(), in_flight.clone(), max_in_flight.clone());
    let up = upstream(move |_, _| {
        let (c, now, max) = (c.clone(), now.clone(), max.clone());
        async move {
            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            let cc = if c.load(Ordering::SeqCst) {
                "max-age=60"
            } else {
                "no-store"
            };
            reply(200, &[("cache-control", cc)], "body")
        }
    })
    .await;
    let gw = gateway(chain_from_toml(CACHE), one_group("app", up.addr), "app").await;
    assert_eq!(get(gw, "/t", &[]).await.header("x-cache"), Some("MISS"));
    max_in_flight.store(0, Ordering::SeqCst);
    let requests: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { get(gw, "/t", &[]).await }))
        .collect();
    for r in requests {
        let got = r.await.unwrap();
        assert_eq!((got.status, got.header("x-cache")), (200, Some("MISS")));
    }
    assert_eq!(up.hits(), 11);
    assert_eq!(
        max_in_flight.load(Ordering::SeqCst),
        10,
        "requests for a known-uncacheable key must not wait for one another"
    );

    cacheable.store(true, Ordering::SeqCst);
    // The first storable response ends the uncacheable state; the next one is stored.
    assert_eq!(get(gw, "/t", &[]).await.header("x-cache"), Some("MISS"));
    assert_eq!(get(gw, "/t", &[]).await.header("x-cache"), Some("MISS"));
    let hit = get(gw, "/t", &[]).await;
    assert_eq!(
        (hit.header("x-cache"), &hit.body[..]),
        (Some("HIT"), &b"body"[..])
    );
    assert_eq!(up.hits(), 13);
}

/// `[version, cache]`: `/v1/x` and `/v2/x` are both forwarded as `/x`, to different groups; the
/// group is part of the key, so each version gets its own body.
#[tokio::test]
async fn the_upstream_group_is_part_of_the_key() {
    let v1 =
        upstream(|_, _| async { reply(200, &[("cache-control", "max-age=60")], "v1 body") }).await;
    let v2 =
        upstream(|_, _| async { reply(200, &[("cache-control", "max-age=60")], "v2 body") }).await;
    let chain = chain_from_toml(
        r#"
        [[policies]]
        type = "version"
        default = "v1"
        versions = { v1 = { upstream = "g1" }, v2 = { upstream = "g2" } }
        [[policies]]
        type = "cache"
        "#,
    );
    let groups =
        std::collections::HashMap::from([("g1".to_string(), v1.addr), ("g2".to_string(), v2.addr)]);
    let gw = gateway(chain, groups, "g1").await;
    assert_eq!(text(&get(gw, "/v1/users", &[]).await), "v1 body");
    let v2_got = get(gw, "/v2/users", &[]).await;
    assert_eq!(
        (text(&v2_got), v2_got.header("x-cache")),
        ("v2 body".to_string(), Some("MISS"))
    );
    assert_eq!(
        get(gw, "/v1/users", &[]).await.header("x-cache"),
        Some("HIT")
    );
    assert_eq!(text(&get(gw, "/v2/users", &[]).await), "v2 body");
    assert_eq!((v1.hits(), v2.hits()), (1, 1));
}

/// An upstream that greets the user named in `x-user` and allows caching with plain max-age
/// (which a shared cache must not apply to authorized requests).
async fn per_user_upstream() -> Upstream {
    upstream(|parts, _| async move {
        let user = parts
            .headers
            .get("x-user")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        reply(
            200,
            &[("cache-control", "max-age=60")],
            format!("hello {user}"),
        )
    })
    .await
}

/// `[basic_auth, cache]`: basic_auth removes `Authorization` before the cache runs, but the
/// request is still authorized (RFC 9111 section 3.5): a per-user response with plain max-age
/// is not stored and never served to another user.
#[tokio::test]
async fn basic_auth_users_do_not_share_responses() {
    use base64::Engine;
    let phc = argon2id_phc("pw", 64, 1);
    let up = per_user_upstream().await;
    let chain = chain_from_toml(&format!(
        r#"
        [[policies]]
        type = "basic_auth"
        user_header = "x-user"
        users = {{ alice = "{phc}", bob = "{phc}" }}
        [[policies]]
        type = "cache"
        "#
    ));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    let basic = |u: &str| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{u}:pw"));
        format!("Basic {b64}")
    };
    for user in ["alice", "bob", "alice"] {
        let got = get(gw, "/me", &[("authorization", &basic(user))]).await;
        assert_eq!(text(&got), format!("hello {user}"));
        assert_eq!(got.header("x-cache"), Some("MISS"));
    }
    assert_eq!(up.hits(), 3);
}

/// `[api_key, cache]`: the key is removed before the cache runs; the request is authorized all
/// the same.
#[tokio::test]
async fn api_key_clients_do_not_share_responses() {
    use sha2::Digest;
    let sha = |k: &str| hex::encode(sha2::Sha256::digest(k.as_bytes()));
    let up = per_user_upstream().await;
    let chain = chain_from_toml(&format!(
        r#"
        [[policies]]
        type = "api_key"
        id_header = "x-user"
        keys = [{{ id = "team-a", sha256 = "{}" }}, {{ id = "team-b", sha256 = "{}" }}]
        [[policies]]
        type = "cache"
        "#,
        sha("key-a"),
        sha("key-b")
    ));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    assert_eq!(
        text(&get(gw, "/me", &[("x-api-key", "key-a")]).await),
        "hello team-a"
    );
    assert_eq!(
        text(&get(gw, "/me", &[("x-api-key", "key-b")]).await),
        "hello team-b"
    );
    assert_eq!(up.hits(), 2);
}

/// The upstream's `Age` counts (RFC 9111 section 4.2.3): `max-age=2` with `Age: 1` is fresh for
/// one more second, and the `Age` of a hit includes it.
#[tokio::test]
async fn the_upstream_age_counts() {
    let up =
        upstream(|_, _| async { reply(200, &[("cache-control", "max-age=2"), ("age", "1")], "b") })
            .await;
    let gw = gateway(chain_from_toml(CACHE), one_group("app", up.addr), "app").await;
    let first = get(gw, "/a", &[]).await;
    assert_eq!(
        (first.header("x-cache"), first.header("age")),
        (Some("MISS"), Some("1"))
    );
    let hit = get(gw, "/a", &[]).await;
    assert_eq!(
        (hit.header("x-cache"), hit.header("age")),
        (Some("HIT"), Some("1"))
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(gw, "/a", &[]).await.header("x-cache"), Some("MISS"));
    assert_eq!(up.hits(), 2);

    // Already stale on arrival: not stored.
    let old = upstream(|_, _| async {
        reply(200, &[("cache-control", "max-age=60"), ("age", "60")], "b")
    })
    .await;
    let gw = gateway(chain_from_toml(CACHE), one_group("app", old.addr), "app").await;
    get(gw, "/a", &[]).await;
    assert_eq!(get(gw, "/a", &[]).await.header("x-cache"), Some("MISS"));
    assert_eq!(old.hits(), 2);
}

/// `Expires` gives the lifetime when there is no max-age (RFC 9111 section 5.3): one in the
/// future is stored even without `default_ttl_secs`; an invalid or past one is stale even
/// with it.
#[tokio::test]
async fn expires_sets_the_freshness_lifetime() {
    let up = upstream(|parts, _| async move {
        match parts.uri.path() {
            "/future" => reply(
                200,
                &[
                    ("date", "Wed, 31 Dec 2098 23:59:00 GMT"),
                    ("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
                ],
                "future",
            ),
            "/past" => reply(200, &[("expires", "Thu, 01 Jan 1970 00:00:00 GMT")], "past"),
            _ => reply(200, &[("expires", "0")], "zero"),
        }
    })
    .await;
    let gw = gateway(chain_from_toml(CACHE), one_group("app", up.addr), "app").await;
    get(gw, "/future", &[]).await;
    assert_eq!(get(gw, "/future", &[]).await.header("x-cache"), Some("HIT"));
    let with_default = format!("{CACHE}\ndefault_ttl_secs = 60");
    let gw = gateway(
        chain_from_toml(&with_default),
        one_group("app", up.addr),
        "app",
    )
    .await;
    for path in ["/past", "/zero"] {
        get(gw, path, &[]).await;
        assert_eq!(
            get(gw, path, &[]).await.header("x-cache"),
            Some("MISS"),
            "{path}"
        );
    }
    assert_eq!(up.hits(), 5);
}

/// A 304 from revalidation updates the stored headers, and with them the freshness (RFC 9111
/// section 4.3.4).
#[tokio::test]
async fn revalidation_updates_the_stored_headers() {
    let up = upstream(|parts, _| async move {
        if parts.headers.get("if-none-match").is_some() {
            reply(
                304,
                &[
                    ("etag", "\"v1\""),
                    ("cache-control", "max-age=60"),
                    ("x-v", "2"),
                ],
                "",
            )
        } else {
            reply(
                200,
                &[
                    ("etag", "\"v1\""),
                    ("cache-control", "max-age=1"),
                    ("x-v", "1"),
                ],
                "b",
            )
        }
    })
    .await;
    let gw = gateway(chain_from_toml(CACHE), one_group("app", up.addr), "app").await;
    get(gw, "/x", &[]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let revalidated = get(gw, "/x", &[]).await;
    assert_eq!(
        (
            revalidated.header("x-cache"),
            revalidated.header("x-v"),
            &revalidated.body[..]
        ),
        (Some("REVALIDATED"), Some("2"), &b"b"[..])
    );
    assert_eq!(revalidated.header("cache-control"), Some("max-age=60"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let hit = get(gw, "/x", &[]).await;
    assert_eq!(
        (hit.header("x-cache"), hit.header("x-v")),
        (Some("HIT"), Some("2"))
    );
    assert_eq!(up.hits(), 2);
}

/// A request's `Cache-Control: max-age=0` (what a browser's reload sends) revalidates a fresh
/// entry; `max-age=60` accepts it.
#[tokio::test]
async fn request_max_age_zero_revalidates() {
    let (up, gw, not_modified) = cache_gateway().await;
    get(gw, "/etag", &[]).await;
    let ok = get(gw, "/etag", &[("cache-control", "max-age=60")]).await;
    assert_eq!(ok.header("x-cache"), Some("HIT"));
    let reload = get(gw, "/etag", &[("cache-control", "max-age=0")]).await;
    assert_eq!(
        (reload.status, reload.header("x-cache")),
        (200, Some("REVALIDATED"))
    );
    assert_eq!(not_modified.load(Ordering::SeqCst), 1);
    assert_eq!(up.hits(), 2);
}

/// A client's `If-None-Match` on a cold key is not sent upstream: the full 200 is fetched and
/// stored, the client gets its 304 from it, and the key stays cacheable (later concurrent
/// requests coalesce and hit).
#[tokio::test]
async fn conditional_requests_on_a_miss_fetch_and_store_the_full_response() {
    let up = upstream(|parts, _| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let conditional = ["if-none-match", "if-modified-since", "range", "if-range"]
            .iter()
            .any(|h| parts.headers.contains_key(*h));
        let headers = [
            ("etag", "\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("cache-control", "max-age=60"),
        ];
        match (conditional, parts.uri.path()) {
            (true, _) => reply(304, &headers, ""),
            (false, "/private") => {
                reply(200, &[("etag", "\"p\""), ("cache-control", "private")], "p")
            }
            _ => reply(200, &headers, "body"),
        }
    })
    .await;
    let gw = gateway(chain_from_toml(CACHE), one_group("app", up.addr), "app").await;
    let cond = get(gw, "/r", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(
        (cond.status, cond.header("x-cache"), cond.header("etag")),
        (304, Some("MISS"), Some("\"v1\""))
    );
    assert!(cond.body.is_empty());
    let before = up.hits();
    let requests: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { get(gw, "/r", &[]).await }))
        .collect();
    for r in requests {
        let got = r.await.unwrap();
        assert_eq!(
            (got.status, got.header("x-cache"), &got.body[..]),
            (200, Some("HIT"), &b"body"[..])
        );
    }
    assert_eq!(up.hits(), before);

    // A Range on a cold key: the whole response is fetched, stored and sent.
    let range = get(
        gw,
        "/range",
        &[("range", "bytes=0-1"), ("if-range", "\"v1\"")],
    )
    .await;
    assert_eq!((range.status, &range.body[..]), (200, &b"body"[..]));
    assert_eq!(get(gw, "/range", &[]).await.header("x-cache"), Some("HIT"));
    // If-Modified-Since is checked against the stored Last-Modified.
    let ims = |date: &'static str| async move {
        get(gw, "/ims", &[("if-modified-since", date)]).await.status
    };
    assert_eq!(ims("Sun, 06 Nov 1994 08:49:37 GMT").await, 304);
    assert_eq!(ims("Sat, 05 Nov 1994 08:49:37 GMT").await, 200);
    // A response that is not stored still answers the client's validators.
    let private = get(gw, "/private", &[("if-none-match", "\"p\"")]).await;
    assert_eq!(
        (private.status, private.header("x-cache")),
        (304, Some("MISS"))
    );
    assert_eq!(up.hits(), before + 3);
}

/// An entity tag with a comma in it is matched whole.
#[tokio::test]
async fn etags_with_commas_match_whole() {
    let up = upstream(|_, _| async {
        reply(
            200,
            &[("etag", "\"a,b\""), ("cache-control", "max-age=60")],
            "body",
        )
    })
    .await;
    let gw = gateway(chain_from_toml(CACHE), one_group("app", up.addr), "app").await;
    get(gw, "/t", &[]).await;
    let inm = |v: &'static str| async move { get(gw, "/t", &[("if-none-match", v)]).await.status };
    assert_eq!(inm("\"x\", \"a,b\"").await, 304);
    assert_eq!(inm("\"a\", \"b\"").await, 200);
    assert_eq!(inm("\"b\", \"a,\"").await, 200);
    assert_eq!(up.hits(), 1);
}

/// Preconditions (`If-Match`, `If-Unmodified-Since`) are the origin's to evaluate (RFC 9111
/// section 4.3.2): such requests go upstream as they are and neither use nor fill the cache.
#[tokio::test]
async fn preconditions_reach_the_origin() {
    let up = upstream(|parts, _| async move {
        let headers = [("etag", "\"v2\""), ("cache-control", "max-age=60")];
        match parts.headers.get("if-match").map(|v| v.as_bytes()) {
            Some(b"\"v2\"") | None => reply(200, &headers, "current"),
            Some(_) => reply(412, &[], ""),
        }
    })
    .await;
    let gw = gateway(chain_from_toml(CACHE), one_group("app", up.addr), "app").await;
    let stale_writer = get(gw, "/doc", &[("if-match", "\"v1\"")]).await;
    assert_eq!(
        (stale_writer.status, stale_writer.header("x-cache")),
        (412, None)
    );
    // The entry is stored by an unconditional request and still not used for preconditions.
    assert_eq!(get(gw, "/doc", &[]).await.header("x-cache"), Some("MISS"));
    assert_eq!(get(gw, "/doc", &[]).await.header("x-cache"), Some("HIT"));
    let got = get(gw, "/doc", &[("if-match", "\"v1\"")]).await;
    assert_eq!(got.status, 412);
    let got = get(gw, "/doc", &[("if-match", "\"v2\"")]).await;
    assert_eq!((got.status, got.header("x-cache")), (200, None));
    assert_eq!(up.hits(), 4);
}

/// An entry without an ETag revalidates with its Last-Modified (`If-Modified-Since`).
#[tokio::test]
async fn entries_without_etag_revalidate_with_last_modified() {
    const MODIFIED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
    let up = upstream(|parts, _| async move {
        let headers = [("last-modified", MODIFIED), ("cache-control", "max-age=60")];
        match parts.headers.get("if-modified-since").map(|v| v.as_bytes()) {
            Some(since) if since == MODIFIED.as_bytes() => reply(304, &headers, ""),
            _ => reply(200, &headers, "doc"),
        }
    })
    .await;
    let gw = gateway(chain_from_toml(CACHE), one_group("app", up.addr), "app").await;
    assert_eq!(get(gw, "/doc", &[]).await.header("x-cache"), Some("MISS"));
    let reload = get(gw, "/doc", &[("cache-control", "max-age=0")]).await;
    assert_eq!(
        (reload.status, reload.header("x-cache"), &reload.body[..]),
        (200, Some("REVALIDATED"), &b"doc"[..])
    );
    assert_eq!(up.hits(), 2);
}
