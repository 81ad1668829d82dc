//! Workload identities: each meshed identity's certificate and the trust anchors.
//!
//! Sources: the embedded CA (the default, created under `--state-dir` on first start) or files reloaded on
//! change. Credentials are shared by every VM with the same identity and renewed at 70% of their lifetime.

use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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
}

impl CredentialSource {
    pub fn name(self) -> &'static str {
        match self {
            CredentialSource::Ca => "ca",
            CredentialSource::Files => "files",
        }
    }
}

/// The trust anchors (DER roots) that peers' chains are verified against: the embedded CA's (or the
/// configured files') plus any extra anchors, such as Linkerd's.
#[derive(Debug, Default)]
pub struct Anchors {
    pub roots: Vec<CertificateDer<'static>>,
}
