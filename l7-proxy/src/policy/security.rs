//! Security filters, each a separate policy: client IP allow/deny lists, a request body size
//! limit, an allowed-methods list and CORS.
//!
//! Data in: the client address from [`RequestCtx::client_addr`] (IPv4-mapped IPv6 addresses
//! are matched as IPv4), the request method, `Content-Length` and body, and `Origin` /
//! `Access-Control-Request-*` headers.
//!
//! Data out: a denied address answers 403, an oversized body 413 (from `Content-Length`, or,
//! for a body without one, after reading at most `max_bytes` of it: such bodies are buffered up
//! to the limit, never beyond), a method not listed 405 with `Allow` (allowing `GET` allows
//! `HEAD`). CORS answers preflights itself with 204 and adds `Access-Control-Allow-Origin` (and
//! friends) to responses for allowed origins; with listed origins (not `*`) every response
//! carries `Vary: Origin`, allowed or not, so a cache keeps them apart. A preflight allows the
//! request headers in `headers`, or, when that list is empty, the headers it asks for (as
//! Kong does: with no list, CORS limits origins and methods, not headers).

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use ipnet::IpNet;
use serde::Deserialize;

use super::respond::{
    append_token, content_length, empty, error_response, full, read_limited, ReadError,
};
use super::{Decided, PhaseState, Policy, PolicyBuildError, ProxyBody, RequestCtx, RequestOutcome};

fn build_err(policy: &str, message: String) -> PolicyBuildError {
    PolicyBuildError {
        policy: policy.into(),
        message,
    }
}

/// HTTP methods from config (any case; sent upper-cased), or an error that names the bad one.
fn parse_methods(
    policy: &str,
    field: &str,
    names: &[String],
) -> Result<Vec<Method>, PolicyBuildError> {
    names
        .iter()
        .map(|m| {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| build_err(policy, format!("{field}: {m:?} is not an HTTP method")))
        })
        .collect()
}

/// `GET, POST`: a list of methods as the `Allow` and `Access-Control-Allow-Methods` headers
/// carry it.
fn method_list(methods: &[Method]) -> HeaderValue {
    let joined = methods
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    // Method tokens and ", " are all valid header value bytes.
    HeaderValue::try_from(joined).expect("method tokens make a valid header value")
}

/// A list of header names as a CORS header carries it (`content-type, x-total`), checked once
/// when the policy is built; `None` for an empty list.
fn header_name_list(
    policy: &str,
    field: &str,
    names: &[String],
) -> Result<Option<HeaderValue>, PolicyBuildError> {
    for name in names {
        http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| build_err(policy, format!("{field}: {name:?} is not a header name")))?;
    }
    if names.is_empty() {
        return Ok(None);
    }
    // Header names and ", " are all valid header value bytes.
    Ok(Some(
        HeaderValue::try_from(names.join(", ")).expect("header names make a valid header value"),
    ))
}

/// Checks that `origin` is `*` or an origin as browsers send it in `Origin`:
/// `scheme://host` with an optional port, and no path.
fn check_origin(origin: &str) -> Result<(), String> {
    // `null` is what sandboxed documents and some redirects send.
    if origin == "*" || origin == "null" {
        return Ok(());
    }
    if origin.contains('*') {
        return Err(format!(
            "{origin:?}: wildcards other than \"*\" alone are not supported; list each origin \
             (https://app.example.com)"
        ));
    }
    let uri = origin.parse::<http::Uri>().ok();
    let whole = uri.as_ref().is_some_and(|u| {
        u.scheme().is_some()
            && u.host().is_some_and(|h| !h.is_empty())
            && u.path_and_query()
                .is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/")
    });
    if !whole || origin.ends_with('/') {
        return Err(format!(
            "{origin:?} is not an origin: write scheme://host[:port], with no path \
             (https://app.example.com)"
        ));
    }
    Ok(())
}

// ---- IP filter ----------------------------------------------------------------------------

/// `{ type = "ip_filter", allow = ["10.0.0.0/8"], deny = ["10.6.6.0/24"] }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpFilterConfig {
    /// When not empty, only these networks are admitted.
    #[serde(default, deserialize_with = "networks")]
    pub allow: Vec<IpNet>,
    /// Always refused; checked first.
    #[serde(default, deserialize_with = "networks")]
    pub deny: Vec<IpNet>,
}

