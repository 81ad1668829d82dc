//! Foundation tests: the daemon's life cycle and its operator-facing contract, checked through the real
//! `cc-proxy` binary only (its socket, exit codes, stderr, signals, journald and systemd's tools).
//!
//! Covered: start/stop, socket path creation and mode, stale-socket replacement, refusing a second daemon,
//! socket activation with `READY=1`, every JSON-RPC error path, the request size bound, log-level
//! precedence, CLI errors, SIGTERM/SIGINT, journald output, `curl --unix-socket`, and the shipped systemd
//! units and SELinux module. Tests that need a tool or root skip with a printed reason when it is missing.
//!
//! The helpers here are private on purpose: they speak HTTP/1.1 over `std` sockets so that a failure points
//! at the daemon, not at a client library.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// The daemon under test: the one cargo built for this test crate, or `CC_PROXY_TEST_BIN` to check another
/// build (for example an installed `/usr/local/bin/cc-proxy`) against the same contract.
fn bin() -> PathBuf {
    std::env::var_os("CC_PROXY_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cc-proxy")))
}
/// Time a daemon gets to answer `proxy.health` after it is spawned (debug build, 2 busy cores).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Time a daemon gets to exit after a signal, or after a CLI error.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Read/write timeout of one HTTP exchange with the daemon.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// The documented request-body limit (1 MiB).
const MAX_REQUEST: usize = 1 << 20;

/// Environment variables that would change how the daemon starts or logs; every test starts from none of them.
const INHERITED_ENV: &[&str] = &[
    "CC_PROXY_LOG_LEVEL",
    "JOURNAL_STREAM",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "RUST_LOG",
];

fn skip(test: &str, reason: &str) {
    eprintln!("SKIP {test}: {reason}");
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Finds an executable on PATH or at an absolute path.
fn find_tool(name: &str) -> Option<PathBuf> {
    if name.starts_with('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A loopback address for the admin server that no other test daemon uses (the default 4191 would clash).
fn free_admin_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    let port = listener
        .local_addr()
        .expect("local addr of ephemeral port")
        .port();
    format!("127.0.0.1:{port}")
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("cc-proxy-foundation-")
        .tempdir()
        .expect("create a temporary directory")
}

/// `cc-proxy` with a clean environment, its own state dir and admin port, and no socket option.
fn daemon_command(dir: &Path) -> Command {
    let mut cmd = Command::new(bin());
    for var in INHERITED_ENV {
        cmd.env_remove(var);
    }
    cmd.arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--admin-addr")
        .arg(free_admin_addr());
    cmd
}

/// A running daemon (or a wrapper that execs it) with its stderr collected in the background.
struct Daemon {
    child: Child,
    socket: PathBuf,
    stderr: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Daemon {
    /// Spawns `cmd` (stdout discarded, stderr collected); `socket` is where it serves.
    fn spawn(mut cmd: Command, socket: &Path) -> Daemon {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the daemon");
        let pipe: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("stderr is piped"));
        Daemon::collect_stderr(child, pipe, socket)
    }

    /// Like [`Daemon::spawn`], with `JOURNAL_STREAM` naming the daemon's stderr pipe ("device:inode"), the
    /// way systemd marks a stderr that is connected to the journal.
    fn spawn_with_stderr_as_journal_stream(mut cmd: Command, socket: &Path) -> Daemon {
        let (read_end, write_end) = nix::unistd::pipe().expect("create a pipe");
        let write_end = std::fs::File::from(write_end);
        let meta = write_end.metadata().expect("fstat the pipe");
        cmd.env(
            "JOURNAL_STREAM",
            format!(
                "{}:{}",
                std::os::unix::fs::MetadataExt::dev(&meta),
                std::os::unix::fs::MetadataExt::ino(&meta)
            ),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(write_end));
        let child = cmd.spawn().expect("spawn the daemon");
        // Our copy of the write end must go, or the reader never sees end-of-file.
        drop(cmd);
        let pipe: Box<dyn Read + Send> = Box::new(std::fs::File::from(read_end));
        Daemon::collect_stderr(child, pipe, socket)
    }

    fn collect_stderr(child: Child, pipe: Box<dyn Read + Send>, socket: &Path) -> Daemon {
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let reader = thread::spawn(move || {
            let mut lines = BufReader::new(pipe);
            let mut line = String::new();
            loop {
                line.clear();
                match lines.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if let Ok(mut all) = sink.lock() {
                            all.push_str(&line);
                        }
                    }
                }
            }
        });
        Daemon {
            child,
            socket: socket.to_path_buf(),
            stderr,
            reader: Some(reader),
            status: None,
        }
    }

    /// Starts `cc-proxy --socket <dir>/run/proxy.sock` plus `args`, with `env` set, and waits until it serves.
    fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let socket = dir.join("run").join("proxy.sock");
        let mut cmd = daemon_command(dir);
        cmd.arg("--socket").arg(&socket).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut daemon = Daemon::spawn(cmd, &socket);
        daemon.wait_ready();
        daemon
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits in i32"))
    }

    /// Waits until `proxy.health` answers, panicking with the daemon's stderr if it exits or times out.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                panic!(
                    "daemon exited with {status} before serving\nstderr:\n{}",
                    self.stderr_after_exit()
                );
            }
            if let Ok(reply) = rpc(&self.socket, &request(0, "proxy.health")) {
                if reply.get("result").is_some() {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "daemon did not answer proxy.health on {} within {START_TIMEOUT:?}\nstderr:\n{}",
                    self.socket.display(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the daemon wrote to stderr so far.
    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Everything the daemon wrote to stderr; only complete once it has exited.
    fn stderr_after_exit(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.stderr()
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal the daemon");
    }

    /// Waits for the process to exit; `None` on timeout (the process is then killed).
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return None;
                }
            }
        }
    }

    /// SIGTERM, then the exit status; panics (with stderr) if the daemon does not exit in time.
    fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        match self.wait_exit(EXIT_TIMEOUT) {
            Some(status) => status,
            None => panic!(
                "daemon did not exit within {EXIT_TIMEOUT:?} of SIGTERM\nstderr:\n{}",
                self.stderr_after_exit()
            ),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.is_none() {
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
    }
}

