//! `stream.allocate`, `stream.signal`, `stream.resize`, `stream.close`: adapters over [`crate::vm::process`].

use std::sync::Arc;

use cc_proxy_api::methods;
use cc_proxy_api::types::{ResizeParams, SignalParams, StreamAllocation, TokenParam, VmId};
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::RpcModule;

use super::{parse, peer, settled_vm};
use crate::admin::metrics::DetachKind;
use crate::error::ProxyError;
use crate::server::authz::{self, Front};
use crate::server::{Peer, Proxy};
use crate::stream::{Stream, Token};
use crate::vm::{process, Vm};

pub fn register(m: &mut RpcModule<Arc<Proxy>>) {
    let _ = m.register_async_method(methods::STREAM_ALLOCATE, |params, proxy, ext| async move {
        let p: VmId = parse(&params)?;
        let peer = peer(&ext);
        let vm = settled_vm(&proxy, &peer, &p.id).await?;
        let s = vm.allocate_stream(peer.uid)?;
        Ok::<_, ErrorObjectOwned>(StreamAllocation {
            token: s.token.as_str().into(),
            stdio: s.stdio,
            stderr: s.stderr,
        })
    });
    let _ = m.register_async_method(methods::STREAM_SIGNAL, |params, proxy, ext| async move {
        let p: SignalParams = parse(&params)?;
        let (vm, stream) = find(&proxy, &peer(&ext), &p.token).await?;
        process::signal(&vm, &stream, p.signal).await?;
        Ok::<_, ErrorObjectOwned>(())
    });
    let _ = m.register_async_method(methods::STREAM_RESIZE, |params, proxy, ext| async move {
        let p: ResizeParams = parse(&params)?;
        let (vm, stream) = find(&proxy, &peer(&ext), &p.token).await?;
        process::resize(&vm, &stream, p.rows, p.cols).await?;
        Ok::<_, ErrorObjectOwned>(())
    });
    let _ = m.register_async_method(methods::STREAM_CLOSE, |params, proxy, ext| async move {
        let p: TokenParam = parse(&params)?;
        let (vm, stream) = find(&proxy, &peer(&ext), &p.token).await?;
        vm.free_stream(&stream.token);
        vm.shim_detached(&stream.token, DetachKind::Close);
        Ok::<_, ErrorObjectOwned>(())
    });
}

/// The VM and stream of a token (after its VM's recovery, when it is being recovered), if `peer` may use
/// the VM.
async fn find(
    proxy: &Proxy,
    peer: &Peer,
    token: &str,
) -> Result<(Arc<Vm>, Arc<Stream>), ProxyError> {
    let token = Token::parse(token).ok_or(ProxyError::TokenNotFound)?;
    let (vm, stream) = proxy
        .registry
        .find_token_settled(&token)
        .await
        .ok_or(ProxyError::TokenNotFound)?;
    authz::check_vm(peer, &vm.id, vm.owner, Front::JsonRpc)?;
    Ok((vm, stream))
}
