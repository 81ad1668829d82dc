//! Identity files: certificates and keys provisioned by someone else (cert-manager, a Kubernetes Secret,
//! an operator's script), selected with `--mesh-identity-dir DIR`.
//!
//! Layout (the key names of a Kubernetes TLS Secret, so one Secret per identity can be mounted as is):
//! ```text
//! DIR/ca.crt                 the trust anchors (PEM bundle)
//! DIR/<identity>/tls.crt     the identity's chain: leaf first, then intermediates (PEM)
//! DIR/<identity>/tls.key     the leaf's ECDSA P-256 private key (PEM: PKCS#8 or SEC1)
//! ```
//!
//! Events: a `notify` watcher on DIR (recursive, following symlinks) bumps a change counter on every event
//! but reads (opens and closes without writing, which the rereads themselves cause);
//! the identity publishers and the anchor reloader ([`super::identity`]) wait [`SETTLE`] for a burst to end
//! and reread everything. Replacing a file, or swapping a symlinked directory the way Kubernetes updates a
//! mounted Secret (`..data` → a new timestamped directory), both produce events in the watched tree.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use super::identity::{
    read_anchor_file, read_bounded, Anchors, Credential, CredentialSource, IdentityError,
};

/// The anchors file in the identity directory.
pub const ANCHORS_FILE: &str = "ca.crt";
/// Each identity's chain file, in `DIR/<identity>/`.
pub const CHAIN_FILE: &str = "tls.crt";
/// Each identity's key file, in `DIR/<identity>/`.
pub const KEY_FILE: &str = "tls.key";
/// Largest file read from the identity directory (a chain or an anchor bundle is a few KiB).
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// How long after a change event the files are reread, so a burst of events (a Secret update writes several
/// files and swaps a link) is read once, complete.
pub const SETTLE: Duration = Duration::from_millis(100);

/// Whether an event only says the tree was read (opened, read, closed without writing): the rereads cause
/// those themselves.
fn is_read_only(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(AccessKind::Close(AccessMode::Write)) => false,
        notify::EventKind::Access(_) => true,
        _ => false,
    }
}

/// The identity directory and its watcher.
#[derive(Clone)]
pub struct FilesSource {
    dir: PathBuf,
    /// Bumped on every event in the directory.
    changes: watch::Receiver<u64>,
    /// Kept alive as long as the source; dropping it stops the watch (and closes `changes`).
    _watcher: Arc<notify::RecommendedWatcher>,
}

