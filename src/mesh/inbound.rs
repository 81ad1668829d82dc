//! Inbound: a peer's connection to one of the VM's inbound listeners, forwarded to the guest's service.
//!
//! States of a connection ([`Stage`] names those whose I/O errors are logged):
//! 1. `Detect`: peek at the first bytes for a TLS ClientHello (bounded by the detection timeout and
//!    [`super::detect::MAX_CLIENT_HELLO`]).
//! 2. `Handshake`: the SNI is the VM's identity: terminate TLS 1.3 with the VM's certificate, asking for
//!    (not requiring) a client certificate; the client's identity is its leaf's first SAN. Another SNI or no
//!    TLS: the connection is unauthenticated and its bytes pass as they are (`tls="no_tls"`).
//! 3. `Authorize`: the listener's policy ([`authorize`]): no `authz`: any authenticated client;
//!    `identities`: those only (empty: any authenticated); `unauthenticated`: plaintext peers too. Denied: a
//!    403 with `l5d-proxy-error` for every HTTP request, a close for anything else; counted
//!    (`cc_proxy_mesh_refused_total{reason}`) and logged.
//! 4. `TransportHeader`: a connection that negotiated ALPN `transport.l5d.io/v1` starts with Linkerd's
//!    transport header; it must be authenticated; it goes to the header's port on the target's host.
//! 5. `Protocol`: `auto` detects HTTP/1, HTTP/2 (prior knowledge) or opaque, and the guest gets requests in
//!    the version the peer spoke; `http1`/`http2` say what the guest speaks: the peer's HTTP version is still
//!    detected and requests are converted (an HTTP/2 client reaches an HTTP/1.1-only guest); `opaque` skips
//!    detection (server-speaks-first protocols are not stalled).
//! 6. `Forward`: HTTP through `http` (pooled connections to the target); opaque through `copy`.

use std::sync::Arc;

use cc_proxy_api::mesh::{Authz, InboundConfig, MeshProtocol};
use tokio::io::{AsyncRead, AsyncWrite};

use super::copy::{self, Transferred};
use super::detect::{self, Detected, TlsDetect};
use super::http::{self, Upstream};
use super::listener::{limits, Accepted, MeshError, VmShared};
use super::metrics::{self, Direction, Refusal, TcpConn, TlsLabel};
use super::tls;
use super::transport_header::{self, SessionProtocol};
use crate::transport::{Endpoint, Rewind, TransportError};

/// Any decrypted (or plaintext) byte stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// One inbound listener's configuration, parsed.
pub struct InboundListener {
    pub cfg: InboundConfig,
    pub target: Endpoint,
    /// Pooled HTTP connections to the target.
    pub upstream: Arc<Upstream>,
}

impl InboundListener {
    pub fn new(cfg: &InboundConfig) -> Result<InboundListener, MeshError> {
        let target = Endpoint::parse(&cfg.target).map_err(|source| MeshError::InvalidTarget {
            target: cfg.target.clone(),
            source,
        })?;
        Ok(InboundListener {
            cfg: cfg.clone(),
            upstream: Arc::new(Upstream::new(target.clone())),
            target,
        })
    }
}

/// Who the peer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A verified client certificate's identity.
    Authenticated(String),
    /// Plaintext, another SNI, or TLS without a client certificate.
    Unauthenticated,
}

impl Peer {
    pub fn id(&self) -> Option<&str> {
        match self {
            Peer::Authenticated(id) => Some(id),
            Peer::Unauthenticated => None,
        }
    }
}

/// The policy's answer for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(Refusal),
}

/// Apply a listener's policy to a peer.
pub fn authorize(authz: Option<&Authz>, peer: &Peer) -> Decision {
    let default = Authz::default();
    let authz = authz.unwrap_or(&default);
    match peer {
        Peer::Authenticated(id) => {
            if authz.identities.is_empty() || authz.identities.iter().any(|i| i == id) {
                Decision::Allow
            } else {
                Decision::Deny(Refusal::Unauthorized)
            }
        }
        Peer::Unauthenticated if authz.unauthenticated => Decision::Allow,
        Peer::Unauthenticated => Decision::Deny(Refusal::Unauthenticated),
    }
}

