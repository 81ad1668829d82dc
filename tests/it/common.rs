//! Harness shared by the integration tests: start the real `cc-proxy` binary on a temporary socket, start
//! `cc-test-agent` processes as VMs, and talk to the daemon only through its socket with the public client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use cc_proxy_api::client::Client;
use cc_proxy_api::types::{RegisterParams, RegisterResult};
use serde_json::{json, Value};

/// The daemon binary under test.
pub fn proxy_bin() -> PathBuf {
    std::env::var_os("CC_PROXY_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cc-proxy")))
}

/// The test agent binary (built on demand when only this test crate was built).
pub fn agent_bin() -> PathBuf {
    static BUILD: Once = Once::new();
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_cc-proxy"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = dir.join("cc-test-agent");
    BUILD.call_once(|| {
        if !path.exists() {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "cc-test-agent"])
                .status()
                .expect("cargo build -p cc-test-agent");
            assert!(status.success(), "building cc-test-agent failed");
        }
    });
    path
}

/// Ports handed out by `free_addr` are taken from below the kernel's ephemeral range (32768-60999 by
/// default), so no outgoing connection of a test can take one between `free_addr` and the daemon's bind.
const FREE_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free loopback TCP address for a listener the daemon will bind. Never the same port twice in one test
/// process (the kernel may hand `bind(0)` the same port again once it is closed, and a test asking for
/// five addresses then gets two alike); ports are picked at random so parallel test processes rarely meet.
pub fn free_addr() -> String {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<(HashSet<u16>, u64)>> = Mutex::new(None);
    let mut guard = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let (given, seed) = guard.get_or_insert_with(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (
            HashSet::new(),
            (nanos ^ (u64::from(std::process::id()) << 32)) | 1,
        )
    });
    let span = u64::from(FREE_PORTS.end - FREE_PORTS.start);
    for _ in 0..10_000 {
        // xorshift64: enough to spread the picks of parallel test processes.
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let port = FREE_PORTS.start + (*seed % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            given.insert(port);
            return l.local_addr().expect("addr").to_string();
        }
    }
    panic!("no free loopback port in {FREE_PORTS:?}");
}

/// A running daemon and the agents the test started.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub admin: String,
    pub client: Client,
    daemon: Option<Child>,
    pub stderr_log: PathBuf,
    agents: Vec<Child>,
    extra_args: Vec<String>,
    /// The daemon's open-files limit (soft, hard), set with `prlimit` when given.
    nofile: Option<(u64, u64)>,
}

/// A started test agent serving one or more VMs.
#[derive(Clone, Debug)]
pub struct Agent {
    /// The hybrid-vsock socket path (or the control path in socket-pair mode).
    pub path: PathBuf,
    pub io_path: Option<PathBuf>,
    pub pid: u32,
}

impl Agent {
    /// Control and I/O URIs of VM `n` of this agent (`None` = single-VM agent).
    pub fn uris(&self, n: Option<usize>) -> (String, String) {
        let suffix = |p: &Path| match n {
            Some(i) => format!("{}.{i}", p.display()),
            None => p.display().to_string(),
        };
        match &self.io_path {
            None => (
                format!("hvsock://{}:2718", suffix(&self.path)),
                format!("hvsock://{}:2719", suffix(&self.path)),
            ),
            Some(io) => (
                format!("unix://{}", suffix(&self.path)),
                format!("unix://{}", suffix(io)),
            ),
        }
    }
}

impl Env {
    pub async fn start() -> Env {
        Env::start_with(&[]).await
    }

    /// Start the daemon under an open-files limit (`prlimit --nofile=SOFT:HARD`).
    pub async fn start_with_nofile(soft: u64, hard: u64, args: &[&str]) -> Env {
        Env::start_inner(args, Some((soft, hard))).await
    }

    /// Start the daemon with extra arguments (`--log debug`, `--stream-buffer N`, ...).
    pub async fn start_with(args: &[&str]) -> Env {
        Env::start_inner(args, None).await
    }

