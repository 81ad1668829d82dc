//! `cc-proxy-bench`: measures the release `cc-proxy` against baselines taken in the same run (a direct
//! client of the test agent's channels, or the idle daemon) and writes `docs/benchmarks.md` with SVG
//! charts and `target/bench/results.json`. See `benches/README.md`.
//!
//! Every figure is a ratio to its baseline or a bound check; absolute numbers are context only.

mod direct;
mod http;
mod latency;
mod legacy;
mod mesh;
mod procs;
mod profile;
mod report;
mod scale;
mod stats;
mod throughput;
mod ws;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::procs::{Agent, Daemon, Setup};
use crate::report::{Report, RunMeta, ThroughputPair};
use crate::throughput::Rig;

/// What can stop a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("daemon client: {0}")]
    Client(#[from] cc_proxy_api::client::ClientError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("setup: {0}")]
    Setup(String),
}

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of cc-proxy against same-run baselines")]
struct Args {
    /// Fewer repetitions and smaller transfers (under 2 minutes).
    #[arg(long)]
    quick: bool,
    /// The daemon binary.
    #[arg(long, default_value = "target/release/cc-proxy")]
    proxy: PathBuf,
    /// The test agent binary.
    #[arg(long, default_value = "target/release/cc-test-agent")]
    agent: PathBuf,
    /// The Markdown report.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// Directory for the SVG charts (linked from the report by a path relative to it).
    #[arg(long, default_value = "docs/benchmarks")]
    charts: PathBuf,
    /// Machine-readable results.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// Do not record `perf` profiles for missed targets.
    #[arg(long)]
    no_profile: bool,
    /// Only these groups (comma separated: startup,throughput,latency,scale,mesh); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Internal: serve as the echo peer of the latency floor on this unix socket.
    #[arg(long, hide = true)]
    echo_socket: Option<PathBuf>,
}

/// Sizes and counts of one run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Plan {
    pub reps: usize,
    pub stdout_bytes: u64,
    pub stdin_bytes: u64,
    pub per_stream_bytes: u64,
    pub pings: usize,
    pub vms: usize,
    pub streams: usize,
    pub scale_reps: usize,
    pub startup_reps: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                reps: 3,
                stdout_bytes: 64 << 20,
                stdin_bytes: 32 << 20,
                per_stream_bytes: 1 << 20,
                pings: 1000,
                vms: 1000,
                streams: 10_000,
                scale_reps: 1,
                startup_reps: 5,
            }
        } else {
            Plan {
                reps: 7,
                stdout_bytes: 256 << 20,
                stdin_bytes: 128 << 20,
                per_stream_bytes: 4 << 20,
                pings: 5000,
                vms: 1000,
                streams: 10_000,
                scale_reps: 3,
                startup_reps: 15,
            }
        }
    }
}

impl Plan {
    /// Sizes of the mesh group.
    fn mesh(&self) -> mesh::MeshPlan {
        let quick = self.reps < 7;
        mesh::MeshPlan {
            requests: self.pings,
            reps: if quick { 3 } else { 7 },
            wrk_secs: if quick { 1 } else { 3 },
            tcp_reps: if quick { 1 } else { 3 },
            tcp_bytes: if quick { 64 << 20 } else { 256 << 20 },
        }
    }
}