/// Where a connection was when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Detect,
    Handshake,
    Protocol,
}

/// Why an inbound connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("{stage:?}: {source}")]
    Io {
        stage: Stage,
        source: std::io::Error,
    },
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("the VM has no usable certificate")]
    NoCredential,
    #[error("transport header: {0}")]
    Header(#[from] transport_header::HeaderError),
    #[error("transport header did not arrive in time")]
    HeaderTimeout,
    #[error("a transport header needs a target with ports; {0} has none")]
    NoPort(Endpoint),
    #[error("refused: {0:?}")]
    Denied(Refusal),
    #[error(transparent)]
    Connect(#[from] TransportError),
    #[error(transparent)]
    Copy(#[from] copy::CopyError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
}

impl InboundError {
    fn refusal(&self) -> Option<Refusal> {
        match self {
            InboundError::HandshakeTimeout | InboundError::NoCredential => Some(Refusal::Handshake),
            InboundError::Io {
                stage: Stage::Handshake,
                ..
            } => Some(Refusal::Handshake),
            InboundError::Header(_) | InboundError::HeaderTimeout => Some(Refusal::Header),
            InboundError::NoPort(_) => Some(Refusal::NoDestination),
            InboundError::Denied(r) => Some(*r),
            InboundError::Connect(_) => Some(Refusal::Connect),
            _ => None,
        }
    }
}

/// Serve one accepted inbound connection to its end.
pub async fn handle(acc: Accepted, l: Arc<InboundListener>, vm: Arc<VmShared>) {
    let peer_addr = acc.peer.clone();
    if let Err(e) = run(acc, &l, &vm).await {
        if let Some(r) = e.refusal() {
            metrics::refused(&vm.vm, Direction::Inbound, r);
            tracing::info!(vm = %vm.vm, listen = %l.cfg.listen, peer = %peer_addr, error = %e, "mesh inbound: refused");
        } else {
            tracing::debug!(vm = %vm.vm, listen = %l.cfg.listen, peer = %peer_addr, error = %e, "mesh inbound: ended");
        }
    }
}

async fn run(acc: Accepted, l: &InboundListener, vm: &VmShared) -> Result<(), InboundError> {
    // The opening states (detection, handshake, transport header) are boxed and gone once it is open: a task
    // is sized by its largest state, and an idle connection, waiting in its copy or HTTP server, should not
    // carry their space.
    let o = Box::pin(open(acc, l, vm)).await?;
    serve(o.io, o.session, o.protocol, o.target, o.upstream, vm).await
}

/// An accepted connection once its TLS (if ours) is terminated and its peer known.
struct Opened {
    io: BoxIo,
    session: Session,
    protocol: MeshProtocol,
    target: Endpoint,
    upstream: Arc<Upstream>,
}

async fn open(acc: Accepted, l: &InboundListener, vm: &VmShared) -> Result<Opened, InboundError> {
    let lim = limits();
    let mut conn = acc.conn;
    if let Some(dst) = acc.original_dst {
        tracing::trace!(vm = %vm.vm, %dst, "mesh inbound: original destination");
    }
    let (prefix, hello) = detect::tls(&mut conn, lim.detect_timeout)
        .await
        .map_err(|source| InboundError::Io {
            stage: Stage::Detect,
            source,
        })?;
    let io = Rewind::new(prefix, conn);
    let sni_is_ours =
        matches!(&hello, TlsDetect::ClientHello { sni: Some(s), .. } if *s == vm.identity);
    if !sni_is_ours {
        // Plaintext, or TLS for someone else: passed through unopened, as an unauthenticated peer.
        let opaque_only = matches!(hello, TlsDetect::ClientHello { .. });
        let peer = Peer::Unauthenticated;
        let decision = authorize(l.cfg.authz.as_ref(), &peer);
        let protocol = if opaque_only {
            MeshProtocol::Opaque
        } else {
            l.cfg.protocol
        };
        return Ok(Opened {
            io: Box::new(io),
            session: Session {
                peer,
                tls: TlsLabel::NoTls,
                decision,
            },
            protocol,
            target: l.target.clone(),
            upstream: l.upstream.clone(),
        });
    }
    let configs = vm.configs().ok_or(InboundError::NoCredential)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(configs.server.clone());
    let stream =
        match tokio::time::timeout(lim.handshake_timeout, Box::pin(acceptor.accept(io))).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(InboundError::Io {
                    stage: Stage::Handshake,
                    source,
                })
            }
            Err(_) => return Err(InboundError::HandshakeTimeout),
        };
    let (_, session) = stream.get_ref();
    let peer = match session.peer_certificates().and_then(tls::peer_identity) {
        Some(id) => Peer::Authenticated(id),
        None => Peer::Unauthenticated,
    };
    let transport = session.alpn_protocol() == Some(transport_header::ALPN);
    let mut stream = stream;
    let decision = authorize(l.cfg.authz.as_ref(), &peer);
    if transport {
        // Linkerd refuses a transport header from an unauthenticated peer.
        if peer == Peer::Unauthenticated {
            return Err(InboundError::Denied(Refusal::Unauthenticated));
        }
        if let Decision::Deny(r) = decision {
            return Err(InboundError::Denied(r));
        }
        let header =
            match tokio::time::timeout(lim.handshake_timeout, transport_header::read(&mut stream))
                .await
            {
                Ok(r) => r?,
                Err(_) => return Err(InboundError::HeaderTimeout),
            };
        let target = with_port(&l.target, header.port)?;
        let protocol = match header.protocol {
            Some(SessionProtocol::Http1) => MeshProtocol::Http1,
            Some(SessionProtocol::Http2) => MeshProtocol::Http2,
            None => MeshProtocol::Opaque,
        };
        tracing::debug!(vm = %vm.vm, %target, name = ?header.name, "mesh inbound: transport header");
        let upstream = Arc::new(Upstream::new(target.clone()));
        return Ok(Opened {
            io: Box::new(stream),
            session: Session {
                peer,
                tls: TlsLabel::Yes,
                decision,
            },
            protocol,
            target,
            upstream,
        });
    }
    Ok(Opened {
        io: Box::new(stream),
        session: Session {
            peer,
            tls: TlsLabel::Yes,
            decision,
        },
        protocol: l.cfg.protocol,
        target: l.target.clone(),
        upstream: l.upstream.clone(),
    })
}

