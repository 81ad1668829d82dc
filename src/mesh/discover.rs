//! Discovery of a named outbound destination's endpoints: Linkerd's destination service, or DNS.
//!
//! Roles:
//! - [`Discovery`] (one per daemon) resolves names `host:port` either with the destination service
//!   ([`Source::Destination`], `Destination.Get` over plaintext HTTP/2) or with DNS ([`Source::Dns`],
//!   hickory-resolver with `/etc/resolv.conf` or one given server).
//! - One watch task per name in use keeps that name's [`EndpointSet`] on a watch channel; every user of the
//!   name shares it: [`Discovery::watch`] hands out a [`NameLease`] per user, counted, and the task stops
//!   when the last lease is dropped.
//!
//! Events, destination service: connect → `Get` stream → each `add` inserts endpoints (address, weight,
//! identity and server name, protocol hint, metric labels of the set and of the address), each `remove`
//! removes them, `no_endpoints` empties the set ([`SetState::NoEndpoints`]); the stream ending or failing
//! marks the set [`SetState::Reconnecting`] while keeping its endpoints, and the stream is opened again
//! after a capped exponential backoff. DNS: resolve → publish the addresses (no identity, no hint) → resolve
//! again when the answer's TTL runs out (bounded by [`DNS_MIN_TTL`] and [`DNS_MAX_TTL`]); a failed lookup
//! keeps the last addresses ([`SetState::Reconnecting`]) and is retried with the backoff.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use linkerd2_proxy_api::destination::destination_client::DestinationClient;
use linkerd2_proxy_api::destination::{self as api, update::Update as ApiUpdate, GetDestination};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// First wait after a failed stream or lookup; doubled after each further failure up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest wait between two attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Time allowed for connecting to the destination service.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A DNS answer is resolved again after its TTL, but not sooner than this ...
pub const DNS_MIN_TTL: Duration = Duration::from_secs(1);
/// ... nor later than this.
pub const DNS_MAX_TTL: Duration = Duration::from_secs(300);
/// Most endpoints kept per name (a larger update is cut, with a warning).
pub const MAX_ENDPOINTS: usize = 10_000;

/// Why a name cannot be resolved or a source set up.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("invalid destination service address {0:?}: {1}")]
    Address(String, String),
    #[error("invalid destination name {0:?}: a name is host:port")]
    Name(String),
    #[error("cannot read the DNS configuration: {0}")]
    DnsConfig(String),
}

/// How an endpoint wants to be spoken to (the destination service's protocol hint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// No hint: the protocol of the connection is kept.
    Unknown,
    /// The endpoint's proxy accepts HTTP/2: HTTP/1 requests may be sent upgraded (`l5d-orig-proto`).
    H2,
    /// Opaque TCP; with `transport_port`, through the transport header to that inbound port.
    Opaque { transport_port: Option<u16> },
}

/// One endpoint of a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    /// The identity its proxy presents (a DNS-like name), if it is meshed.
    pub identity: Option<String>,
    /// The SNI to send, when it differs from the identity.
    pub server_name: Option<String>,
    pub hint: Hint,
    /// Metric labels of the endpoint (the set's, overridden by the address's).
    pub labels: BTreeMap<String, String>,
}

/// Where a name's resolution stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetState {
    /// Nothing known yet.
    Pending,
    /// Resolved; the endpoints are current.
    Resolved,
    /// The destination service says there are no endpoints (`exists`: the service itself exists).
    NoEndpoints { exists: bool },
    /// The stream or lookup failed; the last endpoints are kept until it is back.
    Reconnecting,
}

/// A name's endpoints as last known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSet {
    pub state: SetState,
    pub endpoints: BTreeMap<SocketAddr, Endpoint>,
}

impl EndpointSet {
    fn pending() -> EndpointSet {
        EndpointSet {
            state: SetState::Pending,
            endpoints: BTreeMap::new(),
        }
    }

