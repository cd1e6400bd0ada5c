//! [`Services`] over the real datapath: the embedded XDP object loaded with its maps pinned in
//! a private bpffs directory, backends on `lo` (127.0.0.x, MACs given), packets run through
//! `xdp_lb` with BPF_PROG_TEST_RUN. Map writes are made to fail on purpose
//! (`Datapath::faults`) to check what a failed change leaves in the agent's view and in the
//! maps. Loading BPF needs root; without it each test says so and passes.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use common::{map_names, VipKey, BACKEND_F_ALIVE};

use super::{keys::vip_key, restart, NewId, NewIds, ServiceError, Services};
use crate::{
    api::Counters,
    config::{AgentSection, Config, VipId},
    datapath::{ensure_bpffs, Datapath},
    testrun::{run_xdp, XDP_TX},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A private pin directory, removed (with the maps, once closed) at the end of the test.
struct Pins(PathBuf);

impl Pins {
    /// None (and a note) when BPF cannot be loaded here.
    fn new() -> Option<Self> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: loading BPF programs needs root");
            return None;
        }
        let root = Path::new("/sys/fs/bpf");
        ensure_bpffs(root).expect("mounting bpffs");
        let dir = root.join(format!(
            "lbunit-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        Some(Self(dir))
    }

    /// An agent's services over these pins, as a (re)started agent has them.
    fn services(&self) -> Services {
        let dp = Datapath::load(&self.0).expect("loading the XDP object");
        Services::new(dp, AgentSection::default(), None)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

const VIP: &str = "10.200.0.1";

/// A config with one VIP per `(port, table_size, backends)`; backend `n` is 127.0.0.`n`
/// with MAC 02:00:00:00:00:`n`.
fn config(vips: &[(u16, u32, &[u8])]) -> Config {
    let mut text = String::new();
    for (port, table, backends) in vips {
        text.push_str(&format!(
            "[[vip]]\naddress = \"{VIP}\"\nport = {port}\nprotocol = \"tcp\"\ntable_size = {table}\n"
        ));
        for n in *backends {
            text.push_str(&format!(
                "[[vip.backend]]\naddress = \"127.0.0.{n}\"\nmac = \"02:00:00:00:00:{n:02x}\"\n"
            ));
        }
    }
    Config::parse(&text, Path::new("test.toml")).expect("test config")
}

fn vip(port: u16) -> VipId {
    format!("{VIP}:{port}/tcp").parse().unwrap()
}

fn key(port: u16) -> VipKey {
    vip_key(&vip(port))
}

fn backend(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

fn started(pins: &Pins, vips: &[(u16, u32, &[u8])]) -> Services {
    let mut s = pins.services();
    s.start(&config(vips).vips).expect("start");
    s
}

/// The backends the agent lists for the VIP on `port`: (last octet, id, counters).
fn listed(s: &Services, port: u16) -> Vec<(u8, u32, Counters)> {
    s.list_backends(Some(&vip(port)))
        .unwrap()
        .into_iter()
        .map(|b| match b.address {
            IpAddr::V4(a) => (a.octets()[3], b.id, b.counters),
            IpAddr::V6(_) => unreachable!("IPv4 backends"),
        })
        .collect()
}

fn id_of(s: &Services, port: u16, n: u8) -> u32 {
    listed(s, port)
        .iter()
        .find(|b| b.0 == n)
        .map(|b| b.1)
        .unwrap_or_else(|| panic!("backend {n} not listed"))
}

fn alive(s: &Services, id: u32) -> bool {
    s.dp.backend(id).unwrap().flags & BACKEND_F_ALIVE != 0
}

/// The backend ids in the VIP's live Maglev table, each once.
fn table_ids(s: &Services, port: u16) -> Vec<u32> {
    let mut ids = s.dp.live_table(&key(port)).unwrap().expect("VIP installed");
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A TCP SYN from 10.9.0.1:`sport` to the VIP on `port`.
fn syn(sport: u16, port: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(54);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // to the load balancer
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xcc]); // from the client
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = common::IPPROTO_TCP;
    ip[12..16].copy_from_slice(&[10, 9, 0, 1]);
    ip[16..20].copy_from_slice(&VIP.parse::<std::net::Ipv4Addr>().unwrap().octets());
    let sum = ip
        .chunks(2)
        .fold(0u32, |s, w| s + u32::from(u16::from_be_bytes([w[0], w[1]])));
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    p.extend_from_slice(&tcp);
    p
}

/// Runs one packet of the flow from `sport` through `xdp_lb`; the last octet of the backend
/// it went to.
fn send(s: &mut Services, sport: u16, port: u16) -> u8 {
    let prog = s.dp.xdp(common::prog_names::LB).unwrap();
    let out = run_xdp(prog, &syn(sport, port), 1).unwrap();
    assert_eq!(
        out.action, XDP_TX,
        "flow from port {sport} was not forwarded"
    );
    out.packet[5]
}

/// A source port whose flow goes to backend `n`, trying ports from `from`.
fn flow_to(s: &mut Services, n: u8, port: u16, from: u16) -> u16 {
    (from..from + 500)
        .find(|sport| send(s, *sport, port) == n)
        .unwrap_or_else(|| panic!("no flow reached backend {n}"))
}

fn flow_key(sport: u16, port: u16) -> common::FlowKey {
    let k = key(port);
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&[10, 9, 0, 1]);
    common::FlowKey {
        src,
        dst: k.addr,
        sport: sport.to_be(),
        dport: k.port,
        proto: k.proto,
        family: k.family,
        _pad: [0; 2],
    }
}

// --- Removing a backend or a VIP when a map write fails -----------------------------------

#[test]
fn failed_backend_removal_changes_nothing_and_can_be_retried() {
    let Some(pins) = Pins::new() else { return };
    let mut s = started(&pins, &[(80, 13, &[11, 12, 13])]);
    let id12 = id_of(&s, 80, 12);
    let table = table_ids(&s, 80);

    // The table without the backend goes in, then clearing its ALIVE flag fails.
    s.dp.faults.fail(map_names::BACKENDS, 0, 1);
    let e = s.del_backend(&vip(80), backend(12)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("removing backend 127.0.0.12 from VIP 10.200.0.1:80/tcp")
            && msg.contains("nothing was changed")
            && msg.contains("BACKENDS"),
        "{msg}"
    );
    assert!(
        listed(&s, 80).iter().any(|b| b.0 == 12),
        "backend dropped from the view"
    );
    assert_eq!(table_ids(&s, 80), table, "the old table is not live again");
    assert!(alive(&s, id12));

    // The new table itself fails to go live.
    s.dp.faults.fail(map_names::VIPS, 0, 1);
    let e = s.del_backend(&vip(80), backend(12)).unwrap_err();
    assert!(matches!(e, ServiceError::Undone { .. }), "{e}");
    assert!(listed(&s, 80).iter().any(|b| b.0 == 12));
    assert_eq!(table_ids(&s, 80), table);

    // Once the datapath takes writes again, the same removal goes through.
    s.del_backend(&vip(80), backend(12)).unwrap();
    assert!(!listed(&s, 80).iter().any(|b| b.0 == 12));
    assert!(!table_ids(&s, 80).contains(&id12));
    assert!(!alive(&s, id12));
}

#[test]
fn failed_vip_removal_changes_nothing_and_can_be_retried() {
    let Some(pins) = Pins::new() else { return };
    let mut s = started(&pins, &[(80, 13, &[11, 12]), (81, 13, &[13])]);
    let ids: Vec<u32> = listed(&s, 80).iter().map(|b| b.1).collect();
    let table = table_ids(&s, 80);
    let installed = |s: &Services| {
        s.dp.vip(&key(80)).unwrap().is_some()
            && table_ids(s, 80) == table
            && ids.iter().all(|id| alive(s, *id))
            && s.dp.vip_addrs().unwrap().len() == 1
    };

    // The address entry (still used by port 81) fails after the VIP entry went.
    s.dp.faults.fail(map_names::VIP_ADDRS, 0, 1);
    let e = s.del_vip(&vip(80)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("removing VIP 10.200.0.1:80/tcp") && msg.contains("nothing was changed"),
        "{msg}"
    );
    assert_eq!(s.list_vips().len(), 2, "VIP dropped from the view");
    assert!(installed(&s), "the VIP is not installed as it was");

    // Clearing the second backend's ALIVE flag fails after the first was cleared.
    s.dp.faults.fail(map_names::BACKENDS, 1, 1);
    let e = s.del_vip(&vip(80)).unwrap_err();
    assert!(matches!(e, ServiceError::Undone { .. }), "{e}");
    assert!(installed(&s));

    // Writes fail again while undoing: the VIP stays listed and the error says so.
    s.dp.faults.fail(map_names::VIP_ADDRS, 0, 2);
    let e = s.del_vip(&vip(80)).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("undoing it failed too"), "{msg}");
    assert_eq!(s.list_vips().len(), 2);

    s.del_vip(&vip(80)).unwrap();
    assert_eq!(s.list_vips().len(), 1);
    assert!(s.dp.vip(&key(80)).unwrap().is_none());
    assert!(ids.iter().all(|id| !alive(&s, *id)));
    assert_eq!(s.dp.vip_addrs().unwrap().len(), 1);
}

// --- Reload -------------------------------------------------------------------------------

/// A smaller table for a VIP whose table is full: the reload removes the backends first, so
/// the smaller table fits, and the VIP before it in the file is not left half reloaded.
#[test]
fn reload_shrinks_a_full_table() {
    let Some(pins) = Pins::new() else { return };
    let mut s = started(
        &pins,
        &[(80, 7, &[11, 12]), (81, 7, &[21, 22, 23, 24, 25, 26, 27])],
    );
    let summary = s
        .apply(config(&[
            (80, 7, &[11, 12, 13]),
            (81, 5, &[21, 22, 23, 24, 25]),
        ]))
        .unwrap();
    assert_eq!(
        summary.to_string(),
        "VIPs +0 -0 ~1, backends +1 -2 ~0",
        "{summary:?}"
    );
    let v = s.list_vips();
    assert_eq!((v[1].table_size, v[1].backends.len()), (5, 5));
    assert_eq!(s.dp.live_table(&key(81)).unwrap().unwrap().len(), 5);
    assert_eq!(table_ids(&s, 81).len(), 5);
}

/// A file that cannot be applied (here an IPIP VIP without a source address, which
/// `Config::load` would refuse too) is refused before anything changes.
#[test]
fn reload_refuses_an_invalid_config_before_changing_anything() {
    let Some(pins) = Pins::new() else { return };
    let mut s = started(&pins, &[(80, 7, &[11]), (81, 7, &[12])]);
    let mut next = config(&[(80, 7, &[11]), (82, 7, &[13])]);
    next.vips[1].mode = crate::config::Mode::Ipip;
    let e = s.apply(next).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("VIP 10.200.0.1:82/tcp") && msg.contains("ipip_src_v4"),
        "{msg}"
    );
    assert_eq!(
        s.list_vips().len(),
        2,
        "the reload removed a VIP before it failed"
    );
    assert!(s.dp.vip(&key(81)).unwrap().is_some());
}

