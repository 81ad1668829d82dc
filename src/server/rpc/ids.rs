//! Request ids the daemon cannot echo, answered instead of dropped.
//!
//! JSON-RPC allows any string, number or null as an id; jsonrpsee holds an id as a string, null or a
//! `u64`. A request whose id is anything else (negative, fractional, above 2^64-1 such as an id of 500,000
//! digits, or an object, array or boolean) fails jsonrpsee's request parse, then passes its notification
//! parse (which ignores `id`) and is answered with nothing: HTTP 200 and a body `null`. The HTTP dispatcher
//! runs each JSON-RPC body through [`replace_unanswerable_ids`] first, which swaps each such entry for one
//! jsonrpsee answers with -32600 (invalid request) and id `null`, so the client gets an error and its id is
//! never echoed back. Bodies with no such id are passed on untouched (no copy).

use jsonrpsee::types::Id;

use crate::admin::metrics::{LimitKind, METRICS};
use serde::Deserialize;
use serde_json::value::RawValue;

/// What a single request with an unanswerable id becomes: jsonrpsee answers -32600 with id null.
const INVALID_SINGLE: &[u8] = br#"{"id":null}"#;
/// What a batch entry with an unanswerable id becomes: no method, no usable id, so jsonrpsee answers it
/// -32600 with id null. As short as any entry it replaces can be (`{"id":-1}`), give or take 7 bytes.
const INVALID_ENTRY: &str = "{}";

/// Only the id of an entry; everything else is skipped unparsed.
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
}

/// Whether an entry (one JSON object's text) carries an id jsonrpsee cannot hold. Entries that are not
/// objects, or not JSON, are left for jsonrpsee to refuse in its own way.
fn has_unanswerable_id(entry: &str) -> bool {
    match serde_json::from_str::<IdOnly<'_>>(entry) {
        Ok(IdOnly { id: Some(raw) }) => serde_json::from_str::<Id<'_>>(raw.get()).is_err(),
        _ => false,
    }
}

/// The body to give jsonrpsee instead of `body` (a single request when `single`, else a batch), or `None`
/// when no entry has an unanswerable id.
pub fn replace_unanswerable_ids(body: &[u8], single: bool) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(body).ok()?;
    if single {
        return has_unanswerable_id(text).then(|| {
            METRICS.limit_refused(LimitKind::IdTooLong);
            INVALID_SINGLE.to_vec()
        });
    }
    let entries = serde_json::from_str::<Vec<&RawValue>>(text).ok()?;
    if !entries.iter().any(|e| has_unanswerable_id(e.get())) {
        return None;
    }
    let mut out = Vec::with_capacity(body.len());
    out.push(b'[');
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let entry = if has_unanswerable_id(e.get()) {
            // Each replaced entry is one refusal (jsonrpsee's answer to the placeholder is not counted).
            METRICS.limit_refused(LimitKind::IdTooLong);
            INVALID_ENTRY
        } else {
            e.get()
        };
        out.extend_from_slice(entry.as_bytes());
    }
    out.push(b']');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str) -> String {
        format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"proxy.version"}}"#)
    }

    #[test]
    fn ids_jsonrpsee_holds_pass_untouched() {
        for id in ["0", "42", "18446744073709551615", r#""text""#, "null"] {
            assert_eq!(
                replace_unanswerable_ids(request(id).as_bytes(), true),
                None,
                "{id}"
            );
        }
        let notification = r#"{"jsonrpc":"2.0","method":"proxy.version"}"#;
        assert_eq!(
            replace_unanswerable_ids(notification.as_bytes(), true),
            None
        );
    }

    #[test]
    fn other_ids_become_an_invalid_request() {
        let huge = "9".repeat(500_000);
        for id in [
            huge.as_str(),
            "18446744073709551616",
            "-1",
            "1.5",
            "1e3",
            "{}",
            "[1]",
            "true",
        ] {
            assert_eq!(
                replace_unanswerable_ids(request(id).as_bytes(), true).as_deref(),
                Some(INVALID_SINGLE),
                "{}",
                &id[..id.len().min(20)]
            );
        }
    }

    #[test]
    fn only_the_bad_entries_of_a_batch_are_replaced() {
        let batch = format!(
            "[{},{}, 7 ,{}]",
            request("1"),
            request("-1"),
            request("\"s\"")
        );
        let out = replace_unanswerable_ids(batch.as_bytes(), false).expect("one bad id");
        let out = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            out,
            format!("[{},{{}},7,{}]", request("1"), request("\"s\""))
        );
        let fine = format!("[{},{}]", request("1"), request("2"));
        assert_eq!(replace_unanswerable_ids(fine.as_bytes(), false), None);
    }

    #[test]
    fn what_is_not_json_is_left_to_jsonrpsee() {
        assert_eq!(replace_unanswerable_ids(b"{\"id\":-1", true), None);
        assert_eq!(replace_unanswerable_ids(b"[{\"id\":-1}", false), None);
        assert_eq!(replace_unanswerable_ids(b"\xff", true), None);
    }
}
