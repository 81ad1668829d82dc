//! One transport abstraction for every byte stream the daemon opens: agent channels now, mesh targets later.
//!
//! Endpoints are URIs:
//!
//! | URI | meaning |
//! |---|---|
//! | `unix:///path` | an AF_UNIX stream socket (e.g. a QEMU virtio-serial chardev) |
//! | `vsock://CID:PORT` | AF_VSOCK (QEMU with vhost-vsock) |
//! | `hvsock:///path/vm.sock:PORT` | hybrid vsock: connect to the VMM's unix socket, `CONNECT PORT\n`, expect `OK N\n` |
//! | `tcp://HOST:PORT` | TCP (tests, remote agents) |

mod connect;
pub mod creds;
mod listen;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use connect::{BoxRead, BoxWrite, Connection, Rewind};
pub use creds::Credentials;
pub use listen::{hybrid_listen_path, Listener, PeerAddr};

/// A parsed endpoint URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Unix(PathBuf),
    Vsock { cid: u32, port: u32 },
    HybridVsock { path: PathBuf, port: u32 },
    Tcp(String),
}

/// Why an endpoint could not be parsed or reached. Every variant names the URI.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid endpoint URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: &'static str },
    #[error("cannot connect to {uri}: {source}")]
    Connect { uri: String, source: std::io::Error },
    #[error("connecting to {uri} timed out after {after:?}")]
    Timeout { uri: String, after: Duration },
    #[error("hybrid vsock handshake with {uri} failed: {reason}")]
    Handshake { uri: String, reason: HandshakeError },
    #[error("cannot resolve {uri}: {source}")]
    Resolve { uri: String, source: std::io::Error },
    #[error("cannot listen on {uri}: {source}")]
    Bind { uri: String, source: std::io::Error },
}

/// Why a hybrid-vsock `CONNECT` was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("connection closed before the reply")]
    Closed,
    #[error(transparent)]
    Reply(cc_proxy_protocol::hvsock::HandshakeError),
}

impl Endpoint {
    /// Parse a URI of one of the supported schemes.
    pub fn parse(uri: &str) -> Result<Endpoint, TransportError> {
        let invalid = |reason| TransportError::InvalidUri {
            uri: uri.to_string(),
            reason,
        };
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| invalid("expected SCHEME://..."))?;
        match scheme {
            "unix" => {
                if !rest.starts_with('/') {
                    return Err(invalid("unix:// needs an absolute path (unix:///path)"));
                }
                Ok(Endpoint::Unix(PathBuf::from(rest)))
            }
            "vsock" => {
                let (cid, port) = rest
                    .split_once(':')
                    .ok_or_else(|| invalid("expected vsock://CID:PORT"))?;
                let cid = cid.parse().map_err(|_| invalid("CID is not a number"))?;
                let port = port.parse().map_err(|_| invalid("port is not a number"))?;
                Ok(Endpoint::Vsock { cid, port })
            }
            "hvsock" => {
                if !rest.starts_with('/') {
                    return Err(invalid(
                        "hvsock:// needs an absolute path (hvsock:///path/vm.sock:PORT)",
                    ));
                }
                let (path, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| invalid("expected hvsock:///path:PORT"))?;
                let port = port.parse().map_err(|_| invalid("port is not a number"))?;
                Ok(Endpoint::HybridVsock {
                    path: PathBuf::from(path),
                    port,
                })
            }
            "tcp" => {
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| invalid("expected tcp://HOST:PORT"))?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(invalid("expected tcp://HOST:PORT"));
                }
                Ok(Endpoint::Tcp(rest.to_string()))
            }
            _ => Err(invalid("unsupported scheme (unix, vsock, hvsock, tcp)")),
        }
    }
}

impl Endpoint {
    /// The filesystem path a `unix://` or `hvsock://` endpoint connects to (`None` for vsock and TCP).
    pub fn unix_path(&self) -> Option<&std::path::Path> {
        match self {
            Endpoint::Unix(p) | Endpoint::HybridVsock { path: p, .. } => Some(p),
            Endpoint::Vsock { .. } | Endpoint::Tcp(_) => None,
        }
    }

    /// The addresses a `tcp://` endpoint's host resolves to (empty for other schemes).
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, TransportError> {
        let Endpoint::Tcp(hostport) = self else {
            return Ok(Vec::new());
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(hostport.as_str())
            .await
            .map_err(|source| TransportError::Resolve {
                uri: self.to_string(),
                source,
            })?
            .collect();
        if addrs.is_empty() {
            return Err(TransportError::Resolve {
                uri: self.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
            });
        }
        Ok(addrs)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Endpoint::HybridVsock { path, port } => write!(f, "hvsock://{}:{port}", path.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            Endpoint::parse("unix:///run/a.sock").unwrap(),
            Endpoint::Unix("/run/a.sock".into())
        );
        assert_eq!(
            Endpoint::parse("vsock://3:2718").unwrap(),
            Endpoint::Vsock { cid: 3, port: 2718 }
        );
        assert_eq!(
            Endpoint::parse("hvsock:///run/vm:1.sock:2719").unwrap(),
            Endpoint::HybridVsock {
                path: "/run/vm:1.sock".into(),
                port: 2719
            }
        );
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:80").unwrap(),
            Endpoint::Tcp("127.0.0.1:80".into())
        );
        for uri in ["unix:///a", "vsock://3:2718", "hvsock:///a:1", "tcp://h:1"] {
            assert_eq!(Endpoint::parse(uri).unwrap().to_string(), uri);
        }
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "unix:/a",
            "unix://rel",
            "vsock://x:1",
            "vsock://3",
            "vsock://3:99999999999",
            "hvsock:///a",
            "hvsock:///a:p",
            "tcp://:1",
            "tcp://h:70000",
            "http://x",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(TransportError::InvalidUri { .. })),
                "{bad}"
            );
        }
    }
}
