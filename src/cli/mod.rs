//! Command-line interface: the daemon's options, and the client subcommands that talk to a running daemon.

pub mod commands;
pub mod tap;
mod terminal;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// The environment variable naming the socket when `--socket` is absent (like `DOCKER_HOST`).
pub const SOCKET_ENV: &str = "CC_PROXY_SOCKET";

const EXAMPLES: &str = "\
Examples:
  cc-proxy                                   run the daemon on /run/cc-oci-runtime/proxy.sock
  cc-proxy --socket /tmp/p.sock --state-dir /tmp/p-state --admin-addr off --log debug
                                             a private daemon beside the system one, dumping raw agent I/O
  cc-proxy vm list                           list registered VMs
  cc-proxy exec myvm uname -a                run a process in a VM and relay its stdio
  cc-proxy exec -e A=1 -w /tmp myvm env      ... with an environment variable and a working directory
  cc-proxy exec myvm --tty -- sh             an interactive shell
  cc-proxy --json vm info myvm               machine-readable output
  cc-proxy tap myvm --mesh                   the VM's mesh HTTP requests, live
  cc-proxy mesh identity myvm                its mesh identity and certificate";

/// Default of `--max-connections`: room for a shim per process on a full host (a shim holds one connection).
pub const DEFAULT_MAX_CONNECTIONS: usize = 65_536;

/// cc-proxy: the host daemon between container runtimes/shims and the agents inside the host's VMs.
#[derive(Debug, Parser)]
#[command(name = "cc-proxy", version, about, after_help = EXAMPLES, disable_help_subcommand = true)]
pub struct Cli {
    /// The AF_UNIX socket the daemon serves (and clients connect to); the flag wins over CC_PROXY_SOCKET.
    #[arg(long, global = true, env = SOCKET_ENV, default_value = cc_proxy_api::DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,

    /// Log level; when absent CC_PROXY_LOG_LEVEL is read, else `warn`.
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub log: Option<LogLevel>,

    /// Log line format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Where logs go: `auto` is journald when stderr is connected to the journal, else stderr.
    #[arg(long, value_enum, default_value = "auto")]
    pub log_target: LogTarget,

    /// Directory for recoverable state (registered VMs and their tokens).
    #[arg(long, default_value = "/var/lib/cc-proxy", value_name = "DIR")]
    pub state_dir: PathBuf,

    /// Address of the admin HTTP server (metrics, readiness, log level); `off` disables it.
    #[arg(long, default_value = "127.0.0.1:4191", value_name = "ADDR")]
    pub admin_addr: String,

    /// Group that owns the socket (mode 0660), when the daemon creates it.
    #[arg(long, value_name = "NAME")]
    pub socket_group: Option<String>,

    /// Group (name or gid) whose members are privileged clients like root: they may use every VM, see every
    /// event and call privileged methods. Others may use only the VMs they registered.
    #[arg(long, value_name = "NAME")]
    pub admin_group: Option<String>,

    /// Let loopback clients change the log level with the admin server's `PUT /proxy-log-level` (off by
    /// default: use `cc-proxy log-level LEVEL`, which the socket authorizes).
    #[arg(long)]
    pub admin_allow_log_level: bool,

    /// Send PING to an agent whose control channel has been idle SECS seconds (0 = off). A PING unanswered
    /// for SECS x --agent-keepalive-misses marks the VM lost: a hung agent is detected within
    /// SECS x (1 + MISSES) seconds of its last activity.
    #[arg(long, default_value_t = crate::config::DEFAULT_AGENT_KEEPALIVE_SECS, value_name = "SECS")]
    pub agent_keepalive: u64,

    /// Keepalive intervals a PING may go unanswered before the VM is lost (at least 1).
    #[arg(long, default_value_t = crate::config::DEFAULT_AGENT_KEEPALIVE_MISSES, value_name = "N")]
    pub agent_keepalive_misses: u32,

    /// Bytes of output kept per stream while its shim is absent or slow, before backpressure.
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
    pub stream_buffer: usize,

    /// Bytes buffered across one VM's streams before a stream past its own bound pauses the VM's I/O channel.
    /// Until then a stream whose shim is slow or absent borrows from this budget and the other streams flow.
    #[arg(long, default_value_t = 32 << 20, value_name = "BYTES")]
    pub vm_buffer: usize,

