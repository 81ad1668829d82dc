//! HTTP on the client socket: JSON-RPC (served by jsonrpsee: HTTP/1.1, HTTP/2 prior knowledge, WebSocket)
//! and, on `POST /v1/streams/<token>` with `Upgrade: cc-proxy-stream`, a shim's stdio attach.

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
use super::rpc::errors::{count_unrouted, CountErrorsLayer, Routed};
use super::rpc::ids;
use super::{attach, rpc, Peer, Proxy, MAX_REQUEST_BYTES};

/// The RPC middleware stack: error counting.
type RpcLayers = tower::layer::util::Stack<CountErrorsLayer, tower::layer::util::Identity>;

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
        let config = jsonrpsee::server::ServerConfig::builder()
            .max_request_body_size(MAX_REQUEST_BYTES)
            .max_response_body_size(16 << 20)
            .max_connections(100_000)
            .build();
        let builder = jsonrpsee::server::Server::builder()
            .set_config(config)
            .set_rpc_middleware(
                jsonrpsee::server::middleware::rpc::RpcServiceBuilder::new()
                    .layer(CountErrorsLayer),
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
    pub async fn serve(self, conn: ClientConn, peer: Peer) {
        let rpc = self
            .builder
            .clone()
            .build(self.methods.clone(), self.stop.clone());
        let svc = Dispatch {
            rpc,
            proxy: self.proxy.clone(),
            peer,
        };
        let stopped = self.stop.clone().shutdown();
        if let Err(e) = jsonrpsee::server::serve_with_graceful_shutdown(conn, svc, stopped).await {
            tracing::debug!(error = %e, "HTTP connection ended with an error");
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
}

impl Service<HttpRequest<Incoming>> for Dispatch {
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: HttpRequest<Incoming>) -> BoxFuture {
        req.extensions_mut().insert(self.peer.clone());
        if attach::is_attach(&req) {
            let proxy = self.proxy.clone();
            Box::pin(async move { Ok(attach::handle(proxy, req).await) })
        } else {
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
