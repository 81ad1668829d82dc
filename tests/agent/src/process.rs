//! Real processes started by NEWCONTAINER and EXECCMD: spawning (on pipes or a pty), routing
//! host stdin to them, streaming their output, and reporting their exit.
//!
//! No isolation: a "container" is only a name that groups processes for KILLCONTAINER. A
//! process's lifecycle task waits until its output pipes reach EOF and it has exited, then
//! queues an EOF packet on its stdio sequence and the dialect's exit report behind all of its
//! output.
//!
//! Host stdin reaches a process one of two ways ([`StdinFeed`]): a forgiving queue that waits
//! for the process to read, or, in strict mode, a model of real hyperstart's fixed 512-byte
//! per-process buffer ([`StrictStdin`]) that discards what does not fit and is flushed into the
//! process's pipe only on a later pass of the I/O reader.

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

/// Strict mode: the size of real hyperstart's per-process stdin write buffer; host stdin that
/// does not fit is discarded.
pub const STRICT_STDIN_BUFFER: usize = 512;

/// The pseudo-container that runs processes in the agent's own namespaces.
pub const PSEUDO_CONTAINER: &str = "hyperstart";

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
    #[error("unknown user '{0}'")]
    NoSuchUser(String),
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
    #[error(
        "processes of the '{PSEUDO_CONTAINER}' pseudo-container cannot be signalled or resized"
    )]
    PseudoContainer,
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
    stdin: Option<StdinFeed>,
    /// The pty master, for WINSIZE; `None` without a terminal.
    pty: Option<Arc<OwnedFd>>,
    /// Distinguishes entries that reuse an id after an earlier process exited.
    key: u64,
}

/// How host stdin packets reach one process.
#[derive(Clone)]
pub enum StdinFeed {
    /// A queue the process's stdin task drains, waiting while the process does not read.
    Queue(mpsc::Sender<Bytes>),
    /// Strict mode: hyperstart's fixed buffer, which discards what does not fit.
    Strict(Arc<StrictStdin>),
}

/// Strict mode's model of one process's stdin buffer in real hyperstart: at most
/// [`STRICT_STDIN_BUFFER`] bytes; a packet's bytes may be written into the pipe only from the
/// next pass of the I/O reader on ([`StrictStdin::release`], which writes what the pipe takes
/// at once, without waiting); bytes leave the buffer only once the pipe took them, so a
/// process that stops reading makes later packets overflow.
pub struct StrictStdin {
    inner: std::sync::Mutex<StrictState>,
    /// Wakes the retry task: released bytes are left that the pipe did not take.
    wake: tokio::sync::Notify,
}

/// What a [`StrictStdin`] holds.
struct StrictState {
    /// Bytes accepted and not yet written into the pipe.
    buf: Vec<u8>,
    /// How many bytes at the front of `buf` may be written now.
    released: usize,
    /// Bytes at the back of `buf` that pass `fresh_pass` of the I/O reader appended: not
    /// writable during that pass.
    fresh: usize,
    /// The I/O reader's pass that appended `fresh`.
    fresh_pass: u64,
    /// The host sent the empty packet: close stdin once `buf` is written.
    closing: bool,
    /// Our non-blocking end of the process's stdin; `None` once closed or broken (the process
    /// closed its stdin), after which everything is discarded.
    pipe: Option<std::fs::File>,
    /// The process runs on a terminal: closing writes ^D instead of closing the master.
    terminal: bool,
}

