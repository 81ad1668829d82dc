//! Authorization through the real binary: a second uid (created by the test, see `common::other_user`) tries
//! every method, the stream attach and every legacy command on another uid's VM and is refused with 1018;
//! lists, events and taps show it only its own VMs; tokens never appear whole in events; registrations open
//! endpoints with the client's rights; `--admin-group` members are privileged.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use jsonrpsee::core::client::{ClientT, SubscriptionClientT};
use jsonrpsee::core::params::ObjectParams;
use jsonrpsee::ws_client::WsClient;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    connect_as, exec_data, other_user, proxy_bin, test_group, ws_as, Agent, Env, OtherUser,
    OTHER_USER,
};
use crate::legacy::{ATTACH_VM, CONNECT_SHIM, REGISTER_VM, UNREGISTER_VM, V2};

/// A daemon whose socket the second user can reach (through its group).
async fn shared_env(extra: &[&str]) -> Env {
    let mut args = vec!["--socket-group", OTHER_USER];
    args.extend_from_slice(extra);
    Env::start_with(&args).await
}

fn params(v: Value) -> ObjectParams {
    let mut p = ObjectParams::new();
    if let Value::Object(map) = v {
        for (k, v) in map {
            p.insert(&k, v).expect("param");
        }
    }
    p
}

/// Call `method` and return the whole outcome as JSON: `{"result": ..}` or `{"error": {code, message, data}}`.
async fn call(ws: &WsClient, method: &str, p: Value) -> Value {
    match ws.request::<Value, _>(method, params(p)).await {
        Ok(v) => json!({ "result": v }),
        Err(jsonrpsee::core::ClientError::Call(e)) => json!({"error": {
            "code": e.code(),
            "message": e.message(),
            "data": e.data().and_then(|d| serde_json::from_str::<Value>(d.get()).ok()),
        }}),
        Err(e) => panic!("{method}: {e}"),
    }
}

/// Subscribe and return the refusal (or `Ok` text when the subscription was accepted).
async fn subscribe(ws: &WsClient, method: &str, unsub: &str, p: Value) -> Result<(), Value> {
    match ws.subscribe::<Value, _>(method, params(p), unsub).await {
        Ok(_) => Ok(()),
        Err(jsonrpsee::core::ClientError::Call(e)) => Err(json!({
            "code": e.code(),
            "message": e.message(),
            "data": e.data().and_then(|d| serde_json::from_str::<Value>(d.get()).ok()),
        })),
        Err(e) => panic!("{method}: {e}"),
    }
}

/// The value of one metric sample line (`name{labels} value`), 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Give user `u` the agent's socket, so it may register that VM itself.
fn give_socket(agent: &Agent, u: OtherUser) {
    std::os::unix::fs::chown(&agent.path, Some(u.uid), Some(u.gid)).expect("chown agent socket");
}

fn register_params(id: &str, agent: &Agent) -> Value {
    let (control, io) = agent.uris(None);
    json!({"id": id, "control": control, "io": io, "timeout_ms": 5000})
}

