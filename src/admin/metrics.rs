//! Every metric the daemon exports, declared in one place and incremented where the event happens.
//!
//! Per-VM series are created once at registration ([`VmMetrics`]) so the data path increments plain
//! atomic counters without label lookups or allocation, and are removed when the VM is unregistered.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};

use cc_proxy_api::types::VmStateName;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabel {
    pub vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabel {
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuanceLabels {
    pub identity: String,
    /// `ca` or `files`.
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub vm: String,
    pub command: String,
    pub result: CommandOutcome,
}

/// How an agent command ended: the `result` label of `cc_proxy_agent_commands` and of the tap's
/// `agent_command` events.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandOutcome {
    /// ACK.
    Ok,
    /// ERROR from the agent.
    Error,
    /// No reply before the deadline.
    Timeout,
    /// The VM was lost first.
    Lost,
    /// Refused or cut short by the daemon (queue full, unregistered, stopping).
    Failed,
}

impl CommandOutcome {
    /// The label value, as the tap serializes it too.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandOutcome::Ok => "ok",
            CommandOutcome::Error => "error",
            CommandOutcome::Timeout => "timeout",
            CommandOutcome::Lost => "lost",
            CommandOutcome::Failed => "failed",
        }
    }

    /// The agent answered (ACK or ERROR).
    pub fn answered(self) -> bool {
        matches!(self, CommandOutcome::Ok | CommandOutcome::Error)
    }
}

/// Why the daemon failed a stream: the `reason` label of `cc_proxy_stream_failures` and of the tap's
/// `stream_failed` events.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamFailure {
    /// Its output buffer stayed full while its shim read nothing for `--stall-timeout`.
    OutputStall,
    /// The VM's I/O channel took no stdin for `--stdin-stall-timeout` and this stream's process was the
    /// likely reason (it did not read its stdin).
    StdinStall,
}

impl StreamFailure {
    /// The label value, as the tap serializes it too.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamFailure::OutputStall => "output_stall",
            StreamFailure::StdinStall => "stdin_stall",
        }
    }

    pub const ALL: [StreamFailure; 2] = [StreamFailure::OutputStall, StreamFailure::StdinStall];
}

/// How a shim left a stream: the `kind` label of `cc_proxy_shim_detaches` and of the tap's
/// `stream_detached` events.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DetachKind {
    /// A clean detach that keeps the token.
    Detach,
    /// The shim (or a client) freed the token.
    Close,
    /// The connection went away; the token is kept.
    Drop,
    /// The stream ended and its last frame was written.
    Done,
}

impl DetachKind {
    /// The label value, as the tap serializes it too.
    pub fn as_str(self) -> &'static str {
        match self {
            DetachKind::Detach => "detach",
            DetachKind::Close => "close",
            DetachKind::Drop => "drop",
            DetachKind::Done => "done",
        }
    }

    pub const ALL: [DetachKind; 4] = [
        DetachKind::Detach,
        DetachKind::Close,
        DetachKind::Drop,
        DetachKind::Done,
    ];
}

/// Which limit refused or closed something: the `limit` label of `cc_proxy_limit_refusals`. Each is a flag
/// documented in docs/operations.md (section Limits).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum LimitKind {
    /// A request id longer than `--max-id-bytes` (answered -32600, id null).
    IdTooLong,
    /// A batch longer than `--max-batch` (answered -32010).
    BatchTooLong,
    /// More than `--max-requests-per-connection` requests in flight on one connection (1019).
    RequestsInFlight,
    /// A client that stopped reading its responses for `--client-write-timeout` (connection closed).
    SlowConsumer,
    /// A request head, WebSocket handshake or legacy frame not complete within `--client-header-timeout`.
    HeaderTimeout,
    /// A connection with nothing in flight and no traffic for `--client-idle-timeout` (closed).
    Idle,
    /// A connection past `--max-connections` (refused).
    ConnectionsTotal,
    /// A connection past `--max-connections-per-uid` (refused).
    ConnectionsPerUid,
    /// A connection refused to keep `--fd-reserve` descriptors free.
    FdReserve,
    /// A token past `--max-tokens-per-vm` (1020).
    TokensPerVm,
    /// A token past `--max-tokens-per-client` (1021).
    TokensPerClient,
    /// A token never attached nor started within `--token-ttl` (freed).
    TokenExpired,
}

