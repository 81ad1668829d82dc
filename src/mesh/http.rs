//! HTTP through the mesh, served with hyper: on the inbound side requests from a (usually authenticated)
//! peer forwarded to the guest's service; on the outbound side the guest's requests forwarded to the
//! destination over pooled mTLS connections (a new connection goes to the endpoint the two-choices rule picks).
//!
//! Per request (the `l5d-*` request headers are the inbound side's):
//! - the listener denied the peer: answer 403 with `l5d-proxy-error` (nothing reaches the guest);
//! - `l5d-client-id` is removed, then set to the peer's identity when it is authenticated (a plaintext peer
//!   cannot forge it);
//! - an HTTP/2 request carrying `l5d-orig-proto: HTTP/1.1` (an HTTP/1 request a Linkerd proxy carried over
//!   HTTP/2) goes to the guest as HTTP/1.1, and its response is marked with the same header;
//! - HTTP/1 requests use a pool of keep-alive connections to the target, HTTP/2 ones a multiplexed
//!   connection; the guest gets the version the peer spoke (`auto`) or the one its listener names
//!   (`http1`, `http2`: requests are converted, responses go back in the peer's version);
//! - an upgrade (WebSocket) or CONNECT: once the guest answers 101 (or 2xx to CONNECT) the bytes pass both
//!   ways unchanged;
//! - the guest cannot be reached: 502 with `l5d-proxy-error`;
//! - counted (`request_total`, `response_total`, `response_latency_ms`) and reported to the tap.
//!
//! At shutdown each connection finishes its requests and closes (GOAWAY, `Connection: close`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::{Connected, Connection as HyperConnection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::inbound::BoxIo;
use super::listener::limits;
use super::metrics::{self, Direction, HttpLabels, Refusal, TlsLabel};
use crate::admin::tap::{self, MeshRequest, TapEvent};
use crate::transport::{Endpoint, TransportError};

/// Set on requests to the peer's identity.
pub const L5D_CLIENT_ID: HeaderName = HeaderName::from_static("l5d-client-id");
/// Marks an HTTP/1 request carried over HTTP/2 between Linkerd proxies.
pub const L5D_ORIG_PROTO: HeaderName = HeaderName::from_static("l5d-orig-proto");
/// On responses the proxy itself generates: why.
pub const L5D_PROXY_ERROR: HeaderName = HeaderName::from_static("l5d-proxy-error");

/// Why an HTTP connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("serving HTTP: {0}")]
    Serve(Box<dyn std::error::Error + Send + Sync>),
}

pub type RespBody = BoxBody<Bytes, hyper::Error>;

/// An upstream connection (to a guest target or a mesh endpoint) as hyper's client wants it; `hold` lives as
/// long as the connection (an endpoint's open-connection count).
pub struct UpstreamIo {
    pub io: BoxIo,
    pub _hold: Option<Box<dyn Send + Sync>>,
    /// What the connection reached (the guest target, the chosen endpoint's address): every response that
    /// comes over it carries it (an [`UpstreamEndpoint`] extension), for the tap.
    pub endpoint: Option<Arc<str>>,
}

/// The response extension naming the upstream a pooled connection reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamEndpoint(pub Arc<str>);

impl AsyncRead for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl HyperConnection for UpstreamIo {
    fn connected(&self) -> Connected {
        match &self.endpoint {
            Some(e) => Connected::new().extra(UpstreamEndpoint(e.clone())),
            None => Connected::new(),
        }
    }
}

/// An error opening an upstream connection.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens one upstream connection.
pub type ConnectFn = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>> + Send + Sync,
>;

/// Opens every pooled connection with its [`ConnectFn`], whatever the request's URI says.
#[derive(Clone)]
pub struct UpstreamConnector {
    connect: ConnectFn,
}

impl tower::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<UpstreamIo>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let connect = self.connect.clone();
        Box::pin(async move { Ok(TokioIo::new(connect().await?)) })
    }
}

