//! Round-trip latency of an agent `ping`: directly on the agent's control channel (the baseline), and
//! through the daemon as JSON-RPC over HTTP/1.1 keep-alive (a minimal client on the caller's task), JSON-RPC over WebSocket, and a legacy v2
//! `Hyper` command. The modes take turns in small blocks so machine noise falls on all of them alike.

use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};

use crate::direct::DirectVm;
use crate::http::HttpClient;
use crate::legacy::LegacyClient;
use crate::procs::{register, Agent, Daemon};
use crate::stats::percentile;
use crate::ws::WsClient;
use crate::BenchError;

/// Pings per block; blocks of the modes alternate.
const BLOCK: usize = 100;
/// Pings per mode before measuring (connection set-up, caches, allocator).
const WARMUP: usize = 200;

/// Latency figures of one mode, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct ModeLatency {
    pub mode: String,
    pub samples: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// p50 of each block: the spread of the median over time.
    pub block_p50_min_us: f64,
    pub block_p50_max_us: f64,
}

/// All modes, and whether the legacy protocol was there to measure.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub direct: ModeLatency,
    pub http: ModeLatency,
    pub ws: ModeLatency,
    pub legacy: Option<ModeLatency>,
    /// An 8-byte echo between this process and a trivial echo process over a unix socket: the cost of one
    /// more process on the path on this machine, which no proxy can go below.
    pub floor: Option<ModeLatency>,
}

/// The echo peer of the floor measurement (run as a child process of the benchmark).
pub fn echo_server(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    let (mut conn, _) = listener.accept()?;
    let mut buf = [0u8; 8];
    loop {
        if conn.read_exact(&mut buf).is_err() {
            return Ok(());
        }
        conn.write_all(&buf)?;
    }
}

