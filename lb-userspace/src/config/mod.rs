//! The agent's configuration file (`lb.toml`): one serde tree, validated once at load.
//!
//! Field-level problems (an unknown key, a malformed address, a table size that is not a
//! prime, a bad duration) are caught while deserializing, so `toml` reports them with the
//! line and column of the offending value. Problems that involve several fields (a backend
//! listed twice, IPIP without a source address) are checked afterwards by [`Config::validate`],
//! which names the VIP or backend and the line of its `[[vip]]` / `[[vip.backend]]` header.
//!
//! The same [`VipSpec`] / [`BackendSpec`] types travel over the admin socket as JSON, so the
//! CLI's `vip add` and `backend add` go through the same checks as the file.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

mod values;
pub use values::{
    CheckKind, HumanDuration, MacAddr, Mode, Protocol, TableSize, VipId, XdpModeSetting,
};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax or a field-level error; the message carries the line and column.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A cross-field check failed.
    #[error("{where_}: {message}")]
    Invalid { where_: String, message: String },
}

/// The whole file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default, rename = "vip")]
    pub vips: Vec<VipSpec>,
}

/// `[agent]`: where the agent attaches and how it is reached.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Interfaces that receive VIP traffic; `xdp_lb` is attached to each.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Directory name under /sys/fs/bpf where maps and links are pinned.
    #[serde(default = "default_pin_name")]
    pub pin_name: String,
    /// Unix socket of the admin API (mode 0600).
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// Prometheus `/metrics` listener; off when absent.
    #[serde(default)]
    pub metrics_address: Option<SocketAddr>,
    /// `native` (driver mode only), `auto` (native, else generic) or `generic`.
    #[serde(default)]
    pub xdp_mode: XdpModeSetting,
    /// Outer source address of IPIP packets (required by IPv4 VIPs in `ipip` mode).
    #[serde(default)]
    pub ipip_src_v4: Option<Ipv4Addr>,
    /// Outer source address of IP6IP6 packets (required by IPv6 VIPs in `ipip` mode).
    #[serde(default)]
    pub ipip_src_v6: Option<Ipv6Addr>,
}

fn default_pin_name() -> String {
    "xdplb".into()
}

fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/xdplb.sock")
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            pin_name: default_pin_name(),
            admin_socket: default_admin_socket(),
            metrics_address: None,
            xdp_mode: XdpModeSetting::default(),
            ipip_src_v4: None,
            ipip_src_v6: None,
        }
    }
}

/// `[[vip]]`: a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSpec {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub table_size: TableSize,
    /// Answer pings to the VIP address from XDP.
    #[serde(default)]
    pub echo_reply: bool,
    #[serde(default)]
    pub health_check: Option<HealthCheckSpec>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendSpec>,
}

impl VipSpec {
    /// The VIP's identity: `address:port/protocol`.
    pub fn id(&self) -> VipId {
        VipId {
            address: self.address,
            port: self.port,
            protocol: self.protocol,
        }
    }
}

/// `[vip.health_check]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// Port to check; the VIP's port when absent.
    #[serde(default)]
    pub port: Option<u16>,
    /// HTTP path.
    #[serde(default = "default_path")]
    pub path: String,
    /// HTTP status that means healthy.
    #[serde(default = "default_status")]
    pub expect_status: u16,
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Consecutive successes that bring a down backend up.
    #[serde(default = "default_threshold")]
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    #[serde(default = "default_threshold")]
    pub fall: u32,
}

fn default_path() -> String {
    "/".into()
}
fn default_status() -> u16 {
    200
}
fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_threshold() -> u32 {
    2
}

/// `[[vip.backend]]`: a real server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub address: IpAddr,
    /// Next-hop MAC; resolved from the neighbour table when absent.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Share of new flows relative to the VIP's other backends; 0 drains.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Egress interface; the route to the backend decides when absent.
    #[serde(default)]
    pub interface: Option<String>,
}

fn default_weight() -> u32 {
    1
}

/// Most weight one backend may have (keeps Maglev's fill loop short).
pub const MAX_WEIGHT: u32 = 1000;

