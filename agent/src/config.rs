//! One validated [`Config`], built from a TOML file, command-line flags and environment
//! variables (flags and env override the file; pods from flags are added to the file's).
//!
//! Everything an operator can get wrong is checked here, before anything touches the
//! kernel, and every error names the field and the reason.

use std::{
    collections::HashSet,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Istio's capture ports, so dashboards and muscle memory carry over.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/agent";
const DEFAULT_DRAIN_MS: u64 = 5_000;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Pod names become directory names under the pin root, so keep them tame.
const MAX_POD_NAME: usize = 63;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
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
        match s {
            "closed" => Ok(Self::Closed),
            "open" => Ok(Self::Open),
            other => Err(format!(
                "`{other}` is not a fail mode (expected `closed` or `open`)"
            )),
        }
    }
}

/// The config file, as written by an operator.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub outbound_port: Option<u16>,
    pub inbound_port: Option<u16>,
    /// Node addresses that health probes (kubelet) come from.
    #[serde(default)]
    pub probe_sources: Vec<String>,
    pub pin_root: Option<PathBuf>,
    pub drain_timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    #[serde(default, rename = "pod")]
    pub pods: Vec<PodFile>,
    /// Destinations inside these networks must answer mutual TLS.
    #[serde(default)]
    pub mesh_networks: Vec<String>,
    /// Known workloads: the identity each address must present.
    #[serde(default, rename = "workload")]
    pub workloads: Vec<WorkloadFile>,
    /// How long inbound waits for a client's first bytes to tell TLS from plaintext.
    pub protocol_detect_timeout_ms: Option<u64>,
    /// The policy of pods that name none (without one, such pods deny all inbound).
    pub default_policy: Option<PathBuf>,
    /// The admin API's Unix socket (root-only).
    pub admin_socket: Option<PathBuf>,
    /// Optional loopback TCP address for health, readiness and metrics (off by default).
    pub admin_tcp: Option<String>,
    /// The SO_MARK the agent puts on its upstream sockets of `redirect = "iptables"` pods;
    /// the pod's REDIRECT rule must skip it (`-m mark ! --mark N`).
    pub upstream_mark: Option<u32>,
}

/// One `[[workload]]` table: an address and the SPIFFE ID it must present.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadFile {
    pub address: String,
    pub identity: String,
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

/// One `[[pod]]` table of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodFile {
    pub name: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    #[serde(default)]
    pub fail_mode: FailMode,
    #[serde(default)]
    pub exclude_ports: Vec<u16>,
    #[serde(default)]
    pub exclude_cidrs: Vec<String>,
    /// Inbound ports left to the application untouched (no proxy, no policy).
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
    /// Ports that health probes from `probe_sources` reach directly, in plaintext.
    #[serde(default)]
    pub probe_ports: Vec<u16>,
    #[serde(default)]
    pub mode: Mode,
    /// The pod's SVID: certificate chain, private key and trust bundle (PEM files).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub bundle: Option<PathBuf>,
    /// The pod's authorization policy (YAML).
    pub policy: Option<PathBuf>,
    #[serde(default)]
    pub redirect: Redirect,
    /// Splice the application-to-agent loopback hop in the kernel (sock_ops + sk_msg).
    /// Off by default: the bench did not show a win at every message size
    /// (docs/performance.md).
    #[serde(default)]
    pub accelerate: bool,
}

/// A pod given on the command line: `name=N,netns=PATH,cgroup=PATH[,fail_mode=open]`.
#[derive(Debug, Clone)]
pub struct PodFlag(pub PodFile);

impl FromStr for PodFlag {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut name, mut netns, mut cgroup, mut fail_mode) = (None, None, None, None);
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not key=value"))?;
            match k {
                "name" => name = Some(v.to_string()),
                "netns" => netns = Some(PathBuf::from(v)),
                "cgroup" => cgroup = Some(PathBuf::from(v)),
                "fail_mode" => fail_mode = Some(v.parse()?),
                other => {
                    return Err(format!(
                        "unknown key `{other}` (expected name, netns, cgroup, fail_mode)"
                    ))
                }
            }
        }
        Ok(PodFlag(PodFile {
            name: name.ok_or("missing name=")?,
            netns: netns.ok_or("missing netns=")?,
            cgroup: cgroup.ok_or("missing cgroup=")?,
            fail_mode: fail_mode.unwrap_or_default(),
            exclude_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            probe_ports: Vec::new(),
            mode: Mode::default(),
            cert: None,
            key: None,
            bundle: None,
            policy: None,
            redirect: Redirect::default(),
            accelerate: false,
        }))
    }
}

