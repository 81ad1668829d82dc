//! Subscriptions over WebSocket on the daemon's socket: `events.subscribe` and `tap.observe`.
//!
//! A subscription owns one WebSocket connection (the HTTP upgrade is done with `soketto`, a small
//! client-and-server WebSocket crate): it sends the subscribe request, keeps the subscription id the daemon
//! answers with, and then yields each notification's `result`, decoded as `T`. Dropping it closes the
//! connection, which ends the subscription on the daemon's side; [`Subscription::unsubscribe`] ends it
//! politely first.

use std::marker::PhantomData;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use soketto::handshake::{Client as Handshake, ServerResponse};
use tokio::net::UnixStream;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use crate::client::ClientError;

/// Largest message accepted from the daemon (a tap event or daemon event is far smaller).
pub const MAX_MESSAGE: usize = 1 << 20;

type Ws = Compat<UnixStream>;

/// An open subscription yielding `T`s (see the module comment).
pub struct Subscription<T> {
    sender: soketto::Sender<Ws>,
    receiver: soketto::Receiver<Ws>,
    /// The id the daemon gave the subscription; notifications carry it.
    id: Value,
    /// The notification method (`events.event`, `tap.event`).
    notification: &'static str,
    /// The method that ends the subscription.
    unsubscribe: &'static str,
    _item: PhantomData<fn() -> T>,
}

fn ws_error(e: impl std::fmt::Display) -> ClientError {
    ClientError::Http(format!("WebSocket: {e}"))
}

impl<T: DeserializeOwned> Subscription<T> {
    /// Connect to `socket`, upgrade to WebSocket and subscribe with `method` and `params`.
    pub(crate) async fn open(
        socket: &Path,
        method: &str,
        params: impl Serialize,
        notification: &'static str,
        unsubscribe: &'static str,
    ) -> Result<Subscription<T>, ClientError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: socket.to_path_buf(),
                source,
            })?;
        let mut handshake = Handshake::new(stream.compat(), "localhost", "/");
        match handshake.handshake().await.map_err(ws_error)? {
            ServerResponse::Accepted { .. } => {}
            ServerResponse::Redirect { status_code, .. }
            | ServerResponse::Rejected { status_code } => {
                return Err(ClientError::Http(format!(
                    "WebSocket upgrade refused with HTTP {status_code}"
                )))
            }
        }
        let mut builder = handshake.into_builder();
        builder.set_max_message_size(MAX_MESSAGE);
        let (mut sender, mut receiver) = builder.finish();
        let request = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        sender
            .send_text(request.to_string())
            .await
            .map_err(ws_error)?;
        sender.flush().await.map_err(ws_error)?;
        // The answer to the subscribe request: the subscription id, or an error.
        let id = loop {
            let msg = receive(&mut receiver)
                .await?
                .ok_or_else(|| ClientError::Http("the daemon closed the WebSocket".into()))?;
            if msg.get("id") != Some(&json!(1)) {
                continue;
            }
            if let Some(err) = msg.get("error") {
                return Err(crate::client::rpc_error(err));
            }
            break msg.get("result").cloned().unwrap_or(Value::Null);
        };
        Ok(Subscription {
            sender,
            receiver,
            id,
            notification,
            unsubscribe,
            _item: PhantomData,
        })
    }

    /// The next item; `None` once the daemon closed the connection (it stops). A tap that reached its
    /// `limit` simply sends nothing more.
    pub async fn next(&mut self) -> Option<Result<T, ClientError>> {
        loop {
            let msg = match receive(&mut self.receiver).await {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            if msg.get("method").and_then(Value::as_str) != Some(self.notification) {
                continue;
            }
            let Some(params) = msg.get("params") else {
                continue;
            };
            if params.get("subscription") != Some(&self.id) {
                continue;
            }
            let result = params.get("result").cloned().unwrap_or(Value::Null);
            return Some(
                serde_json::from_value(result).map_err(|e| ClientError::Decode(e.to_string())),
            );
        }
    }

    /// End the subscription and close the connection.
    pub async fn unsubscribe(mut self) -> Result<(), ClientError> {
        let request =
            json!({"jsonrpc": "2.0", "id": 2, "method": self.unsubscribe, "params": [self.id]});
        self.sender
            .send_text(request.to_string())
            .await
            .map_err(ws_error)?;
        self.sender.flush().await.map_err(ws_error)?;
        let _ = self.sender.close().await;
        Ok(())
    }
}

/// The next text message as JSON; `None` when the connection closed.
async fn receive(receiver: &mut soketto::Receiver<Ws>) -> Result<Option<Value>, ClientError> {
    let mut data = Vec::new();
    loop {
        data.clear();
        match receiver.receive_data(&mut data).await {
            Ok(soketto::Data::Text(_)) => {
                return serde_json::from_slice(&data)
                    .map(Some)
                    .map_err(|e| ClientError::Decode(e.to_string()))
            }
            Ok(soketto::Data::Binary(_)) => continue,
            Err(soketto::connection::Error::Closed) => return Ok(None),
            Err(e) => return Err(ws_error(e)),
        }
    }
}
