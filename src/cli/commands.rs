//! Client subcommands: talk to a running daemon over its socket with the `cc-proxy-api` client.

use std::io::Write;
use std::path::PathBuf;

use bytes::Bytes;
use cc_proxy_api::client::{control_frame, AttachedStream, Client, ClientError};
use cc_proxy_api::stream::{Channel, ControlMessage, Frame};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;

use super::{Command, MeshCommand, VmCommand};

/// Exit status when the stream ends with an error rather than an exit status.
const STREAM_FAILED: u8 = 255;
/// Exit status of `exec` when the agent refused to start the command (as `docker exec`: cannot invoke).
pub const CANNOT_RUN: u8 = 126;
/// Exit status of `exec` when the command does not exist in the guest (as `docker exec` and shells).
pub const NOT_FOUND: u8 = 127;
/// Exit status for a command line the user got wrong (as clap's own errors).
const USAGE: u8 = 2;

/// The exit status of an `exec` whose start the agent refused with `agent_error`. Agents say only in words
/// why a start failed; "not found" is told apart the way shells and `docker exec` do, from the OS error text
/// the agents pass on (hyperstart and cc-test-agent: "No such file or directory"; Go agents: "executable file
/// not found").
pub fn start_failure_status(agent_error: &str) -> u8 {
    let text = agent_error.to_ascii_lowercase();
    if text.contains("no such file or directory") || text.contains("not found") {
        NOT_FOUND
    } else {
        CANNOT_RUN
    }
}

/// Parse `-e` values: `NAME=VALUE`, or `NAME` alone for this process's own value (skipped when unset).
fn parse_env(values: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        let (name, value) = match v.split_once('=') {
            Some((n, val)) => (n, Some(val.to_string())),
            None => (v.as_str(), std::env::var(v).ok()),
        };
        if name.is_empty() {
            return Err(format!("-e {v:?}: the variable has no name (NAME=VALUE)"));
        }
        if let Some(value) = value {
            out.push((name.to_string(), value));
        }
    }
    Ok(out)
}

/// `vm register --mesh`: JSON, or `@FILE` holding it.
fn parse_mesh(value: &str) -> Result<cc_proxy_api::mesh::MeshConfig, String> {
    let text = match value.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?,
        None => value.to_string(),
    };
    serde_json::from_str(&text).map_err(|e| format!("not a mesh object ({e})"))
}

