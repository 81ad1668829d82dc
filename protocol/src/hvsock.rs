//! The hybrid-vsock handshake, as the host side speaks it.
//!
//! VMMs without a host AF_VSOCK (Firecracker, Cloud Hypervisor, vhost-device-vsock) expose the
//! guest's vsock ports through one unix socket. The host connects, writes `CONNECT <port>\n`
//! ([`connect_line`]) and the VMM answers one line: `OK <host port>\n` when a guest listener
//! took the connection, anything else (or nothing) when not. Every byte after that newline
//! already belongs to the guest's stream.
//!
//! [`parse_reply`] reads that line from whatever has arrived so far and says "need more",
//! "accepted, the line is N bytes" or why the handshake failed, without sockets, so it is
//! unit-tested and fuzzed (`fuzz/fuzz_targets/hvsock_reply.rs`). The daemon's transport calls it
//! after each read.

/// Longest reply line, newline included, that we wait for. `OK <u32>\n` is at most 14 bytes;
/// a peer that sends 64 bytes without a newline is not a VMM answering a handshake.
pub const MAX_REPLY_LINE: usize = 64;

/// The request line for guest port `port`.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// A complete `OK` reply at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Length of the reply line, newline included: the guest's stream starts after it.
    pub len: usize,
    /// The host-side port the VMM reported, when the line carries a decimal `u32` after `OK `.
    /// Informational: the connection is usable either way.
    pub host_port: Option<u32>,
}

/// Why a hybrid-vsock handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The VMM answered something other than `OK`, typically because no guest process listens
    /// on the port. `reply` is the line (without its newline), invalid UTF-8 replaced.
    #[error("unexpected reply {reply:?}")]
    Refused { reply: String },
    /// [`MAX_REPLY_LINE`] bytes arrived without a newline.
    #[error("reply line too long (no newline in {max} bytes)")]
    TooLong { max: usize },
}

/// Reads the reply line from the front of `buf` (everything received so far). `Ok(None)` means
/// the newline has not arrived yet and fewer than [`MAX_REPLY_LINE`] bytes are in; bytes after
/// the line are the guest's and are not looked at.
pub fn parse_reply(buf: &[u8]) -> Result<Option<Accepted>, HandshakeError> {
    let window = &buf[..buf.len().min(MAX_REPLY_LINE)];
    let Some(newline) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= MAX_REPLY_LINE {
            return Err(HandshakeError::TooLong {
                max: MAX_REPLY_LINE,
            });
        }
        return Ok(None);
    };
    let line = &buf[..newline];
    let host_port = match line {
        b"OK" => None,
        [b'O', b'K', b' ', rest @ ..] => std::str::from_utf8(rest)
            .ok()
            .and_then(|p| p.trim_end_matches('\r').parse().ok()),
        _ => {
            return Err(HandshakeError::Refused {
                reply: String::from_utf8_lossy(line).into_owned(),
            })
        }
    };
    Ok(Some(Accepted {
        len: newline + 1,
        host_port,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn connect_line_names_the_port() {
        assert_eq!(connect_line(2718), "CONNECT 2718\n");
    }

    #[test]
    fn ok_with_port_and_guest_bytes_after_it() {
        let buf = b"OK 1073741824\nDATA";
        assert_eq!(
            parse_reply(buf),
            Ok(Some(Accepted {
                len: 14,
                host_port: Some(1 << 30)
            }))
        );
        assert_eq!(&buf[14..], b"DATA");
    }

    #[test]
    fn bare_ok_and_ok_with_text_are_accepted() {
        assert_eq!(
            parse_reply(b"OK\n"),
            Ok(Some(Accepted {
                len: 3,
                host_port: None
            }))
        );
        assert_eq!(
            parse_reply(b"OK port\n"),
            Ok(Some(Accepted {
                len: 8,
                host_port: None
            }))
        );
    }

    #[test]
    fn incomplete_lines_need_more() {
        for n in 0..b"OK 1073741824\n".len() {
            assert_eq!(parse_reply(&b"OK 1073741824\n"[..n]), Ok(None), "{n} bytes");
        }
    }

    #[test]
    fn anything_else_is_refused_with_the_line() {
        assert_eq!(
            parse_reply(b"ERR no listener\n"),
            Err(HandshakeError::Refused {
                reply: "ERR no listener".into()
            })
        );
        // `OKAY` is not `OK`; an empty line is not either.
        assert!(parse_reply(b"OKAY\n").is_err());
        assert!(parse_reply(b"\n").is_err());
        assert!(matches!(
            parse_reply(b"\xff\xfe\n"),
            Err(HandshakeError::Refused { reply }) if reply == "\u{fffd}\u{fffd}"
        ));
    }

    #[test]
    fn a_line_is_at_most_max_bytes() {
        let mut at_limit = vec![b' '; MAX_REPLY_LINE - 1];
        at_limit[..2].copy_from_slice(b"OK");
        at_limit.push(b'\n');
        assert_eq!(
            parse_reply(&at_limit).map(|a| a.map(|a| a.len)),
            Ok(Some(MAX_REPLY_LINE))
        );
        let long = vec![b'O'; MAX_REPLY_LINE];
        assert_eq!(
            parse_reply(&long),
            Err(HandshakeError::TooLong {
                max: MAX_REPLY_LINE
            })
        );
        // A newline beyond the limit does not count.
        let mut beyond = long.clone();
        beyond.push(b'\n');
        assert!(matches!(
            parse_reply(&beyond),
            Err(HandshakeError::TooLong { .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_lines_stay_in_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Some(a)) = parse_reply(&bytes) {
                prop_assert!(a.len <= MAX_REPLY_LINE.min(bytes.len()));
                prop_assert_eq!(bytes[a.len - 1], b'\n');
                prop_assert!(bytes.starts_with(b"OK"));
            }
        }
    }
}
