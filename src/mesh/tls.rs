//! The mesh's TLS: rustls configurations built from a VM's [`Credential`] and the trust [`Anchors`],
//! compatible with linkerd2-proxy (`../shared/specs/linkerd-wire.md`).
//!
//! - TLS 1.3 only (rustls is built without TLS 1.2), ring's AES-128-GCM, AES-256-GCM and
//!   ChaCha20-Poly1305 suites; the credentials are ECDSA P-256.
//! - Server: presents the VM's chain, asks for a client certificate without requiring one (the listener's
//!   authorization policy decides what an unauthenticated peer may do), verifies an offered one against the
//!   anchors; accepts the ALPN protocol `transport.l5d.io/v1` and nothing else.
//! - Client: presents the VM's chain, verifies the server's chain against the anchors and, instead of
//!   webpki's hostname check, requires a DNS or URI SAN equal to the expected identity (the SNI sent).
//! - The peer's identity is its leaf's first DNS or URI SAN.
//!
//! Events: the credential or the anchors change (renewal, rotation): [`watch_configs`] rebuilds every
//! configuration and publishes it; connections already open keep the configuration they started with.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::identity::{Anchors, Credential};
use super::transport_header;

/// Why a configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the credential has no certificate")]
    NoCertificate,
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("building the certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The crypto provider every mesh configuration uses: ring, restricted to the three TLS 1.3 suites Linkerd
/// offers.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    })
}

fn roots(anchors: &Anchors) -> Arc<RootCertStore> {
    let mut store = RootCertStore::empty();
    // An anchor rustls cannot use is skipped (the identity side validated them when loading).
    let _ = store.add_parsable_certificates(anchors.roots.iter().cloned());
    Arc::new(store)
}

/// The inbound side's configuration.
pub fn server_config(cred: &Credential, anchors: &Anchors) -> Result<ServerConfig, TlsError> {
    if cred.chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let provider = provider();
    let roots = roots(anchors);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = if roots.is_empty() {
        // No anchors yet: nobody can authenticate, everybody is unauthenticated.
        builder.with_no_client_auth()
    } else {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .allow_unauthenticated()
            .build()?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut config = builder.with_single_cert(cred.chain.clone(), cred.key.clone_key())?;
    config.alpn_protocols = vec![transport_header::ALPN.to_vec()];
    Ok(config)
}

/// The outbound side's configuration; `transport_alpn` offers `transport.l5d.io/v1`.
pub fn client_config(
    cred: &Credential,
    anchors: &Anchors,
    transport_alpn: bool,
) -> Result<ClientConfig, TlsError> {
    if cred.chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(roots(anchors), provider.clone())
        .build()
        .map_err(|e| match e {
            rustls::server::VerifierBuilderError::NoRootAnchors => {
                TlsError::Rustls(rustls::Error::General("no trust anchors".into()))
            }
            other => TlsError::Verifier(other),
        })?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(IdentityVerifier { inner }))
        .with_client_auth_cert(cred.chain.clone(), cred.key.clone_key())?;
    if transport_alpn {
        config.alpn_protocols = vec![transport_header::ALPN.to_vec()];
    }
    Ok(config)
}

/// Verifies the server's chain with webpki, and its identity by SAN instead of webpki's hostname rules.
#[derive(Debug)]
struct IdentityVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_) => {}
            // The name is checked below, by SAN equality.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let expected = match server_name {
            ServerName::DnsName(d) => d.as_ref().to_string(),
            other => other.to_str().into_owned(),
        };
        if sans(end_entity).contains(&expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A leaf's DNS and URI SANs, in order; none when it does not parse.
fn sans(leaf: &CertificateDer<'_>) -> Vec<String> {
    x509_parser::parse_x509_certificate(leaf.as_ref())
        .map(|(_, cert)| super::identity::sans(&cert))
        .unwrap_or_default()
}

/// The peer's identity: its leaf's first DNS or URI SAN.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Option<String> {
    chain.first().and_then(|leaf| sans(leaf).into_iter().next())
}

/// A VM's current configurations, rebuilt together.
pub struct TlsConfigs {
    pub server: Arc<ServerConfig>,
    /// Ordinary outbound connections (no ALPN).
    pub client: Arc<ClientConfig>,
    /// Outbound connections carrying a transport header.
    pub client_transport: Arc<ClientConfig>,
}

impl TlsConfigs {
    pub fn build(cred: &Credential, anchors: &Anchors) -> Result<TlsConfigs, TlsError> {
        Ok(TlsConfigs {
            server: Arc::new(server_config(cred, anchors)?),
            client: Arc::new(client_config(cred, anchors, false)?),
            client_transport: Arc::new(client_config(cred, anchors, true)?),
        })
    }
}

