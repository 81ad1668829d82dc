//! Protocol detection on an inbound connection, bounded in time and bytes, without losing what was read.
//!
//! Two steps, each returning the bytes it consumed so the caller replays them ([`crate::transport::Rewind`]):
//! - [`tls`]: is the first thing a TLS ClientHello, and for which SNI (and ALPN)? The hello is parsed by
//!   rustls' own [`rustls::server::Acceptor`] over a copy of the bytes, reading at most
//!   [`MAX_CLIENT_HELLO`] bytes; a first byte that is not a TLS handshake record, a hello that does not parse,
//!   or nothing within the detection time: not TLS.
//! - [`http`]: after TLS (or on plaintext), HTTP/2's connection preface, an HTTP/1 request line, or anything
//!   else (opaque), within the detection time and [`MAX_HTTP_DETECT`] bytes.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Most bytes read looking for a complete ClientHello (Linkerd reads up to 8 KiB too).
pub const MAX_CLIENT_HELLO: usize = 8 * 1024;

/// Most bytes read looking for an HTTP request line or preface.
pub const MAX_HTTP_DETECT: usize = 1024;

/// HTTP/2's client connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsDetect {
    /// A ClientHello.
    ClientHello {
        sni: Option<String>,
        alpn: Vec<Vec<u8>>,
    },
    /// Anything else (including nothing within the detection time).
    NotTls,
}

/// What the application protocol looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Opaque,
}

/// Read until a full ClientHello is seen or it is clear there is none. Returns the bytes read.
pub async fn tls<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> std::io::Result<(Vec<u8>, TlsDetect)> {
    let mut buf = Vec::with_capacity(512);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut chunk = [0u8; 1024];
        let room = (MAX_CLIENT_HELLO - buf.len()).min(chunk.len());
        let n = match tokio::time::timeout_at(deadline, io.read(&mut chunk[..room])).await {
            Ok(r) => r?,
            Err(_) => return Ok((buf, TlsDetect::NotTls)),
        };
        if n == 0 {
            return Ok((buf, TlsDetect::NotTls));
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_client_hello(&buf) {
            HelloParse::Incomplete if buf.len() < MAX_CLIENT_HELLO => continue,
            HelloParse::Incomplete | HelloParse::NotTls => return Ok((buf, TlsDetect::NotTls)),
            HelloParse::Hello(d) => return Ok((buf, d)),
        }
    }
}

enum HelloParse {
    Incomplete,
    NotTls,
    Hello(TlsDetect),
}

/// 22: a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

fn parse_client_hello(bytes: &[u8]) -> HelloParse {
    if bytes.first().is_some_and(|b| *b != TLS_HANDSHAKE_RECORD) {
        return HelloParse::NotTls;
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return HelloParse::NotTls,
        }
    }
    match acceptor.accept() {
        Ok(None) => HelloParse::Incomplete,
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            HelloParse::Hello(TlsDetect::ClientHello {
                sni: hello.server_name().map(str::to_string),
                alpn: hello
                    .alpn()
                    .map(|protos| protos.map(<[u8]>::to_vec).collect())
                    .unwrap_or_default(),
            })
        }
        Err(_) => HelloParse::NotTls,
    }
}

