//! The shim side of a legacy session: after ConnectShim the connection carries one process's stdio.
//!
//! - An output task runs the shared shim writer ([`crate::stream::writer`]) with the legacy encoding
//!   ([`super::writer::LegacyEncoder`]): stdout and stderr as stream frames, the exit as a ProcessExited
//!   notification; a stream that fails (VM lost, unregistered, stalled) ends with ProcessExited
//!   [`super::writer::FAILED_EXIT_CODE`] and a log line naming the cause: a shim never sees a bare EOF.
//! - Frames the task could not write when the shim vanished go back to the stream; the token stays valid and
//!   a new connection can reclaim it with ConnectShim.
//! - stdin that arrives before the process started (cc-shim relays input as soon as it is connected) is held,
//!   bounded, and delivered in order once the process runs.
//! - DisconnectShim frees the token and closes the connection without a response.
//! - Signal: SIGWINCH with a size becomes a window resize; other signals go to the process. SIGKILL or SIGTERM
//!   before the process started is answered with ProcessExited(0), then the response.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cc_proxy_api::legacy::{self, Command, Frame, SIGNAL_LIMIT, SIGWINCH};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::commands::{parse, CommandError};
use super::writer::{LegacyEncoder, LegacySink, Writer};
use super::{Flow, Session, SessionError};
use crate::admin::metrics::DetachKind;
use crate::stream::writer::{self, WriterEnd};
use crate::stream::{AttachError, Lifecycle, Stream, Token};
use crate::vm::{process, Vm};

const SIGKILL: i64 = 9;
const SIGTERM: i64 = 15;

/// A connection that is a shim.
pub(super) struct Shim {
    vm: Arc<Vm>,
    stream: Arc<Stream>,
    /// Stops the output task when the shim leaves.
    gone: CancellationToken,
    output: JoinHandle<OutputEnd>,
    /// Stdin waiting for the process to start.
    early: EarlyStdin,
}

/// Most stdin bytes held for a process that has not started yet.
pub const MAX_EARLY_STDIN: usize = 1 << 20;

/// Longest wait of a SIGKILL/SIGTERM for the outcome of a start already on its way to the agent.
const START_OUTCOME_WAIT: Duration = Duration::from_secs(60);

/// Stdin queued in order behind a process's start, delivered by [`early_stdin_loop`].
struct EarlyStdin {
    tx: mpsc::UnboundedSender<(Bytes, OwnedSemaphorePermit)>,
    /// Byte permits: what is queued and not yet handed to the VM is bounded by [`MAX_EARLY_STDIN`], before
    /// and after the process started (each queued frame holds its bytes' permits until delivered).
    budget: Arc<Semaphore>,
}

/// How the output task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputEnd {
    /// The session stopped it.
    Stopped,
    /// Writing failed; the unwritten frames went back to the stream.
    WriteFailed,
    /// The exit notification was written; the stream is complete.
    Finished,
    /// Another attachment took over.
    Superseded,
}

impl Shim {
    /// Stdin for the process; empty closes its stdin. Ignored once the stream is over. Stdin that arrives
    /// before the process started is held (up to [`MAX_EARLY_STDIN`] bytes) and sent once it runs: an agent
    /// answers data for a sequence it does not know yet with an empty packet, which would end the stream.
    pub(super) async fn stdin(&self, data: Bytes) -> Result<(), SessionError> {
        if matches!(
            self.stream.lifecycle(),
            Lifecycle::Finished | Lifecycle::Closed
        ) {
            tracing::debug!(vm = %self.vm.id, token = %self.stream.token, len = data.len(), "stdin after the stream ended; ignored");
            return Ok(());
        }
        // Every frame goes through the queue so stdin stays in order; its cost is bounded by the budget.
        let cost = u32::try_from((data.len() + 1).min(MAX_EARLY_STDIN)).unwrap_or(u32::MAX);
        let permit = if self.stream.lifecycle() == Lifecycle::Allocated {
            // Before the start the session must stay responsive (a SIGTERM may be the next frame): refuse.
            self.early
                .budget
                .clone()
                .try_acquire_many_owned(cost)
                .map_err(|_| SessionError::EarlyStdin(MAX_EARLY_STDIN))?
        } else {
            // A running process that reads slowly: wait, which is backpressure toward the shim.
            self.early
                .budget
                .clone()
                .acquire_many_owned(cost)
                .await
                .map_err(|_| SessionError::EarlyStdin(MAX_EARLY_STDIN))?
        };
        let _ = self.early.tx.send((data, permit));
        Ok(())
    }

