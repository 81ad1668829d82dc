//! The daemon's configuration: its command-line flags and environment turned into typed values, in one place.
//!
//! Every setting has a flag (see `cli/mod.rs` for the flags and their defaults) and, where one exists, a
//! named environment variable below. Parsing checks every setting and reports every error together, so an
//! operator fixes a unit file in one go; the daemon then exits 2 without touching anything. Parsing takes the
//! environment as a lookup function, so tests feed a map instead of the real environment.
//!
//! What can only be checked by using it (the state directory, binding the admin address) is checked at
//! startup, before the client socket serves, and is fatal too (exit 1).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::{Cli, LogFormat, LogLevel, LogTarget};
use crate::mesh::identity::{IdentityConfig, SourceConfig, MAX_CERT_LIFETIME, MIN_CERT_LIFETIME};
use crate::vm::VmConfig;

/// The log level when `--log` is absent.
pub const ENV_LOG_LEVEL: &str = "CC_PROXY_LOG_LEVEL";

/// The `--admin-addr` value that disables the admin server.
pub const ADMIN_OFF: &str = "off";

/// The log level when neither `--log` nor [`ENV_LOG_LEVEL`] is set.
pub const DEFAULT_LOG_LEVEL: LogLevel = LogLevel::Warn;

/// Shortest `--stall-timeout`; 0 would fail every stream whose shim pauses at all.
pub const MIN_STALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest value any timeout or interval flag in seconds takes (30 days); larger values are cut to it, so a
/// deadline computed from one can never overflow the clock.
pub const MAX_TIMEOUT_SECS: u64 = 30 * 24 * 3600;

/// A timeout flag's seconds as a duration within [`min`, [`MAX_TIMEOUT_SECS`]].
fn bounded_secs(secs: u64, min: Duration) -> Duration {
    Duration::from_secs(secs.min(MAX_TIMEOUT_SECS)).max(min)
}

/// Default of `--agent-keepalive`: an agent's idle control channel is probed with PING every 5 s.
pub const DEFAULT_AGENT_KEEPALIVE_SECS: u64 = 5;

/// Default of `--agent-keepalive-misses`: a PING may go unanswered for two intervals. With the default
/// interval a stopped or hung agent is detected (its VM `lost`) within 5 x (1 + 2) = 15 s.
pub const DEFAULT_AGENT_KEEPALIVE_MISSES: u32 = 2;

/// Shortest mesh timeout (`--mesh-*-timeout-ms`); 0 would refuse every connection.
pub const MIN_MESH_TIMEOUT: Duration = Duration::from_millis(10);

/// Default of `--max-connections-per-uid`: half the default total, so one user always leaves room.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = crate::cli::DEFAULT_MAX_CONNECTIONS / 2;

/// Default of `--fd-reserve`: descriptors kept free for the admin server, agents and state writes.
pub const DEFAULT_FD_RESERVE: u64 = 64;

/// Default of `--max-id-bytes`: a JSON-RPC id's length as written (a uuid is 38 with its quotes).
pub const DEFAULT_MAX_ID_BYTES: usize = 128;

/// Default of `--max-batch`: entries of one JSON-RPC batch.
pub const DEFAULT_MAX_BATCH: u32 = 100;

/// Default of `--max-requests-per-connection`.
pub const DEFAULT_MAX_REQUESTS_PER_CONNECTION: usize = 64;

/// Default of `--client-write-timeout`.
pub const DEFAULT_CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default of `--client-header-timeout`.
pub const DEFAULT_CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of `--client-idle-timeout`.
pub const DEFAULT_CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Shortest client timeout (write, header, idle): 0 would close every connection at once.
pub const MIN_CLIENT_TIMEOUT: Duration = Duration::from_secs(1);

/// Shortest `--recovery-timeout`.
pub const MIN_RECOVERY_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The client socket's path (unless systemd hands one over).
    pub socket: PathBuf,
    /// Group owning the socket the daemon creates.
    pub socket_group: Option<String>,
    /// Where registered VMs are recorded for a restart.
    pub state_dir: PathBuf,
    /// The admin server's address; `None` disables it.
    pub admin_addr: Option<SocketAddr>,
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    pub log_target: LogTarget,
    /// Data-plane worker threads; 0 = one per core.
    pub threads: usize,
    /// Client connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// Bytes of client-supplied text per log line (`--max-client-log`).
    pub max_client_log: usize,
    /// The group whose members are privileged clients besides root (`--admin-group`).
    pub admin_group: Option<String>,
    /// Whether the admin server's `PUT /proxy-log-level` works (`--admin-allow-log-level`).
    pub admin_allow_log_level: bool,
    /// Bounds on what one client connection may ask for or hold.
    pub client: ClientLimits,
    /// Settings every VM shares.
    pub vm: VmConfig,
    /// The mesh data plane's limits.
    pub mesh_limits: crate::mesh::listener::Limits,
    /// Where mesh certificates and trust anchors come from.
    pub mesh_identity: IdentityConfig,
    /// Where named outbound destinations are resolved.
    pub mesh_discovery: crate::mesh::discover::SourceConfig,
}

