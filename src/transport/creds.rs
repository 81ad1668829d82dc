//! Connecting a unix socket with a client's rights instead of the daemon's.
//!
//! Roles: the daemon usually runs as root; a non-privileged client that registers a VM names the sockets the
//! daemon is to connect to. Were the daemon to connect with its own rights, any local user could reach
//! root-only sockets through it, and learn from the errors which files exist in directories they cannot
//! read. So the connect of a unix (and hybrid-vsock) path is made with the client's rights:
//!
//! - a short-lived thread of its own switches its *filesystem* uid and gid (`setfsuid`/`setfsgid`) and its
//!   supplementary groups to the client's. On Linux these credentials belong to the thread, not the process:
//!   the daemon's other threads keep root, and the thread ends after the one `connect`;
//! - the kernel then checks the path exactly as it would for the client: search permission on every
//!   directory, write permission on the socket, ACLs and all. A path under a directory the client cannot
//!   search fails with "permission denied" whether or not it exists, as it would for the client itself;
//! - the connected socket is handed back to the async runtime; what flows over it afterwards needs no rights.
//!
//! The connect is blocking in that thread, bounded by a send timeout on the socket (a unix connect waits at
//! most that long for room in the listener's backlog).

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::unistd::{Gid, Uid};

/// Whose rights a connect is made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Why a connect with a client's rights failed before it reached the socket.
#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    /// This thread could not take the client's rights (the daemon is not root).
    #[error("cannot take uid {uid}'s rights to connect (the daemon lacks CAP_SETUID/CAP_SETGID)")]
    CannotSwitch { uid: u32 },
    #[error("the connecting thread ended without an answer")]
    ThreadGone,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Most supplementary groups taken over from a client (the kernel's own limit is 65536).
pub const MAX_GROUPS: usize = 65_536;

/// The group of a uid the user database does not know (`nogroup`).
const OVERFLOW_GID: u32 = 65_534;

impl Credentials {
    /// The rights of user `uid` as the user database has them (primary gid and groups), for reopening the
    /// endpoints of a VM it registered. A uid without an entry keeps only its uid, with the overflow group.
    ///
    /// Blocking: the lookups go through NSS (files, but also LDAP or sssd); call it with
    /// `tokio::task::spawn_blocking`, never on a runtime worker.
    pub fn of_user(uid: u32) -> Credentials {
        let user = nix::unistd::User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten();
        let Some(user) = user else {
            return Credentials {
                uid,
                gid: OVERFLOW_GID,
                groups: Vec::new(),
            };
        };
        let groups = std::ffi::CString::new(user.name.clone())
            .ok()
            .and_then(|name| nix::unistd::getgrouplist(&name, user.gid).ok())
            .map(|gs| gs.iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        Credentials {
            uid,
            gid: user.gid.as_raw(),
            groups,
        }
    }

    /// Connect to the unix socket at `path` with these credentials (in a thread of its own), waiting at most
    /// `timeout` for the listener to take the connection.
    pub async fn connect_unix(
        &self,
        path: &Path,
        timeout: Duration,
    ) -> Result<tokio::net::UnixStream, CredsError> {
        let path = path.to_path_buf();
        let stream = self
            .run_as(move |creds| creds.connect_blocking(&path, timeout))
            .await?;
        stream.set_nonblocking(true)?;
        Ok(tokio::net::UnixStream::from_std(stream)?)
    }

    /// Whether these credentials can see `path` at all (search permission on every directory on the way):
    /// `Ok` when it exists and is reachable, the `stat` error otherwise (`PermissionDenied` whether or not
    /// the file exists, when a directory is closed to them).
    pub async fn look_up(&self, path: &Path) -> Result<(), CredsError> {
        let path = path.to_path_buf();
        self.run_as(move |creds| {
            creds.take_for_this_thread()?;
            std::fs::metadata(&path)?;
            Ok(())
        })
        .await
    }

    /// Run `f` in a thread of its own that ends right after (so the identity `f` takes dies with it).
    async fn run_as<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Credentials) -> Result<T, CredsError> + Send + 'static,
    ) -> Result<T, CredsError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let creds = self.clone();
        std::thread::Builder::new()
            .name("cc-proxy-connect-as".into())
            .spawn(move || {
                let _ = tx.send(f(&creds));
            })?;
        rx.await.map_err(|_| CredsError::ThreadGone)?
    }

    /// Runs in a thread that ends right after: switch this thread's filesystem identity, then connect.
    fn connect_blocking(
        &self,
        path: &Path,
        timeout: Duration,
    ) -> Result<std::os::unix::net::UnixStream, CredsError> {
        self.take_for_this_thread()?;
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(std::io::Error::from)?;
        let tv = nix::sys::time::TimeVal::new(
            timeout.as_secs().min(i64::MAX as u64) as i64,
            i64::from(timeout.subsec_micros()),
        );
        socket::setsockopt(&fd, socket::sockopt::SendTimeout, &tv).map_err(std::io::Error::from)?;
        let addr = UnixAddr::new(path).map_err(std::io::Error::from)?;
        socket::connect(fd.as_raw_fd(), &addr).map_err(std::io::Error::from)?;
        Ok(std::os::unix::net::UnixStream::from(fd))
    }

    /// Give the calling thread (only) these groups, filesystem gid and filesystem uid, and check they took.
    #[allow(unsafe_code)]
    fn take_for_this_thread(&self) -> Result<(), CredsError> {
        let cannot = || CredsError::CannotSwitch { uid: self.uid };
        let groups: Vec<libc::gid_t> = self.groups.iter().take(MAX_GROUPS).copied().collect();
        // glibc's setgroups() changes every thread of the process; the raw system call changes only this one.
        // SAFETY: the pointer and length describe `groups`, which outlives the call; the kernel only reads it.
        let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
        if rc != 0 {
            return Err(cannot());
        }
        // setfsgid/setfsuid report the previous value, not failure: a second call shows what is in force.
        nix::unistd::setfsgid(Gid::from_raw(self.gid));
        if nix::unistd::setfsgid(Gid::from_raw(self.gid)).as_raw() != self.gid {
            return Err(cannot());
        }
        nix::unistd::setfsuid(Uid::from_raw(self.uid));
        if nix::unistd::setfsuid(Uid::from_raw(self.uid)).as_raw() != self.uid {
            return Err(cannot());
        }
        Ok(())
    }
}