impl FilesSource {
    /// Start watching `dir` (which must exist and hold the anchors file).
    pub fn open(dir: &Path) -> Result<FilesSource, IdentityError> {
        let watch_err = |reason: String| IdentityError::Watch {
            path: dir.to_path_buf(),
            reason,
        };
        if !dir.is_dir() {
            return Err(watch_err("not a directory".into()));
        }
        let (tx, rx) = watch::channel(0u64);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                match &event {
                    // Reading is no change: the rereads' own opens and closes would otherwise start the next
                    // reread, forever (a file closed after writing still counts).
                    Ok(e) if is_read_only(&e.kind) => return,
                    Ok(_) => {}
                    // An error may hide a change too: reread.
                    Err(e) => tracing::warn!(error = %e, "mesh identity directory watch error"),
                }
                tx.send_modify(|n| *n = n.wrapping_add(1));
            })
            .map_err(|e| watch_err(e.to_string()))?;
        watcher
            .watch(dir, RecursiveMode::Recursive)
            .map_err(|e| watch_err(e.to_string()))?;
        Ok(FilesSource {
            dir: dir.to_path_buf(),
            changes: rx,
            _watcher: Arc::new(watcher),
        })
    }

    /// A receiver of the change counter.
    pub fn changes(&self) -> watch::Receiver<u64> {
        let mut rx = self.changes.clone();
        rx.borrow_and_update();
        rx
    }

    /// The anchors file's certificates.
    pub fn read_anchors(&self) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        read_anchor_file(&self.dir.join(ANCHORS_FILE))
    }

    /// Read and check `identity`'s chain and key; the chain must lead to `anchors`.
    pub fn read_credential(
        &self,
        identity: &str,
        anchors: &Anchors,
    ) -> Result<Credential, IdentityError> {
        let dir = self.dir.join(identity);
        let invalid = |reason: String| IdentityError::CredentialInvalid {
            identity: identity.to_string(),
            reason,
        };
        let chain_path = dir.join(CHAIN_FILE);
        let key_path = dir.join(KEY_FILE);
        let chain_pem = read_bounded(&chain_path, MAX_FILE_BYTES)?;
        let key_pem = read_bounded(&key_path, MAX_FILE_BYTES)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(format!("{}: {e}", chain_path.display())))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| invalid(format!("{}: {e}", key_path.display())))?;
        let credential = Credential::new(identity, chain, key, CredentialSource::Files)?;
        anchors.verify(&credential).map_err(|e| {
            invalid(format!(
                "the chain does not verify against the trust anchors: {e}"
            ))
        })?;
        Ok(credential)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::ca::Ca;
    use crate::mesh::identity::{IdentityConfig, IdentityStore, SourceConfig};

    #[test]
    fn reads_are_not_changes_but_writes_creations_and_renames_are() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind, RenameMode,
        };
        use notify::EventKind;
        for read in [
            AccessKind::Open(AccessMode::Any),
            AccessKind::Read,
            AccessKind::Close(AccessMode::Read),
            AccessKind::Any,
        ] {
            assert!(is_read_only(&EventKind::Access(read)), "{read:?}");
        }
        for change in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Remove(RemoveKind::Any),
            EventKind::Any,
        ] {
            assert!(!is_read_only(&change), "{change:?}");
        }
    }

    const ID: &str = "b.default.serviceaccount.identity.linkerd.cluster.local";

    /// Write `credential`'s chain and key as `dir/name/{tls.crt,tls.key}`.
    fn write_identity(dir: &Path, name: &str, credential: &Credential) {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(CHAIN_FILE), credential.chain_pem()).unwrap();
        let key = match &credential.key {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            _ => panic!("the CA writes PKCS#8 keys"),
        };
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(key);
        std::fs::write(
            d.join(KEY_FILE),
            format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"),
        )
        .unwrap();
    }

    #[tokio::test]
    async fn symlink_swaps_reload_and_invalid_files_keep_the_old_credential() {
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(ca_dir.path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(ANCHORS_FILE),
            Anchors {
                roots: vec![ca.cert.clone()],
            }
            .pem(),
        )
        .unwrap();
        // DIR/<identity> is a symlink to a versioned directory, swapped atomically as Kubernetes does.
        let first = ca.issue(ID, Duration::from_secs(3600)).unwrap();
        write_identity(dir.path(), "v1", &first);
        std::os::unix::fs::symlink("v1", dir.path().join(ID)).unwrap();
        let store = IdentityStore::open(&IdentityConfig {
            source: SourceConfig::Files {
                dir: dir.path().to_path_buf(),
            },
            extra_anchors: None,
        })
        .unwrap();
        let mut lease = store.acquire(ID);
        lease.credential.wait_for(Option::is_some).await.unwrap();
        assert_eq!(lease.current().unwrap().serial, first.serial);
        assert_eq!(lease.current().unwrap().source, CredentialSource::Files);

        let second = ca.issue(ID, Duration::from_secs(3600)).unwrap();
        write_identity(dir.path(), "v2", &second);
        std::os::unix::fs::symlink("v2", dir.path().join("next")).unwrap();
        std::fs::rename(dir.path().join("next"), dir.path().join(ID)).unwrap();
        let serial = second.serial.clone();
        tokio::time::timeout(
            Duration::from_secs(5),
            lease
                .credential
                .wait_for(|c| c.as_ref().is_some_and(|c| c.serial == serial)),
        )
        .await
        .expect("the swap is picked up")
        .unwrap();

        // A certificate of another identity: refused, the second one stays.
        let before = crate::admin::metrics::METRICS
            .mesh_identity_reload_failures
            .get_or_create(&crate::admin::metrics::IdentityLabel {
                identity: ID.into(),
            })
            .get();
        let wrong = ca.issue("c.default", Duration::from_secs(3600)).unwrap();
        write_identity(dir.path(), "v2", &wrong);
        let ok = crate::mesh::identity::tests_support::eventually(Duration::from_secs(5), || {
            crate::admin::metrics::METRICS
                .mesh_identity_reload_failures
                .get_or_create(&crate::admin::metrics::IdentityLabel {
                    identity: ID.into(),
                })
                .get()
                > before
        })
        .await;
        assert!(ok, "the invalid reload is counted");
        assert_eq!(lease.current().unwrap().serial, second.serial);
    }

    #[test]
    fn a_chain_from_another_ca_is_refused() {
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(ca_dir.path()).unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let other = Ca::load_or_create(other_dir.path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_identity(
            dir.path(),
            ID,
            &other.issue(ID, Duration::from_secs(60)).unwrap(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let files = FilesSource::open(dir.path()).unwrap();
        let anchors = Anchors {
            roots: vec![ca.cert.clone()],
        };
        assert!(matches!(
            files.read_credential(ID, &anchors),
            Err(IdentityError::CredentialInvalid { .. })
        ));
        assert!(matches!(
            files.read_credential("missing.identity", &anchors),
            Err(IdentityError::Io { .. })
        ));
        // No anchors file.
        assert!(files.read_anchors().is_err());
    }
}
