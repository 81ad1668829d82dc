//! The legacy cc-proxy v2 protocol on the shared socket, spoken by a small client written here from the spec
//! (frame level, on purpose independent of the daemon's own codec in `cc_proxy_api::legacy`).

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::common::{eventually, Agent, Env};

// Frame types.
pub(crate) const T_COMMAND: u8 = 0;
const T_RESPONSE: u8 = 1;
const T_STREAM: u8 = 2;
const T_NOTIFY: u8 = 3;
// Commands.
pub(crate) const REGISTER_VM: u8 = 0;
pub(crate) const UNREGISTER_VM: u8 = 1;
pub(crate) const ATTACH_VM: u8 = 2;
pub(crate) const HYPER: u8 = 3;
pub(crate) const CONNECT_SHIM: u8 = 4;
const DISCONNECT_SHIM: u8 = 5;
const SIGNAL: u8 = 6;
// Streams.
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const LOG: u8 = 3;

const WAIT: Duration = Duration::from_secs(20);

/// One received frame.
#[derive(Debug, Clone)]
pub(crate) struct Rx {
    ty: u8,
    pub(crate) error: bool,
    op: u8,
    payload: Vec<u8>,
}

impl Rx {
    pub(crate) fn json(&self) -> Value {
        if self.payload.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("payload is not JSON ({e}): {:?}", self.payload))
    }
    pub(crate) fn msg(&self) -> String {
        assert!(self.error, "expected an error response, got {self:?}");
        self.json()["msg"].as_str().expect("msg").to_string()
    }
}

/// A v2 client connection.
pub(crate) struct V2 {
    s: UnixStream,
    /// Frames read while waiting for a response.
    pending: VecDeque<Rx>,
}

fn header(ty: u8, op: u8, len: usize) -> Vec<u8> {
    let mut h = vec![0, 2, 3, 0, 0, 0, ty, op];
    h.extend_from_slice(&(len as u32).to_be_bytes());
    h
}

impl V2 {
    async fn connect(env: &Env) -> V2 {
        V2::over(UnixStream::connect(&env.socket).await.expect("connect"))
    }

    /// A v2 client on a connection made elsewhere (e.g. as another uid).
    pub(crate) fn over(s: UnixStream) -> V2 {
        V2 {
            s,
            pending: VecDeque::new(),
        }
    }

    async fn raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write");
    }

    async fn send(&mut self, ty: u8, op: u8, payload: &[u8]) {
        let mut b = header(ty, op, payload.len());
        b.extend_from_slice(payload);
        self.raw(&b).await;
    }

    /// Like [`V2::send`], but a failed write is an answer (false) rather than a panic.
    async fn try_send(&mut self, ty: u8, op: u8, payload: &[u8]) -> bool {
        let mut b = header(ty, op, payload.len());
        b.extend_from_slice(payload);
        self.s.write_all(&b).await.is_ok()
    }

    /// Read one frame straight from the socket; `None` on EOF.
    async fn read_wire(&mut self) -> Option<Rx> {
        let mut fixed = [0u8; 12];
        let r = tokio::time::timeout(WAIT, self.s.read_exact(&mut fixed))
            .await
            .expect("timed out waiting for a frame");
        if r.is_err() {
            return None;
        }
        assert_eq!(&fixed[..2], &[0, 2], "version");
        let words = fixed[2] as usize;
        assert!(words >= 3);
        let mut extra = vec![0u8; words * 4 - 12];
        self.s.read_exact(&mut extra).await.expect("header");
        let len = u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]) as usize;
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload).await.expect("payload");
        Some(Rx {
            ty: fixed[6] & 0x0f,
            error: fixed[6] & 0x10 != 0,
            op: fixed[7],
            payload,
        })
    }

    /// The next frame (pending ones first).
    async fn next(&mut self) -> Option<Rx> {
        if let Some(f) = self.pending.pop_front() {
            return Some(f);
        }
        self.read_wire().await
    }

    /// Send a command and wait for its response; other frames are kept for [`V2::next`].
    pub(crate) async fn cmd(&mut self, op: u8, payload: Value) -> Rx {
        let body = if payload.is_null() {
            Vec::new()
        } else {
            payload.to_string().into_bytes()
        };
        self.send(T_COMMAND, op, &body).await;
        loop {
            let f = self
                .read_wire()
                .await
                .unwrap_or_else(|| panic!("EOF instead of the response to command {op}"));
            if f.ty == T_RESPONSE {
                assert_eq!(f.op, op, "response opcode");
                return f;
            }
            self.pending.push_back(f);
        }
    }

    /// True when the daemon closes the connection (EOF or reset) within the wait.
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match tokio::time::timeout(WAIT, self.s.read(&mut b)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Collect stdout, stderr and the exit code until ProcessExited (or EOF: exit `None`).
    async fn collect(&mut self) -> (Vec<u8>, Vec<u8>, Option<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(f) = self.next().await {
            match (f.ty, f.op) {
                (T_STREAM, STDOUT) => out.extend_from_slice(&f.payload),
                (T_STREAM, STDERR) => err.extend_from_slice(&f.payload),
                (T_NOTIFY, 0) => {
                    assert_eq!(f.payload.len(), 1, "ProcessExited carries one byte");
                    return (out, err, Some(f.payload[0]));
                }
                _ => panic!("unexpected frame for a shim: {f:?}"),
            }
        }
        (out, err, None)
    }
}

