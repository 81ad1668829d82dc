//! The runtime's commands: RegisterVM, AttachVM, UnregisterVM and Hyper.
//!
//! Hyper forwards an agent command by name through the VM's actor. Only the names of the original protocol
//! are accepted, checked before anything is sent, so an unknown name never occupies the control channel. For
//! `newcontainer`/`execcmd` with a token, the proxy waits for the token's shim (so no output is lost), fills
//! `process.stdio`/`process.stderr` with the token's sequence numbers and forwards every other field of
//! `data` as sent; without a token those processes get the null session (1 and 2), whose output is discarded.

use std::time::Duration;

use bytes::Bytes;
use cc_proxy_api::legacy::{
    AttachVm, Command, Hyper, IoInfo, RegisterVm, UnregisterVm, VmIo, HYPER_NAMES,
};
use cc_proxy_api::types::RegisterParams;
use cc_proxy_protocol::process_object_mut;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::Session;
use crate::error::ProxyError;
use crate::server::authz::{self, Access, Front};
use crate::stream::Token;
use crate::vm::process::{self, StreamUse, DEFAULT_TIMEOUT};
use crate::vm::registry::Registrant;
use crate::vm::Vm;

/// How long a start command waits for its token's shim to connect (the original's value).
pub const SHIM_WAIT: Duration = Duration::from_secs(30);

/// Most tokens one RegisterVM/AttachVM may ask for. A process takes one, so this is generous; it keeps one
/// request from allocating without bound.
pub const MAX_IO_STREAMS: u32 = 256;

/// Sequence numbers of the null session: the agent may write there, the proxy discards it.
const NULL_STDIO: u64 = 1;
const NULL_STDERR: u64 = 2;

