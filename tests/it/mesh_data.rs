//! The mesh front's data plane (issue 14), through the real binary: meshed VMs registered with `vm.register`
//! on one daemon with the embedded CA, real clients (curl, openssl s_client, raw sockets) and real servers
//! (a Python `http.server` guest, echo and banner servers) on loopback.
//!
//! Topology of [`Mesh::start`]:
//! - guest services: the Python server (`mesh_guest.py`), an echo server, a banner server (speaks first);
//! - VM `b` (identity B), inbound: `http` (auto, only A allowed), `open` (auto, unauthenticated allowed) and
//!   `h1` (`http1`: the guest speaks HTTP/1.1 only) in front of the Python server, `echo` (opaque) and
//!   `banner` (opaque);
//! - VM `a` (identity A), outbound: to b's `http`, `echo`, `banner` (opaque), `h1`, a transport-header connection to
//!   b's `http` naming the echo server's port, a hybrid-vsock listener taking PROXY v2 headers, and a
//!   `transparent:` listener for iptables-redirected connections;
//! - VM `c` (identity C), outbound to b's `http` (C is not allowed there).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{eventually, free_addr, Agent, Env};

pub(crate) const A: &str = "a.default.serviceaccount.identity.linkerd.cluster.local";
pub(crate) const B: &str = "b.default.serviceaccount.identity.linkerd.cluster.local";
const C: &str = "c.default.serviceaccount.identity.linkerd.cluster.local";
pub(crate) const T: Duration = Duration::from_secs(20);

/// The Python guest server, killed with the test.
pub(crate) struct Guest(Child);

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn start_guest() -> (Guest, SocketAddr) {
    use std::io::{BufRead, BufReader};
    let addr = free_addr();
    let port = addr.rsplit_once(':').map(|(_, p)| p).unwrap_or("0");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/mesh_guest.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(port)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 is installed (.ci/run installs it)");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    BufReader::new(stdout).read_line(&mut line).expect("guest");
    assert!(line.contains("listening"), "guest server: {line:?}");
    (Guest(child), addr.parse().expect("addr"))
}

/// Echo each connection's bytes until its end of stream, then close (the write side last).
pub(crate) async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A server-speaks-first service: a banner line as soon as a connection arrives.
async fn banner_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 banner ready\r\n").await;
                let mut sink = [0u8; 64];
                let _ = s.read(&mut sink).await;
            });
        }
    });
    addr
}

struct Mesh {
    env: Env,
    _guest: Guest,
    guest: SocketAddr,
    echo: SocketAddr,
    dir: PathBuf,
    b_http: String,
    b_open: String,
    a_http: String,
    a_echo: String,
    a_banner: String,
    a_transport: String,
    a_h1: String,
    a_transparent: String,
    a_hvsock: PathBuf,
    c_http: String,
}

/// `vm.register`'s parameters for a meshed VM of `agent`.
pub(crate) fn register_params(id: &str, agent: &Agent, mesh: Value) -> Value {
    let (control, io) = agent.uris(None);
    json!({"id": id, "control": control, "io": io, "timeout_ms": 5000, "mesh": mesh})
}

/// Register a meshed VM; the test fails with the daemon's logs if it is refused.
pub(crate) async fn register(env: &Env, id: &str, agent: &Agent, mesh: Value) {
    let r = env
        .rpc("vm.register", register_params(id, agent, mesh))
        .await;
    assert!(
        r.get("result").is_some(),
        "register {id}: {r}\n{}",
        env.logs()
    );
}

