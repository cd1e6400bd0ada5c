//! `lbctl`, the agent's command line, as a library: [`Args`] is the clap grammar, [`execute`]
//! turns it into one admin [`Request`], sends it and renders the answer (tables, or JSON with
//! `--json`) into any writer, so tests drive the real CLI in-process.

use std::{io::Write, net::IpAddr, path::PathBuf};

use clap::{Parser, Subcommand};

use crate::{
    admin,
    api::{BackendView, Request, StatsView, VipView},
    config::{
        BackendSpec, CheckKind, HealthCheckSpec, HumanDuration, MacAddr, Mode, TableSize, VipId,
        VipSpec,
    },
};

/// Why a command failed; `exit_code` is what `lbctl` exits with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line is wrong (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The agent refused the request or cannot be reached (exit 1).
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Failed(_) => 1,
        }
    }
}

/// Control the XDP load balancer agent (lb-agent).
///
/// VIPs are written ADDRESS:PORT[/tcp|udp], e.g. 10.0.0.10:80/tcp or [2001:db8::1]:443/tcp.
/// Changes apply at once and live in the agent's memory (the config file is not rewritten).
/// Exit status: 0 on success, 1 when the agent refused the request or cannot be reached, 2 when
/// the command line is wrong (an unparsable address, port or size).
#[derive(Debug, Parser)]
#[command(name = "lbctl", version, about, long_about)]
pub struct Args {
    /// The agent's admin socket.
    #[arg(
        long,
        global = true,
        env = "XDPLB_SOCKET",
        default_value = "/run/xdplb.sock"
    )]
    socket: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for the agent's reply (e.g. 30s, 2m).
    #[arg(long, global = true, default_value = "60s", value_parser = parse_reply_timeout)]
    reply_timeout: HumanDuration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Add, remove or list VIPs.
    #[command(subcommand)]
    Vip(VipCmd),
    /// Add, remove, drain or list backends.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Packets, bytes and new flows per VIP and backend; global datapath counters.
    Stats,
    /// Health of every backend.
    Health,
    /// Re-read the agent's configuration file and apply the difference (like SIGHUP).
    Reload,
}

#[derive(Debug, Clone, Subcommand)]
pub enum VipCmd {
    /// Add a VIP (without backends; add them with `backend add`).
    Add {
        vip: VipId,
        /// dsr (rewrite MACs) or ipip (encapsulate).
        #[arg(long, default_value = "dsr", value_parser = parse_mode)]
        mode: Mode,
        /// Maglev table size (a prime).
        #[arg(long, default_value_t = common::RING_SIZE_DEFAULT)]
        table_size: u32,
        /// Answer pings to the VIP address from XDP.
        #[arg(long)]
        echo_reply: bool,
        /// Health check: tcp or http (none when absent).
        #[arg(long, value_parser = parse_check)]
        health: Option<CheckKind>,
        /// Port to check (default: the VIP's).
        #[arg(long, requires = "health")]
        health_port: Option<u16>,
        /// HTTP path to check.
        #[arg(long, default_value = "/", requires = "health")]
        health_path: String,
        /// HTTP status that means healthy.
        #[arg(long, default_value_t = 200, requires = "health")]
        expect_status: u16,
        /// Check interval (e.g. 1s, 500ms).
        #[arg(long, default_value = "1s", requires = "health")]
        interval: String,
        /// Check timeout.
        #[arg(long, default_value = "500ms", requires = "health")]
        timeout: String,
        /// Successes to come up.
        #[arg(long, default_value_t = 2, requires = "health")]
        rise: u32,
        /// Failures to go down.
        #[arg(long, default_value_t = 2, requires = "health")]
        fall: u32,
    },
    /// Remove a VIP.
    Del { vip: VipId },
    /// List VIPs.
    List,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BackendCmd {
    /// Add a backend to a VIP.
    Add {
        vip: VipId,
        address: IpAddr,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Next-hop MAC (default: from the neighbour table, probing if needed).
        #[arg(long)]
        mac: Option<MacAddr>,
        /// Egress interface (default: from the route).
        #[arg(long)]
        interface: Option<String>,
    },
    /// Remove a backend; its flows move to other backends.
    Del { vip: VipId, address: IpAddr },
    /// Drain a backend (weight 0): no new flows, established flows stay.
    Drain { vip: VipId, address: IpAddr },
    /// Set a backend's weight.
    Weight {
        vip: VipId,
        address: IpAddr,
        weight: u32,
    },
    /// List backends (of one VIP, or all).
    List { vip: Option<VipId> },
}

fn parse_reply_timeout(s: &str) -> Result<HumanDuration, String> {
    HumanDuration::try_from(s.to_string())
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "dsr" => Ok(Mode::Dsr),
        "ipip" => Ok(Mode::Ipip),
        _ => Err("mode must be dsr or ipip".into()),
    }
}

fn parse_check(s: &str) -> Result<CheckKind, String> {
    match s {
        "tcp" => Ok(CheckKind::Tcp),
        "http" => Ok(CheckKind::Http),
        _ => Err("health check must be tcp or http".into()),
    }
}

