//! The mesh's operator commands through the real binary (issue 15 item 4): `cc-proxy tap VM --mesh` and
//! `cc-proxy mesh identity VM`, run as child processes against a daemon with two meshed VMs.
//!
//! Topology of [`Pair::start`]: the Python guest server (`mesh_guest.py`) on loopback stands in for b's
//! service; VM `b` (identity B) has an inbound listener in front of it that admits only A; VM `a` (identity
//! A) has an outbound listener whose fixed destination is b's inbound listener, with identity B. A request
//! to a's outbound listener thus crosses a → mTLS → b → guest, and the guest sees A in `l5d-client-id`.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{free_addr, other_user, proxy_bin, Env, OTHER_USER};
use crate::mesh_data::{register, start_guest, Guest, A, B, T};

/// A child process killed with the test.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// curl's status code for GET `http://addr/path` ("000" when nothing answered).
fn curl_status(addr: &str, path: &str) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("curl is installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Pair {
    env: Env,
    _guest: Guest,
    guest: String,
    b_http: String,
    a_http: String,
}

impl Pair {
    async fn start(args: &[&str]) -> Pair {
        let mut env = Env::start_with(args).await;
        let (guest_proc, guest) = start_guest();
        let (b_http, a_http) = (free_addr(), free_addr());
        let b_agent = env.agent(&[]);
        register(
            &env,
            "b",
            &b_agent,
            json!({"identity": B, "inbound": [
                {"listen": b_http, "target": format!("tcp://{guest}"), "authz": {"identities": [A]}}]}),
        )
        .await;
        let a_agent = env.agent(&[]);
        register(
            &env,
            "a",
            &a_agent,
            json!({"identity": A, "outbound": [
                {"listen": a_http, "destination": {"endpoints": [b_http], "identity": B}}]}),
        )
        .await;
        let pair = Pair {
            env,
            _guest: guest_proc,
            guest: guest.to_string(),
            b_http,
            a_http,
        };
        let deadline = Instant::now() + T;
        while curl_status(&pair.a_http, "/headers") != "200" {
            assert!(
                Instant::now() < deadline,
                "the mesh path never answered\n{}",
                pair.env.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pair
    }

    /// `cc-proxy ARGS` running, its stdout lines on a channel.
    fn spawn_cli(&self, args: &[&str]) -> (Killed, mpsc::Receiver<String>) {
        let mut child = Command::new(proxy_bin())
            .arg("--socket")
            .arg(&self.env.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cc-proxy");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        (Killed(child), rx)
    }
}

/// Every line received so far.
fn drain(rx: &mpsc::Receiver<String>, into: &mut Vec<String>) {
    while let Ok(line) = rx.try_recv() {
        into.push(line);
    }
}

/// The fields of a `tap --mesh` line: time, VM, direction, method, authority, path, status, latency, then
/// `peer=` and `endpoint=`.
fn columns(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_mesh_prints_each_mesh_request_with_its_fields_and_nothing_else() {
    let p = Pair::start(&[]).await;
    let (_tap_b, b_rx) = p.spawn_cli(&["tap", "b", "--mesh"]);
    let (_tap_a, a_rx) = p.spawn_cli(&["tap", "a", "--mesh"]);
    // Without --mesh the tap prints every event as before, mesh requests among them (key=value).
    let (_tap_all, all_rx) = p.spawn_cli(&["tap", "b"]);
    let (mut b_lines, mut a_lines, mut all_lines) = (Vec::new(), Vec::new(), Vec::new());
    let path = "/headers?tapped";
    let deadline = Instant::now() + T;
    // The taps open asynchronously: agent commands (not mesh events) and mesh requests, until every tap
    // has shown what it must.
    loop {
        let r = p
            .env
            .rpc("agent.call", json!({"vm": "b", "command": "ping"}))
            .await;
        assert!(r.get("result").is_some(), "{r}");
        assert_eq!(curl_status(&p.a_http, path), "200");
        tokio::time::sleep(Duration::from_millis(200)).await;
        drain(&b_rx, &mut b_lines);
        drain(&a_rx, &mut a_lines);
        drain(&all_rx, &mut all_lines);
        let done = b_lines.iter().any(|l| l.contains(path))
            && a_lines.iter().any(|l| l.contains(path))
            && all_lines.iter().any(|l| l.contains("agent_command"))
            && all_lines.iter().any(|l| l.contains(path));
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "taps incomplete:\nb --mesh: {b_lines:?}\na --mesh: {a_lines:?}\nb: {all_lines:?}\n{}",
            p.env.logs()
        );
    }

    // b's inbound side: the client is A, the endpoint the guest service.
    for line in &b_lines {
        let c = columns(line);
        assert_eq!(c.len(), 10, "{line}");
        assert_eq!(c[1], "b", "{line}");
        assert_eq!(c[2], "inbound", "only mesh requests: {line}");
    }
    let line = b_lines.iter().find(|l| l.contains(path)).expect("b line");
    let c = columns(line);
    assert!(
        c[0].ends_with('Z') && c[0].len() == "00:00:00.000Z".len(),
        "{line}"
    );
    assert_eq!(c[3], "GET", "{line}");
    assert_eq!(c[4], p.a_http, "the authority curl sent: {line}");
    assert_eq!(c[5], path, "{line}");
    assert_eq!(c[6], "200", "{line}");
    let ms: f64 = c[7]
        .strip_suffix("ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("latency: {line}"));
    assert!(ms > 0.0 && ms < 10_000.0, "{line}");
    assert_eq!(c[8], format!("peer={A}"), "{line}");
    assert_eq!(c[9], format!("endpoint=tcp://{}", p.guest), "{line}");

    // a's outbound side: the server is B, the endpoint b's inbound listener.
    for line in &a_lines {
        assert_eq!(columns(line).get(2), Some(&"outbound"), "{line}");
    }
    let line = a_lines.iter().find(|l| l.contains(path)).expect("a line");
    let c = columns(line);
    assert_eq!(c.len(), 10, "{line}");
    assert_eq!(
        (c[1], c[3], c[5], c[6]),
        ("a", "GET", path, "200"),
        "{line}"
    );
    assert_eq!(c[8], format!("peer={B}"), "{line}");
    assert_eq!(c[9], format!("endpoint={}", p.b_http), "{line}");

    // Without --mesh: the same request as a generic event line, and the agent commands too.
    let line = all_lines.iter().find(|l| l.contains(path)).expect("line");
    assert!(line.contains(" mesh_inbound_request "), "{line}");
    assert!(line.contains(&format!("peer_identity={A}")), "{line}");
    assert!(
        line.contains(&format!("endpoint=tcp://{}", p.guest)),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_mesh_json_carries_the_endpoint_and_mesh_with_filter_is_a_usage_error() {
    let p = Pair::start(&[]).await;
    let (_tap, rx) = p.spawn_cli(&["--json", "tap", "a", "--mesh", "--limit", "1"]);
    let deadline = Instant::now() + T;
    let line = loop {
        assert_eq!(curl_status(&p.a_http, "/headers?json"), "200");
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            break line;
        }
        assert!(Instant::now() < deadline, "no event\n{}", p.env.logs());
    };
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["event"], "mesh_outbound_request", "{line}");
    assert_eq!(v["vm"], "a", "{line}");
    assert_eq!(v["endpoint"], p.b_http.as_str(), "{line}");
    assert_eq!(v["peer_identity"], B, "{line}");
    assert_eq!(v["status"], 200, "{line}");

    // --mesh chooses the events itself: with --filter it is refused before anything is sent.
    let out = p
        .env
        .cli(&["tap", "a", "--mesh", "--filter", "agent_command"], b"");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--filter"),
        "{out:?}"
    );
}

/// `cc-proxy mesh identity VM` (text), its exit status and stderr.
fn identity_cli(env: &Env, args: &[&str]) -> (Option<i32>, String, String) {
    let out = env.cli(args, b"");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value of `key:` in `mesh identity`'s text output.
fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.trim_start_matches(':').trim())
        })
        .unwrap_or_else(|| panic!("no {key:?} in {text}"))
}

