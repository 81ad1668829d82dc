//! Linkerd's transport header (`transport.l5d.io/v1`): the first bytes, inside TLS, of an opaque connection
//! to another proxy's inbound port, naming the port (and optionally the name) the connection is for.
//!
//! Wire format: the preamble `transport.l5d.io/v1\r\n\r\n`, a 4-byte big-endian length, then that many
//! bytes of a protobuf `Header { int32 port = 1; string name = 2; SessionProtocol session_protocol = 3 }`,
//! where `SessionProtocol` holds a oneof of the empty messages `Http1` (1) and `Http2` (2)
//! (`../shared/specs/linkerd-wire.md`). Only a connection that negotiated the ALPN protocol
//! [`ALPN`] carries one.
//!
//! Events: [`read`] takes the header off a stream (bounded by [`MAX_HEADER_LEN`] and the caller's timeout),
//! leaving the application's bytes unread; [`encode`] produces it for an outbound connection.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The ALPN protocol id that announces a transport header.
pub const ALPN: &[u8] = b"transport.l5d.io/v1";

/// The bytes every header starts with.
pub const PREAMBLE: &[u8] = b"transport.l5d.io/v1\r\n\r\n";

/// Longest protobuf message accepted (`--mesh-max-header-bytes` bounds the HTTP headers; this one is fixed
/// by what a header can sensibly hold: a port and a DNS name of at most 253 bytes).
pub const MAX_HEADER_LEN: usize = 1024;

/// The protobuf message (wire-compatible with Linkerd's `transport.l5d.io.Header`).
#[derive(Clone, PartialEq, Message)]
pub struct HeaderMessage {
    #[prost(int32, tag = "1")]
    pub port: i32,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, optional, tag = "3")]
    pub session_protocol: Option<SessionProtocolMessage>,
}

/// `SessionProtocol { oneof kind { Http1 http1 = 1; Http2 http2 = 2; } }`.
#[derive(Clone, Copy, PartialEq, Message)]
pub struct SessionProtocolMessage {
    #[prost(oneof = "Kind", tags = "1, 2")]
    pub kind: Option<Kind>,
}

/// The oneof of `SessionProtocol`.
#[derive(Clone, Copy, PartialEq, prost::Oneof)]
pub enum Kind {
    #[prost(message, tag = "1")]
    Http1(Empty),
    #[prost(message, tag = "2")]
    Http2(Empty),
}

/// The empty `Http1` / `Http2` messages.
#[derive(Clone, Copy, PartialEq, Message)]
pub struct Empty {}

/// The session protocol a header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionProtocol {
    Http1,
    Http2,
}

/// A decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportHeader {
    /// The target port on the receiving proxy's workload.
    pub port: u16,
    /// A logical name (gateway forwarding); `None` when empty.
    pub name: Option<String>,
    /// `None`: opaque.
    pub protocol: Option<SessionProtocol>,
}

/// Why a header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("reading the transport header: {0}")]
    Io(#[from] std::io::Error),
    #[error("the transport header does not start with the transport.l5d.io/v1 preamble")]
    Preamble,
    #[error("transport header of {0} bytes is longer than {MAX_HEADER_LEN}")]
    TooLong(usize),
    #[error("transport header is not a valid message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("transport header port {0} is not a TCP port")]
    Port(i32),
}

