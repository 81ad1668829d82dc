//! The guard on every client connection's bytes: slow consumers and idle connections.
//!
//! [`Guarded`] wraps a client connection's I/O below every protocol (HTTP/1.1, HTTP/2, WebSocket, legacy).
//! It reacts to these events:
//! - a write to the client cannot proceed (the client does not read and the socket's buffer is full): the
//!   connection's [`WriteState`] becomes `Blocked`; while it is, reads are paused, so a client that sends
//!   requests and never reads the answers cannot make the daemon queue answers without end (what is queued
//!   is bounded by what was read before the block: the socket buffers and the requests then in flight);
//! - a write stays blocked for `--client-write-timeout`: the client is a slow consumer; the connection is
//!   closed (reads end, writes fail), logged and counted (`cc_proxy_limit_refusals_total{limit="slow_consumer"}`);
//! - a write proceeds: the state is `Flowing` again and a paused read is woken;
//! - no byte moves either way for `--client-idle-timeout` while the connection is idle ([`Activity::idle`]:
//!   no request in flight, no subscription): the connection is closed as idle (`limit="idle"`);
//! - the connection subscribes (events, tap; [`Activity::set_subscribed`]): it is never idle from then on (a
//!   quiet subscription is legitimate), but it is still closed as a slow consumer;
//! - the connection becomes an attached stream ([`Activity::set_attached`]): the guard stands aside for
//!   good. A stream has its own bound on a shim that does not read (the stream buffer and
//!   `--stall-timeout`), its stdin must keep flowing while its output waits, and it may be quiet.
//!
//! Requests in flight are counted by the RPC middleware through [`Activity::begin`]; the count also bounds
//! them per connection (`--max-requests-per-connection`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::admin::metrics::{LimitKind, METRICS};

/// What one connection is doing, shared by its guard, its request handlers and its RPC middleware.
#[derive(Debug, Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    subscribed: AtomicBool,
    attached: AtomicBool,
}

/// One request in flight on a connection; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    /// Start a request, unless `max` are in flight already.
    pub fn begin(self: &Arc<Self>, max: usize) -> Option<InFlight> {
        let mut now = self.in_flight.load(Ordering::Acquire);
        loop {
            if now >= max {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                now,
                now + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(InFlight(self.clone())),
                Err(actual) => now = actual,
            }
        }
    }

    /// The connection holds a subscription: it is never idle from here on.
    pub fn set_subscribed(&self) {
        self.subscribed.store(true, Ordering::Release);
    }

    /// The connection is now an attached stream: the guard stands aside.
    pub fn set_attached(&self) {
        self.attached.store(true, Ordering::Release);
    }

    fn attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Nothing in flight, no subscription, no stream.
    pub fn idle(&self) -> bool {
        !self.attached()
            && !self.subscribed.load(Ordering::Acquire)
            && self.in_flight.load(Ordering::Acquire) == 0
    }
}

/// The guard's timeouts.
#[derive(Debug, Clone, Copy)]
pub struct GuardTimeouts {
    /// `--client-write-timeout`.
    pub write: Duration,
    /// `--client-idle-timeout`.
    pub idle: Duration,
}

/// Whether the daemon's writes to the client are moving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteState {
    Flowing,
    /// A write returned `Pending` at `since` and none has proceeded since.
    Blocked {
        since: Instant,
    },
}

/// Why the guard closed the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    SlowConsumer,
    Idle,
}

