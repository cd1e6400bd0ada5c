//! Compiles the XDP program (`../xdp-ebpf`) for `bpfel-unknown-none` with the pinned nightly
//! toolchain and bpf-linker, so that `include_bytes!` can embed the object in the agent.
//! `cargo xtask setup` installs the toolchain pieces this needs.

use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context};

include!("../xdp-ebpf/toolchain.rs");

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().context("workspace root")?;
    let ebpf_dir = root.join("xdp-ebpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let target_dir = out_dir.join("ebpf-target");
    let toolchain = ebpf_toolchain_in(&ebpf_dir)?;

    for p in [
        "xdp-ebpf/src",
        "xdp-ebpf/Cargo.toml",
        "xdp-ebpf/rust-toolchain.toml",
        "xdp-ebpf/toolchain.rs",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }

    let cargo_home = env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env::var("HOME").unwrap_or_default()).join(".cargo"));
    let path = format!(
        "{}:{}",
        cargo_home.join("bin").display(),
        env::var("PATH").unwrap_or_default()
    );

    let mut cmd = Command::new("rustup");
    cmd.current_dir(&ebpf_dir)
        .args(["run", &toolchain, "cargo", "build", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", path);
    // The outer cargo's settings must not leak into the nested build.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key.starts_with("RUST") && key != "RUSTUP_HOME"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    let status = cmd
        .status()
        .context("running rustup to build the eBPF program (run `cargo xtask setup`)")?;
    if !status.success() {
        bail!(
            "building xdp-ebpf failed ({status}); `cargo xtask setup` installs {toolchain} with rust-src and bpf-linker"
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/xdp-ebpf");
    let dest = out_dir.join("xdp-ebpf.o");
    std::fs::copy(&obj, &dest).with_context(|| format!("copying {}", obj.display()))?;
    Ok(())
}