/// A datapath write that fails part way: the error names the backend and says what the
/// reload had applied; the failed step changed nothing.
#[test]
fn reload_stopped_by_a_map_write_says_where() {
    let Some(pins) = Pins::new() else { return };
    let mut s = started(&pins, &[(80, 7, &[11, 12]), (81, 7, &[21])]);
    // Removing VIP 81 clears one ALIVE flag; the next BACKENDS write (127.0.0.12's) fails.
    s.dp.faults.fail(map_names::BACKENDS, 1, 1);
    let e = s.apply(config(&[(80, 7, &[11, 13])])).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("removing backend 127.0.0.12 from VIP 10.200.0.1:80/tcp")
            && msg.contains("VIPs +0 -1 ~0, backends +0 -0 ~0")
            && msg.contains("reload again"),
        "{msg}"
    );
    assert!(matches!(e, ServiceError::ReloadStopped { .. }));
    assert_eq!(s.list_vips().len(), 1);
    assert_eq!(
        listed(&s, 80).iter().map(|b| b.0).collect::<Vec<_>>(),
        [11, 12]
    );
    // Reloading again finishes it.
    s.apply(config(&[(80, 7, &[11, 13])])).unwrap();
    assert_eq!(
        listed(&s, 80).iter().map(|b| b.0).collect::<Vec<_>>(),
        [11, 13]
    );
}

