//! One emulated VM: its process table, its outbound queue, and the control and I/O sessions
//! that the host may open, drop and reopen at any time.
//!
//! Everything the agent sends on the I/O channel goes through one FIFO queue ([`Outgoing`]),
//! shared by every process of the VM. A per-connection pump drains it into the current I/O
//! connection; while there is none, output waits in the queue (bounded by
//! [`OUTPUT_BUDGET`] bytes, then the processes' pipes stall). Exit reports of the hyperstart
//! dialect travel through the same queue and are handed to the control side only once the pump
//! reaches them, which guarantees that a process's output is written before its exit event.
//!
//! A new connection on a channel replaces the old one: the old session task is aborted. An item
//! being written when that happens stays in a pending slot and is written again, whole, on the
//! next connection.
//!
//! Strict mode (`--strict`) adds real hyperstart 1.1's rules on virtio-serial: READY only on the
//! first control connection of the VM's life, two NEXT credits per command, ERROR replies
//! without text (KILLCONTAINER excepted), an I/O packet over [`STRICT_TTY_BUFFER`] bytes ends
//! the agent (a real guest panics), and host stdin goes through the lossy per-process buffer of
//! [`crate::process::StrictStdin`], read one packet per pass.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use cc_proxy_protocol::{
    code, decode_control, encode_control, encode_io, encode_next, ControlCodec, ControlFrame,
    Dialect, IoCodec, IoFrame, IO_HEADER_LEN,
};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::AbortHandle;
use tokio_util::codec::FramedRead;

use crate::cli::{AgentConfig, Fault};
use crate::commands;
use crate::process::{ProcessTable, StdinFeed, StdinTarget, StrictStdin};

/// Bytes of process output a VM buffers while no I/O connection drains it. Past this, output
/// readers wait, which stalls the processes once their pipes fill up.
pub const OUTPUT_BUDGET: usize = 16 << 20;

/// Largest chunk of process output per I/O packet (the C hyperstart's serial limit).
pub const OUTPUT_CHUNK: usize = 4096;

/// Strict mode: real hyperstart reads the I/O channel into a buffer of this many bytes, header
/// included; a longer packet makes it exit.
pub const STRICT_TTY_BUFFER: usize = 4096;

/// Status the agent exits with when strict mode meets an oversized I/O packet.
const STRICT_OVERFLOW_EXIT: i32 = 3;

/// A byte stream from the host: unix socket, vsock stream, or a bridged serial port.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A boxed [`Stream`].
pub type Conn = Box<dyn Stream>;

/// The two agent channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Commands and replies (vsock port 2718, `sh.hyper.channel.0`).
    Control,
    /// Multiplexed process stdio (vsock port 2719, `sh.hyper.channel.1`).
    Io,
}

/// An item of the VM's outbound queue.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// An I/O packet; `budget` bytes of [`OUTPUT_BUDGET`] are returned once it is written.
    Io { frame: IoFrame, budget: u32 },
    /// A control message to send once everything queued before it is written (exit events).
    Event(ControlFrame),
}

/// A slot for the item a session is writing, so that an aborted session loses nothing.
type Pending<T> = Mutex<Option<T>>;

/// One emulated VM.
pub struct Vm {
    /// Position of the VM in this process (the socket path suffix), for logs.
    pub index: u32,
    /// Behaviour shared by every VM.
    pub config: Arc<AgentConfig>,
    /// Live processes.
    procs: Mutex<ProcessTable>,
    /// Sending end of the outbound I/O queue.
    out_tx: mpsc::UnboundedSender<Outgoing>,
    /// Receiving end, held by the current I/O session.
    out_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Outgoing>>,
    /// The item the I/O session was writing when it ended.
    out_pending: Pending<Outgoing>,
    /// Bytes of output that may still be queued.
    out_budget: Semaphore,
    /// Control messages released by the I/O pump (exit events), waiting for a control session.
    events_tx: mpsc::UnboundedSender<ControlFrame>,
    /// Receiving end, held by the current control session.
    events_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<ControlFrame>>,
    /// The event the control session was writing when it ended.
    events_pending: Pending<ControlFrame>,
    /// The current control session, aborted when a new connection replaces it.
    control_session: Mutex<Option<AbortHandle>>,
    /// The current I/O session, aborted when a new connection replaces it.
    io_session: Mutex<Option<AbortHandle>>,
    /// READY went out once; strict mode never sends it again (hyperstart sends it once per boot).
    ready_sent: AtomicBool,
}

