//! JWT, API key and Basic auth policies driven over real HTTP: a gateway running the chain in
//! front of an upstream that echoes what it received.

mod policy_harness;

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use policy_harness::*;
use serde_json::json;

/// Test-only keys (generated with openssl for this test; not used anywhere else).
const RSA_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMIIEvwIBADANBgkqhkiG9w0BAQEFAASCBKkwggSlAgEAAoIBAQC8YDj4QRot9wIs\nJFQ3WM9uC6xTqj0GUFPGxzd949fxzIkc1PYKbYZVZVuUSoUwQGZ12D7ktXbY2SdX\nyq34mehsYKRaVK1vCCw5ctPG4WGNDFqJBjvgiwb8fymMLXc2GWTNgeYRqFO0nJWc\nG0qL0M9pxe5JKcAAvrOADMRLkr4e15axwhN+fXsTd81YcrzW4T5yAVWN4V8c6eTV\nHBZfHEjXyHO0CO2UYDBNhrXk0JINHV1FSRM5CUJSDOzhy+xErmrDHdpTcn1xulLY\nXbKdiApnnoISJcBR/KeGGtR/Pxzz5wCo9fNzoaWobx7YxCvDeFnKE/haRFpiw44b\ngUqm6+bTAgMBAAECggEAFoaXxBFI4k6OGx2HAo1N/1X0V+wyBZjCboaGW2P3qn7v\ntcZo24tdoRrl42rb2A7DZyZ3iDLY5jUQGtPuOh2cE6Wk0aEcPNGTNEAdFJmr6B7I\n5BIeQ+DBckfPKJI2lf4IYKNpZxrOqPjWfRyDArVysAPOquoL/yrOsn++/giApUBO\ntdIshik2QNv7OP0BuNz2qKJiV8vDQj+R5KWDECg8FqAbbj5QYEaaJ7qTuZU+pe7V\nMcZg0rte/XaOOwhv+GIwLjTFoJXiFTAF2nZC/invehlI2WX5NUqJvqH6ap0lb+Mf\nV5maS1mtFGleE26KnAA6D2UjLf/h81Pba2Nmv5NY6QKBgQDyTVU908gyZBaaisPX\niDJsymn8tPzgiknebiEyp1Z9Bbvz+/cnysNAYJ+q4s0JSopjWLJxQy87up4nrWuQ\noLFdx8ITYQlE+U2XtxXfj4HgOu66JGOH1BotVK1PfzLfoX7x0NHISg5fnquVHxdt\nlCMt573oA/hyi1Ik5Racyfw9OQKBgQDHBnQboehjPCcWg/V23I6oh7O8GmxNdtC8\nlfZwqAXx1nPPPpTBRAqbA9ZoEDgbw2b8q4lgukoO7UXOU5P8pF6uv6VpjaVrQ53E\nYszERTG8p4UBlvAD6YXYdPVAbN4x3afEGiJlrhpuuJnNQ44iHtdyqZgJTGm1s/Dq\nZ7BQTsDQawKBgQDF8X04pCHBYNjCaahyFDa1f2q0YprPSMnt52RBgEj8m8mfGXEg\n1dlKZ2Uo8l10QKvrWxNzyeH1VpBLc7YTEeOz7DPVJwmuikfkMFKzLwZ3y00pTf7t\ngM3dyHZJIm3KGaGeJOysRiuV3AbqLNszzrgqkU4oE85MrRpvP6OIdM4WqQKBgQCi\nXVBxjoeAFX2p76NcAZjcQkDN7xx1ob2ubATtaRXYcmRuKRbACFtClUHgCYNMmv+0\nl9huMevi+4zcQvDSxeF8XFp8nxLZTAM0SInWgMCPsHZgkptiBausp9XAZlBqi/Km\nl8+B9iQYOb83ZqpYiaKoJ1UiGNWQZ6jeAhMjoOvJ2wKBgQCTjSStQbexIQn3lM6v\ntkCVMOzZ4QHWex5uTrbqFHr4S9i/3te139goaoZH31QhFl6cC1cb42nEMYZlcQlX\nidw1U2QVEn7pFmBnXVLd82rIRWedhdCUw2IFnKMivjfoREn+tOjwAysHPMvuLDE4\npseunnybXvzlWGug8tf2vjtdUA==\n-----END PRIVATE KEY-----";
const EC_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgrjJd7aEV2hhlxIHu\nqpl8k3JqNN81TYv0JUnBURB9ynKhRANCAAQZ//RWlMHpxqywCI9r0BbaQ+nWnJcz\nsENvI9lagXm1b7fV3zRYrYimJfmcQuNVgC3k0Smly+oJUSEye78uPRof\n-----END PRIVATE KEY-----";
const RSA_N: &str = "vGA4-EEaLfcCLCRUN1jPbgusU6o9BlBTxsc3fePX8cyJHNT2Cm2GVWVblEqFMEBmddg-5LV22NknV8qt-JnobGCkWlStbwgsOXLTxuFhjQxaiQY74IsG_H8pjC13NhlkzYHmEahTtJyVnBtKi9DPacXuSSnAAL6zgAzES5K-HteWscITfn17E3fNWHK81uE-cgFVjeFfHOnk1RwWXxxI18hztAjtlGAwTYa15NCSDR1dRUkTOQlCUgzs4cvsRK5qwx3aU3J9cbpS2F2ynYgKZ56CEiXAUfynhhrUfz8c8-cAqPXzc6GlqG8e2MQrw3hZyhP4WkRaYsOOG4FKpuvm0w";
const RSA_E: &str = "AQAB";
const EC_X: &str = "Gf_0VpTB6cassAiPa9AW2kPp1pyXM7BDbyPZWoF5tW8";
const EC_Y: &str = "t9XfNFitiKYl-ZxC41WALeTRKaXL6glRITJ7vy49Gh8";
const HS_SECRET: &[u8] = b"an hs256 secret that is long enough";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The test JWKS, in a temporary file that is removed when the returned path is dropped. The
/// jwt policy reads it while the chain is built, so the path need only live that long.
fn jwks_file() -> tempfile::TempPath {
    use base64::Engine;
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(HS_SECRET);
    let jwks = json!({ "keys": [
        { "kty": "oct", "kid": "hs", "k": k },
        { "kty": "RSA", "kid": "rs", "n": RSA_N, "e": RSA_E },
        { "kty": "EC", "kid": "es", "crv": "P-256", "x": EC_X, "y": EC_Y },
    ]});
    temp_file(jwks.to_string().as_bytes())
}

