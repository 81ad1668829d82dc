//! Checking a VM's `mesh` object (`vm.register`) before anything is bound or connected, so a mistake is
//! answered with the field at fault rather than found by a listener later.
//!
//! What is checked here is syntax and consistency within one VM's configuration: the identity and every
//! identity it names, each listen address and target URI, the destination (endpoints, or a name), the bounds below, and
//! that no two listeners of the VM share an address. Whether an address can actually be bound is found by
//! binding it (`listener::bind_vm`), which fails the registration too.

use std::net::SocketAddr;

use cc_proxy_api::mesh::{MeshConfig, OutboundConfig};

use super::discover::split_name;
use super::identity::validate_identity;
use super::listener::{ListenAddr, MeshError};
use crate::transport::Endpoint;

/// Most inbound listeners, and most outbound listeners, one VM may have.
pub const MAX_LISTENERS: usize = 32;
/// Most client identities one inbound listener's `authz` may list.
pub const MAX_AUTHZ_IDENTITIES: usize = 256;
/// Most endpoints of one fixed outbound destination.
pub const MAX_ENDPOINTS: usize = 64;
/// Longest destination name `host:port` (a DNS name's 253 bytes, `:` and a port).
pub const MAX_NAME_LEN: usize = 259;
/// One mistake in a mesh configuration: the field (`mesh.inbound[0].target`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