/// Pooled HTTP/1.1 and HTTP/2 clients.
struct Pools {
    h1: Client<UpstreamConnector, Incoming>,
    h2: Client<UpstreamConnector, Incoming>,
}

/// How an [`Upstream`] reaches its endpoints.
enum Route {
    /// Pooled HTTP/1.1 and HTTP/2 clients whose connections one [`ConnectFn`] opens.
    Pools(Box<Pools>),
    /// Requests balanced over an endpoint set, each endpoint with its own pools.
    Balanced(Arc<super::balance::HttpBalancer>),
}

/// Where forwarded requests go: a guest target, or a mesh destination.
pub struct Upstream {
    /// What it reaches, for logs and error responses.
    pub name: String,
    route: Route,
}

/// Why a forwarded request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The upstream could not be reached or failed (502).
    #[error("{0}")]
    Unreachable(BoxError),
    /// No endpoint was ready within the fail-fast time (503).
    #[error("no endpoint is ready")]
    Unavailable,
}

impl Upstream {
    /// Pools to a guest target.
    pub fn new(target: Endpoint) -> Upstream {
        let name = target.to_string();
        let connect: ConnectFn = Arc::new(move || {
            let target = target.clone();
            Box::pin(async move {
                let endpoint = Some(Arc::from(target.to_string()));
                let c = target
                    .connect(limits().connect_timeout)
                    .await
                    .map_err(|e: TransportError| -> BoxError { Box::new(e) })?;
                Ok(UpstreamIo {
                    io: Box::new(c),
                    _hold: None,
                    endpoint,
                })
            })
        });
        Upstream::with_connector(name, connect)
    }

    /// Pools whose connections `connect` opens.
    pub fn with_connector(name: String, connect: ConnectFn) -> Upstream {
        let connector = UpstreamConnector { connect };
        let idle = limits().idle_timeout;
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle)
            .pool_timer(TokioTimer::new())
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle)
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .build(connector);
        Upstream {
            name,
            route: Route::Pools(Box::new(Pools { h1, h2 })),
        }
    }

    /// Requests balanced by `balancer`.
    pub fn balanced(name: String, balancer: Arc<super::balance::HttpBalancer>) -> Upstream {
        Upstream {
            name,
            route: Route::Balanced(balancer),
        }
    }

    /// Send `req` over the pools (`h2`: the HTTP/2 one); the request's URI is absolute.
    pub async fn send_pooled(
        &self,
        req: Request<Incoming>,
        h2: bool,
    ) -> Result<Response<Incoming>, BoxError> {
        match &self.route {
            Route::Pools(p) => {
                let client = if h2 { &p.h2 } else { &p.h1 };
                client
                    .request(req)
                    .await
                    .map_err(|e| Box::new(e) as BoxError)
            }
            Route::Balanced(_) => Err("a balanced upstream has no pools of its own".into()),
        }
    }

    /// Send `req` (already in the version it travels in) and bring back the response.
    async fn send(
        &self,
        req: Request<Incoming>,
        h2: bool,
    ) -> Result<Response<RespBody>, SendError> {
        match &self.route {
            Route::Pools(_) => self
                .send_pooled(req, h2)
                .await
                .map(|r| r.map(|b| b.boxed()))
                .map_err(SendError::Unreachable),
            Route::Balanced(b) => b.send(req).await,
        }
    }
}

/// Which HTTP version the guest is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestProtocol {
    /// The version the peer spoke (`auto`), except `l5d-orig-proto` requests (HTTP/1.1).
    AsReceived,
    /// Always HTTP/1.1 (`http1`).
    Http1,
    /// Always HTTP/2 with prior knowledge (`http2`).
    Http2,
}

