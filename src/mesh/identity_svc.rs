//! Certificates from Linkerd's identity service (`--identity-svc`), as a source of the identity store.
//!
//! Roles:
//! - [`IdentitySvc`] (one per daemon, held by [`super::identity::IdentityStore`]) holds the gRPC channel to the
//!   identity service (plaintext HTTP/2, connected lazily and reconnected by tonic) and the path of the token
//!   file (a Kubernetes service-account token, reread for every request because Kubernetes rotates it).
//! - [`IdentitySvc::publish`] runs once per identity in use (the store's publisher task): it generates the
//!   identity's P-256 key once and keeps it for the task's life, and asks `Identity.Certify` for a certificate.
//!
//! Events, per identity: start → key generated → certify (DER CSR naming the identity as its only DNS SAN;
//! the answer's DER leaf and intermediates are checked by [`Credential::new`] and verified against the trust
//! anchors before anything is published) → publish → sleep until 70% of the remaining lifetime
//! ([`super::identity::renew_delay`]) → certify again. A failed request (service unreachable, refusal, a
//! chain that does not verify, an unreadable token) is logged, counted and retried after a capped
//! exponential backoff ([`RETRY_MIN`] doubling to [`RETRY_MAX`]); meanwhile the previous certificate keeps
//! serving. The channel holds `None` until the first certificate arrives, so the identity's listeners do not
//! serve before.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use linkerd2_proxy_api::identity::identity_client::IdentityClient;
use linkerd2_proxy_api::identity::CertifyRequest;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::identity::{renew_delay, Anchors, Credential, CredentialSource};
use crate::admin::metrics::METRICS;

/// First wait after a failed request; doubled after each further failure up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between two failed requests.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// Time allowed for connecting to the identity service.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one `Certify` call.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default and flag-settable largest token file (`--identity-max-token-bytes`); a service-account token is a
/// few KiB.
pub const DEFAULT_MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// The identity service's settings (from the flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcConfig {
    /// `host:port` of the identity service, spoken to in plaintext HTTP/2.
    pub addr: String,
    /// The token sent with every request (`--identity-token-file`).
    pub token_file: PathBuf,
    /// Largest token file read.
    pub max_token_bytes: u64,
}

/// Why one certification attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum SvcError {
    #[error("invalid identity service address {0:?}: {1}")]
    Address(String, String),
    #[error("token file {}: {reason}", path.display())]
    Token { path: PathBuf, reason: String },
    #[error("cannot build the certificate signing request: {0}")]
    Csr(rcgen::Error),
    #[error("identity service: {0}")]
    Rpc(tonic::Status),
    #[error("identity service: no answer within {0:?}")]
    Timeout(Duration),
    #[error("the certificate from the identity service is unusable: {0}")]
    Invalid(String),
    #[error(
        "the certificate from the identity service does not verify against the trust anchors: {0}"
    )]
    Untrusted(String),
}

/// The connection to the identity service, shared by every identity.
pub struct IdentitySvc {
    config: SvcConfig,
    channel: tonic::transport::Channel,
}

