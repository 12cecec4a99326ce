//! One validated pod spec, however a pod arrives: a `[[pod]]` table of the config file,
//! `agent enroll`, the admin API, or the state a previous agent recorded. All of them are
//! a [`PodRequest`], checked by [`PodRequest::validate`] with the same rules and the same
//! messages (the field and the reason); the kernel entry, the proxy's view of the pod and
//! the admin view are all derived from the resulting [`PodSpec`].
//!
//! Checks that look at the filesystem (is this a network namespace? a cgroup v2
//! directory?) go through [`Probe`], so the validation itself is pure and unit-testable.

mod limits;

use std::{
    fmt,
    path::{Path, PathBuf},
};

pub use limits::{LimitsRequest, LimitsSpec};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    identity::{IdentityFiles, SpiffeId, WorkloadApi},
    k8s::K8sPod,
    types::{parse_cidr, FailMode, Mode, PodName, Redirect, UdpOutbound},
};

/// A pod as a user (or a runtime) asks for it to be enrolled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PodRequest {
    pub name: String,
    /// The pod's network namespace: `/var/run/netns/NAME` or `/proc/PID/ns/net`.
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    #[serde(default)]
    pub fail_mode: FailMode,
    /// Destination ports the pod's applications reach directly (no proxy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_ports: Vec<u16>,
    /// Destination CIDRs the pod's applications reach directly (no proxy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_cidrs: Vec<String>,
    /// Inbound ports left to the application untouched (no proxy, no policy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_inbound_ports: Vec<u16>,
    /// Ports that health probes from the node's `probe_sources` reach directly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_ports: Vec<u16>,
    /// STRICT pods: UDP accepted on these local ports, or from these remote ports (DNS
    /// replies from 53); all other inbound UDP is dropped in the kernel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub udp_allow_ports: Vec<u16>,
    /// Outbound UDP to the mesh: `deny` refuses it except to `udp_allow_ports`. Unset, it
    /// follows the mode: STRICT pods deny, PERMISSIVE pods allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_outbound: Option<UdpOutbound>,
    #[serde(default)]
    pub mode: Mode,
    /// The pod's SVID: certificate chain, private key and trust bundle (PEM files)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<PathBuf>,
    /// ...or a directory holding them in a known layout (see `IdentityFiles::in_dir`)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_dir: Option<PathBuf>,
    /// ...or the SPIFFE Workload API that hands out the pod's SVID
    /// (`unix:///run/spire/agent.sock`), streamed and rotated as SPIRE issues them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_socket: Option<String>,
    /// Which of the SVIDs the Workload API offers (default: its first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// The pod's authorization policy (YAML); without one the node's default applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PathBuf>,
    #[serde(default)]
    pub redirect: Redirect,
    /// Splice the application-to-agent loopback hop in the kernel (sock_ops + sk_msg).
    /// Off by default: the bench did not show a win at every message size
    /// (docs/performance.md).
    #[serde(default)]
    pub accelerate: bool,
    /// Ports on which clients outside the mesh get TLS from the agent (edge TLS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edge: Vec<EdgeRequest>,
    /// End-user authentication on the pod's HTTP ports (bearer tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authn: Option<AuthnRequest>,
    /// Rate limits and request size limits for the pod's inbound traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsRequest>,
    /// The Kubernetes pod behind it, when a container runtime's CNI plugin asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<K8sPod>,
}

/// An `[[pod.edge]]` table: on `ports`, a client that is not a mesh agent is served TLS
/// with this certificate, and its HTTP requests are decided by the pod's policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeRequest {
    pub ports: Vec<u16>,
    /// The server certificate chain and its key (PEM)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// ...or a directory in cert-manager's Secret layout (`tls.crt`, `tls.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Require a client certificate that chains to these CAs (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Answer plaintext HTTP with a 308 to https instead of refusing the connection.
    #[serde(default)]
    pub redirect_http: bool,
}

/// A `[pod.authn]` table: on `ports` (default: every port whose requests the agent
/// inspects), every request must carry a valid bearer token from one of the issuers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthnRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// The header the application reads the verified subject from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_header: Option<String>,
    #[serde(default)]
    pub jwt: Vec<JwtIssuerRequest>,
    /// Basic authentication from a hashed credentials file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<BasicRequest>,
    /// Pass the `Authorization` header on to the application (default: removed once
    /// verified, so the token goes no further than it must).
    #[serde(default)]
    pub forward_token: bool,
}