fn request(cmd: Command) -> Result<Request, String> {
    Ok(match cmd {
        Command::Vip(VipCmd::Add {
            vip,
            mode,
            table_size,
            echo_reply,
            health,
            health_port,
            health_path,
            expect_status,
            interval,
            timeout,
            rise,
            fall,
        }) => {
            let health_check = match health {
                None => None,
                Some(kind) => Some(HealthCheckSpec {
                    kind,
                    port: health_port,
                    path: health_path,
                    expect_status,
                    interval: HumanDuration::try_from(interval)?,
                    timeout: HumanDuration::try_from(timeout)?,
                    rise,
                    fall,
                }),
            };
            Request::VipAdd {
                vip: VipSpec {
                    address: vip.address,
                    port: vip.port,
                    protocol: vip.protocol,
                    mode,
                    table_size: TableSize::try_from(table_size)?,
                    echo_reply,
                    health_check,
                    backends: Vec::new(),
                },
            }
        }
        Command::Vip(VipCmd::Del { vip }) => Request::VipDel { vip },
        Command::Vip(VipCmd::List) => Request::VipList,
        Command::Backend(BackendCmd::Add {
            vip,
            address,
            weight,
            mac,
            interface,
        }) => Request::BackendAdd {
            vip,
            backend: BackendSpec {
                address,
                mac,
                weight,
                interface,
            },
        },
        Command::Backend(BackendCmd::Del { vip, address }) => Request::BackendDel { vip, address },
        Command::Backend(BackendCmd::Drain { vip, address }) => Request::BackendWeight {
            vip,
            address,
            weight: 0,
        },
        Command::Backend(BackendCmd::Weight {
            vip,
            address,
            weight,
        }) => Request::BackendWeight {
            vip,
            address,
            weight,
        },
        Command::Backend(BackendCmd::List { vip }) => Request::BackendList { vip },
        Command::Stats => Request::Stats,
        Command::Health => Request::Health,
        Command::Reload => Request::Reload,
    })
}

/// Prints rows as left-aligned columns.
fn table(out: &mut dyn Write, header: &[&str], rows: Vec<Vec<String>>) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |out: &mut dyn Write, cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        writeln!(out, "{}", s.join("  ").trim_end())
    };
    line(out, header.iter().map(|h| h.to_string()).collect())?;
    for r in rows {
        line(out, r)?;
    }
    Ok(())
}

fn backend_rows(list: &[BackendView], health_only: bool) -> Vec<Vec<String>> {
    list.iter()
        .map(|b| {
            let mut r = vec![
                b.vip.to_string(),
                b.address.to_string(),
                b.weight.to_string(),
                b.health.to_string(),
            ];
            if health_only {
                r.push(b.last_error.clone().unwrap_or_default());
            } else {
                r.extend([
                    b.id.to_string(),
                    b.mac.clone(),
                    b.counters.packets.to_string(),
                    b.counters.bytes.to_string(),
                    b.counters.new_flows.to_string(),
                ]);
            }
            r
        })
        .collect()
}

const BACKEND_HEADER: [&str; 9] = [
    "VIP",
    "BACKEND",
    "WEIGHT",
    "HEALTH",
    "ID",
    "MAC",
    "PACKETS",
    "BYTES",
    "NEW_FLOWS",
];

fn print_human(out: &mut dyn Write, cmd: &Command, data: serde_json::Value) -> anyhow::Result<()> {
    match cmd {
        Command::Vip(VipCmd::List) => {
            let vips: Vec<VipView> = serde_json::from_value(data)?;
            table(
                out,
                &[
                    "VIP",
                    "MODE",
                    "TABLE",
                    "BACKENDS",
                    "UP",
                    "PACKETS",
                    "BYTES",
                    "NEW_FLOWS",
                ],
                vips.iter()
                    .map(|v| {
                        let up = v
                            .backends
                            .iter()
                            .filter(|b| b.health == crate::api::HealthState::Up)
                            .count();
                        vec![
                            v.vip.to_string(),
                            v.mode.to_string(),
                            v.table_size.to_string(),
                            v.backends.len().to_string(),
                            up.to_string(),
                            v.counters.packets.to_string(),
                            v.counters.bytes.to_string(),
                            v.counters.new_flows.to_string(),
                        ]
                    })
                    .collect(),
            )?;
        }
        Command::Backend(BackendCmd::List { .. }) => {
            let list: Vec<BackendView> = serde_json::from_value(data)?;
            table(out, &BACKEND_HEADER, backend_rows(&list, false))?;
        }
        Command::Health => {
            let stats: StatsView = serde_json::from_value(data)?;
            let list: Vec<BackendView> = stats.vips.into_iter().flat_map(|v| v.backends).collect();
            table(
                out,
                &["VIP", "BACKEND", "WEIGHT", "HEALTH", "LAST_ERROR"],
                backend_rows(&list, true),
            )?;
        }
        Command::Stats => {
            let stats: StatsView = serde_json::from_value(data)?;
            table(
                out,
                &["VIP", "PACKETS", "BYTES", "NEW_FLOWS"],
                stats
                    .vips
                    .iter()
                    .map(|v| {
                        vec![
                            v.vip.to_string(),
                            v.counters.packets.to_string(),
                            v.counters.bytes.to_string(),
                            v.counters.new_flows.to_string(),
                        ]
                    })
                    .collect(),
            )?;
            writeln!(out)?;
            let list: Vec<BackendView> = stats.vips.into_iter().flat_map(|v| v.backends).collect();
            table(out, &BACKEND_HEADER, backend_rows(&list, false))?;
            writeln!(out)?;
            if let Some(flows) = stats.flows {
                writeln!(out, "connection table entries: {flows}")?;
            }
            table(
                out,
                &["REASON", "PACKETS"],
                stats
                    .global
                    .iter()
                    .map(|(k, v)| vec![k.clone(), v.to_string()])
                    .collect(),
            )?;
        }
        Command::Reload => {
            let n = |k: &str| data.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            writeln!(
                out,
                "reloaded: VIPs +{} -{} ~{}, backends +{} -{} ~{}",
                n("vips_added"),
                n("vips_removed"),
                n("vips_changed"),
                n("backends_added"),
                n("backends_removed"),
                n("backends_changed")
            )?;
            let restart: Vec<&str> = data
                .get("needs_restart")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .collect();
            if !restart.is_empty() {
                writeln!(
                    out,
                    "not applied until lb-agent restarts: [agent] {}",
                    restart.join(", ")
                )?;
            }
        }
        _ => writeln!(out, "ok")?,
    }
    Ok(())
}

