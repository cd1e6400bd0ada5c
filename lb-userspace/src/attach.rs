//! Attaching `xdp_lb` to interfaces so that it outlives a crash and is replaced in place on
//! restart.
//!
//! Each attachment is a BPF link pinned at `<pin dir>/link_<interface>`. While the pin exists
//! the program stays attached even if the agent dies, and the pinned maps keep the connection
//! table. A starting agent that finds the pin swaps its freshly loaded program into the link
//! (`BPF_LINK_UPDATE`, atomic: no packet sees an interface without a program). A clean stop
//! removes the pin and so detaches, unless the operator asked to keep it attached.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};
use aya::programs::{
    links::{FdLink, PinnedLink},
    XdpMode,
};

use crate::{config::XdpModeSetting, datapath::Datapath};

/// The ifindex of `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = CString::new(name)?;
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("interface {name:?} does not exist"),
        i => Ok(i),
    }
}

/// One interface's pinned attachment.
pub struct Attachment {
    pub interface: String,
    link: Option<PinnedLink>,
}

fn link_pin(pin_dir: &Path, interface: &str) -> PathBuf {
    pin_dir.join(format!("link_{interface}"))
}

/// Attaches the program `prog` to `interface`, replacing a link pinned by a previous run.
pub fn attach(
    dp: &mut Datapath,
    prog: &str,
    interface: &str,
    mode: XdpModeSetting,
) -> anyhow::Result<Attachment> {
    let index = ifindex(interface)?;
    let pin = link_pin(dp.pin_dir(), interface);
    let xdp = dp.xdp(prog)?;
    let mut id = None;
    if pin.exists() {
        let replaced = PinnedLink::from_pin(&pin)
            .map_err(anyhow::Error::from)
            .and_then(|p| p.unpin().map_err(anyhow::Error::from))
            .and_then(|fd| aya::programs::xdp::XdpLink::try_from(fd).map_err(anyhow::Error::from))
            .and_then(|link| xdp.attach_to_link(link).map_err(anyhow::Error::from));
        match replaced {
            // A link whose interface was deleted and re-created updates fine but is defunct.
            Ok(link_id) if !has_xdp(interface) => {
                tracing::warn!(
                    interface,
                    "the pinned link no longer holds the interface; attaching anew"
                );
                drop(xdp.take_link(link_id));
            }
            Ok(link_id) => {
                tracing::info!(
                    interface,
                    "replaced the program in the link of a previous run"
                );
                id = Some(link_id);
            }
            Err(e) => {
                tracing::warn!(interface, error = %e, "could not reuse the pinned link; attaching anew");
                let _ = std::fs::remove_file(&pin);
            }
        }
    }
    let id = match id {
        Some(id) => id,
        None => match attach_fresh(xdp, interface, index, mode) {
            Ok(id) => id,
            // Someone else's program (attached through netlink) is there: replace it.
            Err(e) if detach_foreign(interface) => {
                tracing::warn!(interface, error = %e, "replaced an XDP program that was already attached");
                attach_fresh(xdp, interface, index, mode)?
            }
            Err(e) => return Err(e),
        },
    };
    let link = FdLink::try_from(xdp.take_link(id)?).context("XDP link is not a BPF link")?;
    let link = link
        .pin(&pin)
        .with_context(|| format!("pinning the XDP link at {}", pin.display()))?;
    Ok(Attachment {
        interface: interface.to_string(),
        link: Some(link),
    })
}

fn attach_fresh(
    xdp: &mut aya::programs::Xdp,
    interface: &str,
    index: u32,
    mode: XdpModeSetting,
) -> anyhow::Result<aya::programs::xdp::XdpLinkId> {
    let first = match mode {
        XdpModeSetting::Generic => XdpMode::Skb,
        XdpModeSetting::Native | XdpModeSetting::Auto => XdpMode::Driver,
    };
    let err = match xdp.attach(index, first) {
        Ok(id) => {
            tracing::info!(interface, mode = ?first, "XDP attached");
            return Ok(id);
        }
        Err(e) => e,
    };
    // Another program holds the interface: generic mode would be refused too, and the
    // mode is not the problem.
    let text = format!("{:#}", anyhow::Error::new(err));
    if text.contains("os error 16") || text.contains("resource busy") {
        anyhow::bail!(
            "attaching XDP to {interface}: it already has an XDP program (another lb-agent, or \
             another tool); detach it first (`ip link set dev {interface} xdp off`) or use \
             another interface ({text})"
        );
    }
    let err = anyhow::anyhow!(text);
    if mode == XdpModeSetting::Auto {
        tracing::warn!(
            interface,
            error = format!("{err:#}"),
            "native XDP failed; falling back to generic (SKB) mode, which is much slower"
        );
        let id = xdp
            .attach(index, XdpMode::Skb)
            .with_context(|| format!("attaching XDP to {interface} in generic mode"))?;
        tracing::info!(interface, mode = ?XdpMode::Skb, "XDP attached");
        return Ok(id);
    }
    Err(err.context(format!(
        "attaching XDP to {interface} in {first:?} mode (xdp_mode = \"auto\" falls back to generic)"
    )))
}

/// Whether `interface` has an XDP program attached.
fn has_xdp(interface: &str) -> bool {
    std::process::Command::new("ip")
        .args(["link", "show", "dev", interface])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("prog/xdp"))
        .unwrap_or(false)
}

/// Detaches a netlink-attached XDP program from `interface`; true if one was there. (A
/// program held by a BPF link cannot be removed this way: that is another agent's.)
fn detach_foreign(interface: &str) -> bool {
    has_xdp(interface)
        && std::process::Command::new("ip")
            .args(["link", "set", "dev", interface, "xdp", "off"])
            .status()
            .is_ok_and(|s| s.success())
}

impl Attachment {
    /// Detaches (removes the pin and drops the link), or with `keep` leaves the program
    /// attached for the next run to take over.
    pub fn release(mut self, keep: bool) {
        let Some(link) = self.link.take() else {
            return;
        };
        if keep {
            tracing::info!(interface = %self.interface, "leaving XDP attached");
            drop(link);
            return;
        }
        match link.unpin() {
            Ok(fd) => {
                drop(fd);
                tracing::info!(interface = %self.interface, "XDP detached");
            }
            Err(e) => {
                tracing::warn!(interface = %self.interface, error = %e, "removing the link pin")
            }
        }
    }
}
