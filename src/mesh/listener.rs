//! A meshed VM's listeners: bound at registration ([`bind_vm`], so a bad or used address fails
//! `vm.register`), served until the VM's shutdown fires ([`serve_vm`]).
//!
//! Listen URIs:
//!
//! | URI | inbound | outbound | binds |
//! |---|---|---|---|
//! | `HOST:PORT` | yes | yes | TCP |
//! | `transparent:HOST:PORT` | yes | yes | TCP; each connection's original destination is read with `SO_ORIGINAL_DST` (iptables REDIRECT) |
//! | `vsock://CID:PORT` | no | yes | AF_VSOCK (the guest connects to the host's port over vhost-vsock) |
//! | `hvsock:///path:PORT` | no | yes | the unix socket `/path_PORT` Firecracker and Cloud Hypervisor connect to for a guest's connection to host port `PORT` |
//!
//! Events of [`serve_vm`]: the VM's credential is not issued yet: nothing is accepted (connections wait in
//! the backlog); it is: every listener accepts; a connection arrives: it is refused (closed and counted)
//! beyond its listener's limit or the daemon-wide mesh limit ([`Limits`]), else handled in a tracked task
//! (`inbound` or `outbound`); shutdown fires: stop accepting, tell open HTTP connections to finish
//! (GOAWAY / `Connection: close`), wait for the open connections and return; unix socket files bound here
//! are removed. The caller bounds the wait (the daemon's drain period): dropping `serve_vm`'s future ends
//! every connection still open.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use cc_proxy_api::mesh::MeshConfig;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::metrics::{self, Direction, Refusal};
use super::tls::{self, TlsConfigs};
use super::MeshVmCtx;
use crate::transport::{Connection, Endpoint, Listener, PeerAddr, TransportError};

/// Connections open at once on one mesh listener (`--mesh-max-connections-per-listener`).
pub const DEFAULT_MAX_CONNECTIONS_PER_LISTENER: usize = 10_000;
/// Connections open at once on every mesh listener together (`--mesh-max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 50_000;
/// Time an inbound connection has to show its ClientHello, and the decrypted stream its HTTP request line
/// or preface (`--mesh-detect-timeout`); after it the bytes are opaque. Linkerd waits 10 s; clients of a
/// mesh speak first, so a second is plenty and keeps plaintext server-speaks-first clients from stalling long.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time to connect to a target or endpoint (`--mesh-connect-timeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for a TLS handshake, and for a transport or PROXY v2 header to arrive (`--mesh-handshake-timeout`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle pooled HTTP connection, or a keep-alive client between requests, is closed after this
/// (`--mesh-idle-timeout`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Bytes of HTTP request or response headers (`--mesh-max-header-bytes`).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// First ejection of an outbound endpoint that failed to connect or handshake (`--mesh-eject-backoff-min-ms`);
/// doubled per consecutive failure.
pub const DEFAULT_EJECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest ejection (`--mesh-eject-backoff-max-ms`).
pub const DEFAULT_EJECT_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Longest wait of an outbound request or connection for a ready endpoint before it fails (503 with
/// `l5d-proxy-error`, or the connection closed) (`--mesh-failfast-timeout-ms`); Linkerd's outbound waits 3 s.
pub const DEFAULT_FAILFAST_TIMEOUT: Duration = Duration::from_secs(3);
/// Requests of one outbound destination waiting for its balancer while no endpoint is ready
/// (`--mesh-balancer-queue`); more wait (within the fail-fast time) for room. Linkerd's outbound queue holds
/// 10,000.
pub const DEFAULT_BALANCER_QUEUE: usize = 10_000;
/// Distinct `authority` label values in one VM's request metrics (`--mesh-max-authorities`); the
/// authority comes from the client, so further ones share the label `~other`.
pub const DEFAULT_MAX_AUTHORITIES: usize = 100;

/// The data plane's limits, daemon-wide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_connections_per_listener: usize,
    pub max_connections: usize,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub eject_backoff_min: Duration,
    pub eject_backoff_max: Duration,
    pub failfast_timeout: Duration,
    /// Descriptors kept free below the open-files limit (`--fd-reserve`, shared with the client socket): a
    /// connection accepted into the reserve is closed (`fd_reserve`).
    pub fd_reserve: u64,
    pub balancer_queue: usize,
    pub max_authorities: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections_per_listener: DEFAULT_MAX_CONNECTIONS_PER_LISTENER,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            detect_timeout: DEFAULT_DETECT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            eject_backoff_min: DEFAULT_EJECT_BACKOFF_MIN,
            eject_backoff_max: DEFAULT_EJECT_BACKOFF_MAX,
            failfast_timeout: DEFAULT_FAILFAST_TIMEOUT,
            fd_reserve: crate::config::DEFAULT_FD_RESERVE,
            balancer_queue: DEFAULT_BALANCER_QUEUE,
            max_authorities: DEFAULT_MAX_AUTHORITIES,
        }
    }
}

