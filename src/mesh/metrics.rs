//! The mesh's metrics, named and labelled as linkerd2-proxy's where the concept is the same so Linkerd's
//! dashboards and queries work on them (no `cc_proxy_` prefix for those), plus the refusals.
//!
//! | family | labels |
//! |---|---|
//! | `tcp_open_total`, `tcp_open_connections`, `tcp_read_bytes_total`, `tcp_write_bytes_total` | `direction`, `tls`, `client_id` / `server_id`, `vm` |
//! | `tcp_close_total` | the same and `errno` (empty for a clean close) |
//! | `request_total` | `direction`, `tls`, `client_id` / `server_id`, `authority`, `vm` |
//! | `response_total` | the same and `status_code`, `classification` (`success` / `failure`) |
//! | `response_latency_ms` (histogram, Linkerd's buckets) | as `request_total` |
//! | `cc_proxy_mesh_refused_total` | `vm`, `direction`, `reason` ([`Refusal`]) |
//! | `cc_proxy_mesh_endpoints` (gauge, computed at each scrape) | `vm`, `listener`, `state` (`ready`, `pending`, `ejected`) |
//! | `cc_proxy_mesh_endpoint_ejections_total` | `vm`, `listener` |
//!
//! `tls` is `true`, `no_identity` (outbound to an endpoint without identity), `no_tls` (inbound plaintext),
//! as Linkerd writes it. Read bytes are bytes read from the accepted peer, write bytes written to it.
//! The families are registered with the admin server at startup ([`register`]).
//!
//! Life time of a VM's series: a VM's listeners hold a [`VmSeries`] while they serve. Each series created
//! with its `vm` label is recorded there (only when created: counting an existing series costs nothing
//! more), and when the VM's last serving instance ends (unregistered, lost, the daemon stopping; a lost VM's
//! replacement may serve while the old listeners drain) every one of them is removed, so that VM churn does
//! not grow the scrape. Events for a VM that is not serving (a connection aborted after the drain) are not
//! counted: they would recreate series nobody removes.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::atomic::Ordering;
use std::sync::{LazyLock, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::family::MetricConstructor;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::copy::Transferred;

/// `direction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// `tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsLabel {
    /// Mutual (or at least server-authenticated) TLS.
    Yes,
    /// Outbound to an endpoint without an identity.
    NoIdentity,
    /// Inbound plaintext.
    NoTls,
}

impl TlsLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsLabel::Yes => "true",
            TlsLabel::NoIdentity => "no_identity",
            TlsLabel::NoTls => "no_tls",
        }
    }
}

/// Why the mesh refused a connection or request (`reason` of `cc_proxy_mesh_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener's connection limit.
    ListenerLimit,
    /// The daemon-wide mesh connection limit.
    TotalLimit,
    /// The connection's descriptor is within the reserve kept below the open-files limit (`--fd-reserve`).
    FdReserve,
    /// No client identity where one is required.
    Unauthenticated,
    /// A client identity not in the listener's list.
    Unauthorized,
    /// The TLS handshake failed or timed out.
    Handshake,
    /// A transport or PROXY header was malformed, too long or late.
    Header,
    /// The target or endpoint could not be reached.
    Connect,
    /// A transport header on a target without ports (`unix://`), or no destination known.
    NoDestination,
    /// No endpoint of the destination was ready within `--mesh-failfast-timeout-ms`.
    Unavailable,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ListenerLimit => "listener_limit",
            Refusal::TotalLimit => "total_limit",
            Refusal::FdReserve => "fd_reserve",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Handshake => "handshake",
            Refusal::Header => "header",
            Refusal::Connect => "connect",
            Refusal::NoDestination => "no_destination",
            Refusal::Unavailable => "unavailable",
        }
    }
}

/// An outbound destination's endpoints in one state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub vm: String,
    pub listener: String,
    pub state: &'static str,
}

/// An outbound listener's ejections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub vm: String,
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: &'static str,
    pub tls: &'static str,
    pub client_id: String,
    pub server_id: String,
    pub vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub direction: &'static str,
    pub tls: &'static str,
    pub client_id: String,
    pub server_id: String,
    pub vm: String,
    pub errno: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub direction: &'static str,
    pub tls: &'static str,
    pub client_id: String,
    pub server_id: String,
    pub authority: String,
    pub vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub direction: &'static str,
    pub tls: &'static str,
    pub client_id: String,
    pub server_id: String,
    pub authority: String,
    pub vm: String,
    pub status_code: String,
    pub classification: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub vm: String,
    pub direction: &'static str,
    pub reason: &'static str,
}

