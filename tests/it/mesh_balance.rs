//! Outbound load balancing (issue 15 §3), through the real binary: a meshed VM whose outbound listener has
//! several endpoints, in-test HTTP servers that count their hits (one slowed down, one killed and
//! restarted), the metrics and the responses the guest's client gets.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use cc_proxy_api::mesh::EndpointState;

use crate::common::{free_addr, Env};
use crate::mesh_data::{register, A, B, T};

const C: &str = "c.default.serviceaccount.identity.linkerd.cluster.local";

/// What an endpoint server saw of one request: its version and `l5d-orig-proto`.
type Seen = (Version, Option<String>);

/// An HTTP/1 and HTTP/2 server that counts its requests and records their versions; dropping it (or [`Server::kill`]) closes the
/// listener and every connection.
struct Server {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// Serve on `addr` (port 0: any), answering after `delay`.
    async fn start(addr: &str, delay: Duration) -> Server {
        Server::start_counting(addr, delay, Arc::new(AtomicUsize::new(0))).await
    }

    async fn start_counting(addr: &str, delay: Duration, hits: Arc<AtomicUsize>) -> Server {
        let l = TcpListener::bind(addr).await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (h, s) = (hits.clone(), seen.clone());
        let task = tokio::spawn(async move {
            // Owned here: aborting the task drops every connection.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                    a = l.accept() => {
                        let Ok((stream, _)) = a else { continue };
                        let (h, s) = (h.clone(), s.clone());
                        conns.spawn(async move {
                            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                                let (h, s) = (h.clone(), s.clone());
                                async move {
                                    s.lock().unwrap_or_else(|p| p.into_inner()).push((
                                        req.version(),
                                        req.headers()
                                            .get("l5d-orig-proto")
                                            .and_then(|v| v.to_str().ok())
                                            .map(str::to_string),
                                    ));
                                    h.fetch_add(1, Ordering::SeqCst);
                                    tokio::time::sleep(delay).await;
                                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                        Bytes::from_static(b"ok\n"),
                                    )))
                                }
                            });
                            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                }
            }
        });
        Server {
            addr,
            hits,
            seen,
            task,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Close the listener and every connection; the port is free once this returns.
    async fn kill(self) -> (SocketAddr, Arc<AtomicUsize>) {
        self.task.abort();
        let (addr, hits) = (self.addr, self.hits.clone());
        drop(self);
        // Wait until nothing accepts there any more.
        let deadline = Instant::now() + T;
        while TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "{addr} still accepts");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (addr, hits)
    }
}

/// One HTTP/1.1 GET on a new connection; returns the status and the response head.
async fn get(addr: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_string();
    (status, head)
}

/// A metric sample's value (the first line starting with `prefix`), 0 when absent.
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn endpoints_in(metrics: &str, listener: &str, state: &str) -> f64 {
    sample(
        metrics,
        &format!("cc_proxy_mesh_endpoints{{vm=\"a\",listener=\"{listener}\",state=\"{state}\"}}"),
    )
}

