//! Hostile clients: whatever arrives on the socket, the daemon keeps serving everyone else.

use std::time::Duration;

use cc_proxy_api::stream::{Channel, Frame};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::common::{exec_data, Env};

/// A small deterministic generator, so a failure can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

async fn assert_serves(env: &Env) {
    let r = tokio::time::timeout(Duration::from_secs(5), env.rpc("proxy.health", json!({}))).await;
    assert!(
        r.is_ok_and(|v| v["result"]["status"] == "ok"),
        "daemon stopped serving:\n{}",
        env.logs()
    );
}

/// Write `data`, then read whatever comes back until EOF or a short timeout.
async fn poke(env: &Env, data: &[u8]) {
    let Ok(mut s) = UnixStream::connect(&env.socket).await else {
        return;
    };
    let _ = s.write_all(data).await;
    let _ = s.shutdown().await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(300), s.read_to_end(&mut sink)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_on_the_socket_harm_no_one() {
    let mut env = Env::start().await;
    let agent = env.agent(&[]);
    env.register("victim", &agent, None).await;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for round in 0..300u32 {
        let len = (rng.next() % 600) as usize;
        let mut data = rng.bytes(len);
        // A third of the inputs look like the legacy protocol, a third like HTTP, the rest anything.
        match round % 3 {
            0 => data.splice(0..0, [0u8, 2]).for_each(drop),
            1 => data
                .splice(0..0, *b"POST / HTTP/1.1\r\nContent-Length: 99999\r\n")
                .for_each(drop),
            _ => {}
        }
        poke(&env, &data).await;
    }
    assert_serves(&env).await;
    let r = env
        .client
        .call::<serde_json::Value>("agent.call", json!({"vm": "victim", "command": "ping"}))
        .await;
    assert!(r.is_ok(), "the VM must be unharmed: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_and_huge_headers_do_not_block_others() {
    let env = Env::start().await;
    // Connections that never say anything hold no one up (each is dropped after the detection timeout).
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(UnixStream::connect(&env.socket).await.expect("connect"));
    }
    assert_serves(&env).await;
    // A header section far over any sane size is refused.
    let mut s = UnixStream::connect(&env.socket).await.expect("connect");
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\nX-Junk: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 1 << 20));
    let _ = s.write_all(&req).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || text.starts_with("HTTP/1.1 4"),
        "huge headers answered with: {text:.200}"
    );
    drop(idle);
    assert_serves(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_an_attached_stream_closes_only_that_attachment() {
    let mut env = Env::start().await;
    let agent = env.agent(&[]);
    env.register("g", &agent, None).await;
    let started = env
        .client
        .agent_call(&cc_proxy_api::types::AgentCallParams {
            vm: "g".into(),
            command: "execcmd".into(),
            data: Some(exec_data(&["sh", "-c", "read line; echo got:$line"])),
            timeout_ms: None,
            streams: Some(1),
            token: None,
            payload_base64: None,
        })
        .await
        .expect("exec");
    let token = started.token.expect("token");
    // An unknown channel byte: the daemon closes this attachment.
    let mut bad = env.client.attach(&token).await.expect("attach");
    {
        use tokio::io::AsyncWriteExt as _;
        let io = bad.get_mut();
        let _ = io.write_all(&[9, 0, 0, 0, 1, b'x']).await;
        let _ = io.flush().await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = bad.next().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the daemon must close a shim that sends garbage"
    );
    drop(bad);
    // The token is still good: a well-behaved shim re-attaches and finishes the process.
    let mut good = None;
    for _ in 0..50 {
        match env.client.attach(&token).await {
            Ok(s) => {
                good = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let mut good = good.expect("re-attach after the bad shim");
    good.send(Frame::new(Channel::Stdin, &b"hello\n"[..]))
        .await
        .expect("stdin");
    let out = cc_proxy_api::client::collect(&mut good)
        .await
        .expect("collect");
    assert_eq!(out.stdout, b"got:hello\n");
    assert_eq!(out.status, Some(0));
    assert_serves(&env).await;
}

/// `--max-connections`: connections past the limit are closed on accept, the open ones keep working, and
/// the daemon serves new clients again once one leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_and_the_daemon_keeps_serving() {
    const LIMIT: usize = 3;
    let env = Env::start_with(&["--max-connections", "3"]).await;
    // Idle connections (their protocol not known yet) take the slots; the first one past the limit is
    // closed at once. The harness may hold a connection of its own, so count only what stays open.
    let mut held = Vec::new();
    let mut closed = 0;
    for _ in 0..LIMIT + 2 {
        let mut s = UnixStream::connect(&env.socket)
            .await
            .expect("the kernel accepts the connection");
        let mut buf = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            Ok(Ok(_)) => panic!("the daemon sent bytes unasked"),
            Err(_) => held.push(s),
        }
    }
    assert!(
        held.len() <= LIMIT && closed >= 2,
        "{} connections stayed open, {closed} were closed (limit {LIMIT}):\n{}",
        held.len(),
        env.logs()
    );
    assert!(
        env.logs().contains("too many open"),
        "the refusal is logged:\n{}",
        env.logs()
    );
    // The held ones leave: the daemon serves a new client.
    held.clear();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_serves(&env).await;
}

/// Client text that reaches a log line (an unknown legacy id, a URI that does not parse, a shim's bad control
/// message) is escaped: it cannot start a line of its own. And at trace level the daemon's log carries no whole
/// stream token (the JSON-RPC library's own trace output of requests and responses stays off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_text_cannot_forge_log_lines_and_trace_logs_carry_no_token() {
    let mut env = Env::start_with(&["--log", "trace"]).await;
    let agent = env.agent(&["--dialect", "cc-agent"]);
    env.register("logvm", &agent, None).await;
    let forged = "x\nERROR cc_proxy: forged";

    // Legacy AttachVM of an unknown id that holds a line break.
    let mut s = UnixStream::connect(&env.socket).await.expect("connect");
    let payload = json!({"containerId": forged}).to_string();
    let mut frame = vec![0, 2, 3, 0, 0, 0, 0, 2];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload.as_bytes());
    s.write_all(&frame).await.expect("write");
    let mut answer = [0u8; 512];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer)).await;
    // A registration whose URI holds one.
    let r = env
        .rpc(
            "vm.register",
            json!({"id": "bad", "control": format!("unix:///tmp/{forged}"), "io": "unix:///tmp/io", "timeout_ms": 500}),
        )
        .await;
    assert!(r.get("error").is_some(), "{r}");

    // A shim attaches and sends a control message with one.
    let token = env
        .client
        .stream_allocate("logvm")
        .await
        .expect("allocate")
        .token;
    let mut shim = env.client.attach(&token).await.expect("attach");
    let bad = Frame {
        channel: Channel::Control,
        payload: bytes::Bytes::from(json!({"op": forged}).to_string()),
    };
    let _ = shim.send(bad).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), shim.next()).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = env.logs();
    assert!(
        !logs
            .lines()
            .any(|l| l.starts_with("ERROR cc_proxy: forged")),
        "a client forged a log line:\n{logs}"
    );
    assert!(
        logs.contains("ERROR cc_proxy: forged"),
        "the text was not logged at all:\n{logs}"
    );
    assert!(
        !logs.contains(&token),
        "a whole token in the trace log:\n{logs}"
    );
    let _ = env.stop_daemon().await;
}
