//! What each agent-to-host message means, decided apart from the sockets that carry it.
//!
//! The control channel brings, agent to host: ACK and ERROR (the answer to the command on the wire), NEXT
//! (flow-control credit), READY (boot done; some agents send it again) and, in the hyperstart dialect,
//! PROCESSASYNCEVENT (a process finished). [`classify_control`] names a frame's meaning in the agent's
//! dialect; the daemon's VM actor acts on that. The I/O channel brings process output by sequence number;
//! [`classify_io`] says what one packet is for the stream it belongs to: output, an EOF, or (cc-agent) the
//! exit status that follows the stdout EOF; the daemon's I/O reader routes by it.
//!
//! Both are pure functions so the decisions are unit-tested and fuzzed (`fuzz/fuzz_targets/agent_classify.rs`)
//! without a VM.

use crate::{code, ControlFrame, Dialect, IoFrame, ProcessAsyncEvent};

/// The `event` of a PROCESSASYNCEVENT reporting a process's exit (the only one agents send).
pub const EVENT_FINISHED: &str = "finished";

/// The meaning of one control frame from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMessage {
    /// ACK: the command on the wire succeeded; the frame's payload is its result.
    Ack,
    /// ERROR: the command on the wire failed; the agent's message (invalid UTF-8 replaced, trailing NULs
    /// that C agents leave removed).
    Error(String),
    /// NEXT: flow-control credit, with its byte count when the payload has the 4-byte shape.
    Next(Option<u32>),
    /// READY: the agent finished booting (seen again after the handshake from some agents).
    Ready,
    /// PROCESSASYNCEVENT `finished`: the process `process` of `container` exited with `status`.
    ProcessFinished {
        container: String,
        process: String,
        status: i32,
    },
    /// A PROCESSASYNCEVENT whose event is not `finished`.
    ProcessEvent(ProcessAsyncEvent),
    /// A PROCESSASYNCEVENT whose payload is not the event object; the decoder's explanation.
    MalformedEvent(String),
    /// A code the host does not expect from the agent (a command code, or one the dialect lacks).
    Unexpected(u32),
}

/// What `frame`, sent by an agent speaking `dialect`, means.
pub fn classify_control(dialect: Dialect, frame: &ControlFrame) -> AgentMessage {
    match frame.code {
        code::ACK => AgentMessage::Ack,
        code::ERROR => AgentMessage::Error(
            String::from_utf8_lossy(&frame.payload)
                .trim_end_matches('\0')
                .to_string(),
        ),
        code::NEXT => AgentMessage::Next(crate::parse_next(&frame.payload)),
        code::READY => AgentMessage::Ready,
        c if c == dialect.process_async_event_code() => {
            match serde_json::from_slice::<ProcessAsyncEvent>(&frame.payload) {
                Ok(e) if e.event == EVENT_FINISHED => AgentMessage::ProcessFinished {
                    container: e.container,
                    process: e.process,
                    status: e.status,
                },
                Ok(e) => AgentMessage::ProcessEvent(e),
                Err(e) => AgentMessage::MalformedEvent(e.to_string()),
            }
        }
        other => AgentMessage::Unexpected(other),
    }
}

/// What the host knows of the stream an I/O packet's sequence number belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamView {
    /// The stream's stdin/stdout sequence number (its stderr is any other sequence routed to it).
    pub stdio: u64,
    /// Whether the stdout EOF (an empty packet on `stdio`) has arrived.
    pub stdout_eof_seen: bool,
}

/// The meaning of one I/O packet for its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoPacket {
    /// Data for the process's stdout.
    Stdout,
    /// The end of stdout.
    StdoutEof,
    /// cc-agent: the exit status, one byte after the stdout EOF.
    ExitStatus(u8),
    /// Data for the process's stderr.
    Stderr,
    /// The end of stderr.
    StderrEof,
}

