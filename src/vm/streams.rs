//! A VM's stream table: its tokens, the sequence numbers they own, and the process names exit events and
//! signals find them by; and what is saved of them in the state directory.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use cc_proxy_api::stream::{Channel, Frame};
use cc_proxy_api::types::Event;

use super::state::{PendingFrame, StreamRecord, VmRecord};
use super::{lock, Vm};
use crate::admin::metrics::{DetachKind, LimitKind, StreamFailure, METRICS};
use crate::admin::tap::TapEvent;
use crate::error::{Limit, ProxyError};
use crate::stream::{Lifecycle, ProcessRole, Stream, StreamCounters, Token, EXIT_EOF_GRACE};

/// The first sequence number of a token; 1 and 2 are the null session.
const FIRST_SEQ: u64 = 3;

/// Maps sequence numbers, tokens and process names to streams.
pub struct StreamTable {
    by_seq: HashMap<u64, Arc<Stream>>,
    by_process: HashMap<(String, String), Arc<Stream>>,
    by_token: HashMap<Token, Arc<Stream>>,
    /// Next free sequence number.
    next_seq: u64,
    /// What every stream of the VM counts; built at the first allocation (an idle VM costs nothing here).
    counters: Option<Arc<StreamCounters>>,
}

impl StreamTable {
    pub fn new(next_seq: u64) -> StreamTable {
        StreamTable {
            by_seq: HashMap::new(),
            by_process: HashMap::new(),
            by_token: HashMap::new(),
            next_seq: next_seq.max(FIRST_SEQ),
            counters: None,
        }
    }

    /// Forget a process name if it still names `stream`.
    fn unbind(&mut self, stream: &Arc<Stream>) {
        if let Some(key) = stream.process() {
            if self
                .by_process
                .get(&key)
                .is_some_and(|s| Arc::ptr_eq(s, stream))
            {
                self.by_process.remove(&key);
            }
        }
    }

    fn insert(&mut self, stream: &Arc<Stream>) {
        self.by_seq.insert(stream.stdio, stream.clone());
        self.by_seq.insert(stream.stderr, stream.clone());
        if let Some(key) = stream.process() {
            self.by_process.insert(key, stream.clone());
        }
        self.by_token.insert(stream.token.clone(), stream.clone());
    }
}

impl Vm {
    fn counters(&self, table: &mut StreamTable) -> Arc<StreamCounters> {
        table
            .counters
            .get_or_insert_with(|| Arc::new(self.metrics.stream_counters(self.buffered.clone())))
            .clone()
    }

    /// Create a stream and list it in the table and the daemon's token index.
    fn add_stream(&self, token: Token, stdio: u64, next_seq: bool) -> Arc<Stream> {
        let mut table = lock(&self.streams);
        let stdio = if next_seq {
            let seq = table.next_seq;
            table.next_seq = seq + 2;
            seq
        } else {
            stdio
        };
        let counters = self.counters(&mut table);
        let stream = Arc::new(Stream::new(
            token,
            stdio,
            self.config.stream_buffer,
            counters,
        ));
        table.insert(&stream);
        drop(table);
        lock(&self.tokens).insert(stream.token.clone(), self.id.clone());
        stream
    }

    /// Allocate a token and its two sequence numbers for client `uid`, within `--max-tokens-per-vm` and
    /// `--max-tokens-per-client`.
    pub fn allocate_stream(&self, uid: u32) -> Result<Arc<Stream>, ProxyError> {
        let limits = self.config.tokens;
        if lock(&self.streams).by_token.len() >= limits.per_vm {
            METRICS.limit_refused(LimitKind::TokensPerVm);
            return Err(ProxyError::Limit(Limit::TokensPerVm {
                vm: self.id.clone(),
                max: limits.per_vm,
            }));
        }
        {
            let mut owners = lock(&self.token_owners);
            let held = owners.entry(uid).or_insert(0);
            if *held >= limits.per_client {
                METRICS.limit_refused(LimitKind::TokensPerClient);
                return Err(ProxyError::Limit(Limit::TokensPerClient {
                    uid,
                    max: limits.per_client,
                }));
            }
            *held += 1;
        }
        let stream = self.add_stream(Token::generate(), 0, true);
        stream.set_owner(uid);
        self.touch();
        Ok(stream)
    }

