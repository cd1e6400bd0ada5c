//! A harness in the manner of Katran's `lib/testing`: load the compiled XDP object with its maps
//! pinned in a private bpffs directory, fill the maps as the agent would, run crafted packets
//! through the program with BPF_PROG_TEST_RUN and compare the action and the bytes that come out.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use common::{
    maglev::{build_table, MaglevBackend},
    BackendInfo, ForwardMode, LbConfig, VipAddrInfo, VipKey, VipMeta, AF_INET, AF_INET6,
    BACKEND_F_ALIVE,
};
use lb_userspace::{
    datapath::{ensure_bpffs, Datapath},
    testrun::{run_xdp, XdpRun},
};

pub const LB_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xcc];
pub const IPIP_SRC_V4: [u8; 4] = [10, 0, 0, 1];
pub const IPIP_SRC_V6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Why the fixtures cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root to load BPF programs".into());
    }
    None
}

/// Skips the calling test (returns early) with a printed reason when BPF is unavailable.
#[macro_export]
macro_rules! require_bpf {
    () => {
        if let Some(why) = $crate::fixture::unavailable() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A loaded datapath with private pinned maps, removed on drop.
pub struct Fixture {
    pub dp: Datapath,
    dir: PathBuf,
}

/// A backend as a fixture describes it.
#[derive(Clone, Copy, Debug)]
pub struct TestBackend {
    pub id: u32,
    pub addr: [u8; 16],
    pub mac: [u8; 6],
    pub family: u8,
}

impl TestBackend {
    pub fn v4(id: u32, addr: [u8; 4]) -> Self {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&addr);
        Self {
            id,
            addr: a,
            mac: [0x02, 0xbb, 0, 0, 0, id as u8],
            family: AF_INET,
        }
    }

    pub fn v6(id: u32, addr: [u8; 16]) -> Self {
        Self {
            id,
            addr,
            mac: [0x02, 0xbb, 0, 0, 0, id as u8],
            family: AF_INET6,
        }
    }
}

pub fn vip_key_v4(addr: [u8; 4], port: u16, proto: u8) -> VipKey {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&addr);
    VipKey {
        addr: a,
        port: port.to_be(),
        proto,
        family: AF_INET,
        _pad: [0; 4],
    }
}

pub fn vip_key_v6(addr: [u8; 16], port: u16, proto: u8) -> VipKey {
    VipKey {
        addr,
        port: port.to_be(),
        proto,
        family: AF_INET6,
        _pad: [0; 4],
    }
}

impl Fixture {
    pub fn new() -> Self {
        let root = PathBuf::from("/sys/fs/bpf");
        ensure_bpffs(&root).expect("mount bpffs");
        let dir = root.join(format!(
            "lbtest-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let dp = match Datapath::load(&dir) {
            Ok(dp) => dp,
            Err(e) => {
                remove_pins(&dir);
                panic!("load the XDP object: {e:?}");
            }
        };
        let mut f = Self { dp, dir };
        f.dp.set_config(&LbConfig {
            ipip_src_v4: IPIP_SRC_V4,
            ipip_src_v6: IPIP_SRC_V6,
            flags: 0,
        })
        .unwrap();
        f
    }

    /// Writes backend `b` as a backend of VIP `vip_id`.
    pub fn set_backend(&mut self, b: &TestBackend, vip_id: u32, alive: bool) {
        self.dp
            .set_backend(
                b.id,
                &BackendInfo {
                    addr: b.addr,
                    mac: b.mac,
                    src_mac: LB_MAC,
                    ifindex: 0,
                    family: b.family,
                    flags: if alive { BACKEND_F_ALIVE } else { 0 },
                    vip_id: vip_id as u16,
                },
            )
            .unwrap();
    }

    /// Adds (or replaces) a VIP balanced over `backends` with weights 1, table size `m`.
    pub fn add_vip(
        &mut self,
        key: VipKey,
        vip_id: u32,
        mode: ForwardMode,
        backends: &[TestBackend],
        m: u32,
    ) {
        for b in backends {
            self.set_backend(b, vip_id, true);
        }
        self.set_table(key, vip_id, mode, backends, m);
        self.dp
            .set_vip_addr(
                &key.addr,
                &VipAddrInfo {
                    flags: 0,
                    refcount: 1,
                },
            )
            .unwrap();
    }

    /// Rebuilds the VIP's Maglev table from `backends` (double-buffered swap).
    pub fn set_table(
        &mut self,
        key: VipKey,
        vip_id: u32,
        mode: ForwardMode,
        backends: &[TestBackend],
        m: u32,
    ) {
        let mb: Vec<MaglevBackend> = backends
            .iter()
            .map(|b| MaglevBackend {
                identity: b.addr,
                weight: 1,
                id: b.id,
            })
            .collect();
        let table = build_table(&mb, m).unwrap();
        self.dp
            .set_vip(
                &key,
                VipMeta {
                    vip_id,
                    mode: mode as u8,
                    ..Default::default()
                },
                &table,
            )
            .unwrap();
    }

    pub fn run(&mut self, prog: &str, packet: &[u8]) -> XdpRun {
        let p = self.dp.xdp(prog).unwrap();
        run_xdp(p, packet, 1).unwrap()
    }

    pub fn lb(&mut self, packet: &[u8]) -> XdpRun {
        self.run(common::prog_names::LB, packet)
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

/// Unpinning removes the maps once the last fd closes.
fn remove_pins(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for Fixture {
    fn drop(&mut self) {
        remove_pins(&self.dir);
    }
}

/// RFC 1071 checksum, written independently of the datapath's.
pub fn inet_csum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let w = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
