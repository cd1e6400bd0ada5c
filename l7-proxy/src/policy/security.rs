//! Security filters, each a separate policy: client IP allow/deny lists, a request body size
//! limit, an allowed-methods list and CORS.
//!
//! Data in: the client address from [`RequestCtx::client_addr`] (IPv4-mapped IPv6 addresses
//! are matched as IPv4), the request method, `Content-Length` and body, and `Origin` /
//! `Access-Control-Request-*` headers.
//!
//! Data out: a denied address answers 403, an oversized body 413 (from `Content-Length`, or,
//! for a body without one, after reading at most `max_bytes` of it: such bodies are buffered up
//! to the limit, never beyond), a method not listed 405 with `Allow`. CORS answers preflights itself with 204 and adds
//! `Access-Control-Allow-Origin` (and friends) to responses for allowed origins.

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use ipnet::IpNet;
use serde::Deserialize;

use super::respond::{
    append_token, content_length, empty, error_response, full, read_limited, ReadError,
};
use super::{PhaseState, Policy, PolicyBuildError, ProxyBody, RequestCtx, RequestOutcome};

fn build_err(policy: &str, message: String) -> PolicyBuildError {
    PolicyBuildError {
        policy: policy.into(),
        message,
    }
}

// ---- IP filter ----------------------------------------------------------------------------

/// `{ type = "ip_filter", allow = ["10.0.0.0/8"], deny = ["10.6.6.0/24"] }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpFilterConfig {
    /// When not empty, only these networks are admitted.
    #[serde(default)]
    pub allow: Vec<IpNet>,
    /// Always refused; checked first.
    #[serde(default)]
    pub deny: Vec<IpNet>,
}

pub struct IpFilterPolicy {
    config: IpFilterConfig,
}

impl IpFilterPolicy {
    pub fn build(config: IpFilterConfig) -> Result<Self, PolicyBuildError> {
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

    async fn on_request(&self, req: Request<ProxyBody>, ctx: &mut RequestCtx) -> RequestOutcome {
        if self.admits(ctx.client_addr.ip()) {
            RequestOutcome::Continue(req)
        } else {
            RequestOutcome::Respond(error_response(
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
        let allow = config
            .allow
            .iter()
            .map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| build_err("methods", format!("allow: {e}")))?;
        let joined = allow
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let allow_header =
            HeaderValue::try_from(joined).map_err(|e| build_err("methods", e.to_string()))?;
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

    async fn on_request(&self, req: Request<ProxyBody>, _ctx: &mut RequestCtx) -> RequestOutcome {
        if self.allow.contains(req.method()) {
            return RequestOutcome::Continue(req);
        }
        let mut resp = error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        resp.headers_mut()
            .insert(header::ALLOW, self.allow_header.clone());
        RequestOutcome::Respond(resp)
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
}

impl CorsPolicy {
    pub fn build(config: CorsConfig) -> Result<Self, PolicyBuildError> {
        let any_origin = config.origins.iter().any(|o| o == "*");
        if any_origin && config.credentials {
            return Err(build_err(
                "cors",
                "credentials = true cannot be combined with origins = [\"*\"]".into(),
            ));
        }
        Ok(Self { config, any_origin })
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

    fn preflight(&self, origin: &HeaderValue) -> Response<ProxyBody> {
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        self.allow_origin_headers(h, origin);
        let join = |v: &[String]| HeaderValue::try_from(v.join(", ")).ok();
        if let Some(m) = join(&self.config.methods) {
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, m);
        }
        if let Some(v) = join(&self.config.headers).filter(|v| !v.is_empty()) {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
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

    async fn on_request(&self, req: Request<ProxyBody>, ctx: &mut RequestCtx) -> RequestOutcome {
        let Some(origin) = self.allowed_origin(&req) else {
            return RequestOutcome::Continue(req);
        };
        let is_preflight = req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if is_preflight {
            return RequestOutcome::Respond(self.preflight(&origin));
        }
        // The allowed origin, for the response.
        ctx.set_state(PhaseState::Cors(origin));
        RequestOutcome::Continue(req)
    }

    async fn on_response(
        &self,
        mut resp: Response<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> Response<ProxyBody> {
        if let PhaseState::Cors(origin) = ctx.take_state() {
            self.allow_origin_headers(resp.headers_mut(), &origin);
            if let Ok(v) = HeaderValue::try_from(self.config.expose_headers.join(", ")) {
                if !v.is_empty() {
                    resp.headers_mut()
                        .insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
                }
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