// --- Restart with a changed configuration ---------------------------------------------------

/// Backends the file keeps keep their ids, flows and counters; a new one starts from zero
/// and gets none of a dropped one's flows; the dropped one's flows are forgotten.
#[test]
fn restart_keeps_kept_backends_and_gives_new_ones_nothing_old() {
    let Some(pins) = Pins::new() else { return };
    let mut s = started(&pins, &[(80, 13, &[11, 12, 13])]);
    let on11 = flow_to(&mut s, 11, 80, 1000);
    let on12 = flow_to(&mut s, 12, 80, 2000);
    let before = listed(&s, 80);
    drop(s);

    let mut s = started(&pins, &[(80, 13, &[12, 13, 14])]);
    let after = listed(&s, 80);
    for n in [12, 13] {
        let (was, is) = (
            before.iter().find(|b| b.0 == n).unwrap(),
            after.iter().find(|b| b.0 == n).unwrap(),
        );
        assert_eq!(
            (is.1, is.2),
            (was.1, was.2),
            "backend {n}: id or counters changed"
        );
    }
    let new = after.iter().find(|b| b.0 == 14).unwrap();
    assert_eq!(
        new.2,
        Counters::default(),
        "the new backend has old counters"
    );
    assert!(
        !before.iter().any(|b| b.1 == new.1),
        "the new backend took a dropped backend's id while unused ones were free"
    );
    assert!(s.dp.flow(&flow_key(on11, 80)).unwrap().is_none());
    assert_eq!(
        send(&mut s, on12, 80),
        12,
        "an established flow changed backend"
    );
}

