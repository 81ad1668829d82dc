//! End-to-end tests against a real Linux guest: QEMU (TCG) boots the Debian 6.1 cloud kernel with an initramfs
//! whose `/init` becomes `cc-test-agent`, and the real `cc-proxy` binary reaches that agent over hybrid vsock
//! (vhost-device-vsock) or over QEMU virtio-serial sockets.
//!
//! The guest artifacts come from `tests/vm/prepare.sh`; `tests/vm/run.sh` (`make vm-test`) prepares them and runs
//! these tests with `CC_PROXY_VM_DIR` pointing at them. Without that variable every test here returns at once
//! (the VM tests are opt-in: they need QEMU and take a minute). Each test boots ONE VM through
//! `tests/vm/boot.sh` and runs all its checks against it, ending with the check that powers the guest off.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Environment variable naming the directory prepared by `tests/vm/prepare.sh`.
const VM_DIR_ENV: &str = "CC_PROXY_VM_DIR";
/// Boot under TCG takes ~2 s idle and ~15 s with both cores busy; leave room for a loaded CI machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bound for one short command run through `cc-proxy exec` in the guest.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for the 10 MiB transfer (TCG guest, both cores possibly busy).
const BULK_TIMEOUT: Duration = Duration::from_secs(240);
/// Size of the one-way bulk transfer through stdout.
const BULK_BYTES: usize = 10 * 1024 * 1024;

/// What `prepare.sh` wrote into `artifacts.env`.
struct Artifacts {
    /// The `artifacts.env` file itself, handed to boot.sh.
    env_file: PathBuf,
    /// `uname -r` of the guest kernel.
    kernel_release: String,
}

impl Artifacts {
    /// `None` when the VM tests are not enabled; panics when they are but the artifacts are unusable.
    fn from_env() -> Option<Artifacts> {
        let Some(dir) = std::env::var_os(VM_DIR_ENV) else {
            eprintln!("skipped: {VM_DIR_ENV} is not set (run tests/vm/run.sh or `make vm-test`)");
            return None;
        };
        let env_file = PathBuf::from(dir).join("artifacts.env");
        let text = fs::read_to_string(&env_file).unwrap_or_else(|e| {
            panic!(
                "{VM_DIR_ENV} is set but {} is unreadable: {e}",
                env_file.display()
            )
        });
        let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        assert_eq!(
            vars.get("CC_VM_HAS_AGENT").copied(),
            Some("1"),
            "the prepared initramfs has no cc-test-agent (prepared with CC_VM_NO_AGENT=1?)"
        );
        let kernel_release = vars
            .get("CC_VM_KERNEL_RELEASE")
            .map(|s| s.to_string())
            .unwrap_or_else(|| panic!("{} names no CC_VM_KERNEL_RELEASE", env_file.display()));
        Some(Artifacts {
            env_file,
            kernel_release,
        })
    }
}

/// How the guest's agent channels reach the host.
#[derive(Clone, Copy, Debug)]
enum Transport {
    /// Hybrid vsock through vhost-device-vsock: `hvsock://DIR/vm.sock:2718` / `:2719`.
    Vsock,
    /// QEMU virtio-serial ports backed by listening unix sockets: `unix://DIR/ch0.sock` / `ch1.sock`.
    Serial,
}

impl Transport {
    fn as_arg(self) -> &'static str {
        match self {
            Transport::Vsock => "vsock",
            Transport::Serial => "serial",
        }
    }
}

/// Polls `child` until it exits or `timeout` passes; on timeout the child is killed and `None` returned.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Makes `cmd`'s child receive `signal` when the thread that spawned it dies, so a test run killed outright
/// leaves no daemon or VM behind (boot.sh also watches our pid, as a second line).
fn die_with_parent(cmd: &mut Command, signal: Signal) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec; it makes one prctl call, which is
    // async-signal-safe, and touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || nix::sys::prctl::set_pdeathsig(signal).map_err(std::io::Error::from))
    }
}