impl IdentitySvc {
    /// Prepare the (lazy) channel; nothing is dialled until the first identity asks.
    pub fn new(config: SvcConfig) -> Result<IdentitySvc, SvcError> {
        let uri = format!("http://{}", config.addr);
        let endpoint = tonic::transport::Endpoint::from_shared(uri)
            .map_err(|e| SvcError::Address(config.addr.clone(), e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        Ok(IdentitySvc {
            channel: endpoint.connect_lazy(),
            config,
        })
    }

    /// Keep `identity`'s credential channel filled from the identity service until `stop`.
    pub async fn publish(
        &self,
        identity: &str,
        anchors: watch::Receiver<Arc<Anchors>>,
        tx: &watch::Sender<Option<Arc<Credential>>>,
        stop: &CancellationToken,
    ) {
        let key = match KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(identity = %identity, error = %e, "cannot generate a mesh key");
                return;
            }
        };
        let mut backoff = Backoff::default();
        loop {
            let delay = match self.certify(identity, &key, &anchors).await {
                Ok(c) => {
                    backoff = Backoff::default();
                    tracing::info!(identity = %identity, serial = %c.serial,
                        not_after = %super::identity::rfc3339(c.not_after),
                        "mesh certificate issued by the identity service");
                    METRICS.mesh_certificate(identity, c.source.name(), c.not_after_unix());
                    let remaining = c
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    tx.send_replace(Some(Arc::new(c)));
                    renew_delay(remaining)
                }
                Err(e) => {
                    METRICS.mesh_identity_svc_failure(identity);
                    let delay = backoff.next();
                    if tx.borrow().is_some() {
                        tracing::warn!(identity = %identity, error = %e, retry_in = ?delay,
                            "mesh certificate renewal failed; the current certificate keeps serving");
                    } else {
                        tracing::warn!(identity = %identity, error = %e, retry_in = ?delay,
                            "no mesh certificate yet; its listeners wait for one");
                    }
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// One `Certify` round trip, the answer checked.
    async fn certify(
        &self,
        identity: &str,
        key: &KeyPair,
        anchors: &watch::Receiver<Arc<Anchors>>,
    ) -> Result<Credential, SvcError> {
        let token = read_token(&self.config.token_file, self.config.max_token_bytes).await?;
        let csr = csr_der(identity, key)?;
        let mut client = IdentityClient::new(self.channel.clone());
        let request = CertifyRequest {
            identity: identity.to_string(),
            token,
            certificate_signing_request: csr,
        };
        let response = tokio::time::timeout(REQUEST_TIMEOUT, client.certify(request))
            .await
            .map_err(|_| SvcError::Timeout(REQUEST_TIMEOUT))?
            .map_err(SvcError::Rpc)?
            .into_inner();
        let chain: Vec<CertificateDer<'static>> = std::iter::once(response.leaf_certificate)
            .chain(response.intermediate_certificates)
            .map(CertificateDer::from)
            .collect();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let credential =
            Credential::new(identity, chain, key_der, CredentialSource::IdentityService)
                .map_err(|e| SvcError::Invalid(e.to_string()))?;
        let anchors = anchors.borrow().clone();
        anchors.verify(&credential).map_err(SvcError::Untrusted)?;
        Ok(credential)
    }
}

/// The DER certificate signing request for `identity` (its only DNS SAN, no subject), signed by `key`.
pub fn csr_der(identity: &str, key: &KeyPair) -> Result<Vec<u8>, SvcError> {
    let mut params = CertificateParams::new(vec![identity.to_string()]).map_err(SvcError::Csr)?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(key).map_err(SvcError::Csr)?;
    Ok(csr.der().to_vec())
}

/// The token file's contents (at most `max` bytes, surrounding white space removed).
async fn read_token(path: &Path, max: u64) -> Result<Vec<u8>, SvcError> {
    let p = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || super::identity::read_bounded(&p, max)).await;
    let data = match read {
        Ok(Ok(data)) => data,
        Ok(Err(e)) => {
            return Err(SvcError::Token {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
        Err(e) => {
            return Err(SvcError::Token {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    };
    Ok(data.trim_ascii().to_vec())
}

/// Capped exponential backoff: [`RETRY_MIN`], doubling, at most [`RETRY_MAX`].
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: RETRY_MIN }
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(RETRY_MAX);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "web.default.serviceaccount.identity.linkerd.cluster.local";

    #[test]
    fn backoff_doubles_to_its_cap() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..9).map(|_| b.next()).collect();
        assert_eq!(waits[0], RETRY_MIN);
        assert_eq!(waits[1], RETRY_MIN * 2);
        assert_eq!(waits[2], RETRY_MIN * 4);
        assert_eq!(*waits.last().unwrap(), RETRY_MAX);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn csr_is_der_p256_naming_the_identity() {
        use x509_parser::prelude::FromDer;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = csr_der(ID, &key).unwrap();
        let (rest, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        assert!(rest.is_empty());
        csr.verify_signature().unwrap();
        let info = &csr.certification_request_info;
        assert_eq!(
            info.subject_pki.algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        let mut sans = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
                for n in &san.general_names {
                    sans.push(format!("{n}"));
                }
            }
        }
        assert_eq!(sans, vec![format!("DNSName({ID})")]);
    }

    #[tokio::test]
    async fn token_is_bounded_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc.def\n").unwrap();
        assert_eq!(read_token(&path, 64).await.unwrap(), b"abc.def");
        std::fs::write(&path, "x".repeat(65)).unwrap();
        assert!(matches!(
            read_token(&path, 64).await,
            Err(SvcError::Token { .. })
        ));
        assert!(read_token(&dir.path().join("absent"), 64).await.is_err());
    }
}