/// A new VIP does not show the counters of the dropped VIP whose place it takes in the file;
/// a kept VIP keeps its id and counters.
#[test]
fn restart_gives_a_new_vip_fresh_counters() {
    let Some(pins) = Pins::new() else { return };
    let mut s = started(&pins, &[(80, 13, &[11]), (81, 13, &[12])]);
    send(&mut s, 1000, 80);
    send(&mut s, 1000, 81);
    let before = s.list_vips();
    drop(s);

    let s = started(&pins, &[(82, 13, &[13]), (81, 13, &[12])]);
    let after = s.list_vips();
    assert_eq!(after[0].counters, Counters::default(), "{after:?}");
    assert_eq!(after[0].backends[0].counters, Counters::default());
    assert_eq!(
        (after[1].id, after[1].counters),
        (before[1].id, before[1].counters)
    );
    assert!(s.dp.vip(&key(80)).unwrap().is_none());
}

/// When unused ids run out, a new backend takes a dropped one's id, not inherited.
#[test]
fn plan_prefers_ids_the_previous_run_did_not_use() {
    let mut prev = restart::Previous::default();
    let cfg = config(&[(80, 7, &[11, 12]), (81, 7, &[13, 14, 15])]);
    prev.vips.insert(key(81), 0);
    let info = |n: u8, vip_id: u16| common::BackendInfo {
        addr: super::addr16(backend(n)),
        family: common::AF_INET,
        flags: BACKEND_F_ALIVE,
        vip_id,
        ..Default::default()
    };
    // VIP 81 had 13 (id 0) and 16 (id 1); ids 2 and up were never used.
    prev.backends = vec![
        info(13, 0),
        info(16, 0),
        Default::default(),
        Default::default(),
    ];
    let plan = restart::plan(&prev, &cfg.vips, 4, 5).unwrap();
    let kept = |id| NewId {
        id,
        inherited: true,
    };
    assert_eq!(
        plan,
        [
            NewIds {
                vip: NewId::fresh(1),
                backends: vec![NewId::fresh(2), NewId::fresh(3)],
            },
            NewIds {
                vip: kept(0),
                backends: vec![kept(0), NewId::fresh(4), NewId::fresh(1)],
            },
        ]
    );
    assert!(matches!(
        restart::plan(&prev, &cfg.vips, 4, 4),
        Err(ServiceError::Exhausted("backend"))
    ));
}
