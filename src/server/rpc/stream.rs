//! `stream.allocate`, `stream.signal`, `stream.resize`, `stream.close`; the signal and resize helpers are
//! shared with the shim's control frames and the legacy protocol.

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
use crate::stream::{Lifecycle, Stream, Token};
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

fn started(stream: &Stream) -> Result<(String, String), ProxyError> {
    if stream.lifecycle() == Lifecycle::Allocated {
        return Err(ProxyError::invalid(
            "token",
            "the token's process has not been started",
        ));
    }
    stream
        .process()
        .ok_or_else(|| ProxyError::invalid("token", "the token's process is unknown"))
}

/// Deliver a signal: SIGNALPROCESS in the hyperstart dialect, KILLCONTAINER (the container's init) in cc-agent's.
pub async fn signal(vm: &Vm, stream: &Stream, signal: i32) -> Result<(), ProxyError> {
    if !(0..=64).contains(&signal) {
        return Err(ProxyError::invalid(
            "signal",
            "a signal number is between 0 and 64",
        ));
    }
    let (container, process) = started(stream)?;
    let (code, name, payload) = match vm.dialect.signal_process_code() {
        Some(c) if vm.dialect == Dialect::Hyperstart => (
            c,
            "signalprocess",
            json!({"container": container, "process": process, "signal": signal}),
        ),
        _ => (
            code::KILLCONTAINER,
            "killcontainer",
            json!({"container": container, "signal": signal, "allProcesses": false}),
        ),
    };
    vm.call(
        code,
        name,
        Bytes::from(payload.to_string()),
        DEFAULT_TIMEOUT,
    )
    .await
    .map(|_| ())
}

/// Resize the process's terminal with WINSIZE in the dialect's shape.
pub async fn resize(vm: &Vm, stream: &Stream, rows: u16, cols: u16) -> Result<(), ProxyError> {
    let (container, process) = started(stream)?;
    let payload = match vm.dialect {
        Dialect::CcAgent => json!({"seq": stream.stdio, "row": rows, "column": cols}),
        Dialect::Hyperstart => {
            json!({"container": container, "process": process, "row": rows, "column": cols})
        }
    };
    vm.call(
        code::WINSIZE,
        "winsize",
        Bytes::from(payload.to_string()),
        DEFAULT_TIMEOUT,
    )
    .await
    .map(|_| ())
}