/// `[pod.authn.basic]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BasicRequest {
    /// `user:hash` lines, bcrypt (`htpasswd -B`) or Argon2; watched and reloaded.
    pub htpasswd: PathBuf,
    /// The realm browsers show (default: the pod's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realm: Option<String>,
}

/// One trusted token issuer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuerRequest {
    /// The `iss` its tokens carry.
    pub issuer: String,
    /// Accepted `aud` values (empty: the audience is not checked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Its public keys, a JWK set (JSON); watched and reloaded.
    pub jwks: PathBuf,
    /// How far `exp` and `nbf` may be off (default 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_skew_seconds: Option<u64>,
}

/// A validated `[pod.authn]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthnSpec {
    pub ports: Vec<u16>,
    pub subject_header: Option<String>,
    pub forward_token: bool,
    pub jwt: Vec<JwtIssuerSpec>,
    pub basic: Option<BasicRequest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JwtIssuerSpec {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks: PathBuf,
    pub clock_skew_seconds: u64,
}

/// The skew `exp` and `nbf` get when the issuer names none.
pub const DEFAULT_CLOCK_SKEW_SECONDS: u64 = 60;

impl AuthnRequest {
    fn validate(
        &self,
        invalid: &dyn Fn(&str, String) -> SpecError,
    ) -> Result<AuthnSpec, SpecError> {
        if let Some(j) = self.ports.iter().position(|p| *p == 0) {
            return Err(invalid(
                &format!("ports[{j}]"),
                "port 0 is not a port".into(),
            ));
        }
        if let Some(h) = &self.subject_header {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(invalid(
                    "subject_header",
                    format!("`{h}` is not an HTTP header name"),
                ));
            }
        }
        if self.jwt.is_empty() && self.basic.is_none() {
            return Err(invalid(
                "jwt",
                "name at least one issuer ([[pod.authn.jwt]] with issuer and jwks), or [pod.authn.basic]".into(),
            ));
        }
        if let Some(realm) = self.basic.as_ref().and_then(|b| b.realm.as_ref()) {
            if realm.contains(['"', '\\']) || realm.chars().any(char::is_control) {
                return Err(invalid(
                    "basic.realm",
                    "no quotes, backslashes or control characters".into(),
                ));
            }
        }
        let mut jwt: Vec<JwtIssuerSpec> = Vec::new();
        for (i, j) in self.jwt.iter().enumerate() {
            if j.issuer.trim().is_empty() {
                return Err(invalid(
                    &format!("jwt[{i}].issuer"),
                    "empty: give the `iss` its tokens carry".into(),
                ));
            }
            if jwt.iter().any(|o| o.issuer == j.issuer) {
                return Err(invalid(
                    &format!("jwt[{i}].issuer"),
                    format!("`{}` is listed twice", j.issuer),
                ));
            }
            jwt.push(JwtIssuerSpec {
                issuer: j.issuer.clone(),
                audiences: j.audiences.clone(),
                jwks: j.jwks.clone(),
                clock_skew_seconds: j.clock_skew_seconds.unwrap_or(DEFAULT_CLOCK_SKEW_SECONDS),
            });
        }
        let mut ports = self.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        Ok(AuthnSpec {
            ports,
            subject_header: self.subject_header.as_ref().map(|h| h.to_ascii_lowercase()),
            forward_token: self.forward_token,
            jwt,
            basic: self.basic.clone(),
        })
    }
}

/// A validated edge listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EdgeSpec {
    pub ports: Vec<u16>,
    pub files: crate::tls::edge::EdgeFiles,
    pub redirect_http: bool,
}

