//! TLS to upstream members (`tls` on a group): certificates verified against the group's CA
//! for its `server_name`, client certificates for members that ask (mTLS), HTTP/2 by ALPN
//! with `protocol = "h2"`, and config errors that name the field.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use crate::support::*;

/// What the TLS member saw of each request: SNI, ALPN protocol, HTTP version.
type SeenTls = Arc<Mutex<Vec<(Option<String>, Option<String>, http::Version)>>>;

/// An HTTPS member with a certificate for `up.internal` from `pki`, which requires a client
/// certificate from `clients` and answers `tls ok`.
async fn tls_member(pki: &TestPki, clients: &TestPki) -> (SocketAddr, SeenTls) {
    let (cert, key) = pki.issue(&["up.internal"]);
    let mut client_roots = rustls::RootCertStore::empty();
    client_roots
        .add(CertificateDer::from_pem_slice(clients.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: SeenTls = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, record) = (acceptor.clone(), record.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (_, conn) = tls.get_ref();
                let sni = conn.server_name().map(str::to_string);
                let alpn = conn
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                let service = service_fn(move |req: Request<Incoming>| {
                    record
                        .lock()
                        .unwrap()
                        .push((sni.clone(), alpn.clone(), req.version()));
                    async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"tls ok"))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn members_over_tls_are_verified_and_get_client_certificates() {
    let pki = TestPki::new("upstream ca");
    let other = TestPki::new("some other ca");
    let clients = TestPki::new("proxy client ca");
    let (member, seen) = tls_member(&pki, &clients).await;
    let file = ConfigFile::new("");
    let dir = file.dir();
    let path = |name: &str, pem: &str| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        format!("{:?}", p.display().to_string())
    };
    let ca = path("ca.pem", &pki.ca_pem);
    let other_ca = path("other.pem", &other.ca_pem);
    let (cert, key) = clients.issue(&["proxy.internal"]);
    let (cert, key) = (path("client.crt", &cert), path("client.key", &key));
    let group = |name: &str, extra: &str, tls: &str| {
        format!(
            "[[upstreams]]\nname = \"{name}\"\n{extra}members = [{{ address = \"{member}\" }}]\ntls = {{ {tls} }}\n\
             [[routes]]\nname = \"{name}\"\nmatch = {{ path = {{ prefix = \"/{name}\" }} }}\n\
             action = {{ forward = {{ group = \"{name}\" }} }}\n"
        )
    };
    let with_cert = format!("client_cert = {cert}, client_key = {key}");
    let config = [
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n".to_string(),
        group(
            "ok",
            "",
            &format!("ca = {ca}, server_name = \"up.internal\", {with_cert}"),
        ),
        group(
            "h2",
            "protocol = \"h2\"\n",
            &format!("ca = {ca}, server_name = \"up.internal\", {with_cert}"),
        ),
        group(
            "wrongca",
            "",
            &format!("ca = {other_ca}, server_name = \"up.internal\", {with_cert}"),
        ),
        group(
            "wrongname",
            "",
            &format!("ca = {ca}, server_name = \"db.internal\", {with_cert}"),
        ),
        group(
            "nocert",
            "",
            &format!("ca = {ca}, server_name = \"up.internal\""),
        ),
    ]
    .concat();
    let proxy = start_proxy(&config).await;
    let addr = proxy.listener_addr("web").unwrap();
    let c = client();

    let a = get(&c, addr, "shop.example.com", "/ok/x").await;
    assert_eq!((a.status.as_u16(), a.body.as_str()), (200, "tls ok"));
    let a = get(&c, addr, "shop.example.com", "/h2/x").await;
    assert_eq!((a.status.as_u16(), a.body.as_str()), (200, "tls ok"));
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0].0.as_deref(), Some("up.internal"), "SNI");
        assert_eq!(seen[0].2, http::Version::HTTP_11);
        assert_eq!(seen[1].1.as_deref(), Some("h2"), "ALPN");
        assert_eq!(seen[1].2, http::Version::HTTP_2);
    }
    // A member whose certificate does not check out, or that refuses the proxy without a
    // client certificate, is unreachable: 502, and nothing reached it.
    for path in ["/wrongca/x", "/wrongname/x", "/nocert/x"] {
        let a = get(&c, addr, "shop.example.com", path).await;
        assert_eq!(a.status, 502, "{path}");
    }
    assert_eq!(seen.lock().unwrap().len(), 2);
    proxy.shutdown().await;
}

#[test]
fn upstream_tls_config_errors_name_the_field() {
    let group = |body: &str| {
        format!("[[upstreams]]\nname = \"g\"\nmembers = [{{ address = \"127.0.0.1:1\" }}]\n{body}")
    };
    for (body, field, want) in [
        (
            "protocol = \"h2\"\n",
            "upstreams[0].protocol",
            "needs `tls`",
        ),
        (
            "protocol = \"h2c\"\ntls = { server_name = \"a\" }\n",
            "upstreams[0].tls",
            "with tls use protocol = \"h2\"",
        ),
        (
            "tls = { client_cert = \"/x.crt\" }\n",
            "upstreams[0].tls",
            "client_cert and client_key go together",
        ),
        (
            "tls = { server_name = \"not a name\" }\n",
            "upstreams[0].tls.server_name",
            "not a DNS name",
        ),
    ] {
        match l7_proxy::Config::from_toml_str(&group(body)) {
            Err(l7_proxy::ConfigError::Invalid {
                field: f, message, ..
            }) => {
                assert_eq!(f, field, "{body}: {message}");
                assert!(message.contains(want), "{body}: {message}");
            }
            other => panic!("{body}: unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn unreadable_upstream_ca_is_a_config_error() {
    let err = l7_proxy::Proxy::start(
        l7_proxy::Config::from_toml_str(
            "[[upstreams]]\nname = \"g\"\nmembers = [{ address = \"127.0.0.1:1\" }]\n\
             tls = { ca = \"/nonexistent/ca.pem\" }\n",
        )
        .unwrap(),
    )
    .await
    .err()
    .expect("a missing CA file must be refused");
    let text = err.to_string();
    assert!(text.contains("upstreams[0].tls.ca"), "{text}");
    assert!(text.contains("/nonexistent/ca.pem"), "{text}");
}
