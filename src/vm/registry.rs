//! The registry of every VM on the host: registration (connect, READY, GETVERSION), lookup, unregistration,
//! and recovery from the state directory after a restart.
//!
//! Registration connects the control and I/O channels in parallel, runs the handshake, builds the [`Vm`]
//! ([`Vm::new`]), starts the tasks that own its channels, and publishes it. What is saved of each VM is
//! written by the [`StateWriter`]; the registry only tells it about registrations, unregistrations and the
//! daemon's exit.
//!
//! Recovery: at startup, before the socket serves its first request, [`Registry::records_to_recover`] lists
//! every recorded VM as *recovering* (with its tokens in the token index). Each is then reconnected in the
//! background, bounded by `--recovery-timeout`, and published as ready or lost. Until then `vm.list` and
//! `vm.info` show it as `recovering`, and everything that needs the VM itself (calls, `vm.attach`, stream
//! attaches, `stream.*`, legacy commands, a registration or unregistration of its id) waits for the outcome
//! through [`Registry::settle`] and then proceeds, or fails with the VM's real state, never with "no VM
//! registered".

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cc_proxy_api::types::{RegisterParams, VmInfo, VmStateName};
use cc_proxy_protocol::{ControlCodec, Dialect};
use tokio::sync::broadcast;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::actor::ControlActor;
use super::persist::StateWriter;
use super::state::{StateDir, VmRecord};
use super::{console, handshake, io, lock, LostReason, Vm, VmConfig, VmEvent, VmShared, VmState};
use crate::error::{Limit, ProxyError};
use crate::mesh::Mesh;
use crate::stream::{Stream, Token};
use crate::sync::{read, write};
use crate::transport::creds::CredsError;
use crate::transport::{Credentials, Endpoint, TransportError};

/// Default wait for the agent's READY.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on reconnecting one recorded VM after a restart (`--recovery-timeout`).
pub const DEFAULT_RECOVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long past a recovery's own deadline a waiting request gives the outcome to be published.
const SETTLE_GRACE: Duration = Duration::from_millis(500);
/// Most VMs one daemon serves.
pub const MAX_VMS: usize = 65_536;

/// A VM loaded from the state directory whose agent is being reconnected.
struct Recovery {
    /// What the state directory holds of it (shown by `vm.info` meanwhile).
    record: VmRecord,
    /// The reconnection gives up at this instant; waiters wait at most [`SETTLE_GRACE`] longer.
    deadline: tokio::time::Instant,
    /// Cancelled once the VM is published (ready or lost).
    done: CancellationToken,
}

/// Whether the daemon is ready (`/ready` answers 200, `proxy.health`'s `ready`), and if not why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// VMs from the state directory are still being reconnected after a restart.
    Recovering,
    /// This many meshed VMs have no valid certificate (none issued yet, or it expired): their listeners do
    /// not serve TLS.
    MeshUncertified(usize),
}

pub struct Registry {
    vms: RwLock<HashMap<String, Arc<Vm>>>,
    /// Recorded VMs still being reconnected after a restart; an id leaves it under the `vms` write lock when
    /// the VM is published.
    recovering: Mutex<HashMap<String, Arc<Recovery>>>,
    /// Ids whose registration is in progress, so two clients cannot register one id twice.
    registering: Mutex<HashSet<String>>,
    /// What every VM shares: settings, the event stream, the token → VM index.
    shared: VmShared,
    /// Keeps the state directory up to date; `None` when there is no usable state directory.
    writer: Option<Arc<StateWriter>>,
    /// Every meshed VM's listeners (`None` in unit tests that need no mesh).
    mesh: Option<Arc<Mesh>>,
    /// Set once recovery at startup finished (the admin `/ready` waits for it).
    recovered: AtomicBool,
    shutting_down: AtomicBool,
}

/// Who registers a VM, as the front end that took the request established it.
#[derive(Debug, Clone)]
pub struct Registrant {
    /// Becomes the VM's owner.
    pub uid: u32,
    /// A privileged client may replace a lost VM of another owner.
    pub privileged: bool,
    /// Open the endpoints with these rights rather than the daemon's (a non-privileged client's own).
    pub rights: Option<Credentials>,
}

