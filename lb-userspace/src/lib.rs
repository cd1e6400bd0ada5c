//! The userspace half of the L4 load balancer: loads the XDP program, fills its maps from the
//! configuration and the admin API, checks backends' health, and exposes what it counts.
//!
//! Data enters as the TOML file ([`config`]) and admin requests ([`admin`], [`api`]), becomes
//! the model in [`services`], and leaves as map writes through [`datapath`]. [`agent::run`]
//! wires it together; `lb-agent` and `lbctl` are thin binaries over it.

/// The compiled XDP object (`xdp-ebpf`), embedded at build time so the agent is self-contained.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-ebpf.o"));

pub mod admin;
pub mod agent;
pub mod api;
pub mod attach;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod health;
pub mod metrics;
pub mod neigh;
pub mod services;
pub mod testrun;
