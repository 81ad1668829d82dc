//! The mesh front (issues 14 and 15): the two-hop mTLS path client -> VM a's outbound listener -> VM b's
//! inbound listener -> server, through cc-proxy and through HAProxy configured to do the same work, and direct
//! (client -> server), side by side in one run; the same outbound balanced over three endpoints against one;
//! the memory of idle meshed connections per hop and for both hops; and the cost of many meshed VMs sharing a
//! few identities.
//!
//! - Certificates: one CA and P-256 leaves for a and b made here with rcgen; cc-proxy reads them with
//!   `--mesh-identity-dir`, HAProxy from PEM files, the benchmark's own TLS client and server (rustls, for the
//!   per-hop figures) from DER, so every party does the same cryptography.
//! - Servers (in this process): [`BALANCED_ENDPOINTS`] hyper HTTP/1.1 servers answering every request with a
//!   2-byte body and counting requests (the balanced path's spread); an opaque TCP server whose first byte
//!   picks echo (`E`) or sink (`S`: count the bytes to end of stream, answer the count); and a TLS 1.3 echo
//!   server with b's certificate requiring a client certificate (the far end of an outbound hop alone).
//! - HAProxy (Debian's `haproxy`, run in the foreground): for HTTP, one frontend taking plaintext and
//!   originating TLS 1.3 with a's certificate, SNI b and a check of b's SAN (`verifyhost`), one terminating
//!   TLS 1.3 with b's certificate and requiring a client certificate from the same CA; the same pair in
//!   `mode tcp` for opaque bytes.
//! - Load: `wrk --latency` (Debian's package) for requests/s and p99 at 16 connections; our own keep-alive
//!   client ([`HttpClient`]) for latency at one connection; raw sockets for throughput and idle connections.
//! - Noise: the paths take turns within each repetition (the order rotated per repetition) after a warm-up,
//!   and a figure is the median of per-repetition ratios, so a slow spell of the shared machine falls on one
//!   repetition of every path instead of one path.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::http::HttpClient;
use crate::procs::{free_addr, register, terminate, Agent, Daemon, Setup};
use crate::stats::percentile;
use crate::BenchError;

const A: &str = "a.bench.serviceaccount.identity.linkerd.cluster.local";
const B: &str = "b.bench.serviceaccount.identity.linkerd.cluster.local";
/// Requests per latency block; the paths take turns block by block.
const BLOCK: usize = 100;
/// Requests per path before measuring (handshakes, pools, caches, the CPU's clock).
const WARMUP: usize = 500;
/// Seconds of `wrk` per path before the measured repetitions.
const WRK_WARMUP_SECS: u64 = 1;
/// Connections of the requests/s figures (the figure).
const RPS_CONNECTIONS: usize = 16;
/// Endpoints of the balanced destination: VMs b, b2, b3 (all of identity b), each before its own server.
pub const BALANCED_ENDPOINTS: usize = 3;
/// Idle meshed connections held open for the memory figures.
pub const IDLE_CONNECTIONS: usize = 1000;
/// Meshed VMs of the scale figure, and the identities they share.
pub const MESHED_VMS: usize = 1000;
pub const SHARED_IDENTITIES: usize = 10;
/// Time given to a process to settle before reading its RSS.
const SETTLE: Duration = Duration::from_millis(500);
/// How long the proxies get to start serving.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one idle connection may take to echo its byte.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

/// Sizes of one mesh run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MeshPlan {
    /// Latency requests per path, over all repetitions.
    pub requests: usize,
    /// Repetitions of the latency and requests/s figures.
    pub reps: usize,
    pub wrk_secs: u64,
    /// Repetitions of the opaque throughput figure (information only).
    pub tcp_reps: usize,
    pub tcp_bytes: u64,
}

/// One path's latency at one connection, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PathLatency {
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One repetition of the latency blocks, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRep {
    pub direct_p50_us: f64,
    pub cc_p50_us: f64,
    pub cc_p99_us: f64,
    /// a's outbound balanced over three endpoints.
    pub balanced_p50_us: f64,
    pub balanced_p99_us: f64,
    pub haproxy_p50_us: Option<f64>,
}

/// One `wrk` run: requests per second and the 99th percentile latency.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WrkRun {
    pub rps: f64,
    pub p99_us: f64,
}