/// Linkerd's `response_latency_ms` buckets.
fn latency_ms_histogram() -> Histogram {
    Histogram::new([
        1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
        1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0,
    ])
}

/// Every mesh family. Series carrying a `vm` label are created only through this module's functions, which
/// record them for the VM's removal ([`VmSeries`]); reading one in a test may use the families directly.
pub struct MeshMetrics {
    pub tcp_open: Family<TcpLabels, Counter>,
    pub tcp_open_connections: Family<TcpLabels, Gauge>,
    pub tcp_read_bytes: Family<TcpLabels, Counter>,
    pub tcp_write_bytes: Family<TcpLabels, Counter>,
    pub tcp_close: Family<CloseLabels, Counter>,
    pub request: Family<HttpLabels, Counter>,
    pub response: Family<ResponseLabels, Counter>,
    pub response_latency_ms: Family<HttpLabels, Histogram, fn() -> Histogram>,
    pub refused: Family<RefusalLabels, Counter>,
    pub ejections: Family<ListenerLabels, Counter>,
}

pub static METRICS: LazyLock<MeshMetrics> = LazyLock::new(|| MeshMetrics {
    tcp_open: Family::default(),
    tcp_open_connections: Family::default(),
    tcp_read_bytes: Family::default(),
    tcp_write_bytes: Family::default(),
    tcp_close: Family::default(),
    request: Family::default(),
    response: Family::default(),
    response_latency_ms: Family::new_with_constructor(latency_ms_histogram),
    refused: Family::default(),
    ejections: Family::default(),
});

/// The series created with one serving VM's label, in each family.
#[derive(Default)]
struct Created {
    /// Serving instances of the VM: its series go when the last one ends.
    holders: usize,
    /// `tcp_open_total`, `tcp_open_connections`, `tcp_read_bytes_total`, `tcp_write_bytes_total`.
    tcp: HashSet<TcpLabels>,
    close: HashSet<CloseLabels>,
    /// `request_total`, `response_latency_ms`.
    http: HashSet<HttpLabels>,
    response: HashSet<ResponseLabels>,
    refused: HashSet<RefusalLabels>,
    ejections: HashSet<ListenerLabels>,
    /// The `authority` label values of the VM's request series (at most `--mesh-max-authorities`).
    authorities: HashSet<String>,
}

/// The `authority` label of requests to authorities beyond a VM's `--mesh-max-authorities` (never a valid
/// host name, so it cannot be mistaken for one).
pub const OTHER_AUTHORITY: &str = "~other";

/// The label VM `vm`'s requests to `authority` are counted under: the authority itself while the VM has fewer
/// than `max` distinct ones (or already has this one), else [`OTHER_AUTHORITY`].
fn authority_label(vm: &str, authority: &str, max: usize) -> String {
    if authority.is_empty() {
        // No authority (or a denied peer's request): not the client's choice, always its own series.
        return String::new();
    }
    let mut all = created();
    let Some(c) = all.get_mut(vm) else {
        // Not serving: nothing is counted anyway.
        return authority.to_string();
    };
    if c.authorities.contains(authority) {
        return authority.to_string();
    }
    if c.authorities.len() < max {
        c.authorities.insert(authority.to_string());
        return authority.to_string();
    }
    OTHER_AUTHORITY.to_string()
}

/// The connection families' series of a VM.
fn tcp_series(c: &mut Created) -> &mut HashSet<TcpLabels> {
    &mut c.tcp
}

/// Per serving VM, its series.
static CREATED: LazyLock<Mutex<HashMap<String, Created>>> = LazyLock::new(Default::default);

fn created() -> std::sync::MutexGuard<'static, HashMap<String, Created>> {
    CREATED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Held while a VM's listeners serve ([`serving`]); the VM's series are removed when its last one drops.
pub struct VmSeries {
    vm: String,
}

/// VM `vm`'s listeners serve: its series are counted and recorded until the returned value drops.
pub fn serving(vm: &str) -> VmSeries {
    created().entry(vm.to_string()).or_default().holders += 1;
    VmSeries { vm: vm.to_string() }
}