impl Mesh {
    async fn start(args: &[&str]) -> Mesh {
        let mut env = Env::start_with(args).await;
        let (guest_proc, guest) = start_guest();
        let echo = echo_server().await;
        let banner = banner_server().await;
        let dir = env.dir.path().to_path_buf();
        let (b_http, b_open, b_echo, b_banner, b_h1) = (
            free_addr(),
            free_addr(),
            free_addr(),
            free_addr(),
            free_addr(),
        );
        let b_agent = env.agent(&[]);
        register(
            &env,
            "b",
            &b_agent,
            json!({
                "identity": B,
                "inbound": [
                    {"listen": b_http, "target": format!("tcp://{guest}"), "authz": {"identities": [A]}},
                    {"listen": b_open, "target": format!("tcp://{guest}"),
                     "authz": {"unauthenticated": true}},
                    {"listen": b_echo, "target": format!("tcp://{echo}"), "protocol": "opaque"},
                    {"listen": b_banner, "target": format!("tcp://{banner}"), "protocol": "opaque"},
                    {"listen": b_h1, "target": format!("tcp://{guest}"), "protocol": "http1"},
                ],
            }),
        )
        .await;
        let (a_http, a_echo, a_banner, a_transport, a_h1, a_transparent) = (
            free_addr(),
            free_addr(),
            free_addr(),
            free_addr(),
            free_addr(),
            free_addr(),
        );
        let a_vsock = dir.join("a.vsock");
        let to = |ep: &str| json!({"endpoints": [ep], "identity": B});
        let a_agent = env.agent(&[]);
        register(
            &env,
            "a",
            &a_agent,
            json!({
                "identity": A,
                "outbound": [
                    {"listen": a_http, "destination": to(&b_http)},
                    {"listen": a_echo, "destination": to(&b_echo)},
                    {"listen": a_banner, "destination": to(&b_banner), "protocol": "opaque"},
                    {"listen": a_transport, "destination":
                        {"endpoints": [b_http], "identity": B, "opaque_transport_port": echo.port()}},
                    {"listen": a_h1, "destination": to(&b_h1)},
                    {"listen": format!("hvsock://{}:4140", a_vsock.display())},
                    {"listen": format!("transparent:{a_transparent}")},
                ],
            }),
        )
        .await;
        let c_http = free_addr();
        let c_agent = env.agent(&[]);
        register(
            &env,
            "c",
            &c_agent,
            json!({"identity": C, "outbound": [{"listen": c_http, "destination": to(&b_http)}]}),
        )
        .await;
        let mesh = Mesh {
            env,
            _guest: guest_proc,
            guest,
            echo,
            dir,
            b_http,
            b_open,
            a_http,
            a_echo,
            a_banner,
            a_transport,
            a_h1,
            a_transparent,
            a_hvsock: PathBuf::from(format!("{}_4140", a_vsock.display())),
            c_http,
        };
        mesh.wait_serving().await;
        mesh
    }

    /// The listeners serve once the VMs' certificates are issued: wait until a's path answers.
    async fn wait_serving(&self) {
        let deadline = Instant::now() + T;
        loop {
            let out = curl(&[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &url(&self.a_http, "/headers"),
            ]);
            if out.1 == "200" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the mesh path never answered ({out:?})\n{}",
                self.env.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// b's trust anchors as a PEM file.
    async fn anchors(&self) -> PathBuf {
        let r = self.env.rpc("mesh.trust_anchors", json!({})).await;
        let pem = r["result"]["pem"].as_str().unwrap_or_else(|| panic!("{r}"));
        let path = self.dir.join("anchors.pem");
        std::fs::write(&path, pem).expect("write anchors");
        path
    }
}

fn url(addr: &str, path: &str) -> String {
    format!("http://{addr}{path}")
}

/// Run curl; returns (success, stdout).
fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["--max-time", "20"])
        .args(args)
        .output()
        .expect("curl is installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn json_of(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s:?}"))
}