/// The balanced destination against the single-endpoint one (`MeshResults::rps_cc`, same repetitions).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Balanced {
    pub runs: Vec<WrkRun>,
    /// Requests each endpoint's server answered during the balanced runs (all repetitions).
    pub per_endpoint: Vec<u64>,
}

/// RSS per idle connection, bytes: each hop on its own process, and both hops in one.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct IdleCost {
    /// Inbound hop alone: TLS client (a's certificate) -> inbound -> server.
    pub inbound: Option<f64>,
    /// Outbound hop alone: plaintext client -> outbound -> TLS server (b's certificate).
    pub outbound: Option<f64>,
    /// Both hops in one process: client -> outbound -> inbound -> server.
    pub both: Option<f64>,
}

/// Everything the mesh group measured; `haproxy` fields are `None` when HAProxy is not there.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MeshResults {
    /// Why HAProxy was not measured.
    pub haproxy_missing: Option<String>,
    /// Why requests/s were not measured (no `wrk`).
    pub wrk_missing: Option<String>,
    /// Latency pooled over the repetitions (context).
    pub direct: PathLatency,
    pub cc: PathLatency,
    pub haproxy: Option<PathLatency>,
    /// a's outbound balanced over three endpoints, at one connection.
    pub balanced_latency: PathLatency,
    /// Latency per repetition (the figure: median of per-repetition ratios).
    pub latency_reps: Vec<LatencyRep>,
    pub rps_direct: Vec<WrkRun>,
    pub rps_cc: Vec<WrkRun>,
    pub rps_haproxy: Vec<WrkRun>,
    pub balanced: Option<Balanced>,
    /// Opaque TCP upload rates, bytes/s.
    pub tcp_direct: Vec<f64>,
    pub tcp_cc: Vec<f64>,
    pub tcp_haproxy: Vec<f64>,
    pub idle_cc: IdleCost,
    pub idle_haproxy: IdleCost,
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

/// One identity's leaf and key in DER (the benchmark's own TLS client and server).
struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

/// The files both proxies use, and the DER the benchmark's TLS ends use.
struct Certs {
    /// `--mesh-identity-dir` layout: `ca.crt`, `<identity>/tls.crt`, `<identity>/tls.key`.
    identity_dir: PathBuf,
    ca: PathBuf,
    /// Certificate then key, as HAProxy's `crt` wants.
    a_pem: PathBuf,
    b_pem: PathBuf,
    ca_der: CertificateDer<'static>,
    a: Leaf,
    b: Leaf,
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
    let leaf = |id: &str| -> Result<(PathBuf, Leaf), BenchError> {
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
        let der = Leaf {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        };
        Ok((pem, der))
    };
    let (a_pem, a) = leaf(A)?;
    let (b_pem, b) = leaf(B)?;
    Ok(Certs {
        identity_dir,
        ca,
        a_pem,
        b_pem,
        ca_der: ca_cert.der().clone(),
        a,
        b,
    })
}

fn tls_err(e: rustls::Error) -> BenchError {
    BenchError::Setup(format!("TLS configuration: {e}"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(certs: &Certs) -> Result<Arc<rustls::RootCertStore>, BenchError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.ca_der.clone()).map_err(tls_err)?;
    Ok(Arc::new(roots))
}

/// What a linkerd-like outbound hop does: TLS 1.3 with a's certificate, b's certificate checked against the CA.
fn client_tls(certs: &Certs) -> Result<tokio_rustls::TlsConnector, BenchError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots(certs)?)
        .with_client_auth_cert(
            certs.a.chain.clone(),
            PrivateKeyDer::Pkcs8(certs.a.key.clone_key()),
        )
        .map_err(tls_err)?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// What a linkerd-like inbound hop does: TLS 1.3 with b's certificate, a client certificate required.
fn server_tls(certs: &Certs) -> Result<tokio_rustls::TlsAcceptor, BenchError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(certs)?, provider())
            .build()
            .map_err(|e| BenchError::Setup(format!("client verifier: {e}")))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs.b.chain.clone(),
            PrivateKeyDer::Pkcs8(certs.b.key.clone_key()),
        )
        .map_err(tls_err)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

// ---------------------------------------------------------------------------------------------------------
// Servers

