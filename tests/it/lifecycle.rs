//! Daemon life cycle around VMs: SIGTERM drains in-flight agent calls before the VMs stop, a second signal
//! exits at once, and a VM's console lines reach the daemon's log.

use std::time::{Duration, Instant};

use cc_proxy_api::types::RegisterParams;
use serde_json::json;

use crate::common::{eventually, Env};

fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(st.success());
}

fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Lines the daemon logged (at debug) for control frames sent to an agent.
fn control_frames_sent(env: &Env) -> usize {
    env.logs().matches("to agent (control)").count()
}

/// Waits until the daemon has sent one more control frame than `before`: the call is in flight at the agent.
async fn wait_sent(env: &Env, before: usize) {
    let sent = eventually(Duration::from_secs(10), || {
        control_frames_sent(env) > before
    })
    .await;
    assert!(sent, "the call never reached the agent\n{}", env.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_agent_call_finish() {
    // Debug logs each control frame sent; no keepalive PING may be counted as the call.
    let mut env = Env::start_with(&["--log", "debug", "--agent-keepalive", "0"]).await;
    let agent = env.agent(&["--fault", "slow-reply", "--slow-ms", "1200"]);
    env.register("slow", &agent, None).await;
    let before = control_frames_sent(&env);
    let client = cc_proxy_api::client::Client::new(&env.socket);
    let call = tokio::spawn(async move {
        client
            .call::<serde_json::Value>("agent.call", json!({"vm": "slow", "command": "ping"}))
            .await
    });
    wait_sent(&env, before).await;
    let status = env.stop_daemon().await;
    assert!(status.success(), "exit status {status}");
    let reply = call.await.expect("join");
    assert!(
        reply.is_ok(),
        "the in-flight call must complete during the drain: {reply:?}\n{}",
        env.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    // Debug logs each control frame sent; no keepalive PING may be counted as the call.
    let mut env = Env::start_with(&["--log", "debug", "--agent-keepalive", "0"]).await;
    let agent = env.agent(&["--fault", "slow-reply", "--slow-ms", "2500"]);
    env.register("slower", &agent, None).await;
    let before = control_frames_sent(&env);
    let client = cc_proxy_api::client::Client::new(&env.socket);
    let call = tokio::spawn(async move {
        client
            .call::<serde_json::Value>("agent.call", json!({"vm": "slower", "command": "ping"}))
            .await
    });
    wait_sent(&env, before).await;
    let pid = env.daemon_pid();
    let t0 = Instant::now();
    signal(pid, "TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !wait_exit(pid, Duration::from_millis(100)),
        "the first signal drains; it must not exit yet"
    );
    signal(pid, "TERM");
    assert!(
        wait_exit(pid, Duration::from_secs(2)),
        "a second signal must exit at once"
    );
    assert!(
        t0.elapsed() < Duration::from_millis(2000),
        "took {:?}",
        t0.elapsed()
    );
    assert!(call.await.expect("join").is_err(), "the dropped call fails");
    assert!(env.logs().contains("second signal"), "{}", env.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_lines_are_logged_at_debug_with_the_vm() {
    let mut env = Env::start_with(&["--log", "debug"]).await;
    let agent = env.agent(&[]);
    // A console endpoint like a VMM's serial console socket: it writes the guest's lines to whoever connects.
    let console = env.dir.path().join("console.sock");
    let listener = tokio::net::UnixListener::bind(&console).expect("bind console");
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        if let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"[    0.000000] Linux version 6.1.0 (guest)\r\nguest agent \x1b[1mstarted\x1b[0m\n").await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    let (control, io) = agent.uris(None);
    env.client
        .register(&RegisterParams {
            id: "withconsole".into(),
            control,
            io,
            console: Some(format!("unix://{}", console.display())),
            timeout_ms: Some(5000),
            mesh: None,
        })
        .await
        .expect("register");
    let logged = eventually(Duration::from_secs(5), || {
        let logs = env.logs();
        logs.lines().any(|l| {
            l.contains("Linux version 6.1.0 (guest)")
                && l.contains("withconsole")
                && l.contains("guest")
        }) && logs.contains("guest agent \\x1b[1mstarted")
    })
    .await;
    assert!(
        logged,
        "console lines (escaped, with the VM and source) missing:\n{}",
        env.logs()
    );
    let info = env.rpc("vm.info", json!({"id": "withconsole"})).await;
    assert_eq!(
        info["result"]["console"],
        json!(format!("unix://{}", console.display()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_client_vanishes_leaks_no_token() {
    let mut env = Env::start().await;
    let agent = env.agent(&["--fault", "slow-reply", "--slow-ms", "600"]);
    env.register("vanish", &agent, None).await;
    // A client sends an execcmd with a stream and hangs up before the (slow) reply.
    {
        use tokio::io::AsyncWriteExt;
        let body =
            json!({"jsonrpc": "2.0", "id": 1, "method": "agent.call", "params": {"vm": "vanish",
            "command": "execcmd", "streams": 1, "data": crate::common::exec_data(&["true"])}})
            .to_string();
        let mut s = tokio::net::UnixStream::connect(&env.socket)
            .await
            .expect("connect");
        let req = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let freed = {
        let mut ok = false;
        for _ in 0..100 {
            let info = env.rpc("vm.info", json!({"id": "vanish"})).await;
            if info["result"]["tokens"] == json!(0) {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ok
    };
    assert!(
        freed,
        "the vanished client's token must be freed:\n{}",
        env.logs()
    );
}
