//! The state writer: keeps the state directory ([`super::state`]) in step with the registry.
//!
//! Events: a registration asks for an immediate write ([`StateWriter::wake`]); any other change marks its VM
//! dirty and is written within [`FLUSH_EVERY`]; an unregistration deletes the VM's file; the daemon's exit
//! writes every VM one last time with its queued output ([`StateWriter::save_final`]), after which the
//! periodic writes stop. File writes run on a blocking thread, never on the data plane's workers, and one lock
//! orders them so a deleted file is never written again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use super::state::{StateDir, VmRecord};
use super::{lock, Registry, Vm, VmState};

/// How often changed VM state is written to the state directory.
const FLUSH_EVERY: Duration = Duration::from_millis(250);

pub struct StateWriter {
    dir: StateDir,
    /// Serialises file writes between the periodic writer, unregistration and shutdown.
    saving: Mutex<()>,
    /// Set by the final save: later periodic writes must not overwrite it.
    closed: AtomicBool,
    /// Wakes the periodic writer at once (a registration was just made).
    wake: Notify,
}

impl StateWriter {
    pub fn new(dir: StateDir) -> StateWriter {
        StateWriter {
            dir,
            saving: Mutex::new(()),
            closed: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// The records saved by the previous daemon.
    pub fn load(&self) -> Vec<VmRecord> {
        self.dir.load_all()
    }

    /// Ask for a write now rather than at the next tick.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Write every changed VM of `registry` until the registry is gone or the final save was made.
    pub fn spawn(self: &Arc<Self>, registry: Weak<Registry>) {
        let writer = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = writer.wake.notified() => {}
                }
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                if writer.closed.load(Ordering::Acquire) {
                    return;
                }
                let vms = registry.list();
                drop(registry);
                let w = writer.clone();
                let _ = tokio::task::spawn_blocking(move || w.flush(&vms)).await;
            }
        });
    }

    /// Write the record of every VM in `vms` that changed since its last write.
    fn flush(&self, vms: &[Arc<Vm>]) {
        let _saving = lock(&self.saving);
        if self.closed.load(Ordering::Acquire) {
            return; // the final save is written; nothing may replace it
        }
        for vm in vms {
            if matches!(
                vm.state(),
                VmState::Unregistered | VmState::Replaced | VmState::Stopping
            ) {
                continue; // unregistered meanwhile: its file must stay deleted
            }
            if vm.take_dirty() {
                if let Err(e) = self.dir.save(&vm.record(false)) {
                    tracing::warn!(vm = %vm.id, error = %e, "cannot write VM state");
                }
            }
        }
    }

    /// Delete a VM's record (unregistration). A write in progress finishes first; later ones skip the VM.
    pub fn remove(&self, id: &str) {
        let _saving = lock(&self.saving);
        self.dir.remove(id);
    }

    /// The daemon exits: write every VM with the output still queued for its shims, and stop writing.
    pub fn save_final(&self, vms: &[Arc<Vm>]) {
        let _saving = lock(&self.saving);
        self.closed.store(true, Ordering::Release);
        for vm in vms {
            if let Err(e) = self.dir.save(&vm.record(true)) {
                tracing::warn!(vm = %vm.id, error = %e, "cannot write VM state at shutdown");
            }
        }
    }
}
