//! Process stdio streams: one per token, carrying one process's output to its shim and its stdin back.
//!
//! Roles:
//! - the VM's I/O reader pushes agent output into the stream ([`Stream::push_output`]) in arrival order;
//! - the shim connection's writer takes frames out ([`Stream::next_output`]) and writes them;
//! - exit reports (an I/O packet in the cc-agent dialect, a control event in hyperstart's) become the last
//!   frame, but only after the stdout EOF packet, so no output can follow the exit frame;
//! - signals and resizes that arrive before the process started are held here ([`Stream::control_target`],
//!   at most [`MAX_HELD_CONTROLS`]) and handed, in order, to the start ([`Stream::take_held`]).
//!
//! No-loss policy: output that arrives while no shim is attached, or faster than the shim reads, is kept in
//! the stream's queue. Each stream has its own bound (`--stream-buffer`, default 4 MiB); past it, the stream
//! borrows from its VM's budget (`--vm-buffer`, default 32 MiB across the VM's streams), so a stalled shim does
//! not hold up the VM's other streams. When the VM's budget is spent too, the VM's I/O reader waits for the
//! full stream to drain (backpressure on the I/O channel, which blocks the writing processes in the guest). If
//! it stays full for longer than the stall timeout (`--stall-timeout`, default 10 s), that stream is failed
//! loudly (error frame, metric, log) so one stuck shim cannot halt its VM forever. Output for a stream whose
//! shim closed it on purpose is discarded and counted.

mod control;
mod counters;
pub mod token;
pub mod writer;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cc_proxy_api::stream::{Channel, Frame};
use tokio::sync::Notify;

use crate::sync::lock;

pub use control::{ControlTarget, HeldControl, ProcessName, ProcessRole, MAX_HELD_CONTROLS};
pub use counters::{BufferAccount, StreamCounters};
pub use token::Token;

/// How long an exit report waits for the stdout EOF packet before it is delivered anyway.
pub const EXIT_EOF_GRACE: Duration = Duration::from_secs(2);

/// Largest batch of bytes a shim writer takes at once.
pub const MAX_BATCH: usize = 256 * 1024;

/// Who, if anyone, is reading the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShimState {
    /// No shim yet, or the previous one went away abruptly: output is kept.
    Absent,
    /// A shim is attached; the number tells attachments apart.
    Attached(u64),
    /// The shim asked to detach; the writer sends the acknowledgement and stops.
    Detaching(u64),
}

/// The process's lifecycle, as the stream sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Allocated; the process has not been started (or its start is in flight).
    Allocated,
    Running,
    /// The last frame (exit or error) is queued.
    Finished,
    /// The token was freed; output is discarded.
    Closed,
}

struct Inner {
    queue: VecDeque<Frame>,
    buffered: usize,
    shim: ShimState,
    next_attach: u64,
    lifecycle: Lifecycle,
    /// The stdout EOF packet arrived.
    stdout_eof: bool,
    /// An exit status waiting for the stdout EOF.
    pending_exit: Option<i32>,
    /// Container and process id the agent knows the process by (hyperstart names processes this way).
    process: Option<(String, String)>,
    /// Which command started the process.
    role: ProcessRole,
    terminal: bool,
    /// Signals and resizes waiting for the start, in arrival order.
    held: VecDeque<HeldControl>,
    /// A start command for this stream is on its way to the agent.
    starting: bool,
}

/// One process's stdio stream.
pub struct Stream {
    pub token: Token,
    /// Sequence number of stdin and stdout on the VM's I/O channel.
    pub stdio: u64,
    /// Sequence number of stderr (`stdio + 1`).
    pub stderr: u64,
    /// Most bytes kept before backpressure.
    limit: usize,
    inner: Mutex<Inner>,
    /// Wakes the attached shim's writer: frames queued, detach requested, or the stream ended.
    wake_shim: Notify,
    /// Wakes an I/O reader waiting for space in this stream.
    wake_space: Notify,
    /// Wakes stdin writers waiting for the process to start.
    wake_started: Notify,
    /// Wakes whoever waits for a shim to attach (the legacy protocol waits before starting a process).
    wake_attached: Notify,
    /// The tap's `process_started` for this stream was emitted (by the start's caller or, when the exit
    /// report won the race, just before `process_exited`), so taps never see an exit before its start.
    tap_started: std::sync::atomic::AtomicBool,
    metrics: Arc<StreamCounters>,
    /// When the token was allocated (or restored); one never attached nor started expires after
    /// `--token-ttl`.
    created: std::time::Instant,
    /// The uid the token counts against (`--max-tokens-per-client`); unset for tokens restored after a
    /// restart.
    owner: std::sync::OnceLock<u32>,
}

