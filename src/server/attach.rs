//! A shim's stdio attach: `POST /v1/streams/<token>` with `Upgrade: cc-proxy-stream`, then stream frames
//! (`cc_proxy_api::stream`) both ways until the process's exit frame, a detach, or the shim going away.
//!
//! - Output is written in batches from the stream's queue; frames that could not be written when the shim
//!   vanished go back to the queue for the next attach (delivery is at-least-once across an abrupt drop).
//! - EOF or an error on the shim's side means the shim is gone: the token stays valid for a re-attach.
//! - `{"op":"detach"}` is acknowledged with `{"op":"detached"}` after everything queued before it was
//!   written; the token stays valid. `{"op":"close"}` frees the token.
//! - After the exit (or error) frame is written the stream is complete and its token is freed. The daemon then
//!   half-closes the connection (its write side) and keeps reading, discarding what the shim still sends
//!   (late stdin, its stdin EOF), until the shim closes its side or [`EXIT_LINGER`] passes: a shim whose
//!   stdin write races the exit never gets EPIPE before it read the exit frame.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use cc_proxy_api::stream::{
    encode_header, Channel, ControlMessage, Frame, StreamCodec, MAX_PAYLOAD,
};
use cc_proxy_api::{STREAM_PATH_PREFIX, STREAM_UPGRADE};
use futures::StreamExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jsonrpsee::server::{HttpBody, HttpRequest, HttpResponse};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::authz::{self, Front};
use super::{Peer, Proxy};
use crate::admin::metrics::DetachKind;
use crate::admin::tap::TapEvent;
use crate::error::ProxyError;
use crate::stream::writer::{self, ShimEncoder, ShimSink, WriterEnd};
use crate::stream::{AttachError, Stream, Token};
use crate::vm::{process, Vm};

/// How long a connection stays readable after the exit frame was written, waiting for the shim to close it.
pub const EXIT_LINGER: std::time::Duration = std::time::Duration::from_secs(10);

/// True for a stream attach request.
pub fn is_attach(req: &HttpRequest<Incoming>) -> bool {
    req.uri().path().starts_with(STREAM_PATH_PREFIX)
}

fn error_response(status: hyper::StatusCode, err: ProxyError) -> HttpResponse {
    crate::admin::metrics::METRICS.api_error(err.code());
    let body =
        json!({"error": {"code": err.code(), "message": err.to_string(), "data": err.data()}});
    let mut resp = HttpResponse::new(HttpBody::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Check the request, attach to the stream, and switch protocols.
pub async fn handle(proxy: Arc<Proxy>, mut req: HttpRequest<Incoming>) -> HttpResponse {
    use hyper::StatusCode;
    if req.method() != hyper::Method::POST {
        let mut resp = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::invalid("method", "stream attach is POST /v1/streams/<token>"),
        );
        resp.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("POST"),
        );
        return resp;
    }
    let wants_upgrade = req
        .headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(STREAM_UPGRADE));
    if !wants_upgrade {
        return error_response(
            StatusCode::BAD_REQUEST,
            ProxyError::invalid(
                "Upgrade",
                format!(
                    "stream attach needs `Connection: Upgrade` and `Upgrade: {STREAM_UPGRADE}`"
                ),
            ),
        );
    }
    let text = req
        .uri()
        .path()
        .trim_start_matches(STREAM_PATH_PREFIX)
        .to_string();
    // A token of a VM being recovered after a restart waits for the recovery instead of being unknown.
    let found = match Token::parse(&text) {
        Some(t) => proxy.registry.find_token_settled(&t).await,
        None => None,
    };
    let Some((vm, stream)) = found else {
        return error_response(StatusCode::NOT_FOUND, ProxyError::TokenNotFound);
    };
    // A token is a secret, but one seen by the wrong uid still does not open another user's process.
    let peer = req
        .extensions()
        .get::<Peer>()
        .cloned()
        .unwrap_or_else(|| Peer::unknown(0));
    if let Err(e) = authz::check_vm(&peer, &vm.id, vm.owner, Front::Attach) {
        return error_response(StatusCode::FORBIDDEN, e);
    }
    let attach = match stream.attach() {
        Ok(n) => n,
        Err(AttachError::Busy) => {
            return error_response(StatusCode::CONFLICT, ProxyError::StreamBusy)
        }
        Err(AttachError::Closed) => {
            return error_response(StatusCode::NOT_FOUND, ProxyError::TokenNotFound)
        }
    };
    tracing::info!(vm = %vm.id, token = %stream.token, "shim attached");
    vm.tap(|| TapEvent::StreamAttached {
        vm: vm.id.clone(),
        token: stream.token.short().to_string(),
    });
    let on_upgrade = hyper::upgrade::on(&mut req);
    let shutdown = proxy.shutdown.clone();
    let max_log = proxy.max_client_log;
    proxy.tasks.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                run(vm, stream, attach, TokioIo::new(upgraded), shutdown, max_log).await
            }
            Err(e) => {
                tracing::debug!(vm = %vm.id, token = %stream.token, error = %e, "attach upgrade failed");
                stream.release(attach, Vec::new());
            }
        }
    });
    let mut resp = HttpResponse::new(HttpBody::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("Upgrade"),
    );
    resp.headers_mut().insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static(STREAM_UPGRADE),
    );
    resp
}

