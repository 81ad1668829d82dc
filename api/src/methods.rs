//! JSON-RPC method names. Namespaced by what they act on: the proxy itself, VMs, agent commands, streams,
//! event subscriptions (WebSocket only) and the mesh front.

/// `proxy.version` → [`crate::types::VersionInfo`].
pub const PROXY_VERSION: &str = "proxy.version";
/// `proxy.health` → [`crate::types::Health`].
pub const PROXY_HEALTH: &str = "proxy.health";
/// `proxy.set_log_level` [`crate::types::LogLevel`] → [`crate::types::LogLevel`] now in force; privileged
/// clients only (uid 0, `--admin-group`).
pub const PROXY_SET_LOG_LEVEL: &str = "proxy.set_log_level";

/// `vm.register` [`crate::types::RegisterParams`] → [`crate::types::RegisterResult`].
pub const VM_REGISTER: &str = "vm.register";
/// `vm.attach {id}` → [`crate::types::RegisterResult`] of an already registered VM.
pub const VM_ATTACH: &str = "vm.attach";
/// `vm.unregister {id}` → `null`.
pub const VM_UNREGISTER: &str = "vm.unregister";
/// `vm.list` → array of [`crate::types::VmInfo`].
pub const VM_LIST: &str = "vm.list";
/// `vm.info {id}` → [`crate::types::VmInfo`].
pub const VM_INFO: &str = "vm.info";

/// `agent.call` [`crate::types::AgentCallParams`] → [`crate::types::AgentCallResult`].
pub const AGENT_CALL: &str = "agent.call";

/// `stream.allocate {vm}` → [`crate::types::StreamAllocation`].
pub const STREAM_ALLOCATE: &str = "stream.allocate";
/// `stream.signal {token, signal}` → `null`.
pub const STREAM_SIGNAL: &str = "stream.signal";
/// `stream.resize {token, rows, cols}` → `null`.
pub const STREAM_RESIZE: &str = "stream.resize";
/// `stream.close {token}` → `null`: frees the token; pending output is dropped.
pub const STREAM_CLOSE: &str = "stream.close";

/// `events.subscribe {vm?}` (WebSocket): notifications `events.event` carrying [`crate::types::Event`].
pub const EVENTS_SUBSCRIBE: &str = "events.subscribe";
/// The notification method of an events subscription.
pub const EVENTS_NOTIFICATION: &str = "events.event";
/// `events.unsubscribe`.
pub const EVENTS_UNSUBSCRIBE: &str = "events.unsubscribe";

/// `tap.observe {vm?, filter?, limit?}` (WebSocket): notifications `tap.event` with live tap events.
pub const TAP_OBSERVE: &str = "tap.observe";
/// The notification method of a tap.
pub const TAP_NOTIFICATION: &str = "tap.event";
/// `tap.unobserve`.
pub const TAP_UNOBSERVE: &str = "tap.unobserve";

/// `mesh.trust_anchors` → [`crate::mesh::TrustAnchors`]: the PEM bundle peers must trust.
pub const MESH_TRUST_ANCHORS: &str = "mesh.trust_anchors";
/// `mesh.identity {id}` → [`crate::mesh::MeshIdentity`]: a meshed VM's identity and served certificate.
pub const MESH_IDENTITY: &str = "mesh.identity";
/// `mesh.endpoints {id}` → [`crate::mesh::MeshEndpoints`]: each outbound destination's endpoints, their state
/// and load.
pub const MESH_ENDPOINTS: &str = "mesh.endpoints";
