//! Legacy v2 command and stream payloads (`cc_proxy_api::legacy`): the JSON a runtime or shim
//! puts in RegisterVM, AttachVM, UnregisterVM, Hyper, ConnectShim and Signal commands, in log
//! stream frames, and what it reads back (VmIo results and error payloads).
//!
//! Input: byte 0 picks the payload kind; the rest is the payload. Checked: no panic; whatever
//! parses re-serializes and parses back equal; a Hyper command's name resolves the same way the
//! daemon resolves it (a `HYPER_NAMES` entry has a code in at least one dialect); a log entry's
//! validation accepts only the documented sources and levels and a non-empty message.
#![no_main]

use cc_proxy_api::legacy::{
    AttachVm, ConnectShim, ErrorPayload, Hyper, LogEntry, RegisterVm, Signal, UnregisterVm, VmIo,
    HYPER_NAMES,
};
use cc_proxy_protocol::Dialect;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Parses `payload` as `T`; when it parses, serializing and parsing again gives the same value.
fn round_trip<T>(payload: &[u8]) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let v = serde_json::from_slice::<T>(payload).ok()?;
    let text = serde_json::to_vec(&v).expect("a parsed payload serializes");
    let back: T = serde_json::from_slice(&text).expect("a serialized payload parses");
    assert_eq!(back, v);
    Some(v)
}

fuzz_target!(|data: &[u8]| {
    let [kind, payload @ ..] = data else {
        return;
    };
    match kind % 9 {
        0 => drop(round_trip::<RegisterVm>(payload)),
        1 => drop(round_trip::<AttachVm>(payload)),
        2 => drop(round_trip::<UnregisterVm>(payload)),
        3 => {
            // `data` is arbitrary JSON (floats included), so only the parse is checked.
            if let Ok(h) = serde_json::from_slice::<Hyper>(payload) {
                if HYPER_NAMES.contains(&h.hyper_name.as_str()) {
                    assert!(Dialect::ALL
                        .iter()
                        .any(|d| d.command_code(&h.hyper_name).is_some()));
                }
            }
        }
        4 => drop(round_trip::<ConnectShim>(payload)),
        5 => drop(round_trip::<Signal>(payload)),
        6 => {
            if let Some(entry) = round_trip::<LogEntry>(payload) {
                let ok = entry.validate().is_ok();
                let expected = matches!(entry.source.as_str(), "shim" | "runtime")
                    && matches!(entry.level.as_str(), "debug" | "info" | "warn" | "error")
                    && !entry.msg.is_empty();
                assert_eq!(ok, expected);
            }
        }
        7 => drop(round_trip::<VmIo>(payload)),
        _ => drop(round_trip::<ErrorPayload>(payload)),
    }
});