impl StrictState {
    /// Writes released bytes until the pipe is full; closes stdin when asked and drained.
    /// Returns whether released bytes are left.
    fn flush(&mut self) -> bool {
        use std::io::Write;
        while self.released > 0 {
            let Some(pipe) = self.pipe.as_mut() else {
                self.buf.clear();
                self.released = 0;
                break;
            };
            match pipe.write(&self.buf[..self.released]) {
                Ok(n) if n > 0 => {
                    self.buf.drain(..n);
                    self.released -= n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => self.pipe = None,
            }
        }
        if self.closing && self.buf.is_empty() {
            if let Some(mut pipe) = self.pipe.take() {
                if self.terminal {
                    // A pty has no half-close: send the EOF character, as a user would.
                    let _ = pipe.write(&[TERMINAL_EOF]);
                    // The master stays open for the output reader's own descriptor.
                }
            }
        }
        false
    }
}

impl StrictStdin {
    fn new(pipe: OwnedFd, terminal: bool) -> Arc<StrictStdin> {
        Arc::new(StrictStdin {
            inner: std::sync::Mutex::new(StrictState {
                buf: Vec::with_capacity(STRICT_STDIN_BUFFER),
                released: 0,
                fresh: 0,
                fresh_pass: 0,
                closing: false,
                pipe: Some(std::fs::File::from(pipe)),
                terminal,
            }),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Accepts one packet's data during I/O reader pass `pass`; returns how many bytes did
    /// not fit and were discarded.
    pub fn push(&self, data: &[u8], pass: u64) -> usize {
        let mut s = crate::vm::lock(&self.inner);
        if s.pipe.is_none() || s.closing {
            return data.len();
        }
        let room = STRICT_STDIN_BUFFER.saturating_sub(s.buf.len());
        let kept = data.len().min(room);
        s.buf.extend_from_slice(&data[..kept]);
        if s.fresh_pass != pass {
            s.fresh = 0;
            s.fresh_pass = pass;
        }
        s.fresh += kept;
        data.len() - kept
    }

    /// Whether a later pass must still release something.
    pub fn pending(&self) -> bool {
        let s = crate::vm::lock(&self.inner);
        s.released < s.buf.len()
    }

    /// The host closed stdin (empty packet): the pipe is closed once the buffer is written.
    pub fn close(&self) {
        crate::vm::lock(&self.inner).closing = true;
    }

    /// Pass `pass` of the I/O reader: everything buffered by earlier passes may be written;
    /// what the pipe takes now is written now, the rest by the retry task as the process reads.
    pub fn release(&self, pass: u64) {
        let mut s = crate::vm::lock(&self.inner);
        let fresh = if s.fresh_pass == pass { s.fresh } else { 0 };
        s.released = s.buf.len() - fresh;
        let left = s.flush();
        drop(s);
        if left {
            self.wake.notify_one();
        }
    }
}

impl StrictStdin {
    /// The process is gone: drop the buffer and the pipe, and end the retry task.
    fn shut(&self) {
        let mut s = crate::vm::lock(&self.inner);
        s.pipe = None;
        s.buf.clear();
        s.released = 0;
        drop(s);
        self.wake.notify_one();
    }
}

/// How often the retry task tries a full pipe again (hyperstart waits for EPOLLOUT).
const STRICT_RETRY: std::time::Duration = std::time::Duration::from_millis(2);

/// Writes released bytes the pipe could not take at once, as the process makes room; ends
/// when stdin is closed.
async fn retry_strict_stdin(strict: Arc<StrictStdin>) {
    loop {
        strict.wake.notified().await;
        loop {
            tokio::time::sleep(STRICT_RETRY).await;
            let mut s = crate::vm::lock(&strict.inner);
            if !s.flush() {
                break;
            }
        }
        let s = crate::vm::lock(&strict.inner);
        if s.pipe.is_none() {
            return;
        }
    }
}

/// Where a host I/O packet goes.
pub enum StdinTarget {
    /// Data for a process whose stdin is open.
    Write(StdinFeed),
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
            if let Some(StdinFeed::Strict(strict)) = entry.stdin.take() {
                // Like data, the close takes effect behind what is buffered.
                strict.close();
                return StdinTarget::Write(StdinFeed::Strict(strict));
            }
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

    /// Sends `signal` to one process named by container and id. Strict mode refuses the
    /// pseudo-container, as real hyperstart does.
    pub fn signal_process(
        &self,
        container: &str,
        process: &str,
        signal: i32,
        strict: bool,
    ) -> Result<(), ProcessError> {
        if strict && container == PSEUDO_CONTAINER {
            return Err(ProcessError::PseudoContainer);
        }
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

    /// Resizes the terminal of a process named by container and id (hyperstart WINSIZE). Strict
    /// mode refuses the pseudo-container, as real hyperstart does.
    pub fn resize_by_name(
        &self,
        container: &str,
        process: &str,
        rows: u16,
        columns: u16,
        strict: bool,
    ) -> Result<(), ProcessError> {
        if strict && container == PSEUDO_CONTAINER {
            return Err(ProcessError::PseudoContainer);
        }
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
        for e in self.entries.iter_mut().filter(|e| e.key == key) {
            if let Some(StdinFeed::Strict(strict)) = e.stdin.take() {
                strict.shut();
            }
        }
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
    /// Our end of the process's stdin (pipe write end or pty master), non-blocking.
    stdin: OwnedFd,
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
    let feed = if vm.config.strict {
        let strict = StrictStdin::new(stdin, process.terminal);
        tokio::spawn(retry_strict_stdin(Arc::clone(&strict)));
        StdinFeed::Strict(strict)
    } else {
        let writer = pipe::Sender::from_owned_fd_unchecked(stdin).map_err(ProcessError::Pty)?;
        let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
        tokio::spawn(feed_stdin(Box::new(writer), stdin_rx, process.terminal));
        StdinFeed::Queue(stdin_tx)
    };
    let key = procs.next_key;
    procs.next_key += 1;
    procs.entries.push(Entry {
        container: container.to_owned(),
        id: process.id.clone(),
        pid,
        stdio: process.stdio,
        stderr: process.stderr,
        init,
        stdin: Some(feed),
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

    let vm = Arc::clone(vm);
    let container = container.to_owned();
    tokio::spawn(async move {
        let status = lifecycle(&vm, child, stdout, stderr, &process).await;
        vm.procs().remove(key);
        report_exit(&vm, &container, &process, status);
    });
    Ok(())
}

fn command(process: &Process) -> Result<tokio::process::Command, ProcessError> {
    let mut cmd = tokio::process::Command::new(&process.args[0]);
    cmd.args(&process.args[1..]);
    for var in &process.envs {
        cmd.env(&var.env, &var.value);
    }
    if !process.workdir.is_empty() {
        cmd.current_dir(&process.workdir);
    }
    if !process.user.is_empty() {
        let (uid, gid) = lookup_user(&process.user)
            .ok_or_else(|| ProcessError::NoSuchUser(process.user.clone()))?;
        cmd.uid(uid).gid(gid);
    }
    Ok(cmd)
}

/// A user's uid and primary gid from /etc/passwd; a numeric uid not listed there runs with gid = uid.
fn lookup_user(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let listed = passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && (f[0] == user || f[2] == user))
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    });
    listed.or_else(|| user.parse().ok().map(|uid| (uid, uid)))
}

fn spawn_error(process: &Process) -> impl FnOnce(std::io::Error) -> ProcessError + '_ {
    move |source| ProcessError::Spawn {
        program: process.args[0].clone(),
        source,
    }
}

fn spawn_on_pipes(process: &Process) -> Result<Spawned, ProcessError> {
    let mut cmd = command(process)?;
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
    let (in_r, in_w) = std::io::pipe().map_err(spawn_error(process))?;
    cmd.stdout(out_w).stdin(in_r);
    let child = cmd.spawn().map_err(spawn_error(process))?;
    // Close our copies of the child's ends now, or the readers would never see EOF.
    drop(cmd);
    let stdin = OwnedFd::from(in_w);
    pty::set_nonblocking(stdin.as_raw_fd()).map_err(spawn_error(process))?;
    let stdout = pipe_reader(out_r.into()).map_err(spawn_error(process))?;
    let stderr = match stderr_r {
        Some(r) => Some(pipe_reader(r.into()).map_err(spawn_error(process))?),
        None => None,
    };
    Ok(Spawned {
        child,
        stdin,
        stdout,
        stderr,
        pty: None,
    })
}

fn spawn_on_pty(process: &Process) -> Result<Spawned, ProcessError> {
    let pty = pty::open().map_err(ProcessError::Pty)?;
    let mut cmd = command(process)?;
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
    let writer = master.try_clone().map_err(ProcessError::Pty)?;
    Ok(Spawned {
        child,
        stdin: writer,
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
/// 128 + signal number; 0 for a signal death in strict mode, like real hyperstart).
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
        Ok(status) => exit_code(status, vm.config.strict),
        Err(e) => {
            log(
                vm.index,
                &format!("waiting for {:?} failed: {e}", process.args),
            );
            255
        }
    }
}

fn exit_code(status: ExitStatus, strict: bool) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        // Real hyperstart leaves the status at 0 when WIFSIGNALED.
        (None, Some(_)) if strict => 0,
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
