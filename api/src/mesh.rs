//! The mesh front's configuration, as carried by `vm.register` (`mesh`) and shown by `vm.info`.
//!
//! A meshed VM has one workload identity (a DNS-like name such as
//! `web.default.serviceaccount.identity.linkerd.cluster.local`), inbound listeners that terminate mTLS in
//! front of a guest port, and outbound listeners through which the guest reaches other meshed workloads.
//! `docs/mesh.md` is the reference; every field here is a wire name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `vm.register`'s optional `mesh` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// The VM's workload identity: the DNS SAN of its certificate and the SNI its peers send.
    pub identity: String,
    /// Listeners in front of the VM's own services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound: Vec<InboundConfig>,
    /// Listeners through which the VM reaches other services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<OutboundConfig>,
}

/// One inbound listener: mTLS terminated with the VM's identity, then forwarded to `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// `HOST:PORT` (TCP) or `transparent:HOST:PORT` (iptables-redirected traffic, `SO_ORIGINAL_DST`).
    pub listen: String,
    /// The guest service: `vsock://CID:PORT`, `hvsock:///path:PORT`, `unix:///path` or `tcp://HOST:PORT`.
    pub target: String,
    /// How the decrypted bytes are treated.
    #[serde(default)]
    pub protocol: MeshProtocol,
    /// Who may connect; absent: any authenticated (meshed) peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authz: Option<Authz>,
}

/// One outbound listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// `HOST:PORT` (TCP), `transparent:HOST:PORT` (original destination from `SO_ORIGINAL_DST`),
    /// `vsock://CID:PORT` (AF_VSOCK listener on the host) or `hvsock:///path:PORT` (binds `/path_PORT`).
    pub listen: String,
    /// Where connections go; absent: the original destination (`transparent:`) or a PROXY v2 header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<DestinationConfig>,
    /// How the bytes are treated.
    #[serde(default)]
    pub protocol: MeshProtocol,
}

/// An outbound destination: fixed `endpoints`, or a `name` resolved by the destination service or DNS.
/// Exactly one of the two is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// `host:port` (e.g. `web.default.svc.cluster.local:80`), resolved with `Destination.Get` when the
    /// daemon runs with `--destination-svc`, else with DNS (re-resolved after the answer's TTL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `IP:PORT` endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// The identity every endpoint must present; absent: plaintext (`tls="no_identity"`). For a named
    /// destination, the identity of the endpoints the resolver gives none (DNS answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The endpoints are another proxy's inbound port and take opaque traffic behind the transport header
    /// (`transport.l5d.io/v1`) naming this target port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opaque_transport_port: Option<u16>,
}

/// An inbound listener's authorization policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authz {
    /// Client identities allowed; empty: any authenticated client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Whether clients without a (valid) certificate may connect.
    #[serde(default)]
    pub unauthenticated: bool,
}

/// Protocol handling of a mesh listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeshProtocol {
    /// Detect HTTP/1, HTTP/2 (prior knowledge) or opaque TCP, within a bounded time.
    #[default]
    Auto,
    Http1,
    Http2,
    /// Opaque TCP without detection (server-speaks-first protocols).
    Opaque,
}

/// `vm.info`'s `mesh` object: the configuration and the identity's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshInfo {
    pub config: MeshConfig,
    /// The certificate currently served, once issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateInfo>,
    /// Where the certificate stands; the listeners serve TLS only while it is `valid`.
    #[serde(default)]
    pub identity_state: IdentityState,
}

/// A served certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateInfo {
    pub identity: String,
    /// Hex serial number.
    pub serial: String,
    /// RFC 3339 start of validity (empty from a daemon that does not report it).
    #[serde(default)]
    pub not_before: String,
    /// RFC 3339 expiry.
    pub not_after: String,
    /// `"ca"` (the embedded CA), `"files"` or `"identity-service"`.
    pub source: String,
}

/// `mesh.trust_anchors` result: what a peer must trust to accept this daemon's mesh certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustAnchors {
    /// Every anchor as one PEM bundle (the embedded CA's certificate or the identity directory's `ca.crt`,
    /// then the extra anchors of `--mesh-trust-anchors`).
    pub pem: String,
    /// How many certificates `pem` holds.
    pub count: usize,
}

