//! The agent control channel through the real daemon (issue 3): VM registration and its life cycle, agent
//! commands forwarded by name, arbitration of many clients onto one channel, every error path with its stable
//! code, each agent fault mode, the `vm.lost` event, restart recovery and the keepalive probe.
//!
//! Each behaviour is checked in both dialects (cc-agent, hyperstart) and over both transports (hybrid vsock,
//! a unix socket pair) where the transport or dialect could change the outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use cc_proxy_api::client::{collect, run_stream, Client};
use cc_proxy_api::error as code;
use cc_proxy_api::types::VmInfo;
use jsonrpsee::core::client::{Subscription, SubscriptionClientT};
use jsonrpsee::rpc_params;
use jsonrpsee::ws_client::{WsClient, WsClientBuilder};
use serde_json::{json, Value};

use crate::common::{exec_data, Env};

/// The four ways a VM can be reached in these tests: (agent arguments, label, expected API version).
const SETUPS: [(&[&str], &str, u32); 4] = [
    (&["--dialect", "cc-agent"], "cc-hvsock", 4242),
    (&["--dialect", "cc-agent", "--pair"], "cc-pair", 4242),
    (&[], "hs-hvsock", 4244),
    (&["--pair"], "hs-pair", 4244),
];

/// The error code of a raw `env.rpc` response, if it is an error.
fn err_code(resp: &Value) -> Option<i64> {
    resp.pointer("/error/code").and_then(Value::as_i64)
}

/// Asserts that `resp` is an error with `expected` code.
fn assert_code(resp: &Value, expected: i32, what: &str) {
    assert_eq!(
        err_code(resp),
        Some(i64::from(expected)),
        "{what}: expected error {expected}, got {resp}"
    );
}

async fn ping(env: &Env, vm: &str) -> Value {
    env.rpc("agent.call", json!({"vm": vm, "command": "ping"}))
        .await
}

async fn info(env: &Env, vm: &str) -> VmInfo {
    env.client
        .vm_info(vm)
        .await
        .unwrap_or_else(|e| panic!("vm.info {vm}: {e}"))
}

/// Register with a custom READY timeout, returning the raw response.
async fn register_raw(env: &Env, id: &str, control: &str, io: &str, timeout_ms: u64) -> Value {
    env.rpc(
        "vm.register",
        json!({"id": id, "control": control, "io": io, "timeout_ms": timeout_ms}),
    )
    .await
}

