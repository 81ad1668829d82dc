//! `vm.register`, `vm.attach`, `vm.unregister`, `vm.list`, `vm.info`.

use std::sync::Arc;

use cc_proxy_api::methods;
use cc_proxy_api::types::{RegisterParams, RegisterResult, VmId, VmInfo};
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::RpcModule;

use super::parse;
use crate::server::Proxy;
use crate::vm::Vm;

pub fn register(m: &mut RpcModule<Arc<Proxy>>) {
    let _ = m.register_async_method(methods::VM_REGISTER, |params, proxy, _| async move {
        let p: RegisterParams = parse(&params)?;
        tracing::debug!(vm = %p.id, "vm.register");
        let vm = proxy.registry.register(p).await.inspect_err(|e| {
            tracing::info!(error = %e, "registration failed");
        })?;
        Ok::<_, ErrorObjectOwned>(registered(&vm))
    });
    let _ = m.register_async_method(methods::VM_ATTACH, |params, proxy, _| async move {
        let p: VmId = parse(&params)?;
        let vm = proxy.registry.get_settled(&p.id).await?;
        Ok::<_, ErrorObjectOwned>(registered(&vm))
    });
    let _ = m.register_async_method(methods::VM_UNREGISTER, |params, proxy, _| async move {
        let p: VmId = parse(&params)?;
        proxy.registry.settle(&p.id).await;
        proxy.registry.unregister(&p.id)?;
        Ok::<_, ErrorObjectOwned>(())
    });
    let _ = m.register_method(methods::VM_LIST, |_, proxy, _| -> Vec<VmInfo> {
        proxy.registry.list_info()
    });
    let _ = m.register_method(methods::VM_INFO, |params, proxy, _| {
        let p: VmId = parse(&params)?;
        Ok::<_, ErrorObjectOwned>(proxy.registry.info(&p.id)?)
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
