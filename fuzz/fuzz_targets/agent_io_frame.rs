//! Agent I/O channel packets (`cc_proxy_protocol::io`): process output, EOFs and cc-agent exit
//! status packets on a VM's I/O socket.
//!
//! Input: byte 0 picks the packet limit, byte 1 the chunk size for incremental feeding; the
//! rest is the byte stream. Checked: no panic; whole and chunked decoding agree; every packet
//! re-encodes to its bytes; `exit_status` is `Some` exactly for one-byte packets.
#![no_main]

use bytes::BytesMut;
use cc_proxy_protocol::{decode_io, encode_exit_status, encode_io, exit_status, IoCodec, IoFrame};
use cc_proxy_protocol::{EXIT_STATUS_FRAME_LEN, IO_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [limit, chunk, stream @ ..] = data else {
        return;
    };
    let max = if *limit == 0xff {
        cc_proxy_protocol::MAX_IO_FRAME
    } else {
        usize::from(*limit) * 4
    };

    let mut whole = BytesMut::from(stream);
    let mut frames: Vec<IoFrame> = Vec::new();
    let mut consumed = 0;
    let outcome = loop {
        match decode_io(&mut whole, max) {
            Ok(Some(f)) => {
                assert!(IO_HEADER_LEN + f.data.len() <= max);
                let mut again = BytesMut::new();
                encode_io(f.seq, &f.data, &mut again).expect("a decoded packet encodes");
                assert_eq!(&again[..], &stream[consumed..consumed + again.len()]);
                consumed += again.len();
                match exit_status(&f) {
                    Some(status) => {
                        assert_eq!(f.data.len(), 1);
                        let mut packet = BytesMut::new();
                        encode_exit_status(f.seq, status, &mut packet);
                        assert_eq!(packet.len(), EXIT_STATUS_FRAME_LEN);
                        assert_eq!(packet, again);
                    }
                    None => assert_ne!(f.data.len(), 1),
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

    let (got, err) = cc_proxy_fuzz::decode_in_pieces(IoCodec { max }, stream, usize::from(*chunk));
    assert_eq!(got, frames, "chunked decoding disagrees");
    assert_eq!(
        err.is_some(),
        outcome.is_err(),
        "chunked decoding disagrees on the error"
    );
});