/// What every request of one HTTP connection (inbound from a peer, or outbound from the guest) shares.
pub struct HttpSession {
    pub direction: Direction,
    pub vm: String,
    /// The VM's owner: its tap shows these requests (privileged tappers see every VM's).
    pub owner: u32,
    /// Inbound: the authenticated client's identity; outbound: the identity the server had to present.
    pub peer: Option<String>,
    pub tls: TlsLabel,
    /// The listener's policy refused the peer: every request gets a 403.
    pub denied: Option<Refusal>,
    pub upstream: Arc<Upstream>,
    pub guest: GuestProtocol,
    /// The metric series of the connection's last authority (see [`metrics::RequestSeries`]).
    pub series: std::sync::Mutex<Option<metrics::RequestSeries>>,
}

fn proxy_response(status: StatusCode, error: &str) -> Response<RespBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{error}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(error) {
        r.headers_mut().insert(L5D_PROXY_ERROR, v);
    }
    r
}

/// Whether the request asks to switch protocols or tunnel.
pub fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        || (req.version() == Version::HTTP_11 && req.headers().contains_key(hyper::header::UPGRADE))
}

/// The request's authority: `:authority`/the URI's, else `Host`.
fn authority<B>(req: &Request<B>) -> &str {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or_default()
}

impl HttpSession {
    /// The connection's series, pointed at `auth` (resolved again only when the authority changes).
    fn series<'a>(
        &self,
        cache: &'a mut Option<metrics::RequestSeries>,
        auth: &str,
    ) -> &'a mut metrics::RequestSeries {
        if cache.as_ref().is_some_and(|s| s.authority() != auth) {
            *cache = None;
        }
        cache.get_or_insert_with(|| {
            let peer_id = self.peer.clone().unwrap_or_default();
            let (client_id, server_id) = match self.direction {
                Direction::Inbound => (peer_id, String::new()),
                Direction::Outbound => (String::new(), peer_id),
            };
            metrics::RequestSeries::new(
                HttpLabels {
                    direction: self.direction.as_str(),
                    tls: self.tls.as_str(),
                    client_id,
                    server_id,
                    authority: auth.to_string(),
                    vm: self.vm.clone(),
                },
                crate::mesh::listener::limits().max_authorities,
            )
        })
    }

    /// Count a request to `auth`.
    fn count_request(&self, auth: &str) {
        let mut cache = crate::sync::lock(&self.series);
        self.series(&mut cache, auth).request();
    }

    /// Count the response to a request to `auth`.
    fn count_response(&self, auth: &str, status: u16, latency_ms: f64) {
        let mut cache = crate::sync::lock(&self.series);
        self.series(&mut cache, auth).response(status, latency_ms);
    }
}