/// What the shim writer got from [`Stream::take`].
pub enum Take {
    /// Frames to write (may be empty: nothing yet).
    Frames(Vec<Frame>),
    /// Frames to write, and then the stream is over (exit or error frame included).
    Last(Vec<Frame>),
    /// The shim asked to detach: write the acknowledgement and stop.
    Detach,
    /// This attachment is no longer the current one.
    Superseded,
    /// The shim went away ([`Stream::next_output`] released the attachment).
    Gone,
}

/// Why a shim cannot attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachError {
    Busy,
    Closed,
}

impl Stream {
    pub fn new(token: Token, stdio: u64, limit: usize, metrics: Arc<StreamCounters>) -> Stream {
        Stream {
            token,
            stdio,
            stderr: stdio + 1,
            limit: limit.max(64 * 1024),
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                buffered: 0,
                shim: ShimState::Absent,
                next_attach: 1,
                lifecycle: Lifecycle::Allocated,
                stdout_eof: false,
                pending_exit: None,
                process: None,
                role: ProcessRole::Init,
                terminal: false,
                held: VecDeque::new(),
                starting: false,
            }),
            wake_shim: Notify::new(),
            wake_space: Notify::new(),
            wake_started: Notify::new(),
            wake_attached: Notify::new(),
            tap_started: std::sync::atomic::AtomicBool::new(false),
            metrics,
            created: std::time::Instant::now(),
            owner: std::sync::OnceLock::new(),
        }
    }

    /// Count the token against `uid`.
    pub fn set_owner(&self, uid: u32) {
        let _ = self.owner.set(uid);
    }

    /// The uid the token counts against.
    pub fn owner(&self) -> Option<u32> {
        self.owner.get().copied()
    }

    /// Never attached, never started (nor starting), and older than `ttl`.
    pub fn unused_for(&self, ttl: std::time::Duration) -> bool {
        let inner = lock(&self.inner);
        inner.lifecycle == Lifecycle::Allocated
            && !inner.starting
            && inner.next_attach == 1
            && matches!(inner.shim, ShimState::Absent)
            && self.created.elapsed() >= ttl
    }

    /// True the first time it is called: whoever gets true emits the tap's `process_started`.
    pub fn claim_tap_start(&self) -> bool {
        !self
            .tap_started
            .swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// A stream with counters of its own, for unit tests.
    #[cfg(test)]
    pub fn for_test(limit: usize) -> Stream {
        use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
        let counters = StreamCounters {
            buffered: Arc::new(BufferAccount::new(Gauge::default())),
            streams_open: Gauge::default(),
            dropped: Counter::default(),
            attaches: Counter::default(),
        };
        Stream::new(Token::generate(), 3, limit, Arc::new(counters))
    }

    pub fn lifecycle(&self) -> Lifecycle {
        lock(&self.inner).lifecycle
    }

    /// The (container, process id) the agent knows this process by.
    pub fn process(&self) -> Option<(String, String)> {
        lock(&self.inner).process.clone()
    }

    pub fn terminal(&self) -> bool {
        lock(&self.inner).terminal
    }

    /// Which command started the process.
    pub fn role(&self) -> ProcessRole {
        lock(&self.inner).role
    }

    /// The process is being started with these names.
    pub fn set_process(
        &self,
        container: String,
        process: String,
        terminal: bool,
        role: ProcessRole,
    ) {
        let mut inner = lock(&self.inner);
        inner.process = Some((container, process));
        inner.terminal = terminal;
        inner.role = role;
    }

    /// Decide where a signal or resize goes: held (in order, bounded) while the process has not started, or
    /// to the started process. One step under the lock, so nothing is held after [`Stream::take_held`] ran
    /// for a started process.
    pub fn control_target(&self, control: HeldControl) -> ControlTarget {
        let mut inner = lock(&self.inner);
        if inner.lifecycle == Lifecycle::Allocated {
            if inner.held.len() >= MAX_HELD_CONTROLS {
                return ControlTarget::HoldFull;
            }
            inner.held.push_back(control);
            return ControlTarget::Held;
        }
        match &inner.process {
            Some((container, process)) => ControlTarget::Now(ProcessName {
                container: container.clone(),
                process: process.clone(),
                role: inner.role,
            }),
            None => ControlTarget::Unknown,
        }
    }

    /// The signals and resizes held before the start, in order (the process has just started).
    pub fn take_held(&self) -> Vec<HeldControl> {
        lock(&self.inner).held.drain(..).collect()
    }

    /// The agent accepted the start command.
    pub fn mark_running(&self) {
        let mut inner = lock(&self.inner);
        if inner.lifecycle == Lifecycle::Allocated {
            inner.lifecycle = Lifecycle::Running;
            self.metrics.streams_open.inc();
        }
        drop(inner);
        self.wake_started.notify_waiters();
    }

    /// A start command is (or no longer is) in flight for this stream.
    pub fn set_starting(&self, starting: bool) {
        lock(&self.inner).starting = starting;
        self.wake_started.notify_waiters();
    }

    /// Wait until a start in flight has an outcome: started, failed, or the stream ended. Returns at once
    /// when no start is in flight.
    pub async fn wait_start_outcome(&self) {
        self.wait_until(&self.wake_started, None, |i| {
            i.lifecycle != Lifecycle::Allocated || !i.starting
        })
        .await;
    }

    /// Wait until the process was started (or the stream ended). Stdin is held until then: an agent answers
    /// data for a sequence it does not know yet with an empty packet, which would read as the stdout EOF.
    pub async fn wait_started(&self) {
        self.wait_until(&self.wake_started, None, |i| {
            i.lifecycle != Lifecycle::Allocated
        })
        .await;
    }

    /// Wait until `ready` holds for the stream's state, checking again at each wake-up of `wake`, until
    /// `deadline` if there is one. Notify-before-check: a wake-up between the check and the wait is not
    /// lost. Returns whether `ready` held.
    async fn wait_until(
        &self,
        wake: &Notify,
        deadline: Option<tokio::time::Instant>,
        ready: impl Fn(&Inner) -> bool,
    ) -> bool {
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if ready(&lock(&self.inner)) {
                return true;
            }
            match deadline {
                Some(at) => {
                    if tokio::time::timeout_at(at, notified).await.is_err() {
                        return ready(&lock(&self.inner));
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Queue agent output. Returns false when the stream is now full and the caller must wait for space.
    pub fn push_output(&self, channel: Channel, data: Bytes) -> bool {
        let mut inner = lock(&self.inner);
        if matches!(inner.lifecycle, Lifecycle::Finished | Lifecycle::Closed) {
            self.metrics.dropped.inc_by(data.len() as u64);
            return true;
        }
        if inner.lifecycle == Lifecycle::Allocated {
            // Output can only come from a started process; the start reply may still be on its way.
            inner.lifecycle = Lifecycle::Running;
            self.metrics.streams_open.inc();
        }
        inner.buffered += data.len();
        self.metrics.buffered.add(data.len());
        inner.queue.push_back(Frame::new(channel, data));
        let has_room = inner.buffered < self.limit;
        drop(inner);
        self.wake_shim.notify_one();
        has_room
    }

    /// Wait until the stream has room again (or `timeout` passes). Returns false on timeout.
    pub async fn wait_for_space(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        self.wait_until(&self.wake_space, Some(deadline), |i| {
            i.buffered < self.limit
                || matches!(i.lifecycle, Lifecycle::Finished | Lifecycle::Closed)
        })
        .await
    }

    /// The stdout EOF packet arrived; an exit waiting for it is delivered now.
    pub fn stdout_eof(&self) {
        let mut inner = lock(&self.inner);
        inner.stdout_eof = true;
        if matches!(inner.lifecycle, Lifecycle::Finished | Lifecycle::Closed) {
            return;
        }
        if let Some(status) = inner.pending_exit.take() {
            self.finish_locked(&mut inner, Frame::exit(status));
        }
    }

    /// True once the stdout EOF packet was seen (the cc-agent dialect's exit code follows it).
    pub fn saw_stdout_eof(&self) -> bool {
        lock(&self.inner).stdout_eof
    }

    /// The process exited. Delivered after the stdout EOF, or after [`EXIT_EOF_GRACE`] without one.
    /// Returns true when the exit frame was queued now; false when it waits for the EOF.
    pub fn exited(&self, status: i32) -> bool {
        let mut inner = lock(&self.inner);
        if matches!(inner.lifecycle, Lifecycle::Finished | Lifecycle::Closed) {
            return true;
        }
        if inner.stdout_eof {
            self.finish_locked(&mut inner, Frame::exit(status));
            true
        } else {
            inner.pending_exit = Some(status);
            false
        }
    }

    /// Deliver a pending exit even though no EOF came (the grace period ran out).
    pub fn flush_pending_exit(&self) {
        let mut inner = lock(&self.inner);
        if matches!(inner.lifecycle, Lifecycle::Finished | Lifecycle::Closed) {
            return;
        }
        if let Some(status) = inner.pending_exit.take() {
            self.finish_locked(&mut inner, Frame::exit(status));
        }
    }

    /// End the stream with an error frame naming the cause (VM lost, buffer stalled, unregistered).
    pub fn fail(&self, message: &str) {
        let mut inner = lock(&self.inner);
        if matches!(inner.lifecycle, Lifecycle::Finished | Lifecycle::Closed) {
            return;
        }
        self.finish_locked(
            &mut inner,
            Frame::new(Channel::Error, Bytes::copy_from_slice(message.as_bytes())),
        );
    }

    fn finish_locked(&self, inner: &mut Inner, last: Frame) {
        if inner.lifecycle == Lifecycle::Running {
            self.metrics.streams_open.dec();
        }
        inner.lifecycle = Lifecycle::Finished;
        inner.pending_exit = None; // exactly one last frame
        self.wake_started.notify_waiters();
        inner.buffered += last.payload.len();
        self.metrics.buffered.add(last.payload.len());
        inner.queue.push_back(last);
        self.wake_shim.notify_one();
        self.wake_space.notify_waiters();
    }

    /// The token was freed: drop what is queued (counted) and refuse further output.
    pub fn close(&self) {
        let mut inner = lock(&self.inner);
        if inner.lifecycle == Lifecycle::Running {
            self.metrics.streams_open.dec();
        }
        inner.lifecycle = Lifecycle::Closed;
        inner.pending_exit = None;
        self.wake_started.notify_waiters();
        self.metrics.buffered.sub(inner.buffered);
        self.metrics.dropped.inc_by(inner.buffered as u64);
        inner.queue.clear();
        inner.buffered = 0;
        drop(inner);
        self.wake_shim.notify_one();
        self.wake_space.notify_waiters();
    }

    /// Attach a shim. Returns the attachment number to pass to [`Stream::take`].
    pub fn attach(&self) -> Result<u64, AttachError> {
        let mut inner = lock(&self.inner);
        if inner.lifecycle == Lifecycle::Closed {
            return Err(AttachError::Closed);
        }
        if !matches!(inner.shim, ShimState::Absent) {
            return Err(AttachError::Busy);
        }
        let n = inner.next_attach;
        inner.next_attach += 1;
        inner.shim = ShimState::Attached(n);
        self.metrics.attaches.inc();
        drop(inner);
        self.wake_attached.notify_waiters();
        Ok(n)
    }

    /// Wait until a shim is attached, up to `timeout`. Returns whether one is.
    pub async fn wait_attached(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        self.wait_until(&self.wake_attached, Some(deadline), |i| {
            matches!(i.shim, ShimState::Attached(_))
        })
        .await
    }

    /// The shim asked for a clean detach that keeps the token: stop after what was written.
    pub fn request_detach(&self, attach: u64) {
        let mut inner = lock(&self.inner);
        if inner.shim == ShimState::Attached(attach) {
            inner.shim = ShimState::Detaching(attach);
        }
        drop(inner);
        self.wake_shim.notify_one();
    }

    /// True while the attachment `attach` is finishing a requested detach.
    pub fn is_detaching(&self, attach: u64) -> bool {
        lock(&self.inner).shim == ShimState::Detaching(attach)
    }

    /// The attachment `attach` is over (detached, or its connection dropped). Returns `unwritten` frames to
    /// the front of the queue so the next attachment gets them.
    pub fn release(&self, attach: u64, unwritten: Vec<Frame>) {
        let mut inner = lock(&self.inner);
        if inner.lifecycle == Lifecycle::Closed {
            // Freed meanwhile: nobody will read these again.
            let bytes: usize = unwritten.iter().map(|f| f.payload.len()).sum();
            self.metrics.dropped.inc_by(bytes as u64);
        } else {
            for f in unwritten.into_iter().rev() {
                inner.buffered += f.payload.len();
                self.metrics.buffered.add(f.payload.len());
                inner.queue.push_front(f);
            }
        }
        if matches!(inner.shim, ShimState::Attached(n) | ShimState::Detaching(n) if n == attach) {
            inner.shim = ShimState::Absent;
        }
    }

    /// Take up to [`MAX_BATCH`] bytes of frames for the attachment `attach`.
    pub fn take(&self, attach: u64) -> Take {
        let mut inner = lock(&self.inner);
        match inner.shim {
            ShimState::Attached(n) if n == attach => {}
            ShimState::Detaching(n) if n == attach => return Take::Detach,
            _ => return Take::Superseded,
        }
        if inner.lifecycle == Lifecycle::Closed {
            return Take::Last(Vec::new());
        }
        let mut frames = Vec::new();
        let mut bytes = 0;
        while let Some(f) = inner.queue.front() {
            if !frames.is_empty() && bytes + f.payload.len() > MAX_BATCH {
                break;
            }
            bytes += f.payload.len();
            if let Some(f) = inner.queue.pop_front() {
                frames.push(f);
            }
        }
        let was_full = inner.buffered >= self.limit;
        inner.buffered -= bytes;
        self.metrics.buffered.sub(bytes);
        let last = inner.lifecycle == Lifecycle::Finished && inner.queue.is_empty();
        drop(inner);
        if was_full && bytes > 0 {
            self.wake_space.notify_waiters();
        }
        if last {
            Take::Last(frames)
        } else {
            Take::Frames(frames)
        }
    }

    /// Wait for the next thing a shim writer must do: frames to write (never an empty batch), the end, a
    /// detach, or `gone` (the shim's connection ended; the attachment is released, the token kept).
    pub async fn next_output(
        &self,
        attach: u64,
        gone: &tokio_util::sync::CancellationToken,
    ) -> Take {
        loop {
            let notified = self.wake_shim.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.take(attach) {
                Take::Frames(frames) if frames.is_empty() => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = gone.cancelled() => {
                            self.release(attach, Vec::new());
                            return Take::Gone;
                        }
                    }
                }
                other => return other,
            }
        }
    }

    /// What is queued for the shim, whether the stdout EOF arrived, and an exit status still waiting for it
    /// (saved at shutdown).
    pub fn snapshot(&self) -> (Vec<Frame>, bool, Option<i32>) {
        let inner = lock(&self.inner);
        (
            inner.queue.iter().cloned().collect(),
            inner.stdout_eof,
            inner.pending_exit,
        )
    }

    /// Put back what [`Stream::snapshot`] saved before a restart.
    pub fn restore(&self, frames: Vec<Frame>, stdout_eof: bool) {
        for f in frames {
            match f.channel {
                Channel::Stdout | Channel::Stderr => {
                    self.push_output(f.channel, f.payload);
                }
                Channel::Exit => {
                    self.stdout_eof();
                    if let Some(status) = f.exit_status() {
                        self.exited(status);
                    }
                }
                Channel::Error => self.fail(&String::from_utf8_lossy(&f.payload)),
                Channel::Stdin | Channel::Control => {}
            }
        }
        if stdout_eof {
            self.stdout_eof();
        }
    }

    /// Bytes queued for the shim.
    pub fn buffered(&self) -> usize {
        lock(&self.inner).buffered
    }
}

#[cfg(test)]
mod tests;
