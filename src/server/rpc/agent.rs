//! `agent.call`: forward any agent command by name, optionally with a stdio stream for the process it starts.
//!
//! For `newcontainer`/`execcmd` with a stream, the daemon fills `process.stdio` and `process.stderr` with the
//! token's sequence numbers (stderr 0 for a terminal) and, in the hyperstart dialect, a unique `process.id`
//! when the client gave none. Every other field of `data` is forwarded exactly as sent.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use cc_proxy_api::methods;
use cc_proxy_api::types::{AgentCallParams, AgentCallResult};
use cc_proxy_protocol::{code, process_object_mut, Dialect};
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::RpcModule;
use serde_json::Value;

use super::parse;
use crate::error::ProxyError;
use crate::server::Proxy;
use crate::stream::{Lifecycle, ProcessRole, Stream, Token};
use crate::vm::Vm;

/// Default reply deadline of an agent command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Agent-to-host messages, refused as commands.
const HOST_BOUND: &[u32] = &[code::ACK, code::ERROR, code::NEXT];

/// Largest command payload: real agents refuse control messages above 64 KiB on vsock.
pub const MAX_COMMAND_PAYLOAD: usize = 65536 - cc_proxy_protocol::CONTROL_HEADER_LEN;

/// Longest deadline a client may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

pub fn register(m: &mut RpcModule<Arc<Proxy>>) {
    let _ = m.register_async_method(methods::AGENT_CALL, |params, proxy, _| async move {
        let p: AgentCallParams = parse(&params)?;
        Ok::<_, ErrorObjectOwned>(call(&proxy, p).await?)
    });
}

/// Which stream a start command uses.
pub enum StreamUse {
    None,
    /// Allocate one now (freed again if the command fails).
    New,
    /// A token allocated earlier.
    Existing(Arc<Stream>),
}

async fn call(proxy: &Proxy, p: AgentCallParams) -> Result<AgentCallResult, ProxyError> {
    let vm = proxy.registry.get_settled(&p.vm).await?;
    let code = command_code(&vm, &p.command)?;
    if HOST_BOUND.contains(&code) || code == vm.dialect.process_async_event_code() {
        return Err(ProxyError::invalid(
            "command",
            format!("{} is a message agents send, not a command", p.command),
        ));
    }
    let timeout = p
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_TIMEOUT)
        .clamp(Duration::from_millis(1), MAX_TIMEOUT);
    let starts = code == code::NEWCONTAINER || code == code::EXECCMD;
    let use_stream = match (p.streams.unwrap_or(0), &p.token) {
        (0, None) => StreamUse::None,
        (_, Some(_)) | (1, None) if !starts => {
            return Err(ProxyError::invalid(
                "streams",
                "only newcontainer and execcmd take a stream",
            ))
        }
        (n, _) if n > 1 => {
            return Err(ProxyError::invalid(
                "streams",
                "a process takes at most one stream",
            ))
        }
        (_, Some(t)) => {
            let token = Token::parse(t).ok_or(ProxyError::TokenNotFound)?;
            StreamUse::Existing(
                vm.stream_by_token(&token)
                    .ok_or(ProxyError::TokenNotFound)?,
            )
        }
        (_, None) => StreamUse::New,
    };
    let (reply, stream, process) = forward(
        &vm,
        code,
        &p.command,
        p.data.unwrap_or(Value::Null),
        timeout,
        use_stream,
    )
    .await?;
    let (data, data_base64) = decode_reply(&reply);
    Ok(AgentCallResult {
        data,
        data_base64,
        token: stream.map(|s| s.token.as_str().to_string()),
        process,
    })
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

/// An ACK payload as JSON when it is JSON, otherwise as base64.
pub fn decode_reply(reply: &[u8]) -> (Value, Option<String>) {
    if reply.is_empty() {
        return (Value::Null, None);
    }
    match serde_json::from_slice::<Value>(reply) {
        Ok(v) => (v, None),
        Err(_) => (
            Value::Null,
            Some(base64::engine::general_purpose::STANDARD.encode(reply)),
        ),
    }
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

/// Send a command, wiring a stream into a start command's `process` first. Returns the ACK payload, the
/// stream used, and the process id given to the agent.
pub async fn forward(
    vm: &Arc<Vm>,
    code: u32,
    name: &str,
    mut data: Value,
    timeout: Duration,
    use_stream: StreamUse,
) -> Result<(Bytes, Option<Arc<Stream>>, Option<String>), ProxyError> {
    let guard = match use_stream {
        StreamUse::None => StartGuard {
            vm,
            stream: None,
            fresh: false,
        },
        StreamUse::New => StartGuard {
            vm,
            stream: Some(vm.allocate_stream()),
            fresh: true,
        },
        StreamUse::Existing(s) => {
            if s.lifecycle() != Lifecycle::Allocated {
                return Err(ProxyError::invalid(
                    "token",
                    "the token's process was already started",
                ));
            }
            StartGuard {
                vm,
                stream: Some(s),
                fresh: false,
            }
        }
    };
    let process_id = match &guard.stream {
        Some(stream) => Some(wire_stream(vm, code, &mut data, stream)?),
        None => None,
    };
    let payload = if data.is_null() {
        Bytes::new()
    } else {
        Bytes::from(serde_json::to_vec(&data).unwrap_or_default())
    };
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
        vm.tap_process_started(s);
        tracing::info!(vm = %vm.id, token = %s.token, command = name,
            process = process_id.as_deref().unwrap_or(""), "process started");
        super::stream::deliver_held(vm, s).await;
    }
    Ok((reply, stream, process_id))
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