/// Serve one attachment until the stream ends, the shim leaves, or the daemon stops (`shutdown`: then the
/// writer gives back what it has not written, so the saved state has it for the shim's re-attach). A shim's
/// text quoted in a log line (by a parse error) is escaped and cut after `max_log` bytes.
async fn run(
    vm: Arc<Vm>,
    stream: Arc<Stream>,
    attach: u64,
    io: TokioIo<hyper::upgrade::Upgraded>,
    shutdown: CancellationToken,
    max_log: usize,
) {
    let (rd, wr) = tokio::io::split(io);
    let gone = CancellationToken::new();
    // Fired by the writer once the last frame is out: the reader then only drains (see the module doc).
    let finished = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        vm.clone(),
        stream.clone(),
        attach,
        wr,
        gone.clone(),
        finished.clone(),
    ));
    // Start the reader small: most shims send little stdin; the buffer grows with the frames that come.
    let mut reader = FramedRead::with_capacity(rd, StreamCodec, 256);
    let mut close = false;
    loop {
        let frame = tokio::select! {
            _ = gone.cancelled() => break,
            _ = shutdown.cancelled() => break,
            _ = finished.cancelled() => {
                drain(&mut reader, &shutdown).await;
                break;
            }
            f = reader.next() => f,
        };
        let frame = match frame {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                let e = crate::logging::escape_client_text(&e.to_string(), max_log);
                tracing::info!(vm = %vm.id, token = %stream.token, error = %e, "malformed frame from shim; closing");
                break;
            }
            None => break,
        };
        match frame.channel {
            Channel::Stdin => {
                if let Err(e) = vm.send_stdin(stream.stdio, frame.payload).await {
                    // The VM is gone: its error frame is on the way to the shim; drop stdin, keep the connection.
                    tracing::debug!(vm = %vm.id, token = %stream.token, error = %e, "stdin not delivered");
                }
            }
            Channel::Control => match serde_json::from_slice::<ControlMessage>(&frame.payload) {
                Ok(ControlMessage::Signal { signal }) => {
                    if let Err(e) = process::signal(&vm, &stream, signal).await {
                        tracing::info!(vm = %vm.id, token = %stream.token, error = %e, "signal from shim failed");
                    }
                }
                Ok(ControlMessage::Resize { rows, cols }) => {
                    if let Err(e) = process::resize(&vm, &stream, rows, cols).await {
                        tracing::info!(vm = %vm.id, token = %stream.token, error = %e, "resize from shim failed");
                    }
                }
                Ok(ControlMessage::Detach) => {
                    stream.request_detach(attach);
                    break;
                }
                Ok(ControlMessage::Close) => {
                    close = true;
                    break;
                }
                Ok(ControlMessage::Detached) => {
                    tracing::info!(vm = %vm.id, token = %stream.token, "shim sent the daemon's detach acknowledgement; closing");
                    break;
                }
                Err(e) => {
                    let e = crate::logging::escape_client_text(&e.to_string(), max_log);
                    tracing::info!(vm = %vm.id, token = %stream.token, error = %e, "bad control message from shim; closing");
                    break;
                }
            },
            other => {
                tracing::info!(vm = %vm.id, token = %stream.token, channel = ?other, "shim sent a daemon-only channel; closing");
                break;
            }
        }
    }
    if close {
        vm.free_stream(&stream.token);
        vm.shim_detached(&stream.token, DetachKind::Close);
        gone.cancel();
    } else if !stream.is_detaching(attach) {
        // EOF or error from the shim: it is gone; keep the token for a re-attach.
        gone.cancel();
    }
    let _ = writer.await;
}

