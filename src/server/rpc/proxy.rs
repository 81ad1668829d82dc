//! `proxy.version` and `proxy.health`.

use std::sync::Arc;

use cc_proxy_api::methods;
use cc_proxy_api::types::{Health, LogLevel, VersionInfo};
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::RpcModule;

use super::{parse, peer};
use crate::error::ProxyError;
use crate::server::authz::{self, Front};
use crate::server::Proxy;

/// Capabilities this build serves.
pub const FEATURES: &[&str] = &[
    "jsonrpc",
    "websocket",
    "streams",
    "events",
    "legacy-v2",
    "hvsock",
    "vsock",
    "metrics",
    "mesh",
];

pub fn register(m: &mut RpcModule<Arc<Proxy>>) {
    let _ = m.register_method(methods::PROXY_VERSION, |_, _, _| {
        Ok::<_, ErrorObjectOwned>(VersionInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: cc_proxy_api::API_VERSION,
            features: FEATURES.iter().map(|s| s.to_string()).collect(),
        })
    });
    // The counts are of the VMs the client may see: all for a privileged client, its own otherwise.
    let _ = m.register_method(methods::PROXY_HEALTH, |_, proxy, ext| {
        let peer = peer(ext);
        let (vms, vms_lost, vms_recovering) = proxy.registry.counts_of(|owner| peer.sees(owner));
        Ok::<_, ErrorObjectOwned>(Health {
            status: "ok".into(),
            uptime_secs: proxy.started.elapsed().as_secs(),
            vms,
            vms_lost,
            vms_recovering,
            ready: proxy.registry.readiness() == crate::vm::registry::Readiness::Ready,
        })
    });
    let _ = m.register_method(methods::PROXY_SET_LOG_LEVEL, |params, proxy, ext| {
        let peer = peer(ext);
        authz::check_privileged(&peer, methods::PROXY_SET_LOG_LEVEL, Front::JsonRpc)?;
        let p: LogLevel = parse(&params)?;
        proxy
            .log
            .set(p.level.trim())
            .map_err(|reason| ProxyError::invalid("level", reason))?;
        let level = proxy.log.current();
        tracing::warn!(level = %level, "log level changed through the socket");
        Ok::<_, ErrorObjectOwned>(LogLevel { level })
    });
}