/// The parsed endpoints of one VM.
struct Endpoints {
    control: Endpoint,
    io: Endpoint,
    console: Option<Endpoint>,
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
) -> Result<Endpoints, ProxyError> {
    let parse = |uri: &str| Endpoint::parse(uri).map_err(ProxyError::from);
    Ok(Endpoints {
        control: parse(control)?,
        io: parse(io)?,
        console: console.map(parse).transpose()?,
    })
}

impl Registry {
    /// An empty registry. With a state directory, start its writer with [`Registry::spawn_state_writer`].
    pub fn new(
        state: Option<StateDir>,
        config: VmConfig,
        events: broadcast::Sender<VmEvent>,
        mesh: Option<Arc<Mesh>>,
    ) -> Arc<Registry> {
        Arc::new(Registry {
            vms: RwLock::new(HashMap::new()),
            recovering: Mutex::new(HashMap::new()),
            registering: Mutex::new(HashSet::new()),
            shared: VmShared {
                config,
                events,
                tokens: Arc::new(Mutex::new(HashMap::new())),
                token_owners: Arc::new(Mutex::new(HashMap::new())),
            },
            writer: state.map(|dir| Arc::new(StateWriter::new(dir))),
            mesh,
            recovered: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Start writing changed VM state to the state directory (if there is one).
    /// Free, every few seconds, tokens never attached nor started within `--token-ttl`.
    pub fn spawn_token_reaper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let ttl = self.shared.config.tokens.ttl;
        let every = (ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                for vm in registry.list() {
                    vm.expire_tokens(ttl);
                }
            }
        });
    }

    pub fn spawn_state_writer(self: &Arc<Self>) {
        if let Some(writer) = &self.writer {
            writer.spawn(Arc::downgrade(self));
        }
    }

    /// The mesh front.
    pub fn mesh(&self) -> Option<&Arc<Mesh>> {
        self.mesh.as_ref()
    }

    /// Fill in the certificate of a meshed VM's `vm.info`.
    fn with_certificate(&self, mut info: VmInfo) -> VmInfo {
        if let (Some(mesh), Some(m)) = (&self.mesh, info.mesh.as_mut()) {
            m.certificate = mesh.credential(&info.id).map(|c| c.info());
            m.identity_state = mesh.identity_state(&info.id);
        }
        info
    }

    pub fn events(&self) -> &broadcast::Sender<VmEvent> {
        &self.shared.events
    }

    pub fn is_recovered(&self) -> bool {
        self.recovered.load(Ordering::Acquire)
    }

    /// What `/ready` and `proxy.health` answer now.
    pub fn readiness(&self) -> Readiness {
        if !self.is_recovered() {
            return Readiness::Recovering;
        }
        match self.mesh.as_ref().map_or(0, |m| m.uncertified()) {
            0 => Readiness::Ready,
            n => Readiness::MeshUncertified(n),
        }
    }

