//! API key authentication.
//!
//! Data in: a key presented in a request header (default `x-api-key`) or, when `query_param` is
//! set, in the query string. The config holds only SHA-256 hex digests of valid keys, each with
//! an id; the presented key is hashed and looked up, so the config never contains a secret and
//! the lookup does not compare secrets byte by byte.
//!
//! A header present but empty counts as absent, so the query parameter is still consulted.
//!
//! Data out: an unknown or missing key answers 401 with `WWW-Authenticate: Key realm="<realm>"`
//! (as Kong's key-auth; `realm` defaults to `api`) and never reaches the upstream. A valid key
//! puts [`ApiKeyId`] into [`RequestCtx::identity`] (the rate limiter can key on it), sets
//! `id_header` (if configured) to the key's id, and removes the key itself (header and query
//! parameter) before forwarding.

use std::collections::HashMap;

use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::respond::{challenge_realm, error_response};
use super::{Decided, Policy, PolicyBuildError, ProxyBody, RequestCtx};

/// `{ type = "api_key", keys = [{ id = "team-a", sha256 = "<hex>" }] }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    #[serde(default = "default_header")]
    pub header: String,
    /// Also accept the key from this query parameter.
    #[serde(default)]
    pub query_param: Option<String>,
    /// Header that receives the matched key's id on the forwarded request.
    #[serde(default)]
    pub id_header: Option<String>,
    /// Realm named in the `WWW-Authenticate` challenge of a 401.
    #[serde(default = "default_realm")]
    pub realm: String,
    pub keys: Vec<ApiKeyEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    pub id: String,
    /// Lowercase or uppercase hex SHA-256 of the key.
    pub sha256: String,
}

fn default_header() -> String {
    "x-api-key".into()
}

fn default_realm() -> String {
    "api".into()
}

/// Id of the API key that authenticated the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyId(pub String);

pub struct ApiKeyPolicy {
    header: HeaderName,
    query_param: Option<String>,
    id_header: Option<HeaderName>,
    ids_by_hash: HashMap<[u8; 32], String>,
    /// `WWW-Authenticate` value of a 401.
    challenge: HeaderValue,
}

impl ApiKeyPolicy {
    pub fn build(config: ApiKeyConfig) -> Result<Self, PolicyBuildError> {
        let err = |message: String| PolicyBuildError {
            policy: "api_key".into(),
            message,
        };
        let header = HeaderName::try_from(config.header.as_str())
            .map_err(|e| err(format!("header: {e}")))?;
        let id_header = config
            .id_header
            .as_deref()
            .map(HeaderName::try_from)
            .transpose()
            .map_err(|e| err(format!("id_header: {e}")))?;
        let realm = challenge_realm(&config.realm).map_err(err)?;
        let challenge = HeaderValue::try_from(format!("Key realm=\"{realm}\""))
            .map_err(|e| err(format!("realm: {e}")))?;
        if config.keys.is_empty() {
            return Err(err(
                "keys must not be empty: every request would be refused".into(),
            ));
        }
        let mut ids_by_hash = HashMap::new();
        for (i, entry) in config.keys.iter().enumerate() {
            let digest: [u8; 32] = hex::decode(entry.sha256.trim())
                .ok()
                .and_then(|d| d.try_into().ok())
                .ok_or_else(|| err(format!("keys[{i}].sha256: not 64 hex characters")))?;
            if let Some(other) = ids_by_hash.insert(digest, entry.id.clone()) {
                return Err(err(format!(
                    "keys[{i}].sha256: the same key as id {other:?}; one key names one client"
                )));
            }
        }
        Ok(Self {
            header,
            query_param: config.query_param,
            id_header,
            ids_by_hash,
            challenge,
        })
    }

    /// The key from the header or, when that is absent or empty, the query parameter.
    fn presented_key(&self, req: &Request<ProxyBody>) -> Option<String> {
        let from_header = req
            .headers()
            .get(&self.header)
            .map(|v| v.to_str().map(str::trim).unwrap_or_default());
        if let Some(key) = from_header.filter(|k| !k.is_empty()) {
            return Some(key.to_string());
        }
        let param = self.query_param.as_deref()?;
        req.uri().query()?.split('&').find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            (name == param).then(|| percent_decode(value))
        })
    }

    fn unauthorized(&self, message: &str) -> Response<ProxyBody> {
        let mut resp = error_response(StatusCode::UNAUTHORIZED, message);
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, self.challenge.clone());
        resp
    }
}

/// Minimal `%XX` / `+` decoding for a query value.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `uri` without query parameter `param`, or `None` when it has none.
fn without_param(uri: &http::Uri, param: &str) -> Option<http::Uri> {
    let query = uri.query()?;
    let is_param = |pair: &&str| pair.split('=').next() == Some(param);
    if !query.split('&').any(|pair| is_param(&pair)) {
        return None;
    }
    let kept: Vec<&str> = query.split('&').filter(|pair| !is_param(pair)).collect();
    let pq = if kept.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// Hex SHA-256 of a key, as the config stores it.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Policy for ApiKeyPolicy {
    fn name(&self) -> &'static str {
        "api_key"
    }

    fn has_response_phase(&self) -> bool {
        false
    }

    fn try_request(&self, req: &mut Request<ProxyBody>, ctx: &mut RequestCtx) -> Decided {
        let Some(key) = self.presented_key(req).filter(|k| !k.is_empty()) else {
            return Decided::Respond(self.unauthorized("missing API key"));
        };
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let Some(id) = self.ids_by_hash.get(&digest) else {
            tracing::debug!(request_id = %ctx.request_id, "api_key: unknown key");
            return Decided::Respond(self.unauthorized("invalid API key"));
        };
        req.headers_mut().remove(&self.header);
        if let Some(uri) = self
            .query_param
            .as_deref()
            .and_then(|p| without_param(req.uri(), p))
        {
            *req.uri_mut() = uri;
        }
        if let Some(name) = &self.id_header {
            req.headers_mut().remove(name);
            if let Ok(v) = HeaderValue::try_from(id.as_str()) {
                req.headers_mut().insert(name.clone(), v);
            }
        }
        ctx.identity.api_key = Some(ApiKeyId(id.clone()));
        Decided::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_query_values() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn strips_the_key_parameter() {
        let uri: http::Uri = "/a?x=1&api_key=k&y=2".parse().unwrap();
        assert_eq!(without_param(&uri, "api_key").unwrap(), "/a?x=1&y=2");
        let uri: http::Uri = "/a?api_key=k".parse().unwrap();
        assert_eq!(without_param(&uri, "api_key").unwrap(), "/a");
        let uri: http::Uri = "/a?x=1".parse().unwrap();
        assert!(without_param(&uri, "api_key").is_none());
    }

    #[test]
    fn rejects_bad_digest() {
        let cfg: ApiKeyConfig = toml::from_str("keys = [{ id = \"a\", sha256 = \"zz\" }]").unwrap();
        assert!(ApiKeyPolicy::build(cfg).is_err());
    }
}
