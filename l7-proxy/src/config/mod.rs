//! The proxy's configuration file: one `serde` struct tree, parsed from TOML and validated once
//! at load (and again on every reload) before anything goes live.
//!
//! Text enters through [`Config::from_toml_str`] or [`Config::from_file`]. Parse errors come
//! from `toml` and already name the line and the offending key (`unknown field`, wrong type).
//! Semantic errors (a route that forwards to a group that does not exist, a regex that does not
//! compile, a duplicate name) are found by `Config::validate` (run by both constructors) and reported as
//! [`ConfigError::Invalid`] with the dotted field path and the line, using the spans that
//! `toml::Spanned` keeps. Later stages (TLS certificate loading, policy building) use
//! [`Config::line_of`] to report their errors the same way.
//!
//! Defaults live next to the fields, as `default_*` functions. `examples/proxy.toml` documents
//! every field.

mod validate;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::pipeline::via::{ViaHeader, DEFAULT_PSEUDONYM};
use crate::policy::PolicyConfig;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or does not match the schema; the message names line and key.
    #[error("{0}")]
    Parse(Box<toml::de::Error>),
    /// The TOML is well formed but a value is not acceptable.
    #[error("line {line}: `{field}`: {message}")]
    Invalid {
        /// Dotted path of the field, e.g. `routes[2].action.forward.group`.
        field: String,
        /// 1-based line of the value in the config file.
        line: usize,
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Client-facing connection settings shared by all listeners.
    #[serde(default)]
    pub server: ServerConfig,
    /// Optional admin listener (`/metrics`, `POST /-/reload`).
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub upstreams: Vec<UpstreamGroupConfig>,
    /// Byte offsets of line starts in the source text, to turn spans into line numbers.
    #[serde(skip)]
    line_starts: Vec<usize>,
}

/// Settings of client connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// A client must send a complete request head within this time (slowloris defence).
    /// At least 1.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: Spanned<u64>,
    /// A client connection with no bytes moving in either direction for this long is closed
    /// (while no request on it waits for its response). At least 1.
    #[serde(default = "default_client_idle_timeout_ms")]
    pub idle_timeout_ms: Spanned<u64>,
    /// On shutdown or when a listener is removed, connections get this long to finish.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// The pseudonym this proxy adds to `Via` on every request it forwards (RFC 9110 7.6.3:
    /// `Via: 1.1 l7-proxy`, the version being the client's), or `false` (or `""`) for none.
    /// A token: letters, digits and ``!#$%&'*+-.^_`|~``.
    #[serde(default = "default_via")]
    pub via: Spanned<ViaSetting>,
    /// Add our `Via` entry to the responses of upstreams too (with the member's protocol
    /// version: `Via: 2 l7-proxy` from an h2c group). Off by default, as in nginx and Envoy.
    #[serde(default = "default_off")]
    pub via_response: Spanned<bool>,
    /// Answer `508 Loop Detected` to a request whose `Via` already names our pseudonym: it
    /// went round back to us. Give each proxy tier its own pseudonym first (two tiers that
    /// share one would refuse each other's requests). Off by default.
    #[serde(default = "default_off")]
    pub via_loop_detection: Spanned<bool>,
    /// The `Via` entries built from the three fields above at load (`None` when off).
    #[serde(skip)]
    pub via_header: Option<Arc<ViaHeader>>,
}

/// `via = "name"`, `via = true` (the default pseudonym) or `via = false` / `""` (off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViaSetting {
    Off,
    Pseudonym(Arc<str>),
}