fn rfc3339(s: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_identity_shows_the_certificate_its_source_and_state_and_refuses_what_it_cannot_show()
{
    let mut p = Pair::start(&["--socket-group", OTHER_USER]).await;
    let (code, out, err) = identity_cli(&p.env, &["mesh", "identity", "b"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(field(&out, "vm"), "b", "{out}");
    assert_eq!(field(&out, "identity"), B, "{out}");
    assert_eq!(field(&out, "state"), "valid", "{out}");
    assert_eq!(field(&out, "source"), "ca (the embedded CA)", "{out}");
    // The serial is the one vm.info reports; the validity brackets now and lasts the default 24 h.
    let info = p.env.rpc("vm.info", json!({"id": "b"})).await;
    let cert = &info["result"]["mesh"]["certificate"];
    assert_eq!(
        field(&out, "serial"),
        cert["serial"].as_str().unwrap_or("?"),
        "{out}"
    );
    let not_before = rfc3339(field(&out, "not before"));
    let not_after = rfc3339(field(&out, "not after"));
    assert_eq!(field(&out, "not before"), cert["not_before"], "{out}");
    let now = time::OffsetDateTime::now_utc();
    assert!(not_before <= now && now < not_after, "{out}");
    // (the embedded CA backdates its leaves a little, for peers whose clocks lag)
    let lifetime = not_after - not_before;
    assert!(
        lifetime >= time::Duration::hours(24)
            && lifetime <= time::Duration::hours(24) + time::Duration::minutes(5),
        "{out}"
    );
    assert!(out.contains("-----BEGIN CERTIFICATE-----"), "{out}");
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    // --json: the same, machine-readable.
    let (code, out, _) = identity_cli(&p.env, &["--json", "mesh", "identity", "a"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["identity"], A, "{out}");
    assert_eq!(v["state"], "valid", "{out}");
    assert_eq!(v["certificate"]["source"], "ca", "{out}");
    assert!(v["certificate"]["not_before"].as_str().is_some(), "{out}");

    // A VM registered without a mesh, and an unknown VM: exit status 1 and why.
    let plain = p.env.agent(&[]);
    p.env.register("plain", &plain, None).await;
    let (code, out, err) = identity_cli(&p.env, &["mesh", "identity", "plain"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(err.contains("registered without a mesh"), "{err}");
    let (code, _, err) = identity_cli(&p.env, &["mesh", "identity", "ghost"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no VM \"ghost\" is registered"), "{err}");

    // Another user may not see root's VM's certificate (as for every VM command).
    if let Some(u) = other_user(OTHER_USER) {
        use std::os::unix::process::CommandExt;
        let out = Command::new(proxy_bin())
            .arg("--socket")
            .arg(&p.env.socket)
            .args(["mesh", "identity", "b"])
            .uid(u.uid)
            .gid(u.gid)
            .env_remove("CC_PROXY_SOCKET")
            .output()
            .expect("run cc-proxy as the second user");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains(B));
        assert!(err.contains("permission denied"), "{err}");
    }

    // Pending: certificates from files that are not there yet (only the anchors, the first daemon's CA).
    let dir = p.env.dir.path().join("identities");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(p.env.state_dir.join("mesh-ca.pem"), dir.join("ca.crt")).expect("copy CA");
    let dir_arg = dir.to_str().expect("path").to_string();
    let mut files = Env::start_with(&["--mesh-identity-dir", &dir_arg]).await;
    let agent = files.agent(&[]);
    register(
        &files,
        "w",
        &agent,
        json!({"identity": A, "inbound": [{"listen": free_addr(), "target": "tcp://127.0.0.1:9"}]}),
    )
    .await;
    let (code, out, err) = identity_cli(&files, &["mesh", "identity", "w"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(field(&out, "state"), "pending", "{out}");
    assert!(out.contains("none yet"), "{out}");
    assert!(!out.contains("BEGIN CERTIFICATE"), "{out}");
    let _ = files.stop_daemon().await;
    let _ = p.env.stop_daemon().await;
}