    /// Recovery is over (or there was nothing to recover): `/ready` answers 200 from now on.
    pub fn set_recovered(&self) {
        self.recovered.store(true, Ordering::Release);
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

    /// Every published VM, by id.
    pub fn list(&self) -> Vec<Arc<Vm>> {
        let mut vms: Vec<Arc<Vm>> = read(&self.vms).values().cloned().collect();
        vms.sort_by(|a, b| a.id.cmp(&b.id));
        vms
    }

    /// The owner of VM `id` (published or being recovered), if there is such a VM.
    pub fn owner(&self, id: &str) -> Option<u32> {
        if let Some(vm) = read(&self.vms).get(id) {
            return Some(vm.owner);
        }
        lock(&self.recovering)
            .get(id)
            .map(|r| r.record.owner.unwrap_or(0))
    }

    /// Every VM whose owner `visible` accepts, as `vm.list` shows it (recovering ones included), by id.
    pub fn list_info(&self, visible: impl Fn(u32) -> bool) -> Vec<VmInfo> {
        let vms = read(&self.vms);
        let mut out: Vec<VmInfo> = vms
            .values()
            .filter(|vm| visible(vm.owner))
            .map(|vm| self.with_certificate(vm.info()))
            .collect();
        out.extend(
            lock(&self.recovering)
                .values()
                .filter(|r| !vms.contains_key(&r.record.id))
                .filter(|r| visible(r.record.owner.unwrap_or(0)))
                .map(|r| recovering_info(&r.record)),
        );
        drop(vms);
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// One VM as `vm.info` shows it; a VM being recovered is shown as `recovering` without waiting.
    pub fn info(&self, id: &str) -> Result<VmInfo, ProxyError> {
        match self.get(id) {
            Ok(vm) => Ok(self.with_certificate(vm.info())),
            Err(ProxyError::Recovering(_)) => lock(&self.recovering)
                .get(id)
                .map(|r| recovering_info(&r.record))
                .ok_or_else(|| ProxyError::VmNotFound(id.to_string())),
            Err(e) => Err(e),
        }
    }

    /// (all VMs, lost VMs, VMs being recovered); the first count includes the other two.
    pub fn counts(&self) -> (usize, usize, usize) {
        self.counts_of(|_| true)
    }

    /// [`Registry::counts`] of the VMs whose owner `visible` accepts.
    pub fn counts_of(&self, visible: impl Fn(u32) -> bool) -> (usize, usize, usize) {
        let vms = read(&self.vms);
        let (mut all, mut lost) = (0, 0);
        for vm in vms.values().filter(|v| visible(v.owner)) {
            all += 1;
            lost += usize::from(matches!(vm.state(), VmState::Lost(_)));
        }
        let recovering = lock(&self.recovering)
            .values()
            .filter(|r| visible(r.record.owner.unwrap_or(0)))
            .count();
        (all + recovering, lost, recovering)
    }

    /// Find the VM and stream of a token.
    pub fn find_token(&self, token: &Token) -> Option<(Arc<Vm>, Arc<Stream>)> {
        let id = lock(&self.shared.tokens).get(token).cloned()?;
        let vm = read(&self.vms).get(&id).cloned()?;
        let stream = vm.stream_by_token(token)?;
        Some((vm, stream))
    }

    /// [`Registry::find_token`] after waiting for the recovery of the token's VM, so a shim re-attaching
    /// while the daemon reconnects its VM is not told its valid token is unknown.
    pub async fn find_token_settled(&self, token: &Token) -> Option<(Arc<Vm>, Arc<Stream>)> {
        let id = lock(&self.shared.tokens).get(token).cloned()?;
        self.settle(&id).await;
        self.find_token(token)
    }

    /// Register a VM for `by`, who will own it: connect its channels (with `by`'s rights when it has any),
    /// wait for READY, pick the dialect, start its tasks.
    pub async fn register(
        self: &Arc<Self>,
        params: RegisterParams,
        by: Registrant,
    ) -> Result<Arc<Vm>, ProxyError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(ProxyError::ShuttingDown);
        }
        validate_id(&params.id)?;
        // A recorded VM of this id is being reconnected: its outcome decides what this registration meets.
        self.settle(&params.id).await;
        let endpoints = parse_endpoints(&params.control, &params.io, params.console.as_deref())?;
        if let Some(cfg) = &params.mesh {
            crate::mesh::config::validate(cfg).map_err(|e| {
                ProxyError::mesh(&params.id, crate::mesh::MeshSetupError::Config(e))
            })?;
            if self.mesh.is_none() {
                return Err(ProxyError::MeshListen {
                    vm: params.id.clone(),
                    reason: "this daemon runs without the mesh front".into(),
                });
            }
        }
        let timeout = Duration::from_millis(
            params
                .timeout_ms
                .unwrap_or(DEFAULT_READY_TIMEOUT.as_millis() as u64)
                .max(1),
        );
        let record = VmRecord {
            id: params.id.clone(),
            control: endpoints.control.to_string(),
            io: endpoints.io.to_string(),
            console: endpoints.console.as_ref().map(|c| c.to_string()),
            next_seq: 3,
            streams: Vec::new(),
            dialect: None,
            api_version: None,
            owner: Some(by.uid),
            owner_rights: by.rights.is_some(),
            mesh: params.mesh.clone(),
        };
        if record.control == record.io {
            return Err(ProxyError::invalid(
                "io",
                "the control and I/O channels must be different endpoints",
            ));
        }
        // A client that cannot even see an endpoint's path learns nothing more about it (not that another VM
        // uses it): the answer is the one connecting with its rights would give.
        if let Some(rights) = &by.rights {
            for ep in [&endpoints.control, &endpoints.io] {
                let Some(path) = ep.unix_path() else {
                    continue;
                };
                if let Err(CredsError::Io(e)) = rights.look_up(path).await {
                    if e.kind() == std::io::ErrorKind::PermissionDenied {
                        return Err(ProxyError::from(TransportError::Connect {
                            uri: ep.to_string(),
                            source: e,
                        }));
                    }
                }
            }
        }
        // A lost VM of this id is replaced by this registration (once it succeeds): after a host reboot every
        // recovered VM is lost, and its id must not stay blocked until someone unregisters it.
        let replacing = self.reserve(&record, &by)?;
        let mut record = record;
        if let Some(old) = &replacing {
            // A replacement continues after the lost VM's sequence numbers.
            record.next_seq = old.record(false).next_seq;
        }
        // The mesh listeners are bound before the agent is connected: an address that cannot be bound fails
        // the registration with nothing connected, and a failed connect unbinds them (dropped).
        let bound = match (&self.mesh, &params.mesh) {
            (Some(mesh), Some(cfg)) => match mesh.bind(cfg).await {
                Ok(b) => Some((mesh.clone(), cfg.clone(), b)),
                Err(e) => {
                    lock(&self.registering).remove(&params.id);
                    return Err(ProxyError::mesh(&params.id, e));
                }
            },
            _ => None,
        };
        let vm = match self
            .connect(&record, endpoints, timeout, false, by.rights.as_ref())
            .await
        {
            Ok(vm) => vm,
            Err(e) => {
                lock(&self.registering).remove(&params.id);
                return Err(e);
            }
        };
        tracing::info!(vm = %vm.id, dialect = vm.dialect.name(), api_version = vm.api_version,
            control = %vm.control_uri, io = %vm.io_uri, "VM registered");
        vm.transition(VmState::Ready);
        self.publish(vm.clone());
        if let Some(old) = replacing {
            old.transition(VmState::Replaced);
        }
        if let Some((mesh, cfg, bound)) = bound {
            mesh.start(&vm.id, vm.owner, cfg, bound, vm.ended_token())
                .await;
        }
        // The state writer records the new VM right away, off this request's path (file creation is what
        // bounds the registration rate otherwise).
        vm.touch();
        if let Some(writer) = &self.writer {
            writer.wake();
        }
        Ok(vm)
    }

