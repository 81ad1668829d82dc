//! The two agent dialects and where they differ.
//!
//! cc-agent (API 4242, shipped with Clear Containers 3.0) and hyperstart (API 4243 for 0.8,
//! 4244 for 1.0/1.1) share most command codes but assign 23 and 24 differently, report process
//! exit differently (an I/O status packet versus a PROCESSASYNCEVENT control message) and shape
//! WINSIZE differently. The host learns the dialect from the GETVERSION reply after READY.

use serde::{Deserialize, Serialize};

use crate::code;

/// Which protocol variant an agent speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dialect {
    /// The Clear Containers 3.0 agent (API 4242).
    CcAgent,
    /// hyperstart 0.8 and later (API 4243, 4244).
    Hyperstart,
}

/// Command names (as the legacy v2 `hyperName` spells them) with the same code in both dialects.
const COMMON_COMMANDS: &[(&str, u32)] = &[
    ("version", code::GETVERSION),
    ("startpod", code::STARTPOD),
    ("getpod", code::GETPOD),
    ("stoppod", code::STOPPOD),
    ("destroypod", code::DESTROYPOD),
    ("restartcontainer", code::RESTARTCONTAINER),
    ("execcmd", code::EXECCMD),
    ("cmdfinished", code::CMDFINISHED),
    ("ready", code::READY),
    ("ack", code::ACK),
    ("error", code::ERROR),
    ("winsize", code::WINSIZE),
    ("ping", code::PING),
    ("podfinished", code::PODFINISHED),
    ("next", code::NEXT),
    ("writefile", code::WRITEFILE),
    ("readfile", code::READFILE),
    ("newcontainer", code::NEWCONTAINER),
    ("killcontainer", code::KILLCONTAINER),
    ("onlinecpumem", code::ONLINECPUMEM),
    ("setupinterface", code::SETUPINTERFACE),
    ("setuproute", code::SETUPROUTE),
    ("removecontainer", code::REMOVECONTAINER),
    ("deleteinterface", code::DELETEINTERFACE),
];

impl Dialect {
    /// Every dialect, for iteration in tests and CLIs.
    pub const ALL: [Dialect; 2] = [Dialect::CcAgent, Dialect::Hyperstart];

    /// The dialect that an agent reporting API version `v` speaks, if we know it.
    pub fn from_api_version(v: u32) -> Option<Dialect> {
        Dialect::ALL
            .into_iter()
            .find(|d| d.api_versions().contains(&v))
    }

    /// Every GETVERSION answer an agent of this dialect gives.
    pub fn api_versions(self) -> &'static [u32] {
        match self {
            Dialect::CcAgent => &[4242],
            Dialect::Hyperstart => &[4243, 4244],
        }
    }

    /// The dialect's name as used in configuration and logs (`cc-agent`, `hyperstart`).
    pub fn name(self) -> &'static str {
        match self {
            Dialect::CcAgent => "cc-agent",
            Dialect::Hyperstart => "hyperstart",
        }
    }

    /// The API version an agent of this dialect reports by default.
    pub fn api_version(self) -> u32 {
        match self {
            Dialect::CcAgent => 4242,
            Dialect::Hyperstart => 4244,
        }
    }

    /// Most stdin data bytes the host may put in one I/O packet for this dialect's agents
    /// ([`crate::HYPERSTART_STDIN_PACKET`] for hyperstart, [`crate::MAX_STDIN_PACKET`] otherwise).
    pub fn stdin_packet_data(self) -> usize {
        match self {
            Dialect::CcAgent => crate::MAX_STDIN_PACKET,
            Dialect::Hyperstart => crate::HYPERSTART_STDIN_PACKET,
        }
    }

    /// Code of PROCESSASYNCEVENT. Only hyperstart actually sends it (unsolicited, on exit).
    pub fn process_async_event_code(self) -> u32 {
        match self {
            Dialect::CcAgent => 24,
            Dialect::Hyperstart => 23,
        }
    }

    /// Code of SIGNALPROCESS, which only hyperstart has.
    pub fn signal_process_code(self) -> Option<u32> {
        match self {
            Dialect::CcAgent => None,
            Dialect::Hyperstart => Some(24),
        }
    }

    /// Code of PSCONTAINER, which only cc-agent has.
    pub fn ps_container_code(self) -> Option<u32> {
        match self {
            Dialect::CcAgent => Some(23),
            Dialect::Hyperstart => None,
        }
    }

    /// The code of the lower-case command `name` in this dialect. `getversion` is accepted as
    /// an alias of `version`.
    pub fn command_code(self, name: &str) -> Option<u32> {
        if name == "getversion" {
            return Some(code::GETVERSION);
        }
        if let Some(&(_, c)) = COMMON_COMMANDS.iter().find(|(n, _)| *n == name) {
            return Some(c);
        }
        match name {
            "processasyncevent" => Some(self.process_async_event_code()),
            "pscontainer" => self.ps_container_code(),
            "signalprocess" => self.signal_process_code(),
            _ => None,
        }
    }

    /// The lower-case name of `code` in this dialect (code 0 is `version`).
    pub fn command_name(self, code: u32) -> Option<&'static str> {
        if let Some(&(n, _)) = COMMON_COMMANDS.iter().find(|(_, c)| *c == code) {
            return Some(n);
        }
        if code == self.process_async_event_code() {
            Some("processasyncevent")
        } else if Some(code) == self.ps_container_code() {
            Some("pscontainer")
        } else if Some(code) == self.signal_process_code() {
            Some("signalprocess")
        } else {
            None
        }
    }
}

