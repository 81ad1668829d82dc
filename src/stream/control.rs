//! Signals and resizes for a stream's process: which process they reach, and the ones held until it starts.

/// Most signals and resizes held for a process that has not started yet; more are refused.
pub const MAX_HELD_CONTROLS: usize = 16;

/// A signal or window size sent before the process started, delivered in order once it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldControl {
    Signal(i32),
    Resize { rows: u16, cols: u16 },
}

/// Which command started the process. The cc-agent dialect can signal only a container's init.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessRole {
    /// Started by NEWCONTAINER: the container's init (also assumed for records older than this field).
    #[default]
    Init,
    /// Started by EXECCMD in an existing container.
    Exec,
}

/// The process a signal or resize is for, as the agent names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessName {
    pub container: String,
    pub process: String,
    pub role: ProcessRole,
}

/// Where a signal or resize goes ([`Stream::control_target`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlTarget {
    /// The process has not started: the request is held for the start.
    Held,
    /// The process was started: send the request to it now.
    Now(ProcessName),
    /// The hold is full ([`MAX_HELD_CONTROLS`]).
    HoldFull,
    /// Started, but the process's name is unknown (cannot happen for a stream started by the daemon).
    Unknown,
}
