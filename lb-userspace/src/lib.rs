//! The userspace half of the L4 load balancer: loads the XDP program, fills its maps, and
//! exposes what it counts.

/// The compiled XDP object (`xdp-ebpf`), embedded at build time so the agent is self-contained.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-ebpf.o"));

pub mod datapath;
pub mod testrun;
