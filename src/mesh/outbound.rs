//! Outbound: the guest's connection to another workload, through one of its VM's outbound listeners.
//!
//! States of a connection:
//! 1. `Destination`: where it goes: the listener's fixed endpoints (one chosen by the power of two choices
//!    over the connections open to each), else the original destination of a `transparent:` listener
//!    (`SO_ORIGINAL_DST`), else a PROXY protocol v2 header the guest sends first (read with the `ppp` crate,
//!    at most [`MAX_PROXY_HEADER`] bytes within the handshake timeout; `LOCAL` or non-IP headers refused).
//! 2. `Connect`: TCP to the chosen address within the connect timeout.
//! 3. `Handshake`: the destination has an identity: TLS 1.3 with the VM's certificate, SNI = that identity,
//!    the server's SAN must equal it (`tls="true"`, `server_id`); no identity: plaintext
//!    (`tls="no_identity"`). With `opaque_transport_port` the client offers ALPN `transport.l5d.io/v1` and
//!    sends the transport header naming that port first.
//! 4. `Forward`: bytes copied both ways with half-close (`copy`). HTTP is carried in these bytes unchanged;
//!    the peer's inbound side does the HTTP handling (its `l5d-client-id`, its 403s).
//!
//! Refusals (no destination, a bad header, an unreachable endpoint, a failed handshake) close the guest's
//! connection and are counted in `cc_proxy_mesh_refused_total{direction="outbound"}`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cc_proxy_api::mesh::OutboundConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::copy::{self, Transferred};
use super::inbound::BoxIo;
use super::listener::{limits, Accepted, MeshError, VmShared};
use super::metrics::{self, Direction, Refusal, TcpConn, TlsLabel};
use super::transport_header::{self, TransportHeader};
use crate::transport::Rewind;

/// Most bytes of a PROXY v2 header (16 fixed bytes and the addresses; TLVs beyond this are refused).
pub const MAX_PROXY_HEADER: usize = 536;

/// One endpoint of a fixed destination and the connections open to it.
pub struct EndpointState {
    pub addr: SocketAddr,
    open: AtomicUsize,
}

/// Where a listener's connections go.
pub enum Dest {
    /// Fixed endpoints (`destination.endpoints`).
    Fixed(Vec<Arc<EndpointState>>),
    /// The original destination, else a PROXY v2 header.
    Dynamic,
}

/// One outbound listener's configuration, parsed.
pub struct OutboundListener {
    pub cfg: OutboundConfig,
    pub dest: Dest,
    /// The identity every endpoint must present; `None`: plaintext.
    pub identity: Option<String>,
    pub opaque_transport_port: Option<u16>,
}

impl OutboundListener {
    pub fn new(cfg: &OutboundConfig) -> Result<OutboundListener, MeshError> {
        let (dest, identity, opaque) = match &cfg.destination {
            None => (Dest::Dynamic, None, None),
            Some(d) => {
                let mut eps = Vec::new();
                for e in &d.endpoints {
                    let addr: SocketAddr = e.parse().map_err(|_| MeshError::InvalidEndpoint {
                        endpoint: e.clone(),
                    })?;
                    eps.push(Arc::new(EndpointState {
                        addr,
                        open: AtomicUsize::new(0),
                    }));
                }
                if let Some(id) = &d.identity {
                    if ServerName::try_from(id.as_str()).is_err() {
                        return Err(MeshError::InvalidIdentity {
                            identity: id.clone(),
                        });
                    }
                }
                let dest = if eps.is_empty() {
                    Dest::Dynamic
                } else {
                    Dest::Fixed(eps)
                };
                (dest, d.identity.clone(), d.opaque_transport_port)
            }
        };
        Ok(OutboundListener {
            cfg: cfg.clone(),
            dest,
            identity,
            opaque_transport_port: opaque,
        })
    }
}

/// Power of two choices over open connections: of two endpoints picked at random, the less loaded.
fn choose(eps: &[Arc<EndpointState>]) -> Option<Arc<EndpointState>> {
    match eps.len() {
        0 => None,
        1 => Some(eps[0].clone()),
        n => {
            let a = rand::random_range(0..n);
            let mut b = rand::random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (ea, eb) = (&eps[a], &eps[b]);
            Some(
                if eb.open.load(Ordering::Relaxed) < ea.open.load(Ordering::Relaxed) {
                    eb.clone()
                } else {
                    ea.clone()
                },
            )
        }
    }
}

