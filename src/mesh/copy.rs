//! Opaque bidirectional copy between a mesh peer and its other side, with half-close in each direction.
//!
//! Events per direction: bytes arrive: they are written to the other side and counted; end of stream
//! arrives: the other side's write half is shut down (for TLS: close_notify, then the socket's FIN) while
//! the opposite direction keeps flowing, so a client that shuts down its write side still receives the whole
//! response; an error: the whole connection ends (the other direction is dropped with it).
//!
//! Buffers grow with traffic, the way istio's ztunnel sizes them: every direction starts small, reading at
//! most [`INITIAL_BUFFER`] bytes at a time, moves to a [`MEDIUM_BUFFER`] buffer after
//! [`GROW_AFTER_FULL_READS`] reads that filled the small one, and to [`LARGE_BUFFER`] after as many more.
//! While small, a direction reads into a stack buffer within a single poll and keeps the bytes on the heap
//! only until they are written, so an idle connection (the common case: thousands of them per host) holds
//! no copy buffer at all.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Each direction's first buffer.
pub const INITIAL_BUFFER: usize = 1024;
/// The buffer once a direction has carried a little traffic.
pub const MEDIUM_BUFFER: usize = 16 * 1024;
/// The buffer of a bulk transfer.
pub const LARGE_BUFFER: usize = 256 * 1024;
/// Reads that filled the buffer before it grows one step.
pub const GROW_AFTER_FULL_READS: u32 = 4;

/// Bytes carried so far each way (shared with metrics while the copy runs).
#[derive(Debug, Default)]
pub struct Transferred {
    /// From the accepted side to the other.
    pub up: AtomicU64,
    /// From the other side back to the accepted side.
    pub down: AtomicU64,
}

/// How a copy ended.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("reading from the client side: {0}")]
    ReadClient(std::io::Error),
    #[error("writing to the client side: {0}")]
    WriteClient(std::io::Error),
    #[error("reading from the server side: {0}")]
    ReadServer(std::io::Error),
    #[error("writing to the server side: {0}")]
    WriteServer(std::io::Error),
}

impl CopyError {
    /// The OS error number, when there is one (`tcp_close_total{errno}`).
    pub fn errno(&self) -> Option<i32> {
        match self {
            CopyError::ReadClient(e)
            | CopyError::WriteClient(e)
            | CopyError::ReadServer(e)
            | CopyError::WriteServer(e) => e.raw_os_error(),
        }
    }
}

enum Side {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// A direction's buffer, grown as traffic shows it is busy; empty while the direction is small (reads of
/// at most [`INITIAL_BUFFER`] bytes go through a stack buffer).
struct GrowingBuf {
    buf: Vec<u8>,
    full_reads: u32,
}

impl GrowingBuf {
    fn new() -> GrowingBuf {
        GrowingBuf {
            buf: Vec::new(),
            full_reads: 0,
        }
    }

    /// The most bytes the next read takes.
    fn read_size(&self) -> usize {
        self.buf.len().max(INITIAL_BUFFER)
    }

