//! The mesh's TLS: rustls configurations built from a VM's [`Credential`] and the trust [`Anchors`],
//! compatible with linkerd2-proxy (`../shared/specs/linkerd-wire.md`).
//!
//! - TLS 1.3 only (rustls is built without TLS 1.2), ring's AES-128-GCM, AES-256-GCM and
//!   ChaCha20-Poly1305 suites; the credentials are ECDSA P-256.
//! - Server: presents the VM's chain, asks for a client certificate without requiring one (the listener's
//!   authorization policy decides what an unauthenticated peer may do), verifies an offered one against the
//!   anchors; accepts the ALPN protocol `transport.l5d.io/v1` and nothing else.
//! - Client: presents the VM's chain, verifies the server's chain against the anchors with rustls' webpki
//!   machinery (no hostname rules) and then requires a DNS or URI SAN equal to the expected identity
//!   ([`IdentityVerifier`]). The SNI sent is the identity, or the endpoint's `server_name` when the
//!   destination service gives one that differs ([`TlsConfigs::client_for`]): the SNI only routes the
//!   connection, the certificate is still checked against the identity.
//! - The peer's identity is its leaf's first DNS or URI SAN.
//!
//! Events: the credential or the anchors change (renewal, rotation): [`watch_configs`] rebuilds every
//! configuration and publishes it; connections already open keep the configuration they started with.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
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
    #[error("there are no trust anchors")]
    NoAnchors,
    #[error("{0:?} is not a DNS name")]
    InvalidName(String),
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

/// The outbound side's configuration, checking the server's SAN against the SNI sent; `transport_alpn`
/// offers `transport.l5d.io/v1`.
pub fn client_config(
    cred: &Credential,
    anchors: &Anchors,
    transport_alpn: bool,
) -> Result<ClientConfig, TlsError> {
    if cred.chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let provider = provider();
    let roots = roots(anchors);
    if roots.is_empty() {
        return Err(TlsError::NoAnchors);
    }
    let verifier = IdentityVerifier {
        roots,
        algorithms: provider.signature_verification_algorithms,
        expected: Expected::TheSni,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cred.chain.clone(), cred.key.clone_key())?;
    if transport_alpn {
        config.alpn_protocols = vec![transport_header::ALPN.to_vec()];
    }
    Ok(config)
}

/// The identity a server's leaf must carry as a SAN.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    /// The name sent as SNI (the usual case: SNI = identity).
    TheSni,
    /// This identity, whatever the SNI (the endpoint's `server_name` differs from its identity).
    Identity(String),
}

/// Verifies the server's chain against the anchors with rustls' webpki machinery (validity period, key
/// usage, signatures up to an anchor; no hostname rules), then the identity by SAN equality.
#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: Expected,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let expected = match &self.expected {
            Expected::Identity(id) => id.clone(),
            Expected::TheSni => match server_name {
                ServerName::DnsName(d) => d.as_ref().to_string(),
                other => other.to_str().into_owned(),
            },
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
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
    /// The anchors of the client configurations, for the verifiers of [`TlsConfigs::client_for`].
    roots: Arc<RootCertStore>,
}

impl TlsConfigs {
    pub fn build(cred: &Credential, anchors: &Anchors) -> Result<TlsConfigs, TlsError> {
        Ok(TlsConfigs {
            server: Arc::new(server_config(cred, anchors)?),
            client: Arc::new(client_config(cred, anchors, false)?),
            client_transport: Arc::new(client_config(cred, anchors, true)?),
            roots: roots(anchors),
        })
    }