/// A list of networks in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`) or single addresses
/// (`10.0.0.1`, as `/32` or `/128`, as nginx's `allow` takes them); an error names the entry.
fn networks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| {
            t.parse::<IpNet>()
                .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "`{t}` is not an address or a network in CIDR notation (10.0.0.0/8, \
                         10.0.0.1, 2001:db8::/32)"
                    ))
                })
        })
        .collect()
}

pub struct IpFilterPolicy {
    config: IpFilterConfig,
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4 network it stands for:
/// client addresses are compared in their canonical form, where a mapped address is IPv4.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

impl IpFilterPolicy {
    pub fn build(mut config: IpFilterConfig) -> Result<Self, PolicyBuildError> {
        if config.allow.is_empty() && config.deny.is_empty() {
            return Err(build_err(
                "ip_filter",
                "needs networks in allow, deny or both: as it is, it filters nothing".into(),
            ));
        }
        for net in config.allow.iter_mut().chain(config.deny.iter_mut()) {
            *net = canonical_net(*net);
        }
        Ok(Self { config })
    }

    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        !self.config.deny.iter().any(|n| n.contains(&ip))
            && (self.config.allow.is_empty() || self.config.allow.iter().any(|n| n.contains(&ip)))
    }
}

impl Policy for IpFilterPolicy {
    fn name(&self) -> &'static str {
        "ip_filter"
    }

    fn has_response_phase(&self) -> bool {
        false
    }

    fn try_request(&self, _req: &mut Request<ProxyBody>, ctx: &mut RequestCtx) -> Decided {
        if self.admits(ctx.client_addr.ip()) {
            Decided::Continue
        } else {
            Decided::Respond(error_response(
                StatusCode::FORBIDDEN,
                "client address not allowed",
            ))
        }
    }
}

// ---- Body limit ---------------------------------------------------------------------------

/// `{ type = "body_limit", max_bytes = 1048576 }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyLimitConfig {
    pub max_bytes: usize,
}

pub struct BodyLimitPolicy {
    max_bytes: usize,
}

impl BodyLimitPolicy {
    pub fn build(config: BodyLimitConfig) -> Result<Self, PolicyBuildError> {
        Ok(Self {
            max_bytes: config.max_bytes,
        })
    }
}

impl Policy for BodyLimitPolicy {
    fn name(&self) -> &'static str {
        "body_limit"
    }

    fn has_response_phase(&self) -> bool {
        false
    }

    async fn on_request(&self, req: Request<ProxyBody>, _ctx: &mut RequestCtx) -> RequestOutcome {
        if content_length(req.headers()).is_some_and(|len| len > self.max_bytes as u64) {
            return RequestOutcome::Respond(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
            ));
        }
        if content_length(req.headers()).is_some() {
            // Declared length within the limit; hyper enforces that the body matches it.
            return RequestOutcome::Continue(req);
        }
        let (parts, body) = req.into_parts();
        match Box::pin(read_limited(body, self.max_bytes)).await {
            Ok(bytes) => RequestOutcome::Continue(Request::from_parts(parts, full(bytes))),
            Err(ReadError::TooLarge { .. }) => RequestOutcome::Respond(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
            )),
            Err(ReadError::Body(e)) => {
                tracing::debug!(error = %e, "body_limit: request body failed");
                RequestOutcome::Respond(error_response(
                    StatusCode::BAD_REQUEST,
                    "request body could not be read",
                ))
            }
        }
    }
}

// ---- Allowed methods ----------------------------------------------------------------------

/// `{ type = "methods", allow = ["GET", "POST"] }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodsConfig {
    pub allow: Vec<String>,
}

pub struct MethodsPolicy {
    allow: Vec<Method>,
    allow_header: HeaderValue,
}

impl MethodsPolicy {
    pub fn build(config: MethodsConfig) -> Result<Self, PolicyBuildError> {
        if config.allow.is_empty() {
            return Err(build_err(
                "methods",
                "allow must not be empty: every request would be refused".into(),
            ));
        }
        let mut allow = parse_methods("methods", "allow", &config.allow)?;
        // A resource that answers GET answers HEAD too (RFC 9110 §9.3.2; nginx's
        // `limit_except GET` allows both).
        if allow.contains(&Method::GET) && !allow.contains(&Method::HEAD) {
            allow.push(Method::HEAD);
        }
        let allow_header = method_list(&allow);
        Ok(Self {
            allow,
            allow_header,
        })
    }
}