/// The backend servers: HTTP (2-byte answer, requests counted per server), opaque (echo or sink), and the
/// TLS echo server standing for a remote inbound proxy.
struct Servers {
    http: Vec<SocketAddr>,
    /// Requests answered, per HTTP server.
    http_count: Vec<Arc<AtomicU64>>,
    tcp: SocketAddr,
    tls_echo: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Servers {
    fn counts(&self) -> Vec<u64> {
        self.http_count
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

async fn http_server(
    count: Arc<AtomicU64>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), BenchError> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let count = count.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    count.fetch_add(1, Ordering::Relaxed);
                    async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok((addr, task))
}

async fn start_servers(certs: &Certs) -> Result<Servers, BenchError> {
    let mut servers = Servers {
        http: Vec::new(),
        http_count: Vec::new(),
        tcp: "127.0.0.1:0"
            .parse()
            .map_err(|_| BenchError::Setup("address".into()))?,
        tls_echo: "127.0.0.1:0"
            .parse()
            .map_err(|_| BenchError::Setup("address".into()))?,
        tasks: Vec::new(),
    };
    for _ in 0..BALANCED_ENDPOINTS {
        let count = Arc::new(AtomicU64::new(0));
        let (addr, task) = http_server(count.clone()).await?;
        servers.http.push(addr);
        servers.http_count.push(count);
        servers.tasks.push(task);
    }
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    servers.tcp = tcp.local_addr()?;
    servers.tasks.push(tokio::spawn(async move {
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
    }));
    let tls = TcpListener::bind("127.0.0.1:0").await?;
    servers.tls_echo = tls.local_addr()?;
    let acceptor = server_tls(certs)?;
    servers.tasks.push(tokio::spawn(async move {
        while let Ok((s, _)) = tls.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(conn) = acceptor.accept(s).await {
                    let (mut r, mut w) = tokio::io::split(conn);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    }));
    Ok(servers)
}

// ---------------------------------------------------------------------------------------------------------
// The paths

/// Where each path is entered: the HTTP and the opaque address.
#[derive(Debug, Clone)]
struct Entry {
    http: String,
    tcp: String,
}

/// cc-proxy with VM a (outbound) and VMs b, b2, b3 (inbound, identity b) on one daemon.
struct CcMesh {
    daemon: Daemon,
    _agent: Agent,
    entry: Entry,
    /// a's outbound listener whose destination is b, b2 and b3.
    balanced: String,
}

async fn start_cc(
    setup: &Setup,
    certs: &Certs,
    servers: &Servers,
    name: &str,
) -> Result<CcMesh, BenchError> {
    let agent = Agent::start(setup, &format!("{name}-agent"), 1 + BALANCED_ENDPOINTS)?;
    let dir_arg = certs.identity_dir.display().to_string();
    let daemon = Daemon::start_with(setup, name, &["--mesh-identity-dir", &dir_arg]).await?;
    let client = daemon.client();
    let authz = json!({"identities": [A]});
    // b (VM 1) serves HTTP and opaque; b2, b3 (VMs 2, 3) only HTTP, each before its own server.
    let mut b_http = Vec::new();
    let b_tcp = free_addr()?;
    for (i, server) in servers.http.iter().enumerate() {
        let http = free_addr()?;
        let mut inbound =
            vec![json!({"listen": http, "target": format!("tcp://{server}"), "authz": authz})];
        if i == 0 {
            inbound.push(
                json!({"listen": b_tcp, "target": format!("tcp://{}", servers.tcp),
                "protocol": "opaque", "authz": authz}),
            );
        }
        let id = if i == 0 {
            "b".to_string()
        } else {
            format!("b{}", i + 1)
        };
        register_mesh(
            &client,
            &id,
            &agent,
            1 + i,
            json!({"identity": B, "inbound": inbound}),
        )
        .await?;
        b_http.push(http);
    }
    let (a_http, a_tcp, a_bal) = (free_addr()?, free_addr()?, free_addr()?);
    register_mesh(
        &client,
        "a",
        &agent,
        0,
        json!({"identity": A, "outbound": [
            {"listen": a_http, "destination": {"endpoints": [b_http[0]], "identity": B}},
            {"listen": a_bal, "destination": {"endpoints": b_http, "identity": B}},
            {"listen": a_tcp, "destination": {"endpoints": [b_tcp], "identity": B}, "protocol": "opaque"},
        ]}),
    )
    .await?;
    let entry = Entry {
        http: a_http,
        tcp: a_tcp,
    };
    wait_serving(&entry.http).await?;
    wait_serving(&a_bal).await?;
    Ok(CcMesh {
        daemon,
        _agent: agent,
        entry,
        balanced: a_bal,
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

/// HAProxy in the foreground.
struct Haproxy {
    child: Child,
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

/// HAProxy's server-line options of the origination side: a's certificate, SNI b, b's SAN checked, TLS 1.3.
fn haproxy_originate(certs: &Certs) -> String {
    format!(
        "ssl crt {} ca-file {} verify required sni str({B}) verifyhost {B} ssl-min-ver TLSv1.3",
        certs.a_pem.display(),
        certs.ca.display()
    )
}

/// HAProxy's bind options of the termination side: b's certificate, a client certificate required, TLS 1.3.
fn haproxy_terminate(certs: &Certs) -> String {
    format!(
        "ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3",
        certs.b_pem.display(),
        certs.ca.display()
    )
}

/// Start HAProxy with `sections` after the common global and defaults sections; its log goes to
/// `<name>.log` in the scratch directory.
fn spawn_haproxy(setup: &Setup, name: &str, sections: &str) -> Result<Haproxy, BenchError> {
    let cfg = format!(
        "global\n\tmaxconn 4000\ndefaults\n\ttimeout connect 5s\n\ttimeout client 90s\n\ttimeout server 90s\n\tmaxconn 4000\n{sections}"
    );
    let path = setup.dir.join(format!("{name}.cfg"));
    std::fs::File::create(&path)?.write_all(cfg.as_bytes())?;
    let log = std::fs::File::create(setup.dir.join(format!("{name}.log")))?;
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| BenchError::Setup(format!("haproxy: {e}")))?;
    Ok(Haproxy { child })
}

fn haproxy_log(setup: &Setup, name: &str) -> String {
    std::fs::read_to_string(setup.dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// HAProxy doing the two hops of the HTTP and the opaque path; returns it with its entry addresses.
async fn start_haproxy(
    setup: &Setup,
    certs: &Certs,
    servers: &Servers,
) -> Result<(Haproxy, Entry), BenchError> {
    let (b_http, b_tcp, a_http, a_tcp) = (free_addr()?, free_addr()?, free_addr()?, free_addr()?);
    let (originate, terminate_tls) = (haproxy_originate(certs), haproxy_terminate(certs));
    let sections = format!(
        "frontend a_http\n\tmode http\n\tbind {a_http}\n\tdefault_backend b_http\n\
         backend b_http\n\tmode http\n\tserver b {b_http} {originate}\n\
         frontend b_http_in\n\tmode http\n\tbind {b_http} {terminate_tls}\n\tdefault_backend server_http\n\
         backend server_http\n\tmode http\n\tserver s {http}\n\
         listen a_tcp\n\tmode tcp\n\tbind {a_tcp}\n\tserver b {b_tcp} {originate}\n\
         listen b_tcp_in\n\tmode tcp\n\tbind {b_tcp} {terminate_tls}\n\tserver s {tcp}\n",
        http = servers.http[0],
        tcp = servers.tcp,
    );
    let h = spawn_haproxy(setup, "haproxy", &sections)?;
    let entry = Entry {
        http: a_http,
        tcp: a_tcp,
    };
    if let Err(e) = wait_serving(&entry.http).await {
        // Dropping `h` stops it.
        return Err(BenchError::Setup(format!(
            "haproxy: {e}: {}",
            haproxy_log(setup, "haproxy")
        )));
    }
    Ok((h, entry))
}

/// Wait until a GET through `addr` is answered (certificates loaded, listeners serving).
async fn wait_serving(addr: &str) -> Result<(), BenchError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let attempt = async {
            let mut c = HttpClient::connect_tcp(addr).await?;
            c.get().await
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if Instant::now() > deadline => {
                return Err(BenchError::Setup(format!("{addr} never answered: {e}")))
            }
            Err(_) if Instant::now() > deadline => {
                return Err(BenchError::Setup(format!("{addr} never answered")))
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Idle connections, per hop

/// Which hops one process holds in an idle-memory figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hops {
    /// TLS client (the benchmark, a's certificate) -> inbound (b) -> echo server.
    Inbound,
    /// Plaintext client -> outbound (a) -> TLS echo server (the benchmark, b's certificate).
    Outbound,
    /// Plaintext client -> outbound (a) -> inbound (b) -> echo server.
    Both,
}

impl Hops {
    const ALL: [Hops; 3] = [Hops::Inbound, Hops::Outbound, Hops::Both];

    fn name(self) -> &'static str {
        match self {
            Hops::Inbound => "inbound",
            Hops::Outbound => "outbound",
            Hops::Both => "both",
        }
    }
}

/// How the benchmark opens one idle connection: plaintext, or TLS as a (SNI b).
#[derive(Clone)]
enum Dial {
    Plain,
    Tls(tokio_rustls::TlsConnector),
}

/// A held connection of either kind.
trait Held: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Held for T {}

/// Open one connection through `addr` and prove it end to end with one echoed byte.
async fn dial_echo(addr: &str, dial: &Dial) -> Result<Box<dyn Held>, BenchError> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut conn: Box<dyn Held> = match dial {
            Dial::Plain => Box::new(tcp),
            Dial::Tls(connector) => {
                let name = ServerName::try_from(B)
                    .map_err(|e| BenchError::Setup(format!("server name: {e}")))?;
                Box::new(connector.connect(name, tcp).await?)
            }
        };
        // The plain echo server reads its mode byte `E` then echoes `x`; the TLS echo server echoes `E`.
        conn.write_all(b"Ex").await?;
        conn.flush().await?;
        let mut back = [0u8; 1];
        conn.read_exact(&mut back).await?;
        Ok::<_, BenchError>(conn)
    };
    tokio::time::timeout(ECHO_TIMEOUT, attempt)
        .await
        .map_err(|_| BenchError::Protocol(format!("no echo through {addr}")))?
}

/// Wait until `addr` echoes (the proxy's listener and certificates ready).
async fn wait_echo(addr: &str, dial: &Dial) -> Result<(), BenchError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match dial_echo(addr, dial).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Open [`IDLE_CONNECTIONS`] connections through `addr`, each proven end to end with one echoed byte, and
/// return the RSS delta of `pid` per connection while they are held.
async fn idle_cost(addr: &str, dial: &Dial, pid: u32) -> Result<f64, BenchError> {
    tokio::time::sleep(SETTLE).await;
    let before = crate::procs::rss_bytes(pid)?;
    let mut held = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        held.push(dial_echo(addr, dial).await?);
    }
    tokio::time::sleep(SETTLE).await;
    let after = crate::procs::rss_bytes(pid)?;
    drop(held);
    Ok((after as f64 - before as f64) / IDLE_CONNECTIONS as f64)
}

/// A fresh cc-proxy holding only `hops` (opaque listeners); returns RSS per idle connection.
async fn cc_idle(
    setup: &Setup,
    certs: &Certs,
    servers: &Servers,
    hops: Hops,
) -> Result<f64, BenchError> {
    let name = format!("idle-{}", hops.name());
    let agent = Agent::start(setup, &format!("{name}-agent"), 2)?;
    let dir_arg = certs.identity_dir.display().to_string();
    let daemon = Daemon::start_with(setup, &name, &["--mesh-identity-dir", &dir_arg]).await?;
    let client = daemon.client();
    let (b_tcp, a_tcp) = (free_addr()?, free_addr()?);
    if hops != Hops::Outbound {
        register_mesh(
            &client,
            "b",
            &agent,
            1,
            json!({"identity": B, "inbound": [
            {"listen": b_tcp, "target": format!("tcp://{}", servers.tcp), "protocol": "opaque",
             "authz": {"identities": [A]}}]}),
        )
        .await?;
    }
    if hops != Hops::Inbound {
        let far = if hops == Hops::Both {
            b_tcp.clone()
        } else {
            servers.tls_echo.to_string()
        };
        register_mesh(&client, "a", &agent, 0, json!({"identity": A, "outbound": [
            {"listen": a_tcp, "destination": {"endpoints": [far], "identity": B}, "protocol": "opaque"}]}))
        .await?;
    }
    let (entry, dial) = match hops {
        Hops::Inbound => (b_tcp, Dial::Tls(client_tls(certs)?)),
        _ => (a_tcp, Dial::Plain),
    };
    wait_echo(&entry, &dial).await?;
    idle_cost(&entry, &dial, daemon.pid()).await
}

/// A fresh HAProxy holding only `hops` (`mode tcp`); returns RSS per idle connection.
async fn haproxy_idle(
    setup: &Setup,
    certs: &Certs,
    servers: &Servers,
    hops: Hops,
) -> Result<f64, BenchError> {
    let name = format!("haproxy-idle-{}", hops.name());
    let (b_tcp, a_tcp) = (free_addr()?, free_addr()?);
    let (originate, terminate_tls) = (haproxy_originate(certs), haproxy_terminate(certs));
    let inbound = format!(
        "listen b_tcp_in\n\tmode tcp\n\tbind {b_tcp} {terminate_tls}\n\tserver s {}\n",
        servers.tcp
    );
    let far = if hops == Hops::Both {
        b_tcp.clone()
    } else {
        servers.tls_echo.to_string()
    };
    let outbound =
        format!("listen a_tcp\n\tmode tcp\n\tbind {a_tcp}\n\tserver b {far} {originate}\n");
    let sections = match hops {
        Hops::Inbound => inbound,
        Hops::Outbound => outbound,
        Hops::Both => format!("{outbound}{inbound}"),
    };
    let h = spawn_haproxy(setup, &name, &sections)?;
    let (entry, dial) = match hops {
        Hops::Inbound => (b_tcp, Dial::Tls(client_tls(certs)?)),
        _ => (a_tcp, Dial::Plain),
    };
    if let Err(e) = wait_echo(&entry, &dial).await {
        return Err(BenchError::Setup(format!(
            "haproxy: {e}: {}",
            haproxy_log(setup, &name)
        )));
    }
    idle_cost(&entry, &dial, h.child.id()).await
}

// ---------------------------------------------------------------------------------------------------------
// Load

/// Latency at one connection per path over `reps` repetitions: within a repetition the paths take turns in
/// blocks of [`BLOCK`], the order rotated block by block. Returns each repetition's figures per path and
/// every sample per path.
async fn latency(
    entries: &[&str],
    requests: usize,
    reps: usize,
) -> Result<(Vec<Vec<PathLatency>>, Vec<Vec<f64>>), BenchError> {
    let mut conns = Vec::new();
    for e in entries {
        let mut c = HttpClient::connect_tcp(e).await?;
        for _ in 0..WARMUP {
            c.get().await?;
        }
        conns.push(c);
    }
    let per_rep = requests.div_ceil(reps.max(1));
    let mut all: Vec<Vec<f64>> = vec![Vec::with_capacity(requests); entries.len()];
    let mut rep_p50 = Vec::with_capacity(reps);
    let mut turn = 0;
    for _ in 0..reps {
        let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(per_rep); entries.len()];
        let mut done = 0;
        while done < per_rep {
            let n = BLOCK.min(per_rep - done);
            for k in 0..entries.len() {
                let p = (turn + k) % entries.len();
                for _ in 0..n {
                    let t0 = Instant::now();
                    conns[p].get().await?;
                    samples[p].push(t0.elapsed().as_secs_f64() * 1e6);
                }
            }
            turn += 1;
            done += n;
        }
        rep_p50.push(samples.iter().map(|s| path_latency(s)).collect());
        for (a, s) in all.iter_mut().zip(samples) {
            a.extend(s);
        }
    }
    Ok((rep_p50, all))
}

fn path_latency(samples: &[f64]) -> PathLatency {
    PathLatency {
        samples: samples.len(),
        p50_us: percentile(samples, 50.0),
        p99_us: percentile(samples, 99.0),
    }
}

/// A duration as `wrk` prints it (`812.00us`, `1.23ms`, `1.00s`, `2.00m`), in microseconds.
fn wrk_duration_us(text: &str) -> Option<f64> {
    let t = text.trim();
    let (num, scale) = if let Some(v) = t.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = t.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = t.strip_suffix('s') {
        (v, 1e6)
    } else if let Some(v) = t.strip_suffix('m') {
        (v, 60e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// Requests/s and p99 from `wrk --latency`'s output.
fn parse_wrk(text: &str) -> Result<WrkRun, BenchError> {
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        return Err(BenchError::Protocol(format!("wrk saw errors: {text}")));
    }
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| BenchError::Protocol(format!("no Requests/sec in wrk's output: {text}")))?;
    let p99_us = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(wrk_duration_us)
        .ok_or_else(|| BenchError::Protocol(format!("no 99% latency in wrk's output: {text}")))?;
    Ok(WrkRun { rps, p99_us })
}

/// `wrk --latency` at [`RPS_CONNECTIONS`] connections for `secs` against `addr`.
async fn wrk(addr: &str, secs: u64) -> Result<WrkRun, BenchError> {
    let out = tokio::process::Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{RPS_CONNECTIONS}"),
            &format!("-d{secs}s"),
            "--latency",
            &format!("http://{addr}/"),
        ])
        .stdin(Stdio::null())
        .output()
        .await?;
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
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

// ---------------------------------------------------------------------------------------------------------
// The group

/// The paths of the requests/s figures, in the order their turns rotate.
#[derive(Debug, Clone, Copy)]
enum RpsPath {
    Direct,
    Cc,
    Haproxy,
    Balanced,
}

/// Run the two-hop comparison, the balanced path, the idle memory per hop and the meshed-VM scale figure.
pub async fn run(setup: &Setup, plan: MeshPlan) -> Result<MeshResults, BenchError> {
    let mut res = MeshResults::default();
    let dir = setup.dir.join("mesh");
    std::fs::create_dir_all(&dir)?;
    let certs = make_certs(&dir)?;
    let servers = start_servers(&certs).await?;
    let cc = start_cc(setup, &certs, &servers, "mesh").await?;
    let have_haproxy = runs("haproxy", "-v");
    let haproxy = if !have_haproxy {
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
        http: servers.http[0].to_string(),
        tcp: servers.tcp.to_string(),
    };

    crate::log(format!(
        "mesh: latency at one connection, {} repetitions",
        plan.reps
    ));
    let mut entries = vec![
        direct.http.as_str(),
        cc.entry.http.as_str(),
        cc.balanced.as_str(),
    ];
    if let Some((_, e)) = &haproxy {
        entries.push(e.http.as_str());
    }
    let (reps, all) = latency(&entries, plan.requests, plan.reps).await?;
    res.direct = path_latency(&all[0]);
    res.cc = path_latency(&all[1]);
    res.balanced_latency = path_latency(&all[2]);
    res.haproxy = all.get(3).map(|s| path_latency(s));
    res.latency_reps = reps
        .iter()
        .map(|p| LatencyRep {
            direct_p50_us: p[0].p50_us,
            cc_p50_us: p[1].p50_us,
            cc_p99_us: p[1].p99_us,
            balanced_p50_us: p[2].p50_us,
            balanced_p99_us: p[2].p99_us,
            haproxy_p50_us: p.get(3).map(|h| h.p50_us),
        })
        .collect();

    if runs("wrk", "-v") {
        let mut paths = vec![RpsPath::Direct, RpsPath::Cc, RpsPath::Balanced];
        if haproxy.is_some() {
            paths.push(RpsPath::Haproxy);
        }
        let addr = |p: RpsPath| match p {
            RpsPath::Direct => direct.http.as_str(),
            RpsPath::Cc => cc.entry.http.as_str(),
            RpsPath::Balanced => cc.balanced.as_str(),
            RpsPath::Haproxy => haproxy.as_ref().map_or("", |(_, e)| e.http.as_str()),
        };
        crate::log("mesh: requests/s warm-up");
        for p in &paths {
            wrk(addr(*p), WRK_WARMUP_SECS).await?;
        }
        let mut balanced = Balanced {
            runs: Vec::new(),
            per_endpoint: vec![0; BALANCED_ENDPOINTS],
        };
        for rep in 0..plan.reps {
            crate::log(format!(
                "mesh: requests/s at {RPS_CONNECTIONS} connections, repetition {}/{}",
                rep + 1,
                plan.reps
            ));
            // Rotate the order so drifts of the machine fall on every path alike.
            for k in 0..paths.len() {
                let p = paths[(rep + k) % paths.len()];
                let before = servers.counts();
                let run = wrk(addr(p), plan.wrk_secs).await?;
                match p {
                    RpsPath::Direct => res.rps_direct.push(run),
                    RpsPath::Cc => res.rps_cc.push(run),
                    RpsPath::Haproxy => res.rps_haproxy.push(run),
                    RpsPath::Balanced => {
                        balanced.runs.push(run);
                        for (sum, (after, before)) in balanced
                            .per_endpoint
                            .iter_mut()
                            .zip(servers.counts().iter().zip(&before))
                        {
                            *sum += after - before;
                        }
                    }
                }
            }
        }
        res.balanced = Some(balanced);
    } else {
        res.wrk_missing = Some("wrk not installed".into());
    }

    for rep in 0..plan.tcp_reps {
        crate::log(format!(
            "mesh: opaque TCP throughput, repetition {}/{}",
            rep + 1,
            plan.tcp_reps
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
                    if let Some((_, e)) = &haproxy {
                        res.tcp_haproxy
                            .push(tcp_upload(&e.tcp, plan.tcp_bytes).await?);
                    }
                }
            }
        }
    }
    drop(haproxy);
    drop(cc);

    // Each idle figure on a fresh process, so memory freed by an earlier figure is not reused by a later one.
    for hops in Hops::ALL {
        crate::log(format!(
            "mesh: memory per idle meshed connection ({IDLE_CONNECTIONS}), {} hop(s)",
            hops.name()
        ));
        let cc = cc_idle(setup, &certs, &servers, hops).await?;
        let h = if have_haproxy && res.haproxy_missing.is_none() {
            Some(haproxy_idle(setup, &certs, &servers, hops).await?)
        } else {
            None
        };
        let (c_slot, h_slot) = match hops {
            Hops::Inbound => (&mut res.idle_cc.inbound, &mut res.idle_haproxy.inbound),
            Hops::Outbound => (&mut res.idle_cc.outbound, &mut res.idle_haproxy.outbound),
            Hops::Both => (&mut res.idle_cc.both, &mut res.idle_haproxy.both),
        };
        *c_slot = Some(cc);
        *h_slot = h;
    }
    drop(servers);

    crate::log(format!(
        "mesh: {MESHED_VMS} meshed VMs sharing {SHARED_IDENTITIES} identities"
    ));
    res.scale = Some(scale(setup).await?);
    Ok(res)
}

/// Keep the cc-proxy path of the row `id` loaded (for a CPU profile): `wrk` for `secs` (the requests/s rows),
/// or the latency loop (without `wrk` too).
pub async fn load_for_profile(
    setup: &Setup,
    id: &str,
    secs: u64,
    on_ready: impl FnOnce(u32) -> Result<crate::profile::Recording, BenchError>,
) -> Result<String, BenchError> {
    // A daemon and state directory per row: a daemon restarted on a used state directory restores its VMs.
    let name = format!("prof-{id}");
    let dir = setup.dir.join(&name);
    std::fs::create_dir_all(&dir)?;
    let certs = make_certs(&dir)?;
    let servers = start_servers(&certs).await?;
    let cc = start_cc(setup, &certs, &servers, &name).await?;
    let rec = on_ready(cc.daemon.pid())?;
    let addr = if id == "mesh-balanced" {
        &cc.balanced
    } else {
        &cc.entry.http
    };
    if id != "mesh-p50" && runs("wrk", "-v") {
        wrk(addr, secs).await?;
    } else {
        let mut c = HttpClient::connect_tcp(addr).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_durations_in_every_unit() {
        assert_eq!(wrk_duration_us("812.00us"), Some(812.0));
        assert_eq!(wrk_duration_us(" 1.50ms"), Some(1500.0));
        assert_eq!(wrk_duration_us("2.00s"), Some(2e6));
        assert_eq!(wrk_duration_us("1.00m"), Some(60e6));
        assert_eq!(wrk_duration_us("12"), None);
        assert_eq!(wrk_duration_us("x ms"), None);
    }

    #[test]
    fn wrk_output_gives_rate_and_p99() {
        let out = "Running 1s test @ http://127.0.0.1:1/\n  2 threads and 16 connections\n  Latency Distribution\n     50%  500.00us\n     75%  700.00us\n     90%    1.00ms\n     99%    2.50ms\n  1000 requests in 1.00s, 80.00KB read\nRequests/sec:   1000.50\nTransfer/sec:     80.00KB\n";
        let run = parse_wrk(out).expect("parsed");
        assert_eq!(run.rps, 1000.5);
        assert_eq!(run.p99_us, 2500.0);
        assert!(parse_wrk("Requests/sec: 5\n").is_err(), "no percentiles");
        assert!(parse_wrk(&format!("{out}  Non-2xx or 3xx responses: 4\n")).is_err());
    }
}