/// `mesh.identity {id}` result: a meshed VM's identity and the certificate its listeners serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshIdentity {
    pub vm: String,
    pub identity: String,
    /// Whether the identity's listeners have a certificate to serve, and whether it is still valid.
    #[serde(default)]
    pub state: IdentityState,
    /// Absent until a certificate was issued (or while the identity files are missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateInfo>,
    /// The served chain (leaf first) as PEM; certificates only, never the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_pem: Option<String>,
}

/// `mesh.endpoints {id}` result: each outbound destination of a meshed VM and its endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshEndpoints {
    pub vm: String,
    /// One entry per outbound listener that has a `destination` (listeners taking the original
    /// destination or a PROXY header have no endpoint set and are not listed), in configuration order.
    pub destinations: Vec<DestinationStatus>,
}

/// One outbound listener's destination and where its endpoints stand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestinationStatus {
    /// The listener's `listen` address, as configured.
    pub listener: String,
    /// The destination's `name`; absent for fixed endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where the destination's resolution stands.
    pub state: DestinationState,
    /// The endpoints known now (the last known ones while `reconnecting`).
    pub endpoints: Vec<EndpointStatus>,
}

/// Where a destination's endpoint set stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationState {
    /// Fixed endpoints from the configuration.
    Fixed,
    /// A name not resolved yet.
    Pending,
    /// A name resolved; its endpoints are current.
    Resolved,
    /// The destination service says the name has no endpoints.
    NoEndpoints,
    /// The destination service stream or the DNS lookup failed; the last endpoints are kept meanwhile.
    Reconnecting,
}

/// One endpoint of an outbound destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// `IP:PORT`.
    pub addr: String,
    /// The identity the endpoint must present (mTLS); absent: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The SNI sent, when it differs from `identity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// How the endpoint wants to be spoken to.
    pub hint: EndpointHint,
    /// Whether the balancer may pick it.
    pub state: EndpointState,
    /// Its current load.
    pub load: EndpointLoad,
    /// Metric labels attached to the endpoint's metrics (from the destination service).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// An endpoint's protocol hint (the destination service's, or `opaque_transport_port` of a fixed
/// destination).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "protocol", rename_all = "snake_case")]
pub enum EndpointHint {
    /// None: the connection's protocol is kept.
    #[default]
    Unknown,
    /// The endpoint's proxy takes HTTP/2: HTTP/1 requests travel upgraded (`l5d-orig-proto`).
    H2,
    /// Opaque TCP; with `transport_port`, behind the transport header naming that port.
    Opaque {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transport_port: Option<u16>,
    },
}

impl std::fmt::Display for EndpointHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointHint::Unknown => f.write_str("-"),
            EndpointHint::H2 => f.write_str("h2"),
            EndpointHint::Opaque {
                transport_port: Some(p),
            } => write!(f, "opaque:{p}"),
            EndpointHint::Opaque {
                transport_port: None,
            } => f.write_str("opaque"),
        }
    }
}

/// Whether the balancer may pick an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointState {
    /// Connectable: the balancer may pick it.
    Ready,
    /// It failed to connect or to handshake and waits out its backoff before being tried again.
    Ejected,
    /// Not tried yet.
    Pending,
}

/// An endpoint's load as the balancer sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointLoad {
    /// Connections (opaque TCP) or requests (HTTP) open to it now.
    pub open: u64,
    /// The peak-EWMA latency estimate in milliseconds (HTTP), once measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ewma_ms: Option<f64>,
}

/// `mesh.identity`'s `state`: where a meshed identity's certificate stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityState {
    /// No certificate yet (being issued, the identity files missing, the identity service not answered):
    /// the VM's listeners do not serve.
    #[default]
    Pending,
    /// A certificate within its validity is served.
    Valid,
    /// The served certificate has expired and its source has not renewed it (the identity service
    /// unreachable): peers refuse it until a new one arrives.
    Expired,
}

impl IdentityState {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityState::Pending => "pending",
            IdentityState::Valid => "valid",
            IdentityState::Expired => "expired",
        }
    }
}
