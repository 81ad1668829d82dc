//! Real processes started by NEWCONTAINER and EXECCMD: spawning (on pipes or a pty), routing
//! host stdin to them, streaming their output, and reporting their exit.
//!
//! No isolation: a "container" is only a name that groups processes for KILLCONTAINER. A
//! process's lifecycle task waits until its output pipes reach EOF and it has exited, then
//! queues an EOF packet on its stdio sequence and the dialect's exit report behind all of its
//! output.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;

use bytes::Bytes;
use cc_proxy_protocol::{ControlFrame, Dialect, IoFrame, Process, ProcessAsyncEvent};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::pty;
use crate::vm::{log, Outgoing, Vm, OUTPUT_CHUNK};

/// Host stdin packets that may wait for a process to read them, per process.
const STDIN_QUEUE: usize = 16;

/// The end-of-file character a terminal turns into EOF for its reader (^D).
const TERMINAL_EOF: u8 = 4;

/// Why a command about processes failed; the text goes back to the host in an ERROR.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process args must not be empty")]
    NoArgs,
    #[error("process id '{0}' is already in use")]
    DuplicateId(String),
    #[error("no process '{process}' in container '{container}'")]
    NoSuchProcess { container: String, process: String },
    #[error("no process with stdio sequence {0}")]
    NoSuchSeq(u64),
    #[error("no such container '{0}'")]
    NoSuchContainer(String),
    #[error("container '{0}' has no init process")]
    NoInit(String),
    #[error("cannot allocate a terminal: {0}")]
    Pty(std::io::Error),
    #[error("cannot start '{program}': {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("cannot signal process {pid}: {source}")]
    Signal { pid: i32, source: std::io::Error },
    #[error("cannot resize terminal: {0}")]
    Resize(std::io::Error),
}

/// A live process.
struct Entry {
    /// Container it was started in.
    container: String,
    /// Its `process.id` (may be empty in the cc-agent dialect).
    id: String,
    /// OS process id, for signals.
    pid: i32,
    /// Sequence number of stdin/stdout.
    stdio: u64,
    /// Sequence number of stderr (0 if merged).
    stderr: u64,
    /// Started by NEWCONTAINER: the container's init, target of KILLCONTAINER.
    init: bool,
    /// Feeds the stdin task; `None` once the host closed stdin.
    stdin: Option<mpsc::Sender<Bytes>>,
    /// The pty master, for WINSIZE; `None` without a terminal.
    pty: Option<Arc<OwnedFd>>,
    /// Distinguishes entries that reuse an id after an earlier process exited.
    key: u64,
}

/// Where a host I/O packet goes.
pub enum StdinTarget {
    /// Data for a process whose stdin is open.
    Write(mpsc::Sender<Bytes>),
    /// Nothing to do: stdin was closed (now or before), or the sequence is a stderr stream.
    Ignore,
    /// No process has this sequence: the agent answers with an empty packet.
    Unknown,
}

/// The live processes of one VM. Few per VM, so lookups are linear scans.
#[derive(Default)]
pub struct ProcessTable {
    entries: Vec<Entry>,
    next_key: u64,
}

impl ProcessTable {
    /// Decides what to do with a host packet on `seq`; an empty packet closes stdin.
    pub fn stdin_target(&mut self, seq: u64, close: bool) -> StdinTarget {
        let Some(entry) = self.entries.iter_mut().find(|e| e.stdio == seq) else {
            if self.entries.iter().any(|e| e.stderr == seq && seq != 0) {
                return StdinTarget::Ignore;
            }
            return StdinTarget::Unknown;
        };
        if close {
            entry.stdin = None;
            return StdinTarget::Ignore;
        }
        match &entry.stdin {
            Some(tx) => StdinTarget::Write(tx.clone()),
            None => StdinTarget::Ignore,
        }
    }

