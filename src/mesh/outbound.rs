//! Outbound: the guest's connection to another workload, through one of its VM's outbound listeners.
//!
//! States of a connection:
//! 1. `Destination`: where it goes: the listener's endpoint set ([`Destination`]: fixed endpoints, or a
//!    discovered name's), else the original destination of a `transparent:` listener (`SO_ORIGINAL_DST`),
//!    else a PROXY protocol v2 header the guest sends first (read with the `ppp` crate, at most
//!    [`MAX_PROXY_HEADER`] bytes within the handshake timeout; `LOCAL` or non-IP headers refused).
//! 2. `Protocol`: unless the listener is `opaque` or its fixed endpoints take the transport header, the
//!    guest's first bytes are examined (bounded like inbound detection): HTTP/1 or HTTP/2 requests are served
//!    with hyper and sent over pooled connections (`http`); anything else is opaque.
//! 3. `Choose`: an endpoint of the set that is not ejected, by the power of two choices over the connections
//!    open to each; when none is ready the connection waits at most `--mesh-failfast-timeout-ms`, then is
//!    refused (`reason="unavailable"`).
//! 4. `Connect`: TCP to the chosen address within the connect timeout.
//! 5. `Handshake`: the endpoint has an identity (its own, or the listener's `destination.identity`): TLS 1.3
//!    with the VM's certificate, SNI = its `server_name` when the destination service gives one, else that
//!    identity; either way the server's SAN must equal the identity (`tls="true"`,
//!    `server_id`); no identity: plaintext (`tls="no_identity"`). An endpoint with an opaque-transport hint
//!    (`opaque_transport_port` of fixed endpoints) gets ALPN `transport.l5d.io/v1` and the transport header
//!    naming that port first. A failed connect or handshake ejects the endpoint (`balance`).
//! 6. `Forward`: opaque bytes copied both ways with half-close (`copy`); HTTP request by request (an
//!    unreachable destination answers 502 with `l5d-proxy-error`).
//!
//! Refusals (no destination, a bad header, no ready endpoint, an unreachable endpoint, a failed handshake)
//! close the guest's connection and are counted in `cc_proxy_mesh_refused_total{direction="outbound"}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use cc_proxy_api::mesh::{EndpointStatus, MeshProtocol, OutboundConfig};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::balance::{self, Destination, Member};
use super::copy::{self, Transferred};
use super::detect::{self, Detected};
use super::discover::{EndpointSet, Hint};
use super::http::{self, Upstream};
use super::inbound::BoxIo;
use super::listener::{limits, Accepted, MeshError, VmShared};
use super::metrics::{self, Direction, Refusal, TcpConn, TlsLabel};
use super::transport_header::{self, TransportHeader};
use crate::transport::Rewind;

/// Most bytes of a PROXY v2 header (16 fixed bytes and the addresses; TLVs beyond this are refused).
pub const MAX_PROXY_HEADER: usize = 536;

/// Where a listener's connections go.
pub enum Dest {
    /// An endpoint set: fixed endpoints (`destination.endpoints`) or a discovered name.
    Set(Arc<Destination>),
    /// The original destination, else a PROXY v2 header.
    Dynamic,
}

/// One outbound listener's configuration, parsed.
pub struct OutboundListener {
    pub cfg: OutboundConfig,
    pub dest: Dest,
    /// The listener's `destination.identity`: every fixed endpoint's, and a discovered endpoint's that has
    /// none; `None`: plaintext.
    pub identity: Option<String>,
    /// Fixed endpoints behind the transport header: the guest's bytes are not examined.
    pub opaque_transport_port: Option<u16>,
    /// Pooled HTTP connections to the endpoint set, made at the first HTTP connection.
    pool: std::sync::OnceLock<Arc<Upstream>>,
}

impl OutboundListener {
    /// `discovered`: the endpoint set of a named destination (its lease held by the caller as long as the
    /// listener); `None`: the configuration's fixed endpoints, or no destination.
    pub fn new(
        cfg: &OutboundConfig,
        discovered: Option<watch::Receiver<Arc<EndpointSet>>>,
    ) -> Result<OutboundListener, MeshError> {
        let identity = cfg.destination.as_ref().and_then(|d| d.identity.clone());
        if let Some(id) = &identity {
            if ServerName::try_from(id.as_str()).is_err() {
                return Err(MeshError::InvalidIdentity {
                    identity: id.clone(),
                });
            }
        }
        let (dest, opaque) = match (discovered, &cfg.destination) {
            (Some(rx), _) => (
                Dest::Set(Arc::new(Destination::discovered(rx, identity.clone()))),
                None,
            ),
            (None, Some(d)) if !d.endpoints.is_empty() => (
                Dest::Set(Arc::new(Destination::fixed(d)?)),
                d.opaque_transport_port,
            ),
            (None, _) => (Dest::Dynamic, None),
        };
        Ok(OutboundListener {
            cfg: cfg.clone(),
            dest,
            identity,
            opaque_transport_port: opaque,
            pool: std::sync::OnceLock::new(),
        })
    }

