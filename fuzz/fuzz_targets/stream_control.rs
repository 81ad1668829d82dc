//! Control messages on a stdio stream's control channel (`cc_proxy_api::stream::ControlMessage`):
//! `signal`, `resize`, `detach`, `close` from the shim, `detached` from the daemon.
//!
//! Input: the JSON payload of one control frame. Checked: no panic; whatever parses
//! re-serializes to a tagged object and parses back equal.
#![no_main]

use cc_proxy_api::stream::ControlMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = serde_json::from_slice::<ControlMessage>(data) else {
        return;
    };
    let value = serde_json::to_value(&m).expect("serializes");
    assert!(
        value.get("op").and_then(|op| op.as_str()).is_some(),
        "untagged: {value}"
    );
    let back: ControlMessage = serde_json::from_value(value).expect("parses back");
    assert_eq!(back, m);
});