impl Policy for MethodsPolicy {
    fn name(&self) -> &'static str {
        "methods"
    }

    fn has_response_phase(&self) -> bool {
        false
    }

    fn try_request(&self, req: &mut Request<ProxyBody>, _ctx: &mut RequestCtx) -> Decided {
        if self.allow.contains(req.method()) {
            return Decided::Continue;
        }
        let mut resp = error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        resp.headers_mut()
            .insert(header::ALLOW, self.allow_header.clone());
        Decided::Respond(resp)
    }
}

// ---- CORS ---------------------------------------------------------------------------------

/// `{ type = "cors", origins = ["https://app.example"], methods = ["GET", "POST"] }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Allowed origins; `"*"` allows any.
    pub origins: Vec<String>,
    #[serde(default = "default_cors_methods")]
    pub methods: Vec<String>,
    /// Request headers a preflight allows (`Access-Control-Allow-Headers`); empty (the
    /// default): those the preflight asks for.
    #[serde(default)]
    pub headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub credentials: bool,
    #[serde(default = "default_max_age")]
    pub max_age_secs: u64,
}

fn default_cors_methods() -> Vec<String> {
    ["GET", "HEAD", "POST"].map(String::from).to_vec()
}
fn default_max_age() -> u64 {
    600
}

pub struct CorsPolicy {
    config: CorsConfig,
    any_origin: bool,
    /// `Access-Control-Allow-Methods`, `-Allow-Headers` and `-Expose-Headers`, built once.
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
}

impl CorsPolicy {
    pub fn build(config: CorsConfig) -> Result<Self, PolicyBuildError> {
        if config.origins.is_empty() {
            return Err(build_err(
                "cors",
                "origins must not be empty: list the origins allowed, or \"*\" for any".into(),
            ));
        }
        for origin in &config.origins {
            check_origin(origin).map_err(|e| build_err("cors", format!("origins: {e}")))?;
        }
        super::check_secs("max_age_secs", config.max_age_secs).map_err(|e| build_err("cors", e))?;
        let any_origin = config.origins.iter().any(|o| o == "*");
        if any_origin && config.credentials {
            return Err(build_err(
                "cors",
                "credentials = true cannot be combined with origins = [\"*\"]".into(),
            ));
        }
        let methods = parse_methods("cors", "methods", &config.methods)?;
        let allow_methods = (!methods.is_empty()).then(|| method_list(&methods));
        let allow_headers = header_name_list("cors", "headers", &config.headers)?;
        let expose_headers = header_name_list("cors", "expose_headers", &config.expose_headers)?;
        Ok(Self {
            config,
            any_origin,
            allow_methods,
            allow_headers,
            expose_headers,
        })
    }

    fn allowed_origin(&self, req: &Request<ProxyBody>) -> Option<HeaderValue> {
        let origin = req.headers().get(header::ORIGIN)?;
        let text = origin.to_str().ok()?;
        (self.any_origin
            || self
                .config
                .origins
                .iter()
                .any(|o| o.eq_ignore_ascii_case(text)))
        .then(|| origin.clone())
    }

    fn allow_origin_headers(&self, headers: &mut http::HeaderMap, origin: &HeaderValue) {
        let value = if self.any_origin {
            HeaderValue::from_static("*")
        } else {
            append_token(headers, header::VARY, "Origin");
            origin.clone()
        };
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        if self.config.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }

    fn preflight(&self, origin: &HeaderValue, req: &Request<ProxyBody>) -> Response<ProxyBody> {
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        self.allow_origin_headers(h, origin);
        if let Some(v) = &self.allow_methods {
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v.clone());
        }
        // Without a configured list, the headers the browser asks for are allowed (as Kong
        // does), so a JSON or `Authorization` request is not refused by default.
        let asked = || {
            req.headers()
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .cloned()
        };
        if let Some(v) = self.allow_headers.clone().or_else(asked) {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
            if self.allow_headers.is_none() {
                append_token(h, header::VARY, "Access-Control-Request-Headers");
            }
        }
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(self.config.max_age_secs),
        );
        resp
    }
}