fn ctl_io(agent: &Agent) -> (String, String) {
    let (c, i) = agent.uris(None);
    (
        c.trim_start_matches("unix://").to_string(),
        i.trim_start_matches("unix://").to_string(),
    )
}

/// RegisterVM with plain socket paths, as Clear Containers runtimes send them. Returns the tokens.
async fn register(c: &mut V2, id: &str, agent: &Agent, streams: u32) -> Vec<String> {
    let (ctl, io) = ctl_io(agent);
    let r = c
        .cmd(
            REGISTER_VM,
            json!({"containerId": id, "ctlSerial": ctl, "ioSerial": io, "numIOStreams": streams}),
        )
        .await;
    assert!(!r.error, "RegisterVM failed: {:?}", r.json());
    tokens_of(&r)
}

fn tokens_of(r: &Rx) -> Vec<String> {
    match &r.json()["io"]["tokens"] {
        Value::Null => Vec::new(),
        Value::Array(a) => a
            .iter()
            .map(|t| t.as_str().expect("token").to_string())
            .collect(),
        other => panic!("tokens: {other}"),
    }
}

async fn hyper(c: &mut V2, name: &str, tokens: &[&str], data: Value) -> Rx {
    c.cmd(
        HYPER,
        json!({"hyperName": name, "tokens": tokens, "data": data}),
    )
    .await
}

async fn shim(env: &Env, token: &str) -> V2 {
    let mut s = V2::connect(env).await;
    let r = s.cmd(CONNECT_SHIM, json!({ "token": token })).await;
    assert!(!r.error, "ConnectShim: {}", r.msg());
    assert!(r.payload.is_empty());
    s
}

