//! TLS termination: builds a listener's `rustls` server config from its `[listeners.tls]`
//! section.
//!
//! Certificates are chosen by SNI ([`SniResolver`]): the first configured certificate that is
//! valid for the client's server name (wildcards included, checked with webpki) is served; a
//! client without SNI, or with a name no certificate covers, gets the first one. Only TLS 1.2
//! and 1.3 are offered (in the server's suite order), ALPN offers `h2` and `http/1.1`, and
//! with `client_ca` set the client must present a certificate issued by one of those CAs
//! (mTLS). Certificates are read again on
//! every reload, since the whole config is rebuilt.
//!
//! TLS to upstream members ([`upstream_client_config`]): the members' certificates are
//! verified against the group's `ca` (or the system's roots), for its `server_name` (or the
//! member's address), with TLS 1.2 and 1.3 only, and a client certificate when configured.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ConfigError, TlsConfig, UpstreamTlsConfig};

/// The crypto provider used everywhere (ring), with `TLS13_AES_128_GCM_SHA256` first.
///
/// Servers that follow the client's order end up on `TLS13_AES_256_GCM_SHA384`, the first
/// choice of OpenSSL clients, whose SHA-384 key schedule has no hardware support in ring on
/// many CPUs; SHA-256 uses the SHA extensions. AES-128-GCM is TLS 1.3's mandatory suite and
/// the first choice of Go's TLS stack, for example. Every suite stays on offer.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The TLS versions offered, as a server and to upstream members.
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A PEM file named by config field `field`.
type PemPath = toml::Spanned<std::path::PathBuf>;

/// The certificates in a PEM file; an error naming the field when it cannot be read.
fn read_certs(
    config: &Config,
    field: &str,
    path: &PemPath,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    CertificateDer::pem_file_iter(path.get_ref())
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            config.invalid(
                field,
                path,
                format!("reading {}: {e}", path.get_ref().display()),
            )
        })
}

/// A certificate chain: [`read_certs`], at least one.
fn read_chain(
    config: &Config,
    field: &str,
    path: &PemPath,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = read_certs(config, field, path)?;
    if certs.is_empty() {
        return Err(config.invalid(field, path, "no certificate in file"));
    }
    Ok(certs)
}

/// Trusted CAs: the usable certificates of [`read_certs`], at least one.
fn read_roots(config: &Config, field: &str, path: &PemPath) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    if roots
        .add_parsable_certificates(read_certs(config, field, path)?)
        .0
        == 0
    {
        return Err(config.invalid(field, path, "no usable CA certificate in file"));
    }
    Ok(roots)
}

/// The private key in a PEM file.
fn read_key(
    config: &Config,
    field: &str,
    path: &PemPath,
) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_file(path.get_ref()).map_err(|e| {
        config.invalid(
            field,
            path,
            format!("reading {}: {e}", path.get_ref().display()),
        )
    })
}

/// A TLS client config (TLS 1.2 and 1.3) trusting the CA certificates of the PEM file `ca`,
/// or the system's when none: for the HTTPS fetches policies make (a JWKS). Errors are
/// plain text, for the policy to name its field.
pub fn https_client_config(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let roots = match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            let mut roots = RootCertStore::empty();
            if roots.add_parsable_certificates(certs).0 == 0 {
                return Err(format!("no usable CA certificate in {}", path.display()));
            }
            roots
        }
        None => system_roots().ok_or("no CA certificates found on this system; name a CA file")?,
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The system's CA certificates, if it has any.
fn system_roots() -> Option<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let added = roots
        .add_parsable_certificates(rustls_native_certs::load_native_certs().certs)
        .0;
    (added > 0).then_some(roots)
}

/// The TLS config of an HTTPS connector that only ever sends `http://` URIs: it needs one,
/// but never uses it (no roots).
pub fn unused_client_config() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
}

/// A connector for the HTTP calls policies make (a JWKS, aggregated calls): `https://` URLs
/// over TLS verified against [`https_client_config`]`(ca)` when `https` is set, `http://` as
/// they are.
pub fn policy_connector(
    https: bool,
    ca: Option<&std::path::Path>,
) -> Result<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, String>
{
    let tls = if https {
        https_client_config(ca)?
    } else {
        // Never used: no URL needs TLS.
        unused_client_config()
    };
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build())
}