impl EdgeRequest {
    fn validate(&self, invalid: &dyn Fn(&str, String) -> SpecError) -> Result<EdgeSpec, SpecError> {
        if self.ports.is_empty() {
            return Err(invalid("ports", "name at least one port".into()));
        }
        if let Some(j) = self.ports.iter().position(|p| *p == 0) {
            return Err(invalid(
                &format!("ports[{j}]"),
                "port 0 is not a port".into(),
            ));
        }
        let (cert, key) = match (&self.dir, &self.cert, &self.key) {
            (Some(dir), None, None) => (dir.join("tls.crt"), dir.join("tls.key")),
            (None, Some(cert), Some(key)) => (cert.clone(), key.clone()),
            (Some(_), ..) => {
                return Err(invalid("dir", "give dir or cert and key, not both".into()))
            }
            _ => return Err(invalid(
                "cert",
                "an edge listener needs its certificate: cert and key, or dir (tls.crt, tls.key)"
                    .into(),
            )),
        };
        let mut ports = self.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        Ok(EdgeSpec {
            ports,
            files: crate::tls::edge::EdgeFiles {
                cert,
                key,
                client_ca: self.client_ca.clone(),
            },
            redirect_http: self.redirect_http,
        })
    }
}

/// What the node's configuration gives every pod that does not choose for itself.
#[derive(Debug, Clone, Default)]
pub struct PodDefaults {
    /// The policy of pods that name none (without it they deny all inbound).
    pub policy: Option<PathBuf>,
    /// The SO_MARK of the agent's upstream sockets, which `redirect = "iptables"` needs.
    pub upstream_mark: Option<u32>,
}

/// A validated pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodSpec {
    pub name: PodName,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub fail_mode: FailMode,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<IpNet>,
    pub exclude_inbound_ports: Vec<u16>,
    pub probe_ports: Vec<u16>,
    pub udp_allow_ports: Vec<u16>,
    pub udp_outbound: UdpOutbound,
    pub mode: Mode,
    pub identity: Option<IdentityFiles>,
    /// The pod's identity from the SPIFFE Workload API instead of files.
    pub workload_api: Option<WorkloadApi>,
    /// The pod's own policy, else the node's default policy, else none (deny all).
    pub policy: Option<PathBuf>,
    pub redirect: Redirect,
    pub accelerate: bool,
    pub edge: Vec<EdgeSpec>,
    pub authn: Option<AuthnSpec>,
    pub limits: Option<LimitsSpec>,
    /// The SO_MARK of upstream sockets (only for `redirect = "iptables"`).
    pub upstream_mark: Option<u32>,
    pub kubernetes: Option<K8sPod>,
    /// The request this was validated from, as a restarted agent re-reads it.
    #[serde(skip)]
    pub request: PodRequest,
}

/// A Workload API address as the `spiffe` client takes it: `unix:` with an absolute path,
/// or `tcp:` with an address; a bare absolute path is taken as a unix socket.
fn workload_api_endpoint(s: &str) -> Result<String, String> {
    if s.starts_with('/') {
        return Ok(format!("unix://{s}"));
    }
    let path = s
        .strip_prefix("unix://")
        .or_else(|| s.strip_prefix("unix:"));
    match path {
        Some(p) if p.starts_with('/') && p.len() > 1 => Ok(s.to_string()),
        Some(_) => Err(format!(
            "`{s}`: a unix socket needs an absolute path (unix:///run/spire/agent.sock)"
        )),
        None if s.starts_with("tcp:") => Ok(s.to_string()),
        None => Err(format!(
            "`{s}` is not a Workload API address: unix:///path/to/agent.sock or tcp://host:port"
        )),
    }
}

/// A request the agent refuses: the field (as the config file names it) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

/// The filesystem facts validation needs, behind a seam the tests replace.
pub trait Probe {
    /// `Ok` when `path` is a network namespace handle.
    fn netns(&self, path: &Path) -> Result<(), String>;
    /// `Ok` when `path` is a cgroup v2 directory other than the hierarchy's root.
    fn cgroup(&self, path: &Path) -> Result<(), String>;
    /// The identity files in `dir`.
    fn identity_dir(&self, dir: &Path) -> Result<IdentityFiles, String>;
    /// Where the cgroup v2 hierarchy is mounted.
    fn cgroup2_root(&self) -> Result<PathBuf, String>;
    /// The cgroup directory this process runs in.
    fn own_cgroup(&self) -> Result<PathBuf, String>;
}