    /// Apply one destination-service update.
    pub fn apply(&mut self, update: ApiUpdate) {
        match update {
            ApiUpdate::Add(set) => {
                for wa in set.addrs {
                    if self.endpoints.len() >= MAX_ENDPOINTS {
                        tracing::warn!(
                            max = MAX_ENDPOINTS,
                            "too many endpoints; the rest are ignored"
                        );
                        break;
                    }
                    if let Some(ep) = endpoint(wa, &set.metric_labels) {
                        self.endpoints.insert(ep.addr, ep);
                    }
                }
                self.state = SetState::Resolved;
            }
            ApiUpdate::Remove(set) => {
                for a in set.addrs {
                    if let Some(addr) = socket_addr(a) {
                        self.endpoints.remove(&addr);
                    }
                }
                self.state = SetState::Resolved;
            }
            ApiUpdate::NoEndpoints(n) => {
                self.endpoints.clear();
                self.state = SetState::NoEndpoints { exists: n.exists };
            }
        }
    }
}

fn socket_addr(a: linkerd2_proxy_api::net::TcpAddress) -> Option<SocketAddr> {
    let ip = std::net::IpAddr::try_from(a.ip?).ok()?;
    let port = u16::try_from(a.port).ok()?;
    Some(SocketAddr::new(ip, port))
}

/// Whether an endpoint's `server_name` is sent as SNI: it must be a DNS name that differs from the endpoint's
/// identity (there is none to send without an identity). An unusable one is dropped with a warning: the SNI is
/// then the identity, which the server's certificate must carry either way.
fn usable_server_name(sni: &str, identity: Option<&str>) -> bool {
    match identity {
        None => false,
        Some(id) if id == sni => false,
        Some(_) => {
            let dns = matches!(
                rustls::pki_types::ServerName::try_from(sni),
                Ok(rustls::pki_types::ServerName::DnsName(_))
            );
            if !dns {
                tracing::warn!(server_name = %sni, "mesh discovery: a server_name that is not a DNS name is ignored");
            }
            dns
        }
    }
}

/// An endpoint from an `add`; None when its address is unusable.
fn endpoint(wa: api::WeightedAddr, set_labels: &HashMap<String, String>) -> Option<Endpoint> {
    use api::protocol_hint::Protocol;
    use api::tls_identity::Strategy;
    let addr = socket_addr(wa.addr?)?;
    let (identity, server_name) = match wa.tls_identity {
        Some(t) => {
            let id = match t.strategy {
                Some(Strategy::DnsLikeIdentity(d)) => Some(d.name),
                Some(Strategy::UriLikeIdentity(u)) => Some(u.uri),
                None => None,
            };
            let server_name = t
                .server_name
                .map(|s| s.name)
                .filter(|sni| usable_server_name(sni, id.as_deref()));
            (id, server_name)
        }
        None => (None, None),
    };
    let hint = match wa.protocol_hint {
        Some(h) => match h.protocol {
            Some(Protocol::H2(_)) => Hint::H2,
            Some(Protocol::Opaque(_)) => Hint::Opaque {
                transport_port: h
                    .opaque_transport
                    .and_then(|t| u16::try_from(t.inbound_port).ok()),
            },
            None => Hint::Unknown,
        },
        None => Hint::Unknown,
    };
    let mut labels: BTreeMap<String, String> = set_labels.clone().into_iter().collect();
    labels.extend(wa.metric_labels);
    Some(Endpoint {
        addr,
        weight: wa.weight,
        identity,
        server_name,
        hint,
        labels,
    })
}

/// Split `host:port` (a bracketed IPv6 host allowed).
pub fn split_name(name: &str) -> Result<(String, u16), DiscoverError> {
    let bad = || DiscoverError::Name(name.to_string());
    let (host, port) = name.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// Where names are resolved, as configured (`--destination-svc`, `--dns-server`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    /// Linkerd's destination service at `addr` (`HOST:PORT`).
    Destination { addr: String },
    /// DNS through `server`, or the system's configuration (`/etc/resolv.conf`) when None.
    Dns { server: Option<SocketAddr> },
}

/// Where names are resolved.
pub enum Source {
    Destination(tonic::transport::Channel),
    Dns(Box<hickory_resolver::TokioResolver>),
}

impl Source {
    /// The source `cfg` names.
    pub fn open(cfg: &SourceConfig) -> Result<Source, DiscoverError> {
        match cfg {
            SourceConfig::Destination { addr } => Source::destination(addr),
            SourceConfig::Dns { server } => Source::dns(*server),
        }
    }

