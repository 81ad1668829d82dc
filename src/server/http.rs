//! HTTP on the client socket: JSON-RPC (served by jsonrpsee: HTTP/1.1, HTTP/2 prior knowledge, WebSocket)
//! and, on `POST /v1/streams/<token>` with `Upgrade: cc-proxy-stream`, a shim's stdio attach.
//!
//! Each connection is served by hyper with a header timeout (`--client-header-timeout`: an HTTP/1 request
//! head, the WebSocket handshake included, must be complete within it, and a connection must send its
//! first request within it), under the connection guard ([`super::guard`]), with the RPC middleware stack
//! [`CountErrorsLayer`] over [`LimitsLayer`]. Every request carries, in its extensions, the peer, the
//! connection's [`Activity`] and its [`Transport`].

use std::sync::Arc;

use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use jsonrpsee::core::BoxError;
use jsonrpsee::server::{
    HttpBody, HttpRequest, HttpResponse, Methods, StopHandle, TowerServiceBuilder,
};
use tower::Service;

use super::detect::ClientConn;
use super::guard::Activity;
use super::rpc::errors::{count_unrouted, CountErrorsLayer, Routed};
use super::rpc::ids;
use super::rpc::limits::{LimitsLayer, RpcLimits, Transport};
use super::{attach, rpc, Peer, Proxy, MAX_REQUEST_BYTES};
use crate::admin::metrics::{LimitKind, METRICS};

/// Largest JSON-RPC response body.
pub const MAX_RESPONSE_BYTES: u32 = 16 << 20;

/// The RPC middleware stack: error counting over the request limits.
type RpcLayers = tower::layer::util::Stack<
    LimitsLayer,
    tower::layer::util::Stack<CountErrorsLayer, tower::layer::util::Identity>,
>;

/// Builds one jsonrpsee service per connection over the shared method table.
#[derive(Clone)]
pub struct HttpServer {
    proxy: Arc<Proxy>,
    methods: Methods,
    builder: TowerServiceBuilder<RpcLayers, tower::layer::util::Identity>,
    stop: StopHandle,
}

impl HttpServer {
    pub fn new(proxy: Arc<Proxy>, stop: StopHandle) -> HttpServer {
        let methods: Methods = rpc::module(proxy.clone()).into();
        let limits = &proxy.limits;
        let config = jsonrpsee::server::ServerConfig::builder()
            .max_request_body_size(MAX_REQUEST_BYTES)
            .max_response_body_size(MAX_RESPONSE_BYTES)
            .max_connections(100_000)
            .build();
        let builder = jsonrpsee::server::Server::builder()
            .set_config(config)
            .set_rpc_middleware(
                jsonrpsee::server::middleware::rpc::RpcServiceBuilder::new()
                    .layer(CountErrorsLayer)
                    .layer(LimitsLayer(RpcLimits {
                        max_id_bytes: limits.max_id_bytes,
                        max_batch: limits.max_batch as usize,
                        max_in_flight: limits.max_requests_per_connection,
                        max_response: MAX_RESPONSE_BYTES as usize,
                    })),
            )
            .to_service_builder();
        HttpServer {
            proxy,
            methods,
            builder,
            stop,
        }
    }

    /// Serve one connection until it closes or the daemon stops.
    pub async fn serve(self, conn: ClientConn, peer: Peer, activity: Arc<Activity>) {
        use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

        let rpc = self
            .builder
            .clone()
            .build(self.methods.clone(), self.stop.clone());
        let first_request = Arc::new(tokio::sync::Notify::new());
        let svc = Dispatch {
            rpc,
            proxy: self.proxy.clone(),
            peer,
            activity,
            first_request: first_request.clone(),
        };
        let header_timeout = self.proxy.limits.header_timeout;
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        builder.http2().timer(TokioTimer::new());
        let conn = builder.serve_connection_with_upgrades(
            TokioIo::new(conn),
            hyper_util::service::TowerToHyperService::new(svc),
        );
        let stopped = self.stop.clone().shutdown();
        tokio::pin!(conn, stopped);
        let no_first_request = async {
            if tokio::time::timeout(header_timeout, first_request.notified())
                .await
                .is_err()
            {
                return;
            }
            std::future::pending::<()>().await
        };
        let result = tokio::select! {
            r = &mut conn => r,
            _ = &mut stopped => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            _ = no_first_request => {
                METRICS.limit_refused(LimitKind::HeaderTimeout);
                tracing::info!(timeout = ?header_timeout,
                    "closing client connection: no request within --client-header-timeout");
                return;
            }
        };
        if let Err(e) = result {
            // hyper's own header timeout (an HTTP/1 request head not complete in time) ends here too.
            let timed_out = e
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout);
            if timed_out {
                // Also an HTTP/1.1 keep-alive connection silent between requests: hyper's head timer runs
                // from the end of the previous answer.
                METRICS.limit_refused(LimitKind::HeaderTimeout);
                tracing::debug!(timeout = ?header_timeout,
                    "closing client connection: no complete request head within --client-header-timeout");
            } else {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        }
    }
}