/// The shortest health check interval.
pub const MIN_HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The most consecutive checks `rise` or `fall` may ask for.
pub const MAX_HEALTH_COUNT: u32 = 1000;

/// Whether `addr` can be a VIP or a backend: not unspecified, multicast, broadcast, or an
/// IPv4-mapped IPv6 address (IPv4 traffic arrives as IPv4: the datapath would never see it).
fn usable(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast() || a.to_ipv4_mapped().is_some()),
    }
}

impl HealthCheckSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.rise == 0 || self.fall == 0 {
            return Err("health_check rise and fall must be at least 1".into());
        }
        // A count of checks that takes longer than a day to reach is surely a typo: a
        // backend that went down would in practice never come back.
        if self.rise.max(self.fall) > MAX_HEALTH_COUNT {
            return Err(format!(
                "health_check rise and fall must be at most {MAX_HEALTH_COUNT}"
            ));
        }
        if self.interval.0 < MIN_HEALTH_INTERVAL {
            return Err(format!(
                "health_check interval {:?} is below {MIN_HEALTH_INTERVAL:?}: checks that often \
                 would load the agent and the backends for no gain",
                self.interval.0
            ));
        }
        if self.port == Some(0) {
            return Err(
                "health_check port must not be 0 (leave it out to check the VIP's port)".into(),
            );
        }
        if self.kind == CheckKind::Http && !self.path.starts_with('/') {
            return Err(format!(
                "health_check path {:?} must start with '/'",
                self.path
            ));
        }
        // The path goes into the request line as it is: a space, CR or LF (or any control
        // byte) would end the line and inject headers or a second request.
        if self
            .path
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || !b.is_ascii())
        {
            return Err(format!(
                "health_check path {:?} holds spaces, control or non-ASCII characters; \
                 percent-encode them",
                self.path
            ));
        }
        if !(100..=599).contains(&self.expect_status) {
            return Err(format!(
                "health_check expect_status {} is not an HTTP status",
                self.expect_status
            ));
        }
        Ok(())
    }
}

impl BackendSpec {
    /// Checks one backend against its VIP.
    pub fn validate(&self, vip: &VipSpec) -> Result<(), String> {
        if self.address.is_ipv4() != vip.address.is_ipv4() {
            return Err(format!(
                "backend {} and VIP {} are of different IP families",
                self.address, vip.address
            ));
        }
        if !usable(self.address) {
            return Err(format!(
                "backend address {} is not usable (unspecified, multicast, broadcast \
                 or IPv4-mapped)",
                self.address
            ));
        }
        if let Some(mac) = self.mac {
            // Group bit set (broadcast, multicast) or all zeros: no single host has it.
            if mac.0[0] & 1 == 1 || mac.0 == [0; 6] {
                return Err(format!(
                    "backend {}: mac {mac} is not the address of one host",
                    self.address
                ));
            }
        }
        if self.weight > MAX_WEIGHT {
            return Err(format!(
                "backend {}: weight {} is larger than {MAX_WEIGHT}",
                self.address, self.weight
            ));
        }
        if let Some(i) = &self.interface {
            if i.is_empty() || i.len() > 15 {
                return Err(format!(
                    "backend {}: invalid interface name {i:?}",
                    self.address
                ));
            }
        }
        Ok(())
    }
}

impl VipSpec {
    /// Checks the VIP alone (not against other VIPs); `agent` supplies the IPIP sources.
    pub fn validate(&self, agent: &AgentSection) -> Result<(), SpecError> {
        self.validate_vip(agent).map_err(|message| SpecError {
            backend: None,
            message,
        })?;
        let mut seen = std::collections::HashSet::new();
        for (j, b) in self.backends.iter().enumerate() {
            let checked = b.validate(self).and_then(|()| {
                if seen.insert(b.address) {
                    Ok(())
                } else {
                    Err(format!("backend {} appears twice", b.address))
                }
            });
            checked.map_err(|message| SpecError {
                backend: Some(j),
                message,
            })?;
        }
        let weighted = self.backends.iter().filter(|b| b.weight > 0).count();
        if weighted > self.table_size.get() as usize {
            return Err(SpecError {
                backend: None,
                message: format!(
                    "{weighted} backends with weight do not fit a Maglev table of size {}",
                    self.table_size.get()
                ),
            });
        }
        Ok(())
    }

