//! JWT bearer-token validation.
//!
//! Data in: the `Authorization: Bearer <token>` header of a request, and signing keys from a
//! JWKS document (a file read at build time, or a URL fetched on first use and refreshed every
//! `jwks_refresh_secs`: `https://`, its server verified against the system's CAs or those of
//! `jwks_ca_file`, or `http://`). HS256/384/512 keys are JWKS `oct` keys; RS256/384/512 and
//! PS256/384/512 `RSA` keys; ES256/384 `EC` keys; EdDSA `OKP` keys. A key with `alg` verifies
//! only that algorithm.
//!
//! Keys the policy cannot verify with are skipped, not fatal (RFC 7517 section 5): encryption
//! keys (`use: "enc"`, or `key_ops` without `verify`, as Keycloak publishes next to its
//! signing key), keys of an unsupported type or `alg` (such as ES512), and malformed ones, each
//! with a log line naming its `kid`. A JWKS with no usable key is an error (naming why each key
//! was skipped): at build for `jwks_file`, and for `jwks_url` a failed refresh. A `jwks_url`
//! fetch must deliver the whole document within 5 s and at most 1 MiB; a refresh that fails
//! keeps the previous keys and is retried after 10 s.
//!
//! The token must be signed by a known key with an allowed algorithm, and pass `exp`, `nbf`
//! (with `leeway_secs`), `iss` and `aud` checks, carry every `required_claims` entry and every
//! `required_scopes` scope (from `scope`, space separated, or `scp`). Failures answer 401 with
//! `WWW-Authenticate: Bearer error="invalid_token"`; a missing scope answers 403 with
//! `error="insufficient_scope"`. No failure reaches the upstream.
//!
//! A verified token is remembered (up to `cache_size` tokens, as Envoy's `jwt_cache_config`),
//! so a client that sends the same token again is not re-verified: the repeat costs a lookup
//! and the `exp`/`nbf` check against the current time. The entry is keyed by the whole token
//! (a forged token differs from the genuine one, so it is never a hit), holds only tokens that
//! passed every check, and is void once the key set changes (a JWKS refresh or rotation).
//!
//! Data out: the verified claims go into [`RequestCtx::identity`] as [`JwtClaims`] (the rate
//! limiter keys on `sub` from there), and claims listed in `forward_claims` are copied into
//! request headers; client-sent copies of those headers are removed first so they cannot be
//! spoofed. The `Authorization` header itself is removed before forwarding unless
//! `forward_token = true` (Envoy `jwt_authn`'s `forward`, false by default), so the upstream
//! does not receive a credential it could replay.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use super::respond::{content_length, error_response};
use super::{Decided, Policy, PolicyBuildError, ProxyBody, RequestCtx, RequestOutcome};

/// `{ type = "jwt", ... }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Path of a JWKS JSON document.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// `https://` (or `http://`) URL of a JWKS document, fetched lazily and refreshed
    /// periodically.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// PEM file of the CA certificates that an `https://` `jwks_url`'s server is verified
    /// against; by default the system's.
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    #[serde(default = "default_refresh_secs")]
    pub jwks_refresh_secs: u64,
    /// Accepted signing algorithms.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Algorithm>,
    /// Accepted issuers (`iss`); empty accepts any.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Accepted audiences (`aud`); empty disables the check.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
    /// Claims that must be present.
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Scopes that must all be granted.
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Claim name → request header that receives its value.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    /// Verified tokens remembered; 0 verifies every request from scratch.
    #[serde(default = "default_cache_size")]
    pub cache_size: u64,
    /// Keep the `Authorization` header on the forwarded request; by default it is removed once
    /// the token is verified.
    #[serde(default)]
    pub forward_token: bool,
}

fn default_cache_size() -> u64 {
    4096
}

/// Longer tokens are verified every time rather than remembered.
const CACHE_MAX_TOKEN: usize = 4096;

fn default_refresh_secs() -> u64 {
    300
}
fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::HS256, Algorithm::RS256, Algorithm::ES256]
}
fn default_leeway_secs() -> u64 {
    30
}

/// Verified claims of the request's token.
#[derive(Debug, Clone)]
pub struct JwtClaims(pub Arc<Value>);

impl JwtClaims {
    /// The `sub` claim, when it is a string.
    pub fn subject(&self) -> Option<&str> {
        self.0.get("sub").and_then(Value::as_str)
    }
}

