//! HTTP Basic authentication against Argon2 password hashes.
//!
//! Data in: `Authorization: Basic base64(user:password)`; the config maps user names to PHC
//! strings (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`). When the chain is built each must be
//! an Argon2 hash (argon2id, argon2i or argon2d) whose version, parameters and salt Argon2
//! accepts; any other hash (`$scrypt$`, bcrypt, ...) is a config error naming the user, since
//! that user could never log in. Verification runs on the blocking pool because Argon2 is
//! deliberately slow.
//!
//! An unknown user name costs the same Argon2 run as a known one: the password is checked
//! against a dummy hash with the parameters of the first configured user (Argon2's defaults
//! when there are none), so response times do not tell which users exist.
//!
//! Credentials that verified are remembered (up to `cache_size` pairs, for `cache_secs`;
//! Kong's basic-auth caches them too): a repeat costs a SHA-256 and a lookup instead of an
//! Argon2 run (tens of milliseconds of a core with Argon2's default parameters), so a client
//! that sends the same credentials on every request does not pay for them each time. The
//! cache keys are SHA-256 digests of a per-policy random salt, the user and the password;
//! neither passwords nor unsalted digests are kept. Only successes are remembered, so a wrong
//! password always costs a full Argon2 run; a reload builds a new policy with an empty cache,
//! so a changed or removed user takes effect at once. `cache_size = 0` verifies every request.
//!
//! Data out: bad or missing credentials answer 401 with `WWW-Authenticate: Basic realm=...`.
//! A valid user goes into [`RequestCtx::identity`] as [`BasicUser`], optionally into
//! `user_header`, and the `Authorization` header is removed before forwarding.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::password_hash::{Output, PasswordHash, Salt};
use argon2::{Argon2, PasswordVerifier};
use base64::Engine;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::respond::{challenge_realm, error_response};
use super::{Decided, Policy, PolicyBuildError, ProxyBody, RequestCtx, RequestOutcome};

/// `{ type = "basic_auth", realm = "ops", users = { alice = "$argon2id$..." } }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    #[serde(default = "default_realm")]
    pub realm: String,
    /// User name → Argon2 PHC string.
    pub users: BTreeMap<String, String>,
    #[serde(default)]
    pub user_header: Option<String>,
    /// How many verified credential pairs are remembered; 0 verifies every request.
    #[serde(default = "default_cache_size")]
    pub cache_size: u64,
    /// How long a verified pair is remembered, in seconds.
    #[serde(default = "default_cache_secs")]
    pub cache_secs: u64,
}

fn default_realm() -> String {
    "restricted".into()
}

fn default_cache_size() -> u64 {
    1024
}

fn default_cache_secs() -> u64 {
    60
}

/// SHA-256 of the salt, the user and the password: the key of a verified pair.
type CredentialKey = [u8; 32];

/// The authenticated Basic-auth user.
#[derive(Debug, Clone)]
pub struct BasicUser(pub String);

pub struct BasicAuthPolicy {
    challenge: HeaderValue,
    users: Arc<BTreeMap<String, String>>,
    /// PHC string checked for unknown users, so they cost as much as known ones.
    dummy: Arc<str>,
    user_header: Option<HeaderName>,
    /// Pairs that verified, until their deadline (see the module doc).
    verified: Option<quick_cache::sync::Cache<CredentialKey, Instant>>,
    /// Random per policy, so that the cache's keys are no unsalted password digests.
    salt: [u8; 16],
    remember_for: Duration,
    /// Argon2 runs so far (the tests count them).
    argon2_runs: AtomicU64,
}

/// Checks that `phc` is an Argon2 hash that can verify a password: known variant and version,
/// parameters Argon2 accepts, a salt of a valid length and an output.
fn check_argon2(phc: &str) -> Result<PasswordHash<'_>, String> {
    let hash = PasswordHash::new(phc).map_err(|e| e.to_string())?;
    argon2::Algorithm::try_from(hash.algorithm).map_err(|_| {
        format!(
            "{} is not an Argon2 hash (argon2id, argon2i or argon2d)",
            hash.algorithm
        )
    })?;
    if let Some(v) = hash.version {
        argon2::Version::try_from(v).map_err(|e| format!("Argon2 version {v}: {e}"))?;
    }
    argon2::Params::try_from(&hash).map_err(|e| format!("Argon2 parameters: {e}"))?;
    let salt = hash.salt.ok_or("no salt")?;
    let mut buf = [0u8; Salt::MAX_LENGTH];
    let salt_len = salt
        .decode_b64(&mut buf)
        .map_err(|e| format!("salt: {e}"))?
        .len();
    if salt_len < argon2::MIN_SALT_LEN {
        return Err(format!(
            "salt of {salt_len} bytes, Argon2 needs at least {}",
            argon2::MIN_SALT_LEN
        ));
    }
    if hash.hash.is_none() {
        return Err("no hash output".into());
    }
    Ok(hash)
}

