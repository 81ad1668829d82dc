//! One accept loop for every listening socket of the daemon: the client socket, the admin server, and the
//! mesh listeners to come.
//!
//! Events: a connection arrives: it is handed to the handler in a task of its own, tracked so shutdown can
//! wait for it, with its peer's address and, on a unix socket, its peer's credentials (`SO_PEERCRED`); it
//! is past a limit ([`AcceptLimits`]: connections in total, per peer uid, or it would eat into the file
//! descriptors kept in reserve): it is refused ([`Refusal`]), handed to the refusal handler (which tells
//! the client in its protocol, briefly, at most [`MAX_REFUSING`] at once) or closed at once, logged and
//! counted (the limits keep one client from exhausting the daemon's descriptors, and leave some for the
//! admin server and the agents); accepting fails (EMFILE and friends): back off [`ACCEPT_BACKOFF`] rather
//! than spin, with one warning per [`ACCEPT_WARN_INTERVAL`] saying how many failed; `stop` fires: stop
//! accepting and return (the caller drains the tracked tasks, with whatever grace it allows).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::metrics::{LimitKind, METRICS};
use crate::sync::lock;
use crate::transport::{Connection, Listener, PeerAddr};

/// How long to wait after a failed accept before the next one.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// At most one warning about failing accepts per this interval (the next one says how many failed).
pub const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Refused connections being told so at once; past this a refused connection is just closed.
pub const MAX_REFUSING: usize = 16;

/// The bounds one listener applies on accept.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once per peer uid (unix sockets); `None` = no per-uid bound.
    pub max_per_uid: Option<usize>,
    /// Refuse a connection whose descriptor number is within this many of the open-files limit
    /// (descriptors are allocated lowest first, so the number tells how many are in use); `None` = no
    /// reserve.
    pub fd_reserve: Option<u64>,
}

impl AcceptLimits {
    /// Only a total bound.
    pub fn total(max_connections: usize) -> AcceptLimits {
        AcceptLimits {
            max_connections,
            max_per_uid: None,
            fd_reserve: None,
        }
    }
}

/// Why a connection was refused on accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max` connections are open.
    Total { max: usize },
    /// The peer's uid holds `max` connections.
    PerUid { uid: u32, max: usize },
    /// Accepting it would leave fewer than `reserve` descriptors below the open-files limit `limit`.
    FdReserve { reserve: u64, limit: u64 },
}

impl Refusal {
    fn limit(self) -> LimitKind {
        match self {
            Refusal::Total { .. } => LimitKind::ConnectionsTotal,
            Refusal::PerUid { .. } => LimitKind::ConnectionsPerUid,
            Refusal::FdReserve { .. } => LimitKind::FdReserve,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Total { max } => write!(
                f,
                "too many open connections ({max}, --max-connections); try again later"
            ),
            Refusal::PerUid { uid, max } => write!(
                f,
                "uid {uid} has too many open connections ({max}, --max-connections-per-uid)"
            ),
            Refusal::FdReserve { reserve, limit } => write!(
                f,
                "the daemon is near its open-files limit ({limit}, {reserve} kept in reserve, \
                 --fd-reserve); try again later"
            ),
        }
    }
}

/// Connections open per uid; a [`UidSlot`] gives its place back when dropped.
#[derive(Debug, Default)]
struct PerUid(Mutex<HashMap<u32, usize>>);

struct UidSlot {
    table: Arc<PerUid>,
    uid: u32,
}

impl PerUid {
    fn take(self: &Arc<Self>, uid: u32, max: usize) -> Option<UidSlot> {
        let mut t = lock(&self.0);
        let n = t.entry(uid).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(UidSlot {
            table: self.clone(),
            uid,
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut t = lock(&self.table.0);
        if let Some(n) = t.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.remove(&self.uid);
            }
        }
    }
}