static LIMITS: OnceLock<Limits> = OnceLock::new();

/// Set the limits from the configuration, once, before any VM is meshed.
pub fn set_limits(limits: Limits) {
    let _ = LIMITS.set(limits);
}

/// The limits in force.
pub fn limits() -> &'static Limits {
    LIMITS.get_or_init(Limits::default)
}

/// The daemon-wide connection slots (sized at first use).
static TOTAL: LazyLock<Arc<Semaphore>> =
    LazyLock::new(|| Arc::new(Semaphore::new(limits().max_connections)));

/// Why a VM's mesh listeners could not be set up. Every variant names the URI.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("invalid mesh listen address {listen:?}: {reason}")]
    InvalidListen {
        listen: String,
        reason: &'static str,
    },
    #[error("invalid mesh inbound target {target:?}: {source}")]
    InvalidTarget {
        target: String,
        source: TransportError,
    },
    #[error("invalid mesh outbound endpoint {endpoint:?}: expected IP:PORT")]
    InvalidEndpoint { endpoint: String },
    #[error("invalid mesh destination identity {identity:?}: expected a DNS-like name")]
    InvalidIdentity { identity: String },
    #[error("cannot listen on mesh address {listen:?}: {source}")]
    Bind {
        listen: String,
        source: TransportError,
    },
}

/// A parsed listen URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// Plain TCP (`HOST:PORT`).
    Tcp(Endpoint),
    /// TCP whose connections carry their original destination (`transparent:HOST:PORT`).
    Transparent(Endpoint),
    /// AF_VSOCK or hybrid vsock (outbound only).
    Vsock(Endpoint),
}

impl ListenAddr {
    pub fn parse(listen: &str, inbound: bool) -> Result<ListenAddr, MeshError> {
        let invalid = |reason| MeshError::InvalidListen {
            listen: listen.to_string(),
            reason,
        };
        let tcp = |hostport: &str| {
            Endpoint::parse(&format!("tcp://{hostport}")).map_err(|_| invalid("expected HOST:PORT"))
        };
        if let Some(rest) = listen.strip_prefix("transparent:") {
            return Ok(ListenAddr::Transparent(tcp(rest)?));
        }
        if listen.starts_with("vsock://") || listen.starts_with("hvsock://") {
            if inbound {
                return Err(invalid(
                    "inbound listeners are HOST:PORT or transparent:HOST:PORT",
                ));
            }
            return Endpoint::parse(listen)
                .map(ListenAddr::Vsock)
                .map_err(|_| invalid("expected vsock://CID:PORT or hvsock:///path:PORT"));
        }
        if listen.contains("://") {
            return Err(invalid(
                "unsupported scheme (HOST:PORT, transparent:, vsock://, hvsock://)",
            ));
        }
        Ok(ListenAddr::Tcp(tcp(listen)?))
    }

    pub(crate) fn endpoint(&self) -> &Endpoint {
        match self {
            ListenAddr::Tcp(e) | ListenAddr::Transparent(e) | ListenAddr::Vsock(e) => e,
        }
    }
}

/// What a bound listener serves.
pub enum Role {
    Inbound(Arc<super::inbound::InboundListener>),
    Outbound(Arc<super::outbound::OutboundListener>),
}

/// One bound listener.
pub struct Bound {
    pub listen: String,
    pub transparent: bool,
    pub role: Role,
    listener: Listener,
}

/// Every inbound and outbound listener of one VM, bound.
pub struct BoundListeners {
    pub listeners: Vec<Bound>,
    /// Unix socket files to remove when the listeners go away.
    unix_paths: Vec<PathBuf>,
}

impl BoundListeners {
    /// The bound TCP addresses, inbound listeners first, in configuration order (port 0 picks one).
    #[cfg(test)]
    pub fn tcp_addrs(&self) -> Vec<Option<SocketAddr>> {
        self.listeners
            .iter()
            .map(|b| b.listener.tcp_addr())
            .collect()
    }
}