    fn validate_vip(&self, agent: &AgentSection) -> Result<(), String> {
        if self.port == 0 {
            return Err("port must not be 0".into());
        }
        if !usable(self.address) {
            return Err(format!(
                "VIP address {} is not usable (unspecified, multicast, broadcast or \
                 IPv4-mapped)",
                self.address
            ));
        }
        if self.mode == Mode::Ipip {
            let missing = match self.address {
                IpAddr::V4(_) => agent.ipip_src_v4.is_none().then_some("ipip_src_v4"),
                IpAddr::V6(_) => agent.ipip_src_v6.is_none().then_some("ipip_src_v6"),
            };
            if let Some(field) = missing {
                return Err(format!(
                    "mode = \"ipip\" needs [agent] {field} (the outer source address)"
                ));
            }
        }
        match &self.health_check {
            Some(hc) => hc.validate(),
            None => Ok(()),
        }
    }
}

/// A problem with a VIP or, when `backend` is set, with its backend at that index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SpecError {
    pub backend: Option<usize>,
    pub message: String,
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate(text, path)?;
        Ok(cfg)
    }

    /// Cross-field checks. `text` is the source, used to point at the VIP's line.
    pub fn validate(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let invalid = |where_: String, message: String| ConfigError::Invalid { where_, message };
        let file = path.display();
        if self.agent.pin_name.is_empty()
            || self.agent.pin_name.contains('/')
            || self.agent.pin_name == "."
            || self.agent.pin_name == ".."
        {
            return Err(invalid(
                format!("{file}: [agent] pin_name"),
                format!(
                    "{:?} must be a non-empty name without '/'",
                    self.agent.pin_name
                ),
            ));
        }
        if self.vips.len() > common::MAX_VIPS as usize {
            return Err(invalid(
                format!("{file}: [[vip]]"),
                format!("{} VIPs; at most {}", self.vips.len(), common::MAX_VIPS),
            ));
        }
        let headers = array_header_lines(text, "vip");
        let backend_headers = array_header_lines(text, "vip.backend");
        let at = |line: Option<&usize>| line.map(|l| format!(", line {l}")).unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        for (i, vip) in self.vips.iter().enumerate() {
            let where_ = format!("{file}: vip[{i}] {}{}", vip.id(), at(headers.get(i)));
            if let Err(e) = vip.validate(&self.agent) {
                let Some(j) = e.backend else {
                    return Err(invalid(where_, e.message));
                };
                // This VIP's `[[vip.backend]]` headers lie between its header and the next.
                let start = headers.get(i).copied().unwrap_or(0);
                let end = headers.get(i + 1).copied().unwrap_or(usize::MAX);
                let line = backend_headers
                    .iter()
                    .filter(|l| (start..end).contains(*l))
                    .nth(j);
                return Err(invalid(
                    format!("{file}: vip[{i}] {} backend[{j}]{}", vip.id(), at(line)),
                    e.message,
                ));
            }
            if !seen.insert(vip.id()) {
                return Err(invalid(where_, "the same VIP appears twice".into()));
            }
        }
        Ok(())
    }
}

/// Line numbers (1-based) of the `[[name]]` array-of-tables headers, in order.
fn array_header_lines(text: &str, name: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let l = l.trim();
            let inner = l.strip_prefix("[[").and_then(|l| l.split_once("]]"));
            inner.is_some_and(|(key, rest)| {
                key.trim() == name && (rest.trim().is_empty() || rest.trim().starts_with('#'))
            })
        })
        .map(|(n, _)| n + 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agent]
interfaces = ["eth0"]
ipip_src_v4 = "10.0.0.2"
metrics_address = "127.0.0.1:9100"

