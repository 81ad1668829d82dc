//! An outbound destination as a set of endpoints, and their health.
//!
//! Roles:
//! - [`Destination`]: one outbound listener's endpoint set, followed from a watch channel: a static set made
//!   from the configuration's fixed `endpoints` ([`Destination::fixed`]), or a name's set kept current by
//!   discovery ([`Destination::discovered`]). A listener-level `identity` is given to endpoints that have
//!   none (DNS answers). Each endpoint of the current set has one [`Member`], kept across set changes while
//!   the endpoint stays the same (same address, identity, server name, hint and labels).
//! - [`Member`]: an endpoint, the connections open to it, and its health ([`Health`]).
//!
//! Events of a member: created `Pending` (not tried yet) → a connection to it succeeds: `Ready` → a connect
//! or a TLS handshake fails: `Ejected` until a capped exponential backoff has passed (from
//! [`Limits::eject_backoff_min`](super::listener::Limits), doubled per consecutive failure, at most
//! `eject_backoff_max`); meanwhile no new connection or request is sent to it, but it stays in the set. Once
//! the backoff is over it may be picked again (shown `pending` until a connection settles it).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::HeaderValue;
use hyper::{Request, Response, Version};
use tower::balance::p2c::Balance;
use tower::discover::Change;
use tower::load::peak_ewma::Handle;
use tower::load::{PeakEwma, TrackCompletion};
use tower::Service;

use cc_proxy_api::mesh::{
    DestinationConfig, EndpointHint, EndpointLoad, EndpointState, EndpointStatus,
};
use tokio::sync::watch;

use super::discover::{Endpoint, EndpointSet, Hint, SetState};
use super::http::{self, BoxError, SendError, Upstream};
use super::listener::{limits, MeshError};

/// Where an endpoint stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not tried yet, or tried again after its backoff.
    Pending,
    /// The last connection to it succeeded.
    Ready,
    /// A connection or handshake failed; not picked before `until`.
    Ejected { until: Instant },
}

#[derive(Debug)]
struct HealthRecord {
    health: Health,
    /// Consecutive failures (the backoff's exponent).
    failures: u32,
}

/// One endpoint of a destination, as the balancer tracks it.
#[derive(Debug)]
pub struct Member {
    /// The endpoint (a listener-level identity already applied).
    pub endpoint: Endpoint,
    open: AtomicUsize,
    health: Mutex<HealthRecord>,
    /// A mirror of the balancer's peak-EWMA estimate (milliseconds, when last updated), for `status()`.
    rtt: Mutex<Option<(f64, Instant)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The backoff after `failures` consecutive failures: `min` doubled per failure after the first, at most
/// `max`.
pub fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    min.saturating_mul(1u32 << doublings)
        .min(max)
        .max(min.min(max))
}