/// A client connection's I/O under the guard (see the module comment).
pub struct Guarded<S> {
    inner: S,
    activity: Arc<Activity>,
    timeouts: GuardTimeouts,
    write: WriteState,
    write_deadline: Pin<Box<Sleep>>,
    /// A read paused while the write is blocked, woken when it proceeds.
    paused_read: Option<Waker>,
    last_io: Instant,
    idle_deadline: Pin<Box<Sleep>>,
    closed: Option<Closed>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, activity: Arc<Activity>, timeouts: GuardTimeouts) -> Guarded<S> {
        let now = Instant::now();
        Guarded {
            inner,
            activity,
            timeouts,
            write: WriteState::Flowing,
            write_deadline: Box::pin(tokio::time::sleep_until(now + timeouts.write)),
            paused_read: None,
            last_io: now,
            idle_deadline: Box::pin(tokio::time::sleep_until(now + timeouts.idle)),
            closed: None,
        }
    }

    fn close(&mut self, why: Closed) {
        if self.closed.is_some() {
            return;
        }
        self.closed = Some(why);
        match why {
            Closed::SlowConsumer => {
                METRICS.limit_refused(LimitKind::SlowConsumer);
                tracing::warn!(timeout = ?self.timeouts.write,
                    "closing client connection: it has not read its responses (slow consumer)");
            }
            Closed::Idle => {
                METRICS.limit_refused(LimitKind::Idle);
                tracing::info!(timeout = ?self.timeouts.idle, "closing idle client connection");
            }
        }
        if let Some(w) = self.paused_read.take() {
            w.wake();
        }
    }

    fn closed_error(why: Closed) -> io::Error {
        match why {
            Closed::SlowConsumer => io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read its responses within --client-write-timeout",
            ),
            Closed::Idle => io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection was idle for --client-idle-timeout",
            ),
        }
    }

    /// A write proceeded: reads resume.
    fn wrote(&mut self) {
        self.last_io = Instant::now();
        if self.write != WriteState::Flowing {
            self.write = WriteState::Flowing;
            if let Some(w) = self.paused_read.take() {
                w.wake();
            }
        }
    }

    /// A write could not proceed: start or check the slow-consumer clock.
    fn write_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.activity.attached() {
            return Poll::Pending;
        }
        if self.write == WriteState::Flowing {
            let since = Instant::now();
            self.write = WriteState::Blocked { since };
            self.write_deadline
                .as_mut()
                .reset(since + self.timeouts.write);
        }
        if self.write_deadline.as_mut().poll(cx).is_ready() {
            self.close(Closed::SlowConsumer);
            return Poll::Ready(Err(Self::closed_error(Closed::SlowConsumer)));
        }
        Poll::Pending
    }

    /// A read found nothing: check the idle clock.
    fn read_pending(&mut self, cx: &mut Context<'_>) -> bool {
        let due = self.last_io + self.timeouts.idle;
        if self.idle_deadline.deadline() != due {
            self.idle_deadline.as_mut().reset(due);
        }
        while self.idle_deadline.as_mut().poll(cx).is_ready() {
            if self.activity.idle() && self.write == WriteState::Flowing {
                self.close(Closed::Idle);
                return true;
            }
            // Busy: look again one idle period from now.
            let next = Instant::now() + self.timeouts.idle;
            self.idle_deadline.as_mut().reset(next);
        }
        false
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closed.is_some() {
            // End of file: every protocol ends its session cleanly on it.
            return Poll::Ready(Ok(()));
        }
        if matches!(this.write, WriteState::Blocked { .. }) && !this.activity.attached() {
            this.paused_read = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.last_io = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if !this.activity.attached() && this.read_pending(cx) {
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(why) = this.closed {
            return Poll::Ready(Err(Self::closed_error(why)));
        }
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                this.wrote();
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.write_pending(cx),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn timeouts(write_ms: u64, idle_ms: u64) -> GuardTimeouts {
        GuardTimeouts {
            write: Duration::from_millis(write_ms),
            idle: Duration::from_millis(idle_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_does_not_read_is_closed_after_the_write_timeout() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let activity = Arc::new(Activity::default());
        let mut g = Guarded::new(ours, activity, timeouts(500, 60_000));
        let big = vec![7u8; 64 * 1024];
        let r = tokio::time::timeout(Duration::from_secs(5), g.write_all(&big)).await;
        assert!(
            matches!(r, Ok(Err(ref e)) if e.kind() == io::ErrorKind::TimedOut),
            "{r:?}"
        );
        // Closed: reads end, and the peer got only what fit.
        let mut buf = [0u8; 8];
        assert_eq!(g.read(&mut buf).await.ok(), Some(0));
        let mut got = vec![0u8; 4096];
        assert_eq!(theirs.read(&mut got).await.ok(), Some(1024));
    }

    #[tokio::test(start_paused = true)]
    async fn reads_pause_while_a_write_is_blocked_and_resume_when_it_proceeds() {
        let (ours, mut theirs) = tokio::io::duplex(16);
        let activity = Arc::new(Activity::default());
        let g = Guarded::new(ours, activity, timeouts(60_000, 120_000));
        let (mut rd, mut wr) = tokio::io::split(g);
        theirs.write_all(b"abc").await.ok();
        // The write blocks (16-byte pipe, 32 bytes): the read, though data waits, does not complete.
        let writer = tokio::spawn(async move { wr.write_all(&[1u8; 32]).await.map(|_| wr) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut buf = [0u8; 3];
        let paused = tokio::time::timeout(Duration::from_secs(1), rd.read(&mut buf)).await;
        assert!(paused.is_err(), "read while the write was blocked");
        // The peer reads: the write proceeds and the read completes.
        let mut sink = [0u8; 32];
        assert!(theirs.read_exact(&mut sink).await.is_ok());
        assert!(matches!(writer.await, Ok(Ok(_))));
        assert_eq!(rd.read(&mut buf).await.ok(), Some(3));
        assert_eq!(&buf, b"abc");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_but_not_one_with_a_request_in_flight_or_a_stream() {
        for case in ["idle", "in-flight", "subscribed", "attached"] {
            let (ours, _theirs) = tokio::io::duplex(64);
            let activity = Arc::new(Activity::default());
            let held = match case {
                "in-flight" => activity.begin(1),
                "subscribed" => {
                    activity.set_subscribed();
                    None
                }
                "attached" => {
                    activity.set_attached();
                    None
                }
                _ => None,
            };
            let mut g = Guarded::new(ours, activity.clone(), timeouts(1000, 1000));
            let mut buf = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_secs(10), g.read(&mut buf)).await;
            match case {
                "idle" => assert_eq!(r.ok().and_then(|r| r.ok()), Some(0), "{case}"),
                _ => assert!(r.is_err(), "{case}: closed though not idle"),
            }
            drop(held);
        }
    }

    #[test]
    fn in_flight_is_bounded_and_released_on_drop() {
        let a = Arc::new(Activity::default());
        let one = a.begin(2);
        let two = a.begin(2);
        assert!(one.is_some() && two.is_some());
        assert!(a.begin(2).is_none());
        drop(one);
        assert!(a.begin(2).is_some());
        assert!(!a.idle());
    }
}
