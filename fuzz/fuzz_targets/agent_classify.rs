//! The daemon's decisions on agent messages (`cc_proxy_protocol::agent`): what a control frame means in a
//! dialect (`classify_control`, acted on by the VM actor) and what an I/O packet is for its stream
//! (`classify_io`, acted on by the I/O reader).
//!
//! Input: byte 0 holds the dialect (bit 0), whether the stdout EOF was seen (bit 1) and whether the packet
//! is on the stream's stdio sequence (bit 2); byte 1 is the control code; the rest is the payload, used as
//! both the control payload and the packet's data. Checked: no panic; each meaning matches the code and
//! dialect it may come from; an exit status only in the cc-agent dialect, after the EOF, for one byte.
#![no_main]

use bytes::Bytes;
use cc_proxy_protocol::agent::{classify_control, classify_io, AgentMessage, IoPacket, StreamView};
use cc_proxy_protocol::{code, ControlFrame, Dialect, IoFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [flags, code_byte, payload @ ..] = data else {
        return;
    };
    let dialect = Dialect::ALL[usize::from(flags & 1)];
    let code = u32::from(*code_byte);
    let frame = ControlFrame::new(code, Bytes::copy_from_slice(payload));
    let async_event = dialect.process_async_event_code();
    match classify_control(dialect, &frame) {
        AgentMessage::Ack => assert_eq!(code, code::ACK),
        AgentMessage::Error(m) => {
            assert_eq!(code, code::ERROR);
            assert!(!m.ends_with('\0'));
        }
        AgentMessage::Next(n) => {
            assert_eq!(code, code::NEXT);
            assert_eq!(n.is_some(), payload.len() == 4);
        }
        AgentMessage::Ready => assert_eq!(code, code::READY),
        AgentMessage::ProcessFinished { .. } | AgentMessage::MalformedEvent(_) => {
            assert_eq!(code, async_event)
        }
        AgentMessage::ProcessEvent(e) => {
            assert_eq!(code, async_event);
            assert_ne!(e.event, "finished");
        }
        AgentMessage::Unexpected(c) => {
            assert_eq!(c, code);
            assert!(![code::ACK, code::ERROR, code::NEXT, code::READY, async_event].contains(&c));
        }
    }

    let stream = StreamView {
        stdio: 5,
        stdout_eof_seen: flags & 2 != 0,
    };
    let seq = if flags & 4 != 0 { 5 } else { 6 };
    let packet = IoFrame::new(seq, Bytes::copy_from_slice(payload));
    match classify_io(dialect, stream, &packet) {
        IoPacket::Stdout => assert!(seq == 5 && !payload.is_empty()),
        IoPacket::StdoutEof => assert!(seq == 5 && payload.is_empty()),
        IoPacket::ExitStatus(s) => {
            assert!(seq == 5 && dialect == Dialect::CcAgent && stream.stdout_eof_seen);
            assert_eq!(payload, [s]);
        }
        IoPacket::Stderr => assert!(seq == 6 && !payload.is_empty()),
        IoPacket::StderrEof => assert!(seq == 6 && payload.is_empty()),
    }
});
