//! The processes under test: the release `cc-proxy` daemon and `cc-test-agent`, started in a scratch
//! directory and stopped when their handle is dropped; plus RSS readings from `/proc`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::BenchError;

/// Where the binaries are and where scratch files go.
#[derive(Debug, Clone)]
pub struct Setup {
    pub proxy_bin: PathBuf,
    pub agent_bin: PathBuf,
    /// A short scratch directory (unix socket paths are limited to 108 bytes).
    pub dir: PathBuf,
}

/// A free loopback TCP address for the daemon's admin server.
pub fn free_addr() -> Result<String, BenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// Resident set size of `pid` in bytes (VmRSS of /proc/<pid>/status).
pub fn rss_bytes(pid: u32) -> Result<u64, BenchError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| BenchError::Setup(format!("no VmRSS for pid {pid}")))
}

/// Send SIGTERM (with the `kill` utility, so this crate needs no unsafe code) and wait; SIGKILL after 5 s.
pub fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Largest `/metrics` answer read.
const METRICS_MAX: u64 = 64 << 20;

/// A running daemon on its own socket and state directory.
pub struct Daemon {
    pub socket: PathBuf,
    pub child: Child,
    /// The admin server (`/metrics`).
    pub admin: String,
}

impl Daemon {
    /// Start the daemon named `name` (its files go under `setup.dir/name`) and wait until the socket accepts.
    pub async fn start(setup: &Setup, name: &str) -> Result<Daemon, BenchError> {
        Daemon::start_with(setup, name, &[]).await
    }

    /// [`Daemon::start`] with extra flags.
    pub async fn start_with(
        setup: &Setup,
        name: &str,
        extra: &[&str],
    ) -> Result<Daemon, BenchError> {
        let dir = setup.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("p.sock");
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::File::create(dir.join("proxy.log"))?;
        let admin = free_addr()?;
        let child = Command::new(&setup.proxy_bin)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--admin-addr")
            .arg(&admin)
            .args(["--log", "warn", "--log-target", "stderr"])
            .args(extra)
            // Extra daemon flags for experiments, e.g. CC_PROXY_BENCH_ARGS="--threads 1".
            .args(
                std::env::var("CC_PROXY_BENCH_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| BenchError::Setup(format!("{}: {e}", setup.proxy_bin.display())))?;
        let mut d = Daemon {
            socket,
            child,
            admin,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if tokio::net::UnixStream::connect(&d.socket).await.is_ok() {
                return Ok(d);
            }
            if let Ok(Some(st)) = d.child.try_wait() {
                return Err(BenchError::Setup(format!("cc-proxy exited at start: {st}")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        terminate(&mut d.child);
        Err(BenchError::Setup("cc-proxy did not start serving".into()))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss(&self) -> Result<u64, BenchError> {
        rss_bytes(self.pid())
    }

    pub fn client(&self) -> cc_proxy_api::client::Client {
        cc_proxy_api::client::Client::new(&self.socket)
    }

    /// The admin server's `/metrics` text.
    pub async fn metrics(&self) -> Result<String, BenchError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(&self.admin).await?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        c.take(METRICS_MAX).read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out).into_owned();
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
            _ => Err(BenchError::Protocol(format!(
                "/metrics: {}",
                text.lines().next().unwrap_or("")
            ))),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// A running test agent serving `count` VMs over hybrid vsock, cc-agent dialect (see [`Agent::start_dialect`]).
pub struct Agent {
    pub path: PathBuf,
    pub count: usize,
    child: Child,
}

impl Agent {
    pub fn start(setup: &Setup, name: &str, count: usize) -> Result<Agent, BenchError> {
        Agent::start_dialect(setup, name, count, "cc-agent")
    }

    /// [`Agent::start`] speaking `dialect` (`cc-agent` or `hyperstart`, the forgiving one: a strict agent
    /// discards stdin that outruns its processes).
    pub fn start_dialect(
        setup: &Setup,
        name: &str,
        count: usize,
        dialect: &str,
    ) -> Result<Agent, BenchError> {
        let path = setup.dir.join(format!("{name}.sock"));
        let log = std::fs::File::create(setup.dir.join(format!("{name}.log")))?;
        let mut child = Command::new(&setup.agent_bin)
            .arg("--hvsock")
            .arg(&path)
            .args(["--dialect", dialect, "--count", &count.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| BenchError::Setup(format!("{}: {e}", setup.agent_bin.display())))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        if !line.contains("listening") {
            let _ = child.kill();
            let _ = child.wait();
            return Err(BenchError::Setup(format!(
                "cc-test-agent did not start: {line:?}"
            )));
        }
        Ok(Agent { path, count, child })
    }

    /// The hybrid vsock socket of VM `n`.
    pub fn vm_path(&self, n: usize) -> PathBuf {
        if self.count > 1 {
            PathBuf::from(format!("{}.{n}", self.path.display()))
        } else {
            self.path.clone()
        }
    }

    /// Control and I/O URIs of VM `n`, for `vm.register`.
    pub fn uris(&self, n: usize) -> (String, String) {
        let p = self.vm_path(n);
        (
            format!("hvsock://{}:2718", p.display()),
            format!("hvsock://{}:2719", p.display()),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Register VM `n` of `agent` as `id`.
pub async fn register(
    client: &cc_proxy_api::client::Client,
    id: &str,
    agent: &Agent,
    n: usize,
) -> Result<(), BenchError> {
    let (control, io) = agent.uris(n);
    client
        .register(&cc_proxy_api::types::RegisterParams {
            id: id.into(),
            control,
            io,
            console: None,
            timeout_ms: Some(10_000),
            mesh: None,
        })
        .await?;
    Ok(())
}

/// True when `path` exists and is executable enough to try.
pub fn exists(path: &Path) -> bool {
    path.is_file()
}