    /// Sends `signal` to a container's init, or to all its processes.
    pub fn kill_container(
        &self,
        container: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), ProcessError> {
        let mut members = self
            .entries
            .iter()
            .filter(|e| e.container == container)
            .peekable();
        if members.peek().is_none() {
            return Err(ProcessError::NoSuchContainer(container.to_owned()));
        }
        let targets: Vec<i32> = members.filter(|e| all || e.init).map(|e| e.pid).collect();
        if targets.is_empty() {
            return Err(ProcessError::NoInit(container.to_owned()));
        }
        targets
            .into_iter()
            .try_for_each(|pid| send_signal(pid, signal))
    }

    /// Sends `signal` to one process named by container and id.
    pub fn signal_process(
        &self,
        container: &str,
        process: &str,
        signal: i32,
    ) -> Result<(), ProcessError> {
        let entry = self.by_name(container, process)?;
        send_signal(entry.pid, signal)
    }

    /// Resizes the terminal of the process whose stdio sequence is `seq` (cc-agent WINSIZE).
    pub fn resize_by_seq(&self, seq: u64, rows: u16, columns: u16) -> Result<(), ProcessError> {
        let entry = self
            .entries
            .iter()
            .find(|e| e.stdio == seq)
            .ok_or(ProcessError::NoSuchSeq(seq))?;
        resize(entry, rows, columns)
    }

    /// Resizes the terminal of a process named by container and id (hyperstart WINSIZE).
    pub fn resize_by_name(
        &self,
        container: &str,
        process: &str,
        rows: u16,
        columns: u16,
    ) -> Result<(), ProcessError> {
        resize(self.by_name(container, process)?, rows, columns)
    }

    fn by_name(&self, container: &str, process: &str) -> Result<&Entry, ProcessError> {
        self.entries
            .iter()
            .find(|e| e.container == container && e.id == process)
            .ok_or_else(|| ProcessError::NoSuchProcess {
                container: container.to_owned(),
                process: process.to_owned(),
            })
    }

    fn remove(&mut self, key: u64) {
        self.entries.retain(|e| e.key != key);
    }
}

/// Resizing a process without a terminal is accepted and does nothing.
fn resize(entry: &Entry, rows: u16, columns: u16) -> Result<(), ProcessError> {
    match &entry.pty {
        Some(fd) => pty::set_window_size(fd, rows, columns).map_err(ProcessError::Resize),
        None => Ok(()),
    }
}

fn send_signal(pid: i32, signal: i32) -> Result<(), ProcessError> {
    if pid <= 0 {
        // kill(0 or -1, ..) would hit a whole process group or every process we may signal.
        return Err(ProcessError::Signal {
            pid,
            source: std::io::Error::other("process id unknown"),
        });
    }
    // SAFETY: kill takes plain integers and touches no memory.
    if unsafe { libc::kill(pid, signal) } < 0 {
        let err = std::io::Error::last_os_error();
        // Already exited but not yet reaped by its lifecycle task: nothing left to signal.
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(ProcessError::Signal { pid, source: err });
        }
    }
    Ok(())
}

/// The pieces of a freshly spawned process that its tasks take over.
struct Spawned {
    child: tokio::process::Child,
    stdin: Box<dyn AsyncWrite + Unpin + Send>,
    stdout: Box<dyn AsyncRead + Unpin + Send>,
    stderr: Option<Box<dyn AsyncRead + Unpin + Send>>,
    pty: Option<Arc<OwnedFd>>,
}

