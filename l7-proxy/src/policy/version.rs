//! API versioning: picks the upstream group from the version a request asks for.
//!
//! Data in: the version comes from, in order, a path prefix (`/v2/users` → `v2`, forwarded as
//! `/users`), the `header` (default `Accept-Version: 2` or `v2`), or a `version` parameter of
//! the `Accept` media type (`application/vnd.x+json; version=2`); otherwise `default`. A
//! version named in a header but not configured answers 400.
//!
//! Data out: [`RequestCtx::upstream_group`] is set to the version's `upstream`, and
//! [`SelectedVersion`] is kept for the response phase. Responses of deprecated versions carry
//! `Deprecation` (and `Sunset` when configured).

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use serde::Deserialize;

use super::respond::error_response;
use super::{PhaseState, Policy, PolicyBuildError, ProxyBody, RequestCtx, RequestOutcome};

/// `{ type = "version", default = "v1", versions = { v1 = { upstream = "api-v1" } } }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionConfig {
    pub default: String,
    pub versions: BTreeMap<String, VersionEntry>,
    #[serde(default = "default_header")]
    pub header: String,
    /// Whether `/vN/` path prefixes select versions (and are stripped).
    #[serde(default = "yes")]
    pub from_path: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionEntry {
    pub upstream: String,
    #[serde(default)]
    pub deprecated: bool,
    /// HTTP date sent as `Sunset`, e.g. "Sat, 01 May 2027 00:00:00 GMT".
    #[serde(default)]
    pub sunset: Option<String>,
}

fn default_header() -> String {
    "accept-version".into()
}
fn yes() -> bool {
    true
}

/// The version a request was routed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedVersion(pub String);

pub struct VersionPolicy {
    config: VersionConfig,
    header: HeaderName,
}

impl VersionPolicy {
    pub fn build(config: VersionConfig) -> Result<Self, PolicyBuildError> {
        let err = |message: String| PolicyBuildError {
            policy: "version".into(),
            message,
        };
        if !config.versions.contains_key(&config.default) {
            return Err(err(format!(
                "default {:?} is not in versions",
                config.default
            )));
        }
        for (name, v) in &config.versions {
            if let Some(s) = &v.sunset {
                HeaderValue::try_from(s.as_str())
                    .map_err(|e| err(format!("versions.{name}.sunset: {e}")))?;
            }
        }
        let header = HeaderName::try_from(config.header.as_str())
            .map_err(|e| err(format!("header: {e}")))?;
        Ok(Self { config, header })
    }

    /// The configured version a client's spelling names (`2`, `v2`, `V2` all name `v2`).
    fn lookup(&self, asked: &str) -> Option<&str> {
        let asked = asked.trim();
        self.config
            .versions
            .keys()
            .find(|k| {
                k.eq_ignore_ascii_case(asked)
                    || k.strip_prefix(['v', 'V']).is_some_and(|n| n == asked)
            })
            .map(String::as_str)
    }
}

/// `version` parameter of a media type in `Accept`.
fn media_type_version(accept: &str) -> Option<&str> {
    accept.split(',').find_map(|media| {
        media.split(';').skip(1).find_map(|param| {
            let (name, value) = param.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("version")
                .then(|| value.trim().trim_matches('"'))
        })
    })
}

/// `uri` without its first path segment.
fn strip_first_segment(uri: &Uri, segment_len: usize) -> Option<Uri> {
    let rest = &uri.path()[1 + segment_len..];
    let path = if rest.is_empty() { "/" } else { rest };
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

impl Policy for VersionPolicy {
    fn name(&self) -> &'static str {
        "version"
    }

    async fn on_request(
        &self,
        mut req: Request<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> RequestOutcome {
        let mut selected = None;
        if self.config.from_path {
            let first = req.uri().path().trim_start_matches('/').split('/').next();
            if let Some((seg, name)) = first.and_then(|s| Some((s, self.lookup(s)?))) {
                if let Some(uri) = strip_first_segment(req.uri(), seg.len()) {
                    *req.uri_mut() = uri;
                    selected = Some(name.to_string());
                }
            }
        }
        if selected.is_none() {
            let asked = req
                .headers()
                .get(&self.header)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or_else(|| {
                    let accept = req.headers().get(http::header::ACCEPT)?.to_str().ok()?;
                    media_type_version(accept).map(str::to_string)
                });
            if let Some(asked) = asked {
                match self.lookup(&asked) {
                    Some(name) => selected = Some(name.to_string()),
                    None => {
                        return RequestOutcome::Respond(error_response(
                            StatusCode::BAD_REQUEST,
                            &format!("unsupported API version {asked:?}"),
                        ))
                    }
                }
            }
        }
        let name = selected.unwrap_or_else(|| self.config.default.clone());
        if let Some(v) = self.config.versions.get(&name) {
            ctx.upstream_group = v.upstream.clone();
        }
        ctx.set_state(PhaseState::Version(SelectedVersion(name)));
        RequestOutcome::Continue(req)
    }

    async fn on_response(
        &self,
        mut resp: Response<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> Response<ProxyBody> {
        let PhaseState::Version(SelectedVersion(name)) = ctx.take_state() else {
            return resp;
        };
        let Some(v) = self.config.versions.get(&name) else {
            return resp;
        };
        if v.deprecated {
            resp.headers_mut()
                .insert("deprecation", HeaderValue::from_static("true"));
            if let Some(s) = v
                .sunset
                .as_deref()
                .and_then(|s| HeaderValue::try_from(s).ok())
            {
                resp.headers_mut().insert("sunset", s);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_parameter() {
        assert_eq!(
            media_type_version("application/vnd.x+json; version=2, */*"),
            Some("2")
        );
        assert_eq!(media_type_version("application/json"), None);
    }

    #[test]
    fn strips_prefix_keeps_query() {
        let uri: Uri = "/v2/users?id=1".parse().unwrap();
        assert_eq!(strip_first_segment(&uri, 2).unwrap(), "/users?id=1");
        let uri: Uri = "/v2".parse().unwrap();
        assert_eq!(strip_first_segment(&uri, 2).unwrap(), "/");
    }
}
