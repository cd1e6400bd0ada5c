//! Gateway policies: authentication, rate limiting, transformation, caching, compression,
//! aggregation, versioning and security filters.
//!
//! Each policy is one small unit implementing [`Policy`]. The proxy runs a route's policies in
//! configured order on the request ([`Policy::on_request`]); any of them may answer the request
//! itself (401, 429, a cache hit, an aggregated body) instead of letting it reach the upstream.
//! Responses then pass back through the same policies in reverse order
//! ([`Policy::on_response`]). State a policy needs between the two phases (a cache key, the
//! negotiated encoding) travels in [`RequestCtx::extensions`].
//!
//! # Policy types
//!
//! A route's `policies = [...]` entries, by `type` (each module documents its fields):
//!
//! | `type`       | module          | answers itself with                       |
//! |--------------|-----------------|-------------------------------------------|
//! | `jwt`        | [`jwt`]         | 401 / 403 (`WWW-Authenticate: Bearer`)    |
//! | `api_key`    | [`api_key`]     | 401                                       |
//! | `basic_auth` | [`basic_auth`]  | 401 (`WWW-Authenticate: Basic`)           |
//! | `rate_limit` | [`rate_limit`]  | 429 (`Retry-After`), 503 if Redis is down and `fail_closed` |
//! | `ip_filter`, `body_limit`, `methods`, `cors` | [`security`] | 403, 413, 405, 204 preflight |
//! | `version`    | [`version`]     | 400 for an unknown requested version      |
//! | `transform`  | [`transform`]   | 413 when a JSON body to edit is too large |
//! | `cache`      | [`cache`]       | cached responses, 304                     |
//! | `compress`   | [`compress`]    | never                                     |
//! | `aggregate`  | [`aggregate`]   | always: the combined JSON                 |
//!
//! Order matters: put filters and authentication first, then rate limiting (it can key on the
//! JWT subject or API key id found by an earlier policy), then `compress` before `cache` so
//! cache hits are compressed on their way out too.

pub mod aggregate;
pub mod api_key;
pub mod basic_auth;
pub mod cache;
pub mod compress;
pub mod jwt;
pub mod rate_limit;
pub mod respond;
pub mod security;
pub mod small_gzip;
pub mod transform;
pub mod version;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;

/// Error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type that flows through the proxy in both directions.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// What the proxy knows about a request besides the request itself.
#[derive(Debug)]
pub struct RequestCtx {
    /// The client's address (from the socket, or from the PROXY protocol header).
    pub client_addr: SocketAddr,
    /// `X-Request-Id` of this request (taken from the client or generated).
    pub request_id: String,
    /// Name of the matched route.
    pub route_name: String,
    /// Upstream group the request will be forwarded to. A policy may change it (versioning).
    pub upstream_group: String,
    /// True when the client connection is TLS.
    pub tls: bool,
    /// Per-request state shared between a policy's request and response phases.
    pub extensions: http::Extensions,
}

/// The result of a request phase.
pub enum RequestOutcome {
    /// Continue down the chain (and eventually to the upstream) with this request.
    Continue(Request<ProxyBody>),
    /// Answer the client with this response; the upstream is not called. Response phases of the
    /// policies that already ran still apply to it.
    Respond(Response<ProxyBody>),
}

/// One gateway policy.
#[async_trait::async_trait]
pub trait Policy: Send + Sync + 'static {
    /// Short name used in logs and metrics (`jwt`, `rate_limit`, ...).
    fn name(&self) -> &'static str;

    /// Request phase.
    async fn on_request(&self, req: Request<ProxyBody>, ctx: &mut RequestCtx) -> RequestOutcome;

    /// Whether the policy has a response phase. Policies that only act on requests say
    /// `false`, and the chain does not call (or allocate for) their [`Self::on_response`].
    fn has_response_phase(&self) -> bool {
        true
    }

    /// Response phase; the default passes the response through.
    async fn on_response(
        &self,
        resp: Response<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> Response<ProxyBody> {
        let _ = ctx;
        resp
    }
}

/// A route's policies in order.
#[derive(Clone, Default)]
pub struct PolicyChain {
    policies: Vec<Arc<dyn Policy>>,
}

