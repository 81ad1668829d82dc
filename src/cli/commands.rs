//! Client subcommands: talk to a running daemon over its socket with the `cc-proxy-api` client.

use std::io::Write;
use std::path::PathBuf;

use bytes::Bytes;
use cc_proxy_api::client::{control_frame, AttachedStream, Client, ClientError};
use cc_proxy_api::stream::{Channel, ControlMessage, Frame};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;

use super::{Command, VmCommand};

/// Exit status when the stream ends with an error rather than an exit status.
const STREAM_FAILED: u8 = 255;

/// Run a client subcommand; returns the process exit status.
pub fn run(socket: PathBuf, json: bool, command: Command) -> u8 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cc-proxy: {e}");
            return 1;
        }
    };
    let client = Client::new(&socket);
    let result = rt.block_on(async {
        match command {
            Command::Version => {
                let v = client.version().await?;
                if json {
                    print_json(&v);
                } else {
                    println!(
                        "cc-proxy {} (API {}), features: {}",
                        v.version,
                        v.api_version,
                        v.features.join(", ")
                    );
                }
                Ok::<u8, ClientError>(0)
            }
            Command::Vm {
                command: VmCommand::List,
            } => {
                let vms = client.vm_list().await?;
                if json {
                    print_json(&vms);
                } else {
                    println!(
                        "{:<24} {:<6} {:<11} {:>5} {:>9} {:>8} {:>7} {:>8}",
                        "ID", "STATE", "DIALECT", "API", "UPTIME", "COMMANDS", "ERRORS", "STREAMS"
                    );
                    for vm in vms {
                        println!(
                            "{:<24} {:<6} {:<11} {:>5} {:>8}s {:>8} {:>7} {:>8}",
                            vm.id,
                            vm.state,
                            vm.dialect,
                            vm.api_version,
                            vm.uptime_secs,
                            vm.commands,
                            vm.errors,
                            vm.streams
                        );
                    }
                }
                Ok(0)
            }
            Command::Call { method, params } => {
                let params: serde_json::Value = match params.as_deref() {
                    None => serde_json::json!({}),
                    Some(text) => serde_json::from_str(text)
                        .map_err(|e| ClientError::Decode(format!("params are not JSON: {e}")))?,
                };
                let result: serde_json::Value = client.call(&method, params).await?;
                print_json(&result);
                Ok(0)
            }
            Command::Vm {
                command:
                    VmCommand::Register {
                        id,
                        control,
                        io,
                        console,
                        timeout_ms,
                    },
            } => {
                let r = client
                    .register(&cc_proxy_api::types::RegisterParams {
                        id,
                        control,
                        io,
                        console,
                        timeout_ms,
                    })
                    .await?;
                if json {
                    print_json(&r);
                } else {
                    println!(
                        "registered {} ({} dialect, API {})",
                        r.id, r.dialect, r.api_version
                    );
                }
                Ok(0)
            }
            Command::Vm {
                command: VmCommand::Unregister { id },
            } => {
                client.unregister(&id).await?;
                if !json {
                    println!("unregistered {id}");
                }
                Ok(0)
            }
            Command::Vm {
                command: VmCommand::Info { id },
            } => {
                let vm = client.vm_info(&id).await?;
                if json {
                    print_json(&vm);
                } else {
                    println!("id:          {}", vm.id);
                    println!(
                        "state:       {}{}",
                        vm.state,
                        vm.lost_reason
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    );
                    println!("dialect:     {} (API {})", vm.dialect, vm.api_version);
                    println!("control:     {}", vm.control);
                    println!("io:          {}", vm.io);
                    println!(
                        "uptime:      {}s{}",
                        vm.uptime_secs,
                        if vm.recovered {
                            " (recovered after restart)"
                        } else {
                            ""
                        }
                    );
                    println!("commands:    {} ({} errors)", vm.commands, vm.errors);
                    println!("streams:     {} running, {} tokens", vm.streams, vm.tokens);
                }
                Ok(0)
            }
            Command::Exec { vm, tty, args } => {
                let started = client.exec(&vm, &args, tty).await?;
                let token = started
                    .token
                    .ok_or_else(|| ClientError::Decode("no token in the exec result".into()))?;
                let mut stream = client.attach(&token).await?;
                Ok(relay(&mut stream, false).await)
            }
            Command::Tap {
                vm,
                limit,
                filter,
                rate,
            } => Ok(super::tap::run(
                &socket,
                super::tap::TapOptions {
                    vm,
                    limit,
                    filter,
                    rate,
                },
                json,
            )
            .await),
            Command::Attach { token } => {
                let mut stream = client.attach(&token).await?;
                Ok(relay(&mut stream, false).await)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cc-proxy: {e}");
            1
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    if let Ok(s) = serde_json::to_string_pretty(v) {
        println!("{s}");
    }
}

/// Relay this process's stdin to the stream and the stream's output to stdout/stderr until the process exits.
/// With `tty`, the local terminal is in raw mode meanwhile and its size follows the window (SIGWINCH).
async fn relay(stream: &mut AttachedStream, tty: bool) -> u8 {
    let raw = if tty {
        super::terminal::RawMode::enable()
    } else {
        None
    };
    let (mut sink, mut source) = stream.split();
    let mut winch = match (
        &raw,
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()),
    ) {
        (Some(_), Ok(s)) => Some(s),
        _ => None,
    };
    if raw.is_some() {
        if let Some((rows, cols)) = super::terminal::size() {
            let _ = sink
                .send(control_frame(&ControlMessage::Resize { rows, cols }))
                .await;
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Bytes::new()).await;
                    return;
                }
                Ok(n) => {
                    if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut stdin_open = true;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        tokio::select! {
            _ = async { winch.as_mut()?.recv().await }, if winch.is_some() => {
                if let Some((rows, cols)) = super::terminal::size() {
                    let _ = sink.send(control_frame(&ControlMessage::Resize { rows, cols })).await;
                }
            }
            data = rx.recv(), if stdin_open => match data {
                Some(data) => {
                    stdin_open = !data.is_empty();
                    if sink.send(Frame::new(Channel::Stdin, data)).await.is_err() {
                        stdin_open = false;
                    }
                }
                None => stdin_open = false,
            },
            frame = source.next() => match frame {
                Some(Ok(f)) => match f.channel {
                    Channel::Stdout => { let _ = stdout.write_all(&f.payload); let _ = stdout.flush(); }
                    Channel::Stderr => { let _ = stderr.write_all(&f.payload); let _ = stderr.flush(); }
                    Channel::Exit => return f.exit_status().map(|s| (s & 0xff) as u8).unwrap_or(STREAM_FAILED),
                    Channel::Error => {
                        eprintln!("cc-proxy: stream failed: {}", String::from_utf8_lossy(&f.payload));
                        return STREAM_FAILED;
                    }
                    _ => {}
                },
                Some(Err(e)) => {
                    eprintln!("cc-proxy: stream error: {e}");
                    return STREAM_FAILED;
                }
                None => {
                    eprintln!("cc-proxy: the daemon closed the stream without an exit status");
                    return STREAM_FAILED;
                }
            },
        }
    }
}
