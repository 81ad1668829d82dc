//! The legacy cc-proxy v2 binary protocol (`00 02` first bytes). Sessions are served by the v2 session code.

use std::sync::Arc;

use super::detect::RewindUnix;
use super::{Peer, Proxy};

/// Serve one legacy v2 connection.
pub async fn serve(proxy: Arc<Proxy>, conn: RewindUnix, peer: Peer) {
    tracing::warn!(client = %peer, socket = %proxy.socket.display(), "legacy v2 client refused: the v2 protocol is not served by this build yet");
    drop(conn);
}