impl PolicyChain {
    pub fn new(policies: Vec<Arc<dyn Policy>>) -> Self {
        Self { policies }
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Runs request phases in order. On `Respond`, returns the response together with how many
    /// policies ran (their response phases must still run on it).
    #[allow(clippy::result_large_err)]
    pub async fn run_request(
        &self,
        mut req: Request<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> Result<Request<ProxyBody>, (Response<ProxyBody>, usize)> {
        for (i, p) in self.policies.iter().enumerate() {
            match p.on_request(req, ctx).await {
                RequestOutcome::Continue(r) => req = r,
                RequestOutcome::Respond(resp) => return Err((resp, i)),
            }
        }
        Ok(req)
    }

    /// Runs response phases in reverse order over the first `ran` policies.
    pub async fn run_response(
        &self,
        mut resp: Response<ProxyBody>,
        ctx: &mut RequestCtx,
        ran: usize,
    ) -> Response<ProxyBody> {
        for p in self.policies[..ran.min(self.policies.len())].iter().rev() {
            if p.has_response_phase() {
                resp = p.on_response(resp, ctx).await;
            }
        }
        resp
    }

    /// Runs the whole chain around `forward`: request phases, then `forward` (the upstream call,
    /// given the final request and `ctx.upstream_group`, which a policy may have changed) unless
    /// a policy answered, then the response phases of the policies that ran.
    pub async fn handle<F, Fut>(
        &self,
        req: Request<ProxyBody>,
        ctx: &mut RequestCtx,
        forward: F,
    ) -> Response<ProxyBody>
    where
        F: FnOnce(Request<ProxyBody>, String) -> Fut,
        Fut: std::future::Future<Output = Response<ProxyBody>>,
    {
        match self.run_request(req, ctx).await {
            Ok(req) => {
                let resp = forward(req, ctx.upstream_group.clone()).await;
                self.run_response(resp, ctx, self.len()).await
            }
            Err((resp, ran)) => self.run_response(resp, ctx, ran).await,
        }
    }

    /// Number of policies (pass to [`Self::run_response`] after a forwarded request).
    pub fn len(&self) -> usize {
        self.policies.len()
    }
}

/// One entry of a route's `policies = [...]` list in the proxy's TOML config, tagged by
/// `type` (for example `{ type = "jwt", ... }`). Each variant's fields are that policy's schema.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PolicyConfig {
    Jwt(jwt::JwtConfig),
    ApiKey(api_key::ApiKeyConfig),
    BasicAuth(basic_auth::BasicAuthConfig),
    RateLimit(rate_limit::RateLimitConfig),
    Compress(compress::CompressConfig),
    Cache(cache::CacheConfig),
    Transform(transform::TransformConfig),
    Aggregate(aggregate::AggregateConfig),
    Version(version::VersionConfig),
    IpFilter(security::IpFilterConfig),
    BodyLimit(security::BodyLimitConfig),
    Methods(security::MethodsConfig),
    Cors(security::CorsConfig),
}

/// A policy config that cannot be turned into a policy (bad key file, invalid regex, ...).
#[derive(Debug, thiserror::Error)]
#[error("policy {policy}: {message}")]
pub struct PolicyBuildError {
    pub policy: String,
    pub message: String,
}

/// Builds a route's chain from its config, in order. Called at config load and on reload, so
/// errors surface before the config goes live.
pub fn build_chain(configs: &[PolicyConfig]) -> Result<PolicyChain, PolicyBuildError> {
    let policies = configs
        .iter()
        .map(build_policy)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PolicyChain::new(policies))
}

fn build_policy(config: &PolicyConfig) -> Result<Arc<dyn Policy>, PolicyBuildError> {
    Ok(match config.clone() {
        PolicyConfig::Jwt(c) => Arc::new(jwt::JwtPolicy::build(c)?),
        PolicyConfig::ApiKey(c) => Arc::new(api_key::ApiKeyPolicy::build(c)?),
        PolicyConfig::BasicAuth(c) => Arc::new(basic_auth::BasicAuthPolicy::build(c)?),
        PolicyConfig::RateLimit(c) => Arc::new(rate_limit::RateLimitPolicy::build(c)?),
        PolicyConfig::Compress(c) => Arc::new(compress::CompressPolicy::build(c)?),
        PolicyConfig::Cache(c) => Arc::new(cache::CachePolicy::build(c)?),
        PolicyConfig::Transform(c) => Arc::new(transform::TransformPolicy::build(c)?),
        PolicyConfig::Aggregate(c) => Arc::new(aggregate::AggregatePolicy::build(c)?),
        PolicyConfig::Version(c) => Arc::new(version::VersionPolicy::build(c)?),
        PolicyConfig::IpFilter(c) => Arc::new(security::IpFilterPolicy::build(c)?),
        PolicyConfig::BodyLimit(c) => Arc::new(security::BodyLimitPolicy::build(c)?),
        PolicyConfig::Methods(c) => Arc::new(security::MethodsPolicy::build(c)?),
        PolicyConfig::Cors(c) => Arc::new(security::CorsPolicy::build(c)?),
    })
}
