//! Legacy v2 sessions: Clear Containers runtimes and shims speaking the original cc-proxy's binary protocol
//! (`cc_proxy_api::legacy`) on the shared socket, detected by the first bytes `00 02`.
//!
//! A session reads one frame at a time and answers each command with one response, in order:
//! - [`commands`]: RegisterVM, AttachVM, UnregisterVM and Hyper, which a runtime sends. They use the same
//!   registry, VM actors and tokens as the JSON-RPC API, so a VM registered by one is visible to the other.
//! - [`shim`]: ConnectShim turns the connection into one process's shim; its output is written as stream
//!   frames and its exit as a ProcessExited notification; stdin, Signal and DisconnectShim come back.
//! - log stream frames, from any client, are written into the daemon's own log.
//!
//! A protocol error (a malformed frame, a frame a client may not send, an invalid log entry) closes only the
//! offending connection, with a log line saying why. A command that fails gets an error response and the
//! session goes on.
//!
//! A frame must be complete within `--client-header-timeout` of its first byte (the first frame: of the
//! connection's first bytes, `00 02`); a connection that stalls mid-frame is closed. A connection that is
//! not a shim and sends nothing is closed after `--client-idle-timeout` by the connection guard
//! ([`crate::server::guard`]); a shim's connection is an attached stream and never idle.

mod commands;
mod shim;
mod writer;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cc_proxy_api::legacy::{
    Command, Frame, FrameError, LegacyCodec, LogEntry, Message, StreamKind,
};
use futures::StreamExt;
use tokio_util::codec::FramedRead;

use super::detect::ClientConn;
use super::guard::Activity;
use super::{Peer, Proxy};
use crate::admin::metrics::{LimitKind, METRICS};
use crate::logging::escape_client_text;
use crate::vm::Vm;
use writer::{Writer, WRITER_DRAIN};

/// How often a session checks whether the frame it is reading has taken too long.
const FRAME_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Why a session is closed. Each is logged with the client's identity.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("a client may not send {0}")]
    Forbidden(&'static str),
    #[error("stdin frame from a client that is not a shim")]
    StdinFromNonShim,
    #[error("more than {0} bytes of stdin before the process started")]
    EarlyStdin(usize),
    #[error("invalid log entry: {0}")]
    Log(String),
    #[error("cannot write to the client: {0}")]
    Write(FrameError),
    #[error("the connection's writer stopped (a write failed)")]
    WriterGone,
}

/// What the session does after a frame.
enum Flow {
    Continue,
    /// Close the connection without a response (DisconnectShim).
    Close,
}

/// One legacy client connection.
struct Session {
    proxy: Arc<Proxy>,
    /// Who is on the other end: its uid owns the VMs it registers and may use only those unless privileged.
    peer: Peer,
    out: Writer,
    /// The VM this client registered or attached to (Hyper commands go to it).
    vm: Option<Arc<Vm>>,
    /// Set once ConnectShim succeeded.
    shim: Option<shim::Shim>,
}

/// Serve one legacy v2 connection until the client leaves or breaks the protocol. Its log lines carry the
/// client's fields through the connection's span (see [`crate::server::Peer`]).
pub async fn serve(proxy: Arc<Proxy>, conn: ClientConn, peer: Peer, activity: Arc<Activity>) {
    let header_timeout = proxy.limits.header_timeout;
    let (rd, wr) = tokio::io::split(conn);
    let mut reader = FramedRead::new(rd, LegacyCodec::default());
    // The writer stops at once when the daemon stops; otherwise it writes what was queued, then ends.
    let stop_writer = proxy.shutdown.child_token();
    let (out, writer) = Writer::spawn(wr, stop_writer.clone());
    let mut session = Session {
        proxy,
        peer,
        out,
        vm: None,
        shim: None,
    };
    // When the frame being read began: the first one with the connection (its `00 02` is in).
    let mut frame_started = Some(Instant::now());
    let mut check = tokio::time::interval(FRAME_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            // The daemon is stopping: end the session like a dropped connection (tokens are kept).
            _ = session.proxy.shutdown.cancelled() => break,
            next = reader.next() => next,
            _ = check.tick() => {
                if frame_started.is_none() && !reader.read_buffer().is_empty() {
                    frame_started = Some(Instant::now());
                }
                if frame_started.is_some_and(|t| t.elapsed() >= header_timeout) {
                    METRICS.limit_refused(LimitKind::HeaderTimeout);
                    tracing::info!(timeout = ?header_timeout, buffered = reader.read_buffer().len(),
                        "closing legacy connection: frame not complete within --client-header-timeout");
                    break;
                }
                continue;
            }
        };
        if matches!(next, Some(Ok(_))) {
            frame_started = None;
        }
        let result = match next {
            None => break,
            Some(Err(FrameError::Io(e))) => {
                tracing::debug!(error = %e, "legacy client read failed");
                break;
            }
            Some(Err(e)) => Err(SessionError::Frame(e)),
            Some(Ok(frame)) => session.handle(frame).await,
        };
        if session.shim.is_some() {
            // A shim's connection is an attached stream: the guard stands aside.
            activity.set_attached();
        }
        match result {
            Ok(Flow::Continue) => {}
            Ok(Flow::Close) => break,
            Err(e) => {
                let e = escape_client_text(&e.to_string(), session.proxy.max_client_log);
                tracing::warn!(error = %e, "closing legacy connection: protocol error");
                break;
            }
        }
    }
    session.end().await;
    drop(session);
    // Responses queued before the client left are written, within a bound.
    if tokio::time::timeout(WRITER_DRAIN, writer).await.is_err() {
        stop_writer.cancel();
    }
}