/// A JSON-RPC 2.0 request without params.
fn request(id: u64, method: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method})
}

/// One HTTP response: status code, lower-cased headers, decoded body.
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> io::Result<Value> {
        serde_json::from_slice(&self.body).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "response body is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&self.body)
                ),
            )
        })
    }
}

/// POSTs `body` to `/` on the daemon's socket with one HTTP/1.1 request on its own connection.
///
/// A write error is not fatal: a daemon may answer an oversized request (413) and close before reading all
/// of it, and the answer is what the test wants to see.
fn http_post(socket: &Path, body: &[u8]) -> io::Result<HttpResponse> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = format!(
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nAccept: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let written = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body));
    let mut raw = Vec::new();
    let read = stream.read_to_end(&mut raw);
    if raw.is_empty() {
        written?;
        read?;
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without a response",
        ));
    }
    parse_http_response(&raw)
}

fn parse_http_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of HTTP headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("no status line"))?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        decode_chunked(rest).ok_or_else(|| bad("bad chunked body"))?
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Sends one JSON value and returns the JSON reply.
fn rpc(socket: &Path, body: &Value) -> io::Result<Value> {
    http_post(socket, body.to_string().as_bytes())?.json()
}

/// Sends raw bytes and returns the JSON reply.
fn rpc_raw(socket: &Path, body: &str) -> Value {
    http_post(socket, body.as_bytes())
        .and_then(|r| r.json())
        .unwrap_or_else(|e| panic!("request {body:?}: {e}"))
}

/// The `error.code` of a JSON-RPC reply, with the reply in the panic message when absent.
fn error_code(reply: &Value) -> i64 {
    reply
        .pointer("/error/code")
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("expected a JSON-RPC error object, got {reply}"))
}

fn assert_serves(socket: &Path) {
    let reply = rpc(socket, &request(99, "proxy.version"))
        .unwrap_or_else(|e| panic!("proxy.version on {}: {e}", socket.display()));
    assert!(
        reply.pointer("/result/version").is_some(),
        "proxy.version: {reply}"
    );
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------------------
// Life cycle and the socket file
// ---------------------------------------------------------------------------------------------------------

#[test]
fn starts_serves_and_stops_on_sigterm() {
    let dir = tempdir();
    let mut daemon = Daemon::start(dir.path(), &[], &[]);

    let reply = rpc(&daemon.socket, &request(1, "proxy.version")).expect("proxy.version");
    assert_eq!(reply["jsonrpc"], "2.0", "{reply}");
    assert_eq!(reply["id"], 1, "{reply}");
    let result = &reply["result"];
    assert!(result["version"].is_string(), "version: {reply}");
    assert!(result["api_version"].is_u64(), "api_version: {reply}");
    assert!(result["features"].is_array(), "features: {reply}");

    let health = rpc(&daemon.socket, &request(2, "proxy.health")).expect("proxy.health");
    assert!(health.get("result").is_some(), "proxy.health: {health}");

    let status = daemon.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM: {status}\nstderr:\n{}",
        daemon.stderr_after_exit()
    );
    assert!(
        !daemon.socket.exists(),
        "socket {} still exists after a clean exit",
        daemon.socket.display()
    );
}

#[test]
fn sigint_also_exits_zero_and_removes_socket() {
    let dir = tempdir();
    let mut daemon = Daemon::start(dir.path(), &[], &[]);
    daemon.signal(Signal::SIGINT);
    let status = daemon
        .wait_exit(EXIT_TIMEOUT)
        .expect("daemon exits after SIGINT");
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGINT: {status}\nstderr:\n{}",
        daemon.stderr_after_exit()
    );
    assert!(!daemon.socket.exists(), "socket left behind after SIGINT");
}

