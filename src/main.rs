//! cc-proxy: one daemon per host between container runtimes/shims and the agents inside the host's VMs.
//!
//! See `docs/architecture.md` for the map; each module's doc comment explains its room.

// Unsafe code is denied; a module that needs a libc call opts in with `#[allow(unsafe_code)]` and a `// SAFETY:` comment.
#![deny(unsafe_code)]

mod accept;
mod admin;
mod cli;
mod config;
mod error;
mod logging;
mod mesh;
mod server;
mod stream;
mod sync;
mod transport;
mod vm;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use cli::Cli;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line naming what is wrong (clap's first paragraph, e.g. the missing argument listed under
            // its heading); `--help` has the rest.
            let msg = e.to_string();
            let first: Vec<&str> = msg
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = first.join(" ");
            let first = first.trim_start_matches("error: ");
            let first = if first.is_empty() {
                "invalid arguments"
            } else {
                first
            };
            eprintln!("cc-proxy: {first} (see --help)");
            return ExitCode::from(2);
        }
    };
    if let Some(command) = cli.command {
        return ExitCode::from(cli::commands::run(cli.socket, cli.json, command));
    }

    let config = match config::Config::from_cli(&cli, |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                eprintln!("cc-proxy: {e}");
            }
            return ExitCode::from(2);
        }
    };
    // The activated socket must be claimed before anything else opens file descriptors.
    let activated = match server::listener::take_activated() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cc-proxy: {e}");
            return ExitCode::from(1);
        }
    };
    let (log, _sink) = logging::init(config.log_level, config.log_format, config.log_target);
    // Before the runtime opens anything: the most descriptors the host allows (logged, with the reserve
    // kept for the admin server and agents, see --fd-reserve).
    accept::raise_nofile_limit();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("cc-proxy");
    if config.threads > 0 {
        builder.worker_threads(config.threads);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cc-proxy: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(server::run(config, activated, log));
    runtime.shutdown_timeout(Duration::from_millis(500));
    ExitCode::from(code as u8)
}
