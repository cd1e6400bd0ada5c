//! `lbctl`: the load balancer agent's command line (see `lb_userspace::cli`).

use std::process::ExitCode;

use clap::Parser;
use lb_userspace::cli::{execute, Args};

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`lbctl stats | head`) like other CLI tools.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args = Args::parse();
    match execute(args, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