impl Drop for BoundListeners {
    fn drop(&mut self) {
        for p in &self.unix_paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Bind `ep`; a hybrid-vsock socket file left by an earlier run that nobody listens on is replaced.
async fn bind(ep: &Endpoint, listen: &str) -> Result<Listener, MeshError> {
    let bind_err = |source| MeshError::Bind {
        listen: listen.to_string(),
        source,
    };
    if let Endpoint::HybridVsock { path, port } = ep {
        let file = crate::transport::hybrid_listen_path(path, *port);
        // Only a socket is replaced: connecting to a regular file is refused too, and it is not ours.
        if std::fs::symlink_metadata(&file).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) && std::os::unix::net::UnixStream::connect(&file)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            let _ = std::fs::remove_file(&file);
        }
    }
    ep.bind().await.map_err(bind_err)
}

/// Check `cfg` and bind every listener; on any failure nothing stays bound. `discovered` holds, per outbound
/// listener (configuration order), its named destination's endpoint set (the caller holds the lease).
pub async fn bind_vm(
    cfg: &MeshConfig,
    discovered: &[Option<watch::Receiver<Arc<super::discover::EndpointSet>>>],
) -> Result<BoundListeners, MeshError> {
    let mut bound = BoundListeners {
        listeners: Vec::new(),
        unix_paths: Vec::new(),
    };
    // Parse everything first so a bad entry binds nothing.
    let mut plan = Vec::new();
    for ib in &cfg.inbound {
        let addr = ListenAddr::parse(&ib.listen, true)?;
        let role = Role::Inbound(Arc::new(super::inbound::InboundListener::new(ib)?));
        plan.push((ib.listen.clone(), addr, role));
    }
    for (i, ob) in cfg.outbound.iter().enumerate() {
        let addr = ListenAddr::parse(&ob.listen, false)?;
        let rx = discovered.get(i).cloned().flatten();
        let role = Role::Outbound(Arc::new(super::outbound::OutboundListener::new(ob, rx)?));
        plan.push((ob.listen.clone(), addr, role));
    }
    for (listen, addr, role) in plan {
        let listener = bind(addr.endpoint(), &listen).await?;
        if let Some(p) = listener.unix_path() {
            bound.unix_paths.push(p.to_path_buf());
        }
        bound.listeners.push(Bound {
            listen,
            transparent: matches!(addr, ListenAddr::Transparent(_)),
            role,
            listener,
        });
    }
    Ok(bound)
}

/// What every connection of one VM shares.
pub struct VmShared {
    pub vm: String,
    /// The VM's owner (its tap events are shown to it).
    pub owner: u32,
    pub identity: String,
    /// The current TLS configurations (always `Some` once serving has started).
    pub tls: watch::Receiver<Option<Arc<TlsConfigs>>>,
    /// Fired at shutdown: HTTP connections finish their requests and close.
    pub shutdown: CancellationToken,
}

impl VmShared {
    pub fn configs(&self) -> Option<Arc<TlsConfigs>> {
        self.tls.borrow().clone()
    }
}

/// One accepted mesh connection, as the inbound and outbound handlers get it.
pub struct Accepted {
    pub conn: Connection,
    pub peer: PeerAddr,
    /// `SO_ORIGINAL_DST` of a transparent listener's connection.
    pub original_dst: Option<SocketAddr>,
}

/// Serve `bound` until `ctx.shutdown`, then drain. Returns once every connection has ended.
pub async fn serve_vm(bound: BoundListeners, cfg: Arc<MeshConfig>, ctx: MeshVmCtx) {
    // The listeners carry their own parsed configuration.
    let _ = cfg;
    // The VM's metric series live as long as this (the last instance of the VM to end removes them).
    let _series = metrics::serving(&ctx.vm);
    let tls = tls::watch_configs(
        ctx.vm.clone(),
        ctx.credential.clone(),
        ctx.anchors.clone(),
        ctx.shutdown.clone(),
    );
    let shared = Arc::new(VmShared {
        vm: ctx.vm.clone(),
        owner: ctx.owner,
        identity: ctx.identity.clone(),
        tls,
        shutdown: ctx.shutdown.clone(),
    });
    // Serve nothing until the VM's certificate is ready.
    let mut ready = shared.tls.clone();
    tokio::select! {
        _ = ctx.shutdown.cancelled() => return,
        r = ready.wait_for(Option::is_some) => if r.is_err() { return },
    }
    tracing::info!(vm = %ctx.vm, identity = %ctx.identity, listeners = bound.listeners.len(), "mesh: serving");
    let mut cleanup = bound;
    // The accept loops run inside this future (not spawned) and own their connections' tasks: dropping
    // the future (the caller's drain period is over) aborts every connection.
    let loops = std::mem::take(&mut cleanup.listeners)
        .into_iter()
        .map(|b| accept_loop(b, shared.clone(), ctx.shutdown.clone()));
    futures::future::join_all(loops).await;
    drop(cleanup);
    tracing::info!(vm = %ctx.vm, "mesh: drained");
}

