//! The registry of every VM on the host: registration (connect, READY, GETVERSION), lookup, unregistration,
//! and recovery from the state directory after a restart.
//!
//! Recovery: at startup, before the socket serves its first request, [`Registry::records_to_recover`] lists
//! every recorded VM as *recovering* (with its tokens in the token index). Each is then reconnected in the
//! background, bounded by `--recovery-timeout`, and published as ready or lost. Until then `vm.list` and
//! `vm.info` show it as `recovering`, and everything that needs the VM itself (calls, `vm.attach`, stream
//! attaches, `stream.*`, legacy commands, a registration or unregistration of its id) waits for the outcome
//! through [`Registry::settle`] and then proceeds, or fails with the VM's real state, never with "no VM
//! registered".

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cc_proxy_api::types::{Event, RegisterParams, VmInfo};
use cc_proxy_protocol::{ControlCodec, Dialect};
use tokio::sync::{broadcast, mpsc};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::state::{StateDir, VmRecord};
use super::{actor, handshake, io, StreamTable, Vm, VmConfig, VmState};
use crate::admin::metrics::{StateLabel, VmMetrics, METRICS};
use crate::error::ProxyError;
use crate::stream::{Stream, Token};
use crate::transport::Endpoint;

/// Default wait for the agent's READY.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on reconnecting one recorded VM after a restart (`--recovery-timeout`).
pub const DEFAULT_RECOVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long past a recovery's own deadline a waiting request gives the outcome to be published.
const SETTLE_GRACE: Duration = Duration::from_millis(500);
/// Most VMs one daemon serves.
pub const MAX_VMS: usize = 65_536;
/// How often changed VM state is written to the state directory.
const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// A VM loaded from the state directory whose agent is being reconnected.
struct Recovery {
    /// What the state directory holds of it (shown by `vm.info` meanwhile).
    record: VmRecord,
    /// The reconnection gives up at this instant; waiters wait at most [`SETTLE_GRACE`] longer.
    deadline: tokio::time::Instant,
    /// Cancelled once the VM is published (ready or lost).
    done: CancellationToken,
}

pub struct Registry {
    vms: RwLock<HashMap<String, Arc<Vm>>>,
    /// Recorded VMs still being reconnected after a restart; an id leaves it under the `vms` write lock when
    /// the VM is published.
    recovering: Mutex<HashMap<String, Arc<Recovery>>>,
    /// Token → VM id for every live token.
    tokens: Arc<super::TokenIndex>,
    /// Ids whose registration is in progress, so two clients cannot register one id twice.
    registering: Mutex<HashSet<String>>,
    state: Option<StateDir>,
    config: VmConfig,
    events: broadcast::Sender<Event>,
    /// Set once recovery at startup finished (the admin `/ready` waits for it).
    recovered: AtomicBool,
    shutting_down: AtomicBool,
    pub registrations: AtomicU64,
    /// Serialises state-file writes between the state writer, unregister and shutdown.
    save_lock: Mutex<()>,
    /// Wakes the state writer at once (a registration was just made).
    flush_now: Arc<tokio::sync::Notify>,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Check a VM id: 1-128 characters of `[A-Za-z0-9._-]`, not `.` or `..` (it names a state file).
pub fn validate_id(id: &str) -> Result<(), ProxyError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ProxyError::invalid(
            "id",
            "a VM id is 1 to 128 characters of A-Z a-z 0-9 . _ -",
        ))
    }
}

/// Parse a VM's control, I/O and optional console URIs.
fn parse_endpoints(
    control: &str,
    io: &str,
    console: Option<&str>,
) -> Result<(Endpoint, Endpoint, Option<Endpoint>), ProxyError> {
    let parse = |uri: &str| Endpoint::parse(uri).map_err(ProxyError::from_transport);
    Ok((parse(control)?, parse(io)?, console.map(parse).transpose()?))
}

