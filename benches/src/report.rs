//! The results of a run: target rows with verdicts, `results.json`, `docs/benchmarks.md` and its SVG charts
//! (drawn by hand: a bar per figure and a marker at its target).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::latency::{Latency, ModeLatency};
use crate::mesh::{MeshResults, WrkRun, IDLE_CONNECTIONS};
use crate::procs::Setup;
use crate::scale::ScaleRun;
use crate::stats::Summary;
use crate::throughput::Run;
use crate::{BenchError, Plan};

/// Where and how the run happened.
#[derive(Debug, Clone, Serialize)]
pub struct RunMeta {
    pub quick: bool,
    pub plan: Plan,
    pub proxy_bin: String,
    pub cpus: usize,
    pub kernel: String,
    pub git_commit: String,
    pub unix_time: u64,
    pub elapsed_secs: f64,
}

impl RunMeta {
    pub fn collect(setup: &Setup, quick: bool, plan: Plan) -> RunMeta {
        let cmd = |prog: &str, args: &[&str]| {
            std::process::Command::new(prog)
                .args(args)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        };
        RunMeta {
            quick,
            plan,
            proxy_bin: setup.proxy_bin.display().to_string(),
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            kernel: cmd("uname", &["-r"]),
            git_commit: cmd("git", &["rev-parse", "--short", "HEAD"]),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            elapsed_secs: 0.0,
        }
    }
}

/// Paired repetitions of a baseline and the proxied path.
#[derive(Debug, Clone, Default)]
pub struct ThroughputPair {
    pub base: Vec<Run>,
    pub proxy: Vec<Run>,
}

impl ThroughputPair {
    /// Per-repetition ratios proxy / baseline.
    fn ratios(&self) -> Vec<f64> {
        self.base
            .iter()
            .zip(&self.proxy)
            .map(|(b, p)| if b.rate > 0.0 { p.rate / b.rate } else { 0.0 })
            .collect()
    }

    fn json(&self) -> serde_json::Value {
        let mib = |v: &[Run]| {
            v.iter()
                .map(|r| r.rate / (1 << 20) as f64)
                .collect::<Vec<_>>()
        };
        serde_json::json!({
            "baseline_mib_s": mib(&self.base),
            "proxy_mib_s": mib(&self.proxy),
            "baseline_fairness": self.base.iter().map(|r| r.fairness).collect::<Vec<_>>(),
            "proxy_fairness": self.proxy.iter().map(|r| r.fairness).collect::<Vec<_>>(),
            "ratio": Summary::of(&self.ratios()),
        })
    }
}

/// Everything measured in one run.
pub struct Report {
    pub meta: RunMeta,
    pub startup_ms: Vec<f64>,
    pub stdout_single: Option<ThroughputPair>,
    pub stdout_many: Option<ThroughputPair>,
    pub stdin: Option<ThroughputPair>,
    /// Proxied stdin to a hyperstart agent (256-byte packets) against proxied stdin to a cc-agent one.
    pub stdin_hyperstart: Option<ThroughputPair>,
    pub latency: Option<Latency>,
    pub scale: Vec<ScaleRun>,
    /// The mesh group (two-hop mTLS against HAProxy, meshed VMs).
    pub mesh: Option<MeshResults>,
    /// Flat `perf report` text per missed row id.
    pub profiles: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Met,
    Missed,
    NotMeasured,
    /// Measured, with no target to meet (a cost shown for information).
    Informational,
}

/// One line of the issue's table, measured.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: &'static str,
    pub what: &'static str,
    pub baseline: &'static str,
    /// The figure as text (ratio or value, with spread and context).
    pub measured: String,
    pub target: &'static str,
    pub verdict: Verdict,
    /// For the charts: the headline value and its target (None when not measured).
    pub value: Option<f64>,
    pub goal: f64,
    pub higher_is_better: bool,
    pub unit: &'static str,
}

impl Row {
    pub fn missed(&self) -> bool {
        self.verdict == Verdict::Missed
    }

    pub fn verdict(&self) -> &'static str {
        match self.verdict {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::NotMeasured => "not measured",
            Verdict::Informational => "information",
        }
    }

    /// Which scenario a CPU profile of this row re-runs.
    pub fn profile_kind(&self) -> Option<&'static str> {
        match self.id {
            "stdout-1" | "stdout-64" | "stdin" => Some("throughput"),
            "ping-http" | "ping-ws" | "ping-legacy" => Some("latency"),
            "register-rate" => Some("register"),
            "mesh-rps" | "mesh-p50" | "mesh-balanced" => Some("mesh"),
            _ => None,
        }
    }

    fn not_measured(
        id: &'static str,
        what: &'static str,
        baseline: &'static str,
        target: &'static str,
        why: &str,
    ) -> Row {
        Row {
            id,
            what,
            baseline,
            measured: format!("not measured: {why}"),
            target,
            verdict: Verdict::NotMeasured,
            value: None,
            goal: 0.0,
            higher_is_better: true,
            unit: "",
        }
    }
}

fn verdict(ok: bool) -> Verdict {
    if ok {
        Verdict::Met
    } else {
        Verdict::Missed
    }
}

fn mib(bytes_per_s: f64) -> f64 {
    bytes_per_s / (1 << 20) as f64
}

/// What the hyperstart dialect's 256-byte stdin packets cost: no target, a measurement (the packet size is what
/// keeps real hyperstart from discarding stdin).
fn stdin_dialect_row(pair: Option<&ThroughputPair>) -> Row {
    let (id, what, target) = (
        "stdin-hyperstart",
        "stdin throughput, hyperstart dialect (256-byte packets)",
        "none: the cost of not losing stdin in hyperstart",
    );
    let baseline = "the same shim stdin through cc-proxy to a cc-agent VM (4084-byte packets)";
    let Some(pair) = pair.filter(|p| !p.base.is_empty()) else {
        return Row::not_measured(id, what, baseline, target, "group not run");
    };
    let r = Summary::of(&pair.ratios());
    let b = Summary::of(&pair.base.iter().map(|x| mib(x.rate)).collect::<Vec<_>>());
    let p = Summary::of(&pair.proxy.iter().map(|x| mib(x.rate)).collect::<Vec<_>>());
    Row {
        id,
        what,
        baseline,
        measured: format!(
            "**{:.2}x** (ratios {:.2}..{:.2}, n={}); hyperstart {:.0} MiB/s ({:.0}..{:.0}) vs cc-agent {:.0} MiB/s ({:.0}..{:.0})",
            r.median, r.min, r.max, r.n, p.median, p.min, p.max, b.median, b.min, b.max
        ),
        target,
        verdict: Verdict::Informational,
        value: Some(r.median),
        goal: 0.0,
        higher_is_better: true,
        unit: "x",
    }
}

