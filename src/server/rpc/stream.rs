//! `stream.allocate`, `stream.signal`, `stream.resize`, `stream.close`; the signal and resize helpers are
//! shared with the shim's control frames and the legacy protocol. Signals and resizes for a process that
//! has not started yet are held by its stream and delivered, in order, by the start ([`deliver_held`]).

use std::sync::Arc;

use bytes::Bytes;
use cc_proxy_api::methods;
use cc_proxy_api::types::{ResizeParams, SignalParams, StreamAllocation, TokenParam, VmId};
use cc_proxy_protocol::{code, Dialect};
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::RpcModule;
use serde_json::json;

use super::agent::DEFAULT_TIMEOUT;
use super::parse;
use crate::error::ProxyError;
use crate::server::Proxy;
use crate::stream::{
    ControlTarget, HeldControl, ProcessName, ProcessRole, Stream, Token, MAX_HELD_CONTROLS,
};
use crate::vm::Vm;

pub fn register(m: &mut RpcModule<Arc<Proxy>>) {
    let _ = m.register_async_method(methods::STREAM_ALLOCATE, |params, proxy, _| async move {
        let p: VmId = parse(&params)?;
        let vm = proxy.registry.get_settled(&p.id).await?;
        let s = vm.allocate_stream();
        Ok::<_, ErrorObjectOwned>(StreamAllocation {
            token: s.token.as_str().into(),
            stdio: s.stdio,
            stderr: s.stderr,
        })
    });
    let _ = m.register_async_method(methods::STREAM_SIGNAL, |params, proxy, _| async move {
        let p: SignalParams = parse(&params)?;
        let (vm, stream) = find(&proxy, &p.token).await?;
        signal(&vm, &stream, p.signal).await?;
        Ok::<_, ErrorObjectOwned>(())
    });
    let _ = m.register_async_method(methods::STREAM_RESIZE, |params, proxy, _| async move {
        let p: ResizeParams = parse(&params)?;
        let (vm, stream) = find(&proxy, &p.token).await?;
        resize(&vm, &stream, p.rows, p.cols).await?;
        Ok::<_, ErrorObjectOwned>(())
    });
    let _ = m.register_async_method(methods::STREAM_CLOSE, |params, proxy, _| async move {
        let p: TokenParam = parse(&params)?;
        let (vm, stream) = find(&proxy, &p.token).await?;
        vm.free_stream(&stream.token);
        vm.shim_detached(&stream.token, "close");
        Ok::<_, ErrorObjectOwned>(())
    });
}

/// The VM and stream of a token (after its VM's recovery, when it is being recovered).
async fn find(proxy: &Proxy, token: &str) -> Result<(Arc<Vm>, Arc<Stream>), ProxyError> {
    let token = Token::parse(token).ok_or(ProxyError::TokenNotFound)?;
    proxy
        .registry
        .find_token_settled(&token)
        .await
        .ok_or(ProxyError::TokenNotFound)
}

/// The pseudo-container in which hyperstart runs processes in its own namespaces.
const PSEUDO_CONTAINER: &str = "hyperstart";

/// Where a signal or resize goes: `None` when it was held for the start.
fn target(stream: &Stream, control: HeldControl) -> Result<Option<ProcessName>, ProxyError> {
    match stream.control_target(control) {
        ControlTarget::Held => {
            tracing::debug!(token = %stream.token, ?control, "process not started yet: held for its start");
            Ok(None)
        }
        ControlTarget::Now(name) => Ok(Some(name)),
        ControlTarget::HoldFull => Err(ProxyError::Limit(format!(
            "{MAX_HELD_CONTROLS} signals and resizes are already held for the token's process, which has not started"
        ))),
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
    if !(0..=64).contains(&signal) {
        return Err(ProxyError::invalid(
            "signal",
            "a signal number is between 0 and 64",
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
    let (code, command, payload) = match (vm.dialect, vm.dialect.signal_process_code()) {
        (Dialect::Hyperstart, Some(c)) => (
            c,
            "signalprocess",
            json!({"container": name.container, "process": name.process, "signal": signal}),
        ),
        _ if name.role == ProcessRole::Exec => {
            return Err(ProxyError::invalid(
                "token",
                format!(
                    "the {} dialect cannot signal a process started by execcmd: its only signal command, \
                     killcontainer, reaches the init of container {:?}, another process",
                    vm.dialect.name(),
                    name.container
                ),
            ))
        }
        _ => (
            code::KILLCONTAINER,
            "killcontainer",
            json!({"container": name.container, "signal": signal, "allProcesses": false}),
        ),
    };
    tracing::debug!(vm = %vm.id, token = %stream.token, signal, command, "signal");
    call(vm, name, code, command, payload).await
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
    let payload = match vm.dialect {
        Dialect::CcAgent => json!({"seq": stream.stdio, "row": rows, "column": cols}),
        Dialect::Hyperstart => {
            json!({"container": name.container, "process": name.process, "row": rows, "column": cols})
        }
    };
    call(vm, name, code::WINSIZE, "winsize", payload).await
}

/// Send one signal or resize command; hyperstart's bare ERROR for the pseudo-container is explained.
async fn call(
    vm: &Vm,
    name: &ProcessName,
    code: u32,
    command: &str,
    payload: serde_json::Value,
) -> Result<(), ProxyError> {
    match vm
        .call(
            code,
            command,
            Bytes::from(payload.to_string()),
            DEFAULT_TIMEOUT,
        )
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
