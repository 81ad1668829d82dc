//! More of the mesh front's data plane through the real binary (issue 14): CONNECT tunnelled through an
//! outbound listener, the daemon-wide mesh connection cap, a hybrid-vsock outbound listener with a fixed
//! destination (what a Firecracker or Cloud Hypervisor guest reaches when it connects to a host port), and
//! taps showing a meshed VM's owner its own mesh requests.
//!
//! Not testable here: a `vsock://` (AF_VSOCK) outbound listener needs a vsock transport that loops back to
//! the host (vhost-vsock with a guest, or the `vsock_loopback` module); this kernel has neither, and a
//! `vsock://` listen URI is parsed and refused for inbound in `mesh_identity.rs`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use jsonrpsee::core::client::{ClientT, SubscriptionClientT};
use jsonrpsee::core::params::ObjectParams;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::common::{free_addr, other_user, test_group, ws_as, Env, OTHER_USER};
use crate::mesh_data::{echo_server, register, register_params, A, B, T};

/// A guest service: answers every HTTP/1.1 request with `200 ok` on a keep-alive connection; a CONNECT
/// request gets `200` and then its bytes echoed. Each request head is sent on the channel.
async fn guest_server() -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 1024];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let _ = tx.send(head.clone());
                    if head.starts_with("CONNECT ") {
                        if s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.is_err() {
                            return;
                        }
                        if !buf.is_empty() && s.write_all(&buf).await.is_err() {
                            return;
                        }
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                        return;
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Send `bytes` and read as many back, within [`T`].
async fn echoed<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    bytes: &[u8],
) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(T, async {
        s.write_all(bytes).await?;
        let mut back = vec![0u8; bytes.len()];
        s.read_exact(&mut back).await?;
        Ok(back)
    })
    .await
    .map_err(|_| std::io::Error::other("timed out"))?
}

/// The value of one metric sample line (`name{labels} value`), 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Read a response head (to the blank line) from `s`.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    tokio::time::timeout(T, async {
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.expect("read") == 0 {
                break;
            }
            head.push(byte[0]);
        }
    })
    .await
    .expect("a response head in time");
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn connect_through_an_outbound_listener_tunnels_to_the_guest_with_a_identity() {
    let mut env = Env::start().await;
    let (guest, mut heads) = guest_server().await;
    let (b_in, a_out) = (free_addr(), free_addr());
    let b_agent = env.agent(&[]);
    register(
        &env,
        "b",
        &b_agent,
        json!({"identity": B, "inbound": [
            {"listen": b_in, "target": format!("tcp://{guest}"), "authz": {"identities": [A]}}]}),
    )
    .await;
    let a_agent = env.agent(&[]);
    register(
        &env,
        "a",
        &a_agent,
        json!({"identity": A, "outbound": [
            {"listen": a_out, "destination": {"endpoints": [b_in], "identity": B}}]}),
    )
    .await;
    let mut s = TcpStream::connect(&a_out).await.expect("connect");
    s.write_all(b"CONNECT db.example:5432 HTTP/1.1\r\nHost: db.example:5432\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}\n{}", env.logs());
    // The tunnel carries bytes both ways, and the client's end of stream reaches the guest.
    let back = echoed(&mut s, b"bytes through the tunnel")
        .await
        .expect("echo");
    assert_eq!(back, b"bytes through the tunnel");
    s.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    let r = tokio::time::timeout(T, s.read_to_end(&mut rest)).await;
    assert!(matches!(r, Ok(Ok(0))), "{r:?} {rest:?}");
    // The guest saw the CONNECT, from a's identity.
    let seen = tokio::time::timeout(T, heads.recv())
        .await
        .expect("in time")
        .expect("a head");
    assert!(
        seen.starts_with("CONNECT db.example:5432 HTTP/1.1"),
        "{seen}"
    );
    assert!(
        seen.to_ascii_lowercase()
            .contains(&format!("l5d-client-id: {A}")),
        "{seen}"
    );
}

