//! TLS termination: SNI certificate choice, ALPN h2, TLS versions, mTLS, certificate reload.

use crate::support::*;

fn tls_config(up: &TestUpstream, tls_section: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "tls"
address = "127.0.0.1:0"
{tls_section}

[[upstreams]]
name = "up"
members = {}

[[routes]]
name = "all"
action = {{ forward = {{ group = "up" }} }}
"#,
        members(&[up])
    )
}

fn certs_section(
    pairs: &[(std::path::PathBuf, std::path::PathBuf)],
    client_ca: Option<&std::path::Path>,
) -> String {
    let mut s = String::from("[listeners.tls]\n");
    if let Some(ca) = client_ca {
        s.push_str(&format!("client_ca = {:?}\n", ca.display().to_string()));
    }
    for (cert, key) in pairs {
        s.push_str(&format!(
            "[[listeners.tls.certs]]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ));
    }
    s
}

fn leaf_der(stream: &TlsStream) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn pem_der(path: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path)
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn sni_picks_the_certificate_and_h2_is_negotiated() {
    let up = TestUpstream::start("secure").await;
    let pki = TestPki::new("test ca");
    let file = ConfigFile::new("");
    let dir = file.dir();
    let a = pki.write(&dir, "a", &["a.example.com"]);
    let b = pki.write(&dir, "b", &["*.b.example.com"]);
    let proxy = start_proxy(&tls_config(
        &up,
        &certs_section(&[a.clone(), b.clone()], None),
    ))
    .await;
    let addr = proxy.listener_addr("tls").unwrap();
    let tls13 = &[&rustls::version::TLS13];

    let config = pki.client_config(&[b"h2", b"http/1.1"], tls13, None);
    let s = tls_connect(addr, "x.b.example.com", config.clone())
        .await
        .unwrap();
    assert_eq!(
        leaf_der(&s),
        pem_der(&b.0),
        "SNI x.b.example.com gets the wildcard cert"
    );
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let answer = tls_get(s, "x.b.example.com", "/").await.unwrap();
    assert_eq!(answer.body, "secure");
    assert_eq!(answer.headers["x-test-version"], "HTTP/2.0");
    assert_eq!(up.last().headers["x-forwarded-proto"], "https");
    assert_eq!(up.last().headers["host"], "x.b.example.com");

    let s = tls_connect(addr, "a.example.com", config).await.unwrap();
    assert_eq!(
        leaf_der(&s),
        pem_der(&a.0),
        "SNI a.example.com gets its own cert"
    );

    // HTTP/1.1 by ALPN, over TLS 1.2.
    let config = pki.client_config(&[b"http/1.1"], &[&rustls::version::TLS12], None);
    let s = tls_connect(addr, "a.example.com", config).await.unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let answer = tls_get(s, "a.example.com", "/").await.unwrap();
    assert_eq!(answer.headers["x-test-version"], "HTTP/1.1");
    assert_eq!(answer.upstream(), "secure");
    proxy.shutdown().await;
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_ca() {
    let up = TestUpstream::start("mtls").await;
    let pki = TestPki::new("server ca");
    let clients = TestPki::new("client ca");
    let file = ConfigFile::new("");
    let dir = file.dir();
    let server = pki.write(&dir, "server", &["api.example.com"]);
    let ca_path = dir.join("client-ca.pem");
    std::fs::write(&ca_path, &clients.ca_pem).unwrap();
    let proxy = start_proxy(&tls_config(&up, &certs_section(&[server], Some(&ca_path)))).await;
    let addr = proxy.listener_addr("tls").unwrap();
    let versions = &[&rustls::version::TLS13];

    let with_cert = pki.client_config(&[b"h2"], versions, Some(clients.issue(&["client-1"])));
    let s = tls_connect(addr, "api.example.com", with_cert)
        .await
        .unwrap();
    assert_eq!(
        tls_get(s, "api.example.com", "/").await.unwrap().body,
        "mtls"
    );

    let without = pki.client_config(&[b"h2"], versions, None);
    let refused = match tls_connect(addr, "api.example.com", without).await {
        Err(_) => true,
        Ok(s) => tls_get(s, "api.example.com", "/").await.is_err(),
    };
    assert!(refused, "a client without a certificate is refused");
    let wrong_ca = pki.client_config(&[b"h2"], versions, Some(pki.issue(&["client-2"])));
    let refused = match tls_connect(addr, "api.example.com", wrong_ca).await {
        Err(_) => true,
        Ok(s) => tls_get(s, "api.example.com", "/").await.is_err(),
    };
    assert!(refused, "a certificate from another CA is refused");
    assert_eq!(up.hits(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn certificates_reload_with_the_config() {
    let up = TestUpstream::start("rotated").await;
    let pki = TestPki::new("ca");
    let file = ConfigFile::new("");
    let dir = file.dir();
    let old = pki.write(&dir, "old", &["a.example.com"]);
    let new = pki.write(&dir, "new", &["a.example.com"]);
    file.write(&tls_config(
        &up,
        &certs_section(std::slice::from_ref(&old), None),
    ));
    let proxy = l7_proxy::Proxy::start_from_file(&file.path).await.unwrap();
    let addr = proxy.listener_addr("tls").unwrap();
    let config = pki.client_config(&[b"h2"], &[&rustls::version::TLS13], None);
    let s = tls_connect(addr, "a.example.com", config.clone())
        .await
        .unwrap();
    assert_eq!(leaf_der(&s), pem_der(&old.0));

    file.write(&tls_config(
        &up,
        &certs_section(std::slice::from_ref(&new), None),
    ));
    proxy.reload_from_file().await.unwrap();
    assert_eq!(proxy.listener_addr("tls"), Some(addr), "same socket");
    let s = tls_connect(addr, "a.example.com", config).await.unwrap();
    assert_eq!(leaf_der(&s), pem_der(&new.0));
    assert_eq!(
        tls_get(s, "a.example.com", "/").await.unwrap().body,
        "rotated"
    );

    // A missing key file is rejected and the new certificate keeps serving.
    let broken = (new.0.clone(), dir.join("missing.key"));
    file.write(&tls_config(&up, &certs_section(&[broken], None)));
    let err = proxy.reload_from_file().await.unwrap_err().to_string();
    assert!(err.contains("listeners[0].tls.certs[0].key"), "{err}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn returning_clients_resume_with_session_tickets_until_a_reload() {
    use rustls::HandshakeKind::{Full, Resumed};
    let up = TestUpstream::start("resumed").await;
    let pki = TestPki::new("ca");
    let file = ConfigFile::new("");
    let cert = pki.write(&file.dir(), "a", &["a.example.com"]);
    file.write(&tls_config(
        &up,
        &certs_section(std::slice::from_ref(&cert), None),
    ));
    let proxy = l7_proxy::Proxy::start_from_file(&file.path).await.unwrap();
    let addr = proxy.listener_addr("tls").unwrap();
    // One request per connection, as a client that comes back later; the client keeps the
    // tickets it was given (in its config's session store).
    let visit = |config| async move {
        let s = tls_connect(addr, "a.example.com", config).await.unwrap();
        let kind = s.get_ref().1.handshake_kind();
        assert_eq!(
            tls_get(s, "a.example.com", "/").await.unwrap().body,
            "resumed"
        );
        kind
    };
    let tls13 = pki.client_config(&[b"http/1.1"], &[&rustls::version::TLS13], None);
    let tls12 = pki.client_config(&[b"http/1.1"], &[&rustls::version::TLS12], None);
    for config in [&tls13, &tls12] {
        assert_eq!(visit(config.clone()).await, Some(Full));
        assert_eq!(visit(config.clone()).await, Some(Resumed));
        assert_eq!(visit(config.clone()).await, Some(Resumed));
    }
    // A reload makes new ticket keys (it may have changed the certificates): full handshakes,
    // then resumption again.
    proxy.reload_from_file().await.unwrap();
    assert_eq!(visit(tls13.clone()).await, Some(Full));
    assert_eq!(visit(tls13.clone()).await, Some(Resumed));

    // Without tickets nothing resumes: the proxy keeps no session cache.
    file.write(&tls_config(
        &up,
        &certs_section(std::slice::from_ref(&cert), None).replace(
            "[listeners.tls]\n",
            "[listeners.tls]\nsession_tickets = false\n",
        ),
    ));
    proxy.reload_from_file().await.unwrap();
    for config in [&tls13, &tls12] {
        assert_eq!(visit(config.clone()).await, Some(Full));
        assert_eq!(visit(config.clone()).await, Some(Full));
    }
    proxy.shutdown().await;
}

/// A proxy that answers every request with the JSON `body` over TLS, with a certificate for
/// 127.0.0.1 from a fresh test CA (an identity provider, or a service a policy calls). Returns
/// it, its port, and the CA's PEM file (in `dir`).
async fn tls_json_server(
    dir: &std::path::Path,
    body: &str,
) -> (l7_proxy::ProxyHandle, u16, std::path::PathBuf) {
    let pki = TestPki::new("policy fetch ca");
    let (cert, key) = pki.write(dir, "svc", &["127.0.0.1"]);
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let server = start_proxy(&format!(
        r#"
[[listeners]]
name = "tls"
address = "127.0.0.1:0"
tls = {{ certs = [{{ cert = {:?}, key = {:?} }}] }}
[[routes]]
name = "json"
action = {{ fixed = {{ status = 200, body = '{body}', headers = {{ content-type = "application/json" }} }} }}
"#,
        cert.display().to_string(),
        key.display().to_string()
    ))
    .await;
    let port = server.listener_addr("tls").unwrap().port();
    (server, port, ca)
}

/// A gateway forwarding everything to `up` through `policy` (a TOML inline table).
async fn gateway_with(up: &TestUpstream, policy: &str) -> l7_proxy::ProxyHandle {
    start_proxy(&format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
[[upstreams]]
name = "up"
members = {}
[[routes]]
name = "all"
action = {{ forward = {{ group = "up" }} }}
policies = [{policy}]
"#,
        members(&[up])
    ))
    .await
}

/// A `jwt` policy fetches its JWKS over HTTPS, verifying the server against `jwks_ca_file`
/// (identity providers publish their keys over HTTPS only). Here another proxy instance, with
/// a certificate from a test CA, serves the JWKS as a fixed response. A gateway that trusts
/// only the system's CAs refuses that server, so no key is ever loaded and tokens get 401.
#[tokio::test]
async fn jwt_fetches_its_jwks_over_https_and_verifies_the_server() {
    use base64::Engine;
    let file = ConfigFile::new("");
    let secret = b"https-jwks-secret";
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    let jwks = format!(r#"{{"keys":[{{"kty":"oct","kid":"k1","alg":"HS256","k":"{k}"}}]}}"#);
    let (idp, port, ca) = tls_json_server(&file.dir(), &jwks).await;
    let up = TestUpstream::start("api").await;
    let policy = format!(
        r#"{{ type = "jwt", jwks_url = "https://127.0.0.1:{port}/jwks.json", algorithms = ["HS256"]"#
    );
    let trusting = gateway_with(
        &up,
        &format!("{policy}, jwks_ca_file = {:?} }}", ca.display().to_string()),
    )
    .await;
    let system_only = gateway_with(&up, &format!("{policy} }}")).await;

    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k1".into());
    let sign = |key: &[u8]| {
        jsonwebtoken::encode(
            &header,
            &serde_json::json!({ "sub": "alice", "exp": exp }),
            &jsonwebtoken::EncodingKey::from_secret(key),
        )
        .unwrap()
    };
    let c = client();
    let ask = |proxy: std::net::SocketAddr, token: String| {
        let c = c.clone();
        async move {
            let req = http::Request::get(format!("http://{proxy}/"))
                .header("host", "h")
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            send(&c, req).await
        }
    };
    let web = trusting.listener_addr("web").unwrap();
    let got = ask(web, sign(secret)).await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.body, "api");
    assert_eq!(ask(web, sign(b"guessed")).await.status, 401);

    let refused = ask(system_only.listener_addr("web").unwrap(), sign(secret)).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(up.hits(), 1);
    for p in [idp, trusting, system_only] {
        p.shutdown().await;
    }
}

/// An `aggregate` call to an `https://` service, verified against `ca_file`: another proxy
/// instance serves JSON over TLS with a test CA's certificate.
#[tokio::test]
async fn aggregate_calls_https_services_verified_against_ca_file() {
    let file = ConfigFile::new("");
    let (svc, port, ca) = tls_json_server(&file.dir(), r#"{"name":"alice"}"#).await;
    let up = TestUpstream::start("unused").await;
    let policy = format!(
        r#"{{ type = "aggregate", on_error = "partial", calls = [{{ key = "user", url = "https://127.0.0.1:{port}/user" }}]"#
    );
    let trusting = gateway_with(
        &up,
        &format!("{policy}, ca_file = {:?} }}", ca.display().to_string()),
    )
    .await;
    let system_only = gateway_with(&up, &format!("{policy} }}")).await;
    let c = client();
    let got = get(&c, trusting.listener_addr("web").unwrap(), "h", "/").await;
    assert_eq!(got.status, 200, "{}", got.body);
    let body: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(body["user"], serde_json::json!({ "name": "alice" }));

    // Trusting only the system's CAs, the call fails on the certificate, and says so.
    let got = get(&c, system_only.listener_addr("web").unwrap(), "h", "/").await;
    let body: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(body["user"], serde_json::Value::Null, "{body}");
    let why = body["_errors"]["user"].as_str().unwrap_or_default();
    assert!(why.contains("certificate"), "{body}");
    assert_eq!(up.hits(), 0);
    for p in [svc, trusting, system_only] {
        p.shutdown().await;
    }
}
