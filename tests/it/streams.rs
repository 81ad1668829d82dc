//! Process stdio through the real daemon (issue 4): output separation and fidelity, bulk transfer, stdin with
//! EOF, exit codes, signals and terminal resize, output kept before attach, detach and re-attach, many
//! processes across many VMs, a stalled shim, token errors, VM death mid-stream, the `exec`/`vm` client
//! subcommands, the raw I/O dump at `--log debug`, and that tokens are freed once exits are delivered.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cc_proxy_api::client::{collect, control_frame, run_stream, AttachedStream, Client, Collected};
use cc_proxy_api::error as code;
use cc_proxy_api::stream::{Channel, ControlMessage, Frame};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::Env;

/// (agent arguments, label) for both dialects over both transports.
const SETUPS: [(&[&str], &str); 4] = [
    (&["--dialect", "cc-agent"], "cc-hvsock"),
    (&["--dialect", "cc-agent", "--pair"], "cc-pair"),
    (&[], "hs-hvsock"),
    (&["--pair"], "hs-pair"),
];

/// Upper bound for one short process's stream.
const SHORT: Duration = Duration::from_secs(15);

/// The status a setup reports for a process killed by `signal`: the daemon passes on what the
/// agent says, which is 128 + N except under (strict) hyperstart, which reports 0.
fn signal_status(label: &str, signal: i32) -> i32 {
    if label.starts_with("hs-") {
        0
    } else {
        128 + signal
    }
}

