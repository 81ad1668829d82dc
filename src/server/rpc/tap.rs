//! `tap.observe {vm?, filter?, limit?}` (WebSocket): live [`TapEvent`]s as notifications `tap.event`.
//!
//! `filter` is a list of event names (`agent_command`, `process_started`, `process_exited`,
//! `stream_attached`, `stream_detached`, `vm_state`); `limit` closes the tap after that many events.

use std::sync::Arc;

use jsonrpsee::RpcModule;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::admin::metrics::METRICS;
use crate::admin::tap::{self, TapEvent};
use crate::server::Proxy;

#[derive(Deserialize, Default)]
struct TapParams {
    #[serde(default)]
    vm: Option<String>,
    #[serde(default)]
    filter: Option<Vec<String>>,
    #[serde(default)]
    limit: Option<u64>,
}

impl TapParams {
    fn wants(&self, e: &TapEvent) -> bool {
        self.vm.as_deref().is_none_or(|vm| vm == e.vm())
            && self
                .filter
                .as_ref()
                .is_none_or(|f| f.iter().any(|n| n == e.name()))
    }
}

pub fn register(m: &mut RpcModule<Arc<Proxy>>) {
    let _ = m.register_subscription(
        "tap.observe",
        "tap.event",
        "tap.unobserve",
        |params, pending, _, _| async move {
            let p: TapParams = match params.parse() {
                Ok(p) => p,
                Err(e) => {
                    pending.reject(e).await;
                    return;
                }
            };
            let mut tap = tap::subscribe();
            let Ok(sink) = pending.accept().await else {
                return;
            };
            let mut sent = 0u64;
            loop {
                let event = tokio::select! {
                    _ = sink.closed() => return,
                    e = tap.rx.recv() => e,
                };
                match event {
                    Ok(e) if p.wants(&e) => {
                        let Ok(msg) = serde_json::value::to_raw_value(&*e) else {
                            continue;
                        };
                        if sink.send(msg).await.is_err() {
                            return;
                        }
                        sent += 1;
                        if p.limit.is_some_and(|l| sent >= l) {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => {
                        METRICS.tap_dropped.inc_by(n);
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        },
    );
}
