//! The daemon's error type for client-facing operations, and its mapping onto stable JSON-RPC error codes.

use std::time::Duration;

use cc_proxy_api::error as code;
use serde_json::{json, Value};

use cc_proxy_protocol::Dialect;

use crate::admin::tap::TapError;
use crate::transport::TransportError;
use crate::vm::LostReason;

/// Everything a client request can fail with. Each variant maps to one stable code in `cc_proxy_api::error`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("VM {0:?} is already registered")]
    VmExists(String),
    #[error("no VM {0:?} is registered")]
    VmNotFound(String),
    #[error(transparent)]
    InvalidUri(std::sync::Arc<TransportError>),
    #[error(transparent)]
    Unreachable(Unreachable),
    #[error("VM {vm:?}: agent sent no READY and did not answer GETVERSION within {after:?}")]
    ReadyTimeout { vm: String, after: Duration },
    #[error("VM {vm:?}: agent did not answer {command} within {after:?}")]
    CommandTimeout {
        vm: String,
        command: String,
        after: Duration,
    },
    #[error("VM {vm:?}: agent refused {command}: {message}")]
    Agent {
        vm: String,
        command: String,
        message: String,
    },
    #[error("VM {vm:?} is lost: {reason}")]
    Lost { vm: String, reason: LostReason },
    #[error("unknown agent command {command:?} for the {dialect} dialect")]
    UnknownCommand { command: String, dialect: String },
    #[error("unknown stream token")]
    TokenNotFound,
    #[error("the stream already has a shim attached")]
    StreamBusy,
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error(
        "VM {vm:?}: agent API version {version} is not a dialect cc-proxy speaks ({})",
        supported_versions()
    )]
    UnsupportedAgent { vm: String, version: u32 },
    #[error("VM {vm:?}: agent protocol error: {reason}")]
    Protocol { vm: String, reason: String },
    #[error("cc-proxy is shutting down")]
    ShuttingDown,
    #[error("VM {0:?} was unregistered")]
    Unregistered(String),
    #[error("limit exceeded: {0}")]
    Limit(Limit),
    #[error("VM {0:?} is still being recovered after a restart")]
    Recovering(String),
    /// The client's uid may not use the VM (`vm: Some`) or call a privileged method (`vm: None`).
    #[error("permission denied: {}", denied_text(vm.as_deref(), *uid))]
    PermissionDenied { vm: Option<String>, uid: u32 },
    #[error("VM {vm:?}: invalid mesh configuration: {field}: {reason}")]
    MeshConfig {
        vm: String,
        field: String,
        reason: String,
    },
    #[error("VM {vm:?}: mesh listener: {reason}")]
    MeshListen { vm: String, reason: String },
    /// The stream's stdin was failed (`--stdin-stall-timeout`); never answered to a request, only logged.
    #[error(transparent)]
    Stdin(#[from] crate::vm::stdin::StdinError),
}

fn denied_text(vm: Option<&str>, uid: u32) -> String {
    match vm {
        Some(vm) => format!("VM {vm:?} belongs to another user (client uid {uid})"),
        None => format!("privileged clients only (client uid {uid})"),
    }
}

/// Why an agent could not be reached.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unreachable {
    /// The channel could not be opened (connect failed, timed out, hybrid-vsock handshake refused).
    #[error(transparent)]
    Transport(std::sync::Arc<TransportError>),
    #[error("VM {vm:?}: the agent closed the control channel during the handshake")]
    ClosedInHandshake { vm: String },
    #[error("VM {vm:?}: writing GETVERSION: {reason}")]
    HandshakeWrite { vm: String, reason: String },
}

/// Which bound a request ran into.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Limit {
    #[error("VM {vm} has {max} commands queued")]
    QueuedCommands { vm: String, max: usize },
    #[error("{0} VMs registered")]
    Vms(usize),
    #[error(transparent)]
    Taps(#[from] TapError),
    #[error(
        "{0} signals and resizes are already held for the token's process, which has not started"
    )]
    HeldControls(usize),
    #[error(
        "VM {vm} holds {max} stream tokens (--max-tokens-per-vm); free some with stream.close"
    )]
    TokensPerVm { vm: String, max: usize },
    #[error("uid {uid} holds {max} stream tokens (--max-tokens-per-client); free some with stream.close")]
    TokensPerClient { uid: u32, max: usize },
}