impl Member {
    pub fn new(endpoint: Endpoint) -> Member {
        Member {
            endpoint,
            open: AtomicUsize::new(0),
            health: Mutex::new(HealthRecord {
                health: Health::Pending,
                failures: 0,
            }),
            rtt: Mutex::new(None),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    /// Its health now (an ejection whose backoff is over reads `Pending`).
    pub fn health(&self, now: Instant) -> Health {
        match lock(&self.health).health {
            Health::Ejected { until } if until <= now => Health::Pending,
            h => h,
        }
    }

    /// Whether a new connection or request may go to it.
    pub fn is_ready(&self, now: Instant) -> bool {
        !matches!(self.health(now), Health::Ejected { .. })
    }

    /// The end of its ejection, if it is ejected now.
    pub fn ejected_until(&self, now: Instant) -> Option<Instant> {
        match self.health(now) {
            Health::Ejected { until } => Some(until),
            _ => None,
        }
    }

    /// A connection or handshake to it failed: eject it for the next backoff. Returns true when it was not
    /// ejected already (a new ejection, counted by the caller).
    pub fn failed(&self) -> bool {
        let lim = limits();
        let now = Instant::now();
        let mut h = lock(&self.health);
        if matches!(h.health, Health::Ejected { until } if until > now) {
            return false;
        }
        h.failures = h.failures.saturating_add(1);
        let wait = backoff(h.failures, lim.eject_backoff_min, lim.eject_backoff_max);
        h.health = Health::Ejected { until: now + wait };
        true
    }

    /// A connection to it succeeded: ready, its backoff reset.
    pub fn succeeded(&self) {
        let mut h = lock(&self.health);
        h.failures = 0;
        h.health = Health::Ready;
    }

    /// A response's first frame came `rtt` after its request: update the latency mirror the way peak-EWMA
    /// does (a higher sample is taken at once, a lower one decays in over [`EWMA_DECAY`]).
    pub fn observe_rtt(&self, rtt: Duration) {
        let ms = rtt.as_secs_f64() * 1000.0;
        let now = Instant::now();
        let mut r = lock(&self.rtt);
        *r = Some(match *r {
            Some((est, at)) if ms <= est => {
                let w = (-(now.duration_since(at).as_secs_f64()) / EWMA_DECAY.as_secs_f64()).exp();
                (est * w + ms * (1.0 - w), now)
            }
            _ => (ms, now),
        });
    }

    /// The latency estimate in milliseconds, once measured.
    pub fn rtt_ms(&self) -> Option<f64> {
        lock(&self.rtt).map(|(ms, _)| ms)
    }

    /// Connections (opaque) or pooled connections (HTTP) open to it.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Count one more connection to it until the guard drops.
    pub fn open_guard(self: &Arc<Self>) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }
}

/// Holds a member's open-connection count up while a connection lives.
pub struct OpenGuard(Arc<Member>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The members of the set last seen.
struct Members {
    seen: Option<Arc<EndpointSet>>,
    by_addr: BTreeMap<SocketAddr, Arc<Member>>,
}

/// One outbound listener's endpoint set.
pub struct Destination {
    set: watch::Receiver<Arc<EndpointSet>>,
    /// Given to endpoints without an identity.
    identity: Option<String>,
    members: Mutex<Members>,
}

impl Destination {
    /// The fixed endpoints of `d`: each with `d.identity`, and the opaque-transport hint of
    /// `d.opaque_transport_port`.
    pub fn fixed(d: &DestinationConfig) -> Result<Destination, MeshError> {
        let hint = match d.opaque_transport_port {
            Some(p) => Hint::Opaque {
                transport_port: Some(p),
            },
            None => Hint::Unknown,
        };
        let mut endpoints = BTreeMap::new();
        for e in &d.endpoints {
            let addr: SocketAddr = e.parse().map_err(|_| MeshError::InvalidEndpoint {
                endpoint: e.clone(),
            })?;
            endpoints.insert(
                addr,
                Endpoint {
                    addr,
                    weight: 1,
                    identity: d.identity.clone(),
                    server_name: None,
                    hint,
                    labels: BTreeMap::new(),
                },
            );
        }
        // The sender goes: the receiver keeps the one value.
        let (_tx, rx) = watch::channel(Arc::new(EndpointSet {
            state: SetState::Resolved,
            endpoints,
        }));
        Ok(Destination::new(rx, d.identity.clone()))
    }

    /// A discovered name's set; `identity` is given to its endpoints that have none.
    pub fn discovered(
        set: watch::Receiver<Arc<EndpointSet>>,
        identity: Option<String>,
    ) -> Destination {
        Destination::new(set, identity)
    }

    fn new(set: watch::Receiver<Arc<EndpointSet>>, identity: Option<String>) -> Destination {
        Destination {
            set,
            identity,
            members: Mutex::new(Members {
                seen: None,
                by_addr: BTreeMap::new(),
            }),
        }
    }

    /// A receiver of the set's changes (to wait for endpoints).
    pub fn subscribe(&self) -> watch::Receiver<Arc<EndpointSet>> {
        self.set.clone()
    }

    /// Where the set's resolution stands.
    #[cfg(test)] // `mesh.endpoints` reads the state from the name's lease
    pub fn state(&self) -> SetState {
        self.set.borrow().state
    }

    /// The current set says every endpoint speaks opaque TCP (the destination service's opaque hint): the
    /// guest's bytes are not examined for HTTP, so server-speaks-first protocols are not held up.
    pub fn is_opaque(&self) -> bool {
        let set = self.set.borrow();
        !set.endpoints.is_empty()
            && set
                .endpoints
                .values()
                .all(|e| matches!(e.hint, Hint::Opaque { .. }))
    }

    /// The current set's members, in address order (members of endpoints that did not change are kept).
    pub fn members(&self) -> Vec<Arc<Member>> {
        let set = self.set.borrow().clone();
        let mut m = lock(&self.members);
        if !m.seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &set)) {
            let mut next = BTreeMap::new();
            for (addr, e) in &set.endpoints {
                let mut e = e.clone();
                if e.identity.is_none() {
                    e.identity = self.identity.clone();
                }
                let member = match m.by_addr.get(addr) {
                    Some(old) if old.endpoint == e => old.clone(),
                    _ => Arc::new(Member::new(e)),
                };
                next.insert(*addr, member);
            }
            m.by_addr = next;
            m.seen = Some(set);
        }
        m.by_addr.values().cloned().collect()
    }

