//! Recoverable registry state under `--state-dir`: one JSON file per VM (`vms/<id>.json`), written atomically
//! (temporary file + rename), so a restarted daemon reconnects to its VMs and shims can re-attach their tokens.

use std::io::Write;
use std::path::{Path, PathBuf};

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

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    vms: PathBuf,
}

impl StateDir {
    /// Open (creating with mode 0700) `<dir>/vms`.
    pub fn open(dir: &Path) -> std::io::Result<StateDir> {
        let vms = dir.join("vms");
        std::fs::create_dir_all(&vms)?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        Ok(StateDir { vms })
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
                started: true,
                pending: vec![PendingFrame {
                    channel: 1,
                    data: "aGk=".into(),
                }],
                stdout_eof: false,
                pending_exit: Some(3),
            }],
        };
        st.save(&rec).unwrap();
        std::fs::write(dir.join("vms/broken.json"), b"{").unwrap();
        assert_eq!(st.load_all(), vec![rec]);
        st.remove("vm-1");
        assert!(st.load_all().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