/// One usable key of a JWKS.
struct VerifyKey {
    kid: Option<String>,
    /// Algorithms this key may verify.
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

struct KeySet {
    keys: Vec<Arc<VerifyKey>>,
    /// Changes whenever the set is replaced; remembered tokens of an older set are void.
    generation: u64,
    /// When `jwks_url` is due to be fetched again.
    next_refresh: Instant,
    /// Last fetch attempt of `jwks_url`.
    fetched_at: Option<Instant>,
}

/// Wait between attempts to fetch a JWKS URL that failed.
const JWKS_RETRY: Duration = Duration::from_secs(10);
/// Time allowed for a whole JWKS fetch: connection, response head and body.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted from `jwks_url`.
const JWKS_MAX_BYTES: usize = 1 << 20;

pub struct JwtPolicy {
    config: JwtConfig,
    keys: RwLock<Arc<KeySet>>,
    generations: AtomicU64,
    forward: Vec<(String, HeaderName)>,
    refreshing: tokio::sync::Mutex<()>,
    /// The client that fetches `jwks_url` (HTTPS, or plain HTTP).
    fetcher: Option<JwksClient>,
    /// One prepared `Validation` per accepted algorithm.
    validations: Vec<(Algorithm, Validation)>,
    verified: Option<VerifiedCache>,
}

type JwksClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<bytes::Bytes>,
>;

/// Tokens verified before, by their text.
type VerifiedCache = quick_cache::sync::Cache<String, Arc<Verified>>;

/// A token that passed every check, with the times to re-check on reuse.
struct Verified {
    claims: Arc<Value>,
    exp: u64,
    nbf: Option<u64>,
    generation: u64,
}

/// Seconds since the Unix epoch, from the coarse real-time clock (advanced at each timer
/// tick, every few milliseconds): token times are whole seconds, and this read costs a
/// fraction of a precise one, on every request with a token verified before.
fn unix_now() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for clock_gettime to write.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) } == 0 {
        return u64::try_from(now.tv_sec).unwrap_or(0);
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

enum AuthError {
    Invalid(String),
    Scope(String),
}

impl JwtPolicy {
    pub fn build(config: JwtConfig) -> Result<Self, PolicyBuildError> {
        let err = |message: String| PolicyBuildError {
            policy: "jwt".into(),
            message,
        };
        if config.jwks_file.is_none() && config.jwks_url.is_none() {
            return Err(err("one of jwks_file or jwks_url is required".into()));
        }
        if config.jwks_ca_file.is_some() && config.jwks_url.is_none() {
            return Err(err("jwks_ca_file needs an https:// jwks_url".into()));
        }
        if config.jwks_file.is_some() && config.jwks_url.is_some() {
            return Err(err(
                "set jwks_file or jwks_url, not both: keys come from one place".into(),
            ));
        }
        if config.algorithms.is_empty() {
            return Err(err("algorithms must not be empty".into()));
        }
        let mut fetcher = None;
        if let Some(url) = &config.jwks_url {
            let Some(uri) = url.parse::<http::Uri>().ok().filter(super::fetchable) else {
                return Err(err(format!(
                    "jwks_url {url:?} is not an https:// or http:// URL with a host"
                )));
            };
            let https = uri.scheme_str() == Some("https");
            if !https && config.jwks_ca_file.is_some() {
                return Err(err(
                    "jwks_ca_file verifies an https:// jwks_url; this one is http://".into(),
                ));
            }
            if config.jwks_refresh_secs == 0 {
                return Err(err(
                    "jwks_refresh_secs must be at least 1: 0 would fetch the JWKS on every \
                     request"
                        .into(),
                ));
            }
            super::check_secs("jwks_refresh_secs", config.jwks_refresh_secs).map_err(err)?;
            // Built once every check has passed (it may read the system's CA store).
            let connector = crate::tls::policy_connector(https, config.jwks_ca_file.as_deref())
                .map_err(|e| err(format!("jwks_ca_file: {e}")))?;
            fetcher = Some(Client::builder(TokioExecutor::new()).build(connector));
        }
        let keys = match &config.jwks_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| err(format!("jwks_file {}: {e}", path.display())))?;
                let keys = parse_jwks(&text)
                    .map_err(|e| err(format!("jwks_file {}: {e}", path.display())))?;
                // A file's keys are final: if none verifies an allowed algorithm, every
                // token would be refused.
                if !keys
                    .iter()
                    .any(|k| k.algorithms.iter().any(|a| config.algorithms.contains(a)))
                {
                    let fit: BTreeSet<String> = keys
                        .iter()
                        .flat_map(|k| k.algorithms.iter().map(|a| format!("{a:?}")))
                        .collect();
                    return Err(err(format!(
                        "jwks_file {}: no key verifies any of algorithms {:?}; its keys \
                         verify {}",
                        path.display(),
                        config.algorithms,
                        fit.into_iter().collect::<Vec<_>>().join(", ")
                    )));
                }
                keys
            }
            None => Vec::new(),
        };
        let forward = config
            .forward_claims
            .iter()
            .map(|(claim, h)| {
                HeaderName::try_from(h.as_str())
                    .map(|name| (claim.clone(), name))
                    .map_err(|e| err(format!("forward_claims.{claim}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let validations = config
            .algorithms
            .iter()
            .map(|&alg| (alg, validation(&config, alg)))
            .collect();
        let verified = (config.cache_size > 0)
            .then(|| quick_cache::sync::Cache::new(config.cache_size as usize));
        Ok(Self {
            config,
            generations: AtomicU64::new(1),
            validations,
            verified,
            keys: RwLock::new(Arc::new(KeySet {
                generation: 0,
                keys,
                // A file's keys are final; a URL is fetched on first use.
                next_refresh: Instant::now(),
                fetched_at: None,
            })),
            forward,
            refreshing: tokio::sync::Mutex::new(()),
            fetcher,
        })
    }

    fn key_set(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Returns the current keys, fetching them from `jwks_url` when they are due: on first use,
    /// every `jwks_refresh_secs` after a success, and at most every [`JWKS_RETRY`] after a
    /// failure (the previous keys stay in use). While one request refreshes, others keep using
    /// the keys they have instead of waiting, unless there are none yet. `unknown_kid` (a token
    /// names a key we lack, as after a rotation) makes a fetch due early, at most every
    /// [`JWKS_RETRY`].
    async fn current_keys(&self, unknown_kid: bool) -> Arc<KeySet> {
        let keys = self.key_set();
        match &self.config.jwks_url {
            Some(url) if self.refresh_due(&keys, unknown_kid) => {
                // Boxed: a refresh is rare, and its future would otherwise sit in every
                // request's future.
                Box::pin(self.refresh(url, keys, unknown_kid)).await
            }
            _ => keys,
        }
    }

    fn refresh_due(&self, keys: &KeySet, unknown_kid: bool) -> bool {
        Instant::now() >= keys.next_refresh
            || (unknown_kid && keys.fetched_at.is_none_or(|t| t.elapsed() >= JWKS_RETRY))
    }

    /// The refresh part of [`Self::current_keys`], once `keys` are due.
    async fn refresh(&self, url: &str, keys: Arc<KeySet>, unknown_kid: bool) -> Arc<KeySet> {
        let _one_fetch = if keys.keys.is_empty() {
            self.refreshing.lock().await
        } else {
            match self.refreshing.try_lock() {
                Ok(guard) => guard,
                Err(_) => return keys,
            }
        };
        let keys = self.key_set();
        if !self.refresh_due(&keys, unknown_kid) {
            return keys; // another request refreshed while we waited
        }
        let refresh = Duration::from_secs(self.config.jwks_refresh_secs);
        let Some(client) = &self.fetcher else {
            return keys;
        };
        let set = match fetch_jwks(client, url).await {
            Ok(fresh) => KeySet {
                keys: fresh,
                generation: self.generations.fetch_add(1, Ordering::Relaxed),
                next_refresh: Instant::now() + refresh,
                fetched_at: Some(Instant::now()),
            },
            Err(e) => {
                tracing::warn!(url, error = %e, "jwt: JWKS fetch failed; keeping previous keys");
                KeySet {
                    keys: keys.keys.clone(),
                    generation: keys.generation,
                    next_refresh: Instant::now() + refresh.min(JWKS_RETRY),
                    fetched_at: Some(Instant::now()),
                }
            }
        };
        let set = Arc::new(set);
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = set.clone();
        set
    }

    /// The claims of `token` if it is among the tokens verified before with the current keys
    /// and still within its times, when that can be known without waiting (no key refresh is
    /// due).
    fn verified_now(&self, token: &str) -> Option<Arc<Value>> {
        let cache = self.verified.as_ref()?;
        let generation = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            if self.config.jwks_url.is_some() && self.refresh_due(&keys, false) {
                return None;
            }
            keys.generation
        };
        self.valid_hit(cache, token, generation)
    }

    /// `token`'s entry in `cache`, if it was verified with the keys of `generation` and is
    /// still within its times.
    fn valid_hit(&self, cache: &VerifiedCache, token: &str, generation: u64) -> Option<Arc<Value>> {
        let hit = cache.get(token)?;
        let now = unix_now();
        let leeway = self.config.leeway_secs;
        (hit.generation == generation
            && hit.exp.saturating_add(leeway) >= now
            && hit.nbf.is_none_or(|nbf| nbf <= now.saturating_add(leeway)))
        .then(|| hit.claims.clone())
    }

    /// Verifies `token`, or finds it among the tokens verified before with the current keys.
    async fn verify(&self, token: &str) -> Result<Arc<Value>, AuthError> {
        let Some(cache) = &self.verified else {
            return Box::pin(self.verify_fully(token))
                .await
                .map(|(claims, _)| claims);
        };
        let generation = self.current_keys(false).await.generation;
        if let Some(claims) = self.valid_hit(cache, token, generation) {
            return Ok(claims);
        }
        cache.remove(token);
        // Boxed: a full verification is the rare path (and costs far more than a box); its
        // future would otherwise sit in every request's future.
        let (claims, generation) = Box::pin(self.verify_fully(token)).await?;
        // `exp` is required, so a verified token has one; a non-integer one is not remembered.
        if let Some(exp) = claims.get("exp").and_then(Value::as_u64) {
            if token.len() <= CACHE_MAX_TOKEN {
                let nbf = claims.get("nbf").and_then(Value::as_u64);
                let entry = Verified {
                    claims: claims.clone(),
                    exp,
                    nbf,
                    generation,
                };
                cache.insert(token.to_string(), Arc::new(entry));
            }
        }
        Ok(claims)
    }

    /// Full verification: signature, time, issuer, audience, claims and scopes. Returns the
    /// claims and the generation of the key set that verified them.
    async fn verify_fully(&self, token: &str) -> Result<(Arc<Value>, u64), AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("malformed token: {e}")))?;
        // One prepared Validation per accepted algorithm: finding none means not accepted.
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == header.alg) else {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} not accepted",
                header.alg
            )));
        };
        let mut keys = self.current_keys(false).await;
        if let Some(kid) = &header.kid {
            if !keys.keys.iter().any(|k| k.kid.as_ref() == Some(kid)) {
                keys = self.current_keys(true).await;
            }
        }
        let candidates = keys.keys.iter().filter(|k| {
            k.algorithms.contains(&header.alg)
                && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
        });
        let mut last_error = String::from("no key matches the token");
        for key in candidates {
            match jsonwebtoken::decode::<Value>(token, &key.key, validation) {
                Ok(data) => {
                    let claims = self.check_claims(data.claims)?;
                    return Ok((Arc::new(claims), keys.generation));
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(AuthError::Invalid(last_error))
    }

    fn check_claims(&self, claims: Value) -> Result<Value, AuthError> {
        // jsonwebtoken skips an `nbf` it cannot read as an integer (a string, a boolean, a
        // fraction), which would let a token through before its time: the times are
        // NumericDates (RFC 7519 2), and `nbf` is checked here whatever its number.
        for name in ["exp", "nbf", "iat"] {
            if claims.get(name).is_some_and(|v| !v.is_number()) {
                return Err(AuthError::Invalid(format!(
                    "claim {name} is not a NumericDate"
                )));
            }
        }
        if let Some(nbf) = claims.get("nbf").and_then(Value::as_f64) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            if nbf > now + self.config.leeway_secs as f64 {
                return Err(AuthError::Invalid("ImmatureSignature".into()));
            }
        }
        for name in &self.config.required_claims {
            if claims.get(name).is_none_or(Value::is_null) {
                return Err(AuthError::Invalid(format!("missing claim {name}")));
            }
        }
        let granted = granted_scopes(&claims);
        for scope in &self.config.required_scopes {
            if !granted.contains(scope.as_str()) {
                return Err(AuthError::Scope(scope.clone()));
            }
        }
        Ok(claims)
    }
}

