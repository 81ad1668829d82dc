//! The control actor: the only writer and reader of a VM's control channel.
//!
//! The agent protocol has no request ids: the agent answers commands strictly in order, one at a time. So the
//! actor keeps one command on the wire (its [`Slot`]) and a FIFO queue behind it shared by every client.
//! Events it reacts to:
//!
//! - a client's [`Call`] arrives: queue it (bounded by [`MAX_QUEUED`]);
//! - the slot is `Idle`: send the next queued call whose client still waits and whose deadline has not
//!   passed; the slot becomes `Waiting`;
//! - ACK/ERROR arrives: it answers whatever the slot holds (`Waiting`: the client gets it; `Pinging`: the
//!   keepalive succeeded; `Abandoned`: a late reply, discarded; `Idle`: a protocol violation, the VM is lost);
//! - PROCESSASYNCEVENT arrives (hyperstart): a process exited; never a reply, whatever the slot holds;
//! - NEXT (hyperstart's flow-control credit) and repeated READY arrive: ignored;
//! - a deadline passes: a queued call fails without being sent; a `Waiting` call fails and the slot becomes
//!   `Abandoned` until the late reply arrives (so it is not taken as the next command's reply); if that takes
//!   longer than [`ABANDON_GRACE`] the agent is hung and the VM lost;
//! - the keepalive interval passes with the channel idle: a PING is sent and the slot is `Pinging`; no answer
//!   within `--agent-keepalive-misses` intervals and the VM is lost;
//! - the channel closes, sends a malformed frame, or a write fails or stalls: the VM is lost;
//! - the VM ends (lost elsewhere, unregistered, the daemon stopping): every call still held fails with the
//!   VM's fate.
//!
//! What a frame from the agent means (ACK, ERROR, NEXT, READY, a process event, something unexpected) is
//! decided by `cc_proxy_protocol::agent::classify_control`, a pure function that is unit-tested and fuzzed;
//! this actor only acts on the answer.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cc_proxy_protocol::agent::{classify_control, AgentMessage};
use cc_proxy_protocol::{code, ControlFrame};
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::handshake::{ControlReader, ControlWriter};
use super::lifecycle::{LostReason, VmState};
use super::Vm;
use crate::admin::metrics::CommandOutcome;
use crate::admin::tap::TapEvent;
use crate::error::{Limit, ProxyError};
use crate::logging::escape_bytes;

/// Most commands queued per VM; more fail with `LIMIT_EXCEEDED` rather than growing memory without bound.
/// Calls wait in two places, the VM's channel to the actor and the actor's queue, each bounded by this.
pub const MAX_QUEUED: usize = 1024;

/// How long an abandoned (timed-out) command may stay unanswered before the agent is considered hung.
pub const ABANDON_GRACE: Duration = Duration::from_secs(30);

/// Longest escaped dump of one control frame at `--log debug`.
const DUMP_BYTES: usize = 512;

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
}

/// What the control channel is busy with. At most one command is on the wire.
enum Slot {
    /// Nothing on the wire: the next queued call may be sent.
    Idle,
    /// A client's command is on the wire and its client waits for the reply.
    Waiting(Box<Call>),
    /// The actor's own keepalive PING is on the wire; no answer by `deadline` and the agent is hung.
    Pinging { deadline: Instant },
    /// The command on the wire timed out for its client; its late reply must still be read and discarded.
    Abandoned { command: String, deadline: Instant },
}

/// How the actor's loop ended.
enum End {
    /// The VM ended elsewhere (lost on its I/O channel, unregistered, the daemon stopping).
    VmEnded,
    /// Something on the control channel lost the VM.
    Lost(LostReason),
}

impl From<LostReason> for End {
    fn from(r: LostReason) -> End {
        End::Lost(r)
    }
}