impl PodRequest {
    /// Checks everything an operator can get wrong before anything touches the kernel.
    /// `at` prefixes field names (`pod[0]` in the config file; empty for one request).
    pub fn validate(
        &self,
        at: &str,
        defaults: &PodDefaults,
        probe: &dyn Probe,
    ) -> Result<PodSpec, SpecError> {
        let field = |f: &str| {
            if at.is_empty() {
                f.to_string()
            } else {
                format!("{at}.{f}")
            }
        };
        let invalid = |f: &str, reason: String| SpecError {
            field: field(f),
            reason,
        };
        let name = PodName::parse(&self.name).map_err(|r| invalid("name", r))?;
        if let Some(k) = &self.kubernetes {
            k.validate().map_err(|r| invalid("kubernetes", r))?;
        }
        probe.netns(&self.netns).map_err(|r| invalid("netns", r))?;
        probe
            .cgroup(&self.cgroup)
            .map_err(|r| invalid("cgroup", r))?;
        for (list, ports) in [
            ("exclude_ports", &self.exclude_ports),
            ("exclude_inbound_ports", &self.exclude_inbound_ports),
            ("probe_ports", &self.probe_ports),
            ("udp_allow_ports", &self.udp_allow_ports),
        ] {
            if let Some(j) = ports.iter().position(|p| *p == 0) {
                return Err(invalid(
                    &format!("{list}[{j}]"),
                    "port 0 is not a port".into(),
                ));
            }
        }
        let identity = match (&self.identity_dir, &self.cert, &self.key, &self.bundle) {
            (Some(dir), None, None, None) => Some(
                probe
                    .identity_dir(dir)
                    .map_err(|r| invalid("identity_dir", r))?,
            ),
            (Some(_), ..) => {
                return Err(invalid(
                    "identity_dir",
                    "give identity_dir or cert, key and bundle, not both".into(),
                ))
            }
            (None, Some(cert), Some(key), Some(bundle)) => Some(IdentityFiles {
                cert: cert.clone(),
                key: key.clone(),
                bundle: bundle.clone(),
            }),
            (None, None, None, None) => None,
            _ => {
                return Err(SpecError {
                    field: if at.is_empty() {
                        "cert".into()
                    } else {
                        at.into()
                    },
                    reason: "cert, key and bundle go together: give all three or none".into(),
                })
            }
        };
        let workload_api = match (&self.spiffe_socket, &self.spiffe_id) {
            (Some(_), _) if identity.is_some() => {
                return Err(invalid(
                    "spiffe_socket",
                    "give the identity's files or its Workload API socket, not both".into(),
                ))
            }
            (Some(endpoint), spiffe_id) => Some(WorkloadApi {
                endpoint: workload_api_endpoint(endpoint)
                    .map_err(|r| invalid("spiffe_socket", r))?,
                spiffe_id: spiffe_id
                    .as_deref()
                    .map(SpiffeId::parse)
                    .transpose()
                    .map_err(|r| invalid("spiffe_id", r))?,
            }),
            (None, Some(_)) => {
                return Err(invalid(
                    "spiffe_id",
                    "chooses among the SVIDs of spiffe_socket, which is not set".into(),
                ))
            }
            (None, None) => None,
        };
        if self.mode == Mode::Strict && identity.is_none() && workload_api.is_none() {
            return Err(invalid(
                "mode",
                "strict needs an identity: set cert, key and bundle (or identity_dir, or spiffe_socket)".into(),
            ));
        }
        if self.accelerate && self.redirect == Redirect::Iptables {
            return Err(invalid(
                "accelerate",
                "the splice needs redirect = \"ebpf\": behind an iptables REDIRECT the sockets do not see the agent's address".into(),
            ));
        }
        if self.redirect == Redirect::Iptables && defaults.upstream_mark.is_none() {
            return Err(invalid(
                "redirect",
                "iptables needs `upstream_mark` (the mark the pod's REDIRECT rule skips), or the agent's own upstream connections would loop back to it".into(),
            ));
        }
        let udp_outbound = match (self.udp_outbound, self.redirect) {
            (Some(UdpOutbound::Deny), Redirect::Iptables) => {
                return Err(invalid(
                    "udp_outbound",
                    "deny needs redirect = \"ebpf\": UDP is judged by the agent's cgroup programs, which iptables pods do not get".into(),
                ))
            }
            (Some(chosen), _) => chosen,
            // An iptables pod has no cgroup programs to judge UDP with.
            (None, Redirect::Iptables) => UdpOutbound::Allow,
            (None, Redirect::Ebpf) if self.mode == Mode::Strict => UdpOutbound::Deny,
            (None, Redirect::Ebpf) => UdpOutbound::Allow,
        };
        let mut exclude_cidrs = Vec::new();
        for (j, text) in self.exclude_cidrs.iter().enumerate() {
            exclude_cidrs
                .push(parse_cidr(text).map_err(|r| invalid(&format!("exclude_cidrs[{j}]"), r))?);
        }
        let mut edge: Vec<EdgeSpec> = Vec::new();
        for (i, e) in self.edge.iter().enumerate() {
            let at = format!("edge[{i}]");
            let spec = e.validate(&|f, reason| invalid(&format!("{at}.{f}"), reason))?;
            for port in &spec.ports {
                if edge.iter().any(|other| other.ports.contains(port)) {
                    return Err(invalid(
                        &format!("{at}.ports"),
                        format!("port {port} is already an edge port of this pod"),
                    ));
                }
                if self.exclude_inbound_ports.contains(port) {
                    return Err(invalid(
                        &format!("{at}.ports"),
                        format!("port {port} is in exclude_inbound_ports, which bypass the agent: it cannot terminate TLS there"),
                    ));
                }
            }
            edge.push(spec);
        }
        let authn = match &self.authn {
            Some(a) => Some(a.validate(&|f, reason| invalid(&format!("authn.{f}"), reason))?),
            None => None,
        };
        let limits = match &self.limits {
            Some(l) => Some(l.validate(&|f, reason| invalid(&format!("limits.{f}"), reason))?),
            None => None,
        };
        let sorted = |v: &[u16]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v.dedup();
            v
        };
        Ok(PodSpec {
            name,
            netns: self.netns.clone(),
            cgroup: self.cgroup.clone(),
            fail_mode: self.fail_mode,
            exclude_ports: sorted(&self.exclude_ports),
            exclude_cidrs,
            exclude_inbound_ports: sorted(&self.exclude_inbound_ports),
            probe_ports: sorted(&self.probe_ports),
            udp_allow_ports: sorted(&self.udp_allow_ports),
            udp_outbound,
            mode: self.mode,
            identity,
            workload_api,
            policy: self.policy.clone().or_else(|| defaults.policy.clone()),
            redirect: self.redirect,
            accelerate: self.accelerate,
            edge,
            authn,
            limits,
            upstream_mark: (self.redirect == Redirect::Iptables)
                .then_some(defaults.upstream_mark)
                .flatten(),
            kubernetes: self.kubernetes.clone(),
            request: self.clone(),
        })
    }
}