#[tokio::test]
async fn http1_through_a_and_b_carries_a_identity_big_bodies_and_reuses_connections() {
    let m = Mesh::start(&[]).await;
    // a's identity reaches the guest; a forged one does not.
    let (ok, out) = curl(&[
        "-s",
        "-H",
        "l5d-client-id: forged",
        &url(&m.a_http, "/headers"),
    ]);
    assert!(ok, "{out}");
    let v = json_of(&out);
    assert_eq!(v["client_id"], json!([A]), "{v}");
    assert_eq!(v["version"], "HTTP/1.1");

    // Keep-alive: two requests in one curl run use one client connection, and b's pool reuses its
    // connection to the guest (the guest sees the same client port). The requests are 100 ms apart
    // (`--rate`): a pooled connection becomes reusable only once its response has been fully taken
    // back, and a request arriving in that instant rightly opens a second one (seen under heavy load).
    let (ok, out) = curl(&[
        "-s",
        "--rate",
        "10/s",
        "-w",
        "\n%{num_connects}\n",
        &url(&m.a_http, "/headers"),
        &url(&m.a_http, "/headers"),
    ]);
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(
        (lines[1], lines[3]),
        ("1", "0"),
        "the second request opened a connection: {out}"
    );
    assert_eq!(
        json_of(lines[0])["peer_port"],
        json_of(lines[2])["peer_port"],
        "{out}"
    );

    // 10 MiB down and up, intact.
    let big = m.dir.join("big.bin");
    let (ok, _) = curl(&[
        "-s",
        "-o",
        big.to_str().unwrap_or(""),
        &url(&m.a_http, "/big"),
    ]);
    assert!(ok);
    let data = std::fs::read(&big).expect("downloaded");
    assert_eq!(data.len(), 10 * 1024 * 1024);
    assert!(
        data.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8),
        "corrupted download"
    );
    let (ok, out) = curl(&[
        "-s",
        "--data-binary",
        &format!("@{}", big.display()),
        &url(&m.a_http, "/sum"),
    ]);
    assert!(ok);
    let expected = sha256_hex(&data);
    assert_eq!(out, format!("{expected} {}", data.len()));

    // The metrics saw it, with Linkerd's names and labels.
    let metrics = m.env.metrics().await;
    for needle in [
        "tcp_open_total{direction=\"inbound\",tls=\"true\",client_id=\"a.default",
        "tcp_open_total{direction=\"outbound\",tls=\"true\",client_id=\"\",server_id=\"b.default",
        "request_total{direction=\"inbound\"",
        "request_total{direction=\"outbound\",tls=\"true\",client_id=\"\",server_id=\"b.default",
        "status_code=\"200\",classification=\"success\"",
        "response_latency_ms_bucket{",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn unauthorized_and_unauthenticated_peers_get_403_and_forged_identities_are_stripped() {
    let m = Mesh::start(&[]).await;
    // c is authenticated but not allowed on b's `http` listener.
    let (ok, out) = curl(&["-s", "-i", &url(&m.c_http, "/headers")]);
    assert!(ok, "{out}");
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("l5d-proxy-error: unauthorized"),
        "{out}"
    );
    // Plaintext to b's `http` listener: 403 too, nothing reaches the guest.
    let (_, out) = curl(&["-s", "-i", &url(&m.b_http, "/headers")]);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    // Plaintext to `open` (unauthenticated allowed): served, the forged identity removed.
    let (ok, out) = curl(&[
        "-s",
        "-H",
        "l5d-client-id: forged",
        &url(&m.b_open, "/headers"),
    ]);
    assert!(ok, "{out}");
    assert_eq!(json_of(&out)["client_id"], json!([]), "{out}");
    let metrics = m.env.metrics().await;
    assert!(
        metrics.contains(
            "cc_proxy_mesh_refused_total{vm=\"b\",direction=\"inbound\",reason=\"unauthorized\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("status_code=\"403\""), "{metrics}");
}

/// The `authority` label values of VM `vm`'s inbound `request_total` series, with their counts.
fn inbound_authorities(metrics: &str, vm: &str) -> Vec<(String, u64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with("request_total{direction=\"inbound\""))
        .filter(|l| l.contains(&format!("vm=\"{vm}\"")))
        .filter_map(|l| {
            let (_, rest) = l.split_once("authority=\"")?;
            let (auth, _) = rest.split_once('"')?;
            let count = l.rsplit_once(' ')?.1.parse().ok()?;
            Some((auth.to_string(), count))
        })
        .collect()
}

