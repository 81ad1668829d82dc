//! Legacy cc-proxy v2 frames (`cc_proxy_api::legacy::decode`): what a cc-runtime or cc-shim
//! sends on the daemon's socket after `00 02`.
//!
//! Input: byte 0 picks the payload limit, byte 1 the chunk size for incremental feeding; the
//! rest is the byte stream. Checked: no panic; whole and chunked decoding agree (frames and
//! error); a bad header is refused as soon as the byte that makes it bad has arrived; every
//! frame re-encodes (with the standard 12-byte header) to a frame that decodes equal.
#![no_main]

use bytes::BytesMut;
use cc_proxy_api::legacy::{decode, encode, Frame, FrameError, LegacyCodec, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [limit, chunk, stream @ ..] = data else {
        return;
    };
    let max = if *limit == 0xff {
        cc_proxy_api::legacy::MAX_PAYLOAD
    } else {
        usize::from(*limit) * 4
    };

    let mut whole = BytesMut::from(stream);
    let mut frames: Vec<Frame> = Vec::new();
    let outcome: Result<(), FrameError> = loop {
        let before = whole.len();
        match decode(&mut whole, max) {
            Ok(Some(f)) => {
                assert!(f.payload.len() <= max);
                assert!(before - whole.len() >= HEADER_LEN + f.payload.len());
                let mut again = BytesMut::new();
                encode(&f, &mut again, max).expect("a decoded frame encodes");
                assert_eq!(again.len(), HEADER_LEN + f.payload.len());
                let back = decode(&mut again, max).expect("re-encoded frame decodes");
                assert_eq!(back.as_ref(), Some(&f));
                assert!(again.is_empty());
                if f.exit_code().is_some() {
                    assert_eq!(f.payload.len(), 1);
                }
                frames.push(f);
            }
            Ok(None) => {
                assert_eq!(whole.len(), before, "Ok(None) consumed bytes");
                break Ok(());
            }
            Err(e) => break Err(e),
        }
    };

    let (got, err) = cc_proxy_fuzz::decode_in_pieces(
        LegacyCodec { max_payload: max },
        stream,
        usize::from(*chunk),
    );
    assert_eq!(got, frames, "chunked decoding disagrees");
    assert_eq!(
        err,
        outcome.err(),
        "chunked decoding disagrees on the error"
    );
});
