//! VMs: the registry of every VM on the host and, per VM, the tasks that own its agent channels.
//!
//! Each registered VM has:
//! - a control actor ([`actor`]) that owns the agent's control channel: it queues every client's commands
//!   FIFO, sends one at a time, matches the ACK/ERROR reply to it, applies deadlines, and routes unsolicited
//!   agent messages (PROCESSASYNCEVENT, NEXT) as events rather than replies;
//! - an I/O reader and an I/O writer ([`io`]) that demultiplex agent output to streams by sequence number and
//!   multiplex stdin from every shim onto the VM's single I/O channel;
//! - a stream table ([`streams`]: sequence number, token and (container, process) → stream);
//! - optionally a console reader ([`console`]) logging the guest's console lines.
//!
//! Clients never touch the channels: they send [`actor::Call`]s through a channel and await the reply, and
//! every front end starts, signals and resizes processes through [`process`]. The VM's state lives in one
//! enum changed only by [`Vm::transition`] ([`lifecycle`]). When any channel fails the VM is lost: queued and
//! in-flight calls fail at once, every stream ends with an error frame, and a `vm_lost` event is published.
//! The VM stays listed as lost until unregistered.

pub mod actor;
mod console;
pub mod handshake;
pub mod io;
pub mod lifecycle;
mod persist;
pub mod process;
pub mod registry;
pub mod state;
pub mod stdin;
mod streams;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cc_proxy_api::types::{Event, VmInfo, VmStateName};
use cc_proxy_protocol::Dialect;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::admin::metrics::VmMetrics;
use crate::error::ProxyError;
use crate::stream::{BufferAccount, Token};
use crate::sync::lock;
pub use lifecycle::{LostReason, VmState};
pub use registry::Registry;
use state::VmRecord;
use streams::StreamTable;

/// Settings every VM shares.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Bytes kept per stream before backpressure.
    pub stream_buffer: usize,
    /// PING idle agents this often (None = never).
    pub keepalive: Option<Duration>,
    /// Keepalive intervals a PING may go unanswered before the VM is lost (at least 1).
    pub keepalive_misses: u32,
    /// How long one full stream may pause the VM's I/O channel before it is failed.
    pub stall_timeout: Duration,
    /// Stdin bytes one stream may have queued before its shim waits (`--stdin-buffer`).
    pub stdin_buffer: usize,
    /// Stdin bytes queued across a VM's streams before every shim of the VM waits (`--vm-stdin-buffer`).
    pub vm_stdin_buffer: usize,
    /// How long the I/O channel may take no stdin before the stream most likely blocking it is failed and its
    /// process killed (`--stdin-stall-timeout`).
    pub stdin_stall_timeout: Duration,
    /// Bytes buffered across a VM's streams before a stream past its own bound pauses the I/O channel.
    pub vm_buffer: usize,
    /// Bound on reconnecting one recorded VM after a restart; requests for it wait at most this long.
    pub recovery_timeout: Duration,
    /// Bounds on stream tokens.
    pub tokens: TokenLimits,
}

/// Bounds on stream tokens (section Limits of docs/operations.md).
#[derive(Debug, Clone, Copy)]
pub struct TokenLimits {
    /// `--max-tokens-per-vm`.
    pub per_vm: usize,
    /// `--max-tokens-per-client`: per uid, across VMs.
    pub per_client: usize,
    /// `--token-ttl`: a token never attached nor started is freed after this.
    pub ttl: Duration,
}

/// Default of `--max-tokens-per-vm`.
pub const DEFAULT_MAX_TOKENS_PER_VM: usize = 1024;
/// Default of `--max-tokens-per-client`.
pub const DEFAULT_MAX_TOKENS_PER_CLIENT: usize = 16_384;
/// Default of `--token-ttl`.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);

impl Default for TokenLimits {
    fn default() -> TokenLimits {
        TokenLimits {
            per_vm: DEFAULT_MAX_TOKENS_PER_VM,
            per_client: DEFAULT_MAX_TOKENS_PER_CLIENT,
            ttl: DEFAULT_TOKEN_TTL,
        }
    }
}

/// Which VM each live token belongs to, across all VMs (attach looks tokens up here).
pub type TokenIndex = Mutex<HashMap<Token, String>>;

/// An event with the uid owning its VM, so each subscriber gets only the events of VMs it may see.
#[derive(Debug, Clone)]
pub struct VmEvent {
    pub owner: u32,
    pub event: Event,
}

/// What every VM shares with the registry that built it.
#[derive(Clone)]
pub struct VmShared {
    pub config: VmConfig,
    pub events: broadcast::Sender<VmEvent>,
    pub tokens: Arc<TokenIndex>,
    /// Tokens held per client uid, across all VMs (`--max-tokens-per-client`).
    pub token_owners: Arc<TokenOwners>,
}

/// Live tokens per uid that allocated them.
pub type TokenOwners = Mutex<HashMap<u32, usize>>;

