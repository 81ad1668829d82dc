//! Bounds on JSON-RPC requests, as an RPC middleware under the error counter ([`super::errors`]).
//!
//! For each request that reaches it:
//! - an id longer than `--max-id-bytes` is answered `-32600` with id `null`; the id is never echoed;
//! - past `--max-requests-per-connection` requests in flight on the connection, the request (a batch counts
//!   once) is answered `1019` at once instead of queued;
//! - a batch longer than `--max-batch` is refused whole with `-32010`; a shorter one runs its entries one
//!   after the other, yielding the worker between entries, so a batch never holds a worker thread for
//!   long and other clients' requests interleave with it;
//! - an error answer never carries more than [`MAX_ERROR_TEXT`] bytes of any string (message or `data`
//!   values): client-supplied text echoed in an error (a VM id, a token, a path) is cut;
//! - a notification (a request without an id) over WebSocket is answered `-32600` with id `null`. Every
//!   cc-proxy method answers, and over WebSocket an id jsonrpsee cannot hold (500,000 digits, negative)
//!   makes the request look like a notification: without this, its client would wait forever. Over HTTP
//!   such ids are replaced before parsing ([`super::ids`]) and notifications keep getting no answer;
//! - a subscription that starts marks its connection as subscribed, so it is never closed as idle
//!   ([`crate::server::guard`]).
//!
//! Every refusal is counted in `cc_proxy_limit_refusals_total{limit}` (and, as an error, by the counter above).

use std::sync::Arc;

use jsonrpsee::core::middleware::{Batch, BatchEntry, Notification, RpcServiceT};
use jsonrpsee::core::server::BatchResponseBuilder;
use jsonrpsee::server::MethodResponse;
use jsonrpsee::types::error::{reject_too_big_batch_request, ErrorCode};
use jsonrpsee::types::{ErrorObject, ErrorObjectOwned, Id, Request};
use serde_json::{json, Value};

use super::errors::error_code;
use crate::admin::metrics::{LimitKind, METRICS};
use crate::logging::{cut_marker, cut_text};
use crate::server::guard::Activity;

/// Bytes of any one string in an error answer (its message, each string in its `data`).
pub const MAX_ERROR_TEXT: usize = 256;

/// The transport a request came over, put in its extensions by the HTTP dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    WebSocket,
}

/// The limits this middleware applies (from [`crate::config::ClientLimits`]).
#[derive(Debug, Clone, Copy)]
pub struct RpcLimits {
    pub max_id_bytes: usize,
    pub max_batch: usize,
    pub max_in_flight: usize,
    /// Largest response (a batch's answers are cut there, as jsonrpsee does).
    pub max_response: usize,
}

/// The layer (see the module comment).
#[derive(Debug, Clone, Copy)]
pub struct LimitsLayer(pub RpcLimits);

impl<S> tower::Layer<S> for LimitsLayer {
    type Service = Limits<S>;
    fn layer(&self, inner: S) -> Limits<S> {
        Limits {
            inner: Arc::new(inner),
            limits: self.0,
        }
    }
}

/// The service the layer builds.
#[derive(Debug)]
pub struct Limits<S> {
    inner: Arc<S>,
    limits: RpcLimits,
}

impl<S> Clone for Limits<S> {
    fn clone(&self) -> Self {
        Limits {
            inner: self.inner.clone(),
            limits: self.limits,
        }
    }
}

/// The length of an id as the client wrote it, roughly: what echoing it would cost.
fn id_len(id: &Id<'_>) -> usize {
    match id {
        Id::Null => 4,
        Id::Number(_) => 20,
        Id::Str(s) => s.len() + 2,
    }
}

fn id_too_long(max: usize) -> ErrorObjectOwned {
    METRICS.limit_refused(LimitKind::IdTooLong);
    ErrorObject::owned(
        ErrorCode::InvalidRequest.code(),
        format!("the request id is longer than {max} bytes (--max-id-bytes)"),
        Some(json!({ "max_id_bytes": max })),
    )
}

fn too_many_in_flight(max: usize) -> ErrorObjectOwned {
    METRICS.limit_refused(LimitKind::RequestsInFlight);
    ErrorObject::owned(
        cc_proxy_api::error::TOO_MANY_REQUESTS,
        format!(
            "{max} requests are in flight on this connection (--max-requests-per-connection); \
             wait for their answers or use another connection"
        ),
        Some(json!({ "max_requests_per_connection": max })),
    )
}