fn throughput_row(
    id: &'static str,
    what: &'static str,
    target: &'static str,
    goal: f64,
    pair: Option<&ThroughputPair>,
    fairness_goal: Option<f64>,
) -> Row {
    let baseline = "same bytes over the same hvsock transport, direct agent client";
    let Some(pair) = pair.filter(|p| !p.base.is_empty()) else {
        return Row::not_measured(id, what, baseline, target, "group not run");
    };
    let r = Summary::of(&pair.ratios());
    let b = Summary::of(&pair.base.iter().map(|x| mib(x.rate)).collect::<Vec<_>>());
    let p = Summary::of(&pair.proxy.iter().map(|x| mib(x.rate)).collect::<Vec<_>>());
    let mut measured = format!(
        "**{:.2}x** (ratios {:.2}..{:.2}, n={}); cc-proxy {:.0} MiB/s ({:.0}..{:.0}) vs direct {:.0} MiB/s ({:.0}..{:.0})",
        r.median, r.min, r.max, r.n, p.median, p.min, p.max, b.median, b.min, b.max
    );
    let mut ok = r.median >= goal;
    if let Some(fg) = fairness_goal {
        let worst = pair
            .proxy
            .iter()
            .map(|x| x.fairness)
            .fold(f64::INFINITY, f64::min);
        let fair = Summary::of(&pair.proxy.iter().map(|x| x.fairness).collect::<Vec<_>>());
        let base_fair = Summary::of(&pair.base.iter().map(|x| x.fairness).collect::<Vec<_>>());
        let _ = write!(
            measured,
            "; per-stream min/max rate: median {:.2}, worst {:.2} (direct: median {:.2})",
            fair.median, worst, base_fair.median
        );
        ok &= worst >= fg;
    }
    Row {
        id,
        what,
        baseline,
        measured,
        target,
        verdict: verdict(ok),
        value: Some(r.median),
        goal,
        higher_is_better: true,
        unit: "x",
    }
}

fn ping_row(
    id: &'static str,
    what: &'static str,
    target: &'static str,
    goal_us: f64,
    lat: Option<&Latency>,
    mode: Option<&ModeLatency>,
    why: &str,
) -> Row {
    let baseline = "PING sent directly on the agent's control channel";
    let (Some(lat), Some(m)) = (lat, mode) else {
        return Row::not_measured(id, what, baseline, target, why);
    };
    let added = m.p50_us - lat.direct.p50_us;
    let tail = if m.p50_us > 0.0 {
        m.p99_us / m.p50_us
    } else {
        0.0
    };
    let measured = format!(
        "added p50 **{added:.1} us**; round trip p50 {:.1} us, p99 {:.1} us (p99/p50 {tail:.2}), block p50s {:.1}..{:.1} us; direct p50 {:.1} us, p99 {:.1} us; n={}",
        m.p50_us, m.p99_us, m.block_p50_min_us, m.block_p50_max_us, lat.direct.p50_us, lat.direct.p99_us, m.samples
    );
    let mut measured = measured;
    if let Some(f) = &lat.floor {
        let _ = write!(
            measured,
            "; floor (one more process on a unix socket) p50 {:.1} us",
            f.p50_us
        );
    }
    Row {
        id,
        what,
        baseline,
        measured,
        target,
        verdict: verdict(added <= goal_us && tail <= 3.0),
        value: Some(added),
        goal: goal_us,
        higher_is_better: false,
        unit: "us",
    }
}

impl Report {
    pub fn new(meta: RunMeta) -> Report {
        Report {
            meta,
            startup_ms: Vec::new(),
            stdout_single: None,
            stdout_many: None,
            stdin: None,
            stdin_hyperstart: None,
            latency: None,
            scale: Vec::new(),
            mesh: None,
            profiles: BTreeMap::new(),
        }
    }

