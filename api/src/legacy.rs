//! The frame codec and payload shapes of the legacy cc-proxy v2 protocol, which Clear Containers runtimes and
//! shims (cc-runtime, cc-shim) speak on the same socket as the JSON-RPC API.
//!
//! Every message is one frame: a header of at least 12 bytes, then a payload. All integers are big-endian.
//!
//! ```text
//! 0       2        3          4          6               7        8                 12
//! +-------+--------+----------+----------+---------------+--------+-----------------+---------+
//! | 00 02 | hdrlen | reserved | reserved | flags | type  | opcode | payload length  | payload |
//! +-------+--------+----------+----------+---------------+--------+-----------------+---------+
//! ```
//!
//! - `hdrlen` counts 32-bit words; writers send 3. A reader starts the payload at `hdrlen * 4` and ignores
//!   extra header bytes. Below 3 the frame is malformed.
//! - The low nibble of byte 6 is the frame type ([`Message`]); bit 4 is the error flag, which only responses
//!   may carry; bits 5 to 7 are reserved and ignored.
//! - The opcode's meaning depends on the type; one out of range for its type is malformed.
//!
//! Parsing is pure ([`decode`] on a byte buffer says "need more bytes", a frame, or an error), so it is tested
//! without sockets; [`LegacyCodec`] wraps it for `tokio_util` framing. The session logic lives in the daemon.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

/// The protocol version in the first two bytes of every frame.
pub const VERSION: u16 = 2;
/// The header length writers use, in bytes.
pub const HEADER_LEN: usize = 12;
/// The header length writers use, in 32-bit words (and the smallest one readers accept).
pub const HEADER_WORDS: u8 = 3;
/// Largest payload accepted by default. Hyper payloads are agent commands (agents refuse control messages
/// above 64 KiB) and stdin is split into agent packets anyway, so 1 MiB leaves ample room while bounding what
/// one frame can make the reader buffer.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// The error flag in byte 6 (responses only).
pub const ERROR_FLAG: u8 = 0x10;

/// Commands a client sends (frame type 0); a response carries the opcode of its command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Command {
    RegisterVm = 0,
    UnregisterVm = 1,
    AttachVm = 2,
    Hyper = 3,
    ConnectShim = 4,
    DisconnectShim = 5,
    Signal = 6,
}

impl Command {
    pub fn from_opcode(op: u8) -> Option<Command> {
        Some(match op {
            0 => Command::RegisterVm,
            1 => Command::UnregisterVm,
            2 => Command::AttachVm,
            3 => Command::Hyper,
            4 => Command::ConnectShim,
            5 => Command::DisconnectShim,
            6 => Command::Signal,
            _ => return None,
        })
    }

    /// The command's name as the protocol spells it, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Command::RegisterVm => "RegisterVM",
            Command::UnregisterVm => "UnregisterVM",
            Command::AttachVm => "AttachVM",
            Command::Hyper => "Hyper",
            Command::ConnectShim => "ConnectShim",
            Command::DisconnectShim => "DisconnectShim",
            Command::Signal => "Signal",
        }
    }
}

/// Stream frames (type 2): process stdio between a shim and the proxy, and log entries from any client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamKind {
    /// Shim to proxy: bytes for the process's stdin; an empty payload closes it.
    Stdin = 0,
    /// Proxy to shim: the process's stdout.
    Stdout = 1,
    /// Proxy to shim: the process's stderr.
    Stderr = 2,
    /// Client to proxy: a JSON [`LogEntry`] for the proxy's log.
    Log = 3,
}

impl StreamKind {
    pub fn from_opcode(op: u8) -> Option<StreamKind> {
        Some(match op {
            0 => StreamKind::Stdin,
            1 => StreamKind::Stdout,
            2 => StreamKind::Stderr,
            3 => StreamKind::Log,
            _ => return None,
        })
    }
}

/// Notifications (type 3), proxy to shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Notification {
    /// The process exited; the payload is one byte, the exit code.
    ProcessExited = 0,
}

impl Notification {
    pub fn from_opcode(op: u8) -> Option<Notification> {
        match op {
            0 => Some(Notification::ProcessExited),
            _ => None,
        }
    }
}