    /// Note a read of `n` bytes; grows the buffer after enough full ones.
    fn filled(&mut self, n: usize) {
        if n < self.read_size() || self.buf.len() >= LARGE_BUFFER {
            return;
        }
        self.full_reads += 1;
        if self.full_reads >= GROW_AFTER_FULL_READS {
            self.full_reads = 0;
            let next = if self.buf.len() < MEDIUM_BUFFER {
                MEDIUM_BUFFER
            } else {
                LARGE_BUFFER
            };
            self.buf = vec![0; next];
        }
    }
}

/// Whether a read error is just the peer going away without TLS's close_notify (treated as end of stream).
fn is_unclean_eof(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::UnexpectedEof
}

async fn one_way<R, W>(mut r: R, mut w: W, count: &AtomicU64) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = GrowingBuf::new();
    // Small mode: the bytes of one read, kept only until they are written.
    let mut small: Vec<u8> = Vec::new();
    loop {
        let read = if buf.buf.is_empty() {
            // The stack buffer lives within one poll: a direction waiting for bytes holds none.
            std::future::poll_fn(|cx| {
                let mut scratch = [0u8; INITIAL_BUFFER];
                let mut rb = tokio::io::ReadBuf::new(&mut scratch);
                match Pin::new(&mut r).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        small.extend_from_slice(rb.filled());
                        Poll::Ready(Ok(rb.filled().len()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        } else {
            r.read(&mut buf.buf).await
        };
        let n = match read {
            Ok(n) => n,
            Err(e) if is_unclean_eof(&e) => 0,
            Err(e) => return Err(Side::Read(e)),
        };
        if n == 0 {
            // Half-close: pass the end of stream on, keep the other direction going. A peer that already
            // went away cannot be told; that is not this direction's failure.
            let _ = w.shutdown().await;
            return Ok(());
        }
        let data = if buf.buf.is_empty() {
            &small[..]
        } else {
            &buf.buf[..n]
        };
        w.write_all(data).await.map_err(Side::Write)?;
        w.flush().await.map_err(Side::Write)?;
        small = Vec::new();
        count.fetch_add(n as u64, Ordering::Relaxed);
        buf.filled(n);
    }
}

/// Copy both ways between `client` (the accepted side) and `server` until both directions have ended.
pub async fn bidirectional<C, S>(
    client: C,
    server: S,
    counts: &Transferred,
) -> Result<(), CopyError>
where
    C: AsyncRead + AsyncWrite + Send,
    S: AsyncRead + AsyncWrite + Send,
{
    let (cr, cw) = tokio::io::split(client);
    let (sr, sw) = tokio::io::split(server);
    let up = one_way(cr, sw, &counts.up);
    let down = one_way(sr, cw, &counts.down);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                r.map_err(|e| match e {
                    Side::Read(e) => CopyError::ReadClient(e),
                    Side::Write(e) => CopyError::WriteServer(e),
                })?;
            }
            r = &mut down, if !down_done => {
                down_done = true;
                r.map_err(|e| match e {
                    Side::Read(e) => CopyError::ReadServer(e),
                    Side::Write(e) => CopyError::WriteClient(e),
                })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn buffers_grow_only_with_full_reads() {
        let mut b = GrowingBuf::new();
        for _ in 0..100 {
            b.filled(10);
        }
        // Small reads keep the direction without a buffer of its own.
        assert_eq!(b.buf.len(), 0);
        assert_eq!(b.read_size(), INITIAL_BUFFER);
        for _ in 0..GROW_AFTER_FULL_READS {
            b.filled(INITIAL_BUFFER);
        }
        assert_eq!(b.buf.len(), MEDIUM_BUFFER);
        for _ in 0..GROW_AFTER_FULL_READS {
            b.filled(MEDIUM_BUFFER);
        }
        assert_eq!(b.buf.len(), LARGE_BUFFER);
        for _ in 0..GROW_AFTER_FULL_READS {
            b.filled(LARGE_BUFFER);
        }
        assert_eq!(b.buf.len(), LARGE_BUFFER);
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let Ok(l) = TcpListener::bind("127.0.0.1:0").await else {
            panic!("bind")
        };
        let Ok(addr) = l.local_addr() else {
            panic!("addr")
        };
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        match (a, b) {
            (Ok(a), Ok((b, _))) => (a, b),
            _ => panic!("connect"),
        }
    }

    /// A client that shuts down its write side still receives a response longer than the first buffer.
    #[tokio::test]
    async fn half_close_each_way_delivers_everything() {
        let (mut client, proxy_client_side) = pair().await;
        let (proxy_server_side, mut server) = pair().await;
        let counts = std::sync::Arc::new(Transferred::default());
        let c2 = counts.clone();
        let proxy =
            tokio::spawn(
                async move { bidirectional(proxy_client_side, proxy_server_side, &c2).await },
            );
        let request = vec![7u8; 3000];
        let response = vec![9u8; 5 * 1024 * 1024];
        let resp2 = response.clone();
        let server_task = tokio::spawn(async move {
            let mut got = Vec::new();
            // The server reads to the client's end of stream, then answers.
            if server.read_to_end(&mut got).await.is_err() {
                panic!("server read");
            }
            if server.write_all(&resp2).await.is_err() || server.shutdown().await.is_err() {
                panic!("server write");
            }
            got
        });
        if client.write_all(&request).await.is_err() || client.shutdown().await.is_err() {
            panic!("client write");
        }
        let mut got = Vec::new();
        if client.read_to_end(&mut got).await.is_err() {
            panic!("client read");
        }
        assert_eq!(got.len(), response.len());
        assert!(got == response);
        assert_eq!(server_task.await.ok(), Some(request));
        assert!(matches!(proxy.await, Ok(Ok(()))));
        assert_eq!(counts.up.load(Ordering::Relaxed), 3000);
        assert_eq!(counts.down.load(Ordering::Relaxed), response.len() as u64);
    }
}