/// Start `script` under `sh -c` with a stream in a real container `container` (created with a
/// `sleep` init first): hyperstart signals and resizes only processes of real containers.
async fn start_in_container(
    client: &Client,
    vm: &str,
    container: &str,
    script: &str,
    terminal: bool,
) -> String {
    client
        .call::<Value>(
            "agent.call",
            json!({"vm": vm, "command": "newcontainer",
                   "data": {"id": container, "process": {"args": ["sleep", "30"]}}}),
        )
        .await
        .unwrap_or_else(|e| panic!("newcontainer on {vm}: {e}"));
    let r = client
        .call::<Value>(
            "agent.call",
            json!({"vm": vm, "command": "execcmd", "streams": 1,
                   "data": {"container": container,
                            "process": {"args": sh(script), "terminal": terminal}}}),
        )
        .await
        .unwrap_or_else(|e| panic!("execcmd on {vm}: {e}"));
    r["token"].as_str().expect("a token").to_string()
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// Start `script` under `sh -c` with a stream; returns the token.
async fn start(client: &Client, vm: &str, script: &str, terminal: bool) -> String {
    client
        .exec(vm, &sh(script), terminal)
        .await
        .unwrap_or_else(|e| panic!("exec on {vm}: {e}"))
        .token
        .expect("a token")
}

async fn attach(env: &Env, token: &str) -> AttachedStream {
    env.client
        .attach(token)
        .await
        .unwrap_or_else(|e| panic!("attach: {e}\n{}", env.logs()))
}

/// Send `stdin` and its EOF, then read the stream to its end.
///
/// Unlike `run_stream`, a failed write does not end the exchange: a process that finished before its stdin
/// was written has had its stream completed and closed by the daemon, yet everything it sent is still there to
/// read.
async fn feed_and_collect(s: &mut AttachedStream, stdin: &[u8]) -> std::io::Result<Collected> {
    let mut open = true;
    for chunk in stdin.chunks(64 * 1024) {
        if s.send(Frame::new(Channel::Stdin, Bytes::copy_from_slice(chunk)))
            .await
            .is_err()
        {
            open = false;
            break;
        }
    }
    if open {
        let _ = s.send(Frame::new(Channel::Stdin, Bytes::new())).await;
    }
    collect(s).await
}

/// Start, attach, feed `stdin` (then EOF) and collect everything.
async fn run(env: &Env, vm: &str, script: &str, stdin: &[u8]) -> Collected {
    let token = start(&env.client, vm, script, false).await;
    let mut s = attach(env, &token).await;
    tokio::time::timeout(SHORT, feed_and_collect(&mut s, stdin))
        .await
        .unwrap_or_else(|_| panic!("{vm}: `{script}` did not finish\n{}", env.logs()))
        .expect("stream I/O")
}

async fn tokens(env: &Env, vm: &str) -> usize {
    env.client.vm_info(vm).await.expect("vm.info").tokens
}

/// Waits until the VM holds no token (exits delivered, tokens freed).
async fn assert_no_tokens(env: &Env, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = tokens(env, vm).await;
        if n == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{vm}: {n} tokens still live");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn attach_code(r: Result<AttachedStream, cc_proxy_api::client::ClientError>) -> Option<i32> {
    match r {
        Ok(_) => None,
        Err(e) => e.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_and_exit_codes_in_both_dialects_and_transports() {
    let mut env = Env::start().await;
    for (args, label) in SETUPS {
        let agent = env.agent(args);
        env.register(label, &agent, None).await;

        let out = run(
            &env,
            label,
            "echo out; echo err >&2; echo out2; exit 3",
            b"",
        )
        .await;
        assert_eq!(out.stdout, b"out\nout2\n", "{label}: {out:?}");
        assert_eq!(out.stderr, b"err\n", "{label}: {out:?}");
        assert_eq!(out.status, Some(3), "{label}: {out:?}");

        let out = run(&env, label, "true", b"").await;
        assert_eq!(
            (out.status, out.stdout.len()),
            (Some(0), 0),
            "{label}: {out:?}"
        );

        let out = run(&env, label, "echo bye; kill -9 $$", b"").await;
        assert_eq!(out.stdout, b"bye\n", "{label}: {out:?}");
        assert_eq!(
            out.status,
            Some(signal_status(label, 9)),
            "{label}: {out:?}"
        );

        // stdin round trip through cat, ended by the empty stdin frame; larger than one agent packet.
        // hyperstart discards stdin that arrives while the process's pipe (64 KiB) is full, which a
        // process still starting up cannot prevent: stay below that there.
        let size: u32 = if label.starts_with("hs-") {
            60_000
        } else {
            200_000
        };
        let input: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let out = run(&env, label, "cat", &input).await;
        assert_eq!(out.status, Some(0), "{label}");
        assert!(
            out.stdout == input,
            "{label}: cat returned {} bytes",
            out.stdout.len()
        );

        // Every byte value, in order, on both channels.
        let all: Vec<u8> = (0..=255u8).collect();
        let file = env.dir.path().join(format!("bytes-{label}"));
        std::fs::write(&file, &all).expect("write bytes file");
        let f = file.display();
        let out = run(&env, label, &format!("cat {f}; cat {f} >&2"), b"").await;
        assert_eq!(out.stdout, all, "{label}: stdout bytes");
        assert_eq!(out.stderr, all, "{label}: stderr bytes");

        assert_no_tokens(&env, label).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_of_output_arrive_intact() {
    let mut env = Env::start().await;
    let agent = env.agent(&[]);
    env.register("bulk", &agent, None).await;
    let file = env.dir.path().join("bulk.bin");
    let token = start(
        &env.client,
        "bulk",
        &format!("head -c 104857600 /dev/urandom | tee {}", file.display()),
        false,
    )
    .await;
    let mut s = attach(&env, &token).await;
    let mut hash = Sha256::new();
    let mut len = 0usize;
    let mut status = None;
    let t0 = Instant::now();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(60), s.next())
        .await
        .expect("bulk stream stalled")
    {
        let frame = frame.expect("frame");
        match frame.channel {
            Channel::Stdout => {
                hash.update(&frame.payload);
                len += frame.payload.len();
            }
            Channel::Exit => {
                status = frame.exit_status();
                break;
            }
            other => panic!("unexpected {other:?} frame: {:?}", frame.payload),
        }
    }
    eprintln!("100 MiB in {:?}", t0.elapsed());
    assert_eq!(status, Some(0));
    assert_eq!(len, 104_857_600);
    let written = std::fs::read(&file).expect("tee file");
    assert_eq!(
        hash.finalize()[..],
        Sha256::digest(&written)[..],
        "checksum"
    );
    assert_no_tokens(&env, "bulk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_and_resize_reach_the_process() {
    let mut env = Env::start().await;
    for (args, label) in SETUPS {
        let agent = env.agent(args);
        env.register(label, &agent, None).await;

        // stream.signal on a container's first process (both dialects can signal it).
        let r = env
            .client
            .call::<Value>(
                "agent.call",
                json!({"vm": label, "command": "newcontainer", "streams": 1,
                       "data": {"id": format!("c-{label}"), "process": {"args": ["sleep", "30"]}}}),
            )
            .await
            .expect("newcontainer");
        let token = r["token"].as_str().expect("token").to_string();
        let mut s = attach(&env, &token).await;
        env.client.signal(&token, 15).await.expect("stream.signal");
        let out = tokio::time::timeout(SHORT, collect(&mut s))
            .await
            .expect("exit")
            .expect("io");
        assert_eq!(
            out.status,
            Some(signal_status(label, 15)),
            "{label}: {out:?}"
        );

        // A signal sent as a control frame by the shim.
        let r = env
            .client
            .call::<Value>(
                "agent.call",
                json!({"vm": label, "command": "newcontainer", "streams": 1,
                       "data": {"id": format!("d-{label}"), "process": {"args": ["sleep", "30"]}}}),
            )
            .await
            .expect("newcontainer");
        let token = r["token"].as_str().expect("token").to_string();
        let mut s = attach(&env, &token).await;
        s.send(control_frame(&ControlMessage::Signal { signal: 9 }))
            .await
            .expect("send signal frame");
        let out = tokio::time::timeout(SHORT, collect(&mut s))
            .await
            .expect("exit")
            .expect("io");
        assert_eq!(
            out.status,
            Some(signal_status(label, 9)),
            "{label}: {out:?}"
        );

        // Resize on a terminal: the process reports the new size once told to go on.
        let container = format!("t-{label}");
        let script = "read x; stty size";
        let token = start_in_container(&env.client, label, &container, script, true).await;
        let mut s = attach(&env, &token).await;
        env.client
            .resize(&token, 33, 77)
            .await
            .expect("stream.resize");
        s.send(Frame::new(Channel::Stdin, Bytes::from_static(b"go\n")))
            .await
            .expect("stdin");
        let out = tokio::time::timeout(SHORT, collect(&mut s))
            .await
            .expect("exit")
            .expect("io");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("33 77"), "{label}: terminal output {text:?}");
        assert_eq!(out.status, Some(0), "{label}: {out:?}");
        assert!(
            out.stderr.is_empty(),
            "{label}: a terminal has no separate stderr"
        );

        // And as a control frame.
        let token = start_in_container(&env.client, label, &container, script, true).await;
        let mut s = attach(&env, &token).await;
        s.send(control_frame(&ControlMessage::Resize {
            rows: 12,
            cols: 101,
        }))
        .await
        .expect("resize frame");
        // The control frame is handled before the stdin that follows it on the same connection.
        s.send(Frame::new(Channel::Stdin, Bytes::from_static(b"go\n")))
            .await
            .expect("stdin");
        let out = tokio::time::timeout(SHORT, collect(&mut s))
            .await
            .expect("exit")
            .expect("io");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("12 101"), "{label}: terminal output {text:?}");

        assert_no_tokens(&env, label).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_before_attach_and_across_detach_is_kept() {
    let mut env = Env::start().await;
    for (args, label) in [SETUPS[0], SETUPS[3]] {
        let agent = env.agent(args);
        env.register(label, &agent, None).await;

        let token = start(&env.client, label, "echo early; echo late >&2", false).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut s = attach(&env, &token).await;
        let out = tokio::time::timeout(SHORT, collect(&mut s))
            .await
            .expect("end")
            .expect("io");
        assert_eq!(
            (out.stdout.as_slice(), out.stderr.as_slice()),
            (&b"early\n"[..], &b"late\n"[..])
        );
        assert_eq!(out.status, Some(0));

        // A numbered sequence read by two attachments in turn: the union is the whole sequence, in order.
        let n = 400;
        let token = start(
            &env.client,
            label,
            &format!("i=1; while [ $i -le {n} ]; do echo $i; i=$((i+1)); [ $((i % 40)) = 0 ] && sleep 0.05; done; exit 0"),
            false,
        )
        .await;
        let mut seen = Vec::new();
        let mut s = attach(&env, &token).await;
        while !String::from_utf8_lossy(&seen).lines().any(|l| l == "60") {
            let f = tokio::time::timeout(SHORT, s.next())
                .await
                .expect("output")
                .expect("open")
                .expect("frame");
            assert_eq!(f.channel, Channel::Stdout, "{label}: {f:?}");
            seen.extend_from_slice(&f.payload);
        }
        s.send(control_frame(&ControlMessage::Detach))
            .await
            .expect("detach");
        loop {
            let f = tokio::time::timeout(SHORT, s.next())
                .await
                .expect("detach acknowledgement")
                .expect("stream open until detached")
                .expect("frame");
            match f.channel {
                Channel::Stdout => seen.extend_from_slice(&f.payload),
                Channel::Control => {
                    let v: Value = serde_json::from_slice(&f.payload).expect("control JSON");
                    assert_eq!(v, json!({"op": "detached"}), "{label}");
                    break;
                }
                other => panic!("{label}: unexpected {other:?} before detached"),
            }
        }
        drop(s);
        assert_eq!(
            tokens(&env, label).await,
            1,
            "{label}: token kept across detach"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut s = attach(&env, &token).await;
        let out = tokio::time::timeout(SHORT, collect(&mut s))
            .await
            .expect("end")
            .expect("io");
        assert_eq!((out.status, &out.error), (Some(0), &None), "{label}");
        seen.extend_from_slice(&out.stdout);
        let text = String::from_utf8_lossy(&seen);
        let got: Vec<u32> = text.lines().map(|l| l.parse().expect("a number")).collect();
        assert_eq!(
            got,
            (1..=n).collect::<Vec<u32>>(),
            "{label}: sequence across re-attach"
        );
        assert_no_tokens(&env, label).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_processes_across_ten_vms() {
    let mut env = Env::start().await;
    let hs = env.agent(&["--count", "5"]);
    let cc = env.agent(&["--count", "5", "--dialect", "cc-agent", "--pair"]);
    let mut vms = Vec::new();
    for i in 0..5 {
        env.register(&format!("hs{i}"), &hs, Some(i)).await;
        env.register(&format!("cc{i}"), &cc, Some(i)).await;
        vms.push(format!("hs{i}"));
        vms.push(format!("cc{i}"));
    }
    let mut tasks = Vec::new();
    for p in 0..100usize {
        let vm = vms[p % 10].clone();
        let socket = env.socket.clone();
        tasks.push(tokio::spawn(async move {
            let client = Client::new(&socket);
            let script = format!(
                "echo {vm}-{p}; head -c {} /dev/zero | tr '\\0' x; echo e{p} >&2; exit {}",
                1000 * p,
                p % 7
            );
            let token = start(&client, &vm, &script, false).await;
            let mut s = client.attach(&token).await.expect("attach");
            let out = tokio::time::timeout(Duration::from_secs(60), feed_and_collect(&mut s, b""))
                .await
                .expect("process finished")
                .expect("io");
            (vm, p, out)
        }));
    }
    for t in tasks {
        let (vm, p, out) = t.await.expect("join");
        let mut want = format!("{vm}-{p}\n").into_bytes();
        want.extend(std::iter::repeat_n(b'x', 1000 * p));
        assert!(
            out.stdout == want,
            "{vm}/{p}: {} bytes of stdout",
            out.stdout.len()
        );
        assert_eq!(out.stderr, format!("e{p}\n").into_bytes(), "{vm}/{p}");
        assert_eq!(out.status, Some((p % 7) as i32), "{vm}/{p}");
    }
    for vm in &vms {
        assert_no_tokens(&env, vm).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_shim_does_not_block_or_corrupt_others() {
    let mut env = Env::start_with(&["--stream-buffer", "65536"]).await;
    let agent = env.agent(&[]);
    env.register("stall", &agent, None).await;
    let size = 8 * 1024 * 1024;
    let stalled_token = start(
        &env.client,
        "stall",
        &format!("head -c {size} /dev/zero"),
        false,
    )
    .await;
    // Attached, then not read: the socket and the stream's own 64 KiB buffer fill up (the rest waits in the
    // VM-wide overflow budget).
    let mut stalled = attach(&env, &stalled_token).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let t0 = Instant::now();
    let other = tokio::time::timeout(Duration::from_secs(10), async {
        let token = start(&env.client, "stall", "echo other", false).await;
        let mut s = attach(&env, &token).await;
        collect(&mut s).await.expect("io")
    })
    .await;
    let other = other.unwrap_or_else(|_| {
        panic!(
            "another stream on the same VM is blocked by a stalled shim ({:?})",
            t0.elapsed()
        )
    });
    assert_eq!(other.stdout, b"other\n");
    assert_eq!(other.status, Some(0));
    assert!(ping_ok(&env, "stall").await);

    // The stalled stream, read at last, is complete and intact.
    let out = tokio::time::timeout(Duration::from_secs(60), collect(&mut stalled))
        .await
        .expect("stalled stream ends")
        .expect("io");
    assert_eq!(out.error, None);
    assert_eq!(out.stdout.len(), size);
    assert!(out.stdout.iter().all(|&b| b == 0));
    assert_eq!(out.status, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_shim_is_not_taken_for_a_stalled_one() {
    // The stream's own bound is 64 KiB and the VM's budget 4 MiB, so the I/O channel pauses with about 4 MiB
    // queued for this shim; it then drains at about 1 MiB/s, so getting back under the bound takes about
    // 4 s, four times the 1 s stall timeout. A shim that keeps reading is not stalled: nothing may fail.
    let mut env = Env::start_with(&[
        "--stream-buffer",
        "65536",
        "--vm-buffer",
        "4194304",
        "--stall-timeout",
        "1",
    ])
    .await;
    let agent = env.agent(&[]);
    env.register("steady", &agent, None).await;
    let size = 8 * 1024 * 1024;
    let token = start(
        &env.client,
        "steady",
        &format!("head -c {size} /dev/zero"),
        false,
    )
    .await;
    let mut s = attach(&env, &token).await;
    // Let the process fill every buffer before reading starts (less than the stall timeout: until then the
    // shim reads nothing, which would rightly count as a stall).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut len = 0usize;
    let mut since_pause = 0usize;
    let mut status = None;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(30), s.next())
        .await
        .expect("stream stalled")
    {
        let frame = frame.expect("frame");
        match frame.channel {
            Channel::Stdout => {
                len += frame.payload.len();
                since_pause += frame.payload.len();
                if since_pause >= 64 * 1024 {
                    since_pause = 0;
                    tokio::time::sleep(Duration::from_millis(60)).await;
                }
            }
            Channel::Exit => {
                status = frame.exit_status();
                break;
            }
            other => panic!("unexpected {other:?} frame: {:?}", frame.payload),
        }
    }
    assert_eq!(len, size);
    assert_eq!(status, Some(0));
}

async fn ping_ok(env: &Env, vm: &str) -> bool {
    env.rpc("agent.call", json!({"vm": vm, "command": "ping"}))
        .await
        .get("result")
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_errors() {
    let mut env = Env::start().await;
    let a = env.agent(&[]);
    let b = env.agent(&["--dialect", "cc-agent"]);
    env.register("ta", &a, None).await;
    env.register("tb", &b, None).await;

    // Malformed and unknown tokens: 404 with code 1009.
    assert_eq!(
        attach_code(env.client.attach("nonsense").await),
        Some(code::TOKEN_NOT_FOUND)
    );
    let unknown = "A".repeat(44);
    assert_eq!(
        attach_code(env.client.attach(&unknown).await),
        Some(code::TOKEN_NOT_FOUND)
    );
    let raw = raw_attach(&env, "nonsense").await;
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
    assert!(raw.contains("1009"), "{raw}");

    // A token of VM ta used on VM tb.
    let alloc: Value = env
        .client
        .call("stream.allocate", json!({"vm": "ta"}))
        .await
        .expect("allocate");
    let foreign = alloc["token"].as_str().expect("token").to_string();
    let r = env
        .rpc(
            "agent.call",
            json!({"vm": "tb", "command": "execcmd", "token": foreign,
                   "data": {"container": "hyperstart", "process": {"args": ["true"]}}}),
        )
        .await;
    assert_eq!(
        r.pointer("/error/code").and_then(Value::as_i64),
        Some(1009),
        "{r}"
    );
    // Used on its own VM it works, and a second attach is refused while the first is there.
    let r = env
        .rpc(
            "agent.call",
            json!({"vm": "ta", "command": "execcmd", "token": foreign,
                   "data": {"container": "hyperstart", "process": {"args": ["sh", "-c", "read x; echo $x"]}}}),
        )
        .await;
    assert_eq!(r["result"]["token"], json!(foreign), "{r}");
    let mut s = attach(&env, &foreign).await;
    assert_eq!(
        attach_code(env.client.attach(&foreign).await),
        Some(code::STREAM_BUSY)
    );
    let out = tokio::time::timeout(SHORT, run_stream(&mut s, b"hi\n", true))
        .await
        .expect("end")
        .expect("io");
    assert_eq!((out.stdout.as_slice(), out.status), (&b"hi\n"[..], Some(0)));
    // Finished: the token is gone.
    assert_no_tokens(&env, "ta").await;
    assert_eq!(
        attach_code(env.client.attach(&foreign).await),
        Some(code::TOKEN_NOT_FOUND)
    );
    let r = env
        .rpc("stream.signal", json!({"token": foreign, "signal": 15}))
        .await;
    assert_eq!(
        r.pointer("/error/code").and_then(Value::as_i64),
        Some(1009),
        "{r}"
    );

    // Closed on purpose: gone too.
    let token = start(&env.client, "tb", "sleep 30", false).await;
    let r = env.rpc("stream.close", json!({"token": token})).await;
    assert!(r.get("result").is_some(), "{r}");
    assert_eq!(
        attach_code(env.client.attach(&token).await),
        Some(code::TOKEN_NOT_FOUND)
    );
    let r = env.rpc("stream.close", json!({"token": token})).await;
    assert_eq!(
        r.pointer("/error/code").and_then(Value::as_i64),
        Some(1009),
        "{r}"
    );
}

/// A raw attach request with the proper upgrade headers; returns the response head and body.
async fn raw_attach(env: &Env, token: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(&env.socket)
        .await
        .expect("connect");
    let req = format!(
        "POST /v1/streams/{token} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: cc-proxy-stream\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("response")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_death_mid_stream_ends_with_an_error_frame() {
    let mut env = Env::start().await;
    for (args, label) in [SETUPS[1], SETUPS[2]] {
        let agent = env.agent(args);
        env.register(label, &agent, None).await;
        let token = start(&env.client, label, "echo started; sleep 30", false).await;
        let mut s = attach(&env, &token).await;
        let f = tokio::time::timeout(SHORT, s.next())
            .await
            .expect("first output")
            .expect("open")
            .expect("frame");
        assert_eq!(f.payload.as_ref(), b"started\n");
        env.kill_agent(&agent);
        let t0 = Instant::now();
        let out = tokio::time::timeout(SHORT, collect(&mut s))
            .await
            .expect("stream ends")
            .expect("io");
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(out.status, None, "{label}: {out:?}");
        assert!(
            out.error.as_deref().is_some_and(|e| e.contains(label)),
            "{label}: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_vm_subcommands() {
    let mut env = Env::start().await;
    // Lenient: this checks that the CLI exits with the 128 + N the agent reports.
    let agent = env.agent(&["--lenient"]);
    env.register("cli", &agent, None).await;
    let out = env.cli(
        &[
            "exec",
            "cli",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 5",
        ],
        b"",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(5));
    let out = env.cli(&["exec", "cli", "--", "sh", "-c", "kill -9 $$"], b"");
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    let out = env.cli(&["exec", "cli", "--", "cat"], b"through stdin\n");
    assert_eq!(out.stdout, b"through stdin\n");
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let out = env.cli(&["vm", "list"], b"");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("cli") && l.contains("ready")),
        "{text}"
    );
    let out = env.cli(&["--json", "vm", "info", "cli"], b"");
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("vm info JSON");
    assert_eq!(v["id"], "cli");
    assert_eq!(v["state"], "ready");
    assert_eq!(v["dialect"], "hyperstart");
    assert_eq!(v["tokens"], 0, "{v}");
    let out = env.cli(&["vm", "info", "absent"], b"");
    assert!(!out.status.success());
    assert!(!out.stderr.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_log_dumps_raw_io() {
    let mut env = Env::start_with(&["--log", "debug"]).await;
    let agent = env.agent(&["--dialect", "cc-agent"]);
    env.register("dump", &agent, None).await;
    let token = start(
        &env.client,
        "dump",
        "read x; printf 'tab\\there\\001\\n'",
        false,
    )
    .await;
    let mut s = attach(&env, &token).await;
    let out = tokio::time::timeout(SHORT, run_stream(&mut s, b"in\\put\n", true))
        .await
        .expect("end")
        .expect("io");
    assert_eq!(out.stdout, b"tab\there\x01\n");
    let seq = 3; // the first token of a VM
    let logs = env.logs();
    let find = |direction: &str, data: &str| {
        logs.lines().any(|l| {
            l.contains("dump")
                && l.contains(&format!("seq={seq}"))
                && l.contains(direction)
                && l.contains(data)
                && l.contains("len=")
        })
    };
    assert!(
        find("from_agent", r"tab\there\x01\n"),
        "no dump of the output:\n{logs}"
    );
    assert!(
        find("to_agent", r"in\\put\n"),
        "no dump of the input:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abruptly_dropped_shim_can_reattach_without_gaps() {
    let mut env = Env::start().await;
    let agent = env.agent(&["--pair"]);
    env.register("drop", &agent, None).await;
    let n = 300u32;
    // The process pauses after line 40, so when the shim drops there nothing is in flight: whatever the
    // dropped shim had received but not read is its own loss, not the daemon's (there are no acknowledgements).
    let token = start(
        &env.client,
        "drop",
        &format!(
            "i=1; while [ $i -le {n} ]; do echo $i; [ $i = 40 ] && sleep 1; i=$((i+1)); \
             [ $((i % 30)) = 0 ] && sleep 0.05; done; exit 0"
        ),
        false,
    )
    .await;
    let mut seen = Vec::new();
    let mut s = attach(&env, &token).await;
    while !String::from_utf8_lossy(&seen).lines().any(|l| l == "40") {
        let f = tokio::time::timeout(SHORT, s.next())
            .await
            .expect("output")
            .expect("open")
            .expect("frame");
        seen.extend_from_slice(&f.payload);
    }
    // No detach: the connection just goes away, as when a shim crashes.
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match env.client.attach(&token).await {
            Ok(s) => break s,
            // The daemon may not have noticed the drop yet.
            Err(e) if e.code() == Some(code::STREAM_BUSY) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("re-attach: {e}"),
        }
    };
    let out = tokio::time::timeout(SHORT, collect(&mut s))
        .await
        .expect("end")
        .expect("io");
    assert_eq!((out.status, &out.error), (Some(0), &None));
    seen.extend_from_slice(&out.stdout);
    let got: Vec<u32> = String::from_utf8_lossy(&seen)
        .lines()
        .map(|l| l.parse().expect("a whole number per line"))
        .collect();
    assert_eq!(
        got,
        (1..=n).collect::<Vec<u32>>(),
        "sequence across the drop"
    );
    assert_no_tokens(&env, "drop").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_stream_requests_are_refused() {
    let mut env = Env::start().await;
    let agent = env.agent(&[]);
    env.register("inv", &agent, None).await;
    let code_of = |v: &Value| v.pointer("/error/code").and_then(Value::as_i64);
    let invalid = Some(i64::from(code::INVALID_ARGUMENT));

    let r = env
        .rpc(
            "agent.call",
            json!({"vm": "inv", "command": "ping", "streams": 1}),
        )
        .await;
    assert_eq!(code_of(&r), invalid, "stream on ping: {r}");
    let r = env
        .rpc(
            "agent.call",
            json!({"vm": "inv", "command": "execcmd", "streams": 2,
                   "data": {"container": "hyperstart", "process": {"args": ["true"]}}}),
        )
        .await;
    assert_eq!(code_of(&r), invalid, "two streams: {r}");
    let r = env
        .rpc(
            "agent.call",
            json!({"vm": "inv", "command": "execcmd", "streams": 1, "data": {"process": {"args": ["true"]}}}),
        )
        .await;
    assert_eq!(code_of(&r), invalid, "no container: {r}");
    assert_eq!(
        tokens(&env, "inv").await,
        0,
        "refused starts leave no token"
    );

    // Signal or resize before the process is started: held for the start (issue 12; they used to be
    // refused), but a bad signal number is still refused at once.
    let alloc: Value = env
        .client
        .call("stream.allocate", json!({"vm": "inv"}))
        .await
        .expect("allocate");
    let token = alloc["token"].as_str().expect("token");
    let r = env
        .rpc("stream.signal", json!({"token": token, "signal": 15}))
        .await;
    assert!(
        r.get("result").is_some(),
        "signal before start is held: {r}"
    );
    let r = env
        .rpc("stream.signal", json!({"token": token, "signal": 65}))
        .await;
    assert_eq!(code_of(&r), invalid, "bad signal before start: {r}");
    let r = env
        .rpc(
            "stream.resize",
            json!({"token": token, "rows": 1, "cols": 1}),
        )
        .await;
    assert!(
        r.get("result").is_some(),
        "resize before start is held: {r}"
    );

    // A process id already running in the container (hyperstart names processes by id).
    let data =
        json!({"container": "hyperstart", "process": {"id": "dup", "args": ["sleep", "30"]}});
    let r = env
        .rpc(
            "agent.call",
            json!({"vm": "inv", "command": "execcmd", "streams": 1, "data": data}),
        )
        .await;
    let first = r["result"]["token"]
        .as_str()
        .expect("first start")
        .to_string();
    let r = env
        .rpc(
            "agent.call",
            json!({"vm": "inv", "command": "execcmd", "streams": 1, "data": data}),
        )
        .await;
    assert_eq!(code_of(&r), invalid, "duplicate process id: {r}");
    let r = env
        .rpc("stream.signal", json!({"token": first, "signal": 99}))
        .await;
    assert_eq!(code_of(&r), invalid, "signal 99: {r}");

    // Unregistering the VM ends its attached stream with an error frame and frees its tokens.
    let mut s = attach(&env, &first).await;
    env.client.unregister("inv").await.expect("unregister");
    let out = tokio::time::timeout(SHORT, collect(&mut s))
        .await
        .expect("stream ends")
        .expect("io");
    assert!(out.error.is_some() && out.status.is_none(), "{out:?}");
    assert_eq!(
        attach_code(env.client.attach(&first).await),
        Some(code::TOKEN_NOT_FOUND)
    );
}

/// Real hyperstart dies on an I/O packet over 4096 bytes and discards stdin that overflows its
/// 512-byte per-process buffer: stdin of any size must arrive whole (the strict agent checks
/// both rules).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyperstart_stdin_of_any_size_arrives_whole() {
    let mut env = Env::start().await;
    let agent = env.agent(&["--pair"]);
    env.register("hs", &agent, None).await;
    let out = env.cli(&["exec", "hs", "--", "wc", "-c"], &[0u8; 5000]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "5000",
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // Many small shim frames (500 bytes each) are re-cut, not passed on as they come. Below the
    // 64 KiB of a pipe: hyperstart discards what arrives while the pipe is full (documented).
    let token = start(&env.client, "hs", "sha256sum", false).await;
    let mut s = attach(&env, &token).await;
    let input: Vec<u8> = (0..60_000u32).map(|i| (i % 253) as u8).collect();
    for chunk in input.chunks(500) {
        s.feed(Frame::new(Channel::Stdin, Bytes::copy_from_slice(chunk)))
            .await
            .expect("stdin");
    }
    s.send(Frame::new(Channel::Stdin, Bytes::new()))
        .await
        .expect("stdin EOF");
    let out = tokio::time::timeout(SHORT, collect(&mut s))
        .await
        .expect("exit")
        .expect("io");
    let want = format!("{:x}", Sha256::digest(&input));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&want),
        "{out:?}"
    );
    assert_eq!(out.status, Some(0));
    assert!(env.client.vm_info("hs").await.expect("vm.info").state == "ready");
}

/// A signal reaches only the process its token names. cc-agent can signal only a container's init
/// (KILLCONTAINER): a signal for an `execcmd` token is refused there and the init lives on.
/// hyperstart refuses signals in its pseudo-container, and the error says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_only_the_tokens_process() {
    let mut env = Env::start().await;
    let cc = env.agent(&["--dialect", "cc-agent", "--pair"]);
    env.register("cc", &cc, None).await;
    let init = env
        .client
        .call::<Value>(
            "agent.call",
            json!({"vm": "cc", "command": "newcontainer", "streams": 1,
                   "data": {"id": "c1", "process": {"args": ["sleep", "30"]}}}),
        )
        .await
        .expect("newcontainer");
    let init_token = init["token"].as_str().expect("token").to_string();
    let exec = env
        .client
        .call::<Value>(
            "agent.call",
            json!({"vm": "cc", "command": "execcmd", "streams": 1,
                   "data": {"container": "c1", "process": {"args": ["sleep", "30"]}}}),
        )
        .await
        .expect("execcmd");
    let exec_token = exec["token"].as_str().expect("token").to_string();
    let r = env
        .rpc("stream.signal", json!({"token": exec_token, "signal": 15}))
        .await;
    assert_eq!(r["error"]["code"], code::INVALID_ARGUMENT, "{r}");
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("execcmd") && msg.contains("init"), "{msg}");
    // The shim's signal control frame is refused the same way.
    let mut s = attach(&env, &exec_token).await;
    s.send(control_frame(&ControlMessage::Signal { signal: 9 }))
        .await
        .expect("signal frame");
    // The init is still running: its own signal ends it with its own status.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut init_stream = attach(&env, &init_token).await;
    env.client
        .signal(&init_token, 9)
        .await
        .expect("signal init");
    let out = tokio::time::timeout(SHORT, collect(&mut init_stream))
        .await
        .expect("init exit")
        .expect("io");
    assert_eq!(
        out.status,
        Some(137),
        "the init was killed earlier? {out:?}"
    );
    // The exec'd process was never signalled: it is still there until killed with its container.
    let info = env.client.vm_info("cc").await.expect("vm.info");
    assert!(info.streams >= 1, "{info:?}");
    drop(s);

    let hs = env.agent(&["--pair"]);
    env.register("hs", &hs, None).await;
    let token = start(&env.client, "hs", "sleep 30", false).await;
    let r = env
        .rpc("stream.signal", json!({"token": token, "signal": 15}))
        .await;
    assert_eq!(r["error"]["code"], code::AGENT_ERROR, "{r}");
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("pseudo-container"), "{msg}");
}

/// Signals and resizes sent before the process started are held and delivered, in order, at the
/// start (they used to be refused, and a shim's first resize was lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_and_resizes_before_the_start_are_delivered_at_the_start() {
    let mut env = Env::start().await;
    for (args, label) in SETUPS {
        let agent = env.agent(args);
        env.register(label, &agent, None).await;
        let container = format!("c-{label}");
        env.client
            .call::<Value>(
                "agent.call",
                json!({"vm": label, "command": "newcontainer",
                       "data": {"id": container, "process": {"args": ["sleep", "30"]}}}),
            )
            .await
            .expect("newcontainer");
        // A resize through the API before the start (the call returns before the start), and one
        // sent by the shim before the start: the process sees the size.
        for (via_shim, rows, cols) in [(false, 33u16, 77u16), (true, 44, 88)] {
            let alloc = env.rpc("stream.allocate", json!({"id": label})).await;
            let token = alloc["result"]["token"]
                .as_str()
                .expect("token")
                .to_string();
            if !via_shim {
                env.client
                    .resize(&token, rows, cols)
                    .await
                    .expect("held resize");
            }
            let mut s = attach(&env, &token).await;
            // A shim's first resize, sent before the start, is not lost.
            if via_shim {
                s.send(control_frame(&ControlMessage::Resize { rows, cols }))
                    .await
                    .expect("resize frame");
            }
            // Held requests are delivered before the start command returns; the process reads its
            // size once told to go on, after that.
            let script = "read x; stty size";
            env.client
                .call::<Value>(
                    "agent.call",
                    json!({"vm": label, "command": "execcmd", "token": token,
                           "data": {"container": container,
                                    "process": {"args": sh(script), "terminal": true}}}),
                )
                .await
                .expect("execcmd");
            s.send(Frame::new(Channel::Stdin, Bytes::from_static(b"go\n")))
                .await
                .expect("stdin");
            let out = tokio::time::timeout(SHORT, collect(&mut s))
                .await
                .expect("exit")
                .expect("io");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains(&format!("{rows} {cols}")),
                "{label}: {text:?}"
            );
        }

        // A signal held for a container's init ends it once it starts.
        let alloc = env.rpc("stream.allocate", json!({"id": label})).await;
        let token = alloc["result"]["token"]
            .as_str()
            .expect("token")
            .to_string();
        env.client.signal(&token, 15).await.expect("held signal");
        let mut s = attach(&env, &token).await;
        env.client
            .call::<Value>(
                "agent.call",
                json!({"vm": label, "command": "newcontainer", "token": token,
                       "data": {"id": format!("k-{label}"), "process": {"args": ["sleep", "30"]}}}),
            )
            .await
            .expect("newcontainer");
        let t0 = Instant::now();
        let out = tokio::time::timeout(SHORT, collect(&mut s))
            .await
            .expect("exit")
            .expect("io");
        assert_eq!(
            out.status,
            Some(signal_status(label, 15)),
            "{label}: {out:?}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{label}: the sleep ran out"
        );

        // The hold is bounded.
        let alloc = env.rpc("stream.allocate", json!({"id": label})).await;
        let token = alloc["result"]["token"]
            .as_str()
            .expect("token")
            .to_string();
        for _ in 0..16 {
            env.client.resize(&token, 1, 1).await.expect("held");
        }
        let r = env
            .rpc(
                "stream.resize",
                json!({"token": token, "rows": 2, "cols": 2}),
            )
            .await;
        assert_eq!(r["error"]["code"], code::LIMIT_EXCEEDED, "{label}: {r}");
        let r = env.rpc("stream.close", json!({"token": token})).await;
        assert!(r.get("result").is_some(), "{r}");
    }
}

/// `cc-proxy exec --tty` under a real pseudo-terminal: the local terminal is raw while the process
/// runs and restored after, the process starts with the local window size, and a window change
/// (SIGWINCH) follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_tty_is_raw_and_follows_the_window() {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use nix::pty::{openpty, Winsize};
    use nix::sys::termios::{tcgetattr, LocalFlags};

    let mut env = Env::start().await;
    for (args, label) in [
        (&["--dialect", "cc-agent", "--pair"][..], "cc"),
        // Lenient: real hyperstart refuses WINSIZE in the `hyperstart` pseudo-container.
        (&["--pair", "--lenient"][..], "hs"),
    ] {
        let agent = env.agent(args);
        env.register(label, &agent, None).await;
        let size = |rows, cols| Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&size(41, 113)), None).expect("openpty");
        let slave = std::fs::File::from(pty.slave);
        let stdio = || std::process::Stdio::from(slave.try_clone().expect("dup slave"));
        // The size is applied right after the start (agents take no initial size): the process
        // prints it on each line it reads.
        let script = "while read x; do stty size; [ \"$x\" = q ] && exit 7; done";
        let mut child = std::process::Command::new("setsid")
            .args(["--ctty", "--wait"])
            .arg(crate::common::proxy_bin())
            .arg("--socket")
            .arg(&env.socket)
            .args(["exec", "--tty", label, "--", "sh", "-c", script])
            .stdin(stdio())
            .stdout(stdio())
            .stderr(stdio())
            .spawn()
            .expect("spawn cc-proxy exec --tty");
        // Killed if the test fails half-way (a client on a terminal would otherwise linger).
        struct Reap(u32);
        impl Drop for Reap {
            fn drop(&mut self) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &self.0.to_string()])
                    .status();
            }
        }
        let _reap = Reap(child.id());
        let master = std::fs::File::from(pty.master);
        let mut reader = master.try_clone().expect("dup master");
        let screen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().expect("screen").push_str(&text);
            }
        });
        let seen = |what: &str| screen.lock().is_ok_and(|s| s.contains(what));
        let mut writer = master.try_clone().expect("dup master");
        let mut type_until = |what: &'static str| {
            let deadline = Instant::now() + SHORT;
            while !seen(what) {
                assert!(
                    Instant::now() < deadline,
                    "{label}: {what:?} not seen: {:?}",
                    screen.lock().map(|s| s.clone())
                );
                writer.write_all(b"go\r").expect("type");
                std::thread::sleep(Duration::from_millis(300));
            }
        };
        type_until("41 113");
        let flags = tcgetattr(slave.as_fd()).expect("tcgetattr").local_flags;
        assert!(
            !flags.contains(LocalFlags::ICANON) && !flags.contains(LocalFlags::ECHO),
            "{label}: local terminal not raw: {flags:?}"
        );
        // The window changes: the kernel sends SIGWINCH to the client, which forwards the size.
        // SAFETY: TIOCSWINSZ reads one winsize struct through a valid pointer to a local value.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&master),
                libc::TIOCSWINSZ,
                &size(20, 30),
            )
        };
        assert_eq!(rc, 0, "TIOCSWINSZ");
        type_until("20 30");
        let mut writer = master.try_clone().expect("dup master");
        writer.write_all(b"q\r").expect("type q");
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("wait");
        assert_eq!(
            status.code(),
            Some(7),
            "{label}: {:?}",
            screen.lock().map(|s| s.clone())
        );
        let flags = tcgetattr(slave.as_fd()).expect("tcgetattr").local_flags;
        assert!(
            flags.contains(LocalFlags::ICANON) && flags.contains(LocalFlags::ECHO),
            "{label}: local terminal not restored: {flags:?}"
        );
    }
}
