//! `cc-proxy tap [VM]`: print live tap events, one line each (JSON lines with `--json`).
//!
//! `--mesh` asks only for the mesh's HTTP requests (`mesh_inbound_request`, `mesh_outbound_request`) and
//! prints them in fixed columns: time, VM, direction, method, authority, path, status, latency, then the
//! peer's identity and the endpoint that answered ([`format_mesh_event`]).
//!
//! The tap is a JSON-RPC subscription (`tap.observe`), which the daemon serves over WebSocket only; the
//! `cc-proxy-api` client opens it ([`cc_proxy_api::client::Client::tap`]) and this file formats what it
//! yields.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use cc_proxy_api::client::{Client, ClientError};
use cc_proxy_api::types::TapParams;
use serde_json::Value;

/// Time the daemon has to accept the upgrade and answer the subscription.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a tap ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("the daemon did not answer in time")]
    Timeout,
}

/// `HH:MM:SS.mmm` (UTC) of a millisecond timestamp.
fn clock(ts_ms: u64) -> String {
    let day_ms = ts_ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

/// One human-readable line for an event: time, VM, event name, then its other fields as `key=value`.
pub fn format_event(e: &Value) -> String {
    let Some(obj) = e.as_object() else {
        return e.to_string();
    };
    let ts = obj.get("ts_ms").and_then(Value::as_u64).unwrap_or(0);
    let vm = obj.get("vm").and_then(Value::as_str).unwrap_or("-");
    let name = obj.get("event").and_then(Value::as_str).unwrap_or("?");
    let mut line = format!("{}Z {vm:<16} {name:<16}", clock(ts));
    for (k, v) in obj {
        if matches!(k.as_str(), "ts_ms" | "seq" | "vm" | "event") || v.is_null() {
            continue;
        }
        match (k.as_str(), v.as_u64()) {
            ("latency_us", Some(us)) => {
                line.push_str(&format!(" latency={:.3}ms", us as f64 / 1000.0))
            }
            // Names such as process ids come from clients: never print control characters raw.
            _ => match v.as_str() {
                Some(s) => line.push_str(&format!(
                    " {k}={}",
                    crate::logging::escape_bytes(s.as_bytes(), 256)
                )),
                None => line.push_str(&format!(" {k}={v}")),
            },
        }
    }
    line
}

/// The events `--mesh` asks for.
pub const MESH_EVENTS: [&str; 2] = ["mesh_inbound_request", "mesh_outbound_request"];

/// A text field of an event, escaped (authorities and paths come from clients: never print control
/// characters raw), or `-` when absent.
fn text_field(obj: &serde_json::Map<String, Value>, key: &str) -> String {
    match obj.get(key).and_then(Value::as_str) {
        Some(s) if !s.is_empty() => crate::logging::escape_bytes(s.as_bytes(), 256),
        _ => "-".to_string(),
    }
}

/// One line for a mesh request event: `time VM direction METHOD AUTHORITY PATH STATUS LATENCY
/// peer=IDENTITY endpoint=ADDR` (`-` for what is absent: an unauthenticated peer, a request the proxy
/// answered itself). Other events (e.g. `dropped`) print as [`format_event`] does.
pub fn format_mesh_event(e: &Value) -> String {
    let Some(obj) = e.as_object() else {
        return e.to_string();
    };
    let direction = match obj.get("event").and_then(Value::as_str) {
        Some("mesh_inbound_request") => "inbound",
        Some("mesh_outbound_request") => "outbound",
        _ => return format_event(e),
    };
    let ts = obj.get("ts_ms").and_then(Value::as_u64).unwrap_or(0);
    let status = obj
        .get("status")
        .and_then(Value::as_u64)
        .map(|s| s.to_string())
        .unwrap_or_else(|| "-".into());
    let latency = obj
        .get("latency_us")
        .and_then(Value::as_u64)
        .map(|us| format!("{:.3}ms", us as f64 / 1000.0))
        .unwrap_or_else(|| "-".into());
    format!(
        "{}Z {:<16} {direction:<8} {} {} {} {status} {latency} peer={} endpoint={}",
        clock(ts),
        text_field(obj, "vm"),
        text_field(obj, "method"),
        text_field(obj, "authority"),
        text_field(obj, "path"),
        text_field(obj, "peer_identity"),
        text_field(obj, "endpoint"),
    )
}

async fn follow(socket: &Path, opts: TapOptions, json: bool) -> Result<(), TapError> {
    let TapOptions {
        vm,
        limit,
        filter,
        rate,
        mesh,
    } = opts;
    let filter = if mesh {
        MESH_EVENTS.iter().map(|n| n.to_string()).collect()
    } else {
        filter
    };
    let params = TapParams {
        vm,
        filter: (!filter.is_empty()).then_some(filter),
        limit,
        rate,
    };
    let client = Client::new(socket);
    let mut tap = tokio::time::timeout(HANDSHAKE_TIMEOUT, client.tap(&params))
        .await
        .map_err(|_| TapError::Timeout)??;
    let mut shown = 0u64;
    let stdout = std::io::stdout();
    while let Some(event) = tap.next().await {
        let event: Value = event?;
        let line = if json {
            event.to_string()
        } else if mesh {
            format_mesh_event(&event)
        } else {
            format_event(&event)
        };
        let mut out = stdout.lock();
        // A closed stdout (`| head`) ends the tap quietly.
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            break;
        }
        if event.get("event").and_then(Value::as_str) != Some("dropped") {
            shown += 1;
            if limit.is_some_and(|l| shown >= l) {
                break;
            }
        }
    }
    let _ = tap.unsubscribe().await;
    Ok(())
}

