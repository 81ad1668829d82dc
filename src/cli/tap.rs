//! `cc-proxy tap [VM]`: print live tap events, one line each (JSON lines with `--json`).
//!
//! The tap is a JSON-RPC subscription (`tap.observe`), which jsonrpsee serves over WebSocket only. Its
//! WebSocket client speaks TCP URLs, so this file holds a small client of its own over the daemon's AF_UNIX
//! socket: an HTTP/1.1 upgrade, masked text frames out, text/continuation/ping/close frames in. Frame
//! parsing ([`parse_frame`]) is pure and tested apart from the socket.
//!
//! The handshake's `Sec-WebSocket-Accept` is not checked: it guards against HTTP caches and servers that
//! do not speak WebSocket, and the peer here is the daemon behind a socket whose permissions the operator
//! already chose.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use bytes::{Buf, BytesMut};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Largest message accepted from the daemon; tap events are a few hundred bytes.
const MAX_MESSAGE: usize = 1 << 20;
/// Largest HTTP response head accepted during the upgrade.
const MAX_HEAD: usize = 16 * 1024;
/// Time the daemon has to accept the upgrade and answer the subscription.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a tap ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon refused the WebSocket upgrade: {0}")]
    Upgrade(String),
    #[error("WebSocket protocol error: {0}")]
    Protocol(&'static str),
    #[error("the daemon did not answer in time")]
    Timeout,
    #[error("{message} (code {code})")]
    Rpc { code: i64, message: String },
}

/// WebSocket opcodes this client handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

/// One parsed frame.
#[derive(Debug, PartialEq, Eq)]
pub struct WsFrame {
    pub fin: bool,
    pub opcode: Opcode,
    pub payload: Vec<u8>,
}

/// Parse one frame from the front of `buf`: `Ok(None)` when more bytes are needed, else the frame and the
/// number of bytes it took.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(WsFrame, usize)>, TapError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    if buf[0] & 0x70 != 0 {
        return Err(TapError::Protocol("reserved bits set"));
    }
    let opcode = match buf[0] & 0x0f {
        0x0 => Opcode::Continuation,
        0x1 => Opcode::Text,
        0x2 => Opcode::Binary,
        0x8 => Opcode::Close,
        0x9 => Opcode::Ping,
        0xa => Opcode::Pong,
        _ => return Err(TapError::Protocol("unknown opcode")),
    };
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if len > MAX_MESSAGE as u64 {
        return Err(TapError::Protocol("frame too large"));
    }
    let len = len as usize;
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    if buf.len() < at + len {
        return Ok(None);
    }
    let mut payload = buf[at..at + len].to_vec();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Ok(Some((
        WsFrame {
            fin,
            opcode,
            payload,
        },
        at + len,
    )))
}

/// Encode a final client frame (clients must mask every frame).
pub fn encode_frame(opcode: Opcode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let code = match opcode {
        Opcode::Continuation => 0x0,
        Opcode::Text => 0x1,
        Opcode::Binary => 0x2,
        Opcode::Close => 0x8,
        Opcode::Ping => 0x9,
        Opcode::Pong => 0xa,
    };
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | code);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A WebSocket connection to the daemon.
struct WsConn {
    sock: UnixStream,
    buf: BytesMut,
}