fn wants(args: &Args, group: &str) -> bool {
    args.only.is_empty() || args.only.iter().any(|g| g == group)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

async fn throughput(setup: &Setup, plan: &Plan, report: &mut Report) -> Result<(), BenchError> {
    let agent = Agent::start(setup, "tp-agent", Rig::AGENT_VMS)?;
    let daemon = Daemon::start(setup, "tp").await?;
    let mut rig = Rig::new(&agent, &daemon).await?;
    // The stdin cost of the hyperstart dialect's 256-byte packets: the same shim stdin through the same
    // daemon to a hyperstart agent, against the cc-agent one (4084-byte packets).
    let hs_agent = Agent::start_dialect(setup, "tp-hs-agent", 1, "hyperstart")?;
    procs::register(&rig.client, "tp-hs", &hs_agent, 0).await?;
    let mut stdin_hs = ThroughputPair::default();
    // One warm-up pass of each path, not counted.
    throughput::direct_stdout(&mut rig.direct_single, 4 << 20).await?;
    throughput::proxy_stdout(&rig.client, &rig.proxy_single, 4 << 20).await?;
    let mut single = ThroughputPair::default();
    let mut many = ThroughputPair::default();
    let mut stdin = ThroughputPair::default();
    for rep in 0..plan.reps {
        log(format!("throughput repetition {}/{}", rep + 1, plan.reps));
        // Alternate which side goes first so slow drifts of the machine do not favour one.
        let flip = rep % 2 == 1;
        for side in [flip, !flip] {
            if side {
                single.proxy.push(
                    throughput::proxy_stdout(&rig.client, &rig.proxy_single, plan.stdout_bytes)
                        .await?,
                );
                stdin_hs
                    .proxy
                    .push(throughput::proxy_stdin(&rig.client, "tp-hs", plan.stdin_bytes).await?);
                stdin.proxy.push(
                    throughput::proxy_stdin(&rig.client, &rig.proxy_single, plan.stdin_bytes)
                        .await?,
                );
                many.proxy.push(
                    throughput::proxy_stdout_many(&daemon, &rig.proxy_many, plan.per_stream_bytes)
                        .await?,
                );
            } else {
                single.base.push(
                    throughput::direct_stdout(&mut rig.direct_single, plan.stdout_bytes).await?,
                );
                stdin.base.push(
                    throughput::direct_stdin(&mut rig.direct_single, plan.stdin_bytes).await?,
                );
                let vms = std::mem::take(&mut rig.direct_many);
                let (run, vms) = throughput::direct_stdout_many(vms, plan.per_stream_bytes).await?;
                rig.direct_many = vms;
                many.base.push(run);
            }
        }
    }
    report.stdout_single = Some(single);
    report.stdout_many = Some(many);
    stdin_hs.base = stdin.proxy.clone();
    report.stdin = Some(stdin);
    report.stdin_hyperstart = Some(stdin_hs);
    Ok(())
}

/// Re-run the proxied side of a throughput figure for a few seconds under `perf`.
async fn profile_throughput(setup: &Setup, plan: &Plan, which: &str) -> Result<String, BenchError> {
    let agent = Agent::start(setup, "prof-agent", Rig::AGENT_VMS)?;
    let daemon = Daemon::start(setup, &format!("prof-{which}")).await?;
    let rig = Rig::new(&agent, &daemon).await?;
    let rec = profile::start(daemon.pid(), &setup.dir.join(format!("perf-{which}.data")))?;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        match which {
            "stdout-64" => {
                throughput::proxy_stdout_many(&daemon, &rig.proxy_many, plan.per_stream_bytes)
                    .await?;
            }
            "stdin" => {
                throughput::proxy_stdin(&rig.client, &rig.proxy_single, plan.stdin_bytes).await?;
            }
            _ => {
                throughput::proxy_stdout(&rig.client, &rig.proxy_single, plan.stdout_bytes).await?;
            }
        }
    }
    rec.finish()
}

async fn profile_latency(setup: &Setup, mode: &str) -> Result<String, BenchError> {
    let agent = Agent::start(setup, &format!("prof-{mode}-agent"), 2)?;
    let daemon = Daemon::start(setup, &format!("prof-{mode}")).await?;
    procs::register(&daemon.client(), latency::VM_ID, &agent, 1).await?;
    let rec = profile::start(daemon.pid(), &setup.dir.join(format!("perf-{mode}.data")))?;
    latency::ping_for(&daemon.socket, latency::VM_ID, mode, Duration::from_secs(4)).await?;
    rec.finish()
}

async fn profile_register(setup: &Setup, vms: usize) -> Result<String, BenchError> {
    let agent = Arc::new(Agent::start(setup, "prof-reg-agent", vms)?);
    let daemon = Daemon::start(setup, "prof-reg").await?;
    let rec = profile::start(daemon.pid(), &setup.dir.join("perf-reg.data"))?;
    let client = daemon.client();
    for i in 0..vms {
        procs::register(&client, &format!("vm{i}"), &agent, i).await?;
    }
    rec.finish()
}

