//! End-to-end tests: the proxy runs in-process on 127.0.0.1 with random ports, in front of
//! real upstream servers, and is driven by real clients (hyper, rustls) and raw sockets.

mod balancing;
mod config;
mod expect;
mod h2c_upstream;
mod reload;
mod routing;
mod security;
mod support;
mod tls;
mod upstream_pool;
mod upstream_pool_bodies;
mod upstream_tls;
mod via;