fn token(alg: Algorithm, kid: &str, claims: serde_json::Value) -> String {
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(HS_SECRET),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).unwrap(),
        other => panic!("{other:?}"),
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    encode(&header, &claims, &key).unwrap()
}

fn good_claims() -> serde_json::Value {
    json!({ "sub": "alice", "iss": "https://issuer.test", "aud": "orders", "exp": now() + 300,
            "scope": "orders:read profile", "tenant": "t1" })
}

/// Upstream that echoes the headers the gateway forwarded.
async fn echo_upstream() -> Upstream {
    upstream(|parts, _body| async move {
        let h = |n: &str| {
            parts
                .headers
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let body = json!({ "user": h("x-user"), "tenant": h("x-tenant"), "key_id": h("x-key-id"),
                           "api_key": h("x-api-key"), "authorization": h("authorization"),
                           "path": parts.uri.to_string() });
        reply(
            200,
            &[("content-type", "application/json")],
            body.to_string(),
        )
    })
    .await
}

async fn jwt_gateway(up: &Upstream) -> std::net::SocketAddr {
    let jwks = jwks_file();
    let chain = chain_from_toml(&format!(
        r#"
        [[policies]]
        type = "jwt"
        jwks_file = "{}"
        issuers = ["https://issuer.test"]
        audiences = ["orders"]
        leeway_secs = 30
        required_claims = ["tenant"]
        required_scopes = ["orders:read"]
        forward_claims = {{ sub = "x-user", tenant = "x-tenant" }}
        "#,
        jwks.display()
    ));
    gateway(chain, one_group("app", up.addr), "app").await
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[tokio::test]
async fn jwt_accepts_valid_tokens_of_each_algorithm_and_forwards_claims() {
    let up = echo_upstream().await;
    let gw = jwt_gateway(&up).await;
    for (alg, kid) in [
        (Algorithm::HS256, "hs"),
        (Algorithm::RS256, "rs"),
        (Algorithm::ES256, "es"),
    ] {
        let auth = bearer(&token(alg, kid, good_claims()));
        // A client-sent x-user must not survive: the gateway sets it from the token.
        let got = get(
            gw,
            "/orders",
            &[("authorization", &auth), ("x-user", "mallory")],
        )
        .await;
        assert_eq!(got.status, 200, "{alg:?}: {:?}", got.body);
        let body = got.json();
        assert_eq!(body["user"], "alice", "{alg:?}");
        assert_eq!(body["tenant"], "t1");
    }
    assert_eq!(up.hits(), 3);
}

async fn assert_invalid(gw: std::net::SocketAddr, auth: &str, why: &str) {
    let got = get(gw, "/orders", &[("authorization", auth)]).await;
    assert_eq!(got.status, 401, "{why}: {:?}", got.body);
    let challenge = got.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer error=\"invalid_token\", error_description=\""),
        "{why}: {challenge}"
    );
}