/// Flags and environment variables of `agent run` that can override the file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct RunArgs {
    /// TOML config file.
    #[arg(long, short = 'c', env = "AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Port of the outbound listener on each pod's loopback.
    #[arg(long, env = "AGENT_OUTBOUND_PORT")]
    pub outbound_port: Option<u16>,
    /// bpffs directory for the pins of fail-closed pods.
    #[arg(long, env = "AGENT_PIN_ROOT")]
    pub pin_root: Option<PathBuf>,
    /// How long to wait for open connections on SIGTERM before cutting them.
    #[arg(long, env = "AGENT_DRAIN_TIMEOUT_MS")]
    pub drain_timeout_ms: Option<u64>,
    #[arg(long, value_enum, env = "AGENT_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// tracing filter, e.g. `info` or `agent=debug`.
    #[arg(long, env = "AGENT_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Enroll a pod: `name=N,netns=PATH,cgroup=PATH[,fail_mode=closed|open]` (repeatable).
    #[arg(long = "pod")]
    pub pods: Vec<PodFlag>,
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub probe_sources: Vec<IpAddr>,
    pub pin_root: PathBuf,
    #[serde(with = "millis")]
    pub drain_timeout: Duration,
    #[serde(with = "millis")]
    pub connect_timeout: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    pub pods: Vec<PodConfig>,
    pub mesh_networks: Vec<IpNet>,
    pub workloads: Vec<(IpAddr, String)>,
    pub admin_socket: PathBuf,
    pub admin_tcp: Option<std::net::SocketAddr>,
    #[serde(with = "millis")]
    pub protocol_detect_timeout: Duration,
    pub upstream_mark: Option<u32>,
}

/// A validated pod.
#[derive(Debug, Clone, Serialize)]
pub struct PodConfig {
    pub name: PodName,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub fail_mode: FailMode,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<IpNet>,
    pub exclude_inbound_ports: Vec<u16>,
    pub probe_ports: Vec<u16>,
    pub mode: Mode,
    pub identity: Option<crate::identity::IdentityFiles>,
    /// The pod's own policy, else the node's default policy, else none (deny all).
    pub policy: Option<PathBuf>,
    pub redirect: Redirect,
    pub accelerate: bool,
}

/// A pod name that is safe to use as a path component.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct PodName(String);

impl PodName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= MAX_POD_NAME
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !s.starts_with('.');
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(format!(
                "`{s}` is not a valid pod name (1-{MAX_POD_NAME} characters of [A-Za-z0-9._-], \
                 not starting with a dot)"
            ))
        }
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

mod millis {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        // toml's message carries the line, column and the offending field.
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }
}

impl Config {
    /// Reads the file named by the flags (if any), applies the flags and validates.
    pub fn from_args(args: &RunArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Self::build(file, args)
    }