    /// Seconds one full stream (a shim not reading) may pause its VM's I/O channel before that stream is
    /// failed with an error frame, so the VM's other streams keep moving.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub stall_timeout: u64,

    /// Bytes of stdin one stream may have queued in the daemon before its shim waits; streams take turns on
    /// the VM's I/O channel, so one stream's stdin never queues ahead of another's.
    #[arg(long, default_value_t = crate::vm::stdin::DEFAULT_STDIN_BUFFER, value_name = "BYTES")]
    pub stdin_buffer: usize,

    /// Bytes of stdin queued across one VM's streams before every shim of the VM waits.
    #[arg(long, default_value_t = crate::vm::stdin::DEFAULT_VM_STDIN_BUFFER, value_name = "BYTES")]
    pub vm_stdin_buffer: usize,

    /// Seconds a VM's I/O channel may take no stdin while stdin is waiting before the stream most likely
    /// blocking it (a process that does not read its stdin) is failed and its process killed, so the VM's
    /// other processes receive stdin again.
    #[arg(long, default_value_t = crate::vm::stdin::DEFAULT_STDIN_STALL_TIMEOUT.as_secs(), value_name = "SECS")]
    pub stdin_stall_timeout: u64,

    /// Seconds to reconnect one recorded VM after a restart (connect and handshake); requests for a VM being
    /// recovered wait at most this long for the outcome, after which it is listed as lost.
    #[arg(long, default_value_t = crate::vm::registry::DEFAULT_RECOVERY_TIMEOUT.as_secs(), value_name = "SECS")]
    pub recovery_timeout: u64,

    /// Client connections (runtimes, shims, taps) served at once on the socket; one more is closed on accept,
    /// so a runaway client cannot exhaust the daemon's file descriptors.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_name = "N")]
    pub max_connections: usize,

