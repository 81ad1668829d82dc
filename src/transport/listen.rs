//! Listening endpoints: the same URIs as [`Endpoint::connect`], bound instead of dialled.
//!
//! | URI | binds |
//! |---|---|
//! | `unix:///path` | an AF_UNIX stream socket at `path` |
//! | `vsock://CID:PORT` | AF_VSOCK (`CID` 4294967295 is any CID) |
//! | `hvsock:///path/vm.sock:PORT` | the host side of hybrid vsock: for a guest-initiated connection to host port `PORT`, Firecracker and Cloud Hypervisor connect to the unix socket `<path>_<PORT>`, so that is what is bound |
//! | `tcp://HOST:PORT` | TCP on the first address `HOST` resolves to |
//!
//! Each accepted connection is a [`Connection`] (one `AsyncRead + AsyncWrite` object) with its peer's
//! address. A unix socket created here is the caller's to remove ([`Listener::unix_path`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener};

use super::{Connection, Endpoint, TransportError};

/// A bound endpoint, accepting connections.
pub enum Listener {
    /// A unix socket (also the host side of hybrid vsock).
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp(TcpListener),
    Vsock(tokio_vsock::VsockListener),
}

/// Who connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAddr {
    /// A unix socket peer (usually unnamed); its credentials come from `SO_PEERCRED`.
    Unix,
    Tcp(SocketAddr),
    Vsock {
        cid: u32,
        port: u32,
    },
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerAddr::Unix => f.write_str("unix"),
            PeerAddr::Tcp(a) => write!(f, "{a}"),
            PeerAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

/// One accepted connection.
pub struct Accepted {
    pub conn: Connection,
    pub peer: PeerAddr,
}

/// The unix socket path a hybrid-vsock listener for `port` binds: `<path>_<port>`.
pub fn hybrid_listen_path(path: &Path, port: u32) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

impl Endpoint {
    /// Bind the endpoint for listening.
    pub async fn bind(&self) -> Result<Listener, TransportError> {
        let uri = self.to_string();
        let bind_err = |source| TransportError::Bind {
            uri: uri.clone(),
            source,
        };
        match self {
            Endpoint::Unix(path) => Ok(Listener::Unix {
                listener: UnixListener::bind(path).map_err(bind_err)?,
                path: path.clone(),
            }),
            Endpoint::HybridVsock { path, port } => {
                let path = hybrid_listen_path(path, *port);
                Ok(Listener::Unix {
                    listener: UnixListener::bind(&path).map_err(bind_err)?,
                    path,
                })
            }
            Endpoint::Tcp(_) => {
                let mut last = None;
                for addr in self.resolve().await? {
                    match TcpListener::bind(addr).await {
                        Ok(l) => return Ok(Listener::Tcp(l)),
                        Err(e) => last = Some(e),
                    }
                }
                Err(bind_err(last.unwrap_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                })))
            }
            Endpoint::Vsock { cid, port } => {
                let addr = tokio_vsock::VsockAddr::new(*cid, *port);
                Ok(Listener::Vsock(
                    tokio_vsock::VsockListener::bind(addr).map_err(bind_err)?,
                ))
            }
        }
    }
}

impl Listener {
    /// Wrap a TCP listener bound elsewhere (e.g. synchronously at startup).
    pub fn from_tcp(listener: TcpListener) -> Listener {
        Listener::Tcp(listener)
    }

    /// Wrap a unix listener bound elsewhere (the client socket, or one handed over by systemd).
    pub fn from_unix(listener: UnixListener, path: PathBuf) -> Listener {
        Listener::Unix { listener, path }
    }

