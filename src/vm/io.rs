//! A VM's I/O channel: one reader task demultiplexing agent output to streams by sequence number, and one
//! writer task multiplexing every shim's stdin onto the channel.
//!
//! The writer takes stdin round-robin from the streams' queues ([`super::stdin`]). It watches its own
//! progress: when the channel takes no byte for `--stdin-stall-timeout` while stdin is pending, the agent's
//! reader is blocked on a process that does not read its stdin (see [`super::stdin`] for why, and how the
//! culprit is chosen). That stream fails (error frame to its shim, its queued and later stdin refused,
//! `cc_proxy_stream_failures_total{reason="stdin_stall"}`, a warning, a tap `stream_failed` event) and its
//! process is sent SIGKILL through the control channel, so the agent's blocked write returns and the VM's
//! other processes receive stdin again. If the channel still takes nothing, the next culprit follows after
//! another timeout, but only while the kills succeed: a process the dialect cannot signal alone (cc-agent's
//! `execcmd` processes) is failed and reported, and the channel waits for it.
//!
//! Exit reports on this channel (cc-agent dialect): after a process's last output the agent sends an empty
//! packet on its stdio sequence (EOF) and then a packet whose one data byte is the exit status. In the
//! hyperstart dialect the EOF comes here and the status comes as a control event (see [`super::actor`]).
//! Which of these a packet is (output, EOF, exit status) is decided by `cc_proxy_protocol::agent::classify_io`,
//! a pure function that is unit-tested and fuzzed; the reader acts on the answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use cc_proxy_api::stream::Channel;
use cc_proxy_protocol::agent::{classify_io, IoPacket, StreamView};
use cc_proxy_protocol::{encode_io, IoCodec, IoFrame, IO_HEADER_LEN};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;

use super::lifecycle::{LostReason, VmState};
use super::stdin::StallWindow;
use super::Vm;
use crate::admin::metrics::StreamFailure;
use crate::logging::escape_bytes;
use crate::stream::{Lifecycle, Stream};
use crate::transport::{BoxRead, BoxWrite};

/// The signal sent to the process whose unread stdin stalled its VM's I/O channel.
const STALL_KILL_SIGNAL: i32 = 9;

/// Bytes the writer gathers from the queue into one write.
const WRITE_BATCH: usize = 256 * 1024;

/// Largest write buffer kept between batches; a bigger one (after a burst) is freed.
const KEPT_WRITE_BUFFER: usize = 1 << 20;

/// Read buffer of the I/O reader once the channel carries traffic: room for several of the agents' packets
/// (at most 64 KiB each on vsock) per read. Neither the reader's nor the writer's buffer is allocated before
/// the first packet, so an idle VM costs no buffer.
const READ_BUFFER: usize = 128 * 1024;

/// Longest escaped dump of one packet at `--log debug`.
const DUMP_BYTES: usize = 256;

pub fn spawn(vm: Arc<Vm>, read: BoxRead, write: BoxWrite) {
    tokio::spawn(reader(vm.clone(), read));
    tokio::spawn(writer(vm, write));
}

async fn reader(vm: Arc<Vm>, read: BoxRead) {
    let mut frames = FramedRead::with_capacity(read, IoCodec::default(), 0);
    let mut sized = false;
    loop {
        let next = tokio::select! {
            _ = vm.ended.cancelled() => return,
            next = frames.next() => next,
        };
        let lost = match next {
            Some(Ok(frame)) => {
                if !sized {
                    // Traffic started: switch to a full-size buffer. A buffer that started empty would keep
                    // growing by what one frame needs, one small read per packet.
                    let rest = std::mem::take(frames.read_buffer_mut());
                    let mut buf = BytesMut::with_capacity(READ_BUFFER.max(rest.len()));
                    buf.extend_from_slice(&rest);
                    *frames.read_buffer_mut() = buf;
                    sized = true;
                }
                route(&vm, frame).await;
                continue;
            }
            Some(Err(e)) => LostReason::IoMalformed(e.to_string()),
            None => LostReason::IoClosed,
        };
        vm.transition(VmState::Lost(lost));
        return;
    }
}

