//! The value types of the configuration: each parses (and so validates) itself, which is how
//! a malformed MAC, a table size that is not a prime or a bad duration gets reported by
//! `toml` with the line and column of the value. They serialize back to the same text, so
//! they also travel in admin requests.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// How `xdp_lb` is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Driver mode; fail if the driver cannot run XDP.
    #[default]
    Native,
    /// Driver mode, falling back to generic (SKB) mode with a warning.
    Auto,
    /// Generic (SKB) mode.
    Generic,
}

/// L4 protocol of a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn ip_proto(self) -> u8 {
        match self {
            Self::Tcp => common::IPPROTO_TCP,
            Self::Udp => common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// How packets reach a VIP's backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Direct server return: rewrite the destination MAC.
    #[default]
    Dsr,
    /// IPIP / IP6IP6 encapsulation to the backend's address.
    Ipip,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dsr => "dsr",
            Self::Ipip => "ipip",
        })
    }
}

/// A Maglev table size: a prime no larger than [`common::RING_SIZE_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct TableSize(u32);

impl TableSize {
    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for TableSize {
    fn default() -> Self {
        Self(common::RING_SIZE_DEFAULT)
    }
}

impl TryFrom<u32> for TableSize {
    type Error = String;
    fn try_from(n: u32) -> Result<Self, String> {
        if n > common::RING_SIZE_MAX {
            return Err(format!(
                "table_size {n} is larger than {}",
                common::RING_SIZE_MAX
            ));
        }
        if !common::maglev::is_prime(n) {
            return Err(format!(
                "table_size {n} is not a prime (Maglev needs a prime, e.g. 65537, 65521, 4099, 251)"
            ));
        }
        Ok(Self(n))
    }
}

impl From<TableSize> for u32 {
    fn from(t: TableSize) -> u32 {
        t.0
    }
}

/// Longest duration accepted (a day): more is a typo, not a health-check interval.
pub const MAX_DURATION_SECS: u64 = 86_400;

/// A duration written as `1s`, `500ms` or `2m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HumanDuration(pub Duration);

impl TryFrom<String> for HumanDuration {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration {s:?} needs a unit (ms, s or m)"))?;
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(format!("duration {s:?} must start with a number"));
        }
        let too_large = || format!("duration {s:?} is too large (at most {MAX_DURATION_SECS}s)");
        // All digits: the only way to fail is not fitting in a u64.
        let n: u64 = num.parse().map_err(|_| too_large())?;
        let secs_per_unit = match unit {
            "ms" => None,
            "s" => Some(1),
            "m" => Some(60),
            _ => return Err(format!("duration {s:?}: unit must be ms, s or m")),
        };
        let d = match secs_per_unit {
            None => Duration::from_millis(n),
            Some(k) => Duration::from_secs(n.checked_mul(k).ok_or_else(too_large)?),
        };
        if d.is_zero() {
            return Err(format!("duration {s:?} must be positive"));
        }
        if d > Duration::from_secs(MAX_DURATION_SECS) {
            return Err(too_large());
        }
        Ok(Self(d))
    }
}

impl From<HumanDuration> for String {
    fn from(d: HumanDuration) -> String {
        format!("{}ms", d.0.as_millis())
    }
}

/// A MAC address written `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "invalid MAC address {s:?} (want aa:bb:cc:dd:ee:ff)"
            ));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            *o = u8::from_str_radix(p, 16)
                .map_err(|_| format!("invalid MAC address {s:?} (want aa:bb:cc:dd:ee:ff)"))?;
        }
        Ok(Self(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Names a VIP: `10.0.0.10:80/tcp` (`[2001:db8::1]:443/tcp` for IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VipId {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for VipId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.address, self.port),
            self.protocol
        )
    }
}

impl FromStr for VipId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, proto) = match s.rsplit_once('/') {
            Some((a, p)) => (a, p),
            None => (s, "tcp"),
        };
        let protocol = match proto {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(format!("VIP {s:?}: protocol must be tcp or udp")),
        };
        let sa: SocketAddr = addr.parse().map_err(|_| {
            format!("invalid VIP {s:?} (want ADDRESS:PORT[/tcp|udp], e.g. 10.0.0.10:80/tcp)")
        })?;
        Ok(Self {
            address: sa.ip(),
            port: sa.port(),
            protocol,
        })
    }
}

impl TryFrom<String> for VipId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<VipId> for String {
    fn from(v: VipId) -> String {
        v.to_string()
    }
}

/// Kind of health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect succeeds.
    Tcp,
    /// `GET path` answers with `expect_status`.
    Http,
}