    /// The issue's table, one row per figure (the ping row split by protocol).
    pub fn rows(&self) -> Vec<Row> {
        let mut rows = vec![
            throughput_row(
                "stdout-1",
                "stdout throughput, agent to shim, 1 stream, 64 KiB writes",
                ">= 0.8 of the baseline",
                0.8,
                self.stdout_single.as_ref(),
                None,
            ),
            throughput_row(
                "stdout-64",
                "the same with 64 concurrent streams across 8 VMs",
                ">= 0.7 aggregate, min/max per-stream rate >= 0.5",
                0.7,
                self.stdout_many.as_ref(),
                Some(0.5),
            ),
            throughput_row(
                "stdin",
                "stdin throughput, shim to agent",
                ">= 0.8",
                0.8,
                self.stdin.as_ref(),
                None,
            ),
            stdin_dialect_row(self.stdin_hyperstart.as_ref()),
        ];
        let lat = self.latency.as_ref();
        let why = if lat.is_some() {
            "legacy protocol not available"
        } else {
            "group not run"
        };
        rows.push(ping_row(
            "ping-legacy",
            "ping round trip, legacy v2 protocol",
            "added p50 <= 20 us; p99 <= 3x p50",
            20.0,
            lat,
            lat.and_then(|l| l.legacy.as_ref()),
            why,
        ));
        rows.push(ping_row(
            "ping-http",
            "ping round trip, JSON-RPC over HTTP keep-alive",
            "added p50 <= 40 us; p99 <= 3x p50",
            40.0,
            lat,
            lat.map(|l| &l.http),
            "group not run",
        ));
        rows.push(ping_row(
            "ping-ws",
            "ping round trip, JSON-RPC over WebSocket",
            "added p50 <= 40 us; p99 <= 3x p50",
            40.0,
            lat,
            lat.map(|l| &l.ws),
            "group not run",
        ));

        let vm_runs: Vec<&ScaleRun> = self.scale.iter().collect();
        if vm_runs.is_empty() {
            rows.push(Row::not_measured(
                "vm-memory",
                "1,000 registered VMs (one multi-VM test agent)",
                "the idle daemon",
                "<= 64 KiB RSS per VM",
                "group not run",
            ));
            rows.push(Row::not_measured(
                "stream-memory",
                "10,000 open idle streams",
                "the same daemon before the streams",
                "<= 4 KiB RSS per stream",
                "group not run",
            ));
            rows.push(Row::not_measured(
                "register-rate",
                "registration rate",
                "-",
                ">= 2,000 VMs/s",
                "group not run",
            ));
        } else {
            let per_vm = Summary::of(
                &vm_runs
                    .iter()
                    .map(|r| r.per_vm_bytes / 1024.0)
                    .collect::<Vec<_>>(),
            );
            let idle = Summary::of(
                &vm_runs
                    .iter()
                    .map(|r| r.idle_rss as f64 / (1 << 20) as f64)
                    .collect::<Vec<_>>(),
            );
            rows.push(Row {
                id: "vm-memory",
                what: "1,000 registered VMs (one multi-VM test agent)",
                baseline: "the idle daemon",
                measured: format!(
                    "**{:.1} KiB/VM** ({:.1}..{:.1}, n={}); idle daemon RSS {:.1} MiB, {} VMs",
                    per_vm.median, per_vm.min, per_vm.max, per_vm.n, idle.median, vm_runs[0].vms
                ),
                target: "<= 64 KiB RSS per VM",
                verdict: verdict(per_vm.median <= 64.0),
                value: Some(per_vm.median),
                goal: 64.0,
                higher_is_better: false,
                unit: "KiB",
            });
            match vm_runs.iter().find(|r| r.streams > 0) {
                Some(s) => rows.push(Row {
                    id: "stream-memory",
                    what: "10,000 open idle streams",
                    baseline: "the same daemon before the streams",
                    measured: format!(
                        "**{:.2} KiB/stream** with an idle shim attached to each; {:.2} KiB per allocated token alone; {} streams over {} VMs",
                        s.per_stream_bytes / 1024.0, s.per_token_bytes / 1024.0, s.streams, s.vms
                    ),
                    target: "<= 4 KiB RSS per stream",
                    verdict: verdict(s.per_stream_bytes / 1024.0 <= 4.0),
                    value: Some(s.per_stream_bytes / 1024.0),
                    goal: 4.0,
                    higher_is_better: false,
                    unit: "KiB",
                }),
                None => rows.push(Row::not_measured("stream-memory", "10,000 open idle streams", "the same daemon before the streams", "<= 4 KiB RSS per stream", "no repetition opened streams")),
            }
            let rate = Summary::of(&vm_runs.iter().map(|r| r.register_rate).collect::<Vec<_>>());
            rows.push(Row {
                id: "register-rate",
                what: "registration rate",
                baseline: "-",
                measured: format!(
                    "**{:.0} VMs/s** ({:.0}..{:.0}, n={}), {} VMs over 16 client connections",
                    rate.median, rate.min, rate.max, rate.n, vm_runs[0].vms
                ),
                target: ">= 2,000 VMs/s",
                verdict: verdict(rate.median >= 2000.0),
                value: Some(rate.median),
                goal: 2000.0,
                higher_is_better: true,
                unit: "VMs/s",
            });
        }
        rows.extend(mesh_rows(self.mesh.as_ref()));
        if self.startup_ms.is_empty() {
            rows.push(Row::not_measured(
                "startup",
                "start to READY=1",
                "-",
                "<= 20 ms",
                "group not run",
            ));
        } else {
            let s = Summary::of(&self.startup_ms);
            rows.push(Row {
                id: "startup",
                what: "start to READY=1",
                baseline: "-",
                measured: format!(
                    "**{:.1} ms** ({:.1}..{:.1}, n={})",
                    s.median, s.min, s.max, s.n
                ),
                target: "<= 20 ms",
                verdict: verdict(s.median <= 20.0),
                value: Some(s.median),
                goal: 20.0,
                higher_is_better: false,
                unit: "ms",
            });
        }
        rows
    }

    fn json(&self, rows: &[Row]) -> serde_json::Value {
        serde_json::json!({
            "meta": self.meta,
            "rows": rows,
            "startup_ms": self.startup_ms,
            "stdout_single": self.stdout_single.as_ref().map(ThroughputPair::json),
            "stdout_many": self.stdout_many.as_ref().map(ThroughputPair::json),
            "stdin": self.stdin.as_ref().map(ThroughputPair::json),
            "stdin_hyperstart": self.stdin_hyperstart.as_ref().map(ThroughputPair::json),
            "latency": self.latency,
            "scale": self.scale,
            "mesh": self.mesh,
            "profiles": self.profiles,
        })
    }

    /// Write the Markdown report, its charts and the JSON results.
    pub fn write(&self, md: &Path, charts: &Path, json: &Path) -> Result<(), BenchError> {
        let rows = self.rows();
        for p in [md, json] {
            if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(d)?;
            }
        }
        std::fs::create_dir_all(charts)?;
        let text = serde_json::to_string_pretty(&self.json(&rows))
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        std::fs::write(json, text + "\n")?;

        let groups: [(&str, &str, &[&str]); 4] = [
            (
                "throughput.svg",
                "Throughput through cc-proxy / direct (higher is better)",
                &["stdout-1", "stdout-64", "stdin"],
            ),
            (
                "latency.svg",
                "Added ping latency, p50 (lower is better)",
                &["ping-legacy", "ping-http", "ping-ws"],
            ),
            (
                "scale.svg",
                "Scale and start-up: measured / target (lower is better)",
                &["vm-memory", "stream-memory", "register-rate", "startup"],
            ),
            (
                "mesh.svg",
                "Mesh: cc-proxy / target (ratio to HAProxy or to one endpoint, or the bound)",
                &["mesh-rps", "mesh-p50", "mesh-balanced", "mesh-idle"],
            ),
        ];
        let rel = charts
            .strip_prefix(md.parent().unwrap_or(Path::new("")))
            .unwrap_or(charts)
            .to_path_buf();
        let mut chart_links = Vec::new();
        for (file, title, ids) in groups {
            let bars: Vec<&Row> = ids
                .iter()
                .filter_map(|id| rows.iter().find(|r| r.id == *id))
                .collect();
            std::fs::write(charts.join(file), svg(title, &bars))?;
            chart_links.push(format!("![{title}]({}/{file})", rel.display()));
        }
        std::fs::write(md, self.markdown(&rows, &chart_links))?;
        Ok(())
    }

    fn markdown(&self, rows: &[Row], charts: &[String]) -> String {
        let m = &self.meta;
        let mut s = String::new();
        let _ = writeln!(s, "# Benchmarks\n");
        let _ = writeln!(
            s,
            "Generated by `make bench{}` (`benches/run.sh`, program `cc-proxy-bench`); do not edit by hand. \
Machine-readable results: `target/bench/results.json`. How the figures are taken: `benches/README.md`.\n",
            if m.quick { "-quick" } else { "" }
        );
        let _ = writeln!(
            s,
            "Run: commit `{}`, {} CPUs, kernel {}, {} mode, {} repetitions per throughput figure, {} pings per mode, {:.0} s in total. \
Every figure is taken side by side with its baseline in the same run; the ratio is the figure, absolute numbers are context \
(this machine is shared and noisy). Ranges are min..max over repetitions.\n",
            m.git_commit, m.cpus, m.kernel, if m.quick { "quick" } else { "full" }, m.plan.reps, m.plan.pings, m.elapsed_secs
        );
        let _ = writeln!(s, "## Results\n");
        let _ = writeln!(
            s,
            "| what | baseline in the same run | measured | target | verdict |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for r in rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                r.what,
                r.baseline,
                r.measured,
                r.target,
                r.verdict()
            );
        }
        let _ = writeln!(s);
        for c in charts {
            let _ = writeln!(s, "{c}\n");
        }
        let missed: Vec<&Row> = rows.iter().filter(|r| r.missed()).collect();
        let _ = writeln!(s, "## Missed targets\n");
        if missed.is_empty() {
            let _ = writeln!(s, "None in this run.\n");
        }
        for r in missed {
            let _ = writeln!(s, "### {} ({})\n", r.what, r.id);
            let _ = writeln!(s, "Measured {}; target {}.\n", r.measured, r.target);
            if let Some(note) = analysis(r.id) {
                let _ = writeln!(s, "{note}\n");
            }
            match self.profiles.get(r.id) {
                Some(p) => {
                    let _ = writeln!(
                        s,
                        "CPU profile of the daemon while the proxied side of this figure ran (`perf record -F 999 -g -p <daemon>`, \
`perf report --sort dso,symbol`, entries above 1.5%):\n\n```\n{p}\n```\n"
                    );
                }
                None if r.profile_kind().is_some() => {
                    let _ = writeln!(
                        s,
                        "No CPU profile in this run (`perf` missing or `--no-profile`).\n"
                    );
                }
                None => {}
            }
        }
        let _ = writeln!(s, "## Method\n");
        let _ = writeln!(s, "{METHOD}");
        s
    }
}

