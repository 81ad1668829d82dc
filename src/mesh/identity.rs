//! Workload identities: each meshed identity's certificate and the trust anchors.
//!
//! Roles:
//! - [`IdentityStore`] (one per daemon) knows where certificates come from ([`SourceConfig`]): the embedded
//!   CA ([`super::ca`], the default, created under `--state-dir` on first start) or files in
//!   `--mesh-identity-dir` ([`super::files`]), reloaded when the directory changes. It publishes the trust
//!   anchors (the CA's or the files', plus `--mesh-trust-anchors`) on one watch channel.
//! - One publisher task per identity in use keeps that identity's [`Credential`] on a watch channel. VMs
//!   sharing an identity share the channel (and so the certificate): [`IdentityStore::acquire`] hands out an
//!   [`IdentityLease`] per VM, counted; when the last lease is dropped the task stops and the identity's
//!   metric series go.
//!
//! Events, per identity: first lease → issue (CA) or read the files → publish; CA: at 70% of the lifetime
//! ([`renew_delay`]) a new leaf is issued and published; files: every change in the directory rereads them,
//! and a new valid credential replaces the old one, while an invalid one is logged, counted
//! (`cc_proxy_mesh_identity_reload_failures_total`) and ignored, so the old credential keeps serving. The
//! channel holds `None` until the first credential exists; listeners do not serve before.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cc_proxy_api::mesh::CertificateInfo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ca::{self, Ca};
use super::files::FilesSource;
use crate::admin::metrics::METRICS;
use crate::sync::lock;

/// Default `--mesh-cert-lifetime`: the lifetime of the certificates the embedded CA issues, as Linkerd's.
pub const DEFAULT_CERT_LIFETIME: &str = "24h";
/// Shortest `--mesh-cert-lifetime`: renewal then runs every 1.4 s at most (tests use a few seconds).
pub const MIN_CERT_LIFETIME: Duration = Duration::from_secs(2);
/// Longest `--mesh-cert-lifetime`: one year; a leaf cannot outlive its CA either.
pub const MAX_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates are renewed when this share (percent) of their lifetime has passed, as Linkerd does.
pub const RENEW_AT_PERCENT: u32 = 70;
/// The renewal delay is clamped to [`MIN_REFRESH`, `MAX_REFRESH`]. Linkerd's floor is 10 s; ours is lower so
/// that the seconds-long lifetimes tests use still renew before they expire.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// See [`MIN_REFRESH`]; a certificate is renewed at least once a day whatever its lifetime.
pub const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// After a failed issuance (should not happen: the CA is local) the next attempt comes this much later.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// Longest DNS-like identity name (a DNS name's limit).
pub const MAX_IDENTITY_LEN: usize = 253;
/// Longest label (dot-separated part) of an identity.
pub const MAX_LABEL_LEN: usize = 63;

/// Where an identity's certificate stands (`vm.info`'s `mesh.identity_state`, `mesh.identity`'s `state`).
pub use cc_proxy_api::mesh::IdentityState;

/// Where certificates come from (from the flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    /// The embedded CA in the state directory, issuing leaves of this lifetime.
    Ca {
        state_dir: PathBuf,
        lifetime: Duration,
    },
    /// Certificate, key and anchor files in this directory (layout in [`super::files`]).
    Files { dir: PathBuf },
    /// Linkerd's identity service ([`super::identity_svc`]); the anchors are `--mesh-trust-anchors` alone.
    IdentitySvc(super::identity_svc::SvcConfig),
}

/// The identity store's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    pub source: SourceConfig,
    /// A PEM bundle of more trust anchors (`--mesh-trust-anchors`), e.g. Linkerd's, read at start.
    pub extra_anchors: Option<PathBuf>,
}

