//! The control actor: the only writer and reader of a VM's control channel.
//!
//! The agent protocol has no request ids: the agent answers commands strictly in order, one at a time. So the
//! actor keeps one command in flight and a FIFO queue behind it shared by every client. Events it reacts to:
//!
//! - a client's [`Call`] arrives: queue it (bounded by [`MAX_QUEUED`]);
//! - the channel is idle: send the next queued call whose client still waits and whose deadline has not passed;
//! - ACK/ERROR arrives: it answers the in-flight call;
//! - PROCESSASYNCEVENT arrives (hyperstart): a process exited; never a reply;
//! - NEXT arrives (hyperstart's flow-control credit): ignored, as the original host libraries effectively did;
//! - a deadline passes: a queued call fails without being sent; an in-flight call fails, and its slot stays
//!   "abandoned" until the late reply arrives (so it is not taken as the next command's reply); if that takes
//!   longer than [`ABANDON_GRACE`], the agent is considered hung and the VM lost;
//! - the keepalive interval passes with nothing sent: a PING is sent; if it is not answered in time, the VM is lost;
//! - the channel closes or sends a malformed frame: the VM is lost.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cc_proxy_protocol::{code, ControlFrame, ProcessAsyncEvent};
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::handshake::{ControlReader, ControlWriter};
use super::Vm;
use crate::error::ProxyError;
use crate::logging::escape_bytes;

/// Most commands queued per VM; more fail with `LIMIT_EXCEEDED` rather than growing memory without bound.
pub const MAX_QUEUED: usize = 1024;

/// How long an abandoned (timed-out) command may stay unanswered before the agent is considered hung.
pub const ABANDON_GRACE: Duration = Duration::from_secs(30);

/// One command from a client.
pub struct Call {
    pub code: u32,
    /// The lower-case name, for logs and metrics.
    pub name: String,
    pub payload: Bytes,
    pub queued: Instant,
    pub deadline: Instant,
    pub timeout: Duration,
    pub reply: oneshot::Sender<Result<Bytes, ProxyError>>,
    /// Sent by the actor itself (keepalive PING): a timeout means the agent is hung.
    pub internal: bool,
}

/// The command on the wire.
struct InFlight {
    /// None once the client was answered with a timeout (the slot is abandoned).
    call: Option<Call>,
    name: String,
    sent: Instant,
    /// When to give up: the call's deadline, or the abandon grace.
    deadline: Instant,
}

/// Start the actor; `deferred` are unsolicited messages the handshake received before the VM existed.
pub fn spawn(
    vm: Arc<Vm>,
    rx: mpsc::Receiver<Call>,
    reader: ControlReader,
    writer: ControlWriter,
    deferred: Vec<ControlFrame>,
) {
    tokio::spawn(run(vm, rx, reader, writer, deferred));
}