/// Starts `process` in `container` and registers it; returns once it is running.
pub fn start(
    vm: &Arc<Vm>,
    container: &str,
    process: Process,
    init: bool,
) -> Result<(), ProcessError> {
    if process.args.is_empty() {
        return Err(ProcessError::NoArgs);
    }
    let mut procs = vm.procs();
    if !process.id.is_empty() && procs.entries.iter().any(|e| e.id == process.id) {
        return Err(ProcessError::DuplicateId(process.id));
    }
    let spawned = if process.terminal {
        spawn_on_pty(&process)?
    } else {
        spawn_on_pipes(&process)?
    };
    let Spawned {
        child,
        stdin,
        stdout,
        stderr,
        pty,
    } = spawned;
    let pid = child.id().map_or(-1, |p| p as i32);
    let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
    let key = procs.next_key;
    procs.next_key += 1;
    procs.entries.push(Entry {
        container: container.to_owned(),
        id: process.id.clone(),
        pid,
        stdio: process.stdio,
        stderr: process.stderr,
        init,
        stdin: Some(stdin_tx),
        pty,
        key,
    });
    drop(procs);
    log(
        vm.index,
        &format!(
            "started {:?} as pid {pid} (container {container}, id '{}', stdio {}, stderr {})",
            process.args, process.id, process.stdio, process.stderr
        ),
    );

    tokio::spawn(feed_stdin(stdin, stdin_rx, process.terminal));
    let vm = Arc::clone(vm);
    let container = container.to_owned();
    tokio::spawn(async move {
        let status = lifecycle(&vm, child, stdout, stderr, &process).await;
        vm.procs().remove(key);
        report_exit(&vm, &container, &process, status);
    });
    Ok(())
}

fn command(process: &Process) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&process.args[0]);
    cmd.args(&process.args[1..]);
    for var in &process.envs {
        cmd.env(&var.env, &var.value);
    }
    if !process.workdir.is_empty() {
        cmd.current_dir(&process.workdir);
    }
    cmd
}

fn spawn_error(process: &Process) -> impl FnOnce(std::io::Error) -> ProcessError + '_ {
    move |source| ProcessError::Spawn {
        program: process.args[0].clone(),
        source,
    }
}

fn spawn_on_pipes(process: &Process) -> Result<Spawned, ProcessError> {
    let mut cmd = command(process);
    let err = spawn_error(process);
    // stdout (and stderr when it is merged) share one pipe, which keeps their relative order.
    let (out_r, out_w) = std::io::pipe().map_err(spawn_error(process))?;
    let stderr_r = if process.stderr != 0 {
        let (r, w) = std::io::pipe().map_err(spawn_error(process))?;
        cmd.stderr(w);
        Some(r)
    } else {
        cmd.stderr(out_w.try_clone().map_err(spawn_error(process))?);
        None
    };
    cmd.stdout(out_w).stdin(Stdio::piped());
    let mut child = cmd.spawn().map_err(spawn_error(process))?;
    // Close our copies of the write ends now, or the readers would never see EOF.
    drop(cmd);
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| err(std::io::Error::other("no stdin pipe")))?;
    let stdout = pipe_reader(out_r.into()).map_err(spawn_error(process))?;
    let stderr = match stderr_r {
        Some(r) => Some(pipe_reader(r.into()).map_err(spawn_error(process))?),
        None => None,
    };
    Ok(Spawned {
        child,
        stdin: Box::new(stdin),
        stdout,
        stderr,
        pty: None,
    })
}

fn spawn_on_pty(process: &Process) -> Result<Spawned, ProcessError> {
    let pty = pty::open().map_err(ProcessError::Pty)?;
    let mut cmd = command(process);
    let slave = |p: &pty::Pty| {
        p.slave
            .try_clone()
            .map(Stdio::from)
            .map_err(ProcessError::Pty)
    };
    cmd.stdin(slave(&pty)?)
        .stdout(slave(&pty)?)
        .stderr(slave(&pty)?);
    // SAFETY: the hook runs between fork and exec and only calls async-signal-safe functions.
    unsafe {
        cmd.pre_exec(pty::make_controlling_terminal);
    }
    let child = cmd.spawn().map_err(spawn_error(process))?;
    drop(cmd);
    let pty::Pty { master, slave } = pty;
    drop(slave);
    pty::set_nonblocking(master.as_raw_fd()).map_err(ProcessError::Pty)?;
    let reader =
        pipe_reader(master.try_clone().map_err(ProcessError::Pty)?).map_err(ProcessError::Pty)?;
    let writer =
        pipe::Sender::from_owned_fd_unchecked(master.try_clone().map_err(ProcessError::Pty)?)
            .map_err(ProcessError::Pty)?;
    Ok(Spawned {
        child,
        stdin: Box::new(writer),
        stdout: reader,
        stderr: None,
        pty: Some(Arc::new(master)),
    })
}