    /// Client connections one uid may hold open at once (its peer credentials); one more is refused with an
    /// error, so one user cannot take every connection.
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_CONNECTIONS_PER_UID, value_name = "N")]
    pub max_connections_per_uid: usize,

    /// File descriptors kept free for the admin server, agents and state files: a new client connection is
    /// refused while fewer than N are left below the open-files limit.
    #[arg(long, default_value_t = crate::config::DEFAULT_FD_RESERVE, value_name = "N")]
    pub fd_reserve: u64,

    /// Stream tokens one VM may hold at once; one more is refused (1020).
    #[arg(long, default_value_t = crate::vm::DEFAULT_MAX_TOKENS_PER_VM, value_name = "N")]
    pub max_tokens_per_vm: usize,

    /// Stream tokens one client uid may hold at once across all VMs; one more is refused (1021).
    #[arg(long, default_value_t = crate::vm::DEFAULT_MAX_TOKENS_PER_CLIENT, value_name = "N")]
    pub max_tokens_per_client: usize,

    /// Seconds after which a token that was never attached by a shim nor used to start a process is freed.
    #[arg(long, default_value_t = crate::vm::DEFAULT_TOKEN_TTL.as_secs(), value_name = "SECS")]
    pub token_ttl: u64,

    /// Bytes of a JSON-RPC request id; a longer id is answered -32600 with id null (never echoed).
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_ID_BYTES, value_name = "BYTES")]
    pub max_id_bytes: usize,

    /// Entries of one JSON-RPC batch; a longer batch is refused whole with -32010.
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_BATCH, value_name = "N")]
    pub max_batch: u32,

    /// JSON-RPC requests one connection may have in flight at once (a batch counts once); more are
    /// answered 1019 at once.
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_REQUESTS_PER_CONNECTION, value_name = "N")]
    pub max_requests_per_connection: usize,

    /// Seconds a client may leave the daemon's writes to it blocked (it does not read its responses) before
    /// its connection is closed; while a write is blocked, no more requests are read from that connection.
    #[arg(long, default_value_t = crate::config::DEFAULT_CLIENT_WRITE_TIMEOUT.as_secs(), value_name = "SECS")]
    pub client_write_timeout: u64,

    /// Seconds to send a complete request head (HTTP headers, the WebSocket handshake) or legacy frame once
    /// it is due; a connection that takes longer is closed.
    #[arg(long, default_value_t = crate::config::DEFAULT_CLIENT_HEADER_TIMEOUT.as_secs(), value_name = "SECS")]
    pub client_header_timeout: u64,

    /// Seconds a client connection with nothing in flight may stay silent before it is closed. Attached
    /// streams and subscriptions (events, tap) are never idle.
    #[arg(long, default_value_t = crate::config::DEFAULT_CLIENT_IDLE_TIMEOUT.as_secs(), value_name = "SECS")]
    pub client_idle_timeout: u64,

    /// Bytes of client-supplied text (a legacy log frame's message and container id) written into one log
    /// line; the rest is cut, and control characters are always escaped.
    #[arg(long, default_value_t = crate::logging::DEFAULT_CLIENT_LOG_BYTES, value_name = "BYTES")]
    pub max_client_log: usize,

    /// Mesh: connections open at once on one mesh listener; one more is closed on accept and counted in
    /// `cc_proxy_mesh_refused_total{reason="listener_limit"}`.
    #[arg(long, default_value_t = crate::mesh::listener::DEFAULT_MAX_CONNECTIONS_PER_LISTENER, value_name = "N")]
    pub mesh_max_connections_per_listener: usize,

    /// Mesh: connections open at once on all mesh listeners together (`reason="total_limit"` beyond).
    #[arg(long, default_value_t = crate::mesh::listener::DEFAULT_MAX_CONNECTIONS, value_name = "N")]
    pub mesh_max_connections: usize,

    /// Mesh: milliseconds an inbound connection has to show its TLS ClientHello, and then its HTTP request
    /// line or preface; after that its bytes are treated as opaque TCP.
    #[arg(long, default_value_t = crate::mesh::listener::DEFAULT_DETECT_TIMEOUT.as_millis() as u64, value_name = "MS")]
    pub mesh_detect_timeout_ms: u64,

    /// Mesh: milliseconds to connect to an inbound target or an outbound endpoint.
    #[arg(long, default_value_t = crate::mesh::listener::DEFAULT_CONNECT_TIMEOUT.as_millis() as u64, value_name = "MS")]
    pub mesh_connect_timeout_ms: u64,

    /// Mesh: milliseconds for a TLS handshake, and for a transport or PROXY v2 header to arrive.
    #[arg(long, default_value_t = crate::mesh::listener::DEFAULT_HANDSHAKE_TIMEOUT.as_millis() as u64, value_name = "MS")]
    pub mesh_handshake_timeout_ms: u64,

    /// Mesh: seconds an idle pooled HTTP connection to a guest, or an idle HTTP/1 client between
    /// requests, is kept.
    #[arg(long, default_value_t = crate::mesh::listener::DEFAULT_IDLE_TIMEOUT.as_secs(), value_name = "SECS")]
    pub mesh_idle_timeout: u64,

    /// Mesh: bytes of HTTP request headers accepted from a peer (at least 8192 for HTTP/1).
    #[arg(long, default_value_t = crate::mesh::listener::DEFAULT_MAX_HEADER_BYTES, value_name = "BYTES")]
    pub mesh_max_header_bytes: usize,

    /// Mesh: milliseconds an outbound endpoint that failed to connect or to handshake is first ejected for
    /// (not picked, kept in the set); doubled per consecutive failure up to `--mesh-eject-backoff-max-ms`.
    #[arg(long, default_value_t = crate::mesh::listener::DEFAULT_EJECT_BACKOFF_MIN.as_millis() as u64, value_name = "MS")]
    pub mesh_eject_backoff_min_ms: u64,

    /// Mesh: longest ejection of an outbound endpoint, in milliseconds (at least the minimum).
    #[arg(long, default_value_t = crate::mesh::listener::DEFAULT_EJECT_BACKOFF_MAX.as_millis() as u64, value_name = "MS")]
    pub mesh_eject_backoff_max_ms: u64,

    /// Mesh: milliseconds an outbound request or connection waits for a ready endpoint; then HTTP gets 503
    /// with `l5d-proxy-error` and opaque connections are closed (`reason="unavailable"`).
    #[arg(long, default_value_t = crate::mesh::listener::DEFAULT_FAILFAST_TIMEOUT.as_millis() as u64, value_name = "MS")]
    pub mesh_failfast_timeout_ms: u64,

    /// Mesh: HTTP requests of one outbound destination waiting for its balancer (no endpoint ready); more
    /// wait for room (at most the fail-fast time, then 503).
    #[arg(long, default_value_t = crate::mesh::listener::DEFAULT_BALANCER_QUEUE, value_name = "N")]
    pub mesh_balancer_queue: usize,

    /// Mesh: distinct `authority` label values of one VM's request metrics; requests to further authorities
    /// are counted under `authority="~other"`, so a peer cannot grow /metrics without bound.
    #[arg(long, default_value_t = crate::mesh::listener::DEFAULT_MAX_AUTHORITIES, value_name = "N")]
    pub mesh_max_authorities: usize,

    /// Lifetime of the certificates the embedded mesh CA issues (renewed at 70%): a number with a unit,
    /// `s`, `m`, `h` or `d` (2s to 365d).
    #[arg(long, default_value = crate::mesh::identity::DEFAULT_CERT_LIFETIME, value_name = "DURATION")]
    pub mesh_cert_lifetime: String,

    /// Take mesh certificates from files instead of the embedded CA: DIR/ca.crt (trust anchors),
    /// DIR/<identity>/tls.crt and tls.key; reloaded when they change (docs/mesh.md).
    #[arg(long, value_name = "DIR")]
    pub mesh_identity_dir: Option<PathBuf>,

    /// A PEM bundle of more trust anchors for mesh peers (e.g. Linkerd's), added to the CA's or DIR/ca.crt.
    #[arg(long, value_name = "FILE")]
    pub mesh_trust_anchors: Option<PathBuf>,

    /// Take mesh certificates from Linkerd's identity service at HOST:PORT (plaintext HTTP/2, e.g. a
    /// port-forward of linkerd-identity:8080) instead of the embedded CA; needs --mesh-trust-anchors and
    /// --identity-token-file (docs/mesh.md, "Running under Linkerd's control plane").
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "mesh_identity_dir", requires_all = ["identity_token_file", "mesh_trust_anchors"])]
    pub identity_svc: Option<String>,

    /// The token sent with every certificate request to --identity-svc (a Kubernetes service-account token),
    /// reread for each request.
    #[arg(long, value_name = "FILE")]
    pub identity_token_file: Option<PathBuf>,

    /// Largest --identity-token-file read.
    #[arg(long, default_value_t = crate::mesh::identity_svc::DEFAULT_MAX_TOKEN_BYTES, value_name = "BYTES")]
    pub identity_max_token_bytes: u64,

    /// Resolve named outbound destinations with Linkerd's destination service at HOST:PORT (plaintext
    /// HTTP/2, e.g. a port-forward of linkerd-dst:8086) instead of DNS (docs/mesh.md).
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "dns_server")]
    pub destination_svc: Option<String>,

    /// Resolve named outbound destinations with the DNS server at IP:PORT (UDP, then TCP) instead of the
    /// servers of /etc/resolv.conf.
    #[arg(long, value_name = "IP:PORT")]
    pub dns_server: Option<std::net::SocketAddr>,

    /// Worker threads of the data plane (0 = one per CPU core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: usize,

    /// Client subcommands: machine-readable JSON output instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Log levels, from least to most verbose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    /// Parse the value of `CC_PROXY_LOG_LEVEL`.
    pub fn parse_env(s: &str) -> Option<LogLevel> {
        <LogLevel as ValueEnum>::from_str(s.trim(), true).ok()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogTarget {
    Auto,
    Stderr,
    Journald,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect registered VMs.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Run a process in a VM (container `hyperstart`) and relay this terminal's stdio; exits with its status,
    /// 126 when the agent cannot run the command, 127 when the command is not found.
    Exec {
        /// The VM id.
        vm: String,
        /// Run on a terminal (stderr merged into stdout).
        #[arg(long, short = 't')]
        tty: bool,
        /// Set an environment variable (NAME=VALUE, or NAME to pass this shell's value); repeatable.
        #[arg(long = "env", short = 'e', value_name = "NAME[=VALUE]")]
        env: Vec<String>,
        /// Working directory of the process.
        #[arg(long, short = 'w', value_name = "DIR")]
        workdir: Option<String>,
        /// User to run the process as (name or uid in the guest).
        #[arg(long, short = 'u', value_name = "USER")]
        user: Option<String>,
        /// The command and its arguments (options after the command are its own; `--` is optional).
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        args: Vec<String>,
    },
    /// Attach this terminal to an existing stream token.
    Attach {
        /// The stream token (from `agent.call` with `streams: 1`, or `stream.allocate`).
        token: String,
    },
    /// The mesh front: trust anchors and identities.
    Mesh {
        #[command(subcommand)]
        command: MeshCommand,
    },
    /// Print the daemon's version and features.
    Version,
    /// Change the running daemon's log filter (privileged clients only): `cc-proxy log-level debug`, or a
    /// filter such as `warn,cc_proxy::vm=debug`. Prints the filter now in force.
    LogLevel {
        /// error, warn, info, debug, trace, or a filter directive list.
        #[arg(value_name = "LEVEL")]
        level: String,
    },
    /// Make a raw JSON-RPC call and print its result: `cc-proxy call vm.info '{"id":"vm1"}'`.
    Call {
        /// The method, e.g. `proxy.health`.
        #[arg(value_name = "METHOD")]
        method: String,
        /// The params as JSON (default `{}`).
        #[arg(value_name = "PARAMS")]
        params: Option<String>,
    },
    /// Print the help of cc-proxy or of one of its subcommands: `cc-proxy help vm register`.
    Help {
        /// The subcommand (and sub-subcommand) to describe.
        #[arg(value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Watch live events (agent commands, process starts and exits, attaches, VM state, mesh requests), one
    /// line each; with --mesh only the mesh's HTTP requests, as direction, method, authority, path, status,
    /// latency, peer identity and endpoint.
    Tap {
        /// Only this VM's events.
        vm: Option<String>,
        /// Only mesh HTTP requests (inbound and outbound), one line each: direction, method, authority, path,
        /// status, latency, peer identity, endpoint.
        #[arg(long, conflicts_with = "filter")]
        mesh: bool,
        /// Stop after this many events.
        #[arg(long)]
        limit: Option<u64>,
        /// Only these events (comma-separated): agent_command, process_started, process_exited,
        /// stream_attached, stream_detached, stream_failed, vm_state, mesh_inbound_request, mesh_outbound_request.
        #[arg(long, value_delimiter = ',')]
        filter: Vec<String>,
        /// Most events per second (1 to 1000).
        #[arg(long)]
        rate: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// List registered VMs.
    List,
    /// Register a VM's agent endpoints (URIs: unix://, vsock://, hvsock://, tcp://).
    Register {
        /// The VM id: 1 to 128 characters of A-Z a-z 0-9 . _ -
        id: String,
        /// The agent's control channel, e.g. hvsock:///run/vm1.sock:2718 or unix:///run/vm1/ctl.sock.
        #[arg(long, value_name = "URI")]
        control: String,
        /// The agent's I/O channel, e.g. hvsock:///run/vm1.sock:2719 or unix:///run/vm1/io.sock.
        #[arg(long, value_name = "URI")]
        io: String,
        /// A console whose lines are logged at debug with source=guest.
        #[arg(long, value_name = "URI")]
        console: Option<String>,
        /// How long to wait for each connect and for the agent's READY and GETVERSION, in milliseconds
        /// (default 10000).
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u64>,
        /// The VM's mesh front as JSON (`{"identity": ..., "inbound": [...], "outbound": [...]}`, see
        /// docs/mesh.md), or @FILE to read it from a file.
        #[arg(long, value_name = "JSON|@FILE")]
        mesh: Option<String>,
    },
    /// Unregister a VM: its streams end and its tokens are freed.
    Unregister {
        /// The VM id.
        id: String,
    },
    /// Show one VM.
    Info {
        /// The VM id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum MeshCommand {
    /// Print the trust anchors (PEM bundle) a peer must trust to accept this daemon's mesh certificates,
    /// e.g. for Linkerd's `identityTrustAnchorsPEM`.
    TrustAnchors,
    /// Show a meshed VM's identity and the certificate its listeners serve (with the chain as PEM).
    Identity {
        /// The VM id.
        vm: String,
    },
    /// Show each outbound destination of a meshed VM: its endpoints, their identity, protocol hint, state
    /// (ready, ejected, pending) and load.
    Endpoints {
        /// The VM id.
        vm: String,
    },
}
