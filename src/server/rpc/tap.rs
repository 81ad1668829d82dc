//! `tap.observe {vm?, filter?, limit?, rate?}` (WebSocket): live tap events as `tap.event` notifications.
//!
//! A tap shows the events of the VMs its client may see: all of them when privileged, its own otherwise
//! (`server/authz.rs`); naming another owner's VM is refused with `1018`. `vm` keeps one VM's events; `filter` is a list of event names (`agent_command`, `process_started`,
//! `process_exited`, `stream_attached`, `stream_detached`, `stream_failed`, `vm_state`, `mesh_inbound_request`, `mesh_outbound_request`); `limit` ends the tap after that many
//! events; `rate` lowers the per-tap bound on events per second (default and maximum [`DEFAULT_RATE`]).
//!
//! Each notification is one JSON object: `seq`, `ts_ms`, `event` and the event's fields. Events this tapper lost
//! (over its rate, its client not reading, or behind the shared ring) are counted and, as soon as there is
//! room, reported in order as `{"ts_ms": .., "event": "dropped", "count": N}`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cc_proxy_api::types::TapParams;
use jsonrpsee::core::server::TrySendError;
use jsonrpsee::{PendingSubscriptionSink, RpcModule, SubscriptionSink};
use serde_json::value::RawValue;
use tokio::sync::broadcast::error::RecvError;

use super::{check_vm, peer};
use crate::admin::metrics::METRICS;
use crate::admin::tap::{self, Observed, TapEvent};
use crate::error::ProxyError;
use crate::server::{Peer, Proxy};

/// Events per second one tap receives at most (a terminal cannot show more); also the burst allowance.
pub const DEFAULT_RATE: u32 = 1000;
/// Notifications of one tap waiting in its connection's send buffer; past this the tapper's client is too
/// slow and events are dropped instead of queued.
pub const TAP_QUEUE: usize = 256;
/// How often a pending `dropped` report is retried when no event comes to carry it.
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// Refuses params whose values are out of range (the shape is `cc_proxy_api::types::TapParams`).
fn check(p: &TapParams) -> Result<(), ProxyError> {
    if let Some(f) = &p.filter {
        if let Some(bad) = f.iter().find(|n| !TapEvent::NAMES.contains(&n.as_str())) {
            return Err(ProxyError::invalid(
                "filter",
                format!(
                    "unknown event {bad:?}; known: {}",
                    TapEvent::NAMES.join(", ")
                ),
            ));
        }
    }
    if p.rate == Some(0) || p.rate.is_some_and(|r| r > DEFAULT_RATE) {
        return Err(ProxyError::invalid(
            "rate",
            format!("events per second, 1 to {DEFAULT_RATE}"),
        ));
    }
    if p.limit == Some(0) {
        return Err(ProxyError::invalid("limit", "at least 1"));
    }
    Ok(())
}

/// Whether the tap opened with `p` by `peer` receives `e`.
fn wants(peer: &Peer, p: &TapParams, e: &Observed) -> bool {
    let e_vm = e.event.vm();
    peer.sees(e.owner)
        && p.vm.as_deref().is_none_or(|vm| vm == e_vm)
        && p.filter
            .as_ref()
            .is_none_or(|f| f.iter().any(|n| n == e.event.name()))
}

