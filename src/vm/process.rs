//! Process operations: the one API every front end (JSON-RPC, the legacy v2 protocol, shim attach) uses to
//! start, signal and resize a VM's processes. The front ends only translate their requests into these calls.
//!
//! - [`forward`] sends any agent command; for a start command (`newcontainer`, `execcmd`) with a stream it
//!   first wires the stream into the command's `process` object ([`wire_stream`]): `process.stdio` and
//!   `process.stderr` get the token's sequence numbers (stderr 0 for a terminal) and, in the hyperstart
//!   dialect, a unique `process.id` when the client gave none. Every other field is forwarded as sent.
//! - [`signal`] and [`resize`] build their payloads from the protocol crate's types, in the VM's dialect.
//!   They reach only the process the token names; before it started they are held by its stream (at most
//!   [`MAX_HELD_CONTROLS`]) and delivered, in order, by the start ([`deliver_held`]).
//!
//! A start that does not succeed leaves nothing behind, even when its request is dropped half-way
//! ([`StartGuard`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cc_proxy_protocol::{
    code, process_object_mut, Dialect, KillContainer, SignalProcess, WinSizeCcAgent,
    WinSizeHyperstart,
};
use serde::Serialize;
use serde_json::Value;

use super::Vm;
use crate::error::{Limit, ProxyError};
use crate::stream::{
    ControlTarget, HeldControl, Lifecycle, ProcessName, ProcessRole, Stream, MAX_HELD_CONTROLS,
};

/// Default reply deadline of an agent command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest command payload: real agents refuse control messages above 64 KiB on vsock.
pub const MAX_COMMAND_PAYLOAD: usize = 65536 - cc_proxy_protocol::CONTROL_HEADER_LEN;

/// Longest deadline a client may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Highest signal number a process can be sent.
pub const MAX_SIGNAL: i32 = 64;

/// The pseudo-container in which hyperstart runs processes in its own namespaces.
const PSEUDO_CONTAINER: &str = "hyperstart";

/// Which stream a start command uses.
pub enum StreamUse {
    None,
    /// Allocate one now for client `owner` (freed again if the command fails).
    New {
        owner: u32,
    },
    /// A token allocated earlier.
    Existing(Arc<Stream>),
}

/// What a forwarded command produced.
pub struct Forwarded {
    /// The ACK payload.
    pub reply: Bytes,
    /// The stream the started process writes to.
    pub stream: Option<Arc<Stream>>,
    /// The process id given to the agent.
    pub process: Option<String>,
}

/// The agent command code for a name in the VM's dialect.
pub fn command_code(vm: &Vm, name: &str) -> Result<u32, ProxyError> {
    vm.dialect
        .command_code(name)
        .ok_or_else(|| ProxyError::UnknownCommand {
            command: name.to_string(),
            dialect: vm.dialect.name().to_string(),
        })
}

/// True for the commands that start a process (and may take a stream).
pub fn starts_process(code: u32) -> bool {
    code == code::NEWCONTAINER || code == code::EXECCMD
}

/// Undoes a start command's stream wiring unless the start succeeded: a fresh token is freed, an existing
/// token is unbound from the process name. Runs on every way out, including the request being dropped
/// because its client went away (a future that is dropped runs no code after its `.await`).
struct StartGuard<'a> {
    vm: &'a Vm,
    stream: Option<Arc<Stream>>,
    fresh: bool,
}

impl StartGuard<'_> {
    /// The start succeeded: keep everything.
    fn keep(mut self) -> Option<Arc<Stream>> {
        self.stream.take()
    }
}

impl Drop for StartGuard<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.stream.take() {
            s.set_starting(false);
            if self.fresh {
                self.vm.free_stream(&s.token);
            } else {
                self.vm.unbind_process(&s);
            }
        }
    }
}

/// Send a command, wiring a stream into a start command's `process` first.
pub async fn forward(
    vm: &Arc<Vm>,
    code: u32,
    name: &str,
    data: Value,
    timeout: Duration,
    use_stream: StreamUse,
) -> Result<Forwarded, ProxyError> {
    forward_with_payload(vm, code, name, data, &[], timeout, use_stream).await
}

