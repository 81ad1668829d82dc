//! HTTP on the client socket: JSON-RPC (served by jsonrpsee: HTTP/1.1, HTTP/2 prior knowledge, WebSocket)
//! and, on `POST /v1/streams/<token>` with `Upgrade: cc-proxy-stream`, a shim's stdio attach.

use std::sync::Arc;

use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use jsonrpsee::core::BoxError;
use jsonrpsee::server::{HttpRequest, HttpResponse, Methods, StopHandle, TowerServiceBuilder};
use tower::Service;

use super::detect::ClientConn;
use super::rpc::errors::{count_unrouted, CountErrorsLayer, Routed};
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
            let call = self.rpc.call(req);
            Box::pin(async move {
                let resp = call.await?;
                if routed.was_routed() {
                    Ok(resp)
                } else {
                    Ok(count_unrouted(resp).await)
                }
            })
        }
    }
}