/// The checks of `config` for tokens signed with `alg`.
fn validation(config: &JwtConfig, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = config.leeway_secs;
    v.validate_nbf = true;
    let mut required: HashSet<String> = HashSet::from(["exp".to_string()]);
    if config.audiences.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&config.audiences);
        required.insert("aud".into());
    }
    if !config.issuers.is_empty() {
        v.set_issuer(&config.issuers);
        required.insert("iss".into());
    }
    v.required_spec_claims = required;
    v
}

/// Scopes from `scope` (space separated string) and `scp` (string or array).
fn granted_scopes(claims: &Value) -> HashSet<&str> {
    let mut out = HashSet::new();
    for name in ["scope", "scp"] {
        match claims.get(name) {
            Some(Value::String(s)) => out.extend(s.split_whitespace()),
            Some(Value::Array(items)) => out.extend(items.iter().filter_map(Value::as_str)),
            _ => {}
        }
    }
    out
}

/// The keys of a JWKS document this policy can verify with. Keys it cannot use (encryption
/// keys, unsupported types or algorithms, malformed keys) are skipped with a log line naming
/// their `kid`, as RFC 7517 section 5 asks; a document without any usable key is an error that
/// says why each key was skipped.
fn parse_jwks(text: &str) -> Result<Vec<Arc<VerifyKey>>, String> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<Value>,
    }
    let set: RawSet = serde_json::from_str(text).map_err(|e| format!("invalid JWKS: {e}"))?;
    let mut keys = Vec::with_capacity(set.keys.len());
    let mut skipped = Vec::new();
    for (i, raw) in set.keys.iter().enumerate() {
        let name = match raw.get("kid").and_then(Value::as_str) {
            Some(kid) => format!("kid {kid:?}"),
            None => format!("keys[{i}] (no kid)"),
        };
        match usable_key(raw) {
            Ok(key) => keys.push(Arc::new(key)),
            Err(Skip::Encryption(why)) => {
                tracing::debug!(key = %name, why, "jwt: JWKS encryption key ignored");
                skipped.push(format!("{name}: {why}"));
            }
            Err(Skip::Unusable(why)) => {
                tracing::warn!(key = %name, %why, "jwt: JWKS key skipped");
                skipped.push(format!("{name}: {why}"));
            }
        }
    }
    if keys.is_empty() {
        return Err(if skipped.is_empty() {
            "JWKS has no keys".into()
        } else {
            format!("no usable key in JWKS ({})", skipped.join("; "))
        });
    }
    Ok(keys)
}

