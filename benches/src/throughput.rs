//! Throughput: stdout (agent to shim) on one stream and on 64 concurrent streams across 8 VMs, and stdin
//! (shim to agent). Each repetition runs the baseline (direct agent client) and the proxied path back to
//! back against the same agent process, so both see the same machine load; the figure is their ratio.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cc_proxy_api::client::Client;
use cc_proxy_api::stream::{Channel, Frame};
use cc_proxy_protocol::{IoFrame, MAX_STDIN_PACKET};
use futures::{SinkExt, StreamExt};

use crate::direct::{read_until_exit, DirectVm};
use crate::procs::{register, Agent, Daemon};
use crate::BenchError;

/// Bytes of each `dd` write: the 64 KiB writes.
pub const WRITE_SIZE: u64 = 64 * 1024;
/// Streams in the concurrent run, and the VMs they are spread over.
pub const CONCURRENT_STREAMS: usize = 64;
pub const CONCURRENT_VMS: usize = 8;

/// Next free sequence number for the direct sessions (never reused, so no stale state can interfere).
static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

fn next_seq() -> u64 {
    NEXT_SEQ.fetch_add(2, Ordering::Relaxed)
}

/// The command that writes `bytes` to stdout in 64 KiB writes.
fn writer_args(bytes: u64) -> Vec<String> {
    vec![
        "dd".into(),
        "if=/dev/zero".into(),
        format!("bs={WRITE_SIZE}"),
        format!("count={}", bytes.div_ceil(WRITE_SIZE)),
        "status=none".into(),
    ]
}

/// One repetition's measurement of a data path.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Aggregate bytes per second.
    pub rate: f64,
    /// Slowest over fastest per-stream rate (1.0 for a single stream).
    pub fairness: f64,
}

/// The VMs a throughput session uses: direct sessions and registered VM ids on one agent.
pub struct Rig {
    pub direct_single: DirectVm,
    pub direct_many: Vec<DirectVm>,
    pub proxy_single: String,
    pub proxy_many: Vec<String>,
    pub client: Client,
}

impl Rig {
    /// VM 0 direct, VM 1 through the daemon, VMs 2..10 direct, VMs 10..18 through the daemon.
    pub const AGENT_VMS: usize = 2 + 2 * CONCURRENT_VMS;

    pub async fn new(agent: &Agent, daemon: &Daemon) -> Result<Rig, BenchError> {
        let client = daemon.client();
        let direct_single = DirectVm::connect(&agent.vm_path(0)).await?;
        register(&client, "tp-single", agent, 1).await?;
        let mut direct_many = Vec::new();
        let mut proxy_many = Vec::new();
        for i in 0..CONCURRENT_VMS {
            direct_many.push(DirectVm::connect(&agent.vm_path(2 + i)).await?);
            let id = format!("tp-many-{i}");
            register(&client, &id, agent, 2 + CONCURRENT_VMS + i).await?;
            proxy_many.push(id);
        }
        Ok(Rig {
            direct_single,
            direct_many,
            proxy_single: "tp-single".into(),
            proxy_many,
            client,
        })
    }
}

/// Stdout of one `dd` read directly from the agent's I/O channel.
pub async fn direct_stdout(vm: &mut DirectVm, bytes: u64) -> Result<Run, BenchError> {
    let args = writer_args(bytes);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let seq = next_seq();
    let t0 = Instant::now();
    vm.exec(&args, seq).await?;
    let outs = read_until_exit(&mut vm.io_rx, &[seq], false).await?;
    let got = outs[0].0.bytes;
    check_bytes(got, bytes)?;
    Ok(Run {
        rate: got as f64 / t0.elapsed().as_secs_f64(),
        fairness: 1.0,
    })
}

/// Run `dd` through the daemon: `agent.call execcmd` with a stream, attach, read to the exit frame.
/// Returns the bytes and when the stream ended.
async fn proxy_stream(client: &Client, vm: &str, bytes: u64) -> Result<(u64, Instant), BenchError> {
    let args = writer_args(bytes);
    let result = client.exec(vm, &args, false).await?;
    let token = result
        .token
        .ok_or_else(|| BenchError::Protocol("execcmd gave no token".into()))?;
    let mut stream = client.attach(&token).await?;
    let mut got = 0u64;
    while let Some(frame) = stream.next().await {
        let frame = frame?;
        match frame.channel {
            Channel::Stdout | Channel::Stderr => got += frame.payload.len() as u64,
            Channel::Exit => return Ok((got, Instant::now())),
            Channel::Error => {
                return Err(BenchError::Protocol(format!(
                    "stream error: {}",
                    String::from_utf8_lossy(&frame.payload)
                )))
            }
            _ => {}
        }
    }
    Err(BenchError::Protocol("stream ended without exit".into()))
}

fn check_bytes(got: u64, want: u64) -> Result<(), BenchError> {
    let want = want.div_ceil(WRITE_SIZE) * WRITE_SIZE;
    if got != want {
        return Err(BenchError::Protocol(format!(
            "expected {want} bytes of output, got {got}"
        )));
    }
    Ok(())
}

pub async fn proxy_stdout(client: &Client, vm: &str, bytes: u64) -> Result<Run, BenchError> {
    let t0 = Instant::now();
    let (got, end) = proxy_stream(client, vm, bytes).await?;
    check_bytes(got, bytes)?;
    Ok(Run {
        rate: got as f64 / (end - t0).as_secs_f64(),
        fairness: 1.0,
    })
}