fn pipe_reader(fd: OwnedFd) -> std::io::Result<Box<dyn AsyncRead + Unpin + Send>> {
    pty::set_nonblocking(fd.as_raw_fd())?;
    Ok(Box::new(pipe::Receiver::from_owned_fd_unchecked(fd)?))
}

/// Writes host stdin packets into the process until the host closes stdin.
async fn feed_stdin(
    mut stdin: Box<dyn AsyncWrite + Unpin + Send>,
    mut rx: mpsc::Receiver<Bytes>,
    terminal: bool,
) {
    let mut open = true;
    while let Some(data) = rx.recv().await {
        // After a write error keep draining, so the I/O reader never blocks on us.
        if open && stdin.write_all(&data).await.is_err() {
            open = false;
        }
    }
    if open && terminal {
        // A pty has no half-close: send the EOF character, as a user at the keyboard would.
        let _ = stdin.write_all(&[TERMINAL_EOF]).await;
    }
}

/// Streams the process's output and waits for it to exit; returns its status (exit code, or
/// 128 + signal number).
async fn lifecycle(
    vm: &Vm,
    mut child: tokio::process::Child,
    stdout: Box<dyn AsyncRead + Unpin + Send>,
    stderr: Option<Box<dyn AsyncRead + Unpin + Send>>,
    process: &Process,
) -> i32 {
    let out = copy_output(vm, stdout, process.stdio);
    let err = async {
        if let Some(stderr) = stderr {
            copy_output(vm, stderr, process.stderr).await;
        }
    };
    let (_, _, status) = tokio::join!(out, err, child.wait());
    match status {
        Ok(status) => exit_code(status),
        Err(e) => {
            log(
                vm.index,
                &format!("waiting for {:?} failed: {e}", process.args),
            );
            255
        }
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 255,
    }
}

/// Queues everything `reader` yields as packets on `seq` (discarded when `seq` is 0).
async fn copy_output(vm: &Vm, mut reader: Box<dyn AsyncRead + Unpin + Send>, seq: u64) {
    let mut buf = vec![0u8; OUTPUT_CHUNK.min(vm.config.max_frame.saturating_sub(12).max(1))];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) if seq != 0 => vm.send_output(seq, &buf[..n]).await,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A pty master reports EIO once the last slave descriptor is closed: that is EOF.
            Err(_) => return,
        }
    }
}

/// Queues the EOF packet and the dialect's exit report behind the process's output.
fn report_exit(vm: &Vm, container: &str, process: &Process, status: i32) {
    log(
        vm.index,
        &format!(
            "process '{}' {:?} exited with status {status}",
            process.id, process.args
        ),
    );
    if process.stdio != 0 {
        vm.queue(Outgoing::Io {
            frame: IoFrame::eof(process.stdio),
            budget: 0,
        });
    }
    match vm.dialect() {
        Dialect::CcAgent => {
            if process.stdio != 0 {
                // The status travels as one byte; codes above 255 cannot occur on Linux.
                let byte = Bytes::copy_from_slice(&[status as u8]);
                vm.queue(Outgoing::Io {
                    frame: IoFrame::new(process.stdio, byte),
                    budget: 0,
                });
            }
        }
        Dialect::Hyperstart => {
            let event = ProcessAsyncEvent {
                container: container.to_owned(),
                process: process.id.clone(),
                event: "finished".to_owned(),
                status,
            };
            match serde_json::to_vec(&event) {
                Ok(json) => vm.queue(Outgoing::Event(ControlFrame::new(
                    vm.dialect().process_async_event_code(),
                    json,
                ))),
                Err(e) => log(vm.index, &format!("cannot encode exit event: {e}")),
            }
        }
    }
}
