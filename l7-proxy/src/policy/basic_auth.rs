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
//! Data out: bad or missing credentials answer 401 with `WWW-Authenticate: Basic realm=...`.
//! A valid user goes into [`RequestCtx::identity`] as [`BasicUser`], optionally into
//! `user_header`, and the `Authorization` header is removed before forwarding.

use std::collections::BTreeMap;
use std::sync::Arc;

use argon2::password_hash::{Output, PasswordHash, Salt};
use argon2::{Argon2, PasswordVerifier};
use base64::Engine;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use serde::Deserialize;

use super::respond::{challenge_realm, error_response};
use super::{Policy, PolicyBuildError, ProxyBody, RequestCtx, RequestOutcome};

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
}

fn default_realm() -> String {
    "restricted".into()
}

/// The authenticated Basic-auth user.
#[derive(Debug, Clone)]
pub struct BasicUser(pub String);

pub struct BasicAuthPolicy {
    challenge: HeaderValue,
    users: Arc<BTreeMap<String, String>>,
    /// PHC string checked for unknown users, so they cost as much as known ones.
    dummy: Arc<str>,
    user_header: Option<HeaderName>,
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
        Ok(Self {
            challenge,
            users: Arc::new(config.users),
            dummy: dummy.into(),
            user_header,
        })
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

    async fn on_request(
        &self,
        mut req: Request<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> RequestOutcome {
        let Some((user, password)) = credentials(&req) else {
            return RequestOutcome::Respond(self.unauthorized("credentials required"));
        };
        let users = self.users.clone();
        let dummy = self.dummy.clone();
        let name = user.clone();
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
        req.headers_mut().remove(header::AUTHORIZATION);
        if let Some(h) = &self.user_header {
            req.headers_mut().remove(h);
            if let Ok(v) = HeaderValue::try_from(user.as_str()) {
                req.headers_mut().insert(h.clone(), v);
            }
        }
        ctx.identity.basic_user = Some(BasicUser(user));
        RequestOutcome::Continue(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