/// [`forward`], with `raw` bytes appended after the JSON payload in the same message (`writefile` takes
/// the file's content this way).
pub async fn forward_with_payload(
    vm: &Arc<Vm>,
    code: u32,
    name: &str,
    mut data: Value,
    raw: &[u8],
    timeout: Duration,
    use_stream: StreamUse,
) -> Result<Forwarded, ProxyError> {
    let (stream, fresh) = match use_stream {
        StreamUse::None => (None, false),
        StreamUse::New { owner } => (Some(vm.allocate_stream(owner)?), true),
        StreamUse::Existing(s) => {
            if s.lifecycle() != Lifecycle::Allocated {
                return Err(ProxyError::invalid(
                    "token",
                    "the token's process was already started",
                ));
            }
            (Some(s), false)
        }
    };
    let guard = StartGuard { vm, stream, fresh };
    let process = match &guard.stream {
        Some(stream) => Some(wire_stream(vm, code, &mut data, stream)?),
        None => None,
    };
    let mut payload = if data.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(&data).unwrap_or_default()
    };
    payload.extend_from_slice(raw);
    let payload = Bytes::from(payload);
    if payload.len() > MAX_COMMAND_PAYLOAD {
        return Err(ProxyError::invalid(
            "data",
            format!(
                "{} bytes exceed the agents' limit of {MAX_COMMAND_PAYLOAD}",
                payload.len()
            ),
        ));
    }
    if let Some(s) = &guard.stream {
        s.set_starting(true);
    }
    let reply = vm.call(code, name, payload, timeout).await?;
    let stream = guard.keep();
    if let Some(s) = &stream {
        s.mark_running();
        s.set_starting(false);
        // Recorded as started: a daemon killed before its next save must not restore the token as never
        // started (its stdin would wait for a start that happened long ago).
        vm.touch();
        vm.tap_process_started(s);
        tracing::info!(vm = %vm.id, token = %s.token, command = name,
            process = process.as_deref().unwrap_or(""), "process started");
        deliver_held(vm, s).await;
    }
    Ok(Forwarded {
        reply,
        stream,
        process,
    })
}

/// Fill `process.stdio`/`process.stderr` (and a unique `process.id` for hyperstart). Returns the process id.
fn wire_stream(
    vm: &Vm,
    code: u32,
    data: &mut Value,
    stream: &Arc<Stream>,
) -> Result<String, ProxyError> {
    let container_field = if code == code::NEWCONTAINER {
        "id"
    } else {
        "container"
    };
    let container = data
        .get(container_field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            ProxyError::invalid(
                &format!("data.{container_field}"),
                "a container id (string) is required",
            )
        })?;
    let dialect = vm.dialect;
    let process = process_object_mut(data)
        .ok_or_else(|| ProxyError::invalid("data.process", "a process object is required"))?;
    let terminal = process
        .get("terminal")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    process.insert("stdio".into(), Value::from(stream.stdio));
    process.insert(
        "stderr".into(),
        Value::from(if terminal { 0 } else { stream.stderr }),
    );
    let id = match process
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        Some(id) => id.to_string(),
        None => {
            let id = format!("ccp-{}", stream.stdio);
            if dialect == Dialect::Hyperstart {
                process.insert("id".into(), Value::from(id.clone()));
            }
            id
        }
    };
    let role = if code == code::NEWCONTAINER {
        ProcessRole::Init
    } else {
        ProcessRole::Exec
    };
    if !vm.bind_process(stream, &container, &id, terminal, role) {
        return Err(ProxyError::invalid(
            "data.process.id",
            format!("process {id:?} is already running in {container:?}"),
        ));
    }
    Ok(id)
}

/// Where a signal or resize goes: `None` when it was held for the start.
fn target(stream: &Stream, control: HeldControl) -> Result<Option<ProcessName>, ProxyError> {
    match stream.control_target(control) {
        ControlTarget::Held => {
            tracing::debug!(token = %stream.token, ?control, "process not started yet: held for its start");
            Ok(None)
        }
        ControlTarget::Now(name) => Ok(Some(name)),
        ControlTarget::HoldFull => Err(ProxyError::Limit(Limit::HeldControls(MAX_HELD_CONTROLS))),
        ControlTarget::Unknown => Err(ProxyError::invalid(
            "token",
            "the token's process is unknown",
        )),
    }
}

/// Deliver a signal to the token's process, or hold it until the process starts. Only ever the process the
/// token names: hyperstart's SIGNALPROCESS names it; cc-agent can only KILLCONTAINER a container's init, so a
/// signal for a process started by `execcmd` is refused there rather than sent to another process.
pub async fn signal(vm: &Vm, stream: &Stream, signal: i32) -> Result<(), ProxyError> {
    if !(0..=MAX_SIGNAL).contains(&signal) {
        return Err(ProxyError::invalid(
            "signal",
            format!("a signal number is between 0 and {MAX_SIGNAL}"),
        ));
    }
    match target(stream, HeldControl::Signal(signal))? {
        Some(name) => send_signal(vm, stream, &name, signal).await,
        None => Ok(()),
    }
}