    async fn start_inner(args: &[&str], nofile: Option<(u64, u64)>) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("ccp-it")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let socket = dir.path().join("proxy.sock");
        let state_dir = dir.path().join("state");
        let stderr_log = dir.path().join("proxy.log");
        let mut env = Env {
            client: Client::new(&socket),
            socket,
            state_dir,
            admin: free_addr(),
            daemon: None,
            stderr_log,
            agents: Vec::new(),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            nofile,
            dir,
        };
        env.spawn_daemon().await;
        env
    }

    async fn spawn_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)
            .expect("log file");
        // prlimit sets the limit and execs the daemon (same pid).
        let mut cmd = match self.nofile {
            Some((soft, hard)) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={soft}:{hard}")).arg(proxy_bin());
                c
            }
            None => Command::new(proxy_bin()),
        };
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--admin-addr")
            .arg(&self.admin)
            .arg("--log-target")
            .arg("stderr");
        if !self.extra_args.iter().any(|a| a == "--log") {
            cmd.args(["--log", "info"]);
        }
        cmd.args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.daemon = Some(cmd.spawn().expect("spawn cc-proxy"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cc-proxy did not start serving: {}", self.logs());
    }

    /// The daemon's stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    pub fn daemon_pid(&self) -> u32 {
        self.daemon.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM the daemon and wait for its exit status.
    pub async fn stop_daemon(&mut self) -> std::process::ExitStatus {
        let mut child = self.daemon.take().expect("daemon running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "cc-proxy did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL the daemon (nothing it holds is saved) and reap it.
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the daemon again on the same socket and state dir.
    pub async fn restart_daemon(&mut self) {
        if self.daemon.is_some() {
            let st = self.stop_daemon().await;
            assert!(st.success(), "cc-proxy exited with {st}");
        }
        self.client = Client::new(&self.socket);
        self.spawn_daemon().await;
    }

    /// Start a test agent (hybrid vsock unless `args` says otherwise) and wait until it listens.
    /// A hyperstart agent runs in `--strict` mode, as unforgiving as real hyperstart, unless
    /// `args` holds `--lenient` (a harness flag for the tests of behaviour only the lenient agent
    /// has, e.g. 128+N statuses in the hyperstart dialect).
    pub fn agent(&mut self, args: &[&str]) -> Agent {
        let n = self.agents.len();
        let pair = args.contains(&"--pair");
        let lenient = args.contains(&"--lenient") || args.contains(&"cc-agent");
        let mut args: Vec<&str> = args
            .iter()
            .copied()
            .filter(|a| *a != "--pair" && *a != "--lenient")
            .collect();
        if !lenient {
            args.push("--strict");
        }
        let path = self.dir.path().join(format!("agent{n}.sock"));
        let io_path = pair.then(|| self.dir.path().join(format!("agent{n}-io.sock")));
        let mut cmd = Command::new(agent_bin());
        match &io_path {
            None => {
                cmd.arg("--hvsock").arg(&path);
            }
            Some(io) => {
                cmd.arg("--control").arg(&path).arg("--io").arg(io);
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("agent{n}.log")))
            .expect("agent log");
        let mut child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("agent stdout");
        assert!(line.contains("listening"), "agent did not start: {line:?}");
        let pid = child.id();
        self.agents.push(child);
        Agent { path, io_path, pid }
    }

    /// Kill an agent process (the VM "dies").
    pub fn kill_agent(&mut self, agent: &Agent) {
        if let Some(c) = self.agents.iter_mut().find(|c| c.id() == agent.pid) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Register VM `id` served by `agent` (VM `n` of a multi-VM agent).
    pub async fn register(&self, id: &str, agent: &Agent, n: Option<usize>) -> RegisterResult {
        let (control, io) = agent.uris(n);
        self.client
            .register(&RegisterParams {
                id: id.into(),
                control,
                io,
                console: None,
                timeout_ms: Some(5000),
                mesh: None,
            })
            .await
            .unwrap_or_else(|e| panic!("register {id}: {e}\n{}", self.logs()))
    }

    /// Raw JSON-RPC call returning the whole response object (result or error).
    pub async fn rpc(&self, method: &str, params: Value) -> Value {
        match self.client.call::<Value>(method, params).await {
            Ok(v) => json!({ "result": v }),
            Err(cc_proxy_api::client::ClientError::Rpc {
                code,
                message,
                data,
            }) => {
                json!({"error": {"code": code, "message": message, "data": data}})
            }
            Err(e) => panic!("{method}: {e}"),
        }
    }

    /// Run the `cc-proxy` client CLI against this daemon.
    pub fn cli(&self, args: &[&str], stdin: &[u8]) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new(proxy_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cc-proxy client");
        let mut input = child.stdin.take().expect("stdin");
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = child.wait_with_output().expect("client output");
        let _ = writer.join();
        out
    }

    /// Fetch the admin server's `/metrics` text.
    pub async fn metrics(&self) -> String {
        http_get(&self.admin, "/metrics").await.1
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for c in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `execcmd` data running `args` in container `hyperstart`.
pub fn exec_data(args: &[&str]) -> Value {
    json!({"container": "hyperstart", "process": {"args": args}})
}

/// A plain HTTP/1.1 GET over TCP; returns (status, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, "").await
}

/// A plain HTTP/1.1 request over TCP with `Connection: close`; returns (status, body).
pub async fn http_request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect admin");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Poll `f` until it returns true or `timeout` passes.
pub async fn eventually<F: FnMut() -> bool>(timeout: Duration, mut f: F) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// A second local user for the authorization tests, created on first use.
#[derive(Debug, Clone, Copy)]
pub struct OtherUser {
    pub uid: u32,
    pub gid: u32,
}

/// The name of the test's second user (and of its own group).
pub const OTHER_USER: &str = "ccproxy-test2";

/// The uid and gid of user `name`, creating it (a system user with a group of its own and no home) if it does
/// not exist. `None`, with a printed reason, when the test cannot have one: not root, or no `useradd`.
pub fn other_user(name: &str) -> Option<OtherUser> {
    use nix::unistd::{Uid, User};
    if !Uid::effective().is_root() {
        eprintln!("SKIP: creating and acting as a second uid needs root");
        return None;
    }
    let lookup = || User::from_name(name).ok().flatten();
    if lookup().is_none() {
        let made = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(name)
            .status();
        // A failed useradd may mean another test created the user meanwhile: the lookup below decides.
        if let Err(e) = made {
            eprintln!("SKIP: cannot run useradd: {e}");
            return None;
        }
    }
    let Some(user) = lookup() else {
        eprintln!("SKIP: useradd did not create {name}");
        return None;
    };
    Some(OtherUser {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    })
}

/// The gid of group `name`, creating it (a system group) if it does not exist; `None` when it cannot.
pub fn test_group(name: &str) -> Option<u32> {
    use nix::unistd::Group;
    let lookup = || Group::from_name(name).ok().flatten();
    if lookup().is_none() {
        let _ = Command::new("groupadd").args(["--system", name]).status();
    }
    lookup().map(|g| g.gid.as_raw())
}

/// Connect to the unix socket at `path` as uid `uid`, gid `gid` with supplementary `groups`: the daemon sees
/// exactly these ids in SO_PEERCRED. The ids are taken by a thread of its own (Linux credentials belong to a
/// thread; the raw system calls change only the calling one), which ends after the connect.
pub fn connect_as(
    path: &Path,
    uid: u32,
    gid: u32,
    groups: &[u32],
) -> std::io::Result<tokio::net::UnixStream> {
    let (path, groups) = (path.to_path_buf(), groups.to_vec());
    let std = std::thread::spawn(move || -> std::io::Result<std::os::unix::net::UnixStream> {
        let keep = libc::uid_t::MAX; // -1: leave that id alone
                                     // SAFETY: plain system calls on this thread's credentials; `groups` outlives the setgroups call.
        #[allow(unsafe_code)]
        let rc = unsafe {
            let g = libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr());
            let r = libc::syscall(libc::SYS_setresgid, keep, gid, keep);
            let u = libc::syscall(libc::SYS_setresuid, keep, uid, keep);
            g | r | u
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::os::unix::net::UnixStream::connect(&path)
    })
    .join()
    .map_err(|_| std::io::Error::other("the connecting thread panicked"))??;
    std.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(std)
}

/// A JSON-RPC client (WebSocket: calls and subscriptions) on the daemon's socket as uid/gid/groups.
pub async fn ws_as(
    env: &Env,
    uid: u32,
    gid: u32,
    groups: &[u32],
) -> jsonrpsee::ws_client::WsClient {
    let stream = connect_as(&env.socket, uid, gid, groups).expect("connect as another uid");
    jsonrpsee::ws_client::WsClientBuilder::default()
        .build_with_stream("ws://localhost/", stream)
        .await
        .expect("WebSocket handshake on the daemon socket")
}
