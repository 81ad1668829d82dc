//! The mesh front (issues 14 and 15): the two-hop mTLS path client -> VM a's outbound listener -> VM b's
//! inbound listener -> server, through cc-proxy and through HAProxy configured to do the same work, and direct
//! (client -> server), side by side in one run; plus the cost of many meshed VMs sharing a few identities.
//!
//! - Certificates: one CA and P-256 leaves for a and b made here with rcgen; cc-proxy reads them with
//!   `--mesh-identity-dir`, HAProxy from PEM files, so both proxies do the same cryptography.
//! - Servers (in this process): a hyper HTTP/1.1 server answering every request with a 2-byte body, and an
//!   opaque TCP server whose first byte picks echo (`E`) or sink (`S`: count the bytes to end of stream,
//!   answer the count).
//! - HAProxy (Debian's `haproxy`, run in the foreground): for HTTP, one frontend taking plaintext and
//!   originating TLS 1.3 with a's certificate, SNI b and a check of b's SAN (`verifyhost`), one terminating
//!   TLS 1.3 with b's certificate and requiring a client certificate from the same CA; the same pair in
//!   `mode tcp` for opaque bytes.
//! - Load: `wrk` (Debian's package) for requests/s at 16 connections; our own keep-alive client for latency
//!   at one connection; raw sockets for throughput and idle connections.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::procs::{free_addr, register, terminate, Agent, Daemon, Setup};
use crate::stats::percentile;
use crate::BenchError;

const A: &str = "a.bench.serviceaccount.identity.linkerd.cluster.local";
const B: &str = "b.bench.serviceaccount.identity.linkerd.cluster.local";
/// Requests per latency block; the three paths take turns block by block.
const BLOCK: usize = 100;
/// Requests per path before measuring (handshakes, pools, caches).
const WARMUP: usize = 200;
/// Connections of the requests/s figure (the figure).
const RPS_CONNECTIONS: usize = 16;
/// Idle meshed connections held open for the memory figure.
pub const IDLE_CONNECTIONS: usize = 1000;
/// Meshed VMs of the scale figure, and the identities they share.
pub const MESHED_VMS: usize = 1000;
pub const SHARED_IDENTITIES: usize = 10;
/// Time given to a process to settle before reading its RSS.
const SETTLE: Duration = Duration::from_millis(500);
/// How long the proxies get to start serving.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Sizes of one mesh run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MeshPlan {
    pub requests: usize,
    pub reps: usize,
    pub wrk_secs: u64,
    pub tcp_bytes: u64,
}

/// One path's latency at one connection, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PathLatency {
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Everything the mesh group measured; `haproxy` fields are `None` when HAProxy is not there.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MeshResults {
    /// Why HAProxy was not measured.
    pub haproxy_missing: Option<String>,
    /// Why requests/s were not measured (no `wrk`).
    pub wrk_missing: Option<String>,
    pub direct: PathLatency,
    pub cc: PathLatency,
    pub haproxy: Option<PathLatency>,
    pub rps_direct: Vec<f64>,
    pub rps_cc: Vec<f64>,
    pub rps_haproxy: Vec<f64>,
    /// Opaque TCP upload rates, bytes/s.
    pub tcp_direct: Vec<f64>,
    pub tcp_cc: Vec<f64>,
    pub tcp_haproxy: Vec<f64>,
    /// RSS per idle meshed connection (both hops), bytes.
    pub idle_cc: Option<f64>,
    pub idle_haproxy: Option<f64>,
    pub scale: Option<MeshScale>,
}

/// 1,000 meshed VMs sharing 10 identities against 1,000 plain VMs.
#[derive(Debug, Clone, Serialize)]
pub struct MeshScale {
    pub vms: usize,
    pub identities: usize,
    pub plain_per_vm_bytes: f64,
    pub meshed_per_vm_bytes: f64,
    /// `cc_proxy_mesh_certificate_issuances_total`, summed over identities.
    pub certificates_issued: f64,
}

