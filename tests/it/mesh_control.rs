//! The mesh front under Linkerd's control plane (issue 15), through the real binary: certificates from a fake
//! `Identity` service built on the API crate's server trait, in-process on a loopback port, signing the
//! daemon's CSRs with a test root and intermediate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cc_proxy_api::mesh::IdentityState;
use cc_proxy_api::types::VmInfo;
use linkerd2_proxy_api::identity::identity_server::{Identity, IdentityServer};
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateSigningRequestDer;
use serde_json::{json, Value};

use crate::common::{free_addr, Env};

const B: &str = "b.default.serviceaccount.identity.linkerd.cluster.local";
const A: &str = "a.default.serviceaccount.identity.linkerd.cluster.local";
const TOKEN: &str = "test-service-account-token";

/// A certificate authority: a self-signed root, or an intermediate signed by one.
struct TestCa {
    pem: String,
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn root(name: &str) -> TestCa {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let params = ca_params(name);
    let cert = params.self_signed(&key).expect("root");
    TestCa {
        pem: cert.pem(),
        der: cert.der().to_vec(),
        issuer: Issuer::new(params, key),
    }
}

fn intermediate(name: &str, parent: &TestCa) -> TestCa {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let params = ca_params(name);
    let cert = params
        .signed_by(&key, &parent.issuer)
        .expect("intermediate");
    TestCa {
        pem: cert.pem(),
        der: cert.der().to_vec(),
        issuer: Issuer::new(params, key),
    }
}

/// What the fake identity service has seen and how it answers.
struct FakeIdentity {
    /// Signs the leaves (an intermediate of `root`), sent along as the chain's intermediate.
    intermediate: TestCa,
    /// Another CA's intermediate, used while `foreign` is set: its leaves do not chain to the anchors.
    other: TestCa,
    foreign: AtomicBool,
    lifetime: Duration,
    requests: AtomicUsize,
    issued: AtomicUsize,
    /// What was wrong with requests (the test asserts there is nothing).
    problems: Mutex<Vec<String>>,
}

/// The gRPC service around the shared fake.
struct IdentitySvc(Arc<FakeIdentity>);

#[tonic::async_trait]
impl Identity for IdentitySvc {
    async fn certify(
        &self,
        request: tonic::Request<CertifyRequest>,
    ) -> Result<tonic::Response<CertifyResponse>, tonic::Status> {
        self.0.certify(request.into_inner())
    }
}

impl FakeIdentity {
    fn certify(
        &self,
        req: CertifyRequest,
    ) -> Result<tonic::Response<CertifyResponse>, tonic::Status> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let problem = |p: String| {
            self.problems
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(p.clone());
            tonic::Status::invalid_argument(p)
        };
        if req.token != TOKEN.as_bytes() {
            return Err(problem(format!("token {:?}", req.token)));
        }
        if req.identity != B {
            return Err(problem(format!("identity {:?}", req.identity)));
        }
        // The CSR is DER (Linkerd's proxies send DER whatever the proto says), P-256, naming the identity.
        let der = CertificateSigningRequestDer::from(req.certificate_signing_request.clone());
        let mut csr = CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| problem(format!("the CSR is not DER: {e}")))?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(problem("the CSR's key is not P-256".into()));
        }
        if csr.params.subject_alt_names != vec![SanType::DnsName(B.try_into().expect("name"))] {
            return Err(problem(format!(
                "the CSR's SANs: {:?}",
                csr.params.subject_alt_names
            )));
        }
        let now = SystemTime::now();
        csr.params.not_before = (now - Duration::from_secs(1)).into();
        csr.params.not_after = (now + self.lifetime).into();
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        csr.params.serial_number = Some(rcgen::SerialNumber::from_slice(
            &rand::random::<[u8; 8]>().map(|b| b | 1),
        ));
        let ca = if self.foreign.load(Ordering::SeqCst) {
            &self.other
        } else {
            &self.intermediate
        };
        let leaf = csr
            .signed_by(&ca.issuer)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        self.issued.fetch_add(1, Ordering::SeqCst);
        Ok(tonic::Response::new(CertifyResponse {
            leaf_certificate: leaf.der().to_vec(),
            intermediate_certificates: vec![ca.der.clone()],
            valid_until: None,
        }))
    }
}

/// Serve `fake` on `addr` until the returned sender is dropped or fired.
async fn serve_identity(
    fake: Arc<FakeIdentity>,
    addr: SocketAddr,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // The port may still be held by the previous server for a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    };
    let incoming = tokio_stream_of(listener);
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(IdentityServer::new(IdentitySvc(fake)))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
    });
    stop
}

/// The accepted connections of `listener` as a stream.
fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

async fn info(env: &Env, id: &str) -> VmInfo {
    env.client
        .vm_info(id)
        .await
        .unwrap_or_else(|e| panic!("vm.info {id}: {e}\n{}", env.logs()))
}