/// Why a JWKS key is not used.
enum Skip {
    /// Meant for encryption, not signatures: expected next to signing keys.
    Encryption(&'static str),
    /// A signing key this policy cannot use.
    Unusable(String),
}

fn usable_key(raw: &Value) -> Result<VerifyKey, Skip> {
    if raw.get("use").and_then(Value::as_str) == Some("enc") {
        return Err(Skip::Encryption("use \"enc\""));
    }
    if let Some(ops) = raw.get("key_ops").and_then(Value::as_array) {
        if !ops.iter().any(|op| op.as_str() == Some("verify")) {
            return Err(Skip::Encryption("key_ops without \"verify\""));
        }
    }
    let jwk: Jwk = serde_json::from_value(raw.clone())
        .map_err(|e| Skip::Unusable(format!("unsupported or malformed key: {e}")))?;
    verify_key(&jwk).map_err(Skip::Unusable)
}

fn verify_key(jwk: &Jwk) -> Result<VerifyKey, String> {
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let (kty, by_type) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (
            "RSA",
            vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
        ),
        AlgorithmParameters::EllipticCurve(_) => ("EC", vec![Algorithm::ES256, Algorithm::ES384]),
        AlgorithmParameters::OctetKey(_) => (
            "oct",
            vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
        ),
        AlgorithmParameters::OctetKeyPair(_) => ("OKP", vec![Algorithm::EdDSA]),
    };
    // A key that names its algorithm verifies only that one.
    let algorithms = match jwk.common.key_algorithm {
        Some(ka) => match ka.to_string().parse::<Algorithm>() {
            Ok(alg) if by_type.contains(&alg) => vec![alg],
            Ok(alg) => return Err(format!("alg {alg:?} does not fit a {kty} key")),
            Err(_) => return Err(format!("unsupported alg {ka:?}")),
        },
        None => by_type,
    };
    Ok(VerifyKey {
        kid: jwk.common.key_id.clone(),
        algorithms,
        key,
    })
}

