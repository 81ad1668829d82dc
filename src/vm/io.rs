//! A VM's I/O channel: one reader task demultiplexing agent output to streams by sequence number, and one
//! writer task multiplexing every shim's stdin onto the channel.
//!
//! Exit reports on this channel (cc-agent dialect): after a process's last output the agent sends an empty
//! packet on its stdio sequence (EOF) and then a packet whose one data byte is the exit status. In the
//! hyperstart dialect the EOF comes here and the status comes as a control event (see [`super::actor`]).
//! Which of these a packet is (output, EOF, exit status) is decided by `cc_proxy_protocol::agent::classify_io`,
//! a pure function that is unit-tested and fuzzed; the reader acts on the answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cc_proxy_api::stream::Channel;
use cc_proxy_protocol::agent::{classify_io, IoPacket, StreamView};
use cc_proxy_protocol::{encode_io, IoCodec, IoFrame, IO_HEADER_LEN};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use super::lifecycle::{LostReason, VmState};
use super::Vm;
use crate::logging::escape_bytes;
use crate::stream::Stream;
use crate::transport::{BoxRead, BoxWrite};

/// Stdin messages queued per VM before shims wait (backpressure toward the shims).
pub const IO_QUEUE: usize = 64;

/// Largest stdin message queued at once; bigger writes are queued in pieces, so a VM's stdin queue holds
/// at most `IO_QUEUE * STDIN_CHUNK` bytes (4 MiB).
pub const STDIN_CHUNK: usize = 64 * 1024;

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

/// A packet for the agent: stdin data for `seq`, or (empty) the close of its stdin.
#[derive(Debug)]
pub struct IoOut {
    pub seq: u64,
    pub data: Bytes,
}

pub fn spawn(vm: Arc<Vm>, read: BoxRead, write: BoxWrite, rx: mpsc::Receiver<IoOut>) {
    tokio::spawn(reader(vm.clone(), read));
    tokio::spawn(writer(vm, write, rx));
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
            vm.metrics.stream_failures.inc();
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

async fn writer(vm: Arc<Vm>, mut write: BoxWrite, mut rx: mpsc::Receiver<IoOut>) {
    let mut buf = BytesMut::new();
    loop {
        let first = tokio::select! {
            _ = vm.ended.cancelled() => return,
            msg = rx.recv() => match msg { Some(m) => m, None => return },
        };
        encode(&vm, &first, &mut buf);
        while buf.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(m) => encode(&vm, &m, &mut buf),
                Err(_) => break,
            }
        }
        // A full I/O channel is backpressure (a process not reading its stdin), not a failure; but the write
        // must end with the VM.
        let written = tokio::select! {
            r = write.write_all(&buf) => r,
            _ = vm.ended.cancelled() => return,
        };
        if let Err(e) = written {
            vm.transition(VmState::Lost(LostReason::IoWrite(e.to_string())));
            return;
        }
        buf.clear();
        if buf.capacity() > KEPT_WRITE_BUFFER {
            buf = BytesMut::new();
        }
    }
}

/// Append the packets for one stdin message, split at the dialect's packet size (256 data bytes
/// for hyperstart, whose per-process stdin buffer discards overflow; 4084 otherwise, so that no
/// packet exceeds 4096 bytes). Many small packets still leave in one write (the batch).
fn encode(vm: &Vm, msg: &IoOut, buf: &mut BytesMut) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::debug!(vm = %vm.id, seq = msg.seq, direction = "to_agent", len = msg.data.len(),
            data = %escape_bytes(&msg.data, DUMP_BYTES), "io");
    }
    let mut packets = 0u64;
    if msg.data.is_empty() {
        let _ = encode_io(msg.seq, &[], buf);
        packets = 1;
    } else {
        for chunk in msg.data.chunks(vm.dialect.stdin_packet_data()) {
            let _ = encode_io(msg.seq, chunk, buf);
            packets += 1;
        }
    }
    vm.metrics.io_out_packets.inc_by(packets);
    vm.metrics
        .io_out_bytes
        .inc_by(msg.data.len() as u64 + IO_HEADER_LEN as u64 * packets);
}