    /// Power of two choices over open connections among the members that may be picked now.
    pub fn choose(&self) -> Option<Arc<Member>> {
        let now = Instant::now();
        let ready: Vec<Arc<Member>> = self
            .members()
            .into_iter()
            .filter(|m| m.is_ready(now))
            .collect();
        p2c_open(&ready)
    }

    /// Each endpoint, its health and load.
    pub fn status(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        self.members()
            .iter()
            .map(|m| EndpointStatus {
                addr: m.endpoint.addr.to_string(),
                identity: m.endpoint.identity.clone(),
                server_name: m.endpoint.server_name.clone(),
                hint: match m.endpoint.hint {
                    Hint::Unknown => EndpointHint::Unknown,
                    Hint::H2 => EndpointHint::H2,
                    Hint::Opaque { transport_port } => EndpointHint::Opaque { transport_port },
                },
                state: match m.health(now) {
                    Health::Pending => EndpointState::Pending,
                    Health::Ready => EndpointState::Ready,
                    Health::Ejected { .. } => EndpointState::Ejected,
                },
                load: EndpointLoad {
                    open: m.open() as u64,
                    ewma_ms: m.rtt_ms(),
                },
                labels: m.endpoint.labels.clone(),
            })
            .collect()
    }
}

/// Power of two choices over open connections: of two members picked at random, the less loaded.
pub fn p2c_open(members: &[Arc<Member>]) -> Option<Arc<Member>> {
    match members.len() {
        0 => None,
        1 => Some(members[0].clone()),
        n => {
            let a = rand::random_range(0..n);
            let mut b = rand::random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (ma, mb) = (&members[a], &members[b]);
            Some(if mb.open() < ma.open() {
                mb.clone()
            } else {
                ma.clone()
            })
        }
    }
}

/// Peak-EWMA's estimate of an endpoint not measured yet (Linkerd's default).
pub const EWMA_DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Peak-EWMA's decay: how fast old latencies are forgotten (Linkerd's default).
pub const EWMA_DECAY: Duration = Duration::from_secs(10);

/// A request as the guest sent it, its URI made absolute.
type Req = Request<Incoming>;

/// One endpoint's HTTP service: its own pools, not ready while the endpoint is ejected.
pub struct EndpointService {
    member: Arc<Member>,
    pools: Arc<Upstream>,
    /// Wakes the balancer when the ejection ends.
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// When the request was sent (a response extension, for the latency mirror in [`Member`]).
#[derive(Clone, Copy)]
struct SentAt(Instant);

impl Service<Req> for EndpointService {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let Some(until) = self.member.ejected_until(Instant::now()) else {
            self.wait = None;
            return Poll::Ready(Ok(()));
        };
        let deadline = tokio::time::Instant::from_std(until);
        let sleep = self
            .wait
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.wait = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let pools = self.pools.clone();
        // An HTTP/1.1 request to an endpoint whose proxy takes HTTP/2 travels upgraded, marked with its
        // original version (upgrades and CONNECT keep HTTP/1).
        let upgrade = self.member.endpoint.hint == Hint::H2
            && req.version() == Version::HTTP_11
            && !http::wants_upgrade(&req);
        Box::pin(async move {
            let sent = Instant::now();
            let h2 = upgrade || req.version() == Version::HTTP_2;
            if upgrade {
                *req.version_mut() = Version::HTTP_2;
                req.headers_mut()
                    .insert(http::L5D_ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
            }
            let mut resp = pools.send_pooled(req, h2).await?;
            if upgrade {
                resp.headers_mut().remove(http::L5D_ORIG_PROTO);
                *resp.version_mut() = Version::HTTP_11;
            }
            resp.extensions_mut().insert(SentAt(sent));
            Ok(resp)
        })
    }
}

/// Counts a request as complete at its response's first body frame (or its end), not at the headers as
/// tower's `CompleteOnResponse` does: an endpoint that answers headers fast and the body slowly is slow.
#[derive(Clone)]
pub struct FirstFrameCompletion(Arc<Member>);

impl TrackCompletion<Handle, Response<Incoming>> for FirstFrameCompletion {
    type Output = Response<FirstFrame>;

