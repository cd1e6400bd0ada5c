//! Gateway policies: authentication, rate limiting, transformation, caching, compression,
//! aggregation, versioning and security filters.
//!
//! Each policy is one small unit implementing [`Policy`]. The proxy runs a route's policies in
//! configured order on the request ([`Policy::on_request`]); any of them may answer the request
//! itself (401, 429, a cache hit, an aggregated body) instead of letting it reach the upstream.
//! Responses then pass back through the same policies in reverse order
//! ([`Policy::on_response`]). What a policy needs between its two phases (a cache key, the
//! negotiated encoding) travels in its own [`PhaseState`] slot of the [`RequestCtx`]; who the
//! request is authenticated as, which later policies read (the rate limiter's key), travels in
//! [`RequestCtx::identity`].
//!
//! The built-in policies are dispatched statically ([`AnyPolicy`]): their phases are plain
//! `async fn`s whose futures live inside the request's own future, so running a chain
//! allocates nothing for the chain itself. Most requests need no waiting in most policies (a
//! token found among those verified before, a local rate limit, a negotiated encoding), and a
//! phase's future, however short its work, is built and moved as a whole (several hundred
//! bytes each: about 60 ns per policy and phase). So a policy may also decide synchronously
//! ([`Policy::try_request`], [`Policy::try_response`]), changing the request or response in
//! place; the chain asks that first and builds the future only for the requests it hands on.
//! Other policies plug in through [`DynPolicy`] at the cost of one boxed future per phase.
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
//! JWT subject or API key id found by an earlier policy). `compress` and `cache` work in either
//! order, with different costs:
//! - `compress` before `cache`: the cache keeps one uncompressed copy, and every hit is
//!   compressed again on its way out (about 7 µs of CPU for 1 KiB of JSON with gzip -1).
//! - `cache` before `compress`: the cache keeps the compressed bytes, one variant per
//!   `Accept-Encoding` value (compress adds `Vary: Accept-Encoding`), so a hit costs no
//!   compression, as with Varnish storing gzipped objects; it takes one upstream request and
//!   one stored copy per distinct `Accept-Encoding` a client sends.

pub mod aggregate;
pub mod api_key;
pub mod basic_auth;
pub mod cache;
pub mod compress;
pub mod fixed_deflate;
pub mod jwt;
pub mod rate_limit;
pub mod respond;
pub mod security;
pub mod small_gzip;
pub mod transform;
pub mod version;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::combinators::BoxBody;
use smallvec::SmallVec;

/// Error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type that flows through the proxy in both directions.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// What the proxy knows about a request besides the request itself.
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
    /// When the proxy received the request. Policies take it as the request's time (a rate
    /// limiter's clock, an expiry check) instead of each reading the clock.
    pub received: Instant,
    /// Who the request is authenticated as, set by the authentication policies.
    pub identity: Identity,
    /// One [`PhaseState`] per policy of the chain, indexed by position (inline for the usual
    /// short chains).
    states: SmallVec<[PhaseState; 4]>,
    /// Position in the chain of the policy now running.
    current: usize,
}

