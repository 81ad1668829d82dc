//! Control channel frames: an 8-byte header (command code, total length, both big-endian u32)
//! followed by the payload, usually JSON.
//!
//! [`decode_control`] and [`encode_control`] work on byte buffers; [`ControlCodec`] adapts them
//! to `tokio_util::codec` for use with `Framed`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::{FrameError, CONTROL_HEADER_LEN, MAX_CONTROL_FRAME};

/// One control message: a command, a reply, or an unsolicited event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlFrame {
    /// Command code (see [`crate::code`] and [`crate::Dialect`]).
    pub code: u32,
    /// Everything after the header.
    pub payload: Bytes,
}

impl ControlFrame {
    /// A frame with the given code and payload.
    pub fn new(code: u32, payload: impl Into<Bytes>) -> Self {
        ControlFrame {
            code,
            payload: payload.into(),
        }
    }
}

/// Parses one frame from the front of `buf`, refusing frames longer than `max` bytes (header
/// included). `Ok(None)` means more bytes are needed and `buf` is left untouched; on success the
/// frame is removed from `buf`.
pub fn decode_control(buf: &mut BytesMut, max: usize) -> Result<Option<ControlFrame>, FrameError> {
    if buf.len() < CONTROL_HEADER_LEN {
        return Ok(None);
    }
    let code = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let length = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if (length as usize) < CONTROL_HEADER_LEN {
        return Err(FrameError::TooShort {
            length,
            header: CONTROL_HEADER_LEN,
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
    frame.advance(CONTROL_HEADER_LEN);
    Ok(Some(ControlFrame {
        code,
        payload: frame.freeze(),
    }))
}

/// Appends one frame to `dst`. Fails with [`FrameError::TooLong`] (and leaves `dst` untouched)
/// if the frame would exceed [`MAX_CONTROL_FRAME`].
pub fn encode_control(code: u32, payload: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
    let length = CONTROL_HEADER_LEN + payload.len();
    if length > MAX_CONTROL_FRAME {
        return Err(FrameError::TooLong {
            length,
            max: MAX_CONTROL_FRAME,
        });
    }
    dst.reserve(length);
    dst.put_u32(code);
    // Cannot truncate: length <= MAX_CONTROL_FRAME < u32::MAX.
    dst.put_u32(length as u32);
    dst.put_slice(payload);
    Ok(())
}

/// `tokio_util` codec for control frames; decoding refuses frames above `max` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlCodec {
    /// Largest frame (header included) the decoder accepts.
    pub max: usize,
}

impl Default for ControlCodec {
    fn default() -> Self {
        ControlCodec {
            max: MAX_CONTROL_FRAME,
        }
    }
}

impl Decoder for ControlCodec {
    type Item = ControlFrame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ControlFrame>, std::io::Error> {
        let frame = decode_control(src, self.max)?;
        if frame.is_none() && src.len() >= CONTROL_HEADER_LEN {
            // The header is in and already validated: make room for the rest in one go.
            let length = u32::from_be_bytes([src[4], src[5], src[6], src[7]]) as usize;
            src.reserve(length.saturating_sub(src.len()));
        }
        Ok(frame)
    }
}

impl Encoder<ControlFrame> for ControlCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: ControlFrame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        Ok(encode_control(item.code, &item.payload, dst)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(code: u32, payload: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_control(code, payload, &mut buf).expect("encodes");
        buf
    }

    #[test]
    fn header_layout_is_big_endian_with_total_length() {
        let buf = frame(9, b"abc");
        assert_eq!(&buf[..], &[0, 0, 0, 9, 0, 0, 0, 11, b'a', b'b', b'c']);
    }

    #[test]
    fn incomplete_header_leaves_buffer_untouched() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 9, 0, 0][..]);
        assert_eq!(decode_control(&mut buf, MAX_CONTROL_FRAME), Ok(None));
        assert_eq!(buf.len(), 6);
    }

    #[test]
    fn incomplete_payload_leaves_buffer_untouched() {
        let mut buf = frame(6, b"{\"a\":1}");
        buf.truncate(buf.len() - 1);
        let before = buf.clone();
        assert_eq!(decode_control(&mut buf, MAX_CONTROL_FRAME), Ok(None));
        assert_eq!(buf, before);
    }

    #[test]
    fn exact_frame_is_consumed() {
        let mut buf = frame(12, b"");
        let got = decode_control(&mut buf, MAX_CONTROL_FRAME).expect("valid");
        assert_eq!(got, Some(ControlFrame::new(12, Bytes::new())));
        assert!(buf.is_empty());
    }

    #[test]
    fn two_frames_in_one_buffer() {
        let mut buf = frame(8, b"");
        buf.extend_from_slice(&frame(9, b"xyz"));
        let first = decode_control(&mut buf, MAX_CONTROL_FRAME).expect("valid");
        assert_eq!(first, Some(ControlFrame::new(8, Bytes::new())));
        let second = decode_control(&mut buf, MAX_CONTROL_FRAME).expect("valid");
        assert_eq!(
            second,
            Some(ControlFrame::new(9, Bytes::from_static(b"xyz")))
        );
        assert!(buf.is_empty());
        assert_eq!(decode_control(&mut buf, MAX_CONTROL_FRAME), Ok(None));
    }

    #[test]
    fn length_below_header_is_an_error() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 9, 0, 0, 0, 7][..]);
        assert_eq!(
            decode_control(&mut buf, MAX_CONTROL_FRAME),
            Err(FrameError::TooShort {
                length: 7,
                header: 8
            })
        );
    }

    #[test]
    fn length_above_max_is_an_error_before_the_payload_arrives() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 9, 0, 0, 1, 0][..]);
        assert_eq!(
            decode_control(&mut buf, 100),
            Err(FrameError::TooLong {
                length: 256,
                max: 100
            })
        );
    }

    #[test]
    fn length_equal_to_max_is_accepted() {
        let mut buf = frame(9, &[7u8; 92]);
        let got = decode_control(&mut buf, 100).expect("valid");
        assert_eq!(got.map(|f| f.payload.len()), Some(92));
    }

    #[test]
    fn encoding_an_oversized_frame_fails_and_writes_nothing() {
        let mut buf = BytesMut::new();
        let payload = vec![0u8; MAX_CONTROL_FRAME];
        assert_eq!(
            encode_control(6, &payload, &mut buf),
            Err(FrameError::TooLong {
                length: MAX_CONTROL_FRAME + 8,
                max: MAX_CONTROL_FRAME
            })
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn codec_round_trip_and_invalid_data_error() {
        let mut codec = ControlCodec::default();
        let mut buf = BytesMut::new();
        codec
            .encode(ControlFrame::new(17, Bytes::from_static(b"{}")), &mut buf)
            .expect("encodes");
        let got = codec.decode(&mut buf).expect("valid");
        assert_eq!(got, Some(ControlFrame::new(17, Bytes::from_static(b"{}"))));

        let mut bad = BytesMut::from(&[0u8, 0, 0, 9, 0, 0, 0, 3][..]);
        let err = codec.decode(&mut bad).expect_err("too short");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    proptest! {
        #[test]
        fn round_trip(code in any::<u32>(), payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut buf = frame(code, &payload);
            let got = decode_control(&mut buf, MAX_CONTROL_FRAME).expect("valid");
            prop_assert_eq!(got, Some(ControlFrame::new(code, payload)));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), max in 0usize..512) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode_control(&mut buf, max) {}
            let mut codec = ControlCodec { max };
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }
}
