//! One accept loop for every listening socket of the daemon: the client socket, the admin server, and the
//! mesh listeners to come.
//!
//! Events: a connection arrives: it is handed to the handler in a task of its own, tracked so shutdown can
//! wait for it, with its peer's address and, on a unix socket, its peer's credentials (`SO_PEERCRED`); more
//! than the listener's limit are open: the new one is closed at once (the limit keeps a misbehaving client
//! from exhausting the daemon's file descriptors); accepting fails (EMFILE and friends): back off
//! [`ACCEPT_BACKOFF`] rather than spin; `stop` fires: stop accepting and return (the caller drains the
//! tracked tasks, with whatever grace it allows).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::transport::{Connection, Listener, PeerAddr};

/// How long to wait after a failed accept before the next one.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

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
/// with at most `max_connections` open at once. `name` names the listener in logs.
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
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let accepted = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(listener = name, peer = %accepted.peer, max_connections,
                "connection refused: too many open");
            continue;
        };
        let cred = match &accepted.conn {
            Connection::Unix(s) => s.peer_cred().ok().map(|c| PeerCred {
                pid: c.pid(),
                uid: c.uid(),
                gid: c.gid(),
            }),
            _ => None,
        };
        let work = handle(Incoming {
            conn: accepted.conn,
            peer: accepted.peer,
            cred,
        });
        tracker.spawn(async move {
            let _slot = slot;
            work.await;
        });
    }
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