    pub fn build(file: FileConfig, args: &RunArgs) -> Result<Self, ConfigError> {
        let outbound_port = args
            .outbound_port
            .or(file.outbound_port)
            .unwrap_or(DEFAULT_OUTBOUND_PORT);
        if outbound_port == 0 {
            return Err(invalid("outbound_port", "must be between 1 and 65535"));
        }
        let inbound_port = file.inbound_port.unwrap_or(DEFAULT_INBOUND_PORT);
        if inbound_port == 0 || inbound_port == outbound_port {
            return Err(invalid(
                "inbound_port",
                "must be between 1 and 65535 and differ from outbound_port",
            ));
        }
        let mut probe_sources = Vec::new();
        for (i, text) in file.probe_sources.iter().enumerate() {
            probe_sources.push(IpAddr::from_str(text).map_err(|e| {
                invalid(
                    format!("probe_sources[{i}]"),
                    format!("`{text}` is not an IP address: {e}"),
                )
            })?);
        }
        let pin_root = args
            .pin_root
            .clone()
            .or(file.pin_root)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT));
        if !pin_root.is_absolute() {
            return Err(invalid("pin_root", "must be an absolute path on bpffs"));
        }
        let drain_ms = args
            .drain_timeout_ms
            .or(file.drain_timeout_ms)
            .unwrap_or(DEFAULT_DRAIN_MS);
        let connect_ms = file
            .connect_timeout_ms
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS);
        if connect_ms == 0 {
            return Err(invalid("connect_timeout_ms", "must be greater than 0"));
        }
        let log_level = args
            .log_level
            .clone()
            .or(file.log_level)
            .unwrap_or_else(|| "info".to_string());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| invalid("log_level", format!("`{log_level}` is not a filter: {e}")))?;

        let mut pods = Vec::new();
        let all = file
            .pods
            .into_iter()
            .map(|p| ("pod", p))
            .chain(args.pods.iter().map(|p| ("--pod", p.0.clone())));
        let (mut names, mut netns_seen, mut cgroups_seen) =
            (HashSet::new(), HashSet::new(), HashSet::new());
        for (i, (origin, pod)) in all.enumerate() {
            let field = if origin == "pod" {
                format!("pod[{i}]")
            } else {
                format!("--pod `{}`", pod.name)
            };
            let mut p = validate_pod(&field, pod)?;
            if p.policy.is_none() {
                p.policy = file.default_policy.clone();
            }
            if p.redirect == Redirect::Iptables && file.upstream_mark.is_none() {
                return Err(invalid(
                    format!("{field}.redirect"),
                    "iptables needs `upstream_mark` (the mark the pod's REDIRECT rule skips), or the agent's own upstream connections would loop back to it",
                ));
            }
            if !names.insert(p.name.clone()) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("pod `{}` is enrolled twice", p.name),
                ));
            }
            if !netns_seen.insert(p.netns.clone()) {
                return Err(invalid(
                    format!("{field}.netns"),
                    format!("{} is already used by another pod", p.netns.display()),
                ));
            }
            if !cgroups_seen.insert(p.cgroup.clone()) {
                return Err(invalid(
                    format!("{field}.cgroup"),
                    format!("{} is already used by another pod", p.cgroup.display()),
                ));
            }
            pods.push(p);
        }
        if pods.is_empty() {
            return Err(invalid(
                "pod",
                "no pod to enroll: add a [[pod]] table to the config file or pass --pod",
            ));
        }
        let mut mesh_networks = Vec::new();
        for (i, text) in file.mesh_networks.iter().enumerate() {
            mesh_networks
                .push(parse_cidr(text).map_err(|r| invalid(format!("mesh_networks[{i}]"), r))?);
        }
        let mut workloads = Vec::new();
        for (i, w) in file.workloads.iter().enumerate() {
            let ip = IpAddr::from_str(&w.address).map_err(|e| {
                invalid(
                    format!("workload[{i}].address"),
                    format!("`{}` is not an IP address: {e}", w.address),
                )
            })?;
            crate::identity::SpiffeId::parse(&w.identity)
                .map_err(|r| invalid(format!("workload[{i}].identity"), r))?;
            workloads.push((ip, w.identity.clone()));
        }
        let admin_tcp = match &file.admin_tcp {
            None => None,
            Some(text) => {
                let addr = std::net::SocketAddr::from_str(text)
                    .map_err(|e| invalid("admin_tcp", format!("`{text}` is not ip:port: {e}")))?;
                if !addr.ip().is_loopback() {
                    return Err(invalid("admin_tcp", format!("`{text}` is not a loopback address: the admin TCP port must not be reachable from the network")));
                }
                Some(addr)
            }
        };
        Ok(Config {
            upstream_mark: file.upstream_mark,
            admin_tcp,
            mesh_networks,
            workloads,
            admin_socket: file
                .admin_socket
                .clone()
                .unwrap_or_else(|| PathBuf::from(crate::admin::client::DEFAULT_SOCKET)),
            protocol_detect_timeout: Duration::from_millis(
                file.protocol_detect_timeout_ms.unwrap_or(1000),
            ),
            outbound_port,
            inbound_port,
            probe_sources,
            pin_root,
            drain_timeout: Duration::from_millis(drain_ms),
            connect_timeout: Duration::from_millis(connect_ms),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            log_level,
            pods,
        })
    }
}