#[tokio::test]
async fn request_metrics_hold_a_bounded_number_of_authorities_and_none_from_denied_peers() {
    let m = Mesh::start(&["--mesh-max-authorities", "3"]).await;
    // Six authorities from an allowed (unauthenticated) peer: three get their own series, the rest share one.
    for i in 1..=6 {
        let host = format!("Host: h{i}.example");
        let (ok, out) = curl(&["-s", "-H", &host, &url(&m.b_open, "/headers")]);
        assert!(ok, "{out}");
    }
    // A denied peer's request is answered 403 and counted without the authority it chose.
    let (_, out) = curl(&[
        "-s",
        "-i",
        "-H",
        "Host: denied.example",
        &url(&m.b_http, "/headers"),
    ]);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    let metrics = m.env.metrics().await;
    let seen = inbound_authorities(&metrics, "b");
    let count = |a: &str| seen.iter().find(|(s, _)| s == a).map(|(_, n)| *n);
    // The harness's own request from a already took one of the three; h1 and h2 take the others.
    let own: Vec<_> = seen
        .iter()
        .filter(|(a, _)| !a.is_empty() && a != "~other")
        .collect();
    assert_eq!(own.len(), 3, "{seen:?}");
    assert_eq!(count("h1.example"), Some(1), "{seen:?}");
    assert_eq!(count("h2.example"), Some(1), "{seen:?}");
    assert_eq!(
        count("~other"),
        Some(4),
        "h3..h6 share one series: {seen:?}"
    );
    assert_eq!(count(""), Some(1), "the denied request: {seen:?}");
    assert_eq!(count("denied.example"), None, "{metrics}");
}

#[tokio::test]
async fn openssl_sees_tls13_only_and_a_p256_leaf_for_b() {
    let m = Mesh::start(&[]).await;
    let anchors = m.anchors().await;
    let connect = m.b_http.clone();
    let s_client = |extra: &[&str], input: &str| {
        let mut cmd = Command::new("openssl");
        cmd.args([
            "s_client",
            "-connect",
            &connect,
            "-servername",
            B,
            "-CAfile",
        ])
        .arg(&anchors)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("openssl is installed");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            let _ = stdin.write_all(input.as_bytes());
            // Keep stdin open briefly so the response arrives before s_client quits on EOF.
            std::thread::sleep(Duration::from_millis(700));
        }
        let out = child.wait_with_output().expect("openssl");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // TLS 1.3 without a client certificate: the handshake completes (a certificate is asked for, not
    // required) and the listener's policy answers the request with 403.
    let out = s_client(
        &["-tls1_3", "-showcerts"],
        "GET /headers HTTP/1.1\r\nHost: b\r\n\r\n",
    );
    assert!(out.contains("TLSv1.3"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("HTTP/1.1 403"), "{out}");
    // The leaf: P-256, b's identity as its SAN.
    let leaf_start = out
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let leaf_end = out[leaf_start..]
        .find("-----END CERTIFICATE-----")
        .expect("end")
        + leaf_start
        + 25;
    let leaf = m.dir.join("leaf.pem");
    std::fs::write(&leaf, &out[leaf_start..leaf_end]).expect("write leaf");
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&leaf)
        .output()
        .expect("openssl x509");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("prime256v1") || text.contains("P-256"),
        "{text}"
    );
    assert!(text.contains(&format!("DNS:{B}")), "{text}");
    // TLS 1.2 is refused: a protocol_version alert, no cipher, no response.
    let out = s_client(&["-tls1_2"], "GET /headers HTTP/1.1\r\nHost: b\r\n\r\n");
    assert!(out.contains("alert protocol version"), "{out}");
    assert!(
        out.contains("Cipher is (NONE)") && !out.contains("HTTP/1.1"),
        "{out}"
    );
}