/// Picks a certificate by SNI.
#[derive(Debug)]
pub struct SniResolver {
    keys: Vec<Arc<CertifiedKey>>,
}

impl SniResolver {
    fn covers(key: &CertifiedKey, name: &str) -> bool {
        let Ok(server_name) = ServerName::try_from(name) else {
            return false;
        };
        let Some(der) = key.cert.first() else {
            return false;
        };
        webpki::EndEntityCert::try_from(der)
            .map(|cert| cert.verify_is_valid_for_subject_name(&server_name).is_ok())
            .unwrap_or(false)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // With one certificate the answer is that one whatever the name: skip parsing it
        // again on every handshake.
        if self.keys.len() > 1 {
            if let Some(name) = client_hello.server_name() {
                if let Some(key) = self.keys.iter().find(|k| Self::covers(k, name)) {
                    return Some(key.clone());
                }
            }
        }
        self.keys.first().cloned()
    }
}

/// Builds the acceptor of a listener (`index` is its position in `config.listeners`).
pub fn build_acceptor(
    config: &Config,
    index: usize,
    tls: &TlsConfig,
) -> Result<TlsAcceptor, ConfigError> {
    let provider = provider();
    let at = format!("listeners[{index}].tls");
    let mut keys = Vec::new();
    for (i, c) in tls.certs.get_ref().iter().enumerate() {
        let certs = read_chain(config, &format!("{at}.certs[{i}].cert"), &c.cert)?;
        let key = read_key(config, &format!("{at}.certs[{i}].key"), &c.key)?;
        let certified = CertifiedKey::from_der(certs, key, &provider)
            .map_err(|e| config.invalid(format!("{at}.certs[{i}].key"), &c.key, e.to_string()))?;
        keys.push(Arc::new(certified));
    }
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| config.invalid(at.clone(), &tls.certs, e.to_string()))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let field = format!("{at}.client_ca");
            let roots = read_roots(config, &field, ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| config.invalid(&field, ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server_config = builder.with_cert_resolver(Arc::new(SniResolver { keys }));
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Our suite order (see [`provider`]) rather than the client's.
    server_config.ignore_client_order = true;
    // Sessions resume through stateless tickets only: no per-session memory in the proxy
    // (rustls's default cache holds 256 sessions per listener, too few to matter).
    server_config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    if tls.session_tickets {
        // Fresh keys per config generation (rotated every 6 hours meanwhile): a reload, which
        // may change certificates, ends the sessions resumed from before it.
        server_config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| {
            config.invalid(
                format!("{at}.session_tickets"),
                &tls.certs,
                format!("making session ticket keys: {e}"),
            )
        })?;
    }
    Ok(TlsAcceptor::from(Arc::new(server_config)))
}

/// The client side of a group's TLS to its members: the rustls config (no ALPN: the
/// connector sets it from the group's protocol) and the name to verify, if fixed.
#[derive(Clone)]
pub struct UpstreamTls {
    pub config: rustls::ClientConfig,
    pub server_name: Option<ServerName<'static>>,
}

/// Builds the TLS client settings of upstream group `index` (see the module documentation).
pub fn upstream_client_config(
    config: &Config,
    index: usize,
    tls: &toml::Spanned<UpstreamTlsConfig>,
) -> Result<UpstreamTls, ConfigError> {
    let at = format!("upstreams[{index}].tls");
    let t = tls.get_ref();
    let roots = match &t.ca {
        Some(ca) => read_roots(config, &format!("{at}.ca"), ca)?,
        None => system_roots().ok_or_else(|| {
            config.invalid(
                at.clone(),
                tls,
                "no CA certificates found on this system; set `ca`",
            )
        })?,
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| config.invalid(at.clone(), tls, e.to_string()))?
        .with_root_certificates(roots);
    let client_config = match (&t.client_cert, &t.client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_chain(config, &format!("{at}.client_cert"), cert)?;
            let private = read_key(config, &format!("{at}.client_key"), key)?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| config.invalid(format!("{at}.client_key"), key, e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    let server_name = match &t.server_name {
        Some(name) => Some(
            ServerName::try_from(name.get_ref().clone())
                .map_err(|e| config.invalid(format!("{at}.server_name"), name, e.to_string()))?,
        ),
        None => None,
    };
    Ok(UpstreamTls {
        config: client_config,
        server_name,
    })
}
