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

/// `error` and its causes on one line, as `{:#}` writes them, but without a cause whose text
/// the line already holds (errors that quote their source in their own message).
pub fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod error_text_tests {
    #[test]
    fn causes_already_quoted_are_left_out() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(io).context("reading x.toml: No such file");
        assert_eq!(super::error_text(&e), "reading x.toml: No such file");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_text(&e), "outer: inner");
    }
}
