//! Control commands: decode the payload, act, and produce the ACK payload or the ERROR text.

use std::sync::Arc;

use bytes::Bytes;
use cc_proxy_protocol::payload::{ExecCmd, NewContainer};
use cc_proxy_protocol::{
    code, encode_version, Dialect, KillContainer, SignalProcess, WinSizeCcAgent, WinSizeHyperstart,
};
use serde::de::DeserializeOwned;

use crate::cli::Fault;
use crate::process::{self, ProcessError};
use crate::vm::Vm;

/// Why a command got an ERROR reply; the text is the ERROR payload.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("unknown command {0}")]
    Unknown(u32),
    #[error("malformed payload: {0}")]
    Json(#[from] serde_json::Error),
    #[error("container id must not be empty")]
    NoContainerId,
    #[error("{0}")]
    Process(#[from] ProcessError),
    #[error("{0}: {1}")]
    File(String, std::io::Error),
    #[error("writefile needs a JSON object before the content")]
    NoFile,
}

/// READFILE and WRITEFILE name a container and a file in it.
#[derive(Debug, serde::Deserialize)]
struct FileRequest {
    file: String,
}

/// Carries out one command and returns the ACK payload.
pub async fn handle(vm: &Arc<Vm>, code: u32, payload: &[u8]) -> Result<Bytes, CommandError> {
    let dialect = vm.dialect();
    match code {
        code::GETVERSION if vm.config.fault == Some(Fault::EmptyVersion) => Ok(Bytes::new()),
        code::GETVERSION => Ok(Bytes::copy_from_slice(&encode_version(
            vm.config.api_version,
        ))),
        code::PING => Ok(Bytes::new()),
        code::STARTPOD
        | code::DESTROYPOD
        | code::REMOVECONTAINER
        | code::ONLINECPUMEM
        | code::SETUPINTERFACE
        | code::SETUPROUTE
        | code::READY => {
            if !payload.is_empty() {
                parse::<serde::de::IgnoredAny>(payload)?;
            }
            Ok(Bytes::new())
        }
        code::READFILE => {
            // No isolation: the file is read on the agent's own file system. The ACK is the raw
            // content, like hyperstart's.
            let req: FileRequest = parse(payload)?;
            let data = std::fs::read(&req.file).map_err(|e| CommandError::File(req.file, e))?;
            Ok(Bytes::from(data))
        }
        code::WRITEFILE => {
            // The JSON object, then the file's raw bytes in the same message.
            let mut objects =
                serde_json::Deserializer::from_slice(payload).into_iter::<FileRequest>();
            let req = match objects.next() {
                Some(r) => r?,
                None => return Err(CommandError::NoFile),
            };
            let content = &payload[objects.byte_offset()..];
            std::fs::write(&req.file, content).map_err(|e| CommandError::File(req.file, e))?;
            Ok(Bytes::new())
        }
        code::NEWCONTAINER => {
            let req: NewContainer = parse(payload)?;
            if req.id.is_empty() {
                return Err(CommandError::NoContainerId);
            }
            process::start(vm, &req.id, req.process, true)?;
            Ok(Bytes::new())
        }
        code::EXECCMD => {
            let req: ExecCmd = parse(payload)?;
            if req.container.is_empty() {
                return Err(CommandError::NoContainerId);
            }
            process::start(vm, &req.container, req.process, false)?;
            Ok(Bytes::new())
        }
        code::KILLCONTAINER => {
            let req: KillContainer = parse(payload)?;
            vm.procs()
                .kill_container(&req.container, req.signal, req.all_processes)?;
            Ok(Bytes::new())
        }
        code::WINSIZE => {
            match dialect {
                Dialect::CcAgent => {
                    let req: WinSizeCcAgent = parse(payload)?;
                    vm.procs().resize_by_seq(req.seq, req.row, req.column)?;
                }
                Dialect::Hyperstart => {
                    let req: WinSizeHyperstart = parse(payload)?;
                    vm.procs().resize_by_name(
                        &req.container,
                        &req.process,
                        req.row,
                        req.column,
                        vm.config.strict,
                    )?;
                }
            }
            Ok(Bytes::new())
        }
        c if Some(c) == dialect.signal_process_code() => {
            let req: SignalProcess = parse(payload)?;
            vm.procs().signal_process(
                &req.container,
                &req.process,
                req.signal,
                vm.config.strict,
            )?;
            Ok(Bytes::new())
        }
        other => Err(CommandError::Unknown(other)),
    }
}

fn parse<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CommandError> {
    Ok(serde_json::from_slice(payload)?)
}