/// Per-repetition ratios `num[i] / den[i]` (a zero denominator gives infinity: no figure to compare with).
fn rep_ratios(num: &[f64], den: &[f64]) -> Summary {
    let r: Vec<f64> = num
        .iter()
        .zip(den)
        .map(|(n, d)| if *d > 0.0 { n / d } else { f64::INFINITY })
        .collect();
    Summary::of(&r)
}

/// "median (min..max)" of a summary, with `digits` decimals.
fn spread(s: &Summary, digits: usize) -> String {
    format!(
        "{:.d$} ({:.d$}..{:.d$})",
        s.median,
        s.min,
        s.max,
        d = digits
    )
}

/// The mesh rows: the two-hop mTLS path through cc-proxy against HAProxy and direct, the balanced path, idle
/// memory per hop, and 1,000 meshed VMs.
fn mesh_rows(m: Option<&MeshResults>) -> Vec<Row> {
    const P50: (&str, &str, &str, &str) = (
        "mesh-p50",
        "mesh two-hop mTLS (a's outbound -> b's inbound -> server), HTTP/1.1 latency at 1 connection",
        "HAProxy doing the same two hops (TLS 1.3 origination + termination, client certificates); direct client -> server",
        "added p50 <= HAProxy's (median of per-repetition ratios <= 1.0)",
    );
    const RPS: (&str, &str, &str, &str) = (
        "mesh-rps",
        "mesh two-hop mTLS, HTTP/1.1 requests/s at 16 connections (wrk)",
        "HAProxy doing the same two hops; direct client -> server",
        "cc-proxy / HAProxy >= 1.0 (median of per-repetition ratios)",
    );
    const BAL: (&str, &str, &str, &str) = (
        "mesh-balanced",
        "mesh outbound balanced over 3 endpoints (VMs b, b2, b3 of identity b, each before its own server), HTTP/1.1 at 16 connections (wrk)",
        "the same daemon's outbound with 1 endpoint (the mesh-rps path), taking turns with it in each repetition",
        "req/s >= 0.9x and p99 at 1 connection <= 1.5x the single endpoint's (medians of per-repetition ratios); every endpoint >= half its even share",
    );
    const TCP: (&str, &str, &str, &str) = (
        "mesh-tcp",
        "mesh two-hop mTLS, opaque TCP throughput (one connection, upload)",
        "HAProxy (`mode tcp`) doing the same two hops; direct",
        "none: for information",
    );
    const IDLE: (&str, &str, &str, &str) = (
        "mesh-idle",
        "memory per idle meshed connection, per proxy hop (1,000 opaque connections; each hop on its own fresh daemon) and both hops in one daemon",
        "each daemon before its connections; HAProxy per hop the same way, for context",
        "<= 16 KiB RSS per connection per hop (the larger hop)",
    );
    const VMS: (&str, &str, &str, &str) = (
        "mesh-vms",
        "1,000 meshed VMs sharing 10 identities (one inbound listener each, embedded CA)",
        "1,000 plain VMs on another fresh daemon",
        "10 certificates issued (one per identity)",
    );
    let nm = |r: (&'static str, &'static str, &'static str, &'static str), why: &str| {
        Row::not_measured(r.0, r.1, r.2, r.3, why)
    };
    let Some(m) = m else {
        return [P50, RPS, BAL, TCP, IDLE, VMS]
            .into_iter()
            .map(|r| nm(r, "group not run"))
            .collect();
    };
    let mut rows = Vec::new();

    // Latency: per repetition, added p50 = the path's p50 - direct p50.
    let cc_added: Vec<f64> = m
        .latency_reps
        .iter()
        .map(|r| r.cc_p50_us - r.direct_p50_us)
        .collect();
    let h_added: Vec<f64> = m
        .latency_reps
        .iter()
        .filter_map(|r| Some(r.haproxy_p50_us? - r.direct_p50_us))
        .collect();
    let ca = Summary::of(&cc_added);
    let pooled = |name: &str, p: &crate::mesh::PathLatency| {
        format!("{name} {:.0}/{:.0} us", p.p50_us, p.p99_us)
    };
    let mut context = format!("pooled p50/p99: {}", pooled("cc-proxy", &m.cc));
    if let Some(h) = &m.haproxy {
        let _ = write!(context, ", {}", pooled("HAProxy", h));
    }
    let _ = write!(
        context,
        ", {}; {} requests per path",
        pooled("direct", &m.direct),
        m.cc.samples
    );
    rows.push(match &m.haproxy_missing {
        None if !h_added.is_empty() => {
            let r = rep_ratios(&cc_added, &h_added);
            let ha = Summary::of(&h_added);
            Row {
                id: P50.0,
                what: P50.1,
                baseline: P50.2,
                measured: format!(
                    "added p50 **{:.2}x** HAProxy's (per-repetition ratios {:.2}..{:.2}, n={}); added p50 cc-proxy {} us, HAProxy {} us; {context}",
                    r.median, r.min, r.max, r.n, spread(&ca, 0), spread(&ha, 0)
                ),
                target: P50.3,
                verdict: verdict(r.median <= 1.0),
                value: Some(r.median),
                goal: 1.0,
                higher_is_better: false,
                unit: "x",
            }
        }
        why => nm(
            P50,
            &format!(
                "{} (cc-proxy added p50 {} us; {context})",
                why.as_deref().unwrap_or("haproxy not measured"),
                spread(&ca, 0)
            ),
        ),
    });

    // Requests/s.
    let rate = |v: &[WrkRun]| v.iter().map(|r| r.rps).collect::<Vec<_>>();
    let p99 = |v: &[WrkRun]| v.iter().map(|r| r.p99_us).collect::<Vec<_>>();
    let (c, h, d) = (
        Summary::of(&rate(&m.rps_cc)),
        Summary::of(&rate(&m.rps_haproxy)),
        Summary::of(&rate(&m.rps_direct)),
    );
    let (c99, h99) = (
        Summary::of(&p99(&m.rps_cc)),
        Summary::of(&p99(&m.rps_haproxy)),
    );
    rows.push(match (&m.wrk_missing, &m.haproxy_missing) {
        (Some(why), _) => nm(RPS, why),
        (None, Some(why)) => nm(
            RPS,
            &format!("{why} (cc-proxy {:.0} req/s, direct {:.0} req/s)", c.median, d.median),
        ),
        (None, None) => {
            let r = rep_ratios(&rate(&m.rps_cc), &rate(&m.rps_haproxy));
            Row {
                id: RPS.0,
                what: RPS.1,
                baseline: RPS.2,
                measured: format!(
                    "**{:.2}x** HAProxy's (per-repetition ratios {:.2}..{:.2}, n={}); cc-proxy {} req/s, p99 {} us; HAProxy {} req/s, p99 {} us; direct {:.0} req/s",
                    r.median, r.min, r.max, r.n, spread(&c, 0), spread(&c99, 0), spread(&h, 0), spread(&h99, 0), d.median
                ),
                target: RPS.3,
                verdict: verdict(r.median >= 1.0),
                value: Some(r.median),
                goal: 1.0,
                higher_is_better: true,
                unit: "x",
            }
        }
    });

    // The balanced path against the single endpoint, repetition by repetition.
    rows.push(match (&m.wrk_missing, &m.balanced) {
        (Some(why), _) => nm(BAL, why),
        (None, None) => nm(BAL, "not run"),
        (None, Some(bal)) => {
            let rr = rep_ratios(&rate(&bal.runs), &rate(&m.rps_cc));
            // p99 judged at one connection (the latency blocks: stable); under wrk's load it is context, as
            // on two shared cores it is mostly the scheduler's.
            let lat = |f: fn(&crate::mesh::LatencyRep) -> f64| m.latency_reps.iter().map(f).collect::<Vec<_>>();
            let pr = rep_ratios(&lat(|r| r.balanced_p99_us), &lat(|r| r.cc_p99_us));
            let wr = rep_ratios(&p99(&bal.runs), &p99(&m.rps_cc));
            let (b, b99) = (Summary::of(&rate(&bal.runs)), Summary::of(&p99(&bal.runs)));
            let total: u64 = bal.per_endpoint.iter().sum();
            let shares: Vec<f64> = bal
                .per_endpoint
                .iter()
                .map(|n| if total > 0 { *n as f64 / total as f64 } else { 0.0 })
                .collect();
            let fair = 0.5 / bal.per_endpoint.len().max(1) as f64;
            let least = shares.iter().copied().fold(f64::INFINITY, f64::min);
            let shares_text = shares
                .iter()
                .map(|s| format!("{:.0}%", s * 100.0))
                .collect::<Vec<_>>()
                .join(" / ");
            Row {
                id: BAL.0,
                what: BAL.1,
                baseline: BAL.2,
                measured: format!(
                    "**{:.3}x** req/s (per-repetition ratios {:.2}..{:.2}, n={}), p99 at 1 connection **{:.3}x** ({:.2}..{:.2}; balanced {:.0} us, one endpoint {:.0} us pooled), p99 under wrk {:.2}x ({:.2}..{:.2}); balanced {} req/s, wrk p99 {} us; one endpoint {} req/s, wrk p99 {} us; requests per endpoint {shares_text} of {total}",
                    rr.median, rr.min, rr.max, rr.n, pr.median, pr.min, pr.max,
                    m.balanced_latency.p99_us, m.cc.p99_us, wr.median, wr.min, wr.max,
                    spread(&b, 0), spread(&b99, 0), spread(&c, 0), spread(&c99, 0)
                ),
                target: BAL.3,
                verdict: verdict(rr.median >= 0.9 && pr.median <= 1.5 && least >= fair),
                value: Some(rr.median),
                goal: 0.9,
                higher_is_better: true,
                unit: "x",
            }
        }
    });

    let mibs = |v: &[f64]| Summary::of(&v.iter().map(|b| mib(*b)).collect::<Vec<_>>());
    let (c, h, d) = (mibs(&m.tcp_cc), mibs(&m.tcp_haproxy), mibs(&m.tcp_direct));
    let mut text = format!(
        "cc-proxy **{:.0} MiB/s** ({:.0}..{:.0}, n={})",
        c.median, c.min, c.max, c.n
    );
    if h.n > 0 {
        let _ = write!(
            text,
            ", HAProxy {:.0} MiB/s ({:.0}..{:.0}), ratio {:.2}",
            h.median,
            h.min,
            h.max,
            if h.median > 0.0 {
                c.median / h.median
            } else {
                0.0
            }
        );
    }
    let _ = write!(text, "; direct {:.0} MiB/s", d.median);
    rows.push(Row {
        id: TCP.0,
        what: TCP.1,
        baseline: TCP.2,
        measured: text,
        target: TCP.3,
        verdict: Verdict::Informational,
        value: Some(c.median),
        goal: 0.0,
        higher_is_better: true,
        unit: "MiB/s",
    });

    // Idle memory: judged per hop (what one host's daemon holds in a real mesh); both hops shown too.
    let kib = |v: Option<f64>| v.map(|b| b / 1024.0);
    let (cin, cout, cboth) = (
        kib(m.idle_cc.inbound),
        kib(m.idle_cc.outbound),
        kib(m.idle_cc.both),
    );
    rows.push(match (cin, cout) {
        (Some(i), Some(o)) => {
            let hop = i.max(o);
            let mut text = format!(
                "per hop **{hop:.1} KiB/connection** (the larger): inbound {i:.1} KiB, outbound {o:.1} KiB, each on its own daemon (2 sockets and 1 TLS session per connection)"
            );
            if let Some(b) = cboth {
                let _ = write!(
                    text,
                    "; both hops in one daemon {b:.1} KiB: a daemon holding both ends (VMs a and b on the same host) pays the sum of the hops"
                );
            }
            let hp = &m.idle_haproxy;
            if let (Some(hi), Some(ho)) = (kib(hp.inbound), kib(hp.outbound)) {
                let _ = write!(
                    text,
                    "; HAProxy inbound {hi:.1} KiB, outbound {ho:.1} KiB, both {:.1} KiB",
                    kib(hp.both).unwrap_or(0.0)
                );
            }
            let _ = write!(text, "; {IDLE_CONNECTIONS} connections each");
            Row {
                id: IDLE.0,
                what: IDLE.1,
                baseline: IDLE.2,
                measured: text,
                target: IDLE.3,
                verdict: verdict(hop <= 16.0),
                value: Some(hop),
                goal: 16.0,
                higher_is_better: false,
                unit: "KiB",
            }
        }
        _ => nm(IDLE, "not run"),
    });
    rows.push(match &m.scale {
        Some(s) => Row {
            id: VMS.0,
            what: VMS.1,
            baseline: VMS.2,
            measured: format!(
                "**{:.0} certificates** issued for {} VMs; {:.1} KiB RSS per meshed VM vs {:.1} KiB per plain VM (the mesh adds {:.1} KiB)",
                s.certificates_issued,
                s.vms,
                s.meshed_per_vm_bytes / 1024.0,
                s.plain_per_vm_bytes / 1024.0,
                (s.meshed_per_vm_bytes - s.plain_per_vm_bytes) / 1024.0
            ),
            target: VMS.3,
            verdict: verdict(s.certificates_issued == s.identities as f64),
            value: Some(s.certificates_issued),
            goal: s.identities as f64,
            higher_is_better: false,
            unit: "certificates",
        },
        None => nm(VMS, "not run"),
    });
    rows
}