/// Run the `cc-proxy` CLI as user `u`.
fn cli_as(env: &Env, u: OtherUser, args: &[&str]) -> std::process::Output {
    std::process::Command::new(proxy_bin())
        .arg("--socket")
        .arg(&env.socket)
        .args(args)
        .uid(u.uid)
        .gid(u.gid)
        .env_remove("CC_PROXY_SOCKET")
        .output()
        .expect("run cc-proxy as the second user")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_uid_is_refused_every_method_on_another_users_vm() {
    let Some(u) = other_user(OTHER_USER) else {
        return;
    };
    let mut env = shared_env(&[]).await;
    let agent = env.agent(&["--dialect", "cc-agent"]);
    env.register("victim", &agent, None).await;
    let token = env
        .client
        .stream_allocate("victim")
        .await
        .expect("allocate")
        .token;
    let ws = ws_as(&env, u.uid, u.gid, &[u.gid]).await;

    // Every JSON-RPC method that names the VM or one of its tokens.
    let table: Vec<(&str, Value)> = vec![
        ("vm.info", json!({"id": "victim"})),
        ("vm.attach", json!({"id": "victim"})),
        ("vm.unregister", json!({"id": "victim"})),
        ("stream.allocate", json!({"id": "victim"})),
        ("agent.call", json!({"vm": "victim", "command": "ping"})),
        (
            "agent.call",
            json!({"vm": "victim", "command": "execcmd", "data": exec_data(&["true"]), "streams": 1}),
        ),
        ("stream.signal", json!({"token": token, "signal": 15})),
        (
            "stream.resize",
            json!({"token": token, "rows": 10, "cols": 10}),
        ),
        ("stream.close", json!({"token": token})),
        ("mesh.endpoints", json!({"id": "victim"})),
    ];
    for (method, p) in &table {
        let r = call(&ws, method, p.clone()).await;
        assert_eq!(r["error"]["code"], 1018, "{method} {p}: {r}");
        assert_eq!(r["error"]["data"]["vm"], "victim", "{method}: {r}");
        assert_eq!(r["error"]["data"]["uid"], u.uid, "{method}: {r}");
    }
    for (method, unsub) in [
        ("events.subscribe", "events.unsubscribe"),
        ("tap.observe", "tap.unobserve"),
    ] {
        let refused = subscribe(&ws, method, unsub, json!({"vm": "victim"})).await;
        let Err(e) = refused else {
            panic!("{method} of another user's VM was accepted");
        };
        assert_eq!(e["code"], 1018, "{method}: {e}");
        assert_eq!(e["data"]["vm"], "victim", "{method}: {e}");
    }
    // A registration with a mesh (listeners, targets and a certificate identity the daemon cannot check
    // against the client's rights).
    let (control, io) = agent.uris(None);
    let r = call(
        &ws,
        "vm.register",
        json!({"id": "meshed", "control": control, "io": io,
               "mesh": {"identity": "web.default.serviceaccount.identity.linkerd.cluster.local"}}),
    )
    .await;
    assert_eq!(r["error"]["code"], 1018, "{r}");
    // A privileged method.
    let r = call(&ws, "proxy.set_log_level", json!({"level": "trace"})).await;
    assert_eq!(r["error"]["code"], 1018, "{r}");
    assert_eq!(r["error"]["data"]["uid"], u.uid, "{r}");
    // Lists and counts show the client none of it.
    let r = call(&ws, "vm.list", json!({})).await;
    assert_eq!(r["result"], json!([]), "{r}");
    let r = call(&ws, "proxy.health", json!({})).await;
    assert_eq!(r["result"]["vms"], 0, "{r}");

    // The stream attach, with the token itself.
    let mut s = connect_as(&env.socket, u.uid, u.gid, &[u.gid]).expect("connect");
    let req = format!(
        "POST /v1/streams/{token} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: cc-proxy-stream\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut resp = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut resp))
        .await
        .expect("attach answer")
        .expect("read");
    let resp = String::from_utf8_lossy(&resp[..n]).to_string();
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("1018"), "{resp}");
    assert!(
        !resp.contains(&token),
        "the refusal must not echo the token: {resp}"
    );

    // The legacy protocol: AttachVM, UnregisterVM, ConnectShim.
    let mut v2 = V2::over(connect_as(&env.socket, u.uid, u.gid, &[u.gid]).expect("connect"));
    for (op, payload) in [
        (
            ATTACH_VM,
            json!({"containerId": "victim", "numIOStreams": 1}),
        ),
        (UNREGISTER_VM, json!({"containerId": "victim"})),
    ] {
        let r = v2.cmd(op, payload).await;
        assert!(
            r.msg().contains("permission denied"),
            "op {op}: {}",
            r.msg()
        );
    }
    let mut shim = V2::over(connect_as(&env.socket, u.uid, u.gid, &[u.gid]).expect("connect"));
    let r = shim.cmd(CONNECT_SHIM, json!({ "token": token })).await;
    assert!(r.msg().contains("permission denied"), "{}", r.msg());

    // A real process of that uid, through the CLI.
    let out = cli_as(&env, u, &["vm", "info", "victim"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    let out = cli_as(&env, u, &["log-level", "trace"]);
    assert!(!out.status.success(), "{out:?}");
    let out = cli_as(&env, u, &["--json", "vm", "list"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");

    // Nothing of it happened: the VM, its token and the log level are as they were.
    let info = env.client.vm_info("victim").await.expect("vm.info as root");
    assert_eq!(info.state.as_str(), "ready");
    assert_eq!(info.owner, 0);
    assert_eq!(info.tokens, 1, "{info:?}");
    assert!(!env.logs().contains("TRACE"), "the log level changed");
    // Each refusal is counted by protocol and logged with the client's ids.
    let metrics = env.metrics().await;
    let denied = |p: &str| {
        sample(
            &metrics,
            &format!("cc_proxy_permission_denied_total{{protocol=\"{p}\"}}"),
        )
    };
    assert!(denied("jsonrpc") >= 14.0, "{metrics}");
    assert_eq!(denied("stream"), 1.0, "{metrics}");
    assert!(denied("legacy") >= 3.0, "{metrics}");
    let logs = env.logs();
    assert!(
        logs.lines().any(|l| l.contains("permission denied")
            && l.contains(&format!("peer_uid={}", u.uid))
            && l.contains("peer_gid=")),
        "{logs}"
    );
    // Root (privileged) still uses it.
    env.client
        .stream_close(&token)
        .await
        .expect("close as root");
    let _ = env.stop_daemon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_see_only_their_own_vms_events_and_taps_and_no_token() {
    let Some(u) = other_user(OTHER_USER) else {
        return;
    };
    let mut env = shared_env(&[]).await;
    let theirs = env.agent(&["--dialect", "cc-agent"]);
    let mine = env.agent(&["--dialect", "cc-agent"]);
    give_socket(&mine, u);
    let ws = ws_as(&env, u.uid, u.gid, &[u.gid]).await;
    let mut my_events = ws
        .subscribe::<Value, _>("events.subscribe", params(json!({})), "events.unsubscribe")
        .await
        .expect("events.subscribe");
    let mut my_tap = ws
        .subscribe::<Value, _>(
            "tap.observe",
            params(json!({"rate": 1000})),
            "tap.unobserve",
        )
        .await
        .expect("tap.observe");
    let mut root_events = env
        .client
        .subscribe_events(None)
        .await
        .expect("root events");

    // The second user registers its own VM; root registers another.
    let r = call(&ws, "vm.register", register_params("mine", &mine)).await;
    assert!(r["result"].is_object(), "{r}");
    env.register("theirs", &theirs, None).await;
    let r = call(&ws, "vm.list", json!({})).await;
    let ids: Vec<&str> = r["result"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["mine"], "{r}");
    assert_eq!(r["result"][0]["owner"], u.uid, "{r}");
    let all = env.client.vm_list().await.expect("root vm.list");
    assert_eq!(all.len(), 2, "a privileged client lists every VM");
    // The CLI's table names each VM's owner.
    let out = env.cli(&["vm", "list"], b"");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table.lines().next().is_some_and(|h| h.ends_with("OWNER")),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("mine "))
        .unwrap_or_default();
    assert_eq!(
        row.split_whitespace().last(),
        Some(u.uid.to_string().as_str()),
        "{table}"
    );

    // A process in each; the owner runs its own through the daemon.
    let r = call(
        &ws,
        "agent.call",
        json!({"vm": "mine", "command": "execcmd", "data": exec_data(&["sh", "-c", "exit 3"]), "streams": 1}),
    )
    .await;
    let my_token = r["result"]["token"].as_str().expect("token").to_string();
    let theirs_run = env
        .client
        .exec(
            "theirs",
            &["sh".into(), "-c".into(), "exit 4".into()],
            false,
        )
        .await
        .expect("exec theirs");
    let their_token = theirs_run.token.expect("token");

    // Root sees both exits; each names its stream by the short id only.
    let mut exits = Vec::new();
    while exits.len() < 2 {
        let ev = tokio::time::timeout(Duration::from_secs(10), root_events.next())
            .await
            .expect("root event")
            .expect("event stream")
            .expect("event");
        let text = serde_json::to_string(&ev).unwrap_or_default();
        assert!(
            !text.contains(&my_token) && !text.contains(&their_token),
            "{text}"
        );
        if let cc_proxy_api::types::Event::ProcessExited { vm, token, .. } = ev {
            assert_eq!(token.len(), 8);
            exits.push(vm);
        }
    }
    exits.sort();
    assert_eq!(exits, ["mine", "theirs"]);

    // The owner's subscription and tap carry its own VM only (the other VM's events come first or between).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut seen = Vec::new();
    while let Ok(Some(Ok(ev))) = tokio::time::timeout_at(deadline, my_events.next()).await {
        seen.push(ev);
    }
    assert!(seen.iter().all(|e| e["vm"] == "mine"), "{seen:?}");
    let exit = seen
        .iter()
        .find(|e| e["event"] == "process_exited")
        .unwrap_or_else(|| panic!("no process_exited for the owner: {seen:?}"));
    assert_eq!(exit["token"], my_token[..8], "{exit}");
    assert_eq!(exit["status"], 3);
    let mut tapped = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(Ok(ev))) = tokio::time::timeout_at(deadline, my_tap.next()).await {
        tapped.push(ev);
    }
    assert!(!tapped.is_empty(), "the owner's tap saw nothing");
    assert!(tapped.iter().all(|e| e["vm"] == "mine"), "{tapped:?}");
    let text = serde_json::to_string(&tapped).unwrap_or_default();
    assert!(!text.contains(&my_token), "{text}");

    // Root (privileged) may use the user's VM; the user may not use root's.
    let ping = json!({"vm": "mine", "command": "ping"});
    assert!(env.rpc("agent.call", ping).await["result"].is_object());
    let r = call(
        &ws,
        "agent.call",
        json!({"vm": "theirs", "command": "ping"}),
    )
    .await;
    assert_eq!(r["error"]["code"], 1018, "{r}");

    // The owner survives a restart: recorded, recovered with the owner's rights, still the owner's.
    drop(my_events);
    drop(my_tap);
    drop(ws);
    env.restart_daemon().await;
    let info = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(i) = env.client.vm_info("mine").await {
                if i.state.as_str() != "recovering" {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("recovered");
    assert_eq!(info.state.as_str(), "ready", "{info:?}");
    assert_eq!(info.owner, u.uid);
    let ws = ws_as(&env, u.uid, u.gid, &[u.gid]).await;
    let r = call(&ws, "agent.call", json!({"vm": "mine", "command": "ping"})).await;
    assert!(r["result"].is_object(), "{r}");
    let r = call(&ws, "vm.info", json!({"id": "theirs"})).await;
    assert_eq!(r["error"]["code"], 1018, "{r}");
    let r = call(&ws, "vm.unregister", json!({"id": "mine"})).await;
    assert!(r.get("error").is_none(), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_uid_registers_only_endpoints_it_could_open_itself() {
    let Some(u) = other_user(OTHER_USER) else {
        return;
    };
    let mut env = shared_env(&[]).await;
    // A directory the user cannot search, holding a live agent socket.
    let secret = env.dir.path().join("secret");
    std::fs::create_dir(&secret).expect("mkdir");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let hidden = env.agent(&["--dialect", "cc-agent"]);
    let moved = secret.join("agent.sock");
    std::fs::rename(&hidden.path, &moved).expect("move the socket");
    let uri = |p: &std::path::Path, port: u32| format!("hvsock://{}:{port}", p.display());
    let ws = ws_as(&env, u.uid, u.gid, &[u.gid]).await;
    let attempt = |path: std::path::PathBuf, id: &'static str| {
        let ws = &ws;
        async move {
            let p = json!({"id": id, "control": uri(&path, 2718), "io": uri(&path, 2719), "timeout_ms": 3000});
            call(ws, "vm.register", p).await
        }
    };
    let existing = attempt(moved.clone(), "probe1").await;
    let missing = attempt(secret.join("nothing.sock"), "probe2").await;
    assert_eq!(existing["error"]["code"], 1004, "{existing}");
    assert_eq!(missing["error"]["code"], 1004, "{missing}");
    // The same answer whether the path exists or not: nothing learnt about the directory.
    let msg = |r: &Value, name: &str| {
        r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .replace(name, "X")
    };
    assert_eq!(msg(&existing, "agent.sock"), msg(&missing, "nothing.sock"));
    assert!(
        msg(&existing, "agent.sock").contains("Permission denied"),
        "{existing}"
    );
    // Root, which may search it, is told the truth (and may register the live one).
    let r = env
        .rpc(
            "vm.register",
            json!({"id": "probe3", "control": uri(&secret.join("nothing.sock"), 2718),
                   "io": uri(&secret.join("nothing.sock"), 2719), "timeout_ms": 3000}),
        )
        .await;
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("No such file")),
        "{r}"
    );

    // Root registers a VM on the hidden socket: the user still learns nothing, not even that it is used.
    let r = env
        .rpc(
            "vm.register",
            json!({"id": "hidden", "control": uri(&moved, 2718), "io": uri(&moved, 2719), "timeout_ms": 3000}),
        )
        .await;
    assert!(r["result"].is_object(), "{r}");
    let used = attempt(moved.clone(), "probe6").await;
    assert_eq!(
        msg(&used, "agent.sock"),
        msg(&missing, "nothing.sock"),
        "{used}"
    );

    // A socket in a directory the user can search but that it may not write.
    let readonly = env.agent(&["--dialect", "cc-agent"]);
    std::fs::set_permissions(&readonly.path, std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let r = call(&ws, "vm.register", register_params("probe4", &readonly)).await;
    assert_eq!(r["error"]["code"], 1004, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Permission denied")),
        "{r}"
    );
    // The legacy RegisterVM makes the same check.
    let mut v2 = V2::over(connect_as(&env.socket, u.uid, u.gid, &[u.gid]).expect("connect"));
    let (ctl, io) = readonly.uris(None);
    let r = v2
        .cmd(
            REGISTER_VM,
            json!({"containerId": "probe5", "ctlSerial": ctl, "ioSerial": io}),
        )
        .await;
    assert!(r.msg().contains("Permission denied"), "{}", r.msg());
    // Once the socket is the user's, the same registration succeeds.
    give_socket(&readonly, u);
    let r = call(&ws, "vm.register", register_params("probe4", &readonly)).await;
    assert!(r["result"].is_object(), "{r}");
    assert_eq!(env.client.vm_list().await.expect("list").len(), 2);
    // An endpoint the user can see, used by root's VM: refused without naming that VM.
    let visible = env.agent(&["--dialect", "cc-agent"]);
    env.register("rootsvm", &visible, None).await;
    let r = call(&ws, "vm.register", register_params("probe7", &visible)).await;
    assert_eq!(r["error"]["code"], 1011, "{r}");
    let text = r["error"]["message"].as_str().unwrap_or_default();
    assert!(
        text.contains("another VM") && !text.contains("rootsvm"),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_group_members_are_privileged() {
    let Some(u) = other_user(OTHER_USER) else {
        return;
    };
    const ADMINS: &str = "ccproxy-test-admins";
    let Some(admin_gid) = test_group(ADMINS) else {
        eprintln!("SKIP: cannot create group {ADMINS}");
        return;
    };
    let mut env = shared_env(&["--admin-group", ADMINS]).await;
    let agent = env.agent(&["--dialect", "cc-agent"]);
    env.register("rootvm", &agent, None).await;
    // A client whose process is in the admin group (here as its gid) may use every VM and privileged method.
    let admin = ws_as(&env, u.uid, admin_gid, &[u.gid]).await;
    let r = call(&admin, "vm.info", json!({"id": "rootvm"})).await;
    assert_eq!(r["result"]["owner"], 0, "{r}");
    let r = call(&admin, "vm.list", json!({})).await;
    assert_eq!(r["result"].as_array().map(Vec::len), Some(1), "{r}");
    let r = call(&admin, "proxy.set_log_level", json!({"level": "info"})).await;
    assert_eq!(r["result"]["level"], "info", "{r}");
    // The same uid outside the group is not.
    let plain = ws_as(&env, u.uid, u.gid, &[u.gid]).await;
    let r = call(&plain, "vm.info", json!({"id": "rootvm"})).await;
    assert_eq!(r["error"]["code"], 1018, "{r}");
    let r = call(&plain, "proxy.set_log_level", json!({"level": "info"})).await;
    assert_eq!(r["error"]["code"], 1018, "{r}");
    // An unknown group stops the daemon at startup.
    let out = std::process::Command::new(proxy_bin())
        .arg("--socket")
        .arg(env.dir.path().join("other.sock"))
        .args(["--admin-addr", "off", "--state-dir"])
        .arg(env.dir.path().join("state2"))
        .args(["--admin-group", "no-such-group-ccproxy"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-group-ccproxy"));
    assert!(
        !env.dir.path().join("other.sock").exists(),
        "the socket was created before the check"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_vm_without_an_owner_belongs_to_root() {
    let Some(u) = other_user(OTHER_USER) else {
        return;
    };
    let mut env = shared_env(&[]).await;
    let agent = env.agent(&["--dialect", "cc-agent"]);
    give_socket(&agent, u);
    let ws = ws_as(&env, u.uid, u.gid, &[u.gid]).await;
    let r = call(&ws, "vm.register", register_params("old", &agent)).await;
    assert!(r["result"].is_object(), "{r}");
    drop(ws);
    let st = env.stop_daemon().await;
    assert!(st.success());
    // The record as a daemon from before owners were kept wrote it.
    let path = env.state_dir.join("vms/old.json");
    let mut record: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("state record")).expect("JSON");
    assert_eq!(record["owner"], u.uid, "{record}");
    let obj = record.as_object_mut().expect("object");
    obj.remove("owner");
    obj.remove("owner_rights");
    std::fs::write(&path, record.to_string()).expect("write the record");
    env.restart_daemon().await;
    let info = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(i) = env.client.vm_info("old").await {
                if i.state.as_str() != "recovering" {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("recovered");
    assert_eq!(info.state.as_str(), "ready", "{info:?}");
    assert_eq!(info.owner, 0, "{info:?}");
    let ws = ws_as(&env, u.uid, u.gid, &[u.gid]).await;
    let r = call(&ws, "vm.info", json!({"id": "old"})).await;
    assert_eq!(r["error"]["code"], 1018, "{r}");
}