impl LimitKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::IdTooLong => "id_too_long",
            LimitKind::BatchTooLong => "batch_too_long",
            LimitKind::RequestsInFlight => "requests_in_flight",
            LimitKind::SlowConsumer => "slow_consumer",
            LimitKind::HeaderTimeout => "header_timeout",
            LimitKind::Idle => "idle",
            LimitKind::ConnectionsTotal => "connections_total",
            LimitKind::ConnectionsPerUid => "connections_per_uid",
            LimitKind::FdReserve => "fd_reserve",
            LimitKind::TokensPerVm => "tokens_per_vm",
            LimitKind::TokensPerClient => "tokens_per_client",
            LimitKind::TokenExpired => "token_expired",
        }
    }
}

impl EncodeLabelValue for LimitKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        self.as_str().encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub limit: LimitKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLatencyLabels {
    pub vm: String,
    pub command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub vm: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub vm: String,
    pub reason: StreamFailure,
}

impl EncodeLabelValue for StreamFailure {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        self.as_str().encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetachLabels {
    pub vm: String,
    pub kind: DetachKind,
}

impl EncodeLabelValue for CommandOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        self.as_str().encode(encoder)
    }
}

impl EncodeLabelValue for DetachKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        self.as_str().encode(encoder)
    }
}

/// The daemon-wide facts of one scrape: `cc_proxy_build_info` (always 1; the labels are the facts) and
/// `cc_proxy_ready`, 1 exactly when `/ready` answers 200 (every recorded VM recovered or marked lost, every meshed VM with a valid certificate), read
/// from the registry at scrape time, so the dashboard's "Ready" is the readiness check itself.
pub fn register_daemon(registry: &mut Registry, ready: bool) {
    let r = registry.sub_registry_with_prefix("cc_proxy");
    r.register(
        "build",
        "The cc-proxy build: version and JSON-RPC API version",
        prometheus_client::metrics::info::Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("api_version", cc_proxy_api::API_VERSION.to_string()),
        ]),
    );
    r.register(
        "ready",
        "1 when the daemon is ready (the admin /ready check answers 200), else 0",
        prometheus_client::metrics::gauge::ConstGauge::new(i64::from(ready)),
    );
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~50 s
    Histogram::new(exponential_buckets(0.00005, 2.5, 16))
}