async fn run(
    vm: Arc<Vm>,
    mut rx: mpsc::Receiver<Call>,
    mut reader: ControlReader,
    mut writer: ControlWriter,
    deferred: Vec<ControlFrame>,
) {
    let mut queue: VecDeque<Call> = VecDeque::new();
    let mut inflight: Option<InFlight> = None;
    for frame in deferred {
        if let Some(reason) = on_frame(&vm, frame, &mut inflight) {
            vm.mark_lost(reason);
        }
    }
    let mut last_activity = Instant::now();
    let end = 'actor: loop {
        // Put the next live call on the wire when the channel is idle.
        while inflight.is_none() {
            let Some(call) = queue.pop_front() else { break };
            if call.reply.is_closed() && !call.internal {
                continue; // the client went away; don't spend the agent's time on it
            }
            if Instant::now() >= call.deadline {
                let err = timeout_error(&vm, Some(&call));
                finish(&vm, call, Err(err), None);
                continue;
            }
            if tracing::enabled!(tracing::Level::DEBUG) {
                tracing::debug!(vm = %vm.id, command = %call.name, len = call.payload.len(),
                    data = %escape_bytes(&call.payload, 512), "to agent (control)");
            }
            let frame = ControlFrame {
                code: call.code,
                payload: call.payload.clone(),
            };
            // An agent that stops reading its control channel must not wedge the actor: the write races the
            // call's deadline and the VM's fate. A write cut short leaves the channel mid-frame, so the VM is lost.
            let written = tokio::select! {
                r = writer.send(frame) => r.map_err(|e| format!("control channel write failed: {e}")),
                _ = tokio::time::sleep_until(call.deadline) => {
                    Err("the agent stopped reading its control channel (a command write timed out)".to_string())
                }
                _ = vm.lost.cancelled() => Err("lost".to_string()),
                _ = vm.stop.cancelled() => Err("stopped".to_string()),
            };
            if let Err(reason) = written {
                queue.push_front(call);
                if vm.is_lost() || vm.stop.is_cancelled() {
                    break 'actor None;
                }
                break 'actor Some(reason);
            }
            last_activity = Instant::now();
            inflight = Some(InFlight {
                name: call.name.clone(),
                sent: Instant::now(),
                deadline: call.deadline,
                call: Some(call),
            });
        }
        if vm.is_lost() {
            break None;
        }

        let keepalive_at = match (vm.config.keepalive, &inflight, queue.is_empty()) {
            (Some(every), None, true) => Some(last_activity + every),
            _ => None,
        };
        let queue_deadline = queue.iter().map(|c| c.deadline).min();
        let wake = [
            inflight.as_ref().map(|f| f.deadline),
            queue_deadline,
            keepalive_at,
        ]
        .into_iter()
        .flatten()
        .min();

        tokio::select! {
            _ = vm.lost.cancelled() => break None,
            _ = vm.stop.cancelled() => break None,
            frame = reader.next() => match frame {
                Some(Ok(frame)) => {
                    if let Some(reason) = on_frame(&vm, frame, &mut inflight) {
                        break Some(reason);
                    }
                }
                Some(Err(e)) => break Some(format!("malformed control frame from the agent: {e}")),
                None => break Some("the agent closed the control channel".to_string()),
            },
            call = rx.recv() => match call {
                Some(call) => {
                    if queue.len() >= MAX_QUEUED {
                        let e = ProxyError::Limit(format!("VM {} has {MAX_QUEUED} commands queued", vm.id));
                        finish(&vm, call, Err(e), None);
                    } else {
                        queue.push_back(call);
                    }
                }
                None => break None,
            },
            _ = sleep_until_opt(wake) => {
                let now = Instant::now();
                if let Some(reason) = expire(&vm, now, &mut queue, &mut inflight) {
                    break Some(reason);
                }
                if keepalive_at.is_some_and(|k| now >= k) && inflight.is_none() && queue.is_empty() {
                    let every = vm.config.keepalive.unwrap_or(Duration::from_secs(10));
                    let (tx, _rx) = oneshot::channel();
                    queue.push_back(Call { code: code::PING, name: "ping".into(), payload: Bytes::new(), queued: now,
                        deadline: now + every, timeout: every, reply: tx, internal: true });
                }
            }
        }
    };
    if let Some(reason) = end {
        vm.mark_lost(reason);
    }
    // Whatever is left fails with the VM's fate.
    let err = if vm.is_lost() {
        ProxyError::Lost {
            vm: vm.id.clone(),
            reason: match vm.state() {
                super::VmState::Lost(r) => r,
                _ => String::new(),
            },
        }
    } else {
        vm.gone_error()
    };
    if let Some(f) = inflight.take() {
        if let Some(call) = f.call {
            finish(&vm, call, Err(err.clone()), Some(f.sent));
        }
    }
    rx.close();
    while let Ok(call) = rx.try_recv() {
        queue.push_back(call);
    }
    for call in queue {
        finish(&vm, call, Err(err.clone()), None);
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn timeout_error(vm: &Vm, call: Option<&Call>) -> ProxyError {
    ProxyError::CommandTimeout {
        vm: vm.id.clone(),
        command: call
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "command".into()),
        after: call.map(|c| c.timeout).unwrap_or_default(),
    }
}

