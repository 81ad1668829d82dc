//! Request and response shapes of the JSON-RPC methods. Field names are the wire names.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `proxy.version` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The daemon's release version (semver).
    pub version: String,
    /// [`crate::API_VERSION`] of the daemon.
    pub api_version: u32,
    /// Capabilities this daemon serves, e.g. `"jsonrpc"`, `"legacy-v2"`, `"streams"`, `"events"`.
    pub features: Vec<String>,
}

/// `proxy.health` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `"ok"` while the daemon serves.
    pub status: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Registered VMs (ready, lost and recovering).
    pub vms: usize,
    /// VMs whose agent connection is lost.
    pub vms_lost: usize,
    /// VMs from the state directory still being reconnected after a restart.
    #[serde(default)]
    pub vms_recovering: usize,
    /// What the admin `/ready` answers: recovery is over and every meshed VM has a valid certificate.
    #[serde(default)]
    pub ready: bool,
}

/// `proxy.set_log_level` parameters and result: a level (`error` .. `trace`) or a filter directive list such
/// as `warn,cc_proxy::vm=debug`; the result is the filter now in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLevel {
    pub level: String,
}

/// `tap.observe` parameters; every field is optional, unknown fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapParams {
    /// Only this VM's events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Only these events (`agent_command`, `process_started`, `process_exited`, `stream_attached`,
    /// `stream_detached`, `vm_state`, `mesh_inbound_request`, `mesh_outbound_request`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Vec<String>>,
    /// End the tap after this many events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Most events per second, 1 to 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
}

/// `events.subscribe` parameters (or none): only one VM's events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

/// `vm.register` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterParams {
    /// The VM's id: 1 to 128 characters of `[A-Za-z0-9._-]`.
    pub id: String,
    /// The agent's control channel URI (`unix://`, `vsock://`, `hvsock://`, `tcp://`).
    pub control: String,
    /// The agent's I/O channel URI.
    pub io: String,
    /// Optional console URI whose lines are logged at debug.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// How long to wait for the agent's READY, in milliseconds (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Optional mesh front for this VM (see `docs/mesh.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<crate::mesh::MeshConfig>,
}

/// `vm.register` / `vm.attach` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResult {
    pub id: String,
    /// `"hyperstart"` or `"cc-agent"`.
    pub dialect: String,
    /// The agent's API version from GETVERSION.
    pub api_version: u32,
}

/// Parameters naming one VM (`vm.attach`, `vm.unregister`, `vm.info`, `stream.allocate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmId {
    #[serde(alias = "vm")]
    pub id: String,
}

/// One VM as `vm.list` and `vm.info` report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: String,
    pub state: VmStateName,
    /// Why the VM is lost, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_reason: Option<String>,
    pub dialect: String,
    pub api_version: u32,
    pub control: String,
    pub io: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// Seconds since registration (or since recovery after a restart).
    pub uptime_secs: u64,
    /// Agent commands answered (ACK or ERROR).
    pub commands: u64,
    /// Agent commands that failed (ERROR, timeout, lost).
    pub errors: u64,
    /// Streams whose process has not finished.
    pub streams: usize,
    /// Live stream tokens (allocated and not yet freed).
    pub tokens: usize,
    /// True when this VM was recovered from the state directory after a daemon restart.
    pub recovered: bool,
    /// The uid that owns the VM: the client that registered it (root for VMs recorded before owners were).
    /// Only the owner and privileged clients see the VM at all.
    #[serde(default)]
    pub owner: u32,
    /// The mesh front's configuration and certificate, for a meshed VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<crate::mesh::MeshInfo>,
}

/// A VM's state as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmStateName {
    /// The agent answers; commands and streams work.
    Ready,
    /// A channel to the agent failed; the VM stays listed (with `lost_reason`) until it is unregistered.
    Lost,
    /// Loaded from the state directory after a restart, its agent not reconnected yet.
    Recovering,
}

impl VmStateName {
    pub fn as_str(self) -> &'static str {
        match self {
            VmStateName::Ready => "ready",
            VmStateName::Lost => "lost",
            VmStateName::Recovering => "recovering",
        }
    }
}

/// Compares with the wire name, so `info.state == "ready"` reads as the JSON does.
impl PartialEq<&str> for VmStateName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for VmStateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// `agent.call` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentCallParams {
    /// The VM id.
    pub vm: String,
    /// The lower-case agent command name, e.g. `"ping"`, `"execcmd"`, `"newcontainer"`.
    pub command: String,
    /// The command's JSON payload (absent = empty payload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Reply deadline in milliseconds, counted from when the daemon receives the call (default 30000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// For `newcontainer`/`execcmd`: `1` allocates a stdio stream and fills `process.stdio`/`process.stderr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u32>,
    /// For `newcontainer`/`execcmd`: use this previously allocated token instead of a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Raw bytes (base64) sent right after the JSON payload in the same agent message, as `writefile`
    /// needs for the file's content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

/// `agent.call` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AgentCallResult {
    /// The agent's ACK payload as JSON, only when its bytes are exactly that JSON as the daemon would
    /// print it (`null` when empty or otherwise).
    #[serde(default)]
    pub data: Value,
    /// The ACK payload, byte for byte, in base64, whenever it is not empty (e.g. GETVERSION's 4 bytes,
    /// `readfile`'s file content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// The stream token when one was allocated or used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The process id the daemon sent to the agent (hyperstart names processes by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
}

/// `stream.allocate` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamAllocation {
    pub token: String,
    /// Sequence number of stdin/stdout on the VM's I/O channel.
    pub stdio: u64,
    /// Sequence number of stderr.
    pub stderr: u64,
}

/// `stream.signal` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalParams {
    pub token: String,
    pub signal: i32,
}

/// `stream.resize` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeParams {
    pub token: String,
    pub rows: u16,
    pub cols: u16,
}

/// Parameters naming one token (`stream.close`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenParam {
    pub token: String,
}

/// An event delivered to `events.subscribe` subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    VmRegistered {
        vm: String,
    },
    VmUnregistered {
        vm: String,
    },
    VmLost {
        vm: String,
        reason: String,
    },
    ProcessExited {
        vm: String,
        /// The stream's short id: the first 8 characters of its token, as logs and the tap show it. Never
        /// the whole token, which is a secret of the client that allocated it.
        token: String,
        status: i32,
    },
}

impl Event {
    /// The VM the event is about.
    pub fn vm(&self) -> &str {
        match self {
            Event::VmRegistered { vm }
            | Event::VmUnregistered { vm }
            | Event::VmLost { vm, .. }
            | Event::ProcessExited { vm, .. } => vm,
        }
    }
}