/// The supplementary groups of process `pid` (its `/proc/PID/status` `Groups:` line), if that process still
/// has effective uid `uid` and gid `gid` (a pid reused by another process since the connection was made does
/// not lend its groups).
pub fn process_groups(pid: i32, uid: u32, gid: u32) -> Option<Vec<u32>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_groups(&text, uid, gid)
}

/// The pure part of [`process_groups`].
pub fn parse_status_groups(status: &str, uid: u32, gid: u32) -> Option<Vec<u32>> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.split_whitespace().collect::<Vec<_>>())
    };
    let effective = |name: &str| field(name)?.get(1)?.parse::<u32>().ok();
    if effective("Uid:")? != uid || effective("Gid:")? != gid {
        return None;
    }
    field("Groups:")?
        .iter()
        .take(MAX_GROUPS)
        .map(|g| g.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str =
        "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nGroups:\t27 100 998 \n";

    #[test]
    fn groups_come_from_a_process_with_the_peer_ids_only() {
        assert_eq!(
            parse_status_groups(STATUS, 1000, 100),
            Some(vec![27, 100, 998])
        );
        assert_eq!(parse_status_groups(STATUS, 1001, 100), None);
        assert_eq!(parse_status_groups(STATUS, 1000, 0), None);
        let none = "Uid:\t5\t5\t5\t5\nGid:\t5\t5\t5\t5\nGroups:\t\n";
        assert_eq!(parse_status_groups(none, 5, 5), Some(vec![]));
        assert_eq!(
            parse_status_groups("Uid:\t5\t5\t5\t5\nGid:\t5\t5\t5\t5\nGroups:\tx\n", 5, 5),
            None
        );
        assert_eq!(parse_status_groups("", 5, 5), None);
    }

    #[test]
    fn a_users_rights_come_from_the_user_database() {
        let root = Credentials::of_user(0);
        assert_eq!((root.uid, root.gid), (0, 0));
        // A uid no user database lists keeps only its uid, with the overflow group and no others.
        assert_eq!(
            Credentials::of_user(3_999_999_999),
            Credentials {
                uid: 3_999_999_999,
                gid: OVERFLOW_GID,
                groups: Vec::new(),
            }
        );
    }

    #[test]
    fn this_process_reads_its_own_groups() {
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        assert!(process_groups(std::process::id() as i32, uid, gid).is_some());
    }
}
