//! `events.subscribe {vm?}` (WebSocket): VM registered/unregistered/lost and process exits, as they happen.

use std::sync::Arc;

use cc_proxy_api::methods;
use cc_proxy_api::types::EventsParams;
use jsonrpsee::RpcModule;
use tokio::sync::broadcast::error::RecvError;

use crate::server::Proxy;

pub fn register(m: &mut RpcModule<Arc<Proxy>>) {
    let _ = m.register_subscription(
        methods::EVENTS_SUBSCRIBE,
        methods::EVENTS_NOTIFICATION,
        methods::EVENTS_UNSUBSCRIBE,
        |params, pending, proxy, _| async move {
            let filter: EventsParams = match params.parse::<Option<EventsParams>>() {
                Ok(f) => f.unwrap_or_default(),
                Err(e) => {
                    pending.reject(e).await;
                    return;
                }
            };
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
                    Ok(event) => {
                        if filter.vm.as_deref().is_some_and(|vm| vm != event.vm()) {
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