impl Drop for VmSeries {
    fn drop(&mut self) {
        let mut all = created();
        let Some(entry) = all.get_mut(&self.vm) else {
            return;
        };
        entry.holders = entry.holders.saturating_sub(1);
        if entry.holders > 0 {
            return;
        }
        let Some(gone) = all.remove(&self.vm) else {
            return;
        };
        // Removed while `CREATED` is held, so that no series of the VM is created meanwhile.
        let m = &*METRICS;
        for l in &gone.tcp {
            m.tcp_open.remove(l);
            m.tcp_open_connections.remove(l);
            m.tcp_read_bytes.remove(l);
            m.tcp_write_bytes.remove(l);
        }
        for l in &gone.close {
            m.tcp_close.remove(l);
        }
        for l in &gone.http {
            m.request.remove(l);
            m.response_latency_ms.remove(l);
        }
        for l in &gone.response {
            m.response.remove(l);
        }
        for l in &gone.refused {
            m.refused.remove(l);
        }
        for l in &gone.ejections {
            m.ejections.remove(l);
        }
        // Still under `CREATED` (the order CREATED -> DESTINATIONS is kept everywhere): a new instance of the
        // VM cannot track a destination in between and lose it.
        DESTINATIONS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|t| t.vm != self.vm && t.dest.strong_count() > 0);
        drop(all);
    }
}

/// Apply `f` to `family`'s series `labels` of VM `vm`. A series not created yet is created and recorded in
/// the VM's set `set` if the VM serves, else nothing is counted.
fn count<L, M, C>(
    family: &Family<L, M, C>,
    labels: &L,
    vm: &str,
    set: fn(&mut Created) -> &mut HashSet<L>,
    f: impl FnOnce(&M),
) where
    L: Clone + Hash + Eq,
    C: MetricConstructor<M>,
{
    if let Some(series) = family.get(labels) {
        f(&series);
        return;
    }
    let mut all = created();
    let Some(entry) = all.get_mut(vm) else {
        return;
    };
    set(entry).insert(labels.clone());
    // Created while `CREATED` is held: the VM's removal cannot come between the record and the creation.
    f(&family.get_or_create(labels));
}

/// One serving outbound listener's endpoint set, for the `cc_proxy_mesh_endpoints` gauge.
struct TrackedDestination {
    vm: String,
    listener: String,
    dest: std::sync::Weak<super::balance::Destination>,
}

static DESTINATIONS: std::sync::Mutex<Vec<TrackedDestination>> = std::sync::Mutex::new(Vec::new());

/// Count `dest`'s endpoints by state at each scrape while it lives.
pub fn track_destination(
    vm: &str,
    listener: &str,
    dest: &std::sync::Arc<super::balance::Destination>,
) {
    let mut tracked = DESTINATIONS.lock().unwrap_or_else(|p| p.into_inner());
    // Forget destinations gone here too, not only at scrapes: without scrapes VM churn would grow the list.
    tracked.retain(|t| t.dest.strong_count() > 0);
    tracked.push(TrackedDestination {
        vm: vm.to_string(),
        listener: listener.to_string(),
        dest: std::sync::Arc::downgrade(dest),
    });
}

/// The endpoint gauge now (destinations gone are forgotten).
fn endpoint_gauge() -> Family<EndpointLabels, Gauge> {
    use cc_proxy_api::mesh::EndpointState;
    let family = Family::<EndpointLabels, Gauge>::default();
    let mut tracked = DESTINATIONS.lock().unwrap_or_else(|p| p.into_inner());
    tracked.retain(|t| t.dest.strong_count() > 0);
    for t in tracked.iter() {
        let Some(dest) = t.dest.upgrade() else {
            continue;
        };
        let mut counts = [0i64; 3];
        for e in dest.status() {
            counts[match e.state {
                EndpointState::Ready => 0,
                EndpointState::Pending => 1,
                EndpointState::Ejected => 2,
            }] += 1;
        }
        for (state, n) in ["ready", "pending", "ejected"].into_iter().zip(counts) {
            family
                .get_or_create(&EndpointLabels {
                    vm: t.vm.clone(),
                    listener: t.listener.clone(),
                    state,
                })
                .inc_by(n);
        }
    }
    family
}

/// An outbound endpoint was ejected.
pub fn ejected(vm: &str, listener: &str) {
    let labels = ListenerLabels {
        vm: vm.to_string(),
        listener: listener.to_string(),
    };
    count(
        &METRICS.ejections,
        &labels,
        vm,
        |c| &mut c.ejections,
        |c| {
            c.inc();
        },
    );
}

