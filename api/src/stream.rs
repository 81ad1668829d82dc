//! The stdio stream framing a shim speaks after attaching to a token.
//!
//! A shim attaches with `POST /v1/streams/<token>` carrying `Connection: Upgrade` and
//! `Upgrade: cc-proxy-stream`; after `101 Switching Protocols` both directions carry frames:
//!
//! ```text
//! +---------+----------------------+-----------------+
//! | channel | length (u32, BE)     | payload         |
//! | 1 byte  | 4 bytes              | length bytes    |
//! +---------+----------------------+-----------------+
//! ```
//!
//! The header is 5 bytes and `length` counts the payload only, so a C shim needs one `read` of 5 bytes and
//! one of `length` bytes per frame. Payloads are at most [`MAX_PAYLOAD`] bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

/// Size of a frame header.
pub const HEADER_LEN: usize = 5;
/// Largest payload of one frame. Larger stdin writes are split by the shim; the daemon never sends more.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    /// Shim to daemon: bytes for the process's stdin. An empty payload closes stdin.
    Stdin = 0,
    /// Daemon to shim: the process's stdout (and stderr, for a terminal).
    Stdout = 1,
    /// Daemon to shim: the process's stderr.
    Stderr = 2,
    /// Daemon to shim: the process finished; payload is the exit status as a big-endian i32 (128+N for a
    /// process killed by signal N). The last frame of a stream.
    Exit = 3,
    /// Daemon to shim: the stream failed; payload is a UTF-8 message. The daemon closes after it.
    Error = 4,
    /// A JSON [`ControlMessage`]: shim to daemon `signal`, `resize`, `detach`, `close`; daemon to shim the
    /// `detached` acknowledgement.
    Control = 5,
}

impl Channel {
    /// The channel for a wire byte, if it is one.
    pub fn from_byte(b: u8) -> Option<Channel> {
        Some(match b {
            0 => Channel::Stdin,
            1 => Channel::Stdout,
            2 => Channel::Stderr,
            3 => Channel::Exit,
            4 => Channel::Error,
            5 => Channel::Control,
            _ => return None,
        })
    }
}

/// One frame of a stdio stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub channel: Channel,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(channel: Channel, payload: impl Into<Bytes>) -> Frame {
        Frame {
            channel,
            payload: payload.into(),
        }
    }

    /// An exit frame for `status`.
    pub fn exit(status: i32) -> Frame {
        Frame::new(Channel::Exit, Bytes::copy_from_slice(&status.to_be_bytes()))
    }

    /// The status of an exit frame, if this is a well-formed one.
    pub fn exit_status(&self) -> Option<i32> {
        if self.channel != Channel::Exit {
            return None;
        }
        let b: [u8; 4] = self.payload.as_ref().try_into().ok()?;
        Some(i32::from_be_bytes(b))
    }
}

/// Control messages a shim sends on [`Channel::Control`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlMessage {
    /// Deliver a signal to the process.
    Signal { signal: i32 },
    /// Resize the process's terminal.
    Resize { rows: u16, cols: u16 },
    /// Detach and keep the token: the daemon writes everything queued before it, answers
    /// [`ControlMessage::Detached`] and closes; output produced meanwhile waits for the next attach.
    Detach,
    /// The shim is done with the stream: the daemon frees the token (later output is discarded) and closes.
    Close,
    /// Daemon to shim: the acknowledgement of a [`ControlMessage::Detach`]; the last frame of the attachment.
    Detached,
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown stream channel {0}")]
    UnknownChannel(u8),
    #[error("stream frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLong(usize),
}

impl From<FrameError> for std::io::Error {
    fn from(e: FrameError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// Parse one frame from the front of `buf`. `Ok(None)` means more bytes are needed.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let channel = Channel::from_byte(buf[0]).ok_or(FrameError::UnknownChannel(buf[0]))?;
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLong(len));
    }
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(len).freeze();
    Ok(Some(Frame { channel, payload }))
}

/// Append the header of a frame with `len` payload bytes to `dst`.
pub fn encode_header(channel: Channel, len: usize, dst: &mut BytesMut) -> Result<(), FrameError> {
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLong(len));
    }
    dst.reserve(HEADER_LEN);
    dst.put_u8(channel as u8);
    dst.put_u32(len as u32);
    Ok(())
}

/// [`Decoder`]/[`Encoder`] for the stream framing.
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamCodec;

impl Decoder for StreamCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        Ok(decode(src)?)
    }
}

impl Encoder<Frame> for StreamCodec {
    type Error = std::io::Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        encode_header(frame.channel, frame.payload.len(), dst)?;
        dst.extend_from_slice(&frame.payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_incomplete() {
        let mut codec = StreamCodec;
        let mut buf = BytesMut::new();
        codec
            .encode(Frame::new(Channel::Stdout, &b"hello"[..]), &mut buf)
            .unwrap();
        codec.encode(Frame::exit(137), &mut buf).unwrap();
        let mut partial = BytesMut::from(&buf[..7]);
        assert_eq!(decode(&mut partial).unwrap(), None);
        let f = decode(&mut buf).unwrap().unwrap();
        assert_eq!(f, Frame::new(Channel::Stdout, &b"hello"[..]));
        let f = decode(&mut buf).unwrap().unwrap();
        assert_eq!(f.exit_status(), Some(137));
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_bad_channel_and_oversize() {
        let mut buf = BytesMut::from(&[9u8, 0, 0, 0, 0][..]);
        assert_eq!(decode(&mut buf), Err(FrameError::UnknownChannel(9)));
        let mut buf = BytesMut::from(&[1u8, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(decode(&mut buf), Err(FrameError::TooLong(_))));
    }

    #[test]
    fn control_messages_are_tagged() {
        let m: ControlMessage =
            serde_json::from_str(r#"{"op":"resize","rows":24,"cols":80}"#).unwrap();
        assert_eq!(m, ControlMessage::Resize { rows: 24, cols: 80 });
        assert_eq!(
            serde_json::to_string(&ControlMessage::Detach).unwrap(),
            r#"{"op":"detach"}"#
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode(&mut buf) {}
        }

        #[test]
        fn frames_round_trip(ch in 0u8..6, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let frame = Frame::new(Channel::from_byte(ch).unwrap(), payload);
            let mut buf = BytesMut::new();
            StreamCodec.encode(frame.clone(), &mut buf).unwrap();
            prop_assert_eq!(decode(&mut buf).unwrap(), Some(frame));
        }
    }
}
