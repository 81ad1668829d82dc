//! The one shim writer: moves a stream's output to an attached shim, for every shim protocol.
//!
//! Roles: the [`Stream`] hands out batches ([`Stream::next_output`]); a [`ShimEncoder`] turns a batch into the
//! protocol's bytes (stream frames for an attach, legacy v2 frames for a legacy shim); a [`ShimSink`] puts
//! the bytes on the shim's connection. Events the driver reacts to:
//!
//! - a batch is ready: encode it and write it, racing the write against `gone` (the shim's connection ended,
//!   or the daemon is stopping), so a shim that stops reading never holds up a teardown;
//! - a write fails or is cut short: the whole batch goes back to the front of the stream's queue (delivery is
//!   at-least-once across an abrupt drop) and the attachment is released;
//! - the last batch (exit or error frame) is written: the sink is finished and the stream is complete;
//! - the shim asked to detach: the protocol's acknowledgement is written and the attachment released;
//! - `gone` fires while idle, or another attachment took over: stop.
//!
//! What the end means for the token and the metrics is the caller's: see [`WriterEnd`].

use std::future::Future;

use bytes::{Bytes, BytesMut};
use cc_proxy_api::stream::Frame;
use tokio_util::sync::CancellationToken;

use super::{Stream, Take};

/// Turns stream frames into a shim protocol's bytes.
pub trait ShimEncoder {
    /// Append `frames`; `last` when they end the stream (the encoder makes sure its protocol reports an
    /// ending even when the batch carries no exit frame).
    fn encode(&self, frames: &[Frame], last: bool, buf: &mut BytesMut);
    /// Append the acknowledgement of a detach (nothing when the protocol has none).
    fn detach_ack(&self, buf: &mut BytesMut);
}

/// Where a shim writer's bytes go.
pub trait ShimSink {
    /// Write all of `buf`; false when it could not be written.
    fn write(&mut self, buf: Bytes) -> impl Future<Output = bool> + Send;
    /// The stream is complete or detached: end the output side if the protocol does (half-close).
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

/// How a shim writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterEnd {
    /// `gone` fired while nothing was being written; the attachment is released, the token kept.
    Gone,
    /// A write failed or was cut short; the batch went back to the stream, the attachment is released.
    WriteFailed,
    /// The last frame was written; the stream is complete (the caller frees the token).
    Finished,
    /// The shim's detach was acknowledged; the attachment is released, the token kept.
    Detached,
    /// Another attachment took over.
    Superseded,
}

/// Write `stream`'s output for attachment `attach` until one of the [`WriterEnd`]s.
pub async fn drive<E: ShimEncoder, S: ShimSink>(
    stream: &Stream,
    attach: u64,
    encoder: &E,
    sink: &mut S,
    gone: &CancellationToken,
) -> WriterEnd {
    loop {
        let (frames, last) = match stream.next_output(attach, gone).await {
            Take::Frames(frames) => (frames, false),
            Take::Last(frames) => (frames, true),
            Take::Gone => return WriterEnd::Gone,
            Take::Superseded => return WriterEnd::Superseded,
            Take::Detach => {
                let mut buf = BytesMut::new();
                encoder.detach_ack(&mut buf);
                if !buf.is_empty() {
                    write(sink, buf.freeze(), gone).await;
                }
                sink.finish().await;
                stream.release(attach, Vec::new());
                return WriterEnd::Detached;
            }
        };
        // One buffer sized for the batch; nothing is held between batches, so an idle attachment costs none.
        let len = frames
            .iter()
            .map(|f| cc_proxy_api::stream::HEADER_LEN + f.payload.len())
            .sum();
        let mut buf = BytesMut::with_capacity(len);
        encoder.encode(&frames, last, &mut buf);
        if !write(sink, buf.freeze(), gone).await {
            // Keep the token: the next shim gets the rest, the exit status included.
            stream.release(attach, frames);
            return WriterEnd::WriteFailed;
        }
        if last {
            sink.finish().await;
            return WriterEnd::Finished;
        }
    }
}

