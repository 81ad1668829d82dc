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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cc_proxy_api::mesh::{
    DestinationConfig, EndpointHint, EndpointLoad, EndpointState, EndpointStatus,
};
use tokio::sync::watch;

use super::discover::{Endpoint, EndpointSet, Hint, SetState};
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
    #[allow(dead_code)] // read by `mesh.endpoints` once disco wires it
    pub fn state(&self) -> SetState {
        self.set.borrow().state
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
    #[allow(dead_code)] // read by `mesh.endpoints` once disco wires it
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
                    ewma_ms: None,
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