#[test]
fn socket_is_0660_in_a_created_0750_directory() {
    let dir = tempdir();
    // The parent of the socket does not exist yet: the daemon creates it.
    let daemon = Daemon::start(dir.path(), &[], &[]);
    let socket_meta = std::fs::metadata(&daemon.socket).expect("socket exists");
    assert!(socket_meta.file_type().is_socket());
    assert_eq!(
        socket_meta.permissions().mode() & 0o777,
        0o660,
        "socket mode is {:o}",
        socket_meta.permissions().mode() & 0o777
    );
    let parent = daemon.socket.parent().expect("socket has a parent");
    let dir_mode = std::fs::metadata(parent)
        .expect("parent exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        dir_mode, 0o750,
        "created parent directory mode is {dir_mode:o}"
    );
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempdir();
    let socket = dir.path().join("run").join("proxy.sock");
    std::fs::create_dir_all(socket.parent().expect("parent")).expect("create run dir");
    // Bind and drop a listener: the file stays, nobody answers on it.
    drop(UnixListener::bind(&socket).expect("bind the stale socket"));
    assert!(is_socket(&socket));
    assert!(
        UnixStream::connect(&socket).is_err(),
        "stale socket must not answer"
    );

    let mut daemon = Daemon::start(dir.path(), &[], &[]);
    assert_serves(&socket);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn second_daemon_on_a_live_socket_is_refused() {
    let dir = tempdir();
    let mut first = Daemon::start(dir.path(), &[], &[]);

    let second_dir = tempdir();
    let mut cmd = daemon_command(second_dir.path());
    cmd.arg("--socket").arg(&first.socket);
    let mut second = Daemon::spawn(cmd, &first.socket);
    let status = second
        .wait_exit(EXIT_TIMEOUT)
        .expect("the second daemon exits on its own");
    let message = second.stderr_after_exit();
    assert_eq!(
        status.code(),
        Some(1),
        "second daemon: {status}\nstderr:\n{message}"
    );
    assert!(
        !message.trim().is_empty(),
        "the refusal must say why on stderr"
    );

    // The first daemon keeps its socket and keeps serving.
    assert!(
        is_socket(&first.socket),
        "the refused daemon removed the live socket"
    );
    assert_serves(&first.socket);
    assert_eq!(first.terminate().code(), Some(0));
}

#[test]
fn socket_group_option_sets_the_socket_group() {
    const NAME: &str = "socket_group_option_sets_the_socket_group";
    if !is_root() {
        return skip(NAME, "needs root to give the socket to another group");
    }
    let Some(group) = ["nogroup", "daemon", "users"]
        .into_iter()
        .find_map(|name| nix::unistd::Group::from_name(name).ok().flatten())
    else {
        return skip(NAME, "no nogroup/daemon/users group on this host");
    };
    let dir = tempdir();
    let mut daemon = Daemon::start(dir.path(), &["--socket-group", group.name.as_str()], &[]);
    let meta = std::fs::metadata(&daemon.socket).expect("socket exists");
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&meta),
        group.gid.as_raw(),
        "socket group should be {}",
        group.name
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(daemon.terminate().code(), Some(0));
}

// ---------------------------------------------------------------------------------------------------------
// systemd socket activation and sd_notify
// ---------------------------------------------------------------------------------------------------------

#[test]
fn socket_activation_and_ready_notification() {
    const NAME: &str = "socket_activation_and_ready_notification";
    let Some(activate) = find_tool("systemd-socket-activate") else {
        return skip(
            NAME,
            "systemd-socket-activate is not installed (package systemd)",
        );
    };
    let dir = tempdir();
    let socket = dir.path().join("activated.sock");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("notify timeout");

    let mut cmd = Command::new(activate);
    for var in INHERITED_ENV {
        cmd.env_remove(var);
    }
    cmd.arg("-l")
        .arg(&socket)
        .arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify_path.display()))
        .arg(bin())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--admin-addr")
        .arg(free_admin_addr());
    let mut daemon = Daemon::spawn(cmd, &socket);

    // systemd-socket-activate execs the daemon on the first connection.
    let deadline = Instant::now() + START_TIMEOUT;
    while !is_socket(&socket) {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate never listened"
        );
        thread::sleep(Duration::from_millis(20));
    }
    daemon.wait_ready();

    let mut messages = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !messages.lines().any(|l| l == "READY=1") && Instant::now() < deadline {
        if let Ok(n) = notify.recv(&mut buf) {
            messages.push_str(&String::from_utf8_lossy(&buf[..n]));
            messages.push('\n');
        }
    }
    assert!(
        messages.lines().any(|l| l == "READY=1"),
        "no READY=1 on NOTIFY_SOCKET; got {messages:?}\nstderr:\n{}",
        daemon.stderr()
    );

    let status = daemon.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "stderr:\n{}",
        daemon.stderr_after_exit()
    );
    // STOPPING=1 should have been sent on the way out.
    while let Ok(n) = notify.recv(&mut buf) {
        messages.push_str(&String::from_utf8_lossy(&buf[..n]));
        messages.push('\n');
    }
    assert!(
        messages.lines().any(|l| l == "STOPPING=1"),
        "no STOPPING=1 on NOTIFY_SOCKET; got {messages:?}"
    );
    // An inherited socket belongs to whoever passed it: the daemon must not unlink it.
    assert!(
        is_socket(&socket),
        "the daemon unlinked a socket it was given"
    );
}

/// Reads datagrams from `notify` until `done` says the collected messages are enough, or `timeout`.
fn collect_notifications(
    notify: &UnixDatagram,
    messages: &mut Vec<String>,
    timeout: Duration,
    done: impl Fn(&[String]) -> bool,
) {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + timeout;
    while !done(messages) && Instant::now() < deadline {
        if let Ok(n) = notify.recv(&mut buf) {
            let datagram = String::from_utf8_lossy(&buf[..n]);
            messages.extend(datagram.lines().map(str::to_string));
        }
    }
}