/// Fetches and parses the JWKS at `url`: the whole exchange must finish within
/// [`JWKS_FETCH_TIMEOUT`], and the body must not exceed [`JWKS_MAX_BYTES`].
async fn fetch_jwks(client: &JwksClient, url: &str) -> Result<Vec<Arc<VerifyKey>>, String> {
    let body = tokio::time::timeout(JWKS_FETCH_TIMEOUT, fetch_body(client, url))
        .await
        .map_err(|_| {
            format!(
                "no complete response within {}s",
                JWKS_FETCH_TIMEOUT.as_secs()
            )
        })??;
    parse_jwks(std::str::from_utf8(&body).map_err(|e| format!("JWKS is not UTF-8: {e}"))?)
}

async fn fetch_body(client: &JwksClient, url: &str) -> Result<bytes::Bytes, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad url: {e}"))?;
    let resp = client.get(uri).await.map_err(|e| super::error_chain(&e))?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let too_large = || format!("JWKS larger than {JWKS_MAX_BYTES} bytes");
    if content_length(resp.headers()).is_some_and(|n| n > JWKS_MAX_BYTES as u64) {
        return Err(too_large());
    }
    let body = http_body_util::Limited::new(resp.into_body(), JWKS_MAX_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                format!("reading the body: {e}")
            }
        })?;
    Ok(body.to_bytes())
}