    /// A token is gone: it no longer counts against its client.
    fn release_owner(&self, stream: &Stream) {
        if let Some(uid) = stream.owner() {
            let mut owners = lock(&self.token_owners);
            if let Some(n) = owners.get_mut(&uid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    owners.remove(&uid);
                }
            }
        }
    }

    /// Free the tokens never attached nor started within `ttl`; returns how many.
    pub fn expire_tokens(&self, ttl: std::time::Duration) -> usize {
        let expired: Vec<Token> = lock(&self.streams)
            .by_token
            .values()
            .filter(|s| s.unused_for(ttl))
            .map(|s| s.token.clone())
            .collect();
        for token in &expired {
            if self.free_stream(token) {
                METRICS.limit_refused(LimitKind::TokenExpired);
                tracing::info!(vm = %self.id, token = %token.short(), ttl = ?ttl,
                    "token expired: never attached nor started within --token-ttl");
            }
        }
        expired.len()
    }

    /// Re-create the streams recorded before a restart.
    pub(super) fn restore_streams(&self, records: &[StreamRecord]) {
        for rec in records {
            if !self.restore_stream(rec) {
                tracing::warn!(vm = %self.id, "skipping a malformed recorded token");
            }
        }
    }

    fn restore_stream(&self, rec: &StreamRecord) -> bool {
        let Some(token) = Token::parse(&rec.token) else {
            return false;
        };
        let stream = self.add_stream(token, rec.stdio, false);
        if let (Some(c), Some(p)) = (&rec.container, &rec.process) {
            stream.set_process(c.clone(), p.clone(), rec.terminal, rec.role);
            lock(&self.streams)
                .by_process
                .insert((c.clone(), p.clone()), stream.clone());
        }
        if rec.started {
            stream.mark_running();
        }
        let frames = rec
            .pending
            .iter()
            .filter_map(|p| {
                let channel = Channel::from_byte(p.channel)?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(&p.data)
                    .ok()?;
                Some(Frame::new(channel, data))
            })
            .collect();
        stream.restore(frames, rec.stdout_eof);
        if let Some(status) = rec.pending_exit {
            deliver_exit(&stream, status);
        }
        true
    }

    /// Name the process a stream carries, so exit events and signals find it. Check and insert are one step
    /// under the table's lock; returns false when another live stream already has that name.
    pub fn bind_process(
        &self,
        stream: &Arc<Stream>,
        container: &str,
        process: &str,
        terminal: bool,
        role: ProcessRole,
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
        self.touch();
        true
    }

    /// Forget a stream's process name (its start failed), so the token can be started again.
    pub fn unbind_process(&self, stream: &Arc<Stream>) {
        lock(&self.streams).unbind(stream);
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

    pub(super) fn all_streams(&self) -> Vec<Arc<Stream>> {
        lock(&self.streams).by_token.values().cloned().collect()
    }

    /// Live tokens, and streams whose process runs.
    pub(super) fn stream_counts(&self) -> (usize, usize) {
        let table = lock(&self.streams);
        let running = table
            .by_token
            .values()
            .filter(|s| s.lifecycle() == Lifecycle::Running)
            .count();
        (table.by_token.len(), running)
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
        table.unbind(&stream);
        drop(table);
        self.stdin.forget(stream.stdio);
        self.release_owner(&stream);
        stream.close();
        self.touch();
        true
    }

    /// End every stream with `reason` and forget the tokens, without clearing the streams: an attached shim
    /// still drains its error frame (unregistration).
    pub(super) fn end_streams(&self, reason: &str) {
        for s in self.all_streams() {
            s.fail(reason);
            self.release_owner(&s);
        }
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

    /// A shim left a stream: count it and tell the tap.
    pub fn shim_detached(&self, token: &Token, kind: DetachKind) {
        self.metrics.detach(kind);
        self.tap(|| TapEvent::StreamDetached {
            vm: self.id.clone(),
            token: token.short().to_string(),
            kind,
        });
    }

    /// The daemon failed a stream: count it and tell the tap (the caller logs why and ends the stream).
    pub fn stream_failed(&self, stream: &Stream, reason: StreamFailure) {
        self.metrics.stream_failed(reason);
        self.tap(|| TapEvent::StreamFailed {
            vm: self.id.clone(),
            token: stream.token.short().to_string(),
            reason,
        });
    }

    /// Tell the tap a stream's process started, once (see [`Stream::claim_tap_start`]).
    pub fn tap_process_started(&self, stream: &Stream) {
        if stream.claim_tap_start() {
            self.tap(|| TapEvent::ProcessStarted {
                vm: self.id.clone(),
                token: stream.token.short().to_string(),
                process: stream.process().map(|(_, p)| p).unwrap_or_default(),
            });
        }
    }

    /// A process finished: queue its exit frame (now or after the stdout EOF) and publish the event.
    pub fn process_exited(&self, stream: &Arc<Stream>, status: i32) {
        tracing::debug!(vm = %self.id, token = %stream.token, status, "process exited");
        deliver_exit(stream, status);
        // The exit report can be handled before the start's caller woke up from the ACK: its start first.
        self.tap_process_started(stream);
        self.tap(|| TapEvent::ProcessExited {
            vm: self.id.clone(),
            token: stream.token.short().to_string(),
            status,
        });
        // Events go to every subscriber allowed to see the VM: they name the stream by its short id, never by
        // the whole token (a token is the key to the process's stdio).
        self.publish_event(Event::ProcessExited {
            vm: self.id.clone(),
            token: stream.token.short().to_string(),
            status,
        });
    }

    /// The record to persist; `with_pending` includes queued output (at shutdown).
    pub fn record(&self, with_pending: bool) -> VmRecord {
        let table = lock(&self.streams);
        let streams = table
            .by_token
            .values()
            .map(|s| stream_record(s, with_pending))
            .collect();
        VmRecord {
            id: self.id.clone(),
            control: self.control_uri.clone(),
            io: self.io_uri.clone(),
            console: self.console_uri.clone(),
            next_seq: table.next_seq,
            streams,
            // A VM that was never reached after a restart keeps what its record said.
            dialect: (self.api_version != 0).then(|| self.dialect.name().to_string()),
            api_version: (self.api_version != 0).then_some(self.api_version),
            owner: Some(self.owner),
            owner_rights: self.owner_rights,
            mesh: self.mesh.as_deref().cloned(),
        }
    }
}

/// Queue an exit frame, or hold it until the stdout EOF arrives (at most [`EXIT_EOF_GRACE`]).
fn deliver_exit(stream: &Arc<Stream>, status: i32) {
    if !stream.exited(status) {
        let s = stream.clone();
        tokio::spawn(async move {
            tokio::time::sleep(EXIT_EOF_GRACE).await;
            s.flush_pending_exit();
        });
    }
}

fn stream_record(s: &Stream, with_pending: bool) -> StreamRecord {
    let (container, process) = s
        .process()
        .map(|(c, p)| (Some(c), Some(p)))
        .unwrap_or((None, None));
    let (pending, stdout_eof, pending_exit) = if with_pending {
        let (frames, eof, exit) = s.snapshot();
        let pending = frames
            .into_iter()
            .map(|f| PendingFrame {
                channel: f.channel as u8,
                data: base64::engine::general_purpose::STANDARD.encode(&f.payload),
            })
            .collect();
        (pending, eof, exit)
    } else {
        (Vec::new(), s.saw_stdout_eof(), None)
    };
    StreamRecord {
        token: s.token.as_str().to_string(),
        stdio: s.stdio,
        container,
        process,
        terminal: s.terminal(),
        role: s.role(),
        started: s.lifecycle() != Lifecycle::Allocated,
        pending,
        stdout_eof,
        pending_exit,
    }
}