impl Session {
    async fn handle(&mut self, frame: Frame) -> Result<Flow, SessionError> {
        match frame.message {
            Message::Command(command) => {
                tracing::debug!(
                    command = command.name(),
                    len = frame.payload.len(),
                    "legacy command"
                );
                let reply = match command {
                    Command::ConnectShim => return self.connect_shim(&frame.payload).await,
                    Command::DisconnectShim => return self.disconnect_shim().await,
                    Command::Signal => self.signal(&frame.payload).await,
                    other => self.command(other, &frame.payload).await,
                };
                let response = match reply {
                    Ok(payload) => Frame::ok(command, payload),
                    Err(e) => {
                        // Errors quote what the client sent (an unknown id, a name): escaped and bounded.
                        let text = escape_client_text(&e.to_string(), self.proxy.max_client_log);
                        tracing::info!(command = command.name(), error = %text, "legacy command failed");
                        Frame::error(command, &e.to_string())
                    }
                };
                self.send(response).await?;
                Ok(Flow::Continue)
            }
            Message::Response { .. } => Err(SessionError::Forbidden("response frames")),
            Message::Notification(_) => Err(SessionError::Forbidden("notification frames")),
            Message::Stream(StreamKind::Stdout) => Err(SessionError::Forbidden("stdout frames")),
            Message::Stream(StreamKind::Stderr) => Err(SessionError::Forbidden("stderr frames")),
            Message::Stream(StreamKind::Stdin) => {
                let Some(shim) = &self.shim else {
                    return Err(SessionError::StdinFromNonShim);
                };
                shim.stdin(frame.payload).await?;
                Ok(Flow::Continue)
            }
            Message::Stream(StreamKind::Log) => {
                self.log(&frame.payload)?;
                Ok(Flow::Continue)
            }
        }
    }

    /// Queue one frame for the connection, behind everything queued before it.
    async fn send(&self, frame: Frame) -> Result<(), SessionError> {
        self.out.send(frame).await
    }

    /// A log entry from a runtime or shim, written into the daemon's log at its level.
    fn log(&self, payload: &Bytes) -> Result<(), SessionError> {
        let entry: LogEntry =
            serde_json::from_slice(payload).map_err(|e| SessionError::Log(e.to_string()))?;
        entry
            .validate()
            .map_err(|e| SessionError::Log(e.to_string()))?;
        // Client text is escaped and cut, so it cannot forge log lines or fill the log.
        let max = self.proxy.max_client_log;
        let container = escape_client_text(entry.container_id.as_deref().unwrap_or(""), max);
        let (source, msg) = (&entry.source, escape_client_text(&entry.msg, max));
        match entry.level.as_str() {
            "debug" => tracing::debug!(source = %source, container = container.as_str(), "{msg}"),
            "info" => tracing::info!(source = %source, container = container.as_str(), "{msg}"),
            "warn" => tracing::warn!(source = %source, container = container.as_str(), "{msg}"),
            _ => tracing::error!(source = %source, container = container.as_str(), "{msg}"),
        }
        Ok(())
    }

    /// The connection is over: a shim that left without DisconnectShim keeps its token for a later reclaim.
    async fn end(&mut self) {
        if let Some(shim) = self.shim.take() {
            shim.abandon().await;
        }
    }
}