impl PodSpec {
    /// The fields in which `other` differs from this spec, as `field: this → other`.
    pub fn diff(&self, other: &PodSpec) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |field: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{field}: {a} → {b}"));
            }
        };
        let path = |p: &Path| p.display().to_string();
        let opt = |p: &Option<PathBuf>| p.as_deref().map_or("(none)".into(), path);
        cmp("netns", path(&self.netns), path(&other.netns));
        cmp("cgroup", path(&self.cgroup), path(&other.cgroup));
        cmp("fail_mode", dbg(&self.fail_mode), dbg(&other.fail_mode));
        cmp(
            "exclude_ports",
            dbg(&self.exclude_ports),
            dbg(&other.exclude_ports),
        );
        cmp(
            "exclude_cidrs",
            cidrs(&self.exclude_cidrs),
            cidrs(&other.exclude_cidrs),
        );
        cmp(
            "exclude_inbound_ports",
            dbg(&self.exclude_inbound_ports),
            dbg(&other.exclude_inbound_ports),
        );
        cmp(
            "probe_ports",
            dbg(&self.probe_ports),
            dbg(&other.probe_ports),
        );
        cmp(
            "udp_allow_ports",
            dbg(&self.udp_allow_ports),
            dbg(&other.udp_allow_ports),
        );
        cmp(
            "udp_outbound",
            dbg(&self.udp_outbound),
            dbg(&other.udp_outbound),
        );
        cmp("mode", dbg(&self.mode), dbg(&other.mode));
        let id = |i: &Option<IdentityFiles>| {
            i.as_ref().map_or("(none)".into(), |f| {
                format!("{}, {}, {}", path(&f.cert), path(&f.key), path(&f.bundle))
            })
        };
        cmp("identity", id(&self.identity), id(&other.identity));
        cmp(
            "workload_api",
            dbg(&self.workload_api),
            dbg(&other.workload_api),
        );
        cmp("policy", opt(&self.policy), opt(&other.policy));
        cmp("redirect", dbg(&self.redirect), dbg(&other.redirect));
        cmp(
            "accelerate",
            self.accelerate.to_string(),
            other.accelerate.to_string(),
        );
        let edge = |e: &[EdgeSpec]| {
            let v: Vec<String> = e
                .iter()
                .map(|e| {
                    format!(
                        "{:?} {}, {}, client_ca {}, redirect_http {}",
                        e.ports,
                        path(&e.files.cert),
                        path(&e.files.key),
                        opt(&e.files.client_ca),
                        e.redirect_http
                    )
                })
                .collect();
            format!("[{}]", v.join("; "))
        };
        cmp("edge", edge(&self.edge), edge(&other.edge));
        cmp("authn", dbg(&self.authn), dbg(&other.authn));
        cmp("limits", dbg(&self.limits), dbg(&other.limits));
        let k8s = |k: &Option<K8sPod>| {
            k.as_ref().map_or("(none)".into(), |k| {
                format!("{k}, sandbox {}", k.container_id)
            })
        };
        cmp("kubernetes", k8s(&self.kubernetes), k8s(&other.kubernetes));
        out
    }
}

