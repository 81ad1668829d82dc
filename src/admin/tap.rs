//! The on-demand tap: live events for operators (`tap.observe`, `cc-proxy tap`).
//!
//! Emitting costs one atomic load while nobody taps: events are built only when a tap is open. Events go
//! into one bounded broadcast ring ([`TAP_BUFFER`]) stamped with the time they happened; each tap reads the
//! ring from its own task, so the data path never waits for a tapper. A tap that falls behind the ring, is
//! over its rate, or whose client does not read, loses events: they are counted in
//! `cc_proxy_tap_dropped_events_total` and reported to that tapper as a `dropped` event
//! (see `server/rpc/tap.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

pub use crate::admin::metrics::{CommandOutcome, DetachKind};

/// Events buffered for taps before the slowest one starts losing events. A tap task drains the ring as
/// fast as it can filter; 4096 events (about 1 MiB) absorb a burst of a few milliseconds of busy host.
pub const TAP_BUFFER: usize = 4096;
/// Taps open at once; one more is refused with a limit error.
pub const MAX_TAPS: usize = 32;

/// One observed event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TapEvent {
    /// An agent command finished.
    AgentCommand {
        vm: String,
        command: String,
        result: CommandOutcome,
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
    /// A shim left a stream.
    StreamDetached {
        vm: String,
        token: String,
        kind: DetachKind,
    },
    /// A VM changed state.
    VmState {
        vm: String,
        state: VmStateKind,
        reason: Option<String>,
    },
}

/// The states a `vm_state` event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStateKind {
    Ready,
    Lost,
    Unregistered,
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

    /// Every event name, as serialized and as `cc-proxy tap --filter` takes them.
    pub const NAMES: [&'static str; 6] = [
        "agent_command",
        "process_started",
        "process_exited",
        "stream_attached",
        "stream_detached",
        "vm_state",
    ];

    /// The event's name as serialized (one of [`TapEvent::NAMES`]), for filters.
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

/// One event with the time it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Observed {
    /// The daemon's event number: one more for every event emitted, assigned in the order the events enter
    /// the ring, so a tap sees them, and each VM's events, in increasing `seq` (gaps are other VMs' events
    /// or filtered ones).
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// The uid owning the event's VM: a tap shows an owner-only client only its own VMs' events.
    #[serde(skip)]
    pub owner: u32,
    #[serde(flatten)]
    pub event: TapEvent,
}

/// The process-wide tap.
pub struct Tap {
    /// Open taps; zero makes [`emit`] a single load.
    taps: AtomicUsize,
    /// The next `seq`. Numbering and sending happen under this lock (never held across an await), so the
    /// ring holds events in `seq` order even when several tasks emit at once.
    next_seq: std::sync::Mutex<u64>,
    tx: broadcast::Sender<Arc<Observed>>,
}

pub static TAP: LazyLock<Tap> = LazyLock::new(|| Tap {
    taps: AtomicUsize::new(0),
    next_seq: std::sync::Mutex::new(1),
    tx: broadcast::channel(TAP_BUFFER).0,
});

/// True while at least one tap is open.
#[inline]
pub fn enabled() -> bool {
    TAP.taps.load(Ordering::Relaxed) > 0
}

/// Publish an event about a VM owned by `owner`, building it only when someone taps.
#[inline]
pub fn emit(owner: u32, make: impl FnOnce() -> TapEvent) {
    if enabled() {
        let event = make();
        let mut next = TAP.next_seq.lock().unwrap_or_else(|p| p.into_inner());
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let _ = TAP.tx.send(Arc::new(Observed {
            seq: *next,
            ts_ms,
            owner,
            event,
        }));
        *next += 1;
    }
}

/// An open tap; closing it (drop) makes emitting free again once no tap is left.
pub struct TapSubscription {
    pub rx: broadcast::Receiver<Arc<Observed>>,
}

/// Why a tap could not be opened.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TapError {
    #[error("{MAX_TAPS} taps are open already")]
    TooManyTaps,
}

/// Open a tap, unless [`MAX_TAPS`] are open already.
pub fn subscribe() -> Result<TapSubscription, TapError> {
    let taken = TAP
        .taps
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_TAPS).then_some(n + 1)
        });
    if taken.is_err() {
        return Err(TapError::TooManyTaps);
    }
    Ok(TapSubscription {
        rx: TAP.tx.subscribe(),
    })
}

impl Drop for TapSubscription {
    fn drop(&mut self) {
        TAP.taps.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_flow_only_while_tapped_serialize_flat_and_taps_are_bounded() {
        let built = std::sync::atomic::AtomicBool::new(false);
        emit(0, || {
            built.store(true, Ordering::Relaxed);
            TapEvent::VmState {
                vm: "a".into(),
                state: VmStateKind::Ready,
                reason: None,
            }
        });
        assert!(
            !built.load(Ordering::Relaxed),
            "built an event with no tap open"
        );

        let Ok(mut tap) = subscribe() else {
            panic!("cannot open a tap");
        };
        emit(0, || TapEvent::ProcessExited {
            vm: "vm1".into(),
            token: "t".into(),
            status: 3,
        });
        let Ok(got) = tap.rx.try_recv() else {
            panic!("no event")
        };
        let v = serde_json::to_value(&*got).unwrap_or_default();
        assert_eq!(v["event"], "process_exited");
        assert_eq!(v["vm"], "vm1");
        assert_eq!(v["status"], 3);
        assert!(v["ts_ms"].as_u64().unwrap_or(0) > 0);
        let first = v["seq"].as_u64().unwrap_or(0);
        emit(0, || TapEvent::StreamAttached {
            vm: "vm1".into(),
            token: "t".into(),
        });
        let Ok(next) = tap.rx.try_recv() else {
            panic!("no second event")
        };
        assert_eq!(next.seq, first + 1);
        drop(tap);
        assert!(!enabled());

        // The number of taps is bounded.
        let mut open = Vec::new();
        while let Ok(t) = subscribe() {
            open.push(t);
        }
        assert!(open.len() <= MAX_TAPS);
        assert_eq!(subscribe().err(), Some(TapError::TooManyTaps));
        open.pop();
        assert!(subscribe().is_ok());
        open.clear();
        assert!(!enabled());
    }
}