    /// The destination service at `addr` (plaintext HTTP/2, connected lazily).
    pub fn destination(addr: &str) -> Result<Source, DiscoverError> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| DiscoverError::Address(addr.to_string(), e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT);
        Ok(Source::Destination(endpoint.connect_lazy()))
    }

    /// DNS through `server` (UDP and TCP), or the system's configuration when None.
    pub fn dns(server: Option<SocketAddr>) -> Result<Source, DiscoverError> {
        use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
        use hickory_resolver::name_server::TokioConnectionProvider;
        let builder = match server {
            Some(s) => {
                let group = NameServerConfigGroup::from_ips_clear(&[s.ip()], s.port(), true);
                hickory_resolver::Resolver::builder_with_config(
                    ResolverConfig::from_parts(None, Vec::new(), group),
                    TokioConnectionProvider::default(),
                )
            }
            None => hickory_resolver::Resolver::builder_tokio()
                .map_err(|e| DiscoverError::DnsConfig(e.to_string()))?,
        };
        Ok(Source::Dns(Box::new(builder.build())))
    }
}

struct Shared {
    tx: watch::Sender<Arc<EndpointSet>>,
    leases: usize,
    stop: CancellationToken,
}

/// Every name in use and its endpoints.
pub struct Discovery {
    source: Source,
    names: Mutex<HashMap<String, Shared>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One user's hold on a name: its endpoints. Dropping the last lease of a name stops its resolution.
pub struct NameLease {
    discovery: Arc<Discovery>,
    name: String,
    pub endpoints: watch::Receiver<Arc<EndpointSet>>,
}

impl Drop for NameLease {
    fn drop(&mut self) {
        let mut names = lock(&self.discovery.names);
        if let Some(s) = names.get_mut(&self.name) {
            s.leases -= 1;
            if s.leases == 0 {
                s.stop.cancel();
                names.remove(&self.name);
            }
        }
    }
}

impl Discovery {
    pub fn new(source: Source) -> Arc<Discovery> {
        Arc::new(Discovery {
            source,
            names: Mutex::new(HashMap::new()),
        })
    }

    /// Watch `name` (`host:port`): the first lease starts its resolution, later ones share it.
    pub fn watch(self: &Arc<Self>, name: &str) -> Result<NameLease, DiscoverError> {
        let (host, port) = split_name(name)?;
        let mut names = lock(&self.names);
        if let Some(s) = names.get_mut(name) {
            s.leases += 1;
            return Ok(NameLease {
                discovery: self.clone(),
                name: name.to_string(),
                endpoints: s.tx.subscribe(),
            });
        }
        let (tx, rx) = watch::channel(Arc::new(EndpointSet::pending()));
        let stop = CancellationToken::new();
        names.insert(
            name.to_string(),
            Shared {
                tx: tx.clone(),
                leases: 1,
                stop: stop.clone(),
            },
        );
        drop(names);
        let me = self.clone();
        let owned = name.to_string();
        tokio::spawn(async move {
            match &me.source {
                Source::Destination(ch) => follow_destination(ch.clone(), &owned, &tx, &stop).await,
                Source::Dns(r) => follow_dns(r, &host, port, &tx, &stop).await,
            }
        });
        Ok(NameLease {
            discovery: self.clone(),
            name: name.to_string(),
            endpoints: rx,
        })
    }
}

/// Capped exponential backoff.
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(RETRY_MAX);
        now
    }
}

/// Mark the set as reconnecting, keeping its endpoints.
fn reconnecting(tx: &watch::Sender<Arc<EndpointSet>>) {
    tx.send_if_modified(|set| {
        if set.state == SetState::Reconnecting {
            return false;
        }
        let mut s = (**set).clone();
        s.state = SetState::Reconnecting;
        *set = Arc::new(s);
        true
    });
}

