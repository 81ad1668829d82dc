//! A minimal HTTP/1.1 keep-alive client: one request at a time on one connection, driven on the caller's
//! task, so a latency figure holds the cost of the path under test and not the extra task hops of a
//! general-purpose client. Used for JSON-RPC calls on the daemon's unix socket (`POST /`) and for `GET /`
//! over TCP through the mesh paths.

use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::BenchError;

/// Largest response head or body accepted.
const MAX_RESPONSE: usize = 1 << 20;

/// One keep-alive connection over any byte stream (unix socket or TCP).
pub struct HttpClient<S = UnixStream> {
    conn: S,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl HttpClient<UnixStream> {
    /// Connect to the daemon's JSON-RPC socket.
    pub async fn connect(socket: &Path) -> Result<HttpClient<UnixStream>, BenchError> {
        Ok(HttpClient::over(UnixStream::connect(socket).await?))
    }
}

impl HttpClient<TcpStream> {
    /// Connect to `addr` over TCP with Nagle off (the latency loops send one small request at a time).
    pub async fn connect_tcp(addr: &str) -> Result<HttpClient<TcpStream>, BenchError> {
        let conn = TcpStream::connect(addr).await?;
        conn.set_nodelay(true)?;
        Ok(HttpClient::over(conn))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> HttpClient<S> {
    fn over(conn: S) -> HttpClient<S> {
        HttpClient {
            conn,
            buf: Vec::with_capacity(4096),
            out: Vec::with_capacity(1024),
        }
    }

    /// POST `body` to `/` and return the response body.
    pub async fn post(&mut self, body: &[u8]) -> Result<Vec<u8>, BenchError> {
        self.out.clear();
        self.out.extend_from_slice(
            format!(
                "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        self.out.extend_from_slice(body);
        self.exchange().await
    }

    /// `GET /` and return the response body.
    pub async fn get(&mut self) -> Result<Vec<u8>, BenchError> {
        self.out.clear();
        self.out
            .extend_from_slice(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n");
        self.exchange().await
    }

    /// Send `self.out`, read one response (a 200 with a Content-Length body) and return its body.
    async fn exchange(&mut self) -> Result<Vec<u8>, BenchError> {
        self.conn.write_all(&self.out).await?;
        // Read until the head is complete, then the Content-Length body.
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(BenchError::Protocol(format!(
                "HTTP status: {}",
                head.lines().next().unwrap_or("")
            )));
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or_else(|| BenchError::Protocol("response without Content-Length".into()))?;
        if len > MAX_RESPONSE {
            return Err(BenchError::Protocol("response too large".into()));
        }
        while self.buf.len() < head_end + len {
            self.fill().await?;
        }
        let body = self.buf[head_end..head_end + len].to_vec();
        self.buf.drain(..head_end + len);
        Ok(body)
    }

    async fn fill(&mut self) -> Result<(), BenchError> {
        if self.buf.len() > MAX_RESPONSE {
            return Err(BenchError::Protocol("response too large".into()));
        }
        let mut chunk = [0u8; 4096];
        let n = self.conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(BenchError::Protocol(
                "the server closed the connection".into(),
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}