/// Polls `vm.info` until the VM is lost; returns the info.
async fn wait_lost(env: &Env, vm: &str, within: Duration) -> VmInfo {
    let deadline = Instant::now() + within;
    loop {
        let i = info(env, vm).await;
        if i.state == "lost" {
            return i;
        }
        assert!(
            Instant::now() < deadline,
            "VM {vm} not lost after {within:?}: {i:?}\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A WebSocket JSON-RPC client on the daemon's unix socket, subscribed to `events.subscribe`.
async fn subscribe_events(env: &Env) -> (WsClient, Subscription<Value>) {
    let stream = tokio::net::UnixStream::connect(&env.socket)
        .await
        .expect("connect for WebSocket");
    let ws = WsClientBuilder::default()
        .build_with_stream("ws://localhost/", stream)
        .await
        .expect("WebSocket handshake on the daemon socket");
    let sub = ws
        .subscribe::<Value, _>("events.subscribe", rpc_params![], "events.unsubscribe")
        .await
        .expect("events.subscribe");
    (ws, sub)
}

/// Reads events until one matches `pred` or `within` passes.
async fn next_event(
    sub: &mut Subscription<Value>,
    within: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(Ok(ev))) if pred(&ev) => return Some(ev),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn life_cycle_in_both_dialects_and_transports() {
    let mut env = Env::start().await;
    for (args, label, api) in SETUPS {
        let agent = env.agent(args);
        let id = format!("vm-{label}");
        let reg = env.register(&id, &agent, None).await;
        let dialect = if api == 4242 {
            "cc-agent"
        } else {
            "hyperstart"
        };
        assert_eq!(
            (reg.id.as_str(), reg.dialect.as_str(), reg.api_version),
            (id.as_str(), dialect, api)
        );

        // vm.attach hands back the same VM without touching the agent.
        let att = env.rpc("vm.attach", json!({"id": id})).await;
        assert_eq!(att["result"]["dialect"], dialect, "{label}: {att}");
        assert_eq!(att["result"]["api_version"], api, "{label}: {att}");

        let before = info(&env, &id).await;
        assert_eq!(before.state, "ready", "{label}");
        assert_eq!(before.dialect, dialect, "{label}");
        assert_eq!(before.api_version, api, "{label}");
        assert_eq!((before.streams, before.tokens), (0, 0), "{label}");
        assert!(!before.recovered, "{label}");
        let (control, io) = agent.uris(None);
        assert_eq!(
            (before.control.as_str(), before.io.as_str()),
            (control.as_str(), io.as_str())
        );

        let p = ping(&env, &id).await;
        assert_eq!(p["result"]["data"], Value::Null, "{label}: ping {p}");
        let v = env
            .rpc("agent.call", json!({"vm": id, "command": "version"}))
            .await;
        let b64 = v["result"]["data_base64"]
            .as_str()
            .unwrap_or_else(|| panic!("{label}: version has no data_base64: {v}"));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        assert_eq!(raw, api.to_be_bytes().to_vec(), "{label}: GETVERSION bytes");

        // An agent ERROR counts as a command and as an error.
        let bad = env
            .rpc(
                "agent.call",
                json!({"vm": id, "command": "execcmd", "data": exec_data(&[])}),
            )
            .await;
        assert_code(&bad, code::AGENT_ERROR, label);
        let after = info(&env, &id).await;
        assert_eq!(after.commands, before.commands + 3, "{label}: {after:?}");
        assert_eq!(after.errors, before.errors + 1, "{label}: {after:?}");

        // A stream allocated then closed leaves no token behind.
        let alloc = env.rpc("stream.allocate", json!({"vm": id})).await;
        let token = alloc["result"]["token"]
            .as_str()
            .expect("token")
            .to_string();
        assert_eq!(token.len(), 44, "{alloc}");
        assert_eq!(info(&env, &id).await.tokens, 1);
        let closed = env.rpc("stream.close", json!({"token": token})).await;
        assert!(closed.get("result").is_some(), "{closed}");
        assert_eq!(info(&env, &id).await.tokens, 0);

        let list = env.client.vm_list().await.expect("vm.list");
        assert!(list.iter().any(|v| v.id == id), "{label}: {list:?}");

        env.client.unregister(&id).await.expect("unregister");
        assert_code(
            &env.rpc("vm.info", json!({"id": id})).await,
            code::VM_NOT_FOUND,
            "info after unregister",
        );
        let list = env.client.vm_list().await.expect("vm.list");
        assert!(!list.iter().any(|v| v.id == id), "{label}: {list:?}");
        // The agent is still there: the id can be registered again, within a second although
        // hyperstart (strict) sends READY only once per boot.
        let t0 = Instant::now();
        env.register(&id, &agent, None).await;
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "{label}: re-register took {:?}",
            t0.elapsed()
        );
        assert!(ping(&env, &id).await.get("result").is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_clients_are_all_answered() {
    let mut env = Env::start().await;
    let agent = env.agent(&[]);
    env.register("busy", &agent, None).await;
    // Processes exiting meanwhile make the hyperstart agent send PROCESSASYNCEVENT between commands and
    // replies: none of them may be taken for a reply.
    let mut procs = Vec::new();
    for p in 0..10 {
        let socket = env.socket.clone();
        procs.push(tokio::spawn(async move {
            let c = Client::new(&socket);
            let script = format!("sleep 0.{p}; exit {p}");
            let r = c
                .exec("busy", &["sh".into(), "-c".into(), script], false)
                .await
                .expect("exec");
            let mut s = c.attach(&r.token.expect("token")).await.expect("attach");
            let out = tokio::time::timeout(Duration::from_secs(20), collect(&mut s))
                .await
                .expect("exit delivered")
                .expect("io");
            (p, out.status)
        }));
    }
    let mut tasks = Vec::new();
    for i in 0..50 {
        let socket = env.socket.clone();
        tasks.push(tokio::spawn(async move {
            let c = Client::new(&socket);
            let command = if i % 2 == 0 { "ping" } else { "version" };
            c.call::<Value>("agent.call", json!({"vm": "busy", "command": command}))
                .await
                .map(|v| (i, v))
        }));
    }
    for t in tasks {
        let (i, v) = t.await.expect("join").expect("every call is answered");
        if i % 2 == 1 {
            assert_eq!(v["data_base64"], "AAAQlA==", "call {i}: {v}");
        } else {
            assert_eq!(v["data"], Value::Null, "ping {i}: {v}");
        }
    }
    for t in procs {
        let (p, status) = t.await.expect("join");
        assert_eq!(status, Some(p), "process {p}");
    }
    assert!(info(&env, "busy").await.commands >= 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_websocket_subscriber() {
    let mut env = Env::start().await;
    let (_ws, mut sub) = subscribe_events(&env).await;
    for (args, label, _) in SETUPS {
        let agent = env.agent(args);
        env.register(label, &agent, None).await;
        let ev = next_event(&mut sub, Duration::from_secs(5), |e| {
            e["event"] == "vm_registered" && e["vm"] == label
        })
        .await;
        assert!(ev.is_some(), "{label}: no vm_registered");
        let r = env
            .client
            .exec(label, &["sh".into(), "-c".into(), "exit 7".into()], false)
            .await
            .expect("exec");
        let token = r.token.expect("token");
        let ev = next_event(&mut sub, Duration::from_secs(10), |e| {
            e["event"] == "process_exited" && e["token"] == token[..8]
        })
        .await
        .unwrap_or_else(|| panic!("{label}: no process_exited"));
        // The event names the stream by its short id: no subscriber learns the token itself.
        assert!(!ev.to_string().contains(token.as_str()), "{label}: {ev}");
        assert_eq!(ev["status"], 7, "{label}: {ev}");
        assert_eq!(ev["vm"], label, "{label}: {ev}");
        env.client.unregister(label).await.expect("unregister");
        let ev = next_event(&mut sub, Duration::from_secs(5), |e| {
            e["event"] == "vm_unregistered" && e["vm"] == label
        })
        .await;
        assert!(ev.is_some(), "{label}: no vm_unregistered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_complete_in_submission_order() {
    let mut env = Env::start().await;
    let agent = env.agent(&[
        "--dialect",
        "cc-agent",
        "--fault",
        "slow-reply",
        "--slow-ms",
        "100",
    ]);
    env.register("fifo", &agent, None).await;
    let done = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..8usize {
        let socket = env.socket.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let c = Client::new(&socket);
            let r = c
                .call::<Value>("agent.call", json!({"vm": "fifo", "command": "ping"}))
                .await;
            done.lock().unwrap_or_else(|p| p.into_inner()).push(i);
            r
        }));
        // Submission order is fixed by spacing the calls well under one reply delay.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        t.await.expect("join").expect("answered");
    }
    let order = done.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(
        order,
        (0..8).collect::<Vec<_>>(),
        "replies out of FIFO order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_path_has_its_code() {
    let mut env = Env::start().await;
    let agent = env.agent(&[]);
    env.register("err", &agent, None).await;
    let (control, io) = agent.uris(None);

    let dup = register_raw(&env, "err", &control, &io, 2000).await;
    assert_code(&dup, code::VM_EXISTS, "duplicate id");
    assert_eq!(
        dup.pointer("/error/data/vm")
            .or(dup.pointer("/error/data/id")),
        Some(&json!("err")),
        "{dup}"
    );

    for (method, params) in [
        ("vm.info", json!({"id": "nope"})),
        ("vm.attach", json!({"id": "nope"})),
        ("vm.unregister", json!({"id": "nope"})),
        ("agent.call", json!({"vm": "nope", "command": "ping"})),
        ("stream.allocate", json!({"vm": "nope"})),
    ] {
        assert_code(&env.rpc(method, params).await, code::VM_NOT_FOUND, method);
    }

    for (c, i) in [
        ("nonsense", io.as_str()),
        ("ftp://host/x", io.as_str()),
        ("hvsock:///no/port", io.as_str()),
        ("vsock://abc:1", io.as_str()),
        (control.as_str(), "unix://"),
    ] {
        let r = register_raw(&env, "uri", c, i, 1000).await;
        assert_code(&r, code::INVALID_URI, &format!("uri {c} / {i}"));
    }

    let missing = env.dir.path().join("missing.sock").display().to_string();
    for (c, i) in [
        (format!("unix://{missing}"), format!("unix://{missing}-io")),
        (
            format!("hvsock://{missing}:2718"),
            format!("hvsock://{missing}:2719"),
        ),
    ] {
        assert_code(
            &register_raw(&env, "unreach", &c, &i, 1000).await,
            code::UNREACHABLE,
            &format!("missing socket {c}"),
        );
    }

    let long = "x".repeat(129);
    for bad in ["", "a/b", "../x", "sp ace", long.as_str()] {
        assert_code(
            &register_raw(&env, bad, &control, &io, 1000).await,
            code::INVALID_ARGUMENT,
            &format!("id {bad:?}"),
        );
    }
    // Failed registrations leave nothing behind.
    let ids: Vec<String> = env
        .client
        .vm_list()
        .await
        .expect("list")
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(ids, vec!["err".to_string()]);

    assert_code(
        &env.rpc("agent.call", json!({"vm": "err", "command": "frobnicate"}))
            .await,
        code::UNKNOWN_COMMAND,
        "unknown command",
    );
    let agent_err = env
        .rpc(
            "agent.call",
            json!({"vm": "err", "command": "execcmd", "data": exec_data(&[])}),
        )
        .await;
    assert_code(&agent_err, code::AGENT_ERROR, "execcmd with empty args");
    assert!(
        agent_err
            .pointer("/error/message")
            .and_then(Value::as_str)
            .is_some_and(|m| !m.is_empty()),
        "{agent_err}"
    );

    // A reply slower than the call's deadline.
    let slow = env.agent(&["--fault", "slow-reply", "--slow-ms", "1500"]);
    env.register("slow", &slow, None).await;
    let t0 = Instant::now();
    let r = env
        .rpc(
            "agent.call",
            json!({"vm": "slow", "command": "ping", "timeout_ms": 200}),
        )
        .await;
    assert_code(&r, code::AGENT_TIMEOUT, "slow reply");
    assert!(
        t0.elapsed() < Duration::from_millis(1200),
        "timeout took {:?}",
        t0.elapsed()
    );
    // The late reply must not be taken as the reply to the next command.
    let v = env
        .rpc(
            "agent.call",
            json!({"vm": "slow", "command": "version", "timeout_ms": 10000}),
        )
        .await;
    assert_eq!(
        v["result"]["data_base64"], "AAAQlA==",
        "reply after a timeout: {v}"
    );
    assert!(ping(&env, "err").await.get("result").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_without_ready_times_out() {
    let mut env = Env::start().await;
    for args in [&["--fault", "silent"][..], &["--fault", "silent", "--pair"]] {
        let agent = env.agent(args);
        let (control, io) = agent.uris(None);
        let t0 = Instant::now();
        let r = register_raw(&env, "silent", &control, &io, 500).await;
        let took = t0.elapsed();
        assert_code(&r, code::AGENT_TIMEOUT, "no READY, no reply");
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(3),
            "READY timeout took {took:?}"
        );
        assert_code(
            &env.rpc("vm.info", json!({"id": "silent"})).await,
            code::VM_NOT_FOUND,
            "a VM whose registration failed",
        );
    }
}

/// An agent that answers but sends no READY (hyperstart after its first connection) registers
/// at once: the daemon waits briefly for READY, then probes with GETVERSION.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_past_its_ready_registers_within_a_second() {
    let mut env = Env::start().await;
    for args in [
        &["--fault", "no-ready"][..],
        &["--fault", "no-ready", "--dialect", "cc-agent", "--pair"],
    ] {
        let agent = env.agent(args);
        let t0 = Instant::now();
        let reg = env.register("late", &agent, None).await;
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "{args:?}: took {:?}",
            t0.elapsed()
        );
        assert!(ping(&env, "late").await.get("result").is_some(), "{reg:?}");
        env.client.unregister("late").await.expect("unregister");
    }
}

/// One fault that kills the VM's agent connection: the call fails promptly, the VM is lost, a subscriber
/// hears `vm_lost`, and another VM keeps working.
async fn check_fatal_fault(fault: &str, dialect_args: &[&str]) {
    let mut env = Env::start().await;
    let healthy = env.agent(&[]);
    env.register("healthy", &healthy, None).await;
    let mut args = vec!["--fault", fault];
    args.extend_from_slice(dialect_args);
    let bad = env.agent(&args);
    env.register("victim", &bad, None).await;
    let (_ws, mut sub) = subscribe_events(&env).await;

    let t0 = Instant::now();
    let r = env
        .rpc(
            "agent.call",
            json!({"vm": "victim", "command": "ping", "timeout_ms": 20000}),
        )
        .await;
    assert!(
        err_code(&r).is_some(),
        "{fault}: the call must fail, got {r}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "{fault}: the call took {:?} to fail",
        t0.elapsed()
    );
    let i = wait_lost(&env, "victim", Duration::from_secs(3)).await;
    assert!(
        i.lost_reason.as_deref().is_some_and(|r| !r.is_empty()),
        "{fault}: {i:?}"
    );
    let ev = next_event(&mut sub, Duration::from_secs(5), |e| {
        e["event"] == "vm_lost" && e["vm"] == "victim"
    })
    .await;
    assert!(ev.is_some(), "{fault}: no vm_lost event delivered");

    // Later calls fail at once with VM_LOST; the daemon and the other VM are fine.
    assert_code(&ping(&env, "victim").await, code::VM_LOST, fault);
    assert!(
        ping(&env, "healthy").await.get("result").is_some(),
        "{fault}"
    );
    let health = env.rpc("proxy.health", json!({})).await;
    assert_eq!(health["result"]["vms_lost"], 1, "{health}");
    // A lost VM stays listed until unregistered.
    env.client
        .unregister("victim")
        .await
        .expect("unregister lost VM");
    assert_code(
        &env.rpc("vm.info", json!({"id": "victim"})).await,
        code::VM_NOT_FOUND,
        fault,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_dying_mid_command_loses_only_its_vm() {
    check_fatal_fault("die-mid-command", &[]).await;
    check_fatal_fault("die-mid-command", &["--dialect", "cc-agent", "--pair"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sending_garbage_loses_only_its_vm() {
    check_fatal_fault("garbage", &["--dialect", "cc-agent"]).await;
    check_fatal_fault("garbage", &["--pair"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_vms_and_tokens() {
    let mut env = Env::start().await;
    let hs = env.agent(&[]);
    let cc = env.agent(&["--dialect", "cc-agent", "--pair"]);
    env.register("rec-hs", &hs, None).await;
    env.register("rec-cc", &cc, None).await;
    let mut tokens = Vec::new();
    for vm in ["rec-hs", "rec-cc"] {
        let r = env
            .client
            .exec(
                vm,
                &[
                    "sh".into(),
                    "-c".into(),
                    "echo before; echo warn >&2; read x; echo got:$x; exit 4".into(),
                ],
                false,
            )
            .await
            .expect("exec");
        tokens.push((vm, r.token.expect("token")));
    }
    // Let the daemon read the early output into the (unattached) streams before it restarts: a graceful
    // restart must hand it to the next daemon.
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.restart_daemon().await;
    // vm.info answers at once during recovery (state `recovering`): wait for the outcome first.
    let deadline = Instant::now() + Duration::from_secs(10);
    while crate::common::http_get(&env.admin, "/ready").await.0 != 200 {
        assert!(Instant::now() < deadline, "recovery did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (vm, token) in tokens {
        let i = info(&env, vm).await;
        assert!(i.recovered, "{vm}: {i:?}");
        assert_eq!(i.state, "ready", "{vm}: {i:?}");
        assert_eq!(i.tokens, 1, "{vm}: {i:?}");
        assert!(ping(&env, vm).await.get("result").is_some(), "{vm}");
        let mut s = env
            .client
            .attach(&token)
            .await
            .unwrap_or_else(|e| panic!("{vm}: attach after restart: {e}\n{}", env.logs()));
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            run_stream(&mut s, b"hello\n", true),
        )
        .await
        .unwrap_or_else(|_| panic!("{vm}: stream did not end\n{}", env.logs()))
        .expect("stream");
        assert_eq!(out.stdout, b"before\ngot:hello\n", "{vm}: {out:?}");
        assert_eq!(out.stderr, b"warn\n", "{vm}: {out:?}");
        assert_eq!(out.status, Some(4), "{vm}: {out:?}");
        let deadline = Instant::now() + Duration::from_secs(3);
        while info(&env, vm).await.tokens != 0 {
            assert!(
                Instant::now() < deadline,
                "{vm}: token not freed after exit"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // New registrations still work after recovery.
    let extra = env.agent(&[]);
    env.register("after", &extra, None).await;
    assert!(ping(&env, "after").await.get("result").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_detects_a_hung_agent() {
    let mut env = Env::start_with(&["--agent-keepalive", "1"]).await;
    let hung = env.agent(&["--dialect", "cc-agent"]);
    let fine = env.agent(&["--pair"]);
    env.register("hung", &hung, None).await;
    env.register("fine", &fine, None).await;
    // Idle agents that answer keep the VM ready.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(info(&env, "hung").await.state, "ready");
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &hung.pid.to_string()])
        .status()
        .expect("kill -STOP");
    assert!(stopped.success());
    let t0 = Instant::now();
    let i = wait_lost(&env, "hung", Duration::from_secs(15)).await;
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &hung.pid.to_string()])
        .status();
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "lost after {:?}",
        t0.elapsed()
    );
    assert!(i.lost_reason.is_some(), "{i:?}");
    assert_eq!(info(&env, "fine").await.state, "ready");
    assert!(ping(&env, "fine").await.get("result").is_some());
}

/// `readfile` answers raw bytes and `writefile` takes raw bytes after its JSON object: both pass
/// through the daemon unchanged (`data_base64` always, `data` only for exactly-JSON bytes;
/// `payload_base64` appended after `data`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_payloads_are_byte_exact() {
    let mut env = Env::start().await;
    let agent = env.agent(&["--pair"]);
    env.register("files", &agent, None).await;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = env.dir.path().to_path_buf();
    let mut binary: Vec<u8> = (0..=255u8).collect();
    binary.extend_from_slice(b"\n{\"not\": json");
    for (name, content) in [
        ("spaced.json", b"  {\"x\": 1}\n".to_vec()),
        ("binary", binary),
        ("compact.json", b"{\"x\":1}".to_vec()),
    ] {
        let path = dir.join(name).display().to_string();
        let r = env
            .rpc(
                "agent.call",
                json!({"vm": "files", "command": "writefile",
                       "data": {"container": "hyperstart", "file": path},
                       "payload_base64": b64.encode(&content)}),
            )
            .await;
        assert!(r.get("result").is_some(), "{name}: {r}");
        assert_eq!(std::fs::read(&path).expect("written"), content, "{name}");
        let r = env
            .rpc(
                "agent.call",
                json!({"vm": "files", "command": "readfile",
                       "data": {"container": "hyperstart", "file": path}}),
            )
            .await;
        let got = b64
            .decode(r["result"]["data_base64"].as_str().expect("data_base64"))
            .expect("base64");
        assert_eq!(got, content, "{name}: {r}");
        if name == "compact.json" {
            assert_eq!(r["result"]["data"], json!({"x": 1}), "{r}");
        } else {
            assert_eq!(r["result"]["data"], Value::Null, "{name}: {r}");
        }
    }
    let r = env
        .rpc(
            "agent.call",
            json!({"vm": "files", "command": "writefile", "data": {"file": "/x"},
                   "payload_base64": "not base64!"}),
        )
        .await;
    assert_code(&r, code::INVALID_ARGUMENT, "bad payload_base64");
}

/// The original project's mock hyperstart answers GETVERSION with an empty ACK: registration
/// accepts it with a warning and the cc-agent dialect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_version_reply_is_accepted_with_a_warning() {
    let mut env = Env::start().await;
    let agent = env.agent(&[
        "--dialect",
        "cc-agent",
        "--fault",
        "empty-version",
        "--pair",
    ]);
    let reg = env.register("mock", &agent, None).await;
    assert_eq!((reg.dialect.as_str(), reg.api_version), ("cc-agent", 4242));
    assert!(env.logs().contains("without a version"), "{}", env.logs());
    let out = env.cli(&["exec", "mock", "--", "echo", "hi"], b"");
    assert_eq!(out.stdout, b"hi\n", "{out:?}");
}