/// The owner of one VM's control channel.
pub struct ControlActor {
    vm: Arc<Vm>,
    /// New calls from clients ([`Vm::call`]).
    calls: mpsc::Receiver<Box<Call>>,
    /// Calls waiting for the channel, in arrival order.
    queue: VecDeque<Box<Call>>,
    /// What is on the wire.
    slot: Slot,
    reader: ControlReader,
    writer: ControlWriter,
    /// When something was last written; the keepalive measures idleness from here.
    last_sent: Instant,
}

impl ControlActor {
    /// Start the actor; `deferred` are unsolicited messages the handshake received before the VM existed.
    pub fn spawn(
        vm: Arc<Vm>,
        calls: mpsc::Receiver<Box<Call>>,
        reader: ControlReader,
        writer: ControlWriter,
        deferred: Vec<ControlFrame>,
    ) {
        let actor = ControlActor {
            vm,
            calls,
            queue: VecDeque::new(),
            slot: Slot::Idle,
            reader,
            writer,
            last_sent: Instant::now(),
        };
        tokio::spawn(actor.run(deferred));
    }

    async fn run(mut self, deferred: Vec<ControlFrame>) {
        let mut end = Ok(());
        for frame in deferred {
            end = end.and_then(|()| self.on_frame(frame));
        }
        let end = match end {
            Ok(()) => self.serve().await,
            Err(e) => e.into(),
        };
        if let End::Lost(reason) = end {
            self.vm.transition(VmState::Lost(reason));
        }
        self.fail_all();
    }

    /// The event loop; returns when the VM ends.
    async fn serve(&mut self) -> End {
        loop {
            if let Err(end) = self.send_next().await {
                return end;
            }
            let wake = self.next_wake();
            tokio::select! {
                _ = self.vm.ended.cancelled() => return End::VmEnded,
                frame = self.reader.next() => match frame {
                    Some(Ok(frame)) => {
                        if let Err(reason) = self.on_frame(frame) {
                            return reason.into();
                        }
                    }
                    Some(Err(e)) => return LostReason::ControlMalformed(e.to_string()).into(),
                    None => return LostReason::ControlClosed.into(),
                },
                call = self.calls.recv() => match call {
                    Some(call) => self.enqueue(call),
                    None => return End::VmEnded,
                },
                _ = sleep_until_opt(wake) => {
                    if let Err(reason) = self.on_deadline(Instant::now()) {
                        return reason.into();
                    }
                }
            }
        }
    }

    fn enqueue(&mut self, call: Box<Call>) {
        if self.queue.len() >= MAX_QUEUED {
            let e = ProxyError::Limit(Limit::QueuedCommands {
                vm: self.vm.id.clone(),
                max: MAX_QUEUED,
            });
            self.finish(*call, Err(e));
        } else {
            self.queue.push_back(call);
        }
    }

    /// When the keepalive is due: the channel idle, nothing queued, and a keepalive configured.
    fn keepalive_at(&self) -> Option<Instant> {
        match (&self.slot, self.vm.config.keepalive) {
            (Slot::Idle, Some(every)) if self.queue.is_empty() => Some(self.last_sent + every),
            _ => None,
        }
    }

    /// How long a keepalive PING may go unanswered: the interval times `--agent-keepalive-misses`.
    fn keepalive_wait(&self) -> Duration {
        let every = self.vm.config.keepalive.unwrap_or_default();
        every.saturating_mul(self.vm.config.keepalive_misses.max(1))
    }

    /// The earliest deadline the loop must wake for.
    fn next_wake(&self) -> Option<Instant> {
        let slot = match &self.slot {
            Slot::Idle => None,
            Slot::Waiting(call) => Some(call.deadline),
            Slot::Pinging { deadline } | Slot::Abandoned { deadline, .. } => Some(*deadline),
        };
        let queued = self.queue.iter().map(|c| c.deadline).min();
        [slot, queued, self.keepalive_at()]
            .into_iter()
            .flatten()
            .min()
    }

