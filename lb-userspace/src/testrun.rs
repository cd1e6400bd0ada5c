//! Runs a loaded XDP program over a packet in the kernel (BPF_PROG_TEST_RUN), without any
//! interface: the packet fixtures and the program-cost benchmark use it.

use std::time::Duration;

use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp};

/// What one test run returned.
#[derive(Debug, Clone)]
pub struct XdpRun {
    /// The XDP action (`XDP_PASS` = 2, `XDP_TX` = 3, ...).
    pub action: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Mean time per run as measured by the kernel.
    pub duration: Duration,
}

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Runs `prog` over `packet` `repeat` times (at least once).
pub fn run_xdp(prog: &Xdp, packet: &[u8], repeat: u32) -> Result<XdpRun, ProgramError> {
    // Room for the largest header the program may prepend.
    let mut out = vec![0u8; packet.len() + 256];
    let res = prog.test_run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        repeat: repeat.max(1),
        ..Default::default()
    })?;
    out.truncate(res.data_size_out as usize);
    Ok(XdpRun {
        action: res.return_value,
        packet: out,
        duration: res.duration,
    })
}

/// Name of an XDP action, for messages.
pub fn action_name(action: u32) -> &'static str {
    match action {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "unknown",
    }
}
