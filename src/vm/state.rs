//! Recoverable registry state under `--state-dir`: one JSON file per VM (`vms/<id>.json`), written atomically
//! (temporary file + rename), so a restarted daemon reconnects to its VMs and shims can re-attach their tokens.
//!
//! One daemon owns a state directory at a time: [`StateDir::open`] takes an exclusive `flock` on
//! `<dir>/lock` and keeps it for the daemon's life (the kernel drops it when the process exits, however it
//! exits). A second daemon pointed at the same directory would reload the first one's VMs and take over their
//! agent connections, so it is refused with [`StateError::Locked`] instead.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};

use serde::{Deserialize, Serialize};

/// What is kept of one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub control: String,
    pub io: String,
    #[serde(default)]
    pub console: Option<String>,
    /// The next free I/O sequence number, so a recovered VM never reuses a live process's numbers.
    pub next_seq: u64,
    #[serde(default)]
    pub streams: Vec<StreamRecord>,
    /// The dialect the agent last spoke (`cc-agent`, `hyperstart`), shown while it is recovered or lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dialect: Option<String>,
    /// The agent's last GETVERSION answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<u32>,
    /// The uid that registered the VM; records written before owners were kept have none and belong to root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
    /// The endpoints were opened with the owner's rights (a non-privileged registration); a recovery after a
    /// restart opens them the same way.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub owner_rights: bool,
    /// The VM's mesh configuration, as registered: its listeners are bound again after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<cc_proxy_api::mesh::MeshConfig>,
}

/// What is kept of one live token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamRecord {
    pub token: String,
    pub stdio: u64,
    #[serde(default)]
    pub container: Option<String>,
    #[serde(default)]
    pub process: Option<String>,
    #[serde(default)]
    pub terminal: bool,
    /// Which command started the process (records without it are taken for a container's init).
    #[serde(default)]
    pub role: crate::stream::ProcessRole,
    #[serde(default)]
    pub started: bool,
    /// Output (and a final exit or error) queued for the shim when the daemon stopped; written only at a
    /// graceful shutdown, so a restart delivers it instead of dropping it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingFrame>,
    /// The stdout EOF packet had arrived.
    #[serde(default)]
    pub stdout_eof: bool,
    /// An exit status that had arrived before the stdout EOF (hyperstart reports it only once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_exit: Option<i32>,
}

/// One queued stream frame, as saved at shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingFrame {
    /// The stream channel byte (`cc_proxy_api::stream::Channel`).
    pub channel: u8,
    /// The payload, base64.
    pub data: String,
}

/// The lock file inside the state directory; it holds the owning daemon's pid, for the refusal message.
pub const LOCK_FILE: &str = "lock";

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use the state directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another cc-proxy{} is using the state directory {dir}; give this daemon its own --state-dir",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { dir: PathBuf, holder: Option<u32> },
}

/// The state directory, locked for this daemon's life.
#[derive(Debug, Clone)]
pub struct StateDir {
    vms: PathBuf,
    /// The exclusive lock on `<dir>/lock`; released when the last clone is dropped or the process exits.
    _lock: Arc<Flock<File>>,
}

impl StateDir {
    /// Open (creating with mode 0700) `<dir>/vms` and take the directory's lock.
    pub fn open(dir: &Path) -> Result<StateDir, StateError> {
        let io = |source| StateError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        let vms = dir.join("vms");
        std::fs::create_dir_all(&vms).map_err(io)?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(StateError::Locked {
                    dir: dir.to_path_buf(),
                    holder: text.trim().parse().ok(),
                });
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        // A directory the daemon cannot write to is found now, not at the first registration.
        let probe = vms.join(".probe");
        std::fs::write(&probe, b"").map_err(io)?;
        std::fs::remove_file(&probe).map_err(io)?;
        // Best effort: the pid only makes the refusal message more useful.
        let _ = lock.set_len(0);
        let _ = lock.rewind();
        let _ = writeln!(lock, "{}", std::process::id());
        Ok(StateDir {
            vms,
            _lock: Arc::new(lock),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        // Ids are validated to [A-Za-z0-9._-] and never "." or "..", so they are safe file names.
        self.vms.join(format!("{id}.json"))
    }

    /// Write a record atomically.
    pub fn save(&self, record: &VmRecord) -> std::io::Result<()> {
        let path = self.path(&record.id);
        let data = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        // A VM's first record is written in place: with no earlier record, a torn write (crash) loses nothing
        // that a temporary file would have kept, and creating one file instead of two plus a rename is what
        // bounds the registration rate. Later records replace the old one atomically.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => return f.write_all(&data),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let tmp = self.vms.join(format!(".{}.tmp", record.id));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&data)?;
        drop(f);
        std::fs::rename(&tmp, &path)
    }

    pub fn remove(&self, id: &str) {
        let _ = std::fs::remove_file(self.path(id));
    }

    /// Every readable record; unreadable files are reported and skipped.
    pub fn load_all(&self) -> Vec<VmRecord> {
        let Ok(entries) = std::fs::read_dir(&self.vms) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|d| serde_json::from_slice::<VmRecord>(&d).map_err(|e| e.to_string()))
            {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable VM state file")
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_remove() {
        let dir = std::env::temp_dir().join(format!("ccp-state-{}", std::process::id()));
        let st = StateDir::open(&dir).unwrap();
        let rec = VmRecord {
            id: "vm-1".into(),
            control: "unix:///a".into(),
            io: "unix:///b".into(),
            console: None,
            next_seq: 7,
            streams: vec![StreamRecord {
                token: "t".into(),
                stdio: 3,
                container: Some("c".into()),
                process: Some("p".into()),
                terminal: false,
                role: crate::stream::ProcessRole::Init,
                started: true,
                pending: vec![PendingFrame {
                    channel: 1,
                    data: "aGk=".into(),
                }],
                stdout_eof: false,
                pending_exit: Some(3),
            }],
            dialect: Some("cc-agent".into()),
            api_version: Some(4242),
            owner: Some(1000),
            owner_rights: true,
            mesh: Some(
                serde_json::from_value(serde_json::json!({
                    "identity": "web.default",
                    "inbound": [{"listen": "127.0.0.1:4143", "target": "vsock://5:8080"}]
                }))
                .unwrap(),
            ),
        };
        st.save(&rec).unwrap();
        std::fs::write(dir.join("vms/broken.json"), b"{").unwrap();
        assert_eq!(st.load_all(), vec![rec]);
        st.remove("vm-1");
        assert!(st.load_all().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn second_open_is_refused_until_the_first_is_dropped() {
        let dir = std::env::temp_dir().join(format!("ccp-lock-{}", std::process::id()));
        let first = StateDir::open(&dir).unwrap();
        match StateDir::open(&dir) {
            Err(StateError::Locked { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("second open: {other:?}"),
        }
        drop(first);
        assert!(StateDir::open(&dir).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }
}