    fn track_completion(&self, handle: Handle, resp: Response<Incoming>) -> Response<FirstFrame> {
        let sent = resp.extensions().get::<SentAt>().copied();
        let member = self.0.clone();
        resp.map(|inner| {
            let mut body = FirstFrame {
                inner,
                pending: Some((handle, member, sent)),
            };
            if body.inner.is_end_stream() {
                body.complete();
            }
            body
        })
    }
}

/// A response body that releases its peak-EWMA handle (the latency measurement) at its first frame.
pub struct FirstFrame {
    inner: Incoming,
    pending: Option<(Handle, Arc<Member>, Option<SentAt>)>,
}

impl FirstFrame {
    fn complete(&mut self) {
        if let Some((handle, member, sent)) = self.pending.take() {
            drop(handle);
            if let Some(SentAt(t)) = sent {
                member.observe_rtt(t.elapsed());
            }
        }
    }
}

impl Body for FirstFrame {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if r.is_ready() {
            this.complete();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type Balanced = PeakEwma<EndpointService, FirstFrameCompletion>;
/// Makes an endpoint's service (its pools and connector).
pub type ServiceFactory = Arc<dyn Fn(&Arc<Member>) -> EndpointService + Send + Sync>;
/// The balancer's `Discover`.
type Changes = Pin<Box<dyn Stream<Item = Result<Change<SocketAddr, Balanced>, Infallible>> + Send>>;
type BalancedResponse = Response<FirstFrame>;

/// The endpoint set's changes as tower's `Discover` wants them: an endpoint whose member changed is inserted
/// again (replacing the old service), one that left is removed. A fixed set's changes end after the first.
fn discover(dest: Arc<Destination>, services: ServiceFactory) -> Changes {
    struct State {
        dest: Arc<Destination>,
        changes: watch::Receiver<Arc<EndpointSet>>,
        known: BTreeMap<SocketAddr, Arc<Member>>,
        first: bool,
    }
    let changes = dest.subscribe();
    let state = State {
        dest,
        changes,
        known: BTreeMap::new(),
        first: true,
    };
    let updates = futures::stream::unfold(state, move |mut st| {
        let services = services.clone();
        async move {
            loop {
                if !st.first && st.changes.changed().await.is_err() {
                    return None;
                }
                st.first = false;
                st.changes.borrow_and_update();
                let now: BTreeMap<SocketAddr, Arc<Member>> = st
                    .dest
                    .members()
                    .into_iter()
                    .map(|m| (m.addr(), m))
                    .collect();
                let mut out = Vec::new();
                for addr in st.known.keys() {
                    if !now.contains_key(addr) {
                        out.push(Ok(Change::Remove(*addr)));
                    }
                }
                for (addr, m) in &now {
                    if !st.known.get(addr).is_some_and(|k| Arc::ptr_eq(k, m)) {
                        let svc = PeakEwma::new(
                            services(m),
                            EWMA_DEFAULT_RTT,
                            EWMA_DECAY.as_nanos() as f64,
                            FirstFrameCompletion(m.clone()),
                        );
                        out.push(Ok(Change::Insert(*addr, svc)));
                    }
                }
                st.known = now;
                if !out.is_empty() {
                    return Some((futures::stream::iter(out), st));
                }
            }
        }
    });
    // The set no longer changes (a fixed one): the balancer keeps what it has.
    Box::pin(updates.flatten().chain(futures::stream::pending()))
}

/// Fails requests once the inner service has not been ready for `timeout` (every waiting request is woken
/// and fails at once), until it is ready again.
struct FailFast<S> {
    inner: S,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    failing: bool,
}

impl<S> Service<Req> for FailFast<S>
where
    S: Service<Req, Response = BalancedResponse, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = BalancedResponse;
    type Error = BoxError;
    type Future = futures::future::Either<
        S::Future,
        futures::future::Ready<Result<BalancedResponse, BoxError>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(r) => {
                self.sleep = None;
                self.failing = false;
                Poll::Ready(r)
            }
            Poll::Pending if self.failing => Poll::Ready(Ok(())),
            Poll::Pending => {
                let timeout = self.timeout;
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.sleep = None;
                        self.failing = true;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if self.failing {
            futures::future::Either::Right(futures::future::ready(Err(Box::new(
                BalanceError::Unavailable,
            ) as BoxError)))
        } else {
            futures::future::Either::Left(self.inner.call(req))
        }
    }
}

/// Why the balancer gave no response.
#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    #[error("no endpoint became ready within the fail-fast time")]
    Unavailable,
}

/// Per-request balancing of one destination's HTTP requests: tower's power of two choices over peak-EWMA
/// latency, with fail-fast, driven by the requests themselves. A request takes a place among at most
/// `--mesh-balancer-queue` waiting ones, then polls the shared balancer under its lock (never held across an
/// await): ready, it is dispatched to the chosen endpoint at once, on its own task (no hop through a queue
/// task and back, which cost two task wake-ups per request); not ready, it waits to be woken with the other
/// waiting requests when the balancer is (an endpoint ready, the discovery changed, the fail-fast time over)
/// and polls again.
pub struct HttpBalancer {
    /// The balancer.
    balance: Mutex<Queued>,
    /// Places for requests waiting for the balancer (`--mesh-balancer-queue`).
    slots: Arc<tokio::sync::Semaphore>,
    /// The requests waiting for the balancer to be ready.
    waiters: Arc<Waiters>,
    /// Wakes every waiting request: the balancer keeps only the waker of its last poll, so it is polled with
    /// this one.
    wake_all: std::task::Waker,
}

/// What the requests poll.
type Queued = FailFast<Balance<Changes, Req>>;

/// Requests waiting for the balancer, by id (a map: with thousands waiting, each one's registration and
/// removal stays O(1)).
#[derive(Default)]
struct Waiters {
    list: Mutex<HashMap<u64, std::task::Waker>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl std::task::Wake for Waiters {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Each woken request polls again, and registers again if the balancer is still not ready.
        let woken = std::mem::take(&mut *lock(&self.list));
        for w in woken.into_values() {
            w.wake();
        }
    }
}

/// One request's place among the waiters; it leaves the list when dropped (dispatched, or given up).
struct Waiting<'a> {
    waiters: &'a Waiters,
    id: u64,
}

