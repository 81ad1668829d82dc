//! I/O channel frames: a 12-byte header (sequence number as big-endian u64, total length as
//! big-endian u32) followed by data. One channel carries the stdio of every process of a VM;
//! the sequence number says which stream a packet belongs to.
//!
//! A packet with no data means EOF: host to agent it closes stdin, agent to host it ends the
//! stdout stream. In the cc-agent dialect the exit status follows the EOF as a packet with
//! exactly one data byte ([`encode_exit_status`], [`exit_status`]).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::{FrameError, IO_HEADER_LEN, MAX_IO_FRAME};

/// Total length of the cc-agent exit status packet: header plus one byte.
pub const EXIT_STATUS_FRAME_LEN: usize = IO_HEADER_LEN + 1;

/// One I/O packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoFrame {
    /// Stream sequence number, chosen by the host when it starts the process.
    pub seq: u64,
    /// Everything after the header; empty means EOF.
    pub data: Bytes,
}

impl IoFrame {
    /// A packet for `seq` carrying `data`.
    pub fn new(seq: u64, data: impl Into<Bytes>) -> Self {
        IoFrame {
            seq,
            data: data.into(),
        }
    }

    /// An empty packet: EOF (agent to host) or close stdin (host to agent).
    pub fn eof(seq: u64) -> Self {
        IoFrame {
            seq,
            data: Bytes::new(),
        }
    }
}

/// Parses one packet from the front of `buf`, refusing packets longer than `max` bytes (header
/// included). `Ok(None)` means more bytes are needed and `buf` is left untouched; on success the
/// packet is removed from `buf`.
pub fn decode_io(buf: &mut BytesMut, max: usize) -> Result<Option<IoFrame>, FrameError> {
    if buf.len() < IO_HEADER_LEN {
        return Ok(None);
    }
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&buf[..8]);
    let seq = u64::from_be_bytes(seq_bytes);
    let length = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if (length as usize) < IO_HEADER_LEN {
        return Err(FrameError::TooShort {
            length,
            header: IO_HEADER_LEN,
        });
    }
    let length = length as usize;
    if length > max {
        return Err(FrameError::TooLong { length, max });
    }
    if buf.len() < length {
        return Ok(None);
    }
    let mut frame = buf.split_to(length);
    frame.advance(IO_HEADER_LEN);
    Ok(Some(IoFrame {
        seq,
        data: frame.freeze(),
    }))
}

/// Appends one packet to `dst`. Fails with [`FrameError::TooLong`] (and leaves `dst` untouched)
/// if the packet would exceed [`MAX_IO_FRAME`]; callers split large writes beforehand.
pub fn encode_io(seq: u64, data: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
    let length = IO_HEADER_LEN + data.len();
    if length > MAX_IO_FRAME {
        return Err(FrameError::TooLong {
            length,
            max: MAX_IO_FRAME,
        });
    }
    dst.reserve(length);
    dst.put_u64(seq);
    // Cannot truncate: length <= MAX_IO_FRAME < u32::MAX.
    dst.put_u32(length as u32);
    dst.put_slice(data);
    Ok(())
}

/// Appends the cc-agent exit status packet (13 bytes, one data byte) for `seq`.
pub fn encode_exit_status(seq: u64, status: u8, dst: &mut BytesMut) {
    dst.reserve(EXIT_STATUS_FRAME_LEN);
    dst.put_u64(seq);
    dst.put_u32(EXIT_STATUS_FRAME_LEN as u32);
    dst.put_u8(status);
}

/// The exit status carried by `frame` if it has the shape of a cc-agent exit status packet.
///
/// The shape alone is ambiguous (a process may print a single byte), so only call this for the
/// packet that follows the stream's EOF.
pub fn exit_status(frame: &IoFrame) -> Option<u8> {
    match frame.data[..] {
        [status] => Some(status),
        _ => None,
    }
}

/// `tokio_util` codec for I/O packets; decoding refuses packets above `max` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoCodec {
    /// Largest packet (header included) the decoder accepts.
    pub max: usize,
}

impl Default for IoCodec {
    fn default() -> Self {
        IoCodec { max: MAX_IO_FRAME }
    }
}

impl Decoder for IoCodec {
    type Item = IoFrame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<IoFrame>, std::io::Error> {
        let frame = decode_io(src, self.max)?;
        if frame.is_none() && src.len() >= IO_HEADER_LEN {
            // The header is in and already validated: make room for the rest in one go.
            let length = u32::from_be_bytes([src[8], src[9], src[10], src[11]]) as usize;
            src.reserve(length.saturating_sub(src.len()));
        }
        Ok(frame)
    }
}