/// What to ask `tap.observe` for.
#[derive(Debug, Default, Clone)]
pub struct TapOptions {
    pub vm: Option<String>,
    pub limit: Option<u64>,
    /// Event names to keep (`agent_command`, `process_exited`, ...); empty = all.
    pub filter: Vec<String>,
    /// Most events per second.
    pub rate: Option<u32>,
    /// Only mesh requests ([`MESH_EVENTS`], replacing `filter`), printed by [`format_mesh_event`].
    pub mesh: bool,
}

/// Follow `tap.observe` over a WebSocket on the daemon's socket until interrupted, the daemon closes the
/// tap, or `limit` events were printed. Returns the exit status.
pub async fn run(socket: &Path, opts: TapOptions, json: bool) -> u8 {
    match follow(socket, opts, json).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cc-proxy: tap: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_print_as_one_line() {
        let e = json!({"ts_ms": 3_723_004u64, "event": "agent_command", "vm": "vm1",
                       "command": "execcmd", "result": "ok", "latency_us": 1500});
        assert_eq!(
            format_event(&e),
            "01:02:03.004Z vm1              agent_command    command=execcmd result=ok latency=1.500ms"
        );
        let d = json!({"ts_ms": 0, "event": "dropped", "count": 7});
        assert!(format_event(&d).ends_with("dropped          count=7"));
    }

    #[test]
    fn mesh_requests_print_in_columns() {
        let e = json!({"ts_ms": 3_723_004u64, "event": "mesh_outbound_request", "vm": "a",
                       "method": "GET", "authority": "b.demo:80", "path": "/hello?x=1", "status": 200,
                       "latency_us": 1500, "peer_identity": "b.demo.serviceaccount.identity.linkerd.cluster.local",
                       "endpoint": "127.0.0.1:4143"});
        assert_eq!(
            format_mesh_event(&e),
            "01:02:03.004Z a                outbound GET b.demo:80 /hello?x=1 200 1.500ms \
             peer=b.demo.serviceaccount.identity.linkerd.cluster.local endpoint=127.0.0.1:4143"
        );
        // The proxy answered itself: no peer, no endpoint; control characters never print raw.
        let e = json!({"ts_ms": 0, "event": "mesh_inbound_request", "vm": "b", "method": "GET",
                       "authority": "x\u{1b}[2J", "path": "/", "status": 403, "latency_us": 20,
                       "peer_identity": null, "endpoint": null});
        let line = format_mesh_event(&e);
        assert!(
            line.ends_with(" inbound  GET x\\x1b[2J / 403 0.020ms peer=- endpoint=-"),
            "{line}"
        );
        // Anything else prints as usual.
        let d = json!({"ts_ms": 0, "event": "dropped", "count": 7});
        assert_eq!(format_mesh_event(&d), format_event(&d));
    }
}
