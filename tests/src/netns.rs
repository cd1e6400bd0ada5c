//! Network namespaces for end-to-end tests: create them with `ip netns add`, run code inside
//! them, and remove them on drop (also when the test panics).
//!
//! A namespace is entered per thread: [`Netns::run`] runs a closure on a fresh thread that has
//! joined the namespace (`setns`), so the test thread itself never moves. Sockets created in
//! the closure stay bound to the namespace and can be used from any thread afterwards.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `xl<pid>x<n><tag>`.
pub fn unique_name(tag: &str) -> String {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_stale);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("xl{}x{n}{tag}", std::process::id())
}

/// Removes namespaces, pin directories and lock files left by test processes that were
/// killed before their `Drop`s ran (names carry the pid; only dead pids are swept).
fn sweep_stale() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix("xl") else {
            return false;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            return false;
        };
        match pid.parse::<i32>() {
            Ok(pid) => pid != std::process::id() as i32 && unsafe { libc::kill(pid, 0) } != 0,
            Err(_) => false,
        }
    };
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for ns in names("/run/netns").into_iter().filter(|n| dead(n)) {
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    }
    for pin in names("/sys/fs/bpf").into_iter().filter(|n| dead(n)) {
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/{pin}"));
    }
    for lock in names("/run") {
        if lock
            .strip_prefix("xdplb-")
            .is_some_and(|n| dead(n.trim_end_matches(".lock")))
        {
            let _ = std::fs::remove_file(format!("/run/{lock}"));
        }
    }
}

/// Why e2e tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("e2e tests need root (network namespaces, XDP)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("e2e tests need `ip` (iproute2)".into());
    }
    None
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = unique_name(tag);
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("sysctl {key}={value}: {e}"));
    }

    fn enter(name: &str) {
        let f = File::open(format!("/run/netns/{name}")).expect("opening netns");
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
    }

    /// Runs `f` on a thread inside the namespace and returns its result.
    pub fn run<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> R {
        std::thread::scope(|s| {
            s.spawn(|| {
                Self::enter(&self.name);
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Spawns a thread inside the namespace.
    pub fn spawn<R: Send + 'static, F: FnOnce() -> R + Send + 'static>(
        &self,
        f: F,
    ) -> std::thread::JoinHandle<R> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            Self::enter(&name);
            f()
        })
    }
}

/// Turns off transmit checksum offload on `iface` (like `ethtool -K IFACE tx off`) in the
/// calling thread's namespace.
///
/// Needed on the client's veth: with offload on, its TCP segments carry only a partial
/// checksum (`CHECKSUM_PARTIAL`) that the receiving stack would complete; a frame that an
/// XDP program bounces with XDP_TX loses that mark, and the backend drops it as corrupt. A
/// real NIC delivers complete checksums, so this is a property of the veth test bed.
pub fn disable_tx_checksum(iface: &str) -> std::io::Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    let err = std::io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err);
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