type RpcService = jsonrpsee::server::TowerService<RpcLayers, tower::layer::util::Identity>;
type BoxFuture = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>;

/// Routes one connection's requests: stream attach to [`attach`], everything else to jsonrpsee.
#[derive(Clone)]
struct Dispatch {
    rpc: RpcService,
    proxy: Arc<Proxy>,
    peer: Peer,
    activity: Arc<Activity>,
    /// Told of every request; the connection is closed when none came within the header timeout.
    first_request: Arc<tokio::sync::Notify>,
}

impl Service<HttpRequest<Incoming>> for Dispatch {
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: HttpRequest<Incoming>) -> BoxFuture {
        self.first_request.notify_one();
        req.extensions_mut().insert(self.peer.clone());
        req.extensions_mut().insert(self.activity.clone());
        if attach::is_attach(&req) {
            let (proxy, activity) = (self.proxy.clone(), self.activity.clone());
            Box::pin(async move {
                let resp = attach::handle(proxy, req).await;
                if resp.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
                    // From here on the connection is a stream with bounds of its own.
                    activity.set_attached();
                }
                Ok(resp)
            })
        } else {
            let transport = if jsonrpsee::server::ws::is_upgrade_request(&req) {
                Transport::WebSocket
            } else {
                Transport::Http
            };
            req.extensions_mut().insert(transport);
            let routed = Routed::default();
            req.extensions_mut().insert(routed.clone());
            let mut rpc = self.rpc.clone();
            Box::pin(async move {
                let req = match with_answerable_ids(req).await {
                    Ok(req) => req,
                    Err(refused) => return Ok(count_unrouted(refused).await),
                };
                let resp = rpc.call(req).await?;
                if routed.was_routed() {
                    Ok(resp)
                } else {
                    Ok(count_unrouted(resp).await)
                }
            })
        }
    }
}

/// A JSON-RPC POST with its body read (within [`MAX_REQUEST_BYTES`], as jsonrpsee would read it) and entries
/// whose id jsonrpsee cannot hold replaced ([`ids::replace_unanswerable_ids`]); any other request as it came.
/// A body jsonrpsee would refuse is refused here with jsonrpsee's own response.
async fn with_answerable_ids(req: HttpRequest<Incoming>) -> Result<HttpRequest, HttpResponse> {
    use jsonrpsee::core::http_helpers::{read_body, HttpError};
    use jsonrpsee::server::http::response;

    if req.method() != hyper::Method::POST || !jsonrpsee::server::http::content_type_is_json(&req) {
        return Ok(req.map(HttpBody::new));
    }
    let (mut parts, body) = req.into_parts();
    let (body, single) = match read_body(&parts.headers, body, MAX_REQUEST_BYTES).await {
        Ok(read) => read,
        Err(HttpError::TooLarge) => return Err(response::too_large(MAX_REQUEST_BYTES)),
        Err(HttpError::Malformed) => return Err(response::malformed()),
        Err(HttpError::Stream(e)) => {
            tracing::debug!(error = %e, "reading a request body failed");
            return Err(response::internal_error());
        }
    };
    let body = ids::replace_unanswerable_ids(&body, single).unwrap_or(body);
    parts
        .headers
        .insert(hyper::header::CONTENT_LENGTH, body.len().into());
    Ok(HttpRequest::from_parts(parts, HttpBody::from(body)))
}