async fn handle(
    s: Arc<HttpSession>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, hyper::Error> {
    let start = Instant::now();
    let auth = authority(&req).to_string();
    // A denied peer's requests are counted without the authority it chose: it gets no series of its own.
    let label = if s.denied.is_some() {
        ""
    } else {
        auth.as_str()
    };
    s.count_request(label);
    // What the tap shows, kept only while someone taps.
    let tapped = tap::enabled().then(|| {
        (
            req.method().to_string(),
            req.uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
        )
    });
    let (resp, endpoint) = match s.denied {
        Some(reason) => {
            let msg = match reason {
                Refusal::Unauthenticated => {
                    "unauthorized connection: no client identity".to_string()
                }
                _ => format!(
                    "unauthorized connection from {}",
                    s.peer.as_deref().unwrap_or("an unauthenticated client")
                ),
            };
            (proxy_response(StatusCode::FORBIDDEN, &msg), None)
        }
        None => forward(&s, req, &auth).await,
    };
    let status = resp.status().as_u16();
    let latency = start.elapsed();
    s.count_response(label, status, latency.as_secs_f64() * 1000.0);
    if let Some((method, path)) = tapped {
        let vm = s.vm.clone();
        let peer = s.peer.clone();
        let direction = s.direction;
        tap::emit(s.owner, move || {
            let r = MeshRequest {
                vm,
                method,
                authority: auth,
                path,
                status,
                latency_us: latency.as_micros() as u64,
                peer_identity: peer,
                endpoint: endpoint.map(|e| e.to_string()),
            };
            match direction {
                Direction::Inbound => TapEvent::MeshInboundRequest(r),
                Direction::Outbound => TapEvent::MeshOutboundRequest(r),
            }
        });
    }
    Ok(resp)
}

/// Send the request upstream (the guest, or the mesh destination) and bring back its response, with the
/// upstream that answered (`None` when nothing did).
async fn forward(
    s: &HttpSession,
    mut req: Request<Incoming>,
    auth: &str,
) -> (Response<RespBody>, Option<Arc<str>>) {
    let inbound = s.direction == Direction::Inbound;
    if inbound {
        let headers = req.headers_mut();
        headers.remove(L5D_CLIENT_ID);
        if let Some(id) = s
            .peer
            .as_deref()
            .and_then(|p| HeaderValue::from_str(p).ok())
        {
            headers.insert(L5D_CLIENT_ID, id);
        }
    }
    let orig_proto = inbound
        && req.version() == Version::HTTP_2
        && req
            .headers()
            .get(L5D_ORIG_PROTO)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("HTTP/1.1"));
    if orig_proto {
        req.headers_mut().remove(L5D_ORIG_PROTO);
    }
    let to_h2 = match s.guest {
        GuestProtocol::Http2 => true,
        GuestProtocol::Http1 => false,
        GuestProtocol::AsReceived => req.version() == Version::HTTP_2 && !orig_proto,
    };
    // An HTTP/2 request going to the guest as HTTP/1.1 (or the reverse) comes back in the peer's version.
    let peer_version = req.version();
    if to_h2 {
        *req.version_mut() = Version::HTTP_2;
    } else if peer_version == Version::HTTP_2 {
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(HOST) {
            if let Ok(h) = HeaderValue::from_str(auth) {
                req.headers_mut().insert(HOST, h);
            }
        }
    }
    // The pooled client wants absolute URIs; the connector ignores them (the target is fixed). The parts are
    // reused (shared bytes), only a missing or different authority is parsed.
    if req.method() != Method::CONNECT {
        let host = if auth.is_empty() { "guest" } else { auth };
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(Scheme::HTTP);
        if parts.authority.as_ref().map(|a| a.as_str()) != Some(host) {
            parts.authority = host.parse::<Authority>().ok();
        }
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        if let Ok(u) = Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
    let upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let mut resp = match s.upstream.send(req, to_h2).await {
        Ok(r) => r,
        Err(SendError::Unavailable) => {
            tracing::info!(vm = %s.vm, direction = s.direction.as_str(), upstream = %s.upstream.name, "mesh: no endpoint is ready");
            return (
                proxy_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("no endpoint of {} is ready", s.upstream.name),
                ),
                None,
            );
        }
        Err(SendError::Unreachable(e)) => {
            tracing::info!(vm = %s.vm, direction = s.direction.as_str(), upstream = %s.upstream.name, error = %e, "mesh: the upstream did not answer");
            return (
                proxy_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("cannot reach {}", s.upstream.name),
                ),
                None,
            );
        }
    };
    let endpoint = resp
        .extensions()
        .get::<UpstreamEndpoint>()
        .map(|e| e.0.clone());
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || (resp.status().is_success() && upgrade.is_some() && resp.version() != Version::HTTP_2);
    if let (Some(client_side), true) = (upgrade, switched) {
        let guest_side = hyper::upgrade::on(&mut resp);
        let vm = s.vm.clone();
        tokio::spawn(async move {
            let (c, g) = tokio::join!(client_side, guest_side);
            match (c, g) {
                (Ok(c), Ok(g)) => {
                    let counts = super::copy::Transferred::default();
                    if let Err(e) =
                        super::copy::bidirectional(TokioIo::new(c), TokioIo::new(g), &counts).await
                    {
                        tracing::debug!(vm, error = %e, "mesh: upgraded connection ended");
                    }
                }
                (c, g) => {
                    tracing::debug!(
                        vm,
                        client = c.is_ok(),
                        guest = g.is_ok(),
                        "mesh: upgrade failed"
                    )
                }
            }
        });
    }
    if orig_proto {
        resp.headers_mut()
            .insert(L5D_ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    }
    if peer_version == Version::HTTP_2 && !to_h2 {
        *resp.version_mut() = Version::HTTP_2;
        // HTTP/2 has no connection-specific headers.
        for h in [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
            "proxy-connection",
        ] {
            resp.headers_mut().remove(h);
        }
    }
    if peer_version != Version::HTTP_2 && to_h2 {
        *resp.version_mut() = peer_version;
    }
    (resp, endpoint)
}

