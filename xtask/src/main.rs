//! Project tasks: `cargo xtask setup | build-ebpf | test | bench`.
//!
//! `setup` installs what the build needs on a Debian machine (LLVM 22 for bpf-linker, the
//! pinned nightly with rust-src, bpf-linker, and the packages the tests use) and says what it
//! did; the other tasks call it first, so a fresh machine needs nothing but rustup.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod demo;

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Debian packages: LLVM 22 to build bpf-linker; iproute2 for the network-namespace tests;
/// redis-server for the shared rate-limit tests; ethtool, curl and nsenter for the demo.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "redis-server",
    "ethtool",
    "curl",
    "util-linux",
];

#[derive(Parser)]
#[command(about = "Build, test and benchmark tasks for the load balancer")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and packages that are missing (idempotent).
    Setup,
    /// Build the XDP object into target/bpfel-unknown-none/{debug,release}/xdp-ebpf.
    BuildEbpf {
        #[arg(long)]
        release: bool,
    },
    /// Run every test of the workspace (needs root for the BPF and netns tests).
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The whole pipeline in network namespaces, with traffic and stats.
    Demo {
        /// Only remove what an earlier demo left.
        #[arg(long)]
        down: bool,
        /// Keep the topology up after the traffic until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Benchmarks; results go to bench-results/<what>.md.
    Bench {
        #[arg(value_enum, default_value = "all")]
        what: bench::Which,
        /// BPF_PROG_TEST_RUN repetitions per case.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup(),
        Task::BuildEbpf { release } => {
            setup()?;
            build_ebpf(&root, release)
        }
        Task::Test { args } => {
            setup()?;
            run(Command::new("cargo")
                .current_dir(&root)
                .args(["test", "--workspace"])
                .args(args))
        }
        Task::Demo { down, keep } => {
            if down {
                return demo::down();
            }
            setup()?;
            demo::run(&root, keep)
        }
        Task::Bench { what, repeat } => {
            setup()?;
            bench::run(&root, what, repeat)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", cmd);
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn cargo_bin() -> PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin")
}

/// `cargo build --release` of `packages`. `cargo xtask` runs us with xtask's package variables
/// set (CARGO_PKG_NAME, ...); ring's build script reruns when those change, so passing them on
/// would rebuild ring (and all that depends on it) on every switch between `cargo build` and
/// an xtask command.
pub fn cargo_release(root: &Path, packages: &[&str]) -> Result<()> {
    let mut build = Command::new("cargo");
    build.current_dir(root).args(["build", "--release", "-q"]);
    for p in packages {
        build.args(["-p", p]);
    }
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|p| name.starts_with(p))
        {
            build.env_remove(name);
        }
    }
    run(&mut build)
}

/// Installs the Debian packages that are not installed yet, saying which.
pub fn apt_install_missing(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !succeeds(Command::new("dpkg").args(["-s", p])))
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing Debian packages: {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get install (run as root)")?;
    }
    Ok(())
}

include!("../../xdp-ebpf/toolchain.rs");

/// The eBPF toolchain, as pinned by `xdp-ebpf/rust-toolchain.toml` (its `channel`).
fn ebpf_toolchain() -> Result<String> {
    ebpf_toolchain_in(&workspace_root().join("xdp-ebpf"))
}

/// Installs what is missing, printing each step.
fn setup() -> Result<()> {
    let toolchain = ebpf_toolchain()?;
    apt_install_missing(APT_PACKAGES)?;
    let has_nightly = Command::new("rustup")
        .args(["run", &toolchain, "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            Path::new(String::from_utf8_lossy(&o.stdout).trim())
                .join("lib/rustlib/src/rust/library/core")
                .exists()
        })
        .unwrap_or(false);
    if !has_nightly {
        eprintln!("setup: installing {toolchain} with rust-src (eBPF toolchain)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            &toolchain,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let linker = cargo_bin().join("bpf-linker");
    let linker_ok = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false);
    if !linker_ok {
        eprintln!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)"
        );
        // bpf-linker's build finds LLVM through LLVM_PREFIX, else the first llvm-config on
        // PATH (which may be an older LLVM): point both at LLVM 22.
        let path = format!(
            "{LLVM_PREFIX}/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
            .args(["--locked", "--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env("PATH", path))?;
    }
    Ok(())
}

fn build_ebpf(root: &Path, release: bool) -> Result<()> {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root.join("xdp-ebpf"))
        .args(["run", &ebpf_toolchain()?, "cargo", "build"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(root.join("target"));
    if release {
        cmd.arg("--release");
    }
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key.starts_with("RUST") && key != "RUSTUP_HOME"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    let path = format!(
        "{}:{}",
        cargo_bin().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.env("PATH", path);
    run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    eprintln!(
        "built {}",
        root.join("target/bpfel-unknown-none")
            .join(profile)
            .join("xdp-ebpf")
            .display()
    );
    Ok(())
}
