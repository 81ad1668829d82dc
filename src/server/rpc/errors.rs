//! Counting every JSON-RPC error in `cc_proxy_api_errors_total`, wherever it is produced.
//!
//! Errors come from three places, each counted once:
//! - method calls, notifications and batches (our methods' errors, -32601 unknown method, -32602 bad params,
//!   -32600 entries of a batch): [`CountErrorsLayer`], a jsonrpsee RPC middleware that reads the code of
//!   each response;
//! - requests that never reach a method because jsonrpsee refused the HTTP body (-32700 not JSON, -32600
//!   not a JSON-RPC request, -32007 too big): [`count_unrouted`], called by the HTTP dispatcher with the
//!   response when the middleware did not see the request (the dispatcher marks each request with
//!   [`Routed`], which the middleware sets);
//! - refused stream attaches: `attach::error_response` counts its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http_body_util::BodyExt;
use jsonrpsee::core::middleware::{Batch, Notification, RpcServiceT};
use jsonrpsee::server::{HttpBody, HttpResponse, MethodResponse};
use jsonrpsee::types::Request;
use serde_json::Value;

use crate::admin::metrics::METRICS;

/// Most bytes of an unrouted error response read back to learn its code (jsonrpsee's are ~100 bytes).
const MAX_UNROUTED_BODY: usize = 4096;

/// Set by the middleware when a request reached it; put in each HTTP request's extensions by the dispatcher.
#[derive(Debug, Clone, Default)]
pub struct Routed(Arc<AtomicBool>);

impl Routed {
    pub fn was_routed(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
    fn mark(ext: &jsonrpsee::core::middleware::Extensions) {
        if let Some(r) = ext.get::<Routed>() {
            r.0.store(true, Ordering::Release);
        }
    }
}

/// The RPC middleware layer (see the module comment).
#[derive(Debug, Clone, Copy, Default)]
pub struct CountErrorsLayer;

impl<S> tower::Layer<S> for CountErrorsLayer {
    type Service = CountErrors<S>;
    fn layer(&self, inner: S) -> CountErrors<S> {
        CountErrors { inner }
    }
}

/// Counts the error code of every response the inner service produces.
#[derive(Debug, Clone)]
pub struct CountErrors<S> {
    inner: S,
}

fn count(rp: &MethodResponse) {
    if rp.is_batch() {
        // A batch answers with an array; each entry may be an error of its own.
        if let Ok(entries) = serde_json::from_str::<Vec<Value>>(rp.as_json().get()) {
            for code in entries.iter().filter_map(error_code) {
                METRICS.api_error(code);
            }
        }
    } else if let Some(code) = rp.as_error_code() {
        METRICS.api_error(code);
    }
}

/// The `error.code` of a JSON-RPC answer, if it is an error.
pub(super) fn error_code(response: &Value) -> Option<i32> {
    response
        .get("error")?
        .get("code")?
        .as_i64()
        .and_then(|c| i32::try_from(c).ok())
}

impl<S> RpcServiceT for CountErrors<S>
where
    S: RpcServiceT<
            MethodResponse = MethodResponse,
            BatchResponse = MethodResponse,
            NotificationResponse = MethodResponse,
        > + Send
        + Sync
        + Clone
        + 'static,
{
    type MethodResponse = MethodResponse;
    type NotificationResponse = MethodResponse;
    type BatchResponse = MethodResponse;

    fn call<'a>(
        &self,
        request: Request<'a>,
    ) -> impl std::future::Future<Output = MethodResponse> + Send + 'a {
        Routed::mark(request.extensions());
        let inner = self.inner.clone();
        async move {
            let rp = inner.call(request).await;
            count(&rp);
            rp
        }
    }

    fn batch<'a>(
        &self,
        mut requests: Batch<'a>,
    ) -> impl std::future::Future<Output = MethodResponse> + Send + 'a {
        Routed::mark(requests.extensions());
        let inner = self.inner.clone();
        async move {
            let rp = inner.batch(requests).await;
            count(&rp);
            rp
        }
    }

    fn notification<'a>(
        &self,
        n: Notification<'a>,
    ) -> impl std::future::Future<Output = MethodResponse> + Send + 'a {
        Routed::mark(n.extensions());
        self.inner.notification(n)
    }
}

/// Count the error of a response to a request the middleware never saw: 413 is -32007, 400 is -32700, and
/// a 200 carries jsonrpsee's -32700/-32600 for a body that is JSON but not a request. The body is read back
/// (it is small) and the response rebuilt. Anything else (101 upgrades, 405/415 refusals) is passed on.
pub async fn count_unrouted(resp: HttpResponse) -> HttpResponse {
    match resp.status().as_u16() {
        413 => {
            METRICS.api_error(-32007);
            resp
        }
        400 => {
            METRICS.api_error(-32700);
            resp
        }
        200 => {
            let (parts, body) = resp.into_parts();
            let bytes = match http_body_util::Limited::new(body, MAX_UNROUTED_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => return HttpResponse::from_parts(parts, HttpBody::from("")),
            };
            if let Some(code) = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .as_ref()
                .and_then(error_code)
            {
                METRICS.api_error(code);
            }
            HttpResponse::from_parts(parts, HttpBody::new(http_body_util::Full::new(bytes)))
        }
        _ => resp,
    }
}