    /// The listener serves VM `vm`: its endpoints are counted in `cc_proxy_mesh_endpoints` while it lives.
    pub fn track(&self, vm: &str) {
        if let Dest::Set(d) = &self.dest {
            metrics::track_destination(vm, &self.cfg.listen, d);
        }
    }

    /// Each endpoint of the listener's destination, its state and load (empty without an endpoint set).
    pub fn status(&self) -> Vec<EndpointStatus> {
        match &self.dest {
            Dest::Set(d) => d.status(),
            Dest::Dynamic => Vec::new(),
        }
    }
}

/// Wait (at most `--mesh-failfast-timeout-ms`) until a member of `dest` may be picked, and pick one by the
/// power of two choices over open connections.
async fn ready_member(dest: &Destination) -> Result<Arc<Member>, OutboundError> {
    let deadline = tokio::time::Instant::now() + limits().failfast_timeout;
    let mut changes = dest.subscribe();
    loop {
        if let Some(m) = dest.choose() {
            return Ok(m);
        }
        // Nothing ready: wake when the first ejection ends or the set changes.
        let now = Instant::now();
        let wake = dest
            .members()
            .iter()
            .filter_map(|m| m.ejected_until(now))
            .min()
            .map(|t| tokio::time::Instant::from_std(t).min(deadline))
            .unwrap_or(deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            r = changes.changed() => if r.is_err() {
                // A fixed set never changes: only the ejections' ends matter.
                tokio::time::sleep_until(wake).await;
            },
        }
        if tokio::time::Instant::now() >= deadline && dest.choose().is_none() {
            return Err(OutboundError::Unavailable);
        }
    }
}

/// Connect to `member` (its identity, transport hint); a failed connect or handshake ejects it.
async fn connect_member(
    vm: &VmShared,
    listener: &str,
    member: &Member,
    transport_port: Option<u16>,
) -> Result<BoxIo, OutboundError> {
    let e = &member.endpoint;
    match open_upstream(
        vm,
        e.addr,
        e.identity.as_deref(),
        e.server_name.as_deref(),
        transport_port,
    )
    .await
    {
        Ok(io) => {
            member.succeeded();
            Ok(io)
        }
        Err(err) => {
            if err.ejects() && member.failed() {
                metrics::ejected(&vm.vm, listener);
                tracing::info!(vm = %vm.vm, endpoint = %e.addr, error = %err, "mesh outbound: endpoint ejected");
            }
            Err(err)
        }
    }
}

/// The transport port a member's hint asks for.
fn transport_port(member: &Member) -> Option<u16> {
    match member.endpoint.hint {
        Hint::Opaque { transport_port } if member.endpoint.identity.is_some() => transport_port,
        _ => None,
    }
}

