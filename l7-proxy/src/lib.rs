//! The L7 tier: an HTTP/1.1 and HTTP/2 reverse proxy with TLS termination and API gateway
//! policies, built on tokio, hyper and rustls.
//!
//! A request passes through named phases: accept (listener, TLS, PROXY protocol) → route
//! match → request policies → upstream pick → forward → response policies → access log.
//! Gateway policies plug into that chain through the [`policy::Policy`] trait.

pub mod config;
// `PolicyChain::run_request` returns a response in its `Err`; boxing it would only add an
// allocation on the short-circuit path. The policy module is owned by the policy work.
pub mod metrics;
#[allow(clippy::result_large_err)]
pub mod policy;
pub mod routing;
pub mod upstream;
