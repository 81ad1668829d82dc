//! Agent control channel frames (`cc_proxy_protocol::control`): what an agent (or anything
//! pretending to be one) sends the daemon on a VM's control socket.
//!
//! Input: byte 0 picks the frame limit (a small one, to reach `TooLong`, or the daemon's
//! `MAX_CONTROL_FRAME`), byte 1 the chunk size for incremental feeding; the rest is the byte
//! stream. Checked: no panic; decoding the whole stream at once and decoding it as it arrives in
//! chunks give the same frames and the same error; every frame re-encodes to the bytes it came
//! from.
#![no_main]

use bytes::BytesMut;
use cc_proxy_protocol::{decode_control, encode_control, ControlCodec, CONTROL_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [limit, chunk, stream @ ..] = data else {
        return;
    };
    let max = if *limit == 0xff {
        cc_proxy_protocol::MAX_CONTROL_FRAME
    } else {
        usize::from(*limit) * 4
    };

    // All at once.
    let mut whole = BytesMut::from(stream);
    let mut frames = Vec::new();
    let mut consumed = 0;
    let outcome = loop {
        match decode_control(&mut whole, max) {
            Ok(Some(f)) => {
                assert!(CONTROL_HEADER_LEN + f.payload.len() <= max);
                let mut again = BytesMut::new();
                encode_control(f.code, &f.payload, &mut again).expect("a decoded frame encodes");
                assert_eq!(&again[..], &stream[consumed..consumed + again.len()]);
                consumed += again.len();
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

    // As it arrives, through the codec the daemon wraps its socket in.
    let (got, err) =
        cc_proxy_fuzz::decode_in_pieces(ControlCodec { max }, stream, usize::from(*chunk));
    assert_eq!(got, frames, "chunked decoding disagrees");
    assert_eq!(
        err.is_some(),
        outcome.is_err(),
        "chunked decoding disagrees on the error"
    );
});