/// Aggregate rate and fairness of streams that all started at `t0`.
fn summarize(t0: Instant, ends: &[(u64, Instant)]) -> Run {
    let total: u64 = ends.iter().map(|e| e.0).sum();
    let last = ends.iter().map(|e| e.1).max().unwrap_or(t0);
    let rates: Vec<f64> = ends
        .iter()
        .map(|(b, end)| *b as f64 / (*end - t0).as_secs_f64().max(1e-9))
        .collect();
    let max = rates.iter().copied().fold(0.0, f64::max);
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
    Run {
        rate: total as f64 / (last - t0).as_secs_f64().max(1e-9),
        fairness: if max > 0.0 { min / max } else { 0.0 },
    }
}

/// 64 `dd` processes across 8 direct sessions (8 per VM), all started together.
pub async fn direct_stdout_many(
    vms: Vec<DirectVm>,
    per_stream: u64,
) -> Result<(Run, Vec<DirectVm>), BenchError> {
    let per_vm = CONCURRENT_STREAMS / vms.len().max(1);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for mut vm in vms {
        tasks.push(tokio::spawn(async move {
            let args = writer_args(per_stream);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let seqs: Vec<u64> = (0..per_vm).map(|_| next_seq()).collect();
            for s in &seqs {
                vm.exec(&args, *s).await?;
            }
            let outs = read_until_exit(&mut vm.io_rx, &seqs, false).await?;
            let ends: Vec<(u64, Instant)> = outs.iter().map(|(o, t)| (o.bytes, *t)).collect();
            Ok::<_, BenchError>((ends, vm))
        }));
    }
    let mut ends = Vec::new();
    let mut back = Vec::new();
    for t in tasks {
        let (e, vm) = t.await.map_err(|e| BenchError::Setup(e.to_string()))??;
        ends.extend(e);
        back.push(vm);
    }
    for (b, _) in &ends {
        check_bytes(*b, per_stream)?;
    }
    Ok((summarize(t0, &ends), back))
}

/// 64 streams through the daemon across 8 VMs, each with its own client connection (as shims have).
pub async fn proxy_stdout_many(
    daemon: &Daemon,
    vms: &[String],
    per_stream: u64,
) -> Result<Run, BenchError> {
    let clients: Vec<Client> = (0..CONCURRENT_STREAMS).map(|_| daemon.client()).collect();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let vm = vms[i % vms.len()].clone();
        tasks.push(tokio::spawn(async move {
            proxy_stream(&client, &vm, per_stream).await
        }));
    }
    let mut ends = Vec::new();
    for t in tasks {
        let e = t.await.map_err(|e| BenchError::Setup(e.to_string()))??;
        check_bytes(e.0, per_stream)?;
        ends.push(e);
    }
    Ok(summarize(t0, &ends))
}

/// The command that consumes stdin and reports its length.
const COUNTER: [&str; 2] = ["wc", "-c"];

fn check_count(stdout: &[u8], want: u64) -> Result<(), BenchError> {
    let text = String::from_utf8_lossy(stdout);
    if text.trim() != want.to_string() {
        return Err(BenchError::Protocol(format!(
            "the agent's process counted {:?} stdin bytes, expected {want}",
            text.trim()
        )));
    }
    Ok(())
}

/// Stdin written directly as I/O packets of the protocol's stdin packet size, then closed.
pub async fn direct_stdin(vm: &mut DirectVm, bytes: u64) -> Result<Run, BenchError> {
    let seq = next_seq();
    let chunk = Bytes::from(vec![b'x'; MAX_STDIN_PACKET]);
    let t0 = Instant::now();
    vm.exec(&COUNTER, seq).await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        vm.io_tx.feed(IoFrame::new(seq, chunk.slice(..n))).await?;
        left -= n as u64;
    }
    vm.io_tx.send(IoFrame::eof(seq)).await?;
    let outs = read_until_exit(&mut vm.io_rx, &[seq], true).await?;
    check_count(&outs[0].0.data, bytes)?;
    Ok(Run {
        rate: bytes as f64 / t0.elapsed().as_secs_f64(),
        fairness: 1.0,
    })
}

/// Stdin written by a shim in 64 KiB stdin frames through the daemon, then closed.
pub async fn proxy_stdin(client: &Client, vm: &str, bytes: u64) -> Result<Run, BenchError> {
    let args: Vec<String> = COUNTER.iter().map(|s| s.to_string()).collect();
    let chunk = Bytes::from(vec![b'x'; WRITE_SIZE as usize]);
    let t0 = Instant::now();
    let result = client.exec(vm, &args, false).await?;
    let token = result
        .token
        .ok_or_else(|| BenchError::Protocol("execcmd gave no token".into()))?;
    let mut stream = client.attach(&token).await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream
            .feed(Frame::new(Channel::Stdin, chunk.slice(..n)))
            .await?;
        left -= n as u64;
    }
    stream
        .send(Frame::new(Channel::Stdin, Bytes::new()))
        .await?;
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        cc_proxy_api::client::collect(&mut stream),
    )
    .await
    .map_err(|_| BenchError::Protocol("stdin run timed out".into()))??;
    if out.status != Some(0) {
        return Err(BenchError::Protocol(format!(
            "stdin run ended with {:?} {:?}",
            out.status, out.error
        )));
    }
    check_count(&out.stdout, bytes)?;
    Ok(Run {
        rate: bytes as f64 / t0.elapsed().as_secs_f64(),
        fairness: 1.0,
    })
}
