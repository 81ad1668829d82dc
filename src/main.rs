//! cc-proxy: one daemon per host between container runtimes/shims and the agents inside the host's VMs.
//!
//! See `docs/architecture.md` for the map; each module's doc comment explains its room.

// Unsafe code is denied; a module that needs a libc call opts in with `#[allow(unsafe_code)]` and a `// SAFETY:` comment.
#![deny(unsafe_code)]

mod admin;
mod cli;
mod error;
mod logging;
mod server;
mod stream;
mod transport;
mod vm;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use cli::{Cli, LogLevel};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line naming what is wrong; `--help` has the rest.
            let msg = e.to_string();
            let first = msg
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("cc-proxy: {first} (see --help)");
            return ExitCode::from(2);
        }
    };
    if let Some(command) = cli.command {
        return ExitCode::from(cli::commands::run(cli.socket, cli.json, command));
    }

    let level = match cli.log {
        Some(level) => level,
        None => match std::env::var("CC_PROXY_LOG_LEVEL") {
            Ok(v) if !v.trim().is_empty() => match LogLevel::parse_env(&v) {
                Some(level) => level,
                None => {
                    eprintln!("cc-proxy: invalid CC_PROXY_LOG_LEVEL {v:?} (error, warn, info, debug or trace)");
                    return ExitCode::from(2);
                }
            },
            _ => LogLevel::Warn,
        },
    };
    // The activated socket must be claimed before anything else opens file descriptors.
    let activated = match server::listener::take_activated() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cc-proxy: {e}");
            return ExitCode::from(1);
        }
    };
    let (log, _sink) = logging::init(level, cli.log_format, cli.log_target);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("cc-proxy");
    if cli.threads > 0 {
        builder.worker_threads(cli.threads);
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cc-proxy: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let config = server::DaemonConfig {
        socket: cli.socket,
        socket_group: cli.socket_group,
        state_dir: cli.state_dir,
        admin_addr: cli.admin_addr,
        vm: vm::VmConfig {
            stream_buffer: cli.stream_buffer,
            keepalive: (cli.agent_keepalive > 0).then(|| Duration::from_secs(cli.agent_keepalive)),
            stall_timeout: Duration::from_secs(cli.stall_timeout.max(1)),
            vm_buffer: cli.vm_buffer,
            recovery_timeout: Duration::from_secs(cli.recovery_timeout.max(1)),
        },
    };
    let code = runtime.block_on(server::run(config, activated, log));
    runtime.shutdown_timeout(Duration::from_millis(500));
    ExitCode::from(code as u8)
}