/// The answer to a request over WebSocket that came without a usable id (a notification, or an id jsonrpsee
/// cannot hold): counted as an id refusal.
fn notification_answer(max_id: usize) -> ErrorObjectOwned {
    METRICS.limit_refused(LimitKind::IdTooLong);
    ErrorObject::owned(
        ErrorCode::InvalidRequest.code(),
        format!(
            "no usable id: every cc-proxy method answers, so a request needs an id (a string of at most \
             {max_id} bytes or an integer from 0 to 18446744073709551615)"
        ),
        None::<()>,
    )
}

/// Cut every string in `v` to [`MAX_ERROR_TEXT`] bytes; whether anything was cut.
fn cut_strings(v: &mut Value) -> bool {
    match v {
        Value::String(s) if s.len() > MAX_ERROR_TEXT => {
            let (kept, left_out) = cut_text(s, MAX_ERROR_TEXT);
            *s = format!("{kept}{}", cut_marker(left_out));
            true
        }
        Value::Array(items) => items.iter_mut().fold(false, |acc, i| cut_strings(i) | acc),
        Value::Object(map) => map.values_mut().fold(false, |acc, i| cut_strings(i) | acc),
        _ => false,
    }
}

/// An error answer with no string longer than [`MAX_ERROR_TEXT`]; other answers as they are.
fn bounded(rp: MethodResponse) -> MethodResponse {
    if !rp.is_error() || rp.as_json().get().len() <= 2 * MAX_ERROR_TEXT {
        return rp;
    }
    let Ok(mut whole) = serde_json::from_str::<Value>(rp.as_json().get()) else {
        return rp;
    };
    let Some(error) = whole.get_mut("error") else {
        return rp;
    };
    if !cut_strings(error) {
        return rp;
    }
    let id = match whole.get("id") {
        Some(Value::Number(n)) => n.as_u64().map(Id::Number).unwrap_or(Id::Null),
        Some(Value::String(s)) => Id::Str(s.clone().into()),
        _ => Id::Null,
    };
    let code = error_code(&whole).unwrap_or(ErrorCode::InternalError.code());
    let message = whole
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let data = whole.pointer("/error/data").cloned();
    let extensions = rp.extensions().clone();
    MethodResponse::error(id, ErrorObject::owned(code, message, data)).with_extensions(extensions)
}

impl<S> Limits<S>
where
    S: RpcServiceT<
            MethodResponse = MethodResponse,
            BatchResponse = MethodResponse,
            NotificationResponse = MethodResponse,
        > + Send
        + Sync
        + 'static,
{
    /// One call, once admitted: the id bound, then the method; its answer bounded.
    async fn one(inner: &S, limits: RpcLimits, request: Request<'_>) -> MethodResponse {
        if id_len(&request.id) > limits.max_id_bytes {
            return MethodResponse::error(Id::Null, id_too_long(limits.max_id_bytes));
        }
        let activity = activity(request.extensions());
        let rp = inner.call(request).await;
        if rp.is_subscription() && rp.is_success() {
            // The connection holds a subscription from now on: it is never idle.
            if let Some(a) = activity {
                a.set_subscribed();
            }
        }
        bounded(rp)
    }
}

fn activity(ext: &jsonrpsee::core::middleware::Extensions) -> Option<Arc<Activity>> {
    ext.get::<Arc<Activity>>().cloned()
}