// ---------------------------------------------------------------------------------------------------------
// Certificates

/// The PEM files both proxies use.
struct Certs {
    /// `--mesh-identity-dir` layout: `ca.crt`, `<identity>/tls.crt`, `<identity>/tls.key`.
    identity_dir: PathBuf,
    ca: PathBuf,
    /// Certificate then key, as HAProxy's `crt` wants.
    a_pem: PathBuf,
    b_pem: PathBuf,
}

fn cert_err(e: rcgen::Error) -> BenchError {
    BenchError::Setup(format!("certificate: {e}"))
}

fn make_certs(dir: &Path) -> Result<Certs, BenchError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    };
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    let mut ca_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "cc-proxy-bench mesh CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_err)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let identity_dir = dir.join("identities");
    std::fs::create_dir_all(&identity_dir)?;
    let ca = identity_dir.join("ca.crt");
    std::fs::write(&ca, ca_cert.pem())?;
    let mut combined = Vec::new();
    for id in [A, B] {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let mut params = CertificateParams::new(vec![id.to_string()]).map_err(cert_err)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, id);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;
        let d = identity_dir.join(id);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("tls.crt"), cert.pem())?;
        std::fs::write(d.join("tls.key"), key.serialize_pem())?;
        let pem = dir.join(format!("{}.pem", &id[..1]));
        std::fs::write(&pem, format!("{}{}", cert.pem(), key.serialize_pem()))?;
        combined.push(pem);
    }
    Ok(Certs {
        identity_dir,
        ca,
        b_pem: combined.pop().unwrap_or_default(),
        a_pem: combined.pop().unwrap_or_default(),
    })
}

// ---------------------------------------------------------------------------------------------------------
// Servers