/// The bytes of `header` on the wire (preamble, length, message).
pub fn encode(header: &TransportHeader) -> Vec<u8> {
    let msg = HeaderMessage {
        port: i32::from(header.port),
        name: header.name.clone().unwrap_or_default(),
        session_protocol: header.protocol.map(|p| SessionProtocolMessage {
            kind: Some(match p {
                SessionProtocol::Http1 => Kind::Http1(Empty {}),
                SessionProtocol::Http2 => Kind::Http2(Empty {}),
            }),
        }),
    };
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(PREAMBLE.len() + 4 + body.len());
    out.extend_from_slice(PREAMBLE);
    // The message is a port and a name: far below u32::MAX.
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decode the protobuf message (after the preamble and length).
pub fn decode_message(body: &[u8]) -> Result<TransportHeader, HeaderError> {
    let msg = HeaderMessage::decode(body)?;
    let port = u16::try_from(msg.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(HeaderError::Port(msg.port))?;
    Ok(TransportHeader {
        port,
        name: (!msg.name.is_empty()).then_some(msg.name),
        protocol: msg.session_protocol.and_then(|s| s.kind).map(|k| match k {
            Kind::Http1(_) => SessionProtocol::Http1,
            Kind::Http2(_) => SessionProtocol::Http2,
        }),
    })
}

/// Read exactly one header from `io` (the caller bounds the time).
pub async fn read<R: AsyncRead + Unpin>(io: &mut R) -> Result<TransportHeader, HeaderError> {
    let mut preamble = [0u8; PREAMBLE.len()];
    io.read_exact(&mut preamble).await?;
    if preamble != PREAMBLE {
        return Err(HeaderError::Preamble);
    }
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HEADER_LEN {
        return Err(HeaderError::TooLong(len));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    decode_message(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(port: u16, name: Option<&str>, protocol: Option<SessionProtocol>) -> TransportHeader {
        TransportHeader {
            port,
            name: name.map(str::to_string),
            protocol,
        }
    }

    #[tokio::test]
    async fn round_trips_and_leaves_the_payload() {
        for h in [
            header(8080, None, None),
            header(1, Some("web.default.svc.cluster.local:80"), None),
            header(65535, None, Some(SessionProtocol::Http1)),
            header(4143, Some("x"), Some(SessionProtocol::Http2)),
        ] {
            let mut wire = encode(&h);
            wire.extend_from_slice(b"payload");
            let mut r = &wire[..];
            match read(&mut r).await {
                Ok(got) => assert_eq!(got, h),
                Err(e) => panic!("{e}"),
            }
            assert_eq!(r, b"payload");
        }
    }

    #[test]
    fn matches_linkerd_encoding() {
        // port 8080 (field 1, varint 0x90 0x3f), session_protocol { http2 {} } (field 3 holding field 2).
        let wire = encode(&header(8080, None, Some(SessionProtocol::Http2)));
        assert_eq!(
            &wire[PREAMBLE.len()..],
            &[0, 0, 0, 7, 0x08, 0x90, 0x3f, 0x1a, 0x02, 0x12, 0x00]
        );
    }

    #[tokio::test]
    async fn malformed_headers_are_refused() {
        let mut wrong = b"transport.l5d.io/v2\r\n\r\n".to_vec();
        wrong.extend_from_slice(&[0, 0, 0, 0]);
        assert!(matches!(
            read(&mut &wrong[..]).await,
            Err(HeaderError::Preamble)
        ));

        let mut long = PREAMBLE.to_vec();
        long.extend_from_slice(&((MAX_HEADER_LEN as u32) + 1).to_be_bytes());
        assert!(matches!(
            read(&mut &long[..]).await,
            Err(HeaderError::TooLong(_))
        ));

        let mut truncated = encode(&header(80, Some("name"), None));
        truncated.truncate(truncated.len() - 2);
        assert!(matches!(
            read(&mut &truncated[..]).await,
            Err(HeaderError::Io(_))
        ));

        let mut garbage = PREAMBLE.to_vec();
        garbage.extend_from_slice(&[0, 0, 0, 2, 0xff, 0xff]);
        assert!(matches!(
            read(&mut &garbage[..]).await,
            Err(HeaderError::Decode(_))
        ));

        for port in [0i32, -1, 70000] {
            let body = HeaderMessage {
                port,
                name: String::new(),
                session_protocol: None,
            }
            .encode_to_vec();
            assert!(
                matches!(decode_message(&body), Err(HeaderError::Port(p)) if p == port),
                "{port}"
            );
        }
    }
}