impl<S> RpcServiceT for Limits<S>
where
    S: RpcServiceT<
            MethodResponse = MethodResponse,
            BatchResponse = MethodResponse,
            NotificationResponse = MethodResponse,
        > + Send
        + Sync
        + 'static,
{
    type MethodResponse = MethodResponse;
    type NotificationResponse = MethodResponse;
    type BatchResponse = MethodResponse;

    fn call<'a>(
        &self,
        request: Request<'a>,
    ) -> impl std::future::Future<Output = MethodResponse> + Send + 'a {
        let (inner, limits) = (self.inner.clone(), self.limits);
        async move {
            let activity = activity(request.extensions());
            let _in_flight = match &activity {
                Some(a) => match a.begin(limits.max_in_flight) {
                    Some(held) => Some(held),
                    None => {
                        let id = if id_len(&request.id) > limits.max_id_bytes {
                            Id::Null
                        } else {
                            request.id.clone().into_owned()
                        };
                        return MethodResponse::error(id, too_many_in_flight(limits.max_in_flight));
                    }
                },
                None => None,
            };
            Self::one(&inner, limits, request).await
        }
    }

    fn batch<'a>(
        &self,
        mut requests: Batch<'a>,
    ) -> impl std::future::Future<Output = MethodResponse> + Send + 'a {
        let (inner, limits) = (self.inner.clone(), self.limits);
        async move {
            if requests.len() > limits.max_batch {
                METRICS.limit_refused(LimitKind::BatchTooLong);
                return MethodResponse::error(
                    Id::Null,
                    reject_too_big_batch_request(limits.max_batch),
                );
            }
            let activity = activity(requests.extensions());
            let _in_flight = match &activity {
                Some(a) => match a.begin(limits.max_in_flight) {
                    Some(held) => Some(held),
                    None => {
                        return MethodResponse::error(
                            Id::Null,
                            too_many_in_flight(limits.max_in_flight),
                        )
                    }
                },
                None => None,
            };
            let mut answers = BatchResponseBuilder::new_with_limit(limits.max_response);
            let mut got_notification = false;
            for entry in requests.into_iter() {
                let rp = match entry {
                    Ok(BatchEntry::Call(req)) => Self::one(&inner, limits, req).await,
                    // Over HTTP unusable ids were replaced before parsing, so this is a real notification:
                    // run it, answer nothing. Over WebSocket it may be a request with an unusable id.
                    Ok(BatchEntry::Notification(n)) => {
                        let transport = n.extensions().get::<Transport>().copied();
                        let _ = inner.notification(n).await;
                        if transport != Some(Transport::WebSocket) {
                            got_notification = true;
                            continue;
                        }
                        MethodResponse::error(Id::Null, notification_answer(limits.max_id_bytes))
                    }
                    Err(err) => {
                        let (err, id) = err.into_parts();
                        let id = if id_len(&id) > limits.max_id_bytes {
                            METRICS.limit_refused(LimitKind::IdTooLong);
                            Id::Null
                        } else {
                            id
                        };
                        bounded(MethodResponse::error(id, err))
                    }
                };
                if let Err(too_big) = answers.append(rp) {
                    return too_big;
                }
                // Let other clients' requests run between entries.
                tokio::task::yield_now().await;
            }
            if answers.is_empty() && got_notification {
                // Only notifications: nothing to answer (HTTP acknowledges with an empty body).
                return MethodResponse::notification();
            }
            // An empty batch is answered -32600 by `finish`.
            MethodResponse::from_batch(answers.finish())
        }
    }

    fn notification<'a>(
        &self,
        n: Notification<'a>,
    ) -> impl std::future::Future<Output = MethodResponse> + Send + 'a {
        let (inner, limits) = (self.inner.clone(), self.limits);
        async move {
            let transport = n.extensions().get::<Transport>().copied();
            let rp = inner.notification(n).await;
            match transport {
                Some(Transport::WebSocket) => {
                    MethodResponse::error(Id::Null, notification_answer(limits.max_id_bytes))
                }
                _ => rp,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_strings_in_errors_are_cut_and_short_ones_kept() {
        let long = "v".repeat(10_000);
        let rp = MethodResponse::error(
            Id::Number(7),
            ErrorObject::owned(
                1002,
                format!("no VM {long}"),
                Some(json!({"vm": long, "n": 3})),
            ),
        );
        let out = bounded(rp);
        let v: Value = serde_json::from_str(out.as_json().get()).expect("json");
        assert_eq!(v["id"], 7);
        assert_eq!(v["error"]["code"], 1002);
        assert_eq!(v["error"]["data"]["n"], 3);
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.len() < MAX_ERROR_TEXT + 32, "{}", msg.len());
        assert!(msg.ends_with("bytes)"), "{msg}");
        assert!(out.as_json().get().len() < 1024);
        let short = MethodResponse::error(
            Id::Number(1),
            ErrorObject::owned(1002, "no VM x", Some(json!({"vm": "x"}))),
        );
        let before = short.as_json().get().to_string();
        assert_eq!(bounded(short).as_json().get(), before);
    }

    #[test]
    fn id_lengths() {
        assert_eq!(id_len(&Id::Str("abc".into())), 5);
        assert!(id_len(&Id::Number(u64::MAX)) <= 20);
    }
}