/// Add the mesh's families to the admin server's scrapes. Call once at startup.
pub fn register() {
    crate::admin::add_metrics_source(Box::new(|r: &mut Registry| {
        let m = &*METRICS;
        r.register("tcp_open", "Mesh connections opened", m.tcp_open.clone());
        r.register(
            "tcp_open_connections",
            "Mesh connections open now",
            m.tcp_open_connections.clone(),
        );
        r.register(
            "tcp_read_bytes",
            "Bytes read from mesh peers",
            m.tcp_read_bytes.clone(),
        );
        r.register(
            "tcp_write_bytes",
            "Bytes written to mesh peers",
            m.tcp_write_bytes.clone(),
        );
        r.register(
            "tcp_close",
            "Mesh connections closed, by errno (empty: clean)",
            m.tcp_close.clone(),
        );
        r.register("request", "Mesh HTTP requests", m.request.clone());
        r.register("response", "Mesh HTTP responses", m.response.clone());
        r.register(
            "response_latency_ms",
            "Mesh HTTP response latency in milliseconds (to the response headers)",
            m.response_latency_ms.clone(),
        );
        r.sub_registry_with_prefix("cc_proxy").register(
            "mesh_refused",
            "Mesh connections and requests refused, by reason (limits, authorization, handshakes, headers)",
            m.refused.clone(),
        );
        r.sub_registry_with_prefix("cc_proxy").register(
            "mesh_endpoint_ejections",
            "Outbound endpoints ejected after a failed connect or handshake",
            m.ejections.clone(),
        );
        r.sub_registry_with_prefix("cc_proxy").register(
            "mesh_endpoints",
            "Endpoints of each outbound destination, by state",
            endpoint_gauge(),
        );
    }));
}

/// Count a refusal.
pub fn refused(vm: &str, direction: Direction, reason: Refusal) {
    let labels = RefusalLabels {
        vm: vm.to_string(),
        direction: direction.as_str(),
        reason: reason.as_str(),
    };
    count(
        &METRICS.refused,
        &labels,
        vm,
        |c| &mut c.refused,
        |c| {
            c.inc();
        },
    );
}

/// One open connection's metrics: opened on creation, closed (with its byte counts) on [`TcpConn::close`].
pub struct TcpConn {
    labels: TcpLabels,
    closed: bool,
}

impl TcpConn {
    pub fn open(vm: &str, direction: Direction, tls: TlsLabel, peer_id: Option<&str>) -> TcpConn {
        let id = peer_id.unwrap_or_default().to_string();
        let (client_id, server_id) = match direction {
            Direction::Inbound => (id, String::new()),
            Direction::Outbound => (String::new(), id),
        };
        let labels = TcpLabels {
            direction: direction.as_str(),
            tls: tls.as_str(),
            client_id,
            server_id,
            vm: vm.to_string(),
        };
        count(&METRICS.tcp_open, &labels, vm, tcp_series, |c| {
            c.inc();
        });
        count(
            &METRICS.tcp_open_connections,
            &labels,
            vm,
            tcp_series,
            |g| {
                g.inc();
            },
        );
        TcpConn {
            labels,
            closed: false,
        }
    }

    /// Count the bytes carried and the close (`errno` of the error that ended it, if any).
    pub fn close(mut self, counts: &Transferred, errno: Option<i32>) {
        self.finish(counts, errno);
    }

    fn finish(&mut self, counts: &Transferred, errno: Option<i32>) {
        if self.closed {
            return;
        }
        self.closed = true;
        let m = &*METRICS;
        let l = &self.labels;
        count(&m.tcp_read_bytes, l, &l.vm, tcp_series, |c| {
            c.inc_by(counts.up.load(Ordering::Relaxed));
        });
        count(&m.tcp_write_bytes, l, &l.vm, tcp_series, |c| {
            c.inc_by(counts.down.load(Ordering::Relaxed));
        });
        count(&m.tcp_open_connections, l, &l.vm, tcp_series, |g| {
            g.dec();
        });
        let close = CloseLabels {
            direction: l.direction,
            tls: l.tls,
            client_id: l.client_id.clone(),
            server_id: l.server_id.clone(),
            vm: l.vm.clone(),
            errno: errno.map(|e| e.to_string()).unwrap_or_default(),
        };
        count(
            &m.tcp_close,
            &close,
            &l.vm,
            |c| &mut c.close,
            |c| {
                c.inc();
            },
        );
    }
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        self.finish(&Transferred::default(), None);
    }
}

/// Distinct status codes one [`RequestSeries`] keeps resolved; responses with further codes are looked up
/// each time (still counted).
pub const MAX_CACHED_STATUSES: usize = 8;