/// A write that gives up when `gone` fires: a shim too slow to take a batch must not hold up a release.
async fn write<S: ShimSink>(sink: &mut S, buf: Bytes, gone: &CancellationToken) -> bool {
    tokio::select! {
        ok = sink.write(buf) => ok,
        _ = gone.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use cc_proxy_api::stream::Channel;

    use super::*;

    /// Writes each frame's payload followed by `|`; a detach is `D`, the end `E`.
    struct Plain;

    impl ShimEncoder for Plain {
        fn encode(&self, frames: &[Frame], last: bool, buf: &mut BytesMut) {
            for f in frames {
                buf.extend_from_slice(&f.payload);
                buf.extend_from_slice(b"|");
            }
            if last {
                buf.extend_from_slice(b"E");
            }
        }
        fn detach_ack(&self, buf: &mut BytesMut) {
            buf.extend_from_slice(b"D");
        }
    }

    /// Collects what is written; `stall` makes every write hang (a shim that stopped reading), `fail`
    /// makes it fail.
    #[derive(Default)]
    struct Recorder {
        written: Vec<u8>,
        stall: bool,
        fail: bool,
        finished: bool,
    }

    impl ShimSink for Recorder {
        async fn write(&mut self, buf: Bytes) -> bool {
            if self.stall {
                std::future::pending::<()>().await;
            }
            if self.fail {
                return false;
            }
            self.written.extend_from_slice(&buf);
            true
        }
        async fn finish(&mut self) {
            self.finished = true;
        }
    }

    fn stream() -> Stream {
        Stream::for_test(64 * 1024)
    }

    async fn run(
        s: &Stream,
        attach: u64,
        sink: &mut Recorder,
        gone: &CancellationToken,
    ) -> WriterEnd {
        match tokio::time::timeout(Duration::from_secs(5), drive(s, attach, &Plain, sink, gone))
            .await
        {
            Ok(end) => end,
            Err(_) => panic!("the writer did not end"),
        }
    }

    #[tokio::test]
    async fn output_then_exit_is_written_in_order_and_finishes() {
        let s = stream();
        let n = s.attach().unwrap_or(0);
        s.push_output(Channel::Stdout, Bytes::from_static(b"a"));
        s.push_output(Channel::Stderr, Bytes::from_static(b"b"));
        s.stdout_eof();
        s.exited(0);
        let mut sink = Recorder::default();
        let end = run(&s, n, &mut sink, &CancellationToken::new()).await;
        assert_eq!(end, WriterEnd::Finished);
        assert!(sink.written.starts_with(b"a|b|"), "{:?}", sink.written);
        assert!(sink.written.ends_with(b"E"));
        assert!(sink.finished);
    }

    #[tokio::test]
    async fn a_failed_write_gives_the_batch_back_for_the_next_attachment() {
        let s = stream();
        let n = s.attach().unwrap_or(0);
        s.push_output(Channel::Stdout, Bytes::from_static(b"kept"));
        let mut sink = Recorder {
            fail: true,
            ..Default::default()
        };
        assert_eq!(
            run(&s, n, &mut sink, &CancellationToken::new()).await,
            WriterEnd::WriteFailed
        );
        let m = s.attach().unwrap_or(0);
        assert_ne!(m, 0, "the attachment was released");
        match s.take(m) {
            Take::Frames(frames) => assert_eq!(&frames[0].payload[..], b"kept"),
            _ => panic!("the batch was not given back"),
        }
    }

    #[tokio::test]
    async fn a_shim_that_stops_reading_does_not_hold_up_its_release() {
        let s = stream();
        let n = s.attach().unwrap_or(0);
        s.push_output(Channel::Stdout, Bytes::from_static(b"stuck"));
        let gone = CancellationToken::new();
        let mut sink = Recorder {
            stall: true,
            ..Default::default()
        };
        let g = gone.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            g.cancel();
        });
        assert_eq!(run(&s, n, &mut sink, &gone).await, WriterEnd::WriteFailed);
        assert_eq!(s.buffered(), 5, "the unwritten batch is queued again");
    }

    #[tokio::test]
    async fn a_detach_is_acknowledged_and_keeps_the_queue() {
        let s = stream();
        let n = s.attach().unwrap_or(0);
        s.request_detach(n);
        let mut sink = Recorder::default();
        assert_eq!(
            run(&s, n, &mut sink, &CancellationToken::new()).await,
            WriterEnd::Detached
        );
        assert_eq!(sink.written, b"D");
        assert!(s.attach().is_ok(), "the token can be attached again");
    }

    #[tokio::test]
    async fn gone_while_idle_releases_and_a_superseded_writer_stops() {
        let s = stream();
        let n = s.attach().unwrap_or(0);
        let gone = CancellationToken::new();
        gone.cancel();
        let mut sink = Recorder::default();
        assert_eq!(run(&s, n, &mut sink, &gone).await, WriterEnd::Gone);
        let m = s.attach().unwrap_or(0);
        assert_eq!(
            run(&s, n, &mut sink, &CancellationToken::new()).await,
            WriterEnd::Superseded
        );
        assert!(m > n);
    }
}
