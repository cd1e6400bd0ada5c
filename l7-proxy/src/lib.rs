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
//! # Modules
//!
//! - [`config`]: the TOML schema and its validation;
//! - [`routing`]: route matching and its precedence rules;
//! - [`pipeline`]: the request phases, header hygiene, forwarding and retries;
//! - [`upstream`]: groups, balancing algorithms, health, the pooled upstream client;
//! - [`tls`]: certificates by SNI, mTLS, ALPN;
//! - [`server`]: listeners, PROXY protocol, idle timeouts, the admin API;
//! - [`proxy`]: start, reload, shutdown;
//! - [`metrics`]: Prometheus metrics.

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
pub mod tls;
pub mod upstream;

pub use config::{Config, ConfigError};
pub use proxy::{Proxy, ProxyError, ProxyHandle};