#[tokio::test]
async fn jwt_rejects_expired_wrong_audience_forged_and_premature_tokens() {
    let up = echo_upstream().await;
    let gw = jwt_gateway(&up).await;

    let mut expired = good_claims();
    expired["exp"] = json!(now() - 120);
    assert_invalid(
        gw,
        &bearer(&token(Algorithm::RS256, "rs", expired)),
        "expired",
    )
    .await;

    let mut within_leeway = good_claims();
    within_leeway["exp"] = json!(now() - 5);
    let ok = get(
        gw,
        "/orders",
        &[(
            "authorization",
            &bearer(&token(Algorithm::RS256, "rs", within_leeway)),
        )],
    )
    .await;
    assert_eq!(ok.status, 200, "expired by less than the leeway");

    let mut wrong_aud = good_claims();
    wrong_aud["aud"] = json!("billing");
    assert_invalid(
        gw,
        &bearer(&token(Algorithm::ES256, "es", wrong_aud)),
        "wrong audience",
    )
    .await;

    let mut wrong_iss = good_claims();
    wrong_iss["iss"] = json!("https://evil.test");
    assert_invalid(
        gw,
        &bearer(&token(Algorithm::HS256, "hs", wrong_iss)),
        "wrong issuer",
    )
    .await;

    let mut not_yet = good_claims();
    not_yet["nbf"] = json!(now() + 600);
    assert_invalid(
        gw,
        &bearer(&token(Algorithm::RS256, "rs", not_yet)),
        "nbf in the future",
    )
    .await;
    // A time that is not an integer: jsonwebtoken alone would skip such an nbf.
    for (nbf, why) in [
        (json!((now() + 600).to_string()), "nbf a string"),
        (json!(true), "nbf a boolean"),
        (json!(now() as f64 + 600.5), "nbf a fraction in the future"),
    ] {
        let mut odd = good_claims();
        odd["nbf"] = nbf;
        assert_invalid(gw, &bearer(&token(Algorithm::HS256, "hs", odd)), why).await;
    }
    let mut past_fraction = good_claims();
    past_fraction["nbf"] = json!(now() as f64 - 60.5);
    let ok = get(
        gw,
        "/orders",
        &[(
            "authorization",
            &bearer(&token(Algorithm::HS256, "hs", past_fraction)),
        )],
    )
    .await;
    assert_eq!(ok.status, 200, "an nbf in the past, with a fraction");

    // Forged: wrong HMAC secret.
    let forged = encode(
        &{
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("hs".into());
            h
        },
        &good_claims(),
        &EncodingKey::from_secret(b"guessed secret"),
    )
    .unwrap();
    assert_invalid(gw, &bearer(&forged), "wrong HMAC secret").await;

    // Forged: payload swapped under a valid RS256 signature.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let valid = token(Algorithm::RS256, "rs", good_claims());
    let parts: Vec<&str> = valid.split('.').collect();
    let mut evil = good_claims();
    evil["sub"] = json!("mallory");
    let tampered = format!("{}.{}.{}", parts[0], b64.encode(evil.to_string()), parts[2]);
    assert_invalid(gw, &bearer(&tampered), "tampered payload").await;

    // Forged: algorithm confusion, HS256 signed with the RSA key's public modulus under kid rs.
    let confused = encode(
        &{
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("rs".into());
            h
        },
        &good_claims(),
        &EncodingKey::from_secret(RSA_N.as_bytes()),
    )
    .unwrap();
    assert_invalid(gw, &bearer(&confused), "alg confusion").await;

    assert_invalid(gw, "Bearer not.a.jwt", "garbage").await;
    let missing = get(gw, "/orders", &[]).await;
    assert_eq!(missing.status, 401);

    let mut no_tenant = good_claims();
    no_tenant.as_object_mut().unwrap().remove("tenant");
    assert_invalid(
        gw,
        &bearer(&token(Algorithm::HS256, "hs", no_tenant)),
        "missing claim",
    )
    .await;

    let mut no_scope = good_claims();
    no_scope["scope"] = json!("profile");
    let got = get(
        gw,
        "/orders",
        &[(
            "authorization",
            &bearer(&token(Algorithm::HS256, "hs", no_scope)),
        )],
    )
    .await;
    assert_eq!(got.status, 403);
    assert!(got
        .header("www-authenticate")
        .unwrap()
        .contains("insufficient_scope"));

    assert_eq!(
        up.hits(),
        2,
        "only the within-leeway and the past-nbf requests reached the upstream"
    );
}