fn exec(args: &[&str]) -> Value {
    json!({"container": "hyperstart", "process": {"args": args}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_commands_and_their_response_shapes() {
    let mut env = Env::start().await;
    let agent = env.agent(&["--dialect", "cc-agent", "--pair"]);
    let mut c = V2::connect(&env).await;

    // The exact response header of the spec, and the io object with its capital URL and null tokens.
    let (ctl, io) = ctl_io(&agent);
    let body = json!({"containerId": "vm1", "ctlSerial": ctl, "ioSerial": io});
    c.send(T_COMMAND, REGISTER_VM, body.to_string().as_bytes())
        .await;
    let mut head = [0u8; 12];
    c.s.read_exact(&mut head).await.expect("header");
    assert_eq!(&head[..8], &[0, 2, 3, 0, 0, 0, 1, 0]);
    let len = u32::from_be_bytes([head[8], head[9], head[10], head[11]]) as usize;
    let mut payload = vec![0u8; len];
    c.s.read_exact(&mut payload).await.expect("payload");
    let v: Value = serde_json::from_slice(&payload).expect("json");
    let url = format!("unix://{}", env.socket.display());
    assert_eq!(v, json!({"io": {"URL": url, "tokens": null}}));

    let dup = c.cmd(REGISTER_VM, body.clone()).await;
    assert_eq!(dup.msg(), "vm1: container already registered");

    // AttachVM from another connection allocates 44-character tokens.
    let mut other = V2::connect(&env).await;
    let r = other
        .cmd(ATTACH_VM, json!({"containerId": "vm1", "numIOStreams": 2}))
        .await;
    assert!(!r.error);
    assert_eq!(r.json()["io"]["URL"], url);
    let tokens = tokens_of(&r);
    assert_eq!(tokens.len(), 2);
    assert!(tokens.iter().all(|t| t.len() == 44 && t.ends_with('=')));
    assert_ne!(tokens[0], tokens[1]);
    let r = other
        .cmd(ATTACH_VM, json!({"containerId": "nope", "numIOStreams": 1}))
        .await;
    assert_eq!(r.msg(), "unknown containerID: nope");

    // Hyper: the ACK payload as is (version: 4 bytes), errors for unknown names, and no stale reply slot.
    let r = hyper(&mut c, "version", &[], Value::Null).await;
    assert!(!r.error);
    assert_eq!(r.payload, 4242u32.to_be_bytes());
    let r = hyper(&mut c, "getpod", &[], Value::Null).await;
    assert_eq!(r.msg(), "unknown command 'getpod'");
    let r = hyper(&mut c, "ping", &[], Value::Null).await;
    assert!(!r.error, "the command after an unknown one works");
    assert!(r.payload.is_empty());
    let r = hyper(&mut c, "ping", &[&tokens[0]], Value::Null).await;
    assert!(r.error, "ping takes no token");
    let r = hyper(
        &mut c,
        "execcmd",
        &[&tokens[0], &tokens[1]],
        exec(&["true"]),
    )
    .await;
    assert!(r.error, "two tokens");
    let mut data = exec(&["true"]);
    data["process"]["stdio"] = json!(5);
    let r = hyper(&mut c, "execcmd", &[&tokens[0]], data).await;
    assert!(r.msg().contains("process.stdio"), "{}", r.msg());
    let r = hyper(&mut c, "execcmd", &[&"A".repeat(44)], exec(&["true"])).await;
    assert_eq!(r.msg(), "unknown token");
    // pscontainer exists only in the cc-agent dialect: this agent gets it.
    let r = hyper(&mut c, "pscontainer", &[], json!({"container": "x"})).await;
    assert_eq!(r.op, HYPER);
    // Without a token a start command uses the null session.
    let r = hyper(&mut c, "execcmd", &[], exec(&["echo", "discarded"])).await;
    assert!(!r.error, "null session exec: {:?}", r.json());
    // A client that never registered or attached cannot send Hyper.
    let mut lone = V2::connect(&env).await;
    let r = hyper(&mut lone, "ping", &[], Value::Null).await;
    assert!(r.msg().contains("not attached"), "{}", r.msg());
    // Bad JSON is an error response, not a closed connection.
    lone.send(T_COMMAND, ATTACH_VM, b"{not json").await;
    let r = lone.read_wire().await.expect("response");
    assert!(r.error && r.op == ATTACH_VM);

    // The JSON-RPC API sees the VM with its unix:// URIs.
    let info = env.rpc("vm.info", json!({"id": "vm1"})).await;
    assert_eq!(info["result"]["control"], format!("unix://{ctl}"));
    assert_eq!(info["result"]["dialect"], "cc-agent");

    let r = c.cmd(UNREGISTER_VM, json!({"containerId": "vm1"})).await;
    assert!(!r.error && r.payload.is_empty());
    let r = c.cmd(UNREGISTER_VM, json!({"containerId": "vm1"})).await;
    assert_eq!(r.msg(), "unknown containerID: vm1");
    let r = other.cmd(ATTACH_VM, json!({"containerId": "vm1"})).await;
    assert!(r.error);
    drop(agent);
}

/// A full exec through a shim in one dialect: stdin in, stdout/stderr out, exit code.
async fn exec_through_shim(dialect: &str) {
    let mut env = Env::start().await;
    let agent = env.agent(&["--dialect", dialect, "--pair"]);
    let mut rt = V2::connect(&env).await;
    let tokens = register(&mut rt, "vm", &agent, 1).await;
    assert_eq!(tokens.len(), 1);
    let mut sh = shim(&env, &tokens[0]).await;
    let data = json!({"container": "hyperstart", "keep": {"me": [1, 2]},
        "process": {"args": ["sh", "-c", "read x; echo out$x; echo err$x >&2; exit 3"], "workdir": "/"}});
    let r = hyper(&mut rt, "execcmd", &[&tokens[0]], data).await;
    assert!(!r.error, "execcmd: {:?}", r.json());
    sh.send(T_STREAM, STDIN, b"hi\n").await;
    let (out, err, code) = sh.collect().await;
    assert_eq!(String::from_utf8_lossy(&out), "outhi\n");
    assert_eq!(String::from_utf8_lossy(&err), "errhi\n");
    assert_eq!(code, Some(3));
    assert!(
        sh.disconnect().await.is_none(),
        "DisconnectShim gets no response"
    );
}

impl V2 {
    async fn disconnect(&mut self) -> Option<Rx> {
        self.send(T_COMMAND, DISCONNECT_SHIM, b"").await;
        self.next().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_through_a_shim_cc_agent() {
    exec_through_shim("cc-agent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_through_a_shim_hyperstart() {
    exec_through_shim("hyperstart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_close_only_the_offending_connection() {
    let mut env = Env::start().await;
    let agent = env.agent(&["--dialect", "hyperstart", "--pair"]);
    let mut rt = V2::connect(&env).await;
    register(&mut rt, "vm", &agent, 0).await;

    let oversized = {
        let mut h = header(T_COMMAND, HYPER, 0);
        h[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        h
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("header length 0", vec![0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        ("header length 1", vec![0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        ("header length 2", vec![0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        ("frame type 4", header(4, 0, 0)),
        ("frame type 15", header(15, 0, 0)),
        ("command opcode 7", header(T_COMMAND, 7, 0)),
        ("stream opcode 4", header(T_STREAM, 4, 0)),
        ("notification opcode 1", header(T_NOTIFY, 1, 0)),
        ("oversized frame", oversized),
        ("response from a client", header(T_RESPONSE, 0, 0)),
        ("notification from a client", {
            let mut h = header(T_NOTIFY, 0, 1);
            h.push(0);
            h
        }),
        ("stdout from a client", header(T_STREAM, STDOUT, 0)),
        ("stderr from a client", header(T_STREAM, STDERR, 0)),
        ("stdin from a non-shim", {
            let mut h = header(T_STREAM, STDIN, 2);
            h.extend_from_slice(b"hi");
            h
        }),
        ("invalid log entry", {
            let body = br#"{"source":"shim","level":"info","msg":""}"#;
            let mut h = header(T_STREAM, LOG, body.len());
            h.extend_from_slice(body);
            h
        }),
    ];
    for (what, bytes) in &cases {
        let mut c = V2::connect(&env).await;
        c.raw(bytes).await;
        assert!(c.closed().await, "{what}: the connection stays open");
        // The runtime's connection and the daemon carry on.
        let r = hyper(&mut rt, "ping", &[], Value::Null).await;
        assert!(!r.error, "{what}: ping after it failed");
    }
    // A wrong version on the second frame of a session (the first passed detection with `00 02`).
    let mut c = V2::connect(&env).await;
    let ping = json!({"hyperName": "ping"}).to_string();
    let mut bad = header(T_COMMAND, HYPER, ping.len());
    bad.extend_from_slice(ping.as_bytes());
    let mut second = header(T_COMMAND, HYPER, 0);
    second[1] = 3;
    bad.extend_from_slice(&second);
    c.raw(&bad).await;
    let r = c.read_wire().await.expect("the first frame is answered");
    assert_eq!((r.ty, r.op, r.error), (T_RESPONSE, HYPER, true)); // not attached
    assert!(c.closed().await, "wrong version closes");

    let logs = env.logs();
    for needle in [
        "below the minimum of 3",
        "unknown frame type 4",
        "out of range",
        "exceeds the limit",
        "may not send response frames",
        "may not send stdout frames",
        "stdin frame from a client that is not a shim",
        "invalid log entry",
        "unsupported protocol version 3",
    ] {
        assert!(
            logs.contains(needle),
            "no log line with {needle:?}:\n{logs}"
        );
    }
    let r = hyper(&mut rt, "version", &[], Value::Null).await;
    assert_eq!(r.payload, 4244u32.to_be_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_frames_go_to_the_daemon_log() {
    let env = Env::start_with(&["--log", "debug"]).await;
    let mut c = V2::connect(&env).await;
    for (source, level) in [
        ("shim", "warn"),
        ("runtime", "info"),
        ("shim", "debug"),
        ("runtime", "error"),
    ] {
        let body = json!({"source": source, "containerId": "ctr-7", "level": level,
            "msg": format!("hello from the {source} at {level}")});
        c.send(T_STREAM, LOG, body.to_string().as_bytes()).await;
    }
    // Still open: a command works afterwards.
    let r = c.cmd(ATTACH_VM, json!({"containerId": "x"})).await;
    assert!(r.error);
    let found = eventually(Duration::from_secs(5), || {
        let logs = env.logs();
        logs.lines().any(|l| {
            l.contains("hello from the shim at warn") && l.contains("ctr-7") && l.contains("shim")
        }) && logs.contains("hello from the runtime at error")
            && logs.contains("hello from the shim at debug")
    })
    .await;
    assert!(found, "log entries missing:\n{}", env.logs());
}

/// Client text in log frames (issue 16): a newline cannot forge a log line, control characters are escaped,
/// and a long message is cut at `--max-client-log` bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_frame_text_is_escaped_and_bounded() {
    let env = Env::start_with(&["--log", "info", "--max-client-log", "1000"]).await;
    let mut c = V2::connect(&env).await;
    let forged = json!({"source": "shim", "containerId": "ctr\nERROR cc_proxy: fake container", "level": "warn",
        "msg": "x\nERROR cc_proxy: forged line\r\u{1b}[2Kgone"});
    c.send(T_STREAM, LOG, forged.to_string().as_bytes()).await;
    let long = format!("start{}end-of-a-long-message", "A".repeat(100_000));
    let big = json!({"source": "runtime", "level": "info", "msg": long});
    c.send(T_STREAM, LOG, big.to_string().as_bytes()).await;
    let r = c.cmd(ATTACH_VM, json!({"containerId": "x"})).await;
    assert!(r.error, "the session goes on after log frames");

    let found = eventually(Duration::from_secs(5), || {
        let logs = env.logs();
        logs.contains("forged line") && logs.contains("startAAAA")
    })
    .await;
    let logs = env.logs();
    assert!(found, "log entries missing:\n{logs}");
    for line in logs.lines() {
        assert!(
            !line.starts_with("ERROR cc_proxy: forged")
                && !line.starts_with("ERROR cc_proxy: fake"),
            "a client forged a log line: {line:?}"
        );
        if line.contains("forged line") {
            assert!(
                line.contains("x\\nERROR cc_proxy: forged line\\r\\u{1b}[2Kgone"),
                "{line:?}"
            );
            // The container is a field, which the text format quotes and escapes once more.
            assert!(line.contains("nERROR cc_proxy: fake container"), "{line:?}");
            assert!(!line.contains('\u{1b}'), "{line:?}");
        }
        if line.contains("startAAAA") {
            assert!(line.len() < 1500, "a {}-byte log line", line.len());
            assert!(
                line.contains("...(+"),
                "no cut marker: {}",
                &line[line.len() - 100..]
            );
            assert!(!line.contains("end-of-a-long-message"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shims_reclaim_tokens_and_disconnect_frees_them() {
    let mut env = Env::start().await;
    let agent = env.agent(&["--dialect", "cc-agent", "--pair"]);
    let mut rt = V2::connect(&env).await;
    let tokens = register(&mut rt, "vm", &agent, 1).await;
    let token = tokens[0].as_str();

    let first = shim(&env, token).await;
    let mut second = V2::connect(&env).await;
    let r = second.cmd(CONNECT_SHIM, json!({ "token": token })).await;
    assert!(r.msg().contains("already has a shim"), "{}", r.msg());
    let r = second.cmd(CONNECT_SHIM, json!({"token": "short"})).await;
    assert_eq!(r.msg(), "unknown token");

    // The process writes after its shim vanished abruptly; a new shim reclaims the token and gets it all.
    let r = hyper(
        &mut rt,
        "execcmd",
        &[token],
        exec(&["sh", "-c", "sleep 0.5; echo late; exit 4"]),
    )
    .await;
    assert!(!r.error, "{:?}", r.json());
    drop(first);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = second.cmd(CONNECT_SHIM, json!({ "token": token })).await;
    assert!(!r.error, "reclaim: {}", r.msg());
    let (out, _, code) = second.collect().await;
    assert_eq!(String::from_utf8_lossy(&out), "late\n");
    assert_eq!(code, Some(4));

    // DisconnectShim: no response, the connection closes, the token is gone.
    let tokens = tokens_of(
        &rt.cmd(ATTACH_VM, json!({"containerId": "vm", "numIOStreams": 1}))
            .await,
    );
    let mut s = shim(&env, &tokens[0]).await;
    assert!(s.disconnect().await.is_none(), "DisconnectShim gets EOF");
    let mut again = V2::connect(&env).await;
    let r = again.cmd(CONNECT_SHIM, json!({"token": tokens[0]})).await;
    assert_eq!(r.msg(), "unknown token");
    let r = again.cmd(DISCONNECT_SHIM, Value::Null).await;
    assert_eq!(r.msg(), "client isn't a shim");
    let info = env.rpc("vm.info", json!({"id": "vm"})).await;
    assert_eq!(info["result"]["tokens"], 0, "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals() {
    let mut env = Env::start().await;
    // Lenient: signals to processes of the `hyperstart` pseudo-container, and 128 + N statuses.
    let agent = env.agent(&["--dialect", "hyperstart", "--pair", "--lenient"]);
    let mut rt = V2::connect(&env).await;
    let tokens = register(&mut rt, "vm", &agent, 3).await;

    let r = rt
        .cmd(SIGNAL, json!({"signalNumber": 15, "columns": 0, "rows": 0}))
        .await;
    assert_eq!(r.msg(), "client isn't a shim");

    // Before the start, SIGTERM/SIGKILL: ProcessExited(0), then the response.
    let mut early = shim(&env, &tokens[0]).await;
    early
        .send(
            T_COMMAND,
            SIGNAL,
            json!({"signalNumber": 9, "columns": 0, "rows": 0})
                .to_string()
                .as_bytes(),
        )
        .await;
    let n = early.read_wire().await.expect("notification");
    assert_eq!((n.ty, n.op, n.payload.clone()), (T_NOTIFY, 0, vec![0]));
    let r = early.read_wire().await.expect("response");
    assert_eq!((r.ty, r.op, r.error), (T_RESPONSE, SIGNAL, false));

    let mut sh = shim(&env, &tokens[1]).await;
    for (bad, why) in [
        (json!({"signalNumber": 31}), "31 is out of range"),
        (json!({"signalNumber": -1}), "negative"),
        (
            json!({"signalNumber": 28, "columns": 0, "rows": 24}),
            "SIGWINCH without columns",
        ),
        (
            json!({"signalNumber": 15, "columns": 80, "rows": 24}),
            "a size with another signal",
        ),
    ] {
        let r = sh.cmd(SIGNAL, bad).await;
        assert!(r.error, "{why}");
    }
    let r = hyper(
        &mut rt,
        "execcmd",
        &[&tokens[1]],
        json!({"container": "hyperstart", "process": {"args": ["sleep", "30"]}}),
    )
    .await;
    assert!(!r.error, "{:?}", r.json());
    let r = sh
        .cmd(SIGNAL, json!({"signalNumber": 15, "columns": 0, "rows": 0}))
        .await;
    assert!(!r.error, "{}", r.msg());
    let (_, _, code) = sh.collect().await;
    assert_eq!(code, Some(128 + 15));

    // SIGWINCH with a size on a terminal process becomes WINSIZE.
    let mut tty = shim(&env, &tokens[2]).await;
    let r = hyper(
        &mut rt,
        "execcmd",
        &[&tokens[2]],
        json!({"container": "hyperstart", "process": {"args": ["sh", "-c", "read x; stty size"], "terminal": true}}),
    )
    .await;
    assert!(!r.error, "{:?}", r.json());
    let r = tty
        .cmd(
            SIGNAL,
            json!({"signalNumber": 28, "columns": 100, "rows": 33}),
        )
        .await;
    assert!(!r.error, "{}", r.msg());
    tty.send(T_STREAM, STDIN, b"go\n").await;
    let (out, err, code) = tty.collect().await;
    assert!(String::from_utf8_lossy(&out).contains("33 100"), "{out:?}");
    assert!(err.is_empty(), "a terminal merges stderr");
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_death_ends_shims_with_an_exit_notification() {
    let mut env = Env::start().await;
    let agent = env.agent(&["--dialect", "cc-agent", "--pair"]);
    let mut rt = V2::connect(&env).await;
    let tokens = register(&mut rt, "vm", &agent, 1).await;
    let mut sh = shim(&env, &tokens[0]).await;
    let r = hyper(&mut rt, "execcmd", &[&tokens[0]], exec(&["sleep", "30"])).await;
    assert!(!r.error);
    env.kill_agent(&agent);
    let (_, _, code) = sh.collect().await;
    assert_eq!(code, Some(255), "an exit notification, not a bare EOF");
    let logs = env.logs();
    assert!(logs.contains("reporting it as an exit"), "{logs}");
    // The runtime gets an error for the lost VM.
    let r = hyper(&mut rt, "ping", &[], Value::Null).await;
    assert!(r.msg().contains("lost"), "{}", r.msg());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_registered_through_json_rpc_is_used_from_v2_and_back() {
    let mut env = Env::start().await;
    let agent = env.agent(&["--dialect", "hyperstart"]);
    env.register("rpc-vm", &agent, None).await;

    // v2 client attaches to the JSON-RPC VM and runs a process through a v2 shim.
    let mut rt = V2::connect(&env).await;
    let r = rt
        .cmd(
            ATTACH_VM,
            json!({"containerId": "rpc-vm", "numIOStreams": 1}),
        )
        .await;
    assert!(!r.error, "{}", r.msg());
    let tokens = tokens_of(&r);
    let mut sh = shim(&env, &tokens[0]).await;
    let r = hyper(&mut rt, "execcmd", &[&tokens[0]], exec(&["echo", "via v2"])).await;
    assert!(!r.error, "{:?}", r.json());
    let (out, _, code) = sh.collect().await;
    assert_eq!((out, code), (b"via v2\n".to_vec(), Some(0)));

    // A v2 token is usable from JSON-RPC: agent.call starts its process, the v2 shim gets the output.
    let tokens = tokens_of(
        &rt.cmd(
            ATTACH_VM,
            json!({"containerId": "rpc-vm", "numIOStreams": 1}),
        )
        .await,
    );
    let mut sh = shim(&env, &tokens[0]).await;
    let r = env
        .rpc(
            "agent.call",
            json!({"vm": "rpc-vm", "command": "execcmd", "token": tokens[0],
                "data": exec(&["sh", "-c", "echo from rpc; exit 2"])}),
        )
        .await;
    assert!(r.get("result").is_some(), "{r}");
    let (out, _, code) = sh.collect().await;
    assert_eq!((out, code), (b"from rpc\n".to_vec(), Some(2)));

    // A VM registered by a v2 client is listed and unregistered through JSON-RPC.
    let agent2 = env.agent(&["--dialect", "cc-agent", "--pair"]);
    register(&mut rt, "v2-vm", &agent2, 0).await;
    let list = env.rpc("vm.list", json!({})).await;
    assert!(list.to_string().contains("v2-vm"), "{list}");
    let r = env.rpc("vm.unregister", json!({"id": "v2-vm"})).await;
    assert!(r.get("result").is_some(), "{r}");
    let r = rt.cmd(ATTACH_VM, json!({"containerId": "v2-vm"})).await;
    assert_eq!(r.msg(), "unknown containerID: v2-vm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_waits_for_the_shim_and_large_stdin_is_split() {
    let mut env = Env::start().await;
    let agent = env.agent(&["--dialect", "cc-agent", "--pair"]);
    let mut rt = V2::connect(&env).await;
    let tokens = register(&mut rt, "vm", &agent, 1).await;

    // The runtime starts the process before its shim connects: the command waits for the shim.
    let token = tokens[0].clone();
    let started = std::time::Instant::now();
    let runtime = tokio::spawn(async move {
        let r = hyper(
            &mut rt,
            "execcmd",
            &[&token],
            exec(&["sh", "-c", "head -c 100000 | wc -c"]),
        )
        .await;
        (r, rt)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!runtime.is_finished(), "execcmd did not wait for the shim");
    let mut sh = shim(&env, &tokens[0]).await;
    let (r, mut rt) = runtime.await.expect("runtime task");
    assert!(!r.error, "{:?}", r.json());
    assert!(started.elapsed() >= Duration::from_millis(500));

    // 100000 bytes of stdin in one frame reach the process whole.
    sh.send(T_STREAM, STDIN, &vec![b'x'; 100_000]).await;
    let (out, _, code) = sh.collect().await;
    assert_eq!(String::from_utf8_lossy(&out).trim(), "100000");
    assert_eq!(code, Some(0));

    // Unregistering the VM under a running process's shim ends it with an exit notification.
    let tokens = tokens_of(
        &rt.cmd(ATTACH_VM, json!({"containerId": "vm", "numIOStreams": 1}))
            .await,
    );
    let mut sh = shim(&env, &tokens[0]).await;
    let r = hyper(&mut rt, "execcmd", &[&tokens[0]], exec(&["sleep", "30"])).await;
    assert!(!r.error);
    let r = rt.cmd(UNREGISTER_VM, json!({"containerId": "vm"})).await;
    assert!(!r.error);
    let (_, _, code) = sh.collect().await;
    assert_eq!(code, Some(255), "an exit notification, not a bare EOF");
}

/// cc-shim relays the terminal's input as soon as it is connected, which can be before the runtime started
/// the process: that stdin must neither be lost silently nor end the stream early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_sent_before_the_process_started() {
    let mut env = Env::start().await;
    let agent = env.agent(&["--dialect", "cc-agent", "--pair"]);
    let mut rt = V2::connect(&env).await;
    let tokens = register(&mut rt, "vm", &agent, 1).await;
    let mut sh = shim(&env, &tokens[0]).await;
    sh.send(T_STREAM, STDIN, b"early\n").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = hyper(
        &mut rt,
        "execcmd",
        &[&tokens[0]],
        exec(&["sh", "-c", "printf x; sleep 0.2; echo done"]),
    )
    .await;
    assert!(!r.error, "{:?}", r.json());
    let (out, _, code) = sh.collect().await;
    assert_eq!(String::from_utf8_lossy(&out), "xdone\n");
    assert_eq!(code, Some(0));
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// A shim pushing stdin at a process that never reads it meets backpressure: the daemon's memory stays
/// bounded whatever the shim sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_to_a_process_that_does_not_read_is_bounded() {
    let mut env = Env::start().await;
    let agent = env.agent(&["--dialect", "cc-agent", "--pair"]);
    let mut rt = V2::connect(&env).await;
    let tokens = register(&mut rt, "full", &agent, 1).await;
    let mut sh = shim(&env, &tokens[0]).await;
    let r = hyper(&mut rt, "execcmd", &[&tokens[0]], exec(&["sleep", "30"])).await;
    assert!(!r.error, "{:?}", r.json());
    let before = rss_kib(env.daemon_pid());
    // 64 MiB offered in 1 MiB frames; the writes stall once the bounded queues are full.
    let chunk = vec![b'y'; 1 << 20];
    let pushed = tokio::time::timeout(Duration::from_secs(4), async {
        let mut n = 0usize;
        for _ in 0..64 {
            sh.send(T_STREAM, STDIN, &chunk).await;
            n += 1;
        }
        n
    })
    .await;
    assert!(
        pushed.is_err(),
        "64 MiB of stdin to a process that reads nothing must meet backpressure"
    );
    let grown = rss_kib(env.daemon_pid()).saturating_sub(before);
    assert!(grown < 48 * 1024, "daemon RSS grew by {grown} KiB");
    // The daemon still serves others.
    let r = rt
        .cmd(ATTACH_VM, json!({"containerId": "full", "numIOStreams": 0}))
        .await;
    assert!(!r.error);
}

/// Issue 16 §2 "Stdin" through legacy shims (the same daemon code as the WebSocket attach): a process that
/// never reads its stdin, flooded by its shim, stalls the lenient agent's I/O reader; after
/// `--stdin-stall-timeout` its stream fails alone (ProcessExited 255 to its shim), its process is killed, and
/// another shim's stdin to another process of the VM arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_not_reading_stdin_fails_alone_for_legacy_shims_too() {
    let mut env = Env::start_with(&["--stdin-stall-timeout", "1"]).await;
    let agent = env.agent(&["--lenient", "--pair"]);
    let mut rt = V2::connect(&env).await;
    let tokens = register(&mut rt, "lstuck", &agent, 2).await;
    let mut a = shim(&env, &tokens[0]).await;
    let mut b = shim(&env, &tokens[1]).await;
    let marker = crate::limits::unique_sleep(7);
    let stuck = ["sleep", marker.as_str()];
    let r = hyper(&mut rt, "execcmd", &[&tokens[0]], exec(&stuck)).await;
    assert!(!r.error, "{:?}", r.json());
    let r = hyper(
        &mut rt,
        "execcmd",
        &[&tokens[1]],
        exec(&["sh", "-c", "read x; echo got:$x"]),
    )
    .await;
    assert!(!r.error, "{:?}", r.json());
    let flooding = tokio::spawn(async move {
        let chunk = vec![b'y'; 1 << 20];
        for _ in 0..64 {
            let sent = tokio::time::timeout(WAIT, a.try_send(T_STREAM, STDIN, &chunk)).await;
            if !matches!(sent, Ok(true)) {
                break;
            }
        }
        a.collect().await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = std::time::Instant::now();
    b.send(T_STREAM, STDIN, b"hello\n").await;
    let (out, _, status) = tokio::time::timeout(Duration::from_secs(10), b.collect())
        .await
        .unwrap_or_else(|_| panic!("the other shim's stdin is stuck\n{}", env.logs()));
    assert_eq!((out.as_slice(), status), (&b"got:hello\n"[..], Some(0)));
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    let (_, _, status) = tokio::time::timeout(Duration::from_secs(60), flooding)
        .await
        .expect("the flooded shim is told")
        .expect("join");
    assert_eq!(status, Some(255), "the flooded stream ends as failed");
    assert!(
        eventually(Duration::from_secs(5), || !crate::limits::process_running(
            &stuck
        ))
        .await,
        "the process that did not read its stdin was not killed"
    );
    assert_eq!(
        crate::limits::stream_failures(&env, "lstuck", "stdin_stall").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_vm_and_a_shim_wait_while_the_vm_is_recovered() {
    let mut env = Env::start().await;
    // Slow to answer: the restarted daemon needs ~2 s to reconnect it.
    let agent = env.agent(&["--pair", "--fault", "slow-reply", "--slow-ms", "2000"]);
    let mut c = V2::connect(&env).await;
    let tokens = register(&mut c, "lrec", &agent, 1).await;
    let token = [tokens[0].as_str()];
    let r = hyper(
        &mut c,
        "execcmd",
        &token,
        exec(&["sh", "-c", "read x; echo got:$x"]),
    );
    // The start waits for the shim; the process then waits for stdin across the restart.
    let (r, _first) = tokio::join!(r, shim(&env, &tokens[0]));
    assert!(!r.error, "execcmd: {}", r.msg());
    drop(c);
    env.restart_daemon().await;

    // Both arrive while the VM is being recovered: neither is told the VM or the token is unknown.
    let mut c = V2::connect(&env).await;
    let attach = c.cmd(ATTACH_VM, json!({"containerId": "lrec", "numIOStreams": 1}));
    let reattach = async {
        let mut s = V2::connect(&env).await;
        let r = s.cmd(CONNECT_SHIM, json!({ "token": tokens[0] })).await;
        (r, s)
    };
    let (a, (r, mut s)) = tokio::join!(attach, reattach);
    assert!(!a.error, "AttachVM during recovery: {}", a.msg());
    assert_eq!(tokens_of(&a).len(), 1);
    assert!(!r.error, "ConnectShim during recovery: {}", r.msg());
    s.send(T_STREAM, STDIN, b"hello\n").await;
    let (out, _, status) = s.collect().await;
    assert_eq!((out.as_slice(), status), (&b"got:hello\n"[..], Some(0)));
    let info = env.client.vm_info("lrec").await.expect("vm.info");
    assert_eq!((info.state.as_str(), info.recovered), ("ready", true));
}