/// Parse a listen address with the data plane's parser (`listener::ListenAddr`, what `bind_vm` binds).
fn listen_addr(field: &str, listen: &str, inbound: bool) -> Result<ListenAddr, ConfigError> {
    ListenAddr::parse(listen, inbound).map_err(|e| match e {
        MeshError::InvalidListen { reason, .. } => err(field, format!("{listen:?}: {reason}")),
        other => err(field, other.to_string()),
    })
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Check a VM's mesh configuration; the first mistake found is returned.
pub fn validate(cfg: &MeshConfig) -> Result<(), ConfigError> {
    validate_identity(&cfg.identity).map_err(|r| err("mesh.identity", r))?;
    if cfg.inbound.len() > MAX_LISTENERS {
        return Err(err(
            "mesh.inbound",
            format!("at most {MAX_LISTENERS} inbound listeners"),
        ));
    }
    if cfg.outbound.len() > MAX_LISTENERS {
        return Err(err(
            "mesh.outbound",
            format!("at most {MAX_LISTENERS} outbound listeners"),
        ));
    }
    // Listen addresses seen so far (at most 2 x MAX_LISTENERS: a linear search is enough).
    // Compared by what is bound: `127.0.0.1:4143` and `transparent:127.0.0.1:4143` are one address.
    let mut seen: Vec<ListenAddr> = Vec::new();
    let mut unique = |field: &str, value: &str, inbound: bool| -> Result<(), ConfigError> {
        let addr = listen_addr(field, value, inbound)?;
        if seen.iter().any(|s| s.endpoint() == addr.endpoint()) {
            return Err(err(
                field,
                format!("{value:?} is used by another listener of this VM"),
            ));
        }
        seen.push(addr);
        Ok(())
    };
    for (i, inbound) in cfg.inbound.iter().enumerate() {
        let field = format!("mesh.inbound[{i}]");
        unique(&format!("{field}.listen"), &inbound.listen, true)?;
        Endpoint::parse(&inbound.target)
            .map_err(|e| err(format!("{field}.target"), e.to_string()))?;
        if let Some(authz) = &inbound.authz {
            if authz.identities.len() > MAX_AUTHZ_IDENTITIES {
                return Err(err(
                    format!("{field}.authz.identities"),
                    format!("at most {MAX_AUTHZ_IDENTITIES} identities"),
                ));
            }
            for (j, id) in authz.identities.iter().enumerate() {
                validate_identity(id)
                    .map_err(|r| err(format!("{field}.authz.identities[{j}]"), r))?;
            }
        }
    }
    for (i, outbound) in cfg.outbound.iter().enumerate() {
        let field = format!("mesh.outbound[{i}]");
        unique(&format!("{field}.listen"), &outbound.listen, false)?;
        validate_destination(&field, outbound)?;
    }
    Ok(())
}

fn validate_destination(field: &str, outbound: &OutboundConfig) -> Result<(), ConfigError> {
    let Some(dst) = &outbound.destination else {
        return Ok(());
    };
    let field = format!("{field}.destination");
    if let Some(name) = &dst.name {
        if !dst.endpoints.is_empty() {
            return Err(err(
                format!("{field}.name"),
                "give either `name` or `endpoints`, not both",
            ));
        }
        validate_name(name).map_err(|r| err(format!("{field}.name"), r))?;
    } else if dst.endpoints.is_empty() {
        return Err(err(
            format!("{field}.endpoints"),
            "a destination needs a `name` or at least one IP:PORT endpoint (omit `destination` to take it from the connection)",
        ));
    }
    if dst.endpoints.len() > MAX_ENDPOINTS {
        return Err(err(
            format!("{field}.endpoints"),
            format!("at most {MAX_ENDPOINTS} endpoints"),
        ));
    }
    for (j, e) in dst.endpoints.iter().enumerate() {
        let addr: SocketAddr = e.parse().map_err(|_| {
            err(
                format!("{field}.endpoints[{j}]"),
                format!("{e:?} is not IP:PORT"),
            )
        })?;
        if addr.port() == 0 {
            return Err(err(format!("{field}.endpoints[{j}]"), "port 0"));
        }
    }
    if let Some(id) = &dst.identity {
        validate_identity(id).map_err(|r| err(format!("{field}.identity"), r))?;
    }
    match dst.opaque_transport_port {
        Some(0) => Err(err(format!("{field}.opaque_transport_port"), "port 0")),
        Some(_) if dst.name.is_some() => Err(err(
            format!("{field}.opaque_transport_port"),
            "a named destination's endpoints carry their own protocol hint: for fixed endpoints only",
        )),
        Some(_) if dst.identity.is_none() => Err(err(
            format!("{field}.opaque_transport_port"),
            "the transport header travels inside mTLS only: set `identity` too",
        )),
        _ => Ok(()),
    }
}

/// Check a destination name: `host:port`, the host a DNS name (letters, digits, `-`, `_`, dots) or an IP
/// address, at most [`MAX_NAME_LEN`] bytes.
fn validate_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_LEN {
        return Err(format!("longer than {MAX_NAME_LEN} bytes"));
    }
    let (host, _) = split_name(name).map_err(|e| e.to_string())?;
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if host.trim_end_matches('.').split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "{name:?}: the host is neither a DNS name nor an IP address"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const A: &str = "a.default.serviceaccount.identity.linkerd.cluster.local";
    const B: &str = "b.default.serviceaccount.identity.linkerd.cluster.local";

    fn config(v: serde_json::Value) -> MeshConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_documented_example_is_valid() {
        let cfg = config(json!({
            "identity": B,
            "inbound": [{"listen": "127.0.0.1:4143", "target": "vsock://5:8080", "protocol": "auto",
                         "authz": {"identities": [A], "unauthenticated": false}}],
            "outbound": [{"listen": "127.0.0.1:4140",
                          "destination": {"endpoints": ["10.0.0.7:4143"], "identity": B}},
                         {"listen": "transparent:127.0.0.1:4141"},
                         {"listen": "hvsock:///run/vm5.vsock:4140",
                          "destination": {"endpoints": ["127.0.0.1:4143"], "identity": B}}]
        }));
        assert_eq!(validate(&cfg), Ok(()));
    }

    #[test]
    fn named_destinations_are_valid() {
        for name in [
            "web.default.svc.cluster.local:80",
            "web.default.svc.cluster.local.:8080",
            "10.0.0.7:4143",
            "[::1]:4143",
            "my_svc:1",
        ] {
            let cfg = config(
                json!({"identity": B, "outbound": [{"listen": "127.0.0.1:4140",
                "destination": {"name": name, "identity": A}}]}),
            );
            assert_eq!(validate(&cfg), Ok(()), "{name}");
        }
    }

    #[test]
    fn mistakes_name_their_field() {
        let cases = [
            (json!({"identity": "Not Valid"}), "mesh.identity"),
            (
                json!({"identity": B, "inbound": [{"listen": "nowhere", "target": "tcp://127.0.0.1:1"}]}),
                "mesh.inbound[0].listen",
            ),
            (
                json!({"identity": B, "inbound": [{"listen": "vsock://2:80", "target": "tcp://127.0.0.1:1"}]}),
                "mesh.inbound[0].listen",
            ),
            (
                json!({"identity": B, "inbound": [{"listen": "127.0.0.1:4143", "target": "ftp://x"}]}),
                "mesh.inbound[0].target",
            ),
            (
                json!({"identity": B, "inbound": [{"listen": "127.0.0.1:4143", "target": "tcp://127.0.0.1:1",
                "authz": {"identities": ["x"]}}]}),
                "mesh.inbound[0].authz.identities[0]",
            ),
            (
                json!({"identity": B, "inbound": [{"listen": "127.0.0.1:4143", "target": "tcp://127.0.0.1:1"}],
                "outbound": [{"listen": "127.0.0.1:4143"}]}),
                "mesh.outbound[0].listen",
            ),
            (
                json!({"identity": B, "inbound": [{"listen": "127.0.0.1:4143", "target": "tcp://127.0.0.1:1"}],
                "outbound": [{"listen": "transparent:127.0.0.1:4143"}]}),
                "mesh.outbound[0].listen",
            ),
            (
                json!({"identity": B, "outbound": [{"listen": "unix:///x"}]}),
                "mesh.outbound[0].listen",
            ),
            (
                json!({"identity": B, "outbound": [{"listen": "127.0.0.1:4140", "destination": {"endpoints": []}}]}),
                "mesh.outbound[0].destination.endpoints",
            ),
            (
                json!({"identity": B, "outbound": [{"listen": "127.0.0.1:4140", "destination": {"endpoints": ["b:1"]}}]}),
                "mesh.outbound[0].destination.endpoints[0]",
            ),
            (
                json!({"identity": B, "outbound": [{"listen": "127.0.0.1:4140",
                "destination": {"endpoints": ["10.0.0.1:4143"], "identity": "B"}}]}),
                "mesh.outbound[0].destination.identity",
            ),
            (
                json!({"identity": B, "outbound": [{"listen": "127.0.0.1:4140",
                "destination": {"endpoints": ["10.0.0.1:4143"], "opaque_transport_port": 80}}]}),
                "mesh.outbound[0].destination.opaque_transport_port",
            ),
            (
                json!({"identity": B, "outbound": [{"listen": "127.0.0.1:4140", "destination": {}}]}),
                "mesh.outbound[0].destination.endpoints",
            ),
            (
                json!({"identity": B, "outbound": [{"listen": "127.0.0.1:4140",
                "destination": {"name": "web.default.svc.cluster.local:80", "endpoints": ["10.0.0.1:80"]}}]}),
                "mesh.outbound[0].destination.name",
            ),
            (
                json!({"identity": B, "outbound": [{"listen": "127.0.0.1:4140",
                "destination": {"name": "web.default.svc.cluster.local"}}]}),
                "mesh.outbound[0].destination.name",
            ),
            (
                json!({"identity": B, "outbound": [{"listen": "127.0.0.1:4140",
                "destination": {"name": "web.default:0"}}]}),
                "mesh.outbound[0].destination.name",
            ),
            (
                json!({"identity": B, "outbound": [{"listen": "127.0.0.1:4140",
                "destination": {"name": "web/default:80"}}]}),
                "mesh.outbound[0].destination.name",
            ),
            (
                json!({"identity": B, "outbound": [{"listen": "127.0.0.1:4140",
                "destination": {"name": format!("{}:80", "a.".repeat(130))}}]}),
                "mesh.outbound[0].destination.name",
            ),
            (
                json!({"identity": B, "outbound": [{"listen": "127.0.0.1:4140",
                "destination": {"name": "web.default:80", "identity": B, "opaque_transport_port": 80}}]}),
                "mesh.outbound[0].destination.opaque_transport_port",
            ),
            (
                json!({"identity": B, "outbound": [{"listen": "127.0.0.1:4140",
                "destination": {"name": "web.default:80", "identity": "B"}}]}),
                "mesh.outbound[0].destination.identity",
            ),
        ];
        for (cfg, field) in cases {
            let e = validate(&config(cfg.clone())).expect_err(&cfg.to_string());
            assert_eq!(e.field, field, "{cfg}: {e}");
        }
        let many: Vec<_> = (0..=MAX_LISTENERS)
            .map(|i| json!({"listen": format!("127.0.0.1:{}", 5000 + i)}))
            .collect();
        let e = validate(&config(json!({"identity": B, "outbound": many}))).unwrap_err();
        assert_eq!(e.field, "mesh.outbound");
    }
}