/// The `SO_ORIGINAL_DST` of an accepted TCP connection (iptables REDIRECT/DNAT).
#[allow(unsafe_code)]
pub fn original_dst(stream: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    use std::os::fd::AsRawFd;
    const SO_ORIGINAL_DST: libc::c_int = 80; // linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST is the same
    let fd = stream.as_raw_fd();
    let local = stream.local_addr()?;
    if local.is_ipv4() {
        // SAFETY: `addr` is a properly sized, writable sockaddr_in and `len` holds its size; the kernel
        // writes at most `len` bytes and `fd` is an open socket borrowed from `stream` for the call.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: see above.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddr::from((ip, u16::from_be(addr.sin_port))))
    } else {
        // SAFETY: as above, with a sockaddr_in6.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: see above.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in6).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ip = std::net::Ipv6Addr::from(addr.sin6_addr.s6_addr);
        Ok(SocketAddr::from((ip, u16::from_be(addr.sin6_port))))
    }
}

/// Accept on one listener until `stop`, then wait for its connections to end.
async fn accept_loop(b: Bound, shared: Arc<VmShared>, stop: CancellationToken) {
    let Bound {
        listen,
        transparent,
        role,
        listener,
    } = b;
    let direction = match &role {
        Role::Inbound(_) => Direction::Inbound,
        Role::Outbound(l) => {
            l.track(&shared.vm);
            Direction::Outbound
        }
    };
    let slots = Arc::new(Semaphore::new(limits().max_connections_per_listener));
    // The daemon's accept helpers: a failing accept (EMFILE and friends) backs off with one warning per
    // interval, and the descriptors kept in reserve (`--fd-reserve`) are not handed to mesh peers.
    let mut errors = crate::accept::AcceptErrors::default();
    let fd_ceiling = crate::accept::FdCeiling::of(Some(limits().fd_reserve));
    let name = format!("mesh {} {listen}", shared.vm);
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            // Reap finished connections as they end.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = listener.accept() => a,
        };
        let accepted = match accepted {
            Ok(a) => a,
            Err(e) => {
                if errors.back_off(&name, &e, &stop).await {
                    continue;
                }
                break;
            }
        };
        if let Some(Err(refusal)) = fd_ceiling.map(|c| c.admit(&accepted.conn)) {
            metrics::refused(&shared.vm, direction, Refusal::FdReserve);
            tracing::warn!(vm = %shared.vm, listen, peer = %accepted.peer, reason = %refusal, "mesh: connection refused: descriptors kept in reserve");
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::refused(&shared.vm, direction, Refusal::ListenerLimit);
            tracing::warn!(vm = %shared.vm, listen, peer = %accepted.peer, "mesh: connection refused: listener limit");
            continue;
        };
        let Ok(total) = TOTAL.clone().try_acquire_owned() else {
            metrics::refused(&shared.vm, direction, Refusal::TotalLimit);
            tracing::warn!(vm = %shared.vm, listen, peer = %accepted.peer, "mesh: connection refused: mesh limit");
            continue;
        };
        let original_dst = match (&accepted.conn, transparent) {
            (Connection::Tcp(s), true) => match original_dst(s) {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::debug!(vm = %shared.vm, listen, error = %e, "mesh: no original destination");
                    None
                }
            },
            _ => None,
        };
        let conn = Accepted {
            conn: accepted.conn,
            peer: accepted.peer,
            original_dst,
        };
        let shared = shared.clone();
        match &role {
            Role::Inbound(l) => {
                let l = l.clone();
                conns.spawn(async move {
                    let _slots = (slot, total);
                    super::inbound::handle(conn, l, shared).await;
                });
            }
            Role::Outbound(l) => {
                let l = l.clone();
                conns.spawn(async move {
                    let _slots = (slot, total);
                    super::outbound::handle(conn, l, shared).await;
                });
            }
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Test helpers: a VM's context over a test CA.
#[cfg(test)]
pub mod testing {
    use std::sync::Arc;

    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use crate::mesh::identity::Credential;
    use crate::mesh::tls::testing::TestCa;
    use crate::mesh::MeshVmCtx;

    pub fn ctx(
        ca: &TestCa,
        vm: &str,
        identity: &str,
    ) -> (MeshVmCtx, watch::Sender<Option<Arc<Credential>>>) {
        let (cred_tx, cred_rx) = watch::channel(Some(ca.leaf(identity)));
        let (_anchors_tx, anchors_rx) = watch::channel(ca.anchors());
        // The anchors never change in these tests; keep the channel open.
        std::mem::forget(_anchors_tx);
        (
            MeshVmCtx {
                vm: vm.to_string(),
                owner: 0,
                identity: identity.to_string(),
                credential: cred_rx,
                anchors: anchors_rx,
                shutdown: CancellationToken::new(),
            },
            cred_tx,
        )
    }
}

#[cfg(test)]
mod tests {
    use cc_proxy_api::mesh::{InboundConfig, OutboundConfig};

    use super::*;

    /// The size of the future `f` returns.
    fn future_size<A, B, C, F>(_: impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A connection's task is sized by its largest state, and thousands of them idle per host: the passing
    /// states (detection, handshakes, connects, headers) are boxed, so the task holds little more than its
    /// copy or HTTP server while it idles (the opening states took 4.6 KiB inbound before).
    #[test]
    fn connection_tasks_stay_small() {
        const BUDGET: usize = 2048;
        let inbound = future_size(super::super::inbound::handle);
        let outbound = future_size(super::super::outbound::handle);
        assert!(
            inbound <= BUDGET,
            "inbound connection task: {inbound} bytes"
        );
        assert!(
            outbound <= BUDGET,
            "outbound connection task: {outbound} bytes"
        );
    }

    #[test]
    fn listen_uris() {
        assert!(matches!(
            ListenAddr::parse("127.0.0.1:4143", true),
            Ok(ListenAddr::Tcp(Endpoint::Tcp(a))) if a == "127.0.0.1:4143"
        ));
        assert!(matches!(
            ListenAddr::parse("transparent:0.0.0.0:4143", true),
            Ok(ListenAddr::Transparent(_))
        ));
        assert!(matches!(
            ListenAddr::parse("hvsock:///run/vm5.vsock:4140", false),
            Ok(ListenAddr::Vsock(Endpoint::HybridVsock { port: 4140, .. }))
        ));
        assert!(matches!(
            ListenAddr::parse("vsock://4294967295:4140", false),
            Ok(ListenAddr::Vsock(Endpoint::Vsock { .. }))
        ));
        for (bad, inbound) in [
            ("hvsock:///run/vm5.vsock:4140", true),
            ("vsock://3:1", true),
            ("127.0.0.1", false),
            ("transparent:", false),
            ("tcp://127.0.0.1:1", false),
            ("unix:///a", false),
            ("127.0.0.1:99999", true),
            ("hvsock://rel:1", false),
        ] {
            assert!(
                matches!(
                    ListenAddr::parse(bad, inbound),
                    Err(MeshError::InvalidListen { .. })
                ),
                "{bad}"
            );
        }
    }

    fn inbound(listen: &str, target: &str) -> InboundConfig {
        InboundConfig {
            listen: listen.into(),
            target: target.into(),
            protocol: Default::default(),
            authz: None,
        }
    }

    #[tokio::test]
    async fn a_used_address_or_bad_target_fails_and_binds_nothing() {
        let Ok(taken) = std::net::TcpListener::bind("127.0.0.1:0") else {
            panic!("bind")
        };
        let Ok(port) = taken.local_addr().map(|a| a.port()) else {
            panic!("addr")
        };
        let d = match tempfile::Builder::new().prefix("ccp-mesh-").tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let hv = format!("hvsock://{}/vm.sock:4140", d.path().display());
        let cfg = MeshConfig {
            identity: "a.ns.serviceaccount.identity.linkerd.cluster.local".into(),
            inbound: vec![inbound(&format!("127.0.0.1:{port}"), "tcp://127.0.0.1:1")],
            outbound: vec![OutboundConfig {
                listen: hv,
                destination: None,
                protocol: Default::default(),
            }],
        };
        match bind_vm(&cfg, &[]).await {
            Err(e @ MeshError::Bind { .. }) => assert!(e.to_string().contains(&port.to_string())),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("bound a used port"),
        }
        let mut cfg2 = cfg.clone();
        cfg2.inbound = vec![inbound("127.0.0.1:0", "ftp://x")];
        assert!(matches!(
            bind_vm(&cfg2, &[]).await,
            Err(MeshError::InvalidTarget { .. })
        ));
        // With the inbound fixed the hybrid-vsock socket is bound, and removed with the listeners.
        cfg2.inbound = vec![inbound("127.0.0.1:0", "tcp://127.0.0.1:1")];
        let sock = d.path().join("vm.sock_4140");
        match bind_vm(&cfg2, &[]).await {
            Ok(b) => {
                assert!(sock.exists());
                drop(b);
                assert!(!sock.exists());
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn a_regular_file_in_the_hybrid_vsock_path_is_not_replaced() {
        let d = match tempfile::Builder::new().prefix("ccp-mesh-").tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let file = d.path().join("vm.sock_4140");
        if let Err(e) = std::fs::write(&file, b"not a socket") {
            panic!("{e}");
        }
        let cfg = MeshConfig {
            identity: "a.ns.serviceaccount.identity.linkerd.cluster.local".into(),
            inbound: vec![],
            outbound: vec![OutboundConfig {
                listen: format!("hvsock://{}/vm.sock:4140", d.path().display()),
                destination: None,
                protocol: Default::default(),
            }],
        };
        assert!(matches!(
            bind_vm(&cfg, &[]).await,
            Err(MeshError::Bind { .. })
        ));
        assert_eq!(
            std::fs::read(&file).ok().as_deref(),
            Some(&b"not a socket"[..])
        );
    }
}

/// The data plane end to end over loopback: two VMs' listeners with a test CA, real sockets both sides.
#[cfg(test)]
mod e2e {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use cc_proxy_api::mesh::{
        Authz, DestinationConfig, InboundConfig, MeshConfig, MeshProtocol, OutboundConfig,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::testing::ctx;
    use super::*;
    use crate::mesh::tls::testing::TestCa;

    const A: &str = "a.default.serviceaccount.identity.linkerd.cluster.local";
    const B: &str = "b.default.serviceaccount.identity.linkerd.cluster.local";
    const C: &str = "c.default.serviceaccount.identity.linkerd.cluster.local";
    const T: Duration = Duration::from_secs(10);

    struct Running {
        addrs: Vec<Option<SocketAddr>>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Running {
        fn addr(&self, i: usize) -> SocketAddr {
            match self.addrs.get(i).copied().flatten() {
                Some(a) => a,
                None => panic!("listener {i} has no TCP address"),
            }
        }

        async fn stop(self) {
            self.stop.cancel();
            assert!(
                tokio::time::timeout(T, self.task).await.is_ok(),
                "serve_vm did not return after shutdown"
            );
        }
    }

    async fn start(ca: &TestCa, vm: &str, identity: &str, cfg: MeshConfig) -> Running {
        let bound = match bind_vm(&cfg, &[]).await {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        let addrs = bound.tcp_addrs();
        let (c, cred_tx) = ctx(ca, vm, identity);
        let stop = c.shutdown.clone();
        let task = tokio::spawn(async move {
            let _keep = cred_tx;
            serve_vm(bound, Arc::new(cfg), c).await
        });
        Running { addrs, stop, task }
    }

    fn inbound(target: SocketAddr, protocol: MeshProtocol, authz: Option<Authz>) -> InboundConfig {
        InboundConfig {
            listen: "127.0.0.1:0".into(),
            target: format!("tcp://{target}"),
            protocol,
            authz,
        }
    }

    fn outbound_to(
        ep: SocketAddr,
        identity: Option<&str>,
        opaque_port: Option<u16>,
    ) -> OutboundConfig {
        OutboundConfig {
            listen: "127.0.0.1:0".into(),
            destination: Some(DestinationConfig {
                name: None,
                endpoints: vec![ep.to_string()],
                identity: identity.map(str::to_string),
                opaque_transport_port: opaque_port,
            }),
            protocol: MeshProtocol::Auto,
        }
    }

    /// Echo every connection's bytes until its end of stream, then close.
    async fn echo_server() -> SocketAddr {
        let Ok(l) = TcpListener::bind("127.0.0.1:0").await else {
            panic!("bind")
        };
        let Ok(addr) = l.local_addr() else {
            panic!("addr")
        };
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    /// An HTTP/1.1 server answering each request with its `l5d-client-id` header (or `none`) as the body.
    async fn http_server() -> SocketAddr {
        use hyper::service::service_fn;
        let Ok(l) = TcpListener::bind("127.0.0.1:0").await else {
            panic!("bind")
        };
        let Ok(addr) = l.local_addr() else {
            panic!("addr")
        };
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let id = req
                            .headers()
                            .get_all("l5d-client-id")
                            .iter()
                            .map(|v| v.to_str().unwrap_or("?").to_string())
                            .collect::<Vec<_>>()
                            .join(",");
                        let body = if id.is_empty() {
                            "none".to_string()
                        } else {
                            id
                        };
                        let body = format!("{} {}", req.version() == hyper::Version::HTTP_11, body);
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    /// A loopback address nobody listens on.
    async fn closed_port() -> SocketAddr {
        let Ok(l) = TcpListener::bind("127.0.0.1:0").await else {
            panic!("bind")
        };
        match l.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        }
    }

    /// Send one HTTP/1.1 request (with `Connection: close`) and return the whole response.
    async fn http_get(addr: SocketAddr, extra: &str) -> String {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            panic!("connect {addr}")
        };
        let req = format!("GET /x HTTP/1.1\r\nHost: svc\r\n{extra}Connection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            panic!("write");
        }
        let mut out = Vec::new();
        match tokio::time::timeout(T, s.read_to_end(&mut out)).await {
            Ok(Ok(_)) => String::from_utf8_lossy(&out).into_owned(),
            other => panic!("read: {other:?}"),
        }
    }

    #[tokio::test]
    async fn opaque_echo_with_half_close_through_outbound_and_inbound() {
        let ca = TestCa::new();
        let echo = echo_server().await;
        let b = start(
            &ca,
            "b",
            B,
            MeshConfig {
                identity: B.into(),
                inbound: vec![inbound(echo, MeshProtocol::Opaque, None)],
                outbound: vec![],
            },
        )
        .await;
        let a = start(
            &ca,
            "a",
            A,
            MeshConfig {
                identity: A.into(),
                inbound: vec![],
                outbound: vec![outbound_to(b.addr(0), Some(B), None)],
            },
        )
        .await;
        let Ok(mut c) = TcpStream::connect(a.addr(0)).await else {
            panic!("connect")
        };
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = c.split();
        let send = async {
            if w.write_all(&payload).await.is_err() || w.shutdown().await.is_err() {
                panic!("write");
            }
        };
        let mut got = Vec::new();
        let recv = tokio::time::timeout(T, r.read_to_end(&mut got));
        let ((), read) = tokio::join!(send, recv);
        assert!(matches!(read, Ok(Ok(_))), "{read:?}");
        assert!(
            got == payload,
            "echoed {} of {} bytes",
            got.len(),
            payload.len()
        );
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test]
    async fn http_gets_the_client_identity_and_unauthorized_peers_get_403() {
        let ca = TestCa::new();
        let server = http_server().await;
        let only_c = Authz {
            identities: vec![C.into()],
            unauthenticated: false,
        };
        let open = Authz {
            identities: vec![],
            unauthenticated: true,
        };
        let b = start(
            &ca,
            "b",
            B,
            MeshConfig {
                identity: B.into(),
                inbound: vec![
                    inbound(server, MeshProtocol::Auto, None),
                    inbound(server, MeshProtocol::Auto, Some(only_c)),
                    inbound(server, MeshProtocol::Auto, Some(open)),
                ],
                outbound: vec![],
            },
        )
        .await;
        let a = start(
            &ca,
            "a",
            A,
            MeshConfig {
                identity: A.into(),
                inbound: vec![],
                outbound: vec![
                    outbound_to(b.addr(0), Some(B), None),
                    outbound_to(b.addr(1), Some(B), None),
                    outbound_to(closed_port().await, Some(B), None),
                ],
            },
        )
        .await;
        // a's request carries a's identity, never a forged one.
        let r = http_get(a.addr(0), "l5d-client-id: forged\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with(&format!("true {A}")), "{r}");
        // An endpoint nobody listens on: 502 from a's outbound side, naming what it could not reach.
        let r = http_get(a.addr(2), "").await;
        assert!(r.starts_with("HTTP/1.1 502"), "{r}");
        assert!(
            r.to_ascii_lowercase()
                .contains("l5d-proxy-error: cannot reach"),
            "{r}"
        );
        // b's second listener only allows c: 403 from the proxy, naming the reason.
        let r = http_get(a.addr(1), "").await;
        assert!(r.starts_with("HTTP/1.1 403"), "{r}");
        assert!(
            r.to_ascii_lowercase()
                .contains("l5d-proxy-error: unauthorized"),
            "{r}"
        );
        // Plaintext straight to the first listener (authenticated only): 403.
        let r = http_get(b.addr(0), "").await;
        assert!(r.starts_with("HTTP/1.1 403"), "{r}");
        // Plaintext to the third (unauthenticated allowed): served, the forged identity stripped.
        let r = http_get(b.addr(2), "l5d-client-id: forged\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("true none"),
            "{r}"
        );
        let refused = metrics::METRICS
            .refused
            .get_or_create(&metrics::RefusalLabels {
                vm: "b".into(),
                direction: "inbound",
                reason: "unauthorized",
            })
            .get();
        assert!(refused >= 1);
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test]
    async fn a_transport_header_reaches_its_port_and_tcp_denials_close() {
        let ca = TestCa::new();
        let echo = echo_server().await;
        // b's inbound target points at a closed port; the transport header names the echo server's port.
        let closed_addr = closed_port().await;
        let only_c = Authz {
            identities: vec![C.into()],
            unauthenticated: false,
        };
        let b = start(
            &ca,
            "b",
            B,
            MeshConfig {
                identity: B.into(),
                inbound: vec![
                    inbound(closed_addr, MeshProtocol::Auto, None),
                    inbound(echo, MeshProtocol::Opaque, Some(only_c)),
                ],
                outbound: vec![],
            },
        )
        .await;
        let a = start(
            &ca,
            "a",
            A,
            MeshConfig {
                identity: A.into(),
                inbound: vec![],
                outbound: vec![
                    outbound_to(b.addr(0), Some(B), Some(echo.port())),
                    outbound_to(b.addr(1), Some(B), None),
                ],
            },
        )
        .await;
        let Ok(mut c) = TcpStream::connect(a.addr(0)).await else {
            panic!("connect")
        };
        let mut back = [0u8; 5];
        let r = tokio::time::timeout(T, async {
            c.write_all(b"hello").await?;
            c.read_exact(&mut back).await
        })
        .await;
        assert!(matches!(r, Ok(Ok(_))), "{r:?}");
        assert_eq!(&back, b"hello");
        drop(c);
        // Opaque TCP from a to a listener that only allows c: closed without a byte.
        let Ok(mut c) = TcpStream::connect(a.addr(1)).await else {
            panic!("connect")
        };
        let _ = c.write_all(b"hello").await;
        let mut buf = Vec::new();
        let r = tokio::time::timeout(T, c.read_to_end(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?} {buf:?}");
        // Half-closed by b: a keeps the guest's side open until the guest closes it.
        drop(c);
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test]
    async fn a_proxy_v2_header_names_the_destination() {
        use ppp::v2::{Builder, Command, Protocol, Version};
        let ca = TestCa::new();
        let echo = echo_server().await;
        let d = match tempfile::Builder::new().prefix("ccp-mesh-").tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let a = start(
            &ca,
            "a",
            A,
            MeshConfig {
                identity: A.into(),
                inbound: vec![],
                outbound: vec![OutboundConfig {
                    listen: format!("hvsock://{}/vm.sock:4140", d.path().display()),
                    destination: None,
                    protocol: MeshProtocol::Opaque,
                }],
            },
        )
        .await;
        // What Firecracker does for a guest connecting to host port 4140.
        let sock = d.path().join("vm.sock_4140");
        let Ok(mut c) = tokio::net::UnixStream::connect(&sock).await else {
            panic!("connect {}", sock.display())
        };
        let src: SocketAddr = SocketAddr::from(([10, 0, 0, 2], 40000));
        let Ok(header) =
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, echo))
                .build()
        else {
            panic!("header")
        };
        let mut back = [0u8; 4];
        let r = tokio::time::timeout(T, async {
            c.write_all(&header).await?;
            c.write_all(b"ping").await?;
            c.read_exact(&mut back).await
        })
        .await;
        assert!(matches!(r, Ok(Ok(_))), "{r:?}");
        assert_eq!(&back, b"ping");
        drop(c);
        a.stop().await;
        assert!(!sock.exists(), "the hybrid-vsock socket was not removed");
    }
}