impl<'de> Deserialize<'de> for ViaSetting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ViaSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a pseudonym (string) or false")
            }
            fn visit_bool<E>(self, on: bool) -> Result<ViaSetting, E> {
                Ok(match on {
                    true => ViaSetting::Pseudonym(DEFAULT_PSEUDONYM.into()),
                    false => ViaSetting::Off,
                })
            }
            fn visit_str<E>(self, name: &str) -> Result<ViaSetting, E> {
                Ok(match name {
                    "" => ViaSetting::Off,
                    name => ViaSetting::Pseudonym(name.into()),
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

fn default_header_read_timeout_ms() -> Spanned<u64> {
    Spanned::new(0..0, 10_000)
}
fn default_client_idle_timeout_ms() -> Spanned<u64> {
    Spanned::new(0..0, 60_000)
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}
fn default_via() -> Spanned<ViaSetting> {
    Spanned::new(0..0, ViaSetting::Pseudonym(DEFAULT_PSEUDONYM.into()))
}
fn default_off() -> Spanned<bool> {
    Spanned::new(0..0, false)
}

impl ServerConfig {
    /// The `Via` entries of `via`, built once per load; `None` when off (or, before
    /// validation, not a token).
    fn build_via(&self) -> Option<Arc<ViaHeader>> {
        match self.via.get_ref() {
            ViaSetting::Off => None,
            ViaSetting::Pseudonym(name) => ViaHeader::new(
                name,
                *self.via_response.get_ref(),
                *self.via_loop_detection.get_ref(),
            )
            .map(Arc::new),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        let mut server = Self {
            header_read_timeout_ms: default_header_read_timeout_ms(),
            idle_timeout_ms: default_client_idle_timeout_ms(),
            drain_timeout_ms: default_drain_timeout_ms(),
            via: default_via(),
            via_response: default_off(),
            via_loop_detection: default_off(),
            via_header: None,
        };
        server.via_header = server.build_via();
        server
    }
}

/// The admin listener. Its address is read at start only; reloads do not move it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub address: Spanned<String>,
}

/// One client-facing listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name used in logs and by [`crate::ProxyHandle::listener_addr`].
    pub name: Spanned<String>,
    /// `ip:port` to bind. On reload a listener whose address is unchanged keeps its socket.
    pub address: Spanned<String>,
    /// Terminate TLS on this listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Expect a PROXY protocol v1 or v2 header before any other byte, and take the client
    /// address from it.
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// TLS termination settings of a listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificates; the one whose names match the client's SNI is served, else the first.
    pub certs: Spanned<Vec<CertConfig>>,
    /// PEM file of CAs; when set, clients must present a certificate signed by one (mTLS).
    #[serde(default)]
    pub client_ca: Option<Spanned<PathBuf>>,
    /// Stateless session tickets (RFC 5077, TLS 1.3 tickets), so returning clients resume
    /// without a full handshake. The keys are made at start and on each reload, as nginx does
    /// without `ssl_session_ticket_key`. Off: no resumption, every connection a full
    /// handshake.
    #[serde(default = "default_session_tickets")]
    pub session_tickets: bool,
}

fn default_session_tickets() -> bool {
    true
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    pub cert: Spanned<PathBuf>,
    pub key: Spanned<PathBuf>,
}

/// A route: what requests it matches, what to do with them, and the policies on the way.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: Spanned<String>,
    /// Conditions, all of which must hold. An empty match matches every request.
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    pub action: Spanned<ActionConfig>,
    /// Gateway policies, run in order on the request and in reverse on the response.
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
}

/// Match conditions of a route.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// `api.example.com` (exact) or `*.example.com` (any subdomain, not the apex).
    #[serde(default)]
    pub host: Option<Spanned<String>>,
    /// `{ exact = "/x" }`, `{ prefix = "/api" }` or `{ regex = "^/v[0-9]+/" }`.
    #[serde(default)]
    pub path: Option<Spanned<PathMatchConfig>>,
    /// Allowed methods; empty means any.
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    /// Headers that must be present with exactly this value.
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
}

/// How a route matches the request path.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathMatchConfig {
    Exact(String),
    Prefix(String),
    Regex(String),
}