impl Encoder<IoFrame> for IoCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: IoFrame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        Ok(encode_io(item.seq, &item.data, dst)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packet(seq: u64, data: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_io(seq, data, &mut buf).expect("encodes");
        buf
    }

    #[test]
    fn header_layout_is_big_endian_with_total_length() {
        let buf = packet(3, b"hi");
        assert_eq!(&buf[..], &[0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 14, b'h', b'i']);
    }

    #[test]
    fn incomplete_header_leaves_buffer_untouched() {
        let mut buf = BytesMut::from(&[0u8; 11][..]);
        assert_eq!(decode_io(&mut buf, MAX_IO_FRAME), Ok(None));
        assert_eq!(buf.len(), 11);
    }

    #[test]
    fn incomplete_data_leaves_buffer_untouched() {
        let mut buf = packet(5, b"hello");
        buf.truncate(buf.len() - 2);
        let before = buf.clone();
        assert_eq!(decode_io(&mut buf, MAX_IO_FRAME), Ok(None));
        assert_eq!(buf, before);
    }

    #[test]
    fn exact_packet_is_consumed() {
        let mut buf = packet(5, b"hello");
        let got = decode_io(&mut buf, MAX_IO_FRAME).expect("valid");
        assert_eq!(got, Some(IoFrame::new(5, Bytes::from_static(b"hello"))));
        assert!(buf.is_empty());
    }

    #[test]
    fn two_packets_in_one_buffer() {
        let mut buf = packet(3, b"out");
        buf.extend_from_slice(&packet(4, b""));
        let first = decode_io(&mut buf, MAX_IO_FRAME).expect("valid");
        assert_eq!(first, Some(IoFrame::new(3, Bytes::from_static(b"out"))));
        let second = decode_io(&mut buf, MAX_IO_FRAME).expect("valid");
        assert_eq!(second, Some(IoFrame::eof(4)));
        assert!(buf.is_empty());
    }

    #[test]
    fn length_below_header_is_an_error() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 11][..]);
        assert_eq!(
            decode_io(&mut buf, MAX_IO_FRAME),
            Err(FrameError::TooShort {
                length: 11,
                header: 12
            })
        );
    }

    #[test]
    fn length_above_max_is_an_error_before_the_data_arrives() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0, 0, 0, 0, 1, 0, 0x10, 0, 1][..]);
        assert_eq!(
            decode_io(&mut buf, MAX_IO_FRAME),
            Err(FrameError::TooLong {
                length: (1 << 20) + 1,
                max: MAX_IO_FRAME
            })
        );
    }

    #[test]
    fn encoding_an_oversized_packet_fails_and_writes_nothing() {
        let mut buf = BytesMut::new();
        let data = vec![0u8; MAX_IO_FRAME - IO_HEADER_LEN + 1];
        assert!(matches!(
            encode_io(1, &data, &mut buf),
            Err(FrameError::TooLong { .. })
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn exit_status_packet_is_thirteen_bytes() {
        let mut buf = BytesMut::new();
        encode_exit_status(7, 137, &mut buf);
        assert_eq!(buf.len(), EXIT_STATUS_FRAME_LEN);
        let frame = decode_io(&mut buf, MAX_IO_FRAME)
            .expect("valid")
            .expect("complete");
        assert_eq!(frame.seq, 7);
        assert_eq!(exit_status(&frame), Some(137));
        assert_eq!(exit_status(&IoFrame::eof(7)), None);
    }

    #[test]
    fn codec_round_trip_and_invalid_data_error() {
        let mut codec = IoCodec::default();
        let mut buf = BytesMut::new();
        codec
            .encode(IoFrame::new(9, Bytes::from_static(b"data")), &mut buf)
            .expect("encodes");
        assert_eq!(
            codec.decode(&mut buf).expect("valid"),
            Some(IoFrame::new(9, Bytes::from_static(b"data")))
        );
        let mut bad = BytesMut::from(&[0u8; 12][..]);
        let err = codec.decode(&mut bad).expect_err("too short");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    proptest! {
        #[test]
        fn round_trip(seq in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut buf = packet(seq, &data);
            let got = decode_io(&mut buf, MAX_IO_FRAME).expect("valid");
            prop_assert_eq!(got, Some(IoFrame::new(seq, data)));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), max in 0usize..512) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode_io(&mut buf, max) {}
            let mut codec = IoCodec { max };
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }
}
