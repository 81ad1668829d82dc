//! `proxy.version` and `proxy.health`.

use std::sync::Arc;

use cc_proxy_api::methods;
use cc_proxy_api::types::{Health, VersionInfo};
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::RpcModule;

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
];

pub fn register(m: &mut RpcModule<Arc<Proxy>>) {
    let _ = m.register_method(methods::PROXY_VERSION, |_, _, _| {
        Ok::<_, ErrorObjectOwned>(VersionInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: cc_proxy_api::API_VERSION,
            features: FEATURES.iter().map(|s| s.to_string()).collect(),
        })
    });
    let _ = m.register_method(methods::PROXY_HEALTH, |_, proxy, _| {
        let (vms, vms_lost, vms_recovering) = proxy.registry.counts();
        Ok::<_, ErrorObjectOwned>(Health {
            status: "ok".into(),
            uptime_secs: proxy.started.elapsed().as_secs(),
            vms,
            vms_lost,
            vms_recovering,
        })
    });
}