impl Registry {
    pub fn new(
        state: Option<StateDir>,
        config: VmConfig,
        events: broadcast::Sender<Event>,
    ) -> Arc<Registry> {
        let reg = Arc::new(Registry {
            vms: RwLock::new(HashMap::new()),
            recovering: Mutex::new(HashMap::new()),
            tokens: Arc::new(Mutex::new(HashMap::new())),
            registering: Mutex::new(HashSet::new()),
            state,
            config,
            events,
            recovered: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            registrations: AtomicU64::new(0),
            flush_now: Arc::new(tokio::sync::Notify::new()),
            save_lock: Mutex::new(()),
        });
        if reg.state.is_some() {
            let weak = Arc::downgrade(&reg);
            let wake = reg.flush_now.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(FLUSH_EVERY);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = wake.notified() => {}
                    }
                    let Some(reg) = weak.upgrade() else { return };
                    // File writes block: keep them off the data plane's worker threads.
                    let _ = tokio::task::spawn_blocking(move || reg.flush()).await;
                }
            });
        }
        reg
    }

    pub fn events(&self) -> &broadcast::Sender<Event> {
        &self.events
    }

    pub fn is_recovered(&self) -> bool {
        self.recovered.load(Ordering::Acquire)
    }

    /// Write every changed VM's record.
    pub fn flush(&self) {
        let Some(state) = &self.state else { return };
        let _saving = lock(&self.save_lock);
        if self.shutting_down.load(Ordering::Acquire) {
            return; // shutdown writes the final records itself
        }
        let vms: Vec<Arc<Vm>> = read(&self.vms).values().cloned().collect();
        for vm in vms {
            if vm.stop.is_cancelled() {
                continue; // unregistered meanwhile: its file must stay deleted
            }
            if vm.dirty.swap(false, Ordering::AcqRel) {
                if let Err(e) = state.save(&vm.record(false)) {
                    tracing::warn!(vm = %vm.id, error = %e, "cannot write VM state");
                }
            }
        }
    }

    /// The VM as it is now; a VM still being recovered is [`ProxyError::Recovering`] (use [`Registry::settle`]
    /// first to wait for it).
    pub fn get(&self, id: &str) -> Result<Arc<Vm>, ProxyError> {
        let vms = read(&self.vms);
        if let Some(vm) = vms.get(id) {
            return Ok(vm.clone());
        }
        if lock(&self.recovering).contains_key(id) {
            return Err(ProxyError::Recovering(id.to_string()));
        }
        Err(ProxyError::VmNotFound(id.to_string()))
    }

    /// Wait while VM `id` is being recovered after a restart, at most until its recovery's deadline (plus a
    /// short grace for the outcome to be published). Returns at once for any other id.
    pub async fn settle(&self, id: &str) {
        let Some(recovery) = lock(&self.recovering).get(id).cloned() else {
            return;
        };
        let _ =
            tokio::time::timeout_at(recovery.deadline + SETTLE_GRACE, recovery.done.cancelled())
                .await;
    }

    /// [`Registry::get`] after [`Registry::settle`]: what every request that uses a VM calls.
    pub async fn get_settled(&self, id: &str) -> Result<Arc<Vm>, ProxyError> {
        self.settle(id).await;
        self.get(id)
    }

    /// Every VM as `vm.list` shows it (recovering ones included), by id.
    pub fn list_info(&self) -> Vec<VmInfo> {
        let vms = read(&self.vms);
        let mut out: Vec<VmInfo> = vms.values().map(|vm| vm.info()).collect();
        out.extend(
            lock(&self.recovering)
                .values()
                .filter(|r| !vms.contains_key(&r.record.id))
                .map(|r| recovering_info(&r.record)),
        );
        drop(vms);
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// One VM as `vm.info` shows it; a VM being recovered is shown as `recovering` without waiting.
    pub fn info(&self, id: &str) -> Result<VmInfo, ProxyError> {
        match self.get(id) {
            Ok(vm) => Ok(vm.info()),
            Err(ProxyError::Recovering(_)) => lock(&self.recovering)
                .get(id)
                .map(|r| recovering_info(&r.record))
                .ok_or_else(|| ProxyError::VmNotFound(id.to_string())),
            Err(e) => Err(e),
        }
    }

    /// (all VMs, lost VMs, VMs being recovered); the first count includes the other two.
    pub fn counts(&self) -> (usize, usize, usize) {
        let vms = read(&self.vms);
        let lost = vms.values().filter(|v| v.is_lost()).count();
        let recovering = lock(&self.recovering).len();
        (vms.len() + recovering, lost, recovering)
    }

    /// Find the VM and stream of a token.
    pub fn find_token(&self, token: &Token) -> Option<(Arc<Vm>, Arc<Stream>)> {
        let id = lock(&self.tokens).get(token).cloned()?;
        let vm = read(&self.vms).get(&id).cloned()?;
        let stream = vm.stream_by_token(token)?;
        Some((vm, stream))
    }

    /// [`Registry::find_token`] after waiting for the recovery of the token's VM, so a shim re-attaching
    /// while the daemon reconnects its VM is not told its valid token is unknown.
    pub async fn find_token_settled(&self, token: &Token) -> Option<(Arc<Vm>, Arc<Stream>)> {
        let id = lock(&self.tokens).get(token).cloned()?;
        self.settle(&id).await;
        self.find_token(token)
    }

    /// Register a VM: connect its channels, wait for READY, pick the dialect, start its tasks.
    pub async fn register(self: &Arc<Self>, params: RegisterParams) -> Result<Arc<Vm>, ProxyError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(ProxyError::ShuttingDown);
        }
        validate_id(&params.id)?;
        // A recorded VM of this id is being reconnected: its outcome decides what this registration meets.
        self.settle(&params.id).await;
        let (control, io, console) =
            parse_endpoints(&params.control, &params.io, params.console.as_deref())?;
        let timeout = Duration::from_millis(
            params
                .timeout_ms
                .unwrap_or(DEFAULT_READY_TIMEOUT.as_millis() as u64)
                .max(1),
        );
        let (control_uri, io_uri) = (control.to_string(), io.to_string());
        if control_uri == io_uri {
            return Err(ProxyError::invalid(
                "io",
                "the control and I/O channels must be different endpoints",
            ));
        }
        // A lost VM of this id is replaced by this registration (once it succeeds): after a host reboot every
        // recovered VM is lost, and its id must not stay blocked until someone unregisters it.
        let replacing: Option<Arc<Vm>>;
        {
            let vms = read(&self.vms);
            replacing = match vms.get(&params.id) {
                Some(old) if old.is_lost() => Some(old.clone()),
                Some(_) => return Err(ProxyError::VmExists(params.id)),
                None => None,
            };
            // Connecting to another VM's channels would take them over from it.
            if let Some(other) = vms.values().filter(|v| v.id != params.id).find(|v| {
                [&v.control_uri, &v.io_uri]
                    .iter()
                    .any(|u| **u == control_uri || **u == io_uri)
            }) {
                return Err(ProxyError::invalid(
                    "control",
                    format!("the endpoint is already used by VM {:?}", other.id),
                ));
            }
            if let Some(other) = lock(&self.recovering).values().find(|r| {
                [&r.record.control, &r.record.io]
                    .iter()
                    .any(|u| **u == control_uri || **u == io_uri)
            }) {
                return Err(ProxyError::invalid(
                    "control",
                    format!(
                        "the endpoint is used by VM {:?}, which is being recovered",
                        other.record.id
                    ),
                ));
            }
            if vms.len() >= MAX_VMS {
                return Err(ProxyError::Limit(format!("{MAX_VMS} VMs registered")));
            }
            if !lock(&self.registering).insert(params.id.clone()) {
                return Err(ProxyError::VmExists(params.id));
            }
        }
        let record = VmRecord {
            id: params.id.clone(),
            control: control.to_string(),
            io: io.to_string(),
            console: console.as_ref().map(|c| c.to_string()),
            // A replacement continues after the lost VM's sequence numbers.
            next_seq: replacing
                .as_ref()
                .map(|old| old.record(false).next_seq)
                .unwrap_or(3),
            streams: Vec::new(),
            dialect: None,
            api_version: None,
        };
        let result = self
            .connect(&record, control, io, console, timeout, false)
            .await;
        let vm = match result {
            Ok(vm) => vm,
            Err(e) => {
                lock(&self.registering).remove(&params.id);
                return Err(e);
            }
        };
        // The state writer records the new VM right away, off this request's path (file creation is what
        // bounds the registration rate otherwise).
        vm.dirty.store(true, Ordering::Release);
        self.publish(vm.clone());
        if let Some(old) = replacing {
            self.end_replaced(&old);
        }
        self.flush_now.notify_one();
        self.registrations.fetch_add(1, Ordering::Relaxed);
        METRICS
            .vms
            .get_or_create(&StateLabel {
                state: "ready".into(),
            })
            .inc();
        tracing::info!(vm = %vm.id, dialect = vm.dialect.name(), api_version = vm.api_version,
            control = %vm.control_uri, io = %vm.io_uri, "VM registered");
        crate::admin::tap::emit(|| crate::admin::tap::TapEvent::VmState {
            vm: vm.id.clone(),
            state: "ready".into(),
            reason: None,
        });
        let _ = self.events.send(Event::VmRegistered { vm: vm.id.clone() });
        Ok(vm)
    }

    /// Connect both channels and run the handshake; on success the VM's tasks are running.
    async fn connect(
        &self,
        record: &VmRecord,
        control: Endpoint,
        io: Endpoint,
        console: Option<Endpoint>,
        timeout: Duration,
        recovered: bool,
    ) -> Result<Arc<Vm>, ProxyError> {
        let (ctl, iochan) = tokio::join!(control.connect(timeout), io.connect(timeout));
        let ctl = ctl.map_err(ProxyError::from_transport)?;
        let iochan = iochan.map_err(ProxyError::from_transport)?;
        let (cr, cw) = ctl.into_split();
        let mut reader = FramedRead::new(cr, ControlCodec::default());
        let mut writer = FramedWrite::new(cw, ControlCodec::default());
        let ready = if recovered {
            handshake::ReadyRule::Probe
        } else {
            handshake::ReadyRule::WaitThenProbe
        };
        let hs = handshake::handshake(&record.id, &mut reader, &mut writer, timeout, ready).await?;
        let (dialect, api_version) = (hs.dialect, hs.api_version);
        let metrics = VmMetrics::new(&record.id);
        metrics.connected();
        let (calls_tx, calls_rx) = mpsc::channel(actor::MAX_QUEUED);
        let (io_tx, io_rx) = mpsc::channel(io::IO_QUEUE);
        let vm = Arc::new(Vm {
            id: record.id.clone(),
            control_uri: record.control.clone(),
            io_uri: record.io.clone(),
            console_uri: record.console.clone(),
            dialect,
            api_version,
            registered: Instant::now(),
            recovered,
            calls: calls_tx,
            io_out: io_tx,
            state: Mutex::new(VmState::Ready),
            lost: CancellationToken::new(),
            stop: CancellationToken::new(),
            streams: Mutex::new(StreamTable {
                next_seq: record.next_seq.max(3),
                ..Default::default()
            }),
            tokens: self.tokens.clone(),
            daemon_stopping: AtomicBool::new(false),
            dirty: std::sync::atomic::AtomicBool::new(false),
            commands: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            metrics,
            config: self.config.clone(),
            events: self.events.clone(),
        });
        for s in &record.streams {
            if vm.restore_stream(s).is_none() {
                tracing::warn!(vm = %vm.id, "skipping a malformed recorded token");
            }
        }
        let (ir, iw) = iochan.into_split();
        actor::spawn(vm.clone(), calls_rx, reader, writer, hs.deferred);
        io::spawn(vm.clone(), ir, iw, io_rx);
        if let Some(console) = console {
            spawn_console(vm.clone(), console);
        }
        Ok(vm)
    }

    /// The records to reconnect after a restart, each listed as recovering (its tokens indexed) before this
    /// returns, so a request served afterwards finds it. With none, the daemon is recovered at once (so
    /// `/ready` is true as soon as the socket serves).
    pub fn records_to_recover(&self) -> Vec<VmRecord> {
        let records = self
            .state
            .as_ref()
            .map(StateDir::load_all)
            .unwrap_or_default();
        if records.is_empty() {
            self.recovered.store(true, Ordering::Release);
        }
        let deadline = tokio::time::Instant::now() + self.config.recovery_timeout;
        let mut recovering = lock(&self.recovering);
        let mut tokens = lock(&self.tokens);
        for record in &records {
            for s in &record.streams {
                if let Some(token) = Token::parse(&s.token) {
                    tokens.insert(token, record.id.clone());
                }
            }
            recovering.insert(
                record.id.clone(),
                Arc::new(Recovery {
                    record: record.clone(),
                    deadline,
                    done: CancellationToken::new(),
                }),
            );
        }
        records
    }

    /// Reconnect the recorded VMs in parallel; VMs that cannot be reached are listed as lost.
    pub async fn recover(self: &Arc<Self>, records: Vec<VmRecord>) {
        let mut tasks = Vec::new();
        for record in records {
            let reg = self.clone();
            tasks.push(tokio::spawn(async move { reg.recover_one(record).await }));
        }
        for t in tasks {
            let _ = t.await;
        }
        self.recovered.store(true, Ordering::Release);
    }

    async fn recover_one(self: &Arc<Self>, record: VmRecord) {
        if !lock(&self.registering).insert(record.id.clone()) {
            return;
        }
        let parsed = validate_id(&record.id)
            .and_then(|()| parse_endpoints(&record.control, &record.io, record.console.as_deref()));
        let deadline = lock(&self.recovering)
            .get(&record.id)
            .map(|r| r.deadline)
            .unwrap_or_else(|| tokio::time::Instant::now() + self.config.recovery_timeout);
        let timeout = self.config.recovery_timeout;
        let result = match parsed {
            Ok((c, i, k)) => {
                // The whole reconnection (connect, handshake) is bounded, so requests waiting for it are too.
                match tokio::time::timeout_at(
                    deadline,
                    self.connect(&record, c, i, k, timeout, true),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => Err(ProxyError::ReadyTimeout {
                        vm: record.id.clone(),
                        after: timeout,
                    }),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(vm) => {
                tracing::info!(vm = %vm.id, tokens = record.streams.len(), "VM recovered after restart");
                METRICS
                    .vms
                    .get_or_create(&StateLabel {
                        state: "ready".into(),
                    })
                    .inc();
                self.publish(vm);
            }
            Err(e) => {
                tracing::warn!(vm = %record.id, error = %e, "VM could not be recovered; listed as lost");
                let vm = lost_vm(
                    &record,
                    &self.config,
                    &self.events,
                    &self.tokens,
                    format!("recovery after restart failed: {e}"),
                );
                METRICS
                    .vms
                    .get_or_create(&StateLabel {
                        state: "lost".into(),
                    })
                    .inc();
                self.publish(vm);
            }
        }
    }

    /// Make a VM visible; its id leaves `registering` (and `recovering`) under the same write lock, so no
    /// second registration of the id can slip in between and no lookup sees neither. Requests waiting for its
    /// recovery are woken after it is visible.
    fn publish(&self, vm: Arc<Vm>) {
        let mut vms = write(&self.vms);
        lock(&self.registering).remove(&vm.id);
        let recovery = lock(&self.recovering).remove(&vm.id);
        vms.insert(vm.id.clone(), vm);
        drop(vms);
        if let Some(r) = recovery {
            r.done.cancel();
        }
    }

    /// A lost VM was replaced by a new registration of its id (already published in its place): end its
    /// streams with an error frame, free its tokens, and count it out of the `lost` gauge.
    fn end_replaced(&self, old: &Vm) {
        let state = match old.halt() {
            VmState::Ready => "ready",
            VmState::Lost(_) => "lost",
        };
        METRICS
            .vms
            .get_or_create(&StateLabel {
                state: state.into(),
            })
            .dec();
        // Its metric series are shared with the new VM of the same id, so they stay.
        old.stop(
            &format!(
                "VM {} was lost and has been replaced by a new registration",
                old.id
            ),
            true,
        );
        tracing::warn!(vm = %old.id, lost_reason = %match old.state() {
            VmState::Lost(r) => r,
            VmState::Ready => String::new(),
        }, "a lost VM was replaced by a new registration of its id; its tokens are ended");
    }

    /// Unregister: stop the VM's tasks, end its streams with an error, free its tokens, forget its state.
    pub fn unregister(&self, id: &str) -> Result<(), ProxyError> {
        let vm = write(&self.vms)
            .remove(id)
            .ok_or_else(|| ProxyError::VmNotFound(id.to_string()))?;
        let state = match vm.halt() {
            VmState::Ready => "ready",
            VmState::Lost(_) => "lost",
        };
        METRICS
            .vms
            .get_or_create(&StateLabel {
                state: state.into(),
            })
            .dec();
        vm.stop(&format!("VM {id} was unregistered"), true);
        vm.metrics.remove();
        if let Some(st) = &self.state {
            // Under the save lock: a state write in progress finishes first, later ones skip the stopped VM.
            let _saving = lock(&self.save_lock);
            st.remove(id);
        }
        tracing::info!(vm = %id, "VM unregistered");
        crate::admin::tap::emit(|| crate::admin::tap::TapEvent::VmState {
            vm: id.to_string(),
            state: "unregistered".into(),
            reason: None,
        });
        let _ = self
            .events
            .send(Event::VmUnregistered { vm: id.to_string() });
        Ok(())
    }

    /// Daemon exit: stop taking registrations, stop every VM's tasks, and save every VM with the output still
    /// queued for shims, so a restarted daemon delivers it.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        let vms: Vec<Arc<Vm>> = read(&self.vms).values().cloned().collect();
        for vm in &vms {
            vm.stop("cc-proxy is stopping", false);
        }
        if let Some(state) = &self.state {
            let _saving = lock(&self.save_lock);
            for vm in &vms {
                if let Err(e) = state.save(&vm.record(true)) {
                    tracing::warn!(vm = %vm.id, error = %e, "cannot write VM state at shutdown");
                }
            }
        }
    }
}

