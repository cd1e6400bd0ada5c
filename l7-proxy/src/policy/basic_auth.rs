//! HTTP Basic authentication against Argon2 password hashes.
//!
//! Data in: `Authorization: Basic base64(user:password)`; the config maps user names to PHC
//! strings (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`), validated when the chain is built.
//! Verification runs on the blocking pool because Argon2 is deliberately slow.
//!
//! Data out: bad or missing credentials answer 401 with `WWW-Authenticate: Basic realm=...`.
//! A valid user goes into [`RequestCtx::identity`] as [`BasicUser`], optionally into
//! `user_header`, and the `Authorization` header is removed before forwarding.

use std::collections::BTreeMap;
use std::sync::Arc;

use argon2::password_hash::PasswordHash;
use argon2::{Argon2, PasswordVerifier};
use base64::Engine;
use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use serde::Deserialize;

use super::respond::error_response;
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
    user_header: Option<HeaderName>,
}

impl BasicAuthPolicy {
    pub fn build(config: BasicAuthConfig) -> Result<Self, PolicyBuildError> {
        let err = |message: String| PolicyBuildError {
            policy: "basic_auth".into(),
            message,
        };
        for (user, phc) in &config.users {
            PasswordHash::new(phc).map_err(|e| err(format!("users.{user}: {e}")))?;
        }
        let challenge = HeaderValue::try_from(format!(
            "Basic realm=\"{}\", charset=\"UTF-8\"",
            config.realm.replace('"', "'")
        ))
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
        let name = user.clone();
        let verified = tokio::task::spawn_blocking(move || {
            let Some(phc) = users.get(&name) else {
                return false;
            };
            PasswordHash::new(phc)
                .map(|hash| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &hash)
                        .is_ok()
                })
                .unwrap_or(false)
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
}