/// What `frame` is for `stream` when the agent speaks `dialect`. In the cc-agent dialect a one-byte packet
/// on the stdio sequence after the stdout EOF is the exit status (before the EOF it is output: a process
/// may print one byte); hyperstart reports exits on the control channel instead.
pub fn classify_io(dialect: Dialect, stream: StreamView, frame: &IoFrame) -> IoPacket {
    if frame.seq != stream.stdio {
        return if frame.data.is_empty() {
            IoPacket::StderrEof
        } else {
            IoPacket::Stderr
        };
    }
    match (&frame.data[..], dialect, stream.stdout_eof_seen) {
        ([], _, _) => IoPacket::StdoutEof,
        ([status], Dialect::CcAgent, true) => IoPacket::ExitStatus(*status),
        _ => IoPacket::Stdout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(code: u32, payload: &[u8]) -> ControlFrame {
        ControlFrame::new(code, Bytes::copy_from_slice(payload))
    }

    #[test]
    fn replies_credit_and_ready() {
        for d in Dialect::ALL {
            assert_eq!(
                classify_control(d, &frame(code::ACK, b"{}")),
                AgentMessage::Ack
            );
            assert_eq!(
                classify_control(d, &frame(code::ERROR, b"no such container\0\0")),
                AgentMessage::Error("no such container".into())
            );
            assert_eq!(
                classify_control(d, &frame(code::ERROR, b"\xffbad")),
                AgentMessage::Error("\u{fffd}bad".into())
            );
            assert_eq!(
                classify_control(d, &frame(code::NEXT, &[0, 0, 2, 0])),
                AgentMessage::Next(Some(512))
            );
            assert_eq!(
                classify_control(d, &frame(code::NEXT, b"")),
                AgentMessage::Next(None)
            );
            assert_eq!(
                classify_control(d, &frame(code::READY, b"")),
                AgentMessage::Ready
            );
            assert_eq!(
                classify_control(d, &frame(code::EXECCMD, b"{}")),
                AgentMessage::Unexpected(code::EXECCMD)
            );
        }
    }

    #[test]
    fn process_events_use_the_dialects_code() {
        let finished = br#"{"container":"c","process":"p1","event":"finished","status":137}"#;
        assert_eq!(
            classify_control(Dialect::Hyperstart, &frame(23, finished)),
            AgentMessage::ProcessFinished {
                container: "c".into(),
                process: "p1".into(),
                status: 137
            }
        );
        // 23 is PSCONTAINER in cc-agent, which never comes from the agent; 24 is its PROCESSASYNCEVENT.
        assert_eq!(
            classify_control(Dialect::CcAgent, &frame(23, finished)),
            AgentMessage::Unexpected(23)
        );
        assert!(matches!(
            classify_control(Dialect::CcAgent, &frame(24, finished)),
            AgentMessage::ProcessFinished { status: 137, .. }
        ));
        let other = br#"{"container":"c","process":"p1","event":"started","status":0}"#;
        assert!(matches!(
            classify_control(Dialect::Hyperstart, &frame(23, other)),
            AgentMessage::ProcessEvent(e) if e.event == "started"
        ));
        assert!(matches!(
            classify_control(Dialect::Hyperstart, &frame(23, b"{\"container\":1}")),
            AgentMessage::MalformedEvent(_)
        ));
    }

    #[test]
    fn io_packets_by_sequence_eof_and_dialect() {
        let before_eof = StreamView {
            stdio: 5,
            stdout_eof_seen: false,
        };
        let after_eof = StreamView {
            stdout_eof_seen: true,
            ..before_eof
        };
        let p = |seq, data: &'static [u8]| IoFrame::new(seq, Bytes::from_static(data));
        for d in Dialect::ALL {
            assert_eq!(classify_io(d, before_eof, &p(5, b"out")), IoPacket::Stdout);
            assert_eq!(classify_io(d, before_eof, &p(5, b"")), IoPacket::StdoutEof);
            assert_eq!(classify_io(d, before_eof, &p(6, b"err")), IoPacket::Stderr);
            assert_eq!(classify_io(d, after_eof, &p(6, b"")), IoPacket::StderrEof);
            // One byte before the EOF is output in both dialects.
            assert_eq!(classify_io(d, before_eof, &p(5, b"x")), IoPacket::Stdout);
        }
        assert_eq!(
            classify_io(Dialect::CcAgent, after_eof, &p(5, &[3])),
            IoPacket::ExitStatus(3)
        );
        assert_eq!(
            classify_io(Dialect::Hyperstart, after_eof, &p(5, &[3])),
            IoPacket::Stdout
        );
        assert_eq!(
            classify_io(Dialect::CcAgent, after_eof, &p(5, b"xy")),
            IoPacket::Stdout
        );
    }
}
