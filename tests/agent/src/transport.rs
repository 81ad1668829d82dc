//! How host connections reach a VM: the listeners of each transport, feeding accepted
//! connections to [`Vm::attach`].
//!
//! Host-side transports (one socket set per VM, suffixed `.N` when serving several VMs):
//! - hybrid vsock: one unix socket; each connection starts with `CONNECT <port>\n`, answered
//!   with `OK <number>\n`, where port 2718 selects the control channel and 2719 the I/O channel;
//! - a pair of unix sockets, one per channel, like QEMU virtio-serial chardevs.
//!
//! Guest-side transports (one VM): AF_VSOCK ports 2718/2719, or the virtio-serial ports named
//! `sh.hyper.channel.0`/`.1`. A serial port cannot be accepted on, so two threads bridge it to
//! an in-memory duplex stream per host session; the host (re)opening its end is seen through
//! `poll` reporting no hang-up.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::runtime::Handle;

use crate::vm::{Channel, Vm};

/// Guest port of the control channel on vsock.
pub const CONTROL_PORT: u32 = 2718;
/// Guest port of the I/O channel on vsock.
pub const IO_PORT: u32 = 2719;
/// virtio-serial port name of the control channel.
pub const CONTROL_PORT_NAME: &str = "sh.hyper.channel.0";
/// virtio-serial port name of the I/O channel.
pub const IO_PORT_NAME: &str = "sh.hyper.channel.1";

/// Longest `CONNECT <port>` line we read before giving up on a hybrid-vsock client.
const MAX_CONNECT_LINE: usize = 64;
/// How long a hybrid-vsock client may take to send its `CONNECT` line.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often a serial bridge checks whether the host has opened its end.
const SERIAL_POLL: Duration = Duration::from_millis(100);

/// Why setting up a transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to remove it")]
    NotASocket { path: PathBuf },
    #[error("vsock port {port}: {source}")]
    Vsock { port: u32, source: std::io::Error },
    #[error("no virtio-serial port named {0} under /sys/class/virtio-ports")]
    NoSerialPort(&'static str),
    #[error("guest transports serve exactly one VM (got --count {0})")]
    GuestCount(usize),
}

/// The socket path of VM `index` out of `count`: `PATH` alone, `PATH.<index>` for several.
pub fn suffixed(path: &Path, index: usize, count: usize) -> PathBuf {
    if count == 1 {
        return path.to_owned();
    }
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{index}"));
    PathBuf::from(s)
}

/// Binds a unix listener at `path`, removing a stale socket left by an earlier run.
pub fn bind_unix(path: &Path) -> Result<UnixListener, TransportError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| TransportError::Bind {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(TransportError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|source| TransportError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Accepts connections on `listener` forever, each going to `vm` as `channel`.
pub async fn serve_channel(listener: UnixListener, vm: Arc<Vm>, channel: Channel) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => vm.attach(channel, Box::new(stream)),
            Err(e) => {
                crate::vm::log(vm.index, &format!("accept failed: {e}"));
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Accepts hybrid-vsock connections on `listener` forever.
pub async fn serve_hvsock(listener: UnixListener, vm: Arc<Vm>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let vm = Arc::clone(&vm);
                tokio::spawn(async move {
                    match tokio::time::timeout(CONNECT_TIMEOUT, hvsock_handshake(stream)).await {
                        Ok(Ok(Some((channel, stream)))) => vm.attach(channel, Box::new(stream)),
                        Ok(Ok(None)) => {}
                        Ok(Err(e)) => {
                            crate::vm::log(vm.index, &format!("hybrid vsock handshake: {e}"))
                        }
                        Err(_) => crate::vm::log(vm.index, "hybrid vsock handshake timed out"),
                    }
                });
            }
            Err(e) => {
                crate::vm::log(vm.index, &format!("accept failed: {e}"));
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Reads `CONNECT <port>\n` byte by byte (so nothing after it is consumed) and answers
/// `OK <n>\n` for the two agent ports; other ports are closed without an answer.
async fn hvsock_handshake(
    mut stream: UnixStream,
) -> std::io::Result<Option<(Channel, UnixStream)>> {
    static NEXT_HOST_PORT: AtomicU32 = AtomicU32::new(1 << 30);
    let mut line = Vec::with_capacity(MAX_CONNECT_LINE);
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            break;
        }
        if line.len() == MAX_CONNECT_LINE {
            return Err(std::io::Error::other("CONNECT line too long"));
        }
        line.push(byte);
    }
    let text = String::from_utf8_lossy(&line);
    let port = text
        .trim_end()
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad handshake line {text:?}")))?;
    let channel = match port {
        CONTROL_PORT => Channel::Control,
        IO_PORT => Channel::Io,
        _ => return Ok(None),
    };
    let host_port = NEXT_HOST_PORT.fetch_add(1, Ordering::Relaxed);
    stream
        .write_all(format!("OK {host_port}\n").as_bytes())
        .await?;
    Ok(Some((channel, stream)))
}

/// Listens on AF_VSOCK (any CID) `port` forever, each connection going to `vm` as `channel`.
pub fn serve_vsock(port: u32, vm: Arc<Vm>, channel: Channel) -> Result<(), TransportError> {
    use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))
        .map_err(|source| TransportError::Vsock { port, source })?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => vm.attach(channel, Box::new(stream)),
                Err(e) => {
                    crate::vm::log(vm.index, &format!("vsock accept failed: {e}"));
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    });
    Ok(())
}