    /// Wait for the next connection.
    pub async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Listener::Unix { listener, .. } => {
                let (s, _) = listener.accept().await?;
                Ok(Accepted {
                    conn: Connection::Unix(s),
                    peer: PeerAddr::Unix,
                })
            }
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Accepted {
                    conn: Connection::Tcp(s),
                    peer: PeerAddr::Tcp(addr),
                })
            }
            Listener::Vsock(l) => {
                let (s, addr) = l.accept().await?;
                Ok(Accepted {
                    conn: Connection::Vsock(s),
                    peer: PeerAddr::Vsock {
                        cid: addr.cid(),
                        port: addr.port(),
                    },
                })
            }
        }
    }

    /// The path of a unix (or hybrid-vsock) listener's socket file.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            Listener::Unix { path, .. } => Some(path),
            Listener::Tcp(_) | Listener::Vsock(_) => None,
        }
    }

    /// The bound TCP address (port 0 picks one); tests bind port 0 and read it back.
    #[cfg(test)]
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix { .. } | Listener::Vsock(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn dir() -> tempfile::TempDir {
        match tempfile::Builder::new().prefix("ccp-listen-").tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        }
    }

    /// Accept one connection on `listener`, echo one line back, and return the peer address.
    async fn echo_once(listener: Listener) -> PeerAddr {
        let Ok(mut a) = listener.accept().await else {
            panic!("accept failed")
        };
        let mut buf = [0u8; 5];
        if a.conn.read_exact(&mut buf).await.is_err() || a.conn.write_all(&buf).await.is_err() {
            panic!("echo failed");
        }
        a.peer
    }

    async fn round_trip(ep: &Endpoint) -> Connection {
        let Ok(mut c) = ep.connect(std::time::Duration::from_secs(5)).await else {
            panic!("connect to {ep} failed")
        };
        let mut back = [0u8; 5];
        if c.write_all(b"hello").await.is_err() || c.read_exact(&mut back).await.is_err() {
            panic!("round trip through {ep} failed");
        }
        assert_eq!(&back, b"hello");
        c
    }

    #[tokio::test]
    async fn unix_listener_accepts_connections_from_the_same_uri() {
        let d = dir();
        let ep = match Endpoint::parse(&format!("unix://{}/s.sock", d.path().display())) {
            Ok(e) => e,
            Err(e) => panic!("{e}"),
        };
        let Ok(listener) = ep.bind().await else {
            panic!("bind failed")
        };
        assert_eq!(
            listener.unix_path(),
            Some(d.path().join("s.sock").as_path())
        );
        let server = tokio::spawn(echo_once(listener));
        round_trip(&ep).await;
        assert_eq!(server.await.ok(), Some(PeerAddr::Unix));
    }

    #[tokio::test]
    async fn tcp_listener_resolves_names_and_reports_the_peer() {
        let Ok(listener) = Endpoint::Tcp("localhost:0".into()).bind().await else {
            panic!("bind failed")
        };
        let Some(addr) = listener.tcp_addr() else {
            panic!("no address")
        };
        assert!(addr.ip().is_loopback());
        let server = tokio::spawn(echo_once(listener));
        let _conn = round_trip(&Endpoint::Tcp(addr.to_string())).await;
        match server.await {
            Ok(PeerAddr::Tcp(peer)) => assert!(peer.ip().is_loopback()),
            _ => panic!("the peer is not a TCP address"),
        }
    }

    #[tokio::test]
    async fn hybrid_vsock_listens_on_the_port_suffixed_socket() {
        let d = dir();
        let base = d.path().join("vm.sock");
        let ep = Endpoint::HybridVsock {
            path: base.clone(),
            port: 1024,
        };
        let Ok(listener) = ep.bind().await else {
            panic!("bind failed")
        };
        let expected = d.path().join("vm.sock_1024");
        assert_eq!(listener.unix_path(), Some(expected.as_path()));
        // What the VMM does for a guest connecting to host port 1024: connect to <uds_path>_<port>.
        let server = tokio::spawn(echo_once(listener));
        round_trip(&Endpoint::Unix(expected)).await;
        assert_eq!(server.await.ok(), Some(PeerAddr::Unix));
    }

    #[tokio::test]
    async fn binding_twice_fails_naming_the_uri() {
        let d = dir();
        let ep = Endpoint::Unix(d.path().join("taken.sock"));
        let _first = ep.bind().await;
        match ep.bind().await {
            Err(e @ TransportError::Bind { .. }) => {
                assert!(e.to_string().contains("taken.sock"), "{e}")
            }
            _ => panic!("a second bind of the same path succeeded"),
        }
    }

    #[tokio::test]
    async fn a_tcp_name_that_does_not_resolve_is_an_error() {
        assert!(Endpoint::Tcp("no-such-host.invalid:1".into())
            .bind()
            .await
            .is_err());
    }
}
