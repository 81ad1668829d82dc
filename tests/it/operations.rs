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
    assert_eq!(stderr.matches("--state-dir").count(), 1, "{stderr:?}");
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

    // Once it has stopped, the directory is free for the next daemon. The socket serves before the recorded
    // VM is reconnected, so wait for the recovery to finish (bounded) before looking at its state.
    env.restart_daemon().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = env.client.vm_info("mine").await.expect("vm.info");
        if info.state != "recovering" || Instant::now() >= deadline {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(info.state, "ready", "{info:?}");
}

/// Send a signal to a process with kill(1).
fn kill(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(st.success(), "kill -{sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_a_vm_being_recovered_wait_for_it() {
    let mut env = Env::start().await;
    // An agent slow to answer anything: the restarted daemon needs ~4 s to get its GETVERSION reply.
    let agent = env.agent(&[
        "--dialect",
        "cc-agent",
        "--fault",
        "slow-reply",
        "--slow-ms",
        "4000",
    ]);
    env.register("slow", &agent, None).await;
    let started = env
        .client
        .exec(
            "slow",
            &[
                "sh".into(),
                "-c".into(),
                "echo before; read x; echo got:$x; exit 3".into(),
            ],
            false,
        )
        .await
        .expect("exec");
    let token = started.token.expect("token");
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.restart_daemon().await;
    let t0 = Instant::now();

    // Listed, with its real state, while the daemon reconnects it: never "no VM registered".
    let info = env.rpc("vm.info", json!({"id": "slow"})).await;
    assert_eq!(info["result"]["state"], "recovering", "{info}");
    assert_eq!(info["result"]["dialect"], "cc-agent", "{info}");
    assert_eq!(info["result"]["tokens"], 1, "{info}");
    let list = env.client.vm_list().await.expect("vm.list");
    assert_eq!(
        list.iter()
            .map(|v| (v.id.as_str(), v.state.as_str()))
            .collect::<Vec<_>>(),
        vec![("slow", "recovering")],
        "{list:?}"
    );
    let health = env.rpc("proxy.health", json!({})).await;
    assert_eq!(health["result"]["vms"], 1, "{health}");
    assert_eq!(health["result"]["vms_recovering"], 1, "{health}");
    let cli = env.cli(&["vm", "info", "slow"], b"");
    assert!(
        cli.status.success() && String::from_utf8_lossy(&cli.stdout).contains("recovering"),
        "{cli:?}"
    );
    let cli = env.cli(&["vm", "list"], b"");
    let table = String::from_utf8_lossy(&cli.stdout).into_owned();
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("slow "))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        row.get(1..3),
        Some(&["recovering", "cc-agent"][..]),
        "{table}"
    );
    assert!(
        t0.elapsed() < Duration::from_millis(3000),
        "the checks above must not wait for the recovery ({:?})",
        t0.elapsed()
    );

    // A call, a shim's re-attach and vm.attach issued now wait for the outcome and then proceed.
    let socket = env.socket.clone();
    let call = tokio::spawn(async move {
        let c = cc_proxy_api::client::Client::new(&socket);
        let r = c
            .call::<serde_json::Value>("agent.call", json!({"vm": "slow", "command": "ping"}))
            .await;
        (r, Instant::now())
    });
    let socket = env.socket.clone();
    let attach = tokio::spawn(async move {
        let c = cc_proxy_api::client::Client::new(&socket);
        c.call::<serde_json::Value>("vm.attach", json!({"id": "slow"}))
            .await
    });
    let mut stream = env
        .client
        .attach(&token)
        .await
        .unwrap_or_else(|e| panic!("re-attach during recovery: {e}\n{}", env.logs()));
    let out = tokio::time::timeout(
        Duration::from_secs(15),
        cc_proxy_api::client::run_stream(&mut stream, b"hello\n", true),
    )
    .await
    .expect("stream did not end")
    .expect("stream");
    assert_eq!(out.stdout, b"before\ngot:hello\n", "{out:?}");
    assert_eq!(out.status, Some(3), "{out:?}");
    let (reply, done) = call.await.expect("join");
    assert!(reply.is_ok(), "{reply:?}\n{}", env.logs());
    assert!(
        done - t0 >= Duration::from_millis(3000),
        "the ping waited for the reconnection: {:?}",
        done - t0
    );
    let attached = attach.await.expect("join").expect("vm.attach");
    assert_eq!(attached["dialect"], "cc-agent", "{attached}");
    let info = env.client.vm_info("slow").await.expect("vm.info");
    assert_eq!((info.state.as_str(), info.recovered), ("ready", true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_recovery_fails_answers_with_its_real_state() {
    let mut env = Env::start_with(&["--recovery-timeout", "2"]).await;
    let agent = env.agent(&[]);
    env.register("frozen", &agent, None).await;
    // The VM hangs (its VMM is stopped): the restarted daemon's reconnection cannot finish.
    kill(agent.pid, "STOP");
    env.restart_daemon().await;
    let t0 = Instant::now();
    let info = env.rpc("vm.info", json!({"id": "frozen"})).await;
    assert_eq!(info["result"]["state"], "recovering", "{info}");

    let ping = env
        .rpc("agent.call", json!({"vm": "frozen", "command": "ping"}))
        .await;
    let waited = t0.elapsed();
    kill(agent.pid, "CONT");
    assert_eq!(
        ping["error"]["code"],
        cc_proxy_api::error::VM_LOST,
        "the call fails with the VM's real state, not VM_NOT_FOUND: {ping}"
    );
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
        "waited {waited:?} (recovery timeout 2 s)"
    );
    let info = env.client.vm_info("frozen").await.expect("vm.info");
    assert_eq!(info.state, "lost", "{info:?}");
    // What the agent last spoke, from the record, not "unknown".
    assert_eq!(
        (info.dialect.as_str(), info.api_version),
        ("hyperstart", 4244)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_group_can_reach_the_socket() {
    const NAME: &str = "the_socket_group_can_reach_the_socket";
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP {NAME}: needs root to act as another user");
        return;
    }
    let (Ok(setpriv), Ok(curl)) = (which("setpriv"), which("curl")) else {
        eprintln!("SKIP {NAME}: setpriv or curl is missing");
        return;
    };
    // The daemon creates the socket's directory itself: root's, closed to others (0750).
    let dir = tempfile::Builder::new()
        .prefix("ccp-grp")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let socket = dir.path().join("run").join("proxy.sock");
    let mut daemon = Command::new(proxy_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--admin-addr", "off", "--socket-group", "4242"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cc-proxy");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline {
            let _ = daemon.kill();
            panic!("cc-proxy did not start serving");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(socket.parent().expect("dir")).expect("dir");
    let (dir_gid, dir_mode) = (meta.gid(), meta.mode() & 0o777);
    let socket_gid = std::fs::metadata(&socket).expect("socket").gid();

    // An unprivileged member of the group (and only of it) talks to the daemon.
    let as_user = |uid: &str, gid: &str| {
        Command::new(&setpriv)
            .args(["--reuid", uid, "--regid", gid, "--clear-groups"])
            .arg(&curl)
            .args(["-s", "--unix-socket"])
            .arg(&socket)
            .args(["-H", "Content-Type: application/json", "-d"])
            .arg(r#"{"jsonrpc":"2.0","id":1,"method":"proxy.health"}"#)
            .arg("http://localhost/")
            .output()
            .expect("setpriv curl")
    };
    let member = as_user("65534", "4242");
    let stranger = as_user("65534", "4243");
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert_eq!(
        (dir_gid, dir_mode, socket_gid),
        (4242, 0o750, 4242),
        "the directory and the socket belong to the group, nothing for others"
    );
    assert!(
        String::from_utf8_lossy(&member.stdout).contains("\"status\":\"ok\""),
        "a group member is refused: {member:?}"
    );
    assert!(
        !String::from_utf8_lossy(&stranger.stdout).contains("\"status\""),
        "someone outside the group got in: {stranger:?}"
    );
}

/// The absolute path of a tool on PATH.
fn which(tool: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_replaces_a_lost_vm_of_the_same_id() {
    let mut env = Env::start().await;
    let first = env.agent(&[]);
    env.register("vm1", &first, None).await;
    let token = env.rpc("stream.allocate", json!({"id": "vm1"})).await["result"]["token"]
        .as_str()
        .expect("token")
        .to_string();
    let unread = env.rpc("stream.allocate", json!({"id": "vm1"})).await["result"]["token"]
        .as_str()
        .expect("token")
        .to_string();
    // A shim attached when the VM dies gets the error frame; the other token keeps its frame for a shim.
    let mut shim = env.client.attach(&token).await.expect("attach");
    env.kill_agent(&first);
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.client.vm_info("vm1").await.expect("vm.info").state != "lost" {
        assert!(Instant::now() < deadline, "not lost: {}", env.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ended = tokio::time::timeout(
        Duration::from_secs(5),
        cc_proxy_api::client::collect(&mut shim),
    )
    .await
    .expect("the shim's stream did not end")
    .expect("stream");
    assert!(ended.error.is_some(), "{ended:?}");
    assert_eq!(env.client.vm_info("vm1").await.expect("info").tokens, 1);

    // The VM comes back (a new VMM, new sockets): the same id registers again, no unregister needed.
    let second = env.agent(&["--dialect", "cc-agent"]);
    let reg = env.register("vm1", &second, None).await;
    assert_eq!(reg.dialect, "cc-agent");
    let info = env.client.vm_info("vm1").await.expect("vm.info");
    assert_eq!((info.state.as_str(), info.tokens), ("ready", 0), "{info:?}");
    let ping = env
        .rpc("agent.call", json!({"vm": "vm1", "command": "ping"}))
        .await;
    assert!(ping.get("result").is_some(), "{ping}");
    // The lost VM's remaining token ended with it.
    let old = env.rpc("stream.close", json!({"token": unread})).await;
    assert_eq!(
        old["error"]["code"],
        cc_proxy_api::error::TOKEN_NOT_FOUND,
        "{old}"
    );
    assert!(
        env.logs()
            .contains("a lost VM was replaced by a new registration"),
        "{}",
        env.logs()
    );
    let metrics = env.metrics().await;
    for (line, want) in [
        (r#"cc_proxy_vms{state="ready"} "#, "1"),
        (r#"cc_proxy_vms{state="lost"} "#, "0"),
    ] {
        let got = metrics
            .lines()
            .find_map(|l| l.strip_prefix(line))
            .unwrap_or_else(|| panic!("no {line} in\n{metrics}"));
        assert_eq!(got, want, "{line}");
    }

    // A VM that is not lost is still protected.
    let third = env.agent(&[]);
    let (control, io) = third.uris(None);
    let again = env
        .rpc(
            "vm.register",
            json!({"id": "vm1", "control": control, "io": io}),
        )
        .await;
    assert_eq!(
        again["error"]["code"],
        cc_proxy_api::error::VM_EXISTS,
        "{again}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_real_series_of_the_selected_job() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana/cc-proxy.json");
    let text = std::fs::read_to_string(&path).expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let env = Env::start().await;
    let metrics = env.metrics().await;
    let families: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let panels = dash["panels"].as_array().expect("panels");
    let mut checked = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            // Every series the panel reads, with the selector that follows its name.
            let mut rest = expr;
            while let Some(at) = rest.find(|c: char| c.is_ascii_lowercase()) {
                rest = &rest[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let name = &rest[..end];
                rest = &rest[end..];
                if !(name.starts_with("cc_proxy_") || name.starts_with("process_") || name == "up")
                {
                    continue;
                }
                checked += 1;
                assert!(
                    rest.starts_with("{job=~\"$job\""),
                    "panel {title:?}: {name} is not filtered by the job variable: {expr}"
                );
                let known = families.iter().any(|f| {
                    name == *f
                        || ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name.strip_suffix(s) == Some(*f))
                });
                assert!(known, "panel {title:?}: {name} is not exported\n{metrics}");
            }
        }
    }
    assert!(checked > 20, "only {checked} series found in the dashboard");
    let panel = |title: &str| {
        panels
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"))
    };
    assert_eq!(
        panel("Ready")["targets"][0]["expr"],
        "cc_proxy_ready{job=~\"$job\"}",
        "Ready comes from the readiness gauge, not scrape health"
    );
    // Dropped output (bytes/s) has an axis of its own, not the events/s one.
    let mixed = panel("Backpressure, stream failures, dropped output");
    let dropped = mixed["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| {
            t["expr"]
                .as_str()
                .is_some_and(|e| e.contains("dropped_bytes"))
        })
        .expect("dropped target");
    let over = mixed["fieldConfig"]["overrides"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|o| o["matcher"]["options"] == dropped["refId"])
        .expect("an override for the dropped series");
    let props = over["properties"].to_string();
    assert!(
        props.contains(r#""custom.axisPlacement","value":"right""#) && props.contains(r#""Bps""#),
        "{props}"
    );
}