    /// Claim `record.id` for a registration in progress, refusing duplicates, endpoint takeovers and more than
    /// [`MAX_VMS`] VMs. Returns the lost VM of that id the registration will replace, if there is one.
    fn reserve(&self, record: &VmRecord, by: &Registrant) -> Result<Option<Arc<Vm>>, ProxyError> {
        let vms = read(&self.vms);
        let replacing = match vms.get(&record.id) {
            // Only its owner or a privileged client may replace a lost VM (and so take its id and tokens).
            Some(old)
                if matches!(old.state(), VmState::Lost(_))
                    && !by.privileged
                    && old.owner != by.uid =>
            {
                return Err(ProxyError::PermissionDenied {
                    vm: Some(record.id.clone()),
                    uid: by.uid,
                })
            }
            Some(old) if matches!(old.state(), VmState::Lost(_)) => Some(old.clone()),
            Some(_) => return Err(ProxyError::VmExists(record.id.clone())),
            None => None,
        };
        // Connecting to another VM's channels would take them over from it.
        if let Some(other) = vms.values().filter(|v| v.id != record.id).find(|v| {
            [&v.control_uri, &v.io_uri]
                .iter()
                .any(|u| **u == record.control || **u == record.io)
        }) {
            // A client that may not see the other VM is not told its name.
            let whose = if by.privileged || other.owner == by.uid {
                format!("VM {:?}", other.id)
            } else {
                "another VM".to_string()
            };
            return Err(ProxyError::invalid(
                "control",
                format!("the endpoint is already used by {whose}"),
            ));
        }
        if let Some(other) = lock(&self.recovering).values().find(|r| {
            [&r.record.control, &r.record.io]
                .iter()
                .any(|u| **u == record.control || **u == record.io)
        }) {
            let owner = other.record.owner.unwrap_or(0);
            let whose = if by.privileged || owner == by.uid {
                format!("VM {:?}", other.record.id)
            } else {
                "another VM".to_string()
            };
            return Err(ProxyError::invalid(
                "control",
                format!("the endpoint is used by {whose}, which is being recovered"),
            ));
        }
        if vms.len() >= MAX_VMS {
            return Err(ProxyError::Limit(Limit::Vms(MAX_VMS)));
        }
        if !lock(&self.registering).insert(record.id.clone()) {
            return Err(ProxyError::VmExists(record.id.clone()));
        }
        Ok(replacing)
    }