/// Why a command failed. The text is the `msg` of the error response.
#[derive(Debug, thiserror::Error)]
pub(super) enum CommandError {
    #[error("invalid payload: {0}")]
    Payload(String),
    #[error("{0}: container already registered")]
    AlreadyRegistered(String),
    #[error("unknown containerID: {0}")]
    UnknownVm(String),
    #[error("numIOStreams {0} exceeds the limit of {MAX_IO_STREAMS}")]
    TooManyStreams(u32),
    #[error("client is not attached to a VM (send RegisterVM or AttachVM first)")]
    NotAttached,
    #[error("unknown command '{0}'")]
    UnknownHyper(String),
    #[error("{0}")]
    Tokens(&'static str),
    #[error("unknown token")]
    UnknownToken,
    #[error("{0} must be 0: the proxy assigns sequence numbers")]
    SequenceSet(&'static str),
    #[error("no shim connected for the token within {}s", SHIM_WAIT.as_secs())]
    ShimTimeout,
    #[error("client isn't a shim")]
    NotShim,
    #[error("client is already a shim")]
    AlreadyShim,
    #[error("the token already has a shim connected")]
    ShimBusy,
    #[error("invalid signal: {0}")]
    Signal(String),
    #[error("{0}")]
    Proxy(#[from] ProxyError),
}

/// Parse a command payload.
pub(super) fn parse<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CommandError> {
    serde_json::from_slice(payload).map_err(|e| CommandError::Payload(e.to_string()))
}

/// `ctlSerial`/`ioSerial`/`console` are socket paths; a URI is accepted as is.
fn to_uri(path: &str) -> String {
    if path.contains("://") {
        path.to_string()
    } else {
        format!("unix://{path}")
    }
}

impl Session {
    /// RegisterVM, AttachVM, UnregisterVM, Hyper. Returns the response payload.
    pub(super) async fn command(
        &mut self,
        command: Command,
        payload: &[u8],
    ) -> Result<Bytes, CommandError> {
        match command {
            Command::RegisterVm => self.register(parse(payload)?).await,
            Command::AttachVm => self.attach(parse(payload)?).await,
            Command::UnregisterVm => self.unregister(parse(payload)?).await,
            Command::Hyper => self.hyper(parse(payload)?).await,
            // Handled by the session itself; listed for completeness.
            Command::ConnectShim | Command::DisconnectShim | Command::Signal => {
                Err(CommandError::NotShim)
            }
        }
    }

    async fn register(&mut self, p: RegisterVm) -> Result<Bytes, CommandError> {
        let wanted = tokens_wanted(p.num_io_streams)?;
        let params = RegisterParams {
            id: p.container_id,
            control: to_uri(&p.ctl_serial),
            io: to_uri(&p.io_serial),
            console: p.console.as_deref().map(to_uri),
            timeout_ms: None,
            mesh: None,
        };
        let by = Registrant {
            uid: self.peer.uid,
            privileged: self.peer.access == Access::Privileged,
            rights: self.peer.endpoint_rights(),
        };
        let vm = self
            .proxy
            .registry
            .register(params, by)
            .await
            .map_err(|e| match e {
                ProxyError::VmExists(id) => CommandError::AlreadyRegistered(id),
                e => CommandError::Proxy(e),
            })?;
        tracing::info!(vm = %vm.id, tokens = wanted, "VM registered by a legacy client");
        self.use_vm(vm, wanted)
    }

    async fn attach(&mut self, p: AttachVm) -> Result<Bytes, CommandError> {
        let wanted = tokens_wanted(p.num_io_streams)?;
        self.check_vm(&p.container_id)?;
        let vm = self
            .proxy
            .registry
            .get_settled(&p.container_id)
            .await
            .map_err(|e| match e {
                ProxyError::VmNotFound(id) => CommandError::UnknownVm(id),
                e => CommandError::Proxy(e),
            })?;
        // The owner checked on the VM got: it may have been registered again meanwhile by another uid.
        authz::check_vm(&self.peer, &vm.id, vm.owner, Front::Legacy)?;
        tracing::debug!(vm = %vm.id, tokens = wanted, "legacy client attached to a VM");
        self.use_vm(vm, wanted)
    }

    /// Remember the VM for Hyper commands and allocate its tokens; the RegisterVM/AttachVM result.
    /// Past a token bound none is kept (the ones allocated for this command are freed again) and the
    /// command fails.
    fn use_vm(&mut self, vm: std::sync::Arc<Vm>, tokens: u32) -> Result<Bytes, CommandError> {
        let mut streams = Vec::new();
        for _ in 0..tokens {
            match vm.allocate_stream(self.peer.uid) {
                Ok(s) => streams.push(s),
                Err(e) => {
                    for s in &streams {
                        vm.free_stream(&s.token);
                    }
                    return Err(CommandError::Proxy(e));
                }
            }
        }
        let tokens: Vec<String> = streams
            .iter()
            .map(|s| s.token.as_str().to_string())
            .collect();
        self.vm = Some(vm);
        let result = VmIo {
            io: IoInfo {
                url: format!("unix://{}", self.proxy.socket.display()),
                tokens: (!tokens.is_empty()).then_some(tokens),
            },
        };
        Ok(Bytes::from(serde_json::to_vec(&result).unwrap_or_default()))
    }

    /// May this client use VM `id`? Unknown ids are left to the command (which answers "unknown").
    pub(super) fn check_vm(&self, id: &str) -> Result<(), CommandError> {
        match self.proxy.registry.owner(id) {
            Some(owner) => Ok(authz::check_vm(&self.peer, id, owner, Front::Legacy)?),
            None => Ok(()),
        }
    }

    async fn unregister(&mut self, p: UnregisterVm) -> Result<Bytes, CommandError> {
        self.check_vm(&p.container_id)?;
        self.proxy.registry.settle(&p.container_id).await;
        let unknown = || CommandError::UnknownVm(p.container_id.clone());
        let vm = self
            .proxy
            .registry
            .get(&p.container_id)
            .map_err(|_| unknown())?;
        authz::check_vm(&self.peer, &vm.id, vm.owner, Front::Legacy)?;
        self.proxy
            .registry
            .unregister(&vm.id, vm.owner)
            .map_err(|_| unknown())?;
        if self.vm.as_ref().is_some_and(|v| v.id == p.container_id) {
            self.vm = None;
        }
        Ok(Bytes::new())
    }

    async fn hyper(&mut self, p: Hyper) -> Result<Bytes, CommandError> {
        let name = p.hyper_name;
        if !HYPER_NAMES.contains(&name.as_str()) {
            return Err(CommandError::UnknownHyper(name));
        }
        let vm = self.vm.clone().ok_or(CommandError::NotAttached)?;
        let code = process::command_code(&vm, &name)?;
        let starts = process::starts_process(code);
        let tokens = p.tokens.unwrap_or_default();
        if tokens.len() > 1 {
            return Err(CommandError::Tokens("a command takes at most one token"));
        }
        if !tokens.is_empty() && !starts {
            return Err(CommandError::Tokens(
                "only newcontainer and execcmd take a token",
            ));
        }
        let mut data = p.data.unwrap_or(Value::Null);
        let mut use_stream = StreamUse::None;
        if starts {
            check_sequences_unset(&mut data)?;
            match tokens.first() {
                Some(text) => {
                    let stream = Token::parse(text)
                        .and_then(|t| vm.stream_by_token(&t))
                        .ok_or(CommandError::UnknownToken)?;
                    if !stream.wait_attached(SHIM_WAIT).await {
                        return Err(CommandError::ShimTimeout);
                    }
                    use_stream = StreamUse::Existing(stream);
                }
                None => use_null_session(&mut data),
            }
        }
        let done = process::forward(&vm, code, &name, data, DEFAULT_TIMEOUT, use_stream).await?;
        Ok(done.reply)
    }
}

/// `numIOStreams`, checked against [`MAX_IO_STREAMS`].
fn tokens_wanted(n: Option<u32>) -> Result<u32, CommandError> {
    match n.unwrap_or(0) {
        n if n > MAX_IO_STREAMS => Err(CommandError::TooManyStreams(n)),
        n => Ok(n),
    }
}

/// The legacy input rule: a client leaves `process.stdio` and `process.stderr` at 0 (or out).
fn check_sequences_unset(data: &mut Value) -> Result<(), CommandError> {
    let Some(process) = process_object_mut(data) else {
        return Ok(());
    };
    for (field, name) in [("stdio", "process.stdio"), ("stderr", "process.stderr")] {
        match process.get(field) {
            None | Some(Value::Null) => {}
            Some(v) if v.as_u64() == Some(0) => {}
            Some(_) => return Err(CommandError::SequenceSet(name)),
        }
    }
    Ok(())
}

/// A start command without a token: the process writes to the null session.
fn use_null_session(data: &mut Value) {
    let Some(process) = process_object_mut(data) else {
        return;
    };
    let terminal = process
        .get("terminal")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    process.insert("stdio".into(), Value::from(NULL_STDIO));
    process.insert(
        "stderr".into(),
        Value::from(if terminal { 0 } else { NULL_STDERR }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_become_unix_uris_and_uris_pass() {
        assert_eq!(to_uri("/run/vm/ctl.sock"), "unix:///run/vm/ctl.sock");
        assert_eq!(to_uri("vsock://3:2718"), "vsock://3:2718");
    }

    #[test]
    fn sequences_must_be_left_at_zero() {
        let mut ok = json!({"container": "c", "process": {"stdio": 0, "args": ["x"]}});
        assert!(check_sequences_unset(&mut ok).is_ok());
        let mut bad = json!({"container": "c", "process": {"stderr": 4}});
        assert!(matches!(
            check_sequences_unset(&mut bad),
            Err(CommandError::SequenceSet("process.stderr"))
        ));
    }

    #[test]
    fn null_session_keeps_other_fields() {
        let mut d = json!({"container": "c", "extra": [1, 2], "process": {"terminal": true, "args": ["sh"], "x": {"y": 1}}});
        use_null_session(&mut d);
        assert_eq!(
            d,
            json!({"container": "c", "extra": [1, 2], "process": {"terminal": true, "args": ["sh"], "x": {"y": 1}, "stdio": 1, "stderr": 0}})
        );
    }
}