/// The backend servers: HTTP (2-byte answer) and opaque (echo or sink).
struct Servers {
    http: SocketAddr,
    tcp: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn start_servers() -> Result<Servers, BenchError> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    let (http_addr, tcp_addr) = (http.local_addr()?, tcp.local_addr()?);
    let http_task = tokio::spawn(async move {
        while let Ok((s, _)) = http.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let tcp_task = tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut mode = [0u8; 1];
                if s.read_exact(&mut mode).await.is_err() {
                    return;
                }
                if mode[0] == b'E' {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                } else {
                    let mut buf = vec![0u8; 256 << 10];
                    let mut total = 0u64;
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => total += n as u64,
                            Err(_) => return,
                        }
                    }
                    let _ = s.write_all(&total.to_be_bytes()).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    Ok(Servers {
        http: http_addr,
        tcp: tcp_addr,
        tasks: vec![http_task, tcp_task],
    })
}

// ---------------------------------------------------------------------------------------------------------
// The paths

/// Where each path is entered: the HTTP and the opaque address.
#[derive(Debug, Clone)]
struct Entry {
    http: String,
    tcp: String,
}

/// cc-proxy with VMs a (outbound) and b (inbound) on one daemon.
struct CcMesh {
    daemon: Daemon,
    _agent: Agent,
    entry: Entry,
}

async fn start_cc(
    setup: &Setup,
    certs: &Certs,
    servers: &Servers,
    name: &str,
) -> Result<CcMesh, BenchError> {
    let agent = Agent::start(setup, &format!("{name}-agent"), 2)?;
    let dir_arg = certs.identity_dir.display().to_string();
    let daemon = Daemon::start_with(setup, name, &["--mesh-identity-dir", &dir_arg]).await?;
    let (b_http, b_tcp, a_http, a_tcp) = (free_addr()?, free_addr()?, free_addr()?, free_addr()?);
    let client = daemon.client();
    let authz = json!({"identities": [A]});
    register_mesh(
        &client,
        "b",
        &agent,
        1,
        json!({"identity": B, "inbound": [
            {"listen": b_http, "target": format!("tcp://{}", servers.http), "authz": authz},
            {"listen": b_tcp, "target": format!("tcp://{}", servers.tcp), "protocol": "opaque", "authz": authz},
        ]}),
    )
    .await?;
    register_mesh(
        &client,
        "a",
        &agent,
        0,
        json!({"identity": A, "outbound": [
            {"listen": a_http, "destination": {"endpoints": [b_http], "identity": B}},
            {"listen": a_tcp, "destination": {"endpoints": [b_tcp], "identity": B}, "protocol": "opaque"},
        ]}),
    )
    .await?;
    let entry = Entry {
        http: a_http,
        tcp: a_tcp,
    };
    wait_serving(&entry).await?;
    Ok(CcMesh {
        daemon,
        _agent: agent,
        entry,
    })
}

async fn register_mesh(
    client: &cc_proxy_api::client::Client,
    id: &str,
    agent: &Agent,
    n: usize,
    mesh: serde_json::Value,
) -> Result<(), BenchError> {
    let (control, io) = agent.uris(n);
    let _: serde_json::Value = client
        .call(
            "vm.register",
            json!({"id": id, "control": control, "io": io, "timeout_ms": 10_000, "mesh": mesh}),
        )
        .await?;
    Ok(())
}

/// HAProxy doing the same two hops, in the foreground.
struct Haproxy {
    child: Child,
    entry: Entry,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// True when `prog` runs with `arg` (a version flag).
fn runs(prog: &str, arg: &str) -> bool {
    Command::new(prog)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

async fn start_haproxy(
    setup: &Setup,
    certs: &Certs,
    servers: &Servers,
) -> Result<Haproxy, BenchError> {
    let (b_http, b_tcp, a_http, a_tcp) = (free_addr()?, free_addr()?, free_addr()?, free_addr()?);
    let (ca, a_pem, b_pem) = (
        certs.ca.display(),
        certs.a_pem.display(),
        certs.b_pem.display(),
    );
    // The origination side: a's certificate, SNI b, b's SAN checked; the termination side: b's certificate,
    // a client certificate required and verified against the same CA. TLS 1.3 only on both.
    let originate = format!(
        "ssl crt {a_pem} ca-file {ca} verify required sni str({B}) verifyhost {B} ssl-min-ver TLSv1.3"
    );
    let terminate_tls = format!("ssl crt {b_pem} ca-file {ca} verify required ssl-min-ver TLSv1.3");
    let cfg = format!(
        "global\n\
         \tmaxconn 4000\n\
         defaults\n\
         \ttimeout connect 5s\n\
         \ttimeout client 90s\n\
         \ttimeout server 90s\n\
         \tmaxconn 4000\n\
         frontend a_http\n\
         \tmode http\n\
         \tbind {a_http}\n\
         \tdefault_backend b_http\n\
         backend b_http\n\
         \tmode http\n\
         \tserver b {b_http} {originate}\n\
         frontend b_http_in\n\
         \tmode http\n\
         \tbind {b_http} {terminate_tls}\n\
         \tdefault_backend server_http\n\
         backend server_http\n\
         \tmode http\n\
         \tserver s {http}\n\
         listen a_tcp\n\
         \tmode tcp\n\
         \tbind {a_tcp}\n\
         \tserver b {b_tcp} {originate}\n\
         listen b_tcp_in\n\
         \tmode tcp\n\
         \tbind {b_tcp} {terminate_tls}\n\
         \tserver s {tcp}\n",
        http = servers.http,
        tcp = servers.tcp,
    );
    let path = setup.dir.join("haproxy.cfg");
    std::fs::File::create(&path)?.write_all(cfg.as_bytes())?;
    let log = std::fs::File::create(setup.dir.join("haproxy.log"))?;
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| BenchError::Setup(format!("haproxy: {e}")))?;
    let mut h = Haproxy {
        child,
        entry: Entry {
            http: a_http,
            tcp: a_tcp,
        },
    };
    if let Err(e) = wait_serving(&h.entry).await {
        let log = std::fs::read_to_string(setup.dir.join("haproxy.log")).unwrap_or_default();
        terminate(&mut h.child);
        return Err(BenchError::Setup(format!("haproxy: {e}: {log}")));
    }
    Ok(h)
}

/// Wait until a GET through `entry` is answered (certificates loaded, listeners serving).
async fn wait_serving(entry: &Entry) -> Result<(), BenchError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let attempt = async {
            let mut c = HttpConn::connect(&entry.http).await?;
            c.get().await
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if Instant::now() > deadline => {
                return Err(BenchError::Setup(format!(
                    "{} never answered: {e}",
                    entry.http
                )))
            }
            Err(_) if Instant::now() > deadline => {
                return Err(BenchError::Setup(format!("{} never answered", entry.http)))
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Clients

/// Largest response head accepted by [`HttpConn`].
const MAX_HEAD: usize = 16 << 10;

/// One HTTP/1.1 keep-alive connection, one `GET /` at a time.
struct HttpConn {
    conn: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    async fn connect(addr: &str) -> Result<HttpConn, BenchError> {
        let conn = TcpStream::connect(addr).await?;
        conn.set_nodelay(true)?;
        Ok(HttpConn {
            conn,
            buf: Vec::with_capacity(1024),
        })
    }

    async fn get(&mut self) -> Result<(), BenchError> {
        self.conn
            .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            .await?;
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(BenchError::Protocol("response head too large".into()));
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(BenchError::Protocol(format!(
                "HTTP status: {}",
                head.lines().next().unwrap_or("")
            )));
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or_else(|| BenchError::Protocol("response without Content-Length".into()))?;
        if len > MAX_HEAD {
            return Err(BenchError::Protocol("response body too large".into()));
        }
        while self.buf.len() < head_end + len {
            self.fill().await?;
        }
        self.buf.drain(..head_end + len);
        Ok(())
    }

    async fn fill(&mut self) -> Result<(), BenchError> {
        let mut chunk = [0u8; 4096];
        let n = self.conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(BenchError::Protocol("connection closed".into()));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// Latency at one connection per path, the paths taking turns in blocks of [`BLOCK`].
async fn latency(entries: &[&str], requests: usize) -> Result<Vec<PathLatency>, BenchError> {
    let mut conns = Vec::new();
    for e in entries {
        let mut c = HttpConn::connect(e).await?;
        for _ in 0..WARMUP {
            c.get().await?;
        }
        conns.push(c);
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(requests); entries.len()];
    let mut done = 0;
    while done < requests {
        let n = BLOCK.min(requests - done);
        for (c, s) in conns.iter_mut().zip(samples.iter_mut()) {
            for _ in 0..n {
                let t0 = Instant::now();
                c.get().await?;
                s.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        done += n;
    }
    Ok(samples
        .iter()
        .map(|s| PathLatency {
            samples: s.len(),
            p50_us: percentile(s, 50.0),
            p99_us: percentile(s, 99.0),
        })
        .collect())
}

/// `wrk` at [`RPS_CONNECTIONS`] connections for `secs` against `addr`: requests per second.
async fn wrk(addr: &str, secs: u64) -> Result<f64, BenchError> {
    let out = tokio::process::Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{RPS_CONNECTIONS}"),
            &format!("-d{secs}s"),
            &format!("http://{addr}/"),
        ])
        .stdin(Stdio::null())
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        return Err(BenchError::Protocol(format!("wrk saw errors: {text}")));
    }
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| BenchError::Protocol(format!("no Requests/sec in wrk's output: {text}")))
}

/// Upload `bytes` through `addr` to the sink; bytes/s from the first byte to the sink's count.
async fn tcp_upload(addr: &str, bytes: u64) -> Result<f64, BenchError> {
    let chunk = vec![0x5au8; 64 << 10];
    let mut c = TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    let t0 = Instant::now();
    c.write_all(b"S").await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        c.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    c.shutdown().await?;
    let mut count = [0u8; 8];
    c.read_exact(&mut count).await?;
    let secs = t0.elapsed().as_secs_f64();
    let got = u64::from_be_bytes(count);
    if got != bytes {
        return Err(BenchError::Protocol(format!(
            "the sink counted {got} bytes of {bytes}"
        )));
    }
    Ok(bytes as f64 / secs)
}

/// Open [`IDLE_CONNECTIONS`] echo connections through `addr`, each proven end to end with one echoed byte,
/// and return the RSS delta of `pid` per connection while they are held.
async fn idle_cost(addr: &str, pid: u32) -> Result<f64, BenchError> {
    tokio::time::sleep(SETTLE).await;
    let before = crate::procs::rss_bytes(pid)?;
    let mut held = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        let mut c = TcpStream::connect(addr).await?;
        c.write_all(b"Ex").await?;
        let mut back = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut back))
            .await
            .map_err(|_| BenchError::Protocol("no echo through the idle connection".into()))??;
        held.push(c);
    }
    tokio::time::sleep(SETTLE).await;
    let after = crate::procs::rss_bytes(pid)?;
    drop(held);
    Ok((after as f64 - before as f64) / IDLE_CONNECTIONS as f64)
}

// ---------------------------------------------------------------------------------------------------------
// The group

/// Run the two-hop comparison and the meshed-VM scale figure.
pub async fn run(setup: &Setup, plan: MeshPlan) -> Result<MeshResults, BenchError> {
    let mut res = MeshResults::default();
    let dir = setup.dir.join("mesh");
    std::fs::create_dir_all(&dir)?;
    let certs = make_certs(&dir)?;
    let servers = start_servers().await?;
    let cc = start_cc(setup, &certs, &servers, "mesh").await?;
    let haproxy = if !runs("haproxy", "-v") {
        res.haproxy_missing = Some("haproxy not installed".into());
        None
    } else {
        match start_haproxy(setup, &certs, &servers).await {
            Ok(h) => Some(h),
            Err(e) => {
                crate::log(format!("mesh: {e}"));
                res.haproxy_missing = Some(format!("haproxy did not start ({e})"));
                None
            }
        }
    };
    let direct = Entry {
        http: servers.http.to_string(),
        tcp: servers.tcp.to_string(),
    };

    crate::log("mesh: latency at one connection");
    let mut entries = vec![direct.http.as_str(), cc.entry.http.as_str()];
    if let Some(h) = &haproxy {
        entries.push(h.entry.http.as_str());
    }
    let lat = latency(&entries, plan.requests).await?;
    res.direct = lat[0].clone();
    res.cc = lat[1].clone();
    res.haproxy = lat.get(2).cloned();

    if runs("wrk", "-v") {
        for rep in 0..plan.reps {
            crate::log(format!(
                "mesh: requests/s at {RPS_CONNECTIONS} connections, repetition {}/{}",
                rep + 1,
                plan.reps
            ));
            // Rotate the order so drifts of the machine fall on every path alike.
            for k in 0..3 {
                match (rep + k) % 3 {
                    0 => res.rps_direct.push(wrk(&direct.http, plan.wrk_secs).await?),
                    1 => res.rps_cc.push(wrk(&cc.entry.http, plan.wrk_secs).await?),
                    _ => {
                        if let Some(h) = &haproxy {
                            res.rps_haproxy
                                .push(wrk(&h.entry.http, plan.wrk_secs).await?);
                        }
                    }
                }
            }
        }
    } else {
        res.wrk_missing = Some("wrk not installed".into());
    }

    for rep in 0..plan.reps {
        crate::log(format!(
            "mesh: opaque TCP throughput, repetition {}/{}",
            rep + 1,
            plan.reps
        ));
        for k in 0..3 {
            match (rep + k) % 3 {
                0 => res
                    .tcp_direct
                    .push(tcp_upload(&direct.tcp, plan.tcp_bytes).await?),
                1 => res
                    .tcp_cc
                    .push(tcp_upload(&cc.entry.tcp, plan.tcp_bytes).await?),
                _ => {
                    if let Some(h) = &haproxy {
                        res.tcp_haproxy
                            .push(tcp_upload(&h.entry.tcp, plan.tcp_bytes).await?);
                    }
                }
            }
        }
    }

    crate::log(format!(
        "mesh: memory per idle meshed connection ({IDLE_CONNECTIONS})"
    ));
    res.idle_cc = Some(idle_cost(&cc.entry.tcp, cc.daemon.pid()).await?);
    if let Some(h) = &haproxy {
        res.idle_haproxy = Some(idle_cost(&h.entry.tcp, h.child.id()).await?);
    }
    drop(haproxy);
    drop(cc);

    crate::log(format!(
        "mesh: {MESHED_VMS} meshed VMs sharing {SHARED_IDENTITIES} identities"
    ));
    res.scale = Some(scale(setup).await?);
    Ok(res)
}

/// Keep the cc-proxy path loaded (for a CPU profile): `wrk` for `secs`, or the latency loop without `wrk`.
pub async fn load_for_profile(
    setup: &Setup,
    rps: bool,
    secs: u64,
    on_ready: impl FnOnce(u32) -> Result<crate::profile::Recording, BenchError>,
) -> Result<String, BenchError> {
    let dir = setup.dir.join("mesh-prof");
    std::fs::create_dir_all(&dir)?;
    let certs = make_certs(&dir)?;
    let servers = start_servers().await?;
    let cc = start_cc(setup, &certs, &servers, "mesh-prof").await?;
    let rec = on_ready(cc.daemon.pid())?;
    if rps && runs("wrk", "-v") {
        wrk(&cc.entry.http, secs).await?;
    } else {
        let mut c = HttpConn::connect(&cc.entry.http).await?;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            c.get().await?;
        }
    }
    rec.finish()
}

