//! The daemon: the client socket's accept loop, protocol detection, and graceful shutdown.
//!
//! Every accepted connection is classified by its first bytes ([`detect`]): HTTP (JSON-RPC over HTTP/1.1,
//! HTTP/2 or WebSocket, and shim stream attach, see [`http`]) or the legacy v2 binary protocol ([`legacy`]).
//! Both share the one [`Proxy`] state, so a VM registered through one is usable from the other.

pub mod attach;
pub mod authz;
pub mod detect;
pub mod guard;
pub mod http;
pub mod legacy;
pub mod listener;
pub mod notify;
pub mod rpc;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::task::TaskTracker;

use crate::accept::{self, Incoming};
use crate::admin::metrics::{ProtocolLabel, METRICS};
use crate::config::Config;
use crate::logging::LogHandle;
use crate::transport::{Connection, Listener};
use crate::vm::state::{StateDir, StateError};
use crate::vm::Registry;

/// How long in-flight requests may take to finish after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a refused client is given to send its first bytes (to learn its protocol) and to take the
/// refusal.
pub const REFUSAL_WAIT: Duration = Duration::from_millis(250);

/// Largest JSON-RPC request body.
pub const MAX_REQUEST_BYTES: u32 = 1 << 20;

/// State shared by every connection.
pub struct Proxy {
    pub registry: Arc<Registry>,
    /// The socket path, as the legacy protocol reports it in `io.URL`.
    pub socket: std::path::PathBuf,
    pub started: Instant,
    pub log: LogHandle,
    /// Cancelled when the daemon starts shutting down; long-lived sessions end on it.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Every connection and shim session, so shutdown can wait for them to finish.
    pub tasks: TaskTracker,
    /// Bytes of client-supplied text per log line (`--max-client-log`).
    pub max_client_log: usize,
    /// `--admin-group`: its members are privileged clients (see [`authz`]).
    pub admin_group: Option<authz::AdminGroup>,
    /// `--admin-allow-log-level`: the admin server's `PUT /proxy-log-level` works for loopback clients.
    pub admin_allow_log_level: bool,
    /// Bounds on client connections and their requests.
    pub limits: crate::config::ClientLimits,
    next_client: AtomicU64,
}

/// The uid (and gid) of a client whose credentials are unknown: no user has it, so it owns nothing.
pub const UNKNOWN_UID: u32 = u32::MAX;

/// Who is on the other end of a client connection (from SO_PEERCRED).
///
/// Every log line written while serving the connection carries it as separate fields, through the
/// connection's span: `client` (the connection number), `client_pid`, `client_uid`, `client_gid`; in the
/// journal `CLIENT=`, `CLIENT_PID=`, `CLIENT_UID=`, `CLIENT_GID=`, so `journalctl CLIENT_PID=594` works.
#[derive(Debug, Clone)]
pub struct Peer {
    /// A per-daemon connection number.
    pub id: u64,
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
    /// The supplementary groups of the connecting process (empty when they could not be read).
    pub groups: Arc<[u32]>,
    /// What the client may do, decided when the connection was accepted.
    pub access: authz::Access,
}

impl Peer {
    /// A client whose credentials are unknown (the socket gave none, or a request carries no connection's
    /// peer): an unknown uid that owns nothing and is not privileged.
    pub fn unknown(id: u64) -> Peer {
        Peer {
            id,
            pid: None,
            uid: UNKNOWN_UID,
            gid: UNKNOWN_UID,
            groups: Arc::from([]),
            access: authz::Access::OwnerOnly,
        }
    }

    /// Whose rights the daemon uses to open the endpoints this client names: none (the daemon's own) for a
    /// privileged client, the client's own otherwise.
    pub fn endpoint_rights(&self) -> Option<crate::transport::Credentials> {
        (self.access != authz::Access::Privileged).then(|| crate::transport::Credentials {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.to_vec(),
        })
    }

    /// Whether this client may see and use a VM owned by `owner`.
    pub fn sees(&self, owner: u32) -> bool {
        self.access.sees(self.uid, owner)
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(
                f,
                "#{} pid={} uid={} gid={}",
                self.id, pid, self.uid, self.gid
            ),
            None => write!(f, "#{} uid={} gid={}", self.id, self.uid, self.gid),
        }
    }
}

