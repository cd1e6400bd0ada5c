//! Sockets: client listeners (accept, PROXY protocol, TLS, HTTP serving, idle timeout) and the
//! admin listener.

pub mod admin;
pub mod framing_guard;
pub mod idle;
pub mod listener;
pub mod proxy_protocol;
