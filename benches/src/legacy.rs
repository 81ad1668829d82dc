//! A minimal client of the legacy cc-proxy v2 protocol (12-byte frame header, JSON payloads), enough to
//! attach to a registered VM and send `Hyper` commands. Also tells whether the daemon serves v2 at all.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::BenchError;

const TYPE_COMMAND: u8 = 0;
const TYPE_RESPONSE: u8 = 1;
const ERROR_FLAG: u8 = 0x10;
const OP_ATTACH_VM: u8 = 2;
const OP_HYPER: u8 = 3;
/// Largest response payload accepted.
const MAX_PAYLOAD: usize = 1 << 20;

pub struct LegacyClient {
    conn: UnixStream,
    buf: Vec<u8>,
}

impl LegacyClient {
    /// Connect and attach to `vm`. `Ok(None)` means the daemon does not serve v2 (it closed the
    /// connection or did not answer within two seconds).
    pub async fn attach(socket: &Path, vm: &str) -> Result<Option<LegacyClient>, BenchError> {
        let conn = UnixStream::connect(socket).await?;
        let mut c = LegacyClient {
            conn,
            buf: Vec::new(),
        };
        let reply = tokio::time::timeout(
            Duration::from_secs(2),
            c.command(OP_ATTACH_VM, &json!({"containerId": vm, "numIOStreams": 0})),
        )
        .await;
        match reply {
            Ok(Ok(_)) => Ok(Some(c)),
            Ok(Err(BenchError::Io(_))) | Err(_) => Ok(None),
            Ok(Err(e)) => Err(e),
        }
    }

    /// Send one command and wait for its response, skipping stream and notification frames.
    pub async fn command(&mut self, opcode: u8, payload: &Value) -> Result<Vec<u8>, BenchError> {
        let body = payload.to_string().into_bytes();
        self.buf.clear();
        self.buf
            .extend_from_slice(&[0, 2, 3, 0, 0, 0, TYPE_COMMAND, opcode]);
        self.buf
            .extend_from_slice(&(body.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(&body);
        self.conn.write_all(&self.buf).await?;
        loop {
            let mut h = [0u8; 12];
            self.conn.read_exact(&mut h).await?;
            let header_len = usize::from(h[2]) * 4;
            let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
            if h[0] != 0 || h[1] != 2 || header_len < 12 || len > MAX_PAYLOAD {
                return Err(BenchError::Protocol("malformed v2 frame".into()));
            }
            let mut rest = vec![0u8; header_len - 12 + len];
            self.conn.read_exact(&mut rest).await?;
            let payload = rest.split_off(header_len - 12);
            if h[6] & 0x0f != TYPE_RESPONSE {
                continue;
            }
            if h[6] & ERROR_FLAG != 0 {
                return Err(BenchError::Protocol(format!(
                    "v2 error: {}",
                    String::from_utf8_lossy(&payload)
                )));
            }
            return Ok(payload);
        }
    }

    /// `Hyper` ping.
    pub async fn ping(&mut self) -> Result<(), BenchError> {
        self.command(
            OP_HYPER,
            &json!({"hyperName": "ping", "tokens": [], "data": {}}),
        )
        .await
        .map(|_| ())
    }
}
