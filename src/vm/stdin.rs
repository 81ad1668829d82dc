//! A VM's stdin multiplexer: every shim's stdin, queued per stream, taken round-robin onto the VM's one I/O
//! channel; and the choice of the stream to fail when that channel stops moving.
//!
//! Roles:
//! - shims (through [`super::Vm::send_stdin`]) [`StdinMux::push`] stdin for their stream's sequence number.
//!   Each stream may queue at most `--stdin-buffer` bytes and the VM at most `--vm-stdin-buffer`; past either,
//!   the shim waits (backpressure toward that shim only, as far as the VM's bound allows);
//! - the VM's I/O writer ([`super::io`]) takes batches with [`StdinMux::next_batch`]: one quantum
//!   ([`QUANTUM`]) per stream in turn, so a stream with megabytes queued cannot get ahead of a stream with a
//!   few bytes;
//! - when the channel makes no write progress for `--stdin-stall-timeout`, the writer asks its
//!   [`StallWindow`] for the culprit and fails that stream's stdin ([`StdinMux::fail`]): what it queued is
//!   dropped, its shim's pending and later pushes fail at once.
//!
//! Why a stalled channel has a culprit: the agents' protocol has no per-stream acknowledgement of stdin. An
//! agent whose single I/O reader writes each packet into its process's stdin pipe (cc-agent, the test agent
//! without `--strict`) stops reading the whole channel once one process leaves its stdin unread and the pipe
//! is full; every other process of the VM then stops receiving stdin too. The packet the agent is blocked on
//! was written shortly before the channel filled, so the culprit is taken from the last [`STALL_WINDOW`] bytes
//! written: the stream with the most bytes there (a stream flooding a process that does not read has written
//! almost all of them; one sending a line now and then has written next to nothing).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::sync::lock;

/// Default of `--stdin-buffer`: stdin bytes one stream may have queued in the daemon before its shim waits.
pub const DEFAULT_STDIN_BUFFER: usize = 256 * 1024;

/// Default of `--vm-stdin-buffer`: stdin bytes queued across one VM's streams before every shim of the VM
/// waits.
pub const DEFAULT_VM_STDIN_BUFFER: usize = 4 << 20;

/// Default of `--stdin-stall-timeout`: how long a VM's I/O channel may take no stdin before the likely
/// culprit is failed and killed.
pub const DEFAULT_STDIN_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Smallest stdin bound accepted: one quantum, so every push can make progress.
pub const MIN_STDIN_BUFFER: usize = QUANTUM;

/// Bytes one stream contributes to a batch before the next stream with stdin queued gets its turn.
pub const QUANTUM: usize = 16 * 1024;

/// The most recently written stdin bytes a culprit is chosen from when the channel stalls: more than the
/// transports buffer between the daemon and the agent's reader (unix sockets and vsock buffer a few hundred
/// KiB), small enough that traffic consumed long before the stall does not count.
pub const STALL_WINDOW: usize = 512 * 1024;

/// Most entries [`StallWindow`] keeps (a run of writes for one stream is one entry): streams taking turns with
/// tiny writes cannot grow it past this, whatever the bytes.
pub const STALL_WINDOW_ENTRIES: usize = 4096;

/// Why stdin was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StdinError {
    /// The stream's stdin was failed (its process stopped reading and stalled the VM's I/O channel).
    #[error("the stream's stdin was failed: its process stopped reading while the VM's I/O channel was stalled")]
    Failed,
}

/// One stream's queued stdin.
#[derive(Default)]
struct Queue {
    /// Pieces in order; an empty piece closes the process's stdin.
    pieces: VecDeque<Bytes>,
    bytes: usize,
}

struct Inner {
    queues: HashMap<u64, Queue>,
    /// Sequence numbers with something queued, in turn order.
    turn: VecDeque<u64>,
    total: usize,
    /// Sequence numbers whose stdin was failed.
    failed: HashSet<u64>,
}

