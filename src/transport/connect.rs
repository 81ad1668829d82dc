//! Dialling endpoints, and the [`Connection`] every transport yields.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use cc_proxy_protocol::hvsock;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::creds::{Credentials, CredsError};
use super::{Endpoint, HandshakeError, TransportError};

impl Endpoint {
    /// Connect, giving up after `timeout` (the hybrid-vsock handshake included).
    // Agents are dialled with `connect_as`; the mesh front dials guest ports with this.
    #[cfg_attr(not(test), allow(dead_code))]
    pub async fn connect(&self, timeout: Duration) -> Result<Connection, TransportError> {
        self.connect_as(timeout, None).await
    }

    /// [`Endpoint::connect`], opening a unix or hybrid-vsock path with `rights` instead of the daemon's own
    /// when given (see [`super::creds`]); vsock and TCP need no rights and connect as usual.
    pub async fn connect_as(
        &self,
        timeout: Duration,
        rights: Option<&Credentials>,
    ) -> Result<Connection, TransportError> {
        let uri = self.to_string();
        match tokio::time::timeout(timeout, self.connect_inner(&uri, rights, timeout)).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout {
                uri,
                after: timeout,
            }),
        }
    }

    async fn connect_inner(
        &self,
        uri: &str,
        rights: Option<&Credentials>,
        timeout: Duration,
    ) -> Result<Connection, TransportError> {
        let conn_err = |source| TransportError::Connect {
            uri: uri.to_string(),
            source,
        };
        let unix = |path: &std::path::Path| {
            let path = path.to_path_buf();
            async move {
                match rights {
                    None => UnixStream::connect(&path).await,
                    Some(c) => c.connect_unix(&path, timeout).await.map_err(|e| match e {
                        CredsError::Io(e) => e,
                        other => std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            other.to_string(),
                        ),
                    }),
                }
            }
        };
        match self {
            Endpoint::Unix(path) => Ok(Connection::Unix(unix(path).await.map_err(conn_err)?)),
            Endpoint::Tcp(_) => {
                // Every address the host resolves to is tried in turn.
                let addrs = self.resolve().await?;
                let s = TcpStream::connect(&addrs[..]).await.map_err(conn_err)?;
                let _ = s.set_nodelay(true);
                Ok(Connection::Tcp(s))
            }
            Endpoint::Vsock { cid, port } => {
                let addr = tokio_vsock::VsockAddr::new(*cid, *port);
                Ok(Connection::Vsock(
                    tokio_vsock::VsockStream::connect(addr)
                        .await
                        .map_err(conn_err)?,
                ))
            }
            Endpoint::HybridVsock { path, port } => {
                let mut s = unix(path).await.map_err(conn_err)?;
                let leftover = hybrid_handshake(&mut s, *port).await.map_err(|reason| {
                    TransportError::Handshake {
                        uri: uri.to_string(),
                        reason,
                    }
                })?;
                Ok(Connection::UnixRewound(Rewind::new(leftover, s)))
            }
        }
    }
}

/// Write `CONNECT <port>\n` and read the VMM's reply line (`cc_proxy_protocol::hvsock` parses it); bytes that
/// arrive after the line already belong to the connected stream and are handed back to it.
async fn hybrid_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    port: u32,
) -> Result<Vec<u8>, HandshakeError> {
    s.write_all(hvsock::connect_line(port).as_bytes())
        .await
        .map_err(HandshakeError::Io)?;
    let mut buf = [0u8; hvsock::MAX_REPLY_LINE];
    let mut filled = 0;
    loop {
        let n = s
            .read(&mut buf[filled..])
            .await
            .map_err(HandshakeError::Io)?;
        if n == 0 {
            return Err(HandshakeError::Closed);
        }
        filled += n;
        // parse_reply fails before `filled` can reach the buffer's end without a newline.
        if let Some(reply) = hvsock::parse_reply(&buf[..filled]).map_err(HandshakeError::Reply)? {
            return Ok(buf[reply.len..filled].to_vec());
        }
    }
}

/// An open byte stream to an endpoint.
pub enum Connection {
    Unix(UnixStream),
    /// A unix stream with bytes already read from it (after a hybrid-vsock handshake).
    UnixRewound(Rewind<UnixStream>),
    Tcp(TcpStream),
    Vsock(tokio_vsock::VsockStream),
}