/// What a frame is: its type together with its opcode (and the error flag of a response).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Message {
    Command(Command),
    Response { command: Command, error: bool },
    Stream(StreamKind),
    Notification(Notification),
}

impl Message {
    /// The frame type number (low nibble of byte 6).
    pub fn type_number(self) -> u8 {
        match self {
            Message::Command(_) => 0,
            Message::Response { .. } => 1,
            Message::Stream(_) => 2,
            Message::Notification(_) => 3,
        }
    }

    pub fn opcode(self) -> u8 {
        match self {
            Message::Command(c) | Message::Response { command: c, .. } => c as u8,
            Message::Stream(s) => s as u8,
            Message::Notification(n) => n as u8,
        }
    }

    fn flags_byte(self) -> u8 {
        let error = matches!(self, Message::Response { error: true, .. });
        self.type_number() | if error { ERROR_FLAG } else { 0 }
    }
}

/// One v2 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub message: Message,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(message: Message, payload: impl Into<Bytes>) -> Frame {
        Frame {
            message,
            payload: payload.into(),
        }
    }

    /// A command with a JSON payload.
    pub fn command<T: Serialize>(
        command: Command,
        payload: &T,
    ) -> Result<Frame, serde_json::Error> {
        Ok(Frame::new(
            Message::Command(command),
            serde_json::to_vec(payload)?,
        ))
    }

    /// A successful response with a raw payload (empty, JSON results, or an agent's ACK as is).
    pub fn ok(command: Command, payload: impl Into<Bytes>) -> Frame {
        Frame::new(
            Message::Response {
                command,
                error: false,
            },
            payload,
        )
    }

    /// An error response: the error flag and `{"msg": "<text>"}`.
    pub fn error(command: Command, msg: &str) -> Frame {
        let body = serde_json::to_vec(&ErrorPayload {
            msg: msg.to_string(),
        })
        .unwrap_or_else(|_| b"{\"msg\":\"error\"}".to_vec());
        Frame::new(
            Message::Response {
                command,
                error: true,
            },
            body,
        )
    }

    /// A ProcessExited notification; `code` is the one-byte exit code.
    pub fn process_exited(code: u8) -> Frame {
        Frame::new(
            Message::Notification(Notification::ProcessExited),
            Bytes::copy_from_slice(&[code]),
        )
    }

    /// The exit code of a well-formed ProcessExited notification.
    pub fn exit_code(&self) -> Option<u8> {
        match (self.message, self.payload.as_ref()) {
            (Message::Notification(Notification::ProcessExited), [code]) => Some(*code),
            _ => None,
        }
    }
}

/// Why bytes are not a valid frame. Each is a protocol error that ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unsupported protocol version {0} (expected 2)")]
    Version(u16),
    #[error("header length of {0} words is below the minimum of 3")]
    HeaderTooShort(u8),
    #[error("unknown frame type {0}")]
    Type(u8),
    #[error("opcode {opcode} is out of range for frame type {frame_type}")]
    Opcode { frame_type: u8, opcode: u8 },
    #[error("the error flag is set on a frame of type {0}, which is not a response")]
    ErrorFlag(u8),
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("I/O error: {0}")]
    Io(String),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        FrameError::Io(e.to_string())
    }
}