/// Why an outbound connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("no destination: no fixed endpoint, original destination or PROXY header")]
    NoDestination,
    #[error("no endpoint of the destination is ready")]
    Unavailable,
    #[error("PROXY v2 header: {0}")]
    ProxyHeader(String),
    #[error("PROXY v2 header did not arrive in time")]
    ProxyHeaderTimeout,
    #[error("reading the PROXY v2 header: {0}")]
    ProxyIo(std::io::Error),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("the VM has no usable certificate")]
    NoCredential,
    #[error("TLS with {addr} ({identity}): {source}")]
    Handshake {
        addr: SocketAddr,
        identity: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {0} timed out")]
    HandshakeTimeout(SocketAddr),
    #[error("sending the transport header: {0}")]
    TransportHeader(std::io::Error),
    #[error("detecting the guest's protocol: {0}")]
    Detect(std::io::Error),
    #[error(transparent)]
    Http(http::HttpError),
    #[error(transparent)]
    Copy(#[from] copy::CopyError),
}

impl OutboundError {
    /// Whether the endpoint is at fault (it cannot be reached, or fails the handshake): it is ejected.
    fn ejects(&self) -> bool {
        matches!(
            self,
            OutboundError::Connect { .. }
                | OutboundError::ConnectTimeout(_)
                | OutboundError::Handshake { .. }
                | OutboundError::HandshakeTimeout(_)
                | OutboundError::TransportHeader(_)
        )
    }

    fn refusal(&self) -> Option<Refusal> {
        match self {
            OutboundError::NoDestination => Some(Refusal::NoDestination),
            OutboundError::Unavailable => Some(Refusal::Unavailable),
            OutboundError::ProxyHeader(_)
            | OutboundError::ProxyHeaderTimeout
            | OutboundError::ProxyIo(_) => Some(Refusal::Header),
            OutboundError::Connect { .. } | OutboundError::ConnectTimeout(_) => {
                Some(Refusal::Connect)
            }
            OutboundError::NoCredential
            | OutboundError::Handshake { .. }
            | OutboundError::HandshakeTimeout(_)
            | OutboundError::TransportHeader(_) => Some(Refusal::Handshake),
            OutboundError::Copy(_) | OutboundError::Detect(_) | OutboundError::Http(_) => None,
        }
    }
}

/// Serve one accepted outbound connection to its end.
pub async fn handle(acc: Accepted, l: Arc<OutboundListener>, vm: Arc<VmShared>) {
    let peer = acc.peer.clone();
    if let Err(e) = run(acc, &l, &vm).await {
        if let Some(r) = e.refusal() {
            metrics::refused(&vm.vm, Direction::Outbound, r);
            tracing::info!(vm = %vm.vm, listen = %l.cfg.listen, %peer, error = %e, "mesh outbound: refused");
        } else {
            tracing::debug!(vm = %vm.vm, listen = %l.cfg.listen, %peer, error = %e, "mesh outbound: ended");
        }
    }
}

/// Read a PROXY v2 header off the front of `io`; returns the destination it names.
pub async fn read_proxy_header<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
) -> Result<SocketAddr, OutboundError> {
    use ppp::v2::{Addresses, Command, Header};
    let mut fixed = [0u8; 16];
    io.read_exact(&mut fixed)
        .await
        .map_err(OutboundError::ProxyIo)?;
    if &fixed[..12] != ppp::v2::PROTOCOL_PREFIX {
        return Err(OutboundError::ProxyHeader(
            "not a PROXY protocol v2 signature".into(),
        ));
    }
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if 16 + len > MAX_PROXY_HEADER {
        return Err(OutboundError::ProxyHeader(format!(
            "{} bytes is longer than {MAX_PROXY_HEADER}",
            16 + len
        )));
    }
    let mut all = fixed.to_vec();
    all.resize(16 + len, 0);
    io.read_exact(&mut all[16..])
        .await
        .map_err(OutboundError::ProxyIo)?;
    let header =
        Header::try_from(&all[..]).map_err(|e| OutboundError::ProxyHeader(e.to_string()))?;
    if header.command != Command::Proxy {
        return Err(OutboundError::NoDestination);
    }
    match header.addresses {
        Addresses::IPv4(a) => Ok(SocketAddr::from((
            a.destination_address,
            a.destination_port,
        ))),
        Addresses::IPv6(a) => Ok(SocketAddr::from((
            a.destination_address,
            a.destination_port,
        ))),
        Addresses::Unspecified | Addresses::Unix(_) => Err(OutboundError::ProxyHeader(
            "the header names no IP destination".into(),
        )),
    }
}

