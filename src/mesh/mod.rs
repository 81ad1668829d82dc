//! The mesh front: for each VM registered with a `mesh` object, the daemon is that VM's service-mesh proxy
//! on the host, wire-compatible with linkerd2-proxy (`docs/mesh.md`, `../shared/specs/linkerd-wire.md`).
//!
//! Layers, one file each:
//! - `identity`: where each workload identity's certificate comes from (the embedded CA, files, Linkerd's
//!   identity service: `identity_svc`) and the trust anchors; publishes [`identity::Credential`]s on watch
//!   channels, renewed before expiry and withdrawn if they expire first.
//! - `discover`: named outbound destinations' endpoints (Linkerd's destination service or DNS), one watch
//!   channel per name shared by every VM using it.
//! - `listener`: binds a VM's inbound and outbound listeners and runs their accept loops until the VM's
//!   [`MeshVmCtx::shutdown`] fires (unregistered, lost, daemon stopping: stop accepting, drain).
//! - `tls`, `detect`, `inbound`, `outbound`, `balance`, `http`, `transport_header`, `copy`, `metrics`: the
//!   data plane.
//! - `config`: checks a VM's `mesh` object before anything is bound; `ca` and `files`: the identity sources.
//!
//! Contract between the identity and lifecycle side and the data plane: a VM's listeners get a
//! [`MeshVmCtx`]; they serve only while `credential` holds `Some`, and build their rustls configurations
//! from it and from `anchors` each time either changes.
//!
//! Lifecycle ([`Mesh`], one per daemon, held by the VM registry): a registration with a `mesh` object is
//! checked ([`config::validate`]), each named outbound destination is watched ([`discover::NameLease`], its
//! receiver given to the outbound listener), its listeners are bound before the agent is connected (a bad or
//! used address fails the registration and nothing stays bound or watched), and once the VM is published its
//! listeners serve ([`Mesh::start`]) with a lease on the VM's identity. They stop when the VM leaves `Ready`
//! (unregistered, lost, the daemon stopping: the VM's `ended` token) or when the whole mesh stops
//! ([`Mesh::stop_all`]); the VM's entry, its identity lease and its name leases go once its listeners have
//! drained. A recovered VM's listeners are bound and started again from its state record.
//!
//! Readiness: the daemon is not ready while a serving VM has no valid certificate ([`Mesh::uncertified`]).

pub mod ca;
pub mod config;
pub mod files;
pub mod identity;
pub mod identity_svc;

// The data plane (issue 14's meshdata side).
pub mod balance;
pub mod copy;
pub mod detect;
pub mod discover;
pub mod http;
pub mod inbound;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod tls;
pub mod transport_header;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cc_proxy_api::mesh::{DestinationState, DestinationStatus, MeshConfig, MeshEndpoints};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use discover::{Discovery, NameLease, SetState};
use identity::{Anchors, Credential, IdentityLease, IdentityStore};

use crate::sync::lock;

/// What one meshed VM's listeners need from the rest of the daemon.
#[derive(Clone)]
pub struct MeshVmCtx {
    /// The VM's id (metric label `vm`, tap filter, logs).
    pub vm: String,
    /// The uid that owns the VM (`vm.info`'s `owner`): its mesh tap events are shown to it.
    pub owner: u32,
    /// The VM's workload identity (its certificate's DNS SAN, the SNI its peers send).
    pub identity: String,
    /// The VM's current certificate; `None` until first issued. Listeners do not serve before.
    pub credential: watch::Receiver<Option<Arc<Credential>>>,
    /// The trust anchors peers' certificates are verified against.
    pub anchors: watch::Receiver<Arc<Anchors>>,
    /// Fired when the VM's listeners must stop accepting and drain.
    pub shutdown: CancellationToken,
}

/// How long a registration waits for its identity's first certificate before answering, so that a client
/// connecting right after `vm.register` finds the listeners serving (the embedded CA issues in milliseconds;
/// files that are missing keep the listeners waiting, and the registration does not wait for them).
pub const FIRST_CREDENTIAL_WAIT: Duration = Duration::from_secs(2);