/// Read until the protocol is known: HTTP/2 preface, an HTTP/1 request line, or opaque.
pub async fn http<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> std::io::Result<(Vec<u8>, Detected)> {
    let mut buf = Vec::with_capacity(128);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = classify(&buf) {
            return Ok((buf, d));
        }
        if buf.len() >= MAX_HTTP_DETECT {
            return Ok((buf, Detected::Opaque));
        }
        let mut chunk = [0u8; 256];
        let room = (MAX_HTTP_DETECT - buf.len()).min(chunk.len());
        let n = match tokio::time::timeout_at(deadline, io.read(&mut chunk[..room])).await {
            Ok(r) => r?,
            Err(_) => return Ok((buf, Detected::Opaque)),
        };
        if n == 0 {
            return Ok((buf, Detected::Opaque));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `Some` once the bytes decide the protocol.
fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        // Still a prefix of the HTTP/2 preface (which is also an HTTP/1-looking line up to its first CRLF).
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some(if is_http1_request_line(&buf[..line_end]) {
        Detected::Http1
    } else {
        Detected::Opaque
    })
}

/// `METHOD SP TARGET SP HTTP/1.x`, with a token for a method.
fn is_http1_request_line(line: &[u8]) -> bool {
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !method.is_empty()
        && method.iter().all(|b| b.is_ascii_uppercase() || *b == b'-')
        && !target.is_empty()
        && (version == b"HTTP/1.1" || version == b"HTTP/1.0")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::mesh::tls::testing::TestCa;

    #[test]
    fn classifies_http_and_opaque() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GET / HTTP/1.1"), None);
        assert_eq!(
            classify(b"GET /x HTTP/1.1\r\nHost: a\r\n"),
            Some(Detected::Http1)
        );
        assert_eq!(
            classify(b"CONNECT a:443 HTTP/1.1\r\n"),
            Some(Detected::Http1)
        );
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"GET / HTTP/3\r\n"), Some(Detected::Opaque));
    }

    #[tokio::test]
    async fn http_detection_is_bounded_in_time_and_size() {
        // Nothing sent (a server-speaks-first client): opaque once the time is up.
        let (mut a, _b) = tokio::io::duplex(64);
        let start = std::time::Instant::now();
        let r = http(&mut a, Duration::from_millis(50)).await;
        assert!(matches!(r, Ok((ref b, Detected::Opaque)) if b.is_empty()));
        assert!(start.elapsed() < Duration::from_secs(2));
        // A long line without CRLF: opaque after MAX_HTTP_DETECT bytes, all of them returned.
        let (mut a, mut b) = tokio::io::duplex(8192);
        let _ = b.write_all(&[b'A'; 3000]).await;
        match http(&mut a, Duration::from_secs(5)).await {
            Ok((bytes, Detected::Opaque)) => assert_eq!(bytes.len(), MAX_HTTP_DETECT),
            other => panic!("{other:?}"),
        }
        // Requests split across reads.
        let (mut a, mut b) = tokio::io::duplex(8192);
        tokio::spawn(async move {
            for piece in [&b"GE"[..], b"T / HT", b"TP/1.1\r", b"\nHost: x\r\n\r\n"] {
                let _ = b.write_all(piece).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            b
        });
        match http(&mut a, Duration::from_secs(5)).await {
            Ok((bytes, Detected::Http1)) => assert!(bytes.starts_with(b"GET / HTTP/1.1\r\n")),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_real_client_hello_is_seen_with_its_sni_and_alpn() {
        let ca = TestCa::new();
        let cred = ca.leaf("c.ns.serviceaccount.identity.linkerd.cluster.local");
        let Ok(config) = crate::mesh::tls::client_config(&cred, &ca.anchors(), true) else {
            panic!("config")
        };
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let Ok(name) = rustls::pki_types::ServerName::try_from(
            "b.ns.serviceaccount.identity.linkerd.cluster.local",
        ) else {
            panic!("name")
        };
        tokio::spawn(async move {
            let _ = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, a)
                .await;
        });
        match tls(&mut b, Duration::from_secs(5)).await {
            Ok((bytes, TlsDetect::ClientHello { sni, alpn })) => {
                assert_eq!(
                    sni.as_deref(),
                    Some("b.ns.serviceaccount.identity.linkerd.cluster.local")
                );
                assert_eq!(alpn, vec![b"transport.l5d.io/v1".to_vec()]);
                assert_eq!(bytes[0], TLS_HANDSHAKE_RECORD);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn plaintext_garbage_and_silence_are_not_tls() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let _ = b.write_all(b"GET / HTTP/1.1\r\n").await;
        assert!(matches!(
            tls(&mut a, Duration::from_secs(5)).await,
            Ok((_, TlsDetect::NotTls))
        ));
        // A handshake record header followed by junk.
        let (mut a, mut b) = tokio::io::duplex(64);
        let _ = b
            .write_all(&[0x16, 3, 1, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
            .await;
        assert!(matches!(
            tls(&mut a, Duration::from_secs(5)).await,
            Ok((_, TlsDetect::NotTls))
        ));
        // A record that claims to be large and never completes: bounded by time.
        let (mut a, mut b) = tokio::io::duplex(64);
        let _ = b.write_all(&[0x16, 3, 1, 0x3f, 0xff, 1]).await;
        assert!(matches!(
            tls(&mut a, Duration::from_millis(50)).await,
            Ok((_, TlsDetect::NotTls))
        ));
    }
}
