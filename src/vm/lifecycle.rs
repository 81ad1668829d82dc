//! A VM's lifecycle: one state enum, the typed reasons a VM is lost, and [`Vm::transition`], the one place a
//! state change happens.
//!
//! ```text
//!   Connecting ──▶ Ready ──▶ Lost(reason) ──▶ Unregistered
//!        │           │            ├─────────▶ Replaced (a new registration of its id took its place)
//!        └──▶ Lost   │            └─────────▶ Stopping
//!                    ├──────────────────────▶ Unregistered
//!                    └──────────────────────▶ Stopping (the daemon exits; streams are kept for its successor)
//! ```
//!
//! A transition updates, together and in this order: the state (under its lock, so the `vms{state}` gauge
//! counts every VM in exactly one state), the VM's `ended` token that wakes its tasks, the VM's streams, the
//! tap and the event stream. Anything not listed above is refused and reported as `false`.

use std::time::Duration;

use cc_proxy_api::types::{Event, VmStateName};

use super::{lock, Vm};
use crate::admin::metrics::METRICS;
use crate::admin::tap::{self, TapEvent};
use crate::error::ProxyError;

/// Where a VM is in its life.
#[derive(Debug, Clone)]
pub enum VmState {
    /// Built, its tasks not yet published (registration or recovery in progress).
    Connecting,
    /// The agent answered the handshake; the VM's tasks own its channels.
    Ready,
    /// A channel failed, or the VM could not be reconnected after a restart. Listed until unregistered.
    Lost(LostReason),
    /// Unregistered: its tasks stopped, its streams ended and its tokens freed.
    Unregistered,
    /// Lost, then replaced by a new registration of its id: its streams ended and its tokens freed.
    Replaced,
    /// The daemon is stopping: tasks stopped, streams and tokens kept for the next daemon.
    Stopping,
}

impl VmState {
    /// The name clients see; `None` for states no client can observe in a listing.
    pub fn public_name(&self) -> Option<VmStateName> {
        match self {
            VmState::Ready => Some(VmStateName::Ready),
            VmState::Lost(_) => Some(VmStateName::Lost),
            VmState::Connecting | VmState::Unregistered | VmState::Replaced | VmState::Stopping => {
                None
            }
        }
    }
}

/// Why a VM was lost. The text is what `vm.info` shows as `lost_reason` and the `vm_lost` event carries.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LostReason {
    #[error("the agent closed the control channel")]
    ControlClosed,
    #[error("malformed control frame from the agent: {0}")]
    ControlMalformed(String),
    #[error("control channel write failed: {0}")]
    ControlWrite(String),
    #[error("the agent stopped reading its control channel (a command write timed out)")]
    ControlStalled,
    #[error("the agent sent a reply (code {0}) with no command outstanding")]
    UnsolicitedReply(u32),
    #[error("the agent did not answer a keepalive PING within {0:?}")]
    KeepaliveMissed(Duration),
    #[error("the agent did not answer {command} within {grace:?} of its deadline")]
    Hung { command: String, grace: Duration },
    #[error("the agent closed the I/O channel")]
    IoClosed,
    #[error("malformed I/O frame from the agent: {0}")]
    IoMalformed(String),
    #[error("I/O channel write failed: {0}")]
    IoWrite(String),
    #[error("recovery after restart failed: {0}")]
    NotRecovered(Box<ProxyError>),
}

impl Vm {
    /// The current state.
    pub fn state(&self) -> VmState {
        lock(&self.state).clone()
    }

    /// A token fired when the VM leaves `Ready` (lost, unregistered, the daemon stopping): its mesh listeners
    /// stop on it.
    pub fn ended_token(&self) -> tokio_util::sync::CancellationToken {
        self.ended.clone()
    }

    /// True once the VM left `Ready` for good (lost, unregistered, or the daemon stopping).
    pub fn has_ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    /// Move to `to` if the lifecycle allows it from the current state; returns whether it did. The gauge,
    /// the tasks' wake-up, the streams, the tap and the event all follow from here.
    pub fn transition(&self, to: VmState) -> bool {
        let from = {
            let mut st = lock(&self.state);
            let allowed = matches!(
                (&*st, &to),
                (VmState::Connecting, VmState::Ready | VmState::Lost(_))
                    | (VmState::Ready, VmState::Lost(_))
                    | (VmState::Lost(_), VmState::Replaced)
                    | (
                        VmState::Ready | VmState::Lost(_),
                        VmState::Unregistered | VmState::Stopping
                    )
            );
            if !allowed {
                return false;
            }
            let from = std::mem::replace(&mut *st, to.clone());
            // Under the state lock: an unregister racing with a loss counts the VM in exactly one state.
            if let Some(name) = from.public_name() {
                METRICS.vms_in(name).dec();
            }
            if let Some(name) = to.public_name() {
                METRICS.vms_in(name).inc();
            }
            from
        };
        if !matches!(to, VmState::Ready) {
            self.ended.cancel();
        }
        match to {
            VmState::Ready => {
                self.tap(|| TapEvent::VmState {
                    vm: self.id.clone(),
                    state: tap::VmStateKind::Ready,
                    reason: None,
                });
                if !self.recovered {
                    self.publish_event(Event::VmRegistered {
                        vm: self.id.clone(),
                    });
                }
            }
            VmState::Lost(reason) => {
                let reason = reason.to_string();
                if matches!(from, VmState::Ready) {
                    tracing::warn!(vm = %self.id, reason = %reason, "VM lost");
                    self.metrics.lost();
                }
                for s in self.all_streams() {
                    s.fail(&format!("VM {} lost: {reason}", self.id));
                }
                self.tap(|| TapEvent::VmState {
                    vm: self.id.clone(),
                    state: tap::VmStateKind::Lost,
                    reason: Some(reason.clone()),
                });
                self.publish_event(Event::VmLost {
                    vm: self.id.clone(),
                    reason,
                });
            }
            VmState::Unregistered => {
                self.end_streams(&format!("VM {} was unregistered", self.id));
                tracing::info!(vm = %self.id, "VM unregistered");
                self.tap(|| TapEvent::VmState {
                    vm: self.id.clone(),
                    state: tap::VmStateKind::Unregistered,
                    reason: None,
                });
                self.publish_event(Event::VmUnregistered {
                    vm: self.id.clone(),
                });
            }
            VmState::Replaced => {
                // Its metric series are shared with the new VM of the same id, so they stay.
                self.end_streams(&format!(
                    "VM {} was lost and has been replaced by a new registration",
                    self.id
                ));
                let reason = match from {
                    VmState::Lost(r) => r.to_string(),
                    _ => String::new(),
                };
                tracing::warn!(vm = %self.id, lost_reason = %reason,
                    "a lost VM was replaced by a new registration of its id; its tokens are ended");
            }
            // Streams and tokens stay for the next daemon; nothing is published.
            VmState::Stopping | VmState::Connecting => {}
        }
        true
    }

    /// Why a call cannot be served any more, from the state the VM ended in.
    pub fn gone_error(&self) -> ProxyError {
        match self.state() {
            VmState::Lost(reason) => ProxyError::Lost {
                vm: self.id.clone(),
                reason,
            },
            VmState::Stopping => ProxyError::ShuttingDown,
            VmState::Connecting | VmState::Ready | VmState::Unregistered | VmState::Replaced => {
                ProxyError::Unregistered(self.id.clone())
            }
        }
    }
}