/// Run the daemon until SIGTERM/SIGINT. Returns the process exit status.
pub async fn run(
    config: Config,
    activated: Option<std::os::unix::net::UnixListener>,
    log: LogHandle,
) -> i32 {
    let started = Instant::now();
    // Resolved before anything is touched: an admin group that does not exist is a configuration mistake.
    let admin_group = match config
        .admin_group
        .as_deref()
        .map(authz::AdminGroup::resolve)
    {
        None => None,
        Some(Ok(g)) => Some(g),
        Some(Err(e)) => {
            log.startup_error(&e);
            return 1;
        }
    };
    // The state directory is locked before the socket is touched: a second daemon on the same directory
    // must not replace the first one's socket file either. A directory that cannot be used is fatal too:
    // registered VMs would silently not survive a restart.
    let state = match StateDir::open(&config.state_dir) {
        Ok(s) => s,
        // The lock's message already says what to do with --state-dir.
        Err(e @ StateError::Locked { .. }) => {
            log.startup_error(&e);
            return 1;
        }
        Err(e) => {
            log.startup_error(&format_args!("{e} (see --state-dir)"));
            return 1;
        }
    };
    // The mesh data plane's limits and metric families, before any VM can be meshed.
    crate::mesh::listener::set_limits(config.mesh_limits.clone());
    crate::mesh::metrics::register();
    // The mesh's certificate source: the embedded CA is created on the first start (or reused), or the
    // identity directory is read and watched. A source that cannot be used is fatal, as the state directory.
    let identities = match crate::mesh::identity::IdentityStore::open(&config.mesh_identity) {
        Ok(store) => store,
        Err(e) => {
            log.startup_error(&format_args!("mesh identity: {e}"));
            return 1;
        }
    };
    // Bound before the client socket: a configured admin address that cannot be served is fatal.
    let admin_listener = match config.admin_addr.map(crate::admin::bind).transpose() {
        Ok(l) => l,
        Err(e) => {
            log.startup_error(&e);
            return 1;
        }
    };
    let listener = match activated {
        Some(l) => {
            let path = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
                .unwrap_or_else(|| config.socket.clone());
            listener::Listener {
                listener: l,
                path,
                created: false,
            }
        }
        None => match listener::bind(&config.socket, config.socket_group.as_deref()) {
            Ok(l) => l,
            Err(e) => {
                log.startup_error(&e);
                return 1;
            }
        },
    };
    let activated = !listener.created;
    if let Err(e) = listener.listener.set_nonblocking(true) {
        log.startup_error(&format_args!("cannot use the socket: {e}"));
        return 1;
    }
    let unix = match UnixListener::from_std(listener.listener) {
        Ok(l) => l,
        Err(e) => {
            log.startup_error(&format_args!("cannot use the socket: {e}"));
            return 1;
        }
    };

    let (events, _) = tokio::sync::broadcast::channel::<crate::vm::VmEvent>(1024);
    // Named outbound destinations: the destination service (an invalid address is fatal), or DNS; without a
    // DNS configuration the daemon runs and registrations naming a destination are refused.
    let discovery = match crate::mesh::discover::Source::open(&config.mesh_discovery) {
        Ok(source) => Ok(crate::mesh::discover::Discovery::new(source)),
        Err(e) => {
            if matches!(
                config.mesh_discovery,
                crate::mesh::discover::SourceConfig::Destination { .. }
            ) {
                log.startup_error(&format_args!("mesh discovery: {e}"));
                return 1;
            }
            tracing::warn!(error = %e, "mesh: named destinations cannot be resolved");
            Err(e.to_string())
        }
    };
    let mesh = crate::mesh::Mesh::new(identities, discovery);
    let registry = Registry::new(Some(state), config.vm.clone(), events, Some(mesh.clone()));
    registry.spawn_state_writer();
    registry.spawn_token_reaper();
    let proxy = Arc::new(Proxy {
        registry: registry.clone(),
        socket: listener.path.clone(),
        started,
        log,
        shutdown: tokio_util::sync::CancellationToken::new(),
        tasks: TaskTracker::new(),
        max_client_log: config.max_client_log,
        admin_group,
        admin_allow_log_level: config.admin_allow_log_level,
        limits: config.client.clone(),
        next_client: AtomicU64::new(1),
    });

    // Loaded before anything serves: with nothing to reconnect, `/ready` is true from the first request.
    let records = registry.records_to_recover();
    if records.is_empty() {
        registry.set_recovered();
    }
    let (stop_handle, server_handle) = jsonrpsee::server::stop_channel();
    let http = http::HttpServer::new(proxy.clone(), stop_handle.clone());

    let admin = match admin_listener.map(|l| crate::admin::start(l, proxy.clone())) {
        Some(Ok(handle)) => Some(handle),
        Some(Err(e)) => {
            proxy.log.startup_error(&e);
            return 1;
        }
        None => None,
    };

    let (mut sigterm, mut sigint) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            proxy
                .log
                .startup_error(&format_args!("cannot install signal handlers: {e}"));
            return 1;
        }
    };

    tracing::info!(socket = %listener.path.display(), activated, "listening");
    notify::ready(&format!("serving {}", listener.path.display()));
    notify::spawn_watchdog();
    if !records.is_empty() {
        let registry = registry.clone();
        tokio::spawn(async move {
            registry.recover(records).await;
            let (vms, lost, _) = registry.counts();
            if vms > 0 {
                tracing::info!(vms, lost, "recovery finished");
            }
            notify::status(&format!("{vms} VMs ({lost} lost)"));
        });
    }

    let tracker = proxy.tasks.clone();
    let stop_accepting = tokio_util::sync::CancellationToken::new();
    let accepting = {
        let (proxy, http) = (proxy.clone(), http.clone());
        tokio::spawn(accept::serve_with(
            Listener::from_unix(unix, listener.path.clone()),
            "client",
            accept::AcceptLimits {
                max_connections: config.max_connections,
                max_per_uid: Some(config.client.max_connections_per_uid),
                fd_reserve: Some(config.client.fd_reserve),
            },
            stop_accepting.clone(),
            tracker.clone(),
            move |incoming| handle_connection(proxy.clone(), http.clone(), incoming),
            refuse_connection,
        ))
    };
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }

    tracing::info!("shutting down: draining connections");
    notify::stopping();
    // The accept loop ends and drops the listening socket; the mesh listeners stop accepting and drain
    // (GOAWAY, `Connection: close`, close_notify) alongside the client connections.
    stop_accepting.cancel();
    mesh.stop_all();
    let _ = accepting.await;
    if listener.created {
        let _ = std::fs::remove_file(&listener.path);
    }
    // Requests in flight finish first (their VMs are still connected); idle and long-lived sessions end.
    proxy.shutdown.cancel();
    let _ = server_handle.stop();
    tracker.close();
    tokio::select! {
        _ = async { tokio::join!(tracker.wait(), mesh.drained()) } => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("grace period over; closing remaining connections");
        }
        _ = sigterm.recv() => tracing::warn!("second signal: exiting at once"),
        _ = sigint.recv() => tracing::warn!("second signal: exiting at once"),
    }
    // Then the VMs stop, and their state (with output still queued for shims) is saved for the next start.
    registry.shutdown();
    drop(admin);
    tracing::info!("stopped");
    0
}