type Writer = tokio::io::WriteHalf<TokioIo<hyper::upgrade::Upgraded>>;

/// After the exit frame: read and discard until the shim closes, the connection fails, [`EXIT_LINGER`]
/// passes, or the daemon stops.
async fn drain<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FramedRead<R, StreamCodec>,
    shutdown: &CancellationToken,
) {
    let linger = tokio::time::sleep(EXIT_LINGER);
    tokio::pin!(linger);
    loop {
        tokio::select! {
            _ = &mut linger => return,
            _ = shutdown.cancelled() => return,
            f = reader.next() => match f {
                Some(Ok(_)) => {} // late stdin or control: the process is gone
                Some(Err(_)) | None => return,
            },
        }
    }
}

/// Stream frames as they are on an attached shim's connection (`cc_proxy_api::stream`).
struct AttachEncoder;

impl ShimEncoder for AttachEncoder {
    fn encode(&self, frames: &[Frame], _last: bool, buf: &mut BytesMut) {
        for f in frames {
            if f.payload.is_empty() {
                let _ = encode_header(f.channel, 0, buf);
                continue;
            }
            // Agent packets are smaller than a stream frame's limit; split anyway rather than fail.
            for chunk in f.payload.chunks(MAX_PAYLOAD) {
                if encode_header(f.channel, chunk.len(), buf).is_ok() {
                    buf.extend_from_slice(chunk);
                }
            }
        }
    }

    fn detach_ack(&self, buf: &mut BytesMut) {
        let ack = serde_json::to_vec(&ControlMessage::Detached).unwrap_or_default();
        if encode_header(Channel::Control, ack.len(), buf).is_ok() {
            buf.extend_from_slice(&ack);
        }
    }
}

/// The upgraded connection's write half; finishing half-closes it.
struct AttachSink(Writer);

impl ShimSink for AttachSink {
    async fn write(&mut self, buf: Bytes) -> bool {
        self.0.write_all(&buf).await.is_ok() && self.0.flush().await.is_ok()
    }

    async fn finish(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

/// Write the stream's output to the shim (see [`crate::stream::writer`]), then account for how it ended.
async fn write_loop(
    vm: Arc<Vm>,
    stream: Arc<Stream>,
    attach: u64,
    out: Writer,
    gone: CancellationToken,
    finished: CancellationToken,
) {
    let mut sink = AttachSink(out);
    match writer::drive(&stream, attach, &AttachEncoder, &mut sink, &gone).await {
        WriterEnd::WriteFailed => {
            vm.shim_detached(&stream.token, DetachKind::Drop);
            gone.cancel();
        }
        WriterEnd::Gone => {
            vm.shim_detached(&stream.token, DetachKind::Drop);
            tracing::info!(vm = %vm.id, token = %stream.token, "shim went away; token kept for re-attach");
        }
        WriterEnd::Finished => {
            vm.free_stream(&stream.token);
            vm.shim_detached(&stream.token, DetachKind::Done);
            finished.cancel();
            tracing::debug!(vm = %vm.id, token = %stream.token, "stream complete; token freed");
        }
        WriterEnd::Detached => {
            vm.shim_detached(&stream.token, DetachKind::Detach);
            tracing::info!(vm = %vm.id, token = %stream.token, "shim detached; token kept");
        }
        WriterEnd::Superseded => {}
    }
}