/// Locks a std mutex, ignoring poisoning: the data stays consistent because no critical section
/// in this crate can panic halfway through an update.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Vm {
    /// A VM with no processes and no connections.
    pub fn new(index: u32, config: Arc<AgentConfig>) -> Arc<Vm> {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Arc::new(Vm {
            index,
            config,
            procs: Mutex::new(ProcessTable::default()),
            out_tx,
            out_rx: tokio::sync::Mutex::new(out_rx),
            out_pending: Mutex::new(None),
            out_budget: Semaphore::new(OUTPUT_BUDGET),
            events_tx,
            events_rx: tokio::sync::Mutex::new(events_rx),
            events_pending: Mutex::new(None),
            control_session: Mutex::new(None),
            io_session: Mutex::new(None),
            ready_sent: AtomicBool::new(false),
        })
    }

    /// The dialect this VM speaks.
    pub fn dialect(&self) -> Dialect {
        self.config.dialect
    }

    /// The process table.
    pub fn procs(&self) -> MutexGuard<'_, ProcessTable> {
        lock(&self.procs)
    }

    /// Makes `conn` the VM's connection for `channel`, replacing (aborting) the previous one.
    /// Must be called within the tokio runtime.
    pub fn attach(self: &Arc<Self>, channel: Channel, conn: Conn) {
        let vm = Arc::clone(self);
        let (slot, task) = match channel {
            Channel::Control => (
                &self.control_session,
                tokio::spawn(async move { vm.control_session(conn).await }),
            ),
            Channel::Io => (
                &self.io_session,
                tokio::spawn(async move { vm.io_session(conn).await }),
            ),
        };
        if let Some(old) = lock(slot).replace(task.abort_handle()) {
            old.abort();
        }
    }

    /// Queues process output for `seq`, waiting while the output budget is used up.
    pub async fn send_output(&self, seq: u64, data: &[u8]) {
        // Chunks are at most OUTPUT_CHUNK bytes; the clamp only guards against a wait that
        // could never end.
        let wanted = data.len().min(OUTPUT_BUDGET) as u32;
        // The semaphore is never closed; if it were, sending unbudgeted is still correct.
        let budget = match self.out_budget.acquire_many(wanted).await {
            Ok(permit) => {
                permit.forget();
                wanted
            }
            Err(_) => 0,
        };
        self.queue(Outgoing::Io {
            frame: IoFrame::new(seq, Bytes::copy_from_slice(data)),
            budget,
        });
    }

    /// Queues an item without budget (EOF packets, exit reports, events): they are tiny and
    /// must never wait behind a stalled process.
    pub fn queue(&self, item: Outgoing) {
        // The receiver lives as long as the VM, so sending cannot fail.
        let _ = self.out_tx.send(item);
    }

    /// Serves one control connection until it closes, fails or is replaced.
    async fn control_session(self: Arc<Self>, conn: Conn) {
        let (reader, writer) = tokio::io::split(conn);
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let first = !self.ready_sent.swap(true, Ordering::SeqCst);
        let no_ready = matches!(self.config.fault, Some(Fault::NoReady | Fault::Silent));
        if !no_ready && (first || !self.config.strict) {
            let _ = tx.send(control_bytes(code::READY, b""));
        }
        tokio::select! {
            res = self.control_reader(reader, tx) => {
                if let Err(e) = res {
                    log(self.index, &format!("control session closed: {e}"));
                }
            }
            res = self.control_writer(writer, rx) => {
                if let Err(e) = res {
                    log(self.index, &format!("control write failed: {e}"));
                }
            }
        }
    }

    /// Reads commands one at a time and queues their replies on `tx`.
    async fn control_reader(
        self: &Arc<Self>,
        reader: impl AsyncRead + Unpin,
        tx: mpsc::UnboundedSender<Bytes>,
    ) -> Result<(), SessionError> {
        let mut frames = FramedRead::new(
            reader,
            ControlCodec {
                max: self.config.max_frame,
            },
        );
        let mut version_answered = false;
        let mut garbage_sent = false;
        while let Some(frame) = frames.next().await {
            let frame = frame?;
            if self.config.fault == Some(Fault::Silent) {
                continue;
            }
            if version_answered && self.config.fault == Some(Fault::DieMidCommand) {
                log(self.index, "fault die-mid-command: exiting");
                std::process::exit(1);
            }
            if self.config.strict {
                // Real hyperstart on serial: one credit for the header, one for the body.
                let header = cc_proxy_protocol::CONTROL_HEADER_LEN as u32;
                let _ = tx.send(control_bytes(code::NEXT, &encode_next(header)));
                if !frame.payload.is_empty() {
                    let body = u32::try_from(frame.payload.len()).unwrap_or(u32::MAX);
                    let _ = tx.send(control_bytes(code::NEXT, &encode_next(body)));
                }
            } else if self.dialect() == Dialect::Hyperstart {
                // Like the C hyperstart: credit for the bytes just read.
                let read = frame.payload.len() + cc_proxy_protocol::CONTROL_HEADER_LEN;
                let read = u32::try_from(read).unwrap_or(u32::MAX);
                let _ = tx.send(control_bytes(code::NEXT, &encode_next(read)));
            }
            if version_answered && self.config.fault == Some(Fault::Garbage) && !garbage_sent {
                garbage_sent = true;
                log(self.index, "fault garbage: sending a malformed reply");
                let _ = tx.send(garbage());
                continue;
            }
            let reply = commands::handle(self, frame.code, &frame.payload).await;
            if self.config.fault == Some(Fault::SlowReply) {
                tokio::time::sleep(self.config.slow).await;
            }
            let bytes = match reply {
                Ok(payload) => control_bytes(code::ACK, &payload),
                Err(e) => {
                    log(self.index, &format!("command {} failed: {e}", frame.code));
                    // Real hyperstart explains only a failed KILLCONTAINER.
                    if self.config.strict && frame.code != code::KILLCONTAINER {
                        control_bytes(code::ERROR, b"")
                    } else {
                        control_bytes(code::ERROR, e.to_string().as_bytes())
                    }
                }
            };
            if tx.send(bytes).is_err() {
                return Ok(());
            }
            if frame.code == code::GETVERSION {
                version_answered = true;
            }
        }
        Ok(())
    }

    /// Writes session frames (READY, NEXT, replies) and pending exit events.
    async fn control_writer(
        &self,
        mut writer: impl AsyncWrite + Unpin,
        mut rx: mpsc::UnboundedReceiver<Bytes>,
    ) -> Result<(), SessionError> {
        let mut events = self.events_rx.lock().await;
        // An event an aborted session was writing goes first (after READY, which is in rx).
        let mut replay = lock(&self.events_pending).clone();
        loop {
            tokio::select! {
                biased;
                bytes = rx.recv() => match bytes {
                    Some(bytes) => writer.write_all(&bytes).await?,
                    None => return Ok(()),
                },
                event = next_event(&mut replay, &mut events) => {
                    let Some(event) = event else { return Ok(()) };
                    *lock(&self.events_pending) = Some(event.clone());
                    writer.write_all(&control_bytes(event.code, &event.payload)).await?;
                    *lock(&self.events_pending) = None;
                }
            }
        }
    }

    /// Serves one I/O connection: stdin packets in, queued output out.
    async fn io_session(self: Arc<Self>, conn: Conn) {
        let (reader, writer) = tokio::io::split(conn);
        tokio::select! {
            res = self.io_reader(reader) => {
                if let Err(e) = res {
                    log(self.index, &format!("I/O session closed: {e}"));
                }
            }
            res = self.io_pump(writer) => {
                if let Err(e) = res {
                    log(self.index, &format!("I/O write failed: {e}"));
                }
            }
        }
    }

    /// Routes host packets to process stdin. In strict mode this is hyperstart's event loop:
    /// one packet per pass, and what earlier passes buffered is released to the pipes after the
    /// packet of the current pass was buffered (or when no packet is waiting).
    async fn io_reader(&self, reader: impl AsyncRead + Unpin) -> Result<(), SessionError> {
        let max = if self.config.strict {
            STRICT_TTY_BUFFER
        } else {
            self.config.max_frame
        };
        let mut frames = FramedRead::new(reader, IoCodec { max });
        // Strict mode: buffers with bytes not yet released, and the number of the pass.
        let mut unreleased: Vec<Arc<StrictStdin>> = Vec::new();
        let mut pass = 0u64;
        loop {
            pass += 1;
            let next = if unreleased.is_empty() {
                frames.next().await
            } else {
                tokio::select! {
                    biased;
                    next = frames.next() => next,
                    () = std::future::ready(()) => {
                        // A pass without a packet: only flushing.
                        unreleased.drain(..).for_each(|s| s.release(pass));
                        continue;
                    }
                }
            };
            let Some(frame) = next else { break };
            let frame = match frame {
                Err(e) if self.config.strict && too_long(&e) => {
                    log(
                        self.index,
                        &format!(
                            "strict: {e}: hyperstart's {STRICT_TTY_BUFFER}-byte I/O buffer \
                             overflows; exiting, as a real guest panics"
                        ),
                    );
                    std::process::exit(STRICT_OVERFLOW_EXIT);
                }
                other => other?,
            };
            let target = self.procs().stdin_target(frame.seq, frame.data.is_empty());
            match target {
                StdinTarget::Write(StdinFeed::Queue(stdin)) => {
                    // The process may have closed its stdin; the data is then dropped.
                    let _ = stdin.send(frame.data).await;
                }
                StdinTarget::Write(StdinFeed::Strict(stdin)) => {
                    let lost = stdin.push(&frame.data, pass);
                    if lost > 0 {
                        log(
                            self.index,
                            &format!(
                                "strict: {lost} stdin bytes for sequence {} discarded \
                                 (the 512-byte buffer is full)",
                                frame.seq
                            ),
                        );
                    }
                    for s in &unreleased {
                        s.release(pass);
                    }
                    unreleased.retain(|s| s.pending() && !Arc::ptr_eq(s, &stdin));
                    unreleased.push(stdin);
                }
                StdinTarget::Ignore => {}
                StdinTarget::Unknown => self.queue(Outgoing::Io {
                    frame: IoFrame::eof(frame.seq),
                    budget: 0,
                }),
            }
        }
        Ok(())
    }

    /// Drains the outbound queue into `writer`.
    async fn io_pump(&self, mut writer: impl AsyncWrite + Unpin) -> Result<(), SessionError> {
        let mut rx = self.out_rx.lock().await;
        let mut buf = BytesMut::with_capacity(OUTPUT_CHUNK + IO_HEADER_LEN);
        loop {
            let pending = lock(&self.out_pending).take();
            let item = match pending {
                Some(item) => item,
                None => match rx.recv().await {
                    Some(item) => item,
                    None => return Ok(()),
                },
            };
            *lock(&self.out_pending) = Some(item.clone());
            match item {
                Outgoing::Io { frame, budget } => {
                    buf.clear();
                    encode_io(frame.seq, &frame.data, &mut buf)?;
                    writer.write_all(&buf).await?;
                    self.out_budget.add_permits(budget as usize);
                }
                Outgoing::Event(event) => {
                    let _ = self.events_tx.send(event);
                }
            }
            *lock(&self.out_pending) = None;
        }
    }
}