    /// The configuration and SNI of a connection to a server that must prove `identity`; `transport`: it
    /// carries a transport header (ALPN `transport.l5d.io/v1`).
    ///
    /// Without a `server_name`, or with one equal to the identity, the SNI is the identity and the shared
    /// configuration is used. With another DNS name, that name is the SNI and the connection gets a copy of
    /// the configuration whose verifier requires the identity instead of the SNI, with session resumption
    /// off: rustls keys resumable sessions by SNI, and a session resumed under a shared `server_name` would
    /// skip the certificate check for this endpoint's identity.
    pub fn client_for(
        &self,
        transport: bool,
        identity: &str,
        server_name: Option<&str>,
    ) -> Result<(Arc<ClientConfig>, ServerName<'static>), TlsError> {
        let base = if transport {
            &self.client_transport
        } else {
            &self.client
        };
        let dns_name = |n: &str| match ServerName::try_from(n.to_string()) {
            Ok(name @ ServerName::DnsName(_)) => Ok(name),
            _ => Err(TlsError::InvalidName(n.to_string())),
        };
        match server_name {
            Some(sni) if sni != identity => {
                let name = dns_name(sni)?;
                let mut config = ClientConfig::clone(base);
                let verifier = IdentityVerifier {
                    roots: self.roots.clone(),
                    algorithms: config.crypto_provider().signature_verification_algorithms,
                    expected: Expected::Identity(identity.to_string()),
                };
                config
                    .dangerous()
                    .set_certificate_verifier(Arc::new(verifier));
                config.resumption = Resumption::disabled();
                Ok((Arc::new(config), name))
            }
            _ => Ok((base.clone(), dns_name(identity)?)),
        }
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

    /// A distinguished name no other test CA has (rcgen gives every certificate the same one by default, and
    /// chains are built by matching names).
    fn unique_name(what: &str) -> rcgen::DistinguishedName {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, format!("{what} {n}"));
        dn
    }

