//! `agent.call`: forward any agent command by name, optionally with a stdio stream for the process it starts.
//! A thin adapter over [`crate::vm::process`], which wires the stream into the command.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use cc_proxy_api::methods;
use cc_proxy_api::types::{AgentCallParams, AgentCallResult};
use cc_proxy_protocol::code;
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::RpcModule;
use serde_json::Value;

use super::{parse, peer, settled_vm};
use crate::error::ProxyError;
use crate::server::Proxy;
use crate::stream::Token;
use crate::vm::process::{self, StreamUse, DEFAULT_TIMEOUT, MAX_TIMEOUT};
use crate::vm::Vm;

/// Agent-to-host messages, refused as commands.
const HOST_BOUND: &[u32] = &[code::ACK, code::ERROR, code::NEXT];

pub fn register(m: &mut RpcModule<Arc<Proxy>>) {
    let _ = m.register_async_method(methods::AGENT_CALL, |params, proxy, ext| async move {
        let p: AgentCallParams = parse(&params)?;
        let peer = peer(&ext);
        let vm = settled_vm(&proxy, &peer, &p.vm).await?;
        Ok::<_, ErrorObjectOwned>(call(&vm, p, peer.uid).await?)
    });
}

async fn call(vm: &Arc<Vm>, p: AgentCallParams, uid: u32) -> Result<AgentCallResult, ProxyError> {
    let code = process::command_code(vm, &p.command)?;
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
    let starts = process::starts_process(code);
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
        (_, None) => StreamUse::New { owner: uid },
    };
    let raw = match &p.payload_base64 {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| ProxyError::invalid("payload_base64", format!("not base64: {e}")))?,
        None => Vec::new(),
    };
    let done = process::forward_with_payload(
        vm,
        code,
        &p.command,
        p.data.unwrap_or(Value::Null),
        &raw,
        timeout,
        use_stream,
    )
    .await?;
    let (data, data_base64) = decode_reply(&done.reply);
    Ok(AgentCallResult {
        data,
        data_base64,
        token: done.stream.map(|s| s.token.as_str().to_string()),
        process: done.process,
    })
}

/// An ACK payload: always byte for byte in base64 (when not empty), and as JSON only when the bytes are
/// exactly that JSON in its compact form, so that `data` never shows a payload other than the agent's (a
/// `readfile` of `  {"x": 1}\n` is not `{"x":1}`).
pub fn decode_reply(reply: &[u8]) -> (Value, Option<String>) {
    if reply.is_empty() {
        return (Value::Null, None);
    }
    let b64 = Some(base64::engine::general_purpose::STANDARD.encode(reply));
    match serde_json::from_slice::<Value>(reply) {
        Ok(v) if serde_json::to_vec(&v).is_ok_and(|compact| compact == reply) => (v, b64),
        _ => (Value::Null, b64),
    }
}
