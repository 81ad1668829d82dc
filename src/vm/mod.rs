//! VMs: the registry of every VM on the host and the one owner task (actor) per VM.
//!
//! Each registered VM has:
//! - a control actor ([`actor`]) that owns the agent's control channel: it queues every client's commands
//!   FIFO, sends one at a time, matches the ACK/ERROR reply to it, applies deadlines, and routes unsolicited
//!   agent messages (PROCESSASYNCEVENT, NEXT) as events rather than replies;
//! - an I/O reader and an I/O writer ([`io`]) that demultiplex agent output to streams by sequence number and
//!   multiplex stdin from every shim onto the VM's single I/O channel;
//! - a stream table (sequence number → stream, and (container, process) → stream for exit events).
//!
//! Clients never touch the channels: they send [`actor::Call`]s through a channel and await the reply.
//! When any channel fails the VM is marked lost: queued and in-flight calls fail at once, every stream ends
//! with an error frame, and a `vm_lost` event is published. The VM stays listed as lost until unregistered.

pub mod actor;
pub mod handshake;
pub mod io;
pub mod registry;
pub mod state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use cc_proxy_api::types::{Event, VmInfo};
use cc_proxy_protocol::Dialect;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::admin::metrics::{StateLabel, VmMetrics, METRICS};
use crate::stream::{Stream, Token};
pub use registry::Registry;

/// Settings every VM shares.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Bytes kept per stream before backpressure.
    pub stream_buffer: usize,
    /// PING idle agents this often (None = never).
    pub keepalive: Option<Duration>,
    /// How long one full stream may pause the VM's I/O channel before it is failed.
    pub stall_timeout: Duration,
    /// Bytes buffered across a VM's streams before a stream past its own bound pauses the I/O channel.
    pub vm_buffer: usize,
    /// Bound on reconnecting one recorded VM after a restart; requests for it wait at most this long.
    pub recovery_timeout: Duration,
}

/// Whether the VM's agent is reachable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    Ready,
    Lost(String),
}

/// Which VM each live token belongs to, across all VMs (attach looks tokens up here).
pub type TokenIndex = Mutex<HashMap<Token, String>>;

/// Maps sequence numbers and process names to streams.
#[derive(Default)]
pub struct StreamTable {
    by_seq: HashMap<u64, Arc<Stream>>,
    by_process: HashMap<(String, String), Arc<Stream>>,
    by_token: HashMap<Token, Arc<Stream>>,
    /// Next free sequence number; 1 and 2 are the null session, so the first token gets 3 and 4.
    next_seq: u64,
}

