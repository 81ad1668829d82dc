//! The Rust client crate (`cc-proxy-api`) against the real daemon: every method family, including the
//! WebSocket subscriptions, and the example program under `api/examples/`, built on its own.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cc_proxy_api::types::{Event, TapParams};
use serde_json::json;

use crate::common::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_crate_covers_the_api() {
    let mut env = Env::start().await;
    let client = &env.client;
    let health = client.health().await.expect("health");
    assert_eq!((health.status.as_str(), health.vms), ("ok", 0));

    let mut events = client.subscribe_events(None).await.expect("events");
    let mut tap = client
        .tap(&TapParams {
            filter: Some(vec!["agent_command".into()]),
            limit: Some(1),
            ..TapParams::default()
        })
        .await
        .expect("tap");

    let agent = env.agent(&["--dialect", "cc-agent"]);
    env.register("c1", &agent, None).await;
    let client = &env.client;
    let next = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("no event")
        .expect("subscription ended")
        .expect("event");
    assert_eq!(next, Event::VmRegistered { vm: "c1".into() });

    let attached = client.vm_attach("c1").await.expect("vm.attach");
    assert_eq!(attached.dialect, "cc-agent");
    let alloc = client.stream_allocate("c1").await.expect("stream.allocate");
    assert_eq!(client.vm_info("c1").await.expect("info").tokens, 1);
    client
        .stream_close(&alloc.token)
        .await
        .expect("stream.close");
    assert_eq!(client.vm_info("c1").await.expect("info").tokens, 0);
    let again = client.stream_close(&alloc.token).await;
    assert_eq!(
        again.err().and_then(|e| e.code()),
        Some(cc_proxy_api::error::TOKEN_NOT_FOUND)
    );

    // The tap sees the agent command, and nothing after its limit of one.
    client
        .call::<serde_json::Value>("agent.call", json!({"vm": "c1", "command": "ping"}))
        .await
        .expect("ping");
    let seen = tokio::time::timeout(Duration::from_secs(5), tap.next())
        .await
        .expect("no tap event")
        .expect("tap ended early")
        .expect("tap event");
    assert_eq!(seen["event"], "agent_command", "{seen}");
    assert_eq!(seen["command"], "ping", "{seen}");
    client
        .call::<serde_json::Value>("agent.call", json!({"vm": "c1", "command": "ping"}))
        .await
        .expect("ping");
    let more = tokio::time::timeout(Duration::from_millis(500), tap.next()).await;
    assert!(more.is_err(), "an event past the limit: {more:?}");
    tap.unsubscribe().await.expect("unsubscribe");

    client.unregister("c1").await.expect("unregister");
    let next = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("no event")
        .expect("subscription ended")
        .expect("event");
    assert_eq!(next, Event::VmUnregistered { vm: "c1".into() });
    events.unsubscribe().await.expect("unsubscribe");

    // A subscription the daemon refuses is an error of its own.
    let refused = client
        .tap(&TapParams {
            vm: Some("ghost".into()),
            ..TapParams::default()
        })
        .await;
    assert_eq!(
        refused.err().and_then(|e| e.code()),
        Some(cc_proxy_api::error::VM_NOT_FOUND)
    );
}

/// Build `api/examples/watch.rs` the way a user of the crate would (only the client crate's own features),
/// and return its path.
fn build_example() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "cc-proxy-api", "--example", "watch"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo build --example watch");
    assert!(status.success(), "the example does not build");
    Path::new(env!("CARGO_BIN_EXE_cc-proxy"))
        .parent()
        .expect("target dir")
        .join("examples/watch")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_program_builds_and_follows_events() {
    let example = build_example();
    let mut env = Env::start().await;
    let child = Command::new(&example)
        .args(["--count", "2"])
        .env("CC_PROXY_SOCKET", &env.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the example");
    // Let it subscribe, then make two events.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while env.rpc("proxy.health", json!({})).await["result"]["uptime_secs"].is_null() {
        assert!(std::time::Instant::now() < deadline);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let agent = env.agent(&[]);
    env.register("w1", &agent, None).await;
    env.client.unregister("w1").await.expect("unregister");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("example output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("cc-proxy up "), "{stdout}");
    assert!(
        stdout.contains(r#"event {"event":"vm_registered","vm":"w1"}"#)
            && stdout.contains(r#"event {"event":"vm_unregistered","vm":"w1"}"#),
        "{stdout}"
    );
}