/// What we know about why a row is missed (filled in from profiles of earlier runs).
fn analysis(id: &str) -> Option<&'static str> {
    match id {
        "stream-memory" => Some(
            "An idle stream with its shim attached costs the token and stream state plus the shim's upgraded HTTP \
connection: the upgraded connection's state, the attach tasks and a small stdin read buffer (output is written from \
a buffer allocated per batch, so an idle attachment holds none). The token-only figure in the row shows how much is \
the stream itself.",
        ),
        "ping-legacy" | "ping-http" | "ping-ws" => Some(
            "Through cc-proxy a ping crosses one more process than the direct baseline (client -> daemon -> agent \
instead of client -> agent), so the added latency cannot go below the floor in the row: an 8-byte echo through one \
trivial extra process on a unix socket, measured in the same run. On this 2-core VM that floor alone is about 50 us \
at p50, above the 20 us (legacy) and 40 us (JSON-RPC) targets, and the legacy ping's added latency sits at the floor. \
The profiles agree: the daemon's time is kernel scheduling (task switches, futex and epoll wake-ups), its own code \
is a few percent. What the daemon adds above the floor is the JSON-RPC work per request (jsonrpsee parsing and, over \
HTTP, request and response framing), roughly 5 to 25 us. Measured alternatives: one worker thread \
(`CC_PROXY_BENCH_ARGS=\"--threads 1\"`) saves about 10 us at p50 by keeping the connection and the VM actor on one \
thread, at the cost of multi-core throughput for hosts with many VMs, so the default stays one thread per core. \
p99 stays within 3x p50 for every mode. On a host with spare cores the floor, and with it these figures, is lower.",
        ),
        "mesh-idle" => Some(
            "In a mesh spread over hosts each host's daemon holds one hop of a meshed connection (VM a's outbound on \
one host, VM b's inbound on another), so the target is judged per hop, each hop measured on its own fresh daemon: two \
sockets, one rustls session and one connection task per connection. A daemon that holds both hops (both VMs on one \
host) pays the sum, the row's both-hops figure. Per hop the memory is mostly rustls' session (a 4 KiB read buffer \
once it has read, plus keys and state) and the task's future state: the opening steps (detection, the TLS \
handshake, the transport header) run boxed and are freed before the connection idles, so an idle inbound task is \
about 1.3 KiB; the opaque copies hold no buffer while idle. What is left is mostly rustls' read buffer, which its \
buffered API keeps for the session's life (its unbuffered API would let the daemon release it while idle).",
        ),
        "mesh-balanced" => Some(
            "Both paths go through the same balancer (every outbound destination is an endpoint set, one endpoint or \
three), so what differs is the choice among three endpoints (power of two choices over peak-EWMA latency) and the \
spreading of the 16 connections' requests over three endpoints' pools: up to three times the upstream connections \
and TLS sessions, and three inbound listeners on the same daemon serving them, all on two cores shared with `wrk` and \
the servers. The pools are reused (counted at the inbound listeners: a few dozen connections over all repetitions, \
no churn). The ratio moves from run to run on this machine; a quieter run is needed to size the cost.",
        ),
        "mesh-rps" | "mesh-p50" => Some(
            "Both proxies go through the same four TCP hops and two TLS sessions on two cores shared with the load \
generator and the server. Single runs of this machine scatter widely (the per-repetition ratios in the row), which \
is why the figure is the median of per-repetition ratios with the paths taking turns. Before the data-path work of \
this release, six runs put cc-proxy's requests/s at 0.73 to 1.04 of HAProxy's and its added p50 at 1.08 to 1.17. \
Since then: per-request metric series resolved once per connection, no queue task in the balancer (two wake-ups \
less per request), tap strings only while tapped, and a release build with fat LTO and one codegen unit; the \
daemon's user CPU per request over both hops went from about 29..36 us to 21..25 us (HAProxy 15..21 us; system \
CPU is the same for both). Runs since put the added p50 at 0.98 to 1.04 of HAProxy's and requests/s at 0.88 to \
0.95: at par on latency, a few percent behind on requests/s, with a lower p99 under load. What is left is spread \
over hyper and tokio (a client-connection task per pooled connection at each hop, moves of large request \
futures).",
        ),
        _ => None,
    }
}