/// One registered VM. Shared by the registry, the VM's tasks and the clients using it.
pub struct Vm {
    pub id: String,
    pub control_uri: String,
    pub io_uri: String,
    pub console_uri: Option<String>,
    pub dialect: Dialect,
    pub api_version: u32,
    pub registered: Instant,
    pub recovered: bool,
    /// Commands to the control actor.
    calls: mpsc::Sender<actor::Call>,
    /// Packets to the I/O writer.
    io_out: mpsc::Sender<io::IoOut>,
    state: Mutex<VmState>,
    /// Cancelled when the VM is lost (any channel failed).
    lost: CancellationToken,
    /// Cancelled when the VM is unregistered or the daemon stops.
    stop: CancellationToken,
    streams: Mutex<StreamTable>,
    /// The daemon-wide token index this VM's tokens are listed in.
    tokens: Arc<TokenIndex>,
    /// The VM stops because the daemon does (calls cut short fail with SHUTTING_DOWN, not VM_UNREGISTERED).
    daemon_stopping: AtomicBool,
    /// State changed since the last write to the state dir.
    dirty: AtomicBool,
    pub commands: AtomicU64,
    pub errors: AtomicU64,
    pub metrics: VmMetrics,
    pub config: VmConfig,
    events: broadcast::Sender<Event>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vm {
    pub fn state(&self) -> VmState {
        lock(&self.state).clone()
    }

    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Mark the VM lost (first reason wins): fail streams, publish the event, wake the tasks.
    pub fn mark_lost(&self, reason: impl Into<String>) {
        let reason = reason.into();
        {
            // The state and its gauges change together under the state lock, so an unregister racing with
            // the loss counts the VM in exactly one state.
            let mut st = lock(&self.state);
            if *st != VmState::Ready || self.stop.is_cancelled() {
                return;
            }
            *st = VmState::Lost(reason.clone());
            METRICS
                .vms
                .get_or_create(&StateLabel {
                    state: "ready".into(),
                })
                .dec();
            METRICS
                .vms
                .get_or_create(&StateLabel {
                    state: "lost".into(),
                })
                .inc();
        }
        tracing::warn!(vm = %self.id, reason = %reason, "VM lost");
        self.metrics.lost();
        self.lost.cancel();
        crate::admin::tap::emit(|| crate::admin::tap::TapEvent::VmState {
            vm: self.id.clone(),
            state: "lost".into(),
            reason: Some(reason.clone()),
        });
        for s in self.all_streams() {
            s.fail(&format!("VM {} lost: {reason}", self.id));
        }
        let _ = self.events.send(Event::VmLost {
            vm: self.id.clone(),
            reason,
        });
    }

    fn all_streams(&self) -> Vec<Arc<Stream>> {
        lock(&self.streams).by_token.values().cloned().collect()
    }

    /// Allocate a token and its two sequence numbers.
    pub fn allocate_stream(&self) -> Arc<Stream> {
        let mut table = lock(&self.streams);
        let seq = table.next_seq.max(3);
        table.next_seq = seq + 2;
        let stream = Arc::new(Stream::new(
            Token::generate(),
            seq,
            self.config.stream_buffer,
            self.metrics.clone(),
        ));
        table.by_seq.insert(seq, stream.clone());
        table.by_seq.insert(seq + 1, stream.clone());
        table.by_token.insert(stream.token.clone(), stream.clone());
        drop(table);
        lock(&self.tokens).insert(stream.token.clone(), self.id.clone());
        self.dirty.store(true, Ordering::Relaxed);
        stream
    }

    /// Re-create a stream recorded before a restart.
    fn restore_stream(&self, rec: &state::StreamRecord) -> Option<Arc<Stream>> {
        let token = Token::parse(&rec.token)?;
        let stream = Arc::new(Stream::new(
            token,
            rec.stdio,
            self.config.stream_buffer,
            self.metrics.clone(),
        ));
        if let (Some(c), Some(p)) = (&rec.container, &rec.process) {
            stream.set_process(c.clone(), p.clone(), rec.terminal, rec.role);
        }
        if rec.started {
            stream.mark_running();
        }
        let frames = rec
            .pending
            .iter()
            .filter_map(|p| {
                let channel = cc_proxy_api::stream::Channel::from_byte(p.channel)?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(&p.data)
                    .ok()?;
                Some(cc_proxy_api::stream::Frame::new(channel, data))
            })
            .collect();
        stream.restore(frames, rec.stdout_eof);
        if let Some(status) = rec.pending_exit {
            if !stream.exited(status) {
                let s = stream.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(crate::stream::EXIT_EOF_GRACE).await;
                    s.flush_pending_exit();
                });
            }
        }
        let mut table = lock(&self.streams);
        table.by_seq.insert(rec.stdio, stream.clone());
        table.by_seq.insert(rec.stdio + 1, stream.clone());
        if let Some(key) = stream.process() {
            table.by_process.insert(key, stream.clone());
        }
        table.by_token.insert(stream.token.clone(), stream.clone());
        drop(table);
        lock(&self.tokens).insert(stream.token.clone(), self.id.clone());
        Some(stream)
    }

    /// Name the process a stream carries, so exit events and signals find it. Check and insert are one step
    /// under the table's lock; returns false when another live stream already has that name.
    pub fn bind_process(
        &self,
        stream: &Arc<Stream>,
        container: &str,
        process: &str,
        terminal: bool,
        role: crate::stream::ProcessRole,
    ) -> bool {
        let key = (container.to_string(), process.to_string());
        let mut table = lock(&self.streams);
        if table
            .by_process
            .get(&key)
            .is_some_and(|other| !Arc::ptr_eq(other, stream))
        {
            return false;
        }
        table.by_process.insert(key, stream.clone());
        drop(table);
        stream.set_process(container.to_string(), process.to_string(), terminal, role);
        self.dirty.store(true, Ordering::Relaxed);
        true
    }

    /// Forget a stream's process name (its start failed), so the token can be started again.
    pub fn unbind_process(&self, stream: &Arc<Stream>) {
        if let Some(key) = stream.process() {
            let mut table = lock(&self.streams);
            if table
                .by_process
                .get(&key)
                .is_some_and(|s| Arc::ptr_eq(s, stream))
            {
                table.by_process.remove(&key);
            }
        }
    }

    pub fn stream_by_token(&self, token: &Token) -> Option<Arc<Stream>> {
        lock(&self.streams).by_token.get(token).cloned()
    }

    pub fn stream_by_seq(&self, seq: u64) -> Option<Arc<Stream>> {
        lock(&self.streams).by_seq.get(&seq).cloned()
    }

    pub fn stream_by_process(&self, container: &str, process: &str) -> Option<Arc<Stream>> {
        lock(&self.streams)
            .by_process
            .get(&(container.to_string(), process.to_string()))
            .cloned()
    }

    /// Free a token: forget its sequence numbers and names, drop pending output.
    pub fn free_stream(&self, token: &Token) -> bool {
        let mut table = lock(&self.streams);
        let Some(stream) = table.by_token.remove(token) else {
            return false;
        };
        lock(&self.tokens).remove(token);
        table.by_seq.remove(&stream.stdio);
        table.by_seq.remove(&stream.stderr);
        if let Some(key) = stream.process() {
            if table
                .by_process
                .get(&key)
                .is_some_and(|s| Arc::ptr_eq(s, &stream))
            {
                table.by_process.remove(&key);
            }
        }
        drop(table);
        stream.close();
        self.dirty.store(true, Ordering::Relaxed);
        true
    }

    /// A shim left a stream: count it and tell the tap.
    pub fn shim_detached(&self, token: &Token, kind: &str) {
        self.metrics.detach(kind);
        crate::admin::tap::emit(|| crate::admin::tap::TapEvent::StreamDetached {
            vm: self.id.clone(),
            token: token.short().to_string(),
            kind: kind.to_string(),
        });
    }

    /// Tell the tap a stream's process started, once (see [`Stream::claim_tap_start`]).
    pub fn tap_process_started(&self, stream: &Stream) {
        if stream.claim_tap_start() {
            crate::admin::tap::emit(|| crate::admin::tap::TapEvent::ProcessStarted {
                vm: self.id.clone(),
                token: stream.token.short().to_string(),
                process: stream.process().map(|(_, p)| p).unwrap_or_default(),
            });
        }
    }

    /// A process finished: queue its exit frame (now or after the stdout EOF) and publish the event.
    pub fn process_exited(self: &Arc<Self>, stream: &Arc<Stream>, status: i32) {
        tracing::debug!(vm = %self.id, token = %stream.token, status, "process exited");
        if !stream.exited(status) {
            let s = stream.clone();
            tokio::spawn(async move {
                tokio::time::sleep(crate::stream::EXIT_EOF_GRACE).await;
                s.flush_pending_exit();
            });
        }
        // The exit report can be handled before the start's caller woke up from the ACK: its start first.
        self.tap_process_started(stream);
        crate::admin::tap::emit(|| crate::admin::tap::TapEvent::ProcessExited {
            vm: self.id.clone(),
            token: stream.token.short().to_string(),
            status,
        });
        let _ = self.events.send(Event::ProcessExited {
            vm: self.id.clone(),
            token: stream.token.as_str().to_string(),
            status,
        });
    }

    /// Send one command and wait for its reply (or deadline, loss, unregistration).
    pub async fn call(
        &self,
        code: u32,
        name: &str,
        payload: bytes::Bytes,
        timeout: Duration,
    ) -> Result<bytes::Bytes, crate::error::ProxyError> {
        use crate::error::ProxyError;
        if let VmState::Lost(reason) = self.state() {
            return Err(ProxyError::Lost {
                vm: self.id.clone(),
                reason,
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let now = tokio::time::Instant::now();
        let call = actor::Call {
            code,
            name: name.to_string(),
            payload,
            queued: now,
            deadline: now + timeout,
            timeout,
            reply: tx,
            internal: false,
        };
        match self.calls.try_send(call) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(ProxyError::Limit(format!(
                    "VM {} has {} commands queued",
                    self.id,
                    actor::MAX_QUEUED
                )))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(self.gone_error()),
        }
        // The actor answers every call; the backstop only guards against a bug leaving a client waiting forever.
        let backstop = now + timeout + actor::ABANDON_GRACE;
        match tokio::time::timeout_at(backstop, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.gone_error()),
            Err(_) => Err(ProxyError::CommandTimeout {
                vm: self.id.clone(),
                command: name.to_string(),
                after: timeout,
            }),
        }
    }

    fn gone_error(&self) -> crate::error::ProxyError {
        match self.state() {
            VmState::Lost(reason) => crate::error::ProxyError::Lost {
                vm: self.id.clone(),
                reason,
            },
            VmState::Ready if self.daemon_stopping.load(Ordering::Acquire) => {
                crate::error::ProxyError::ShuttingDown
            }
            VmState::Ready => crate::error::ProxyError::Unregistered(self.id.clone()),
        }
    }

    /// Queue stdin for the process on `seq` (empty data closes its stdin). Waits until the process started.
    pub async fn send_stdin(
        &self,
        seq: u64,
        data: bytes::Bytes,
    ) -> Result<(), crate::error::ProxyError> {
        if let Some(stream) = self.stream_by_seq(seq) {
            tokio::select! {
                _ = stream.wait_started() => {}
                _ = self.lost.cancelled() => {}
                _ = self.stop.cancelled() => {}
            }
        }
        if self.is_lost() || self.stop.is_cancelled() {
            return Err(self.gone_error());
        }
        // Queued in bounded pieces: the per-VM queue then bounds bytes, not just messages.
        let mut pieces = Vec::with_capacity(data.len() / io::STDIN_CHUNK + 1);
        if data.is_empty() {
            pieces.push(data);
        } else {
            let mut rest = data;
            while !rest.is_empty() {
                pieces.push(rest.split_to(rest.len().min(io::STDIN_CHUNK)));
            }
        }
        for piece in pieces {
            tokio::select! {
                r = self.io_out.send(io::IoOut { seq, data: piece }) => r.map_err(|_| self.gone_error())?,
                _ = self.lost.cancelled() => return Err(self.gone_error()),
                _ = self.stop.cancelled() => return Err(self.gone_error()),
            }
        }
        Ok(())
    }

    pub fn info(&self) -> VmInfo {
        let table = lock(&self.streams);
        let tokens = table.by_token.len();
        let streams = table
            .by_token
            .values()
            .filter(|s| s.lifecycle() == crate::stream::Lifecycle::Running)
            .count();
        drop(table);
        let (state, lost_reason) = match self.state() {
            VmState::Ready => ("ready".to_string(), None),
            VmState::Lost(r) => ("lost".to_string(), Some(r)),
        };
        VmInfo {
            id: self.id.clone(),
            state,
            lost_reason,
            // A VM that could not be reached after a restart, recorded before dialects were recorded.
            dialect: if self.api_version == 0 {
                "unknown".into()
            } else {
                self.dialect.name().to_string()
            },
            api_version: self.api_version,
            control: self.control_uri.clone(),
            io: self.io_uri.clone(),
            console: self.console_uri.clone(),
            uptime_secs: self.registered.elapsed().as_secs(),
            commands: self.commands.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            streams,
            tokens,
            recovered: self.recovered,
        }
    }

    /// The record to persist; `with_pending` includes queued output (at shutdown).
    pub fn record(&self, with_pending: bool) -> state::VmRecord {
        let table = lock(&self.streams);
        let streams = table
            .by_token
            .values()
            .map(|s| {
                let (container, process) = s
                    .process()
                    .map(|(c, p)| (Some(c), Some(p)))
                    .unwrap_or((None, None));
                let (pending, stdout_eof, pending_exit) = if with_pending {
                    let (frames, eof, exit) = s.snapshot();
                    let pending = frames
                        .into_iter()
                        .map(|f| state::PendingFrame {
                            channel: f.channel as u8,
                            data: base64::engine::general_purpose::STANDARD.encode(&f.payload),
                        })
                        .collect();
                    (pending, eof, exit)
                } else {
                    (Vec::new(), s.saw_stdout_eof(), None)
                };
                state::StreamRecord {
                    token: s.token.as_str().to_string(),
                    stdio: s.stdio,
                    container,
                    process,
                    terminal: s.terminal(),
                    role: s.role(),
                    started: s.lifecycle() != crate::stream::Lifecycle::Allocated,
                    pending,
                    stdout_eof,
                    pending_exit,
                }
            })
            .collect();
        state::VmRecord {
            id: self.id.clone(),
            control: self.control_uri.clone(),
            io: self.io_uri.clone(),
            console: self.console_uri.clone(),
            next_seq: table.next_seq.max(3),
            streams,
            // A VM that was never reached after a restart keeps what its record said.
            dialect: (self.api_version != 0).then(|| self.dialect.name().to_string()),
            api_version: (self.api_version != 0).then_some(self.api_version),
        }
    }

    /// Begin stopping (no later loss is recorded) and return the state the VM ends in.
    fn halt(&self) -> VmState {
        let st = lock(&self.state);
        self.stop.cancel();
        st.clone()
    }

    /// Stop the VM's tasks. Unregistering also ends its streams with `reason` and frees its tokens; a daemon
    /// exit leaves streams alone so shims can re-attach to the restarted daemon.
    fn stop(&self, reason: &str, unregister: bool) {
        if !unregister {
            self.daemon_stopping.store(true, Ordering::Release);
        }
        self.stop.cancel();
        if unregister {
            for s in self.all_streams() {
                s.fail(reason);
            }
            // Forget the tokens without clearing the streams: an attached shim still drains its error frame.
            let mut table = lock(&self.streams);
            let mut index = lock(&self.tokens);
            for token in table.by_token.keys() {
                index.remove(token);
            }
            drop(index);
            table.by_token.clear();
            table.by_seq.clear();
            table.by_process.clear();
        }
    }
}