/// Runs one parsed command against the agent, writing the answer to `out`.
pub fn execute(args: Args, out: &mut dyn Write) -> Result<(), CliError> {
    let req = request(args.command.clone()).map_err(CliError::Usage)?;
    let data = admin::call_ok_within(&args.socket, &req, args.reply_timeout.0)
        .map_err(CliError::Failed)?;
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&data).unwrap_or_default()
        )
        .map_err(|e| CliError::Failed(e.into()))
    } else {
        print_human(out, &args.command, data)
            .map_err(|e| CliError::Failed(e.context("unexpected reply from the agent")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(args: &[&str]) -> Result<Request, String> {
        let args = Args::try_parse_from(std::iter::once("lbctl").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        request(args.command)
    }

    #[test]
    fn commands_become_requests() {
        match req(&["backend", "drain", "10.0.0.1:80", "10.0.1.1"]).unwrap() {
            Request::BackendWeight { vip, weight, .. } => {
                assert_eq!(weight, 0);
                assert_eq!(vip.to_string(), "10.0.0.1:80/tcp");
            }
            other => panic!("{other:?}"),
        }
        match req(&[
            "vip",
            "add",
            "[2001:db8::1]:53/udp",
            "--mode",
            "ipip",
            "--health",
            "http",
            "--health-path",
            "/hc",
            "--interval",
            "250ms",
        ])
        .unwrap()
        {
            Request::VipAdd { vip } => {
                assert_eq!(vip.mode, Mode::Ipip);
                let hc = vip.health_check.unwrap();
                assert_eq!((hc.kind, hc.path.as_str()), (CheckKind::Http, "/hc"));
                assert_eq!(hc.interval.0, std::time::Duration::from_millis(250));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(req(&["reload"]), Ok(Request::Reload)));
    }

    #[test]
    fn bad_input_is_refused_before_reaching_the_agent() {
        assert!(req(&["vip", "add", "10.0.0.1:80", "--table-size", "100"])
            .unwrap_err()
            .contains("not a prime"));
        assert!(req(&[
            "vip",
            "add",
            "10.0.0.1:80",
            "--health",
            "tcp",
            "--interval",
            "1h"
        ])
        .unwrap_err()
        .contains("unit"));
        assert!(req(&["backend", "add", "10.0.0.1:80", "10.0.1.300"]).is_err());
        assert!(req(&["backend", "add", "10.0.0.1", "10.0.1.3"]).is_err());
        assert!(req(&["backend", "add", "10.0.0.1:80", "10.0.1.3", "--mac", "zz"]).is_err());
    }

    #[test]
    fn health_options_without_health_are_refused_not_ignored() {
        // Without --health there is no check: a port or path given alone would be dropped
        // silently and the operator would believe the VIP is checked.
        for opt in [
            ["--health-port", "8080"],
            ["--health-path", "/hc"],
            ["--expect-status", "204"],
            ["--interval", "2s"],
            ["--timeout", "1s"],
            ["--rise", "3"],
            ["--fall", "3"],
        ] {
            let e = req(&["vip", "add", "10.0.0.1:80", opt[0], opt[1]]).unwrap_err();
            assert!(e.contains("--health"), "{opt:?}: {e}");
        }
        let ok = req(&[
            "vip",
            "add",
            "10.0.0.1:80",
            "--health",
            "tcp",
            "--health-port",
            "8080",
        ]);
        match ok.unwrap() {
            Request::VipAdd { vip } => assert_eq!(vip.health_check.unwrap().port, Some(8080)),
            other => panic!("{other:?}"),
        }
        assert!(req(&["vip", "add", "10.0.0.1:80"]).is_ok());
    }
}