const METHOD: &str = "\
- Processes: the release `target/release/cc-proxy` and `target/release/cc-test-agent` (cc-agent dialect, hybrid vsock \
sockets, one agent process serving many VMs with `--count`). The daemon logs at `warn`.
- Throughput baseline: `cc-proxy-bench` itself speaks the agent protocol to another VM of the same agent process \
(CONNECT, READY, GETVERSION, EXECCMD with a stdio sequence, I/O packets) and runs the same command: \
`dd if=/dev/zero bs=64K` for stdout, `wc -c` fed from stdin for stdin. Through cc-proxy: `agent.call execcmd` with a \
stream, attach, read frames to the exit frame (stdin: 64 KiB stdin frames, then an empty one). The clock runs from \
the start command to the exit status. The baseline writes stdin in 4084-byte packets (4096 with the header, the \
most hyperstart accepts), the size cc-proxy splits at for cc-agent. Baseline and proxied runs alternate within each \
repetition.
- stdin, hyperstart dialect: the same shim stdin through the same daemon to a VM of a second test agent that speaks \
hyperstart (the forgiving mode: a strict one discards stdin that outruns the process), where cc-proxy cuts stdin \
into 256-byte packets so that real hyperstart's 512-byte per-process buffer never overflows; compared with the \
proxied cc-agent runs of the same repetition. It has no target: it is the price of not losing stdin.
- 64 streams: 8 VMs per side, 8 `dd` per VM started together; aggregate = all bytes / time to the last exit; \
per-stream rate = its bytes / time from the common start to its exit; fairness = slowest / fastest (worst repetition).
- Ping: `agent.call {\"command\":\"ping\"}` over one HTTP/1.1 keep-alive connection (the `cc-proxy-api` client), \
the same over one WebSocket, and a legacy v2 `Hyper` ping; baseline: PING on the control channel of another VM of \
the same agent. Modes alternate in blocks of 100 after 200 warm-up pings each. Added latency = p50 through \
cc-proxy - p50 direct. For context the run also times an 8-byte echo with a trivial child process over a unix \
socket (the floor): the cost, on this machine, of having any process in the middle.
- Memory: VmRSS of the daemon after the load minus VmRSS of the same daemon idle just before (after 300 ms to settle). \
VMs are registered over 16 client connections; streams are `stream.allocate` tokens spread over the VMs, each with \
an attached idle shim connection.
- Mesh: the two-hop mTLS path client -> VM a's outbound listener -> VM b's inbound listener -> server, both VMs on \
one daemon, against HAProxy (Debian's package, foreground, default threads) configured to do the same work: a \
frontend taking plaintext and originating TLS 1.3 with a's certificate, SNI b and a check of b's SAN (`verifyhost`), \
and a frontend terminating TLS 1.3 with b's certificate and requiring a client certificate from the same CA \
(`verify required`); `mode http` for requests, `mode tcp` for opaque bytes. One CA and the P-256 leaves of a and b \
are made by the benchmark (rcgen) and given to cc-proxy with `--mesh-identity-dir`, to HAProxy as PEM files and to \
the benchmark's own rustls client and server as DER. The servers are in the benchmark process: three hyper HTTP/1.1 \
servers answering every request with 2 bytes and counting requests, an opaque server that echoes or counts bytes, \
and a TLS 1.3 echo server with b's certificate requiring a client certificate. Latency: `GET /` over one keep-alive \
connection per path after 500 warm-up requests each; 7 repetitions (3 quick), in each the paths (direct, cc-proxy, \
cc-proxy balanced, HAProxy) take turns in blocks of 100, the order rotated block by block; per repetition added = \
p50 of the path - p50 direct, and the figure is the median over repetitions of cc-proxy's added / HAProxy's added. \
Requests/s: `wrk -t2 -c16 --latency`, 1 s per path to warm up, then 7 repetitions (3 quick) of 3 s (1 s quick) per \
path, the order rotated per repetition; the figure is the median of per-repetition ratios. Balanced: a's third \
outbound listener has the destination b, b2, b3 (three VMs of identity b, each inbound listener before its own \
server), measured in the same repetitions as the single-endpoint path (a's listener with the destination b): \
requests/s by `wrk`, p99 from the latency blocks at one connection (wrk's p99 under load is shown as context), and \
the requests each server answered during the balanced runs. Throughput: one connection uploads to the counting \
server and waits for its count. Idle memory: 1,000 connections, each proven end to end by one echoed byte, then \
held; VmRSS delta of the proxy / 1,000, each case on a fresh process: the inbound hop alone (the benchmark's rustls \
client with a's certificate -> b's opaque inbound -> echo server), the outbound hop alone (plaintext -> a's opaque \
outbound -> the benchmark's TLS echo server), and both hops in one process; HAProxy the same three ways (`mode tcp`). \
Meshed VMs: 1,000 VMs registered on a fresh daemon with a `mesh` of 10 identities (embedded CA) and one inbound \
listener each, against 1,000 plain VMs on another fresh daemon; certificates issued are read from \
`cc_proxy_mesh_certificate_issuances_total`.
- Start-up: the daemon is spawned with `NOTIFY_SOCKET` pointing at a datagram socket of the benchmark; time from \
spawn to the `READY=1` datagram.";