#[test]
fn notify_status_and_watchdog_pings() {
    let dir = tempdir();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("notify timeout");
    // systemd sets WATCHDOG_PID to the service's main pid along with WATCHDOG_USEC; `sh` exports its own
    // pid, which the daemon inherits through exec. 400 ms: pings should come every 200 ms or so.
    let socket = dir.path().join("run").join("proxy.sock");
    let mut cmd = Command::new("sh");
    for var in INHERITED_ENV {
        cmd.env_remove(var);
    }
    cmd.arg("-c")
        .arg(r#"WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$0" "$@""#)
        .arg(bin())
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--admin-addr")
        .arg(free_admin_addr())
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "400000");
    let mut daemon = Daemon::spawn(cmd, &socket);
    daemon.wait_ready();

    let mut messages = Vec::new();
    let count = |m: &[String], want: &str| m.iter().filter(|l| l.as_str() == want).count();
    collect_notifications(&notify, &mut messages, Duration::from_secs(5), |m| {
        count(m, "READY=1") > 0
            && count(m, "WATCHDOG=1") >= 3
            && m.iter().any(|l| l.starts_with("STATUS="))
    });
    assert_eq!(
        count(&messages, "READY=1"),
        1,
        "READY=1 exactly once: {messages:?}"
    );
    assert!(
        count(&messages, "WATCHDOG=1") >= 3,
        "expected regular WATCHDOG=1 pings with WATCHDOG_USEC=400000 within 5 s: {messages:?}"
    );
    assert!(
        messages.iter().any(|l| l.starts_with("STATUS=")),
        "no STATUS= message: {messages:?}"
    );

    assert_eq!(daemon.terminate().code(), Some(0));
    collect_notifications(&notify, &mut messages, Duration::from_secs(2), |m| {
        m.iter().any(|l| l == "STOPPING=1")
    });
    assert!(
        messages.iter().any(|l| l == "STOPPING=1"),
        "no STOPPING=1: {messages:?}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// JSON-RPC error paths and limits
// ---------------------------------------------------------------------------------------------------------

#[test]
fn jsonrpc_error_paths() {
    let dir = tempdir();
    let mut daemon = Daemon::start(dir.path(), &[], &[]);
    let sock = daemon.socket.clone();

    // -32700: not JSON at all.
    let reply = rpc_raw(
        &sock,
        r#"{"jsonrpc": "2.0", "method": "proxy.version", "id": 1"#,
    );
    assert_eq!(error_code(&reply), -32700, "parse error: {reply}");
    assert!(reply["id"].is_null(), "a parse error has id null: {reply}");

    // -32600: JSON, but not a request (no method).
    let reply = rpc_raw(&sock, r#"{"jsonrpc": "2.0", "id": 2}"#);
    assert_eq!(error_code(&reply), -32600, "invalid request: {reply}");

    // -32600: an empty batch.
    let reply = rpc_raw(&sock, "[]");
    assert_eq!(error_code(&reply), -32600, "empty batch: {reply}");

    // -32601: unknown method, with the request's id echoed.
    let reply = rpc(&sock, &request(3, "no.such.method")).expect("unknown method");
    assert_eq!(error_code(&reply), -32601, "unknown method: {reply}");
    assert_eq!(reply["id"], 3, "{reply}");

    // -32602: params of the wrong shape.
    let reply = rpc(
        &sock,
        &json!({"jsonrpc": "2.0", "id": 4, "method": "vm.info", "params": {"nope": true}}),
    )
    .expect("invalid params");
    assert_eq!(error_code(&reply), -32602, "invalid params: {reply}");
    let reply = rpc(
        &sock,
        &json!({"jsonrpc": "2.0", "id": 5, "method": "vm.register", "params": "not an object"}),
    )
    .expect("invalid params");
    assert_eq!(error_code(&reply), -32602, "invalid params: {reply}");

    // A batch mixing a valid call, an unknown method and an invalid request: one answer each.
    let batch = json!([
        request(10, "proxy.version"),
        request(11, "no.such.method"),
        {"jsonrpc": "2.0", "id": 12, "method": "vm.info", "params": {"nope": true}},
        {"foo": "bar"},
    ]);
    let reply = rpc(&sock, &batch).expect("batch");
    let answers = reply
        .as_array()
        .unwrap_or_else(|| panic!("batch reply is not an array: {reply}"));
    assert_eq!(answers.len(), 4, "one answer per batch entry: {reply}");
    let by_id = |id: u64| {
        answers
            .iter()
            .find(|a| a["id"] == id)
            .unwrap_or_else(|| panic!("no answer with id {id}: {reply}"))
    };
    assert!(by_id(10).pointer("/result/version").is_some(), "{reply}");
    assert_eq!(error_code(by_id(11)), -32601, "{reply}");
    assert_eq!(error_code(by_id(12)), -32602, "{reply}");
    let invalid = answers
        .iter()
        .find(|a| a["id"].is_null())
        .unwrap_or_else(|| panic!("no answer for the invalid entry: {reply}"));
    assert_eq!(error_code(invalid), -32600, "{reply}");

    // None of this disturbed the daemon.
    assert_serves(&sock);
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// Ids jsonrpsee cannot hold (issue 16): a 500,000-digit id, negative, fractional, too large, objects. They were
/// answered HTTP 200 with a body `null` (taken for notifications); now each gets -32600 with id null, and the
/// id is not echoed.
#[test]
fn requests_with_unanswerable_ids_get_an_invalid_request_error() {
    let dir = tempdir();
    let mut daemon = Daemon::start(dir.path(), &[], &[]);
    let sock = daemon.socket.clone();
    let call = |id: &str| format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"proxy.version"}}"#);

    let huge = "9".repeat(500_000);
    let response = http_post(&sock, call(&huge).as_bytes()).expect("an answer");
    assert_eq!(response.status, 200);
    assert!(
        response.body.len() < 1000,
        "the id must not be echoed: {} bytes",
        response.body.len()
    );
    let reply = response.json().expect("a JSON body");
    assert_eq!(error_code(&reply), -32600, "{reply}");
    assert!(reply["id"].is_null(), "{reply}");

    for id in ["-1", "1.5", "18446744073709551616", "{}", "[1]", "true"] {
        let reply = rpc_raw(&sock, &call(id));
        assert_eq!(error_code(&reply), -32600, "id {id}: {reply}");
        assert!(reply["id"].is_null(), "id {id}: {reply}");
    }

    // In a batch only the entry with the bad id fails; the others are answered as usual.
    let batch = format!("[{},{},{}]", call("1"), call(&huge), call("\"two\""));
    let reply = rpc_raw(&sock, &batch);
    let answers = reply
        .as_array()
        .unwrap_or_else(|| panic!("batch reply is not an array: {reply}"));
    assert_eq!(answers.len(), 3, "{reply}");
    assert!(answers
        .iter()
        .any(|a| a["id"] == 1 && a.pointer("/result/version").is_some()));
    assert!(answers
        .iter()
        .any(|a| a["id"] == "two" && a.pointer("/result/version").is_some()));
    assert!(answers
        .iter()
        .any(|a| a["id"].is_null() && error_code(a) == -32600));

    // Ids the daemon can hold still work, notifications still get no answer.
    let reply = rpc_raw(&sock, &call("18446744073709551615"));
    assert_eq!(reply["id"], 18446744073709551615u64, "{reply}");
    let response = http_post(&sock, br#"{"jsonrpc":"2.0","method":"proxy.version"}"#)
        .expect("a notification is acknowledged");
    assert_eq!(response.status, 200);
    assert_serves(&sock);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn oversized_request_is_rejected_and_daemon_keeps_serving() {
    let dir = tempdir();
    let mut daemon = Daemon::start(dir.path(), &[], &[]);

    let filler = "x".repeat(MAX_REQUEST + MAX_REQUEST / 2);
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "proxy.version", "params": [filler]})
        .to_string();
    let response =
        http_post(&daemon.socket, body.as_bytes()).expect("an answer to an oversized request");
    let rejected_by_http = response.status == 413;
    let rejected_by_rpc = response
        .json()
        .ok()
        .and_then(|v| v.pointer("/error/code").and_then(Value::as_i64))
        .is_some();
    assert!(
        rejected_by_http || rejected_by_rpc,
        "oversized request not rejected: HTTP {} content-type {:?} body {:?}",
        response.status,
        response.header("content-type"),
        String::from_utf8_lossy(&response.body[..response.body.len().min(300)])
    );
    assert!(
        !response.body.is_empty() || response.status == 413,
        "the rejection should say why"
    );

    // A request just under the limit still works, and the daemon still serves afterwards.
    let filler = "y".repeat(MAX_REQUEST / 2);
    let reply = rpc(
        &daemon.socket,
        &json!({"jsonrpc": "2.0", "id": 2, "method": "no.such.method", "params": [filler]}),
    )
    .expect("a large but allowed request");
    assert_eq!(error_code(&reply), -32601, "{reply}");
    assert_serves(&daemon.socket);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn curl_over_the_unix_socket() {
    const NAME: &str = "curl_over_the_unix_socket";
    let Some(curl) = find_tool("curl") else {
        return skip(NAME, "curl is not installed");
    };
    let dir = tempdir();
    let mut daemon = Daemon::start(dir.path(), &[], &[]);
    let out = Command::new(curl)
        .args(["-sS", "--max-time", "15", "--unix-socket"])
        .arg(&daemon.socket)
        .args(["-H", "content-type: application/json", "-d"])
        .arg(r#"{"jsonrpc":"2.0","id":1,"method":"proxy.version"}"#)
        .arg("http://localhost/")
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "curl output is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert!(reply.pointer("/result/version").is_some(), "{reply}");
    assert!(reply.pointer("/result/api_version").is_some(), "{reply}");
    assert!(reply.pointer("/result/features").is_some(), "{reply}");
    assert_eq!(daemon.terminate().code(), Some(0));
}

// ---------------------------------------------------------------------------------------------------------
// CLI and logging
// ---------------------------------------------------------------------------------------------------------

/// Starts a daemon with `args`/`env`, stops it, and returns everything it wrote to stderr.
fn stderr_of_a_run(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempdir();
    let mut daemon = Daemon::start(dir.path(), args, env);
    let status = daemon.terminate();
    let stderr = daemon.stderr_after_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "args {args:?} env {env:?}\nstderr:\n{stderr}"
    );
    stderr
}

fn has_listening_line(stderr: &str) -> bool {
    stderr.lines().any(|l| l.contains("listening"))
}

/// Runs a daemon and checks whether its info-level "listening" startup line reached stderr.
fn check_listening_line(args: &[&str], env: &[(&str, &str)], expected: bool) {
    let stderr = stderr_of_a_run(args, env);
    assert_eq!(
        has_listening_line(&stderr),
        expected,
        "args {args:?} env {env:?}: the info-level \"listening\" line should {}appear\nstderr:\n{stderr}",
        if expected { "" } else { "not " }
    );
}

#[test]
fn log_level_from_flag() {
    check_listening_line(&["--log", "info"], &[], true);
    check_listening_line(&["--log", "error"], &[], false);
}

#[test]
fn log_level_from_environment() {
    check_listening_line(&[], &[("CC_PROXY_LOG_LEVEL", "info")], true);
    check_listening_line(&[], &[("CC_PROXY_LOG_LEVEL", "error")], false);
}

#[test]
fn log_level_flag_wins_over_environment() {
    check_listening_line(
        &["--log", "error"],
        &[("CC_PROXY_LOG_LEVEL", "info")],
        false,
    );
    check_listening_line(&["--log", "info"], &[("CC_PROXY_LOG_LEVEL", "error")], true);
}

#[test]
fn log_level_defaults_to_warn() {
    check_listening_line(&[], &[], false);
}

#[test]
fn log_target_auto_ignores_a_journal_stream_that_is_not_stderr() {
    // JOURNAL_STREAM names the journal's stream as "device:inode"; it only counts when it is stderr's.
    // Here stderr is a pipe to the test, so logs must stay on stderr.
    check_listening_line(&["--log", "info"], &[("JOURNAL_STREAM", "0:0")], true);
}

#[test]
fn log_target_stderr_wins_over_journal_stream() {
    // stderr really is the stream JOURNAL_STREAM names, but the flag says stderr: text on stderr.
    let dir = tempdir();
    let socket = dir.path().join("run").join("proxy.sock");
    let mut cmd = daemon_command(dir.path());
    cmd.arg("--socket")
        .arg(&socket)
        .args(["--log", "info", "--log-target", "stderr"]);
    let mut daemon = Daemon::spawn_with_stderr_as_journal_stream(cmd, &socket);
    daemon.wait_ready();
    assert_eq!(daemon.terminate().code(), Some(0));
    let stderr = daemon.stderr_after_exit();
    assert!(
        has_listening_line(&stderr),
        "--log-target stderr with a matching JOURNAL_STREAM: no \"listening\" line on stderr:\n{stderr}"
    );
}

#[test]
fn json_log_format_writes_json_lines() {
    let stderr = stderr_of_a_run(&["--log", "info", "--log-format", "json"], &[]);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log output at info");
    for line in &lines {
        let parsed: Result<Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "not a JSON log line: {line:?}");
    }
    assert!(
        has_listening_line(&stderr),
        "no \"listening\" line:\n{stderr}"
    );
}

/// Runs the binary expecting a usage error; returns (exit code, stderr).
fn run_expecting_failure(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempdir();
    let socket = dir.path().join("run").join("proxy.sock");
    let mut cmd = daemon_command(dir.path());
    cmd.arg("--socket").arg(&socket).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut daemon = Daemon::spawn(cmd, &socket);
    let status = daemon.wait_exit(EXIT_TIMEOUT);
    let stderr = daemon.stderr_after_exit();
    (status.and_then(|s| s.code()), stderr)
}

fn assert_one_line_naming(stderr: &str, needle: &str, what: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected a one-line error, got:\n{stderr}"
    );
    assert!(
        lines[0].contains(needle),
        "{what}: the error should name {needle:?}: {stderr}"
    );
}

#[test]
fn invalid_log_level_flag_exits_2_with_one_line() {
    let (code, stderr) = run_expecting_failure(&["--log", "foo"], &[]);
    assert_eq!(code, Some(2), "--log foo\nstderr:\n{stderr}");
    assert_one_line_naming(&stderr, "foo", "--log foo");
}

#[test]
fn invalid_log_level_env_exits_2_with_one_line() {
    let (code, stderr) = run_expecting_failure(&[], &[("CC_PROXY_LOG_LEVEL", "loud")]);
    assert_eq!(code, Some(2), "CC_PROXY_LOG_LEVEL=loud\nstderr:\n{stderr}");
    assert_one_line_naming(&stderr, "loud", "CC_PROXY_LOG_LEVEL=loud");
}

#[test]
fn unknown_option_exits_2_with_one_line() {
    let (code, stderr) = run_expecting_failure(&["--frobnicate"], &[]);
    assert_eq!(code, Some(2), "--frobnicate\nstderr:\n{stderr}");
    assert_one_line_naming(&stderr, "frobnicate", "--frobnicate");
}

/// Runs the daemon with a clean environment and exactly `args` (plus `--socket`), expecting it to exit on
/// its own; returns (exit code, stderr, whether the socket file exists afterwards).
fn run_bare(
    dir: &Path,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> (Option<i32>, String, bool) {
    let socket = dir.join("run").join("proxy.sock");
    let mut cmd = Command::new(bin());
    for var in INHERITED_ENV {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.arg("--socket").arg(&socket).args(args);
    let mut daemon = Daemon::spawn(cmd, &socket);
    let status = daemon.wait_exit(EXIT_TIMEOUT);
    let stderr = daemon.stderr_after_exit();
    (status.and_then(|s| s.code()), stderr, socket.exists())
}

#[test]
fn invalid_admin_addr_exits_2_with_one_line_before_binding_anything() {
    let dir = tempdir();
    let state = dir.path().join("state");
    let args = [
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--admin-addr".as_ref(),
        "nonsense".as_ref(),
    ];
    let (code, stderr, socket) = run_bare(dir.path(), &args, &[]);
    assert_eq!(code, Some(2), "--admin-addr nonsense\nstderr:\n{stderr}");
    assert_one_line_naming(
        &stderr,
        "--admin-addr \"nonsense\"",
        "--admin-addr nonsense",
    );
    assert!(
        !socket,
        "a configuration error must not leave a socket behind"
    );
}

#[test]
fn every_configuration_error_is_reported_together() {
    let dir = tempdir();
    let state = dir.path().join("state");
    let args = [
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--admin-addr".as_ref(),
        "127.0.0.1".as_ref(),
    ];
    let (code, stderr, _) = run_bare(dir.path(), &args, &[("CC_PROXY_LOG_LEVEL", "loud")]);
    assert_eq!(code, Some(2), "stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 2, "one line per error:\n{stderr}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("CC_PROXY_LOG_LEVEL") && l.contains("loud")),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("--admin-addr") && l.contains("127.0.0.1")),
        "{stderr}"
    );
}

#[test]
fn unusable_state_dir_exits_1_naming_it() {
    let dir = tempdir();
    // A regular file where the directory should be.
    let state = dir.path().join("state-is-a-file");
    std::fs::write(&state, b"not a directory").expect("create a file");
    let admin = free_admin_addr();
    let args = [
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--admin-addr".as_ref(),
        admin.as_ref(),
    ];
    let (code, stderr, socket) = run_bare(dir.path(), &args, &[]);
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("state directory") && stderr.contains("state-is-a-file"),
        "{stderr}"
    );
    assert!(
        !socket,
        "a daemon that cannot keep state must not leave a socket behind"
    );
}

