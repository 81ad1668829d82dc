//! `cc-proxy tap [VM]`: print live tap events, one line each (JSON lines with `--json`).

use std::path::Path;

/// Follow `tap.observe` over a WebSocket on the daemon's socket until interrupted or `limit` events.
pub async fn run(socket: &Path, vm: Option<String>, limit: Option<u64>, json: bool) -> u8 {
    let _ = (socket, vm, limit, json);
    eprintln!("cc-proxy: tap is not available in this build");
    1
}