/// Answer a call and count it.
fn finish(vm: &Vm, call: Call, result: Result<Bytes, ProxyError>, _sent: Option<Instant>) {
    let seconds = call.queued.elapsed().as_secs_f64();
    let outcome = match &result {
        Ok(_) => "ok",
        Err(ProxyError::Agent { .. }) => "error",
        Err(ProxyError::CommandTimeout { .. }) => "timeout",
        Err(ProxyError::Lost { .. }) => "lost",
        Err(_) => "failed",
    };
    if !call.internal {
        vm.commands.fetch_add(
            u64::from(outcome == "ok" || outcome == "error"),
            Ordering::Relaxed,
        );
        if outcome != "ok" {
            vm.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    vm.metrics.command(&call.name, outcome, seconds);
    crate::admin::tap::emit(|| crate::admin::tap::TapEvent::AgentCommand {
        vm: vm.id.clone(),
        command: call.name.clone(),
        result: outcome.to_string(),
        latency_us: (seconds * 1e6) as u64,
    });
    tracing::debug!(vm = %vm.id, command = %call.name, result = outcome, ms = seconds * 1000.0, "agent command done");
    let _ = call.reply.send(result);
}

/// Handle one frame from the agent. Returns a reason when the VM must be marked lost.
fn on_frame(vm: &Arc<Vm>, frame: ControlFrame, inflight: &mut Option<InFlight>) -> Option<String> {
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::debug!(vm = %vm.id, code = frame.code, len = frame.payload.len(),
            data = %escape_bytes(&frame.payload, 512), "from agent (control)");
    }
    match frame.code {
        code::ACK | code::ERROR => {
            let Some(f) = inflight.take() else {
                return Some(format!(
                    "the agent sent a reply (code {}) with no command outstanding",
                    frame.code
                ));
            };
            if let Some(call) = f.call {
                let result = if frame.code == code::ACK {
                    Ok(frame.payload)
                } else {
                    Err(ProxyError::Agent {
                        vm: vm.id.clone(),
                        command: call.name.clone(),
                        message: String::from_utf8_lossy(&frame.payload)
                            .trim_end_matches('\0')
                            .to_string(),
                    })
                };
                if call.internal && result.is_err() {
                    tracing::warn!(vm = %vm.id, "agent answered keepalive PING with ERROR");
                }
                finish(vm, call, result, Some(f.sent));
            } else {
                tracing::debug!(vm = %vm.id, command = %f.name, "late reply to an abandoned command discarded");
            }
            None
        }
        code::NEXT => None,
        code::READY => {
            tracing::debug!(vm = %vm.id, "agent sent READY again");
            None
        }
        c if c == vm.dialect.process_async_event_code() => {
            on_async_event(vm, &frame.payload);
            None
        }
        other => {
            tracing::warn!(vm = %vm.id, code = other, "unexpected message from the agent ignored");
            None
        }
    }
}

/// PROCESSASYNCEVENT: `{"container","process","event":"finished","status"}`.
fn on_async_event(vm: &Arc<Vm>, payload: &[u8]) {
    let event: ProcessAsyncEvent = match serde_json::from_slice(payload) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(vm = %vm.id, error = %e, "malformed PROCESSASYNCEVENT ignored");
            return;
        }
    };
    if event.event != "finished" {
        tracing::debug!(vm = %vm.id, event = %event.event, "process event ignored");
        return;
    }
    match vm.stream_by_process(&event.container, &event.process) {
        Some(stream) => vm.process_exited(&stream, event.status),
        None => {
            tracing::debug!(vm = %vm.id, container = %event.container, process = %event.process,
            status = event.status, "exit of a process without a stream")
        }
    }
}

/// Fail what is past its deadline. Returns a reason when the VM must be marked lost.
fn expire(
    vm: &Arc<Vm>,
    now: Instant,
    queue: &mut VecDeque<Call>,
    inflight: &mut Option<InFlight>,
) -> Option<String> {
    if let Some(f) = inflight.as_mut() {
        if now >= f.deadline {
            match f.call.take() {
                Some(call) if call.internal => {
                    return Some(format!(
                        "the agent did not answer a keepalive PING within {:?}",
                        call.timeout
                    ));
                }
                Some(call) => {
                    tracing::warn!(vm = %vm.id, command = %call.name, "agent command timed out");
                    let err = timeout_error(vm, Some(&call));
                    finish(vm, call, Err(err), Some(f.sent));
                    f.deadline = now + ABANDON_GRACE;
                }
                None => {
                    return Some(format!(
                        "the agent did not answer {} within {:?} of its deadline",
                        f.name, ABANDON_GRACE
                    ));
                }
            }
        }
    }
    let mut i = 0;
    while i < queue.len() {
        if now >= queue[i].deadline {
            if let Some(call) = queue.remove(i) {
                let err = timeout_error(vm, Some(&call));
                finish(vm, call, Err(err), None);
            }
        } else {
            i += 1;
        }
    }
    None
}