#[test]
fn an_admin_address_in_use_exits_1_naming_it() {
    let dir = tempdir();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    let addr = taken.local_addr().expect("local addr").to_string();
    let state = dir.path().join("state");
    let args = [
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--admin-addr".as_ref(),
        addr.as_ref(),
    ];
    let (code, stderr, socket) = run_bare(dir.path(), &args, &[]);
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("--admin-addr") && stderr.contains(&addr),
        "{stderr}"
    );
    assert!(!socket);
    drop(taken);
}

#[test]
fn version_and_help() {
    let out = Command::new(bin())
        .arg("--version")
        .output()
        .expect("run --version");
    assert!(out.status.success(), "--version: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(env!("CARGO_PKG_VERSION")),
        "--version should print {}: {text:?}",
        env!("CARGO_PKG_VERSION")
    );
    let out = Command::new(bin())
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success(), "--help: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--socket",
        "--log",
        "--log-format",
        "--log-target",
        "--state-dir",
        "--admin-addr",
    ] {
        assert!(
            text.contains(option),
            "--help does not mention {option}:\n{text}"
        );
    }
}

/// Starts a private systemd-journald (in its own mount namespace, so the host's journal is untouched), runs
/// the daemon with `--log-target journald`, and reads its entries back with `journalctl`.
#[test]
fn journald_output_read_back_with_journalctl() {
    const NAME: &str = "journald_output_read_back_with_journalctl";
    if !is_root() {
        return skip(NAME, "needs root to run a private systemd-journald");
    }
    let (Some(unshare), Some(journald), Some(_journalctl)) = (
        find_tool("unshare"),
        find_tool("/lib/systemd/systemd-journald"),
        find_tool("journalctl"),
    ) else {
        return skip(
            NAME,
            "unshare, /lib/systemd/systemd-journald or journalctl is missing",
        );
    };
    let machine_id = match std::fs::read_to_string("/etc/machine-id") {
        Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
        _ => {
            return skip(
                NAME,
                "/etc/machine-id is missing; journald cannot name its journal",
            )
        }
    };

    let dir = tempdir();
    let socket = dir.path().join("journald-test.sock");
    let done = dir.path().join("done");
    let journal_json = dir.path().join("journal.json");
    // Private tmpfs over journald's runtime and storage directories, then journald, then the daemon.
    // The test (outside the namespace) talks to the daemon's socket, then creates `done`.
    let script = r#"
set -u
bin="$1"; dir="$2"; journald="$3"; machine_id="$4"; admin="$5"
mkdir -p /run/systemd/journal /run/log/journal || exit 90
mount -t tmpfs -o mode=0755 tmpfs /run/systemd/journal || exit 90
mount -t tmpfs -o mode=0755 tmpfs /run/log/journal || exit 90
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal || exit 90; fi
"$journald" 2>"$dir/journald.err" &
jpid=$!
for _ in $(seq 200); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
[ -S /run/systemd/journal/socket ] || { kill "$jpid"; exit 91; }
env -u JOURNAL_STREAM -u CC_PROXY_LOG_LEVEL "$bin" --socket "$dir/journald-test.sock" \
    --state-dir "$dir/state" --admin-addr "$admin" --log debug --log-target journald \
    2>"$dir/daemon.err" &
dpid=$!
for _ in $(seq 600); do [ -e "$dir/done" ] && break; kill -0 "$dpid" 2>/dev/null || break; sleep 0.05; done
kill -TERM "$dpid" 2>/dev/null
wait "$dpid"; status=$?
sleep 0.3
journalctl --no-pager -D "/run/log/journal/$machine_id" -o json >"$dir/journal.json" 2>"$dir/journalctl.err"
kill "$jpid"; wait "$jpid"
exit "$status"
"#;
    let mut cmd = Command::new(unshare);
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "bash",
        "-c",
        script,
        "journald-test",
    ])
    .arg(bin())
    .arg(dir.path())
    .arg(journald)
    .arg(&machine_id)
    .arg(free_admin_addr());
    let mut run = Daemon::spawn(cmd, &socket);

    let deadline = Instant::now() + START_TIMEOUT;
    let mut served = false;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = run.child.try_wait() {
            run.status = Some(status);
            break;
        }
        if rpc(&socket, &request(1, "proxy.health")).is_ok_and(|r| r.get("result").is_some()) {
            served = true;
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&done, b"").expect("signal the script");
    let status = run.wait_exit(EXIT_TIMEOUT + START_TIMEOUT);
    let script_err = run.stderr_after_exit();
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    match status.and_then(|s| s.code()) {
        Some(90) => return skip(NAME, &format!("cannot mount a private tmpfs: {script_err}")),
        Some(91) => {
            return skip(
                NAME,
                &format!("systemd-journald did not start: {}", read("journald.err")),
            )
        }
        _ => {}
    }
    assert!(
        served,
        "daemon never served under journald\ndaemon stderr:\n{}",
        read("daemon.err")
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "daemon exit under journald\nscript stderr:\n{script_err}\ndaemon stderr:\n{}",
        read("daemon.err")
    );

    let entries: Vec<Value> = std::fs::read_to_string(&journal_json)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let ours: Vec<&Value> = entries
        .iter()
        .filter(|e| {
            e["SYSLOG_IDENTIFIER"]
                .as_str()
                .is_some_and(|s| s.contains("cc-proxy"))
                || e["_COMM"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("cc-proxy"))
        })
        .collect();
    assert!(
        !ours.is_empty(),
        "no journal entries from cc-proxy ({} entries in all; journalctl: {})",
        entries.len(),
        read("journalctl.err")
    );
    let listening = ours
        .iter()
        .find(|e| {
            e["MESSAGE"]
                .as_str()
                .is_some_and(|m| m.contains("listening"))
        })
        .unwrap_or_else(|| panic!("no \"listening\" entry among {ours:?}"));
    // tracing levels map to syslog priorities: info is "informational" (6), so `journalctl -p info` shows
    // it, and debug is "debug" (7), so the same filter hides the raw I/O dumps.
    let priority = listening["PRIORITY"]
        .as_str()
        .and_then(|p| p.parse::<u8>().ok());
    assert!(
        matches!(priority, Some(5 | 6)),
        "info entry with priority {priority:?}: {listening}"
    );
    assert_eq!(priority, Some(6), "info entry: {listening}");
    let connected = ours
        .iter()
        .find(|e| e["MESSAGE"].as_str() == Some("client connected"))
        .unwrap_or_else(|| panic!("no debug \"client connected\" entry among {ours:?}"));
    assert_eq!(connected["PRIORITY"], "7", "debug entry: {connected}");
    // Who the client is, as fields that can be typed in a filter: `journalctl CLIENT_PID=<pid>`.
    assert_eq!(
        connected["CLIENT_PID"],
        std::process::id().to_string(),
        "{connected}"
    );
    assert_eq!(connected["CLIENT_UID"], "0", "{connected}");
    assert_eq!(connected["CLIENT_GID"], "0", "{connected}");
    assert!(
        connected["CLIENT"]
            .as_str()
            .is_some_and(|c| c.parse::<u64>().is_ok()),
        "CLIENT is the connection number: {connected}"
    );
    // Structured fields must be journal fields of their own under the documented names, so that
    // `journalctl -u cc-proxy CLIENT=...` and `VM=...` work (not prefixed, e.g. `F_CLIENT`). The health
    // request above was a client connection, which the daemon logs at debug with its CLIENT field.
    let mut field_names: Vec<&str> = ours
        .iter()
        .filter_map(|e| e.as_object())
        .flat_map(|e| e.keys().map(String::as_str))
        .filter(|k| !k.starts_with('_'))
        .collect();
    field_names.sort_unstable();
    field_names.dedup();
    assert!(
        ours.iter().any(|e| e.get("CLIENT").is_some()),
        "no journal entry carries a CLIENT field; field names seen: {field_names:?}"
    );
    assert!(
        !read("daemon.err").contains("listening"),
        "with --log-target journald the startup line should not also go to stderr"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Shipped operations files
// ---------------------------------------------------------------------------------------------------------

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `make install-units` into a DESTDIR (with the test binary standing in for the installed one), then
/// `systemd-analyze verify --root` on both units.
#[test]
fn systemd_units_verify_after_install() {
    const NAME: &str = "systemd_units_verify_after_install";
    let (Some(analyze), Some(make)) = (find_tool("systemd-analyze"), find_tool("make")) else {
        return skip(NAME, "systemd-analyze or make is not installed");
    };
    let dest = tempdir();
    let out = Command::new(make)
        .current_dir(repo_root())
        .args(["-s", "install-units"])
        .arg(format!("DESTDIR={}", dest.path().display()))
        .arg("PREFIX=/usr/local")
        .output()
        .expect("run make install-units");
    assert!(
        out.status.success(),
        "make install-units: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit_dir = dest.path().join("etc/systemd/system");
    let service = unit_dir.join("cc-proxy.service");
    let socket = unit_dir.join("cc-proxy.socket");
    let service_text = std::fs::read_to_string(&service).expect("installed service");
    let socket_text = std::fs::read_to_string(&socket).expect("installed socket unit");
    for text in [&service_text, &socket_text] {
        assert!(
            !text.contains("@BINDIR@") && !text.contains("@DOCDIR@"),
            "unsubstituted @...@ in an installed unit:\n{text}"
        );
    }
    assert!(
        service_text.contains("ExecStart=/usr/local/bin/cc-proxy"),
        "{service_text}"
    );
    assert!(socket_text.contains("ListenStream=/run/cc-oci-runtime/proxy.sock"));

    // What `make install-bin` would put there, without a release build.
    let bin_dir = dest.path().join("usr/local/bin");
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    std::fs::copy(bin(), bin_dir.join("cc-proxy")).expect("copy the binary");
    // verify --root resolves dependencies (sockets.target, sysinit.target...) inside the root.
    let system_units = dest.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&system_units).expect("system unit dir");
    for host_dir in ["/lib/systemd/system", "/usr/lib/systemd/system"] {
        let Ok(entries) = std::fs::read_dir(host_dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name_text = name.to_string_lossy();
            if name_text.ends_with(".target") || name_text.ends_with(".slice") {
                let _ = std::fs::copy(entry.path(), system_units.join(&name));
            }
        }
    }

    let out = Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", dest.path().display()))
        .arg(&socket)
        .arg(&service)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("run systemd-analyze verify");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{report}"
    );
    assert!(
        !report.contains("cc-proxy"),
        "systemd-analyze verify complained about our units:\n{report}"
    );
}

/// Builds the SELinux module from a copy of `selinux/` with the reference policy's development Makefile.
#[test]
fn selinux_module_builds() {
    const NAME: &str = "selinux_module_builds";
    let devel = Path::new("/usr/share/selinux/devel/Makefile");
    let Some(make) = find_tool("make") else {
        return skip(NAME, "make is not installed");
    };
    if !devel.is_file() {
        return skip(NAME, "selinux-policy-dev is not installed");
    }
    let work = tempdir();
    for file in ["cc-proxy.te", "cc-proxy.fc", "cc-proxy.if"] {
        std::fs::copy(
            repo_root().join("selinux").join(file),
            work.path().join(file),
        )
        .unwrap_or_else(|e| panic!("copy selinux/{file}: {e}"));
    }
    let out = Command::new(make)
        .current_dir(work.path())
        .arg("-f")
        .arg(devel)
        .arg("cc-proxy.pp")
        .output()
        .expect("run the SELinux devel Makefile");
    assert!(
        out.status.success(),
        "building cc-proxy.pp failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let pp = std::fs::metadata(work.path().join("cc-proxy.pp")).expect("cc-proxy.pp exists");
    assert!(pp.len() > 0, "empty policy package");
}