/// What a route does with a request.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ActionConfig {
    /// `[routes.action.forward]`: proxy to an upstream group.
    Forward(ForwardConfig),
    /// `[routes.action.redirect]`: answer with a redirect.
    Redirect(RedirectConfig),
    /// `[routes.action.fixed]`: answer with a fixed response.
    Fixed(FixedConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    pub group: Spanned<String>,
    /// Remove this prefix from the path before forwarding (`/api/x` → `/x`).
    #[serde(default)]
    pub strip_prefix: Option<Spanned<String>>,
    /// Replace the whole path (the query is kept).
    #[serde(default)]
    pub rewrite_path: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// 301, 302, 303, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status: Spanned<u16>,
    pub location: Spanned<String>,
}

fn default_redirect_status() -> Spanned<u16> {
    Spanned::new(0..0, 302)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedConfig {
    #[serde(default = "default_fixed_status")]
    pub status: Spanned<u16>,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
}

fn default_fixed_status() -> Spanned<u16> {
    Spanned::new(0..0, 200)
}

/// A group of upstream servers that share a balancing algorithm and health checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamGroupConfig {
    pub name: Spanned<String>,
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Required with `consistent_hash`: `{ header = "x-user" }`, `{ cookie = "sid" }` or
    /// `"client_ip"`. Requests without the header or cookie are spread at random.
    #[serde(default)]
    pub hash_on: Option<Spanned<HashOn>>,
    pub members: Spanned<Vec<MemberConfig>>,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub passive_health: PassiveHealthConfig,
    /// Time to establish a TCP connection to a member. At least 1.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: Spanned<u64>,
    /// Time from sending the request until the response head arrives. At least 1.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: Spanned<u64>,
    /// Idle pooled keep-alive connections are closed after 0.75 to 1 times this, so that the
    /// proxy is done with a connection before the member times it out: set it below the
    /// members' keep-alive timeout (Node's is 5 s, nginx's 75 s). At least 1.
    #[serde(default = "default_pool_idle_timeout_ms")]
    pub idle_timeout_ms: Spanned<u64>,
    /// Idle keep-alive connections kept per member, as nginx's `keepalive` and hyper's
    /// `pool_max_idle_per_host`: a connection that finishes its exchange while its member has
    /// this many idle already is closed. A burst opens as many connections as it needs; this
    /// bounds how many stay open afterwards. 0 keeps none: every request opens a connection
    /// (for HTTP/2 groups too). Groups with the same settings share a pool, and so a member
    /// in two of them shares its idle connections and this bound.
    #[serde(default = "default_max_idle_per_member")]
    pub max_idle_per_member: usize,
    #[serde(default)]
    pub retries: RetryConfig,
    /// How the proxy speaks to the members: `"http1"` (HTTP/1.1, the default), `"h2c"`
    /// (HTTP/2 over plain TCP with prior knowledge, as gRPC services and Envoy's
    /// `http2_protocol_options` clusters do: requests are multiplexed on one connection per
    /// member, trailers pass through, and health checks speak HTTP/2 too) or `"h2"` (HTTP/2
    /// over TLS, which needs `tls`). Upgrades (WebSocket) need `http1`.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// TLS to the members (HTTPS upstreams, as nginx's `proxy_pass https://` with
    /// `proxy_ssl_verify on`): the members' certificates are always verified.
    #[serde(default)]
    pub tls: Option<Spanned<UpstreamTlsConfig>>,
}

/// The protocol of an upstream group's members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    H2c,
    H2,
}

/// `tls = { ca = "ca.pem", server_name = "api.internal", client_cert = "..", client_key = ".." }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM file of the CAs that sign the members' certificates; by default the system's.
    #[serde(default)]
    pub ca: Option<Spanned<PathBuf>>,
    /// Name sent as SNI and checked against the members' certificates; by default the
    /// member's IP address (the certificate must then name it).
    #[serde(default)]
    pub server_name: Option<Spanned<String>>,
    /// Certificate chain (PEM) presented to members that ask for one (mTLS); needs
    /// `client_key`.
    #[serde(default)]
    pub client_cert: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub client_key: Option<Spanned<PathBuf>>,
}

