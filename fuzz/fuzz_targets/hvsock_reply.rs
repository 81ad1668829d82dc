//! The hybrid-vsock handshake reply (`cc_proxy_protocol::hvsock::parse_reply`): the line a VMM
//! (or whatever listens on the socket the daemon was told to use) answers to `CONNECT <port>`.
//!
//! Input: byte 0 is the read size the bytes arrive in; the rest is what the peer sends. The
//! daemon parses after every read, as here. Checked: no panic; the first definite answer
//! (accepted or refused) never changes as more bytes arrive; an accepted line ends in a newline
//! within `MAX_REPLY_LINE` bytes and starts with `OK`; the guest's bytes after it are untouched.
#![no_main]

use cc_proxy_protocol::hvsock::{parse_reply, MAX_REPLY_LINE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [read_size, peer @ ..] = data else {
        return;
    };
    let step = usize::from(*read_size).max(1);
    let mut filled = 0;
    let mut first = None;
    while filled < peer.len() {
        filled = (filled + step).min(peer.len());
        let got = parse_reply(&peer[..filled]);
        match (&first, got) {
            (None, Ok(None)) => assert!(filled < MAX_REPLY_LINE),
            (None, answer) => {
                if let Ok(Some(a)) = &answer {
                    assert!(a.len <= MAX_REPLY_LINE && a.len <= filled);
                    assert_eq!(peer[a.len - 1], b'\n');
                    assert!(peer.starts_with(b"OK"));
                    assert!(!peer[..a.len - 1].contains(&b'\n'));
                }
                first = Some(answer);
            }
            (Some(earlier), later) => assert_eq!(earlier, &later, "answer changed at {filled}"),
        }
    }
});