/// Deliver one agent packet to its stream, waiting (backpressure) while that stream is full.
async fn route(vm: &Arc<Vm>, frame: IoFrame) {
    vm.metrics.io_in_packets.inc();
    vm.metrics
        .io_in_bytes
        .inc_by((frame.data.len() + IO_HEADER_LEN) as u64);
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::debug!(vm = %vm.id, seq = frame.seq, direction = "from_agent", len = frame.data.len(),
            data = %escape_bytes(&frame.data, DUMP_BYTES), "io");
    }
    let Some(stream) = vm.stream_by_seq(frame.seq) else {
        if frame.seq > 2 && !frame.data.is_empty() {
            // Sequences 1 and 2 are the null session, discarded by design. Anything else belongs to a token
            // that was freed (closed on purpose): counted, logged at debug.
            vm.metrics.dropped.inc_by(frame.data.len() as u64);
            tracing::debug!(vm = %vm.id, seq = frame.seq, len = frame.data.len(), "output for a closed stream discarded");
        }
        return;
    };
    let view = StreamView {
        stdio: stream.stdio,
        stdout_eof_seen: stream.saw_stdout_eof(),
    };
    let has_room = match classify_io(vm.dialect, view, &frame) {
        IoPacket::Stdout => stream.push_output(Channel::Stdout, frame.data),
        IoPacket::StdoutEof => {
            stream.stdout_eof();
            true
        }
        IoPacket::ExitStatus(status) => {
            vm.process_exited(&stream, i32::from(status));
            true
        }
        IoPacket::Stderr => stream.push_output(Channel::Stderr, frame.data),
        IoPacket::StderrEof => true, // carries nothing we need
    };
    // Past its own bound a stream borrows from the VM's budget, so a stalled shim does not hold up the VM's
    // other streams; only when the VM's budget is spent too does the I/O channel pause (backpressure).
    if !has_room && vm.buffered() > vm.config.vm_buffer {
        vm.metrics.backpressure.inc();
        tracing::debug!(vm = %vm.id, token = %stream.token, "stream buffer full: pausing the I/O channel");
        if !wait_while_shim_reads(&stream, vm.config.stall_timeout).await {
            vm.stream_failed(&stream, StreamFailure::OutputStall);
            tracing::warn!(vm = %vm.id, token = %stream.token, buffered = stream.buffered(),
                "stream failed: its shim read nothing for {:?} while the buffer was full", vm.config.stall_timeout);
            stream.fail(&format!(
                "output buffer full for {:?} without the shim reading; the stream was failed to keep the VM's other streams moving",
                vm.config.stall_timeout
            ));
        }
    }
}

/// Waits for a full stream's shim to bring it back under its bound. A shim that keeps reading, however slowly
/// (a loaded host, a shim behind a slow pipe), is not stalled: the stall timeout counts from the last byte it
/// took, so only a shim that read nothing for a whole `stall_timeout` fails its stream. While this waits the
/// VM's I/O reader is paused, so the stream's buffered total can only go down.
async fn wait_while_shim_reads(stream: &Stream, stall_timeout: Duration) -> bool {
    let mut buffered = stream.buffered();
    loop {
        if stream.wait_for_space(stall_timeout).await {
            return true;
        }
        let now = stream.buffered();
        if now >= buffered {
            return false;
        }
        buffered = now;
    }
}

async fn writer(vm: Arc<Vm>, mut write: BoxWrite) {
    let mut buf = BytesMut::new();
    let mut watch = Watch::default();
    loop {
        let batch = tokio::select! {
            _ = vm.ended.cancelled() => return,
            batch = vm.stdin.next_batch(WRITE_BATCH) => batch,
        };
        for (seq, data) in &batch {
            encode(&vm, *seq, data, &mut buf);
            watch.window.wrote(*seq, data.len());
        }
        match write_watched(&vm, &mut write, &buf, &mut watch).await {
            Written::All => {}
            Written::Ended => return,
            Written::Failed(e) => {
                vm.transition(VmState::Lost(LostReason::IoWrite(e.to_string())));
                return;
            }
        }
        buf.clear();
        if buf.capacity() > KEPT_WRITE_BUFFER {
            buf = BytesMut::new();
        }
    }
}

/// What the writer knows about the channel's progress.
#[derive(Default)]
struct Watch {
    window: StallWindow,
    /// The last culprit's process could not be killed: blame no other stream until the channel moves.
    waiting_for_unkillable: bool,
}

/// How a watched write ended.
enum Written {
    All,
    /// The VM ended meanwhile.
    Ended,
    Failed(std::io::Error),
}

