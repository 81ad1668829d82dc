//! Every agent control payload, per dialect (`cc_proxy_protocol::payload`, `::dialect`).
//!
//! Input: byte 0 picks the dialect (low bit), byte 1 the command code; the rest is the payload.
//! The payload is read the way the daemon and the test agent read that code in that dialect:
//! PROCESSASYNCEVENT, KILLCONTAINER, SIGNALPROCESS, WINSIZE (either shape), NEWCONTAINER and
//! EXECCMD (typed, and edited in place through `process_object_mut` as the daemon does),
//! GETVERSION ACKs and NEXT credits (4 big-endian bytes), any other code as JSON. Checked: no
//! panic; codes and names agree both ways; whatever parses re-serializes and parses back equal;
//! the in-place edit keeps every other field.
#![no_main]

use cc_proxy_protocol::payload::{
    ExecCmd, KillContainer, NewContainer, ProcessAsyncEvent, SignalProcess, WinSizeCcAgent,
    WinSizeHyperstart,
};
use cc_proxy_protocol::{code, encode_next, encode_version, parse_next, parse_version};
use cc_proxy_protocol::{process_object_mut, Dialect};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Parses `payload` as `T`; when it parses, serializing and parsing again gives the same value.
fn round_trip<T>(payload: &[u8])
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = serde_json::from_slice::<T>(payload) {
        let text = serde_json::to_vec(&v).expect("a parsed payload serializes");
        let back: T = serde_json::from_slice(&text).expect("a serialized payload parses");
        assert_eq!(back, v);
    }
}

/// What the daemon does to a NEWCONTAINER/EXECCMD payload before forwarding it: set the stdio
/// sequence numbers in `process`, leaving every other field as the client sent it.
fn edit_process(payload: &[u8]) {
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return;
    };
    let before = value.clone();
    let Some(process) = process_object_mut(&mut value) else {
        return;
    };
    process.insert("stdio".into(), serde_json::json!(7u64));
    process.insert("stderr".into(), serde_json::json!(8u64));
    let (Some(old), Some(new)) = (before["process"].as_object(), value["process"].as_object())
    else {
        panic!("process is an object before and after the edit");
    };
    for (key, v) in old {
        if key != "stdio" && key != "stderr" {
            assert_eq!(new.get(key), Some(v), "field {key} changed");
        }
    }
    let text = serde_json::to_vec(&value).expect("edited payload serializes");
    assert!(serde_json::from_slice::<serde_json::Value>(&text).is_ok());
}

fuzz_target!(|data: &[u8]| {
    let [which, code, payload @ ..] = data else {
        return;
    };
    let dialect = Dialect::ALL[usize::from(which & 1)];
    let code = u32::from(*code);

    // The name table is a bijection on the codes it knows.
    if let Some(name) = dialect.command_name(code) {
        assert_eq!(dialect.command_code(name), Some(code));
    }
    if let Ok(name) = std::str::from_utf8(payload) {
        if let Some(c) = dialect.command_code(name) {
            assert!(dialect.command_name(c).is_some());
        }
    }

    match code {
        code::GETVERSION | code::NEXT => {
            let v = parse_version(payload);
            assert_eq!(v.is_some(), payload.len() == 4);
            assert_eq!(parse_next(payload), v);
            if let Some(v) = v {
                assert_eq!(encode_version(v), payload);
                assert_eq!(encode_next(v), payload);
                let _ = Dialect::from_api_version(v);
            }
        }
        code::KILLCONTAINER => round_trip::<KillContainer>(payload),
        code::WINSIZE => match dialect {
            Dialect::CcAgent => round_trip::<WinSizeCcAgent>(payload),
            Dialect::Hyperstart => round_trip::<WinSizeHyperstart>(payload),
        },
        code::NEWCONTAINER => {
            round_trip::<NewContainer>(payload);
            edit_process(payload);
        }
        code::EXECCMD => {
            round_trip::<ExecCmd>(payload);
            edit_process(payload);
        }
        c if c == dialect.process_async_event_code() => round_trip::<ProcessAsyncEvent>(payload),
        c if Some(c) == dialect.signal_process_code() => round_trip::<SignalProcess>(payload),
        // Forwarded as is; only its JSON-ness matters (no equality check: floats need not
        // survive a text round trip exactly).
        _ => drop(serde_json::from_slice::<serde_json::Value>(payload)),
    }
});