fn default_connect_timeout_ms() -> Spanned<u64> {
    Spanned::new(0..0, 1_000)
}
fn default_request_timeout_ms() -> Spanned<u64> {
    Spanned::new(0..0, 30_000)
}
fn default_pool_idle_timeout_ms() -> Spanned<u64> {
    Spanned::new(0..0, 60_000)
}
fn default_max_idle_per_member() -> usize {
    64
}

/// Load-balancing algorithm of a group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    /// Smooth weighted round robin (nginx): members get `weight` turns per cycle, interleaved.
    Weighted,
    /// Power of two random choices on in-flight requests.
    LeastRequest,
    /// Hash ring over members; a key keeps its member while that member is healthy, and only
    /// about 1/N of keys move when a member joins or leaves.
    ConsistentHash,
}

/// What `consistent_hash` hashes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HashOn {
    Header(String),
    Cookie(String),
    ClientIp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// `ip:port` of the member (plain HTTP/1.1, or HTTP/2 with the group's `protocol = "h2c"`).
    pub address: Spanned<String>,
    /// Used by `weighted` and `consistent_hash`; 1 to 1000.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Active health checks: `GET path` on every member each interval.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_interval_ms")]
    pub interval_ms: u64,
    /// At least 1.
    #[serde(default = "default_health_timeout_ms")]
    pub timeout_ms: Spanned<u64>,
    /// Consecutive successes that bring a down member back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take a member down.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_health_path() -> String {
    "/".to_string()
}
fn default_health_interval_ms() -> u64 {
    2_000
}
fn default_health_timeout_ms() -> Spanned<u64> {
    Spanned::new(0..0, 1_000)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// Passive health: members that fail live traffic are ejected for a while.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealthConfig {
    /// Consecutive 5xx responses or connect failures that eject a member; 0 disables.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// First ejection length; each further ejection doubles it, up to 8x.
    #[serde(default = "default_ejection_ms")]
    pub ejection_ms: u64,
}

fn default_consecutive_failures() -> u32 {
    3
}
fn default_ejection_ms() -> u64 {
    10_000
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            ejection_ms: default_ejection_ms(),
        }
    }
}

/// Retries of idempotent requests (without a body) that failed to reach a member.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Further members tried after the first, at most.
    #[serde(default = "default_retry_attempts")]
    pub attempts: u32,
    /// Retries may add at most this percentage to the group's request rate (plus a small
    /// reserve), so a failing group is not hammered.
    #[serde(default = "default_retry_budget_percent")]
    pub budget_percent: u32,
}

fn default_retry_attempts() -> u32 {
    2
}
fn default_retry_budget_percent() -> u32 {
    20
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: default_retry_attempts(),
            budget_percent: default_retry_budget_percent(),
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file, which must name at least one listener.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::from_toml_str(&text)?;
        // A library user may build listeners of their own; a proxy run from a file without
        // any would accept no connection.
        if config.listeners.is_empty() {
            return Err(ConfigError::Invalid {
                field: "listeners".into(),
                line: 1,
                message: "no [[listeners]]: the proxy would accept no connections; add one \
                          with a name and an ip:port address"
                    .into(),
            });
        }
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        config.validate()?;
        config.server.via_header = config.server.build_via();
        Ok(config)
    }

    /// 1-based line of a span of the source text (0 when the value came from a default).
    pub fn line_of(&self, span: Range<usize>) -> usize {
        if span.start == 0 && span.end == 0 {
            return 0;
        }
        self.line_starts
            .partition_point(|&start| start <= span.start)
    }

    /// An [`ConfigError::Invalid`] for a spanned value.
    pub fn invalid<T>(
        &self,
        field: impl Into<String>,
        value: &Spanned<T>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            field: field.into(),
            line: self.line_of(value.span()),
            message: message.into(),
        }
    }
}