/// Write all of `buf`. A full I/O channel is backpressure (a process not reading its stdin), not a failure,
/// but each time it takes nothing for `--stdin-stall-timeout` the likely culprit is failed and killed; and
/// the write ends with the VM.
async fn write_watched(
    vm: &Arc<Vm>,
    write: &mut BoxWrite,
    buf: &[u8],
    watch: &mut Watch,
) -> Written {
    let timeout = vm.config.stdin_stall_timeout;
    let mut off = 0;
    let mut deadline = tokio::time::Instant::now() + timeout;
    while off < buf.len() {
        tokio::select! {
            r = write.write(&buf[off..]) => match r {
                Ok(0) => return Written::Failed(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    off += n;
                    deadline = tokio::time::Instant::now() + timeout;
                    watch.waiting_for_unkillable = false;
                }
                Err(e) => return Written::Failed(e),
            },
            _ = tokio::time::sleep_until(deadline) => {
                if !watch.waiting_for_unkillable {
                    watch.waiting_for_unkillable = !fail_culprit(vm, &mut watch.window).await;
                }
                deadline = tokio::time::Instant::now() + timeout;
            }
            _ = vm.ended.cancelled() => return Written::Ended,
        }
    }
    Written::All
}

/// The channel took no stdin for `--stdin-stall-timeout`: fail the stream most likely blocking the agent's
/// reader and kill its process. Returns false when the process could not be killed (the channel can only
/// wait for it).
async fn fail_culprit(vm: &Arc<Vm>, window: &mut StallWindow) -> bool {
    let timeout = vm.config.stdin_stall_timeout;
    let running = |seq: u64| {
        !vm.stdin.is_failed(seq)
            && vm
                .stream_by_seq(seq)
                .is_some_and(|s| s.stdio == seq && s.lifecycle() == Lifecycle::Running)
    };
    let Some(stream) = window
        .culprit(running)
        .and_then(|seq| vm.stream_by_seq(seq))
    else {
        tracing::warn!(vm = %vm.id, queued = vm.stdin.queued(),
            "the I/O channel took no stdin for {timeout:?} and no running stream wrote to it recently");
        return true;
    };
    window.forget(stream.stdio);
    let dropped = vm.stdin.fail(stream.stdio);
    vm.stream_failed(&stream, StreamFailure::StdinStall);
    tracing::warn!(vm = %vm.id, token = %stream.token, dropped,
        "stream failed: the VM's I/O channel took no stdin for {timeout:?} and this stream wrote the most of \
         what is waiting; its process is killed so the VM's other processes get stdin again");
    stream.fail(&format!(
        "stdin stalled: the VM's I/O channel took no stdin for {timeout:?} while this process left its stdin \
         unread; the stream was failed and its process killed to keep the VM's other processes' stdin moving"
    ));
    match tokio::time::timeout(
        timeout,
        super::process::signal(vm, &stream, STALL_KILL_SIGNAL),
    )
    .await
    {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(vm = %vm.id, token = %stream.token, error = %e,
                "cannot kill the process that stalled the I/O channel: the VM's stdin waits until it exits");
            false
        }
        Err(_) => {
            tracing::warn!(vm = %vm.id, token = %stream.token,
                "killing the process that stalled the I/O channel took longer than {timeout:?}");
            false
        }
    }
}

/// Append the packets for one stdin message, split at the dialect's packet size (256 data bytes
/// for hyperstart, whose per-process stdin buffer discards overflow; 4084 otherwise, so that no
/// packet exceeds 4096 bytes). Many small packets still leave in one write (the batch).
fn encode(vm: &Vm, seq: u64, data: &[u8], buf: &mut BytesMut) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::debug!(vm = %vm.id, seq, direction = "to_agent", len = data.len(),
            data = %escape_bytes(data, DUMP_BYTES), "io");
    }
    let mut packets = 0u64;
    if data.is_empty() {
        let _ = encode_io(seq, &[], buf);
        packets = 1;
    } else {
        for chunk in data.chunks(vm.dialect.stdin_packet_data()) {
            let _ = encode_io(seq, chunk, buf);
            packets += 1;
        }
    }
    vm.metrics.io_out_packets.inc_by(packets);
    vm.metrics
        .io_out_bytes
        .inc_by(data.len() as u64 + IO_HEADER_LEN as u64 * packets);
}
