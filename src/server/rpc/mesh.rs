//! `mesh.trust_anchors`, `mesh.identity` and `mesh.endpoints`: the mesh front's control surface.
//!
//! The trust anchors are public (every peer must be given them): any client may read them. A VM's identity
//! and certificate (with the identity's state: `pending`, `valid`, or `expired` when the source did not renew
//! it in time and it was withdrawn), and its outbound destinations' endpoints, are served to the VM's owner
//! and privileged clients, like `vm.info`.

use std::sync::Arc;

use cc_proxy_api::mesh::{IdentityState, MeshEndpoints, MeshIdentity, TrustAnchors};
use cc_proxy_api::methods;
use cc_proxy_api::types::VmId;
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::RpcModule;

use super::{parse, peer, settled_vm};
use crate::error::ProxyError;
use crate::server::Proxy;

pub fn register(m: &mut RpcModule<Arc<Proxy>>) {
    let _ = m.register_method(methods::MESH_TRUST_ANCHORS, |_, proxy, _| {
        let mesh = proxy.registry.mesh().ok_or_else(no_mesh)?;
        let anchors = mesh.identities().current_anchors();
        Ok::<_, ErrorObjectOwned>(TrustAnchors {
            pem: anchors.pem(),
            count: anchors.roots.len(),
        })
    });
    mesh_endpoints(m);
    let _ = m.register_async_method(methods::MESH_IDENTITY, |params, proxy, ext| async move {
        let p: VmId = parse(&params)?;
        // A VM's certificate is shown to its owner and privileged clients only, like the rest of the VM.
        let vm = settled_vm(&proxy, &peer(&ext), &p.id).await?;
        let config = vm.mesh.clone().ok_or_else(|| {
            ProxyError::invalid(
                "id",
                format!("VM {:?} was registered without a mesh", vm.id),
            )
        })?;
        let mesh = proxy.registry.mesh().ok_or_else(no_mesh)?;
        let credential = mesh.credential(&vm.id);
        // An expired certificate is withdrawn (the identity store); between its expiry and the withdrawal
        // the served one's end says it too.
        let state = match mesh.identity_state(&vm.id) {
            IdentityState::Expired => IdentityState::Expired,
            _ => identity_state(
                credential.as_ref().map(|c| c.not_after),
                std::time::SystemTime::now(),
            ),
        };
        Ok::<_, ErrorObjectOwned>(MeshIdentity {
            vm: vm.id.clone(),
            identity: config.identity.clone(),
            state,
            certificate: credential.as_ref().map(|c| c.info()),
            chain_pem: credential.as_ref().map(|c| c.chain_pem()),
        })
    });
}

/// An identity's state from its served certificate's expiry (`None`: no certificate yet) at `now`.
fn identity_state(
    not_after: Option<std::time::SystemTime>,
    now: std::time::SystemTime,
) -> IdentityState {
    match not_after {
        None => IdentityState::Pending,
        Some(t) if t <= now => IdentityState::Expired,
        Some(_) => IdentityState::Valid,
    }
}

fn mesh_endpoints(m: &mut RpcModule<Arc<Proxy>>) {
    let _ = m.register_async_method(methods::MESH_ENDPOINTS, |params, proxy, ext| async move {
        let p: VmId = parse(&params)?;
        // Endpoints reveal where the VM's traffic goes: its owner and privileged clients only.
        let vm = settled_vm(&proxy, &peer(&ext), &p.id).await?;
        if vm.mesh.is_none() {
            return Err(ProxyError::invalid(
                "id",
                format!("VM {:?} was registered without a mesh", vm.id),
            )
            .into());
        }
        let mesh = proxy.registry.mesh().ok_or_else(no_mesh)?;
        // A meshed VM whose listeners are not serving (yet, or any more) has no endpoint sets.
        Ok::<_, ErrorObjectOwned>(mesh.endpoints(&vm.id).unwrap_or(MeshEndpoints {
            vm: vm.id.clone(),
            destinations: Vec::new(),
        }))
    });
}

fn no_mesh() -> ErrorObjectOwned {
    ProxyError::MeshListen {
        vm: String::new(),
        reason: "this daemon runs without the mesh front".into(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn an_identity_is_pending_without_a_certificate_and_expired_past_its_end() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        assert_eq!(identity_state(None, now), IdentityState::Pending);
        assert_eq!(identity_state(Some(now + hour), now), IdentityState::Valid);
        assert_eq!(identity_state(Some(now), now), IdentityState::Expired);
        assert_eq!(
            identity_state(Some(now - hour), now),
            IdentityState::Expired
        );
    }
}
