//! The admin HTTP server, for operators and Prometheus: `/metrics`, `/ready`, `/live`, `/proxy-log-level`.
//! It is read-only unless `--admin-allow-log-level` lets loopback clients `PUT /proxy-log-level`.
//!
//! It runs on its own thread with its own single-threaded runtime, so a slow scrape never competes with the
//! data plane's worker threads, and the data plane's load never delays a liveness probe. Every input is
//! bounded: connections (at most [`MAX_ADMIN_CONNECTIONS`] at once), the time to send request headers, and
//! the body of a log-level change. Other parts of the daemon (the mesh) add their metrics with
//! [`add_metrics_source`].
//!
//! `/metrics` speaks both exposition formats: OpenMetrics 1.0 to a scraper that asks for it in `Accept`
//! (Prometheus does), the classic text format 0.0.4 to everyone else (curl, promtool).

pub mod metrics;
mod process;
pub mod tap;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept;
use crate::server::Proxy;
use crate::transport::{Listener, PeerAddr};

/// Largest body accepted by `PUT /proxy-log-level`; a filter is a short line.
const MAX_LOG_LEVEL_BODY: usize = 4096;
/// Admin connections served at once; more are closed on accept. Prometheus and a few operators need far
/// fewer; the bound keeps a misbehaving client from exhausting the daemon's file descriptors.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Time a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an admin connection may live; a scrape takes milliseconds.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Something that adds metrics to each scrape (e.g. the mesh's families).
pub type MetricsSource = Box<dyn Fn(&mut Registry) + Send + Sync>;

static SOURCES: RwLock<Vec<MetricsSource>> = RwLock::new(Vec::new());

/// Have every later scrape include the metrics `source` registers. Call it once per source, at startup.
pub fn add_metrics_source(source: MetricsSource) {
    crate::sync::write(&SOURCES).push(source);
}

/// Keeps the admin thread alive; dropping it stops the server.
pub struct AdminHandle {
    stop: CancellationToken,
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot serve the admin server on {addr} (see --admin-addr): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the admin server: {0}")]
    Thread(std::io::Error),
}

/// Bind the admin server's address (at startup, before the client socket serves: a bad address is fatal).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, AdminError> {
    let bind_err = |source| AdminError::Bind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// Serve the admin server on `std_listener` from its own thread.
pub fn start(
    std_listener: std::net::TcpListener,
    proxy: Arc<Proxy>,
) -> Result<AdminHandle, AdminError> {
    let local = std_listener.local_addr().map_err(AdminError::Thread)?;
    let stop = CancellationToken::new();
    let stop_serving = stop.clone();
    std::thread::Builder::new()
        .name("cc-proxy-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the admin runtime");
                    return;
                }
            };
            rt.block_on(serve(std_listener, proxy, stop_serving));
        })
        .map_err(AdminError::Thread)?;
    tracing::info!(addr = %local, "admin server listening");
    Ok(AdminHandle { stop })
}

async fn serve(listener: std::net::TcpListener, proxy: Arc<Proxy>, stop: CancellationToken) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot serve the admin listener");
            return;
        }
    };
    accept::serve(
        Listener::from_tcp(listener),
        "admin",
        MAX_ADMIN_CONNECTIONS,
        stop,
        TaskTracker::new(),
        move |incoming| serve_connection(proxy.clone(), incoming),
    )
    .await;
}