#[tokio::test]
async fn opaque_echo_half_closes_and_server_first_banners_are_not_stalled() {
    let m = Mesh::start(&[]).await;
    // Half-close: the client shuts its write side and still receives everything.
    let mut s = TcpStream::connect(&m.a_echo).await.expect("connect");
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&payload).await.expect("write");
        w.shutdown().await.expect("shutdown");
    };
    let mut got = Vec::new();
    let recv = tokio::time::timeout(T, r.read_to_end(&mut got));
    let ((), read) = tokio::join!(send, recv);
    assert!(matches!(read, Ok(Ok(_))), "{read:?}");
    assert!(got == payload, "echoed {} of {}", got.len(), payload.len());

    // A banner from a server-speaks-first guest through a's opaque outbound and b's opaque inbound.
    let start = Instant::now();
    let mut s = TcpStream::connect(&m.a_banner).await.expect("connect");
    let mut line = [0u8; 18];
    tokio::time::timeout(T, s.read_exact(&mut line))
        .await
        .expect("banner in time")
        .expect("banner");
    let took = start.elapsed();
    assert_eq!(&line, b"220 banner ready\r\n");
    assert!(
        took < Duration::from_millis(100),
        "the banner took {took:?}"
    );
}

#[tokio::test]
async fn a_transport_header_reaches_its_port_and_a_proxy_v2_header_names_the_destination() {
    use ppp::v2::{Builder, Command as PCommand, Protocol, Version};
    let m = Mesh::start(&[]).await;
    // a's transport-header listener goes to b's `http` inbound, whose header names the echo port.
    let mut s = TcpStream::connect(&m.a_transport).await.expect("connect");
    let mut back = [0u8; 11];
    tokio::time::timeout(T, async {
        s.write_all(b"hello there").await?;
        s.read_exact(&mut back).await
    })
    .await
    .expect("in time")
    .expect("echo");
    assert_eq!(&back, b"hello there");
    assert_ne!(m.echo, m.guest);

    // The guest reaches the mesh over hybrid vsock: a PROXY v2 header names b's `open` inbound.
    let mut s = tokio::net::UnixStream::connect(&m.a_hvsock)
        .await
        .expect("hybrid vsock socket");
    let dst: SocketAddr = m.b_open.parse().expect("addr");
    let src = SocketAddr::from(([10, 0, 0, 2], 40000));
    let header =
        Builder::with_addresses(Version::Two | PCommand::Proxy, Protocol::Stream, (src, dst))
            .build()
            .expect("header");
    let mut resp = Vec::new();
    tokio::time::timeout(T, async {
        s.write_all(&header).await?;
        s.write_all(b"GET /headers HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            .await?;
        s.read_to_end(&mut resp).await
    })
    .await
    .expect("in time")
    .expect("response");
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // A header that is not PROXY v2 is refused (closed).
    let mut s = tokio::net::UnixStream::connect(&m.a_hvsock)
        .await
        .expect("connect");
    let mut out = Vec::new();
    let r = tokio::time::timeout(T, async {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        s.read_to_end(&mut out).await
    })
    .await
    .expect("closed in time");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?} {out:?}");
}

#[tokio::test]
async fn websocket_echo_of_a_thousand_messages_and_a_close() {
    let m = Mesh::start(&[]).await;
    let mut s = TcpStream::connect(&m.a_http).await.expect("connect");
    let req = "GET /ws HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    s.write_all(req.as_bytes()).await.expect("write");
    // Read the 101 head.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(T, s.read_exact(&mut byte))
            .await
            .expect("in time")
            .expect("head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    let (mut r, mut w) = s.split();
    let writer = async {
        for i in 0..1000u32 {
            w.write_all(&ws_frame(1, format!("message {i}").as_bytes()))
                .await
                .expect("send");
        }
        w.write_all(&ws_frame(8, &1000u16.to_be_bytes()))
            .await
            .expect("close");
    };
    let reader = async {
        for i in 0..1000u32 {
            let (op, payload) = read_frame(&mut r).await;
            assert_eq!(op, 1);
            assert_eq!(payload, format!("message {i}").into_bytes());
        }
        let (op, payload) = read_frame(&mut r).await;
        assert_eq!((op, payload), (8, 1000u16.to_be_bytes().to_vec()));
    };
    tokio::time::timeout(T, async { tokio::join!(writer, reader) })
        .await
        .expect("echo in time");
}

/// A masked client frame.
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    r.read_exact(&mut h).await.expect("frame head");
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let n = (h[1] & 0x7f) as usize;
    assert!(n < 126);
    let mut p = vec![0u8; n];
    r.read_exact(&mut p).await.expect("payload");
    (h[0] & 0x0f, p)
}