/// The target's host with another port (a transport header's).
pub fn with_port(target: &Endpoint, port: u16) -> Result<Endpoint, InboundError> {
    match target {
        Endpoint::Tcp(hostport) => {
            let host = hostport
                .rsplit_once(':')
                .map_or(hostport.as_str(), |(h, _)| h);
            Ok(Endpoint::Tcp(format!("{host}:{port}")))
        }
        Endpoint::Vsock { cid, .. } => Ok(Endpoint::Vsock {
            cid: *cid,
            port: u32::from(port),
        }),
        Endpoint::HybridVsock { path, .. } => Ok(Endpoint::HybridVsock {
            path: path.clone(),
            port: u32::from(port),
        }),
        Endpoint::Unix(_) => Err(InboundError::NoPort(target.clone())),
    }
}

/// What is known about an authenticated-or-not connection.
pub struct Session {
    pub peer: Peer,
    pub tls: TlsLabel,
    pub decision: Decision,
}

async fn serve(
    mut io: BoxIo,
    s: Session,
    protocol: MeshProtocol,
    target: Endpoint,
    upstream: Arc<Upstream>,
    vm: &VmShared,
) -> Result<(), InboundError> {
    let lim = limits();
    let detected = match protocol {
        MeshProtocol::Opaque => Detected::Opaque,
        // `http1`/`http2` name what the guest speaks; what the peer speaks is still detected (a peer may
        // send HTTP/2 to an HTTP/1 guest), and anything else is served as HTTP/1 (hyper answers 400).
        MeshProtocol::Auto | MeshProtocol::Http1 | MeshProtocol::Http2 => {
            let (prefix, d) = Box::pin(detect::http(&mut io, lim.detect_timeout))
                .await
                .map_err(|source| InboundError::Io {
                    stage: Stage::Protocol,
                    source,
                })?;
            io = Box::new(Rewind::new(prefix, io));
            match (protocol, d) {
                (MeshProtocol::Auto, d) => d,
                (_, Detected::Opaque) => Detected::Http1,
                (_, d) => d,
            }
        }
    };
    let guest = match protocol {
        MeshProtocol::Http1 => http::GuestProtocol::Http1,
        MeshProtocol::Http2 => http::GuestProtocol::Http2,
        MeshProtocol::Auto | MeshProtocol::Opaque => http::GuestProtocol::AsReceived,
    };
    let conn_metrics = TcpConn::open(&vm.vm, Direction::Inbound, s.tls, s.peer.id());
    let counts = Arc::new(Transferred::default());
    match detected {
        Detected::Opaque => {
            if let Decision::Deny(r) = s.decision {
                conn_metrics.close(&counts, None);
                return Err(InboundError::Denied(r));
            }
            let upstream_conn = match Box::pin(target.connect(lim.connect_timeout)).await {
                Ok(c) => c,
                Err(e) => {
                    conn_metrics.close(&counts, e_errno(&e));
                    return Err(e.into());
                }
            };
            let r = copy::bidirectional(io, upstream_conn, &counts).await;
            conn_metrics.close(&counts, r.as_ref().err().and_then(copy::CopyError::errno));
            Ok(r?)
        }
        Detected::Http1 | Detected::Http2 => {
            if let Decision::Deny(r) = s.decision {
                // Counted once per connection here; each request gets its 403.
                metrics::refused(&vm.vm, Direction::Inbound, r);
                tracing::info!(vm = %vm.vm, peer = ?s.peer, reason = r.as_str(), "mesh inbound: HTTP requests refused with 403");
            }
            let io = metrics::Counted::new(io, counts.clone());
            // Boxed, like the handshake: a connection's task is sized by its largest state, and an
            // idle opaque connection should not carry the space of the HTTP server's.
            let r = Box::pin(http::serve_inbound(
                Box::new(io),
                detected == Detected::Http2,
                Arc::new(http::HttpSession {
                    direction: Direction::Inbound,
                    vm: vm.vm.clone(),
                    owner: vm.owner,
                    peer: s.peer.id().map(str::to_string),
                    tls: s.tls,
                    denied: match s.decision {
                        Decision::Deny(r) => Some(r),
                        Decision::Allow => None,
                    },
                    upstream,
                    guest,
                    series: std::sync::Mutex::new(None),
                }),
                vm.shutdown.clone(),
            ))
            .await;
            conn_metrics.close(&counts, None);
            Ok(r?)
        }
    }
}

