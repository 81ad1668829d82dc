//! Command-line options: which dialect to speak, which transport to listen on, how many VMs to
//! serve, and which fault to inject.

use std::path::PathBuf;
use std::time::Duration;

use cc_proxy_protocol::Dialect;
use clap::{ArgGroup, Parser, ValueEnum};

/// A test guest agent that speaks the hyperstart-family protocol and runs real processes.
#[derive(Debug, Parser)]
#[command(name = "cc-test-agent", version)]
#[command(group(
    ArgGroup::new("transport")
        .required(true)
        .args(["hvsock", "control", "vsock", "virtio_serial"])
))]
pub struct Args {
    /// Protocol dialect: hyperstart or cc-agent.
    #[arg(long, default_value = "hyperstart")]
    pub dialect: Dialect,

    /// API version reported by GETVERSION (default: 4244 for hyperstart, 4242 for cc-agent).
    #[arg(long)]
    pub api_version: Option<u32>,

    /// Listen on a unix socket like a VMM's hybrid-vsock socket (`CONNECT <port>` handshake;
    /// port 2718 = control, 2719 = I/O).
    #[arg(long, value_name = "PATH")]
    pub hvsock: Option<PathBuf>,

    /// Listen on a unix socket for the control channel (like a QEMU virtio-serial chardev).
    #[arg(long, value_name = "PATH", requires = "io")]
    pub control: Option<PathBuf>,

    /// Listen on a unix socket for the I/O channel (with --control).
    #[arg(long, value_name = "PATH", requires = "control")]
    pub io: Option<PathBuf>,

    /// Guest mode: listen on AF_VSOCK ports 2718 (control) and 2719 (I/O).
    #[arg(long)]
    pub vsock: bool,

    /// Guest mode: use the virtio-serial ports named sh.hyper.channel.0 / sh.hyper.channel.1.
    #[arg(long)]
    pub virtio_serial: bool,

    /// Number of independent VMs to serve; with more than one, socket paths get a `.N` suffix.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,

    /// Fault to inject.
    #[arg(long, value_enum)]
    pub fault: Option<Fault>,

    /// Delay of every reply with --fault slow-reply, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub slow_ms: u64,

    /// Largest control or I/O frame accepted from the host, header included (real agents
    /// refuse more than 65536 bytes on vsock).
    #[arg(long, default_value_t = 65536)]
    pub max_frame: usize,

    /// Behave like real hyperstart 1.1 on virtio-serial where it is less forgiving than this
    /// agent (hyperstart dialect only): see README.md, "Strict mode".
    #[arg(long)]
    pub strict: bool,
}

/// Why the command line is refused beyond what clap checks.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("--strict models real hyperstart and needs --dialect hyperstart")]
    StrictNeedsHyperstart,
}

impl Args {
    /// Checks the combinations clap cannot express.
    pub fn validate(&self) -> Result<(), ArgsError> {
        if self.strict && self.dialect != Dialect::Hyperstart {
            return Err(ArgsError::StrictNeedsHyperstart);
        }
        Ok(())
    }
}

/// Misbehaviours the agent can be told to show, to test how the host copes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Fault {
    /// Never send READY on a control connection.
    NoReady,
    /// An agent that never came up: never send READY and never answer a command.
    Silent,
    /// Delay every reply by --slow-ms.
    SlowReply,
    /// Answer the first command after GETVERSION with a malformed frame and random bytes.
    Garbage,
    /// Exit the whole process (status 1) on the first command after GETVERSION.
    DieMidCommand,
    /// Answer GETVERSION with an empty ACK, like the original project's mock hyperstart.
    EmptyVersion,
}

/// What every VM of this process needs to know about how to behave.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Dialect spoken on both channels.
    pub dialect: Dialect,
    /// API version reported by GETVERSION.
    pub api_version: u32,
    /// Injected fault, if any.
    pub fault: Option<Fault>,
    /// Reply delay for [`Fault::SlowReply`].
    pub slow: Duration,
    /// Largest frame accepted from the host.
    pub max_frame: usize,
    /// Real hyperstart 1.1's rules (`--strict`).
    pub strict: bool,
}

impl From<&Args> for AgentConfig {
    fn from(args: &Args) -> Self {
        AgentConfig {
            dialect: args.dialect,
            api_version: args.api_version.unwrap_or(args.dialect.api_version()),
            fault: args.fault,
            slow: Duration::from_millis(args.slow_ms),
            max_frame: args.max_frame,
            strict: args.strict,
        }
    }
}