/// The last `lines` lines of a log file, for failure messages.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One booted guest: `tests/vm/boot.sh` running in the background, owning QEMU (and vhost-device-vsock).
struct Vm {
    boot: Child,
    work: tempfile::TempDir,
    control: String,
    io: String,
    qemu_pid: i32,
}

impl Vm {
    fn boot(art: &Artifacts, transport: Transport, dialect: &str, agent_args: &[&str]) -> Vm {
        // Unix socket paths must stay short: a directory right under /tmp.
        let work = tempfile::Builder::new()
            .prefix("ccvm")
            .tempdir_in("/tmp")
            .expect("create a VM work dir");
        let log = fs::File::create(work.path().join("boot.log")).expect("create boot.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm/boot.sh");
        let mut cmd = Command::new("bash");
        let boot = die_with_parent(&mut cmd, Signal::SIGTERM)
            .arg(script)
            .arg("--workdir")
            .arg(work.path())
            .args(["--transport", transport.as_arg(), "--dialect", dialect])
            .args(if agent_args.is_empty() {
                Vec::new()
            } else {
                vec![
                    "--append".to_string(),
                    format!("ccagent.args={}", agent_args.join(",")),
                ]
            })
            .arg("--artifacts")
            .arg(&art.env_file)
            .args(["--watch-pid", &std::process::id().to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup boot.log"))
            .stderr(log)
            .spawn()
            .expect("spawn tests/vm/boot.sh");
        let mut vm = Vm {
            boot,
            work,
            control: String::new(),
            io: String::new(),
            qemu_pid: 0,
        };
        let ready = vm.work.path().join("ready");
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while !ready.exists() {
            if let Ok(Some(status)) = vm.boot.try_wait() {
                panic!(
                    "boot.sh ended ({status}) before the guest was ready:\n{}\n--- console ---\n{}",
                    tail(&vm.work.path().join("boot.log"), 40),
                    tail(&vm.work.path().join("console.log"), 40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "guest not ready after {BOOT_TIMEOUT:?}:\n{}",
                tail(&vm.work.path().join("console.log"), 40)
            );
            thread::sleep(Duration::from_millis(100));
        }
        let text = fs::read_to_string(&ready).expect("read the ready file");
        for (key, value) in text.lines().filter_map(|l| l.split_once('=')) {
            match key {
                "control" => vm.control = value.to_string(),
                "io" => vm.io = value.to_string(),
                "qemu_pid" => vm.qemu_pid = value.parse().expect("qemu_pid is a number"),
                _ => {}
            }
        }
        assert!(
            vm.qemu_pid > 0 && !vm.control.is_empty() && !vm.io.is_empty(),
            "bad ready file: {text}"
        );
        vm
    }

    /// Pulls the plug: SIGKILL to QEMU, as if the VM crashed. boot.sh then tears down vhost-device-vsock.
    fn kill_qemu(&self) {
        let _ = kill(Pid::from_raw(self.qemu_pid), Signal::SIGKILL);
    }

    fn console(&self) -> PathBuf {
        self.work.path().join("console.log")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- guest console (tail) ---\n{}",
                tail(&self.console(), 30)
            );
            eprintln!(
                "--- boot.log ---\n{}",
                tail(&self.work.path().join("boot.log"), 20)
            );
        }
        let _ = kill(Pid::from_raw(self.boot.id() as i32), Signal::SIGTERM);
        if wait_timeout(&mut self.boot, Duration::from_secs(15)).is_none() {
            // boot.sh was stuck and is now killed: make sure its children go too.
            for file in ["qemu.pid", "vhost.pid"] {
                if let Some(pid) = fs::read_to_string(self.work.path().join(file))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }
}

/// The daemon under test, on a private socket and state dir.
struct Proxy {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

/// Output of one `cc-proxy exec`.
struct ExecOutput {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl ExecOutput {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }
    fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl Proxy {
    fn start() -> Proxy {
        let dir = tempfile::Builder::new()
            .prefix("ccpx")
            .tempdir_in("/tmp")
            .expect("create a daemon dir");
        let socket = dir.path().join("proxy.sock");
        let child = Self::spawn_daemon(dir.path(), &socket, "proxy.log");
        Proxy { child, dir, socket }
    }

    /// Starts `cc-proxy` on `socket` with its state under `dir`, logging to `dir/log_name`, and waits until
    /// the socket accepts connections.
    fn spawn_daemon(dir: &Path, socket: &Path, log_name: &str) -> Child {
        let log_path = dir.join(log_name);
        let log = fs::File::create(&log_path).expect("create the daemon log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cc-proxy"));
        let mut child = die_with_parent(&mut cmd, Signal::SIGKILL)
            .arg("--socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args([
                "--log",
                "debug",
                "--log-target",
                "stderr",
                "--admin-addr",
                "off",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the daemon log"))
            .stderr(log)
            .spawn()
            .expect("spawn cc-proxy");
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("cc-proxy exited ({status}):\n{}", tail(&log_path, 30));
            }
            assert!(Instant::now() < deadline, "cc-proxy socket did not appear");
            thread::sleep(Duration::from_millis(50));
        }
        child
    }

    /// SIGTERM (which must drain and exit 0), then a new daemon on the same socket and state dir.
    fn restart(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let status = wait_timeout(&mut self.child, Duration::from_secs(20))
            .expect("cc-proxy did not exit within 20 s of SIGTERM");
        assert!(status.success(), "cc-proxy exited with {status} on SIGTERM");
        self.child = Self::spawn_daemon(self.dir.path(), &self.socket, "proxy-restarted.log");
    }

    /// One JSON-RPC call over HTTP/1.1 on the daemon's socket: `Ok(result)` or `Err(error object)`.
    fn rpc(&self, method: &str, params: Value) -> Result<Value, Value> {
        let body =
            json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
        let mut stream = UnixStream::connect(&self.socket).expect("connect to the daemon socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("set a read timeout");
        let request = format!(
            "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .expect("send the request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("read the response");
        let text = String::from_utf8_lossy(&raw);
        let (head, payload) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("malformed HTTP response: {text}"));
        let payload = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(payload)
        } else {
            payload.to_string()
        };
        let reply: Value = serde_json::from_str(&payload)
            .unwrap_or_else(|e| panic!("bad JSON-RPC reply ({e}): {payload}"));
        match reply.get("error") {
            Some(err) => Err(err.clone()),
            None => Ok(reply.get("result").cloned().unwrap_or(Value::Null)),
        }
    }

    /// Registers the VM, retrying while the guest agent is not listening yet.
    fn register(&self, id: &str, vm: &Vm) -> Value {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let params = json!({"id": id, "control": vm.control, "io": vm.io, "timeout_ms": 20000});
            match self.rpc("vm.register", params) {
                Ok(result) => return result,
                Err(err) if Instant::now() < deadline => {
                    eprintln!("vm.register {id}: {err}; retrying");
                    thread::sleep(Duration::from_millis(500));
                }
                Err(err) => panic!("vm.register {id} failed: {err}"),
            }
        }
    }

    /// Spawns `cc-proxy exec VM -- ARGS` with piped stdio.
    fn spawn_exec(&self, vm: &str, args: &[&str]) -> Child {
        self.spawn_exec_with(vm, &[], args)
    }

    /// Spawns `cc-proxy exec VM FLAGS -- ARGS` with piped stdio.
    fn spawn_exec_with(&self, vm: &str, flags: &[&str], args: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_cc-proxy"))
            .arg("--socket")
            .arg(&self.socket)
            .args(["exec", vm])
            .args(flags)
            .arg("--")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cc-proxy exec")
    }

    /// Runs `cc-proxy exec VM -- ARGS` with `stdin` as its input, bounded by `timeout`.
    fn exec(&self, vm: &str, args: &[&str], stdin: &[u8], timeout: Duration) -> ExecOutput {
        let mut child = self.spawn_exec(vm, args);
        collect(&mut child, stdin, timeout)
            .unwrap_or_else(|| panic!("cc-proxy exec {args:?} timed out after {timeout:?}"))
    }

    fn vm_state(&self, id: &str) -> String {
        match self.rpc("vm.info", json!({"id": id})) {
            Ok(info) => info
                .get("state")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
            Err(err) => format!("error: {err}"),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if thread::panicking() {
            for log in ["proxy.log", "proxy-restarted.log"] {
                let path = self.dir.path().join(log);
                if path.exists() {
                    eprintln!("--- {log} (tail) ---\n{}", tail(&path, 40));
                }
            }
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            eprintln!("cc-proxy did not exit on SIGTERM within 10 s; killed");
        }
    }
}

/// Decodes an HTTP/1.1 chunked body (enough for a JSON-RPC reply).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Feeds `stdin` (then closes it), reads stdout and stderr to the end on their own threads, and waits for the
/// child, all bounded by `timeout` (the child is killed past it and `None` returned).
fn collect(child: &mut Child, stdin: &[u8], timeout: Duration) -> Option<ExecOutput> {
    let mut input = child.stdin.take().expect("piped stdin");
    let data = stdin.to_vec();
    let writer = thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let status = wait_timeout(child, timeout)?;
    let _ = writer.join();
    Some(ExecOutput {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

fn host_kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The checks every transport must pass, against one registered VM, in order; the last one kills the guest.
/// `agent_args` go to the guest's agent (`--strict`: behave like real hyperstart 1.1).
fn run_checks(art: &Artifacts, transport: Transport, dialect: &str, agent_args: &[&str]) {
    let started = Instant::now();
    let strict = agent_args.contains(&"--strict");
    let vm = Vm::boot(art, transport, dialect, agent_args);
    eprintln!("[{transport:?}] guest ready after {:?}", started.elapsed());
    let mut proxy = Proxy::start();
    let id = format!("vm-{}", transport.as_arg());
    let registered = proxy.register(&id, &vm);
    eprintln!("[{transport:?}] registered: {registered}");
    assert_eq!(
        registered.get("dialect").and_then(Value::as_str),
        Some(dialect),
        "{registered}"
    );
    assert_eq!(proxy.vm_state(&id), "ready");

    // The process runs in the guest: its kernel, not the host's.
    let uname = proxy.exec(&id, &["uname", "-r"], b"", EXEC_TIMEOUT);
    assert_eq!(
        uname.code(),
        Some(0),
        "uname failed: {}",
        uname.stderr_str()
    );
    assert_eq!(uname.stdout_str().trim(), art.kernel_release);
    assert!(
        art.kernel_release.starts_with("6.1.0-"),
        "{}",
        art.kernel_release
    );
    assert_ne!(
        uname.stdout_str().trim(),
        host_kernel_release(),
        "uname ran on the host"
    );

    // stdin reaches the process and its end closes the process's stdin.
    let input = b"hello from the host\nsecond line\n";
    let cat = proxy.exec(&id, &["cat"], input, EXEC_TIMEOUT);
    assert_eq!(cat.code(), Some(0), "cat failed: {}", cat.stderr_str());
    assert_eq!(cat.stdout, input);

    // stdin larger than hyperstart's 4096-byte I/O buffer, and than its 512-byte per-process stdin
    // buffer, arrives whole (a strict agent exits on an oversized packet and drops overflow).
    let wc = proxy.exec(&id, &["wc", "-c"], &[b'z'; 5000], EXEC_TIMEOUT);
    assert_eq!(wc.code(), Some(0), "wc failed: {}", wc.stderr_str());
    assert_eq!(wc.stdout_str().trim(), "5000");
    let big: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    let cat = proxy.exec(&id, &["cat"], &big, EXEC_TIMEOUT);
    assert_eq!(cat.code(), Some(0), "cat failed: {}", cat.stderr_str());
    assert!(
        cat.stdout == big,
        "60 000 bytes of stdin came back as {}",
        cat.stdout.len()
    );

    // stdout and stderr stay apart, and the exit code comes back.
    let mixed = proxy.exec(
        &id,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        b"",
        EXEC_TIMEOUT,
    );
    assert_eq!(mixed.code(), Some(3), "stderr: {}", mixed.stderr_str());
    assert_eq!(mixed.stdout_str(), "out\n");
    assert!(
        mixed.stderr_str().contains("err\n"),
        "stderr: {:?}",
        mixed.stderr_str()
    );
    let ok = proxy.exec(&id, &["true"], b"", EXEC_TIMEOUT);
    assert_eq!(ok.code(), Some(0));

    // A process killed by a signal reports 128 + signal (0 under strict hyperstart, as the real one).
    let killed = proxy.exec(&id, &["sh", "-c", "kill -9 $$"], b"", EXEC_TIMEOUT);
    let want = if strict { 0 } else { 137 };
    assert_eq!(killed.code(), Some(want), "stderr: {}", killed.stderr_str());

    // Unregistered and registered again: back within a second, although hyperstart sends READY
    // once per boot.
    proxy
        .rpc("vm.unregister", json!({"id": id}))
        .expect("vm.unregister");
    let t0 = Instant::now();
    let again = proxy.rpc(
        "vm.register",
        json!({"id": id, "control": vm.control, "io": vm.io, "timeout_ms": 20000}),
    );
    assert!(again.is_ok(), "register after unregister: {again:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "register after unregister took {:?}",
        t0.elapsed()
    );

    // On a terminal: the guest's pty, stderr merged into stdout.
    let mut child =
        proxy.spawn_exec_with(&id, &["--tty"], &["sh", "-c", "tty; echo on-stderr >&2"]);
    let tty = collect(&mut child, b"", EXEC_TIMEOUT).expect("exec --tty timed out");
    assert_eq!(tty.code(), Some(0), "stderr: {}", tty.stderr_str());
    let screen = tty.stdout_str();
    assert!(screen.contains("/dev/pts/"), "tty printed {screen:?}");
    assert!(
        screen.contains("on-stderr"),
        "stderr not merged: {screen:?}"
    );

    // Several processes at once share the VM's one I/O channel without mixing their output.
    let children: Vec<(usize, Child)> = (1..=4usize)
        .map(|n| {
            let script = format!("seq {n} {n} {}", n * 20000);
            (n, proxy.spawn_exec(&id, &["sh", "-c", &script]))
        })
        .collect();
    for (n, mut child) in children {
        let out = collect(&mut child, b"", EXEC_TIMEOUT).expect("parallel exec timed out");
        assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr_str());
        let expected: String = (1..=20000).map(|i| format!("{}\n", i * n)).collect();
        assert!(
            out.stdout_str() == expected,
            "process {n}: output mixed up or cut"
        );
    }

    // A daemon restart keeps the VM: the new daemon reconnects to the live guest from its state dir.
    proxy.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = proxy.rpc("vm.info", json!({"id": id}));
        let ready = info.as_ref().is_ok_and(|i| {
            i.get("state").and_then(Value::as_str) == Some("ready")
                && i.get("recovered").and_then(Value::as_bool) == Some(true)
        });
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "VM not recovered after a restart: {info:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let again = proxy.exec(&id, &["uname", "-r"], b"", EXEC_TIMEOUT);
    assert_eq!(
        again.code(),
        Some(0),
        "after restart: {}",
        again.stderr_str()
    );
    assert_eq!(again.stdout_str().trim(), art.kernel_release);

    // 10 MiB one way through stdout, intact: the guest hashes a random file, then streams it.
    let t = Instant::now();
    let make = format!("head -c {BULK_BYTES} /dev/urandom > /tmp/blob && sha256sum /tmp/blob");
    let made = proxy.exec(&id, &["sh", "-c", &make], b"", EXEC_TIMEOUT);
    assert_eq!(made.code(), Some(0), "stderr: {}", made.stderr_str());
    let guest_sum = made
        .stdout_str()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        guest_sum.len(),
        64,
        "sha256sum printed {:?}",
        made.stdout_str()
    );
    let bulk = proxy.exec(&id, &["cat", "/tmp/blob"], b"", BULK_TIMEOUT);
    assert_eq!(bulk.code(), Some(0), "stderr: {}", bulk.stderr_str());
    assert_eq!(bulk.stdout.len(), BULK_BYTES, "bytes received");
    assert_eq!(
        hex(&Sha256::digest(&bulk.stdout)),
        guest_sum,
        "10 MiB arrived corrupted"
    );
    eprintln!("[{transport:?}] 10 MiB through stdout in {:?}", t.elapsed());

    // Powering the guest off ends a running stream with an error and marks the VM lost.
    let mut sleeper = proxy.spawn_exec(&id, &["sleep", "600"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy
        .rpc("vm.info", json!({"id": id}))
        .ok()
        .and_then(|info| info.get("streams").and_then(Value::as_u64))
        .unwrap_or(0)
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the sleep never showed up as a stream"
        );
        thread::sleep(Duration::from_millis(100));
    }
    match transport {
        // Pull the plug from outside ...
        Transport::Vsock => vm.kill_qemu(),
        // ... or power off from inside (the agent dies with the kernel; QEMU exits).
        Transport::Serial => {
            let mut off = proxy.spawn_exec(&id, &["poweroff", "-f"]);
            let _ = collect(&mut off, b"", EXEC_TIMEOUT);
        }
    }
    let ended = collect(&mut sleeper, b"", Duration::from_secs(60))
        .expect("the stream did not end after power-off");
    assert_ne!(
        ended.code(),
        Some(0),
        "a stream cut by power-off must not look like success"
    );
    assert!(
        !ended.stderr.is_empty(),
        "a stream cut by power-off must say why on stderr"
    );
    eprintln!(
        "[{transport:?}] stream after power-off: {} stderr {:?}",
        ended.status,
        ended.stderr_str()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = proxy.vm_state(&id);
        if state == "lost" {
            let info = proxy.rpc("vm.info", json!({"id": id})).unwrap_or_default();
            let reason = info
                .get("lost_reason")
                .and_then(Value::as_str)
                .unwrap_or("");
            assert!(!reason.is_empty(), "a lost VM names its reason: {info}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "VM state after power-off: {state}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let exec_after = proxy.exec(&id, &["true"], b"", EXEC_TIMEOUT);
    assert_ne!(exec_after.code(), Some(0), "exec on a lost VM must fail");
    eprintln!(
        "[{transport:?}] all checks passed in {:?}",
        started.elapsed()
    );
}

/// Hybrid vsock (vhost-user-vsock + vhost-device-vsock), cc-agent dialect; ends by killing QEMU.
#[test]
fn vsock_guest_end_to_end() {
    if let Some(art) = Artifacts::from_env() {
        run_checks(&art, Transport::Vsock, "cc-agent", &[]);
    }
}

/// virtio-serial ports over unix sockets, hyperstart dialect with the agent as strict as real hyperstart
/// 1.1 on virtio-serial; ends with `poweroff -f` in the guest.
#[test]
fn serial_guest_end_to_end() {
    if let Some(art) = Artifacts::from_env() {
        run_checks(&art, Transport::Serial, "hyperstart", &["--strict"]);
    }
}