/// RSS per VM of 1,000 plain VMs and of 1,000 meshed VMs (one inbound listener each, 10 identities from the
/// embedded CA) on fresh daemons, and the certificates the CA issued.
async fn scale(setup: &Setup) -> Result<MeshScale, BenchError> {
    let agent = Arc::new(Agent::start(setup, "mesh-scale-agent", MESHED_VMS)?);
    let mut per_vm = Vec::new();
    let mut issued = 0.0;
    for meshed in [false, true] {
        let name = if meshed { "mesh-vms" } else { "plain-vms" };
        let daemon = Daemon::start(setup, name).await?;
        let client = daemon.client();
        for _ in 0..10 {
            client.version().await?;
        }
        tokio::time::sleep(SETTLE).await;
        let idle = daemon.rss()?;
        let mut tasks = Vec::new();
        const WORKERS: usize = 16;
        for w in 0..WORKERS {
            let client = daemon.client();
            let agent = agent.clone();
            tasks.push(tokio::spawn(async move {
                for i in (w..MESHED_VMS).step_by(WORKERS) {
                    let id = format!("vm{i}");
                    if meshed {
                        let identity = format!(
                            "w{}.bench.serviceaccount.identity.linkerd.cluster.local",
                            i % SHARED_IDENTITIES
                        );
                        register_mesh(
                            &client,
                            &id,
                            &agent,
                            i,
                            json!({"identity": identity, "inbound": [
                                {"listen": "127.0.0.1:0", "target": "tcp://127.0.0.1:9"}]}),
                        )
                        .await?;
                    } else {
                        register(&client, &id, &agent, i).await?;
                    }
                }
                Ok::<_, BenchError>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| BenchError::Setup(e.to_string()))??;
        }
        tokio::time::sleep(SETTLE).await;
        let loaded = daemon.rss()?;
        per_vm.push((loaded as f64 - idle as f64) / MESHED_VMS as f64);
        if meshed {
            issued = daemon
                .metrics()
                .await?
                .lines()
                .filter(|l| l.starts_with("cc_proxy_mesh_certificate_issuances_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
        }
    }
    Ok(MeshScale {
        vms: MESHED_VMS,
        identities: SHARED_IDENTITIES,
        plain_per_vm_bytes: per_vm[0],
        meshed_per_vm_bytes: per_vm[1],
        certificates_issued: issued,
    })
}