/// One connection's series for the requests to one authority, resolved once: looking a series up hashes and
/// compares every label, and building the labels copies every string, per request and per hop otherwise. An
/// HTTP connection usually asks for one authority, so the connection keeps the series of the last one.
/// Series are resolved as [`count`] does: created (and recorded with the VM) only while the VM serves; a
/// series removed with its VM while a connection still holds it counts on, unseen (a straggler).
pub struct RequestSeries {
    /// The authority the requests asked for (the label may be [`OTHER_AUTHORITY`] instead).
    asked: String,
    labels: HttpLabels,
    /// `None`: the VM was not serving, nothing is counted.
    request: Option<Counter>,
    latency: Option<Histogram>,
    /// `response_total` by status code, as they come (at most [`MAX_CACHED_STATUSES`]).
    responses: Vec<(u16, Option<Counter>)>,
}

/// `family`'s series `labels` of VM `vm`, created and recorded in the VM's set `set` if need be; `None` when
/// the VM does not serve (as [`count`]).
fn resolve<L, M, C>(
    family: &Family<L, M, C>,
    labels: &L,
    vm: &str,
    set: fn(&mut Created) -> &mut HashSet<L>,
) -> Option<M>
where
    L: Clone + Hash + Eq,
    M: Clone,
    C: MetricConstructor<M>,
{
    let mut found = None;
    count(family, labels, vm, set, |m| found = Some(m.clone()));
    found
}

impl RequestSeries {
    /// The series of requests labelled `labels`; its authority is relabelled [`OTHER_AUTHORITY`] when the VM
    /// already counts `max_authorities` others.
    pub fn new(mut labels: HttpLabels, max_authorities: usize) -> RequestSeries {
        let m = &*METRICS;
        let asked = std::mem::take(&mut labels.authority);
        labels.authority = authority_label(&labels.vm, &asked, max_authorities);
        RequestSeries {
            asked,
            request: resolve(&m.request, &labels, &labels.vm, |c| &mut c.http),
            latency: resolve(&m.response_latency_ms, &labels, &labels.vm, |c| &mut c.http),
            labels,
            responses: Vec::new(),
        }
    }

    /// The authority these series count.
    pub fn authority(&self) -> &str {
        &self.asked
    }

    /// One request.
    pub fn request(&self) {
        if let Some(c) = &self.request {
            c.inc();
        }
    }

    /// Its response: `response_total` by status code and class, and `response_latency_ms`.
    pub fn response(&mut self, status: u16, latency_ms: f64) {
        if let Some(h) = &self.latency {
            h.observe(latency_ms);
        }
        let counter = match self.responses.iter().find(|(s, _)| *s == status) {
            Some((_, c)) => c.clone(),
            None => {
                let c = resolve(
                    &METRICS.response,
                    &response_labels(&self.labels, status),
                    &self.labels.vm,
                    |c| &mut c.response,
                );
                if self.responses.len() < MAX_CACHED_STATUSES {
                    self.responses.push((status, c.clone()));
                }
                c
            }
        };
        if let Some(c) = counter {
            c.inc();
        }
    }
}

fn response_labels(labels: &HttpLabels, status: u16) -> ResponseLabels {
    ResponseLabels {
        direction: labels.direction,
        tls: labels.tls,
        client_id: labels.client_id.clone(),
        server_id: labels.server_id.clone(),
        authority: labels.authority.clone(),
        vm: labels.vm.clone(),
        status_code: status.to_string(),
        classification: if status >= 500 { "failure" } else { "success" },
    }
}

/// A stream that counts the bytes read from it (`up`) and written to it (`down`), for connections whose
/// bytes are not copied by `copy` (HTTP).
pub struct Counted<T> {
    inner: T,
    counts: std::sync::Arc<Transferred>,
}