    /// Stop the output task and say how it ended.
    async fn stop(self) -> (Arc<Vm>, Arc<Stream>, OutputEnd) {
        self.gone.cancel();
        drop(self.early);
        let end = self.output.await.unwrap_or(OutputEnd::Stopped);
        (self.vm, self.stream, end)
    }

    /// The connection went away without DisconnectShim: keep the token for a reclaim.
    pub(super) async fn abandon(self) {
        let (vm, stream, end) = self.stop().await;
        if end == OutputEnd::Stopped {
            vm.shim_detached(&stream.token, DetachKind::Drop);
            tracing::info!(vm = %vm.id, token = %stream.token, "legacy shim went away; token kept for a reclaim");
        }
    }
}

impl Session {
    /// ConnectShim: attach to the token's stream, answer, then start writing its output.
    pub(super) async fn connect_shim(&mut self, payload: &[u8]) -> Result<Flow, SessionError> {
        match self.try_connect_shim(payload).await {
            Ok((vm, stream, attach)) => {
                self.send(Frame::ok(Command::ConnectShim, Bytes::new()))
                    .await
                    .inspect_err(|_| stream.release(attach, Vec::new()))?;
                tracing::info!(vm = %vm.id, token = %stream.token, "legacy shim connected");
                vm.tap(|| crate::admin::tap::TapEvent::StreamAttached {
                    vm: vm.id.clone(),
                    token: stream.token.short().to_string(),
                });
                let gone = CancellationToken::new();
                let (tx, rx) = mpsc::unbounded_channel();
                let early = EarlyStdin {
                    tx,
                    budget: Arc::new(Semaphore::new(MAX_EARLY_STDIN)),
                };
                tokio::spawn(early_stdin_loop(
                    vm.clone(),
                    stream.clone(),
                    rx,
                    gone.clone(),
                ));
                let output = tokio::spawn(output_loop(
                    vm.clone(),
                    stream.clone(),
                    attach,
                    self.out.clone(),
                    gone.clone(),
                ));
                self.shim = Some(Shim {
                    vm,
                    stream,
                    gone,
                    output,
                    early,
                });
            }
            Err(e) => {
                tracing::info!(error = %e, "legacy ConnectShim failed");
                self.send(Frame::error(Command::ConnectShim, &e.to_string()))
                    .await?;
            }
        }
        Ok(Flow::Continue)
    }

    async fn try_connect_shim(
        &self,
        payload: &[u8],
    ) -> Result<(Arc<Vm>, Arc<Stream>, u64), CommandError> {
        if self.shim.is_some() {
            return Err(CommandError::AlreadyShim);
        }
        let p: legacy::ConnectShim = parse(payload)?;
        let token = Token::parse(&p.token).ok_or(CommandError::UnknownToken)?;
        let (vm, stream) = self
            .proxy
            .registry
            .find_token_settled(&token)
            .await
            .ok_or(CommandError::UnknownToken)?;
        crate::server::authz::check_vm(
            &self.peer,
            &vm.id,
            vm.owner,
            crate::server::authz::Front::Legacy,
        )?;
        let attach = stream.attach().map_err(|e| match e {
            AttachError::Busy => CommandError::ShimBusy,
            AttachError::Closed => CommandError::UnknownToken,
        })?;
        Ok((vm, stream, attach))
    }

    /// DisconnectShim: free the token and close the connection (no response).
    pub(super) async fn disconnect_shim(&mut self) -> Result<Flow, SessionError> {
        let Some(shim) = self.shim.take() else {
            self.send(Frame::error(
                Command::DisconnectShim,
                &CommandError::NotShim.to_string(),
            ))
            .await?;
            return Ok(Flow::Continue);
        };
        let (vm, stream, end) = shim.stop().await;
        vm.free_stream(&stream.token);
        if end == OutputEnd::Stopped {
            vm.shim_detached(&stream.token, DetachKind::Close);
        }
        tracing::info!(vm = %vm.id, token = %stream.token, "legacy shim disconnected; token freed");
        Ok(Flow::Close)
    }

