//! Stable error codes of the JSON-RPC API.
//!
//! Standard JSON-RPC codes (-32700 parse error, -32600 invalid request, -32601 method not found, -32602 invalid
//! params, -32603 internal error) keep their meaning. The daemon's own codes are positive, grouped by the
//! resource at fault, and never change meaning. Each error's `data` object names the VM, token or field at fault.

/// A VM with this id is already registered.
pub const VM_EXISTS: i32 = 1001;
/// No VM with this id is registered.
pub const VM_NOT_FOUND: i32 = 1002;
/// An endpoint URI is malformed or names an unsupported scheme.
pub const INVALID_URI: i32 = 1003;
/// An endpoint could not be reached (connect refused, no such socket, handshake refused).
pub const UNREACHABLE: i32 = 1004;
/// The agent did not answer in time (READY during registration, or a command's reply).
pub const AGENT_TIMEOUT: i32 = 1005;
/// The agent answered a command with ERROR; `message` carries the agent's text.
pub const AGENT_ERROR: i32 = 1006;
/// The VM's agent connection is lost; the VM stays listed as `lost` until unregistered.
pub const VM_LOST: i32 = 1007;
/// The agent command name is not known in the VM's dialect.
pub const UNKNOWN_COMMAND: i32 = 1008;
/// The stream token is unknown, expired, or belongs to another VM.
pub const TOKEN_NOT_FOUND: i32 = 1009;
/// The stream already has an attached shim.
pub const STREAM_BUSY: i32 = 1010;
/// A parameter is present and well-typed but its value is not acceptable (e.g. an id with a slash).
pub const INVALID_ARGUMENT: i32 = 1011;
/// The agent reports an API version whose dialect cc-proxy does not speak.
pub const UNSUPPORTED_AGENT: i32 = 1012;
/// The agent broke the wire protocol (malformed frame, unexpected reply).
pub const AGENT_PROTOCOL: i32 = 1013;
/// The daemon is shutting down and takes no new work.
pub const SHUTTING_DOWN: i32 = 1014;
/// The VM is being unregistered; the call did not complete.
pub const VM_UNREGISTERED: i32 = 1015;
/// The daemon cannot take more of this resource (VMs, streams, queued commands).
pub const LIMIT_EXCEEDED: i32 = 1016;
/// The VM is still being reconnected after a daemon restart and its recovery did not finish within
/// `--recovery-timeout` (requests for a recovering VM wait that long for the outcome first).
pub const VM_RECOVERING: i32 = 1017;
/// The client may not do this: the VM belongs to another uid (only its owner, uid 0 and members of the
/// daemon's `--admin-group` may use it), or the method is for privileged clients only. `data` holds the
/// client's `uid` and, when a VM is at fault, its id as `vm`.
pub const PERMISSION_DENIED: i32 = 1018;

/// Too many requests are in flight on this connection (`--max-requests-per-connection`); `data` names the
/// limit. Wait for answers, or use another connection.
pub const TOO_MANY_REQUESTS: i32 = 1019;
/// The VM holds `--max-tokens-per-vm` stream tokens already; `data` names the VM and the limit (`max`).
pub const TOO_MANY_TOKENS_VM: i32 = 1020;
/// The client (its uid) holds `--max-tokens-per-client` stream tokens already; `data` names the uid and
/// the limit (`max`).
pub const TOO_MANY_TOKENS_CLIENT: i32 = 1021;
/// Too many client connections: `--max-connections` in total or `--max-connections-per-uid` for this uid,
/// or the daemon keeps its last file descriptors in reserve (`--fd-reserve`). Sent as an HTTP 503 answer
/// (or a legacy error response) on a refused connection, which is then closed.
pub const TOO_MANY_CONNECTIONS: i32 = 1022;

/// The VM's `mesh` object is invalid (`data.field` names the part at fault), or one of its listeners cannot be
/// set up (an address in use, a socket path that cannot be bound).
pub const MESH_CONFIG: i32 = 1030;

/// A short stable name for a code, used in logs and metrics labels.
pub fn code_name(code: i32) -> &'static str {
    match code {
        -32700 => "parse_error",
        -32007 => "request_too_big",
        -32600 => "invalid_request",
        -32601 => "method_not_found",
        -32602 => "invalid_params",
        -32603 => "internal_error",
        VM_EXISTS => "vm_exists",
        VM_NOT_FOUND => "vm_not_found",
        INVALID_URI => "invalid_uri",
        UNREACHABLE => "unreachable",
        AGENT_TIMEOUT => "agent_timeout",
        AGENT_ERROR => "agent_error",
        VM_LOST => "vm_lost",
        UNKNOWN_COMMAND => "unknown_command",
        TOKEN_NOT_FOUND => "token_not_found",
        STREAM_BUSY => "stream_busy",
        INVALID_ARGUMENT => "invalid_argument",
        UNSUPPORTED_AGENT => "unsupported_agent",
        AGENT_PROTOCOL => "agent_protocol",
        SHUTTING_DOWN => "shutting_down",
        VM_UNREGISTERED => "vm_unregistered",
        LIMIT_EXCEEDED => "limit_exceeded",
        VM_RECOVERING => "vm_recovering",
        PERMISSION_DENIED => "permission_denied",
        TOO_MANY_REQUESTS => "too_many_requests",
        TOO_MANY_TOKENS_VM => "too_many_tokens_vm",
        TOO_MANY_TOKENS_CLIENT => "too_many_tokens_client",
        TOO_MANY_CONNECTIONS => "too_many_connections",
        -32010 => "batch_too_long",
        MESH_CONFIG => "mesh_config",
        _ => "other",
    }
}