/// The certificate `vm.info` shows (serial, source), if any.
async fn certificate(env: &Env, id: &str) -> Option<(String, String)> {
    info(env, id)
        .await
        .mesh
        .and_then(|m| m.certificate)
        .map(|c| (c.serial, c.source))
}

/// Wait up to `timeout` for a certificate other than `not`.
async fn wait_certificate(env: &Env, id: &str, not: Option<&str>, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((serial, source)) = certificate(env, id).await {
            if Some(serial.as_str()) != not {
                assert_eq!(source, "identity-service");
                return serial;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{id}: no new certificate within {timeout:?}\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The serial the TLS server at `addr` presents for `sni`, or None when no handshake completes.
fn served_serial(addr: &str, sni: &str) -> Option<String> {
    // Bounded: a listener waiting for its first certificate accepts nothing, and s_client would wait.
    let out = std::process::Command::new("timeout")
        .args([
            "5",
            "openssl",
            "s_client",
            "-connect",
            addr,
            "-servername",
            sni,
            "-tls1_3",
            "-showcerts",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let begin = text.find("-----BEGIN CERTIFICATE-----")?;
    let end = text[begin..]
        .find("-----END CERTIFICATE-----")
        .map(|e| begin + e + "-----END CERTIFICATE-----".len())?;
    let (_, der) = x509_parser::pem::parse_x509_pem(&text.as_bytes()[begin..end]).ok()?;
    let cert = der.parse_x509().ok()?;
    let hex: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Some(hex)
}

/// Where `vm.info` says VM `id`'s certificate stands.
async fn cert_state(env: &Env, id: &str) -> IdentityState {
    info(env, id)
        .await
        .mesh
        .map(|m| m.identity_state)
        .expect("a meshed VM")
}

/// The admin `/ready` status and `proxy.health`'s `ready`.
async fn readiness(env: &Env) -> (u16, bool) {
    let (status, _) = crate::common::http_get(&env.admin, "/ready").await;
    let health = env.client.health().await.expect("proxy.health");
    (status, health.ready)
}

/// The value of an (unlabelled or single-series) metric line starting with `prefix`.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_come_from_the_identity_service_are_verified_renewed_and_kept_while_it_is_down(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root_ca = root("test root");
    let fake = Arc::new(FakeIdentity {
        intermediate: intermediate("test intermediate", &root_ca),
        other: intermediate("foreign intermediate", &root("foreign root")),
        foreign: AtomicBool::new(true),
        lifetime: Duration::from_secs(5),
        requests: AtomicUsize::new(0),
        issued: AtomicUsize::new(0),
        problems: Mutex::new(Vec::new()),
    });
    let anchors = dir.path().join("anchors.pem");
    std::fs::write(&anchors, &root_ca.pem).expect("anchors");
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    let svc: SocketAddr = free_addr().parse().expect("addr");
    let mut server = serve_identity(fake.clone(), svc).await;

    let svc_s = svc.to_string();
    let mut env = Env::start_with(&[
        "--identity-svc",
        &svc_s,
        "--identity-token-file",
        token.to_str().expect("path"),
        "--mesh-trust-anchors",
        anchors.to_str().expect("path"),
    ])
    .await;
    let agent = env.agent(&[]);
    let listen = free_addr();
    let (control, io) = agent.uris(None);
    let mesh = json!({
        "identity": B,
        "inbound": [{"listen": listen, "target": "tcp://127.0.0.1:9", "protocol": "opaque",
                     "authz": {"identities": [A]}}],
    });
    let r: Value = env
        .rpc(
            "vm.register",
            json!({"id": "vm1", "control": control, "io": io, "timeout_ms": 5000, "mesh": mesh}),
        )
        .await;
    assert!(r.get("result").is_some(), "{r}\n{}", env.logs());

    // Leaves from a CA the anchors do not know are refused: no certificate, the listener does not serve.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.issued.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no retry\n{}", env.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(certificate(&env, "vm1").await, None);
    assert_eq!(
        served_serial(&listen, B),
        None,
        "served without a certificate"
    );
    // Not ready while a meshed VM waits for its first certificate.
    assert_eq!(cert_state(&env, "vm1").await, IdentityState::Pending);
    assert_eq!(readiness(&env).await, (503, false), "{}", env.logs());
    let failures = metric(
        &env.metrics().await,
        "cc_proxy_mesh_identity_service_failures_total",
    );
    assert!(failures >= 2.0, "failures {failures}");

    // Trusted leaves: the first certificate arrives (after at most the backoff so far) and is served.
    fake.foreign.store(false, Ordering::SeqCst);
    let first = wait_certificate(&env, "vm1", None, Duration::from_secs(6)).await;
    assert_eq!(served_serial(&listen, B).as_deref(), Some(first.as_str()));
    assert_eq!(cert_state(&env, "vm1").await, IdentityState::Valid);
    assert_eq!(readiness(&env).await, (200, true));
    // Renewed at 70% of its 5 s lifetime.
    let t0 = Instant::now();
    let second = wait_certificate(&env, "vm1", Some(&first), Duration::from_secs(6)).await;
    let took = t0.elapsed();
    assert!(
        took <= Duration::from_millis(4500),
        "renewal after {took:?}"
    );
    assert_eq!(served_serial(&listen, B).as_deref(), Some(second.as_str()));

    // The service goes away: renewal fails and is retried, the current certificate keeps serving.
    let _ = server.send(());
    let before = metric(
        &env.metrics().await,
        "cc_proxy_mesh_identity_service_failures_total",
    );
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let now = metric(
            &env.metrics().await,
            "cc_proxy_mesh_identity_service_failures_total",
        );
        if now > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed renewal\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        certificate(&env, "vm1").await.map(|c| c.0).as_deref(),
        Some(second.as_str())
    );
    assert_eq!(served_serial(&listen, B).as_deref(), Some(second.as_str()));

    // Back: the next retry (backoff 1 s, 2 s, ...) gets a new certificate.
    server = serve_identity(fake.clone(), svc).await;
    let third = wait_certificate(&env, "vm1", Some(&second), Duration::from_secs(8)).await;
    assert_eq!(served_serial(&listen, B).as_deref(), Some(third.as_str()));
    let problems = fake
        .problems
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert!(problems.is_empty(), "bad requests: {problems:?}");
    let _ = server.send(());
    let _ = env.stop_daemon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_withdrawn_until_the_identity_service_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root_ca = root("test root");
    let lifetime = Duration::from_secs(4);
    let fake = Arc::new(FakeIdentity {
        intermediate: intermediate("test intermediate", &root_ca),
        other: intermediate("foreign intermediate", &root("foreign root")),
        foreign: AtomicBool::new(false),
        lifetime,
        requests: AtomicUsize::new(0),
        issued: AtomicUsize::new(0),
        problems: Mutex::new(Vec::new()),
    });
    let anchors = dir.path().join("anchors.pem");
    std::fs::write(&anchors, &root_ca.pem).expect("anchors");
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).expect("token");
    let svc: SocketAddr = free_addr().parse().expect("addr");
    let server = serve_identity(fake.clone(), svc).await;
    let svc_s = svc.to_string();
    let mut env = Env::start_with(&[
        "--identity-svc",
        &svc_s,
        "--identity-token-file",
        token.to_str().expect("path"),
        "--mesh-trust-anchors",
        anchors.to_str().expect("path"),
    ])
    .await;
    let agent = env.agent(&[]);
    let listen = free_addr();
    let (control, io) = agent.uris(None);
    let mesh = json!({
        "identity": B,
        "inbound": [{"listen": listen, "target": "tcp://127.0.0.1:9", "protocol": "opaque"}],
    });
    let r: Value = env
        .rpc(
            "vm.register",
            json!({"id": "vm1", "control": control, "io": io, "timeout_ms": 5000, "mesh": mesh}),
        )
        .await;
    assert!(r.get("result").is_some(), "{r}\n{}", env.logs());
    let first = wait_certificate(&env, "vm1", None, Duration::from_secs(5)).await;
    assert_eq!(served_serial(&listen, B).as_deref(), Some(first.as_str()));
    assert_eq!(readiness(&env).await, (200, true));

    // The service goes away for longer than the certificate lives: once it expires it is withdrawn, not
    // served; vm.info, /ready and proxy.health say so.
    drop(server);
    let t0 = Instant::now();
    while cert_state(&env, "vm1").await != IdentityState::Expired {
        assert!(
            t0.elapsed() < lifetime + Duration::from_secs(3),
            "not withdrawn\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(certificate(&env, "vm1").await, None);
    assert_eq!(
        served_serial(&listen, B),
        None,
        "an expired certificate served"
    );
    let id = env
        .client
        .mesh_identity("vm1")
        .await
        .expect("mesh.identity");
    assert_eq!((id.state, id.certificate), (IdentityState::Expired, None));
    assert_eq!(readiness(&env).await, (503, false));
    let text = env.metrics().await;
    assert_eq!(
        metric(&text, "cc_proxy_mesh_certificate_expirations_total{"),
        1.0,
        "{text}"
    );
    assert!(text.contains("cc_proxy_ready 0"), "{text}");

    // Back: the next retry brings a new certificate; serving and readiness resume.
    let server = serve_identity(fake.clone(), svc).await;
    let next = wait_certificate(&env, "vm1", Some(&first), Duration::from_secs(20)).await;
    assert_eq!(cert_state(&env, "vm1").await, IdentityState::Valid);
    assert_eq!(served_serial(&listen, B).as_deref(), Some(next.as_str()));
    assert_eq!(readiness(&env).await, (200, true));
    drop(server);
    let _ = env.stop_daemon().await;
}

#[test]
fn identity_service_flags_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let anchors = dir.path().join("anchors.pem");
    std::fs::write(&anchors, root("test root").pem).expect("anchors");
    let anchors = anchors.to_str().expect("path");
    let socket = dir.path().join("s.sock");
    let socket = socket.to_str().expect("path");
    let state = dir.path().join("state");
    let state = state.to_str().expect("path");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(crate::common::proxy_bin())
            .args(["--socket", socket, "--state-dir", state])
            .args(args)
            .output()
            .expect("run cc-proxy");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The token file and the trust anchors are required; the identity directory excludes the service.
    for (args, names) in [
        (
            vec!["--identity-svc", "127.0.0.1:1"],
            "--identity-token-file",
        ),
        (
            vec![
                "--identity-svc",
                "127.0.0.1:1",
                "--identity-token-file",
                "/dev/null",
            ],
            "--mesh-trust-anchors",
        ),
        (
            vec![
                "--identity-svc",
                "127.0.0.1:1",
                "--identity-token-file",
                "/dev/null",
                "--mesh-trust-anchors",
                anchors,
                "--mesh-identity-dir",
                "/tmp",
            ],
            "--mesh-identity-dir",
        ),
    ] {
        let (code, err) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
    }
    // An address that is not one: the daemon does not start, and says why.
    let (code, err) = run(&[
        "--identity-svc",
        "not an address",
        "--identity-token-file",
        "/dev/null",
        "--mesh-trust-anchors",
        anchors,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("invalid identity service address"), "{err}");
    // Discovery flags: the destination service and a DNS server exclude each other; an address that is not
    // one stops the daemon.
    let (code, err) = run(&[
        "--destination-svc",
        "127.0.0.1:8086",
        "--dns-server",
        "127.0.0.1:53",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--dns-server"), "{err}");
    let (code, err) = run(&["--dns-server", "localhost"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, err) = run(&["--destination-svc", "not an address"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("invalid destination service address"), "{err}");
}

// ---- Named destinations: a fake Destination service, and DNS -------------------------------------------
// The fake service, the counting endpoint servers and the helpers are `pub(crate)` for other mesh tests.

use linkerd2_proxy_api::destination::destination_server::{Destination, DestinationServer};
use linkerd2_proxy_api::destination::{self as dst, update::Update as DstUpdate, GetDestination};

pub(crate) const NAME: &str = "web.test.svc.cluster.local:80";

type UpdateTx = tokio::sync::mpsc::UnboundedSender<Result<dst::Update, tonic::Status>>;

/// A fake destination service for one name: it answers every `Get` with the current endpoints (or
/// `no_endpoints`), then streams the changes the test makes.
#[derive(Default)]
pub(crate) struct FakeDst {
    /// `Get` calls, and the paths asked for.
    pub(crate) gets: AtomicUsize,
    pub(crate) paths: Mutex<Vec<String>>,
    state: Mutex<DstState>,
}

/// The `tls_identity` of endpoints: `identity` (DNS-like) and, when given, the `server_name` to send as SNI.
pub(crate) fn tls_identity(identity: &str, server_name: Option<&str>) -> dst::TlsIdentity {
    use dst::tls_identity::{DnsLikeIdentity, Strategy};
    dst::TlsIdentity {
        strategy: Some(Strategy::DnsLikeIdentity(DnsLikeIdentity {
            name: identity.into(),
        })),
        server_name: server_name.map(|n| DnsLikeIdentity { name: n.into() }),
    }
}

#[derive(Default)]
pub(crate) struct DstState {
    endpoints: Vec<SocketAddr>,
    no_endpoints: bool,
    streams: Vec<UpdateTx>,
    /// The `tls_identity` given to every endpoint added from now on (None: plaintext endpoints).
    tls: Option<dst::TlsIdentity>,
}

/// An `add` of `addrs`, each with `tls` as its `tls_identity` (None: plaintext endpoints).
pub(crate) fn add_update(addrs: &[SocketAddr], tls: Option<&dst::TlsIdentity>) -> dst::Update {
    dst::Update {
        update: Some(DstUpdate::Add(dst::WeightedAddrSet {
            addrs: addrs
                .iter()
                .map(|a| dst::WeightedAddr {
                    addr: Some((*a).into()),
                    weight: 10,
                    metric_labels: [("pod".to_string(), format!("web-{}", a.port()))].into(),
                    tls_identity: tls.cloned(),
                    ..Default::default()
                })
                .collect(),
            metric_labels: [("service".to_string(), "web".to_string())].into(),
        })),
    }
}

impl FakeDst {
    fn lock(&self) -> std::sync::MutexGuard<'_, DstState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Send `update` to every open stream.
    fn broadcast(state: &mut DstState, update: dst::Update) {
        state.streams.retain(|s| s.send(Ok(update.clone())).is_ok());
    }

    /// The endpoints become `eps`: removals and additions are streamed.
    pub(crate) fn set(&self, eps: &[SocketAddr]) {
        let mut st = self.lock();
        let gone: Vec<SocketAddr> = st
            .endpoints
            .iter()
            .filter(|e| !eps.contains(e))
            .copied()
            .collect();
        let new: Vec<SocketAddr> = eps
            .iter()
            .filter(|e| st.no_endpoints || !st.endpoints.contains(e))
            .copied()
            .collect();
        if !gone.is_empty() {
            let remove = dst::Update {
                update: Some(DstUpdate::Remove(dst::AddrSet {
                    addrs: gone.into_iter().map(Into::into).collect(),
                })),
            };
            Self::broadcast(&mut st, remove);
        }
        if !new.is_empty() {
            let add = add_update(&new, st.tls.as_ref());
            Self::broadcast(&mut st, add);
        }
        st.endpoints = eps.to_vec();
        st.no_endpoints = false;
    }

    /// Endpoints added from now on have `tls` as their `tls_identity`.
    pub(crate) fn set_tls(&self, tls: Option<dst::TlsIdentity>) {
        self.lock().tls = tls;
    }

    /// The service says the name has no endpoints.
    pub(crate) fn no_endpoints(&self) {
        let mut st = self.lock();
        st.endpoints.clear();
        st.no_endpoints = true;
        let update = dst::Update {
            update: Some(DstUpdate::NoEndpoints(dst::NoEndpoints { exists: true })),
        };
        Self::broadcast(&mut st, update);
    }

    /// Streams whose client is still there.
    pub(crate) fn open_streams(&self) -> usize {
        self.lock()
            .streams
            .iter()
            .filter(|s| !s.is_closed())
            .count()
    }

    /// End every open stream (the server going away).
    pub(crate) fn end_streams(&self) {
        for s in self.lock().streams.drain(..) {
            let _ = s.send(Err(tonic::Status::unavailable("going away")));
        }
    }
}

struct DstSvc(Arc<FakeDst>);

struct UpdateStream(tokio::sync::mpsc::UnboundedReceiver<Result<dst::Update, tonic::Status>>);

impl futures::Stream for UpdateStream {
    type Item = Result<dst::Update, tonic::Status>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

#[tonic::async_trait]
impl Destination for DstSvc {
    type GetStream = UpdateStream;
    async fn get(
        &self,
        req: tonic::Request<GetDestination>,
    ) -> Result<tonic::Response<UpdateStream>, tonic::Status> {
        self.0.gets.fetch_add(1, Ordering::SeqCst);
        self.0
            .paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(req.into_inner().path);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut st = self.0.lock();
        if st.no_endpoints {
            let _ = tx.send(Ok(dst::Update {
                update: Some(DstUpdate::NoEndpoints(dst::NoEndpoints { exists: true })),
            }));
        } else if !st.endpoints.is_empty() {
            let _ = tx.send(Ok(add_update(&st.endpoints, st.tls.as_ref())));
        }
        st.streams.push(tx);
        Ok(tonic::Response::new(UpdateStream(rx)))
    }
    type GetProfileStream = futures::stream::Empty<Result<dst::DestinationProfile, tonic::Status>>;
    async fn get_profile(
        &self,
        _: tonic::Request<GetDestination>,
    ) -> Result<tonic::Response<Self::GetProfileStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("profiles"))
    }
}

/// Serve `fake` on `addr` until the returned sender is dropped or fired.
pub(crate) async fn serve_destination(
    fake: Arc<FakeDst>,
    addr: SocketAddr,
) -> tokio::sync::oneshot::Sender<()> {
    serve_destination_svc(DstSvc(fake), addr).await
}

/// Serve the destination service `svc` on `addr` (retrying the bind for a while: a restarted fake takes
/// its predecessor's address) until the returned sender is dropped or fired.
pub(crate) async fn serve_destination_svc<S: Destination>(
    svc: S,
    addr: SocketAddr,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let deadline = Instant::now() + Duration::from_secs(5);
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    };
    let incoming = tokio_stream_of(listener);
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(DestinationServer::new(svc))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
    });
    stop
}

/// An HTTP/1 server on `addr` answering every request with 200 and its own address (one request per
/// connection: `connection: close`, so each request is balanced afresh); counts the requests.
pub(crate) async fn counting_server(addr: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let local = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let body = local.to_string();
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    (local, hits)
}

/// One HTTP/1 GET through the outbound listener at `listen`: (status, the `l5d-proxy-error` header, body).
pub(crate) async fn get_through(listen: &str) -> (u16, Option<String>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(listen)
        .await
        .expect("connect to the outbound listener");
    s.write_all(b"GET / HTTP/1.1\r\nhost: web.test.svc.cluster.local\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let error = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("l5d-proxy-error")
            .then(|| v.trim().to_string())
    });
    (status, error, body.to_string())
}

/// Register a VM with one HTTP outbound listener on `listen` to destination `name`.
pub(crate) async fn register_named(env: &mut Env, id: &str, listen: &str, name: &str) {
    let agent = env.agent(&[]);
    let (control, io) = agent.uris(None);
    let mesh = json!({
        "identity": A,
        "outbound": [{"listen": listen, "destination": {"name": name}, "protocol": "http1"}],
    });
    let r: Value = env
        .rpc(
            "vm.register",
            json!({"id": id, "control": control, "io": io, "timeout_ms": 5000, "mesh": mesh}),
        )
        .await;
    assert!(r.get("result").is_some(), "{r}\n{}", env.logs());
}

/// Wait until `mesh.endpoints` of `id` satisfies `f` (its only destination).
pub(crate) async fn wait_endpoints(
    env: &Env,
    id: &str,
    what: &str,
    f: impl Fn(&cc_proxy_api::mesh::DestinationStatus) -> bool,
) -> cc_proxy_api::mesh::DestinationStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let eps = env.client.mesh_endpoints(id).await.expect("mesh.endpoints");
        assert_eq!(eps.destinations.len(), 1, "{eps:?}");
        let d = eps.destinations[0].clone();
        if f(&d) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: {what}: {d:?}\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn addrs_of(d: &cc_proxy_api::mesh::DestinationStatus) -> Vec<String> {
    let mut v: Vec<String> = d.endpoints.iter().map(|e| e.addr.clone()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_destination_follows_the_destination_service() {
    use cc_proxy_api::mesh::DestinationState;
    let fake = Arc::new(FakeDst::default());
    let svc: SocketAddr = free_addr().parse().expect("addr");
    let server = serve_destination(fake.clone(), svc).await;
    let (e1, hits1) = counting_server("127.0.0.1:0").await;
    let (e2, hits2) = counting_server("127.0.0.1:0").await;
    let svc_s = svc.to_string();
    let mut env = Env::start_with(&[
        "--destination-svc",
        &svc_s,
        "--mesh-failfast-timeout-ms",
        "1000",
    ])
    .await;
    let (la, lb) = (free_addr(), free_addr());
    register_named(&mut env, "a", &la, NAME).await;
    register_named(&mut env, "b", &lb, NAME).await;
    // Nothing streamed yet: pending.
    let d = wait_endpoints(&env, "a", "pending", |d| {
        d.state == DestinationState::Pending
    })
    .await;
    assert_eq!(d.name.as_deref(), Some(NAME));
    assert_eq!(d.listener, la);
    assert!(d.endpoints.is_empty());

    // Two endpoints: both VMs see them, and traffic reaches both.
    fake.set(&[e1, e2]);
    let mut both = vec![e1.to_string(), e2.to_string()];
    both.sort();
    let d = wait_endpoints(&env, "a", "two endpoints", |d| addrs_of(d) == both).await;
    assert_eq!(d.state, DestinationState::Resolved);
    assert_eq!(
        d.endpoints[0].labels.get("service").map(String::as_str),
        Some("web")
    );
    wait_endpoints(&env, "b", "two endpoints", |d| addrs_of(d) == both).await;
    // One stream for the name, shared by both VMs.
    assert_eq!(fake.gets.load(Ordering::SeqCst), 1, "one Get per name");
    assert_eq!(
        fake.paths.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        vec![NAME.to_string()]
    );
    for _ in 0..20 {
        let (status, _, _) = get_through(&la).await;
        assert_eq!(status, 200, "{}", env.logs());
    }
    let (h1, h2) = (hits1.load(Ordering::SeqCst), hits2.load(Ordering::SeqCst));
    assert_eq!(h1 + h2, 20);
    assert!(h1 > 0 && h2 > 0, "both endpoints get traffic: {h1} / {h2}");
    // The CLI shows the same as a table.
    let out = env.cli(&["mesh", "endpoints", "a"], b"");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{table}");
    assert!(table.starts_with("LISTENER"), "{table}");
    for e in [e1, e2] {
        let row = table
            .lines()
            .find(|l| l.contains(&e.to_string()))
            .unwrap_or_else(|| panic!("no row for {e}: {table}"));
        assert!(row.contains(&format!("{NAME} (resolved)")), "{row}");
        assert!(row.contains(&la), "{row}");
    }

    // One endpoint removed: traffic moves to the other.
    fake.set(&[e2]);
    wait_endpoints(&env, "a", "e1 removed", |d| addrs_of(d) == [e2.to_string()]).await;
    let before = (hits1.load(Ordering::SeqCst), hits2.load(Ordering::SeqCst));
    for _ in 0..10 {
        let (status, _, body) = get_through(&la).await;
        assert_eq!((status, body.as_str()), (200, e2.to_string().as_str()));
    }
    assert_eq!(
        hits1.load(Ordering::SeqCst),
        before.0,
        "a removed endpoint got traffic"
    );
    assert_eq!(hits2.load(Ordering::SeqCst), before.1 + 10);

    // The service goes away: the last endpoints keep serving while the stream is reopened.
    fake.end_streams();
    drop(server);
    let d = wait_endpoints(&env, "a", "reconnecting", |d| {
        d.state == DestinationState::Reconnecting
    })
    .await;
    assert_eq!(addrs_of(&d), [e2.to_string()]);
    for _ in 0..3 {
        let (status, _, body) = get_through(&la).await;
        assert_eq!((status, body.as_str()), (200, e2.to_string().as_str()));
    }
    // Back: one new stream for the name, resolved again.
    let server = serve_destination(fake.clone(), svc).await;
    wait_endpoints(&env, "a", "resolved again", |d| {
        d.state == DestinationState::Resolved && addrs_of(d) == [e2.to_string()]
    })
    .await;
    assert_eq!(
        fake.gets.load(Ordering::SeqCst),
        2,
        "one Get per name on reconnect"
    );

    // No endpoints: requests fail fast (the fail-fast bound, 1 s here) with the proxy's error header.
    fake.no_endpoints();
    let d = wait_endpoints(&env, "a", "no endpoints", |d| {
        d.state == DestinationState::NoEndpoints
    })
    .await;
    assert!(d.endpoints.is_empty());
    let t0 = Instant::now();
    let (status, error, _) = get_through(&la).await;
    let took = t0.elapsed();
    assert_eq!(status, 503, "{}", env.logs());
    assert!(error.is_some(), "no l5d-proxy-error");
    assert!(took < Duration::from_millis(2500), "failed after {took:?}");

    // The name's stream lives as long as a VM uses it: it ends when the last one goes.
    env.client.unregister("a").await.expect("unregister a");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.open_streams(), 1, "b still uses the name");
    env.client.unregister("b").await.expect("unregister b");
    let t0 = Instant::now();
    while fake.open_streams() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the stream outlives its users"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(server);
    let _ = env.stop_daemon().await;
}

/// A TLS server on loopback presenting a leaf signed by `ca` whose only SAN is `san`; it records the SNI of
/// every ClientHello (before the handshake, so refused handshakes are seen too) and answers each HTTP/1
/// request with 200 and the body `san`.
async fn sni_server(ca: &TestCa, san: &str) -> (SocketAddr, Arc<Mutex<Vec<Option<String>>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::new(vec![san.to_string()]).expect("params");
    params.distinguished_name = DistinguishedName::new();
    let leaf = params.signed_by(&key, &ca.issuer).expect("leaf");
    let chain = vec![leaf.der().clone()];
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    let config = Arc::new(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (recorded, body) = (seen.clone(), san.to_string());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (config, recorded, body) = (config.clone(), recorded.clone(), body.clone());
            tokio::spawn(async move {
                let acceptor =
                    tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
                let Ok(start) = acceptor.await else { return };
                let sni = start.client_hello().server_name().map(str::to_string);
                recorded.lock().unwrap_or_else(|e| e.into_inner()).push(sni);
                let Ok(mut s) = start.into_stream(config).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(response.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_server_name_is_sent_as_sni_while_its_identity_is_what_the_certificate_must_carry(
) {
    const SNI: &str = "other.example";
    // The endpoints' certificates come from a root the daemon trusts as an extra anchor.
    let ca = root("endpoints root");
    let tmp = tempfile::tempdir().expect("tempdir");
    let anchors = tmp.path().join("anchors.pem");
    std::fs::write(&anchors, &ca.pem).expect("anchors");
    let anchors = anchors.to_str().expect("path").to_string();
    // A server for identity B, and an imposter whose certificate names only the server name.
    let (good, good_seen) = sni_server(&ca, B).await;
    let (imposter, imposter_seen) = sni_server(&ca, SNI).await;
    let fake = Arc::new(FakeDst::default());
    fake.set_tls(Some(tls_identity(B, Some(SNI))));
    let svc: SocketAddr = free_addr().parse().expect("addr");
    let _server = serve_destination(fake.clone(), svc).await;
    let svc_s = svc.to_string();
    let mut env = Env::start_with(&[
        "--destination-svc",
        &svc_s,
        "--mesh-trust-anchors",
        &anchors,
        "--mesh-failfast-timeout-ms",
        "1000",
    ])
    .await;
    let listen = free_addr();
    register_named(&mut env, "a", &listen, NAME).await;

    // SNI = the server name; the certificate carries the identity: served.
    fake.set(&[good]);
    let d = wait_endpoints(&env, "a", "the good endpoint", |d| {
        addrs_of(d) == [good.to_string()]
    })
    .await;
    assert_eq!(d.endpoints[0].identity.as_deref(), Some(B));
    assert_eq!(d.endpoints[0].server_name.as_deref(), Some(SNI));
    for _ in 0..3 {
        let (status, error, body) = get_through(&listen).await;
        assert_eq!(
            (status, body.as_str()),
            (200, B),
            "{error:?}\n{}",
            env.logs()
        );
    }
    let seen = good_seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|s| s.as_deref() == Some(SNI)),
        "SNI seen: {seen:?}"
    );

    // The imposter's certificate matches the server name but not the identity: refused.
    fake.set(&[imposter]);
    wait_endpoints(&env, "a", "the imposter", |d| {
        addrs_of(d) == [imposter.to_string()]
    })
    .await;
    let (status, error, body) = get_through(&listen).await;
    assert_eq!(status, 502, "{error:?} {body}\n{}", env.logs());
    assert_ne!(body, SNI, "the imposter answered");
    let seen = imposter_seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert_eq!(
        seen,
        [Some(SNI.to_string())],
        "the imposter got one handshake"
    );
    let m = env.metrics().await;
    assert!(
        metric(
            &m,
            "cc_proxy_mesh_refused_total{vm=\"a\",direction=\"outbound\",reason=\"handshake\"}"
        ) >= 1.0,
        "{m}"
    );
    let _ = env.stop_daemon().await;
}

/// A local dnsmasq on a loopback port answering from `hosts` (reread on SIGHUP) with a 1 s TTL; None (the
/// test is skipped, saying why) when dnsmasq is not installed.
pub(crate) struct Dnsmasq {
    child: std::process::Child,
    pub(crate) addr: SocketAddr,
}

impl Dnsmasq {
    pub(crate) fn start(dir: &std::path::Path, hosts: &std::path::Path) -> Option<Dnsmasq> {
        if std::process::Command::new("dnsmasq")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIP: dnsmasq is not installed (Debian package dnsmasq-base)");
            return None;
        }
        // dnsmasq binds the port on UDP and TCP: a port free for both is taken from free_addr (TCP, outside
        // the ephemeral range) and checked for UDP; if dnsmasq still cannot bind it (another test took it
        // meanwhile) it exits, and another port is tried.
        for _ in 0..5 {
            let addr: SocketAddr = crate::common::free_addr().parse().expect("addr");
            if std::net::UdpSocket::bind(addr).is_err() {
                continue;
            }
            if let Some(dns) = Dnsmasq::spawn(dir, hosts, addr) {
                return Some(dns);
            }
        }
        panic!("dnsmasq does not answer on any of 5 loopback ports");
    }

    /// Start dnsmasq on `addr`; None if it exits (its port was taken) or never answers.
    fn spawn(dir: &std::path::Path, hosts: &std::path::Path, addr: SocketAddr) -> Option<Dnsmasq> {
        let mut cmd = std::process::Command::new("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--local-ttl=1",
            "--user=root",
        ])
        .arg(format!("--port={}", addr.port()))
        .arg(format!("--addn-hosts={}", hosts.display()))
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .stderr(std::process::Stdio::null());
        // Owned (and so killed and reaped) from here on, whatever happens next.
        let mut dns = Dnsmasq {
            child: cmd.spawn().expect("spawn dnsmasq"),
            addr,
        };
        // Wait until it answers an A query for web.test.
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        probe
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut query = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3];
        query.extend_from_slice(b"web\x04test\x00\x00\x01\x00\x01");
        for _ in 0..50 {
            let _ = probe.send_to(&query, dns.addr);
            if probe.recv(&mut [0u8; 512]).is_ok() {
                return Some(dns);
            }
            if dns.child.try_wait().is_ok_and(|st| st.is_some()) {
                eprintln!("dnsmasq exited at start on {addr} (port taken?); trying another port");
                return None;
            }
        }
        eprintln!("dnsmasq does not answer on {addr}");
        None
    }

    /// Reread the hosts file.
    pub(crate) fn reload(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP dnsmasq");
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_destination_follows_dns_after_the_ttl() {
    use cc_proxy_api::mesh::DestinationState;
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 web.test\n").expect("hosts");
    let Some(dns) = Dnsmasq::start(dir.path(), &hosts) else {
        return;
    };
    // Two endpoint servers on one port, at two loopback addresses.
    let (e1, hits1) = counting_server("127.0.0.1:0").await;
    let (e2, hits2) = counting_server(&format!("127.0.0.2:{}", e1.port())).await;
    let dns_s = dns.addr.to_string();
    let mut env = Env::start_with(&["--dns-server", &dns_s]).await;
    let listen = free_addr();
    let name = format!("web.test:{}", e1.port());
    register_named(&mut env, "a", &listen, &name).await;
    let d = wait_endpoints(&env, "a", "resolved", |d| addrs_of(d) == [e1.to_string()]).await;
    assert_eq!(d.state, DestinationState::Resolved);
    // DNS endpoints have no identity (the listener names none): plaintext.
    assert_eq!(d.endpoints[0].identity, None);
    for _ in 0..3 {
        let (status, _, body) = get_through(&listen).await;
        assert_eq!(
            (status, body.as_str()),
            (200, e1.to_string().as_str()),
            "{}",
            env.logs()
        );
    }
    assert_eq!(hits1.load(Ordering::SeqCst), 3);

    // The answer changes: after its 1 s TTL the daemon resolves again and traffic goes to the new address.
    std::fs::write(&hosts, "127.0.0.2 web.test\n").expect("hosts");
    dns.reload();
    let t0 = Instant::now();
    wait_endpoints(&env, "a", "the new address", |d| {
        addrs_of(d) == [e2.to_string()]
    })
    .await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "followed after {took:?}");
    for _ in 0..3 {
        let (status, _, body) = get_through(&listen).await;
        assert_eq!((status, body.as_str()), (200, e2.to_string().as_str()));
    }
    assert_eq!(
        hits1.load(Ordering::SeqCst),
        3,
        "the old address got traffic"
    );
    assert_eq!(hits2.load(Ordering::SeqCst), 3);
    let _ = env.stop_daemon().await;
}
