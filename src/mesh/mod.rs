//! The mesh front: for each VM registered with a `mesh` object, the daemon is that VM's service-mesh proxy
//! on the host, wire-compatible with linkerd2-proxy (`docs/mesh.md`, `../shared/specs/linkerd-wire.md`).
//!
//! Layers, one file each:
//! - `identity`: where each workload identity's certificate comes from (the embedded CA, files) and the
//!   trust anchors; publishes [`identity::Credential`]s on watch channels, renewed before expiry.
//! - `listener`: binds a VM's inbound and outbound listeners and runs their accept loops until the VM's
//!   [`MeshVmCtx::shutdown`] fires (unregistered, lost, daemon stopping: stop accepting, drain).
//! - `tls`, `detect`, `inbound`, `outbound`, `http`, `transport_header`, `copy`, `metrics`: the data plane.
//!
//! Contract between the identity and lifecycle side and the data plane: a VM's listeners get a
//! [`MeshVmCtx`]; they serve only while `credential` holds `Some`, and build their rustls configurations
//! from it and from `anchors` each time either changes.

pub mod identity;

// The data plane (issue 14's meshdata side).
pub mod copy;
pub mod detect;
pub mod http;
pub mod inbound;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod tls;
pub mod transport_header;

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use identity::{Anchors, Credential};

/// What one meshed VM's listeners need from the rest of the daemon.
#[derive(Clone)]
pub struct MeshVmCtx {
    /// The VM's id (metric label `vm`, tap filter, logs).
    pub vm: String,
    /// The VM's workload identity (its certificate's DNS SAN, the SNI its peers send).
    pub identity: String,
    /// The VM's current certificate; `None` until first issued. Listeners do not serve before.
    pub credential: watch::Receiver<Option<Arc<Credential>>>,
    /// The trust anchors peers' certificates are verified against.
    pub anchors: watch::Receiver<Arc<Anchors>>,
    /// Fired when the VM's listeners must stop accepting and drain.
    pub shutdown: CancellationToken,
}
