//! Finding how to reach a backend at layer 2: the egress interface (its index and MAC, the
//! Ethernet source of forwarded frames) and the next hop's MAC (the Ethernet destination).
//!
//! The route to the backend comes from `ip -j route get` in the agent's network namespace;
//! the next hop is the backend itself when it is on-link, else the route's gateway. Its MAC
//! comes from the neighbour table (`ip -j neigh`); when the kernel does not know it yet, a
//! UDP datagram to the next hop makes it send an ARP request / neighbour solicitation, and
//! the lookup is retried for a short while.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::config::MacAddr;

/// How long to wait for an ARP / ND answer.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a backend cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    #[error("interface {0:?} does not exist")]
    NoInterface(String),
    #[error("no route to backend {addr}: {message}")]
    NoRoute { addr: IpAddr, message: String },
    #[error("running `ip {args}`: {message}")]
    Ip { args: String, message: String },
}

/// Layer-2 path to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub mac: [u8; 6],
    /// The address whose MAC `mac` is: the backend, or the gateway on the route to it.
    pub via: IpAddr,
}

/// The MAC of a next hop that ARP / ND has not answered for (yet).
pub const UNRESOLVED: [u8; 6] = [0; 6];

/// Asks the kernel to resolve `hop`'s next hop again (an ARP request or neighbour
/// solicitation), for a later [`neighbours`] to find.
pub fn solicit(hop: &NextHop) {
    probe(hop.via, hop.ifindex);
}

/// The kernel's neighbour table: the MAC of each next hop, by (address, interface index),
/// for entries that are not failed or incomplete.
pub type Neighbours = std::collections::HashMap<(IpAddr, u32), [u8; 6]>;

/// Reads the whole neighbour table (two `ip` runs, whatever the number of backends).
pub fn neighbours() -> Result<Neighbours, NeighError> {
    let links = ip_json(&["link", "show"])?;
    let index: std::collections::HashMap<&str, u32> = links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| Some((l["ifname"].as_str()?, l["ifindex"].as_u64()? as u32)))
        .collect();
    let entries = ip_json(&["neigh", "show"])?;
    let mut table = Neighbours::new();
    for e in entries.as_array().into_iter().flatten() {
        let (Some(dst), Some(ifindex), Some(mac)) = (
            e["dst"].as_str().and_then(|d| d.parse::<IpAddr>().ok()),
            e["dev"].as_str().and_then(|d| index.get(d).copied()),
            entry_mac(e),
        ) else {
            continue;
        };
        table.insert((dst, ifindex), mac);
    }
    Ok(table)
}

/// The MAC of one `ip -j neigh` entry, unless the entry failed or is still incomplete.
fn entry_mac(entry: &Value) -> Option<[u8; 6]> {
    let failed = entry["state"].as_array().is_some_and(|s| {
        s.iter()
            .any(|x| matches!(x.as_str(), Some("FAILED" | "INCOMPLETE")))
    });
    if failed {
        return None;
    }
    entry["lladdr"]
        .as_str()
        .and_then(|s| s.parse::<MacAddr>().ok())
        .map(|m| m.0)
}

fn ip_json(args: &[&str]) -> Result<Value, NeighError> {
    let err = |message: String| NeighError::Ip {
        args: args.join(" "),
        message,
    };
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| err(e.to_string()))
}

/// An interface's index and MAC, in the calling thread's network namespace.
pub fn interface(name: &str) -> Result<(u32, [u8; 6]), NeighError> {
    let v = ip_json(&["link", "show", "dev", name])
        .map_err(|_| NeighError::NoInterface(name.into()))?;
    let link = v
        .get(0)
        .ok_or_else(|| NeighError::NoInterface(name.into()))?;
    let ifindex = link["ifindex"]
        .as_u64()
        .ok_or_else(|| NeighError::NoInterface(name.into()))? as u32;
    let mac = link["address"]
        .as_str()
        .and_then(|s| s.parse::<MacAddr>().ok())
        .map(|m| m.0)
        .unwrap_or_default();
    Ok((ifindex, mac))
}