fn validate_pod(field: &str, pod: PodFile) -> Result<PodConfig, ConfigError> {
    let name = PodName::parse(&pod.name).map_err(|r| invalid(format!("{field}.name"), r))?;
    if name.as_str() == crate::ebpf::dump::MAPS_DIR {
        return Err(invalid(
            format!("{field}.name"),
            "`maps` is reserved (the agent pins its maps there)",
        ));
    }
    check_netns(&pod.netns).map_err(|r| invalid(format!("{field}.netns"), r))?;
    check_cgroup(&pod.cgroup).map_err(|r| invalid(format!("{field}.cgroup"), r))?;
    for (list, ports) in [
        ("exclude_ports", &pod.exclude_ports),
        ("exclude_inbound_ports", &pod.exclude_inbound_ports),
        ("probe_ports", &pod.probe_ports),
    ] {
        if let Some(j) = ports.iter().position(|p| *p == 0) {
            return Err(invalid(
                format!("{field}.{list}[{j}]"),
                "port 0 is not a port",
            ));
        }
    }
    let identity = match (pod.cert, pod.key, pod.bundle) {
        (Some(cert), Some(key), Some(bundle)) => {
            Some(crate::identity::IdentityFiles { cert, key, bundle })
        }
        (None, None, None) => None,
        _ => {
            return Err(invalid(
                field.to_string(),
                "cert, key and bundle go together: give all three or none",
            ))
        }
    };
    if pod.mode == Mode::Strict && identity.is_none() {
        return Err(invalid(
            format!("{field}.mode"),
            "strict needs an identity: set cert, key and bundle",
        ));
    }
    if pod.accelerate && pod.redirect == Redirect::Iptables {
        return Err(invalid(
            format!("{field}.accelerate"),
            "the splice needs redirect = \"ebpf\": behind an iptables REDIRECT the sockets do not see the agent's address",
        ));
    }
    let mut cidrs = Vec::new();
    for (j, text) in pod.exclude_cidrs.iter().enumerate() {
        cidrs
            .push(parse_cidr(text).map_err(|r| invalid(format!("{field}.exclude_cidrs[{j}]"), r))?);
    }
    Ok(PodConfig {
        name,
        netns: pod.netns,
        cgroup: pod.cgroup,
        fail_mode: pod.fail_mode,
        exclude_ports: pod.exclude_ports,
        exclude_cidrs: cidrs,
        exclude_inbound_ports: pod.exclude_inbound_ports,
        probe_ports: pod.probe_ports,
        mode: pod.mode,
        identity,
        policy: pod.policy,
        redirect: pod.redirect,
        accelerate: pod.accelerate,
    })
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

fn check_netns(path: &Path) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("{} cannot be opened: {e}", path.display()))?;
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

fn check_cgroup(path: &Path) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("{} cannot be opened: {e}", path.display()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let err = parse("outbound_port = 1\nbogus = 2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml"), "{err}");
        assert!(err.contains("bogus"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_pod_field_is_rejected() {
        let err = parse("[[pod]]\nname='a'\nnetns='/x'\ncgroup='/y'\nexclude='z'\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("exclude"), "{err}");
    }

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
    fn pod_flag() {
        let p: PodFlag = "name=a,netns=/n,cgroup=/c,fail_mode=open".parse().unwrap();
        assert_eq!(p.0.fail_mode, FailMode::Open);
        assert!("name=a,netns=/n"
            .parse::<PodFlag>()
            .unwrap_err()
            .contains("cgroup"));
        assert!("name=a,x=1"
            .parse::<PodFlag>()
            .unwrap_err()
            .contains("unknown key"));
    }

    #[test]
    fn pod_names() {
        assert!(PodName::parse("pod-a.ns_1").is_ok());
        assert!(PodName::parse("../etc").is_err());
        assert!(PodName::parse("").is_err());
    }

    #[test]
    fn missing_netns_is_named() {
        let file = parse("[[pod]]\nname='a'\nnetns='/nonexistent/ns'\ncgroup='/tmp'\n").unwrap();
        let err = Config::build(file, &RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("pod[0].netns:"), "{err}");
        assert!(err.contains("/nonexistent/ns"), "{err}");
    }

    #[test]
    fn no_pods_is_an_error() {
        let err = Config::build(FileConfig::default(), &RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no pod to enroll"), "{err}");
    }
}