fn bearer_token(req: &Request<ProxyBody>) -> Option<&str> {
    // UTF-8 is checked a word at a time, where `to_str` checks byte by byte for visible
    // ASCII; a token outside the base64url alphabet fails verification all the same.
    let value = std::str::from_utf8(req.headers().get(header::AUTHORIZATION)?.as_bytes()).ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// An error answer with a `WWW-Authenticate: Bearer` challenge, which a 401 must carry
/// (RFC 9110 section 15.5.2). `description` may hold text from the token, so it is cut to
/// [`DESCRIPTION_MAX`] printable ASCII characters, without quotes or backslashes.
fn challenge(status: StatusCode, error: &'static str, description: &str) -> Response<ProxyBody> {
    let description: String = description
        .chars()
        .take(DESCRIPTION_MAX)
        .map(|c| match c {
            '"' | '\\' => '\'',
            ' '..='~' => c,
            _ => '?',
        })
        .collect();
    let mut resp = error_response(status, &description);
    let value = format!("Bearer error=\"{error}\", error_description=\"{description}\"");
    let value = HeaderValue::try_from(value).unwrap_or(HeaderValue::from_static("Bearer"));
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, value);
    resp
}

/// Longest `error_description` sent back.
const DESCRIPTION_MAX: usize = 200;

fn claim_header_value(v: &Value) -> Option<HeaderValue> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Null => return None,
        other => other.to_string(),
    };
    HeaderValue::try_from(text).ok()
}

impl Policy for JwtPolicy {
    fn name(&self) -> &'static str {
        "jwt"
    }

    fn has_response_phase(&self) -> bool {
        false
    }

    fn try_request(&self, req: &mut Request<ProxyBody>, ctx: &mut RequestCtx) -> Decided {
        // A token verified before: decided at once. Anything else is verified in full.
        match bearer_token(req).and_then(|token| self.verified_now(token)) {
            Some(claims) => {
                self.admit(req, ctx, claims);
                Decided::Continue
            }
            None => Decided::Wait,
        }
    }

    async fn on_request(&self, req: Request<ProxyBody>, ctx: &mut RequestCtx) -> RequestOutcome {
        let Some(token) = bearer_token(&req) else {
            let mut resp = error_response(StatusCode::UNAUTHORIZED, "missing bearer token");
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return RequestOutcome::Respond(resp);
        };
        let claims = match self.verify(token).await {
            Ok(claims) => claims,
            Err(AuthError::Invalid(why)) => {
                tracing::debug!(request_id = %ctx.request_id, %why, "jwt: rejected");
                return RequestOutcome::Respond(challenge(
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    &why,
                ));
            }
            Err(AuthError::Scope(scope)) => {
                let mut resp = challenge(
                    StatusCode::FORBIDDEN,
                    "insufficient_scope",
                    &format!("scope {scope} required"),
                );
                let v = format!(
                    "Bearer error=\"insufficient_scope\", scope=\"{}\"",
                    self.config.required_scopes.join(" ")
                );
                if let Ok(v) = HeaderValue::try_from(v) {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                return RequestOutcome::Respond(resp);
            }
        };
        let mut req = req;
        self.admit(&mut req, ctx, claims);
        RequestOutcome::Continue(req)
    }
}