/// Parse one frame from the front of `buf`, accepting payloads up to `max` bytes. `Ok(None)` means more bytes
/// are needed; nothing is consumed then. Header fields are checked as soon as they have arrived, so a bad
/// frame is refused without waiting for its payload.
pub fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() >= 2 {
        let version = u16::from_be_bytes([buf[0], buf[1]]);
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
    }
    if buf.len() >= 3 && buf[2] < HEADER_WORDS {
        return Err(FrameError::HeaderTooShort(buf[2]));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let header_len = usize::from(buf[2]) * 4;
    let flags = buf[6];
    let opcode = buf[7];
    let len = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    let frame_type = flags & 0x0f;
    let error = flags & ERROR_FLAG != 0;
    let bad_opcode = FrameError::Opcode { frame_type, opcode };
    let message = match frame_type {
        0 => Message::Command(Command::from_opcode(opcode).ok_or(bad_opcode)?),
        1 => Message::Response {
            command: Command::from_opcode(opcode).ok_or(bad_opcode)?,
            error,
        },
        2 => Message::Stream(StreamKind::from_opcode(opcode).ok_or(bad_opcode)?),
        3 => Message::Notification(Notification::from_opcode(opcode).ok_or(bad_opcode)?),
        t => return Err(FrameError::Type(t)),
    };
    if error && frame_type != 1 {
        return Err(FrameError::ErrorFlag(frame_type));
    }
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    let total = header_len + len;
    if buf.len() < total {
        // Grow with what actually arrives: a header alone must not make the reader hold its whole payload.
        buf.reserve((total - buf.len()).min(64 * 1024));
        return Ok(None);
    }
    buf.advance(header_len);
    let payload = buf.split_to(len).freeze();
    Ok(Some(Frame { message, payload }))
}

/// Append `frame` with the standard 12-byte header. Fails only for a payload above `max`.
pub fn encode(frame: &Frame, dst: &mut BytesMut, max: usize) -> Result<(), FrameError> {
    let len = frame.payload.len();
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    dst.reserve(HEADER_LEN + len);
    dst.put_u16(VERSION);
    dst.put_u8(HEADER_WORDS);
    dst.put_u8(0);
    dst.put_u16(0);
    dst.put_u8(frame.message.flags_byte());
    dst.put_u8(frame.message.opcode());
    dst.put_u32(len as u32);
    dst.put_slice(&frame.payload);
    Ok(())
}

/// [`decode`]/[`encode`] as a `tokio_util` codec with a payload bound.
#[derive(Debug, Clone, Copy)]
pub struct LegacyCodec {
    pub max_payload: usize,
}

impl Default for LegacyCodec {
    fn default() -> Self {
        LegacyCodec {
            max_payload: MAX_PAYLOAD,
        }
    }
}

impl Decoder for LegacyCodec {
    type Item = Frame;
    type Error = FrameError;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        decode(src, self.max_payload)
    }
}

impl Encoder<Frame> for LegacyCodec {
    type Error = FrameError;
    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode(&item, dst, self.max_payload)
    }
}

/// The payload of an error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorPayload {
    pub msg: String,
}

/// RegisterVM: announce a VM by its agent's channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterVm {
    #[serde(rename = "containerId")]
    pub container_id: String,
    /// The control channel: a socket path (or a URI).
    #[serde(rename = "ctlSerial")]
    pub ctl_serial: String,
    /// The I/O channel: a socket path (or a URI).
    #[serde(rename = "ioSerial")]
    pub io_serial: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// How many tokens to allocate.
    #[serde(
        rename = "numIOStreams",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub num_io_streams: Option<u32>,
}

/// AttachVM: use a VM registered earlier (by any client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachVm {
    #[serde(rename = "containerId")]
    pub container_id: String,
    #[serde(
        rename = "numIOStreams",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub num_io_streams: Option<u32>,
}

/// UnregisterVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnregisterVm {
    #[serde(rename = "containerId")]
    pub container_id: String,
}

/// The result of RegisterVM and AttachVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIo {
    pub io: IoInfo,
}

/// Where shims connect and with which tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoInfo {
    /// `unix://<proxy socket path>`; the capital key is what the original clients expect.
    #[serde(rename = "URL")]
    pub url: String,
    /// One token per requested stream; `null` when none were asked for.
    pub tokens: Option<Vec<String>>,
}

/// Hyper: forward an agent command by its lower-case name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    #[serde(rename = "hyperName")]
    pub hyper_name: String,
    /// At most one token, and only for `newcontainer`/`execcmd`.
    #[serde(default)]
    pub tokens: Option<Vec<String>>,
    /// The command's JSON payload.
    #[serde(default)]
    pub data: Option<serde_json::Value>,
}