impl std::fmt::Debug for RequestCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCtx")
            .field("client_addr", &self.client_addr)
            .field("request_id", &self.request_id)
            .field("route_name", &self.route_name)
            .field("upstream_group", &self.upstream_group)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl RequestCtx {
    pub fn new(
        client_addr: SocketAddr,
        request_id: String,
        route_name: String,
        upstream_group: String,
        tls: bool,
        received: Instant,
    ) -> Self {
        Self {
            client_addr,
            request_id,
            route_name,
            upstream_group,
            tls,
            received,
            identity: Identity::default(),
            states: SmallVec::new(),
            current: 0,
        }
    }

    /// Keeps `state` for the running policy's response phase.
    pub fn set_state(&mut self, state: PhaseState) {
        if self.states.len() <= self.current {
            self.states
                .resize_with(self.current + 1, PhaseState::default);
        }
        self.states[self.current] = state;
    }

    /// What the running policy's request phase kept, left in place.
    pub fn state(&self) -> &PhaseState {
        static NONE: PhaseState = PhaseState::None;
        self.states.get(self.current).unwrap_or(&NONE)
    }

    /// Takes what the running policy's request phase kept ([`PhaseState::None`] if nothing).
    pub fn take_state(&mut self) -> PhaseState {
        self.states
            .get_mut(self.current)
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// Who a request is authenticated as: what the authentication policies found, for the
/// policies after them (the rate limiter keys on the JWT subject or the API key id).
#[derive(Debug, Default)]
pub struct Identity {
    /// Verified JWT claims ([`jwt`]).
    pub jwt: Option<jwt::JwtClaims>,
    /// The matched API key's id ([`api_key`]).
    pub api_key: Option<api_key::ApiKeyId>,
    /// The HTTP basic auth user ([`basic_auth`]).
    pub basic_user: Option<basic_auth::BasicUser>,
}

/// What a policy's request phase leaves for its response phase, in the policy's own slot of
/// the [`RequestCtx`] ([`RequestCtx::set_state`], [`RequestCtx::take_state`]). Each policy
/// that has such state owns one variant.
#[derive(Default)]
pub enum PhaseState {
    #[default]
    None,
    Compress(compress::Negotiated),
    Cors(HeaderValue),
    Version(version::SelectedVersion),
    RateLimit(rate_limit::Decision),
    Cache(cache::CacheState),
    /// State of a policy that is not built in ([`DynPolicy`]).
    Custom(Box<dyn std::any::Any + Send + Sync>),
}

/// The result of a request phase.
pub enum RequestOutcome {
    /// Continue down the chain (and eventually to the upstream) with this request.
    Continue(Request<ProxyBody>),
    /// Answer the client with this response; the upstream is not called. Response phases of the
    /// policies that already ran still apply to it.
    Respond(Response<ProxyBody>),
}

/// What a policy decided about a request without waiting ([`Policy::try_request`]). The
/// request stays with the chain and is changed in place: a request is a few hundred bytes,
/// and moving it into and out of each policy cost more than some policies' own work.
pub enum Decided {
    /// On down the chain, with the request as the policy left it.
    Continue,
    /// Answer with this response; the upstream is not called.
    Respond(Response<ProxyBody>),
    /// Not without waiting: [`Policy::on_request`] decides, given the request and the
    /// [`RequestCtx`] as they were.
    Wait,
}

impl Decided {
    /// The request phase's outcome for `req`, the request this decided about: a request that
    /// was not answered goes on.
    pub fn outcome(self, req: Request<ProxyBody>) -> RequestOutcome {
        match self {
            Decided::Respond(resp) => RequestOutcome::Respond(resp),
            Decided::Continue | Decided::Wait => RequestOutcome::Continue(req),
        }
    }
}

/// One gateway policy. Implementations write the phases as `async fn`s.
pub trait Policy: Send + Sync + 'static {
    /// Short name used in logs and metrics (`jwt`, `rate_limit`, ...).
    fn name(&self) -> &'static str;

    /// Request phase, for the requests it can decide without waiting, changing `req` in place;
    /// [`Decided::Wait`], with `req` untouched, to have [`Self::on_request`] decide (a policy
    /// may keep what it found in `ctx`'s state for its own `on_request`). The chain asks this
    /// first; the default hands every request on.
    fn try_request(&self, req: &mut Request<ProxyBody>, ctx: &mut RequestCtx) -> Decided {
        let _ = (req, ctx);
        Decided::Wait
    }

    /// Request phase, for the requests [`Self::try_request`] handed on. The default is for
    /// policies that never wait: it takes `try_request`'s answer, and lets a request handed on
    /// continue unchanged.
    fn on_request(
        &self,
        mut req: Request<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> impl Future<Output = RequestOutcome> + Send {
        std::future::ready(self.try_request(&mut req, ctx).outcome(req))
    }

    /// Whether the policy has a response phase. Policies that only act on requests say
    /// `false`, and the chain does not call their [`Self::on_response`].
    fn has_response_phase(&self) -> bool {
        true
    }

    /// Response phase without waiting, as [`Self::try_request`]: `true` when done with `resp`
    /// (changed in place), `false`, with `resp` and `ctx` untouched, for [`Self::on_response`].
    fn try_response(&self, resp: &mut Response<ProxyBody>, ctx: &mut RequestCtx) -> bool {
        let _ = (resp, ctx);
        false
    }

    /// Response phase, for the responses [`Self::try_response`] handed on. The default takes
    /// `try_response`'s answer, and passes a response handed on through unchanged.
    fn on_response(
        &self,
        mut resp: Response<ProxyBody>,
        ctx: &mut RequestCtx,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        self.try_response(&mut resp, ctx);
        std::future::ready(resp)
    }
}

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe form of [`Policy`], for policies that are not built in: every [`Policy`]
/// is one, with its phases' futures boxed.
pub trait DynPolicy: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn has_response_phase(&self) -> bool;
    fn on_request_boxed<'a>(
        &'a self,
        req: Request<ProxyBody>,
        ctx: &'a mut RequestCtx,
    ) -> BoxFuture<'a, RequestOutcome>;
    fn on_response_boxed<'a>(
        &'a self,
        resp: Response<ProxyBody>,
        ctx: &'a mut RequestCtx,
    ) -> BoxFuture<'a, Response<ProxyBody>>;
}

