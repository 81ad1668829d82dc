//! Control channel command codes shared by both dialects.
//!
//! Codes 23 and 24 mean different things in the cc-agent and hyperstart dialects, so they are
//! not here: ask [`crate::Dialect`] for them.

/// Asks for the agent's API version; the ACK carries it as 4 big-endian bytes.
pub const GETVERSION: u32 = 0;
/// Sets up the pod (sandbox).
pub const STARTPOD: u32 = 1;
/// Deprecated.
pub const GETPOD: u32 = 2;
/// Deprecated.
pub const STOPPOD: u32 = 3;
/// Tears the pod down.
pub const DESTROYPOD: u32 = 4;
/// Deprecated.
pub const RESTARTCONTAINER: u32 = 5;
/// Starts a process in an existing container; carries `process.stdio`/`process.stderr`.
pub const EXECCMD: u32 = 6;
/// Deprecated.
pub const CMDFINISHED: u32 = 7;
/// Sent by the agent when the control channel opens (host to agent: rescan devices).
pub const READY: u32 = 8;
/// Successful reply; the payload depends on the command.
pub const ACK: u32 = 9;
/// Failed reply; the payload is plain text.
pub const ERROR: u32 = 10;
/// Resizes a process's terminal; the payload differs by dialect.
pub const WINSIZE: u32 = 11;
/// Liveness probe: empty command, empty ACK.
pub const PING: u32 = 12;
/// Deprecated.
pub const PODFINISHED: u32 = 13;
/// Flow-control credit sent by the C hyperstart: 4-byte big-endian byte count. Ignorable.
pub const NEXT: u32 = 14;
/// Writes a file in a container.
pub const WRITEFILE: u32 = 15;
/// Reads a file from a container.
pub const READFILE: u32 = 16;
/// Creates a container and starts its first (init) process.
pub const NEWCONTAINER: u32 = 17;
/// Signals a container's init, or all its processes.
pub const KILLCONTAINER: u32 = 18;
/// Brings hot-plugged CPUs and memory online.
pub const ONLINECPUMEM: u32 = 19;
/// Configures a network interface.
pub const SETUPINTERFACE: u32 = 20;
/// Configures routes.
pub const SETUPROUTE: u32 = 21;
/// Removes a container.
pub const REMOVECONTAINER: u32 = 22;
/// Removes a network interface (hyperstart 1.1).
pub const DELETEINTERFACE: u32 = 25;
