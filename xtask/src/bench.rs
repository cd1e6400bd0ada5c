//! `cargo xtask bench`: runs the benchmarks and writes their Markdown tables to
//! bench-results/<what>.md, each preceded by the command that produced it.

use std::{path::Path, process::Command};

use anyhow::{Context, Result};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Which {
    /// XDP program cost against a trivial XDP_TX program (BPF_PROG_TEST_RUN).
    L4,
    All,
}

pub fn run(root: &Path, which: Which, repeat: u32) -> Result<()> {
    let out_dir = root.join("bench-results");
    std::fs::create_dir_all(&out_dir)?;
    if matches!(which, Which::L4 | Which::All) {
        let cmd = format!("cargo run --release -p integration-tests --bin bench_l4 -- {repeat}");
        eprintln!("bench l4: {cmd}");
        let out = Command::new("cargo")
            .current_dir(root)
            .args([
                "run",
                "--release",
                "-q",
                "-p",
                "integration-tests",
                "--bin",
                "bench_l4",
                "--",
            ])
            .arg(repeat.to_string())
            .output()
            .context("running bench_l4")?;
        if !out.status.success() {
            anyhow::bail!("bench_l4 failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        let table = String::from_utf8_lossy(&out.stdout);
        let md = format!(
            "# L4 program cost\n\nCommand: `{cmd}` (via `cargo xtask bench l4`), {} CPUs.\n\n{table}",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
        let path = out_dir.join("l4.md");
        std::fs::write(&path, &md)?;
        println!("{md}");
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