impl std::fmt::Display for Dialect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Dialect {
    type Err = UnknownDialect;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cc-agent" => Ok(Dialect::CcAgent),
            "hyperstart" => Ok(Dialect::Hyperstart),
            _ => Err(UnknownDialect(s.to_owned())),
        }
    }
}

/// A dialect name that is neither `cc-agent` nor `hyperstart`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown agent dialect '{0}' (expected cc-agent or hyperstart)")]
pub struct UnknownDialect(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_map_to_dialects() {
        assert_eq!(Dialect::from_api_version(4242), Some(Dialect::CcAgent));
        assert_eq!(Dialect::from_api_version(4243), Some(Dialect::Hyperstart));
        assert_eq!(Dialect::from_api_version(4244), Some(Dialect::Hyperstart));
        assert_eq!(Dialect::from_api_version(4245), None);
        for d in Dialect::ALL {
            assert_eq!(Dialect::from_api_version(d.api_version()), Some(d));
        }
    }

    #[test]
    fn stdin_packets_fit_the_agents_buffers() {
        assert_eq!(crate::MAX_STDIN_PACKET + crate::IO_HEADER_LEN, 4096);
        assert_eq!(Dialect::CcAgent.stdin_packet_data(), 4084);
        assert_eq!(Dialect::Hyperstart.stdin_packet_data(), 256);
    }

    #[test]
    fn codes_23_and_24_depend_on_the_dialect() {
        assert_eq!(Dialect::CcAgent.command_code("pscontainer"), Some(23));
        assert_eq!(Dialect::CcAgent.command_code("processasyncevent"), Some(24));
        assert_eq!(Dialect::CcAgent.command_code("signalprocess"), None);
        assert_eq!(
            Dialect::Hyperstart.command_code("processasyncevent"),
            Some(23)
        );
        assert_eq!(Dialect::Hyperstart.command_code("signalprocess"), Some(24));
        assert_eq!(Dialect::Hyperstart.command_code("pscontainer"), None);
        assert_eq!(Dialect::CcAgent.command_name(23), Some("pscontainer"));
        assert_eq!(Dialect::Hyperstart.command_name(24), Some("signalprocess"));
    }

    #[test]
    fn names_and_codes_round_trip() {
        for d in Dialect::ALL {
            for c in 0..=30 {
                if let Some(name) = d.command_name(c) {
                    assert_eq!(d.command_code(name), Some(c), "{d} {name}");
                }
            }
            assert_eq!(d.command_code("getversion"), Some(0));
            assert_eq!(d.command_name(0), Some("version"));
            assert_eq!(d.command_code("deleteinterface"), Some(25));
            assert_eq!(d.command_code("nosuch"), None);
            assert_eq!(d.command_name(26), None);
        }
    }

    #[test]
    fn serde_and_parse_use_kebab_case_names() {
        assert_eq!(
            serde_json::to_string(&Dialect::CcAgent).expect("serializes"),
            "\"cc-agent\""
        );
        let d: Dialect = serde_json::from_str("\"hyperstart\"").expect("parses");
        assert_eq!(d, Dialect::Hyperstart);
        assert_eq!("cc-agent".parse::<Dialect>(), Ok(Dialect::CcAgent));
        assert!("hyper".parse::<Dialect>().is_err());
    }
}