impl WsConn {
    async fn connect(socket: &Path) -> Result<WsConn, TapError> {
        let mut sock = UnixStream::connect(socket)
            .await
            .map_err(|e| TapError::Connect(socket.display().to_string(), e))?;
        let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
        let req = format!(
            "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        sock.write_all(req.as_bytes()).await?;
        let mut buf = BytesMut::with_capacity(4096);
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err(TapError::Upgrade("response head too large".into()));
            }
            if sock.read_buf(&mut buf).await? == 0 {
                return Err(TapError::Upgrade("connection closed".into()));
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status = head.lines().next().unwrap_or_default().to_string();
        if status.split_whitespace().nth(1) != Some("101") {
            return Err(TapError::Upgrade(status));
        }
        buf.advance(head_end);
        Ok(WsConn { sock, buf })
    }

    async fn send_text(&mut self, text: &str) -> Result<(), TapError> {
        let frame = encode_frame(Opcode::Text, text.as_bytes(), rand::random());
        self.sock.write_all(&frame).await?;
        Ok(())
    }

    /// The next whole text message; `None` once the daemon closed the connection.
    async fn next_message(&mut self) -> Result<Option<String>, TapError> {
        let mut message: Vec<u8> = Vec::new();
        loop {
            let Some((frame, used)) = parse_frame(&self.buf)? else {
                if self.sock.read_buf(&mut self.buf).await? == 0 {
                    return Ok(None);
                }
                continue;
            };
            self.buf.advance(used);
            match frame.opcode {
                Opcode::Ping => {
                    let pong = encode_frame(Opcode::Pong, &frame.payload, rand::random());
                    self.sock.write_all(&pong).await?;
                }
                Opcode::Pong => {}
                Opcode::Close => {
                    let _ = self
                        .sock
                        .write_all(&encode_frame(Opcode::Close, &[], rand::random()))
                        .await;
                    return Ok(None);
                }
                Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                    if message.len() + frame.payload.len() > MAX_MESSAGE {
                        return Err(TapError::Protocol("message too large"));
                    }
                    message.extend_from_slice(&frame.payload);
                    if frame.fin {
                        return Ok(Some(String::from_utf8_lossy(&message).into_owned()));
                    }
                }
            }
        }
    }

    async fn close(mut self) {
        let _ = self
            .sock
            .write_all(&encode_frame(Opcode::Close, &[], rand::random()))
            .await;
        let _ = self.sock.shutdown().await;
    }
}

/// `HH:MM:SS.mmm` (UTC) of a millisecond timestamp.
fn clock(ts_ms: u64) -> String {
    let day_ms = ts_ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

/// One human-readable line for an event: time, VM, event name, then its other fields as `key=value`.
pub fn format_event(e: &Value) -> String {
    let Some(obj) = e.as_object() else {
        return e.to_string();
    };
    let ts = obj.get("ts_ms").and_then(Value::as_u64).unwrap_or(0);
    let vm = obj.get("vm").and_then(Value::as_str).unwrap_or("-");
    let name = obj.get("event").and_then(Value::as_str).unwrap_or("?");
    let mut line = format!("{}Z {vm:<16} {name:<16}", clock(ts));
    for (k, v) in obj {
        if matches!(k.as_str(), "ts_ms" | "seq" | "vm" | "event") || v.is_null() {
            continue;
        }
        match (k.as_str(), v.as_u64()) {
            ("latency_us", Some(us)) => {
                line.push_str(&format!(" latency={:.3}ms", us as f64 / 1000.0))
            }
            // Names such as process ids come from clients: never print control characters raw.
            _ => match v.as_str() {
                Some(s) => line.push_str(&format!(
                    " {k}={}",
                    crate::logging::escape_bytes(s.as_bytes(), 256)
                )),
                None => line.push_str(&format!(" {k}={v}")),
            },
        }
    }
    line
}

async fn follow(socket: &Path, opts: TapOptions, json: bool) -> Result<(), TapError> {
    let TapOptions {
        vm,
        limit,
        filter,
        rate,
    } = opts;
    let mut conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, WsConn::connect(socket))
        .await
        .map_err(|_| TapError::Timeout)??;
    let mut params = serde_json::Map::new();
    if let Some(vm) = vm {
        params.insert("vm".into(), json!(vm));
    }
    if let Some(l) = limit {
        params.insert("limit".into(), json!(l));
    }
    if !filter.is_empty() {
        params.insert("filter".into(), json!(filter));
    }
    if let Some(r) = rate {
        params.insert("rate".into(), json!(r));
    }
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": "tap.observe", "params": params});
    conn.send_text(&req.to_string()).await?;

    // The first answer to id 1 is the subscription id or an error.
    let subscription = loop {
        let msg = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.next_message())
            .await
            .map_err(|_| TapError::Timeout)??;
        let Some(msg) = msg else {
            return Err(TapError::Upgrade(
                "connection closed before the tap opened".into(),
            ));
        };
        let Ok(v) = serde_json::from_str::<Value>(&msg) else {
            continue;
        };
        if v.get("id") != Some(&json!(1)) {
            continue;
        }
        if let Some(err) = v.get("error") {
            return Err(TapError::Rpc {
                code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: err
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("error")
                    .to_string(),
            });
        }
        break v.get("result").cloned().unwrap_or(Value::Null);
    };

    let mut shown = 0u64;
    let stdout = std::io::stdout();
    while let Some(msg) = conn.next_message().await? {
        let Ok(v) = serde_json::from_str::<Value>(&msg) else {
            continue;
        };
        if v.get("method").and_then(Value::as_str) != Some("tap.event")
            || v.pointer("/params/subscription") != Some(&subscription)
        {
            continue;
        }
        let Some(event) = v.pointer("/params/result") else {
            continue;
        };
        let line = if json {
            event.to_string()
        } else {
            format_event(event)
        };
        let mut out = stdout.lock();
        // A closed stdout (`| head`) ends the tap quietly.
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            break;
        }
        if event.get("event").and_then(Value::as_str) != Some("dropped") {
            shown += 1;
            if limit.is_some_and(|l| shown >= l) {
                break;
            }
        }
    }
    conn.close().await;
    Ok(())
}