/// Run a client subcommand; returns the process exit status.
pub fn run(socket: PathBuf, json: bool, command: Command) -> u8 {
    // Errors in what the user typed are reported before anything is sent, and blamed on the user.
    let command = match command {
        Command::Help { command } => return print_help(&command),
        Command::Call {
            params: Some(text), ..
        } if serde_json::from_str::<serde_json::Value>(&text).is_err() => {
            let e = serde_json::from_str::<serde_json::Value>(&text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            eprintln!("cc-proxy: the PARAMS argument is not JSON ({e}): {text}");
            return USAGE;
        }
        Command::Exec { ref env, .. } if parse_env(env).is_err() => {
            if let Err(e) = parse_env(env) {
                eprintln!("cc-proxy: {e}");
            }
            return USAGE;
        }
        c => c,
    };
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
            Command::LogLevel { level } => {
                let now = client.set_log_level(&level).await?;
                if json {
                    print_json(&serde_json::json!({ "level": now }));
                } else {
                    println!("log level: {now}");
                }
                Ok(0)
            }
            Command::Vm {
                command: VmCommand::List,
            } => {
                let vms = client.vm_list().await?;
                if json {
                    print_json(&vms);
                } else {
                    println!(
                        "{:<24} {:<10} {:<11} {:>5} {:>9} {:>8} {:>7} {:>8} {:>6}",
                        "ID",
                        "STATE",
                        "DIALECT",
                        "API",
                        "UPTIME",
                        "COMMANDS",
                        "ERRORS",
                        "STREAMS",
                        "OWNER"
                    );
                    for vm in vms {
                        println!(
                            "{:<24} {:<10} {:<11} {:>5} {:>8}s {:>8} {:>7} {:>8} {:>6}",
                            vm.id,
                            vm.state,
                            vm.dialect,
                            vm.api_version,
                            vm.uptime_secs,
                            vm.commands,
                            vm.errors,
                            vm.streams,
                            vm.owner
                        );
                    }
                }
                Ok(0)
            }
            Command::Help { .. } => Ok(0),
            Command::Call { method, params } => {
                // Checked above: present params are JSON.
                let params: serde_json::Value = params
                    .as_deref()
                    .and_then(|text| serde_json::from_str(text).ok())
                    .unwrap_or_else(|| serde_json::json!({}));
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
                        mesh,
                    },
            } => {
                let mesh = match mesh.as_deref().map(parse_mesh).transpose() {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("cc-proxy: --mesh: {e}");
                        return Ok(USAGE);
                    }
                };
                let r = client
                    .register(&cc_proxy_api::types::RegisterParams {
                        id,
                        control,
                        io,
                        console,
                        timeout_ms,
                        mesh,
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
                    if let Some(mesh) = &vm.mesh {
                        println!(
                            "mesh:        {} ({} inbound, {} outbound listeners)",
                            mesh.config.identity,
                            mesh.config.inbound.len(),
                            mesh.config.outbound.len()
                        );
                        match &mesh.certificate {
                            Some(c) => println!(
                                "certificate: serial {} until {} (from {})",
                                c.serial, c.not_after, c.source
                            ),
                            None if mesh.identity_state
                                == cc_proxy_api::mesh::IdentityState::Expired =>
                            {
                                println!("certificate: expired, not renewed yet (the listeners do not serve TLS)")
                            }
                            None => println!("certificate: none yet (the listeners do not serve)"),
                        }
                    }
                }
                Ok(0)
            }
            Command::Mesh {
                command: MeshCommand::TrustAnchors,
            } => {
                let anchors = client.mesh_trust_anchors().await?;
                if json {
                    print_json(&anchors);
                } else {
                    print!("{}", anchors.pem);
                }
                Ok(0)
            }
            Command::Mesh {
                command: MeshCommand::Identity { vm },
            } => {
                let id = client.mesh_identity(&vm).await?;
                if json {
                    print_json(&id);
                } else {
                    println!("vm:          {}", id.vm);
                    println!("identity:    {}", id.identity);
                    println!("state:       {}", id.state.as_str());
                    match (&id.certificate, &id.chain_pem) {
                        (Some(c), Some(pem)) => {
                            println!("source:      {}", source_name(&c.source));
                            println!("serial:      {}", c.serial);
                            println!("not before:  {}", c.not_before);
                            println!("not after:   {}", c.not_after);
                            print!("{pem}");
                        }
                        _ => println!("certificate: none yet (the listeners do not serve)"),
                    }
                }
                Ok(0)
            }
            Command::Mesh {
                command: MeshCommand::Endpoints { vm },
            } => {
                let eps = client.mesh_endpoints(&vm).await?;
                if json {
                    print_json(&eps);
                } else {
                    print!("{}", endpoints_table(&eps));
                }
                Ok(0)
            }
            Command::Exec {
                vm,
                tty,
                env,
                workdir,
                user,
                args,
            } => {
                let spec = cc_proxy_api::client::ExecSpec {
                    args,
                    terminal: tty,
                    env: parse_env(&env).unwrap_or_default(),
                    workdir,
                    user,
                };
                let started = match client.exec_spec(&vm, &spec).await {
                    Ok(s) => s,
                    Err(ClientError::Rpc {
                        code,
                        message,
                        data,
                    }) if code == cc_proxy_api::error::AGENT_ERROR => {
                        let agent_error = data
                            .as_ref()
                            .and_then(|d| d.get("agent_error"))
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or(&message);
                        let why = if agent_error.is_empty() {
                            "the agent refused to start it (it gave no reason)"
                        } else {
                            agent_error
                        };
                        eprintln!("cc-proxy: cannot run {:?} in {vm}: {why}", spec.args[0]);
                        return Ok(start_failure_status(agent_error));
                    }
                    Err(e) => return Err(e),
                };
                let token = started
                    .token
                    .ok_or_else(|| ClientError::Decode("no token in the exec result".into()))?;
                let mut stream = client.attach(&token).await?;
                // The process has started: the initial window size goes out first thing.
                Ok(relay(&mut stream, tty).await)
            }
            Command::Tap {
                vm,
                mesh,
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
                    mesh,
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
    // The relay's stdin reader may be blocked in a read of a terminal that never ends: do not wait for it.
    rt.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cc-proxy: {e}");
            1
        }
    }
}

