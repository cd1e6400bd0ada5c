//! The admin API's messages: what `lbctl` sends to the agent over its Unix socket and what
//! comes back. One JSON object per line in each direction; each request gets one response.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::config::{BackendSpec, HealthCheckSpec, Mode, VipId, VipSpec};

/// A request to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    VipAdd {
        vip: VipSpec,
    },
    VipDel {
        vip: VipId,
    },
    VipList,
    BackendAdd {
        vip: VipId,
        backend: BackendSpec,
    },
    BackendDel {
        vip: VipId,
        address: IpAddr,
    },
    /// Sets a backend's weight; 0 drains it (no new flows, established ones stay).
    BackendWeight {
        vip: VipId,
        address: IpAddr,
        weight: u32,
    },
    BackendList {
        vip: Option<VipId>,
    },
    Stats,
    Health,
    /// Re-read the configuration file and apply the difference.
    Reload,
}

/// The answer: `ok` with a payload, or an error message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Ok {
        #[serde(default)]
        data: serde_json::Value,
    },
    Error {
        message: String,
    },
}

/// Health of a backend as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// In the Maglev table (unless drained); flows pinned to it continue.
    Up,
    /// Out of the table; its flows are re-picked.
    Down,
}

impl std::fmt::Display for HealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Up => "up",
            Self::Down => "down",
        })
    }
}

/// Packet, byte and new-flow counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl From<common::TrafficStats> for Counters {
    fn from(s: common::TrafficStats) -> Self {
        Self {
            packets: s.packets,
            bytes: s.bytes,
            new_flows: s.new_flows,
        }
    }
}

/// One backend of one VIP.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendView {
    pub vip: VipId,
    pub address: IpAddr,
    pub id: u32,
    pub weight: u32,
    pub health: HealthState,
    /// The last failed check's reason, while down.
    #[serde(default)]
    pub last_error: Option<String>,
    pub mac: String,
    pub ifindex: u32,
    pub counters: Counters,
}

/// One VIP.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VipView {
    pub vip: VipId,
    pub id: u32,
    pub mode: Mode,
    pub table_size: u32,
    pub echo_reply: bool,
    pub health_check: Option<HealthCheckSpec>,
    pub counters: Counters,
    pub backends: Vec<BackendView>,
}

/// `stats`: per VIP and backend, plus the datapath's global reason counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsView {
    pub vips: Vec<VipView>,
    pub global: BTreeMap<String, u64>,
    /// Entries in the connection table (`stats` only; counting walks the table).
    #[serde(default)]
    pub flows: Option<usize>,
}