impl Peer {
    /// The span a connection is served in. At level ERROR so that it is never filtered out: any line the
    /// connection logs, at any level, carries the client fields.
    fn span(&self) -> tracing::Span {
        let span = tracing::error_span!(
            "client",
            client = self.id,
            client_pid = tracing::field::Empty,
            client_uid = self.uid,
            client_gid = self.gid
        );
        if let Some(pid) = self.pid {
            span.record("client_pid", pid);
        }
        span
    }
}

async fn handle_connection(proxy: Arc<Proxy>, http: http::HttpServer, incoming: Incoming) {
    use tracing::Instrument;
    let id = proxy.next_client.fetch_add(1, Ordering::Relaxed);
    let peer = match incoming.cred {
        // Root and the daemon's own uid are privileged whatever their groups: nothing more is read for them.
        Some(c) if authz::always_privileged(c.uid) => Peer {
            id,
            pid: c.pid,
            uid: c.uid,
            gid: c.gid,
            groups: Arc::from([]),
            access: authz::Access::Privileged,
        },
        Some(c) => {
            // Reading the process's groups and looking the user up (NSS: files, LDAP, ...) may block: not on
            // a runtime worker.
            let admin = proxy.admin_group.clone();
            let classified = tokio::task::spawn_blocking(move || {
                let groups: Arc<[u32]> = c
                    .pid
                    .and_then(|pid| crate::transport::creds::process_groups(pid, c.uid, c.gid))
                    .unwrap_or_default()
                    .into();
                let access = authz::classify(c.uid, c.gid, &groups, admin.as_ref());
                (groups, access)
            })
            .await;
            // A lookup that panicked leaves the client with no privilege.
            let (groups, access) =
                classified.unwrap_or_else(|_| (Arc::from([]), authz::Access::OwnerOnly));
            Peer {
                id,
                pid: c.pid,
                uid: c.uid,
                gid: c.gid,
                access,
                groups,
            }
        }
        // No credentials: an unknown uid that owns nothing.
        None => Peer::unknown(id),
    };
    let span = peer.span();
    serve_connection(proxy, http, incoming.conn, peer)
        .instrument(span)
        .await
}