#[tokio::test]
async fn h2_prior_knowledge_and_orig_proto_reach_the_guest_as_http1() {
    let m = Mesh::start(&[]).await;
    // curl speaks HTTP/2 with prior knowledge through a and b; b's `h1` listener says its guest speaks
    // HTTP/1.1, so the request reaches the Python server as HTTP/1.1 and comes back over HTTP/2.
    let (ok, out) = curl(&[
        "-s",
        "-i",
        "--http2-prior-knowledge",
        &url(&m.a_h1, "/headers"),
    ]);
    assert!(ok, "{out}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    assert_eq!(json_of(body)["version"], "HTTP/1.1", "{out}");
    let (ok, out) = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{size_download}",
        "--http2-prior-knowledge",
        &url(&m.a_h1, "/big"),
    ]);
    assert!(ok, "{out}");
    assert_eq!(out, format!("2 {}", 10 * 1024 * 1024));

    // An HTTP/2 request marked l5d-orig-proto (what a Linkerd proxy sends for an HTTP/1 request) is
    // answered by the HTTP/1.1-only guest, over HTTP/2 back to the client, marked the same way.
    let (ok, out) = curl(&[
        "-s",
        "-i",
        "--http2-prior-knowledge",
        "-H",
        "l5d-orig-proto: HTTP/1.1",
        &url(&m.a_http, "/headers"),
    ]);
    assert!(ok, "{out}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("l5d-orig-proto: http/1.1"),
        "{out}"
    );
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    let v = json_of(body);
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["client_id"], json!([A]));
}

#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish() {
    let mut m = Mesh::start(&[]).await;
    let a_http = m.a_http.clone();
    let mark = m.env.dir.path().join("slow-arrived");
    let path = format!("/slow?mark={}", mark.display());
    let slow =
        std::thread::spawn(move || curl(&["-s", "-w", " %{http_code}", &url(&a_http, &path)]));
    // The daemon is stopped only once the request is at the guest: in flight through both hops.
    assert!(
        eventually(Duration::from_secs(10), || mark.exists()).await,
        "the request never reached the guest"
    );
    let status = m.env.stop_daemon().await;
    assert!(status.success(), "{status}");
    let (ok, out) = slow.join().expect("curl thread");
    assert!(ok, "{out}");
    assert_eq!(out, "slow done 200");
}

/// Removes the iptables rule it was made with.
struct NatRule(Vec<String>);

impl Drop for NatRule {
    fn drop(&mut self) {
        let mut args = vec!["-t".to_string(), "nat".into(), "-D".into()];
        args.extend(self.0.iter().cloned());
        let _ = Command::new("iptables").args(&args).status();
    }
}