/// Bounds on client connections and their requests (section Limits of docs/operations.md).
#[derive(Debug, Clone)]
pub struct ClientLimits {
    /// `--max-connections-per-uid`.
    pub max_connections_per_uid: usize,
    /// `--fd-reserve`.
    pub fd_reserve: u64,
    /// `--max-id-bytes`.
    pub max_id_bytes: usize,
    /// `--max-batch`.
    pub max_batch: u32,
    /// `--max-requests-per-connection`.
    pub max_requests_per_connection: usize,
    /// `--client-write-timeout`.
    pub write_timeout: Duration,
    /// `--client-header-timeout`.
    pub header_timeout: Duration,
    /// `--client-idle-timeout`.
    pub idle_timeout: Duration,
}

impl Default for ClientLimits {
    fn default() -> ClientLimits {
        ClientLimits {
            max_connections_per_uid: DEFAULT_MAX_CONNECTIONS_PER_UID,
            fd_reserve: DEFAULT_FD_RESERVE,
            max_id_bytes: DEFAULT_MAX_ID_BYTES,
            max_batch: DEFAULT_MAX_BATCH,
            max_requests_per_connection: DEFAULT_MAX_REQUESTS_PER_CONNECTION,
            write_timeout: DEFAULT_CLIENT_WRITE_TIMEOUT,
            header_timeout: DEFAULT_CLIENT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_CLIENT_IDLE_TIMEOUT,
        }
    }
}

/// One invalid setting. Each names the flag or variable and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid --admin-addr {value:?}: {reason} (expected HOST:PORT such as 127.0.0.1:4191, or `off`)")]
    AdminAddr { value: String, reason: String },
    #[error("invalid {ENV_LOG_LEVEL} {0:?} (error, warn, info, debug or trace)")]
    LogLevelEnv(String),
    #[error("invalid --mesh-cert-lifetime {value:?}: {reason}")]
    MeshCertLifetime { value: String, reason: String },
}

