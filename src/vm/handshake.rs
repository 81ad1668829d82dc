//! The registration handshake on a fresh control channel: wait for READY, then GETVERSION picks the dialect.

use std::time::Duration;

use bytes::Bytes;
use cc_proxy_protocol::{code, parse_version, ControlCodec, ControlFrame, Dialect};
use futures::{SinkExt, StreamExt};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::error::ProxyError;
use crate::transport::{BoxRead, BoxWrite};

pub type ControlReader = FramedRead<BoxRead, ControlCodec>;
pub type ControlWriter = FramedWrite<BoxWrite, ControlCodec>;

/// Most bytes of unsolicited messages kept during one handshake; a hostile agent cannot make a registration
/// hold more.
const MAX_DEFERRED_BYTES: usize = 1 << 20;

/// The codes an exit event has in either dialect (the dialect is not known yet during the handshake).
const ASYNC_EVENT_CODES: [u32; 2] = [23, 24];

/// What the handshake learned.
pub struct Handshake {
    pub dialect: Dialect,
    pub api_version: u32,
    /// Unsolicited messages (e.g. exit events an agent replays after a reconnect) that arrived before the
    /// GETVERSION reply, in order; the actor handles them first.
    pub deferred: Vec<ControlFrame>,
}

/// Read frames until one with a code in `want`. Flow-control credit (NEXT) and READY are skipped; anything
/// else is kept in `deferred`.
async fn next_of(
    vm: &str,
    reader: &mut ControlReader,
    want: &[u32],
    deferred: &mut Vec<ControlFrame>,
) -> Result<ControlFrame, ProxyError> {
    loop {
        match reader.next().await {
            Some(Ok(frame)) if want.contains(&frame.code) => return Ok(frame),
            Some(Ok(frame)) if frame.code == code::NEXT || frame.code == code::READY => {}
            Some(Ok(frame)) => {
                let kept: usize = deferred.iter().map(|f| f.payload.len()).sum();
                if ASYNC_EVENT_CODES.contains(&frame.code)
                    && kept + frame.payload.len() <= MAX_DEFERRED_BYTES
                {
                    tracing::debug!(
                        vm,
                        code = frame.code,
                        "agent event during the handshake kept for later"
                    );
                    deferred.push(frame);
                } else {
                    tracing::warn!(
                        vm,
                        code = frame.code,
                        len = frame.payload.len(),
                        "unexpected agent message during the handshake dropped"
                    );
                }
            }
            Some(Err(e)) => {
                return Err(ProxyError::Protocol {
                    vm: vm.into(),
                    reason: e.to_string(),
                })
            }
            None => {
                return Err(ProxyError::Unreachable(format!(
                    "VM {vm:?}: the agent closed the control channel during the handshake"
                )))
            }
        }
    }
}

/// Wait for READY (unless `expect_ready` is false, as after a daemon restart where the agent may not send it
/// again), then ask GETVERSION.
pub async fn handshake(
    vm: &str,
    reader: &mut ControlReader,
    writer: &mut ControlWriter,
    timeout: Duration,
    expect_ready: bool,
) -> Result<Handshake, ProxyError> {
    let mut deferred = Vec::new();
    if expect_ready {
        match tokio::time::timeout(timeout, next_of(vm, reader, &[code::READY], &mut deferred))
            .await
        {
            Ok(r) => {
                r?;
            }
            Err(_) => {
                return Err(ProxyError::ReadyTimeout {
                    vm: vm.into(),
                    after: timeout,
                })
            }
        }
    }
    writer
        .send(ControlFrame {
            code: code::GETVERSION,
            payload: Bytes::new(),
        })
        .await
        .map_err(|e| ProxyError::Unreachable(format!("VM {vm:?}: writing GETVERSION: {e}")))?;
    let reply = match tokio::time::timeout(
        timeout,
        next_of(vm, reader, &[code::ACK, code::ERROR], &mut deferred),
    )
    .await
    {
        Ok(r) => r?,
        Err(_) => {
            return Err(ProxyError::CommandTimeout {
                vm: vm.into(),
                command: "version".into(),
                after: timeout,
            })
        }
    };
    if reply.code == code::ERROR {
        return Err(ProxyError::Agent {
            vm: vm.into(),
            command: "version".into(),
            message: String::from_utf8_lossy(&reply.payload).into_owned(),
        });
    }
    let api_version = parse_version(&reply.payload).ok_or_else(|| ProxyError::Protocol {
        vm: vm.into(),
        reason: format!(
            "GETVERSION reply of {} bytes, expected 4",
            reply.payload.len()
        ),
    })?;
    let dialect = Dialect::from_api_version(api_version).ok_or(ProxyError::UnsupportedAgent {
        vm: vm.into(),
        version: api_version,
    })?;
    Ok(Handshake {
        dialect,
        api_version,
        deferred,
    })
}