impl JwtPolicy {
    /// Lets a request with verified `claims` on: the claims forwarded as configured, the
    /// token removed unless forwarded, the identity kept for the policies after this one.
    fn admit(&self, req: &mut Request<ProxyBody>, ctx: &mut RequestCtx, claims: Arc<Value>) {
        for (claim, name) in &self.forward {
            req.headers_mut().remove(name);
            if let Some(v) = claims.get(claim).and_then(claim_header_value) {
                req.headers_mut().insert(name.clone(), v);
            }
        }
        if !self.config.forward_token {
            req.headers_mut().remove(header::AUTHORIZATION);
        }
        ctx.identity.jwt = Some(JwtClaims(claims));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_from_scope_and_scp() {
        let claims = serde_json::json!({"scope": "read write", "scp": ["admin"]});
        let s = granted_scopes(&claims);
        assert!(s.contains("read") && s.contains("write") && s.contains("admin"));
    }

    #[test]
    fn oct_key_verifies_only_hmac() {
        let jwks = r#"{"keys":[{"kty":"oct","kid":"k1","k":"c2VjcmV0"}]}"#;
        let keys = parse_jwks(jwks).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(keys[0].algorithms.contains(&Algorithm::HS256));
        assert!(!keys[0].algorithms.contains(&Algorithm::RS256));
    }

    #[test]
    fn unusable_keys_are_skipped_and_named_when_none_remain() {
        let oct = r#"{"kty":"oct","kid":"hs","k":"c2VjcmV0"}"#;
        let enc = r#"{"kty":"RSA","kid":"enc","alg":"RSA-OAEP","use":"enc","n":"AQAB","e":"AQAB"}"#;
        let es512 = r#"{"kty":"EC","kid":"p521","crv":"P-521","alg":"ES512","x":"AA","y":"AA"}"#;
        let wrap = r#"{"kty":"oct","kid":"wrap","k":"c2VjcmV0","key_ops":["wrapKey"]}"#;
        let odd = r#"{"kty":"oct","kid":"odd","alg":"RS256","k":"c2VjcmV0"}"#;
        let jwks = format!(r#"{{"keys":[{enc},{es512},{oct},{wrap},{odd},{{"kty":"XYZ"}}]}}"#);
        let keys = parse_jwks(&jwks).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("hs"));

        let jwks = format!(r#"{{"keys":[{enc},{es512},{odd},{{"kty":"XYZ"}}]}}"#);
        let e = parse_jwks(&jwks).err().unwrap();
        for part in [
            "no usable key",
            "kid \"enc\": use \"enc\"",
            "kid \"p521\"",
            "kid \"odd\": alg RS256 does not fit a oct key",
            "keys[3] (no kid)",
        ] {
            assert!(e.contains(part), "{part} in {e}");
        }
        assert!(parse_jwks(r#"{"keys":[]}"#).is_err());
    }

    #[test]
    fn rsa_key_without_alg_verifies_pkcs1_and_pss() {
        let jwks = r#"{"keys":[{"kty":"RSA","kid":"rs","n":"AQAB","e":"AQAB"}]}"#;
        let keys = parse_jwks(jwks).unwrap();
        for alg in [
            Algorithm::RS256,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ] {
            assert!(keys[0].algorithms.contains(&alg), "{alg:?}");
        }
    }

    #[test]
    fn challenge_description_is_printable_ascii() {
        let resp = challenge(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "bad \u{1}\"alg\"\\ \u{e9}\n",
        );
        let v = resp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert_eq!(
            v,
            "Bearer error=\"invalid_token\", error_description=\"bad ?'alg'' ??\""
        );
        let long = "x".repeat(1000);
        let resp = challenge(StatusCode::UNAUTHORIZED, "invalid_token", &long);
        assert!(resp.headers()[header::WWW_AUTHENTICATE].len() < 300);
    }

    #[test]
    fn config_requires_a_key_source() {
        let cfg: JwtConfig = toml::from_str("").unwrap();
        assert!(JwtPolicy::build(cfg).is_err());
    }
}
