//! The admin HTTP server, for operators and Prometheus: `/metrics`, `/ready`, `/live`, `/proxy-log-level`.
//!
//! It runs on its own thread with its own single-threaded runtime, so a slow scrape never competes with the
//! data plane's worker threads, and the data plane's load never delays a liveness probe.

pub mod metrics;
mod process;
pub mod tap;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::server::Proxy;

/// Largest body accepted by `PUT /proxy-log-level`.
const MAX_LOG_LEVEL_BODY: usize = 4096;

/// Keeps the admin thread alive; dropping it stops the server.
pub struct AdminHandle {
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Start the admin server on `addr` (`off` disables it). Binding errors are logged, never fatal.
pub fn start(addr: &str, proxy: Arc<Proxy>) -> Option<AdminHandle> {
    if addr == "off" || addr.is_empty() {
        return None;
    }
    let std_listener = match std::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(addr, error = %e, "cannot start the admin server; metrics are unavailable");
            return None;
        }
    };
    let local = std_listener.local_addr().ok()?;
    let _ = std_listener.set_nonblocking(true);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("cc-proxy-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the admin runtime");
                    return;
                }
            };
            rt.block_on(serve(std_listener, proxy, stop_rx));
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the admin thread");
        return None;
    }
    tracing::info!(addr = %local, "admin server listening");
    Some(AdminHandle { _stop: stop_tx })
}

async fn serve(
    listener: std::net::TcpListener,
    proxy: Arc<Proxy>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return,
            a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, proxy, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn route(
    req: Request<Incoming>,
    proxy: Arc<Proxy>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut registry = prometheus_client::registry::Registry::default();
            metrics::METRICS.register(&mut registry);
            process::register(&mut registry);
            let mut out = String::with_capacity(16 * 1024);
            if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
            }
            let mut r = text(StatusCode::OK, out);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            if proxy.registry.is_recovered() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "recovering registered VMs\n",
                )
            }
        }
        (&Method::GET, "/proxy-log-level") => {
            text(StatusCode::OK, format!("{}\n", proxy.log.current()))
        }
        (&Method::PUT, "/proxy-log-level") => {
            if !peer.ip().is_loopback() {
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
            let filter = String::from_utf8_lossy(&body).trim().to_string();
            match proxy.log.set(&filter) {
                Ok(()) => {
                    tracing::warn!(filter = %filter, "log level changed");
                    text(StatusCode::OK, format!("{filter}\n"))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (_, "/metrics" | "/live" | "/ready" | "/proxy-log-level") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
