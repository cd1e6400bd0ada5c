//! The L7 tier: an HTTP/1.1 and HTTP/2 reverse proxy with TLS termination and API gateway
//! policies, built on tokio, hyper and rustls.
//!
//! A request passes through named phases: accept (listener, TLS, PROXY protocol) → route
//! match → request policies → upstream pick → forward → response policies → access log.
//! Gateway policies plug into that chain through the [`policy::Policy`] trait.
//!
//! # Running it
//!
//! The binary is `l7-proxy --config proxy.toml` (see `examples/proxy.toml` for every field).
//! `SIGHUP` or `POST /-/reload` on the admin listener reloads the file; `SIGTERM`/`SIGINT`
//! stop accepting and drain. Tests and other code start it in-process:
//!
//! ```no_run
//! # async fn demo() -> Result<(), l7_proxy::ProxyError> {
//! let config = l7_proxy::Config::from_toml_str(r#"
//! [[listeners]]
//! name = "web"
//! address = "127.0.0.1:0"
//!
//! [[upstreams]]
//! name = "app"
//! members = [{ address = "127.0.0.1:9000" }]
//!
//! [[routes]]
//! name = "all"
//! action = { forward = { group = "app" } }
//! "#)?;
//! let proxy = l7_proxy::Proxy::start(config).await?;
//! let addr = proxy.listener_addr("web").unwrap();
//! # let _ = addr;
//! proxy.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Public API
//!
//! - [`Config`] (with [`config::ServerConfig`], [`config::AdminConfig`],
//!   [`config::ListenerConfig`], [`config::TlsConfig`], [`config::RouteConfig`],
//!   [`config::UpstreamGroupConfig`], ...): `Config::from_toml_str` / `Config::from_file`
//!   parse and validate; errors are [`ConfigError`] with field and line.
//! - [`Proxy::start`] (in-memory config) and [`Proxy::start_from_file`] (reloadable from the
//!   file) return a [`ProxyHandle`]: `listener_addr(name)`, `listener_addrs()`,
//!   `admin_addr()`, `reload(config)`, `reload_from_file()`, `generation()`,
//!   `metrics_text()`, `shutdown()`. Errors are [`ProxyError`].
//!
//! # Behaviour in brief
//!
//! - Routing precedence is documented in [`routing`]: exact host > wildcard host > any, then
//!   exact path > longest prefix > regex > any, ties by config order. No match is a `404`.
//! - Forwarded requests get `X-Forwarded-For` (appended), `X-Forwarded-Proto`, `Forwarded`
//!   (RFC 7239) and `X-Request-Id` (kept or generated, echoed on the response); hop-by-hop
//!   headers are removed both ways; dot segments are normalised before routing.
//! - A group with no available member answers `503`; an unreachable member `502` (after
//!   retries for idempotent requests without a body, within the retry budget); a member too
//!   slow to answer `504`.
//! - Request smuggling: ambiguous framing (`Content-Length` with `Transfer-Encoding`,
//!   repeated lengths, any encoding but a single `chunked`), invalid header bytes and
//!   repeated `Host` get `400` and are never forwarded. Slow clients are cut off by the
//!   header read timeout and the idle timeout.
//! - Reload builds the whole new generation first; an invalid config changes nothing.
//!   Requests in flight finish on the generation they started with.
//!
//! # Modules
//!
//! - [`config`]: the TOML schema and its validation;
//! - [`routing`]: route matching and its precedence rules;
//! - [`pipeline`]: the request phases, header hygiene, forwarding and retries;
//! - [`upstream`]: groups, balancing algorithms, health, the pooled upstream client;
//! - [`tls`]: certificates by SNI, mTLS, ALPN;
//! - [`server`]: listeners, PROXY protocol, idle timeouts, the admin API;
//! - [`proxy`]: start, reload, shutdown;
//! - [`metrics`]: Prometheus metrics;
//! - [`template`]: `${name}` templates (transform values, redirect locations).

pub mod config;
pub mod metrics;
pub mod pipeline;
// `PolicyChain::run_request` returns a response in its `Err`; boxing it would only add an
// allocation on the short-circuit path. The policy module is owned by the policy work.
#[allow(clippy::result_large_err)]
pub mod policy;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod state;
pub mod template;
pub mod tls;
pub mod upstream;

pub use config::{Config, ConfigError};
pub use proxy::{Proxy, ProxyError, ProxyHandle};