/// Keep a VM's configurations current: rebuilt whenever its credential or the anchors change, until `stop`.
/// `None` until the first credential (or while the current one cannot be used).
pub fn watch_configs(
    vm: String,
    mut credential: watch::Receiver<Option<Arc<Credential>>>,
    mut anchors: watch::Receiver<Arc<Anchors>>,
    stop: CancellationToken,
) -> watch::Receiver<Option<Arc<TlsConfigs>>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        loop {
            let cred = credential.borrow_and_update().clone();
            let roots = anchors.borrow_and_update().clone();
            let built = match cred {
                Some(c) => match TlsConfigs::build(&c, &roots) {
                    Ok(b) => Some(Arc::new(b)),
                    Err(e) => {
                        tracing::warn!(vm, error = %e, "mesh: cannot use the credential; not serving TLS");
                        None
                    }
                },
                None => None,
            };
            tx.send_replace(built);
            tokio::select! {
                _ = stop.cancelled() => return,
                r = credential.changed() => if r.is_err() { return },
                r = anchors.changed() => if r.is_err() { return },
            }
        }
    });
    rx
}

#[cfg(test)]
pub mod testing {
    //! A throwaway CA and leaves for the data plane's tests (the identity side owns the real CA).

    use std::sync::Arc;
    use std::time::SystemTime;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    use crate::mesh::identity::{Anchors, Credential, CredentialSource};

    pub struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pub root: CertificateDer<'static>,
    }

    impl TestCa {
        pub fn new() -> TestCa {
            let Ok(key) = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256) else {
                panic!("key")
            };
            let Ok(mut params) = CertificateParams::new(Vec::<String>::new()) else {
                panic!("params")
            };
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let Ok(cert) = params.self_signed(&key) else {
                panic!("self-signed")
            };
            TestCa {
                root: cert.der().clone(),
                issuer: Issuer::new(params, key),
            }
        }

        pub fn anchors(&self) -> Arc<Anchors> {
            Arc::new(Anchors {
                roots: vec![self.root.clone()],
            })
        }

        /// A P-256 leaf whose only SAN is `identity` (a DNS name).
        pub fn leaf(&self, identity: &str) -> Arc<Credential> {
            let Ok(key) = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256) else {
                panic!("key")
            };
            let Ok(mut params) = CertificateParams::new(Vec::<String>::new()) else {
                panic!("params")
            };
            let Ok(name) = identity.try_into() else {
                panic!("{identity} is not a DNS name")
            };
            params.subject_alt_names = vec![SanType::DnsName(name)];
            let Ok(cert) = params.signed_by(&key, &self.issuer) else {
                panic!("sign")
            };
            Arc::new(Credential {
                identity: identity.to_string(),
                chain: vec![cert.der().clone()],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                serial: "01".into(),
                not_before: SystemTime::now(),
                not_after: SystemTime::now() + std::time::Duration::from_secs(3600),
                source: CredentialSource::Ca,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::testing::TestCa;
    use super::*;

    const A: &str = "a.default.serviceaccount.identity.linkerd.cluster.local";
    const B: &str = "b.default.serviceaccount.identity.linkerd.cluster.local";

    /// Handshake a client with `client_cred` expecting `expect` against a server holding `server_cred`;
    /// returns the identity the server saw (or the client's error).
    async fn handshake(
        ca_client: &TestCa,
        ca_server: &TestCa,
        client_cred: &Credential,
        server_cred: &Credential,
        expect: &str,
    ) -> Result<Option<String>, String> {
        let server = match server_config(server_cred, &ca_server.anchors()) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let client = match client_config(client_cred, &ca_client.anchors(), false) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            let mut s = TlsAcceptor::from(Arc::new(server)).accept(b).await.ok()?;
            let peer = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| peer_identity(c));
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.ok()?;
            s.write_all(&buf).await.ok()?;
            s.flush().await.ok()?;
            Some(peer)
        });
        let Ok(name) = ServerName::try_from(expect.to_string()) else {
            panic!("name")
        };
        let mut c = TlsConnector::from(Arc::new(client))
            .connect(name, a)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(proto) = c.get_ref().1.protocol_version() {
            assert_eq!(proto, rustls::ProtocolVersion::TLSv1_3);
        }
        c.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ping");
        srv.await
            .ok()
            .flatten()
            .ok_or_else(|| "server failed".to_string())
    }

    #[tokio::test]
    async fn mutual_tls_with_identities_by_san() {
        let ca = TestCa::new();
        let (a, b) = (ca.leaf(A), ca.leaf(B));
        assert_eq!(
            handshake(&ca, &ca, &a, &b, B).await,
            Ok(Some(A.to_string()))
        );
        assert_eq!(peer_identity(&b.chain), Some(B.to_string()));
    }

    #[tokio::test]
    async fn a_server_with_another_identity_is_refused() {
        let ca = TestCa::new();
        let b = ca.leaf(B);
        // b's certificate presented where a's identity is expected.
        let r = handshake(&ca, &ca, &b, &b, A).await;
        assert!(r.is_err(), "{r:?}");
    }

    #[tokio::test]
    async fn a_server_from_another_ca_is_refused() {
        let (ca, other) = (TestCa::new(), TestCa::new());
        let a = ca.leaf(A);
        let b_other = other.leaf(B);
        let r = handshake(&ca, &other, &a, &b_other, B).await;
        assert!(r.is_err(), "{r:?}");
    }

    #[test]
    fn only_tls13_suites_are_offered() {
        let p = provider();
        assert_eq!(p.cipher_suites.len(), 3);
        assert!(p.cipher_suites.iter().all(|s| s.tls13().is_some()));
    }
}