/// Whether a decoding error is a frame over the size limit.
fn too_long(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<cc_proxy_protocol::FrameError>())
        .is_some_and(|f| matches!(f, cc_proxy_protocol::FrameError::TooLong { .. }))
}

/// The next event to write: a replayed one first, then the queue.
async fn next_event(
    replay: &mut Option<ControlFrame>,
    events: &mut mpsc::UnboundedReceiver<ControlFrame>,
) -> Option<ControlFrame> {
    match replay.take() {
        Some(event) => Some(event),
        None => events.recv().await,
    }
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Reading or writing the connection failed, or the host sent a malformed frame.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// We tried to build an oversized frame.
    #[error("{0}")]
    Frame(#[from] cc_proxy_protocol::FrameError),
}

/// One encoded control frame. Payloads we build are tiny; an oversized one would be a bug, so it
/// is replaced by an ERROR saying so rather than crashing the agent.
pub fn control_bytes(code: u32, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::new();
    if encode_control(code, payload, &mut buf).is_err() {
        buf.clear();
        let _ = encode_control(code::ERROR, b"reply too large", &mut buf);
    }
    buf.freeze()
}

/// A malformed control frame (length 3, below the header) followed by random bytes.
fn garbage() -> Bytes {
    use std::hash::{BuildHasher, Hasher};
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&code::ACK.to_be_bytes());
    buf.extend_from_slice(&3u32.to_be_bytes());
    for _ in 0..4 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(0);
        buf.extend_from_slice(&h.finish().to_ne_bytes());
    }
    // Sanity: the host's decoder must reject this.
    debug_assert!(decode_control(&mut buf.clone(), usize::MAX).is_err());
    buf.freeze()
}

/// Logs one line on stderr, prefixed with the VM index.
pub fn log(vm: u32, msg: &str) {
    eprintln!("cc-test-agent[vm {vm}]: {msg}");
}