/// Serve one inbound connection's HTTP (`http2`: prior knowledge, else HTTP/1) until it ends, or until
/// `shutdown`, then finish the requests in flight and close.
pub async fn serve_inbound(
    io: BoxIo,
    http2: bool,
    s: Arc<HttpSession>,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    let lim = limits();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(lim.idle_timeout)
        .max_buf_size(lim.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(lim.max_header_bytes).unwrap_or(u32::MAX));
    let builder = if http2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
    let service = hyper::service::service_fn(move |req| handle(s.clone(), req));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    r.map_err(HttpError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(vm: &str, direction: Direction) -> HttpSession {
        HttpSession {
            direction,
            vm: vm.to_string(),
            owner: 0,
            peer: Some("b.default.serviceaccount.identity.linkerd.cluster.local".to_string()),
            tls: TlsLabel::Yes,
            denied: None,
            upstream: Arc::new(Upstream::new(Endpoint::Tcp("127.0.0.1:9".to_string()))),
            guest: GuestProtocol::AsReceived,
            series: std::sync::Mutex::new(None),
        }
    }

    fn labels(s: &HttpSession, authority: &str) -> HttpLabels {
        HttpLabels {
            direction: s.direction.as_str(),
            tls: "true",
            client_id: String::new(),
            server_id: s.peer.clone().unwrap_or_default(),
            authority: authority.to_string(),
            vm: s.vm.clone(),
        }
    }

    fn responses(l: &HttpLabels, status: &str, classification: &'static str) -> u64 {
        metrics::METRICS
            .response
            .get_or_create(&metrics::ResponseLabels {
                direction: l.direction,
                tls: l.tls,
                client_id: l.client_id.clone(),
                server_id: l.server_id.clone(),
                authority: l.authority.clone(),
                vm: l.vm.clone(),
                status_code: status.to_string(),
                classification,
            })
            .get()
    }

    /// The connection's cached series count exactly what one lookup per request counted: per authority (the
    /// authority changing between requests, and back), per status code (more codes than are kept resolved).
    #[test]
    fn cached_series_count_every_request_and_response_under_its_labels() {
        let s = session("series-test-vm", Direction::Outbound);
        let _serving = metrics::serving("series-test-vm");
        let (x, y) = (labels(&s, "x.example:80"), labels(&s, "y.example:80"));
        for _ in 0..3 {
            s.count_request("x.example:80");
            s.count_response("x.example:80", 200, 1.0);
        }
        s.count_request("y.example:80");
        s.count_response("y.example:80", 503, 2.0);
        s.count_request("x.example:80");
        // An HTTP/2 request to x answered after one to y began.
        s.count_request("y.example:80");
        s.count_response("x.example:80", 200, 1.0);
        s.count_response("y.example:80", 200, 1.0);
        let statuses: Vec<u16> = (400..400 + metrics::MAX_CACHED_STATUSES as u16 + 3).collect();
        for st in &statuses {
            s.count_request("y.example:80");
            s.count_response("y.example:80", *st, 1.0);
        }
        let m = &metrics::METRICS;
        assert_eq!(m.request.get_or_create(&x).get(), 4);
        assert_eq!(m.request.get_or_create(&y).get(), 2 + statuses.len() as u64);
        assert_eq!(responses(&x, "200", "success"), 4);
        assert_eq!(responses(&y, "503", "failure"), 1);
        assert_eq!(responses(&y, "200", "success"), 1);
        for st in &statuses {
            assert_eq!(responses(&y, &st.to_string(), "success"), 1, "{st}");
        }
    }
}