impl<T> Counted<T> {
    pub fn new(inner: T, counts: std::sync::Arc<Transferred>) -> Counted<T> {
        Counted { inner, counts }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counts.up.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.counts.down.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusals(vm: &str) -> Option<u64> {
        METRICS
            .refused
            .get(&RefusalLabels {
                vm: vm.into(),
                direction: "outbound",
                reason: "connect",
            })
            .map(|c| c.get())
    }

    fn tcp_labels(vm: &str) -> TcpLabels {
        TcpLabels {
            direction: "inbound",
            tls: "true",
            client_id: "a.id".into(),
            server_id: String::new(),
            vm: vm.into(),
        }
    }

    #[test]
    fn a_vms_authorities_are_bounded_and_forgotten_with_the_vm() {
        let vm = "authority-vm";
        let serve = serving(vm);
        assert_eq!(authority_label(vm, "a", 2), "a");
        assert_eq!(authority_label(vm, "b", 2), "b");
        assert_eq!(authority_label(vm, "c", 2), OTHER_AUTHORITY);
        assert_eq!(
            authority_label(vm, "a", 2),
            "a",
            "a known one keeps its label"
        );
        assert_eq!(
            authority_label(vm, "", 2),
            "",
            "no authority is never relabelled"
        );
        assert_eq!(
            authority_label("other-vm", "c", 2),
            "c",
            "another VM has its own"
        );
        drop(serve);
        let again = serving(vm);
        assert_eq!(
            authority_label(vm, "c", 2),
            "c",
            "a new instance starts afresh"
        );
        drop(again);
    }

    #[test]
    fn a_vms_series_go_with_its_last_serving_instance_and_are_not_recreated_after() {
        let vm = "series-vm";
        let first = serving(vm);
        refused(vm, Direction::Outbound, Refusal::Connect);
        refused(vm, Direction::Outbound, Refusal::Connect);
        ejected(vm, "127.0.0.1:4140");
        TcpConn::open(vm, Direction::Inbound, TlsLabel::Yes, Some("a.id"))
            .close(&Transferred::default(), Some(104));
        let http = HttpLabels {
            direction: "inbound",
            tls: "true",
            client_id: "a.id".into(),
            server_id: String::new(),
            authority: "web".into(),
            vm: vm.into(),
        };
        let mut series = RequestSeries::new(http.clone(), 100);
        series.request();
        series.response(200, 3.0);
        // Another VM's series are not touched by this one's removal.
        let other = serving("other-vm");
        refused("other-vm", Direction::Outbound, Refusal::Connect);
        assert_eq!(refusals(vm), Some(2));
        assert!(METRICS.tcp_open.get(&tcp_labels(vm)).is_some());
        assert_eq!(
            METRICS
                .tcp_open_connections
                .get(&tcp_labels(vm))
                .map(|g| g.get()),
            Some(0)
        );

        // A replacement instance serving while the first drains: nothing goes yet.
        let second = serving(vm);
        drop(first);
        assert_eq!(refusals(vm), Some(2));
        drop(second);

        assert_eq!(refusals(vm), None);
        assert!(METRICS.tcp_open.get(&tcp_labels(vm)).is_none());
        assert!(METRICS.tcp_open_connections.get(&tcp_labels(vm)).is_none());
        assert!(METRICS.tcp_read_bytes.get(&tcp_labels(vm)).is_none());
        assert!(METRICS.tcp_write_bytes.get(&tcp_labels(vm)).is_none());
        assert!(METRICS.request.get(&http).is_none());
        assert!(METRICS.response_latency_ms.get(&http).is_none());
        assert!(METRICS
            .ejections
            .get(&ListenerLabels {
                vm: vm.into(),
                listener: "127.0.0.1:4140".into()
            })
            .is_none());
        assert!(created().get(vm).is_none());
        assert_eq!(refusals("other-vm"), Some(1));

        // A straggler (a connection aborted after the drain) recreates nothing.
        refused(vm, Direction::Outbound, Refusal::Connect);
        let conn = TcpConn::open(vm, Direction::Inbound, TlsLabel::Yes, Some("a.id"));
        drop(conn);
        // A connection still holding its request series after the drain, or resolving new ones, counts
        // nothing that shows.
        series.request();
        series.response(503, 1.0);
        let mut late = RequestSeries::new(http.clone(), 100);
        late.request();
        late.response(200, 1.0);
        assert!(METRICS.request.get(&http).is_none());
        assert!(METRICS.response_latency_ms.get(&http).is_none());
        assert!(METRICS.response.get(&response_labels(&http, 503)).is_none());
        assert!(METRICS.response.get(&response_labels(&http, 200)).is_none());
        assert_eq!(refusals(vm), None);
        assert!(METRICS.tcp_open.get(&tcp_labels(vm)).is_none());
        assert!(METRICS.tcp_open_connections.get(&tcp_labels(vm)).is_none());
        assert!(created().get(vm).is_none());

        // Served again (a re-registration): counted afresh.
        let again = serving(vm);
        refused(vm, Direction::Outbound, Refusal::Connect);
        assert_eq!(refusals(vm), Some(1));
        drop((again, other));
        assert_eq!(refusals(vm), None);
        assert_eq!(refusals("other-vm"), None);
    }
}