/// `cc-proxy help [COMMAND...]`: the help of cc-proxy or of the named subcommand.
fn print_help(path: &[String]) -> u8 {
    use clap::CommandFactory;
    let mut cmd = super::Cli::command();
    cmd.build();
    let mut current = &mut cmd;
    for name in path {
        match current.find_subcommand_mut(name) {
            Some(sub) => current = sub,
            None => {
                eprintln!("cc-proxy: no subcommand {name:?} (see cc-proxy --help)");
                return USAGE;
            }
        }
    }
    match current.print_help() {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// A certificate's `source` (`vm.info`, `mesh.identity`) in words.
fn source_name(source: &str) -> String {
    match source {
        "ca" => "ca (the embedded CA)".to_string(),
        "files" => "files (--mesh-identity-dir)".to_string(),
        "identity-service" => {
            "identity-service (Linkerd's identity service, --identity-svc)".to_string()
        }
        other => other.to_string(),
    }
}

/// `cc-proxy mesh endpoints VM` as a table: one row per endpoint (one per destination without endpoints).
fn endpoints_table(eps: &cc_proxy_api::mesh::MeshEndpoints) -> String {
    use std::fmt::Write;
    let mut rows = vec![[
        "LISTENER".to_string(),
        "DESTINATION".to_string(),
        "ENDPOINT".to_string(),
        "IDENTITY".to_string(),
        "HINT".to_string(),
        "STATE".to_string(),
        "LOAD".to_string(),
    ]];
    for d in &eps.destinations {
        let state = serde_json::to_value(d.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let dest = match &d.name {
            Some(n) => format!("{n} ({state})"),
            None => state,
        };
        if d.endpoints.is_empty() {
            rows.push([
                d.listener.clone(),
                dest.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for e in &d.endpoints {
            let state = serde_json::to_value(e.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let load = match e.load.ewma_ms {
                Some(ms) => format!("{} open, {ms:.1} ms", e.load.open),
                None => format!("{} open", e.load.open),
            };
            rows.push([
                d.listener.clone(),
                dest.clone(),
                e.addr.clone(),
                e.identity.clone().unwrap_or_else(|| "-".into()),
                e.hint.to_string(),
                state,
                load,
            ]);
        }
    }
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn print_json<T: serde::Serialize>(v: &T) {
    if let Ok(s) = serde_json::to_string_pretty(v) {
        println!("{s}");
    }
}

/// Relay this process's stdin to the stream and the stream's output to stdout/stderr until the process exits.
/// With `tty`, the local terminal is in raw mode meanwhile (restored on every way out: the [`RawMode`] guard
/// drops on return and on unwinding, and SIGTERM/SIGHUP/SIGQUIT end the relay instead of the process), the
/// window size is sent at once and again on every SIGWINCH.
///
/// [`RawMode`]: super::terminal::RawMode
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
    let mut ended = match &raw {
        Some(_) => TerminatingSignals::new(),
        None => None,
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
            signal = async { ended.as_mut()?.recv().await }, if ended.is_some() => {
                // Leave through the RawMode guard so the terminal is restored, then die of the signal's code.
                eprintln!("\r\ncc-proxy: interrupted; the process keeps running");
                return signal.map(|n| 128 + n as u8).unwrap_or(STREAM_FAILED);
            }
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

/// SIGTERM, SIGHUP and SIGQUIT while the terminal is raw: caught so that the relay returns and the terminal is
/// restored (SIGINT cannot come from the keyboard in raw mode; Ctrl-C goes to the remote process).
struct TerminatingSignals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl TerminatingSignals {
    fn new() -> Option<TerminatingSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Some(TerminatingSignals {
            term: signal(SignalKind::terminate()).ok()?,
            hup: signal(SignalKind::hangup()).ok()?,
            quit: signal(SignalKind::quit()).ok()?,
        })
    }

    /// The number of the next signal received.
    async fn recv(&mut self) -> Option<i32> {
        tokio::select! {
            s = self.term.recv() => s.map(|()| libc::SIGTERM),
            s = self.hup.recv() => s.map(|()| libc::SIGHUP),
            s = self.quit.recv() => s.map(|()| libc::SIGQUIT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_failures_map_to_docker_statuses() {
        assert_eq!(
            start_failure_status("cannot start '/x': No such file or directory (os error 2)"),
            NOT_FOUND
        );
        assert_eq!(
            start_failure_status("exec: \"x\": executable file not found in $PATH"),
            NOT_FOUND
        );
        assert_eq!(
            start_failure_status("cannot start '/etc/passwd': Permission denied (os error 13)"),
            CANNOT_RUN
        );
        assert_eq!(start_failure_status(""), CANNOT_RUN);
    }

    #[test]
    fn env_values_need_a_name() {
        assert_eq!(
            parse_env(&["A=1".into(), "B=x=y".into()]),
            Ok(vec![("A".into(), "1".into()), ("B".into(), "x=y".into())])
        );
        assert!(parse_env(&["=1".into()]).is_err());
    }

    #[test]
    fn the_endpoints_table_has_a_row_per_endpoint() {
        use cc_proxy_api::mesh::{
            DestinationState, DestinationStatus, EndpointHint, EndpointLoad, EndpointState,
            EndpointStatus, MeshEndpoints,
        };
        let ep = |addr: &str, state, open, ewma_ms| EndpointStatus {
            addr: addr.into(),
            identity: Some("web.ns.serviceaccount.identity.linkerd.cluster.local".into()),
            server_name: None,
            hint: EndpointHint::Opaque {
                transport_port: Some(4143),
            },
            state,
            load: EndpointLoad { open, ewma_ms },
            labels: Default::default(),
        };
        let eps = MeshEndpoints {
            vm: "a".into(),
            destinations: vec![
                DestinationStatus {
                    listener: "127.0.0.1:4140".into(),
                    name: Some("web.ns.svc.cluster.local:80".into()),
                    state: DestinationState::Resolved,
                    endpoints: vec![
                        ep("10.0.0.1:80", EndpointState::Ready, 2, Some(12.25)),
                        ep("10.0.0.2:80", EndpointState::Ejected, 0, None),
                    ],
                },
                DestinationStatus {
                    listener: "127.0.0.1:4141".into(),
                    name: Some("db.ns.svc.cluster.local:5432".into()),
                    state: DestinationState::NoEndpoints,
                    endpoints: vec![],
                },
            ],
        };
        let table = endpoints_table(&eps);
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|l| {
                l.split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect()
            })
            .collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert_eq!(
            lines[0],
            [
                "LISTENER",
                "DESTINATION",
                "ENDPOINT",
                "IDENTITY",
                "HINT",
                "STATE",
                "LOAD"
            ]
        );
        assert_eq!(
            lines[1],
            [
                "127.0.0.1:4140",
                "web.ns.svc.cluster.local:80 (resolved)",
                "10.0.0.1:80",
                "web.ns.serviceaccount.identity.linkerd.cluster.local",
                "opaque:4143",
                "ready",
                "2 open, 12.2 ms"
            ]
        );
        assert_eq!(lines[2][5], "ejected");
        assert_eq!(lines[2][6], "0 open");
        assert_eq!(
            lines[3],
            [
                "127.0.0.1:4141",
                "db.ns.svc.cluster.local:5432 (no_endpoints)",
                "-",
                "-",
                "-",
                "-",
                "-"
            ]
        );
    }
}
