//! End-to-end tests of cc-test-agent: spawn the binary, speak the protocol to it with the
//! protocol crate over both host transports and in both dialects.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use cc_proxy_protocol::{
    code, exit_status, parse_version, ControlCodec, ControlFrame, Dialect, IoCodec, IoFrame,
    ProcessAsyncEvent,
};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;
use tokio_util::codec::Framed;

const WAIT: Duration = Duration::from_secs(10);

/// A running agent process, killed on drop.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start(args: &[&str], socket_args: impl Fn(&Path) -> Vec<String>) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_cc-test-agent"))
            .args(args)
            .args(socket_args(dir.path()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn agent");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .expect("read banner");
        assert_eq!(line.trim(), "cc-test-agent: listening");
        Agent { child, dir }
    }

    /// Control/IO socket pair transport.
    fn pair(args: &[&str]) -> Agent {
        Agent::start(args, |d| {
            vec![
                "--control".into(),
                d.join("ctl").display().to_string(),
                "--io".into(),
                d.join("io").display().to_string(),
            ]
        })
    }

    /// Hybrid vsock transport.
    fn hvsock(args: &[&str]) -> Agent {
        Agent::start(args, |d| {
            vec!["--hvsock".into(), d.join("hv").display().to_string()]
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn connect(&self, transport: Transport, dialect: Dialect) -> Client {
        let (ctl, io) = match transport {
            Transport::Pair => (
                UnixStream::connect(self.path("ctl"))
                    .await
                    .expect("connect ctl"),
                UnixStream::connect(self.path("io"))
                    .await
                    .expect("connect io"),
            ),
            Transport::Hvsock => (
                hv_connect(&self.path("hv"), 2718).await,
                hv_connect(&self.path("hv"), 2719).await,
            ),
        };
        Client {
            ctl: Framed::new(ctl, ControlCodec::default()),
            io: Framed::new(io, IoCodec::default()),
            dialect,
            events: Vec::new(),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Pair,
    Hvsock,
}

async fn hv_connect(path: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(path).await.expect("connect hvsock");
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .expect("write CONNECT");
    let mut line = Vec::new();
    loop {
        let b = timeout(WAIT, s.read_u8())
            .await
            .expect("OK in time")
            .expect("read OK");
        if b == b'\n' {
            break;
        }
        line.push(b);
    }
    assert!(
        line.starts_with(b"OK "),
        "{}",
        String::from_utf8_lossy(&line)
    );
    s
}

/// The host side of one VM session.
struct Client {
    ctl: Framed<UnixStream, ControlCodec>,
    io: Framed<UnixStream, IoCodec>,
    dialect: Dialect,
    events: Vec<ProcessAsyncEvent>,
}

impl Client {
    async fn next_control(&mut self) -> ControlFrame {
        timeout(WAIT, self.ctl.next())
            .await
            .expect("control frame in time")
            .expect("control open")
            .expect("valid control frame")
    }

    /// Reads the next control frame that is not NEXT or an exit event (those are recorded).
    async fn next_reply(&mut self) -> ControlFrame {
        loop {
            let f = self.next_control().await;
            if f.code == code::NEXT {
                assert_eq!(
                    self.dialect,
                    Dialect::Hyperstart,
                    "cc-agent never sends NEXT"
                );
                continue;
            }
            if self.dialect == Dialect::Hyperstart && f.code == 23 {
                self.events
                    .push(serde_json::from_slice(&f.payload).expect("event JSON"));
                continue;
            }
            return f;
        }
    }

    async fn expect_ready(&mut self) {
        let f = self.next_control().await;
        assert_eq!(f.code, code::READY);
        assert!(f.payload.is_empty());
    }

    async fn command(&mut self, code: u32, payload: &[u8]) -> Result<Bytes, String> {
        self.ctl
            .send(ControlFrame::new(code, Bytes::copy_from_slice(payload)))
            .await
            .expect("send command");
        let reply = self.next_reply().await;
        match reply.code {
            code::ACK => Ok(reply.payload),
            code::ERROR => Err(String::from_utf8_lossy(&reply.payload).into_owned()),
            other => panic!("unexpected reply code {other}"),
        }
    }

    async fn json_command(
        &mut self,
        code: u32,
        payload: serde_json::Value,
    ) -> Result<Bytes, String> {
        self.command(code, payload.to_string().as_bytes()).await
    }

    async fn exec(&mut self, id: &str, args: &[&str], stdio: u64, stderr: u64, terminal: bool) {
        let payload = json!({"container": "hyperstart", "process": {
            "id": id, "args": args, "stdio": stdio, "stderr": stderr, "terminal": terminal,
            "envs": [{"env": "PATH", "value": "/usr/local/bin:/usr/bin:/bin"}]}});
        self.json_command(code::EXECCMD, payload)
            .await
            .expect("execcmd ACK");
    }

    async fn send_io(&mut self, seq: u64, data: &[u8]) {
        self.io
            .send(IoFrame::new(seq, Bytes::copy_from_slice(data)))
            .await
            .expect("send io");
    }

    async fn next_io(&mut self) -> IoFrame {
        timeout(WAIT, self.io.next())
            .await
            .expect("io frame in time")
            .expect("io open")
            .expect("valid io frame")
    }

    /// Collects output until the process's exit report; returns (stdout, stderr, status).
    async fn wait_exit(&mut self, id: &str, stdio: u64, stderr: u64) -> (Vec<u8>, Vec<u8>, i32) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            let f = self.next_io().await;
            if f.seq == stdio && f.data.is_empty() {
                break;
            }
            if f.seq == stdio {
                out.extend_from_slice(&f.data);
            } else if f.seq == stderr && stderr != 0 {
                err.extend_from_slice(&f.data);
            } else {
                panic!("packet for unexpected seq {}", f.seq);
            }
        }
        let status = match self.dialect {
            Dialect::CcAgent => {
                let f = self.next_io().await;
                assert_eq!(f.seq, stdio);
                i32::from(exit_status(&f).expect("13-byte status packet"))
            }
            Dialect::Hyperstart => loop {
                if let Some(i) = self.events.iter().position(|e| e.process == id) {
                    let e = self.events.remove(i);
                    assert_eq!(e.event, "finished");
                    assert_eq!(e.container, "hyperstart");
                    break e.status;
                }
                let f = self.next_control().await;
                assert_eq!(f.code, 23, "only exit events arrive unsolicited");
                self.events
                    .push(serde_json::from_slice(&f.payload).expect("event JSON"));
            },
        };
        (out, err, status)
    }
}

fn dialect_args(d: Dialect) -> [&'static str; 2] {
    ["--dialect", d.name()]
}

async fn handshake(c: &mut Client) {
    c.expect_ready().await;
    let v = c.command(code::GETVERSION, b"").await.expect("version");
    assert_eq!(parse_version(&v), Some(c.dialect.api_version()));
    assert_eq!(c.command(code::PING, b"").await, Ok(Bytes::new()));
}

async fn basic(dialect: Dialect, transport: Transport) {
    let args = dialect_args(dialect);
    let agent = match transport {
        Transport::Pair => Agent::pair(&args),
        Transport::Hvsock => Agent::hvsock(&args),
    };
    let mut c = agent.connect(transport, dialect).await;
    handshake(&mut c).await;
    c.exec(
        "p1",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        3,
        4,
        false,
    )
    .await;
    let (out, err, status) = c.wait_exit("p1", 3, 4).await;
    assert_eq!(out, b"out\n");
    assert_eq!(err, b"err\n");
    assert_eq!(status, 3);
}

#[tokio::test]
async fn basic_hyperstart_pair() {
    basic(Dialect::Hyperstart, Transport::Pair).await;
}

#[tokio::test]
async fn basic_hyperstart_hvsock() {
    basic(Dialect::Hyperstart, Transport::Hvsock).await;
}

#[tokio::test]
async fn basic_cc_agent_pair() {
    basic(Dialect::CcAgent, Transport::Pair).await;
}

#[tokio::test]
async fn basic_cc_agent_hvsock() {
    basic(Dialect::CcAgent, Transport::Hvsock).await;
}

#[tokio::test]
async fn stdin_through_cat_and_merged_stderr() {
    for dialect in Dialect::ALL {
        let agent = Agent::pair(&dialect_args(dialect));
        let mut c = agent.connect(Transport::Pair, dialect).await;
        handshake(&mut c).await;
        c.exec("cat", &["cat"], 5, 6, false).await;
        c.send_io(5, b"hello ").await;
        c.send_io(5, b"world").await;
        c.send_io(5, b"").await;
        let (out, err, status) = c.wait_exit("cat", 5, 6).await;
        assert_eq!(out, b"hello world");
        assert!(err.is_empty());
        assert_eq!(status, 0);

        // stderr 0: merged into stdout, in order.
        c.exec(
            "merged",
            &["sh", "-c", "echo a; echo b >&2; echo c"],
            7,
            0,
            false,
        )
        .await;
        let (out, _, status) = c.wait_exit("merged", 7, 0).await;
        assert_eq!(out, b"a\nb\nc\n");
        assert_eq!(status, 0);
    }
}

#[tokio::test]
async fn terminal_process_gets_a_tty_and_window_size() {
    for dialect in Dialect::ALL {
        let agent = Agent::pair(&dialect_args(dialect));
        let mut c = agent.connect(Transport::Pair, dialect).await;
        handshake(&mut c).await;
        let script = "test -t 0 && echo is-a-tty; read line; stty size; echo got:$line";
        c.exec("tty", &["sh", "-c", script], 9, 0, true).await;
        let winsize = match dialect {
            Dialect::CcAgent => json!({"seq": 9, "row": 40, "column": 100}),
            Dialect::Hyperstart => {
                json!({"container": "hyperstart", "process": "tty", "row": 40, "column": 100})
            }
        };
        c.json_command(code::WINSIZE, winsize)
            .await
            .expect("winsize ACK");
        c.send_io(9, b"abc\n").await;
        let (out, _, status) = c.wait_exit("tty", 9, 0).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("is-a-tty"), "{out:?}");
        assert!(out.contains("40 100"), "{out:?}");
        assert!(out.contains("got:abc"), "{out:?}");
        assert_eq!(status, 0);
    }
}

#[tokio::test]
async fn killcontainer_sigkill_gives_137() {
    for dialect in Dialect::ALL {
        let agent = Agent::pair(&dialect_args(dialect));
        let mut c = agent.connect(Transport::Pair, dialect).await;
        handshake(&mut c).await;
        let payload = json!({"id": "c1", "rootfs": "x", "process": {
            "id": "init", "args": ["sleep", "100"], "stdio": 11, "stderr": 12}});
        c.json_command(code::NEWCONTAINER, payload)
            .await
            .expect("newcontainer ACK");
        c.json_command(code::KILLCONTAINER, json!({"container": "c1", "signal": 9}))
            .await
            .expect("kill ACK");
        let (out, err, status) = wait_exit_in(&mut c, "c1", "init", 11, 12).await;
        assert!(out.is_empty() && err.is_empty());
        assert_eq!(status, 137);
    }
}

/// Like `Client::wait_exit` for a container other than `hyperstart`.
async fn wait_exit_in(
    c: &mut Client,
    container: &str,
    id: &str,
    stdio: u64,
    stderr: u64,
) -> (Vec<u8>, Vec<u8>, i32) {
    if c.dialect == Dialect::Hyperstart {
        // Reuse wait_exit's I/O handling, then check the event's container ourselves.
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            let f = c.next_io().await;
            if f.seq == stdio && f.data.is_empty() {
                break;
            }
            if f.seq == stdio {
                out.extend_from_slice(&f.data)
            } else if f.seq == stderr {
                err.extend_from_slice(&f.data)
            }
        }
        let event = loop {
            if let Some(i) = c.events.iter().position(|e| e.process == id) {
                break c.events.remove(i);
            }
            let f = c.next_control().await;
            assert_eq!(f.code, 23);
            c.events
                .push(serde_json::from_slice(&f.payload).expect("event JSON"));
        };
        assert_eq!(event.container, container);
        return (out, err, event.status);
    }
    c.wait_exit(id, stdio, stderr).await
}

#[tokio::test]
async fn signalprocess_in_hyperstart() {
    let agent = Agent::hvsock(&dialect_args(Dialect::Hyperstart));
    let mut c = agent.connect(Transport::Hvsock, Dialect::Hyperstart).await;
    handshake(&mut c).await;
    c.exec("sleeper", &["sleep", "100"], 3, 4, false).await;
    c.json_command(
        24,
        json!({"container": "hyperstart", "process": "sleeper", "signal": 15}),
    )
    .await
    .expect("signalprocess ACK");
    let (_, _, status) = c.wait_exit("sleeper", 3, 4).await;
    assert_eq!(status, 128 + 15);
}

#[tokio::test]
async fn errors_are_reported_and_the_session_survives() {
    for dialect in Dialect::ALL {
        let agent = Agent::pair(&dialect_args(dialect));
        let mut c = agent.connect(Transport::Pair, dialect).await;
        handshake(&mut c).await;
        assert_eq!(
            c.command(99, b"").await,
            Err("unknown command 99".to_owned())
        );
        let err = c
            .command(code::EXECCMD, b"{not json")
            .await
            .expect_err("malformed");
        assert!(err.contains("malformed"), "{err}");
        let err = c
            .json_command(
                code::EXECCMD,
                json!({"container": "hyperstart", "process": {"args": []}}),
            )
            .await
            .expect_err("empty args");
        assert!(err.contains("args"), "{err}");
        let err = c
            .json_command(code::EXECCMD, json!({"container": "hyperstart", "process": {"args": ["/nonexistent/x"], "stdio": 3}}))
            .await
            .expect_err("spawn fails");
        assert!(err.contains("/nonexistent/x"), "{err}");
        let err = c
            .json_command(
                code::KILLCONTAINER,
                json!({"container": "nope", "signal": 9}),
            )
            .await
            .expect_err("unknown container");
        assert!(err.contains("nope"), "{err}");
        c.exec("dup", &["sleep", "100"], 3, 4, false).await;
        let err = c
            .json_command(
                code::EXECCMD,
                json!({"container": "hyperstart", "process": {"id": "dup", "args": ["true"]}}),
            )
            .await
            .expect_err("duplicate id");
        assert!(err.contains("dup"), "{err}");
        for ack_only in [
            code::STARTPOD,
            code::DESTROYPOD,
            code::READY,
            code::SETUPROUTE,
        ] {
            assert_eq!(c.command(ack_only, b"").await, Ok(Bytes::new()));
        }
        // Data for an unknown sequence is answered with an empty packet for it.
        c.send_io(1000, b"x").await;
        assert_eq!(c.next_io().await, IoFrame::eof(1000));
        assert_eq!(c.command(code::PING, b"").await, Ok(Bytes::new()));
    }
}

#[tokio::test]
async fn processes_and_output_survive_a_reconnect() {
    for dialect in Dialect::ALL {
        let agent = Agent::pair(&dialect_args(dialect));
        let mut c = agent.connect(Transport::Pair, dialect).await;
        handshake(&mut c).await;
        c.exec(
            "late",
            &["sh", "-c", "sleep 0.3; echo late; exit 4"],
            3,
            4,
            false,
        )
        .await;
        drop(c);
        tokio::time::sleep(Duration::from_millis(600)).await;
        let mut c = agent.connect(Transport::Pair, dialect).await;
        c.expect_ready().await;
        let (out, _, status) = c.wait_exit("late", 3, 4).await;
        assert_eq!(out, b"late\n");
        assert_eq!(status, 4);
    }
}

#[tokio::test]
async fn a_new_connection_replaces_the_old_one() {
    let agent = Agent::hvsock(&[]);
    let mut old = agent.connect(Transport::Hvsock, Dialect::Hyperstart).await;
    handshake(&mut old).await;
    let mut new = agent.connect(Transport::Hvsock, Dialect::Hyperstart).await;
    handshake(&mut new).await;
    // The old control connection is closed by the agent.
    let closed = timeout(WAIT, old.ctl.next())
        .await
        .expect("old closed in time");
    assert!(closed.is_none() || closed.is_some_and(|r| r.is_err()));
}

#[tokio::test]
async fn bad_frame_closes_only_that_session() {
    let agent = Agent::pair(&[]);
    let mut c = agent.connect(Transport::Pair, Dialect::Hyperstart).await;
    handshake(&mut c).await;
    c.ctl
        .get_mut()
        .write_all(&[0, 0, 0, 12, 0, 0, 0, 2])
        .await
        .expect("write bad frame");
    let closed = timeout(WAIT, c.ctl.next()).await.expect("closed in time");
    assert!(closed.is_none() || closed.is_some_and(|r| r.is_err()));
    let mut c = agent.connect(Transport::Pair, Dialect::Hyperstart).await;
    handshake(&mut c).await;
}

#[tokio::test]
async fn count_serves_suffixed_sockets() {
    let agent = Agent::start(&["--count", "3", "--dialect", "cc-agent"], |d| {
        vec!["--hvsock".into(), d.join("hv").display().to_string()]
    });
    for i in 0..3 {
        let s = hv_connect(&agent.path(&format!("hv.{i}")), 2718).await;
        let mut ctl = Framed::new(s, ControlCodec::default());
        let f = timeout(WAIT, ctl.next())
            .await
            .expect("READY in time")
            .expect("open")
            .expect("valid");
        assert_eq!(f.code, code::READY);
    }
    // Other ports are refused.
    let mut s = UnixStream::connect(agent.path("hv.0"))
        .await
        .expect("connect");
    s.write_all(b"CONNECT 1234\n").await.expect("write");
    let mut rest = Vec::new();
    let n = timeout(
        WAIT,
        tokio::io::BufReader::new(s).read_until(b'\n', &mut rest),
    )
    .await
    .expect("closed in time")
    .expect("read");
    assert_eq!(n, 0);
}

#[tokio::test]
async fn fault_no_ready() {
    let agent = Agent::pair(&["--fault", "no-ready"]);
    let mut c = agent.connect(Transport::Pair, Dialect::Hyperstart).await;
    assert!(
        timeout(Duration::from_millis(300), c.ctl.next())
            .await
            .is_err(),
        "no READY"
    );
    assert_eq!(c.command(code::PING, b"").await, Ok(Bytes::new()));
}

#[tokio::test]
async fn fault_silent() {
    let agent = Agent::pair(&["--fault", "silent"]);
    let mut c = agent.connect(Transport::Pair, Dialect::Hyperstart).await;
    c.ctl
        .send(ControlFrame::new(code::GETVERSION, Bytes::new()))
        .await
        .expect("send");
    assert!(
        timeout(Duration::from_millis(300), c.ctl.next())
            .await
            .is_err(),
        "no READY, no reply"
    );
}

#[tokio::test]
async fn fault_slow_reply() {
    let agent = Agent::pair(&["--fault", "slow-reply", "--slow-ms", "300"]);
    let mut c = agent.connect(Transport::Pair, Dialect::Hyperstart).await;
    c.expect_ready().await;
    let start = std::time::Instant::now();
    assert_eq!(c.command(code::PING, b"").await, Ok(Bytes::new()));
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn fault_garbage() {
    let agent = Agent::pair(&["--fault", "garbage", "--dialect", "cc-agent"]);
    let mut c = agent.connect(Transport::Pair, Dialect::CcAgent).await;
    handshake_version_only(&mut c).await;
    c.ctl
        .send(ControlFrame::new(code::PING, Bytes::new()))
        .await
        .expect("send");
    let got = timeout(WAIT, c.ctl.next())
        .await
        .expect("in time")
        .expect("some bytes");
    assert!(got.is_err(), "garbage must not decode: {got:?}");
}

async fn handshake_version_only(c: &mut Client) {
    c.expect_ready().await;
    let v = c.command(code::GETVERSION, b"").await.expect("version");
    assert_eq!(parse_version(&v), Some(c.dialect.api_version()));
}

#[tokio::test]
async fn fault_die_mid_command() {
    let mut agent = Agent::pair(&["--fault", "die-mid-command"]);
    let mut c = agent.connect(Transport::Pair, Dialect::Hyperstart).await;
    handshake_version_only(&mut c).await;
    c.ctl
        .send(ControlFrame::new(code::PING, Bytes::new()))
        .await
        .expect("send");
    let got = timeout(WAIT, c.ctl.next()).await.expect("in time");
    assert!(got.is_none() || got.is_some_and(|r| r.is_err()));
    let status = agent.child.wait().expect("wait agent");
    assert_eq!(status.code(), Some(1));
}

#[tokio::test]
async fn api_version_override() {
    let agent = Agent::pair(&["--api-version", "4243"]);
    let mut c = agent.connect(Transport::Pair, Dialect::Hyperstart).await;
    c.expect_ready().await;
    let v = c.command(code::GETVERSION, b"").await.expect("version");
    assert_eq!(parse_version(&v), Some(4243));
}

/// Strict mode, hyperstart dialect, over the socket pair.
fn strict() -> Agent {
    Agent::pair(&["--dialect", "hyperstart", "--strict"])
}

/// Sends `count` stdin packets of `size` bytes back to back in one write, then the close, to
/// `cat` on sequence 3; returns how many bytes came back.
async fn cat_back_to_back(c: &mut Client, id: &str, size: usize, count: usize) -> usize {
    c.exec(id, &["cat"], 3, 4, false).await;
    let chunk = vec![b'x'; size];
    for _ in 0..count {
        c.io.feed(IoFrame::new(3, Bytes::copy_from_slice(&chunk)))
            .await
            .expect("feed");
    }
    c.io.feed(IoFrame::eof(3)).await.expect("feed close");
    c.io.flush().await.expect("flush");
    let (out, _, status) = c.wait_exit(id, 3, 4).await;
    assert_eq!(status, 0);
    out.len()
}

#[tokio::test]
async fn strict_stdin_keeps_256_byte_packets_and_loses_500_byte_ones() {
    let agent = strict();
    let mut c = agent.connect(Transport::Pair, Dialect::Hyperstart).await;
    handshake(&mut c).await;
    assert_eq!(cat_back_to_back(&mut c, "small", 256, 64).await, 256 * 64);
    let kept = cat_back_to_back(&mut c, "big", 500, 20).await;
    assert!(
        kept < 500 * 20 * 3 / 4,
        "500-byte packets must overflow, kept {kept}"
    );
}

#[tokio::test]
async fn strict_oversized_io_packet_ends_the_agent() {
    let mut agent = strict();
    let mut c = agent.connect(Transport::Pair, Dialect::Hyperstart).await;
    handshake(&mut c).await;
    c.exec("cat", &["cat"], 3, 4, false).await;
    // 4084 data bytes fit hyperstart's 4096-byte buffer; 4085 do not.
    c.send_io(3, &[b'a'; 4084]).await;
    assert_eq!(c.command(code::PING, b"").await, Ok(Bytes::new()));
    c.send_io(3, &[b'a'; 4085]).await;
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = agent.child.try_wait().expect("wait") {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "agent survived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(3));
}

#[tokio::test]
async fn strict_ready_once_per_boot_and_next_twice() {
    let agent = strict();
    let mut c = agent.connect(Transport::Pair, Dialect::Hyperstart).await;
    c.expect_ready().await;
    c.ctl
        .send(ControlFrame::new(code::PING, Bytes::new()))
        .await
        .expect("send");
    // An empty command: one NEXT (the header), then the reply.
    assert_eq!(c.next_control().await.code, code::NEXT);
    assert_eq!(c.next_control().await.code, code::ACK);
    c.ctl
        .send(ControlFrame::new(code::READY, Bytes::from_static(b"{}")))
        .await
        .expect("send");
    let credits: Vec<u32> = [c.next_control().await, c.next_control().await]
        .iter()
        .map(|f| {
            assert_eq!(f.code, code::NEXT);
            u32::from_be_bytes(f.payload[..4].try_into().expect("4 bytes"))
        })
        .collect();
    assert_eq!(credits, [8, 2]);
    assert_eq!(c.next_control().await.code, code::ACK);
    drop(c);
    let mut again = agent.connect(Transport::Pair, Dialect::Hyperstart).await;
    // No READY on a reconnect: the first frame is GETVERSION's credit.
    let v = again.command(code::GETVERSION, b"").await.expect("version");
    assert_eq!(parse_version(&v), Some(4244));
}

#[tokio::test]
async fn strict_signals_pseudo_container_and_errors() {
    let agent = strict();
    let mut c = agent.connect(Transport::Pair, Dialect::Hyperstart).await;
    handshake(&mut c).await;
    c.exec("sleeper", &["sleep", "100"], 3, 4, false).await;
    let signal = json!({"container": "hyperstart", "process": "sleeper", "signal": 15});
    assert_eq!(c.json_command(24, signal).await, Err(String::new()));
    let resize = json!({"container": "hyperstart", "process": "sleeper", "row": 5, "column": 7});
    assert_eq!(
        c.json_command(code::WINSIZE, resize).await,
        Err(String::new())
    );
    // In a real container the signal works, and a signal death reports status 0.
    let init = json!({"id": "c1", "process": {"id": "init", "args": ["sleep", "100"],
        "stdio": 5, "stderr": 6}});
    c.json_command(code::NEWCONTAINER, init)
        .await
        .expect("newcontainer");
    let exec = json!({"container": "c1", "process": {"id": "side", "args": ["sleep", "100"],
        "stdio": 7, "stderr": 8}});
    c.json_command(code::EXECCMD, exec).await.expect("execcmd");
    let kill = json!({"container": "c1", "process": "side", "signal": 9});
    c.json_command(24, kill)
        .await
        .expect("signalprocess in a container");
    let status = wait_exit_in(&mut c, "c1", "side", 7, 8).await.2;
    assert_eq!(status, 0, "hyperstart reports 0 for a signal death");
    // KILLCONTAINER reaches the init only, and keeps its error text.
    let kill = json!({"container": "nope", "signal": 9, "allProcesses": false});
    let err = c.json_command(code::KILLCONTAINER, kill).await;
    assert!(err.is_err_and(|t| !t.is_empty()));
    let kill = json!({"container": "c1", "signal": 9, "allProcesses": false});
    c.json_command(code::KILLCONTAINER, kill)
        .await
        .expect("kill init");
    assert_eq!(wait_exit_in(&mut c, "c1", "init", 5, 6).await.2, 0);
    // The unknown-command ERROR has no text either.
    assert_eq!(c.command(99, b"").await, Err(String::new()));
}

#[test]
fn strict_needs_the_hyperstart_dialect() {
    let out = Command::new(env!("CARGO_BIN_EXE_cc-test-agent"))
        .args([
            "--dialect",
            "cc-agent",
            "--strict",
            "--hvsock",
            "/nonexistent/x",
        ])
        .output()
        .expect("run agent");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--strict"));
}
