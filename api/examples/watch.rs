//! Watch a cc-proxy daemon with the client crate: print its health and VMs, then follow its events.
//!
//! ```sh
//! cargo run -p cc-proxy-api --example watch -- [--socket PATH] [--count N] [--tap]
//! ```
//!
//! The socket defaults to `$CC_PROXY_SOCKET`, else the daemon's default path. With `--count N` it stops after
//! N events; with `--tap` it follows the operator tap (agent commands, process starts and exits) instead of
//! the VM events.

use std::process::ExitCode;

use cc_proxy_api::client::Client;
use cc_proxy_api::types::TapParams;

/// What the command line asked for.
struct Options {
    socket: String,
    count: Option<u64>,
    tap: bool,
}

fn options() -> Result<Options, String> {
    let mut opts = Options {
        socket: std::env::var("CC_PROXY_SOCKET")
            .unwrap_or_else(|_| cc_proxy_api::DEFAULT_SOCKET.to_string()),
        count: None,
        tap: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--socket" => opts.socket = args.next().ok_or("--socket needs a path")?,
            "--count" => {
                let n = args.next().ok_or("--count needs a number")?;
                opts.count = Some(
                    n.parse()
                        .map_err(|_| format!("--count {n:?}: not a number"))?,
                );
            }
            "--tap" => opts.tap = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}

async fn watch(opts: Options) -> Result<(), cc_proxy_api::client::ClientError> {
    let client = Client::new(&opts.socket);
    let health = client.health().await?;
    println!(
        "cc-proxy up {}s: {} VMs ({} lost, {} recovering)",
        health.uptime_secs, health.vms, health.vms_lost, health.vms_recovering
    );
    for vm in client.vm_list().await? {
        println!("vm {} {} {}", vm.id, vm.state, vm.dialect);
    }
    let mut seen = 0;
    if opts.tap {
        let mut tap = client.tap(&TapParams::default()).await?;
        println!("following the tap");
        while let Some(event) = tap.next().await {
            println!("tap {}", event?);
            seen += 1;
            if opts.count.is_some_and(|n| seen >= n) {
                return tap.unsubscribe().await;
            }
        }
    } else {
        let mut events = client.subscribe_events(None).await?;
        println!("following events");
        while let Some(event) = events.next().await {
            println!(
                "event {}",
                serde_json::to_string(&event?).unwrap_or_default()
            );
            seen += 1;
            if opts.count.is_some_and(|n| seen >= n) {
                return events.unsubscribe().await;
            }
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let opts = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("watch: {e}");
            return ExitCode::from(2);
        }
    };
    match watch(opts).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("watch: {e}");
            ExitCode::FAILURE
        }
    }
}