async fn serve_connection(
    proxy: Arc<Proxy>,
    http: http::HttpServer,
    stream: Connection,
    peer: Peer,
) {
    let (protocol, conn) = match detect::detect(stream, proxy.limits.header_timeout).await {
        Ok(x) => x,
        Err(e) => {
            if e.kind() == std::io::ErrorKind::TimedOut {
                METRICS.limit_refused(crate::admin::metrics::LimitKind::HeaderTimeout);
            }
            tracing::debug!(error = %e, "connection closed before its protocol was known");
            return;
        }
    };
    let label = ProtocolLabel {
        protocol: protocol.name().into(),
    };
    METRICS.client_connections.get_or_create(&label).inc();
    METRICS.client_connections_open.get_or_create(&label).inc();
    tracing::debug!(protocol = protocol.name(), "client connected");
    let activity = Arc::new(guard::Activity::default());
    let timeouts = guard::GuardTimeouts {
        write: proxy.limits.write_timeout,
        idle: proxy.limits.idle_timeout,
    };
    let conn = guard::Guarded::new(conn, activity.clone(), timeouts);
    match protocol {
        detect::Protocol::Http => http.serve(conn, peer.clone(), activity).await,
        detect::Protocol::Legacy => legacy::serve(proxy, conn, peer, activity).await,
    }
    METRICS.client_connections_open.get_or_create(&label).dec();
    tracing::debug!("client disconnected");
}

/// Tell a refused client why, in its protocol, then close: an HTTP 503 with a JSON-RPC error (code 1022),
/// or a legacy error response to its first command. A client that sends nothing within [`REFUSAL_WAIT`]
/// is just closed.
async fn refuse_connection(incoming: Incoming, refusal: accept::Refusal) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = incoming.conn;
    let mut head = [0u8; 12];
    let mut got = 0;
    let read = tokio::time::timeout(REFUSAL_WAIT, async {
        while got < head.len() {
            match conn.read(&mut head[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
            // Enough to tell HTTP from legacy; a legacy client's command is in byte 7.
            if got >= 2 && head[..2] != [0, 2] {
                break;
            }
        }
    })
    .await;
    let _ = read;
    let message = refusal.to_string();
    let answer: Vec<u8> = if got >= 8 && head[..2] == [0, 2] {
        let op = head[7];
        match cc_proxy_api::legacy::Command::from_opcode(op) {
            Some(command) if head[6] & 0x0f == 0 => {
                let frame = cc_proxy_api::legacy::Frame::error(command, &message);
                let mut out = bytes::BytesMut::new();
                match cc_proxy_api::legacy::encode(&frame, &mut out, usize::MAX) {
                    Ok(()) => out.to_vec(),
                    Err(_) => Vec::new(),
                }
            }
            _ => Vec::new(),
        }
    } else if got >= 2 && head[..2] != [0, 2] {
        // Answered with a JSON-RPC error, so counted as one, as every other error the API answers.
        METRICS.api_error(cc_proxy_api::error::TOO_MANY_CONNECTIONS);
        let body = serde_json::json!({
            "jsonrpc": "2.0",
            "id": null,
            "error": {
                "code": cc_proxy_api::error::TOO_MANY_CONNECTIONS,
                "message": message,
            }
        })
        .to_string();
        format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
             Connection: close\r\nRetry-After: 1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    } else {
        Vec::new()
    };
    if !answer.is_empty() {
        let _ = tokio::time::timeout(REFUSAL_WAIT, conn.write_all(&answer)).await;
        let _ = tokio::time::timeout(REFUSAL_WAIT, conn.shutdown()).await;
        // Read what the client still sends for a moment, so closing does not reset the connection before
        // it has read the answer.
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(REFUSAL_WAIT, async {
            while let Ok(n) = conn.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}