async fn send_signal(
    vm: &Vm,
    stream: &Stream,
    name: &ProcessName,
    signal: i32,
) -> Result<(), ProxyError> {
    tracing::debug!(vm = %vm.id, token = %stream.token, signal, "signal");
    match vm.dialect.signal_process_code() {
        Some(code) => {
            let payload = SignalProcess {
                container: name.container.clone(),
                process: name.process.clone(),
                signal,
            };
            call_typed(vm, name, code, "signalprocess", &payload).await
        }
        None if name.role == ProcessRole::Exec => Err(ProxyError::invalid(
            "token",
            format!(
                "the {} dialect cannot signal a process started by execcmd: its only signal command, \
                 killcontainer, reaches the init of container {:?}, another process",
                vm.dialect.name(),
                name.container
            ),
        )),
        None => {
            let payload = KillContainer {
                container: name.container.clone(),
                signal,
                all_processes: false,
            };
            call_typed(vm, name, code::KILLCONTAINER, "killcontainer", &payload).await
        }
    }
}

/// Resize the process's terminal with WINSIZE in the dialect's shape, or hold it until the process starts.
pub async fn resize(vm: &Vm, stream: &Stream, rows: u16, cols: u16) -> Result<(), ProxyError> {
    match target(stream, HeldControl::Resize { rows, cols })? {
        Some(name) => send_resize(vm, stream, &name, rows, cols).await,
        None => Ok(()),
    }
}

async fn send_resize(
    vm: &Vm,
    stream: &Stream,
    name: &ProcessName,
    rows: u16,
    cols: u16,
) -> Result<(), ProxyError> {
    match vm.dialect {
        Dialect::CcAgent => {
            let payload = WinSizeCcAgent {
                seq: stream.stdio,
                row: rows,
                column: cols,
            };
            call_typed(vm, name, code::WINSIZE, "winsize", &payload).await
        }
        Dialect::Hyperstart => {
            let payload = WinSizeHyperstart {
                container: name.container.clone(),
                process: name.process.clone(),
                row: rows,
                column: cols,
            };
            call_typed(vm, name, code::WINSIZE, "winsize", &payload).await
        }
    }
}

/// Send one signal or resize command built from the protocol crate's types; hyperstart's bare ERROR for its
/// pseudo-container is explained.
async fn call_typed<T: Serialize>(
    vm: &Vm,
    name: &ProcessName,
    code: u32,
    command: &str,
    payload: &T,
) -> Result<(), ProxyError> {
    let payload =
        serde_json::to_vec(payload).map_err(|e| ProxyError::invalid("data", e.to_string()))?;
    match vm
        .call(code, command, Bytes::from(payload), DEFAULT_TIMEOUT)
        .await
    {
        Ok(_) => Ok(()),
        Err(ProxyError::Agent {
            vm: id,
            command,
            message,
        }) if vm.dialect == Dialect::Hyperstart && name.container == PSEUDO_CONTAINER => {
            Err(ProxyError::Agent {
                vm: id,
                command,
                message: format!(
                    "{message}{}hyperstart cannot signal or resize a process of its {PSEUDO_CONTAINER:?} \
                     pseudo-container; start the process in a container (startpod, newcontainer)",
                    if message.is_empty() { "" } else { "; " }
                ),
            })
        }
        Err(e) => Err(e),
    }
}

/// The process has just started: deliver what was held for it, in order. Failures are logged (their
/// senders were answered when the requests were held).
pub async fn deliver_held(vm: &Vm, stream: &Stream) {
    let held = stream.take_held();
    if held.is_empty() {
        return;
    }
    let Some((container, process)) = stream.process() else {
        return;
    };
    let name = ProcessName {
        container,
        process,
        role: stream.role(),
    };
    for control in held {
        let result = match control {
            HeldControl::Signal(n) => send_signal(vm, stream, &name, n).await,
            HeldControl::Resize { rows, cols } => send_resize(vm, stream, &name, rows, cols).await,
        };
        match result {
            Ok(()) => {
                tracing::info!(vm = %vm.id, token = %stream.token, ?control, "held until the start, delivered")
            }
            Err(e) => {
                tracing::warn!(vm = %vm.id, token = %stream.token, ?control, error = %e, "held until the start, refused")
            }
        }
    }
}
