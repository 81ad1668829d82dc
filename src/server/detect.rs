//! Protocol detection: the first two bytes of a connection tell the legacy v2 protocol (`00 02`) from HTTP.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

pub use crate::transport::Rewind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// JSON-RPC over HTTP/1.1, HTTP/2 or WebSocket, and stdio stream attach.
    Http,
    /// The original cc-proxy's binary protocol, version 2.
    Legacy,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http => "jsonrpc",
            Protocol::Legacy => "legacy",
        }
    }
}

/// Read the first two bytes, waiting at most `timeout` (`--client-header-timeout`), and classify. The bytes
/// are given back through [`Rewind`].
pub async fn detect<S: AsyncRead + Unpin>(
    mut stream: S,
    timeout: Duration,
) -> io::Result<(Protocol, Rewind<S>)> {
    let mut first = [0u8; 2];
    let read = tokio::time::timeout(timeout, stream.read_exact(&mut first))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "no request within the detection timeout",
            )
        })?;
    read?;
    let proto = if first == [0x00, 0x02] {
        Protocol::Legacy
    } else {
        Protocol::Http
    };
    Ok((proto, Rewind::new(first.to_vec(), stream)))
}

/// A client connection after detection, under the connection guard.
pub type ClientConn = super::guard::Guarded<Rewind<crate::transport::Connection>>;

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn classifies_and_rewinds() {
        let (proto, mut s) = detect(&b"POST / HTTP/1.1\r\n"[..], T).await.unwrap();
        assert_eq!(proto, Protocol::Http);
        let mut all = String::new();
        s.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "POST / HTTP/1.1\r\n");
        let (proto, _) = detect(&[0u8, 2, 3, 0][..], T).await.unwrap();
        assert_eq!(proto, Protocol::Legacy);
        assert!(detect(&[0u8][..], T).await.is_err());
    }
}