impl Policy for CorsPolicy {
    fn name(&self) -> &'static str {
        "cors"
    }

    fn try_request(&self, req: &mut Request<ProxyBody>, ctx: &mut RequestCtx) -> Decided {
        let Some(origin) = self.allowed_origin(req) else {
            // No CORS headers; the response phase still adds `Vary: Origin`.
            return Decided::Continue;
        };
        let is_preflight = req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if is_preflight {
            return Decided::Respond(self.preflight(&origin, req));
        }
        // The allowed origin, for the response.
        ctx.set_state(PhaseState::Cors(origin));
        Decided::Continue
    }

    fn try_response(&self, resp: &mut Response<ProxyBody>, ctx: &mut RequestCtx) -> bool {
        self.respond(resp, ctx);
        true
    }
}

impl CorsPolicy {
    /// The response phase (it never waits).
    fn respond(&self, resp: &mut Response<ProxyBody>, ctx: &mut RequestCtx) {
        let PhaseState::Cors(origin) = ctx.take_state() else {
            if !self.any_origin {
                // The response depends on the request's Origin even when it was not allowed:
                // without `Vary: Origin` a cache would serve a response made for no origin (or
                // another) to an allowed one (the Fetch standard's "CORS protocol and HTTP
                // caches"). Allowed origins get it from `allow_origin_headers`.
                append_token(resp.headers_mut(), header::VARY, "Origin");
            }
            return;
        };
        self.allow_origin_headers(resp.headers_mut(), &origin);
        if let Some(v) = &self.expose_headers {
            resp.headers_mut()
                .insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(methods: &[&str], headers: &[&str], expose: &[&str]) -> Result<CorsPolicy, String> {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        CorsPolicy::build(CorsConfig {
            origins: vec!["https://app.example".into()],
            methods: list(methods),
            headers: list(headers),
            expose_headers: list(expose),
            credentials: false,
            max_age_secs: 60,
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn cors_header_lists_are_checked_and_built_once() {
        let p = cors(&["get", "PUT"], &["content-type"], &["x-total", "x-page"]).unwrap();
        assert_eq!(p.allow_methods.as_ref().unwrap(), "GET, PUT");
        assert_eq!(p.allow_headers.as_ref().unwrap(), "content-type");
        assert_eq!(p.expose_headers.as_ref().unwrap(), "x-total, x-page");
        let p = cors(&[], &[], &[]).unwrap();
        assert!(p.allow_methods.is_none() && p.allow_headers.is_none());
        assert!(p.expose_headers.is_none());

        let err = cors(&["GET", "BAD METHOD"], &[], &[]).err().unwrap();
        assert!(
            err.contains("cors") && err.contains("methods: \"BAD METHOD\" is not an HTTP method"),
            "{err}"
        );
        let err = cors(&["GET"], &["content type"], &[]).err().unwrap();
        assert!(
            err.contains("headers: \"content type\" is not a header name"),
            "{err}"
        );
        let err = cors(&["GET"], &[], &["x-ok", "x-bad\n"]).err().unwrap();
        assert!(
            err.contains("expose_headers: \"x-bad\\n\" is not a header name"),
            "{err}"
        );
        let err = MethodsPolicy::build(MethodsConfig {
            allow: vec!["G(T".into()],
        })
        .err()
        .unwrap();
        assert!(
            err.to_string()
                .contains("allow: \"G(T\" is not an HTTP method"),
            "{err}"
        );
    }

    #[test]
    fn mapped_networks_become_ipv4() {
        let canon = |s: &str| canonical_net(s.parse().unwrap()).to_string();
        assert_eq!(canon("::ffff:10.0.0.0/104"), "10.0.0.0/8");
        assert_eq!(canon("::ffff:0.0.0.0/96"), "0.0.0.0/0");
        assert_eq!(canon("::ffff:192.0.2.7/128"), "192.0.2.7/32");
        assert_eq!(canon("::1/128"), "::1/128");
        assert_eq!(canon("::/0"), "::/0");
        assert_eq!(canon("10.0.0.0/8"), "10.0.0.0/8");
    }

    #[test]
    fn ip_filter_deny_wins_and_maps_v4() {
        let p = IpFilterPolicy::build(IpFilterConfig {
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            deny: vec!["10.6.6.0/24".parse().unwrap()],
        })
        .unwrap();
        assert!(p.admits("10.1.2.3".parse().unwrap()));
        assert!(p.admits("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!p.admits("10.6.6.1".parse().unwrap()));
        assert!(!p.admits("192.168.1.1".parse().unwrap()));
    }
}
