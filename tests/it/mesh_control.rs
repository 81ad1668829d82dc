//! The mesh front under Linkerd's control plane (issue 15), through the real binary: certificates from a fake
//! `Identity` service built on the API crate's server trait, in-process on a loopback port, signing the
//! daemon's CSRs with a test root and intermediate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
    let failures = metric(
        &env.metrics().await,
        "cc_proxy_mesh_identity_service_failures_total",
    );
    assert!(failures >= 2.0, "failures {failures}");

    // Trusted leaves: the first certificate arrives (after at most the backoff so far) and is served.
    fake.foreign.store(false, Ordering::SeqCst);
    let first = wait_certificate(&env, "vm1", None, Duration::from_secs(6)).await;
    assert_eq!(served_serial(&listen, B).as_deref(), Some(first.as_str()));
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
}
