//! A legacy session's write side: one writer task that owns the connection's write half, fed by a channel.
//!
//! Command responses and notifications are queued and not waited for; a shim's output is queued by the
//! shared shim writer ([`crate::stream::writer`]) through [`LegacySink`], which waits until its bytes were
//! written (or the shim went away) so a batch that did not reach the shim goes back to its stream. No lock is
//! held while writing, so a slow shim delays only what is queued behind it on its own connection.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cc_proxy_api::legacy::{self, Frame, LegacyCodec, Message, StreamKind};
use cc_proxy_api::stream::{self as shimstream, Channel};
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::codec::Encoder;
use tokio_util::sync::CancellationToken;

use super::SessionError;
use crate::server::detect::ClientConn;
use crate::stream::writer::{ShimEncoder, ShimSink};
use crate::stream::Stream;
use crate::vm::Vm;

/// Pieces of output queued for one connection before senders wait.
const WRITE_QUEUE: usize = 64;

/// How long a closing session's writer may take to write what was queued before the close.
pub(super) const WRITER_DRAIN: Duration = Duration::from_secs(5);

/// The exit code a shim gets when its stream ends without an exit status (VM lost, token freed elsewhere).
pub const FAILED_EXIT_CODE: u8 = 255;

/// One piece of output, and (for shim output) where to report whether it was written.
struct Outgoing {
    bytes: Bytes,
    written: Option<oneshot::Sender<bool>>,
}

/// A handle to the session's writer task.
#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Outgoing>,
}

impl Writer {
    /// Start the writer task on `wr`; it stops when every handle is dropped and the queue is written, when a
    /// write fails, or when `stop` fires.
    pub(super) fn spawn(
        wr: WriteHalf<ClientConn>,
        stop: CancellationToken,
    ) -> (Writer, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        (Writer { tx }, tokio::spawn(write_task(wr, rx, stop)))
    }

    /// Queue one frame (a response or notification); it is written after everything queued before it.
    pub(super) async fn send(&self, frame: Frame) -> Result<(), SessionError> {
        let mut buf = BytesMut::new();
        LegacyCodec::default()
            .encode(frame, &mut buf)
            .map_err(SessionError::Write)?;
        self.tx
            .send(Outgoing {
                bytes: buf.freeze(),
                written: None,
            })
            .await
            .map_err(|_| SessionError::WriterGone)
    }

    /// Queue bytes and wait until they were written; false when they were not.
    async fn write(&self, bytes: Bytes) -> bool {
        let (tx, rx) = oneshot::channel();
        let queued = self
            .tx
            .send(Outgoing {
                bytes,
                written: Some(tx),
            })
            .await;
        queued.is_ok() && rx.await.unwrap_or(false)
    }
}

async fn write_task(
    mut wr: WriteHalf<ClientConn>,
    mut rx: mpsc::Receiver<Outgoing>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => m,
                None => return,
            },
            _ = stop.cancelled() => return,
        };
        let ok = tokio::select! {
            r = async { wr.write_all(&msg.bytes).await?; wr.flush().await } => r.is_ok(),
            _ = stop.cancelled() => false,
        };
        if let Some(tx) = msg.written {
            let _ = tx.send(ok);
        }
        if !ok {
            return;
        }
    }
}

/// A legacy shim's output as the shim writer's sink: the connection carries more after the stream ends, so
/// finishing writes nothing.
pub(super) struct LegacySink(pub Writer);

impl ShimSink for LegacySink {
    async fn write(&mut self, buf: Bytes) -> bool {
        self.0.write(buf).await
    }

    async fn finish(&mut self) {}
}

/// Stream frames as a legacy shim sees them: stdout and stderr as stream frames, the exit as a ProcessExited
/// notification. The protocol has no error frame for shims, so a failed stream ends with ProcessExited
/// [`FAILED_EXIT_CODE`] and a log line naming the cause: a shim never sees a bare end.
pub(super) struct LegacyEncoder<'a> {
    pub vm: &'a Vm,
    pub stream: &'a Stream,
}

impl ShimEncoder for LegacyEncoder<'_> {
    fn encode(&self, frames: &[shimstream::Frame], last: bool, buf: &mut BytesMut) {
        let (vm, stream) = (self.vm, self.stream);
        let mut codec = LegacyCodec::default();
        let mut push = |frame: Frame| {
            // Payloads are split at the protocol's limit below, so encoding cannot fail.
            let _ = codec.encode(frame, buf);
        };
        let mut exit_written = false;
        for f in frames {
            match f.channel {
                Channel::Stdout | Channel::Stderr => {
                    let kind = if f.channel == Channel::Stdout {
                        StreamKind::Stdout
                    } else {
                        StreamKind::Stderr
                    };
                    for chunk in f.payload.chunks(legacy::MAX_PAYLOAD) {
                        push(Frame::new(
                            Message::Stream(kind),
                            f.payload.slice_ref(chunk),
                        ));
                    }
                }
                Channel::Exit => {
                    let status = f.exit_status().unwrap_or(i32::from(FAILED_EXIT_CODE));
                    push(Frame::process_exited(
                        u8::try_from(status).unwrap_or(FAILED_EXIT_CODE),
                    ));
                    exit_written = true;
                }
                Channel::Error => {
                    let reason = String::from_utf8_lossy(&f.payload);
                    tracing::warn!(vm = %vm.id, token = %stream.token, reason = %reason, code = FAILED_EXIT_CODE,
                        "legacy shim's stream failed; reporting it as an exit");
                    push(Frame::process_exited(FAILED_EXIT_CODE));
                    exit_written = true;
                }
                Channel::Stdin | Channel::Control => {}
            }
        }
        if last && !exit_written {
            tracing::warn!(vm = %vm.id, token = %stream.token, code = FAILED_EXIT_CODE,
                "legacy shim's stream was closed before the process's exit was known; reporting it as an exit");
            push(Frame::process_exited(FAILED_EXIT_CODE));
        }
    }

    /// The legacy protocol has no detach.
    fn detach_ack(&self, _buf: &mut BytesMut) {}
}