/// Follow `tap.observe` over a WebSocket on the daemon's socket until interrupted, the daemon closes the
/// tap, or `limit` events were printed. Returns the exit status.
/// What to ask `tap.observe` for.
#[derive(Debug, Default, Clone)]
pub struct TapOptions {
    pub vm: Option<String>,
    pub limit: Option<u64>,
    /// Event names to keep (`agent_command`, `process_exited`, ...); empty = all.
    pub filter: Vec<String>,
    /// Most events per second.
    pub rate: Option<u32>,
}

pub async fn run(socket: &Path, opts: TapOptions, json: bool) -> u8 {
    match follow(socket, opts, json).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cc-proxy: tap: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_the_mask() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let enc = encode_frame(Opcode::Text, &payload, [1, 2, 3, 4]);
            let Ok(Some((f, used))) = parse_frame(&enc) else {
                panic!("no frame for {len}");
            };
            assert_eq!(used, enc.len());
            assert!(f.fin);
            assert_eq!(f.opcode, Opcode::Text);
            assert_eq!(f.payload, payload);
            // Every strict prefix asks for more bytes.
            for cut in [1, 2, enc.len() - 1] {
                if cut < enc.len() {
                    assert!(
                        matches!(parse_frame(&enc[..cut]), Ok(None)),
                        "len {len} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn server_frames_are_unmasked_and_bad_ones_refused() {
        let f = [0x81, 0x02, b'h', b'i'];
        let Ok(Some((frame, 4))) = parse_frame(&f) else {
            panic!("not parsed");
        };
        assert_eq!(frame.payload, b"hi");
        assert!(parse_frame(&[0xC1, 0x00]).is_err(), "reserved bit");
        assert!(parse_frame(&[0x83, 0x00]).is_err(), "unknown opcode");
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&(u64::MAX).to_be_bytes());
        assert!(parse_frame(&huge).is_err(), "oversized");
    }

    #[test]
    fn events_print_as_one_line() {
        let e = json!({"ts_ms": 3_723_004u64, "event": "agent_command", "vm": "vm1",
                       "command": "execcmd", "result": "ok", "latency_us": 1500});
        assert_eq!(
            format_event(&e),
            "01:02:03.004Z vm1              agent_command    command=execcmd result=ok latency=1.500ms"
        );
        let d = json!({"ts_ms": 0, "event": "dropped", "count": 7});
        assert!(format_event(&d).ends_with("dropped          count=7"));
    }
}
