//! The guest console reader: an optional, read-only channel whose lines are logged at debug with
//! `source=guest`, until the VM ends or the console closes.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::Vm;
use crate::transport::Endpoint;

/// Longest console line logged as one; longer ones are split.
const MAX_CONSOLE_LINE: usize = 4096;

/// How long opening the console may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Read `console` for `vm` in a task of its own.
pub fn spawn(vm: Arc<Vm>, console: Endpoint, rights: Option<crate::transport::Credentials>) {
    tokio::spawn(async move {
        let mut conn = match console.connect_as(CONNECT_TIMEOUT, rights.as_ref()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(vm = %vm.id, error = %e, "cannot open the console");
                return;
            }
        };
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = tokio::select! {
                _ = vm.ended.cancelled() => return,
                n = conn.read(&mut chunk) => n,
            };
            let n = match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            pending.extend_from_slice(&chunk[..n]);
            while let Some(pos) = pending
                .iter()
                .position(|&b| b == b'\n')
                .or_else(|| (pending.len() >= MAX_CONSOLE_LINE).then_some(MAX_CONSOLE_LINE))
            {
                let line: Vec<u8> = pending.drain(..pos.min(pending.len())).collect();
                if pending.first() == Some(&b'\n') {
                    pending.remove(0);
                }
                let text = crate::logging::escape_bytes(&line, MAX_CONSOLE_LINE);
                tracing::debug!(vm = %vm.id, source = "guest", "{text}");
            }
        }
    });
}