/// Holds an endpoint's open-connection count up while the connection lives.
struct OpenGuard(Option<Arc<EndpointState>>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if let Some(e) = &self.0 {
            e.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Why an outbound connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("no destination: no fixed endpoint, original destination or PROXY header")]
    NoDestination,
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
    #[error(transparent)]
    Copy(#[from] copy::CopyError),
}

impl OutboundError {
    fn refusal(&self) -> Option<Refusal> {
        match self {
            OutboundError::NoDestination => Some(Refusal::NoDestination),
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
            OutboundError::Copy(_) => None,
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

async fn run(acc: Accepted, l: &OutboundListener, vm: &VmShared) -> Result<(), OutboundError> {
    let lim = limits();
    let mut guest = acc.conn;
    let (addr, endpoint) = match &l.dest {
        Dest::Fixed(eps) => {
            let e = choose(eps).ok_or(OutboundError::NoDestination)?;
            (e.addr, Some(e))
        }
        Dest::Dynamic => match acc.original_dst {
            Some(a) => (a, None),
            None => {
                let a = tokio::time::timeout(lim.handshake_timeout, read_proxy_header(&mut guest))
                    .await
                    .map_err(|_| OutboundError::ProxyHeaderTimeout)??;
                (a, None)
            }
        },
    };
    if let Some(e) = &endpoint {
        e.open.fetch_add(1, Ordering::Relaxed);
    }
    let _open = OpenGuard(endpoint);
    let tcp = match tokio::time::timeout(lim.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(OutboundError::Connect { addr, source }),
        Err(_) => return Err(OutboundError::ConnectTimeout(addr)),
    };
    let _ = tcp.set_nodelay(true);
    let counts = Transferred::default();
    let (server, tls_label): (BoxIo, TlsLabel) = match &l.identity {
        None => (Box::new(tcp), TlsLabel::NoIdentity),
        Some(identity) => {
            let configs = vm.configs().ok_or(OutboundError::NoCredential)?;
            let config = if l.opaque_transport_port.is_some() {
                configs.client_transport.clone()
            } else {
                configs.client.clone()
            };
            let name =
                ServerName::try_from(identity.clone()).map_err(|e| OutboundError::Handshake {
                    addr,
                    identity: identity.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
                })?;
            let connector = tokio_rustls::TlsConnector::from(config);
            let mut tls = match tokio::time::timeout(
                lim.handshake_timeout,
                connector.connect(name, Rewind::new(Vec::new(), tcp)),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(source)) => {
                    return Err(OutboundError::Handshake {
                        addr,
                        identity: identity.clone(),
                        source,
                    })
                }
                Err(_) => return Err(OutboundError::HandshakeTimeout(addr)),
            };
            if let Some(port) = l.opaque_transport_port {
                let header = transport_header::encode(&TransportHeader {
                    port,
                    name: None,
                    protocol: None,
                });
                tls.write_all(&header)
                    .await
                    .map_err(OutboundError::TransportHeader)?;
            }
            (Box::new(tls), TlsLabel::Yes)
        }
    };
    let conn_metrics = TcpConn::open(
        &vm.vm,
        Direction::Outbound,
        tls_label,
        l.identity.as_deref(),
    );
    let r = copy::bidirectional(guest, server, &counts).await;
    conn_metrics.close(&counts, r.as_ref().err().and_then(copy::CopyError::errno));
    Ok(r?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_choices_prefer_the_less_loaded() {
        let eps: Vec<Arc<EndpointState>> = (0..2)
            .map(|i| {
                Arc::new(EndpointState {
                    addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i)),
                    open: AtomicUsize::new(0),
                })
            })
            .collect();
        eps[0].open.store(5, Ordering::Relaxed);
        for _ in 0..20 {
            assert_eq!(choose(&eps).map(|e| e.addr.port()), Some(1001));
        }
        assert!(choose(&[]).is_none());
    }

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
