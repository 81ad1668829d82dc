//! An async client for the daemon's socket: JSON-RPC calls over HTTP/1.1 keep-alive, and stdio attach.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tokio_util::codec::Framed;

use crate::stream::{ControlMessage, Frame, StreamCodec};
use crate::types::*;
use crate::{methods, STREAM_PATH_PREFIX, STREAM_UPGRADE};

/// What a call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach cc-proxy at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("HTTP error talking to cc-proxy: {0}")]
    Http(String),
    #[error("{message} (code {code})")]
    Rpc {
        code: i32,
        message: String,
        data: Option<Value>,
    },
    #[error("unexpected response from cc-proxy: {0}")]
    Decode(String),
}

impl ClientError {
    /// The JSON-RPC error code, when the daemon answered with an error object.
    pub fn code(&self) -> Option<i32> {
        match self {
            ClientError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A JSON-RPC error object as a [`ClientError::Rpc`].
pub(crate) fn rpc_error(err: &Value) -> ClientError {
    ClientError::Rpc {
        code: err.get("code").and_then(Value::as_i64).unwrap_or(0) as i32,
        message: err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        data: err.get("data").cloned(),
    }
}

/// A stdio stream attached to one process: frames in both directions (see [`crate::stream`]).
pub type AttachedStream = Framed<TokioIo<hyper::upgrade::Upgraded>, StreamCodec>;

/// A client of one daemon socket. Cheap to share; calls are serialized over one keep-alive connection.
pub struct Client {
    socket: PathBuf,
    conn: Mutex<Option<SendRequest<Full<Bytes>>>>,
    next_id: AtomicU64,
}

impl Client {
    /// A client for the daemon listening on `socket`. Connects lazily.
    pub fn new(socket: impl AsRef<Path>) -> Client {
        Client {
            socket: socket.as_ref().to_path_buf(),
            conn: Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// Call `method` with `params` and decode its result.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        params: impl Serialize,
    ) -> Result<T, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::to_vec(
            &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
        )
        .map_err(|e| ClientError::Decode(e.to_string()))?;
        let mut guard = self.conn.lock().await;
        // One retry on a fresh connection covers a keep-alive connection the daemon closed while idle.
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let mut sender = match guard.take() {
                Some(s) if !s.is_closed() => s,
                _ => self.connect().await?,
            };
            if sender.ready().await.is_err() {
                if attempt < 2 {
                    continue;
                }
                return Err(ClientError::Http("connection closed".into()));
            }
            let req = hyper::Request::post("/")
                .header(hyper::header::HOST, "localhost")
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.clone())))
                .map_err(|e| ClientError::Http(e.to_string()))?;
            match sender.send_request(req).await {
                Ok(resp) => {
                    *guard = Some(sender);
                    break resp;
                }
                Err(e) if attempt < 2 && (e.is_canceled() || e.is_closed()) => continue,
                Err(e) => return Err(ClientError::Http(e.to_string())),
            }
        };
        drop(guard);
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).map_err(|_| {
            ClientError::Http(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            ))
        })?;
        if let Some(err) = value.get("error") {
            return Err(rpc_error(err));
        }
        let result = value.get("result").cloned().unwrap_or(Value::Null);
        serde_json::from_value(result).map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn version(&self) -> Result<VersionInfo, ClientError> {
        self.call(methods::PROXY_VERSION, json!({})).await
    }

    /// `proxy.health`: uptime and VM counts.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.call(methods::PROXY_HEALTH, json!({})).await
    }

    /// `proxy.set_log_level`: change the daemon's log filter; returns the filter now in force.
    pub async fn set_log_level(&self, level: &str) -> Result<String, ClientError> {
        let r: crate::types::LogLevel = self
            .call(methods::PROXY_SET_LOG_LEVEL, json!({ "level": level }))
            .await?;
        Ok(r.level)
    }

    /// `vm.attach`: the dialect of a VM another process registered.
    pub async fn vm_attach(&self, id: &str) -> Result<RegisterResult, ClientError> {
        self.call(methods::VM_ATTACH, json!({ "id": id })).await
    }

    /// `stream.allocate`: a token (and its sequence numbers) for a process started later.
    pub async fn stream_allocate(&self, vm: &str) -> Result<StreamAllocation, ClientError> {
        self.call(methods::STREAM_ALLOCATE, json!({ "id": vm }))
            .await
    }

    /// `stream.close`: free a token; output not yet read is dropped.
    pub async fn stream_close(&self, token: &str) -> Result<(), ClientError> {
        self.call::<Value>(
            methods::STREAM_CLOSE,
            TokenParam {
                token: token.into(),
            },
        )
        .await
        .map(|_| ())
    }

    /// `events.subscribe` (over a WebSocket connection of its own): VM and process events, of one VM or all.
    pub async fn subscribe_events(
        &self,
        vm: Option<&str>,
    ) -> Result<crate::subscription::Subscription<Event>, ClientError> {
        let params = match vm {
            Some(vm) => json!({ "vm": vm }),
            None => json!({}),
        };
        crate::subscription::Subscription::open(
            &self.socket,
            methods::EVENTS_SUBSCRIBE,
            params,
            methods::EVENTS_NOTIFICATION,
            methods::EVENTS_UNSUBSCRIBE,
        )
        .await
    }

    /// `tap.observe` (over a WebSocket connection of its own): live tap events as JSON objects (see
    /// docs/observability.md for their fields), or `{"event": "dropped", "count": N}` reports.
    pub async fn tap(
        &self,
        params: &TapParams,
    ) -> Result<crate::subscription::Subscription<Value>, ClientError> {
        crate::subscription::Subscription::open(
            &self.socket,
            methods::TAP_OBSERVE,
            params,
            methods::TAP_NOTIFICATION,
            methods::TAP_UNOBSERVE,
        )
        .await
    }

    pub async fn register(&self, params: &RegisterParams) -> Result<RegisterResult, ClientError> {
        self.call(methods::VM_REGISTER, params).await
    }

    pub async fn unregister(&self, id: &str) -> Result<(), ClientError> {
        self.call::<Value>(methods::VM_UNREGISTER, json!({ "id": id }))
            .await
            .map(|_| ())
    }

    pub async fn vm_list(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.call(methods::VM_LIST, json!({})).await
    }

    pub async fn vm_info(&self, id: &str) -> Result<VmInfo, ClientError> {
        self.call(methods::VM_INFO, json!({ "id": id })).await
    }

    /// The mesh trust anchors (PEM bundle) peers must trust.
    pub async fn mesh_trust_anchors(&self) -> Result<crate::mesh::TrustAnchors, ClientError> {
        self.call(methods::MESH_TRUST_ANCHORS, json!({})).await
    }

    /// A meshed VM's identity and the certificate its listeners serve.
    pub async fn mesh_identity(&self, id: &str) -> Result<crate::mesh::MeshIdentity, ClientError> {
        self.call(methods::MESH_IDENTITY, json!({ "id": id })).await
    }

    /// A meshed VM's outbound destinations, their endpoints, state and load.
    pub async fn mesh_endpoints(
        &self,
        id: &str,
    ) -> Result<crate::mesh::MeshEndpoints, ClientError> {
        self.call(methods::MESH_ENDPOINTS, json!({ "id": id }))
            .await
    }

    pub async fn agent_call(
        &self,
        params: &AgentCallParams,
    ) -> Result<AgentCallResult, ClientError> {
        self.call(methods::AGENT_CALL, params).await
    }

    /// Start `args` in container `hyperstart` of `vm` with a stdio stream; returns the call's result (with token).
    pub async fn exec(
        &self,
        vm: &str,
        args: &[String],
        terminal: bool,
    ) -> Result<AgentCallResult, ClientError> {
        self.exec_spec(
            vm,
            &ExecSpec {
                args: args.to_vec(),
                terminal,
                ..ExecSpec::default()
            },
        )
        .await
    }

    /// Start a process described by `spec` in container `hyperstart` of `vm` with a stdio stream; returns the
    /// call's result (with token).
    pub async fn exec_spec(
        &self,
        vm: &str,
        spec: &ExecSpec,
    ) -> Result<AgentCallResult, ClientError> {
        self.agent_call(&AgentCallParams {
            vm: vm.to_string(),
            command: "execcmd".into(),
            data: Some(json!({"container": "hyperstart", "process": spec.process()})),
            timeout_ms: None,
            streams: Some(1),
            token: None,
            payload_base64: None,
        })
        .await
    }

    pub async fn signal(&self, token: &str, signal: i32) -> Result<(), ClientError> {
        self.call::<Value>(
            methods::STREAM_SIGNAL,
            SignalParams {
                token: token.into(),
                signal,
            },
        )
        .await
        .map(|_| ())
    }

    pub async fn resize(&self, token: &str, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.call::<Value>(
            methods::STREAM_RESIZE,
            ResizeParams {
                token: token.into(),
                rows,
                cols,
            },
        )
        .await
        .map(|_| ())
    }

    /// Attach to a token's stdio stream on a new connection (HTTP upgrade).
    pub async fn attach(&self, token: &str) -> Result<AttachedStream, ClientError> {
        let mut sender = self.connect().await?;
        let req = hyper::Request::post(format!("{STREAM_PATH_PREFIX}{token}"))
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONNECTION, "Upgrade")
            .header(hyper::header::UPGRADE, STREAM_UPGRADE)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            // The daemon answers a refused attach with a JSON-RPC style error object.
            if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
                if let Some(err) = v.get("error") {
                    return Err(rpc_error(err));
                }
            }
            return Err(ClientError::Http(format!(
                "attach refused: {status}: {}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        Ok(Framed::new(TokioIo::new(upgraded), StreamCodec))
    }
}

/// A process to start with [`Client::exec_spec`]: the hyperstart `process` object's fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program and arguments.
    pub args: Vec<String>,
    /// Run on a terminal (stderr merged into stdout).
    pub terminal: bool,
    /// Environment variables (name, value), in order.
    pub env: Vec<(String, String)>,
    /// Working directory; `None` is the agent's default.
    pub workdir: Option<String>,
    /// User to run as (name or numeric id); `None` is the agent's default.
    pub user: Option<String>,
}