impl Config {
    /// Check and convert the daemon's flags; `env` looks up environment variables. Returns every error.
    pub fn from_cli(
        cli: &Cli,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let log_level = match cli.log {
            Some(level) => level,
            None => match env(ENV_LOG_LEVEL).filter(|v| !v.trim().is_empty()) {
                Some(v) => LogLevel::parse_env(&v).unwrap_or_else(|| {
                    errors.push(ConfigError::LogLevelEnv(v));
                    DEFAULT_LOG_LEVEL
                }),
                None => DEFAULT_LOG_LEVEL,
            },
        };
        let admin_addr = parse_admin_addr(&cli.admin_addr).unwrap_or_else(|e| {
            errors.push(e);
            None
        });
        let lifetime = parse_lifetime(&cli.mesh_cert_lifetime).unwrap_or_else(|reason| {
            errors.push(ConfigError::MeshCertLifetime {
                value: cli.mesh_cert_lifetime.clone(),
                reason,
            });
            MIN_CERT_LIFETIME
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        let source = match (&cli.mesh_identity_dir, &cli.identity_svc) {
            (_, Some(addr)) => SourceConfig::IdentitySvc(crate::mesh::identity_svc::SvcConfig {
                addr: addr.clone(),
                token_file: cli.identity_token_file.clone().unwrap_or_default(),
                max_token_bytes: cli.identity_max_token_bytes.max(1),
            }),
            (Some(dir), None) => SourceConfig::Files { dir: dir.clone() },
            (None, None) => SourceConfig::Ca {
                state_dir: cli.state_dir.clone(),
                lifetime,
            },
        };
        Ok(Config {
            socket: cli.socket.clone(),
            socket_group: cli.socket_group.clone(),
            state_dir: cli.state_dir.clone(),
            admin_addr,
            log_level,
            log_format: cli.log_format,
            log_target: cli.log_target,
            threads: cli.threads,
            max_connections: cli.max_connections.max(1),
            max_client_log: cli.max_client_log,
            admin_group: cli.admin_group.clone(),
            admin_allow_log_level: cli.admin_allow_log_level,
            client: ClientLimits {
                max_connections_per_uid: cli.max_connections_per_uid.max(1),
                fd_reserve: cli.fd_reserve,
                max_id_bytes: cli.max_id_bytes.max(1),
                max_batch: cli.max_batch.max(1),
                max_requests_per_connection: cli.max_requests_per_connection.max(1),
                write_timeout: client_timeout(cli.client_write_timeout),
                header_timeout: client_timeout(cli.client_header_timeout),
                idle_timeout: client_timeout(cli.client_idle_timeout),
            },
            vm: VmConfig {
                stream_buffer: cli.stream_buffer,
                keepalive: (cli.agent_keepalive > 0)
                    .then(|| bounded_secs(cli.agent_keepalive, Duration::ZERO)),
                keepalive_misses: cli.agent_keepalive_misses.max(1),
                stall_timeout: bounded_secs(cli.stall_timeout, MIN_STALL_TIMEOUT),
                stdin_buffer: cli.stdin_buffer.max(crate::vm::stdin::MIN_STDIN_BUFFER),
                vm_stdin_buffer: cli.vm_stdin_buffer.max(crate::vm::stdin::MIN_STDIN_BUFFER),
                stdin_stall_timeout: bounded_secs(cli.stdin_stall_timeout, MIN_STALL_TIMEOUT),
                vm_buffer: cli.vm_buffer,
                recovery_timeout: bounded_secs(cli.recovery_timeout, MIN_RECOVERY_TIMEOUT),
                tokens: crate::vm::TokenLimits {
                    per_vm: cli.max_tokens_per_vm.max(1),
                    per_client: cli.max_tokens_per_client.max(1),
                    ttl: client_timeout(cli.token_ttl),
                },
            },
            mesh_limits: crate::mesh::listener::Limits {
                max_connections_per_listener: cli.mesh_max_connections_per_listener.max(1),
                max_connections: cli.mesh_max_connections.max(1),
                detect_timeout: Duration::from_millis(cli.mesh_detect_timeout_ms)
                    .max(MIN_MESH_TIMEOUT),
                connect_timeout: Duration::from_millis(cli.mesh_connect_timeout_ms)
                    .max(MIN_MESH_TIMEOUT),
                handshake_timeout: Duration::from_millis(cli.mesh_handshake_timeout_ms)
                    .max(MIN_MESH_TIMEOUT),
                idle_timeout: bounded_secs(cli.mesh_idle_timeout, Duration::from_secs(1)),
                max_header_bytes: cli.mesh_max_header_bytes.max(1024),
                eject_backoff_min: Duration::from_millis(cli.mesh_eject_backoff_min_ms.max(1)),
                eject_backoff_max: Duration::from_millis(
                    cli.mesh_eject_backoff_max_ms
                        .max(cli.mesh_eject_backoff_min_ms)
                        .max(1),
                ),
                failfast_timeout: Duration::from_millis(cli.mesh_failfast_timeout_ms)
                    .max(MIN_MESH_TIMEOUT),
                fd_reserve: cli.fd_reserve,
                balancer_queue: cli.mesh_balancer_queue.max(1),
                max_authorities: cli.mesh_max_authorities.max(1),
            },
            mesh_identity: IdentityConfig {
                source,
                extra_anchors: cli.mesh_trust_anchors.clone(),
            },
            mesh_discovery: match &cli.destination_svc {
                Some(addr) => {
                    crate::mesh::discover::SourceConfig::Destination { addr: addr.clone() }
                }
                None => crate::mesh::discover::SourceConfig::Dns {
                    server: cli.dns_server,
                },
            },
        })
    }
}

/// A client timeout flag's value, with its floor ([`MIN_CLIENT_TIMEOUT`]).
fn client_timeout(secs: u64) -> Duration {
    bounded_secs(secs, MIN_CLIENT_TIMEOUT)
}

/// A duration such as `24h`, `90m`, `6s` or `7d`, within [`MIN_CERT_LIFETIME`, `MAX_CERT_LIFETIME`].
fn parse_lifetime(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| "no unit (s, m, h or d), e.g. 24h".to_string())?;
    let (number, unit) = value.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| "expected a number followed by s, m, h or d".to_string())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?} (s, m, h or d)")),
    };
    let d = Duration::from_secs(n.saturating_mul(unit_secs));
    if d < MIN_CERT_LIFETIME || d > MAX_CERT_LIFETIME {
        return Err(format!(
            "must be between {}s and {}d",
            MIN_CERT_LIFETIME.as_secs(),
            MAX_CERT_LIFETIME.as_secs() / 86_400
        ));
    }
    Ok(d)
}

