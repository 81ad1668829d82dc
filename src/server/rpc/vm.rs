//! `vm.register`, `vm.attach`, `vm.unregister`, `vm.list`, `vm.info`.
//!
//! The registering client's uid owns the VM; the other methods serve only its owner and privileged clients
//! (`server/authz.rs`), and `vm.list` lists only the VMs the client may see.

use std::sync::Arc;

use cc_proxy_api::methods;
use cc_proxy_api::types::{RegisterParams, RegisterResult, VmId, VmInfo};
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::RpcModule;

use super::{check_vm, parse, peer, settled_vm};
use crate::logging::escape_client_text;
use crate::server::authz::{self, Access, Front};
use crate::server::Proxy;
use crate::vm::registry::Registrant;
use crate::vm::Vm;

pub fn register(m: &mut RpcModule<Arc<Proxy>>) {
    let _ = m.register_async_method(methods::VM_REGISTER, |params, proxy, ext| async move {
        let peer = peer(&ext);
        let p: RegisterParams = parse(&params)?;
        // A mesh binds listeners, dials guest targets with the daemon's rights and is issued a certificate
        // for the identity it names: none of it can be checked against the client's own rights, so a mesh
        // is for privileged clients only.
        if p.mesh.is_some() {
            authz::check_privileged(&peer, "vm.register with a mesh", Front::JsonRpc)?;
        }
        let max = proxy.max_client_log;
        // The id and URIs are not checked yet: logged escaped and bounded, as all client text.
        tracing::debug!(vm = %escape_client_text(&p.id, max), "vm.register");
        let by = Registrant {
            uid: peer.uid,
            privileged: peer.access == Access::Privileged,
            rights: peer.endpoint_rights(),
        };
        let vm = proxy.registry.register(p, by).await.inspect_err(|e| {
            tracing::info!(error = %escape_client_text(&e.to_string(), max), "registration failed");
        })?;
        Ok::<_, ErrorObjectOwned>(registered(&vm))
    });
    let _ = m.register_async_method(methods::VM_ATTACH, |params, proxy, ext| async move {
        let p: VmId = parse(&params)?;
        let vm = settled_vm(&proxy, &peer(&ext), &p.id).await?;
        Ok::<_, ErrorObjectOwned>(registered(&vm))
    });
    let _ = m.register_async_method(methods::VM_UNREGISTER, |params, proxy, ext| async move {
        let p: VmId = parse(&params)?;
        let vm = settled_vm(&proxy, &peer(&ext), &p.id).await?;
        // Only the VM the client was allowed: one registered again meanwhile by another uid is left alone.
        proxy.registry.unregister(&vm.id, vm.owner)?;
        // The VM's mesh listeners drain before the answer, so their addresses are free for a new registration.
        proxy
            .registry
            .mesh_stopped(&p.id, crate::server::SHUTDOWN_GRACE)
            .await;
        Ok::<_, ErrorObjectOwned>(())
    });
    let _ = m.register_method(methods::VM_LIST, |_, proxy, ext| -> Vec<VmInfo> {
        let peer = peer(ext);
        proxy.registry.list_info(|owner| peer.sees(owner))
    });
    let _ = m.register_method(methods::VM_INFO, |params, proxy, ext| {
        let p: VmId = parse(&params)?;
        let peer = peer(ext);
        check_vm(proxy, &peer, &p.id)?;
        // The owner checked again on what is shown: the VM may have been registered again meanwhile.
        let info = proxy.registry.info(&p.id)?;
        authz::check_vm(&peer, &info.id, info.owner, Front::JsonRpc)?;
        Ok::<_, ErrorObjectOwned>(info)
    });
}

/// What `vm.register` and `vm.attach` answer.
fn registered(vm: &Vm) -> RegisterResult {
    RegisterResult {
        id: vm.id.clone(),
        dialect: vm.dialect.name().into(),
        api_version: vm.api_version,
    }
}