/// The `/dev` node of the virtio-serial port named `name`.
pub fn find_serial_port(name: &'static str) -> Result<PathBuf, TransportError> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports")
        .map_err(|_| TransportError::NoSerialPort(name))?;
    for entry in entries.flatten() {
        let name_file = entry.path().join("name");
        if let Ok(found) = std::fs::read_to_string(&name_file) {
            if found.trim() == name {
                return Ok(Path::new("/dev").join(entry.file_name()));
            }
        }
    }
    Err(TransportError::NoSerialPort(name))
}

/// Bridges the serial port `dev` to `vm` as `channel` on a dedicated thread, forever.
pub fn serve_serial(handle: Handle, dev: PathBuf, vm: Arc<Vm>, channel: Channel) {
    std::thread::spawn(move || loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
        {
            Ok(port) => serial_sessions(&handle, port, &vm, channel),
            Err(e) => crate::vm::log(vm.index, &format!("{}: {e}", dev.display())),
        }
        std::thread::sleep(Duration::from_secs(1));
    });
}

/// One host session per iteration: wait for the host end, then copy both ways until the host
/// goes away (read returns 0) or the agent ends the session. Returns on a hard error.
fn serial_sessions(handle: &Handle, mut port: std::fs::File, vm: &Arc<Vm>, channel: Channel) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        wait_host_open(&port);
        let (agent_end, bridge_end) = tokio::io::duplex(64 * 1024);
        let (mut from_agent, mut to_agent) = tokio::io::split(bridge_end);
        let mut port_w = match port.try_clone() {
            Ok(w) => w,
            Err(e) => {
                crate::vm::log(vm.index, &format!("serial port: {e}"));
                return;
            }
        };
        let writer_handle = handle.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match writer_handle.block_on(from_agent.read(&mut buf)) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if port_w.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        {
            let _runtime = handle.enter();
            vm.attach(channel, Box::new(agent_end));
        }
        loop {
            match port.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if handle.block_on(to_agent.write_all(&buf[..n])).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    crate::vm::log(vm.index, &format!("serial read: {e}"));
                    return;
                }
            }
        }
        // Dropping our end ends the agent's session (it reads EOF).
        drop(to_agent);
    }
}

/// Blocks until the host has the port open: virtio-console reports POLLHUP while it is not.
fn wait_host_open(port: &std::fs::File) {
    loop {
        let mut pfd = libc::pollfd {
            fd: port.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd through a valid pointer to a local value.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        if rc >= 0 && pfd.revents & libc::POLLHUP == 0 {
            return;
        }
        std::thread::sleep(SERIAL_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_get_an_index_suffix_only_for_several_vms() {
        let p = Path::new("/run/vm.sock");
        assert_eq!(suffixed(p, 0, 1), PathBuf::from("/run/vm.sock"));
        assert_eq!(suffixed(p, 7, 10), PathBuf::from("/run/vm.sock.7"));
    }

    #[test]
    fn stale_sockets_are_replaced_but_other_files_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("s");
        let _first = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async { bind_unix(&sock).expect("rebind over a stale socket") });
        let file = dir.path().join("f");
        std::fs::write(&file, b"keep").expect("write");
        let err = rt.block_on(async { bind_unix(&file).expect_err("not a socket") });
        assert!(matches!(err, TransportError::NotASocket { .. }));
        assert_eq!(std::fs::read(&file).expect("still there"), b"keep");
    }
}
