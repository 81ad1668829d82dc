//! Protocol detection: the first two bytes of a connection tell the legacy v2 protocol (`00 02`) from HTTP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long a new connection may take to send its first bytes.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Read the first two bytes and classify. The bytes are given back through [`Rewind`].
pub async fn detect<S: AsyncRead + Unpin>(mut stream: S) -> io::Result<(Protocol, Rewind<S>)> {
    let mut first = [0u8; 2];
    let read = tokio::time::timeout(DETECT_TIMEOUT, stream.read_exact(&mut first))
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
    Ok((
        proto,
        Rewind {
            prefix: first.to_vec(),
            pos: 0,
            inner: stream,
        },
    ))
}

/// A client connection after detection.
pub type RewindUnix = Rewind<tokio::net::UnixStream>;

/// A stream that first yields bytes already read from it.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn classifies_and_rewinds() {
        let (proto, mut s) = detect(&b"POST / HTTP/1.1\r\n"[..]).await.unwrap();
        assert_eq!(proto, Protocol::Http);
        let mut all = String::new();
        s.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "POST / HTTP/1.1\r\n");
        let (proto, _) = detect(&[0u8, 2, 3, 0][..]).await.unwrap();
        assert_eq!(proto, Protocol::Legacy);
        assert!(detect(&[0u8][..]).await.is_err());
    }
}
