//! What the fuzz targets share: feeding a byte stream to a codec the way a socket delivers it.
#![forbid(unsafe_code)]

use bytes::BytesMut;
use tokio_util::codec::Decoder;

/// Feeds `stream` to `codec` in pieces of `step` bytes (at least 1), decoding after each piece as
/// the daemon's framed readers do. Returns the items decoded before the first error, and that
/// error. The targets compare this with decoding the whole stream at once: a codec must not
/// depend on where the reads happened to split its input.
pub fn decode_in_pieces<D: Decoder>(
    mut codec: D,
    stream: &[u8],
    step: usize,
) -> (Vec<D::Item>, Option<D::Error>) {
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    for piece in stream.chunks(step.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(e) => return (items, Some(e)),
            }
        }
    }
    (items, None)
}