/// Why a credential, the CA or the anchors cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the mesh CA in {} is incomplete: {} and {} must both exist or both be absent", dir.display(), ca::CA_KEY_FILE, ca::CA_CERT_FILE)]
    CaIncomplete { dir: PathBuf },
    #[error("the mesh CA file {} cannot be used: {reason}", path.display())]
    CaInvalid { path: PathBuf, reason: String },
    #[error("cannot issue a certificate: {0}")]
    Issue(rcgen::Error),
    #[error("{}: not a PEM bundle of certificates: {reason}", path.display())]
    AnchorsInvalid { path: PathBuf, reason: String },
    #[error("{}: holds no certificate", path.display())]
    AnchorsEmpty { path: PathBuf },
    #[error("identity {identity:?}: {reason}")]
    CredentialInvalid { identity: String, reason: String },
    #[error("cannot watch {}: {reason}", path.display())]
    Watch { path: PathBuf, reason: String },
    #[error("--identity-svc needs --mesh-trust-anchors (the control plane's trust anchors)")]
    SvcWithoutAnchors,
    #[error("{0}")]
    Svc(#[from] super::identity_svc::SvcError),
}

/// One identity's certificate chain and key, as served by the listeners of every VM with that identity.
#[derive(Debug)]
pub struct Credential {
    /// The identity (the leaf's DNS SAN).
    pub identity: String,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's P-256 private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// The leaf's serial number, hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Where it came from.
    pub source: CredentialSource,
}

/// Where a credential came from (`vm.info`'s `certificate.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    /// The embedded CA.
    Ca,
    /// Certificate and key files.
    Files,
    /// Linkerd's identity service.
    IdentityService,
}

impl CredentialSource {
    pub fn name(self) -> &'static str {
        match self {
            CredentialSource::Ca => "ca",
            CredentialSource::Files => "files",
            CredentialSource::IdentityService => "identity-service",
        }
    }
}

/// The trust anchors (DER roots) that peers' chains are verified against: the embedded CA's (or the
/// configured files') plus any extra anchors, such as Linkerd's.
#[derive(Debug, Default)]
pub struct Anchors {
    pub roots: Vec<CertificateDer<'static>>,
}