impl<P: Policy> DynPolicy for P {
    fn name(&self) -> &'static str {
        Policy::name(self)
    }
    fn has_response_phase(&self) -> bool {
        Policy::has_response_phase(self)
    }
    fn on_request_boxed<'a>(
        &'a self,
        req: Request<ProxyBody>,
        ctx: &'a mut RequestCtx,
    ) -> BoxFuture<'a, RequestOutcome> {
        Box::pin(self.on_request(req, ctx))
    }
    fn on_response_boxed<'a>(
        &'a self,
        resp: Response<ProxyBody>,
        ctx: &'a mut RequestCtx,
    ) -> BoxFuture<'a, Response<ProxyBody>> {
        Box::pin(self.on_response(resp, ctx))
    }
}

/// Generates [`AnyPolicy`] and its dispatch from the list of built-in policies.
macro_rules! any_policy {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        /// One policy of a chain: a built-in one, dispatched statically, or another one behind
        /// [`DynPolicy`].
        #[derive(Clone)]
        pub enum AnyPolicy {
            $($variant(Arc<$ty>),)*
            Dyn(Arc<dyn DynPolicy>),
        }

        impl AnyPolicy {
            pub fn name(&self) -> &'static str {
                match self {
                    $(Self::$variant(p) => Policy::name(&**p),)*
                    Self::Dyn(p) => p.name(),
                }
            }

            fn has_response_phase(&self) -> bool {
                match self {
                    $(Self::$variant(p) => Policy::has_response_phase(&**p),)*
                    Self::Dyn(p) => p.has_response_phase(),
                }
            }

            fn try_request(&self, req: &mut Request<ProxyBody>, ctx: &mut RequestCtx) -> Decided {
                match self {
                    $(Self::$variant(p) => p.try_request(req, ctx),)*
                    Self::Dyn(_) => Decided::Wait,
                }
            }

            async fn on_request(
                &self,
                req: Request<ProxyBody>,
                ctx: &mut RequestCtx,
            ) -> RequestOutcome {
                match self {
                    $(Self::$variant(p) => p.on_request(req, ctx).await,)*
                    Self::Dyn(p) => p.on_request_boxed(req, ctx).await,
                }
            }

            fn try_response(&self, resp: &mut Response<ProxyBody>, ctx: &mut RequestCtx) -> bool {
                match self {
                    $(Self::$variant(p) => p.try_response(resp, ctx),)*
                    Self::Dyn(_) => false,
                }
            }

            async fn on_response(
                &self,
                resp: Response<ProxyBody>,
                ctx: &mut RequestCtx,
            ) -> Response<ProxyBody> {
                match self {
                    $(Self::$variant(p) => p.on_response(resp, ctx).await,)*
                    Self::Dyn(p) => p.on_response_boxed(resp, ctx).await,
                }
            }
        }
    };
}