#[tokio::test]
async fn api_keys_from_header_or_query_are_checked_against_hashes() {
    use sha2::Digest;
    let up = echo_upstream().await;
    let hash = hex::encode(sha2::Sha256::digest(b"s3cret-key-1"));
    let chain = chain_from_toml(&format!(
        r#"
        [[policies]]
        type = "api_key"
        query_param = "api_key"
        id_header = "x-key-id"
        keys = [{{ id = "team-a", sha256 = "{hash}" }}, {{ id = "team-b", sha256 = "{}" }}]
        "#,
        "ab".repeat(32)
    ));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;

    let got = get(
        gw,
        "/x",
        &[("x-api-key", "s3cret-key-1"), ("x-key-id", "spoofed")],
    )
    .await;
    assert_eq!(got.status, 200);
    let body = got.json();
    assert_eq!(body["key_id"], "team-a");
    assert_eq!(
        body["api_key"],
        serde_json::Value::Null,
        "the key is not forwarded"
    );

    let got = get(gw, "/x?a=1&api_key=s3cret-key-1", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.json()["path"],
        "/x?a=1",
        "the key parameter is not forwarded"
    );

    assert_eq!(get(gw, "/x", &[("x-api-key", "wrong")]).await.status, 401);
    assert_eq!(get(gw, "/x?api_key=wrong", &[]).await.status, 401);
    assert_eq!(get(gw, "/x", &[]).await.status, 401);
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn basic_auth_verifies_argon2_hashes() {
    use base64::Engine;
    let up = echo_upstream().await;
    // Cheap parameters keep the test fast; the PHC string carries them.
    let phc = argon2id_phc("correct horse", 64, 1);
    let chain = chain_from_toml(&format!(
        r#"
        [[policies]]
        type = "basic_auth"
        realm = "ops"
        user_header = "x-user"
        users = {{ alice = "{phc}" }}
        "#
    ));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    let basic = |u: &str, p: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    };

    let got = get(
        gw,
        "/",
        &[("authorization", &basic("alice", "correct horse"))],
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["user"], "alice");
    assert_eq!(got.json()["authorization"], serde_json::Value::Null);

    for auth in [
        basic("alice", "wrong"),
        basic("bob", "correct horse"),
        "Basic !!!".into(),
    ] {
        let got = get(gw, "/", &[("authorization", &auth)]).await;
        assert_eq!(got.status, 401, "{auth}");
        assert_eq!(
            got.header("www-authenticate"),
            Some("Basic realm=\"ops\", charset=\"UTF-8\"")
        );
    }
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn jwks_url_is_fetched_once_and_reused() {
    let jwks = std::fs::read_to_string(jwks_file()).unwrap();
    let keys = upstream(move |_, _| {
        let jwks = jwks.clone();
        async move { reply(200, &[("content-type", "application/json")], jwks) }
    })
    .await;
    let up = echo_upstream().await;
    let chain = chain_from_toml(&format!(
        "[[policies]]\ntype = \"jwt\"\njwks_url = \"http://{}/jwks.json\"\njwks_refresh_secs = 3600",
        keys.addr
    ));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    for (alg, kid) in [
        (Algorithm::ES256, "es"),
        (Algorithm::RS256, "rs"),
        (Algorithm::HS256, "hs"),
    ] {
        let got = get(
            gw,
            "/",
            &[("authorization", &bearer(&token(alg, kid, good_claims())))],
        )
        .await;
        assert_eq!(got.status, 200, "{alg:?}");
    }
    assert_eq!(keys.hits(), 1, "keys are fetched once per refresh interval");
}

/// The whole test JWKS, and one with only its HS256 key.
fn full_and_hs_only_jwks() -> (String, String) {
    let full = std::fs::read_to_string(jwks_file()).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&full).unwrap();
    let only_hs = json!({ "keys": [parsed["keys"][0].clone()] });
    (full, only_hs.to_string())
}