    pub struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pub root: CertificateDer<'static>,
        /// The CA certificates between a leaf and the root (empty for the root itself).
        intermediates: Vec<CertificateDer<'static>>,
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
            params.distinguished_name = unique_name("test root");
            let Ok(cert) = params.self_signed(&key) else {
                panic!("self-signed")
            };
            TestCa {
                root: cert.der().clone(),
                issuer: Issuer::new(params, key),
                intermediates: Vec::new(),
            }
        }

        /// An intermediate CA signed by this one: its leaves' chains carry it, and they verify against
        /// this CA's root (as Linkerd's issuer certificate under its trust anchor).
        pub fn intermediate(&self) -> TestCa {
            let Ok(key) = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256) else {
                panic!("key")
            };
            let Ok(mut params) = CertificateParams::new(Vec::<String>::new()) else {
                panic!("params")
            };
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name = unique_name("test intermediate");
            let Ok(cert) = params.signed_by(&key, &self.issuer) else {
                panic!("sign the intermediate")
            };
            let mut intermediates = vec![cert.der().clone()];
            intermediates.extend(self.intermediates.iter().cloned());
            TestCa {
                root: self.root.clone(),
                issuer: Issuer::new(params, key),
                intermediates,
            }
        }

        pub fn anchors(&self) -> Arc<Anchors> {
            Arc::new(Anchors {
                roots: vec![self.root.clone()],
            })
        }

        /// A P-256 leaf whose only SAN is `identity` (a DNS name).
        pub fn leaf(&self, identity: &str) -> Arc<Credential> {
            self.leaf_valid(identity, None)
        }

        /// Like [`TestCa::leaf`], but it expired a day ago.
        pub fn expired_leaf(&self, identity: &str) -> Arc<Credential> {
            let day = std::time::Duration::from_secs(86_400);
            let now = SystemTime::now();
            self.leaf_valid(identity, Some((now - 2 * day, now - day)))
        }

        fn leaf_valid(
            &self,
            identity: &str,
            validity: Option<(SystemTime, SystemTime)>,
        ) -> Arc<Credential> {
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
            if let Some((from, to)) = validity {
                params.not_before = from.into();
                params.not_after = to.into();
            }
            let Ok(cert) = params.signed_by(&key, &self.issuer) else {
                panic!("sign")
            };
            let mut chain = vec![cert.der().clone()];
            chain.extend(self.intermediates.iter().cloned());
            Arc::new(Credential {
                identity: identity.to_string(),
                chain,
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
        let client = match client_config(client_cred, &ca_client.anchors(), false) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let Ok(name) = ServerName::try_from(expect.to_string()) else {
            panic!("name")
        };
        let server = server_for(ca_server, server_cred);
        let (peer, _, _) = exchange(Arc::new(client), name, server).await?;
        Ok(peer)
    }

    /// The server configuration of `cred`, trusting `ca`.
    fn server_for(ca: &TestCa, cred: &Credential) -> Arc<ServerConfig> {
        match server_config(cred, &ca.anchors()) {
            Ok(s) => Arc::new(s),
            Err(e) => panic!("{e}"),
        }
    }

    /// What the server saw of a handshake (client identity, SNI) and whether the client resumed a session.
    type Seen = (Option<String>, Option<String>, bool);

    /// Handshake `client` (sending `name` as SNI) with `server`, and exchange a few bytes; returns what the
    /// server saw, or the client's error.
    async fn exchange(
        client: Arc<ClientConfig>,
        name: ServerName<'static>,
        server: Arc<ServerConfig>,
    ) -> Result<Seen, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            let mut s = TlsAcceptor::from(server).accept(b).await.ok()?;
            let conn = s.get_ref().1;
            let peer = conn.peer_certificates().and_then(|c| peer_identity(c));
            let sni = conn.server_name().map(str::to_string);
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.ok()?;
            s.write_all(&buf).await.ok()?;
            s.flush().await.ok()?;
            Some((peer, sni))
        });
        let mut c = TlsConnector::from(client)
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
        let resumed = c.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        srv.await
            .ok()
            .flatten()
            .map(|(peer, sni)| (peer, sni, resumed))
            .ok_or_else(|| "server failed".to_string())
    }

    /// The configurations of a VM holding `cred`, trusting `ca`.
    fn configs(ca: &TestCa, cred: &Credential) -> TlsConfigs {
        match TlsConfigs::build(cred, &ca.anchors()) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    const OTHER: &str = "web.other.example";

    #[tokio::test]
    async fn a_server_name_is_sent_as_sni_and_the_identity_is_still_required() {
        let ca = TestCa::new();
        let (a, b) = (ca.leaf(A), ca.leaf(B));
        let cfgs = configs(&ca, &a);
        let server = server_for(&ca, &b);
        for transport in [false, true] {
            let Ok((client, name)) = cfgs.client_for(transport, B, Some(OTHER)) else {
                panic!("config")
            };
            assert_eq!(name.to_str(), OTHER);
            // Twice with the same configuration: never resumed, so always verified.
            for _ in 0..2 {
                assert_eq!(
                    exchange(client.clone(), name.clone(), server.clone()).await,
                    Ok((Some(A.to_string()), Some(OTHER.to_string()), false))
                );
            }
        }
    }

    #[tokio::test]
    async fn a_certificate_for_the_server_name_but_not_the_identity_is_refused() {
        let ca = TestCa::new();
        let (a, imposter) = (ca.leaf(A), ca.leaf(OTHER));
        let cfgs = configs(&ca, &a);
        let Ok((client, name)) = cfgs.client_for(false, B, Some(OTHER)) else {
            panic!("config")
        };
        let r = exchange(client, name, server_for(&ca, &imposter)).await;
        let Err(e) = r else { panic!("{r:?}") };
        assert!(e.contains("NotValidForName"), "{e}");
    }

    #[tokio::test]
    async fn without_a_distinct_server_name_the_identity_is_the_sni_and_the_config_is_shared() {
        let ca = TestCa::new();
        let (a, b) = (ca.leaf(A), ca.leaf(B));
        let cfgs = configs(&ca, &a);
        let server = server_for(&ca, &b);
        // The shared configuration resumes its sessions (keyed by the identity it verified).
        for (server_name, resumed) in [(None, false), (Some(B), true)] {
            let Ok((client, name)) = cfgs.client_for(false, B, server_name) else {
                panic!("config")
            };
            assert!(Arc::ptr_eq(&client, &cfgs.client));
            assert_eq!(name.to_str(), B);
            assert_eq!(
                exchange(client, name, server.clone()).await,
                Ok((Some(A.to_string()), Some(B.to_string()), resumed))
            );
        }
        let Ok((client, _)) = cfgs.client_for(true, B, None) else {
            panic!("config")
        };
        assert!(Arc::ptr_eq(&client, &cfgs.client_transport));
    }

    #[test]
    fn a_server_name_or_identity_that_is_not_a_dns_name_is_refused() {
        let ca = TestCa::new();
        let cfgs = configs(&ca, &ca.leaf(A));
        for (identity, sni) in [
            (B, Some("10.0.0.1")),
            (B, Some("")),
            (B, Some("not a name")),
            ("10.0.0.1", None),
        ] {
            assert!(
                matches!(
                    cfgs.client_for(false, identity, sni),
                    Err(TlsError::InvalidName(_))
                ),
                "{identity} {sni:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_server_name_does_not_let_another_ca_or_an_expired_certificate_through() {
        let (ca, other) = (TestCa::new(), TestCa::new());
        let a = ca.leaf(A);
        let cfgs = configs(&ca, &a);
        let Ok((client, name)) = cfgs.client_for(false, B, Some(OTHER)) else {
            panic!("config")
        };
        // The server trusts a's CA (so the refusal can only be the client's) but presents a leaf of another.
        let r = exchange(
            client.clone(),
            name.clone(),
            server_for(&ca, &other.leaf(B)),
        )
        .await;
        let Err(e) = r else {
            panic!("another CA: {r:?}")
        };
        assert!(e.contains("UnknownIssuer"), "{e}");
        let r = exchange(client, name, server_for(&ca, &ca.expired_leaf(B))).await;
        let Err(e) = r else { panic!("expired: {r:?}") };
        assert!(e.contains("certificate expired"), "{e}");
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
        // The server trusts a's CA, so the refusal can only be the client's check of b's chain.
        let r = handshake(&ca, &ca, &a, &b_other, B).await;
        let Err(e) = r else { panic!("{r:?}") };
        assert!(e.contains("UnknownIssuer"), "{e}");
    }

    #[tokio::test]
    async fn a_chain_through_an_intermediate_verifies_and_fails_without_it() {
        let ca = TestCa::new();
        let issuer = ca.intermediate();
        let (a, b) = (issuer.leaf(A), issuer.leaf(B));
        assert_eq!(b.chain.len(), 2, "leaf and intermediate");
        // Both sides trust only the root: each verifies the other's chain through the intermediate.
        assert_eq!(
            handshake(&ca, &ca, &a, &b, B).await,
            Ok(Some(A.to_string()))
        );
        // Also with a distinct server name (the identity verifier with a fixed identity).
        let cfgs = configs(&ca, &a);
        let Ok((client, name)) = cfgs.client_for(false, B, Some(OTHER)) else {
            panic!("config")
        };
        assert_eq!(
            exchange(client, name, server_for(&ca, &b)).await,
            Ok((Some(A.to_string()), Some(OTHER.to_string()), false))
        );
        // The server leaves its intermediate out: the client cannot reach the root.
        let full = issuer.leaf(B);
        let bare = Credential {
            identity: full.identity.clone(),
            chain: full.chain[..1].to_vec(),
            key: full.key.clone_key(),
            serial: full.serial.clone(),
            not_before: full.not_before,
            not_after: full.not_after,
            source: full.source,
        };
        let r = handshake(&ca, &ca, &a, &bare, B).await;
        let Err(e) = r else { panic!("{r:?}") };
        assert!(e.contains("UnknownIssuer"), "{e}");
    }

    #[test]
    fn only_tls13_suites_are_offered() {
        let p = provider();
        assert_eq!(p.cipher_suites.len(), 3);
        assert!(p.cipher_suites.iter().all(|s| s.tls13().is_some()));
    }
}
