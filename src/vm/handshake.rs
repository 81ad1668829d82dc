//! The registration handshake on a fresh control channel: wait briefly for READY, then GETVERSION picks the
//! dialect.
//!
//! hyperstart sends READY once per boot on virtio-serial (when it opens the port), so a host that connects
//! again (after `vm.unregister`, or a daemon restart) never gets a second one. The handshake therefore waits
//! for READY only [`READY_PROBE_AFTER`], then probes with GETVERSION: an agent that is up answers at once, and
//! an agent still booting reads the probe once it opens its port (after sending its READY, which is skipped).
//! Only when neither READY nor a reply came within the registration timeout is the agent declared silent.

use std::time::Duration;

use bytes::Bytes;
use cc_proxy_protocol::{code, parse_version, ControlCodec, ControlFrame, Dialect};
use futures::{SinkExt, StreamExt};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::error::{ProxyError, Unreachable};
use crate::transport::{BoxRead, BoxWrite};

pub type ControlReader = FramedRead<BoxRead, ControlCodec>;
pub type ControlWriter = FramedWrite<BoxWrite, ControlCodec>;

/// Most bytes of unsolicited messages kept during one handshake; a hostile agent cannot make a registration
/// hold more.
const MAX_DEFERRED_BYTES: usize = 1 << 20;

/// The dialect assumed for an agent whose GETVERSION ACK is empty: the Clear Containers 3.0 agent, which the
/// original cc-proxy and its mock hyperstart served.
pub const EMPTY_VERSION_DIALECT: Dialect = Dialect::CcAgent;

/// How long a fresh registration waits for READY before probing with GETVERSION anyway.
pub const READY_PROBE_AFTER: Duration = Duration::from_millis(300);

/// Whether the handshake waits for READY at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyRule {
    /// A registration: wait up to [`READY_PROBE_AFTER`] for READY, then probe.
    WaitThenProbe,
    /// A daemon restart reconnecting to a live agent: probe at once.
    Probe,
}

/// True for the code of an exit event in either dialect (the dialect is not known yet during the handshake).
fn is_async_event(code: u32) -> bool {
    Dialect::ALL
        .iter()
        .any(|d| d.process_async_event_code() == code)
}

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
                if is_async_event(frame.code) && kept + frame.payload.len() <= MAX_DEFERRED_BYTES {
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
                return Err(ProxyError::Unreachable(Unreachable::ClosedInHandshake {
                    vm: vm.into(),
                }))
            }
        }
    }
}

/// Wait for READY as `ready` says, then ask GETVERSION; the whole handshake takes at most `timeout`.
pub async fn handshake(
    vm: &str,
    reader: &mut ControlReader,
    writer: &mut ControlWriter,
    timeout: Duration,
    ready: ReadyRule,
) -> Result<Handshake, ProxyError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut deferred = Vec::new();
    let mut saw_ready = false;
    if ready == ReadyRule::WaitThenProbe {
        let wait = READY_PROBE_AFTER.min(timeout);
        if let Ok(r) =
            tokio::time::timeout(wait, next_of(vm, reader, &[code::READY], &mut deferred)).await
        {
            r?;
            saw_ready = true;
        } else {
            tracing::debug!(
                vm,
                "no READY within {wait:?} (an agent past its boot sends none): probing with GETVERSION"
            );
        }
    }
    writer
        .send(ControlFrame {
            code: code::GETVERSION,
            payload: Bytes::new(),
        })
        .await
        .map_err(|e| {
            ProxyError::Unreachable(Unreachable::HandshakeWrite {
                vm: vm.into(),
                reason: e.to_string(),
            })
        })?;
    let reply = match tokio::time::timeout_at(
        deadline,
        next_of(vm, reader, &[code::ACK, code::ERROR], &mut deferred),
    )
    .await
    {
        Ok(r) => r?,
        Err(_) if ready == ReadyRule::WaitThenProbe && !saw_ready => {
            return Err(ProxyError::ReadyTimeout {
                vm: vm.into(),
                after: timeout,
            })
        }
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
    let api_version = if reply.payload.is_empty() {
        let assumed = EMPTY_VERSION_DIALECT.api_version();
        tracing::warn!(
            vm,
            assumed,
            "the agent answered GETVERSION without a version (as the original project's mock hyperstart does): \
             assuming the {} dialect",
            EMPTY_VERSION_DIALECT.name()
        );
        assumed
    } else {
        parse_version(&reply.payload).ok_or_else(|| ProxyError::Protocol {
            vm: vm.into(),
            reason: format!(
                "GETVERSION reply of {} bytes, expected 4",
                reply.payload.len()
            ),
        })?
    };
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