/// The API versions of every dialect, for the message of [`ProxyError::UnsupportedAgent`].
fn supported_versions() -> String {
    let mut versions: Vec<u32> = Dialect::ALL
        .iter()
        .flat_map(|d| d.api_versions().iter().copied())
        .collect();
    versions.sort_unstable();
    versions
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl ProxyError {
    pub fn invalid(field: &str, reason: impl Into<String>) -> ProxyError {
        ProxyError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The stable JSON-RPC error code.
    pub fn code(&self) -> i32 {
        match self {
            ProxyError::VmExists(_) => code::VM_EXISTS,
            ProxyError::VmNotFound(_) => code::VM_NOT_FOUND,
            ProxyError::InvalidUri(_) => code::INVALID_URI,
            ProxyError::Unreachable(_) => code::UNREACHABLE,
            ProxyError::ReadyTimeout { .. } | ProxyError::CommandTimeout { .. } => {
                code::AGENT_TIMEOUT
            }
            ProxyError::Agent { .. } => code::AGENT_ERROR,
            ProxyError::Lost { .. } => code::VM_LOST,
            ProxyError::UnknownCommand { .. } => code::UNKNOWN_COMMAND,
            ProxyError::TokenNotFound => code::TOKEN_NOT_FOUND,
            ProxyError::StreamBusy => code::STREAM_BUSY,
            ProxyError::InvalidArgument { .. } => code::INVALID_ARGUMENT,
            ProxyError::UnsupportedAgent { .. } => code::UNSUPPORTED_AGENT,
            ProxyError::Protocol { .. } => code::AGENT_PROTOCOL,
            ProxyError::ShuttingDown => code::SHUTTING_DOWN,
            ProxyError::Unregistered(_) => code::VM_UNREGISTERED,
            ProxyError::Limit(Limit::TokensPerVm { .. }) => code::TOO_MANY_TOKENS_VM,
            ProxyError::Limit(Limit::TokensPerClient { .. }) => code::TOO_MANY_TOKENS_CLIENT,
            ProxyError::Limit(_) | ProxyError::Stdin(_) => code::LIMIT_EXCEEDED,
            ProxyError::Recovering(_) => code::VM_RECOVERING,
            ProxyError::PermissionDenied { .. } => code::PERMISSION_DENIED,
            ProxyError::MeshConfig { .. } | ProxyError::MeshListen { .. } => code::MESH_CONFIG,
        }
    }

    /// The `data` member of the error object: names what is at fault.
    pub fn data(&self) -> Value {
        match self {
            ProxyError::VmExists(vm)
            | ProxyError::VmNotFound(vm)
            | ProxyError::Unregistered(vm)
            | ProxyError::Recovering(vm) => json!({"vm": vm}),
            ProxyError::ReadyTimeout { vm, after } => {
                json!({"vm": vm, "timeout_ms": after.as_millis() as u64})
            }
            ProxyError::CommandTimeout { vm, command, after } => {
                json!({"vm": vm, "command": command, "timeout_ms": after.as_millis() as u64})
            }
            ProxyError::Agent {
                vm,
                command,
                message,
            } => json!({"vm": vm, "command": command, "agent_error": message}),
            ProxyError::Lost { vm, reason } => json!({"vm": vm, "reason": reason.to_string()}),
            ProxyError::UnknownCommand { command, dialect } => {
                json!({"command": command, "dialect": dialect})
            }
            ProxyError::InvalidArgument { field, .. } => json!({"field": field}),
            ProxyError::UnsupportedAgent { vm, version } => {
                json!({"vm": vm, "api_version": version})
            }
            ProxyError::Protocol { vm, .. } => json!({"vm": vm}),
            ProxyError::TokenNotFound | ProxyError::StreamBusy => json!({"field": "token"}),
            ProxyError::InvalidUri(_) | ProxyError::Unreachable(_) => json!({"field": "uri"}),
            ProxyError::PermissionDenied { vm: Some(vm), uid } => json!({"vm": vm, "uid": uid}),
            ProxyError::PermissionDenied { vm: None, uid } => json!({"uid": uid}),
            ProxyError::Limit(Limit::TokensPerVm { vm, max }) => json!({"vm": vm, "max": max}),
            ProxyError::Limit(Limit::TokensPerClient { uid, max }) => {
                json!({"uid": uid, "max": max})
            }
            ProxyError::ShuttingDown | ProxyError::Limit(_) => Value::Null,
            ProxyError::Stdin(_) => json!({"field": "stdin"}),
            ProxyError::MeshConfig { vm, field, .. } => json!({"vm": vm, "field": field}),
            ProxyError::MeshListen { vm, .. } => json!({"vm": vm, "field": "mesh"}),
        }
    }
}

/// A URI that does not parse is the client's mistake; anything else means the agent cannot be reached.
impl From<TransportError> for ProxyError {
    fn from(e: TransportError) -> ProxyError {
        match e {
            TransportError::InvalidUri { .. } => ProxyError::InvalidUri(std::sync::Arc::new(e)),
            _ => ProxyError::Unreachable(Unreachable::Transport(std::sync::Arc::new(e))),
        }
    }
}

impl ProxyError {
    /// A VM's mesh could not be set up.
    pub fn mesh(vm: &str, e: crate::mesh::MeshSetupError) -> ProxyError {
        match e {
            crate::mesh::MeshSetupError::Config(c) => ProxyError::MeshConfig {
                vm: vm.to_string(),
                field: c.field,
                reason: c.reason,
            },
            crate::mesh::MeshSetupError::Listen(e) => ProxyError::MeshListen {
                vm: vm.to_string(),
                reason: e.to_string(),
            },
        }
    }
}

impl From<ProxyError> for jsonrpsee::types::ErrorObjectOwned {
    fn from(e: ProxyError) -> Self {
        // Counted in `cc_proxy_api_errors_total` by `server::rpc::errors` when the response leaves.
        let data = e.data();
        jsonrpsee::types::ErrorObjectOwned::owned(
            e.code(),
            e.to_string(),
            (!data.is_null()).then_some(data),
        )
    }
}