impl Waiting<'_> {
    /// Be woken by `waker` at the balancer's next wake-up.
    fn register(&self, waker: &std::task::Waker) {
        let mut list = lock(&self.waiters.list);
        match list.get_mut(&self.id) {
            Some(w) => w.clone_from(waker),
            None => {
                list.insert(self.id, waker.clone());
            }
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.waiters.list).remove(&self.id);
    }
}

impl HttpBalancer {
    /// Balance over `dest`, each endpoint's pools made by `services`.
    pub fn new(dest: Arc<Destination>, services: ServiceFactory) -> HttpBalancer {
        let lim = limits();
        let balance = Balance::new(discover(dest, services));
        let failfast = FailFast {
            inner: balance,
            timeout: lim.failfast_timeout,
            sleep: None,
            failing: false,
        };
        let waiters = Arc::new(Waiters::default());
        HttpBalancer {
            balance: Mutex::new(failfast),
            slots: Arc::new(tokio::sync::Semaphore::new(lim.balancer_queue.max(1))),
            wake_all: std::task::Waker::from(waiters.clone()),
            waiters,
        }
    }

    /// Send `req` to the endpoint the balancer picks.
    pub async fn send(&self, req: Req) -> Result<Response<http::RespBody>, SendError> {
        // No place among the waiting requests within the fail-fast time counts as not ready.
        let slot = match tokio::time::timeout(limits().failfast_timeout, self.slots.acquire()).await
        {
            Ok(Ok(slot)) => slot,
            Err(_) | Ok(Err(_)) => return Err(SendError::Unavailable),
        };
        let waiting = Waiting {
            waiters: &self.waiters,
            id: self
                .waiters
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        let mut req = Some(req);
        let dispatched = std::future::poll_fn(|cx| {
            // Registered before the poll, so that a wake-up between the poll and the registration is not lost.
            waiting.register(cx.waker());
            let mut balance = lock(&self.balance);
            match balance.poll_ready(&mut Context::from_waker(&self.wake_all)) {
                Poll::Ready(Ok(())) => Poll::Ready(match req.take() {
                    Some(r) => Ok(balance.call(r)),
                    None => Err(BoxError::from("the request was already sent")),
                }),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        drop(waiting);
        drop(slot);
        let result = match dispatched {
            Ok(response) => response.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(resp) => Ok(resp.map(|b| b.boxed())),
            Err(e) if e.downcast_ref::<BalanceError>().is_some() => Err(SendError::Unavailable),
            Err(e) => Err(SendError::Unreachable(e)),
        }
    }
}

/// An endpoint's HTTP service over `pools` (opened to that endpoint only).
pub fn endpoint_service(member: Arc<Member>, pools: Arc<Upstream>) -> EndpointService {
    EndpointService {
        member,
        pools,
        wait: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16, identity: Option<&str>) -> Endpoint {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Endpoint {
            addr,
            weight: 1,
            identity: identity.map(str::to_string),
            server_name: None,
            hint: Hint::Unknown,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn two_choices_prefer_the_less_loaded() {
        let members: Vec<Arc<Member>> = (0..2)
            .map(|i| Arc::new(Member::new(endpoint(1000 + i, None))))
            .collect();
        let _held: Vec<OpenGuard> = (0..5).map(|_| members[0].open_guard()).collect();
        for _ in 0..20 {
            assert_eq!(p2c_open(&members).map(|m| m.addr().port()), Some(1001));
        }
        assert!(p2c_open(&[]).is_none());
        drop(_held);
        assert_eq!(members[0].open(), 0);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<u128> = (1..=6).map(|f| backoff(f, min, max).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(u32::MAX, min, max), max);
        // A cap below the minimum: the cap wins.
        assert_eq!(backoff(1, max, min), min);
    }

    #[test]
    fn a_failed_member_is_ejected_then_pending_then_ready() {
        let m = Member::new(endpoint(1000, None));
        let now = Instant::now();
        assert_eq!(m.health(now), Health::Pending);
        assert!(m.failed(), "a new ejection");
        assert!(!m.failed(), "already ejected: not counted again");
        let until = m.ejected_until(Instant::now()).expect("ejected");
        assert!(!m.is_ready(Instant::now()));
        assert_eq!(
            m.health(until),
            Health::Pending,
            "tried again after the backoff"
        );
        m.succeeded();
        assert_eq!(m.health(Instant::now()), Health::Ready);
    }

    #[test]
    fn a_discovered_set_keeps_unchanged_members_and_gives_the_listener_identity() {
        let (tx, rx) = watch::channel(Arc::new(EndpointSet {
            state: SetState::Resolved,
            endpoints: [
                (endpoint(1, None).addr, endpoint(1, None)),
                (endpoint(2, Some("b.id")).addr, endpoint(2, Some("b.id"))),
            ]
            .into(),
        }));
        let d = Destination::discovered(rx, Some("listener.id".into()));
        let first = d.members();
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].endpoint.identity.as_deref(), Some("listener.id"));
        assert_eq!(first[1].endpoint.identity.as_deref(), Some("b.id"));
        first[0].failed();
        // Endpoint 2 changes identity, 3 comes, 1 stays: 1 keeps its member (and its ejection).
        tx.send_replace(Arc::new(EndpointSet {
            state: SetState::Resolved,
            endpoints: [
                (endpoint(1, None).addr, endpoint(1, None)),
                (endpoint(2, Some("c.id")).addr, endpoint(2, Some("c.id"))),
                (endpoint(3, None).addr, endpoint(3, None)),
            ]
            .into(),
        }));
        let next = d.members();
        assert_eq!(next.len(), 3);
        assert!(Arc::ptr_eq(&first[0], &next[0]));
        assert!(!Arc::ptr_eq(&first[1], &next[1]));
        let states: Vec<EndpointState> = d.status().iter().map(|s| s.state).collect();
        assert_eq!(
            states,
            [
                EndpointState::Ejected,
                EndpointState::Pending,
                EndpointState::Pending
            ]
        );
        for _ in 0..20 {
            assert_ne!(d.choose().map(|m| m.addr().port()), Some(1), "ejected");
        }
        tx.send_replace(Arc::new(EndpointSet {
            state: SetState::NoEndpoints { exists: true },
            endpoints: BTreeMap::new(),
        }));
        assert!(d.choose().is_none());
        assert_eq!(d.state(), SetState::NoEndpoints { exists: true });
    }

    #[test]
    fn fixed_endpoints_carry_the_configured_identity_and_transport_hint() {
        let d = Destination::fixed(&DestinationConfig {
            endpoints: vec!["127.0.0.1:4143".into(), "127.0.0.2:4143".into()],
            name: None,
            identity: Some("web.id".into()),
            opaque_transport_port: Some(8080),
        })
        .expect("valid");
        let st = d.status();
        assert_eq!(st.len(), 2);
        assert!(st.iter().all(|s| s.identity.as_deref() == Some("web.id")
            && s.hint
                == EndpointHint::Opaque {
                    transport_port: Some(8080)
                }));
        assert!(Destination::fixed(&DestinationConfig {
            endpoints: vec!["nope".into()],
            name: None,
            identity: None,
            opaque_transport_port: None,
        })
        .is_err());
    }
}