/// A VM's per-stream stdin queues.
pub struct StdinMux {
    inner: Mutex<Inner>,
    /// Wakes the writer: stdin was queued.
    wake_writer: Notify,
    /// Wakes shims waiting for room: stdin was taken or a stream failed.
    wake_senders: Notify,
    stream_bound: usize,
    vm_bound: usize,
}

impl StdinMux {
    pub fn new(stream_bound: usize, vm_bound: usize) -> StdinMux {
        StdinMux {
            inner: Mutex::new(Inner {
                queues: HashMap::new(),
                turn: VecDeque::new(),
                total: 0,
                failed: HashSet::new(),
            }),
            wake_writer: Notify::new(),
            wake_senders: Notify::new(),
            stream_bound: stream_bound.max(MIN_STDIN_BUFFER),
            vm_bound: vm_bound.max(MIN_STDIN_BUFFER),
        }
    }

    /// Queue stdin for `seq` (empty data closes the process's stdin), waiting while the stream or the VM is at
    /// its bound. Data is queued in pieces of at most [`QUANTUM`], each waiting for room, so the bounds are
    /// exceeded by less than one piece.
    pub async fn push(&self, seq: u64, data: Bytes) -> Result<(), StdinError> {
        if data.is_empty() {
            return self.push_piece(seq, data).await;
        }
        let mut rest = data;
        while !rest.is_empty() {
            let piece = rest.split_to(rest.len().min(QUANTUM));
            self.push_piece(seq, piece).await?;
        }
        Ok(())
    }

