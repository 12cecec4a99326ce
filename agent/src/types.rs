//! The small shared vocabulary of the agent: pod names and ids, modes, directions, typed
//! addresses, CIDRs and the well-known paths. It imports nothing else of the agent, so
//! every other module can use it without creating a cycle.

use std::{fmt, net::IpAddr, net::SocketAddr, str::FromStr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Istio's capture ports, so dashboards and muscle memory carry over.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// bpffs directory for the pins of fail-closed pods (one directory per pod).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/agent";
/// The admin API's Unix socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/agent/admin.sock";
/// Where the agent records the pods it enrolled, so a restarted agent re-adopts them.
pub const DEFAULT_STATE_DIR: &str = "/run/agent";
/// The directory under the pin root that holds the maps `agent maps` reads; no pod may
/// take this name.
pub const PIN_MAPS_DIR: &str = "maps";

/// Pod names become directory names under the pin root and the state directory.
const MAX_POD_NAME: usize = 63;

/// A pod name that is safe to use as a path component.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct PodName(String);

impl PodName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= MAX_POD_NAME
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !s.starts_with('.');
        if !ok {
            return Err(format!(
                "`{s}` is not a valid pod name (1-{MAX_POD_NAME} characters of [A-Za-z0-9._-], \
                 not starting with a dot)"
            ));
        }
        if s == PIN_MAPS_DIR {
            return Err(format!(
                "`{PIN_MAPS_DIR}` is reserved (the agent pins its maps there)"
            ));
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The agent's number for an enrolled pod: it scopes every per-pod key in the kernel maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PodId(pub u32);

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which side of the pod a connection is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The pod's applications connecting out.
    Outbound,
    /// Connections to the pod's addresses.
    Inbound,
}

impl Direction {
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a lowercase serde enum name (`"closed"`), for flags and query parameters.
fn from_name<T: for<'de> Deserialize<'de>>(
    s: &str,
    what: &str,
    expected: &str,
) -> Result<T, String> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s))
        .map_err(|_| format!("`{s}` is not a {what} (expected {expected})"))
}

/// What stays in the kernel for a pod while no agent serves it.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Connections fail until an agent adopts the pod again (the programs stay pinned).
    #[default]
    Closed,
    /// Nothing stays attached: connections go direct, unprotected.
    Open,
}

impl FromStr for FailMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        from_name(s, "fail mode", "`closed` or `open`")
    }
}

/// What inbound accepts besides mutual TLS from the mesh.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plaintext (and foreign TLS) is refused; outbound to the mesh must be mTLS.
    Strict,
    /// Plaintext is forwarded, marked unauthenticated.
    #[default]
    Permissive,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        from_name(s, "mode", "`strict` or `permissive`")
    }
}

/// What a pod's outbound UDP to the mesh (its `mesh_networks` and enrolled pods) may do.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UdpOutbound {
    /// Left alone (the mesh does not carry UDP).
    Allow,
    /// Refused in the kernel (EPERM) except to the pod's `udp_allow_ports`.
    Deny,
}

impl FromStr for UdpOutbound {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        from_name(s, "udp_outbound", "`allow` or `deny`")
    }
}

/// How a pod's outbound connections reach the agent.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Redirect {
    /// The agent's connect4/6 programs on the pod's cgroup.
    #[default]
    Ebpf,
    /// An iptables REDIRECT rule in the pod, installed by the operator (as sidecar meshes'
    /// init containers do); the agent reads SO_ORIGINAL_DST.
    Iptables,
}

impl FromStr for Redirect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        from_name(s, "redirect", "`ebpf` or `iptables`")
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Where a redirected or steered connection was originally going: what the application
/// dialed (outbound, recorded by the kernel) or the pod address and port a client reached
/// (inbound, from `getsockname()` after sk_lookup). Always in canonical form (an
/// IPv4-mapped IPv6 address is IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrigDstAddr(SocketAddr);

impl OrigDstAddr {
    pub fn new(addr: SocketAddr) -> Self {
        Self(canonical(addr))
    }
    pub fn addr(self) -> SocketAddr {
        self.0
    }
    pub fn ip(self) -> IpAddr {
        self.0.ip()
    }
    pub fn port(self) -> u16 {
        self.0.port()
    }
}

impl fmt::Display for OrigDstAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The peer of an accepted connection, as the agent's socket sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(SocketAddr);

impl ClientAddr {
    pub fn new(addr: SocketAddr) -> Self {
        Self(addr)
    }
    pub fn addr(self) -> SocketAddr {
        self.0
    }
    pub fn ip(self) -> IpAddr {
        self.0.ip()
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Accepts `a.b.c.d/n`, `x::y/n` and a bare address (a host route).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = IpNet::from_str(text) {
        if net.trunc() != net {
            return Err(format!(
                "`{text}` has host bits set; did you mean `{}`?",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    if let Ok(ip) = IpAddr::from_str(text) {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "`{text}` is not a CIDR (expected e.g. 10.0.0.0/8 or fd00::/8)"
    ))
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        assert!(parse_cidr("fd00::/8").is_ok());
        assert!(parse_cidr("10.1.2.3").is_ok());
        assert!(parse_cidr("10.0.0.0/33")
            .unwrap_err()
            .contains("not a CIDR"));
        assert!(parse_cidr("10.0.0.1/8").unwrap_err().contains("host bits"));
    }

    #[test]
    fn pod_names() {
        assert!(PodName::parse("pod-a.ns_1").is_ok());
        assert!(PodName::parse("../etc").is_err());
        assert!(PodName::parse("").is_err());
        assert!(PodName::parse("maps").unwrap_err().contains("reserved"));
    }

    #[test]
    fn modes_parse_with_their_names() {
        assert_eq!("open".parse::<FailMode>(), Ok(FailMode::Open));
        assert_eq!("strict".parse::<Mode>(), Ok(Mode::Strict));
        assert_eq!("iptables".parse::<Redirect>(), Ok(Redirect::Iptables));
        assert!("shut"
            .parse::<FailMode>()
            .unwrap_err()
            .contains("`closed` or `open`"));
    }

    #[test]
    fn original_destinations_are_canonical() {
        let mapped: SocketAddr = "[::ffff:10.0.0.7]:80".parse().unwrap();
        assert_eq!(OrigDstAddr::new(mapped).to_string(), "10.0.0.7:80");
    }
}