/// A horizontal bar chart: one bar per row, scaled so each row's target sits on the same vertical line.
fn svg(title: &str, rows: &[&Row]) -> String {
    const W: f64 = 760.0;
    const LABEL: f64 = 230.0;
    const BAR_H: f64 = 26.0;
    const GAP: f64 = 14.0;
    let top = 44.0;
    let h = top + rows.len() as f64 * (BAR_H + GAP) + 30.0;
    // Bars show value/target (higher-is-better) or value/target too (lower-is-better); the target is 1.0.
    let scale_max = rows
        .iter()
        .filter_map(|r| r.value.map(|v| if r.goal > 0.0 { v / r.goal } else { 0.0 }))
        .fold(1.25_f64, f64::max)
        .min(4.0);
    let plot = W - LABEL - 140.0;
    let x = |frac: f64| LABEL + plot * (frac.clamp(0.0, scale_max) / scale_max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="24" font-size="15" font-weight="bold">{}</text>"#,
        esc(title)
    );
    for (i, r) in rows.iter().enumerate() {
        let y = top + i as f64 * (BAR_H + GAP);
        let _ = writeln!(
            s,
            r#"<text x="10" y="{:.1}">{}</text>"#,
            y + BAR_H * 0.68,
            esc(r.id)
        );
        match r.value {
            Some(v) => {
                let frac = if r.goal > 0.0 { v / r.goal } else { 0.0 };
                let color = match r.verdict {
                    Verdict::Met => "#3a9d5d",
                    Verdict::Missed => "#d0463b",
                    Verdict::NotMeasured | Verdict::Informational => "#999999",
                };
                let _ = writeln!(
                    s,
                    r#"<rect x="{LABEL}" y="{y:.1}" width="{:.1}" height="{BAR_H}" fill="{color}"/>"#,
                    (x(frac) - LABEL).max(1.0)
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}">{} {} (target {} {})</text>"#,
                    x(frac) + 6.0,
                    y + BAR_H * 0.68,
                    fmt_num(v),
                    r.unit,
                    if r.higher_is_better { "&gt;=" } else { "&lt;=" },
                    fmt_num(r.goal)
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    r##"<text x="{LABEL}" y="{:.1}" fill="#777">not measured</text>"##,
                    y + BAR_H * 0.68
                );
            }
        }
    }
    let tx = x(1.0);
    let _ = writeln!(
        s,
        r##"<line x1="{tx:.1}" y1="{:.1}" x2="{tx:.1}" y2="{:.1}" stroke="#222" stroke-dasharray="4 3"/>"##,
        top - 6.0,
        h - 24.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">target</text>"#,
        tx,
        h - 8.0
    );
    let _ = writeln!(s, "</svg>");
    s
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{Balanced, IdleCost, LatencyRep};

    fn wrk(rps: f64, p99_us: f64) -> WrkRun {
        WrkRun { rps, p99_us }
    }

    fn rep(cc: f64, haproxy: f64, cc99: f64, bal99: f64) -> LatencyRep {
        LatencyRep {
            direct_p50_us: 20.0,
            cc_p50_us: cc,
            cc_p99_us: cc99,
            balanced_p50_us: cc,
            balanced_p99_us: bal99,
            haproxy_p50_us: Some(haproxy),
        }
    }

    /// Three repetitions; cc-proxy's requests/s are `cc`, the balanced path's `bal`, spread `per_endpoint`.
    fn results(cc: [f64; 3], bal: [f64; 3], per_endpoint: Vec<u64>) -> MeshResults {
        MeshResults {
            latency_reps: vec![
                rep(120.0, 110.0, 300.0, 310.0),
                rep(100.0, 120.0, 300.0, 900.0),
                rep(110.0, 120.0, 300.0, 320.0),
            ],
            rps_cc: cc.iter().map(|r| wrk(*r, 1000.0)).collect(),
            rps_haproxy: vec![wrk(100.0, 1000.0); 3],
            rps_direct: vec![wrk(500.0, 100.0); 3],
            balanced: Some(Balanced {
                runs: bal.iter().map(|r| wrk(*r, 1000.0)).collect(),
                per_endpoint,
            }),
            idle_cc: IdleCost {
                inbound: Some(15.0 * 1024.0),
                outbound: Some(12.0 * 1024.0),
                both: Some(27.0 * 1024.0),
            },
            ..MeshResults::default()
        }
    }

    fn row<'a>(rows: &'a [Row], id: &str) -> &'a Row {
        rows.iter().find(|r| r.id == id).expect("row present")
    }

    #[test]
    fn mesh_figures_are_medians_of_per_repetition_ratios() {
        // cc / HAProxy requests/s per repetition: 0.5, 1.2, 1.1 -> median 1.1: one slow repetition does not decide.
        let rows = mesh_rows(Some(&results(
            [50.0, 120.0, 110.0],
            [110.0, 120.0, 100.0],
            vec![1, 1, 1],
        )));
        let rps = row(&rows, "mesh-rps");
        assert_eq!(rps.verdict, Verdict::Met);
        assert!((rps.value.unwrap_or(0.0) - 1.1).abs() < 1e-9);
        // Added p50 ratios: 100/90, 80/100, 90/100 -> median 0.9.
        let p50 = row(&rows, "mesh-p50");
        assert_eq!(p50.verdict, Verdict::Met);
        assert!((p50.value.unwrap_or(0.0) - 0.9).abs() < 1e-9);
    }

    #[test]
    fn balanced_row_needs_rate_tail_and_spread() {
        // Rates 110/50, 120/120, 100/110 -> median 1.0; p99 ratios 310/300, 3, 320/300 -> median 1.07; even spread.
        let even = mesh_rows(Some(&results(
            [50.0, 120.0, 110.0],
            [110.0, 120.0, 100.0],
            vec![30, 40, 30],
        )));
        assert_eq!(row(&even, "mesh-balanced").verdict, Verdict::Met);
        // One endpoint under half its even share (10% < 16.7%): missed even with the same rate and tail.
        let skewed = mesh_rows(Some(&results(
            [50.0, 120.0, 110.0],
            [110.0, 120.0, 100.0],
            vec![10, 45, 45],
        )));
        assert_eq!(row(&skewed, "mesh-balanced").verdict, Verdict::Missed);
        // The rate below 0.9x the single endpoint's: missed.
        let slow = mesh_rows(Some(&results(
            [100.0, 100.0, 100.0],
            [80.0, 85.0, 95.0],
            vec![1, 1, 1],
        )));
        assert_eq!(row(&slow, "mesh-balanced").verdict, Verdict::Missed);
        // Without wrk the row says why.
        let mut none = results([1.0; 3], [1.0; 3], vec![1, 1, 1]);
        none.wrk_missing = Some("wrk not installed".into());
        let rows = mesh_rows(Some(&none));
        assert_eq!(row(&rows, "mesh-balanced").verdict, Verdict::NotMeasured);
    }

    #[test]
    fn idle_memory_is_judged_on_the_larger_hop_and_shows_both() {
        let mut m = results([1.0; 3], [1.0; 3], vec![1, 1, 1]);
        let rows = mesh_rows(Some(&m));
        let idle = row(&rows, "mesh-idle");
        assert_eq!(
            idle.verdict,
            Verdict::Met,
            "15 KiB per hop <= 16 KiB, although both hops are 27"
        );
        assert_eq!(idle.value, Some(15.0));
        assert!(idle.measured.contains("both hops in one daemon 27.0 KiB"));
        m.idle_cc.outbound = Some(17.0 * 1024.0);
        let rows = mesh_rows(Some(&m));
        assert_eq!(row(&rows, "mesh-idle").verdict, Verdict::Missed);
        m.idle_cc.inbound = None;
        let rows = mesh_rows(Some(&m));
        assert_eq!(row(&rows, "mesh-idle").verdict, Verdict::NotMeasured);
    }
}
