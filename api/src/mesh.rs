//! The mesh front's configuration, as carried by `vm.register` (`mesh`) and shown by `vm.info`.
//!
//! A meshed VM has one workload identity (a DNS-like name such as
//! `web.default.serviceaccount.identity.linkerd.cluster.local`), inbound listeners that terminate mTLS in
//! front of a guest port, and outbound listeners through which the guest reaches other meshed workloads.
//! `docs/mesh.md` is the reference; every field here is a wire name.

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

/// A fixed outbound destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// `IP:PORT` endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// The identity every endpoint must present; absent: plaintext (`tls="no_identity"`).
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
}

/// A served certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateInfo {
    pub identity: String,
    /// Hex serial number.
    pub serial: String,
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
    /// Absent until a certificate was issued (or while the identity files are missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateInfo>,
    /// The served chain (leaf first) as PEM; certificates only, never the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_pem: Option<String>,
}