/// How `vm.info` shows a VM still being recovered: what its record says, `recovering`, no counters yet.
fn recovering_info(record: &VmRecord) -> VmInfo {
    VmInfo {
        id: record.id.clone(),
        state: "recovering".into(),
        lost_reason: None,
        dialect: record.dialect.clone().unwrap_or_else(|| "unknown".into()),
        api_version: record.api_version.unwrap_or(0),
        control: record.control.clone(),
        io: record.io.clone(),
        console: record.console.clone(),
        uptime_secs: 0,
        commands: 0,
        errors: 0,
        streams: record.streams.iter().filter(|s| s.started).count(),
        tokens: record.streams.len(),
        recovered: true,
    }
}

/// A VM known from the state directory whose agent could not be reached: listed as lost, with no tasks.
fn lost_vm(
    record: &VmRecord,
    config: &VmConfig,
    events: &broadcast::Sender<Event>,
    tokens: &Arc<super::TokenIndex>,
    reason: String,
) -> Arc<Vm> {
    let (calls, _) = mpsc::channel(1);
    let (io_out, _) = mpsc::channel(1);
    let lost = CancellationToken::new();
    lost.cancel();
    let vm = Arc::new(Vm {
        id: record.id.clone(),
        control_uri: record.control.clone(),
        io_uri: record.io.clone(),
        console_uri: record.console.clone(),
        // The last dialect the agent spoke, as recorded (records from before it was recorded: unknown).
        dialect: record
            .dialect
            .as_deref()
            .and_then(|d| d.parse().ok())
            .unwrap_or(Dialect::Hyperstart),
        api_version: record.api_version.unwrap_or(0),
        registered: Instant::now(),
        recovered: true,
        calls,
        io_out,
        state: Mutex::new(VmState::Lost(reason)),
        lost,
        stop: CancellationToken::new(),
        streams: Mutex::new(StreamTable {
            next_seq: record.next_seq.max(3),
            ..Default::default()
        }),
        tokens: tokens.clone(),
        daemon_stopping: AtomicBool::new(false),
        dirty: std::sync::atomic::AtomicBool::new(false),
        commands: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        metrics: VmMetrics::new(&record.id),
        config: config.clone(),
        events: events.clone(),
    });
    for s in &record.streams {
        if let Some(stream) = vm.restore_stream(s) {
            stream.fail(&format!(
                "VM {} could not be reconnected after a restart",
                vm.id
            ));
        }
    }
    vm
}

