//! `make demo` (scripts/demo.sh) as a test: the demo checks itself (a step that does not show what it should
//! ends it with "demo: FAILED" and status 1), so running it here keeps it working. It uses the binaries this
//! test run built (`DEMO_BIN`) instead of building.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::agent_bin;

/// The demo's run time bound here (it takes about a second after the build).
const DEMO_TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn the_demo_runs_and_shows_the_mesh_request_with_a_identity() {
    let bin_dir = agent_bin()
        .parent()
        .map(PathBuf::from)
        .expect("the binaries' directory");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new("bash")
        .arg(root.join("scripts/demo.sh"))
        .env("DEMO_BIN", &bin_dir)
        .env_remove("CC_PROXY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run scripts/demo.sh");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + DEMO_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the demo") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    let status =
        status.unwrap_or_else(|| panic!("the demo ran over {DEMO_TIMEOUT:?}\n{out}\n{err}"));
    assert!(status.success(), "{status}\n{out}\n{err}");
    let a = "a.demo.serviceaccount.identity.linkerd.cluster.local";
    for shown in [
        "hello through stdin".to_uppercase(),
        format!("hello from b's service; you are {a}"),
        format!("b's service: GET /hello from l5d-client-id={a}"),
        " inbound  GET ".to_string(),
        format!("peer={a} endpoint=tcp://127.0.0.1:"),
        "state:       valid".to_string(),
        "==> cc-proxy mesh endpoints a".to_string(),
        "cc-proxy exited with status 0".to_string(),
    ] {
        assert!(
            out.contains(&shown),
            "the demo did not show {shown:?}:\n{out}\n{err}"
        );
    }
}