/// Wait until VM `id`'s destination `name` has endpoints.
async fn wait_resolved(env: &Env, id: &str, name: &str) {
    let deadline = Instant::now() + T;
    loop {
        let eps = env.client.mesh_endpoints(id).await.expect("mesh.endpoints");
        if eps
            .destinations
            .iter()
            .any(|d| d.name.as_deref() == Some(name) && !d.endpoints.is_empty())
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never resolved: {eps:?}\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until `listen` answers 200.
async fn wait_serving(env: &Env, listen: &str) {
    let deadline = Instant::now() + T;
    loop {
        if get(listen).await.0 == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{listen} never answered\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_fast_endpoint_takes_most_requests_at_16_connections() {
    let mut env = Env::start().await;
    let fast = Server::start("127.0.0.1:0", Duration::ZERO).await;
    let slow = Server::start("127.0.0.1:0", Duration::from_millis(200)).await;
    let listen = free_addr();
    let agent = env.agent(&[]);
    register(
        &env,
        "a",
        &agent,
        json!({"identity": A, "outbound": [{"listen": listen,
            "destination": {"endpoints": [fast.addr.to_string(), slow.addr.to_string()]}}]}),
    )
    .await;
    wait_serving(&env, &listen).await;
    let (f0, s0) = (fast.hits(), slow.hits());

    // 16 keep-alive connections, each sending requests one after another for 3 seconds.
    let until = Instant::now() + Duration::from_secs(3);
    let mut load = JoinSet::new();
    for _ in 0..16 {
        let listen = listen.clone();
        load.spawn(async move {
            let stream = TcpStream::connect(&listen).await.expect("connect");
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let (mut ok, mut other) = (0usize, 0usize);
            while Instant::now() < until {
                let req = Request::get("/")
                    .header("host", "web")
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let resp = send.send_request(req).await.expect("response");
                let status = resp.status();
                let _ = resp.into_body().collect().await;
                if status == 200 {
                    ok += 1;
                } else {
                    other += 1;
                }
            }
            (ok, other)
        });
    }
    let (mut ok, mut other) = (0, 0);
    while let Some(r) = load.join_next().await {
        let (o, x) = r.expect("load task");
        ok += o;
        other += x;
    }
    let (f, s) = (fast.hits() - f0, slow.hits() - s0);
    let share = f as f64 / (f + s).max(1) as f64;
    eprintln!(
        "fast {f}, slow {s}: {:.1}% to the fast one; {ok} ok, {other} not",
        share * 100.0
    );
    assert_eq!(other, 0, "every request answered 200");
    assert!(f + s >= ok, "the servers saw every request");
    assert!(
        share >= 0.8,
        "{:.1}% of {} requests went to the fast endpoint",
        share * 100.0,
        f + s
    );

    // The latency estimates are visible per endpoint (status), and both endpoints are ready.
    let m = env.metrics().await;
    assert_eq!(endpoints_in(&m, &listen, "ready"), 2.0, "{m}");
    drop(agent);
    env.kill_daemon();
}

#[tokio::test]
async fn a_killed_endpoint_is_ejected_and_returns_after_its_backoff() {
    const BACKOFF_MS: u64 = 2000;
    let backoff = BACKOFF_MS.to_string();
    let mut env = Env::start_with(&[
        "--mesh-eject-backoff-min-ms",
        &backoff,
        "--mesh-eject-backoff-max-ms",
        &backoff,
    ])
    .await;
    let one = Server::start("127.0.0.1:0", Duration::ZERO).await;
    let two = Server::start("127.0.0.1:0", Duration::ZERO).await;
    let listen = free_addr();
    let agent = env.agent(&[]);
    register(
        &env,
        "a",
        &agent,
        json!({"identity": A, "outbound": [{"listen": listen,
            "destination": {"endpoints": [one.addr.to_string(), two.addr.to_string()]}}]}),
    )
    .await;
    wait_serving(&env, &listen).await;
    for _ in 0..20 {
        assert_eq!(get(&listen).await.0, 200);
    }
    assert!(two.hits() > 0, "both endpoints are used");

    // Killed: a request that picks it fails (502), and it is ejected.
    let (two_addr, two_hits) = two.kill().await;
    let deadline = Instant::now() + T;
    loop {
        let (status, _) = get(&listen).await;
        assert!(status == 200 || status == 502, "status {status}");
        let m = env.metrics().await;
        if endpoints_in(&m, &listen, "ejected") == 1.0 {
            assert!(
                sample(
                    &m,
                    &format!(
                        "cc_proxy_mesh_endpoint_ejections_total{{vm=\"a\",listener=\"{listen}\"}}"
                    )
                ) >= 1.0,
                "{m}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never ejected\n{m}");
    }
    let ejected_at = Instant::now();
    // mesh.endpoints says which one.
    let eps = env
        .client
        .mesh_endpoints("a")
        .await
        .expect("mesh.endpoints");
    let states: Vec<(String, EndpointState)> = eps.destinations[0]
        .endpoints
        .iter()
        .map(|e| (e.addr.clone(), e.state))
        .collect();
    assert!(
        states.contains(&(two_addr.to_string(), EndpointState::Ejected))
            && states.contains(&(one.addr.to_string(), EndpointState::Ready)),
        "{states:?}"
    );
    // While it is ejected every request goes to the other one.
    for _ in 0..10 {
        assert_eq!(get(&listen).await.0, 200);
    }
    assert!(
        ejected_at.elapsed() < Duration::from_millis(BACKOFF_MS),
        "the requests took longer than the backoff: the check above proves nothing"
    );

    // Restarted on the same address: after its backoff it takes requests again and reads ready.
    let before = two_hits.load(Ordering::SeqCst);
    let two = Server::start_counting(&two_addr.to_string(), Duration::ZERO, two_hits).await;
    let deadline = Instant::now() + T;
    while two.hits() == before {
        assert_eq!(get(&listen).await.0, 200);
        assert!(
            Instant::now() < deadline,
            "the restarted endpoint never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        ejected_at.elapsed() >= Duration::from_millis(BACKOFF_MS * 9 / 10),
        "came back after {:?}, before its backoff",
        ejected_at.elapsed()
    );
    let m = env.metrics().await;
    assert_eq!(endpoints_in(&m, &listen, "ready"), 2.0, "{m}");
    drop(agent);
    env.kill_daemon();
}

#[tokio::test]
async fn requests_waiting_for_an_ejected_endpoint_are_all_sent_when_its_backoff_ends() {
    // Requests wait together while the only endpoint is ejected; when its backoff ends every one of them is
    // sent (the balancer wakes all the waiting requests, not only the last to ask), long before the fail-fast
    // time would answer them 503.
    const BACKOFF_MS: u64 = 1500;
    const WAITING: usize = 8;
    let backoff = BACKOFF_MS.to_string();
    let mut env = Env::start_with(&[
        "--mesh-failfast-timeout-ms",
        "60000",
        "--mesh-eject-backoff-min-ms",
        &backoff,
        "--mesh-eject-backoff-max-ms",
        &backoff,
    ])
    .await;
    // Bound but not listening until the server starts there: connections are refused meanwhile.
    let hold = tokio::net::TcpSocket::new_v4().expect("socket");
    hold.bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let dead = hold.local_addr().expect("addr").to_string();
    let http = free_addr();
    let agent = env.agent(&[]);
    register(
        &env,
        "a",
        &agent,
        json!({"identity": A, "outbound": [{"listen": http, "destination": {"endpoints": [dead]}}]}),
    )
    .await;
    // The first request finds the endpoint unreachable (502) and ejects it.
    let (status, head) = get(&http).await;
    assert_eq!(status, 502, "{head}\n{}", env.logs());
    let started = Instant::now();
    let mut waiting = JoinSet::new();
    for _ in 0..WAITING {
        let http = http.clone();
        waiting.spawn(async move { get(&http).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(hold);
    let server = Server::start(&dead, Duration::ZERO).await;
    let mut answered = Vec::new();
    while let Some(r) = waiting.join_next().await {
        answered.push(r.expect("request task").0);
    }
    let took = started.elapsed();
    assert_eq!(answered, vec![200; WAITING], "{}", env.logs());
    assert_eq!(server.hits(), WAITING);
    assert!(
        took < T,
        "the waiting requests were answered after {took:?}"
    );
    drop(agent);
    env.kill_daemon();
}

#[tokio::test]
async fn with_no_endpoint_ready_requests_get_503_and_connections_close_within_the_failfast_time() {
    const FAILFAST_MS: u64 = 1000;
    let failfast = FAILFAST_MS.to_string();
    let mut env = Env::start_with(&[
        "--mesh-failfast-timeout-ms",
        &failfast,
        "--mesh-eject-backoff-min-ms",
        "60000",
        "--mesh-eject-backoff-max-ms",
        "60000",
    ])
    .await;
    // Bound but not listening: connections to it are refused, and no other test can take the port.
    let hold = tokio::net::TcpSocket::new_v4().expect("socket");
    hold.bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let dead = hold.local_addr().expect("addr").to_string();
    let (http, opaque) = (free_addr(), free_addr());
    let agent = env.agent(&[]);
    register(
        &env,
        "a",
        &agent,
        json!({"identity": A, "outbound": [
            {"listen": http, "destination": {"endpoints": [dead]}},
            {"listen": opaque, "destination": {"endpoints": [dead]}, "protocol": "opaque"},
        ]}),
    )
    .await;

    // The first request finds the endpoint unreachable (502) and ejects it.
    let (status, head) = get(&http).await;
    assert_eq!(status, 502, "{head}\n{}", env.logs());
    assert!(
        head.to_ascii_lowercase().contains("l5d-proxy-error"),
        "{head}"
    );
    // Now nothing is ready: 503 with l5d-proxy-error after the fail-fast time; while nothing is ready the
    // next ones fail at once.
    for i in 0..2 {
        let started = Instant::now();
        let (status, head) = get(&http).await;
        let took = started.elapsed();
        assert_eq!(status, 503, "{head}");
        assert!(
            head.to_ascii_lowercase().contains("l5d-proxy-error"),
            "{head}"
        );
        assert!(
            took < Duration::from_millis(FAILFAST_MS + 2000),
            "answered after {took:?}"
        );
        if i == 0 {
            assert!(
                took >= Duration::from_millis(FAILFAST_MS * 9 / 10),
                "answered after {took:?}, before the fail-fast time"
            );
        }
        eprintln!("503 after {took:?}");
    }

    // Opaque: the first connection ejects the endpoint, the next one is closed after the fail-fast time.
    let mut c = TcpStream::connect(&opaque).await.expect("connect");
    let mut buf = [0u8; 16];
    assert_eq!(
        tokio::time::timeout(T, c.read(&mut buf))
            .await
            .ok()
            .and_then(Result::ok),
        Some(0)
    );
    let started = Instant::now();
    let mut c = TcpStream::connect(&opaque).await.expect("connect");
    let closed = tokio::time::timeout(T, c.read(&mut buf)).await;
    let took = started.elapsed();
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert!(
        took >= Duration::from_millis(FAILFAST_MS * 9 / 10)
            && took < Duration::from_millis(FAILFAST_MS + 2000),
        "closed after {took:?}\n{}",
        env.logs()
    );
    let m = env.metrics().await;
    assert!(
        sample(
            &m,
            "cc_proxy_mesh_refused_total{vm=\"a\",direction=\"outbound\",reason=\"unavailable\"}"
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(endpoints_in(&m, &opaque, "ejected"), 1.0, "{m}");
    drop((agent, hold));
    env.kill_daemon();
}

#[tokio::test]
async fn an_endpoint_with_the_wrong_identity_fails_the_handshake_is_counted_and_ejected() {
    let mut env = Env::start_with(&["--mesh-eject-backoff-min-ms", "30000"]).await;
    let server = Server::start("127.0.0.1:0", Duration::ZERO).await;
    let b_in = free_addr();
    let b_agent = env.agent(&[]);
    register(
        &env,
        "b",
        &b_agent,
        json!({"identity": B, "inbound": [{"listen": b_in, "target": format!("tcp://{}", server.addr)}]}),
    )
    .await;
    let (right, wrong) = (free_addr(), free_addr());
    let a_agent = env.agent(&[]);
    register(
        &env,
        "a",
        &a_agent,
        json!({"identity": A, "outbound": [
            {"listen": right, "destination": {"endpoints": [b_in], "identity": B}},
            {"listen": wrong, "destination": {"endpoints": [b_in], "identity": C}},
        ]}),
    )
    .await;
    wait_serving(&env, &right).await;
    let hits = server.hits();
    let (status, head) = get(&wrong).await;
    assert_eq!(status, 502, "{head}");
    assert_eq!(server.hits(), hits, "nothing reached the server");
    let m = env.metrics().await;
    assert!(
        sample(
            &m,
            "cc_proxy_mesh_refused_total{vm=\"a\",direction=\"outbound\",reason=\"handshake\"}"
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(endpoints_in(&m, &wrong, "ejected"), 1.0, "{m}");
    assert_eq!(endpoints_in(&m, &right, "ready"), 1.0, "{m}");
    assert!(
        sample(
            &m,
            &format!("cc_proxy_mesh_endpoint_ejections_total{{vm=\"a\",listener=\"{wrong}\"}}")
        ) >= 1.0,
        "{m}"
    );
    drop((a_agent, b_agent));
    env.kill_daemon();
}

// ---- Protocol hints from the destination service ----------------------------------------------------------

use linkerd2_proxy_api::destination::destination_server::Destination;
use linkerd2_proxy_api::destination::{self as dst, GetDestination};

use crate::mesh_control::{serve_destination_svc, tls_identity};

/// A destination service answering each name with one prepared `add`, then keeping the stream open.
struct HintedDst(std::collections::HashMap<String, dst::Update>);

type UpdateStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<dst::Update, tonic::Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl Destination for HintedDst {
    type GetStream = UpdateStream;
    async fn get(
        &self,
        req: tonic::Request<GetDestination>,
    ) -> Result<tonic::Response<UpdateStream>, tonic::Status> {
        use futures::StreamExt;
        let path = req.into_inner().path;
        let update = self
            .0
            .get(&path)
            .cloned()
            .ok_or_else(|| tonic::Status::not_found(path))?;
        let stream = futures::stream::iter([Ok(update)]).chain(futures::stream::pending());
        Ok(tonic::Response::new(Box::pin(stream)))
    }
    type GetProfileStream = futures::stream::Empty<Result<dst::DestinationProfile, tonic::Status>>;
    async fn get_profile(
        &self,
        _: tonic::Request<GetDestination>,
    ) -> Result<tonic::Response<Self::GetProfileStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("profiles"))
    }
}

/// One endpoint at `addr` with `identity` and `hint`.
fn hinted(
    addr: SocketAddr,
    identity: Option<&str>,
    hint: dst::protocol_hint::Protocol,
    transport: Option<u16>,
) -> dst::Update {
    dst::Update {
        update: Some(dst::update::Update::Add(dst::WeightedAddrSet {
            addrs: vec![dst::WeightedAddr {
                addr: Some(addr.into()),
                weight: 10,
                tls_identity: identity.map(|i| tls_identity(i, None)),
                protocol_hint: Some(dst::ProtocolHint {
                    protocol: Some(hint),
                    opaque_transport: transport.map(|p| dst::protocol_hint::OpaqueTransport {
                        inbound_port: u32::from(p),
                    }),
                }),
                ..Default::default()
            }],
            metric_labels: Default::default(),
        })),
    }
}

/// Echo each connection's bytes until its end of stream.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn h2_and_opaque_transport_hints_shape_what_reaches_the_endpoint() {
    use dst::protocol_hint::{Opaque, Protocol, H2};
    // Endpoints: a raw HTTP server (sees the wire), b's inbound (identity B) in front of another one, and an
    // echo server only the transport header can name.
    let raw = Server::start("127.0.0.1:0", Duration::ZERO).await;
    let guest = Server::start("127.0.0.1:0", Duration::ZERO).await;
    let echo = echo_server().await;
    let b_in: SocketAddr = free_addr().parse().expect("addr");
    let (direct, meshed, transport) = (
        "direct.test.svc.cluster.local:80",
        "meshed.test.svc.cluster.local:80",
        "transport.test.svc.cluster.local:80",
    );
    let svc = HintedDst(
        [
            (
                direct.to_string(),
                hinted(raw.addr, None, Protocol::H2(H2 {}), None),
            ),
            (
                meshed.to_string(),
                hinted(b_in, Some(B), Protocol::H2(H2 {}), None),
            ),
            (
                transport.to_string(),
                hinted(
                    b_in,
                    Some(B),
                    Protocol::Opaque(Opaque {}),
                    Some(echo.port()),
                ),
            ),
        ]
        .into(),
    );
    let svc_addr: SocketAddr = free_addr().parse().expect("addr");
    let _server = serve_destination_svc(svc, svc_addr).await;
    let svc_s = svc_addr.to_string();
    // A long detection time: a listener whose endpoints are all opaque must not spend it.
    let mut env = Env::start_with(&[
        "--destination-svc",
        &svc_s,
        "--mesh-detect-timeout-ms",
        "5000",
    ])
    .await;
    let b_agent = env.agent(&[]);
    register(
        &env,
        "b",
        &b_agent,
        json!({"identity": B, "inbound": [{"listen": b_in.to_string(),
            "target": format!("tcp://{}", guest.addr)}]}),
    )
    .await;
    let (l_direct, l_meshed, l_transport) = (free_addr(), free_addr(), free_addr());
    let a_agent = env.agent(&[]);
    register(
        &env,
        "a",
        &a_agent,
        json!({"identity": A, "outbound": [
            {"listen": l_direct, "destination": {"name": direct}},
            {"listen": l_meshed, "destination": {"name": meshed}},
            {"listen": l_transport, "destination": {"name": transport}},
        ]}),
    )
    .await;

    // h2: the guest's HTTP/1.1 request reaches the raw endpoint as HTTP/2 marked `l5d-orig-proto: HTTP/1.1`,
    // and the guest gets an HTTP/1.1 answer.
    wait_serving(&env, &l_direct).await;
    let seen = raw.seen();
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|(v, p)| *v == Version::HTTP_2 && p.as_deref() == Some("HTTP/1.1")),
        "{seen:?}"
    );
    let (status, head) = get(&l_direct).await;
    assert_eq!(status, 200);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("l5d-orig-proto"),
        "{head}"
    );

    // h2 to a meshed endpoint (our own inbound, mTLS with B): it downgrades, the guest sees HTTP/1.1.
    wait_serving(&env, &l_meshed).await;
    let seen = guest.seen();
    assert!(
        !seen.is_empty()
            && seen
                .iter()
                .all(|(v, p)| *v == Version::HTTP_11 && p.is_none()),
        "{seen:?}"
    );

    // The destination service marks every endpoint of `transport` opaque: the listener (protocol auto)
    // forwards at once instead of waiting out detection on bytes that could still become an HTTP request.
    wait_resolved(&env, "a", transport).await;
    let mut c = TcpStream::connect(&l_transport).await.expect("connect");
    let started = std::time::Instant::now();
    c.write_all(b"GE").await.expect("write");
    let mut two = [0u8; 2];
    tokio::time::timeout(Duration::from_millis(2500), c.read_exact(&mut two))
        .await
        .expect("echoed before the 5 s detection time ran out")
        .expect("read");
    assert_eq!(&two, b"GE");
    assert!(started.elapsed() < Duration::from_millis(2500));
    drop(c);

    // opaque_transport: the connection carries a transport header naming the echo server's port; b's
    // inbound (whose own target is the HTTP guest) connects there.
    let mut c = TcpStream::connect(&l_transport).await.expect("connect");
    c.write_all(b"ping through the transport header")
        .await
        .expect("write");
    c.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    let _ = tokio::time::timeout(T, c.read_to_end(&mut back)).await;
    assert_eq!(back, b"ping through the transport header", "{}", env.logs());

    // mesh.endpoints shows the hints and identities.
    let eps = env
        .client
        .mesh_endpoints("a")
        .await
        .expect("mesh.endpoints");
    let hints: Vec<String> = eps
        .destinations
        .iter()
        .flat_map(|d| {
            d.endpoints
                .iter()
                .map(|e| format!("{} {:?}", e.hint, e.identity))
        })
        .collect();
    assert_eq!(
        hints,
        [
            "h2 None".to_string(),
            format!("h2 Some({B:?})"),
            format!("opaque:{} Some({B:?})", echo.port())
        ],
        "{eps:?}"
    );
    drop((a_agent, b_agent));
    env.kill_daemon();
}