/// Follow `name` on the destination service until `stop`.
async fn follow_destination(
    channel: tonic::transport::Channel,
    name: &str,
    tx: &watch::Sender<Arc<EndpointSet>>,
    stop: &CancellationToken,
) {
    let mut backoff = Backoff(RETRY_MIN);
    loop {
        let mut client = DestinationClient::new(channel.clone());
        let request = GetDestination {
            scheme: "k8s".to_string(),
            path: name.to_string(),
            context_token: String::new(),
        };
        let opened = tokio::select! {
            r = client.get(request) => r,
            _ = stop.cancelled() => return,
        };
        match opened {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    let msg = tokio::select! {
                        m = stream.message() => m,
                        _ = stop.cancelled() => return,
                    };
                    match msg {
                        Ok(Some(update)) => {
                            backoff = Backoff(RETRY_MIN);
                            if let Some(u) = update.update {
                                let mut set = (**tx.borrow()).clone();
                                set.apply(u);
                                tx.send_replace(Arc::new(set));
                            }
                        }
                        Ok(None) => {
                            tracing::info!(name, "destination stream ended; reopening");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(name, error = %e, "destination stream failed; reopening");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(name, error = %e, "cannot open a destination stream"),
        }
        reconnecting(tx);
        tokio::select! {
            _ = tokio::time::sleep(backoff.next()) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Follow `host` in DNS until `stop`.
async fn follow_dns(
    resolver: &hickory_resolver::TokioResolver,
    host: &str,
    port: u16,
    tx: &watch::Sender<Arc<EndpointSet>>,
    stop: &CancellationToken,
) {
    let mut backoff = Backoff(RETRY_MIN);
    loop {
        let lookup = tokio::select! {
            r = resolver.lookup_ip(host) => r,
            _ = stop.cancelled() => return,
        };
        let delay = match lookup {
            Ok(ips) => {
                backoff = Backoff(RETRY_MIN);
                let ttl = ips
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now())
                    .clamp(DNS_MIN_TTL, DNS_MAX_TTL);
                let endpoints = ips
                    .iter()
                    .take(MAX_ENDPOINTS)
                    .map(|ip| {
                        let addr = SocketAddr::new(ip, port);
                        (
                            addr,
                            Endpoint {
                                addr,
                                weight: 1,
                                identity: None,
                                server_name: None,
                                hint: Hint::Unknown,
                                labels: BTreeMap::new(),
                            },
                        )
                    })
                    .collect();
                let set = EndpointSet {
                    state: SetState::Resolved,
                    endpoints,
                };
                tx.send_if_modified(|old| {
                    if **old == set {
                        return false;
                    }
                    *old = Arc::new(set);
                    true
                });
                ttl
            }
            Err(e) => {
                tracing::warn!(host, error = %e, "DNS lookup failed; the last addresses are kept");
                reconnecting(tx);
                backoff.next()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::destination_server::{Destination, DestinationServer};
    use std::pin::Pin;

    type Updates = tokio::sync::mpsc::UnboundedReceiver<Result<api::Update, tonic::Status>>;

    /// A fake destination service: each `Get` takes the next prepared stream of updates.
    struct Fake {
        streams: Mutex<Vec<Updates>>,
        paths: Mutex<Vec<String>>,
    }

    struct Svc(Arc<Fake>);

    struct Stream(Updates);
    impl futures::Stream for Stream {
        type Item = Result<api::Update, tonic::Status>;
        fn poll_next(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }

    #[tonic::async_trait]
    impl Destination for Svc {
        type GetStream = Stream;
        async fn get(
            &self,
            req: tonic::Request<GetDestination>,
        ) -> Result<tonic::Response<Stream>, tonic::Status> {
            lock(&self.0.paths).push(req.into_inner().path);
            let next = lock(&self.0.streams).pop();
            next.map(|s| tonic::Response::new(Stream(s)))
                .ok_or_else(|| tonic::Status::unavailable("no more streams"))
        }
        type GetProfileStream =
            futures::stream::Empty<Result<api::DestinationProfile, tonic::Status>>;
        async fn get_profile(
            &self,
            _: tonic::Request<GetDestination>,
        ) -> Result<tonic::Response<Self::GetProfileStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("profiles"))
        }
    }

    fn add(addrs: &[(&str, Option<&str>, Hint)]) -> api::Update {
        use api::protocol_hint::{Opaque, OpaqueTransport, Protocol, H2};
        use api::tls_identity::{DnsLikeIdentity, Strategy};
        let addrs = addrs
            .iter()
            .map(|(a, id, hint)| api::WeightedAddr {
                addr: Some(a.parse::<SocketAddr>().unwrap().into()),
                weight: 10,
                metric_labels: [("pod".to_string(), a.to_string())].into(),
                tls_identity: id.map(|i| api::TlsIdentity {
                    strategy: Some(Strategy::DnsLikeIdentity(DnsLikeIdentity {
                        name: i.into(),
                    })),
                    server_name: None,
                }),
                protocol_hint: match hint {
                    Hint::Unknown => None,
                    Hint::H2 => Some(api::ProtocolHint {
                        protocol: Some(Protocol::H2(H2 {})),
                        opaque_transport: None,
                    }),
                    Hint::Opaque { transport_port } => Some(api::ProtocolHint {
                        protocol: Some(Protocol::Opaque(Opaque {})),
                        opaque_transport: transport_port.map(|p| OpaqueTransport {
                            inbound_port: p as u32,
                        }),
                    }),
                },
                ..Default::default()
            })
            .collect();
        api::Update {
            update: Some(ApiUpdate::Add(api::WeightedAddrSet {
                addrs,
                metric_labels: [("service".to_string(), "web".to_string())].into(),
            })),
        }
    }

    fn remove(a: &str) -> api::Update {
        api::Update {
            update: Some(ApiUpdate::Remove(api::AddrSet {
                addrs: vec![a.parse::<SocketAddr>().unwrap().into()],
            })),
        }
    }

    async fn wait(
        rx: &mut watch::Receiver<Arc<EndpointSet>>,
        f: impl Fn(&EndpointSet) -> bool,
    ) -> Arc<EndpointSet> {
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| f(s)))
            .await
            .expect("in time")
            .expect("open")
            .clone()
    }

    #[test]
    fn names_are_host_and_port() {
        assert_eq!(
            split_name("web.default.svc.cluster.local:80").unwrap(),
            ("web.default.svc.cluster.local".into(), 80)
        );
        assert_eq!(split_name("[::1]:8080").unwrap(), ("::1".into(), 8080));
        for bad in ["web", "web:", ":80", "web:0", "web:65536", "web:x"] {
            assert!(split_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_endpoints_server_name_is_kept_only_when_it_is_another_dns_name() {
        use api::tls_identity::{DnsLikeIdentity, DnsLikeIdentity as Sni, Strategy};
        const ID: &str = "web.default.serviceaccount.identity.linkerd.cluster.local";
        let with = |id: Option<&str>, sni: &str| {
            let wa = api::WeightedAddr {
                addr: Some("10.0.0.1:8080".parse::<SocketAddr>().unwrap().into()),
                tls_identity: Some(api::TlsIdentity {
                    strategy: id
                        .map(|i| Strategy::DnsLikeIdentity(DnsLikeIdentity { name: i.into() })),
                    server_name: Some(Sni { name: sni.into() }),
                }),
                ..Default::default()
            };
            let e = endpoint(wa, &HashMap::new()).expect("usable address");
            (e.identity, e.server_name)
        };
        // Another DNS name: sent as SNI, the identity still required.
        assert_eq!(
            with(Some(ID), "web.other.example"),
            (Some(ID.into()), Some("web.other.example".into()))
        );
        // The same as the identity: nothing to override.
        assert_eq!(with(Some(ID), ID), (Some(ID.into()), None));
        // Not a DNS name (an IP address, empty, bad characters, too long): the identity is the SNI.
        for bad in [
            "10.0.0.9",
            "",
            "a b.example",
            "under_score..example",
            &"x".repeat(300),
        ] {
            assert_eq!(with(Some(ID), bad), (Some(ID.into()), None), "{bad:?}");
        }
        // No identity: plaintext, so no SNI either.
        assert_eq!(with(None, "web.other.example"), (None, None));
    }

    #[tokio::test]
    async fn destination_updates_are_followed_and_kept_across_a_reconnect() {
        const ID: &str = "web.default.serviceaccount.identity.linkerd.cluster.local";
        let (first_tx, first) = tokio::sync::mpsc::unbounded_channel();
        let (second_tx, second) = tokio::sync::mpsc::unbounded_channel();
        let fake = Arc::new(Fake {
            streams: Mutex::new(vec![second, first]),
            paths: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = futures::stream::unfold(listener, |l| async move {
            Some((l.accept().await.map(|(s, _)| s), l))
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(DestinationServer::new(Svc(fake.clone())))
                .serve_with_incoming(incoming),
        );
        let discovery = Discovery::new(Source::destination(&addr.to_string()).unwrap());
        let name = "web.default.svc.cluster.local:80";
        let mut a = discovery.watch(name).unwrap();
        let b = discovery.watch(name).unwrap();
        assert_eq!(a.endpoints.borrow().state, SetState::Pending);

        first_tx
            .send(Ok(add(&[
                ("10.0.0.1:8080", Some(ID), Hint::H2),
                (
                    "10.0.0.2:8080",
                    None,
                    Hint::Opaque {
                        transport_port: Some(4143),
                    },
                ),
            ])))
            .unwrap();
        let set = wait(&mut a.endpoints, |s| s.endpoints.len() == 2).await;
        let one = &set.endpoints[&"10.0.0.1:8080".parse().unwrap()];
        assert_eq!(one.identity.as_deref(), Some(ID));
        assert_eq!(one.hint, Hint::H2);
        assert_eq!(one.weight, 10);
        assert_eq!(one.labels["service"], "web");
        assert_eq!(one.labels["pod"], "10.0.0.1:8080");
        let two = &set.endpoints[&"10.0.0.2:8080".parse().unwrap()];
        assert_eq!(two.identity, None);
        assert_eq!(
            two.hint,
            Hint::Opaque {
                transport_port: Some(4143)
            }
        );
        assert_eq!(
            *b.endpoints.borrow(),
            set,
            "one stream shared by both leases"
        );

        first_tx.send(Ok(remove("10.0.0.2:8080"))).unwrap();
        let set = wait(&mut a.endpoints, |s| s.endpoints.len() == 1).await;
        assert!(set
            .endpoints
            .contains_key(&"10.0.0.1:8080".parse().unwrap()));

        // The stream breaks: the endpoints are kept while it reconnects, then the new stream's updates apply.
        first_tx
            .send(Err(tonic::Status::unavailable("restarting")))
            .unwrap();
        let set = wait(&mut a.endpoints, |s| s.state == SetState::Reconnecting).await;
        assert_eq!(set.endpoints.len(), 1);
        second_tx
            .send(Ok(api::Update {
                update: Some(ApiUpdate::NoEndpoints(api::NoEndpoints { exists: true })),
            }))
            .unwrap();
        let set = wait(&mut a.endpoints, |s| {
            s.state == SetState::NoEndpoints { exists: true }
        })
        .await;
        assert!(set.endpoints.is_empty());
        assert_eq!(
            lock(&fake.paths).as_slice(),
            [name, name],
            "one stream per name, reopened once"
        );
        drop(a);
        drop(b);
        assert!(lock(&discovery.names).is_empty());
    }

    #[tokio::test]
    async fn dns_answers_are_followed_after_their_ttl() {
        let Ok(_) = std::process::Command::new("dnsmasq")
            .arg("--version")
            .output()
        else {
            eprintln!("skipped: dnsmasq is not installed (Debian package dnsmasq-base)");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "10.1.0.1 web.test\n").unwrap();
        let port = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let mut dnsmasq = std::process::Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--local-ttl=1",
                "--user=root",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .spawn()
            .unwrap();
        let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // Wait until dnsmasq answers (an A query for web.test over UDP).
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut query = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3];
        query.extend_from_slice(b"web\x04test\x00\x00\x01\x00\x01");
        let mut answered = false;
        for _ in 0..50 {
            let _ = probe.send_to(&query, server);
            if probe.recv(&mut [0u8; 512]).is_ok() {
                answered = true;
                break;
            }
        }
        assert!(answered, "dnsmasq does not answer");
        let discovery = Discovery::new(Source::dns(Some(server)).unwrap());
        let mut lease = discovery.watch("web.test:8080").unwrap();
        let set = wait(&mut lease.endpoints, |s| s.state == SetState::Resolved).await;
        assert_eq!(
            set.endpoints.keys().copied().collect::<Vec<_>>(),
            vec!["10.1.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(set.endpoints.values().next().unwrap().identity, None);
        // The answer changes (SIGHUP rereads --addn-hosts): followed after the 1 s TTL.
        std::fs::write(&hosts, "10.1.0.2 web.test\n10.1.0.3 web.test\n").unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(dnsmasq.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
        let set = wait(&mut lease.endpoints, |s| s.endpoints.len() == 2).await;
        assert!(set
            .endpoints
            .contains_key(&"10.1.0.3:8080".parse().unwrap()));
        let _ = dnsmasq.kill();
        let _ = dnsmasq.wait();
    }
}