impl Connection {
    /// The connection's file descriptor number.
    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            Connection::Unix(s) => Some(s.as_raw_fd()),
            Connection::UnixRewound(_) => None,
            Connection::Tcp(s) => Some(s.as_raw_fd()),
            Connection::Vsock(s) => Some(s.as_raw_fd()),
        }
    }
}

/// The reading half of a [`Connection`].
pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
/// The writing half of a [`Connection`].
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

impl Connection {
    /// Split into owned halves (no lock between them), for a reader task and a writer task.
    pub fn into_split(self) -> (BoxRead, BoxWrite) {
        match self {
            Connection::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::pin(r), Box::pin(w))
            }
            Connection::UnixRewound(Rewind { prefix, pos, inner }) => {
                let (r, w) = inner.into_split();
                (
                    Box::pin(Rewind {
                        prefix,
                        pos,
                        inner: r,
                    }),
                    Box::pin(w),
                )
            }
            Connection::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::pin(r), Box::pin(w))
            }
            Connection::Vsock(s) => {
                let (r, w) = s.into_split();
                (Box::pin(r), Box::pin(w))
            }
        }
    }
}

/// What every transport's stream is.
trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

impl Connection {
    /// Whichever stream the connection is, pinned (every variant is `Unpin`).
    fn stream(self: Pin<&mut Self>) -> Pin<&mut dyn ByteStream> {
        let s: &mut dyn ByteStream = match self.get_mut() {
            Connection::Unix(s) => s,
            Connection::UnixRewound(s) => s,
            Connection::Tcp(s) => s,
            Connection::Vsock(s) => s,
        };
        Pin::new(s)
    }
}

/// One object for TLS and HTTP layers (tokio-rustls and hyper take a single `AsyncRead + AsyncWrite`).
impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

/// A stream that first yields bytes already read from it (protocol detection, hybrid-vsock handshakes).
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Rewind<S> {
        Rewind {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
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
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use cc_proxy_protocol::hvsock;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn vsock_connect_reports_the_uri() {
        // CID 1 is the local loopback CID; without vsock support this fails fast with the URI in the message.
        // (Never CID 2, the host, from here.)
        let ep = Endpoint::parse("vsock://1:9").unwrap();
        if let Err(e) = ep.connect(Duration::from_secs(2)).await {
            assert!(e.to_string().contains("vsock://1:9"), "{e}");
        }
    }

    #[tokio::test]
    async fn hybrid_handshake_reads_exactly_one_line() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 13];
            b.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 2718\n");
            b.write_all(b"OK 1073741824\nDATA").await.unwrap();
            b
        });
        let leftover = hybrid_handshake(&mut a, 2718).await.unwrap();
        let mut rewound = Rewind::new(leftover, a);
        let mut rest = [0u8; 4];
        rewound.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"DATA");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn hybrid_handshake_reply_in_pieces_and_too_long() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            let mut buf = [0u8; 10];
            let _ = b.read_exact(&mut buf).await;
            for piece in [&b"O"[..], b"K 7", b"\nab", b"c"] {
                let _ = b.write_all(piece).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            b
        });
        let leftover = hybrid_handshake(&mut a, 5).await.unwrap();
        assert_eq!(leftover, b"ab");

        let (mut a, mut b) = tokio::io::duplex(256);
        tokio::spawn(async move {
            let mut buf = [0u8; 10];
            let _ = b.read_exact(&mut buf).await;
            let _ = b.write_all(&[b'O'; 100]).await;
            b
        });
        let err = hybrid_handshake(&mut a, 5).await.unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
    }

    #[tokio::test]
    async fn hybrid_handshake_refused() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            let mut buf = [0u8; 13];
            let _ = b.read_exact(&mut buf).await;
            let _ = b.write_all(b"ERR no listener\n").await;
        });
        let err = hybrid_handshake(&mut a, 2718).await.unwrap_err();
        assert!(
            matches!(&err, HandshakeError::Reply(hvsock::HandshakeError::Refused { reply }) if reply.contains("ERR")),
            "{err}"
        );
    }
}