    /// Signal: a signal or (SIGWINCH) a window size for the shim's process.
    pub(super) async fn signal(&mut self, payload: &[u8]) -> Result<Bytes, CommandError> {
        let Some(shim) = &self.shim else {
            return Err(CommandError::NotShim);
        };
        let p: legacy::Signal = parse(payload)?;
        let n = p.signal_number;
        if !(0..SIGNAL_LIMIT).contains(&n) {
            return Err(CommandError::Signal(format!(
                "{n} is not between 0 and {}",
                SIGNAL_LIMIT - 1
            )));
        }
        if n == SIGWINCH {
            let (Ok(cols), Ok(rows)) = (u16::try_from(p.columns), u16::try_from(p.rows)) else {
                return Err(CommandError::Signal(
                    "columns and rows must be between 1 and 65535".into(),
                ));
            };
            if cols == 0 || rows == 0 {
                return Err(CommandError::Signal(
                    "SIGWINCH needs non-zero columns and rows".into(),
                ));
            }
            process::resize(&shim.vm, &shim.stream, rows, cols).await?;
            return Ok(Bytes::new());
        }
        if p.columns != 0 || p.rows != 0 {
            return Err(CommandError::Signal(
                "columns and rows must be 0 for a signal other than SIGWINCH".into(),
            ));
        }
        if n == SIGKILL || n == SIGTERM {
            // A start on its way to the agent decides: signal the process it starts, or report the exit of
            // one that never ran (bounded by the start command's own deadline).
            let _ =
                tokio::time::timeout(START_OUTCOME_WAIT, shim.stream.wait_start_outcome()).await;
        }
        if (n == SIGKILL || n == SIGTERM) && shim.stream.lifecycle() == Lifecycle::Allocated {
            // The process never started: to the shim it has ended, successfully.
            tracing::info!(vm = %shim.vm.id, token = %shim.stream.token, signal = n, "signal before the process started; reporting exit 0");
            self.out
                .send(Frame::process_exited(0))
                .await
                .map_err(|e| CommandError::Signal(format!("cannot notify the shim: {e}")))?;
            return Ok(Bytes::new());
        }
        // n < 31 always fits.
        process::signal(&shim.vm, &shim.stream, n as i32).await?;
        Ok(Bytes::new())
    }
}

/// Deliver held stdin in order once the process runs; drop it (logged) if the stream ends first.
async fn early_stdin_loop(
    vm: Arc<Vm>,
    stream: Arc<Stream>,
    mut rx: mpsc::UnboundedReceiver<(Bytes, OwnedSemaphorePermit)>,
    gone: CancellationToken,
) {
    while let Some((data, permit)) = rx.recv().await {
        tokio::select! {
            _ = stream.wait_started() => {}
            _ = gone.cancelled() => return,
        }
        if stream.lifecycle() == Lifecycle::Running {
            if let Err(e) = vm.send_stdin(stream.stdio, data).await {
                tracing::debug!(vm = %vm.id, token = %stream.token, error = %e, "stdin not delivered");
            }
        } else {
            tracing::info!(vm = %vm.id, token = %stream.token, len = data.len(), "stdin sent before the start of a process that never ran; dropped");
        }
        drop(permit);
    }
}

/// Write the stream's output to the shim (see [`crate::stream::writer`]) until the stream ends, the shim
/// leaves, or a write fails.
async fn output_loop(
    vm: Arc<Vm>,
    stream: Arc<Stream>,
    attach: u64,
    out: Writer,
    gone: CancellationToken,
) -> OutputEnd {
    let encoder = LegacyEncoder {
        vm: &vm,
        stream: &stream,
    };
    match writer::drive(&stream, attach, &encoder, &mut LegacySink(out), &gone).await {
        WriterEnd::Gone | WriterEnd::Detached => OutputEnd::Stopped,
        WriterEnd::WriteFailed => {
            vm.shim_detached(&stream.token, DetachKind::Drop);
            OutputEnd::WriteFailed
        }
        WriterEnd::Finished => {
            vm.free_stream(&stream.token);
            vm.shim_detached(&stream.token, DetachKind::Done);
            tracing::debug!(vm = %vm.id, token = %stream.token, "legacy stream complete; token freed");
            OutputEnd::Finished
        }
        WriterEnd::Superseded => OutputEnd::Superseded,
    }
}
