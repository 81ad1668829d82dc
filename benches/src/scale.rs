//! Scale: registration rate and resident memory per registered VM (1,000 VMs served by one multi-VM test
//! agent), memory per open idle stream (10,000), and time from spawn to `READY=1`.
//!
//! Memory is the daemon's VmRSS after the load minus VmRSS of the same daemon idle just before it.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cc_proxy_api::client::{AttachedStream, Client};
use cc_proxy_api::types::StreamAllocation;
use serde::Serialize;
use serde_json::json;

use crate::procs::{free_addr, register, terminate, Agent, Daemon, Setup};
use crate::BenchError;

/// Client connections used to register VMs and open streams concurrently (like several runtimes).
const CONCURRENCY: usize = 16;
/// Time given to the daemon to settle (allocator, lazily spawned tasks) before reading RSS.
const SETTLE: Duration = Duration::from_millis(300);

/// One repetition with `vms` VMs (and optionally streams).
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRun {
    pub vms: usize,
    pub register_secs: f64,
    pub register_rate: f64,
    pub idle_rss: u64,
    pub vms_rss: u64,
    pub per_vm_bytes: f64,
    /// Streams opened (0 when this repetition did not measure streams).
    pub streams: usize,
    /// RSS per allocated token with no shim attached.
    pub per_token_bytes: f64,
    /// RSS per stream with its shim attached and idle (token + connection).
    pub per_stream_bytes: f64,
}

async fn settle_rss(daemon: &Daemon) -> Result<u64, BenchError> {
    tokio::time::sleep(SETTLE).await;
    daemon.rss()
}

/// Run `n` jobs over `CONCURRENCY` workers, each with its own client connection.
async fn fan_out<F, Fut, T>(daemon: &Daemon, n: usize, job: F) -> Result<Vec<T>, BenchError>
where
    F: Fn(Arc<Client>, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<T, BenchError>> + Send,
    T: Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let job = Arc::new(job);
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let client = Arc::new(daemon.client());
        let next = next.clone();
        let job = job.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, BenchError>(out);
                }
                out.push((i, job(client.clone(), i).await?));
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.map_err(|e| BenchError::Setup(e.to_string()))??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, v)| v).collect())
}

/// One repetition on a fresh daemon: register every VM of `agent`, then (when `streams` > 0) allocate that
/// many stream tokens spread over the VMs and attach an idle shim to each.
pub async fn run(
    setup: &Setup,
    agent: Arc<Agent>,
    name: &str,
    streams: usize,
) -> Result<ScaleRun, BenchError> {
    let daemon = Daemon::start(setup, name).await?;
    let vms = agent.count;
    let warm = daemon.client();
    for _ in 0..10 {
        warm.version().await?;
    }
    let idle_rss = settle_rss(&daemon).await?;
    let t0 = Instant::now();
    let a = agent.clone();
    fan_out(&daemon, vms, move |c, i| {
        let a = a.clone();
        async move { register(&c, &format!("vm{i}"), &a, i).await }
    })
    .await?;
    let register_secs = t0.elapsed().as_secs_f64();
    let vms_rss = settle_rss(&daemon).await?;
    let mut run = ScaleRun {
        vms,
        register_secs,
        register_rate: vms as f64 / register_secs,
        idle_rss,
        vms_rss,
        per_vm_bytes: (vms_rss as f64 - idle_rss as f64) / vms as f64,
        streams,
        per_token_bytes: 0.0,
        per_stream_bytes: 0.0,
    };
    if streams > 0 {
        let tokens: Vec<String> = fan_out(&daemon, streams, move |c, i| async move {
            let a: StreamAllocation = c
                .call("stream.allocate", json!({"id": format!("vm{}", i % vms)}))
                .await?;
            Ok(a.token)
        })
        .await?;
        let tokens_rss = settle_rss(&daemon).await?;
        let tokens = Arc::new(tokens);
        let t = tokens.clone();
        let held: Vec<AttachedStream> = fan_out(&daemon, streams, move |c, i| {
            let t = t.clone();
            async move { Ok(c.attach(&t[i]).await?) }
        })
        .await?;
        let streams_rss = settle_rss(&daemon).await?;
        run.per_token_bytes = (tokens_rss as f64 - vms_rss as f64) / streams as f64;
        run.per_stream_bytes = (streams_rss as f64 - vms_rss as f64) / streams as f64;
        drop(held);
    }
    Ok(run)
}

/// Time from spawning the daemon to its `READY=1` on `NOTIFY_SOCKET`, in milliseconds.
pub async fn startup(setup: &Setup, name: &str) -> Result<f64, BenchError> {
    let dir = setup.dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let notify = dir.join("notify.sock");
    let _ = std::fs::remove_file(&notify);
    let sock = tokio::net::UnixDatagram::bind(&notify)?;
    let socket = dir.join("p.sock");
    let _ = std::fs::remove_file(&socket);
    let admin = free_addr()?;
    let mut cmd = Command::new(&setup.proxy_bin);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--admin-addr")
        .arg(admin)
        .args(["--log", "warn", "--log-target", "stderr"])
        .env("NOTIFY_SOCKET", &notify)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn()?;
    let mut buf = vec![0u8; 4096];
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = sock.recv(&mut buf).await?;
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "READY=1")
            {
                return Ok::<_, std::io::Error>(t0.elapsed());
            }
        }
    })
    .await;
    terminate(&mut child);
    match waited {
        Ok(Ok(d)) => Ok(d.as_secs_f64() * 1e3),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(BenchError::Setup("no READY=1 within 10 s".into())),
    }
}