    /// While the slot is idle, put the next live call on the wire (or a keepalive PING when one is due).
    async fn send_next(&mut self) -> Result<(), End> {
        while matches!(self.slot, Slot::Idle) {
            let Some(call) = self.queue.pop_front() else {
                break;
            };
            if call.reply.is_closed() {
                continue; // the client went away; don't spend the agent's time on it
            }
            if Instant::now() >= call.deadline {
                let err = self.timeout_error(&call);
                self.finish(*call, Err(err));
                continue;
            }
            if let Err(end) = self
                .write(call.code, &call.name, &call.payload, call.deadline)
                .await
            {
                self.queue.push_front(call);
                return Err(end);
            }
            self.slot = Slot::Waiting(call);
        }
        if let Some(due) = self.keepalive_at().filter(|due| Instant::now() >= *due) {
            let deadline = due.max(Instant::now()) + self.keepalive_wait();
            self.write(code::PING, "ping", &Bytes::new(), deadline)
                .await?;
            self.slot = Slot::Pinging { deadline };
        }
        Ok(())
    }

    /// Write one frame. An agent that stops reading its control channel must not wedge the actor: the write
    /// races `deadline` and the VM's end. A write cut short leaves the channel mid-frame, so the VM is lost.
    async fn write(
        &mut self,
        code: u32,
        name: &str,
        payload: &Bytes,
        deadline: Instant,
    ) -> Result<(), End> {
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(vm = %self.vm.id, command = name, len = payload.len(),
                data = %escape_bytes(payload, DUMP_BYTES), "to agent (control)");
        }
        let frame = ControlFrame {
            code,
            payload: payload.clone(),
        };
        let written = tokio::select! {
            r = self.writer.send(frame) => r.map_err(|e| LostReason::ControlWrite(e.to_string()).into()),
            _ = tokio::time::sleep_until(deadline) => Err(LostReason::ControlStalled.into()),
            _ = self.vm.ended.cancelled() => Err(End::VmEnded),
        };
        self.last_sent = Instant::now();
        written
    }

    /// Handle one frame from the agent.
    fn on_frame(&mut self, frame: ControlFrame) -> Result<(), LostReason> {
        let vm = &self.vm;
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(vm = %vm.id, code = frame.code, len = frame.payload.len(),
                data = %escape_bytes(&frame.payload, DUMP_BYTES), "from agent (control)");
        }
        match classify_control(vm.dialect, &frame) {
            AgentMessage::Ack => self.on_reply(frame.code, Ok(frame.payload)),
            AgentMessage::Error(message) => self.on_reply(frame.code, Err(message)),
            AgentMessage::Next(_) => Ok(()),
            AgentMessage::Ready => {
                tracing::debug!(vm = %vm.id, "agent sent READY again");
                Ok(())
            }
            AgentMessage::ProcessFinished {
                container,
                process,
                status,
            } => {
                on_process_finished(vm, &container, &process, status);
                Ok(())
            }
            AgentMessage::ProcessEvent(e) => {
                tracing::debug!(vm = %vm.id, event = %e.event, "process event ignored");
                Ok(())
            }
            AgentMessage::MalformedEvent(error) => {
                tracing::warn!(vm = %vm.id, error = %error, "malformed PROCESSASYNCEVENT ignored");
                Ok(())
            }
            AgentMessage::Unexpected(other) => {
                tracing::warn!(vm = %vm.id, code = other, "unexpected message from the agent ignored");
                Ok(())
            }
        }
    }

    /// ACK (its payload) or ERROR (the agent's message), with the frame's `code`: the answer to whatever is
    /// on the wire.
    fn on_reply(&mut self, code: u32, reply: Result<Bytes, String>) -> Result<(), LostReason> {
        match std::mem::replace(&mut self.slot, Slot::Idle) {
            Slot::Idle => Err(LostReason::UnsolicitedReply(code)),
            Slot::Waiting(call) => {
                let result = reply.map_err(|message| ProxyError::Agent {
                    vm: self.vm.id.clone(),
                    command: call.name.clone(),
                    message,
                });
                self.finish(*call, result);
                Ok(())
            }
            Slot::Pinging { .. } => {
                if reply.is_err() {
                    tracing::warn!(vm = %self.vm.id, "agent answered keepalive PING with ERROR");
                }
                Ok(())
            }
            Slot::Abandoned { command, .. } => {
                tracing::debug!(vm = %self.vm.id, command = %command, "late reply to an abandoned command discarded");
                Ok(())
            }
        }
    }

    /// Fail what is past its deadline.
    fn on_deadline(&mut self, now: Instant) -> Result<(), LostReason> {
        match std::mem::replace(&mut self.slot, Slot::Idle) {
            Slot::Waiting(call) if now >= call.deadline => {
                tracing::warn!(vm = %self.vm.id, command = %call.name, "agent command timed out");
                self.slot = Slot::Abandoned {
                    command: call.name.clone(),
                    deadline: now + ABANDON_GRACE,
                };
                let err = self.timeout_error(&call);
                self.finish(*call, Err(err));
            }
            Slot::Pinging { deadline } if now >= deadline => {
                return Err(LostReason::KeepaliveMissed(self.keepalive_wait()));
            }
            Slot::Abandoned { command, deadline } if now >= deadline => {
                return Err(LostReason::Hung {
                    command,
                    grace: ABANDON_GRACE,
                });
            }
            other => self.slot = other,
        }
        let (expired, live): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|c| now >= c.deadline);
        self.queue = live;
        for call in expired {
            let err = self.timeout_error(&call);
            self.finish(*call, Err(err));
        }
        Ok(())
    }

    fn timeout_error(&self, call: &Call) -> ProxyError {
        ProxyError::CommandTimeout {
            vm: self.vm.id.clone(),
            command: call.name.clone(),
            after: call.timeout,
        }
    }

    /// Answer a call and count it.
    fn finish(&self, call: Call, result: Result<Bytes, ProxyError>) {
        let vm = &self.vm;
        let seconds = call.queued.elapsed().as_secs_f64();
        let outcome = match &result {
            Ok(_) => CommandOutcome::Ok,
            Err(ProxyError::Agent { .. }) => CommandOutcome::Error,
            Err(ProxyError::CommandTimeout { .. }) => CommandOutcome::Timeout,
            Err(ProxyError::Lost { .. }) => CommandOutcome::Lost,
            Err(_) => CommandOutcome::Failed,
        };
        if outcome.answered() {
            vm.commands.fetch_add(1, Ordering::Relaxed);
        }
        if outcome != CommandOutcome::Ok {
            vm.errors.fetch_add(1, Ordering::Relaxed);
        }
        vm.metrics.command(&call.name, outcome, seconds);
        vm.tap(|| TapEvent::AgentCommand {
            vm: vm.id.clone(),
            command: call.name.clone(),
            result: outcome,
            latency_us: (seconds * 1e6) as u64,
        });
        tracing::debug!(vm = %vm.id, command = %call.name, result = ?outcome, ms = seconds * 1000.0, "agent command done");
        let _ = call.reply.send(result);
    }

    /// The VM ended: every call still held (on the wire, queued, or not yet received) fails with its fate.
    fn fail_all(&mut self) {
        let err = self.vm.gone_error();
        if let Slot::Waiting(call) = std::mem::replace(&mut self.slot, Slot::Idle) {
            self.finish(*call, Err(err.clone()));
        }
        self.calls.close();
        while let Ok(call) = self.calls.try_recv() {
            self.queue.push_back(call);
        }
        for call in std::mem::take(&mut self.queue) {
            self.finish(*call, Err(err.clone()));
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// PROCESSASYNCEVENT: `{"container","process","event":"finished","status"}`.
fn on_process_finished(vm: &Vm, container: &str, process: &str, status: i32) {
    match vm.stream_by_process(container, process) {
        Some(stream) => vm.process_exited(&stream, status),
        None => {
            tracing::debug!(vm = %vm.id, container = %container, process = %process,
            status, "exit of a process without a stream")
        }
    }
}

#[cfg(test)]
#[path = "actor_tests.rs"]
mod tests;
