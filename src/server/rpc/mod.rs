//! The JSON-RPC 2.0 methods, one file per family: `proxy.*`, `vm.*`, `agent.*`, `stream.*`, `events.*`, `tap.*`,
//! `mesh.*`.

pub mod agent;
pub mod errors;
pub mod events;
pub mod ids;
pub mod limits;
pub mod mesh;
pub mod proxy;
pub mod stream;
pub mod tap;
pub mod vm;

use std::sync::Arc;

use jsonrpsee::types::{ErrorObjectOwned, Params};
use jsonrpsee::RpcModule;
use serde::de::DeserializeOwned;

use super::{authz, Peer, Proxy};
use crate::vm::Vm;

/// Every method, over the shared proxy state.
pub fn module(proxy: Arc<Proxy>) -> RpcModule<Arc<Proxy>> {
    let mut m = RpcModule::new(proxy);
    proxy::register(&mut m);
    vm::register(&mut m);
    agent::register(&mut m);
    stream::register(&mut m);
    events::register(&mut m);
    tap::register(&mut m);
    mesh::register(&mut m);
    m
}

/// Parse params into `T`, answering -32602 with serde's explanation on failure (counted by [`errors`]).
pub fn parse<T: DeserializeOwned>(params: &Params<'_>) -> Result<T, ErrorObjectOwned> {
    params.parse::<T>()
}

/// The client of a request, as the connection recorded it (a request without one is an unknown uid that owns
/// nothing and is not privileged).
pub fn peer(ext: &jsonrpsee::Extensions) -> Peer {
    ext.get::<Peer>()
        .cloned()
        .unwrap_or_else(|| Peer::unknown(0))
}

/// VM `id` (after its recovery, when it is being recovered) if the client may use it. The owner is checked on
/// the very VM returned, so a VM unregistered and registered again by another uid meanwhile is never handed
/// out; the early check on the id answers a refused client without waiting for a recovery.
pub async fn settled_vm(proxy: &Proxy, peer: &Peer, id: &str) -> Result<Arc<Vm>, ErrorObjectOwned> {
    check_vm(proxy, peer, id)?;
    let vm = proxy.registry.get_settled(id).await?;
    authz::check_vm(peer, &vm.id, vm.owner, authz::Front::JsonRpc)?;
    Ok(vm)
}

/// May the client use VM `id`? Unknown ids are left to the method (which answers "no VM"). Only an early
/// answer: a method that then uses the VM checks the owner of the VM it got ([`settled_vm`]).
pub fn check_vm(proxy: &Proxy, peer: &Peer, id: &str) -> Result<(), ErrorObjectOwned> {
    match proxy.registry.owner(id) {
        Some(owner) => Ok(authz::check_vm(peer, id, owner, authz::Front::JsonRpc)?),
        None => Ok(()),
    }
}
