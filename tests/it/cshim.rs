//! The C shim example of docs/api.md, taken from the document itself, compiled with `cc` and run against
//! the real daemon (so the documentation and the code cannot drift apart); and the attach rule it relies on:
//! after the exit frame the daemon keeps the connection readable until the shim closes it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use cc_proxy_api::stream::{Channel, Frame};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};

use crate::common::Env;

/// The C source of the example: the first ```c block of docs/api.md.
fn example_source() -> String {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/api.md");
    let text = std::fs::read_to_string(&doc).expect("read docs/api.md");
    let start = text.find("```c\n").expect("a ```c block in docs/api.md") + 5;
    let end = start + text[start..].find("\n```").expect("end of the ```c block");
    text[start..end].to_string()
}

/// Compile the example; `None` (with the reason printed) when there is no C compiler.
fn build_example(dir: &Path) -> Option<PathBuf> {
    let src = dir.join("mini-shim.c");
    std::fs::write(&src, example_source()).expect("write mini-shim.c");
    let bin = dir.join("mini-shim");
    let out = match Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIP: no C compiler (`cc`: {e}); install build-essential");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "the C shim of docs/api.md does not compile:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(bin)
}

async fn start(env: &Env, vm: &str, script: &str) -> String {
    let r: Value = env
        .client
        .call(
            "agent.call",
            json!({"vm": vm, "command": "execcmd", "streams": 1,
                   "data": {"container": "hyperstart", "process": {"args": ["sh", "-c", script]}}}),
        )
        .await
        .expect("execcmd");
    r["token"].as_str().expect("token").to_string()
}

/// `./mini-shim SOCK TOKEN </dev/null` against a process that prints and exits 3: every run gets the
/// output and the status, although its stdin EOF races the process's exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_c_shim_never_loses_the_exit_status() {
    let mut env = Env::start().await;
    let Some(shim) = build_example(env.dir.path()) else {
        return;
    };
    for (args, label) in [(&["--pair"][..], "hs"), (&["--dialect", "cc-agent"], "cc")] {
        let agent = env.agent(args);
        env.register(label, &agent, None).await;
        for run in 0..15 {
            let token = start(&env, label, "echo hello; echo oops >&2; exit 3").await;
            // Let the process finish first, as in the report: its exit waits for the shim.
            if run % 2 == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let shim = shim.clone();
            let socket = env.socket.clone();
            let out = tokio::task::spawn_blocking(move || {
                Command::new(&shim)
                    .arg(&socket)
                    .arg(&token)
                    .stdin(Stdio::null())
                    .output()
                    .expect("run mini-shim")
            })
            .await
            .expect("join");
            assert_eq!(out.status.code(), Some(3), "{label} run {run}: {out:?}");
            assert_eq!(out.stdout, b"hello\n", "{label} run {run}: {out:?}");
            assert_eq!(out.stderr, b"oops\n", "{label} run {run}: {out:?}");
        }
    }
}

/// After the exit frame the daemon half-closes: late stdin is accepted (and discarded), the read side
/// ends once the daemon has nothing more, and the token is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_stays_readable_after_the_exit_frame() {
    let mut env = Env::start().await;
    let agent = env.agent(&["--pair"]);
    env.register("vm", &agent, None).await;
    let token = start(&env, "vm", "exit 4").await;
    let mut s = env.client.attach(&token).await.expect("attach");
    let exit = loop {
        let f = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("exit frame in time")
            .expect("open")
            .expect("frame");
        if f.channel == Channel::Exit {
            break f;
        }
    };
    assert_eq!(exit.exit_status(), Some(4));
    // The daemon's side is closed after the exit frame: EOF, not an error.
    let end = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("EOF in time");
    assert!(end.is_none(), "{end:?}");
    // Late stdin and the stdin EOF are still taken.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for data in [Bytes::from_static(b"late\n"), Bytes::new()] {
        s.send(Frame::new(Channel::Stdin, data))
            .await
            .expect("late stdin is accepted after the exit frame");
    }
    let info = env.client.vm_info("vm").await.expect("vm.info");
    assert_eq!(
        info.tokens, 0,
        "the token is freed after the exit: {info:?}"
    );
}