/// A token bucket: `rate` tokens a second, holding at most one second's worth.
struct RateBound {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateBound {
    fn new(rate: u32) -> RateBound {
        RateBound {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What happened to one notification handed to the sink.
enum Sent {
    Yes,
    NoRoom,
    Closed,
}

/// One tapper's delivery state: its sink, its rate bound and the events it lost but was not told about.
struct Delivery {
    sink: SubscriptionSink,
    bound: RateBound,
    unreported: u64,
    sent: u64,
}

impl Delivery {
    /// Hand `msg` to the connection unless this tap already has [`TAP_QUEUE`] notifications waiting there.
    fn offer(&mut self, msg: Box<RawValue>) -> Sent {
        let waiting = self
            .sink
            .max_capacity()
            .saturating_sub(self.sink.capacity());
        if waiting >= TAP_QUEUE {
            return Sent::NoRoom;
        }
        match self.sink.try_send(msg) {
            Ok(()) => Sent::Yes,
            Err(TrySendError::Full(_)) => Sent::NoRoom,
            Err(TrySendError::Closed(_)) => Sent::Closed,
        }
    }

    fn lose(&mut self, n: u64) {
        self.unreported += n;
        METRICS.tap_dropped.inc_by(n);
    }

    /// Tell the tapper how many events it lost, if any and if there is room; false once the client left.
    fn report(&mut self) -> bool {
        if self.unreported == 0 {
            return true;
        }
        let Ok(msg) = serde_json::value::to_raw_value(&serde_json::json!({
            "ts_ms": now_ms(),
            "event": "dropped",
            "count": self.unreported,
        })) else {
            return true;
        };
        match self.offer(msg) {
            Sent::Yes => {
                self.unreported = 0;
                true
            }
            Sent::NoRoom => true,
            Sent::Closed => false,
        }
    }

    /// Deliver one wanted event; false once the client left.
    fn deliver(&mut self, e: &Observed) -> bool {
        if !self.bound.take(Instant::now()) {
            self.lose(1);
            return true;
        }
        if !self.report() {
            return false;
        }
        let Ok(msg) = serde_json::value::to_raw_value(e) else {
            return true;
        };
        match self.offer(msg) {
            Sent::Yes => {
                self.sent += 1;
                true
            }
            Sent::NoRoom => {
                self.lose(1);
                true
            }
            Sent::Closed => false,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn observe(peer: Peer, params: TapParams, pending: PendingSubscriptionSink) {
    if let Err(e) = check(&params) {
        pending.reject(e).await;
        return;
    }
    let mut tap = match tap::subscribe() {
        Ok(t) => t,
        Err(e) => {
            pending.reject(ProxyError::Limit(e.into())).await;
            return;
        }
    };
    let Ok(sink) = pending.accept().await else {
        return;
    };
    tracing::info!(vm = ?params.vm, filter = ?params.filter, "tap opened");
    let mut d = Delivery {
        sink,
        bound: RateBound::new(params.rate.unwrap_or(DEFAULT_RATE)),
        unreported: 0,
        sent: 0,
    };
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            _ = d.sink.closed() => break,
            _ = tick.tick() => {
                if !d.report() {
                    break;
                }
                continue;
            }
            e = tap.rx.recv() => e,
        };
        match event {
            Ok(e) if wants(&peer, &params, &e) => {
                if !d.deliver(&e) {
                    break;
                }
                if params.limit.is_some_and(|l| d.sent >= l) {
                    break;
                }
            }
            Ok(_) => {}
            // The ring overwrote events this tap had not read; they may or may not have been wanted, so the
            // report counts them all.
            Err(RecvError::Lagged(n)) => d.lose(n),
            Err(RecvError::Closed) => break,
        }
    }
    tracing::info!(sent = d.sent, "tap closed");
}

pub fn register(m: &mut RpcModule<Arc<Proxy>>) {
    let registered = m.register_subscription(
        "tap.observe",
        "tap.event",
        "tap.unobserve",
        |params, pending, proxy, ext| async move {
            let peer = peer(&ext);
            let p: TapParams = if params.is_object() {
                match params.parse() {
                    Ok(p) => p,
                    Err(e) => {
                        pending.reject(e).await;
                        return;
                    }
                }
            } else if params.as_str().is_none_or(|s| s.trim().is_empty()) {
                TapParams::default()
            } else {
                pending
                    .reject(ProxyError::invalid(
                        "params",
                        "an object {vm?, filter?, limit?, rate?}",
                    ))
                    .await;
                return;
            };
            // A tap of a VM that does not exist would wait for events that never come: say so instead (a VM
            // being recovered exists).
            if let Some(vm) = &p.vm {
                let known = check_vm(&proxy, &peer, vm)
                    .and_then(|()| proxy.registry.info(vm).map_err(Into::into));
                if let Err(e) = known {
                    pending.reject(e).await;
                    return;
                }
            }
            observe(peer, p, pending).await;
        },
    );
    if let Err(e) = registered {
        tracing::error!(error = %e, "cannot register tap.observe");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_bound_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut b = RateBound::new(5);
        let burst = (0..20).filter(|_| b.take(start)).count();
        assert_eq!(burst, 5);
        let later = start + Duration::from_millis(1000);
        let next = (0..20).filter(|_| b.take(later)).count();
        assert_eq!(next, 5);
    }

    #[test]
    fn params_are_checked() {
        let bad: TapParams =
            serde_json::from_value(serde_json::json!({"filter": ["nope"]})).unwrap_or_default();
        assert!(check(&bad).is_err());
        let rate: TapParams =
            serde_json::from_value(serde_json::json!({"rate": 0})).unwrap_or_default();
        assert!(check(&rate).is_err());
        assert!(serde_json::from_value::<TapParams>(serde_json::json!({"vm": 1})).is_err());
        let ok: TapParams = serde_json::from_value(
            serde_json::json!({"vm": "a", "filter": ["agent_command"], "limit": 3, "rate": 10}),
        )
        .unwrap_or_default();
        assert!(check(&ok).is_ok());
    }
}