any_policy! {
    Jwt(jwt::JwtPolicy),
    ApiKey(api_key::ApiKeyPolicy),
    BasicAuth(basic_auth::BasicAuthPolicy),
    RateLimit(rate_limit::RateLimitPolicy),
    Compress(compress::CompressPolicy),
    Cache(cache::CachePolicy),
    Transform(transform::TransformPolicy),
    Aggregate(aggregate::AggregatePolicy),
    Version(version::VersionPolicy),
    IpFilter(security::IpFilterPolicy),
    BodyLimit(security::BodyLimitPolicy),
    Methods(security::MethodsPolicy),
    Cors(security::CorsPolicy),
}

/// A route's policies in order.
#[derive(Clone, Default)]
pub struct PolicyChain {
    policies: Vec<AnyPolicy>,
    /// Whether any of them has a response phase.
    response_phases: bool,
}

impl PolicyChain {
    pub fn new(policies: Vec<AnyPolicy>) -> Self {
        let response_phases = policies.iter().any(AnyPolicy::has_response_phase);
        Self {
            policies,
            response_phases,
        }
    }

    /// Whether a response passes through any policy of the chain.
    pub fn has_response_phase(&self) -> bool {
        self.response_phases
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
        // A slot per policy at once (inline for up to four), not one resize per `set_state`.
        if ctx.states.len() < self.policies.len() {
            ctx.states
                .resize_with(self.policies.len(), PhaseState::default);
        }
        for (i, p) in self.policies.iter().enumerate() {
            ctx.current = i;
            match p.try_request(&mut req, ctx) {
                Decided::Continue => {}
                Decided::Respond(resp) => return Err((resp, i)),
                Decided::Wait => match p.on_request(req, ctx).await {
                    RequestOutcome::Continue(r) => req = r,
                    RequestOutcome::Respond(resp) => return Err((resp, i)),
                },
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
        let ran = ran.min(self.policies.len());
        for (i, p) in self.policies[..ran].iter().enumerate().rev() {
            if p.has_response_phase() {
                ctx.current = i;
                if !p.try_response(&mut resp, ctx) {
                    resp = p.on_response(resp, ctx).await;
                }
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

/// Whether the policies' HTTP client can fetch `uri` (a JWKS, an aggregated call): an
/// `https://` or `http://` URL with a host.
pub(crate) fn fetchable(uri: &http::Uri) -> bool {
    matches!(uri.scheme_str(), Some("https" | "http")) && uri.host().is_some()
}

/// `error` and its sources, as one line: an HTTP client's error is a summary ("client error
/// (Connect)"), and the cause (a refused connection, a certificate the CAs do not vouch for)
/// is in its sources.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// The longest duration, in seconds, a policy setting may name: ten years. Longer ones are
/// surely typos, and an instant that far ahead may not be representable.
pub const MAX_SECS: u64 = 10 * 365 * 86_400;

/// Refuses a `field` of `secs` seconds over [`MAX_SECS`].
pub(crate) fn check_secs(field: &str, secs: u64) -> Result<(), String> {
    if secs > MAX_SECS {
        return Err(format!(
            "{field} = {secs} is over {MAX_SECS} seconds (ten years)"
        ));
    }
    Ok(())
}

/// Builds a route's chain from its config, in order. Called at config load and on reload, so
/// errors surface before the config goes live.
pub fn build_chain(configs: &[PolicyConfig]) -> Result<PolicyChain, PolicyBuildError> {
    build_chain_at(configs).map_err(|(_, e)| e)
}

/// [`build_chain`], whose error also says which policy (its index in `configs`) could not be
/// built; none when the chain's order is refused.
pub fn build_chain_at(
    configs: &[PolicyConfig],
) -> Result<PolicyChain, (Option<usize>, PolicyBuildError)> {
    check_order(configs).map_err(|e| (None, e))?;
    let policies = configs
        .iter()
        .enumerate()
        .map(|(i, c)| build_policy(c).map_err(|e| (Some(i), e)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PolicyChain::new(policies))
}

/// Refuses a chain where `cache` comes before a policy that decides who may see a response:
/// a cache hit is answered at the cache, so an authentication policy or address filter listed
/// after it would never see those requests.
///
/// Also refuses an `aggregate` that forwards `Authorization` after a `jwt` that removes it
/// (`forward_token = false`, the default): its calls would go without the credential.
fn check_order(configs: &[PolicyConfig]) -> Result<(), PolicyBuildError> {
    let strips_token = configs
        .iter()
        .position(|c| matches!(c, PolicyConfig::Jwt(j) if !j.forward_token));
    if let Some(jwt_at) = strips_token {
        let forwarding = configs.iter().enumerate().skip(jwt_at + 1).find(|(_, c)| {
            matches!(c, PolicyConfig::Aggregate(a)
                if a.forward_headers.iter().any(|h| h.eq_ignore_ascii_case("authorization")))
        });
        if let Some((i, _)) = forwarding {
            return Err(PolicyBuildError {
                policy: "aggregate".into(),
                message: format!(
                    "it is policy #{} and forwards authorization, but jwt (#{}) removes that \
                     header once it has verified the token; set forward_token = true on jwt",
                    i + 1,
                    jwt_at + 1
                ),
            });
        }
    }
    let Some(cache_at) = configs
        .iter()
        .position(|c| matches!(c, PolicyConfig::Cache(_)))
    else {
        return Ok(());
    };
    for (i, config) in configs.iter().enumerate().skip(cache_at + 1) {
        let guard = match config {
            PolicyConfig::Jwt(_) => "jwt",
            PolicyConfig::ApiKey(_) => "api_key",
            PolicyConfig::BasicAuth(_) => "basic_auth",
            PolicyConfig::IpFilter(_) => "ip_filter",
            _ => continue,
        };
        return Err(PolicyBuildError {
            policy: guard.into(),
            message: format!(
                "it is policy #{} but cache is #{}: cache hits are answered before {guard} \
                 would run, so cached responses would reach requests it refuses; list \
                 {guard} before cache",
                i + 1,
                cache_at + 1
            ),
        });
    }
    Ok(())
}

fn build_policy(config: &PolicyConfig) -> Result<AnyPolicy, PolicyBuildError> {
    use AnyPolicy as P;
    Ok(match config.clone() {
        PolicyConfig::Jwt(c) => P::Jwt(Arc::new(jwt::JwtPolicy::build(c)?)),
        PolicyConfig::ApiKey(c) => P::ApiKey(Arc::new(api_key::ApiKeyPolicy::build(c)?)),
        PolicyConfig::BasicAuth(c) => {
            P::BasicAuth(Arc::new(basic_auth::BasicAuthPolicy::build(c)?))
        }
        PolicyConfig::RateLimit(c) => {
            P::RateLimit(Arc::new(rate_limit::RateLimitPolicy::build(c)?))
        }
        PolicyConfig::Compress(c) => P::Compress(Arc::new(compress::CompressPolicy::build(c)?)),
        PolicyConfig::Cache(c) => P::Cache(Arc::new(cache::CachePolicy::build(c)?)),
        PolicyConfig::Transform(c) => P::Transform(Arc::new(transform::TransformPolicy::build(c)?)),
        PolicyConfig::Aggregate(c) => P::Aggregate(Arc::new(aggregate::AggregatePolicy::build(c)?)),
        PolicyConfig::Version(c) => P::Version(Arc::new(version::VersionPolicy::build(c)?)),
        PolicyConfig::IpFilter(c) => P::IpFilter(Arc::new(security::IpFilterPolicy::build(c)?)),
        PolicyConfig::BodyLimit(c) => P::BodyLimit(Arc::new(security::BodyLimitPolicy::build(c)?)),
        PolicyConfig::Methods(c) => P::Methods(Arc::new(security::MethodsPolicy::build(c)?)),
        PolicyConfig::Cors(c) => P::Cors(Arc::new(security::CorsPolicy::build(c)?)),
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Builds the chain of a route's `policies = [...]` list, given as the list's items.
    fn try_chain(list: &str) -> Result<PolicyChain, PolicyBuildError> {
        let table: toml::Table = toml::from_str(&format!("p = [{list}]")).unwrap();
        let configs: Vec<PolicyConfig> = table["p"].clone().try_into().unwrap();
        build_chain(&configs)
    }

    fn chain(list: &str) -> PolicyChain {
        try_chain(list).unwrap()
    }

    #[test]
    fn guards_after_cache_are_refused() {
        let build = |list: &str| try_chain(list).map(|_| ()).map_err(|e| e.to_string());
        let cache = r#"{ type = "cache" }"#;
        let filter = r#"{ type = "ip_filter", allow = ["10.0.0.0/8"] }"#;
        let keys = r#"{ type = "api_key", keys = [{ id = "ci", sha256 = "0000000000000000000000000000000000000000000000000000000000000000" }] }"#;
        assert_eq!(build(&format!("{filter}, {cache}")), Ok(()));
        let err = build(&format!(r#"{{ type = "compress" }}, {cache}, {filter}"#)).unwrap_err();
        assert_eq!(
            err,
            "policy ip_filter: it is policy #3 but cache is #2: cache hits are answered before \
             ip_filter would run, so cached responses would reach requests it refuses; list \
             ip_filter before cache"
        );
        let err = build(&format!("{cache}, {keys}")).unwrap_err();
        assert!(
            err.starts_with("policy api_key: it is policy #2 but cache is #1"),
            "{err}"
        );

        // An aggregate forwarding the token a jwt before it removes.
        let jwt = |extra: &str| {
            format!(r#"{{ type = "jwt", jwks_url = "http://127.0.0.1:9/jwks"{extra} }}"#)
        };
        let aggregate = r#"{ type = "aggregate", forward_headers = ["Authorization"], calls = [{ key = "a", url = "http://127.0.0.1:9/a" }] }"#;
        let err = build(&format!("{}, {aggregate}", jwt(""))).unwrap_err();
        assert_eq!(
            err,
            "policy aggregate: it is policy #2 and forwards authorization, but jwt (#1) removes \
             that header once it has verified the token; set forward_token = true on jwt"
        );
        assert_eq!(
            build(&format!("{}, {aggregate}", jwt(", forward_token = true"))),
            Ok(())
        );
    }

    #[test]
    fn a_chain_knows_whether_responses_pass_through_it() {
        let filters = r#"{ type = "ip_filter", allow = ["0.0.0.0/0"] },
            { type = "methods", allow = ["GET"] }, { type = "body_limit", max_bytes = 10 }"#;
        assert!(!PolicyChain::default().has_response_phase());
        assert!(!chain(filters).has_response_phase());
        assert!(chain(&format!(r#"{filters}, {{ type = "compress" }}"#)).has_response_phase());
    }

    /// Each phase's future lives inside the request's future and is moved on every call, so
    /// rare, large work (a JWKS fetch, Redis, full JWT verification, waiting for a coalesced
    /// response) is boxed by the policies. This keeps it that way.
    #[test]
    fn phase_futures_stay_small() {
        let mut jwks = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut jwks,
            br#"{"keys":[{"kty":"oct","alg":"HS256","k":"c2VjcmV0"}]}"#,
        )
        .unwrap();
        let chain = chain(&format!(
            r#"
                {{ type = "jwt", jwks_file = "{}", algorithms = ["HS256"] }},
                {{ type = "jwt", jwks_url = "http://127.0.0.1:9/jwks", algorithms = ["HS256"] }},
                {{ type = "rate_limit", requests = 10 }},
                {{ type = "rate_limit", requests = 10, redis_url = "redis://127.0.0.1:9" }},
                {{ type = "ip_filter", allow = ["0.0.0.0/0"] }},
                {{ type = "compress" }},
                {{ type = "cache" }},
                {{ type = "transform" }},
                {{ type = "version", default = "v1", versions = {{ v1 = {{ upstream = "a" }} }} }},
                {{ type = "body_limit", max_bytes = 10 }},
                {{ type = "methods", allow = ["GET"] }},
                {{ type = "cors", origins = ["*"] }},
            "#,
            jwks.path().display()
        ));
        let mut ctx = RequestCtx::new(
            "192.0.2.1:1".parse().unwrap(),
            String::new(),
            String::new(),
            String::new(),
            false,
            Instant::now(),
        );
        for p in &chain.policies {
            let req =
                std::mem::size_of_val(&p.on_request(Request::new(respond::empty()), &mut ctx));
            let resp =
                std::mem::size_of_val(&p.on_response(Response::new(respond::empty()), &mut ctx));
            assert!(
                req <= 1024,
                "{}: request phase future of {req} bytes",
                p.name()
            );
            assert!(
                resp <= 1024,
                "{}: response phase future of {resp} bytes",
                p.name()
            );
        }
    }

    /// Settings that would make a policy do nothing, refuse everything or fail later are
    /// refused when the chain is built, with the setting named.
    #[test]
    fn settings_that_cannot_work_are_refused_by_name() {
        let mut jwks = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut jwks,
            br#"{"keys":[{"kty":"oct","alg":"HS256","k":"c2VjcmV0"}]}"#,
        )
        .unwrap();
        let file = jwks.path().display().to_string();
        let refused = |list: &str, want: &[&str]| {
            let Err(e) = try_chain(list) else {
                panic!("{list} was accepted");
            };
            let e = e.to_string();
            for w in want {
                assert!(e.contains(w), "{list}: {e:?} lacks {w:?}");
            }
        };
        let sha = "0".repeat(64);
        for (list, want) in [
            (
                format!(r#"{{ type = "jwt", jwks_file = "{file}", jwks_url = "http://127.0.0.1:9/" }}"#),
                &["jwks_file or jwks_url, not both"][..],
            ),
            (
                r#"{ type = "jwt", jwks_url = "ftp://idp.example/jwks" }"#.into(),
                &["jwks_url \"ftp://idp.example/jwks\" is not an https:// or http:// URL"][..],
            ),
            (
                format!(r#"{{ type = "jwt", jwks_file = "{file}", jwks_ca_file = "{file}" }}"#),
                &["jwks_ca_file needs an https:// jwks_url"][..],
            ),
            (
                format!(r#"{{ type = "jwt", jwks_url = "http://127.0.0.1:9/", jwks_ca_file = "{file}" }}"#),
                &["jwks_ca_file verifies an https:// jwks_url"][..],
            ),
            (
                format!(r#"{{ type = "jwt", jwks_url = "https://127.0.0.1:9/", jwks_ca_file = "{file}" }}"#),
                &["jwks_ca_file: no usable CA certificate in"][..],
            ),
            (
                r#"{ type = "jwt", jwks_url = "http://127.0.0.1:9/", jwks_refresh_secs = 0 }"#.into(),
                &["jwks_refresh_secs must be at least 1"][..],
            ),
            (
                r#"{ type = "jwt", jwks_url = "http://127.0.0.1:9/", jwks_refresh_secs = 9223372036854775807 }"#.into(),
                &["jwks_refresh_secs = 9223372036854775807 is over"][..],
            ),
            (
                format!(r#"{{ type = "jwt", jwks_file = "{file}", algorithms = ["RS256", "ES256"] }}"#),
                &["no key verifies any of algorithms [RS256, ES256]", "HS256"][..],
            ),
            (r#"{ type = "api_key", keys = [] }"#.into(), &["keys must not be empty"][..]),
            (
                format!(r#"{{ type = "api_key", keys = [{{ id = "a", sha256 = "{sha}" }}, {{ id = "b", sha256 = "{sha}" }}] }}"#),
                &["keys[1].sha256", "the same key as id \"a\""][..],
            ),
            (r#"{ type = "basic_auth", users = {} }"#.into(), &["users must not be empty"][..]),
            (r#"{ type = "ip_filter" }"#.into(), &["allow, deny or both"][..]),
            (r#"{ type = "methods", allow = [] }"#.into(), &["allow must not be empty"][..]),
            (r#"{ type = "cors", origins = [] }"#.into(), &["origins must not be empty"][..]),
            (
                r#"{ type = "cors", origins = ["https://*.example.com"] }"#.into(),
                &["\"https://*.example.com\"", "wildcards"][..],
            ),
            (
                r#"{ type = "cors", origins = ["https://app.example.com/x"] }"#.into(),
                &["is not an origin"][..],
            ),
            (r#"{ type = "cache", max_bytes = 0 }"#.into(), &["max_bytes must be at least 1"][..]),
            (r#"{ type = "cache", max_ttl_secs = 0 }"#.into(), &["max_ttl_secs must be at least 1"][..]),
            (
                r#"{ type = "cache", uncacheable_secs = 9223372036854775807 }"#.into(),
                &["uncacheable_secs = 9223372036854775807 is over"][..],
            ),
            (
                r#"{ type = "aggregate", calls = [{ key = "a", url = "http://127.0.0.1:9/1" }, { key = "a", url = "http://127.0.0.1:9/2" }] }"#.into(),
                &["calls[1].key", "\"a\" is used by an earlier call"][..],
            ),
            (
                r#"{ type = "aggregate", calls = [{ key = "a", url = "http://127.0.0.1:9/1", timeout_ms = 0 }] }"#.into(),
                &["calls[0].timeout_ms must be at least 1"][..],
            ),
            (
                format!(r#"{{ type = "aggregate", ca_file = "{file}", calls = [{{ key = "a", url = "http://127.0.0.1:9/1" }}] }}"#),
                &["ca_file verifies https:// calls"][..],
            ),
            (
                r#"{ type = "aggregate", calls = [{ key = "a", url = "ftp://127.0.0.1:9/1" }] }"#.into(),
                &["calls[0].url: \"ftp://127.0.0.1:9/1\" is not an https:// or http:// URL"][..],
            ),
            (
                r#"{ type = "rate_limit", requests = 1, redis_prefix = "x" }"#.into(),
                &["redis_prefix needs redis_url"][..],
            ),
            (
                r#"{ type = "rate_limit", requests = 1, redis_url = "redis://127.0.0.1:9", redis_timeout_ms = 0 }"#.into(),
                &["redis_timeout_ms must be at least 1"][..],
            ),
            (
                r#"{ type = "basic_auth", users = { a = "x" }, cache_secs = 9223372036854775807 }"#.into(),
                &["cache_secs = 9223372036854775807 is over"][..],
            ),
        ] {
            refused(&list, want);
        }
        // What these checks must still let through.
        chain(&format!(
            r#"{{ type = "jwt", jwks_file = "{file}", algorithms = ["HS256", "RS256"] }},
               {{ type = "ip_filter", deny = ["10.0.0.1", "2001:db8::/32"] }},
               {{ type = "cors", origins = ["https://app.example.com", "http://127.0.0.1:8080", "null"] }}"#
        ));
    }

    #[test]
    fn an_address_that_is_no_network_is_named() {
        let table: toml::Table =
            toml::from_str(r#"p = [{ type = "ip_filter", allow = ["10.0.0.0/33"] }]"#).unwrap();
        let e = table["p"]
            .clone()
            .try_into::<Vec<PolicyConfig>>()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`10.0.0.0/33` is not an address or a network"),
            "{e}"
        );
    }
}