    /// Connect both channels and run the handshake; on success the VM's tasks are running.
    async fn connect(
        &self,
        record: &VmRecord,
        endpoints: Endpoints,
        timeout: Duration,
        recovered: bool,
        rights: Option<&Credentials>,
    ) -> Result<Arc<Vm>, ProxyError> {
        let (ctl, iochan) = tokio::join!(
            endpoints.control.connect_as(timeout, rights),
            endpoints.io.connect_as(timeout, rights)
        );
        let (cr, cw) = ctl?.into_split();
        let iochan = iochan?;
        // No buffer before the first frame: most of an idle VM's memory would otherwise be empty buffers.
        let mut reader = FramedRead::with_capacity(cr, ControlCodec::default(), 0);
        let mut writer = FramedWrite::with_capacity(cw, ControlCodec::default(), 0);
        let ready = if recovered {
            handshake::ReadyRule::Probe
        } else {
            handshake::ReadyRule::WaitThenProbe
        };
        let hs = handshake::handshake(&record.id, &mut reader, &mut writer, timeout, ready).await?;
        let (vm, inbox) = Vm::new(
            record,
            Some((hs.dialect, hs.api_version)),
            recovered,
            &self.shared,
        );
        vm.metrics.connected();
        vm.restore_streams(&record.streams);
        let (ir, iw) = iochan.into_split();
        ControlActor::spawn(vm.clone(), inbox.calls, reader, writer, hs.deferred);
        io::spawn(vm.clone(), ir, iw);
        if let Some(console) = endpoints.console {
            console::spawn(vm.clone(), console, rights.cloned());
        }
        Ok(vm)
    }

