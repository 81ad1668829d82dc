//! The baseline: a host client that speaks the agent protocol directly (hybrid vsock `CONNECT`, READY,
//! GETVERSION, commands on the control channel, stdio packets on the I/O channel), with no cc-proxy in
//! between. Every "without cc-proxy" figure is measured with this client against the same test agent.

use std::path::Path;

use bytes::Bytes;
use cc_proxy_protocol::{code, ControlCodec, ControlFrame, IoCodec, IoFrame};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::BenchError;

/// Control channel port of hybrid vsock agents.
pub const CONTROL_PORT: u32 = 2718;
/// I/O channel port.
pub const IO_PORT: u32 = 2719;

/// Open a hybrid vsock connection to `port` through the VMM-style socket at `path`.
pub async fn hvsock_connect(path: &Path, port: u32) -> Result<UnixStream, BenchError> {
    let mut s = UnixStream::connect(path).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        if s.read(&mut b).await? == 0 {
            break;
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(BenchError::Protocol(format!(
            "hybrid vsock CONNECT {port} answered {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    Ok(s)
}

type ControlRead = FramedRead<tokio::net::unix::OwnedReadHalf, ControlCodec>;
type ControlWrite = FramedWrite<tokio::net::unix::OwnedWriteHalf, ControlCodec>;
pub type IoRead = FramedRead<tokio::net::unix::OwnedReadHalf, IoCodec>;
pub type IoWrite = FramedWrite<tokio::net::unix::OwnedWriteHalf, IoCodec>;

/// A direct session with one VM of the agent: its control channel, and its I/O channel split in two.
pub struct DirectVm {
    ctl_rx: ControlRead,
    ctl_tx: ControlWrite,
    pub io_rx: IoRead,
    pub io_tx: IoWrite,
}

impl DirectVm {
    /// Connect both channels, wait for READY and ask GETVERSION, as a host must.
    pub async fn connect(path: &Path) -> Result<DirectVm, BenchError> {
        let (r, w) = hvsock_connect(path, CONTROL_PORT).await?.into_split();
        let mut ctl_rx = FramedRead::new(r, ControlCodec::default());
        let ctl_tx = FramedWrite::new(w, ControlCodec::default());
        match ctl_rx.next().await {
            Some(Ok(f)) if f.code == code::READY => {}
            other => {
                return Err(BenchError::Protocol(format!(
                    "expected READY, got {other:?}"
                )))
            }
        }
        let (r, w) = hvsock_connect(path, IO_PORT).await?.into_split();
        let mut vm = DirectVm {
            ctl_rx,
            ctl_tx,
            io_rx: FramedRead::new(r, IoCodec::default()),
            io_tx: FramedWrite::new(w, IoCodec::default()),
        };
        vm.command(code::GETVERSION, Bytes::new()).await?;
        Ok(vm)
    }

    /// Send one command and wait for its reply, skipping unsolicited messages.
    pub async fn command(&mut self, code: u32, payload: Bytes) -> Result<Bytes, BenchError> {
        self.ctl_tx.send(ControlFrame::new(code, payload)).await?;
        loop {
            match self.ctl_rx.next().await {
                Some(Ok(f)) if f.code == code::ACK => return Ok(f.payload),
                Some(Ok(f)) if f.code == code::ERROR => {
                    return Err(BenchError::Protocol(format!(
                        "agent error: {}",
                        String::from_utf8_lossy(&f.payload)
                    )))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(BenchError::Protocol("control channel closed".into())),
            }
        }
    }

    pub async fn ping(&mut self) -> Result<(), BenchError> {
        self.command(code::PING, Bytes::new()).await.map(|_| ())
    }

    /// Start `args` in the agent's own namespaces with stdout on `seq` (stderr merged).
    pub async fn exec(&mut self, args: &[&str], seq: u64) -> Result<(), BenchError> {
        let payload = json!({
            "container": "hyperstart",
            "process": {"args": args, "terminal": false, "stdio": seq, "stderr": 0},
        });
        self.command(code::EXECCMD, Bytes::from(payload.to_string()))
            .await
            .map(|_| ())
    }
}

/// What the agent delivered for one sequence number.
#[derive(Debug, Default, Clone)]
pub struct SeqOutput {
    pub bytes: u64,
    pub data: Vec<u8>,
    pub status: Option<u8>,
    eof: bool,
}

/// Fold one I/O packet into `out`; returns true when that stream has its exit status (cc-agent dialect:
/// an empty packet, then a one-byte status packet).
pub fn absorb(out: &mut SeqOutput, frame: &IoFrame, keep: bool) -> bool {
    if out.eof {
        out.status = frame.data.first().copied();
        return true;
    }
    if frame.data.is_empty() {
        out.eof = true;
        return false;
    }
    out.bytes += frame.data.len() as u64;
    if keep {
        out.data.extend_from_slice(&frame.data);
    }
    false
}

/// Read packets until every sequence in `seqs` has its exit status; returns each stream's output and the
/// instant it finished.
pub async fn read_until_exit(
    io_rx: &mut IoRead,
    seqs: &[u64],
    keep: bool,
) -> Result<Vec<(SeqOutput, std::time::Instant)>, BenchError> {
    let mut outs: Vec<(SeqOutput, std::time::Instant)> = seqs
        .iter()
        .map(|_| (SeqOutput::default(), std::time::Instant::now()))
        .collect();
    let mut left = seqs.len();
    while left > 0 {
        let frame = match io_rx.next().await {
            Some(f) => f?,
            None => return Err(BenchError::Protocol("I/O channel closed".into())),
        };
        if let Some(i) = seqs.iter().position(|s| *s == frame.seq) {
            if outs[i].0.status.is_none() && absorb(&mut outs[i].0, &frame, keep) {
                outs[i].1 = std::time::Instant::now();
                left -= 1;
            }
        }
    }
    Ok(outs)
}