fn e_errno(e: &TransportError) -> Option<i32> {
    match e {
        TransportError::Connect { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy() {
        let a = Peer::Authenticated("a".into());
        let b = Peer::Authenticated("b".into());
        let anon = Peer::Unauthenticated;
        // No authz: authenticated peers only.
        assert_eq!(authorize(None, &a), Decision::Allow);
        assert_eq!(
            authorize(None, &anon),
            Decision::Deny(Refusal::Unauthenticated)
        );
        let only_a = Authz {
            identities: vec!["a".into()],
            unauthenticated: false,
        };
        assert_eq!(authorize(Some(&only_a), &a), Decision::Allow);
        assert_eq!(
            authorize(Some(&only_a), &b),
            Decision::Deny(Refusal::Unauthorized)
        );
        let open = Authz {
            identities: vec!["a".into()],
            unauthenticated: true,
        };
        assert_eq!(authorize(Some(&open), &anon), Decision::Allow);
        assert_eq!(
            authorize(Some(&open), &b),
            Decision::Deny(Refusal::Unauthorized)
        );
    }

    #[test]
    fn transport_header_ports_replace_the_targets() {
        let t = |s: &str| Endpoint::parse(s).unwrap_or(Endpoint::Unix("/x".into()));
        assert_eq!(
            with_port(&t("tcp://127.0.0.1:80"), 8080).ok(),
            Some(t("tcp://127.0.0.1:8080"))
        );
        assert_eq!(
            with_port(&t("vsock://5:80"), 81).ok(),
            Some(t("vsock://5:81"))
        );
        assert_eq!(
            with_port(&t("hvsock:///run/v.sock:80"), 81).ok(),
            Some(t("hvsock:///run/v.sock:81"))
        );
        assert!(matches!(
            with_port(&t("unix:///run/a.sock"), 81),
            Err(InboundError::NoPort(_))
        ));
    }
}
