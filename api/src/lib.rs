//! The public API of cc-proxy, for runtime and shim authors.
//!
//! - [`methods`]: the JSON-RPC 2.0 method names served on the daemon's socket.
//! - [`error`]: the stable numeric error codes carried in JSON-RPC error objects.
//! - [`types`]: request and response shapes of every method.
//! - [`mesh`]: the mesh front's configuration (`vm.register`'s `mesh` object).
//! - [`stream`]: the binary framing a shim speaks after attaching to a process's stdio.
//! - [`legacy`]: the frame codec and payloads of the legacy cc-proxy v2 binary protocol.
//! - [`client`]: an async Rust client for all of the above over the AF_UNIX socket, with
//!   [`subscription`]s (`events.subscribe`, `tap.observe`) over WebSocket. See `examples/watch.rs`.
//!
//! Everything here is also specified in `docs/api.md`, so clients in other languages can be written from the
//! documentation alone.

#![forbid(unsafe_code)]

pub mod client;
pub mod error;
pub mod legacy;
pub mod mesh;
pub mod methods;
pub mod stream;
pub mod subscription;
pub mod types;

/// The daemon's default socket path (what `cc-proxy.socket` listens on).
pub const DEFAULT_SOCKET: &str = "/run/cc-oci-runtime/proxy.sock";

/// The version of the JSON-RPC API described by this crate. Bumped on incompatible changes only.
pub const API_VERSION: u32 = 1;

/// HTTP path prefix of the stdio attach endpoint: `POST /v1/streams/<token>` with `Upgrade: cc-proxy-stream`.
pub const STREAM_PATH_PREFIX: &str = "/v1/streams/";

/// The `Upgrade` protocol token a shim asks for when attaching to a stream.
pub const STREAM_UPGRADE: &str = "cc-proxy-stream";