async fn serve_connection(proxy: Arc<Proxy>, incoming: accept::Incoming) {
    let peer = match incoming.peer {
        PeerAddr::Tcp(addr) => addr,
        // The admin listener is TCP; anything else is treated as remote.
        PeerAddr::Unix | PeerAddr::Vsock { .. } => SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let svc = hyper::service::service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, std::convert::Infallible>(route(req, proxy, peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(incoming.conn), svc);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// True for loopback peers, including IPv4 loopback seen through an IPv6 socket (`::ffff:127.0.0.1`).
fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Whether the client asked for OpenMetrics in its `Accept` header.
fn wants_openmetrics(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// Encode every metric family of the daemon (and of added sources) as OpenMetrics text; `ready` is what
/// `/ready` answers now (exported as `cc_proxy_ready`).
pub fn encode_openmetrics(ready: bool) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    metrics::METRICS.register(&mut registry);
    metrics::register_daemon(&mut registry, ready);
    process::register(&mut registry);
    for source in crate::sync::read(&SOURCES).iter() {
        source(&mut registry);
    }
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Rewrite OpenMetrics text into the classic Prometheus text format 0.0.4.
///
/// The samples are the same; what differs is metadata: a counter family is named with its `_total` suffix
/// and an info family with its `_info` suffix (the sample names), `# UNIT` and `# EOF` do not exist, and
/// types the old format lacks become `untyped` (or `gauge` for `info` and `stateset`, whose samples are
/// plain numbers).
pub fn openmetrics_to_text(om: &str) -> String {
    let suffixed: std::collections::HashMap<&str, &str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(n, t)| match t {
            "counter" => Some((n, "_total")),
            "info" if !n.ends_with("_info") => Some((n, "_info")),
            _ => None,
        })
        .collect();
    let rename = |name: &str| match suffixed.get(name) {
        Some(suffix) => format!("{name}{suffix}"),
        None => name.to_string(),
    };
    let mut out = String::with_capacity(om.len() + 256);
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", rename(name)));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let kind = match kind {
                "counter" | "gauge" | "histogram" | "summary" => kind,
                "info" | "stateset" => "gauge",
                _ => "untyped",
            };
            out.push_str(&format!("# TYPE {} {kind}\n", rename(name)));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

async fn route(
    req: Request<Incoming>,
    proxy: Arc<Proxy>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let openmetrics = wants_openmetrics(&req);
            let ready = proxy.registry.readiness() == crate::vm::registry::Readiness::Ready;
            let Ok(om) = encode_openmetrics(ready) else {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
            };
            let (body, kind) = if openmetrics {
                (om, OPENMETRICS)
            } else {
                (openmetrics_to_text(&om), TEXT_FORMAT)
            };
            let mut r = text(StatusCode::OK, body);
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
            r
        }
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            // Recovery starts only once the socket is listening, so "recovered" implies "serving".
            use crate::vm::registry::Readiness;
            match proxy.registry.readiness() {
                Readiness::Ready => text(StatusCode::OK, "ready\n"),
                Readiness::Recovering => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "recovering registered VMs\n",
                ),
                Readiness::MeshUncertified(n) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{n} meshed VM(s) without a valid certificate\n"),
                ),
            }
        }
        (&Method::GET, "/proxy-log-level") => {
            text(StatusCode::OK, format!("{}\n", proxy.log.current()))
        }
        (&Method::PUT, "/proxy-log-level") => {
            // Off by default: any local user can reach a loopback port, and a debug or trace log shows other
            // users' stdin. The socket's privileged `proxy.set_log_level` is the authorized way.
            if !proxy.admin_allow_log_level {
                tracing::warn!(%peer, "log level change refused: PUT /proxy-log-level is off");
                return text(
                    StatusCode::FORBIDDEN,
                    "changing the log level here is off; run `cc-proxy log-level LEVEL` as root or a member of \
                     --admin-group, or start the daemon with --admin-allow-log-level\n",
                );
            }
            if !is_loopback(peer.ip()) {
                tracing::warn!(%peer, "log level change refused: not from loopback");
                return text(
                    StatusCode::FORBIDDEN,
                    "log level changes are accepted from loopback only\n",
                );
            }
            let body = match Limited::new(req.into_body(), MAX_LOG_LEVEL_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"),
            };
            let Ok(filter) = std::str::from_utf8(&body) else {
                return text(StatusCode::BAD_REQUEST, "the filter is not UTF-8\n");
            };
            let filter = filter.trim();
            if filter.is_empty() {
                return text(
                    StatusCode::BAD_REQUEST,
                    "send a filter in the body, e.g. `debug` or `warn,cc_proxy::vm=debug`\n",
                );
            }
            match proxy.log.set(filter) {
                Ok(()) => {
                    tracing::warn!(filter = %filter, %peer, "log level changed");
                    text(StatusCode::OK, format!("{filter}\n"))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (_, "/metrics" | "/live" | "/ready" | "/proxy-log-level") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /ready, /live or /proxy-log-level\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_counters_with_total_and_drops_openmetrics_only_lines() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\n# UNIT a_requests \n\
                  a_requests_total{vm=\"x\"} 3\n# HELP b_bytes Bytes.\n# TYPE b_bytes gauge\n\
                  # UNIT b_bytes bytes\nb_bytes 7\n# TYPE c_info info\nc_info{v=\"1\"} 1\n# EOF\n";
        let t = openmetrics_to_text(om);
        assert_eq!(
            t,
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\n\
             a_requests_total{vm=\"x\"} 3\n# HELP b_bytes Bytes.\n# TYPE b_bytes gauge\nb_bytes 7\n\
             # TYPE c_info gauge\nc_info{v=\"1\"} 1\n"
        );
        // An info family `d` has the samples `d_info`: the text format names the family that way.
        let t = openmetrics_to_text("# HELP d Build.\n# TYPE d info\nd_info{v=\"1\"} 1\n# EOF\n");
        assert_eq!(
            t,
            "# HELP d_info Build.\n# TYPE d_info gauge\nd_info{v=\"1\"} 1\n"
        );
    }

    #[test]
    fn mapped_ipv4_loopback_counts_as_loopback() {
        assert!(is_loopback(
            "127.0.0.1".parse().unwrap_or(IpAddr::from([0; 4]))
        ));
        assert!(is_loopback("::1".parse().unwrap_or(IpAddr::from([0; 4]))));
        assert!(is_loopback(
            "::ffff:127.0.0.1".parse().unwrap_or(IpAddr::from([0; 4]))
        ));
        assert!(!is_loopback(
            "192.0.2.2".parse().unwrap_or(IpAddr::from([127, 0, 0, 1]))
        ));
    }

    #[test]
    fn scrape_includes_added_sources() {
        add_metrics_source(Box::new(|r: &mut Registry| {
            r.register(
                "test_source_marker",
                "A marker",
                prometheus_client::metrics::gauge::ConstGauge::new(1i64),
            );
        }));
        let om = encode_openmetrics(false).unwrap_or_default();
        assert!(om.contains("test_source_marker 1"), "{om}");
        assert!(om.contains("cc_proxy_ready 0"), "{om}");
        assert!(
            om.contains(&format!(
                "cc_proxy_build_info{{version=\"{}\",api_version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION"),
                cc_proxy_api::API_VERSION
            )),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"));
    }
}