/// A JWKS server publishing what `served` holds at each request, and a gateway refreshing
/// from it every second. Returns the JWKS server and the gateway address.
async fn refreshing_jwt_gateway(
    served: std::sync::Arc<std::sync::Mutex<String>>,
    up: &Upstream,
) -> (Upstream, std::net::SocketAddr) {
    let keys = upstream(move |_, _| {
        let jwks = served.lock().unwrap().clone();
        async move { reply(200, &[("content-type", "application/json")], jwks) }
    })
    .await;
    let chain = chain_from_toml(&format!(
        "[[policies]]\ntype = \"jwt\"\njwks_url = \"http://{}/jwks.json\"\njwks_refresh_secs = 1",
        keys.addr
    ));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    (keys, gw)
}

#[tokio::test]
async fn jwks_url_refresh_picks_up_rotated_keys() {
    use std::sync::{Arc, Mutex};
    let (full_jwks, only_hs) = full_and_hs_only_jwks();
    let served = Arc::new(Mutex::new(only_hs));
    let up = echo_upstream().await;
    let (keys, gw) = refreshing_jwt_gateway(served.clone(), &up).await;
    let rs = bearer(&token(Algorithm::RS256, "rs", good_claims()));
    assert_eq!(
        get(gw, "/", &[("authorization", &rs)]).await.status,
        401,
        "rs not published yet"
    );

    *served.lock().unwrap() = full_jwks;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        get(gw, "/", &[("authorization", &rs)]).await.status,
        200,
        "rotated key picked up"
    );
    assert_eq!(keys.hits(), 2);
}