fn dbg(v: &impl fmt::Debug) -> String {
    format!("{v:?}").to_lowercase()
}

fn cidrs(v: &[IpNet]) -> String {
    let v: Vec<String> = v.iter().map(ToString::to_string).collect();
    format!("{v:?}")
}

/// The real filesystem.
pub struct System;

impl Probe for System {
    fn netns(&self, path: &Path) -> Result<(), String> {
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("{} cannot be opened: {e}", path.display()))?;
        // A network namespace handle is a file on nsfs (bind-mounted or /proc/PID/ns/net).
        let st = nix::sys::statfs::statfs(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if st.filesystem_type() != nix::sys::statfs::NSFS_MAGIC || meta.is_dir() {
            return Err(format!(
                "{} is not a network namespace (expected e.g. /var/run/netns/NAME or /proc/PID/ns/net)",
                path.display()
            ));
        }
        Ok(())
    }

    fn cgroup(&self, path: &Path) -> Result<(), String> {
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("{} cannot be opened: {e}", path.display()))?;
        let st = nix::sys::statfs::statfs(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_dir() || st.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
            return Err(format!(
                "{} is not a cgroup v2 directory (the cgroup2 mount is listed in /proc/self/mountinfo)",
                path.display()
            ));
        }
        // The root of the hierarchy holds every process on the node: enrolling it would
        // intercept (and, for unknown namespaces, refuse) the whole node's connections.
        if crate::cgroup::cgroup2_mount()
            .is_ok_and(|root| std::fs::canonicalize(path).ok() == std::fs::canonicalize(root).ok())
        {
            return Err(format!(
                "{} is the root of the cgroup hierarchy: that would enroll every process on the node; give the pod's own cgroup",
                path.display()
            ));
        }
        Ok(())
    }

    fn identity_dir(&self, dir: &Path) -> Result<IdentityFiles, String> {
        IdentityFiles::in_dir(dir)
    }

    fn cgroup2_root(&self) -> Result<PathBuf, String> {
        crate::cgroup::cgroup2_mount().map_err(|e| e.to_string())
    }

    fn own_cgroup(&self) -> Result<PathBuf, String> {
        crate::cgroup::own()
            .map(|(dir, _)| dir)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every path exists and is what it claims to be, except those named `/missing...`.
    pub(crate) struct Fake;

    impl Probe for Fake {
        fn netns(&self, path: &Path) -> Result<(), String> {
            ok_unless_missing(path)
        }
        fn cgroup(&self, path: &Path) -> Result<(), String> {
            ok_unless_missing(path)
        }
        fn identity_dir(&self, dir: &Path) -> Result<IdentityFiles, String> {
            ok_unless_missing(dir)?;
            Ok(IdentityFiles {
                cert: dir.join("cert.pem"),
                key: dir.join("key.pem"),
                bundle: dir.join("bundle.pem"),
            })
        }
        fn cgroup2_root(&self) -> Result<PathBuf, String> {
            Ok("/sys/fs/cgroup".into())
        }
        fn own_cgroup(&self) -> Result<PathBuf, String> {
            Ok("/sys/fs/cgroup/kubepods/podabc/ctr1".into())
        }
    }

    fn ok_unless_missing(p: &Path) -> Result<(), String> {
        if p.starts_with("/missing") {
            Err(format!(
                "{} cannot be opened: No such file or directory",
                p.display()
            ))
        } else {
            Ok(())
        }
    }

    pub(crate) fn request(name: &str) -> PodRequest {
        PodRequest {
            name: name.into(),
            netns: format!("/var/run/netns/{name}").into(),
            cgroup: format!("/sys/fs/cgroup/pods/{name}").into(),
            ..Default::default()
        }
    }

    fn check(r: &PodRequest) -> Result<PodSpec, SpecError> {
        r.validate("", &PodDefaults::default(), &Fake)
    }

    #[test]
    fn errors_name_the_field() {
        let mut r = request("a");
        r.netns = "/missing/ns".into();
        assert_eq!(check(&r).unwrap_err().field, "netns");
        let mut r = request("a");
        r.exclude_ports = vec![80, 0];
        assert_eq!(check(&r).unwrap_err().field, "exclude_ports[1]");
        let mut r = request("a");
        r.mode = Mode::Strict;
        let e = check(&r).unwrap_err();
        assert_eq!(e.field, "mode");
        assert!(e.reason.contains("identity"), "{e}");
        let mut r = request("a");
        r.cert = Some("/c".into());
        assert!(check(&r).unwrap_err().reason.contains("go together"));
        let mut r = request("a");
        r.name = "../x".into();
        let e = r
            .validate("pod[3]", &PodDefaults::default(), &Fake)
            .unwrap_err();
        assert_eq!(e.field, "pod[3].name");
    }

    #[test]
    fn identity_dir_or_files() {
        let mut r = request("a");
        r.identity_dir = Some("/ids/a".into());
        r.mode = Mode::Strict;
        let spec = check(&r).unwrap();
        assert_eq!(spec.identity.unwrap().key, PathBuf::from("/ids/a/key.pem"));
        r.cert = Some("/c".into());
        assert!(check(&r).unwrap_err().reason.contains("not both"));
    }

    #[test]
    fn an_identity_from_the_workload_api() {
        let mut r = request("a");
        r.mode = Mode::Strict;
        r.spiffe_socket = Some("/run/spire/agent.sock".into());
        r.spiffe_id = Some("spiffe://td/a".into());
        let api = check(&r).unwrap().workload_api.unwrap();
        assert_eq!(api.endpoint, "unix:///run/spire/agent.sock");
        assert_eq!(api.spiffe_id.unwrap().as_str(), "spiffe://td/a");
        for (socket, why) in [
            ("unix://relative.sock", "absolute path"),
            ("http://spire", "not a Workload API address"),
        ] {
            r.spiffe_socket = Some(socket.into());
            let e = check(&r).unwrap_err();
            assert_eq!(e.field, "spiffe_socket");
            assert!(e.reason.contains(why), "{socket}: {e}");
        }
        r.spiffe_socket = Some("unix:///s".into());
        r.spiffe_id = Some("td/a".into());
        assert_eq!(check(&r).unwrap_err().field, "spiffe_id");
        r.spiffe_id = None;
        r.identity_dir = Some("/ids/a".into());
        assert!(check(&r).unwrap_err().reason.contains("not both"));
        r.identity_dir = None;
        r.spiffe_socket = None;
        r.spiffe_id = Some("spiffe://td/a".into());
        assert_eq!(check(&r).unwrap_err().field, "spiffe_id");
    }

    #[test]
    fn the_same_pod_asked_two_ways_is_the_same_spec() {
        let mut by_dir = request("a");
        by_dir.identity_dir = Some("/ids/a".into());
        let mut by_files = request("a");
        by_files.cert = Some("/ids/a/cert.pem".into());
        by_files.key = Some("/ids/a/key.pem".into());
        by_files.bundle = Some("/ids/a/bundle.pem".into());
        by_files.exclude_ports = vec![22, 22];
        by_dir.exclude_ports = vec![22];
        let (a, b) = (check(&by_dir).unwrap(), check(&by_files).unwrap());
        assert!(a.diff(&b).is_empty(), "{:?}", a.diff(&b));
        let mut other = by_dir.clone();
        other.fail_mode = FailMode::Open;
        other.netns = "/var/run/netns/b".into();
        let d = a.diff(&check(&other).unwrap());
        assert_eq!(
            d,
            vec![
                "netns: /var/run/netns/a → /var/run/netns/b".to_string(),
                "fail_mode: closed → open".to_string()
            ]
        );
    }

    #[test]
    fn the_default_policy_applies_to_pods_without_one() {
        let defaults = PodDefaults {
            policy: Some("/etc/agent/default.yaml".into()),
            upstream_mark: None,
        };
        let spec = request("a").validate("", &defaults, &Fake).unwrap();
        assert_eq!(spec.policy, defaults.policy);
        let mut r = request("a");
        r.redirect = Redirect::Iptables;
        assert_eq!(
            r.validate("", &defaults, &Fake).unwrap_err().field,
            "redirect"
        );
    }

    #[test]
    fn edge_listeners_name_their_field() {
        let edge = |ports: Vec<u16>| EdgeRequest {
            ports,
            dir: Some("/etc/web-tls".into()),
            ..Default::default()
        };
        let mut r = request("a");
        r.edge = vec![edge(vec![8443, 8443])];
        let spec = check(&r).unwrap();
        assert_eq!(spec.edge[0].ports, [8443]);
        assert_eq!(
            spec.edge[0].files.key,
            PathBuf::from("/etc/web-tls/tls.key")
        );
        r.edge = vec![edge(vec![8443]), edge(vec![9443, 8443])];
        assert_eq!(check(&r).unwrap_err().field, "edge[1].ports");
        r.edge = vec![edge(vec![])];
        assert_eq!(check(&r).unwrap_err().field, "edge[0].ports");
        r.edge = vec![EdgeRequest {
            ports: vec![443],
            cert: Some("/c".into()),
            ..Default::default()
        }];
        let e = check(&r).unwrap_err();
        assert_eq!(e.field, "edge[0].cert", "{e}");
        r.edge = vec![edge(vec![443])];
        r.exclude_inbound_ports = vec![443];
        assert!(check(&r)
            .unwrap_err()
            .reason
            .contains("exclude_inbound_ports"));
    }

    #[test]
    fn authn_names_its_field() {
        let mut r = request("a");
        r.authn = Some(AuthnRequest::default());
        assert_eq!(check(&r).unwrap_err().field, "authn.jwt");
        let issuer = JwtIssuerRequest {
            issuer: "https://login.example".into(),
            jwks: "/etc/jwks.json".into(),
            ..Default::default()
        };
        r.authn = Some(AuthnRequest {
            subject_header: Some("X-User".into()),
            jwt: vec![issuer.clone()],
            ..Default::default()
        });
        let spec = check(&r).unwrap().authn.unwrap();
        assert_eq!(spec.jwt[0].clock_skew_seconds, DEFAULT_CLOCK_SKEW_SECONDS);
        assert_eq!(spec.subject_header.as_deref(), Some("x-user"));
        r.authn = Some(AuthnRequest {
            subject_header: Some("bad header".into()),
            jwt: vec![issuer.clone(), issuer],
            ..Default::default()
        });
        assert_eq!(check(&r).unwrap_err().field, "authn.subject_header");
        r.authn.as_mut().unwrap().subject_header = None;
        assert_eq!(check(&r).unwrap_err().field, "authn.jwt[1].issuer");
    }

    #[test]
    fn outbound_udp_follows_the_mode_unless_chosen() {
        let mut r = request("a");
        assert_eq!(check(&r).unwrap().udp_outbound, UdpOutbound::Allow);
        r.identity_dir = Some("/ids/a".into());
        r.mode = Mode::Strict;
        assert_eq!(check(&r).unwrap().udp_outbound, UdpOutbound::Deny);
        r.udp_outbound = Some(UdpOutbound::Allow);
        assert_eq!(check(&r).unwrap().udp_outbound, UdpOutbound::Allow);
        // iptables pods have no cgroup programs: deny cannot be kept, so it is refused.
        let defaults = PodDefaults {
            policy: None,
            upstream_mark: Some(7),
        };
        r.redirect = Redirect::Iptables;
        r.udp_outbound = Some(UdpOutbound::Deny);
        let e = r.validate("", &defaults, &Fake).unwrap_err();
        assert_eq!(e.field, "udp_outbound");
        r.udp_outbound = None;
        let spec = r.validate("", &defaults, &Fake).unwrap();
        assert_eq!(spec.udp_outbound, UdpOutbound::Allow);
    }
}