/// Longest console line logged as one; longer ones are split.
const MAX_CONSOLE_LINE: usize = 4096;

/// Log the guest console's lines at debug with `source=guest`.
fn spawn_console(vm: Arc<Vm>, console: Endpoint) {
    use tokio::io::AsyncReadExt;
    tokio::spawn(async move {
        let conn = match console.connect(Duration::from_secs(5)).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(vm = %vm.id, error = %e, "cannot open the console");
                return;
            }
        };
        let (mut r, _w) = conn.into_split();
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = tokio::select! {
                _ = vm.stop.cancelled() => return,
                n = r.read(&mut chunk) => n,
            };
            let n = match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            pending.extend_from_slice(&chunk[..n]);
            while let Some(pos) = pending
                .iter()
                .position(|&b| b == b'\n')
                .or_else(|| (pending.len() >= MAX_CONSOLE_LINE).then_some(MAX_CONSOLE_LINE))
            {
                let line: Vec<u8> = pending.drain(..pos.min(pending.len())).collect();
                if pending.first() == Some(&b'\n') {
                    pending.remove(0);
                }
                let text = crate::logging::escape_bytes(&line, MAX_CONSOLE_LINE);
                tracing::debug!(vm = %vm.id, source = "guest", "{text}");
            }
        }
    });
}
