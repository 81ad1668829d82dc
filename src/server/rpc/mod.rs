//! The JSON-RPC 2.0 methods, one file per family: `proxy.*`, `vm.*`, `agent.*`, `stream.*`, `events.*`.

pub mod agent;
pub mod errors;
pub mod events;
pub mod ids;
pub mod proxy;
pub mod stream;
pub mod tap;
pub mod vm;

use std::sync::Arc;

use jsonrpsee::types::{ErrorObjectOwned, Params};
use jsonrpsee::RpcModule;
use serde::de::DeserializeOwned;

use super::Proxy;

/// Every method, over the shared proxy state.
pub fn module(proxy: Arc<Proxy>) -> RpcModule<Arc<Proxy>> {
    let mut m = RpcModule::new(proxy);
    proxy::register(&mut m);
    vm::register(&mut m);
    agent::register(&mut m);
    stream::register(&mut m);
    events::register(&mut m);
    tap::register(&mut m);
    m
}

/// Parse params into `T`, answering -32602 with serde's explanation on failure (counted by [`errors`]).
pub fn parse<T: DeserializeOwned>(params: &Params<'_>) -> Result<T, ErrorObjectOwned> {
    params.parse::<T>()
}
