//! The on-demand tap: live events for operators (`tap.observe`, `cc-proxy tap`).
//!
//! Emitting costs one atomic load while nobody taps: events are built only when a tap is open. Each tap
//! reads from a bounded broadcast channel; a tap that falls behind loses the oldest events (counted in
//! `cc_proxy_tap_dropped_events_total`) and never slows the data path.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use serde::Serialize;
use tokio::sync::broadcast;

/// Events buffered for taps before the slowest one starts losing events.
pub const TAP_BUFFER: usize = 4096;

/// One observed event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TapEvent {
    /// An agent command finished (result: ok, error, timeout, lost, failed).
    AgentCommand {
        vm: String,
        command: String,
        result: String,
        latency_us: u64,
    },
    /// A process was started with a stream.
    ProcessStarted {
        vm: String,
        token: String,
        process: String,
    },
    /// A process exited.
    ProcessExited {
        vm: String,
        token: String,
        status: i32,
    },
    /// A shim attached to a stream.
    StreamAttached { vm: String, token: String },
    /// A shim left a stream (kind: detach, close, drop, done).
    StreamDetached {
        vm: String,
        token: String,
        kind: String,
    },
    /// A VM changed state (registered, ready, lost, unregistered).
    VmState {
        vm: String,
        state: String,
        reason: Option<String>,
    },
}

impl TapEvent {
    pub fn vm(&self) -> &str {
        match self {
            TapEvent::AgentCommand { vm, .. }
            | TapEvent::ProcessStarted { vm, .. }
            | TapEvent::ProcessExited { vm, .. }
            | TapEvent::StreamAttached { vm, .. }
            | TapEvent::StreamDetached { vm, .. }
            | TapEvent::VmState { vm, .. } => vm,
        }
    }

    /// The event's name as serialized (`agent_command`, ...), for filters.
    pub fn name(&self) -> &'static str {
        match self {
            TapEvent::AgentCommand { .. } => "agent_command",
            TapEvent::ProcessStarted { .. } => "process_started",
            TapEvent::ProcessExited { .. } => "process_exited",
            TapEvent::StreamAttached { .. } => "stream_attached",
            TapEvent::StreamDetached { .. } => "stream_detached",
            TapEvent::VmState { .. } => "vm_state",
        }
    }
}

/// The process-wide tap.
pub struct Tap {
    taps: AtomicUsize,
    tx: broadcast::Sender<Arc<TapEvent>>,
}

pub static TAP: LazyLock<Tap> = LazyLock::new(|| Tap {
    taps: AtomicUsize::new(0),
    tx: broadcast::channel(TAP_BUFFER).0,
});

/// True while at least one tap is open.
#[inline]
pub fn enabled() -> bool {
    TAP.taps.load(Ordering::Relaxed) > 0
}

/// Publish an event, building it only when someone taps.
#[inline]
pub fn emit(make: impl FnOnce() -> TapEvent) {
    if enabled() {
        let _ = TAP.tx.send(Arc::new(make()));
    }
}

/// An open tap; closing it (drop) makes emitting free again once no tap is left.
pub struct TapSubscription {
    pub rx: broadcast::Receiver<Arc<TapEvent>>,
}

pub fn subscribe() -> TapSubscription {
    TAP.taps.fetch_add(1, Ordering::Relaxed);
    TapSubscription {
        rx: TAP.tx.subscribe(),
    }
}

impl Drop for TapSubscription {
    fn drop(&mut self) {
        TAP.taps.fetch_sub(1, Ordering::Relaxed);
    }
}