/// The receiving ends of a new VM's queues, for the tasks that will own its channels.
pub struct VmInbox {
    pub calls: mpsc::Receiver<Box<actor::Call>>,
}

/// One registered VM. Shared by the registry, the VM's tasks and the clients using it.
pub struct Vm {
    pub id: String,
    pub control_uri: String,
    pub io_uri: String,
    pub console_uri: Option<String>,
    pub dialect: Dialect,
    /// The agent's API version; 0 when the agent was never reached (a VM not recovered after a restart).
    pub api_version: u32,
    pub registered: Instant,
    /// Reconnected from the state directory after a restart rather than registered by a client.
    pub recovered: bool,
    /// The uid that registered the VM: only it and privileged clients may use the VM (`server/authz.rs`).
    pub owner: u32,
    /// The endpoints were opened with the owner's rights (see [`state::VmRecord::owner_rights`]).
    pub owner_rights: bool,
    /// The VM's mesh configuration (`vm.register`'s `mesh`), kept in its state record.
    pub mesh: Option<Arc<cc_proxy_api::mesh::MeshConfig>>,
    /// Commands to the control actor (boxed: the channel's first block is allocated with the VM).
    calls: mpsc::Sender<Box<actor::Call>>,
    /// Every shim's stdin, queued per stream for the I/O writer.
    stdin: stdin::StdinMux,
    /// Where the VM is in its life; changed only by [`Vm::transition`].
    state: Mutex<VmState>,
    /// Cancelled when the VM leaves `Ready` (lost, unregistered, the daemon stopping): wakes its tasks.
    ended: CancellationToken,
    streams: Mutex<StreamTable>,
    /// The daemon-wide token index this VM's tokens are listed in.
    tokens: Arc<TokenIndex>,
    /// Tokens held per client uid, daemon-wide.
    token_owners: Arc<TokenOwners>,
    /// Output queued across the VM's streams: the VM's buffer budget is checked against it.
    buffered: Arc<BufferAccount>,
    /// State changed since the last write to the state dir.
    dirty: AtomicBool,
    /// Agent commands answered (ACK or ERROR), for `vm.info`.
    pub commands: AtomicU64,
    /// Agent commands that failed, for `vm.info`.
    pub errors: AtomicU64,
    pub metrics: VmMetrics,
    pub config: VmConfig,
    events: broadcast::Sender<VmEvent>,
}

impl Vm {
    /// Build a VM in [`VmState::Connecting`] from its record. `agent` is the dialect and API version the
    /// handshake found, or `None` for a VM whose agent could not be reached after a restart.
    pub fn new(
        record: &VmRecord,
        agent: Option<(Dialect, u32)>,
        recovered: bool,
        shared: &VmShared,
    ) -> (Arc<Vm>, VmInbox) {
        let (dialect, api_version) = agent.unwrap_or((Dialect::Hyperstart, 0));
        let (calls_tx, calls) = mpsc::channel(actor::MAX_QUEUED);
        let metrics = VmMetrics::new(&record.id);
        let buffered = Arc::new(BufferAccount::new(metrics.buffered.clone()));
        let vm = Arc::new(Vm {
            id: record.id.clone(),
            control_uri: record.control.clone(),
            io_uri: record.io.clone(),
            console_uri: record.console.clone(),
            dialect,
            api_version,
            registered: Instant::now(),
            recovered,
            owner: record.owner.unwrap_or(0),
            owner_rights: record.owner_rights,
            mesh: record.mesh.clone().map(Arc::new),
            calls: calls_tx,
            stdin: stdin::StdinMux::new(shared.config.stdin_buffer, shared.config.vm_stdin_buffer),
            state: Mutex::new(VmState::Connecting),
            ended: CancellationToken::new(),
            streams: Mutex::new(StreamTable::new(record.next_seq)),
            tokens: shared.tokens.clone(),
            token_owners: shared.token_owners.clone(),
            buffered,
            dirty: AtomicBool::new(false),
            commands: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            metrics,
            config: shared.config.clone(),
            events: shared.events.clone(),
        });
        (vm, VmInbox { calls })
    }