/// A verified token is remembered, but its `exp` is still checked on every request.
#[tokio::test]
async fn remembered_token_is_refused_once_it_expires() {
    let up = echo_upstream().await;
    let jwks = jwks_file();
    let chain = chain_from_toml(&format!(
        "[[policies]]\ntype = \"jwt\"\njwks_file = \"{}\"\nleeway_secs = 0",
        jwks.display()
    ));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    let exp = now() + 2;
    let auth = bearer(&token(
        Algorithm::RS256,
        "rs",
        json!({ "sub": "alice", "exp": exp }),
    ));
    for _ in 0..3 {
        assert_eq!(get(gw, "/", &[("authorization", &auth)]).await.status, 200);
    }
    while now() <= exp {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_invalid(gw, &auth, "expired after being remembered").await;
    assert_eq!(up.hits(), 3);
}

/// A remembered token stops working when the key that signed it leaves the JWKS.
#[tokio::test]
async fn remembered_token_is_refused_after_its_key_is_withdrawn() {
    use std::sync::{Arc, Mutex};
    let (full_jwks, only_hs) = full_and_hs_only_jwks();
    let served = Arc::new(Mutex::new(full_jwks));
    let up = echo_upstream().await;
    let (keys, gw) = refreshing_jwt_gateway(served.clone(), &up).await;
    let rs = bearer(&token(Algorithm::RS256, "rs", good_claims()));
    let hs = bearer(&token(Algorithm::HS256, "hs", good_claims()));
    for auth in [&rs, &rs, &hs] {
        assert_eq!(get(gw, "/", &[("authorization", auth)]).await.status, 200);
    }
    *served.lock().unwrap() = only_hs;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(get(gw, "/", &[("authorization", &hs)]).await.status, 200);
    assert!(keys.hits() >= 2, "the JWKS was fetched again");
    assert_eq!(
        get(gw, "/", &[("authorization", &rs)]).await.status,
        401,
        "a token of a withdrawn key must not be served from memory"
    );
}

/// Builds a policy list written as route TOML, returning the build error as text.
fn try_chain(policies_toml: &str) -> Result<l7_proxy::policy::PolicyChain, String> {
    #[derive(serde::Deserialize)]
    struct Route {
        policies: Vec<l7_proxy::policy::PolicyConfig>,
    }
    let route: Route = toml::from_str(policies_toml).map_err(|e| e.to_string())?;
    l7_proxy::policy::build_chain(&route.policies).map_err(|e| e.to_string())
}

/// A JWKS as Keycloak publishes it (an RSA-OAEP encryption key next to the RS256 signing key),
/// plus a key of an algorithm the policy does not support (ES512).
fn jwks_with_keys_to_skip() -> String {
    json!({ "keys": [
        { "kty": "RSA", "kid": "enc", "alg": "RSA-OAEP", "use": "enc", "n": RSA_N, "e": RSA_E },
        { "kty": "EC", "kid": "p521", "crv": "P-521", "alg": "ES512", "x": EC_X, "y": EC_Y },
        { "kty": "RSA", "kid": "rs", "alg": "RS256", "use": "sig", "n": RSA_N, "e": RSA_E },
    ]})
    .to_string()
}

/// Keys the policy cannot use are skipped (RFC 7517 section 5), from a file and from a URL.
#[tokio::test]
async fn jwks_encryption_and_unsupported_keys_are_skipped() {
    let up = echo_upstream().await;
    let rs = bearer(&token(Algorithm::RS256, "rs", good_claims()));

    let file = temp_file(jwks_with_keys_to_skip().as_bytes());
    let chain = try_chain(&format!(
        "[[policies]]\ntype = \"jwt\"\njwks_file = \"{}\"",
        file.display()
    ))
    .expect("a JWKS with one usable key builds");
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    assert_eq!(get(gw, "/", &[("authorization", &rs)]).await.status, 200);

    let keys = upstream(|_, _| async {
        reply(
            200,
            &[("content-type", "application/json")],
            jwks_with_keys_to_skip(),
        )
    })
    .await;
    let chain = chain_from_toml(&format!(
        "[[policies]]\ntype = \"jwt\"\njwks_url = \"http://{}/jwks.json\"",
        keys.addr
    ));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    assert_eq!(get(gw, "/", &[("authorization", &rs)]).await.status, 200);
    assert_eq!(keys.hits(), 1);
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn jwks_without_a_usable_key_is_a_build_error_naming_each_key() {
    let jwks = json!({ "keys": [
        { "kty": "RSA", "kid": "enc", "alg": "RSA-OAEP", "use": "enc", "n": RSA_N, "e": RSA_E },
        { "kty": "EC", "kid": "p521", "crv": "P-521", "alg": "ES512", "x": EC_X, "y": EC_Y },
    ]});
    let file = temp_file(jwks.to_string().as_bytes());
    let e = try_chain(&format!(
        "[[policies]]\ntype = \"jwt\"\njwks_file = \"{}\"",
        file.display()
    ))
    .err()
    .expect("no usable key");
    assert!(
        e.contains("no usable key") && e.contains("\"enc\"") && e.contains("\"p521\""),
        "{e}"
    );
}

/// A JWKS server that sends its response head and then stalls mid-body must not hold requests
/// (which wait for the first keys) beyond the fetch timeout.
#[tokio::test]
async fn stalled_jwks_body_times_out_instead_of_hanging_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{\"keys\":[";
                let _ = s.write_all(head.as_bytes()).await;
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            });
        }
    });
    let up = echo_upstream().await;
    let chain = chain_from_toml(&format!(
        "[[policies]]\ntype = \"jwt\"\njwks_url = \"http://{addr}/jwks.json\""
    ));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    let auth = bearer(&token(Algorithm::RS256, "rs", good_claims()));
    let started = std::time::Instant::now();
    let got = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        get(gw, "/", &[("authorization", &auth)]),
    )
    .await
    .expect("the request still waits on the JWKS body after 10 s (fetch timeout is 5 s)");
    assert_eq!(got.status, 401, "no keys could be fetched");
    assert!(started.elapsed() >= std::time::Duration::from_secs(4));
    assert_eq!(up.hits(), 0);
}

