//! A minimal HTTP/1.1 keep-alive client for JSON-RPC calls on the daemon's unix socket: one request at a
//! time on one connection, driven on the caller's task. The latency figure then holds the daemon's cost
//! and not the extra task hops of a general-purpose client.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::BenchError;

/// Largest response head or body accepted.
const MAX_RESPONSE: usize = 1 << 20;

pub struct HttpClient {
    conn: UnixStream,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl HttpClient {
    pub async fn connect(socket: &Path) -> Result<HttpClient, BenchError> {
        Ok(HttpClient {
            conn: UnixStream::connect(socket).await?,
            buf: Vec::with_capacity(4096),
            out: Vec::with_capacity(1024),
        })
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
                "the daemon closed the connection".into(),
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}
