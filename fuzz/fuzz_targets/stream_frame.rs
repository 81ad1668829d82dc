//! The stdio stream framing a shim speaks after attaching (`cc_proxy_api::stream`).
//!
//! Input: byte 0 is the chunk size for incremental feeding; the rest is the byte stream.
//! Checked: no panic; whole and chunked decoding agree (frames and error); every frame
//! re-encodes to the bytes it came from; an exit frame's status is present exactly for a
//! 4-byte payload; a control frame's payload goes through the control message parser.
#![no_main]

use bytes::BytesMut;
use cc_proxy_api::stream::{decode, Channel, ControlMessage, Frame, FrameError, StreamCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Encoder;

fuzz_target!(|data: &[u8]| {
    let [chunk, stream @ ..] = data else {
        return;
    };

    let mut whole = BytesMut::from(stream);
    let mut frames: Vec<Frame> = Vec::new();
    let mut consumed = 0;
    let outcome: Result<(), FrameError> = loop {
        match decode(&mut whole) {
            Ok(Some(f)) => {
                let mut again = BytesMut::new();
                StreamCodec
                    .encode(f.clone(), &mut again)
                    .expect("a decoded frame encodes");
                assert_eq!(&again[..], &stream[consumed..consumed + again.len()]);
                consumed += again.len();
                assert_eq!(
                    f.exit_status().is_some(),
                    f.channel == Channel::Exit && f.payload.len() == 4
                );
                if f.channel == Channel::Control {
                    if let Ok(m) = serde_json::from_slice::<ControlMessage>(&f.payload) {
                        let text = serde_json::to_vec(&m).expect("serializes");
                        let back: ControlMessage = serde_json::from_slice(&text).expect("parses");
                        assert_eq!(back, m);
                    }
                }
                frames.push(f);
            }
            Ok(None) => {
                assert_eq!(
                    whole.len(),
                    stream.len() - consumed,
                    "Ok(None) consumed bytes"
                );
                break Ok(());
            }
            Err(e) => break Err(e),
        }
    };

    let (got, err) = cc_proxy_fuzz::decode_in_pieces(StreamCodec, stream, usize::from(*chunk));
    assert_eq!(got, frames, "chunked decoding disagrees");
    assert_eq!(
        err.is_some(),
        outcome.is_err(),
        "chunked decoding disagrees on the error"
    );
});