/// The daemon's metric families.
pub struct Metrics {
    pub vms: Family<StateLabel, Gauge>,
    pub agent_commands: Family<CommandLabels, Counter>,
    pub agent_command_duration: Family<CommandLatencyLabels, Histogram, fn() -> Histogram>,
    pub agent_connects: Family<VmLabel, Counter>,
    pub vm_lost: Family<VmLabel, Counter>,
    pub io_bytes: Family<DirectionLabels, Counter>,
    pub io_packets: Family<DirectionLabels, Counter>,
    pub streams_open: Family<VmLabel, Gauge>,
    pub stream_buffered_bytes: Family<VmLabel, Gauge>,
    pub stream_backpressure: Family<VmLabel, Counter>,
    pub stream_failures: Family<FailureLabels, Counter>,
    pub stream_dropped_bytes: Family<VmLabel, Counter>,
    pub shim_attaches: Family<VmLabel, Counter>,
    pub shim_detaches: Family<DetachLabels, Counter>,
    pub client_connections: Family<ProtocolLabel, Counter>,
    pub client_connections_open: Family<ProtocolLabel, Gauge>,
    pub api_errors: Family<CodeLabel, Counter>,
    pub limit_refusals: Family<LimitLabel, Counter>,
    pub tap_dropped: Counter,
    /// Requests refused because the client may not use the VM or method (`server/authz.rs`).
    pub permission_denied: Family<ProtocolLabel, Counter>,
    /// Expiry (unix seconds) of each meshed identity's current certificate (Linkerd's name).
    pub mesh_cert_expiry: Family<IdentityLabel, Gauge>,
    /// Certificates issued by the CA or loaded from files.
    pub mesh_cert_issuances: Family<IssuanceLabels, Counter>,
    /// Identity file reloads refused (the previous certificate kept).
    pub mesh_identity_reload_failures: Family<IdentityLabel, Counter>,
    pub mesh_identity_svc_failures: Family<IdentityLabel, Counter>,
    /// Certificates withdrawn because they expired before being renewed.
    pub mesh_cert_expirations: Family<IdentityLabel, Counter>,
    /// Trust anchor reloads refused (the previous anchors kept).
    pub mesh_anchor_reload_failures: Counter,
}

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            vms: Family::default(),
            agent_commands: Family::default(),
            agent_command_duration: Family::new_with_constructor(latency_histogram),
            agent_connects: Family::default(),
            vm_lost: Family::default(),
            io_bytes: Family::default(),
            io_packets: Family::default(),
            streams_open: Family::default(),
            stream_buffered_bytes: Family::default(),
            stream_backpressure: Family::default(),
            stream_failures: Family::default(),
            stream_dropped_bytes: Family::default(),
            shim_attaches: Family::default(),
            shim_detaches: Family::default(),
            client_connections: Family::default(),
            client_connections_open: Family::default(),
            api_errors: Family::default(),
            limit_refusals: Family::default(),
            tap_dropped: Counter::default(),
            permission_denied: Family::default(),
            mesh_cert_expiry: Family::default(),
            mesh_cert_issuances: Family::default(),
            mesh_identity_reload_failures: Family::default(),
            mesh_identity_svc_failures: Family::default(),
            mesh_cert_expirations: Family::default(),
            mesh_anchor_reload_failures: Counter::default(),
        }
    }

    /// Register every family in `registry` under the `cc_proxy` prefix.
    pub fn register(&self, registry: &mut Registry) {
        // Linkerd's name, so its dashboards' certificate panels work (with an `identity` label: one daemon
        // serves many identities).
        registry.register_with_unit(
            "identity_cert_expiration_timestamp",
            "Expiry of each meshed identity's current certificate, as unix time",
            Unit::Seconds,
            self.mesh_cert_expiry.clone(),
        );
        let r = registry.sub_registry_with_prefix("cc_proxy");
        r.register("vms", "Registered VMs by state", self.vms.clone());
        r.register(
            "agent_commands",
            "Agent commands by command and result",
            self.agent_commands.clone(),
        );
        r.register_with_unit(
            "agent_command_duration",
            "Agent command latency from queueing to reply",
            Unit::Seconds,
            self.agent_command_duration.clone(),
        );
        r.register(
            "agent_connects",
            "Agent channel connections (registrations and reconnects)",
            self.agent_connects.clone(),
        );
        r.register(
            "vm_losses",
            "Times a VM's agent connection was lost",
            self.vm_lost.clone(),
        );
        r.register_with_unit(
            "io",
            "I/O channel traffic by direction, frame headers included",
            Unit::Bytes,
            self.io_bytes.clone(),
        );
        r.register(
            "io_packets",
            "I/O channel packets by direction",
            self.io_packets.clone(),
        );
        r.register(
            "streams_open",
            "Streams whose process has not finished",
            self.streams_open.clone(),
        );
        r.register_with_unit(
            "stream_buffered",
            "Output waiting for a shim",
            Unit::Bytes,
            self.stream_buffered_bytes.clone(),
        );
        r.register(
            "stream_backpressure_events",
            "Times a full stream buffer paused a VM's I/O channel",
            self.stream_backpressure.clone(),
        );
        r.register(
            "stream_failures",
            "Streams failed by the daemon, by reason (output_stall: the output buffer stayed full; \
             stdin_stall: the process left its stdin unread and stalled its VM's stdin)",
            self.stream_failures.clone(),
        );
        r.register_with_unit(
            "stream_dropped",
            "Output for streams already closed, discarded",
            Unit::Bytes,
            self.stream_dropped_bytes.clone(),
        );
        r.register(
            "shim_attaches",
            "Shim attachments to streams",
            self.shim_attaches.clone(),
        );
        r.register(
            "shim_detaches",
            "Shim detachments by kind (detach, close, drop)",
            self.shim_detaches.clone(),
        );
        r.register(
            "client_connections",
            "Client connections accepted by protocol",
            self.client_connections.clone(),
        );
        r.register(
            "client_connections_open",
            "Client connections open by protocol",
            self.client_connections_open.clone(),
        );
        r.register(
            "api_errors",
            "API errors returned by code",
            self.api_errors.clone(),
        );
        r.register(
            "limit_refusals",
            "Requests, connections and streams refused or closed by a limit, by limit",
            self.limit_refusals.clone(),
        );
        r.register(
            "tap_dropped_events",
            "Tap events dropped because a tap client was slow",
            self.tap_dropped.clone(),
        );
        r.register(
            "permission_denied",
            "Requests refused because the client's uid may not use the VM or method, by protocol",
            self.permission_denied.clone(),
        );
        r.register(
            "mesh_certificate_issuances",
            "Mesh certificates issued by the embedded CA or loaded from files, by identity",
            self.mesh_cert_issuances.clone(),
        );
        r.register(
            "mesh_identity_service_failures",
            "Certify requests to the identity service that failed or were answered with an unusable certificate, by identity",
            self.mesh_identity_svc_failures.clone(),
        );
        r.register(
            "mesh_certificate_expirations",
            "Mesh certificates withdrawn because they expired before their source renewed them (the listeners stop serving TLS until a new one comes), by identity",
            self.mesh_cert_expirations.clone(),
        );
        r.register(
            "mesh_identity_reload_failures",
            "Identity file reloads refused as invalid (the previous certificate is kept), by identity",
            self.mesh_identity_reload_failures.clone(),
        );
        r.register(
            "mesh_trust_anchor_reload_failures",
            "Trust anchor file reloads refused as invalid (the previous anchors are kept)",
            self.mesh_anchor_reload_failures.clone(),
        );
    }

    /// A new certificate for `identity` is served.
    pub fn mesh_certificate(&self, identity: &str, source: &'static str, not_after_unix: i64) {
        let label = IdentityLabel {
            identity: identity.to_string(),
        };
        self.mesh_cert_expiry
            .get_or_create(&label)
            .set(not_after_unix);
        self.mesh_cert_issuances
            .get_or_create(&IssuanceLabels {
                identity: identity.to_string(),
                source,
            })
            .inc();
    }

    /// An identity's files were refused on reload.
    pub fn mesh_reload_failure(&self, identity: &str) {
        self.mesh_identity_reload_failures
            .get_or_create(&IdentityLabel {
                identity: identity.to_string(),
            })
            .inc();
    }

    /// A request to the identity service failed.
    pub fn mesh_identity_svc_failure(&self, identity: &str) {
        self.mesh_identity_svc_failures
            .get_or_create(&IdentityLabel {
                identity: identity.to_string(),
            })
            .inc();
    }

    /// The anchors file was refused on reload.
    pub fn mesh_anchor_reload_failure(&self) {
        self.mesh_anchor_reload_failures.inc();
    }

    /// No VM uses `identity` any more: its expiry series goes (the counters stay, as counters do).
    /// An identity's certificate expired before its source renewed it and was withdrawn.
    pub fn mesh_certificate_expired(&self, identity: &str) {
        self.mesh_cert_expirations
            .get_or_create(&IdentityLabel {
                identity: identity.to_string(),
            })
            .inc();
    }

    pub fn mesh_identity_gone(&self, identity: &str) {
        self.mesh_cert_expiry.remove(&IdentityLabel {
            identity: identity.to_string(),
        });
    }

    /// The `vms{state}` gauge of one state.
    pub fn vms_in(&self, state: VmStateName) -> Gauge {
        self.vms
            .get_or_create(&StateLabel {
                state: state.as_str(),
            })
            .clone()
    }

    /// Count one refusal (or closing) by a limit.
    pub fn limit_refused(&self, limit: LimitKind) {
        self.limit_refusals
            .get_or_create(&LimitLabel { limit })
            .inc();
    }

    /// Count an API error by its stable name.
    pub fn api_error(&self, code: i32) {
        self.api_errors
            .get_or_create(&CodeLabel {
                code: cc_proxy_api::error::code_name(code).into(),
            })
            .inc();
    }
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Per-VM metric handles, created at registration.
#[derive(Clone)]
pub struct VmMetrics {
    vm: String,
    /// (command, result) pairs this VM has counted, so [`VmMetrics::remove`] can find their series.
    commands_seen: Arc<Mutex<HashSet<(String, CommandOutcome)>>>,
    /// Set by [`VmMetrics::remove`]: late events of an unregistered VM must not recreate its series.
    removed: Arc<std::sync::atomic::AtomicBool>,
    pub io_in_bytes: Counter,
    pub io_out_bytes: Counter,
    pub io_in_packets: Counter,
    pub io_out_packets: Counter,
    pub streams_open: Gauge,
    pub buffered: Gauge,
    pub backpressure: Counter,
    /// Streams failed, by [`StreamFailure`] (indexed by its position in [`StreamFailure::ALL`]).
    stream_failures: [Counter; 2],
    pub dropped: Counter,
    pub attaches: Counter,
}