/// The soft open-files limit of this process.
pub fn nofile_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Raise the soft open-files limit to the hard one; logs both. Called once at start.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(
                from = soft,
                to = hard,
                "raised the open-files limit (RLIMIT_NOFILE) to its hard limit"
            ),
            Err(e) => tracing::warn!(soft, hard, error = %e,
                "cannot raise the open-files limit (RLIMIT_NOFILE)"),
        },
        Ok((soft, hard)) => tracing::info!(soft, hard, "open-files limit (RLIMIT_NOFILE)"),
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit (RLIMIT_NOFILE)"),
    }
}

/// Counts failed accepts and warns at most once per [`ACCEPT_WARN_INTERVAL`]. Shared with the mesh
/// listeners' accept loop (`mesh::listener`), which has its own limits and metrics.
#[derive(Debug, Default)]
pub struct AcceptErrors {
    last_warned: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    /// Accepting on listener `name` failed with `e`: warn (at most once per interval) and wait
    /// [`ACCEPT_BACKOFF`]. Returns `false` when `stop` fired meanwhile.
    pub async fn back_off(
        &mut self,
        name: &str,
        e: &std::io::Error,
        stop: &CancellationToken,
    ) -> bool {
        self.failed(name, e);
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(ACCEPT_BACKOFF) => true,
        }
    }

    fn failed(&mut self, name: &str, e: &std::io::Error) {
        let due = self
            .last_warned
            .is_none_or(|t| t.elapsed() >= ACCEPT_WARN_INTERVAL);
        if due {
            tracing::warn!(listener = name, error = %e, failed_since_last_warning = self.suppressed,
                "accept failed; backing off");
            self.last_warned = Some(Instant::now());
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}

/// A unix peer's identity, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

/// One accepted connection, as a handler gets it.
pub struct Incoming {
    pub conn: Connection,
    pub peer: PeerAddr,
    /// The peer's credentials (unix sockets only).
    pub cred: Option<PeerCred>,
}

/// Accept on `listener` until `stop`, running `handle` for each connection in a task tracked by `tracker`,
/// with at most `max_connections` open at once; one past it is closed. `name` names the listener in logs.
pub async fn serve<F, Fut>(
    listener: Listener,
    name: &'static str,
    max_connections: usize,
    stop: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(Incoming) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_with(
        listener,
        name,
        AcceptLimits::total(max_connections),
        stop,
        tracker,
        handle,
        |_: Incoming, _: Refusal| async {},
    )
    .await
}

/// [`serve`] with every bound of `limits`; a refused connection is handed to `refuse` (in a task of its
/// own, at most [`MAX_REFUSING`] at once, else closed), which tells the client why in its protocol.
pub async fn serve_with<F, Fut, R, RFut>(
    listener: Listener,
    name: &'static str,
    limits: AcceptLimits,
    stop: CancellationToken,
    tracker: TaskTracker,
    handle: F,
    refuse: R,
) where
    F: Fn(Incoming) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
    R: Fn(Incoming, Refusal) -> RFut,
    RFut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let per_uid = Arc::new(PerUid::default());
    let fd_ceiling = FdCeiling::of(limits.fd_reserve);
    let mut errors = AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let accepted = match accepted {
            Ok(a) => a,
            Err(e) => {
                if errors.back_off(name, &e, &stop).await {
                    continue;
                }
                return;
            }
        };
        let cred = match &accepted.conn {
            Connection::Unix(s) => s.peer_cred().ok().map(|c| PeerCred {
                pid: c.pid(),
                uid: c.uid(),
                gid: c.gid(),
            }),
            _ => None,
        };
        let incoming = Incoming {
            conn: accepted.conn,
            peer: accepted.peer,
            cred,
        };
        let admitted = admit(&incoming, &limits, fd_ceiling, &slots, &per_uid);
        let (slot, uid_slot) = match admitted {
            Ok(slots) => slots,
            Err(refusal) => {
                METRICS.limit_refused(refusal.limit());
                tracing::warn!(listener = name, peer = %incoming.peer,
                    uid = incoming.cred.map(|c| c.uid), reason = %refusal,
                    "connection refused: too many open");
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    let told = refuse(incoming, refusal);
                    tokio::spawn(async move {
                        let _permit = permit;
                        told.await;
                    });
                }
                continue;
            }
        };
        let work = handle(incoming);
        tracker.spawn(async move {
            let _slots = (slot, uid_slot);
            work.await;
        });
    }
}