/// A JWKS over the size limit is refused, and the keys fetched before stay in use.
#[tokio::test]
async fn oversized_jwks_refresh_keeps_the_previous_keys() {
    use std::sync::{Arc, Mutex};
    let (full_jwks, only_hs) = full_and_hs_only_jwks();
    let served = Arc::new(Mutex::new(full_jwks));
    let up = echo_upstream().await;
    let (keys, gw) = refreshing_jwt_gateway(served.clone(), &up).await;
    let rs = bearer(&token(Algorithm::RS256, "rs", good_claims()));
    assert_eq!(get(gw, "/", &[("authorization", &rs)]).await.status, 200);
    // Valid JSON without the rs key, padded past 1 MiB: were it accepted, rs would be gone.
    *served.lock().unwrap() = format!("{only_hs}{}", " ".repeat(1 << 20));
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        get(gw, "/", &[("authorization", &rs)]).await.status,
        200,
        "the oversized JWKS replaced the keys"
    );
    assert!(keys.hits() >= 2, "the JWKS was fetched again");
}

/// After verification the bearer token is removed, as Envoy's jwt_authn (`forward: false`)
/// does, unless `forward_token = true`.
#[tokio::test]
async fn jwt_removes_the_bearer_token_unless_forward_token_is_set() {
    let up = echo_upstream().await;
    let gw = jwt_gateway(&up).await;
    let auth = bearer(&token(Algorithm::RS256, "rs", good_claims()));
    let got = get(gw, "/orders", &[("authorization", &auth)]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["authorization"], serde_json::Value::Null);
    assert_eq!(got.json()["user"], "alice");

    let jwks = jwks_file();
    let chain = chain_from_toml(&format!(
        "[[policies]]\ntype = \"jwt\"\njwks_file = \"{}\"\nforward_token = true",
        jwks.display()
    ));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    let got = get(gw, "/orders", &[("authorization", &auth)]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["authorization"], auth.as_str());
}

/// RFC 9110 section 15.5.2: a 401 carries WWW-Authenticate, even when the token's own text
/// (here a control character in `alg`) ends up in the error description.
#[tokio::test]
async fn jwt_401_always_carries_a_challenge() {
    use base64::Engine;
    let up = echo_upstream().await;
    let gw = jwt_gateway(&up).await;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let t = format!("{}.{}.sig", b64("{\"alg\":\"HS256\\u0001\"}"), b64("{}"));
    let got = get(gw, "/orders", &[("authorization", &bearer(&t))]).await;
    assert_eq!(got.status, 401);
    let challenge = got.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer error=\"invalid_token\", error_description=\""),
        "challenge {challenge:?}; body {:?}",
        got.body
    );
    assert!(challenge.bytes().all(|b| (b' '..=b'~').contains(&b)));
}

/// An RSA key without `alg` verifies PS256 as well as RS256 (as Envoy).
#[tokio::test]
async fn ps256_verifies_with_an_rsa_key_without_alg() {
    let up = echo_upstream().await;
    let jwks = jwks_file();
    let chain = chain_from_toml(&format!(
        "[[policies]]\ntype = \"jwt\"\njwks_file = \"{}\"\nalgorithms = [\"PS256\", \"RS256\"]",
        jwks.display()
    ));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    let key = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap();
    let mut h = Header::new(Algorithm::PS256);
    h.kid = Some("rs".into());
    let t = encode(&h, &good_claims(), &key).unwrap();
    let got = get(gw, "/", &[("authorization", &bearer(&t))]).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
}