#[tokio::test]
async fn transparent_outbound_takes_the_original_destination_of_a_redirected_connection() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: iptables REDIRECT needs root");
        return;
    }
    let usable = Command::new("iptables")
        .args(["-t", "nat", "-S", "OUTPUT"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !usable {
        println!("skipped: iptables (nat table) is not usable here");
        return;
    }
    let m = Mesh::start(&[]).await;
    let a_port = m
        .a_transparent
        .rsplit_once(':')
        .map(|(_, p)| p)
        .unwrap_or("0")
        .to_string();
    // Only connections from the test's source port are redirected: the daemon's own connection to the
    // original destination (from an ephemeral port) goes straight there.
    let src = free_addr();
    let src: SocketAddr = src.parse().expect("addr");
    let spec: Vec<String> = [
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "127.0.0.1",
        "--dport",
        &m.echo.port().to_string(),
        "--sport",
        &src.port().to_string(),
        "-j",
        "REDIRECT",
        "--to-ports",
        &a_port,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut insert = vec!["-t".to_string(), "nat".into(), "-I".into()];
    insert.extend(spec.iter().cloned());
    let ok = Command::new("iptables")
        .args(&insert)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("skipped: cannot add an iptables REDIRECT rule");
        return;
    }
    let _rule = NatRule(spec);
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_reuseaddr(true).expect("reuseaddr");
    sock.bind(src).expect("bind the source port");
    let mut s = sock.connect(m.echo).await.expect("connect (redirected)");
    let mut back = [0u8; 11];
    tokio::time::timeout(T, async {
        s.write_all(b"transparent").await?;
        s.read_exact(&mut back).await
    })
    .await
    .expect("in time")
    .expect("echo");
    assert_eq!(&back, b"transparent");
    // It went through a's transparent listener: an outbound plaintext connection of VM a.
    let metrics = m.env.metrics().await;
    assert!(
        metrics.contains(
            "tcp_open_total{direction=\"outbound\",tls=\"no_identity\",client_id=\"\",server_id=\"\",vm=\"a\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_tap_shows_inbound_mesh_requests_with_the_client_identity() {
    use std::io::BufRead;
    let m = Mesh::start(&[]).await;
    let mut tap = Command::new(crate::common::proxy_bin())
        .arg("--socket")
        .arg(&m.env.socket)
        .args(["--json", "tap", "b", "--filter", "mesh_inbound_request"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cc-proxy tap");
    let stdout = tap.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
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
    let deadline = Instant::now() + T;
    let mut seen = Vec::new();
    let found = loop {
        // Requests until the tap (opened asynchronously) reports one.
        let (ok, _) = curl(&["-s", &url(&m.a_http, "/headers?tapped")]);
        assert!(ok);
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            if line.contains("/headers?tapped") {
                break line;
            }
            seen.push(line);
        }
        assert!(
            Instant::now() < deadline,
            "no mesh event; saw {seen:?}\n{}",
            m.env.logs()
        );
    };
    let _ = tap.kill();
    let _ = tap.wait();
    let v = json_of(&found);
    let ev = if v.get("event").is_some() {
        v.clone()
    } else {
        v["params"].clone()
    };
    assert_eq!(ev["event"], "mesh_inbound_request", "{found}");
    assert_eq!(ev["vm"], "b", "{found}");
    assert_eq!(ev["method"], "GET", "{found}");
    assert_eq!(ev["status"], 200, "{found}");
    assert_eq!(ev["peer_identity"], A, "{found}");
}

#[tokio::test]
async fn a_connection_over_the_listener_limit_is_closed_and_counted() {
    let m = Mesh::start(&["--mesh-max-connections-per-listener", "1"]).await;
    // The first connection is served (its echo comes back) and held open.
    let mut first = TcpStream::connect(&m.a_echo).await.expect("connect");
    let mut back = [0u8; 4];
    tokio::time::timeout(T, async {
        first.write_all(b"held").await?;
        first.read_exact(&mut back).await
    })
    .await
    .expect("in time")
    .expect("echo");
    // The second is closed at once, without a byte.
    let mut second = TcpStream::connect(&m.a_echo).await.expect("connect");
    let mut buf = Vec::new();
    let r = tokio::time::timeout(T, second.read_to_end(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?} {buf:?}");
    let metrics = m.env.metrics().await;
    assert!(
        metrics.contains(
            "cc_proxy_mesh_refused_total{vm=\"a\",direction=\"outbound\",reason=\"listener_limit\"} 1"
        ),
        "{metrics}"
    );
    drop(first);
}
