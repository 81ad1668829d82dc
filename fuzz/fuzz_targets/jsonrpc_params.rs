//! JSON-RPC requests and the params of every method (`cc_proxy_api::types`), parsed the way the
//! daemon parses them: the request envelope with `jsonrpsee_types::Request`, the params with
//! `jsonrpsee_types::Params::parse` into the method's params type.
//!
//! Input: byte 0 picks a method (used when the rest is not a whole request); the rest is either
//! a whole request (`{"jsonrpc":"2.0","id":..,"method":..,"params":..}`, dispatched on its
//! method) or the params text alone. Checked: no panic; params that parse re-serialize and
//! parse back equal; an `agent.call` command name resolves in the dialect tables without
//! panicking.
#![no_main]

use cc_proxy_api::methods;
use cc_proxy_api::types::{
    AgentCallParams, EventsParams, LogLevel, RegisterParams, ResizeParams, SignalParams,
    TapParams, TokenParam, VmId,
};
use cc_proxy_protocol::Dialect;
use jsonrpsee_types::{Params, Request};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Every method name the daemon serves, in the order byte 0 selects them.
const METHODS: &[&str] = &[
    methods::PROXY_VERSION,
    methods::PROXY_HEALTH,
    methods::VM_REGISTER,
    methods::VM_ATTACH,
    methods::VM_UNREGISTER,
    methods::VM_LIST,
    methods::VM_INFO,
    methods::AGENT_CALL,
    methods::STREAM_ALLOCATE,
    methods::STREAM_SIGNAL,
    methods::STREAM_RESIZE,
    methods::STREAM_CLOSE,
    methods::EVENTS_SUBSCRIBE,
    methods::TAP_OBSERVE,
    methods::PROXY_SET_LOG_LEVEL,
];

/// Parses `params` as the daemon does; what parses survives a serialize/parse round trip.
fn parse<T>(params: &Params<'_>) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let v: T = params.parse().ok()?;
    let text = serde_json::to_string(&v).expect("parsed params serialize");
    let back: T = Params::new(Some(&text))
        .parse()
        .expect("serialized params parse");
    assert_eq!(back, v);
    Some(v)
}

fn dispatch(method: &str, params: Params<'_>) {
    match method {
        methods::VM_REGISTER => drop(parse::<RegisterParams>(&params)),
        methods::VM_ATTACH
        | methods::VM_UNREGISTER
        | methods::VM_INFO
        | methods::STREAM_ALLOCATE => drop(parse::<VmId>(&params)),
        methods::AGENT_CALL => {
            // `data` is arbitrary JSON (floats included): parse only, then resolve the name.
            if let Ok(p) = params.parse::<AgentCallParams>() {
                for d in Dialect::ALL {
                    if let Some(code) = d.command_code(&p.command) {
                        assert_eq!(
                            d.command_code(d.command_name(code).unwrap_or("")),
                            Some(code)
                        );
                    }
                }
            }
        }
        methods::STREAM_SIGNAL => drop(parse::<SignalParams>(&params)),
        methods::STREAM_RESIZE => drop(parse::<ResizeParams>(&params)),
        methods::STREAM_CLOSE => drop(parse::<TokenParam>(&params)),
        methods::EVENTS_SUBSCRIBE => drop(parse::<Option<EventsParams>>(&params)),
        methods::TAP_OBSERVE => drop(parse::<TapParams>(&params)),
        methods::PROXY_SET_LOG_LEVEL => drop(parse::<LogLevel>(&params)),
        // proxy.version, proxy.health and vm.list ignore their params.
        _ => drop(params.parse::<Option<serde_json::Value>>()),
    }
}

fuzz_target!(|data: &[u8]| {
    let [which, rest @ ..] = data else {
        return;
    };
    if let Ok(req) = serde_json::from_slice::<Request<'_>>(rest) {
        dispatch(&req.method, req.params());
        return;
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let method = METHODS[usize::from(*which) % METHODS.len()];
    dispatch(method, Params::new(Some(text)));
});