impl VmMetrics {
    pub fn new(vm: &str) -> VmMetrics {
        // Each lookup is its own statement: a family's read guard must be dropped before the next lookup in
        // the same family may take its write lock.
        fn counter<L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug>(
            f: &Family<L, Counter>,
            l: &L,
        ) -> Counter {
            let c = f.get_or_create(l).clone();
            c
        }
        fn gauge(f: &Family<VmLabel, Gauge>, l: &VmLabel) -> Gauge {
            let g = f.get_or_create(l).clone();
            g
        }
        let m = &*METRICS;
        let vl = VmLabel { vm: vm.to_string() };
        let dir = |d: &str| DirectionLabels {
            vm: vm.to_string(),
            direction: d.to_string(),
        };
        let io_in_bytes = counter(&m.io_bytes, &dir("from_agent"));
        let io_out_bytes = counter(&m.io_bytes, &dir("to_agent"));
        let io_in_packets = counter(&m.io_packets, &dir("from_agent"));
        let io_out_packets = counter(&m.io_packets, &dir("to_agent"));
        let streams_open = gauge(&m.streams_open, &vl);
        let buffered = gauge(&m.stream_buffered_bytes, &vl);
        let backpressure = counter(&m.stream_backpressure, &vl);
        let stream_failures = StreamFailure::ALL.map(|reason| {
            counter(
                &m.stream_failures,
                &FailureLabels {
                    vm: vm.to_string(),
                    reason,
                },
            )
        });
        let dropped = counter(&m.stream_dropped_bytes, &vl);
        let attaches = counter(&m.shim_attaches, &vl);
        VmMetrics {
            vm: vm.to_string(),
            commands_seen: Arc::default(),
            removed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            io_in_bytes,
            io_out_bytes,
            io_in_packets,
            io_out_packets,
            streams_open,
            buffered,
            backpressure,
            stream_failures,
            dropped,
            attaches,
        }
    }