/// Egress interface name and next-hop address for `addr`.
fn route(addr: IpAddr, via: Option<&str>) -> Result<(String, IpAddr), NeighError> {
    let a = addr.to_string();
    let mut args = vec!["route", "get", a.as_str()];
    if let Some(dev) = via {
        args.extend(["oif", dev]);
    }
    let v = ip_json(&args).map_err(|e| NeighError::NoRoute {
        addr,
        message: e.to_string(),
    })?;
    let r = v.get(0).ok_or_else(|| NeighError::NoRoute {
        addr,
        message: "empty answer".into(),
    })?;
    let dev = r["dev"].as_str().ok_or_else(|| NeighError::NoRoute {
        addr,
        message: "route has no device".into(),
    })?;
    let next_hop = r["gateway"]
        .as_str()
        .and_then(|g| g.parse().ok())
        .unwrap_or(addr);
    Ok((dev.to_string(), next_hop))
}

fn neighbour_mac(next_hop: IpAddr, dev: &str) -> Result<Option<[u8; 6]>, NeighError> {
    let nh = next_hop.to_string();
    let v = ip_json(&["neigh", "show", "to", &nh, "dev", dev])?;
    Ok(v.as_array().into_iter().flatten().find_map(entry_mac))
}

/// `addr:port` as a socket address; an IPv6 link-local address gets interface `ifindex` as
/// its scope, without which the kernel cannot tell which link it is on (EINVAL).
pub fn scoped(addr: IpAddr, port: u16, ifindex: u32) -> SocketAddr {
    match addr {
        IpAddr::V6(a) if a.is_unicast_link_local() => {
            SocketAddr::V6(std::net::SocketAddrV6::new(a, port, 0, ifindex))
        }
        _ => SocketAddr::new(addr, port),
    }
}

/// Makes the kernel resolve `next_hop` (on interface `ifindex`): any datagram to it triggers
/// ARP / ND.
fn probe(next_hop: IpAddr, ifindex: u32) {
    let bind: SocketAddr = if next_hop.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    if let Ok(s) = UdpSocket::bind(bind) {
        // Port 9 is "discard"; the answer (if any) does not matter.
        let _ = s.send_to(b"xdplb-arp-probe", scoped(next_hop, 9, ifindex));
    }
}

/// Resolves the layer-2 path to `addr`, optionally through interface `via`. `mac` overrides
/// the neighbour lookup. A next hop that does not answer ARP / ND within a few seconds gets
/// [`UNRESOLVED`] as its MAC.
pub fn resolve(
    addr: IpAddr,
    via: Option<&str>,
    mac: Option<[u8; 6]>,
) -> Result<NextHop, NeighError> {
    if let Some(dev) = via {
        interface(dev)?;
    }
    let (dev, next_hop) = route(addr, via)?;
    let (ifindex, src_mac) = interface(&dev)?;
    if let Some(mac) = mac {
        return Ok(NextHop {
            ifindex,
            src_mac,
            mac,
            via: next_hop,
        });
    }
    let deadline = Instant::now() + RESOLVE_TIMEOUT;
    let mut probed_at: Option<Instant> = None;
    loop {
        if let Some(mac) = neighbour_mac(next_hop, &dev)? {
            return Ok(NextHop {
                ifindex,
                src_mac,
                mac,
                via: next_hop,
            });
        }
        if Instant::now() >= deadline {
            // Not an error: the backend is kept down until its MAC is known (see
            // `Services::refresh_next_hops`), as IPVS keeps a real server it cannot reach.
            return Ok(NextHop {
                ifindex,
                src_mac,
                mac: UNRESOLVED,
                via: next_hop,
            });
        }
        if probed_at.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            probe(next_hop, ifindex);
            probed_at = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