/// The agent command names a Hyper frame may carry.
pub const HYPER_NAMES: &[&str] = &[
    "version",
    "startpod",
    "destroypod",
    "execcmd",
    "ready",
    "ack",
    "error",
    "winsize",
    "ping",
    "next",
    "writefile",
    "readfile",
    "newcontainer",
    "killcontainer",
    "onlinecpumem",
    "setupinterface",
    "setuproute",
    "removecontainer",
    "pscontainer",
];

/// ConnectShim: make this connection the shim of a token's process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectShim {
    pub token: String,
}

/// Signal: deliver a signal (or a window size, with SIGWINCH) to the shim's process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    #[serde(rename = "signalNumber")]
    pub signal_number: i64,
    #[serde(default)]
    pub columns: i64,
    #[serde(default)]
    pub rows: i64,
}

/// SIGWINCH: the one signal that carries a window size.
pub const SIGWINCH: i64 = 28;
/// Signals are 0 <= n < this.
pub const SIGNAL_LIMIT: i64 = 31;

/// A log stream frame's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// `shim` or `runtime`.
    pub source: String,
    #[serde(rename = "containerId", default)]
    pub container_id: Option<String>,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// Never empty.
    pub msg: String,
}

impl LogEntry {
    /// Check the fields whose values are restricted.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !matches!(self.source.as_str(), "shim" | "runtime") {
            return Err("source must be \"shim\" or \"runtime\"");
        }
        if !matches!(self.level.as_str(), "debug" | "info" | "warn" | "error") {
            return Err("level must be debug, info, warn or error");
        }
        if self.msg.is_empty() {
            return Err("msg is empty");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes_of(frame: &Frame) -> BytesMut {
        let mut b = BytesMut::new();
        encode(frame, &mut b, MAX_PAYLOAD).expect("encodes");
        b
    }

    #[test]
    fn register_response_header_matches_the_spec_example() {
        let f = Frame::ok(Command::RegisterVm, vec![b'x'; 104]);
        let b = bytes_of(&f);
        assert_eq!(
            &b[..12],
            &[0x00, 0x02, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x68]
        );
    }

    #[test]
    fn error_response_sets_the_flag_and_msg() {
        let b = bytes_of(&Frame::error(Command::Hyper, "boom"));
        assert_eq!(b[6], 0x11);
        assert_eq!(b[7], 3);
        assert_eq!(&b[12..], br#"{"msg":"boom"}"#);
    }

    #[test]
    fn incomplete_input_consumes_nothing() {
        let full = bytes_of(&Frame::ok(Command::Signal, &b"{}"[..]));
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(decode(&mut part, MAX_PAYLOAD), Ok(None), "cut at {cut}");
            assert_eq!(part.len(), cut);
        }
    }

    #[test]
    fn longer_headers_are_skipped() {
        let mut b = BytesMut::new();
        b.put_slice(&[0, 2, 5, 0, 0, 0, 2, 3, 0, 0, 0, 2]);
        b.put_slice(&[0xaa; 8]);
        b.put_slice(b"ok");
        b.put_slice(&[0, 2]);
        let f = decode(&mut b, MAX_PAYLOAD)
            .expect("valid")
            .expect("complete");
        assert_eq!(f.message, Message::Stream(StreamKind::Log));
        assert_eq!(&f.payload[..], b"ok");
        assert_eq!(&b[..], &[0, 2]);
    }

    #[test]
    fn malformed_headers_are_refused() {
        let cases: &[(&[u8], FrameError)] = &[
            (&[0, 1], FrameError::Version(1)),
            (&[0, 2, 0], FrameError::HeaderTooShort(0)),
            (&[0, 2, 2], FrameError::HeaderTooShort(2)),
            (&[0, 2, 3, 0, 0, 0, 4, 0, 0, 0, 0, 0], FrameError::Type(4)),
            (
                &[0, 2, 3, 0, 0, 0, 0, 7, 0, 0, 0, 0],
                FrameError::Opcode {
                    frame_type: 0,
                    opcode: 7,
                },
            ),
            (
                &[0, 2, 3, 0, 0, 0, 2, 4, 0, 0, 0, 0],
                FrameError::Opcode {
                    frame_type: 2,
                    opcode: 4,
                },
            ),
            (
                &[0, 2, 3, 0, 0, 0, 3, 1, 0, 0, 0, 0],
                FrameError::Opcode {
                    frame_type: 3,
                    opcode: 1,
                },
            ),
            (
                &[0, 2, 3, 0, 0, 0, 0x10, 0, 0, 0, 0, 0],
                FrameError::ErrorFlag(0),
            ),
            (
                &[0, 2, 3, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
                FrameError::TooLong {
                    len: 0xffff_ffff,
                    max: MAX_PAYLOAD,
                },
            ),
        ];
        for (input, want) in cases {
            let mut b = BytesMut::from(*input);
            assert_eq!(decode(&mut b, MAX_PAYLOAD), Err(want.clone()), "{input:?}");
        }
    }

    #[test]
    fn reserved_bits_are_ignored() {
        let mut b = BytesMut::from(&[0, 2, 3, 0xff, 0xff, 0xff, 0xe1, 4, 0, 0, 0, 0][..]);
        let f = decode(&mut b, MAX_PAYLOAD)
            .expect("valid")
            .expect("complete");
        assert_eq!(
            f.message,
            Message::Response {
                command: Command::ConnectShim,
                error: false
            }
        );
    }

    #[test]
    fn payload_shapes() {
        let io = VmIo {
            io: IoInfo {
                url: "unix:///run/p.sock".into(),
                tokens: None,
            },
        };
        assert_eq!(
            serde_json::to_string(&io).expect("serializes"),
            r#"{"io":{"URL":"unix:///run/p.sock","tokens":null}}"#
        );
        let r: RegisterVm = serde_json::from_str(
            r#"{"containerId":"c","ctlSerial":"/a","ioSerial":"/b","numIOStreams":2}"#,
        )
        .expect("parses");
        assert_eq!(r.num_io_streams, Some(2));
        let s: Signal = serde_json::from_str(r#"{"signalNumber":15}"#).expect("parses");
        assert_eq!((s.columns, s.rows), (0, 0));
        let l: LogEntry =
            serde_json::from_str(r#"{"source":"shim","level":"warn","msg":"m","containerId":"c"}"#)
                .expect("parses");
        assert_eq!(l.validate(), Ok(()));
        assert!(LogEntry {
            msg: String::new(),
            ..l.clone()
        }
        .validate()
        .is_err());
        assert!(LogEntry {
            level: "trace".into(),
            ..l
        }
        .validate()
        .is_err());
        assert_eq!(Frame::process_exited(7).exit_code(), Some(7));
    }

    fn any_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (0u8..7).prop_map(|o| Message::Command(Command::from_opcode(o).expect("in range"))),
            (0u8..7, any::<bool>()).prop_map(|(o, error)| Message::Response {
                command: Command::from_opcode(o).expect("in range"),
                error
            }),
            (0u8..4).prop_map(|o| Message::Stream(StreamKind::from_opcode(o).expect("in range"))),
            Just(Message::Notification(Notification::ProcessExited)),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut b = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode(&mut b, 64) {}
        }

        #[test]
        fn arbitrary_frames_after_a_valid_prefix_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..64),
            flags in any::<u8>(), opcode in any::<u8>(), words in any::<u8>(),
        ) {
            let mut b = BytesMut::from(&[0u8, 2, words, 0, 0, 0, flags, opcode][..]);
            b.put_slice(&tail);
            let _ = decode(&mut b, 64);
        }

        #[test]
        fn frames_round_trip(
            frames in proptest::collection::vec(
                (any_message(), proptest::collection::vec(any::<u8>(), 0..300)), 1..8),
        ) {
            let mut b = BytesMut::new();
            for (m, p) in &frames {
                encode(&Frame::new(*m, p.clone()), &mut b, MAX_PAYLOAD).expect("encodes");
            }
            for (m, p) in &frames {
                let f = decode(&mut b, MAX_PAYLOAD).expect("valid").expect("complete");
                prop_assert_eq!(f.message, *m);
                prop_assert_eq!(&f.payload[..], &p[..]);
            }
            prop_assert!(b.is_empty());
        }
    }
}