    /// The handles a VM's streams count with; `buffered` is the VM's buffer account.
    pub fn stream_counters(
        &self,
        buffered: Arc<crate::stream::BufferAccount>,
    ) -> crate::stream::StreamCounters {
        crate::stream::StreamCounters {
            buffered,
            streams_open: self.streams_open.clone(),
            dropped: self.dropped.clone(),
            attaches: self.attaches.clone(),
        }
    }

    /// Count one agent command's outcome and latency.
    pub fn command(&self, command: &str, result: CommandOutcome, seconds: f64) {
        if self.removed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let m = &*METRICS;
        if let Ok(mut seen) = self.commands_seen.lock() {
            seen.insert((command.to_string(), result));
        }
        m.agent_commands
            .get_or_create(&CommandLabels {
                vm: self.vm.clone(),
                command: command.into(),
                result,
            })
            .inc();
        m.agent_command_duration
            .get_or_create(&CommandLatencyLabels {
                vm: self.vm.clone(),
                command: command.into(),
            })
            .observe(seconds);
    }

    /// Count a stream the daemon failed.
    pub fn stream_failed(&self, reason: StreamFailure) {
        self.stream_failures[reason as usize].inc();
    }

    pub fn detach(&self, kind: DetachKind) {
        if self.removed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        METRICS
            .shim_detaches
            .get_or_create(&DetachLabels {
                vm: self.vm.clone(),
                kind,
            })
            .inc();
    }

    pub fn connected(&self) {
        if self.removed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        METRICS
            .agent_connects
            .get_or_create(&VmLabel {
                vm: self.vm.clone(),
            })
            .inc();
    }

    pub fn lost(&self) {
        if self.removed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        METRICS
            .vm_lost
            .get_or_create(&VmLabel {
                vm: self.vm.clone(),
            })
            .inc();
    }

    /// Remove this VM's series (on unregister), so a host with VM churn does not grow its scrape forever.
    pub fn remove(&self) {
        self.removed
            .store(true, std::sync::atomic::Ordering::Release);
        let m = &*METRICS;
        let vl = VmLabel {
            vm: self.vm.clone(),
        };
        for d in ["from_agent", "to_agent"] {
            let l = DirectionLabels {
                vm: self.vm.clone(),
                direction: d.into(),
            };
            m.io_bytes.remove(&l);
            m.io_packets.remove(&l);
        }
        m.streams_open.remove(&vl);
        m.stream_buffered_bytes.remove(&vl);
        m.stream_backpressure.remove(&vl);
        for reason in StreamFailure::ALL {
            m.stream_failures.remove(&FailureLabels {
                vm: self.vm.clone(),
                reason,
            });
        }
        m.stream_dropped_bytes.remove(&vl);
        m.shim_attaches.remove(&vl);
        m.agent_connects.remove(&vl);
        m.vm_lost.remove(&vl);
        let seen: Vec<(String, CommandOutcome)> = self
            .commands_seen
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for (command, result) in seen {
            m.agent_commands.remove(&CommandLabels {
                vm: self.vm.clone(),
                command: command.clone(),
                result,
            });
            m.agent_command_duration.remove(&CommandLatencyLabels {
                vm: self.vm.clone(),
                command,
            });
        }
        for kind in DetachKind::ALL {
            m.shim_detaches.remove(&DetachLabels {
                vm: self.vm.clone(),
                kind,
            });
        }
    }
}