/// Why a VM's mesh could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MeshSetupError {
    /// The configuration is wrong (the field at fault is named).
    #[error("invalid mesh configuration: {0}")]
    Config(#[from] config::ConfigError),
    /// A listener could not be set up.
    #[error(transparent)]
    Listen(#[from] listener::MeshError),
}

/// A VM's listeners, bound and not yet serving; dropping it unbinds them and releases its names.
pub struct Bound {
    inner: listener::BoundListeners,
    /// Per outbound listener (configuration order), the lease on its named destination's endpoints.
    names: Vec<Option<NameLease>>,
}

/// One outbound listener of a serving VM, kept for `mesh.endpoints`.
struct OutboundEntry {
    /// The listener's `listen`, as configured.
    listen: String,
    /// The destination's name, when it has one.
    name: Option<String>,
    /// Whether the destination has fixed endpoints or a name (else it has no endpoint set).
    has_destination: bool,
    listener: Arc<outbound::OutboundListener>,
    /// The named destination's endpoints, held as long as the listener lives.
    lease: Option<NameLease>,
}

/// One meshed VM's running listeners.
struct MeshVm {
    config: Arc<MeshConfig>,
    /// The VM's hold on its identity's certificate; released when the entry goes.
    lease: IdentityLease,
    /// Fired to stop the listeners (child of the mesh's `stopping`, and fired when the VM ends).
    shutdown: CancellationToken,
    /// Fired once the listeners have drained.
    done: CancellationToken,
    /// The outbound listeners, configuration order.
    outbound: Vec<OutboundEntry>,
}

/// Every meshed VM's listeners, and the identity store they take certificates from.
pub struct Mesh {
    identities: Arc<IdentityStore>,
    /// Resolves named outbound destinations; the error says why names cannot be resolved (no DNS
    /// configuration), answered to registrations that use one.
    discovery: Result<Arc<Discovery>, String>,
    vms: Mutex<HashMap<String, Arc<MeshVm>>>,
    /// Fired when the daemon stops: every VM's listeners stop accepting and drain.
    stopping: CancellationToken,
    /// Every VM's serving task, so the daemon's exit can wait for the drain.
    tasks: TaskTracker,
}

impl Mesh {
    pub fn new(
        identities: Arc<IdentityStore>,
        discovery: Result<Arc<Discovery>, String>,
    ) -> Arc<Mesh> {
        Arc::new(Mesh {
            identities,
            discovery,
            vms: Mutex::new(HashMap::new()),
            stopping: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// The identity store (trust anchors for `mesh.trust_anchors`).
    pub fn identities(&self) -> &Arc<IdentityStore> {
        &self.identities
    }

    /// Check `cfg`, watch its named destinations and bind its listeners. Nothing stays bound (nor watched)
    /// on failure; dropping the result unbinds.
    pub async fn bind(&self, cfg: &MeshConfig) -> Result<Bound, MeshSetupError> {
        config::validate(cfg)?;
        let mut names = Vec::with_capacity(cfg.outbound.len());
        for (i, ob) in cfg.outbound.iter().enumerate() {
            let Some(name) = ob.destination.as_ref().and_then(|d| d.name.as_deref()) else {
                names.push(None);
                continue;
            };
            let refused = |reason: String| config::ConfigError {
                field: format!("mesh.outbound[{i}].destination.name"),
                reason,
            };
            let discovery = self
                .discovery
                .as_ref()
                .map_err(|e| refused(format!("names cannot be resolved: {e}")))?;
            let lease = discovery.watch(name).map_err(|e| refused(e.to_string()))?;
            names.push(Some(lease));
        }
        let discovered: Vec<_> = names
            .iter()
            .map(|l| l.as_ref().map(|l| l.endpoints.clone()))
            .collect();
        let inner = listener::bind_vm(cfg, &discovered).await?;
        Ok(Bound { inner, names })
    }

    /// Serve VM `vm`'s bound listeners until `ended` fires (the VM left `Ready`) or the mesh stops. Returns
    /// once the identity's first certificate is served, or after [`FIRST_CREDENTIAL_WAIT`].
    pub async fn start(
        self: &Arc<Self>,
        vm: &str,
        owner: u32,
        cfg: MeshConfig,
        bound: Bound,
        ended: CancellationToken,
    ) {
        let lease = self.identities.acquire(&cfg.identity);
        let mut first = lease.credential.clone();
        let shutdown = self.stopping.child_token();
        let ctx = MeshVmCtx {
            vm: vm.to_string(),
            owner,
            identity: cfg.identity.clone(),
            credential: lease.credential.clone(),
            anchors: self.identities.anchors(),
            shutdown: shutdown.clone(),
        };
        let Bound { inner, names } = bound;
        let outbound = inner
            .listeners
            .iter()
            .filter_map(|b| match &b.role {
                listener::Role::Outbound(l) => Some((b.listen.clone(), l.clone())),
                listener::Role::Inbound(_) => None,
            })
            .zip(cfg.outbound.iter().zip(names))
            .map(|((listen, listener), (ob, lease))| OutboundEntry {
                listen,
                name: ob.destination.as_ref().and_then(|d| d.name.clone()),
                has_destination: ob.destination.is_some(),
                listener,
                lease,
            })
            .collect();
        let entry = Arc::new(MeshVm {
            config: Arc::new(cfg),
            lease,
            shutdown: shutdown.clone(),
            done: CancellationToken::new(),
            outbound,
        });
        // An entry of the same id still draining (a lost VM just replaced) is superseded; its end removes
        // nothing.
        lock(&self.vms).insert(vm.to_string(), entry.clone());
        // The VM's end stops its listeners.
        tokio::spawn(async move {
            tokio::select! {
                _ = ended.cancelled() => shutdown.cancel(),
                _ = shutdown.cancelled() => {}
            }
        });
        let mesh = self.clone();
        let id = vm.to_string();
        let cfg = entry.config.clone();
        self.tasks.spawn(async move {
            listener::serve_vm(inner, cfg, ctx).await;
            mesh.finished(&id, &entry);
        });
        let _ = tokio::time::timeout(FIRST_CREDENTIAL_WAIT, first.wait_for(Option::is_some)).await;
    }

    /// VM `vm`'s listeners have drained: forget it (unless a newer registration of its id took its place).
    fn finished(&self, vm: &str, entry: &Arc<MeshVm>) {
        let mut vms = lock(&self.vms);
        if vms.get(vm).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            vms.remove(vm);
        }
        drop(vms);
        tracing::debug!(vm = %vm, "mesh listeners stopped");
        entry.done.cancel();
    }

    /// The certificate VM `vm`'s listeners serve now, if it is meshed and one was issued.
    pub fn credential(&self, vm: &str) -> Option<Arc<Credential>> {
        lock(&self.vms).get(vm).and_then(|e| e.lease.current())
    }

    /// Where VM `vm`'s certificate stands (pending while the VM's listeners are not started).
    pub fn identity_state(&self, vm: &str) -> identity::IdentityState {
        lock(&self.vms)
            .get(vm)
            .map(|e| e.lease.state())
            .unwrap_or_default()
    }

    /// How many meshed VMs serve without a valid certificate (none yet, or it expired): the daemon is not
    /// ready while any does.
    pub fn uncertified(&self) -> usize {
        lock(&self.vms)
            .values()
            .filter(|e| !e.shutdown.is_cancelled() && e.lease.current().is_none())
            .count()
    }

    /// VM `vm`'s outbound destinations and their endpoints, if it is meshed and serving.
    pub fn endpoints(&self, vm: &str) -> Option<MeshEndpoints> {
        let entry = lock(&self.vms).get(vm).cloned()?;
        let destinations = entry
            .outbound
            .iter()
            .filter(|o| o.has_destination)
            .map(|o| DestinationStatus {
                listener: o.listen.clone(),
                name: o.name.clone(),
                state: match &o.lease {
                    None => DestinationState::Fixed,
                    Some(l) => match l.endpoints.borrow().state {
                        SetState::Pending => DestinationState::Pending,
                        SetState::Resolved => DestinationState::Resolved,
                        SetState::NoEndpoints { .. } => DestinationState::NoEndpoints,
                        SetState::Reconnecting => DestinationState::Reconnecting,
                    },
                },
                endpoints: o.listener.status(),
            })
            .collect();
        Some(MeshEndpoints {
            vm: vm.to_string(),
            destinations,
        })
    }

    /// Wait (at most `within`) until VM `vm`'s listeners have drained, so that their addresses are free again.
    pub async fn stopped(&self, vm: &str, within: Duration) {
        let Some(entry) = lock(&self.vms).get(vm).cloned() else {
            return;
        };
        entry.shutdown.cancel();
        if tokio::time::timeout(within, entry.done.cancelled())
            .await
            .is_err()
        {
            tracing::warn!(vm = %vm, after = ?within, "mesh listeners still draining");
        }
    }

    /// The daemon stops: every VM's listeners stop accepting and drain; [`Mesh::drained`] waits for them.
    pub fn stop_all(&self) {
        self.stopping.cancel();
        self.tasks.close();
    }

    /// Every VM's listeners have drained (after [`Mesh::stop_all`]).
    pub async fn drained(&self) {
        self.tasks.wait().await;
    }
}