async fn run(args: Args) -> Result<(), BenchError> {
    let plan = Plan::new(args.quick);
    for bin in [&args.proxy, &args.agent] {
        if !procs::exists(bin) {
            return Err(BenchError::Setup(format!(
                "{} not found: run `cargo build --release --workspace` first",
                bin.display()
            )));
        }
    }
    let dir = PathBuf::from(format!("/tmp/ccpb-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let setup = Setup {
        proxy_bin: std::fs::canonicalize(&args.proxy)?,
        agent_bin: std::fs::canonicalize(&args.agent)?,
        dir: dir.clone(),
    };
    let started = Instant::now();
    let mut report = Report::new(RunMeta::collect(&setup, args.quick, plan));

    if wants(&args, "startup") {
        log("start to READY=1");
        let mut ms = Vec::new();
        for i in 0..plan.startup_reps {
            ms.push(scale::startup(&setup, &format!("start{i}")).await?);
        }
        report.startup_ms = ms;
    }
    if wants(&args, "throughput") {
        log("throughput");
        throughput(&setup, &plan, &mut report).await?;
    }
    if wants(&args, "latency") {
        log("ping latency");
        let agent = Agent::start(&setup, "lat-agent", 2)?;
        let daemon = Daemon::start(&setup, "lat").await?;
        report.latency = Some(latency::run(&agent, &daemon, plan.pings).await?);
    }
    if wants(&args, "mesh") {
        log("mesh: the two-hop mTLS path through cc-proxy, HAProxy and direct");
        report.mesh = Some(mesh::run(&setup, plan.mesh()).await?);
    }
    if wants(&args, "scale") {
        let agent = Arc::new(Agent::start(&setup, "scale-agent", plan.vms)?);
        for rep in 0..plan.scale_reps {
            let streams = if rep == 0 { plan.streams } else { 0 };
            log(format!(
                "scale repetition {}/{}: {} VMs, {streams} streams",
                rep + 1,
                plan.scale_reps,
                plan.vms
            ));
            report
                .scale
                .push(scale::run(&setup, agent.clone(), &format!("scale{rep}"), streams).await?);
        }
    }

    let rows = report.rows();
    if !args.no_profile && profile::available() {
        for row in rows.iter().filter(|r| r.missed()) {
            log(format!("profiling missed target: {}", row.id));
            let prof = match row.profile_kind() {
                Some("throughput") => profile_throughput(&setup, &plan, row.id).await,
                Some("latency") => {
                    let mode = match row.id {
                        "ping-legacy" => "legacy-v2",
                        "ping-ws" => "jsonrpc-ws",
                        _ => "jsonrpc-http",
                    };
                    profile_latency(&setup, mode).await
                }
                Some("register") => profile_register(&setup, plan.vms).await,
                Some("mesh") => {
                    let data = setup.dir.join(format!("perf-{}.data", row.id));
                    mesh::load_for_profile(&setup, row.id, 4, |pid| profile::start(pid, &data))
                        .await
                }
                _ => continue,
            };
            match prof {
                Ok(p) => {
                    report.profiles.insert(row.id.to_string(), p);
                }
                Err(e) => log(format!("profile of {} failed: {e}", row.id)),
            }
        }
    }
    report.meta.elapsed_secs = started.elapsed().as_secs_f64();
    report.write(&args.out, &args.charts, &args.json)?;
    for row in report.rows() {
        log(format!(
            "{:<14} {:<9} {}",
            row.id,
            row.verdict(),
            row.measured
        ));
    }
    log(format!(
        "wrote {}, {} and {} in {:.0} s",
        args.out.display(),
        args.charts.display(),
        args.json.display(),
        started.elapsed().as_secs_f64()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Some(path) = &args.echo_socket {
        if let Err(e) = latency::echo_server(path) {
            eprintln!("cc-proxy-bench echo: {e}");
            std::process::exit(1);
        }
        return;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cc-proxy-bench: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("cc-proxy-bench: {e}");
        std::process::exit(1);
    }
}
