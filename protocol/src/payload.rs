//! Typed views of the control payloads the proxy and the test agent read or build.
//!
//! Field names are exactly those on the wire. The proxy forwards most command payloads without
//! understanding them and must keep every field its client sent, so for the `process` object it
//! edits the JSON value in place ([`process_object_mut`]) rather than round-tripping through
//! [`Process`], which only models the fields we use.

use serde::{Deserialize, Serialize};

/// Unsolicited exit report (hyperstart dialect): `{"container","process","event","status"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessAsyncEvent {
    /// Container id.
    pub container: String,
    /// Process id (`process.id` of the command that started it).
    pub process: String,
    /// Event kind; `finished` is the only one agents send.
    pub event: String,
    /// Exit code, or 128 + signal number.
    pub status: i32,
}

/// KILLCONTAINER payload: signals a container's init, or every process in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillContainer {
    /// Container id.
    pub container: String,
    /// Signal number.
    pub signal: i32,
    /// Signal every process of the container, not just its init.
    #[serde(rename = "allProcesses", default)]
    pub all_processes: bool,
}

/// SIGNALPROCESS payload (hyperstart dialect only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalProcess {
    /// Container id.
    pub container: String,
    /// Process id.
    pub process: String,
    /// Signal number.
    pub signal: i32,
}

/// WINSIZE payload in the cc-agent dialect: the process is named by its stdio sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSizeCcAgent {
    /// The process's stdio sequence number.
    pub seq: u64,
    /// Terminal rows.
    pub row: u16,
    /// Terminal columns.
    pub column: u16,
}

/// WINSIZE payload in the hyperstart dialect: the process is named by container and id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSizeHyperstart {
    /// Container id.
    pub container: String,
    /// Process id.
    pub process: String,
    /// Terminal rows.
    pub row: u16,
    /// Terminal columns.
    pub column: u16,
}

/// One environment variable of a [`Process`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    /// Variable name.
    pub env: String,
    /// Variable value.
    pub value: String,
}

/// The `process` object of NEWCONTAINER and EXECCMD, limited to the fields we use. Missing
/// fields take their zero value, as the agents treat them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Process {
    /// Process id, unique among the live processes of the pod (hyperstart).
    pub id: String,
    /// Program and arguments.
    pub args: Vec<String>,
    /// Environment.
    pub envs: Vec<EnvVar>,
    /// Working directory; empty means the agent's default.
    pub workdir: String,
    /// User to run as (a name from the guest's passwd, or a numeric uid); empty means the agent's user.
    pub user: String,
    /// Run on a pseudo-terminal, with stderr merged into stdout.
    pub terminal: bool,
    /// Sequence number for stdin and stdout.
    pub stdio: u64,
    /// Sequence number for stderr; 0 when merged or unused.
    pub stderr: u64,
}

/// NEWCONTAINER payload, limited to the fields we use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NewContainer {
    /// Container id.
    pub id: String,
    /// The container's init process.
    pub process: Process,
}

/// EXECCMD payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecCmd {
    /// Container id.
    pub container: String,
    /// The process to start.
    pub process: Process,
}

/// The API version in a GETVERSION ACK payload: exactly 4 big-endian bytes.
pub fn parse_version(payload: &[u8]) -> Option<u32> {
    let bytes: [u8; 4] = payload.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// The GETVERSION ACK payload for API version `v`.
pub fn encode_version(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

/// The byte count of a NEXT credit: exactly 4 big-endian bytes.
pub fn parse_next(payload: &[u8]) -> Option<u32> {
    parse_version(payload)
}

/// The NEXT payload granting `count` bytes of credit.
pub fn encode_next(count: u32) -> [u8; 4] {
    count.to_be_bytes()
}

/// The `process` object of a NEWCONTAINER/EXECCMD payload, for editing in place (filling in
/// `stdio`, `stderr`, `id`) while keeping every other field. `None` if `data` is not an object
/// or has no object under `process`.
pub fn process_object_mut(
    data: &mut serde_json::Value,
) -> Option<&mut serde_json::Map<String, serde_json::Value>> {
    data.get_mut("process")?.as_object_mut()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kill_container_uses_camel_case_and_defaults_all_processes() {
        let k: KillContainer =
            serde_json::from_value(json!({"container": "c", "signal": 9})).expect("parses");
        assert!(!k.all_processes);
        let v = serde_json::to_value(KillContainer {
            all_processes: true,
            ..k
        })
        .expect("serializes");
        assert_eq!(
            v,
            json!({"container": "c", "signal": 9, "allProcesses": true})
        );
    }

    #[test]
    fn process_async_event_round_trips() {
        let text = r#"{"container":"hyperstart","process":"p1","event":"finished","status":3}"#;
        let e: ProcessAsyncEvent = serde_json::from_str(text).expect("parses");
        assert_eq!(e.status, 3);
        assert_eq!(serde_json::to_string(&e).expect("serializes"), text);
    }

    #[test]
    fn process_defaults_missing_fields() {
        let p: Process =
            serde_json::from_value(json!({"args": ["true"], "user": "x"})).expect("parses");
        assert_eq!(p.args, vec!["true"]);
        assert_eq!((p.stdio, p.stderr, p.terminal), (0, 0, false));
        let e: ExecCmd = serde_json::from_value(
            json!({"container": "c", "process": {"id": "a", "args": ["sh"], "envs": [{"env": "A", "value": "1"}]}}),
        )
        .expect("parses");
        assert_eq!(e.process.envs[0].env, "A");
    }

    #[test]
    fn version_and_next_are_four_big_endian_bytes() {
        assert_eq!(parse_version(&[0, 0, 0x10, 0x94]), Some(4244));
        assert_eq!(parse_version(&encode_version(4242)), Some(4242));
        assert_eq!(parse_version(&[0, 0, 1]), None);
        assert_eq!(parse_next(&[0, 0, 0, 1, 0]), None);
        assert_eq!(parse_next(&encode_next(512)), Some(512));
    }

    #[test]
    fn process_object_mut_edits_in_place() {
        let mut data = json!({"container": "c", "process": {"args": ["sh"], "extra": 1}});
        let p = process_object_mut(&mut data).expect("has process");
        p.insert("stdio".into(), json!(3));
        assert_eq!(
            data["process"],
            json!({"args": ["sh"], "extra": 1, "stdio": 3})
        );
        assert!(process_object_mut(&mut json!({"process": 1})).is_none());
        assert!(process_object_mut(&mut json!([1])).is_none());
    }
}