/// Open a connection to `addr`: TCP, then TLS requiring `identity` as the server's SAN (plaintext without
/// one), with `server_name` as SNI when given (else the identity), then the transport header naming
/// `transport_port`.
pub async fn open_upstream(
    vm: &VmShared,
    addr: SocketAddr,
    identity: Option<&str>,
    server_name: Option<&str>,
    transport_port: Option<u16>,
) -> Result<BoxIo, OutboundError> {
    let lim = limits();
    let tcp = match tokio::time::timeout(lim.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(OutboundError::Connect { addr, source }),
        Err(_) => return Err(OutboundError::ConnectTimeout(addr)),
    };
    let _ = tcp.set_nodelay(true);
    let Some(identity) = identity else {
        return Ok(Box::new(tcp));
    };
    let configs = vm.configs().ok_or(OutboundError::NoCredential)?;
    let handshake_err = |source| OutboundError::Handshake {
        addr,
        identity: identity.to_string(),
        source,
    };
    let (config, name) = configs
        .client_for(transport_port.is_some(), identity, server_name)
        .map_err(|e| handshake_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut tls = match tokio::time::timeout(
        lim.handshake_timeout,
        Box::pin(connector.connect(name, Rewind::new(Vec::new(), tcp))),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(handshake_err(source)),
        Err(_) => return Err(OutboundError::HandshakeTimeout(addr)),
    };
    if let Some(port) = transport_port {
        let header = transport_header::encode(&TransportHeader {
            port,
            name: None,
            protocol: None,
        });
        tls.write_all(&header)
            .await
            .map_err(OutboundError::TransportHeader)?;
    }
    Ok(Box::new(tls))
}

/// The connector of pooled connections to one member: its identity and hint; a failure ejects it.
fn member_connector(vm: Arc<VmShared>, listener: String, member: Arc<Member>) -> http::ConnectFn {
    Arc::new(move || {
        let (vm, listener, m) = (vm.clone(), listener.clone(), member.clone());
        Box::pin(async move {
            let guard = m.open_guard();
            match connect_member(&vm, &listener, &m, transport_port(&m)).await {
                Ok(io) => Ok(http::UpstreamIo {
                    io,
                    _hold: Some(Box::new(guard)),
                    endpoint: Some(Arc::from(m.addr().to_string())),
                }),
                Err(e) => {
                    if let Some(r) = e.refusal() {
                        metrics::refused(&vm.vm, Direction::Outbound, r);
                    }
                    Err(Box::new(e) as http::BoxError)
                }
            }
        })
    })
}

/// Requests to an endpoint set, balanced per request (each endpoint with its own pools).
fn balanced_upstream(
    vm: Arc<VmShared>,
    listener: String,
    dest: Arc<Destination>,
    name: String,
) -> Arc<Upstream> {
    let services = Arc::new(move |m: &Arc<Member>| {
        let pools = Upstream::with_connector(
            m.addr().to_string(),
            member_connector(vm.clone(), listener.clone(), m.clone()),
        );
        balance::endpoint_service(m.clone(), Arc::new(pools))
    });
    Arc::new(Upstream::balanced(
        name,
        Arc::new(balance::HttpBalancer::new(dest, services)),
    ))
}

/// Pooled HTTP connections to one address (an original destination or a PROXY header's), over mTLS with
/// the listener's identity (plaintext without one).
fn addr_upstream(vm: Arc<VmShared>, addr: SocketAddr, identity: Option<String>) -> Arc<Upstream> {
    let connect: http::ConnectFn = Arc::new(move || {
        let (vm, identity) = (vm.clone(), identity.clone());
        Box::pin(async move {
            match open_upstream(&vm, addr, identity.as_deref(), None, None).await {
                Ok(io) => Ok(http::UpstreamIo {
                    io,
                    _hold: None,
                    endpoint: Some(Arc::from(addr.to_string())),
                }),
                Err(e) => {
                    if let Some(r) = e.refusal() {
                        metrics::refused(&vm.vm, Direction::Outbound, r);
                    }
                    Err(Box::new(e) as http::BoxError)
                }
            }
        })
    });
    Arc::new(Upstream::with_connector(addr.to_string(), connect))
}

/// What a listener's destination is called in logs and error responses.
fn dest_name(cfg: &OutboundConfig) -> String {
    match &cfg.destination {
        Some(d) => d.name.clone().unwrap_or_else(|| d.endpoints.join(",")),
        None => cfg.listen.clone(),
    }
}

async fn run(acc: Accepted, l: &OutboundListener, vm: &Arc<VmShared>) -> Result<(), OutboundError> {
    let lim = limits();
    let mut guest = acc.conn;
    let addr = match &l.dest {
        Dest::Set(_) => None,
        Dest::Dynamic => match acc.original_dst {
            Some(a) => Some(a),
            None => {
                let a = Box::pin(tokio::time::timeout(
                    lim.handshake_timeout,
                    read_proxy_header(&mut guest),
                ))
                .await
                .map_err(|_| OutboundError::ProxyHeaderTimeout)??;
                Some(a)
            }
        },
    };
    let tls_label = |identity: Option<&str>| {
        if identity.is_some() {
            TlsLabel::Yes
        } else {
            TlsLabel::NoIdentity
        }
    };
    // HTTP from the guest (not for the transport header, which carries opaque bytes): requests go over
    // pooled connections.
    let mut guest: BoxIo = Box::new(guest);
    let opaque_set = matches!(&l.dest, Dest::Set(set) if set.is_opaque());
    if l.opaque_transport_port.is_none() && l.cfg.protocol != MeshProtocol::Opaque && !opaque_set {
        // The passing states (detection, connects, headers) are boxed: a task is sized by its largest
        // state, and an idle connection, waiting in its copy or HTTP server, should not carry their space.
        let (prefix, d) = Box::pin(detect::http(&mut guest, lim.detect_timeout))
            .await
            .map_err(OutboundError::Detect)?;
        guest = Box::new(Rewind::new(prefix, guest));
        let d = match (l.cfg.protocol, d) {
            (MeshProtocol::Auto, d) => d,
            (_, Detected::Opaque) => Detected::Http1,
            (_, d) => d,
        };
        if d != Detected::Opaque {
            let pool = match (&l.dest, addr) {
                (Dest::Set(set), _) => l
                    .pool
                    .get_or_init(|| {
                        balanced_upstream(
                            vm.clone(),
                            l.cfg.listen.clone(),
                            set.clone(),
                            dest_name(&l.cfg),
                        )
                    })
                    .clone(),
                (Dest::Dynamic, Some(a)) => addr_upstream(vm.clone(), a, l.identity.clone()),
                (Dest::Dynamic, None) => return Err(OutboundError::NoDestination),
            };
            let tls = tls_label(l.identity.as_deref());
            let counts = Arc::new(Transferred::default());
            let conn_metrics =
                TcpConn::open(&vm.vm, Direction::Outbound, tls, l.identity.as_deref());
            let io = metrics::Counted::new(guest, counts.clone());
            let r = Box::pin(http::serve_inbound(
                Box::new(io),
                d == Detected::Http2,
                Arc::new(http::HttpSession {
                    direction: Direction::Outbound,
                    vm: vm.vm.clone(),
                    owner: vm.owner,
                    peer: l.identity.clone(),
                    tls,
                    denied: None,
                    upstream: pool,
                    guest: match l.cfg.protocol {
                        MeshProtocol::Http1 => http::GuestProtocol::Http1,
                        MeshProtocol::Http2 => http::GuestProtocol::Http2,
                        MeshProtocol::Auto | MeshProtocol::Opaque => {
                            http::GuestProtocol::AsReceived
                        }
                    },
                    series: std::sync::Mutex::new(None),
                }),
                vm.shutdown.clone(),
            ))
            .await;
            conn_metrics.close(&counts, None);
            return r.map_err(OutboundError::Http);
        }
    }
    // Opaque: one connection to one endpoint.
    let (server, identity, _open) = match (&l.dest, addr) {
        (Dest::Set(set), _) => {
            let m = Box::pin(ready_member(set)).await?;
            let open = m.open_guard();
            let io = Box::pin(connect_member(vm, &l.cfg.listen, &m, transport_port(&m))).await?;
            (io, m.endpoint.identity.clone(), Some(open))
        }
        (Dest::Dynamic, Some(a)) => {
            let io = Box::pin(open_upstream(vm, a, l.identity.as_deref(), None, None)).await?;
            (io, l.identity.clone(), None)
        }
        (Dest::Dynamic, None) => return Err(OutboundError::NoDestination),
    };
    let counts = Transferred::default();
    let conn_metrics = TcpConn::open(
        &vm.vm,
        Direction::Outbound,
        tls_label(identity.as_deref()),
        identity.as_deref(),
    );
    let r = copy::bidirectional(guest, server, &counts).await;
    conn_metrics.close(&counts, r.as_ref().err().and_then(copy::CopyError::errno));
    Ok(r?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn proxy_v2_headers_name_the_destination_and_bad_ones_are_refused() {
        use ppp::v2::{Builder, Command, Protocol, Version};
        let src: SocketAddr = "10.0.0.1:5555"
            .parse()
            .unwrap_or(SocketAddr::from(([0; 4], 0)));
        let dst: SocketAddr = "10.0.0.7:4143"
            .parse()
            .unwrap_or(SocketAddr::from(([0; 4], 0)));
        let Ok(mut wire) =
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst))
                .build()
        else {
            panic!("build")
        };
        wire.extend_from_slice(b"rest");
        let mut r = &wire[..];
        assert_eq!(read_proxy_header(&mut r).await.ok(), Some(dst));
        assert_eq!(r, b"rest");

        // LOCAL: no destination.
        let Ok(local) = Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build() else {
            panic!("build")
        };
        assert!(matches!(
            read_proxy_header(&mut &local[..]).await,
            Err(OutboundError::NoDestination)
        ));
        // Not a PROXY header at all.
        assert!(matches!(
            read_proxy_header(&mut &b"GET / HTTP/1.1\r\nHost: x\r\n"[..]).await,
            Err(OutboundError::ProxyHeader(_))
        ));
        // Too long.
        let mut long = wire[..16].to_vec();
        long[14..16].copy_from_slice(&2000u16.to_be_bytes());
        assert!(matches!(
            read_proxy_header(&mut &long[..]).await,
            Err(OutboundError::ProxyHeader(_))
        ));
        // Truncated.
        assert!(matches!(
            read_proxy_header(&mut &wire[..20]).await,
            Err(OutboundError::ProxyIo(_))
        ));
    }
}
