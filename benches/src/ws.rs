//! A minimal WebSocket client over the daemon's unix socket, enough to send JSON-RPC text messages and read
//! the replies (RFC 6455: client frames masked, server frames not). Written by hand so the benchmark needs
//! no WebSocket dependency and measures only the daemon's side.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::BenchError;

/// Largest reply accepted (a ping reply is tiny).
const MAX_MESSAGE: u64 = 1 << 20;

pub struct WsClient {
    conn: BufReader<UnixStream>,
    out: Vec<u8>,
}

impl WsClient {
    /// Connect and complete the opening handshake on `/`.
    pub async fn connect(socket: &Path) -> Result<WsClient, BenchError> {
        let mut s = UnixStream::connect(socket).await?;
        s.write_all(
            b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: Y2MtcHJveHktYmVuY2gtMDE=\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await?;
        let mut conn = BufReader::new(s);
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if conn.read(&mut b).await? == 0 || head.len() > 8192 {
                return Err(BenchError::Protocol("WebSocket handshake failed".into()));
            }
            head.push(b[0]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            return Err(BenchError::Protocol(format!(
                "WebSocket handshake refused: {}",
                String::from_utf8_lossy(&head).lines().next().unwrap_or("")
            )));
        }
        Ok(WsClient {
            conn,
            out: Vec::new(),
        })
    }

    /// Send one text message.
    pub async fn send_text(&mut self, text: &[u8]) -> Result<(), BenchError> {
        const MASK: [u8; 4] = [0x5a, 0xc3, 0x17, 0x9e];
        self.out.clear();
        self.out.push(0x81);
        let len = text.len();
        if len < 126 {
            self.out.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            self.out.push(0x80 | 126);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.push(0x80 | 127);
            self.out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        self.out.extend_from_slice(&MASK);
        self.out
            .extend(text.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        self.conn.get_mut().write_all(&self.out).await?;
        Ok(())
    }

    /// Read the next text or binary message, answering pings and skipping other control frames.
    pub async fn recv(&mut self) -> Result<Vec<u8>, BenchError> {
        loop {
            let mut h = [0u8; 2];
            self.conn.read_exact(&mut h).await?;
            let opcode = h[0] & 0x0f;
            let masked = h[1] & 0x80 != 0;
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let mut b = [0u8; 2];
                self.conn.read_exact(&mut b).await?;
                len = u64::from(u16::from_be_bytes(b));
            } else if len == 127 {
                let mut b = [0u8; 8];
                self.conn.read_exact(&mut b).await?;
                len = u64::from_be_bytes(b);
            }
            if len > MAX_MESSAGE {
                return Err(BenchError::Protocol("WebSocket message too large".into()));
            }
            let mut mask = [0u8; 4];
            if masked {
                self.conn.read_exact(&mut mask).await?;
            }
            let mut payload = vec![0u8; len as usize];
            self.conn.read_exact(&mut payload).await?;
            if masked {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            match opcode {
                0x1 | 0x2 => return Ok(payload),
                0x8 => {
                    return Err(BenchError::Protocol(
                        "WebSocket closed by the daemon".into(),
                    ))
                }
                0x9 => {
                    // Answer a ping with a pong carrying the same bytes (masked with a zero key).
                    let mut pong = vec![0x8a, 0x80 | (payload.len().min(125) as u8), 0, 0, 0, 0];
                    pong.extend_from_slice(&payload[..payload.len().min(125)]);
                    self.conn.get_mut().write_all(&pong).await?;
                }
                _ => {}
            }
        }
    }
}