#[tokio::test]
async fn api_key_401_carries_a_key_challenge_and_an_empty_header_defers_to_the_query() {
    use sha2::Digest;
    let up = echo_upstream().await;
    let hash = hex::encode(sha2::Sha256::digest(b"s3cret-key-1"));
    let policy = |extra: &str| {
        chain_from_toml(&format!(
            "[[policies]]\ntype = \"api_key\"\nquery_param = \"api_key\"\n{extra}\nkeys = [{{ id = \"a\", sha256 = \"{hash}\" }}]"
        ))
    };
    let gw = gateway(policy(""), one_group("app", up.addr), "app").await;
    for (path, headers) in [
        ("/", &[][..]),
        ("/", &[("x-api-key", "wrong")][..]),
        ("/?api_key=wrong", &[][..]),
    ] {
        let got = get(gw, path, headers).await;
        assert_eq!(got.status, 401, "{path} {headers:?}");
        assert_eq!(got.header("www-authenticate"), Some("Key realm=\"api\""));
    }
    let got = get(gw, "/x?api_key=s3cret-key-1", &[("x-api-key", "")]).await;
    assert_eq!(got.status, 200, "an empty header hid the query key");
    assert_eq!(got.json()["path"], "/x");
    assert_eq!(got.json()["api_key"], serde_json::Value::Null);

    let gw = gateway(
        policy("realm = \"orders\""),
        one_group("app", up.addr),
        "app",
    )
    .await;
    let got = get(gw, "/", &[]).await;
    assert_eq!(got.header("www-authenticate"), Some("Key realm=\"orders\""));
    assert_eq!(up.hits(), 1);
}

/// A hash Argon2 cannot verify would lock its user out: it is a build error naming the user.
#[tokio::test]
async fn basic_auth_rejects_hashes_that_can_never_verify() {
    let phc = argon2id_phc("pw", 64, 1);
    let params = "$argon2id$v=19$m=64,t=1,p=1$";
    assert!(try_chain(&format!(
        "[[policies]]\ntype = \"basic_auth\"\nusers = {{ alice = \"{phc}\" }}"
    ))
    .is_ok());
    for bad in [
        phc.replace(params, "$scrypt$ln=15,r=8,p=1$"),
        phc.replace(params, "$argon2id$v=19$m=1,t=1,p=1$"),
    ] {
        let e = try_chain(&format!(
            "[[policies]]\ntype = \"basic_auth\"\nusers = {{ alice = \"{phc}\", bob = \"{bad}\" }}"
        ))
        .err()
        .unwrap_or_else(|| panic!("{bad} was accepted"));
        assert!(e.contains("users.bob"), "{e}");
    }
}

/// An unknown user costs an Argon2 run like a known one, so timing does not reveal which
/// users exist.
#[tokio::test]
async fn basic_auth_unknown_user_costs_as_much_as_a_known_one() {
    use base64::Engine;
    let up = echo_upstream().await;
    let phc = argon2id_phc("pw", 8192, 2);
    let chain = chain_from_toml(&format!(
        "[[policies]]\ntype = \"basic_auth\"\nusers = {{ alice = \"{phc}\" }}"
    ));
    let gw = gateway(chain, one_group("app", up.addr), "app").await;
    let basic = |user: &str| {
        let creds = format!("{user}:wrong");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(creds)
        )
    };
    let time = |auth: String| async move {
        let started = std::time::Instant::now();
        for _ in 0..3 {
            assert_eq!(get(gw, "/", &[("authorization", &auth)]).await.status, 401);
        }
        started.elapsed()
    };
    let known = time(basic("alice")).await;
    let unknown = time(basic("mallory")).await;
    assert!(
        unknown * 3 > known,
        "unknown user answered in {unknown:?}, known in {known:?}"
    );
    assert_eq!(up.hits(), 0);
}
