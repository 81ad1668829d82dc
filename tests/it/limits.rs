//! Resource limits and slow or stopped peers (issue 16 §2), each through the real daemon: a stopped agent,
//! huge ids, oversized batches, clients that do not read, idle and half-open connections, connection caps,
//! token caps and expiry, and a stdin flood to a process that never reads.

use std::time::{Duration, Instant};

use cc_proxy_api::types::AgentCallParams;
use serde_json::{json, Value};

use crate::common::{exec_data, Env};

/// The VM's state as `vm.info` reports it.
async fn vm_state(env: &Env, vm: &str) -> String {
    let v = env.rpc("vm.info", json!({ "id": vm })).await;
    v.pointer("/result/state")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string()
}

/// Start `args` on `vm` with one stream and attach a shim to it.
async fn exec_attached(
    env: &Env,
    vm: &str,
    args: &[&str],
) -> (String, cc_proxy_api::client::AttachedStream) {
    let started = env
        .client
        .agent_call(&AgentCallParams {
            vm: vm.into(),
            command: "execcmd".into(),
            data: Some(exec_data(args)),
            timeout_ms: None,
            streams: Some(1),
            token: None,
            payload_base64: None,
        })
        .await
        .unwrap_or_else(|e| panic!("exec on {vm}: {e}\n{}", env.logs()));
    let token = started
        .token
        .expect("execcmd with a stream returns a token");
    let stream = env
        .client
        .attach(&token)
        .await
        .unwrap_or_else(|e| panic!("attach: {e}"));
    (token, stream)
}

/// The keepalive is on by default: an agent SIGSTOPped in the middle of a stream is found hung within the
/// documented bound (`--agent-keepalive` 5 s x (1 + `--agent-keepalive-misses` 2) = 15 s), its VM goes
/// `lost`, and the attached shim's stream ends with an error instead of waiting forever. Both dialects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_is_lost_within_the_default_keepalive_bound() {
    const BOUND: Duration = Duration::from_secs(15);
    let mut env = Env::start().await;
    let cc = env.agent(&["--dialect", "cc-agent"]);
    let hs = env.agent(&[]);
    env.register("cc", &cc, None).await;
    env.register("hs", &hs, None).await;
    let loop_args = ["sh", "-c", "while :; do echo tick; sleep 0.2; done"];
    let (_, mut cc_shim) = exec_attached(&env, "cc", &loop_args).await;
    let (_, mut hs_shim) = exec_attached(&env, "hs", &loop_args).await;
    for shim in [&mut cc_shim, &mut hs_shim] {
        use futures::StreamExt;
        let first = tokio::time::timeout(Duration::from_secs(10), shim.next()).await;
        assert!(
            matches!(first, Ok(Some(Ok(_)))),
            "the process's output flows before the stop: {first:?}"
        );
    }
    for agent in [&cc, &hs] {
        let stopped = std::process::Command::new("kill")
            .args(["-STOP", &agent.pid.to_string()])
            .status()
            .expect("kill -STOP");
        assert!(stopped.success());
    }
    let t0 = Instant::now();
    // Generous against load: the bound plus 10 s; the measured time is asserted against the bound below.
    let within = BOUND + Duration::from_secs(10);
    for (vm, shim) in [("cc", &mut cc_shim), ("hs", &mut hs_shim)] {
        let ended = tokio::time::timeout(
            within.saturating_sub(t0.elapsed()),
            cc_proxy_api::client::collect(shim),
        )
        .await;
        let Ok(Ok(out)) = ended else {
            panic!(
                "{vm}: the shim's stream did not end within {within:?} of the stop\n{}",
                env.logs()
            )
        };
        assert!(
            out.error.is_some() && out.status.is_none(),
            "{vm}: the stream ends with an error frame, not an exit: {:?}",
            out.error
        );
        assert_eq!(vm_state(&env, vm).await, "lost", "{vm}");
    }
    let took = t0.elapsed();
    for agent in [&cc, &hs] {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &agent.pid.to_string()])
            .status();
    }
    let info = env.rpc("vm.info", json!({"id": "cc"})).await;
    let reason = info
        .pointer("/result/lost_reason")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("keepalive"), "lost_reason: {reason:?}");
    // Detection within the bound; the slack is for a loaded test machine's scheduling only.
    assert!(took < BOUND + Duration::from_secs(5), "lost after {took:?}");
}
