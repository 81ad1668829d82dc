//! The wire protocol between cc-proxy and the agent inside each VM (the hyperstart family).
//!
//! Two byte streams connect the host to an agent: the control channel carries commands and
//! their ACK/ERROR replies ([`control`]), the I/O channel multiplexes the stdio of every
//! process by sequence number ([`io`]). Command codes live in [`code`]; the two agent dialects
//! (cc-agent and hyperstart), which disagree on a few codes and payloads, in [`dialect`]; the
//! JSON payloads we read or build in [`payload`]. What each agent-to-host message means (the decisions
//! the daemon acts on) is in [`agent`]. Reaching an agent through a VMM's hybrid-vsock
//! socket starts with a one-line handshake, parsed in [`hvsock`].
//!
//! The crate is pure: parsers work on byte buffers and report "incomplete" or an error, so
//! they can be tested and fuzzed without sockets. The `tokio_util` codec adaptors let callers
//! wrap a socket in a `Framed` stream.

#![forbid(unsafe_code)]

pub mod agent;
pub mod code;
pub mod control;
pub mod dialect;
pub mod hvsock;
pub mod io;
pub mod payload;

pub use control::{decode_control, encode_control, ControlCodec, ControlFrame};
pub use dialect::{Dialect, UnknownDialect};
pub use io::{
    decode_io, encode_exit_status, encode_io, exit_status, IoCodec, IoFrame, EXIT_STATUS_FRAME_LEN,
};
pub use payload::{
    encode_next, encode_version, parse_next, parse_version, process_object_mut, EnvVar, ExecCmd,
    KillContainer, NewContainer, Process, ProcessAsyncEvent, SignalProcess, WinSizeCcAgent,
    WinSizeHyperstart,
};

/// Size of the control frame header: command code (u32) and total length (u32).
pub const CONTROL_HEADER_LEN: usize = 8;
/// Size of the I/O frame header: sequence number (u64) and total length (u32).
pub const IO_HEADER_LEN: usize = 12;
/// Largest control frame (header included) we accept or build. Real agents refuse more than
/// 65536 bytes on vsock and 10240 on serial, so 1 MiB only guards memory, it is not a target.
pub const MAX_CONTROL_FRAME: usize = 1 << 20;
/// Largest I/O frame (header included) we accept or build; bounds what one peer can make us
/// buffer before a frame is complete.
pub const MAX_IO_FRAME: usize = 1 << 20;
/// Largest host-to-agent I/O packet, header included: the C hyperstart reads the I/O channel
/// into a 4096-byte buffer on serial transports, and a longer packet makes it exit (as the
/// guest's PID 1, panicking the kernel).
pub const MAX_STDIN_PACKET_LEN: usize = 4096;
/// Largest data per host-to-agent I/O packet in any dialect: [`MAX_STDIN_PACKET_LEN`] minus the
/// header, 4084 bytes.
pub const MAX_STDIN_PACKET: usize = MAX_STDIN_PACKET_LEN - IO_HEADER_LEN;
/// Largest data per host-to-agent I/O packet in the hyperstart dialect. hyperstart buffers at
/// most 512 bytes of stdin per process and may hold two packets before it writes them into the
/// process's pipe, discarding what does not fit: packets of 256 bytes lose nothing while the
/// process keeps reading.
pub const HYPERSTART_STDIN_PACKET: usize = 256;

/// Why a frame cannot be parsed or built. Either error means the stream is out of sync (or the
/// peer is hostile): the session carrying it should be closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length field is smaller than the header it includes.
    #[error("frame length {length} is below the {header}-byte header")]
    TooShort { length: u32, header: usize },
    /// The frame (header included) is larger than the limit in force.
    #[error("frame length {length} exceeds the limit of {max} bytes")]
    TooLong { length: usize, max: usize },
}

impl From<FrameError> for std::io::Error {
    fn from(err: FrameError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, err)
    }
}
