// Shared by `lb-userspace/build.rs` and `xtask` through `include!` (a build script cannot
// depend on xtask, and this directory owns the file it reads). Needs `anyhow::Context` in scope.

/// The eBPF toolchain, as pinned by `rust-toolchain.toml` (its `channel`) in `ebpf_dir`.
fn ebpf_toolchain_in(ebpf_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = ebpf_dir.join("rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|rest| rest.split('"').nth(1))
        .map(str::to_string)
        .with_context(|| format!("{}: no channel", path.display()))
}
