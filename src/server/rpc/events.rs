//! `events.subscribe {vm?}` (WebSocket): VM registered/unregistered/lost and process exits, as they happen.
//!
//! A subscriber gets the events of the VMs it may see: all of them when privileged, its own otherwise
//! (`server/authz.rs`); naming another owner's VM is refused with `1018`.

use std::sync::Arc;

use cc_proxy_api::methods;
use cc_proxy_api::types::EventsParams;
use jsonrpsee::RpcModule;
use tokio::sync::broadcast::error::RecvError;

use super::{check_vm, peer};
use crate::server::Proxy;
use crate::vm::VmEvent;

pub fn register(m: &mut RpcModule<Arc<Proxy>>) {
    let _ = m.register_subscription(
        methods::EVENTS_SUBSCRIBE,
        methods::EVENTS_NOTIFICATION,
        methods::EVENTS_UNSUBSCRIBE,
        |params, pending, proxy, ext| async move {
            let peer = peer(&ext);
            let filter: EventsParams = match params.parse::<Option<EventsParams>>() {
                Ok(f) => f.unwrap_or_default(),
                Err(e) => {
                    pending.reject(e).await;
                    return;
                }
            };
            if let Some(vm) = &filter.vm {
                if let Err(e) = check_vm(&proxy, &peer, vm) {
                    pending.reject(e).await;
                    return;
                }
            }
            let mut rx = proxy.registry.events().subscribe();
            let Ok(sink) = pending.accept().await else {
                return;
            };
            loop {
                let event = tokio::select! {
                    _ = sink.closed() => return,
                    e = rx.recv() => e,
                };
                match event {
                    Ok(VmEvent { owner, event }) => {
                        if !peer.sees(owner)
                            || filter.vm.as_deref().is_some_and(|vm| vm != event.vm())
                        {
                            continue;
                        }
                        let Ok(msg) = serde_json::value::to_raw_value(&event) else {
                            continue;
                        };
                        if sink.send(msg).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "events subscriber too slow; events skipped");
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        },
    );
}
