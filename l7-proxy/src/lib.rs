//! The L7 tier: an HTTP/1.1 and HTTP/2 reverse proxy with TLS termination and API gateway
//! policies, built on tokio, hyper and rustls.
//!
//! A request passes through named phases: accept (listener, TLS, PROXY protocol) → route
//! match → request policies → upstream pick → forward → response policies → access log.
//! Gateway policies plug into that chain through the [`policy::Policy`] trait.

pub mod config;
pub mod policy;
