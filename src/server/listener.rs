//! The client socket: taken from systemd (`LISTEN_FDS`) or created, checked, and permissioned by us.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};

/// The listening socket and whether we own its path.
pub struct Listener {
    pub listener: StdUnixListener,
    pub path: PathBuf,
    /// We bound it, so we remove it at exit. A socket handed over by systemd is never unlinked.
    pub created: bool,
}

/// Why the socket cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another cc-proxy is already serving {0}")]
    InUse(PathBuf),
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("LISTEN_FDS: {0}")]
    Activation(String),
}

/// The socket systemd passed us, if any. Must run before any other fd is opened (before the runtime starts).
pub fn take_activated() -> Result<Option<StdUnixListener>, ListenError> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    fds.take_unix_listener(0)
        .map_err(|e| ListenError::Activation(e.to_string()))
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ListenError + 'a {
    move |source| ListenError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Create the socket at `path`: parent directory 0750, refuse a live daemon's socket, replace a stale one,
/// mode 0660, optional group. With a group, the group can also reach the socket: see [`open_dir_to_group`].
pub fn bind(path: &Path, group: Option<&str>) -> Result<Listener, ListenError> {
    let gid = group
        .map(|name| lookup_group(name).ok_or_else(|| ListenError::UnknownGroup(name.to_string())))
        .transpose()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(parent)
                .map_err(io_err("create", parent))?;
        }
        if let Some(gid) = gid {
            open_dir_to_group(parent, gid)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(ListenError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io_err("remove stale socket", path))?;
            tracing::info!(path = %path.display(), "replaced a stale socket file");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect", path)(e)),
    }
    let listener = StdUnixListener::bind(path).map_err(io_err("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_err("chmod", path))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(io_err("chown", path))?;
    }
    Ok(Listener {
        listener,
        path: path.to_path_buf(),
        created: true,
    })
}

/// Give the socket's group search permission on the socket's directory, which it needs to reach the socket:
/// a directory this daemon owns and keeps from others (no search bit for others, e.g. the 0750 one it
/// creates, or `/run/cc-oci-runtime` left `root:root 0750` by an earlier run) gets the group and `g+x`.
/// A directory that others can search already (e.g. `/tmp`) or that someone else owns is left alone.
fn open_dir_to_group(dir: &Path, gid: u32) -> Result<(), ListenError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).map_err(io_err("inspect", dir))?;
    let ours = meta.uid() == nix::unistd::geteuid().as_raw();
    if !ours || meta.mode() & 0o001 != 0 {
        return Ok(());
    }
    if meta.gid() != gid {
        std::os::unix::fs::chown(dir, None, Some(gid)).map_err(io_err("chown", dir))?;
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o010 == 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o010))
            .map_err(io_err("chmod", dir))?;
    }
    Ok(())
}

/// A group's id from /etc/group (or a numeric id as is).
fn lookup_group(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse() {
        return Some(gid);
    }
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.split(':');
        (parts.next() == Some(name))
            .then(|| parts.nth(1).and_then(|g| g.parse().ok()))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_group_resolves() {
        assert_eq!(lookup_group("root"), Some(0));
        assert_eq!(lookup_group("42"), Some(42));
        assert_eq!(lookup_group("no-such-group-here"), None);
    }
}
