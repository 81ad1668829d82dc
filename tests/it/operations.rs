//! What an operator meets on a real host (issue 13): one daemon per state directory, requests that arrive
//! while the VMs are being recovered after a restart, a lost VM replaced by a new registration, and the socket
//! directory's group.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{free_addr, proxy_bin, Env};

/// Wait up to `timeout` for a child to exit; kill it and fail when it does not.
fn exit_within(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process was still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let mut env = Env::start().await;
    let agent = env.agent(&[]);
    env.register("mine", &agent, None).await;

    // The README's mistake: another socket, the same (default) state directory.
    let other = env.dir.path().join("other.sock");
    let mut second = Command::new(proxy_bin())
        .arg("--socket")
        .arg(&other)
        .arg("--state-dir")
        .arg(&env.state_dir)
        .args(["--admin-addr", &free_addr(), "--log-target", "stderr"])
        .args(["--log", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the second daemon");
    let status = exit_within(&mut second, Duration::from_secs(10));
    let mut stderr = String::new();
    std::io::Read::read_to_string(second.stderr.as_mut().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert_eq!(status.code(), Some(1), "{stderr}");
    let wanted = format!(
        "another cc-proxy (pid {}) is using the state directory {}",
        env.daemon_pid(),
        env.state_dir.display()
    );
    assert_eq!(
        stderr.matches(&wanted).count(),
        1,
        "one clear line naming the owner: {stderr:?}"
    );
    assert!(
        !other.exists(),
        "the refused daemon must not leave a socket"
    );

    // The first daemon keeps its VM and its agent connection.
    let info = env.client.vm_info("mine").await.expect("vm.info");
    assert_eq!(info.state, "ready", "{info:?}\n{}", env.logs());
    let ping = env
        .rpc("agent.call", json!({"vm": "mine", "command": "ping"}))
        .await;
    assert!(ping.get("result").is_some(), "{ping}");

    // Once it has stopped, the directory is free for the next daemon.
    env.restart_daemon().await;
    let info = env.client.vm_info("mine").await.expect("vm.info");
    assert_eq!(info.state, "ready", "{info:?}");
}
