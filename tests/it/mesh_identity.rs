//! The mesh front's identity side (issue 14), through the real binary: the embedded CA and its files, the
//! certificate a meshed VM is given (P-256, its identity as DNS SAN, shared by every VM of that identity,
//! renewed at 70% of its lifetime), the CA and the VM's mesh configuration surviving a restart, identity files
//! reloaded when a symlinked directory is swapped (and kept when the new ones are invalid), the trust anchors
//! that `openssl verify` accepts the leaf with, and bad configurations refused with the field at fault.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cc_proxy_api::mesh::MeshConfig;
use cc_proxy_api::types::VmInfo;
use serde_json::{json, Value};

use crate::common::{free_addr, http_get, Agent, Env};

const A: &str = "a.default.serviceaccount.identity.linkerd.cluster.local";
const B: &str = "b.default.serviceaccount.identity.linkerd.cluster.local";

/// A mesh object with one inbound listener on a free port in front of a (never dialled) guest port.
fn mesh(identity: &str) -> Value {
    json!({
        "identity": identity,
        "inbound": [{"listen": free_addr(), "target": "tcp://127.0.0.1:9", "protocol": "opaque",
                     "authz": {"identities": [A]}}],
    })
}

/// Register VM `id` served by `agent` with the mesh object `mesh` (raw JSON, so bad ones can be sent too).
async fn register(env: &Env, id: &str, agent: &Agent, mesh: Value) -> Value {
    let (control, io) = agent.uris(None);
    env.rpc(
        "vm.register",
        json!({"id": id, "control": control, "io": io, "timeout_ms": 5000, "mesh": mesh}),
    )
    .await
}

async fn info(env: &Env, id: &str) -> VmInfo {
    env.client
        .vm_info(id)
        .await
        .unwrap_or_else(|e| panic!("vm.info {id}: {e}\n{}", env.logs()))
}