/// A PHC string with the algorithm, version and parameters of `model` (Argon2's defaults when
/// `None`) that no password matches in practice: its output is all zeros.
fn dummy_hash(model: Option<&PasswordHash<'_>>) -> String {
    let default_params;
    let (algorithm, version, params, output_len) = match model {
        Some(m) => (
            m.algorithm,
            m.version,
            m.params.clone(),
            m.hash
                .map_or(argon2::Params::DEFAULT_OUTPUT_LEN, |h| h.len()),
        ),
        None => {
            default_params = argon2::Params::default();
            (
                argon2::Algorithm::default().ident(),
                Some(argon2::Version::default().into()),
                argon2::password_hash::ParamsString::try_from(&default_params).unwrap_or_default(),
                argon2::Params::DEFAULT_OUTPUT_LEN,
            )
        }
    };
    let zeros = [0u8; 64];
    let hash = PasswordHash {
        algorithm,
        version,
        params,
        // 16 bytes, base64 without padding.
        salt: Salt::from_b64("ZHVtbXktc2FsdC0xMjM0NQ").ok(),
        hash: Output::new(&zeros[..output_len.clamp(Output::MIN_LENGTH, zeros.len())]).ok(),
    };
    hash.to_string()
}

impl BasicAuthPolicy {
    pub fn build(config: BasicAuthConfig) -> Result<Self, PolicyBuildError> {
        let err = |message: String| PolicyBuildError {
            policy: "basic_auth".into(),
            message,
        };
        if config.users.is_empty() {
            return Err(err(
                "users must not be empty: every request would be refused".into(),
            ));
        }
        super::check_secs("cache_secs", config.cache_secs).map_err(err)?;
        let mut first = None;
        for (user, phc) in &config.users {
            let hash = check_argon2(phc).map_err(|e| err(format!("users.{user}: {e}")))?;
            first.get_or_insert(hash);
        }
        let dummy = dummy_hash(first.as_ref());
        let realm = challenge_realm(&config.realm).map_err(err)?;
        let challenge =
            HeaderValue::try_from(format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
                .map_err(|e| err(format!("realm: {e}")))?;
        let user_header = config
            .user_header
            .as_deref()
            .map(HeaderName::try_from)
            .transpose()
            .map_err(|e| err(format!("user_header: {e}")))?;
        if config.cache_size > 0 && config.cache_secs == 0 {
            return Err(err(
                "cache_secs = 0 remembers nothing; set cache_size = 0 to verify every request"
                    .into(),
            ));
        }
        let verified = (config.cache_size > 0).then(|| {
            quick_cache::sync::Cache::new(usize::try_from(config.cache_size).unwrap_or(usize::MAX))
        });
        Ok(Self {
            challenge,
            users: Arc::new(config.users),
            dummy: dummy.into(),
            user_header,
            verified,
            salt: *uuid::Uuid::new_v4().as_bytes(),
            remember_for: Duration::from_secs(config.cache_secs),
            argon2_runs: AtomicU64::new(0),
        })
    }

    /// How many times Argon2 has run (a remembered pair does not run it).
    pub fn argon2_runs(&self) -> u64 {
        self.argon2_runs.load(Ordering::Relaxed)
    }

    fn cache_key(&self, user: &str, password: &str) -> CredentialKey {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update((user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Whether this pair verified less than `cache_secs` ago.
    fn remembered(&self, key: &CredentialKey) -> bool {
        let Some(cache) = &self.verified else {
            return false;
        };
        match cache.get(key) {
            Some(deadline) if Instant::now() < deadline => true,
            Some(_) => {
                cache.remove(key);
                false
            }
            None => false,
        }
    }

    /// [`Self::admit_in_place`] for the request phase that waited.
    fn admit(
        &self,
        mut req: Request<ProxyBody>,
        ctx: &mut RequestCtx,
        user: String,
    ) -> RequestOutcome {
        self.admit_in_place(&mut req, ctx, user);
        RequestOutcome::Continue(req)
    }

    /// Lets `user` through: the credentials leave the request, the user name goes on.
    fn admit_in_place(&self, req: &mut Request<ProxyBody>, ctx: &mut RequestCtx, user: String) {
        req.headers_mut().remove(header::AUTHORIZATION);
        if let Some(h) = &self.user_header {
            req.headers_mut().remove(h);
            if let Ok(v) = HeaderValue::try_from(user.as_str()) {
                req.headers_mut().insert(h.clone(), v);
            }
        }
        ctx.identity.basic_user = Some(BasicUser(user));
    }

    fn unauthorized(&self, message: &str) -> Response<ProxyBody> {
        let mut resp = error_response(StatusCode::UNAUTHORIZED, message);
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, self.challenge.clone());
        resp
    }
}

fn credentials(req: &Request<ProxyBody>) -> Option<(String, String)> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

impl Policy for BasicAuthPolicy {
    fn name(&self) -> &'static str {
        "basic_auth"
    }

    fn has_response_phase(&self) -> bool {
        false
    }

    fn try_request(&self, req: &mut Request<ProxyBody>, ctx: &mut RequestCtx) -> Decided {
        // A pair that verified recently: decided at once. Anything else runs Argon2.
        if self.verified.is_none() {
            return Decided::Wait;
        }
        match credentials(req) {
            Some((user, password)) if self.remembered(&self.cache_key(&user, &password)) => {
                self.admit_in_place(req, ctx, user);
                Decided::Continue
            }
            _ => Decided::Wait,
        }
    }

    async fn on_request(&self, req: Request<ProxyBody>, ctx: &mut RequestCtx) -> RequestOutcome {
        let Some((user, password)) = credentials(&req) else {
            return RequestOutcome::Respond(self.unauthorized("credentials required"));
        };
        let key = self
            .verified
            .as_ref()
            .map(|_| self.cache_key(&user, &password));
        if key.as_ref().is_some_and(|key| self.remembered(key)) {
            return self.admit(req, ctx, user);
        }
        let users = self.users.clone();
        let dummy = self.dummy.clone();
        let name = user.clone();
        self.argon2_runs.fetch_add(1, Ordering::Relaxed);
        let verified = tokio::task::spawn_blocking(move || {
            // An unknown user runs the same Argon2 work against the dummy hash, and fails.
            let (phc, known) = match users.get(&name) {
                Some(phc) => (phc.as_str(), true),
                None => (&*dummy, false),
            };
            let matches = PasswordHash::new(phc)
                .map(|hash| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &hash)
                        .is_ok()
                })
                .unwrap_or(false);
            known && matches
        })
        .await
        .unwrap_or(false);
        if !verified {
            tracing::debug!(request_id = %ctx.request_id, user, "basic_auth: rejected");
            return RequestOutcome::Respond(self.unauthorized("invalid credentials"));
        }
        if let (Some(cache), Some(key)) = (&self.verified, key) {
            cache.insert(key, Instant::now() + self.remember_for);
        }
        self.admit(req, ctx, user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phc(password: &str) -> String {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let params = argon2::Params::new(64, 1, 1, None).unwrap();
        let argon = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::encode_b64(b"unit test salt!!").unwrap();
        argon
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    fn policy(extra: &str) -> BasicAuthPolicy {
        let toml = format!(
            "users = {{ alice = \"{}\" }}\nuser_header = \"x-user\"\n{extra}",
            phc("s3cret")
        );
        BasicAuthPolicy::build(toml::from_str(&toml).unwrap()).unwrap()
    }

    /// Runs `p`'s request phase as the chain does (sync first); the user let through, if any.
    async fn admit(p: &BasicAuthPolicy, user: &str, password: &str) -> Option<String> {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let req = Request::builder()
            .header(header::AUTHORIZATION, format!("Basic {auth}"))
            .body(super::super::respond::empty())
            .unwrap();
        let mut ctx = RequestCtx::new(
            "192.0.2.7:4000".parse().unwrap(),
            "req-1".into(),
            "r".into(),
            "g".into(),
            false,
            Instant::now(),
        );
        let mut req = req;
        let outcome = match p.try_request(&mut req, &mut ctx) {
            Decided::Continue => RequestOutcome::Continue(req),
            Decided::Respond(resp) => RequestOutcome::Respond(resp),
            Decided::Wait => p.on_request(req, &mut ctx).await,
        };
        match outcome {
            RequestOutcome::Continue(req) => {
                assert!(req.headers().get(header::AUTHORIZATION).is_none());
                let forwarded = req.headers()["x-user"].to_str().unwrap().to_string();
                assert_eq!(
                    Some(&forwarded),
                    ctx.identity.basic_user.as_ref().map(|u| &u.0)
                );
                Some(forwarded)
            }
            RequestOutcome::Respond(resp) => {
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
                None
            }
        }
    }

    #[tokio::test]
    async fn verified_credentials_are_remembered_and_wrong_ones_never() {
        let p = policy("");
        assert_eq!(admit(&p, "alice", "s3cret").await.as_deref(), Some("alice"));
        assert_eq!(p.argon2_runs(), 1);
        for _ in 0..5 {
            assert_eq!(admit(&p, "alice", "s3cret").await.as_deref(), Some("alice"));
        }
        assert_eq!(p.argon2_runs(), 1, "a remembered pair runs no Argon2");
        // A wrong password for a remembered user, and an unknown user with the right
        // password, are verified in full every time and refused.
        for _ in 0..2 {
            assert_eq!(admit(&p, "alice", "s3cret!").await, None);
            assert_eq!(admit(&p, "bob", "s3cret").await, None);
        }
        assert_eq!(p.argon2_runs(), 5);
        assert_eq!(admit(&p, "alice", "s3cret").await.as_deref(), Some("alice"));
        assert_eq!(p.argon2_runs(), 5);
    }

    #[tokio::test]
    async fn remembered_credentials_expire_and_the_cache_can_be_off() {
        let p = policy("cache_secs = 1");
        assert!(admit(&p, "alice", "s3cret").await.is_some());
        assert!(admit(&p, "alice", "s3cret").await.is_some());
        assert_eq!(p.argon2_runs(), 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(admit(&p, "alice", "s3cret").await.is_some());
        assert_eq!(p.argon2_runs(), 2, "verified again after cache_secs");

        let off = policy("cache_size = 0");
        for _ in 0..3 {
            assert!(admit(&off, "alice", "s3cret").await.is_some());
        }
        assert_eq!(off.argon2_runs(), 3);
    }

    #[test]
    fn cache_secs_zero_with_a_cache_is_refused() {
        let toml = format!("users = {{ alice = \"{}\" }}\ncache_secs = 0", phc("x"));
        let e = BasicAuthPolicy::build(toml::from_str(&toml).unwrap())
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("cache_secs") && e.contains("cache_size = 0"),
            "{e}"
        );
    }

    #[test]
    fn rejects_non_phc_hash() {
        let cfg: BasicAuthConfig = toml::from_str("users = { alice = \"plain\" }").unwrap();
        assert!(BasicAuthPolicy::build(cfg).is_err());
    }

    fn build_error(phc: &str) -> String {
        let cfg: BasicAuthConfig =
            toml::from_str(&format!("users = {{ alice = \"{phc}\" }}")).unwrap();
        match BasicAuthPolicy::build(cfg) {
            Ok(_) => panic!("{phc} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rejects_hashes_argon2_cannot_verify() {
        let out = "$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g";
        let e = build_error(&format!("$scrypt$ln=15,r=8,p=1{out}"));
        assert!(
            e.contains("users.alice") && e.contains("not an Argon2 hash"),
            "{e}"
        );
        // m below Argon2's minimum of 8 KiB per lane.
        let e = build_error(&format!("$argon2id$v=19$m=1,t=1,p=1{out}"));
        assert!(e.contains("users.alice") && e.contains("parameters"), "{e}");
        let e = build_error(&format!("$argon2id$v=99$m=64,t=1,p=1{out}"));
        assert!(e.contains("version"), "{e}");
        // A 6-byte salt.
        let e = build_error("$argon2id$v=19$m=64,t=1,p=1$c2FsdHNh$aGFzaGhhc2hoYXNoaGFzaA");
        assert!(e.contains("salt"), "{e}");
    }

    #[test]
    fn dummy_hash_has_the_users_parameters() {
        let phc = "$argon2i$v=19$m=64,t=3,p=2$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA";
        let dummy = dummy_hash(Some(&PasswordHash::new(phc).unwrap()));
        assert!(dummy.starts_with("$argon2i$v=19$m=64,t=3,p=2$"), "{dummy}");
        check_argon2(&dummy).unwrap();
        let default = dummy_hash(None);
        assert!(
            default.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{default}"
        );
        check_argon2(&default).unwrap();
    }
}