    async fn push_piece(&self, seq: u64, piece: Bytes) -> Result<(), StdinError> {
        loop {
            let notified = self.wake_senders.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut inner = lock(&self.inner);
                if inner.failed.contains(&seq) {
                    return Err(StdinError::Failed);
                }
                let queued = inner.queues.get(&seq).map_or(0, |q| q.bytes);
                // A close (empty piece) never waits: it adds nothing.
                if piece.is_empty() || (queued < self.stream_bound && inner.total < self.vm_bound) {
                    let len = piece.len();
                    let q = inner.queues.entry(seq).or_default();
                    let was_empty = q.pieces.is_empty();
                    q.pieces.push_back(piece);
                    q.bytes += len;
                    inner.total += len;
                    if was_empty {
                        inner.turn.push_back(seq);
                    }
                    drop(inner);
                    self.wake_writer.notify_one();
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// Take the next batch, at most about `max` bytes: one [`QUANTUM`] per stream in turn. Empty when nothing is
    /// queued.
    pub fn take_batch(&self, max: usize) -> Vec<(u64, Bytes)> {
        let mut inner = lock(&self.inner);
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        while bytes < max {
            let Some(seq) = inner.turn.pop_front() else {
                break;
            };
            let Some(q) = inner.queues.get_mut(&seq) else {
                continue;
            };
            let mut quantum = 0usize;
            while quantum < QUANTUM {
                let Some(front) = q.pieces.front_mut() else {
                    break;
                };
                if front.is_empty() {
                    // A close: it goes out behind what came before it.
                    q.pieces.pop_front();
                    batch.push((seq, Bytes::new()));
                    continue;
                }
                let n = front.len().min(QUANTUM - quantum);
                let piece = front.split_to(n);
                if front.is_empty() {
                    q.pieces.pop_front();
                }
                q.bytes -= n;
                quantum += n;
                batch.push((seq, piece));
            }
            let more = !q.pieces.is_empty();
            if !more {
                inner.queues.remove(&seq);
            }
            inner.total -= quantum;
            bytes += quantum;
            if more {
                inner.turn.push_back(seq);
            }
        }
        drop(inner);
        if !batch.is_empty() {
            self.wake_senders.notify_waiters();
        }
        batch
    }

    /// Wait for a batch (see [`StdinMux::take_batch`]); never returns an empty one.
    pub async fn next_batch(&self, max: usize) -> Vec<(u64, Bytes)> {
        loop {
            let notified = self.wake_writer.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let batch = self.take_batch(max);
            if !batch.is_empty() {
                return batch;
            }
            notified.await;
        }
    }

    /// Fail `seq`'s stdin: drop what it queued (returns the bytes dropped) and refuse its pushes from now on.
    pub fn fail(&self, seq: u64) -> usize {
        let mut inner = lock(&self.inner);
        inner.failed.insert(seq);
        let dropped = inner.queues.remove(&seq).map_or(0, |q| q.bytes);
        inner.total -= dropped;
        inner.turn.retain(|s| *s != seq);
        drop(inner);
        self.wake_senders.notify_waiters();
        dropped
    }

    /// Forget `seq` (its token was freed): drop what it queued; a new token never reuses a sequence number.
    pub fn forget(&self, seq: u64) {
        let mut inner = lock(&self.inner);
        let dropped = inner.queues.remove(&seq).map_or(0, |q| q.bytes);
        inner.total -= dropped;
        inner.turn.retain(|s| *s != seq);
        inner.failed.remove(&seq);
        drop(inner);
        self.wake_senders.notify_waiters();
    }

    /// Stdin bytes queued across the VM's streams.
    pub fn queued(&self) -> usize {
        lock(&self.inner).total
    }

    /// Whether `seq`'s stdin was failed.
    pub fn is_failed(&self, seq: u64) -> bool {
        lock(&self.inner).failed.contains(&seq)
    }
}

/// The last [`STALL_WINDOW`] stdin bytes written to the channel, by stream: what the culprit of a stall is
/// chosen from. Owned by the I/O writer.
#[derive(Default)]
pub struct StallWindow {
    writes: VecDeque<(u64, usize)>,
    total: usize,
}

impl StallWindow {
    /// `len` stdin bytes for `seq` went to the channel.
    pub fn wrote(&mut self, seq: u64, len: usize) {
        if len == 0 {
            return;
        }
        match self.writes.back_mut() {
            Some((last, n)) if *last == seq => *n += len,
            _ => self.writes.push_back((seq, len)),
        }
        self.total += len;
        while self.writes.len() > STALL_WINDOW_ENTRIES {
            if let Some((_, n)) = self.writes.pop_front() {
                self.total -= n;
            }
        }
        while self.total > STALL_WINDOW {
            let Some((s, n)) = self.writes.pop_front() else {
                break;
            };
            let excess = self.total - STALL_WINDOW;
            if n > excess {
                self.writes.push_front((s, n - excess));
                self.total -= excess;
            } else {
                self.total -= n;
            }
        }
    }

    /// The stream with the most bytes in the window among those `eligible` says may be failed; ties go to the
    /// stream whose bytes came first (nearer the agent's reader). `None` when no eligible stream wrote.
    pub fn culprit(&self, eligible: impl Fn(u64) -> bool) -> Option<u64> {
        let mut by_seq: Vec<(u64, usize, usize)> = Vec::new(); // seq, bytes, first position
        for (pos, (seq, n)) in self.writes.iter().enumerate() {
            match by_seq.iter_mut().find(|(s, _, _)| s == seq) {
                Some(e) => e.1 += n,
                None => by_seq.push((*seq, *n, pos)),
            }
        }
        by_seq
            .into_iter()
            .filter(|(seq, _, _)| eligible(*seq))
            .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))
            .map(|(seq, _, _)| seq)
    }

    /// Forget `seq`'s bytes (it was failed: the next stall, if any, has another culprit).
    pub fn forget(&mut self, seq: u64) {
        let total = &mut self.total;
        self.writes.retain(|(s, n)| {
            if *s == seq {
                *total -= n;
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn bytes(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[test]
    fn batches_take_one_quantum_per_stream_in_turn() {
        let mux = StdinMux::new(1 << 20, 8 << 20);
        futures::executor::block_on(async {
            mux.push(3, bytes(4 * QUANTUM)).await.expect("push");
            mux.push(5, Bytes::from_static(b"hello"))
                .await
                .expect("push");
            mux.push(5, Bytes::new()).await.expect("close");
        });
        let batch = mux.take_batch(QUANTUM + 1);
        let seqs: Vec<(u64, usize)> = batch.iter().map(|(s, b)| (*s, b.len())).collect();
        // The flooding stream gets one quantum, then the small stream all it has (its close included).
        assert_eq!(seqs, vec![(3, QUANTUM), (5, 5), (5, 0)]);
        let rest: usize = mux
            .take_batch(usize::MAX)
            .iter()
            .map(|(_, b)| b.len())
            .sum();
        assert_eq!(rest, 3 * QUANTUM);
        assert_eq!(mux.queued(), 0);
    }

    #[tokio::test]
    async fn a_full_stream_waits_alone_and_a_failed_one_is_refused() {
        let mux = Arc::new(StdinMux::new(QUANTUM, 8 * QUANTUM));
        mux.push(3, bytes(QUANTUM)).await.expect("fits");
        let m = mux.clone();
        let blocked = tokio::spawn(async move { m.push(3, bytes(10)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!blocked.is_finished(), "the stream is at its bound");
        // Another stream of the same VM is not held up.
        tokio::time::timeout(Duration::from_secs(1), mux.push(5, bytes(100)))
            .await
            .expect("another stream queues at once")
            .expect("push");
        assert_eq!(mux.fail(3), QUANTUM);
        let r = tokio::time::timeout(Duration::from_secs(1), blocked)
            .await
            .expect("the waiting shim is woken")
            .expect("join");
        assert_eq!(r, Err(StdinError::Failed));
        assert_eq!(mux.push(3, bytes(1)).await, Err(StdinError::Failed));
        assert_eq!(mux.queued(), 100);
        mux.forget(3);
        assert!(!mux.is_failed(3));
    }

    #[tokio::test]
    async fn the_vm_bound_holds_every_stream() {
        let mux = Arc::new(StdinMux::new(4 * QUANTUM, 2 * QUANTUM));
        mux.push(3, bytes(2 * QUANTUM)).await.expect("fits");
        let m = mux.clone();
        let blocked = tokio::spawn(async move { m.push(5, bytes(1)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!blocked.is_finished(), "the VM is at its bound");
        assert_eq!(mux.take_batch(QUANTUM).len(), 1);
        tokio::time::timeout(Duration::from_secs(1), blocked)
            .await
            .expect("room was made")
            .expect("join")
            .expect("push");
    }

    #[test]
    fn the_culprit_is_the_stream_with_most_recent_bytes() {
        let mut w = StallWindow::default();
        // Traffic long before the stall slides out of the window.
        w.wrote(7, 10 * STALL_WINDOW);
        w.wrote(3, 300 * 1024);
        w.wrote(5, 10);
        w.wrote(3, 100 * 1024);
        w.wrote(7, 50 * 1024);
        assert_eq!(w.total, STALL_WINDOW);
        assert_eq!(w.culprit(|_| true), Some(3));
        assert_eq!(w.culprit(|s| s != 3), Some(7));
        w.forget(3);
        assert_eq!(w.culprit(|_| true), Some(7));
        assert_eq!(w.culprit(|s| s == 9), None);
    }

    #[test]
    fn tiny_writes_taking_turns_keep_the_window_bounded() {
        let mut w = StallWindow::default();
        for i in 0..10 * STALL_WINDOW_ENTRIES {
            w.wrote(3 + (i as u64 % 2) * 2, 1);
        }
        assert_eq!(w.writes.len(), STALL_WINDOW_ENTRIES);
        assert_eq!(w.total, STALL_WINDOW_ENTRIES);
    }

    #[test]
    fn a_tie_goes_to_the_earlier_bytes() {
        let mut w = StallWindow::default();
        w.wrote(5, 100);
        w.wrote(3, 100);
        assert_eq!(w.culprit(|_| true), Some(5));
    }
}