impl ExecSpec {
    /// The `process` object of EXECCMD.
    pub fn process(&self) -> Value {
        let mut p = json!({"args": self.args, "terminal": self.terminal});
        if !self.env.is_empty() {
            p["envs"] = self
                .env
                .iter()
                .map(|(env, value)| json!({"env": env, "value": value}))
                .collect();
        }
        if let Some(dir) = &self.workdir {
            p["workdir"] = json!(dir);
        }
        if let Some(user) = &self.user {
            p["user"] = json!(user);
        }
        p
    }
}

/// Everything a stream delivered until it ended, for tests and simple tools.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The exit status, when the stream ended with an exit frame.
    pub status: Option<i32>,
    /// The error message, when the stream ended with an error frame.
    pub error: Option<String>,
}

/// Send `stdin` (then close it when `close_stdin`), and read the stream to its end. A process that already
/// finished may have closed the stream before its stdin was written: its output and exit are still read.
pub async fn run_stream(
    stream: &mut AttachedStream,
    stdin: &[u8],
    close_stdin: bool,
) -> std::io::Result<Collected> {
    let mut sent = Ok(());
    for chunk in stdin.chunks(64 * 1024) {
        sent = stream
            .send(Frame::new(
                crate::stream::Channel::Stdin,
                Bytes::copy_from_slice(chunk),
            ))
            .await;
        if sent.is_err() {
            break;
        }
    }
    if close_stdin && sent.is_ok() {
        let _ = stream
            .send(Frame::new(crate::stream::Channel::Stdin, Bytes::new()))
            .await;
    }
    collect(stream).await
}

/// Read a stream until its exit or error frame (or EOF).
pub async fn collect(stream: &mut AttachedStream) -> std::io::Result<Collected> {
    use crate::stream::Channel;
    let mut out = Collected::default();
    while let Some(frame) = stream.next().await {
        let frame = frame?;
        match frame.channel {
            Channel::Stdout => out.stdout.extend_from_slice(&frame.payload),
            Channel::Stderr => out.stderr.extend_from_slice(&frame.payload),
            Channel::Exit => {
                out.status = frame.exit_status();
                break;
            }
            Channel::Error => {
                out.error = Some(String::from_utf8_lossy(&frame.payload).into_owned());
                break;
            }
            Channel::Stdin | Channel::Control => {}
        }
    }
    Ok(out)
}

/// Encode a control message as a frame.
pub fn control_frame(msg: &ControlMessage) -> Frame {
    let payload = serde_json::to_vec(msg).unwrap_or_default();
    Frame::new(crate::stream::Channel::Control, payload)
}