    /// The records the previous daemon saved, to reconnect with [`Registry::recover`]; each is listed as
    /// recovering (its tokens indexed) before this returns, so a request served afterwards finds it.
    pub fn records_to_recover(&self) -> Vec<VmRecord> {
        let records = self.writer.as_ref().map(|w| w.load()).unwrap_or_default();
        let deadline = tokio::time::Instant::now() + self.shared.config.recovery_timeout;
        let mut recovering = lock(&self.recovering);
        let mut tokens = lock(&self.shared.tokens);
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

    /// Reconnect the recorded VMs in parallel; VMs that cannot be reached are listed as lost. Recovery is over
    /// when this returns.
    pub async fn recover(self: &Arc<Self>, records: Vec<VmRecord>) {
        let mut tasks = Vec::new();
        for record in records {
            let reg = self.clone();
            tasks.push(tokio::spawn(async move { reg.recover_one(record).await }));
        }
        for t in tasks {
            let _ = t.await;
        }
        self.set_recovered();
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
            .unwrap_or_else(|| tokio::time::Instant::now() + self.shared.config.recovery_timeout);
        let timeout = self.shared.config.recovery_timeout;
        // Endpoints a non-privileged owner named are opened with the owner's rights again.
        let rights = match record.owner_rights {
            // The user database may be remote (NSS): looked up off the runtime's workers.
            true => {
                let uid = record.owner.unwrap_or(0);
                tokio::task::spawn_blocking(move || Credentials::of_user(uid))
                    .await
                    .ok()
            }
            false => None,
        };
        let result = match parsed {
            // The whole reconnection (connect, handshake) is bounded, so requests waiting for it are too.
            Ok(endpoints) => {
                let connect = self.connect(&record, endpoints, timeout, true, rights.as_ref());
                tokio::time::timeout_at(deadline, connect)
                    .await
                    .unwrap_or_else(|_| {
                        Err(ProxyError::ReadyTimeout {
                            vm: record.id.clone(),
                            after: timeout,
                        })
                    })
            }
            Err(e) => Err(e),
        };
        let vm = match result {
            Ok(vm) => {
                tracing::info!(vm = %vm.id, tokens = record.streams.len(), "VM recovered after restart");
                vm.transition(VmState::Ready);
                vm
            }
            Err(e) => {
                tracing::warn!(vm = %record.id, error = %e, "VM could not be recovered; listed as lost");
                // Listed with its tokens, which end with an error frame naming the cause.
                // The last dialect the agent spoke, as recorded (records from before it was recorded: unknown).
                let agent = record
                    .dialect
                    .as_deref()
                    .and_then(|d| d.parse::<Dialect>().ok())
                    .zip(record.api_version);
                let (vm, _no_tasks) = Vm::new(&record, agent, true, &self.shared);
                vm.restore_streams(&record.streams);
                vm.transition(VmState::Lost(LostReason::NotRecovered(Box::new(e))));
                vm
            }
        };
        self.publish(vm.clone());
        if matches!(vm.state(), VmState::Ready) {
            self.start_recovered_mesh(&vm).await;
        }
    }

    /// Bind and start the mesh listeners of a VM recovered after a restart. A listener that cannot be bound
    /// now (its address taken meanwhile) leaves the VM recovered without its mesh: logged, and `vm.info` shows
    /// no certificate for it.
    async fn start_recovered_mesh(&self, vm: &Arc<Vm>) {
        let (Some(mesh), Some(cfg)) = (&self.mesh, &vm.mesh) else {
            return;
        };
        match mesh.bind(cfg).await {
            Ok(bound) => {
                mesh.start(
                    &vm.id,
                    vm.owner,
                    cfg.as_ref().clone(),
                    bound,
                    vm.ended_token(),
                )
                .await
            }
            Err(e) => {
                tracing::error!(vm = %vm.id, error = %e, "the recovered VM's mesh listeners cannot be set up")
            }
        }
    }

    /// Wait (bounded by `within`) for VM `id`'s mesh listeners to drain after it was unregistered.
    pub async fn mesh_stopped(&self, id: &str, within: Duration) {
        if let Some(mesh) = &self.mesh {
            mesh.stopped(id, within).await;
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

    /// Unregister: stop the VM's tasks, end its streams with an error, free its tokens, forget its state.
    pub fn unregister(&self, id: &str, owner: u32) -> Result<(), ProxyError> {
        let mut vms = write(&self.vms);
        // Checked and removed under one lock: a VM registered again under this id by another uid since the
        // client was authorized is not the one it asked to remove.
        if vms.get(id).is_none_or(|vm| vm.owner != owner) {
            return Err(ProxyError::VmNotFound(id.to_string()));
        }
        let vm = vms
            .remove(id)
            .ok_or_else(|| ProxyError::VmNotFound(id.to_string()))?;
        drop(vms);
        vm.transition(VmState::Unregistered);
        vm.metrics.remove();
        if let Some(writer) = &self.writer {
            writer.remove(id);
        }
        Ok(())
    }

    /// Daemon exit: stop taking registrations, stop every VM's tasks, and save every VM with the output still
    /// queued for shims, so a restarted daemon delivers it.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        let vms: Vec<Arc<Vm>> = read(&self.vms).values().cloned().collect();
        for vm in &vms {
            vm.transition(VmState::Stopping);
        }
        if let Some(writer) = &self.writer {
            writer.save_final(&vms);
        }
    }
}

/// How `vm.info` shows a VM still being recovered: what its record says, `recovering`, no counters yet.
fn recovering_info(record: &VmRecord) -> VmInfo {
    VmInfo {
        id: record.id.clone(),
        state: VmStateName::Recovering,
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
        owner: record.owner.unwrap_or(0),
        mesh: record
            .mesh
            .clone()
            .map(|config| cc_proxy_api::mesh::MeshInfo {
                config,
                certificate: None,
                identity_state: Default::default(),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vm.unregister` and legacy UnregisterVM check the owner, then remove: the removal takes only a VM of the
    /// owner that was checked, so a VM registered again under the id by another uid in between is left alone.
    #[tokio::test]
    async fn unregister_removes_only_a_vm_of_the_checked_owner() {
        let (vm, _inbox) = crate::vm::testing::vm("reused", Dialect::Hyperstart, None);
        let registry = Registry::new(None, vm.config.clone(), broadcast::channel(4).0, None);
        write(&registry.vms).insert(vm.id.clone(), vm.clone());
        assert!(matches!(
            registry.unregister("reused", vm.owner + 1000),
            Err(ProxyError::VmNotFound(_))
        ));
        assert!(
            registry.get("reused").is_ok(),
            "another owner's VM was removed"
        );
        registry
            .unregister("reused", vm.owner)
            .expect("the checked owner's VM");
        assert!(matches!(
            registry.get("reused"),
            Err(ProxyError::VmNotFound(_))
        ));
    }
}
