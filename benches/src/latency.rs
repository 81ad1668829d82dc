//! Round-trip latency of an agent `ping`: directly on the agent's control channel (the baseline), and
//! through the daemon as JSON-RPC over HTTP/1.1 keep-alive, JSON-RPC over WebSocket, and a legacy v2
//! `Hyper` command. The modes take turns in small blocks so machine noise falls on all of them alike.

use std::time::Instant;

use cc_proxy_api::client::Client;
use serde::Serialize;
use serde_json::{json, Value};

use crate::direct::DirectVm;
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
}

enum Pinger {
    Direct(DirectVm),
    Http(Client),
    Ws(WsClient, u64),
    Legacy(LegacyClient),
}

impl Pinger {
    async fn ping(&mut self) -> Result<(), BenchError> {
        match self {
            Pinger::Direct(vm) => vm.ping().await,
            Pinger::Http(c) => c
                .call::<Value>("agent.call", json!({"vm": VM_ID, "command": "ping"}))
                .await
                .map(|_| ())
                .map_err(Into::into),
            Pinger::Ws(ws, id) => {
                *id += 1;
                let req = json!({"jsonrpc": "2.0", "id": *id, "method": "agent.call",
                    "params": {"vm": VM_ID, "command": "ping"}});
                ws.send_text(req.to_string().as_bytes()).await?;
                let reply = ws.recv().await?;
                let v: Value = serde_json::from_slice(&reply)
                    .map_err(|e| BenchError::Protocol(format!("WebSocket reply: {e}")))?;
                if v.get("error").is_some() {
                    return Err(BenchError::Protocol(format!("ping over WebSocket: {v}")));
                }
                Ok(())
            }
            Pinger::Legacy(c) => c.ping().await,
        }
    }
}

const VM_ID: &str = "lat";

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
        ("jsonrpc-http", Pinger::Http(client)),
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
        }),
        _ => Err(BenchError::Setup("latency modes missing".into())),
    }
}