[[vip]]
address = "10.0.0.100"
port = 80
protocol = "tcp"
health_check = { type = "http", path = "/health" }

[[vip.backend]]
address = "10.0.1.1"
mac = "02:00:00:00:01:01"

[[vip.backend]]
address = "10.0.1.2"
weight = 3
interface = "eth1"

[[vip]]
address = "10.0.0.100"
port = 53
protocol = "udp"
mode = "ipip"
table_size = 251
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("lb.toml"))
    }

    #[test]
    fn parses_good_config_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.agent.pin_name, "xdplb");
        assert_eq!(c.agent.admin_socket, PathBuf::from("/run/xdplb.sock"));
        assert_eq!(c.agent.xdp_mode, XdpModeSetting::Native);
        assert_eq!(c.vips.len(), 2);
        let v = &c.vips[0];
        assert_eq!(v.table_size.get(), 65537);
        assert_eq!(v.mode, Mode::Dsr);
        let hc = v.health_check.as_ref().unwrap();
        assert_eq!(hc.interval.0, Duration::from_secs(1));
        assert_eq!(hc.timeout.0, Duration::from_millis(500));
        assert_eq!((hc.rise, hc.fall, hc.expect_status), (2, 2, 200));
        assert_eq!(v.backends[0].weight, 1);
        assert_eq!(v.backends[1].weight, 3);
        assert_eq!(c.vips[1].table_size.get(), 251);
        assert_eq!(c.vips[1].id().to_string(), "10.0.0.100:53/udp");
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let bad = GOOD.replace("weight = 3", "wieght = 3");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("wieght") && e.contains("line 19"), "{e}");
    }

    #[test]
    fn non_prime_table_size_has_line() {
        let bad = GOOD.replace("table_size = 251", "table_size = 250");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("not a prime") && e.contains("line 27"), "{e}");
    }

    #[test]
    fn bad_address_and_mac() {
        let e = parse(&GOOD.replace("10.0.1.1", "10.0.1.300"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 14"), "{e}");
        let e = parse(&GOOD.replace("02:00:00:00:01:01", "02:00"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MAC") && e.contains("line 15"), "{e}");
    }

    #[test]
    fn cross_field_errors_name_the_vip_and_line() {
        let dup = GOOD.replace("10.0.1.2", "10.0.1.1");
        let e = parse(&dup).unwrap_err().to_string();
        assert!(
            e.contains("10.0.1.1 appears twice") && e.contains("backend[1], line 17"),
            "{e}"
        );
        let heavy = GOOD.replace("weight = 3", "weight = 5000");
        let e = parse(&heavy).unwrap_err().to_string();
        assert!(e.contains("weight 5000") && e.contains("line 17"), "{e}");
        let no_src = GOOD.replace("ipip_src_v4 = \"10.0.0.2\"", "");
        let e = parse(&no_src).unwrap_err().to_string();
        assert!(e.contains("ipip_src_v4") && e.contains("line 22"), "{e}");
        let v6 = GOOD.replace("10.0.1.1\"", "2001:db8::1\"");
        assert!(parse(&v6).unwrap_err().to_string().contains("families"));
    }

    #[test]
    fn example_config_is_valid() {
        let c = parse(include_str!("../../lb.example.toml")).unwrap();
        assert_eq!(c.vips.len(), 2);
        assert_eq!(c.vips[1].mode, Mode::Ipip);
    }

    #[test]
    fn durations_and_vip_ids() {
        let d = |s: &str| HumanDuration::try_from(s.to_string());
        assert_eq!(d("250ms").unwrap().0, Duration::from_millis(250));
        assert_eq!(d("2m").unwrap().0, Duration::from_secs(120));
        assert!(d("5").is_err() && d("0s").is_err() && d("1h").is_err());
        let v: VipId = "[2001:db8::1]:443/tcp".parse().unwrap();
        assert_eq!(v.to_string(), "[2001:db8::1]:443/tcp");
        assert_eq!(
            "10.0.0.1:53/udp".parse::<VipId>().unwrap().protocol,
            Protocol::Udp
        );
        assert!("10.0.0.1/tcp".parse::<VipId>().is_err());
    }

    #[test]
    fn huge_durations_are_refused_not_wrapped() {
        let d = |s: &str| HumanDuration::try_from(s.to_string());
        // 307445734561825861 minutes is 2^64 + 44 seconds: it must not become 44 s (or panic).
        let e = d("307445734561825861m").unwrap_err();
        assert!(e.contains("too large"), "{e}");
        let e = parse(&GOOD.replace(
            "path = \"/health\" }",
            "path = \"/health\", interval = \"99999999999999999999m\" }",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("interval") || e.contains("too large"), "{e}");
        let e = parse(&GOOD.replace(
            "path = \"/health\" }",
            "path = \"/health\", timeout = \"999999999999999999m\" }",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("too large") && e.contains("line 11"), "{e}");
        assert_eq!(d("10m").unwrap().0, Duration::from_secs(600));
    }

    #[test]
    fn more_weighted_backends_than_table_entries_is_refused() {
        let small = GOOD.replace("health_check = {", "table_size = 2\nhealth_check = {");
        assert!(parse(&small).is_ok());
        let bad = small.replace(
            "weight = 3",
            "weight = 3\n[[vip.backend]]\naddress = \"10.0.1.3\"",
        );
        let e = parse(&bad).unwrap_err().to_string();
        assert!(
            e.contains("3 backends with weight do not fit") && e.contains("line 7"),
            "{e}"
        );
    }

    #[test]
    fn health_check_port_zero_is_refused() {
        // Checking port 0 fails on every backend: the whole VIP would go down.
        let bad = GOOD.replace("path = \"/health\" }", "path = \"/health\", port = 0 }");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(
            e.contains("health_check port must not be 0") && e.contains("line 7"),
            "{e}"
        );
        let ok = GOOD.replace("path = \"/health\" }", "path = \"/health\", port = 8080 }");
        assert_eq!(
            parse(&ok).unwrap().vips[0]
                .health_check
                .as_ref()
                .unwrap()
                .port,
            Some(8080)
        );
    }

    /// Values that would break the request line, load the agent, never bring a backend back,
    /// or name no single host are refused by name.
    #[test]
    fn nonsense_values_are_refused() {
        for (from, to, want) in [
            (
                r#"path = "/health" }"#,
                r#"path = "/ok\r\nX-Injected: 1" }"#,
                "holds spaces, control or non-ASCII characters",
            ),
            (
                r#"path = "/health" }"#,
                r#"path = "/a b" }"#,
                "holds spaces",
            ),
            (
                r#"path = "/health" }"#,
                r#"path = "/health", interval = "1ms" }"#,
                "interval 1ms is below 100ms",
            ),
            (
                r#"path = "/health" }"#,
                r#"path = "/health", rise = 100000000 }"#,
                "rise and fall must be at most 1000",
            ),
            (
                "address = \"10.0.0.100\"\nport = 80",
                "address = \"255.255.255.255\"\nport = 80",
                "VIP address 255.255.255.255 is not usable",
            ),
            (
                "address = \"10.0.0.100\"\nport = 80",
                "address = \"::ffff:10.0.0.100\"\nport = 80",
                "is not usable",
            ),
            (
                "02:00:00:00:01:01",
                "ff:ff:ff:ff:ff:ff",
                "mac ff:ff:ff:ff:ff:ff is not the address of one host",
            ),
            (
                "02:00:00:00:01:01",
                "00:00:00:00:00:00",
                "is not the address of one host",
            ),
            (
                "02:00:00:00:01:01",
                "01:00:5e:00:00:01",
                "is not the address of one host",
            ),
        ] {
            assert!(GOOD.contains(from), "{from}");
            let e = parse(&GOOD.replacen(from, to, 1)).unwrap_err().to_string();
            assert!(e.contains(want), "{to}: {e}");
        }
        for name in [".", ".."] {
            let text = GOOD.replacen("[agent]\n", &format!("[agent]\npin_name = \"{name}\"\n"), 1);
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains("pin_name"), "{e}");
        }
    }
}