impl Anchors {
    /// The anchors as one PEM bundle (what `cc-proxy mesh trust-anchors` prints).
    pub fn pem(&self) -> String {
        use base64::Engine;
        let mut out = String::new();
        for root in &self.roots {
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            let b64 = base64::engine::general_purpose::STANDARD.encode(root.as_ref());
            for line in b64.as_bytes().chunks(64) {
                out.push_str(&String::from_utf8_lossy(line));
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
        }
        out
    }

    /// Check that `credential`'s chain leads to one of these anchors and names its identity.
    pub fn verify(&self, credential: &Credential) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        let (_, ignored) = roots.add_parsable_certificates(self.roots.iter().cloned());
        if roots.is_empty() {
            return Err(format!(
                "no usable trust anchor ({ignored} could not be parsed)"
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(credential.identity.clone()).map_err(|e| e.to_string())?;
        let (leaf, intermediates) = credential
            .chain
            .split_first()
            .ok_or_else(|| "empty chain".to_string())?;
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

impl Credential {
    /// Check and describe a chain and key for `identity`: the leaf parses, names `identity` as a DNS SAN, is
    /// within its validity, has a P-256 key, and `key` is that key.
    pub fn new(
        identity: &str,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        source: CredentialSource,
    ) -> Result<Credential, IdentityError> {
        let invalid = |reason: String| IdentityError::CredentialInvalid {
            identity: identity.to_string(),
            reason,
        };
        let leaf = chain
            .first()
            .ok_or_else(|| invalid("the chain holds no certificate".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| invalid(format!("the leaf does not parse: {e}")))?;
        let names = sans(&cert);
        if !names.iter().any(|n| n == identity) {
            return Err(invalid(format!(
                "the leaf's names {names:?} do not include the identity"
            )));
        }
        if !is_p256(cert.public_key()) {
            return Err(invalid("the leaf's key is not ECDSA P-256".into()));
        }
        let not_before = cert.validity().not_before.timestamp();
        let not_after = cert.validity().not_after.timestamp();
        if not_after <= ca::unix_now() {
            return Err(invalid("the leaf has expired".into()));
        }
        let signer = rustls::crypto::ring::sign::any_ecdsa_type(&key)
            .map_err(|e| invalid(format!("the key: {e}")))?;
        rustls::sign::CertifiedKey::new(chain.clone(), signer)
            .keys_match()
            .map_err(|e| invalid(format!("the key does not belong to the leaf: {e}")))?;
        let serial = cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Credential {
            identity: identity.to_string(),
            serial,
            not_before: SystemTime::UNIX_EPOCH + Duration::from_secs(not_before.max(0) as u64),
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64),
            chain,
            key,
            source,
        })
    }

    /// Unix seconds of the expiry.
    pub fn not_after_unix(&self) -> i64 {
        self.not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    /// What `vm.info` and `mesh.identity` show.
    pub fn info(&self) -> CertificateInfo {
        CertificateInfo {
            identity: self.identity.clone(),
            serial: self.serial.clone(),
            not_before: rfc3339(self.not_before),
            not_after: rfc3339(self.not_after),
            source: self.source.name().to_string(),
        }
    }

    /// The chain as PEM (certificates only; the key is never exported).
    pub fn chain_pem(&self) -> String {
        Anchors {
            roots: self.chain.clone(),
        }
        .pem()
    }

    /// Same certificate (a reload that changed nothing is not a new credential).
    fn same_as(&self, other: &Credential) -> bool {
        self.chain == other.chain
    }
}

/// A certificate's DNS and URI SANs, in order: the names a peer identity is taken from (`tls::peer_identity`)
/// and checked against.
pub fn sans(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(s) => Some(s.to_string()),
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether a public key is ECDSA on P-256.
fn is_p256(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> bool {
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
    spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|oid| oid == OID_EC_P256)
}

/// RFC 3339 in UTC, seconds precision.
pub fn rfc3339(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    dt.replace_nanosecond(0)
        .unwrap_or(dt)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Check an identity name: a DNS-like name (lowercase letters, digits and `-` in dot-separated labels of 1 to
/// 63 characters, no label starting or ending with `-`), at most 253 characters, with at least two labels.
pub fn validate_identity(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_IDENTITY_LEN {
        return Err(format!("an identity is 1 to {MAX_IDENTITY_LEN} characters"));
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return Err("an identity is a DNS-like name with at least two labels, such as web.default.serviceaccount.identity.linkerd.cluster.local".into());
    }
    for label in labels {
        let ok = !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(format!("label {label:?}: a label is 1 to {MAX_LABEL_LEN} characters of a-z 0-9 -, not starting or ending with -"));
        }
    }
    Ok(())
}

/// When to renew a certificate of `lifetime`: at [`RENEW_AT_PERCENT`] of it, clamped to
/// [[`MIN_REFRESH`], [`MAX_REFRESH`]].
pub fn renew_delay(lifetime: Duration) -> Duration {
    (lifetime * RENEW_AT_PERCENT / 100).clamp(MIN_REFRESH, MAX_REFRESH)
}

/// The loaded source.
enum Source {
    Ca { ca: Box<Ca>, lifetime: Duration },
    Files(FilesSource),
    Svc(super::identity_svc::IdentitySvc),
}

/// One identity in use.
struct Published {
    /// The identity's credential channel; every VM with the identity holds a receiver.
    credential: watch::Sender<Option<Arc<Credential>>>,
    /// The certificate last withdrawn because it expired before a new one came (cleared by the next one).
    expired: Option<CertificateInfo>,
    /// Leases held (VMs with this identity).
    leases: usize,
    /// Stops the identity's publisher task.
    stop: CancellationToken,
}

/// Every identity in use, its certificate and the trust anchors.
pub struct IdentityStore {
    source: Source,
    /// The extra anchors (`--mesh-trust-anchors`), added to the source's.
    extra: Vec<CertificateDer<'static>>,
    anchors: watch::Sender<Arc<Anchors>>,
    identities: Mutex<HashMap<String, Published>>,
    /// Stops the daemon-wide tasks (the anchor reloader) when the store is dropped.
    stop: CancellationToken,
}

/// A VM's hold on an identity: its credential channel. Dropping the last lease of an identity stops its
/// renewals.
pub struct IdentityLease {
    store: Arc<IdentityStore>,
    identity: String,
    pub credential: watch::Receiver<Option<Arc<Credential>>>,
}

impl IdentityLease {
    /// The certificate served now, if any.
    pub fn current(&self) -> Option<Arc<Credential>> {
        self.credential.borrow().clone()
    }

    /// Where the identity's certificate stands.
    pub fn state(&self) -> IdentityState {
        if self.credential.borrow().is_some() {
            return IdentityState::Valid;
        }
        match lock(&self.store.identities)
            .get(&self.identity)
            .and_then(|p| p.expired.clone())
        {
            Some(_) => IdentityState::Expired,
            None => IdentityState::Pending,
        }
    }
}

impl Drop for IdentityLease {
    fn drop(&mut self) {
        self.store.release(&self.identity);
    }
}

impl IdentityStore {
    /// Load (or create) the source and the anchors. Runs blocking file I/O; call at startup. In files mode the
    /// directory watcher and the anchor reloader start here (inside a tokio runtime).
    pub fn open(config: &IdentityConfig) -> Result<Arc<IdentityStore>, IdentityError> {
        let extra = match &config.extra_anchors {
            Some(path) => read_anchor_file(path)?,
            None => Vec::new(),
        };
        let (source, base) = match &config.source {
            SourceConfig::Ca {
                state_dir,
                lifetime,
            } => {
                let ca = Ca::load_or_create(state_dir)?;
                let base = vec![ca.cert.clone()];
                (
                    Source::Ca {
                        ca: Box::new(ca),
                        lifetime: *lifetime,
                    },
                    base,
                )
            }
            SourceConfig::Files { dir } => {
                let files = FilesSource::open(dir)?;
                let base = files.read_anchors()?;
                (Source::Files(files), base)
            }
            SourceConfig::IdentitySvc(svc) => {
                if extra.is_empty() {
                    return Err(IdentityError::SvcWithoutAnchors);
                }
                let svc = super::identity_svc::IdentitySvc::new(svc.clone())?;
                (Source::Svc(svc), Vec::new())
            }
        };
        let anchors = Arc::new(Anchors {
            roots: base.into_iter().chain(extra.iter().cloned()).collect(),
        });
        let store = Arc::new(IdentityStore {
            source,
            extra,
            anchors: watch::channel(anchors).0,
            identities: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
        });
        if let Source::Files(files) = &store.source {
            let changes = files.changes();
            tokio::spawn(reload_anchors(
                Arc::downgrade(&store),
                changes,
                store.stop.clone(),
            ));
        }
        Ok(store)
    }

    /// The trust anchors, updated when the files change.
    pub fn anchors(&self) -> watch::Receiver<Arc<Anchors>> {
        self.anchors.subscribe()
    }

    /// The anchors now.
    pub fn current_anchors(&self) -> Arc<Anchors> {
        self.anchors.borrow().clone()
    }

    /// Hold `identity` for one VM: the first lease starts its publisher, later ones share its channel.
    /// `identity` must have passed [`validate_identity`].
    pub fn acquire(self: &Arc<Self>, identity: &str) -> IdentityLease {
        let mut identities = lock(&self.identities);
        if let Some(p) = identities.get_mut(identity) {
            p.leases += 1;
            return IdentityLease {
                store: self.clone(),
                identity: identity.to_string(),
                credential: p.credential.subscribe(),
            };
        }
        let (tx, rx) = watch::channel(None);
        let stop = self.stop.child_token();
        identities.insert(
            identity.to_string(),
            Published {
                credential: tx.clone(),
                expired: None,
                leases: 1,
                stop: stop.clone(),
            },
        );
        drop(identities);
        tokio::spawn(withdraw_expired(
            self.clone(),
            identity.to_string(),
            tx.clone(),
            stop.clone(),
        ));
        tokio::spawn(publish(self.clone(), identity.to_string(), tx, stop));
        IdentityLease {
            store: self.clone(),
            identity: identity.to_string(),
            credential: rx,
        }
    }

    /// Identities in use and how many VMs hold each (tests, diagnostics).
    #[cfg(test)]
    fn leases(&self, identity: &str) -> usize {
        lock(&self.identities)
            .get(identity)
            .map(|p| p.leases)
            .unwrap_or(0)
    }

    fn release(&self, identity: &str) {
        let mut identities = lock(&self.identities);
        let Some(p) = identities.get_mut(identity) else {
            return;
        };
        p.leases -= 1;
        if p.leases == 0 {
            if let Some(p) = identities.remove(identity) {
                p.stop.cancel();
            }
            METRICS.mesh_identity_gone(identity);
        }
    }
}

impl Drop for IdentityStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Withdraw one identity's certificate when it expires before a new one replaces it (the source failing to
/// renew: the identity service down, stale files), so that an expired certificate is never served: the
/// channel goes back to `None`, the listeners stop serving TLS and readiness is false until a new one comes.
async fn withdraw_expired(
    store: Arc<IdentityStore>,
    identity: String,
    tx: watch::Sender<Option<Arc<Credential>>>,
    stop: CancellationToken,
) {
    let mut rx = tx.subscribe();
    loop {
        let current = rx.borrow_and_update().clone();
        if current.is_some() {
            if let Some(p) = lock(&store.identities).get_mut(&identity) {
                p.expired = None;
            }
        }
        let left = current.as_ref().map(|c| {
            c.not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default()
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(left.unwrap_or_default()), if left.is_some() => {
                let Some(old) = current else { continue };
                let withdrawn = tx.send_if_modified(|cur| match cur {
                    Some(c) if Arc::ptr_eq(c, &old) => {
                        *cur = None;
                        true
                    }
                    _ => false,
                });
                if withdrawn {
                    tracing::error!(identity = %identity, serial = %old.serial,
                        not_after = %rfc3339(old.not_after),
                        "mesh certificate expired before a new one came; its listeners stop serving TLS");
                    METRICS.mesh_certificate_expired(&identity);
                    if let Some(p) = lock(&store.identities).get_mut(&identity) {
                        p.expired = Some(old.info());
                    }
                }
            }
        }
    }
}

/// Keep one identity's credential channel filled until `stop`.
async fn publish(
    store: Arc<IdentityStore>,
    identity: String,
    tx: watch::Sender<Option<Arc<Credential>>>,
    stop: CancellationToken,
) {
    match &store.source {
        Source::Ca { ca, lifetime } => loop {
            let delay = match ca.issue(&identity, *lifetime) {
                Ok(c) => {
                    tracing::info!(identity = %identity, serial = %c.serial, not_after = %rfc3339(c.not_after),
                        "mesh certificate issued");
                    METRICS.mesh_certificate(&identity, c.source.name(), c.not_after_unix());
                    // The leaf's expiry is whole seconds (X.509 time), so it may come up to 1 s before
                    // `now + lifetime`: renew at 70% of what is actually left when that is sooner, so a
                    // short-lived certificate is replaced before `withdraw_expired` takes it away.
                    let left = c
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    tx.send_replace(Some(Arc::new(c)));
                    renew_delay(*lifetime).min(left * RENEW_AT_PERCENT / 100)
                }
                Err(e) => {
                    tracing::error!(identity = %identity, error = %e, "cannot issue a mesh certificate");
                    RETRY_AFTER_FAILURE
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
        },
        Source::Svc(svc) => svc.publish(&identity, store.anchors(), &tx, &stop).await,
        Source::Files(files) => {
            let mut changes = files.changes();
            loop {
                let loaded = {
                    let files = files.clone();
                    let anchors = store.current_anchors();
                    let id = identity.clone();
                    tokio::task::spawn_blocking(move || files.read_credential(&id, &anchors)).await
                };
                match loaded {
                    Ok(Ok(c)) => {
                        let changed = tx.borrow().as_ref().is_none_or(|old| !old.same_as(&c));
                        if changed {
                            tracing::info!(identity = %identity, serial = %c.serial,
                                not_after = %rfc3339(c.not_after), "mesh certificate loaded from files");
                            METRICS.mesh_certificate(
                                &identity,
                                c.source.name(),
                                c.not_after_unix(),
                            );
                            tx.send_replace(Some(Arc::new(c)));
                        }
                    }
                    Ok(Err(e)) => {
                        METRICS.mesh_reload_failure(&identity);
                        if tx.borrow().is_some() {
                            tracing::warn!(identity = %identity, error = %e,
                                "mesh identity files are invalid; the previous certificate is kept");
                        } else {
                            tracing::warn!(identity = %identity, error = %e,
                                "mesh identity files are missing or invalid; its listeners wait for them");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "mesh identity reload task failed"),
                }
                if !wait_for_change(&mut changes, &stop).await {
                    return;
                }
            }
        }
    }
}

/// Wait for the next change of the watched directory, then let a burst of events settle. False on `stop`.
async fn wait_for_change(changes: &mut watch::Receiver<u64>, stop: &CancellationToken) -> bool {
    tokio::select! {
        r = changes.changed() => {
            if r.is_err() {
                // The watcher is gone (daemon exit): nothing will change any more.
                stop.cancelled().await;
                return false;
            }
        }
        _ = stop.cancelled() => return false,
    }
    tokio::select! {
        _ = tokio::time::sleep(super::files::SETTLE) => {}
        _ = stop.cancelled() => return false,
    }
    changes.borrow_and_update();
    true
}

/// Files mode: reread the anchors on every change; invalid anchors are logged, counted and ignored.
async fn reload_anchors(
    store: std::sync::Weak<IdentityStore>,
    mut changes: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    while wait_for_change(&mut changes, &stop).await {
        let Some(store) = store.upgrade() else {
            return;
        };
        let Source::Files(files) = &store.source else {
            return;
        };
        let files = files.clone();
        match tokio::task::spawn_blocking(move || files.read_anchors()).await {
            Ok(Ok(base)) => {
                let roots: Vec<_> = base
                    .into_iter()
                    .chain(store.extra.iter().cloned())
                    .collect();
                if store.anchors.borrow().roots != roots {
                    tracing::info!(anchors = roots.len(), "mesh trust anchors reloaded");
                    store.anchors.send_replace(Arc::new(Anchors { roots }));
                }
            }
            Ok(Err(e)) => {
                METRICS.mesh_anchor_reload_failure();
                tracing::warn!(error = %e, "mesh trust anchors are invalid; the previous ones are kept");
            }
            Err(e) => tracing::error!(error = %e, "mesh anchor reload task failed"),
        }
    }
}

/// Every certificate of a PEM bundle file; at least one.
pub fn read_anchor_file(
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    use rustls_pki_types::pem::PemObject;
    let data = read_bounded(path, super::files::MAX_FILE_BYTES)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::AnchorsInvalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::AnchorsEmpty {
            path: path.to_path_buf(),
        });
    }
    for c in &certs {
        if let Err(e) = x509_parser::parse_x509_certificate(c) {
            return Err(IdentityError::AnchorsInvalid {
                path: path.to_path_buf(),
                reason: e.to_string(),
            });
        }
    }
    Ok(certs)
}

/// Read a file of at most `max` bytes.
pub fn read_bounded(path: &std::path::Path, max: u64) -> Result<Vec<u8>, IdentityError> {
    use std::io::Read;
    let io = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut data = Vec::new();
    f.take(max + 1).read_to_end(&mut data).map_err(io)?;
    if data.len() as u64 > max {
        return Err(io(std::io::Error::other(format!(
            "larger than {max} bytes"
        ))));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "web.default.serviceaccount.identity.linkerd.cluster.local";

    #[test]
    fn identity_names() {
        assert!(validate_identity(ID).is_ok());
        for bad in [
            "",
            "web",
            "Web.default",
            "a..b",
            "-a.b",
            "a-.b",
            "a/b.c",
            "a.b/",
            "a b.c",
            ".",
            "..",
        ] {
            assert!(validate_identity(bad).is_err(), "{bad:?}");
        }
        assert!(validate_identity(&format!("{}.b", "a".repeat(64))).is_err());
        assert!(validate_identity("a.".repeat(128).trim_end_matches('.')).is_err());
    }

    #[test]
    fn renewal_at_70_percent_clamped() {
        assert_eq!(
            renew_delay(Duration::from_secs(6)),
            Duration::from_millis(4200)
        );
        assert_eq!(
            renew_delay(Duration::from_secs(24 * 3600)),
            Duration::from_secs(24 * 3600 * 7 / 10)
        );
        assert_eq!(renew_delay(Duration::from_millis(100)), MIN_REFRESH);
        assert_eq!(renew_delay(MAX_CERT_LIFETIME), MAX_REFRESH);
    }

    #[tokio::test]
    async fn leases_share_one_certificate_and_renewal_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = IdentityStore::open(&IdentityConfig {
            source: SourceConfig::Ca {
                state_dir: dir.path().to_path_buf(),
                lifetime: MIN_CERT_LIFETIME,
            },
            extra_anchors: None,
        })
        .unwrap();
        let mut a = store.acquire(ID);
        let b = store.acquire(ID);
        assert_eq!(store.leases(ID), 2);
        a.credential.wait_for(Option::is_some).await.unwrap();
        let first = a.current().unwrap();
        assert_eq!(
            b.current().unwrap().serial,
            first.serial,
            "one certificate per identity"
        );
        store
            .current_anchors()
            .verify(&first)
            .expect("the leaf chains to the anchors");
        assert_eq!(first.info().source, "ca");
        // Renewed at 70% of 2 s.
        tokio::time::timeout(Duration::from_secs(3), a.credential.changed())
            .await
            .unwrap()
            .unwrap();
        assert_ne!(a.current().unwrap().serial, first.serial);
        drop(a);
        assert_eq!(store.leases(ID), 1);
        drop(b);
        assert_eq!(store.leases(ID), 0);
    }

    #[test]
    fn anchors_pem_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let anchors = Anchors {
            roots: vec![ca.cert.clone(), ca.cert.clone()],
        };
        let path = dir.path().join("bundle.pem");
        std::fs::write(&path, anchors.pem()).unwrap();
        assert_eq!(read_anchor_file(&path).unwrap(), anchors.roots);
        std::fs::write(&path, "not pem").unwrap();
        assert!(matches!(
            read_anchor_file(&path),
            Err(IdentityError::AnchorsEmpty { .. })
        ));
    }

    #[test]
    fn credentials_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let good = ca.issue(ID, Duration::from_secs(60)).unwrap();
        // Another identity's certificate.
        let wrong = Credential::new(
            "other.ns",
            good.chain.clone(),
            good.key.clone_key(),
            CredentialSource::Files,
        );
        assert!(matches!(
            wrong,
            Err(IdentityError::CredentialInvalid { .. })
        ));
        // Another certificate's key.
        let other = ca.issue(ID, Duration::from_secs(60)).unwrap();
        let mismatched = Credential::new(
            ID,
            good.chain.clone(),
            other.key.clone_key(),
            CredentialSource::Files,
        );
        assert!(mismatched.is_err());
        // A chain from another CA does not verify against these anchors.
        let dir2 = tempfile::tempdir().unwrap();
        let foreign = Ca::load_or_create(dir2.path())
            .unwrap()
            .issue(ID, Duration::from_secs(60))
            .unwrap();
        let anchors = Anchors {
            roots: vec![ca.cert.clone()],
        };
        assert!(anchors.verify(&good).is_ok());
        assert!(anchors.verify(&foreign).is_err());
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use std::time::Duration;

    /// Poll `f` until it holds or `timeout` passes.
    pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }
}
