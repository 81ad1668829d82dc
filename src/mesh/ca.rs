//! The embedded certificate authority: the default source of workload certificates, so the mesh works with no
//! control plane.
//!
//! Files, under `--state-dir`:
//! - `mesh-ca.key`: the CA's ECDSA P-256 private key (PKCS#8 PEM), mode 0600;
//! - `mesh-ca.pem`: its self-signed certificate, the trust anchor peers are given
//!   (`cc-proxy mesh trust-anchors`).
//!
//! Events: [`Ca::load_or_create`] at startup reuses both files when they exist (checking that they belong
//! together and that the certificate is still valid) or creates them on the first start; [`Ca::issue`] signs
//! a fresh leaf for one identity each time its certificate is due (first use, then at 70% of its lifetime).
//! Every leaf has its own new P-256 key that never leaves memory.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::identity::{Credential, CredentialSource, IdentityError};

/// The CA's key file under `--state-dir`.
pub const CA_KEY_FILE: &str = "mesh-ca.key";
/// The CA's certificate file under `--state-dir`.
pub const CA_CERT_FILE: &str = "mesh-ca.pem";
/// How long the CA certificate created on the first start is valid. Long, because every peer that trusts it
/// would have to be given a new anchor when it changes; delete both files to make a new CA.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves are valid from this long before their issuance, so a peer whose clock is a little behind accepts them.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The CA certificate's common name.
const CA_COMMON_NAME: &str = "cc-proxy mesh CA";
/// Bytes of random serial number (the top bit cleared so it stays positive).
const SERIAL_BYTES: usize = 16;

/// The loaded CA: its certificate and the issuer (name, key identifier, signing key) leaves are signed with.
pub struct Ca {
    /// The CA certificate (DER), the trust anchor.
    pub cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Reuse the CA in `dir`, or create it there when neither file exists. Half a CA (one file without the
    /// other), files that do not belong together or an expired CA are errors: replacing them silently would
    /// leave every peer trusting an anchor that no longer signs anything.
    pub fn load_or_create(dir: &Path) -> Result<Ca, IdentityError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => Ca::load(&key_path, &cert_path),
            (false, false) => Ca::create(&key_path, &cert_path),
            (true, false) | (false, true) => Err(IdentityError::CaIncomplete {
                dir: dir.to_path_buf(),
            }),
        }
    }

    fn load(key_path: &Path, cert_path: &Path) -> Result<Ca, IdentityError> {
        // The files are read up to the identity files' bound: a CA file is a few hundred bytes.
        let read = |path: &Path| {
            let data = super::identity::read_bounded(path, super::files::MAX_FILE_BYTES)?;
            String::from_utf8(data).map_err(|e| IdentityError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })
        };
        let invalid = |path: &Path, reason: String| IdentityError::CaInvalid {
            path: path.to_path_buf(),
            reason,
        };
        let key_pem = read(key_path)?;
        let cert_pem = read(cert_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(key_path, e.to_string()))?;
        if !key.is_compatible(&PKCS_ECDSA_P256_SHA256) {
            return Err(invalid(key_path, "not an ECDSA P-256 key".into()));
        }
        use rustls_pki_types::pem::PemObject;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(cert_path, e.to_string()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| invalid(cert_path, e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(invalid(
                cert_path,
                format!("the certificate does not belong to the key in {CA_KEY_FILE}"),
            ));
        }
        if parsed.validity().not_after.timestamp() <= unix_now() {
            return Err(invalid(
                cert_path,
                format!("the CA certificate has expired; delete {CA_KEY_FILE} and {CA_CERT_FILE} to create a new CA (peers must then trust the new one)"),
            ));
        }
        let issuer =
            Issuer::from_ca_cert_der(&cert, key).map_err(|e| invalid(cert_path, e.to_string()))?;
        Ok(Ca {
            cert: cert.into_owned(),
            issuer,
        })
    }

    fn create(key_path: &Path, cert_path: &Path) -> Result<Ca, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IdentityError::Issue)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CA_COMMON_NAME);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + CA_LIFETIME).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(IdentityError::Issue)?;
        // The key first: a crash between the two writes leaves a key without a certificate, which the next
        // start reports instead of silently making a second CA.
        write_new(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(key = %key_path.display(), cert = %cert_path.display(), "mesh CA created");
        Ok(Ca {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Sign a new leaf for `identity`, valid for `lifetime` from now, with a new P-256 key.
    pub fn issue(&self, identity: &str, lifetime: Duration) -> Result<Credential, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IdentityError::Issue)?;
        let mut params =
            CertificateParams::new(vec![identity.to_string()]).map_err(IdentityError::Issue)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(IdentityError::Issue)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Credential::new(
            identity,
            vec![cert.der().clone()],
            key_der,
            CredentialSource::Ca,
        )
    }
}

/// A random positive serial number.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; SERIAL_BYTES] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a leading zero byte, so the DER encoding keeps all 16 bytes
    SerialNumber::from_slice(&bytes)
}

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Create `path` with `mode` (it must not exist) and write `data`, synced.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: PathBuf::from(path),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused_and_leaves_verify_against_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.cert, again.cert, "the second start reuses the CA");

        let leaf = again
            .issue(
                "web.default.serviceaccount.identity.linkerd.cluster.local",
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(leaf.source, CredentialSource::Ca);
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf.chain[0]).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(&ca.cert).unwrap();
        assert_eq!(cert.issuer(), root.subject());
        cert.verify_signature(Some(root.public_key()))
            .expect("the leaf is signed by the CA that was reloaded");
        let other = again.issue("a.b", Duration::from_secs(60)).unwrap();
        assert_ne!(leaf.serial, other.serial);
    }

    #[test]
    fn half_a_ca_or_a_mismatched_pair_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path()).unwrap();
        let cert = std::fs::read(dir.path().join(CA_CERT_FILE)).unwrap();
        std::fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
        assert!(matches!(
            Ca::load_or_create(dir.path()),
            Err(IdentityError::CaIncomplete { .. })
        ));
        // A certificate from another CA beside this key.
        let other = tempfile::tempdir().unwrap();
        Ca::load_or_create(other.path()).unwrap();
        std::fs::copy(
            other.path().join(CA_CERT_FILE),
            dir.path().join(CA_CERT_FILE),
        )
        .unwrap();
        assert!(matches!(
            Ca::load_or_create(dir.path()),
            Err(IdentityError::CaInvalid { .. })
        ));
        std::fs::write(dir.path().join(CA_CERT_FILE), cert).unwrap();
        assert!(Ca::load_or_create(dir.path()).is_ok());
    }

    #[test]
    fn ca_files_are_read_up_to_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(CA_CERT_FILE);
        let mut big = std::fs::read(&path).unwrap();
        big.resize(super::super::files::MAX_FILE_BYTES as usize + 1, b'\n');
        std::fs::write(&path, big).unwrap();
        match Ca::load_or_create(dir.path()) {
            Err(IdentityError::Io { path: p, source }) => {
                assert_eq!(p, path);
                assert!(source.to_string().contains("larger than"), "{source}");
            }
            other => panic!(
                "an oversized CA certificate was not refused: {:?}",
                other.err()
            ),
        }
        // Not UTF-8: refused as unreadable, not as a parse error deep inside.
        std::fs::write(&path, [0xffu8, 0xfe, 0x00]).unwrap();
        assert!(matches!(
            Ca::load_or_create(dir.path()),
            Err(IdentityError::Io { .. })
        ));
    }
}
