//! API versioning: picks the upstream group from the version a request asks for.
//!
//! Data in: the version comes from, in order, a path prefix naming a configured version
//! (`/v2/users` → `v2`, forwarded as `/users`; `/2/users` is an ordinary path), the `header`
//! (default `Accept-Version: 2` or `v2`), or a `version` parameter of a vendor media type in
//! `Accept` (`application/vnd.x+json; version=2`; only `media_type` when it is configured, so
//! `version` parameters of other types, such as OpenMetrics', are not taken for API
//! versions); otherwise `default`. A version named in a header but not configured answers 400.
//!
//! Data out: [`RequestCtx::upstream_group`] is set to the version's `upstream`, and
//! [`SelectedVersion`] is kept for the response phase. A response whose version was not
//! chosen by its path carries `Vary` with the version header and `Accept`, so caches keep
//! versions apart. Responses of deprecated versions carry `Deprecation` (RFC 9745:
//! `@<unix time>` of `deprecated_since`, or `true` without a date, as the drafts before it did)
//! and `Sunset` (RFC 8594) when configured; both dates are HTTP dates, checked at load.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use serde::Deserialize;

use super::respond::error_response;
use super::{Decided, PhaseState, Policy, PolicyBuildError, ProxyBody, RequestCtx};

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
    /// The media type whose `version` parameter selects a version in `Accept`
    /// (`application/vnd.example+json`); by default any `application/vnd.*` type.
    #[serde(default)]
    pub media_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionEntry {
    pub upstream: String,
    #[serde(default)]
    pub deprecated: bool,
    /// HTTP date the version was deprecated, sent as `Deprecation: @<unix time>`; implies
    /// `deprecated`.
    #[serde(default)]
    pub deprecated_since: Option<String>,
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
pub struct SelectedVersion {
    pub name: String,
    /// Chosen by the path: the response does not depend on the request's headers.
    pub by_path: bool,
}

/// The response headers of a deprecated version, built at load.
struct Deprecation {
    deprecation: HeaderValue,
    sunset: Option<HeaderValue>,
}

pub struct VersionPolicy {
    config: VersionConfig,
    header: HeaderName,
    /// `Vary` of responses whose version was not chosen by the path.
    vary: HeaderValue,
    deprecations: BTreeMap<String, Deprecation>,
}

/// An HTTP date from config (`Sat, 01 May 2027 00:00:00 GMT`).
fn http_date(field: &str, text: &str) -> Result<std::time::SystemTime, String> {
    httpdate::parse_http_date(text).map_err(|_| {
        format!("{field}: {text:?} is not an HTTP date (like \"Sat, 01 May 2027 00:00:00 GMT\")")
    })
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
        let mut deprecations = BTreeMap::new();
        for (name, v) in &config.versions {
            let sunset = v
                .sunset
                .as_deref()
                .map(|s| {
                    // Sent in the IMF-fixdate format senders must use, whichever HTTP date
                    // format the config spelled it in (RFC 9110 section 5.6.7).
                    let at = http_date(&format!("versions.{name}.sunset"), s)?;
                    HeaderValue::try_from(httpdate::fmt_http_date(at)).map_err(|e| e.to_string())
                })
                .transpose()
                .map_err(err)?;
            let deprecation = match &v.deprecated_since {
                Some(since) => {
                    let at = http_date(&format!("versions.{name}.deprecated_since"), since)
                        .map_err(err)?;
                    let secs = match at.duration_since(std::time::UNIX_EPOCH) {
                        Ok(d) => d.as_secs() as i64,
                        Err(before) => -(before.duration().as_secs() as i64),
                    };
                    Some(HeaderValue::from_str(&format!("@{secs}")).expect("a number"))
                }
                None => v.deprecated.then(|| HeaderValue::from_static("true")),
            };
            match (deprecation, sunset) {
                (Some(deprecation), sunset) => {
                    deprecations.insert(
                        name.clone(),
                        Deprecation {
                            deprecation,
                            sunset,
                        },
                    );
                }
                (None, Some(_)) => {
                    return Err(err(format!(
                        "versions.{name}.sunset is set but the version is not deprecated \
                         (set deprecated = true or deprecated_since)"
                    )))
                }
                (None, None) => {}
            }
        }
        let header = HeaderName::try_from(config.header.as_str())
            .map_err(|e| err(format!("header: {e}")))?;
        let vary = HeaderValue::try_from(format!("{}, Accept", header.as_str()))
            .map_err(|e| err(format!("header: {e}")))?;
        Ok(Self {
            config,
            header,
            vary,
            deprecations,
        })
    }

    /// The configured version a path segment names, in its own spelling (any case).
    fn lookup_path(&self, segment: &str) -> Option<&str> {
        self.config
            .versions
            .keys()
            .find(|k| k.eq_ignore_ascii_case(segment))
            .map(String::as_str)
    }

    /// The version a `version` parameter of `accept` asks for, from the configured media type
    /// or else from any vendor (`application/vnd.*`) type.
    fn media_type_version<'a>(&self, accept: &'a str) -> Option<&'a str> {
        accept.split(',').find_map(|media| {
            let mut parts = media.split(';');
            let essence = parts.next()?.trim();
            let counts = match &self.config.media_type {
                Some(m) => essence.eq_ignore_ascii_case(m),
                None => essence
                    .get(..16)
                    .is_some_and(|p| p.eq_ignore_ascii_case("application/vnd.")),
            };
            if !counts {
                return None;
            }
            parts.find_map(|param| {
                let (name, value) = param.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("version")
                    .then(|| value.trim().trim_matches('"'))
            })
        })
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

    fn try_request(&self, req: &mut Request<ProxyBody>, ctx: &mut RequestCtx) -> Decided {
        let mut selected = None;
        let mut by_path = false;
        if self.config.from_path {
            let first = req.uri().path().trim_start_matches('/').split('/').next();
            if let Some((seg, name)) = first.and_then(|s| Some((s, self.lookup_path(s)?))) {
                if let Some(uri) = strip_first_segment(req.uri(), seg.len()) {
                    *req.uri_mut() = uri;
                    selected = Some(name.to_string());
                    by_path = true;
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
                    self.media_type_version(accept).map(str::to_string)
                });
            if let Some(asked) = asked {
                match self.lookup(&asked) {
                    Some(name) => selected = Some(name.to_string()),
                    None => {
                        return Decided::Respond(error_response(
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
        ctx.set_state(PhaseState::Version(SelectedVersion { name, by_path }));
        Decided::Continue
    }

    fn try_response(&self, resp: &mut Response<ProxyBody>, ctx: &mut RequestCtx) -> bool {
        let PhaseState::Version(SelectedVersion { name, by_path }) = ctx.take_state() else {
            return true;
        };
        let headers = resp.headers_mut();
        if !by_path {
            headers.append(http::header::VARY, self.vary.clone());
        }
        if let Some(d) = self.deprecations.get(&name) {
            headers.insert("deprecation", d.deprecation.clone());
            if let Some(s) = &d.sunset {
                headers.insert("sunset", s.clone());
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy with versions v1 (`v1_fields` added to its table) and v2, and `extra` fields.
    fn policy_with(v1_fields: &str, extra: &str) -> Result<VersionPolicy, String> {
        let config: VersionConfig = toml::from_str(&format!(
            "default = \"v1\"\nversions = {{ v1 = {{ upstream = \"a\"{v1_fields} }}, v2 = {{ upstream = \"b\" }} }}\n{extra}"
        ))
        .map_err(|e| e.to_string())?;
        VersionPolicy::build(config).map_err(|e| e.to_string())
    }

    fn policy(extra: &str) -> Result<VersionPolicy, String> {
        policy_with("", extra)
    }

    #[test]
    fn media_type_parameter() {
        let any_vendor = policy("").unwrap();
        assert_eq!(
            any_vendor.media_type_version("application/vnd.x+json; version=2, */*"),
            Some("2")
        );
        assert_eq!(any_vendor.media_type_version("application/json"), None);
        // Other types' version parameters are not API versions.
        let prometheus =
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(any_vendor.media_type_version(prometheus), None);
        let one_type = policy("media_type = \"application/vnd.shop+json\"").unwrap();
        assert_eq!(
            one_type.media_type_version(
                "application/vnd.x+json;version=3, application/vnd.shop+json; version=\"2\""
            ),
            Some("2")
        );
        assert_eq!(
            one_type.media_type_version("application/vnd.x+json;version=3"),
            None
        );
    }

    #[test]
    fn dates_are_checked_and_deprecation_is_an_rfc_9745_date() {
        let err = policy_with(", deprecated = true, sunset = \"next tuesday\"", "")
            .err()
            .unwrap();
        assert!(
            err.contains("versions.v1.sunset: \"next tuesday\" is not an HTTP date"),
            "{err}"
        );
        let err = policy_with(", sunset = \"Sat, 01 May 2027 00:00:00 GMT\"", "")
            .err()
            .unwrap();
        assert!(
            err.contains("sunset is set but the version is not deprecated"),
            "{err}"
        );
        let p = policy_with(", deprecated_since = \"Sun, 30 Jun 2024 23:59:59 GMT\"", "").unwrap();
        assert_eq!(p.deprecations["v1"].deprecation, "@1719791999");
        let p = policy_with(
            ", deprecated = true, sunset = \"Sunday, 06-Nov-94 08:49:37 GMT\"",
            "",
        )
        .unwrap();
        assert_eq!(
            p.deprecations["v1"].sunset.as_ref().unwrap(),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
    }

    #[test]
    fn strips_prefix_keeps_query() {
        let uri: Uri = "/v2/users?id=1".parse().unwrap();
        assert_eq!(strip_first_segment(&uri, 2).unwrap(), "/users?id=1");
        let uri: Uri = "/v2".parse().unwrap();
        assert_eq!(strip_first_segment(&uri, 2).unwrap(), "/");
    }
}