#[tokio::test]
async fn the_connection_over_the_mesh_wide_cap_is_refused_and_counted_and_the_others_go_on() {
    let mut env = Env::start_with(&["--mesh-max-connections", "2"]).await;
    let echo = echo_server().await;
    let (one, two) = (free_addr(), free_addr());
    let agent = env.agent(&[]);
    let open = json!({"unauthenticated": true});
    register(
        &env,
        "b",
        &agent,
        json!({"identity": B, "inbound": [
            {"listen": one, "target": format!("tcp://{echo}"), "protocol": "opaque", "authz": open},
            {"listen": two, "target": format!("tcp://{echo}"), "protocol": "opaque", "authz": open}]}),
    )
    .await;
    // One connection on each listener (no per-listener limit is reached): both served and held.
    let mut first = TcpStream::connect(&one).await.expect("connect");
    assert_eq!(echoed(&mut first, b"one").await.expect("echo"), b"one");
    let mut second = TcpStream::connect(&two).await.expect("connect");
    assert_eq!(echoed(&mut second, b"two").await.expect("echo"), b"two");
    // The third is over the daemon-wide cap: closed without a byte.
    let mut third = TcpStream::connect(&one).await.expect("connect");
    let _ = third.write_all(b"three").await;
    let mut buf = Vec::new();
    let r = tokio::time::timeout(T, third.read_to_end(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?} {buf:?}");
    let metrics = env.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "cc_proxy_mesh_refused_total{vm=\"b\",direction=\"inbound\",reason=\"total_limit\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "cc_proxy_mesh_refused_total{vm=\"b\",direction=\"inbound\",reason=\"listener_limit\"}"
        ),
        0.0,
        "{metrics}"
    );
    // The held ones are unharmed.
    assert_eq!(echoed(&mut first, b"still").await.expect("echo"), b"still");
    assert_eq!(echoed(&mut second, b"here").await.expect("echo"), b"here");
    // A slot freed is a slot for the next connection.
    drop(first);
    let deadline = Instant::now() + T;
    loop {
        let mut next = TcpStream::connect(&one).await.expect("connect");
        if let Ok(back) = echoed(&mut next, b"next").await {
            assert_eq!(back, b"next");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed slot never served\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_guest_reaches_a_fixed_destination_through_a_hybrid_vsock_listener() {
    let mut env = Env::start().await;
    let echo = echo_server().await;
    let b_in = free_addr();
    let b_agent = env.agent(&[]);
    register(
        &env,
        "b",
        &b_agent,
        json!({"identity": B, "inbound": [
            {"listen": b_in, "target": format!("tcp://{echo}"), "protocol": "opaque",
             "authz": {"identities": [A]}}]}),
    )
    .await;
    let vsock = env.dir.path().join("a.vsock");
    let a_agent = env.agent(&[]);
    register(
        &env,
        "a",
        &a_agent,
        json!({"identity": A, "outbound": [
            {"listen": format!("hvsock://{}:5140", vsock.display()), "protocol": "opaque",
             "destination": {"endpoints": [b_in], "identity": B}}]}),
    )
    .await;
    // Where Firecracker connects when the guest connects to host port 5140: `<path>_5140`, no header.
    let path = format!("{}_5140", vsock.display());
    let mode = std::fs::metadata(&path)
        .expect("the hvsock socket")
        .permissions();
    assert!(mode.mode() & 0o170000 == 0o140000, "not a socket: {mode:?}");
    let mut s = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect");
    let back = echoed(&mut s, b"from the guest over hybrid vsock")
        .await
        .expect("echo");
    assert_eq!(back, b"from the guest over hybrid vsock");
    // Half-close: the guest's end of stream comes back as the end of the echo.
    s.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    let r = tokio::time::timeout(T, s.read_to_end(&mut rest)).await;
    assert!(matches!(r, Ok(Ok(0))), "{r:?}");
    let metrics = env.metrics().await;
    assert!(
        metrics.contains(&format!(
            "tcp_open_total{{direction=\"outbound\",tls=\"true\",client_id=\"\",server_id=\"{B}\",vm=\"a\"}} 1"
        )),
        "{metrics}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_of_a_meshed_vm_taps_its_own_mesh_requests_and_no_one_elses() {
    let Some(u) = other_user(OTHER_USER) else {
        return;
    };
    const ADMINS: &str = "ccproxy-test-admins";
    let Some(admin_gid) = test_group(ADMINS) else {
        eprintln!("SKIP: cannot create group {ADMINS}");
        return;
    };
    let mut env = Env::start_with(&["--socket-group", OTHER_USER, "--admin-group", ADMINS]).await;
    let (guest, _heads) = guest_server().await;
    let open = json!({"unauthenticated": true});
    // The second user, as a member of the admin group (a mesh is for privileged clients), registers "theirs";
    // root registers "roots". Both serve plaintext HTTP on an inbound listener.
    let (theirs_in, roots_in) = (free_addr(), free_addr());
    let theirs = env.agent(&[]);
    std::os::unix::fs::chown(&theirs.path, Some(u.uid), Some(u.gid)).expect("chown");
    let admin = ws_as(&env, u.uid, admin_gid, &[u.gid]).await;
    let r: Value = admin
        .request(
            "vm.register",
            params(register_params(
                "theirs",
                &theirs,
                json!({"identity": B, "inbound": [
                    {"listen": theirs_in, "target": format!("tcp://{guest}"), "authz": open}]}),
            )),
        )
        .await
        .expect("the admin-group member registers a meshed VM");
    assert_eq!(r["id"], "theirs", "{r}");
    let info: Value = admin
        .request("vm.info", params(json!({"id": "theirs"})))
        .await
        .expect("vm.info");
    assert_eq!(info["owner"], u.uid, "{info}");
    let roots = env.agent(&[]);
    register(
        &env,
        "roots",
        &roots,
        json!({"identity": A, "inbound": [
            {"listen": roots_in, "target": format!("tcp://{guest}"), "authz": open}]}),
    )
    .await;
    // The same uid outside the admin group is an ordinary client: it owns "theirs" and nothing else.
    let plain = ws_as(&env, u.uid, u.gid, &[u.gid]).await;
    let mut tap = plain
        .subscribe::<Value, _>(
            "tap.observe",
            params(json!({"rate": 1000, "filter": ["mesh_inbound_request"]})),
            "tap.unobserve",
        )
        .await
        .expect("tap.observe");
    let get = |addr: String, path: &'static str| async move {
        let mut s = TcpStream::connect(&addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: svc\r\n\r\n").as_bytes())
            .await
            .expect("write");
        read_head(&mut s).await
    };
    let deadline = tokio::time::Instant::now() + T;
    let mut seen = Vec::new();
    let found = loop {
        // Root's VM first, then the user's: the tap must skip the first and show the second.
        assert!(get(roots_in.clone(), "/roots")
            .await
            .starts_with("HTTP/1.1 200"));
        assert!(get(theirs_in.clone(), "/theirs")
            .await
            .starts_with("HTTP/1.1 200"));
        match tokio::time::timeout(Duration::from_millis(300), tap.next()).await {
            Ok(Some(Ok(ev))) if ev["vm"] == "theirs" => break ev,
            Ok(Some(Ok(ev))) => seen.push(ev),
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the owner's tap never showed its mesh request; saw {seen:?}\n{}",
            env.logs()
        );
    };
    assert_eq!(found["event"], "mesh_inbound_request", "{found}");
    assert_eq!(found["path"], "/theirs", "{found}");
    assert_eq!(found["status"], 200, "{found}");
    // Nothing of root's VM reached the user's tap.
    while let Ok(Some(Ok(ev))) = tokio::time::timeout(Duration::from_millis(300), tap.next()).await
    {
        seen.push(ev);
    }
    assert!(seen.iter().all(|e| e["vm"] == "theirs"), "{seen:?}");
}