/// `off`, or a `HOST:PORT` that resolves (the first address is used).
fn parse_admin_addr(value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value == ADMIN_OFF {
        return Ok(None);
    }
    let invalid = |reason: String| ConfigError::AdminAddr {
        value: value.to_string(),
        reason,
    };
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(Some(addr));
    }
    if !value.contains(':') {
        return Err(invalid("no port".into()));
    }
    let mut addrs = value
        .to_socket_addrs()
        .map_err(|e| invalid(e.to_string()))?;
    addrs
        .next()
        .map(Some)
        .ok_or_else(|| invalid("the host has no address".into()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::Parser;

    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, Vec<ConfigError>> {
        let cli = match Cli::try_parse_from(std::iter::once("cc-proxy").chain(args.iter().copied()))
        {
            Ok(c) => c,
            Err(e) => panic!("flags do not parse: {e}"),
        };
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_cli(&cli, |k| env.get(k).cloned())
    }

    #[test]
    fn defaults() {
        let Ok(c) = parse(&[], &[]) else {
            panic!("the defaults are valid")
        };
        assert_eq!(c.admin_addr, Some(SocketAddr::from(([127, 0, 0, 1], 4191))));
        assert_eq!(c.log_level, LogLevel::Warn);
        assert_eq!(
            c.vm.keepalive,
            Some(Duration::from_secs(DEFAULT_AGENT_KEEPALIVE_SECS))
        );
        assert_eq!(c.vm.keepalive_misses, DEFAULT_AGENT_KEEPALIVE_MISSES);
        assert_eq!(c.vm.stall_timeout, Duration::from_secs(10));
        assert_eq!(
            c.vm.stdin_stall_timeout,
            crate::vm::stdin::DEFAULT_STDIN_STALL_TIMEOUT
        );
        assert_eq!(c.vm.stdin_buffer, crate::vm::stdin::DEFAULT_STDIN_BUFFER);
        assert_eq!(
            c.vm.vm_stdin_buffer,
            crate::vm::stdin::DEFAULT_VM_STDIN_BUFFER
        );
        assert_eq!(c.mesh_limits, crate::mesh::listener::Limits::default());
        assert!(matches!(
            c.mesh_identity.source,
            SourceConfig::Ca { lifetime, .. } if lifetime == Duration::from_secs(24 * 3600)
        ));
    }

    #[test]
    fn mesh_flags() {
        let c = parse(&["--mesh-cert-lifetime", "6s"], &[]).ok();
        assert!(matches!(
            c.map(|c| c.mesh_identity.source),
            Some(SourceConfig::Ca { lifetime, .. }) if lifetime == Duration::from_secs(6)
        ));
        for bad in ["1s", "6", "s", "6x", "400d", "1.5s", ""] {
            let Err(errors) = parse(&["--mesh-cert-lifetime", bad], &[]) else {
                panic!("--mesh-cert-lifetime {bad:?} accepted")
            };
            assert!(
                matches!(&errors[..], [ConfigError::MeshCertLifetime { .. }]),
                "{bad:?}: {errors:?}"
            );
        }
        let c = parse(
            &[
                "--mesh-identity-dir",
                "/etc/mesh",
                "--mesh-trust-anchors",
                "/etc/l5d.pem",
            ],
            &[],
        )
        .ok();
        assert_eq!(
            c.map(|c| c.mesh_identity),
            Some(IdentityConfig {
                source: SourceConfig::Files {
                    dir: "/etc/mesh".into()
                },
                extra_anchors: Some("/etc/l5d.pem".into()),
            })
        );
    }

    #[test]
    fn discovery_flags() {
        use crate::mesh::discover::SourceConfig as Disco;
        let c = parse(&[], &[]).ok();
        assert_eq!(
            c.map(|c| c.mesh_discovery),
            Some(Disco::Dns { server: None })
        );
        let c = parse(&["--dns-server", "127.0.0.1:5353"], &[]).ok();
        assert_eq!(
            c.map(|c| c.mesh_discovery),
            Some(Disco::Dns {
                server: Some(SocketAddr::from(([127, 0, 0, 1], 5353)))
            })
        );
        let c = parse(&["--destination-svc", "127.0.0.1:8086"], &[]).ok();
        assert_eq!(
            c.map(|c| c.mesh_discovery),
            Some(Disco::Destination {
                addr: "127.0.0.1:8086".into()
            })
        );
        for bad in [
            &["--dns-server", "localhost"][..],
            &["--dns-server", "127.0.0.1"][..],
            &[
                "--destination-svc",
                "127.0.0.1:8086",
                "--dns-server",
                "127.0.0.1:53",
            ][..],
        ] {
            let mut args = vec!["cc-proxy"];
            args.extend_from_slice(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn stdin_limits_have_floors() {
        let Ok(c) = parse(
            &[
                "--stdin-stall-timeout",
                "0",
                "--stdin-buffer",
                "1",
                "--vm-stdin-buffer",
                "0",
            ],
            &[],
        ) else {
            panic!("valid flags")
        };
        assert_eq!(c.vm.stdin_stall_timeout, MIN_STALL_TIMEOUT);
        assert_eq!(c.vm.stdin_buffer, crate::vm::stdin::MIN_STDIN_BUFFER);
        assert_eq!(c.vm.vm_stdin_buffer, crate::vm::stdin::MIN_STDIN_BUFFER);
    }

    #[test]
    fn mesh_limits_have_floors() {
        let Ok(c) = parse(
            &[
                "--mesh-detect-timeout-ms",
                "0",
                "--mesh-max-connections",
                "0",
                "--mesh-connect-timeout-ms",
                "250",
            ],
            &[],
        ) else {
            panic!("valid flags")
        };
        assert_eq!(c.mesh_limits.detect_timeout, MIN_MESH_TIMEOUT);
        assert_eq!(c.mesh_limits.max_connections, 1);
        assert_eq!(c.mesh_limits.connect_timeout, Duration::from_millis(250));
    }

    #[test]
    fn admin_off_and_addresses() {
        let c = parse(&["--admin-addr", "off"], &[]).ok();
        assert_eq!(c.map(|c| c.admin_addr), Some(None));
        let c = parse(&["--admin-addr", "[::1]:0"], &[]).ok();
        assert_eq!(
            c.and_then(|c| c.admin_addr),
            Some(SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], 0)))
        );
        let c = parse(&["--admin-addr", "localhost:4191"], &[]).ok();
        assert!(c
            .and_then(|c| c.admin_addr)
            .is_some_and(|a| a.ip().is_loopback()));
    }

    #[test]
    fn bad_values_are_all_reported_together() {
        let Err(errors) = parse(&["--admin-addr", "nonsense"], &[(ENV_LOG_LEVEL, "loud")]) else {
            panic!("accepted a bad admin address")
        };
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.contains(&ConfigError::LogLevelEnv("loud".into())));
        assert!(errors
            .iter()
            .any(|e| matches!(e, ConfigError::AdminAddr { value, .. } if value == "nonsense")));
        for bad in ["127.0.0.1:99999", "127.0.0.1", ":", ""] {
            assert!(parse(&["--admin-addr", bad], &[]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_flag_wins_over_the_environment_and_stall_timeout_has_a_floor() {
        let Ok(c) = parse(
            &[
                "--log",
                "debug",
                "--stall-timeout",
                "0",
                "--agent-keepalive",
                "5",
            ],
            &[(ENV_LOG_LEVEL, "loud")],
        ) else {
            panic!("--log makes the variable irrelevant")
        };
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.vm.stall_timeout, MIN_STALL_TIMEOUT);
        assert_eq!(c.vm.keepalive, Some(Duration::from_secs(5)));
    }

    #[test]
    fn huge_timeouts_are_cut_so_no_deadline_can_overflow() {
        let max = u64::MAX.to_string();
        let mut args = Vec::new();
        for flag in [
            "--stall-timeout",
            "--stdin-stall-timeout",
            "--recovery-timeout",
            "--agent-keepalive",
            "--client-write-timeout",
            "--mesh-idle-timeout",
        ] {
            args.push(flag);
            args.push(max.as_str());
        }
        let Ok(c) = parse(&args, &[]) else {
            panic!("huge timeouts are accepted and cut")
        };
        let cap = Duration::from_secs(MAX_TIMEOUT_SECS);
        assert_eq!(c.vm.stall_timeout, cap);
        assert_eq!(c.vm.stdin_stall_timeout, cap);
        assert_eq!(c.vm.recovery_timeout, cap);
        assert_eq!(c.vm.keepalive, Some(cap));
        assert_eq!(c.client.write_timeout, cap);
        assert_eq!(c.mesh_limits.idle_timeout, cap);
        // A deadline from the longest timeout is representable.
        assert!(std::time::Instant::now().checked_add(cap).is_some());
    }
}