/// Round trips to a child echo process.
async fn floor(socket_dir: &std::path::Path, n: usize) -> Result<ModeLatency, BenchError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = socket_dir.join("echo.sock");
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--echo-socket")
        .arg(&path)
        .spawn()?;
    let mut conn = None;
    for _ in 0..200 {
        if let Ok(c) = tokio::net::UnixStream::connect(&path).await {
            conn = Some(c);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let result = async {
        let mut conn = conn.ok_or_else(|| BenchError::Setup("echo peer did not start".into()))?;
        let mut buf = [0u8; 8];
        let mut samples = Vec::with_capacity(n);
        for i in 0..(n + WARMUP) {
            let t = Instant::now();
            conn.write_all(&buf).await?;
            conn.read_exact(&mut buf).await?;
            if i >= WARMUP {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok::<_, BenchError>(summarize(
            "ipc-floor",
            &samples,
            &[percentile(&samples, 50.0)],
        ))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

enum Pinger {
    Direct(DirectVm),
    Http(HttpClient, u64),
    Ws(WsClient, u64),
    Legacy(LegacyClient),
}

impl Pinger {
    async fn ping(&mut self) -> Result<(), BenchError> {
        match self {
            Pinger::Direct(vm) => vm.ping().await,
            Pinger::Http(c, id) => {
                *id += 1;
                check_reply(&c.post(&ping_request(*id)).await?)
            }
            Pinger::Ws(ws, id) => {
                *id += 1;
                ws.send_text(&ping_request(*id)).await?;
                check_reply(&ws.recv().await?)
            }
            Pinger::Legacy(c) => c.ping().await,
        }
    }
}

pub const VM_ID: &str = "lat";

fn ping_request(id: u64) -> Vec<u8> {
    json!({"jsonrpc": "2.0", "id": id, "method": "agent.call",
        "params": {"vm": VM_ID, "command": "ping"}})
    .to_string()
    .into_bytes()
}

fn check_reply(reply: &[u8]) -> Result<(), BenchError> {
    let v: Value = serde_json::from_slice(reply)
        .map_err(|e| BenchError::Protocol(format!("JSON-RPC reply: {e}")))?;
    if v.get("result").is_none() {
        return Err(BenchError::Protocol(format!(
            "ping through the daemon: {v}"
        )));
    }
    Ok(())
}

/// Ping through the daemon in `mode` (`jsonrpc-http`, `jsonrpc-ws`, `legacy-v2`) until `for_how_long` passes;
/// used to profile a missed latency target. VM `vm` must be registered.
pub async fn ping_for(
    socket: &std::path::Path,
    vm: &str,
    mode: &str,
    for_how_long: std::time::Duration,
) -> Result<(), BenchError> {
    let mut p = match mode {
        "jsonrpc-ws" => Pinger::Ws(WsClient::connect(socket).await?, 0),
        "legacy-v2" => match LegacyClient::attach(socket, vm).await? {
            Some(c) => Pinger::Legacy(c),
            None => return Err(BenchError::Setup("legacy protocol not available".into())),
        },
        _ => Pinger::Http(HttpClient::connect(socket).await?, 0),
    };
    let t0 = Instant::now();
    while t0.elapsed() < for_how_long {
        p.ping().await?;
    }
    Ok(())
}

fn summarize(mode: &str, samples: &[f64], blocks: &[f64]) -> ModeLatency {
    let lo = blocks.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = blocks.iter().copied().fold(0.0, f64::max);
    ModeLatency {
        mode: mode.into(),
        samples: samples.len(),
        p50_us: percentile(samples, 50.0),
        p90_us: percentile(samples, 90.0),
        p99_us: percentile(samples, 99.0),
        max_us: percentile(samples, 100.0),
        block_p50_min_us: if lo.is_finite() { lo } else { 0.0 },
        block_p50_max_us: hi,
    }
}

/// Measure `per_mode` pings in each mode. The agent needs two VMs: 0 direct, 1 through the daemon.
pub async fn run(agent: &Agent, daemon: &Daemon, per_mode: usize) -> Result<Latency, BenchError> {
    let client = daemon.client();
    register(&client, VM_ID, agent, 1).await?;
    let mut pingers = vec![
        (
            "direct",
            Pinger::Direct(DirectVm::connect(&agent.vm_path(0)).await?),
        ),
        (
            "jsonrpc-http",
            Pinger::Http(HttpClient::connect(&daemon.socket).await?, 0),
        ),
        (
            "jsonrpc-ws",
            Pinger::Ws(WsClient::connect(&daemon.socket).await?, 0),
        ),
    ];
    if let Some(c) = LegacyClient::attach(&daemon.socket, VM_ID).await? {
        pingers.push(("legacy-v2", Pinger::Legacy(c)));
    }
    for (_, p) in pingers.iter_mut() {
        for _ in 0..WARMUP {
            p.ping().await?;
        }
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(per_mode); pingers.len()];
    let mut blocks: Vec<Vec<f64>> = vec![Vec::new(); pingers.len()];
    let rounds = per_mode.div_ceil(BLOCK);
    for _ in 0..rounds {
        for (i, (_, p)) in pingers.iter_mut().enumerate() {
            let mut block = Vec::with_capacity(BLOCK);
            for _ in 0..BLOCK {
                let t = Instant::now();
                p.ping().await?;
                block.push(t.elapsed().as_secs_f64() * 1e6);
            }
            blocks[i].push(percentile(&block, 50.0));
            samples[i].extend(block);
        }
    }
    let mut out: Vec<ModeLatency> = pingers
        .iter()
        .enumerate()
        .map(|(i, (name, _))| summarize(name, &samples[i], &blocks[i]))
        .collect();
    let legacy = if out.len() > 3 { out.pop() } else { None };
    let ws = out.pop();
    let http = out.pop();
    let direct = out.pop();
    match (direct, http, ws) {
        (Some(direct), Some(http), Some(ws)) => Ok(Latency {
            direct,
            http,
            ws,
            legacy,
            floor: floor(&daemon.socket.with_file_name(""), per_mode)
                .await
                .ok(),
        }),
        _ => Err(BenchError::Setup("latency modes missing".into())),
    }
}