/// The descriptors kept in reserve below the open-files limit (read once, when a loop starts).
#[derive(Debug, Clone, Copy)]
pub struct FdCeiling {
    reserve: u64,
    limit: u64,
}

impl FdCeiling {
    /// `reserve` descriptors below the current soft limit; `None` when there is no reserve or no limit.
    pub fn of(reserve: Option<u64>) -> Option<FdCeiling> {
        reserve.and_then(|reserve| nofile_limit().map(|limit| FdCeiling { reserve, limit }))
    }

    /// Refuse `conn` if its descriptor number is within the reserve (descriptors are allocated lowest
    /// first, so the number tells how many are in use).
    pub fn admit(&self, conn: &Connection) -> Result<(), Refusal> {
        match conn.raw_fd() {
            Some(fd)
                if u64::try_from(fd)
                    .unwrap_or(u64::MAX)
                    .saturating_add(self.reserve)
                    >= self.limit =>
            {
                Err(Refusal::FdReserve {
                    reserve: self.reserve,
                    limit: self.limit,
                })
            }
            _ => Ok(()),
        }
    }
}

/// Take a connection's places under every bound, or say which one refuses it.
fn admit(
    incoming: &Incoming,
    limits: &AcceptLimits,
    fd_ceiling: Option<FdCeiling>,
    slots: &Arc<Semaphore>,
    per_uid: &Arc<PerUid>,
) -> Result<(tokio::sync::OwnedSemaphorePermit, Option<UidSlot>), Refusal> {
    if let Some(c) = fd_ceiling {
        c.admit(&incoming.conn)?;
    }
    let slot = slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| Refusal::Total {
            max: limits.max_connections,
        })?;
    let uid_slot = match (limits.max_per_uid, incoming.cred) {
        (Some(max), Some(cred)) => Some(
            per_uid
                .take(cred.uid, max)
                .ok_or(Refusal::PerUid { uid: cred.uid, max })?,
        ),
        _ => None,
    };
    Ok((slot, uid_slot))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::transport::Endpoint;

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_peers_are_identified() {
        let dir = match tempfile::Builder::new().prefix("ccp-accept-").tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let ep = Endpoint::Unix(dir.path().join("a.sock"));
        let Ok(listener) = ep.bind().await else {
            panic!("bind failed")
        };
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let served = Arc::new(AtomicUsize::new(0));
        let release = CancellationToken::new();
        let (s, r) = (served.clone(), release.clone());
        let loop_task = tokio::spawn(serve(
            listener,
            "test",
            2,
            stop.clone(),
            tracker.clone(),
            move |inc| {
                let (s, r) = (s.clone(), r.clone());
                async move {
                    let cred = inc.cred.unwrap_or(PeerCred {
                        pid: None,
                        uid: u32::MAX,
                        gid: u32::MAX,
                    });
                    assert_eq!(cred.pid, Some(std::process::id() as i32));
                    s.fetch_add(1, Ordering::SeqCst);
                    // Hold the connection open until released.
                    r.cancelled().await;
                    drop(inc.conn);
                }
            },
        ));
        let timeout = Duration::from_secs(5);
        let mut held = Vec::new();
        for _ in 0..2 {
            match ep.connect(timeout).await {
                Ok(c) => held.push(c),
                Err(e) => panic!("connect: {e}"),
            }
        }
        // The third is accepted and closed at once: it reads end-of-file.
        let Ok(mut third) = ep.connect(timeout).await else {
            panic!("connect failed")
        };
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(timeout, third.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "the connection over the limit was not closed"
        );
        assert_eq!(served.load(Ordering::SeqCst), 2);
        // Stop: the loop returns; the tracked connections drain once released.
        stop.cancel();
        assert!(tokio::time::timeout(timeout, loop_task).await.is_ok());
        release.cancel();
        tracker.close();
        assert!(tokio::time::timeout(timeout, tracker.wait()).await.is_ok());
    }
}