    /// Send one command and wait for its reply (or deadline, loss, unregistration).
    pub async fn call(
        &self,
        code: u32,
        name: &str,
        payload: bytes::Bytes,
        timeout: Duration,
    ) -> Result<bytes::Bytes, ProxyError> {
        if self.has_ended() {
            return Err(self.gone_error());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let now = tokio::time::Instant::now();
        let call = Box::new(actor::Call {
            code,
            name: name.to_string(),
            payload,
            queued: now,
            deadline: now + timeout,
            timeout,
            reply: tx,
        });
        match self.calls.try_send(call) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(ProxyError::Limit(crate::error::Limit::QueuedCommands {
                    vm: self.id.clone(),
                    max: actor::MAX_QUEUED,
                }))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(self.gone_error()),
        }
        // The actor answers every call; the backstop only guards against a bug leaving a client waiting forever.
        let backstop = now + timeout + actor::ABANDON_GRACE;
        match tokio::time::timeout_at(backstop, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.gone_error()),
            Err(_) => Err(ProxyError::CommandTimeout {
                vm: self.id.clone(),
                command: name.to_string(),
                after: timeout,
            }),
        }
    }

    /// Queue stdin for the process on `seq` (empty data closes its stdin). Waits until the process started,
    /// and while the stream or the VM has as much stdin queued as it may (see [`stdin`]).
    pub async fn send_stdin(&self, seq: u64, data: bytes::Bytes) -> Result<(), ProxyError> {
        if let Some(stream) = self.stream_by_seq(seq) {
            tokio::select! {
                _ = stream.wait_started() => {}
                _ = self.ended.cancelled() => {}
            }
        }
        if self.has_ended() {
            return Err(self.gone_error());
        }
        tokio::select! {
            r = self.stdin.push(seq, data) => r.map_err(ProxyError::from),
            _ = self.ended.cancelled() => Err(self.gone_error()),
        }
    }

    /// Bytes queued for shims across the VM's streams.
    pub fn buffered(&self) -> usize {
        self.buffered.bytes()
    }

    /// The public description of the VM (`vm.info`, `vm.list`).
    pub fn info(&self) -> VmInfo {
        let (tokens, streams) = self.stream_counts();
        let (state, lost_reason) = match self.state() {
            VmState::Lost(r) => (VmStateName::Lost, Some(r.to_string())),
            VmState::Unregistered | VmState::Replaced => {
                (VmStateName::Lost, Some("unregistered".to_string()))
            }
            VmState::Stopping => (VmStateName::Lost, Some("cc-proxy is stopping".to_string())),
            VmState::Connecting | VmState::Ready => (VmStateName::Ready, None),
        };
        VmInfo {
            id: self.id.clone(),
            state,
            lost_reason,
            // A VM that could not be reached after a restart, recorded before dialects were recorded.
            dialect: if self.api_version == 0 {
                "unknown".into()
            } else {
                self.dialect.name().to_string()
            },
            api_version: self.api_version,
            control: self.control_uri.clone(),
            io: self.io_uri.clone(),
            console: self.console_uri.clone(),
            uptime_secs: self.registered.elapsed().as_secs(),
            commands: self.commands.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            streams,
            tokens,
            recovered: self.recovered,
            owner: self.owner,
            // The certificate is filled in by the registry from the mesh front (src/mesh/).
            mesh: self
                .mesh
                .as_deref()
                .map(|config| cc_proxy_api::mesh::MeshInfo {
                    config: config.clone(),
                    certificate: None,
                    identity_state: Default::default(),
                }),
        }
    }

    /// Publish an event about this VM to the subscribers allowed to see it.
    fn publish_event(&self, event: Event) {
        let _ = self.events.send(VmEvent {
            owner: self.owner,
            event,
        });
    }

    /// Publish a tap event about this VM, built only when someone taps (see [`crate::admin::tap::emit`]).
    pub fn tap(&self, make: impl FnOnce() -> crate::admin::tap::TapEvent) {
        crate::admin::tap::emit(self.owner, make);
    }

    /// Mark the state as changed, for the state writer.
    fn touch(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Take the changed mark (the state writer is about to save the VM).
    fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A VM with no registry, for unit tests of the tasks that serve it.
    use super::*;

    pub fn vm(id: &str, dialect: Dialect, keepalive: Option<Duration>) -> (Arc<Vm>, VmInbox) {
        let record = VmRecord {
            id: id.to_string(),
            control: format!("unix:///test/{id}/ctl"),
            io: format!("unix:///test/{id}/io"),
            console: None,
            next_seq: 3,
            streams: Vec::new(),
            dialect: None,
            api_version: None,
            owner: None,
            owner_rights: false,
            mesh: None,
        };
        let shared = VmShared {
            config: VmConfig {
                stream_buffer: 64 * 1024,
                keepalive,
                keepalive_misses: 1,
                stall_timeout: Duration::from_secs(1),
                stdin_buffer: stdin::DEFAULT_STDIN_BUFFER,
                vm_stdin_buffer: stdin::DEFAULT_VM_STDIN_BUFFER,
                stdin_stall_timeout: Duration::from_secs(1),
                vm_buffer: 1 << 20,
                recovery_timeout: Duration::from_secs(1),
                tokens: TokenLimits::default(),
            },
            events: broadcast::channel(16).0,
            tokens: Arc::new(Mutex::new(HashMap::new())),
            token_owners: Arc::new(Mutex::new(HashMap::new())),
        };
        let (vm, inbox) = Vm::new(
            &record,
            Some((dialect, dialect.api_version())),
            false,
            &shared,
        );
        vm.transition(VmState::Ready);
        (vm, inbox)
    }
}