/// The serial of the certificate `vm.info` shows, waiting up to 5 s for one.
async fn serial(env: &Env, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let i = info(env, id).await;
        if let Some(c) = i.mesh.as_ref().and_then(|m| m.certificate.as_ref()) {
            return c.serial.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{id}: no certificate: {i:?}\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Run `openssl` with `args`; returns (success, stdout + stderr).
fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Run the client CLI and return its stdout, failing on a non-zero exit.
fn cli_ok(env: &Env, args: &[&str]) -> String {
    let out = env.cli(args, b"");
    assert!(
        out.status.success(),
        "cc-proxy {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_ca_issues_each_identity_one_p256_certificate_that_its_anchors_verify() {
    let mut env = Env::start().await;
    let (a1, a2, b1) = (env.agent(&[]), env.agent(&[]), env.agent(&[]));
    for (id, agent, identity) in [("web1", &a1, A), ("web2", &a2, A), ("db", &b1, B)] {
        let r = register(&env, id, agent, mesh(identity)).await;
        assert!(r.get("result").is_some(), "{id}: {r}\n{}", env.logs());
    }

    // The CA files, the key readable by the daemon's user only.
    use std::os::unix::fs::PermissionsExt;
    let key = env.state_dir.join("mesh-ca.key");
    let ca = env.state_dir.join("mesh-ca.pem");
    let mode = std::fs::metadata(&key)
        .expect("mesh-ca.key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mesh-ca.key mode {mode:o}");
    assert!(std::fs::read_to_string(&ca)
        .expect("mesh-ca.pem")
        .starts_with("-----BEGIN CERTIFICATE-----"));

    // vm.info: the configuration as registered and the certificate.
    let i = info(&env, "web1").await;
    let m = i.mesh.clone().expect("vm.info has mesh");
    assert_eq!(m.config.identity, A);
    assert_eq!(m.config.inbound.len(), 1);
    let serial_a = serial(&env, "web1").await;
    let i = info(&env, "web1").await;
    let cert = i.mesh.and_then(|m| m.certificate).expect("certificate");
    assert_eq!(cert.identity, A);
    assert_eq!(cert.source, "ca");
    assert!(
        serial_a.len() >= 16 && serial_a.bytes().all(|b| b.is_ascii_hexdigit()),
        "{serial_a}"
    );
    // Valid for 24 h from now (RFC 3339).
    let not_after = time::OffsetDateTime::parse(
        &cert.not_after,
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339 not_after");
    let left = not_after - time::OffsetDateTime::now_utc();
    assert!(
        left > time::Duration::hours(23) && left <= time::Duration::hours(24),
        "{}",
        cert.not_after
    );
    // One certificate per identity: shared by the two VMs of identity A, another for B.
    assert_eq!(serial(&env, "web2").await, serial_a);
    assert_ne!(serial(&env, "db").await, serial_a);

    // The leaf, exported as PEM (certificates only), is P-256 with the identity as its DNS SAN ...
    let out: Value = serde_json::from_str(&cli_ok(&env, &["--json", "mesh", "identity", "web1"]))
        .expect("mesh identity --json");
    assert_eq!(out["identity"], A);
    assert_eq!(out["certificate"]["serial"], serial_a.as_str());
    let chain = out["chain_pem"].as_str().expect("chain_pem").to_string();
    assert!(!chain.contains("PRIVATE KEY"));
    let leaf_path = env.dir.path().join("leaf.pem");
    std::fs::write(&leaf_path, &chain).expect("write leaf");
    let leaf = leaf_path.to_str().expect("path");
    let (ok, text) = openssl(&["x509", "-in", leaf, "-noout", "-text"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("NIST CURVE: P-256") || text.contains("prime256v1"),
        "{text}"
    );
    assert!(text.contains(&format!("DNS:{A}")), "{text}");
    let (_, der) = x509_parser::pem::parse_x509_pem(chain.as_bytes()).expect("PEM");
    let parsed = der.parse_x509().expect("X.509");
    assert_eq!(
        parsed
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        serial_a,
        "vm.info's serial is the certificate's"
    );

    // ... and verifies against the exported trust anchors, which are the CA file.
    let anchors = cli_ok(&env, &["mesh", "trust-anchors"]);
    assert_eq!(anchors, std::fs::read_to_string(&ca).expect("mesh-ca.pem"));
    let anchors_path = env.dir.path().join("anchors.pem");
    std::fs::write(&anchors_path, &anchors).expect("write anchors");
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        anchors_path.to_str().expect("path"),
        leaf,
    ]);
    assert!(ok && text.contains("OK"), "{text}");
    // Not against another CA.
    let (_, other_ca) = self_signed_ca(env.dir.path(), "other");
    let (ok, text) = openssl(&["verify", "-CAfile", other_ca.to_str().expect("path"), leaf]);
    assert!(!ok, "a foreign CA verified the leaf: {text}");

    // The expiry gauge has a series per identity in use; it goes with the identity's last VM.
    let series = format!("identity_cert_expiration_timestamp_seconds{{identity=\"{A}\"}}");
    assert!(env.metrics().await.contains(&series));
    env.client.unregister("web1").await.expect("unregister");
    assert!(env.metrics().await.contains(&series), "web2 still uses A");
    env.client.unregister("web2").await.expect("unregister");
    assert!(
        !env.metrics().await.contains(&series),
        "no VM uses A any more"
    );
    // Meshed VMs do not change readiness.
    assert_eq!(http_get(&env.admin, "/ready").await.0, 200);
    let _ = env.stop_daemon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_renewed_at_70_percent_of_their_lifetime() {
    let mut env = Env::start_with(&["--mesh-cert-lifetime", "6s"]).await;
    let agent = env.agent(&[]);
    let r = register(&env, "vm1", &agent, mesh(A)).await;
    assert!(r.get("result").is_some(), "{r}");
    let first = serial(&env, "vm1").await;
    let issued = Instant::now();
    let renewed = loop {
        let s = serial(&env, "vm1").await;
        if s != first {
            break issued.elapsed();
        }
        assert!(
            issued.elapsed() < Duration::from_secs(8),
            "no renewal of a 6 s certificate\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // 70% of 6 s = 4.2 s after issuance (measured from the first sight of the certificate).
    assert!(
        renewed > Duration::from_millis(3500) && renewed < Duration::from_millis(5500),
        "renewed after {renewed:?}"
    );
    let _ = env.stop_daemon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_ca_and_the_vms_mesh_configuration() {
    let mut env = Env::start().await;
    let agent = env.agent(&[]);
    let config = mesh(B);
    let r = register(&env, "vm1", &agent, config.clone()).await;
    assert!(r.get("result").is_some(), "{r}");
    serial(&env, "vm1").await;
    let ca = std::fs::read(env.state_dir.join("mesh-ca.pem")).expect("CA");
    let anchors = cli_ok(&env, &["mesh", "trust-anchors"]);

    env.restart_daemon().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(&env.admin, "/ready").await.0 != 200 {
        assert!(Instant::now() < deadline, "recovery did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        std::fs::read(env.state_dir.join("mesh-ca.pem")).expect("CA"),
        ca,
        "the CA is reused"
    );
    assert_eq!(cli_ok(&env, &["mesh", "trust-anchors"]), anchors);
    let i = info(&env, "vm1").await;
    assert!(i.recovered, "{i:?}");
    let wanted: MeshConfig = serde_json::from_value(config).expect("config");
    assert_eq!(
        i.mesh.map(|m| m.config),
        Some(wanted),
        "the mesh config is restored"
    );
    // The recovered VM's identity is issued again, by the same CA.
    serial(&env, "vm1").await;
    let out: Value =
        serde_json::from_str(&cli_ok(&env, &["--json", "mesh", "identity", "vm1"])).expect("json");
    // Its inbound listener is bound again and serves that certificate.
    let addr = config_addr(&env, "vm1").await;
    assert_eq!(
        served_serial(&addr, B),
        out["certificate"]["serial"]
            .as_str()
            .expect("serial")
            .trim_start_matches('0')
    );
    let leaf = env.dir.path().join("leaf.pem");
    std::fs::write(&leaf, out["chain_pem"].as_str().expect("chain")).expect("write");
    let ca_path = env.state_dir.join("mesh-ca.pem");
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        ca_path.to_str().expect("path"),
        leaf.to_str().expect("path"),
    ]);
    assert!(ok, "{text}");
    let _ = env.stop_daemon().await;
}

/// Make a self-signed P-256 CA `name` in `dir`; returns (key, certificate) paths.
fn self_signed_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}-ca.key"));
    let cert = dir.join(format!("{name}-ca.crt"));
    let (ok, text) = openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key.to_str().expect("path"),
        "-out",
        cert.to_str().expect("path"),
        "-days",
        "2",
        "-subj",
        &format!("/CN={name} test CA"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    assert!(ok, "{text}");
    (key, cert)
}

/// Issue a P-256 leaf for `identity` from the CA `ca` into `out/tls.crt` and `out/tls.key`.
fn issue_leaf(ca: &(PathBuf, PathBuf), identity: &str, out: &Path) {
    std::fs::create_dir_all(out).expect("mkdir");
    let key = out.join("tls.key");
    let csr = out.join("leaf.csr");
    let ext = out.join("leaf.ext");
    std::fs::write(
        &ext,
        format!(
            "subjectAltName=DNS:{identity}\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n"
        ),
    )
    .expect("ext");
    let (ok, text) = openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key.to_str().expect("path"),
        "-out",
        csr.to_str().expect("path"),
        "-subj",
        &format!("/CN={identity}"),
    ]);
    assert!(ok, "{text}");
    let (ok, text) = openssl(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().expect("path"),
        "-CA",
        ca.1.to_str().expect("path"),
        "-CAkey",
        ca.0.to_str().expect("path"),
        "-set_serial",
        &format!("0x{:x}", rand_serial()),
        "-days",
        "1",
        "-extfile",
        ext.to_str().expect("path"),
        "-out",
        out.join("tls.crt").to_str().expect("path"),
    ]);
    assert!(ok, "{text}");
}

fn rand_serial() -> u64 {
    use std::time::SystemTime;
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    (n ^ u64::from(std::process::id()).rotate_left(32)) | 1
}

/// Point `dir/link` at `target` atomically (a new link renamed over the old one), as Kubernetes swaps a
/// mounted Secret's `..data`.
fn swap_link(dir: &Path, link: &str, target: &str) {
    let tmp = dir.join(format!(".{link}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join(link)).expect("rename over the link");
}

/// A daemon with `--mesh-identity-dir` (anchors `ca.crt`, B's certificate in `v1` behind B's symlink) and VM
/// `vm1` meshed as B, registered and holding its first certificate (serial `first`).
struct FilesVm {
    tmp: tempfile::TempDir,
    ca: (PathBuf, PathBuf),
    dir: PathBuf,
    env: Env,
    agent: Agent,
    first: String,
}

impl FilesVm {
    async fn start(name: &str) -> FilesVm {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = self_signed_ca(tmp.path(), name);
        let dir = tmp.path().join("identity");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::copy(&ca.1, dir.join("ca.crt")).expect("anchors");
        issue_leaf(&ca, B, &dir.join("v1"));
        swap_link(&dir, B, "v1");
        let dir_arg = dir.to_str().expect("path").to_string();
        let mut env = Env::start_with(&["--mesh-identity-dir", &dir_arg]).await;
        let agent = env.agent(&[]);
        let r = register(&env, "vm1", &agent, mesh(B)).await;
        assert!(r.get("result").is_some(), "{r}\n{}", env.logs());
        let first = serial(&env, "vm1").await;
        FilesVm {
            tmp,
            ca,
            dir,
            env,
            agent,
            first,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_files_reload_on_a_symlink_swap_and_invalid_ones_keep_the_old_certificate() {
    let FilesVm {
        tmp,
        ca,
        dir,
        mut env,
        agent: _agent,
        first,
    } = FilesVm::start("files").await;
    let i = info(&env, "vm1").await;
    assert_eq!(
        i.mesh.and_then(|m| m.certificate).map(|c| c.source),
        Some("files".to_string())
    );
    // The anchors are the directory's ca.crt; the embedded CA is not created.
    assert_eq!(
        cli_ok(&env, &["mesh", "trust-anchors"]),
        std::fs::read_to_string(&ca.1).expect("ca")
    );
    assert!(!env.state_dir.join("mesh-ca.key").exists());

    // A new certificate in a new directory, swapped in: served within a second or so.
    issue_leaf(&ca, B, &dir.join("v2"));
    swap_link(&dir, B, "v2");
    let deadline = Instant::now() + Duration::from_secs(5);
    let second = loop {
        let s = serial(&env, "vm1").await;
        if s != first {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the swap was not picked up\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Invalid files (a certificate of another identity; then a key that is not PEM) are refused, counted, and
    // the second certificate keeps serving.
    issue_leaf(&ca, A, &dir.join("v3"));
    swap_link(&dir, B, "v3");
    let failures = format!("cc_proxy_mesh_identity_reload_failures_total{{identity=\"{B}\"}} ");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !env.metrics().await.contains(&failures) {
        assert!(
            Instant::now() < deadline,
            "the invalid reload was not counted\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    issue_leaf(&ca, B, &dir.join("v4"));
    std::fs::write(dir.join("v4").join("tls.key"), "not a key").expect("write");
    swap_link(&dir, B, "v4");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        serial(&env, "vm1").await,
        second,
        "the old certificate is kept"
    );
    assert!(
        env.logs()
            .contains("mesh identity files are invalid; the previous certificate is kept"),
        "{}",
        env.logs()
    );

    // The anchors file is reloaded too: a bundle with a second CA is exported at once ...
    let (_, second_ca) = self_signed_ca(tmp.path(), "second");
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(&ca.1).expect("ca"),
        std::fs::read_to_string(&second_ca).expect("second ca")
    );
    std::fs::write(dir.join("ca.crt.new"), &bundle).expect("write");
    std::fs::rename(dir.join("ca.crt.new"), dir.join("ca.crt")).expect("rename");
    let deadline = Instant::now() + Duration::from_secs(5);
    while env
        .client
        .mesh_trust_anchors()
        .await
        .expect("anchors")
        .count
        != 2
    {
        assert!(
            Instant::now() < deadline,
            "ca.crt not reloaded\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... and one that is not PEM is refused and counted, the two anchors kept.
    std::fs::write(dir.join("ca.crt"), "garbage").expect("write");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !env
        .metrics()
        .await
        .contains("cc_proxy_mesh_trust_anchor_reload_failures_total 1")
    {
        assert!(
            Instant::now() < deadline,
            "bad ca.crt not counted\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        env.client
            .mesh_trust_anchors()
            .await
            .expect("anchors")
            .count,
        2
    );
    let _ = env.stop_daemon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mesh_configurations_are_refused_with_the_field_at_fault() {
    let mut env = Env::start().await;
    let cases = [
        (
            json!({"identity": "Not An Identity"}),
            1030,
            "mesh.identity",
        ),
        (
            json!({"identity": B, "inbound": [{"listen": "nowhere", "target": "tcp://127.0.0.1:9"}]}),
            1030,
            "mesh.inbound[0].listen",
        ),
        (
            json!({"identity": B, "inbound": [{"listen": free_addr(), "target": "ftp://x"}]}),
            1030,
            "mesh.inbound[0].target",
        ),
        (
            json!({"identity": B, "inbound": [{"listen": free_addr(), "target": "tcp://127.0.0.1:9",
                   "authz": {"identities": ["*"]}}]}),
            1030,
            "mesh.inbound[0].authz.identities[0]",
        ),
        (
            json!({"identity": B, "outbound": [{"listen": free_addr(),
                   "destination": {"endpoints": ["db:5432"], "identity": A}}]}),
            1030,
            "mesh.outbound[0].destination.endpoints[0]",
        ),
        (
            json!({"identity": B, "outbound": [{"listen": free_addr(),
                   "destination": {"name": "web.default.svc.cluster.local:80", "endpoints": ["10.0.0.1:80"]}}]}),
            1030,
            "mesh.outbound[0].destination.name",
        ),
        (
            json!({"identity": B, "outbound": [{"listen": free_addr(),
                   "destination": {"name": "web.default.svc.cluster.local"}}]}),
            1030,
            "mesh.outbound[0].destination.name",
        ),
        (
            json!({"identity": B, "outbound": [{"listen": free_addr(), "destination": {}}]}),
            1030,
            "mesh.outbound[0].destination.endpoints",
        ),
    ];
    for (i, (cfg, code, field)) in cases.into_iter().enumerate() {
        let agent = env.agent(&[]);
        let id = format!("bad{i}");
        let r = register(&env, &id, &agent, cfg.clone()).await;
        assert_eq!(r["error"]["code"], code, "{cfg}: {r}");
        assert_eq!(r["error"]["data"]["field"], field, "{cfg}: {r}");
        assert_eq!(r["error"]["data"]["vm"], id.as_str(), "{cfg}: {r}");
        let m = r["error"]["message"].as_str().unwrap_or_default();
        assert!(m.contains(field), "the message names the field: {m}");
        let gone = env.rpc("vm.info", json!({"id": id})).await;
        assert_eq!(
            gone["error"]["code"], 1002,
            "{id} is not registered: {gone}"
        );
    }
    // Ill-typed objects are refused by the params parser: an unknown field, an unknown protocol.
    for cfg in [
        json!({"identity": B, "colour": "blue"}),
        json!({"identity": B, "inbound": [{"listen": free_addr(), "target": "tcp://127.0.0.1:9",
               "protocol": "smtp"}]}),
    ] {
        let r = env
            .rpc(
                "vm.register",
                json!({"id": "x", "control": "unix:///nowhere/c", "io": "unix:///nowhere/i", "mesh": cfg}),
            )
            .await;
        assert_eq!(r["error"]["code"], -32602, "{r}");
    }
    // A VM without a mesh has no mesh identity.
    let plain = env.agent(&[]);
    env.register("plain", &plain, None).await;
    assert!(info(&env, "plain").await.mesh.is_none());
    let r = env.rpc("mesh.identity", json!({"id": "plain"})).await;
    assert_eq!(r["error"]["code"], 1011, "{r}");
    let r = env.rpc("mesh.endpoints", json!({"id": "plain"})).await;
    assert_eq!(r["error"]["code"], 1011, "{r}");
    let out = env.cli(
        &[
            "vm",
            "register",
            "x",
            "--control",
            "unix:///a",
            "--io",
            "unix:///b",
            "--mesh",
            "{",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mesh"));
}

/// The serial (lowercase hex, no leading zeros) of the leaf the TLS server at `addr` presents for `sni`.
fn served_serial(addr: &str, sni: &str) -> String {
    try_served_serial(addr, sni).unwrap_or_else(|text| panic!("no certificate from {addr}: {text}"))
}

/// [`served_serial`], or what `openssl s_client` printed when no certificate came within 3 s.
fn try_served_serial(addr: &str, sni: &str) -> Result<String, String> {
    let out = Command::new("timeout")
        .args([
            "3",
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
    let Some(begin) = text.find("-----BEGIN CERTIFICATE-----") else {
        return Err(text);
    };
    let end = text[begin..]
        .find("-----END CERTIFICATE-----")
        .map(|e| begin + e + "-----END CERTIFICATE-----".len())
        .expect("end of certificate");
    let (_, der) = x509_parser::pem::parse_x509_pem(&text.as_bytes()[begin..end]).expect("PEM");
    let cert = der.parse_x509().expect("X.509");
    let hex: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(hex.trim_start_matches('0').to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_listener_serves_the_issued_certificate_and_its_renewal() {
    let mut env = Env::start_with(&["--mesh-cert-lifetime", "6s"]).await;
    let (agent, other) = (env.agent(&[]), env.agent(&[]));
    let cfg = mesh(B);
    let addr = cfg["inbound"][0]["listen"]
        .as_str()
        .expect("listen")
        .to_string();
    let r = register(&env, "vm1", &agent, cfg.clone()).await;
    assert!(r.get("result").is_some(), "{r}");
    let first = serial(&env, "vm1").await;
    assert_eq!(served_serial(&addr, B), first.trim_start_matches('0'));
    // After the renewal a new handshake gets the new certificate.
    let deadline = Instant::now() + Duration::from_secs(8);
    let renewed = loop {
        let s = serial(&env, "vm1").await;
        if s != first {
            break s;
        }
        assert!(Instant::now() < deadline, "no renewal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(served_serial(&addr, B), renewed.trim_start_matches('0'));

    // The address is taken: another VM's registration with it fails naming the listener, and registers
    // nothing ...
    let r = register(&env, "vm2", &other, cfg.clone()).await;
    assert_eq!(r["error"]["code"], 1030, "{r}");
    assert_eq!(r["error"]["data"]["vm"], "vm2", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&addr),
        "{r}"
    );
    let gone = env.rpc("vm.info", json!({"id": "vm2"})).await;
    assert_eq!(gone["error"]["code"], 1002, "{gone}");
    // ... until the first VM is unregistered: its listeners have drained when the call returns.
    env.client.unregister("vm1").await.expect("unregister");
    let r = register(&env, "vm2", &other, cfg).await;
    assert!(r.get("result").is_some(), "{r}\n{}", env.logs());
    // Same identity, a new lease: a certificate is served again.
    let s = serial(&env, "vm2").await;
    assert_eq!(served_serial(&addr, B), s.trim_start_matches('0'));
    let _ = env.stop_daemon().await;
}

/// The first inbound listen address of VM `id`, as `vm.info` shows its configuration.
async fn config_addr(env: &Env, id: &str) -> String {
    info(env, id)
        .await
        .mesh
        .and_then(|m| m.config.inbound.first().map(|i| i.listen.clone()))
        .expect("an inbound listener")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_vms_listeners_stop_and_its_identity_is_released() {
    let mut env = Env::start().await;
    let agent = env.agent(&[]);
    let r = register(&env, "vm1", &agent, mesh(A)).await;
    assert!(r.get("result").is_some(), "{r}");
    serial(&env, "vm1").await;
    let addr = config_addr(&env, "vm1").await;
    assert!(
        std::net::TcpStream::connect(&addr).is_ok(),
        "the listener serves"
    );
    // The VM dies: it is lost, its listener closes and its identity's certificate is no longer served.
    env.kill_agent(&agent);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let i = info(&env, "vm1").await;
        let closed = std::net::TcpStream::connect(&addr).is_err();
        // The listener closes first; the identity is released once its connections have drained.
        let m = i
            .mesh
            .as_ref()
            .expect("a lost VM still shows its mesh configuration");
        let released = m.certificate.is_none();
        if i.state == cc_proxy_api::types::VmStateName::Lost && closed && released {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "vm1 {:?}, listener closed: {closed}, certificate released: {released} ({m:?})\n{}",
            i.state,
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let series = format!("identity_cert_expiration_timestamp_seconds{{identity=\"{A}\"}}");
    assert!(!env.metrics().await.contains(&series));
    // The daemon's readiness is unaffected.
    assert_eq!(http_get(&env.admin, "/ready").await.0, 200);
    let _ = env.stop_daemon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_files_are_reread_only_when_they_change() {
    // Reading the files is no change: the daemon's own rereads must not start the next one (which would reread
    // and reparse every identity's files several times a second, forever). Watched from outside, an idle
    // serving daemon opens nothing in the directory; a change is still picked up.
    let FilesVm {
        tmp: _tmp,
        ca,
        dir,
        mut env,
        agent: _agent,
        first,
    } = FilesVm::start("quiet").await;

    use notify::Watcher;
    // Files opened (directories are opened by the watch itself as it walks the tree).
    let opens = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let counted = opens.clone();
    let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        if let Ok(e) = e {
            if matches!(
                e.kind,
                notify::EventKind::Access(notify::event::AccessKind::Open(_))
            ) {
                let files = e.paths.into_iter().filter(|p| p.is_file());
                counted.lock().expect("lock").extend(files);
            }
        }
    })
    .expect("watcher");
    // Whatever the start-up reads were, they are over after a few settle periods.
    tokio::time::sleep(Duration::from_millis(500)).await;
    watcher
        .watch(&dir, notify::RecursiveMode::Recursive)
        .expect("watch");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = std::mem::take(&mut *opens.lock().expect("lock"));
    assert!(
        seen.is_empty(),
        "the daemon keeps rereading unchanged identity files: {seen:?}\n{}",
        env.logs()
    );
    // A real change is still read, once.
    issue_leaf(&ca, B, &dir.join("v2"));
    swap_link(&dir, B, "v2");
    let deadline = Instant::now() + Duration::from_secs(5);
    while serial(&env, "vm1").await == first {
        assert!(
            Instant::now() < deadline,
            "the swap was not picked up\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    opens.lock().expect("lock").clear();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = std::mem::take(&mut *opens.lock().expect("lock"));
    assert!(
        seen.is_empty(),
        "rereads go on after the change: {seen:?}\n{}",
        env.logs()
    );
    drop(watcher);
    let _ = env.stop_daemon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_do_not_serve_before_the_identity_has_a_certificate() {
    // Files mode with no files for the identity yet: the VM registers, its listener is bound but serves no
    // handshake, until the files appear.
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = self_signed_ca(tmp.path(), "late");
    let dir = tmp.path().join("identity");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(&ca.1, dir.join("ca.crt")).expect("anchors");
    let dir_arg = dir.to_str().expect("path").to_string();
    let mut env = Env::start_with(&["--mesh-identity-dir", &dir_arg]).await;
    let agent = env.agent(&[]);
    let r = register(&env, "vm1", &agent, mesh(B)).await;
    assert!(r.get("result").is_some(), "{r}\n{}", env.logs());
    let addr = config_addr(&env, "vm1").await;
    let i = info(&env, "vm1").await;
    assert!(i.mesh.and_then(|m| m.certificate).is_none());
    let text = try_served_serial(&addr, B).expect_err("a handshake before any certificate");
    assert!(!text.contains("BEGIN CERTIFICATE"), "{text}");
    assert!(
        env.logs().contains("its listeners wait for them"),
        "{}",
        env.logs()
    );
    // The files arrive: the certificate is picked up and served.
    issue_leaf(&ca, B, &dir.join("v1"));
    swap_link(&dir, B, "v1");
    let s = serial(&env, "vm1").await;
    assert_eq!(served_serial(&addr, B), s.trim_start_matches('0'));
    let _ = env.stop_daemon().await;
}

/// Run the daemon with `args` expecting it to refuse to start; returns (exit code, stderr).
fn refused_start(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(crate::common::proxy_bin())
        .arg("--socket")
        .arg(dir.join("refused.sock"))
        .arg("--state-dir")
        .arg(dir.join("refused-state"))
        .args(["--admin-addr", "off", "--log-target", "stderr"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn cc-proxy");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cc-proxy {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut stderr)
        .expect("stderr");
    (status.code(), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_trust_anchors_are_exported_and_bad_identity_flags_stop_the_daemon() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_, linkerd) = self_signed_ca(tmp.path(), "linkerd");
    let linkerd_arg = linkerd.to_str().expect("path").to_string();
    let mut env = Env::start_with(&["--mesh-trust-anchors", &linkerd_arg]).await;
    let anchors = env.client.mesh_trust_anchors().await.expect("anchors");
    assert_eq!(anchors.count, 2, "{}", anchors.pem);
    let ca = std::fs::read_to_string(env.state_dir.join("mesh-ca.pem")).expect("CA");
    let extra = std::fs::read_to_string(&linkerd).expect("linkerd CA");
    // The embedded CA first, then the extra anchors (same certificates; PEM line layout may differ).
    let der = |pem: &str| -> Vec<Vec<u8>> {
        x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
            .map(|p| p.expect("PEM").contents)
            .collect()
    };
    assert_eq!(
        der(&anchors.pem),
        [der(&ca), der(&extra)].concat(),
        "{}",
        anchors.pem
    );
    let _ = env.stop_daemon().await;

    let empty = tmp.path().join("empty.pem");
    std::fs::write(&empty, "no certificates here\n").expect("write");
    let (code, stderr) = refused_start(
        tmp.path(),
        &["--mesh-trust-anchors", empty.to_str().expect("path")],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("mesh identity") && stderr.contains("holds no certificate"),
        "{stderr}"
    );
    let missing = tmp.path().join("no-such-dir");
    let (code, stderr) = refused_start(
        tmp.path(),
        &["--mesh-identity-dir", missing.to_str().expect("path")],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no-such-dir"), "{stderr}");
    let (code, stderr) = refused_start(tmp.path(), &["--mesh-cert-lifetime", "1s"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--mesh-cert-lifetime"), "{stderr}");
}
