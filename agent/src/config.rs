//! One validated [`Config`], built from a TOML file, command-line flags and environment
//! variables (flags and env override the file; pods from flags are added to the file's).
//!
//! Everything an operator can get wrong is checked here, before anything touches the
//! kernel, and every error names the field and the reason. Pods are validated by
//! [`crate::spec`], exactly as pods enrolled at runtime are. The filesystem is reached
//! only through a [`Probe`], so building a config is pure; only the top-level run code
//! (and `main`) reads this module.

use std::{
    collections::HashSet,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    identity::SpiffeId,
    k8s::{NodeMode, Template},
    proxy::limits::LimitSettings,
    spec::{PodDefaults, PodRequest, PodSpec, Probe},
    types::{
        parse_cidr, FailMode, LogFormat, Mode, DEFAULT_ADMIN_SOCKET, DEFAULT_INBOUND_PORT,
        DEFAULT_OUTBOUND_PORT, DEFAULT_PIN_ROOT, DEFAULT_STATE_DIR,
    },
};

const DEFAULT_DRAIN_MS: u64 = 5_000;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_HTTP_HEADER_TIMEOUT_MS: u64 = 10_000;
/// Envoy's default (60 KiB) rounded to a power of two.
const DEFAULT_HTTP_MAX_HEADER_BYTES: usize = 64 * 1024;
/// hyper's own floor for its read buffer.
const MIN_HTTP_MAX_HEADER_BYTES: usize = 8 * 1024;
const DEFAULT_DETECT_TIMEOUT_MS: u64 = 1_000;
/// An hour, as Istio's TCP idle timeout: long enough for any pool's keep-alive.
const DEFAULT_IDLE_TIMEOUT_MS: u64 = 3_600_000;

/// The connection and handshake limits, each per pod no larger than the node's.
fn limits(file: &FileConfig) -> Result<LimitSettings, ConfigError> {
    let d = LimitSettings::default();
    let s = LimitSettings {
        connections_per_pod: file
            .max_connections_per_pod
            .unwrap_or(d.connections_per_pod),
        connections: file.max_connections.unwrap_or(d.connections),
        handshakes_per_pod: file.max_handshakes_per_pod.unwrap_or(d.handshakes_per_pod),
        handshakes: file.max_handshakes.unwrap_or(d.handshakes),
    };
    for (field, v) in [
        ("max_connections_per_pod", s.connections_per_pod),
        ("max_connections", s.connections),
        ("max_handshakes_per_pod", s.handshakes_per_pod),
        ("max_handshakes", s.handshakes),
    ] {
        // tokio's semaphores hold at most usize::MAX >> 3 permits.
        if v == 0 || v > (u32::MAX as usize) {
            return Err(invalid(field, "must be between 1 and 4294967295"));
        }
    }
    if s.connections_per_pod > s.connections {
        return Err(invalid(
            "max_connections_per_pod",
            format!(
                "is above max_connections ({}): one pod could take the whole node",
                s.connections
            ),
        ));
    }
    if s.handshakes_per_pod > s.handshakes {
        return Err(invalid(
            "max_handshakes_per_pod",
            format!(
                "is above max_handshakes ({}): one pod could take the whole node",
                s.handshakes
            ),
        ));
    }
    Ok(s)
}

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

impl From<crate::spec::SpecError> for ConfigError {
    fn from(e: crate::spec::SpecError) -> Self {
        ConfigError::Invalid {
            field: e.field,
            reason: e.reason,
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
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
    pub pods: Vec<PodRequest>,
    /// Destinations inside these networks must answer mutual TLS.
    #[serde(default)]
    pub mesh_networks: Vec<String>,
    /// Known workloads: the identity each address must present.
    #[serde(default, rename = "workload")]
    pub workloads: Vec<WorkloadFile>,
    /// How long a PERMISSIVE pod's inbound waits for a client's first bytes to tell TLS
    /// from plaintext (STRICT pods wait up to the handshake timeout for a ClientHello).
    pub protocol_detect_timeout_ms: Option<u64>,
    /// How long a mutual TLS handshake may take, either side.
    pub handshake_timeout_ms: Option<u64>,
    /// How long an inspected HTTP/1 client may take to send a request's headers (slow
    /// senders are closed).
    pub http_header_timeout_ms: Option<u64>,
    /// The largest request head (HTTP/1) or header list (HTTP/2) inspected HTTP accepts.
    pub http_max_header_bytes: Option<usize>,
    /// Open connections (each direction counts) one pod may have; more are shed.
    pub max_connections_per_pod: Option<usize>,
    /// Open connections of the whole node; must be at least the per-pod limit.
    pub max_connections: Option<usize>,
    /// Mutual TLS handshakes in flight in one pod; more are shed.
    pub max_handshakes_per_pod: Option<usize>,
    /// Mutual TLS handshakes in flight on the node; at least the per-pod limit.
    pub max_handshakes: Option<usize>,
    /// A proxied TCP connection with no byte either way for this long is closed.
    pub idle_timeout_ms: Option<u64>,
    /// Where the agent records the pods it enrolled (re-adopted after a restart).
    pub state_dir: Option<PathBuf>,
    /// The policy of pods that name none (without one, such pods deny all inbound).
    pub default_policy: Option<PathBuf>,
    /// The admin API's Unix socket (root-only).
    pub admin_socket: Option<PathBuf>,
    /// Optional loopback TCP address for health, readiness and metrics (off by default).
    pub admin_tcp: Option<String>,
    /// The SO_MARK the agent puts on its upstream sockets of `redirect = "iptables"` pods;
    /// the pod's REDIRECT rule must skip it (`-m mark ! --mark N`).
    pub upstream_mark: Option<u32>,
    /// Node mode: pods a container runtime hands over through the CNI plugin.
    pub node: Option<NodeFile>,
}

/// The `[node]` table: which pods the CNI plugin's requests enrol, and with what.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// The kubelet's cgroup root (default: the cgroup2 mount).
    pub cgroup_root: Option<PathBuf>,
    #[serde(default)]
    pub include_namespaces: Vec<String>,
    #[serde(default)]
    pub exclude_namespaces: Vec<String>,
    /// Each pod's SVID directory, with `{namespace}`, `{pod}`, `{uid}`.
    pub identity_dir: Option<String>,
    /// Each namespace's policy file, with the same placeholders.
    pub policy: Option<String>,
    #[serde(default)]
    pub strict_namespaces: Vec<String>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub fail_mode: FailMode,
}

/// One `[[workload]]` table: an address and the SPIFFE ID it must present.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadFile {
    pub address: String,
    pub identity: String,
}

/// A pod given on the command line: `name=N,netns=PATH,cgroup=PATH[,fail_mode=open]`.
#[derive(Debug, Clone)]
pub struct PodFlag(pub PodRequest);

impl FromStr for PodFlag {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut pod = PodRequest::default();
        let (mut name, mut netns, mut cgroup) = (false, false, false);
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not key=value"))?;
            match k {
                "name" => (pod.name, name) = (v.to_string(), true),
                "netns" => (pod.netns, netns) = (PathBuf::from(v), true),
                "cgroup" => (pod.cgroup, cgroup) = (PathBuf::from(v), true),
                "fail_mode" => pod.fail_mode = v.parse()?,
                "mode" => pod.mode = v.parse()?,
                "identity_dir" => pod.identity_dir = Some(PathBuf::from(v)),
                "policy" => pod.policy = Some(PathBuf::from(v)),
                other => {
                    return Err(format!(
                        "unknown key `{other}` (expected name, netns, cgroup, fail_mode, mode, identity_dir, policy)"
                    ))
                }
            }
        }
        for (given, key) in [(name, "name"), (netns, "netns"), (cgroup, "cgroup")] {
            if !given {
                return Err(format!("missing {key}="));
            }
        }
        Ok(PodFlag(pod))
    }
}

/// `cgroup = "auto"`: the cgroup the agent itself runs in is a container's, directly in
/// the pod's (sidecar mode, without a private cgroup namespace). `cgroup = "uid:UID"`:
/// the kubelet's cgroup of the pod with that UID (from the Downward API), under the
/// cgroup2 mount. Anything else is a path.
fn resolve_cgroup(at: &str, cgroup: &Path, probe: &dyn Probe) -> Result<PathBuf, ConfigError> {
    let field = format!("{at}.cgroup");
    let text = cgroup.to_string_lossy();
    if text == "auto" {
        let own = probe.own_cgroup().map_err(|r| invalid(&field, r))?;
        let root = probe.cgroup2_root().map_err(|r| invalid(&field, r))?;
        if own == root {
            return Err(invalid(
                field,
                "auto: the agent's own cgroup is the root of what it sees (a private cgroup namespace); give cgroup=uid:<pod UID> (the Downward API's metadata.uid) and mount the host's /sys/fs/cgroup",
            ));
        }
        return own
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| invalid(field, "auto: the agent's cgroup has no parent"));
    }
    if let Some(uid) = text.strip_prefix("uid:") {
        let root = probe.cgroup2_root().map_err(|r| invalid(&field, r))?;
        return crate::k8s::find_pod_cgroup(&root, uid).map_err(|r| invalid(field, r));
    }
    Ok(cgroup.to_path_buf())
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
    /// Sidecar mode: serve exactly one pod, the one whose network namespace this process
    /// is in (typically `--pod name=$(POD_NAME),netns=/proc/self/ns/net,cgroup=auto`),
    /// adopting what `agent init` pinned.
    #[arg(long)]
    pub sidecar: bool,
    /// Where enrolled pods are recorded, so a restarted agent re-adopts them.
    #[arg(long, env = "AGENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub probe_sources: Vec<IpAddr>,
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
    #[serde(with = "millis")]
    pub drain_timeout: Duration,
    #[serde(with = "millis")]
    pub connect_timeout: Duration,
    #[serde(with = "millis")]
    pub handshake_timeout: Duration,
    #[serde(with = "millis")]
    pub protocol_detect_timeout: Duration,
    #[serde(with = "millis")]
    pub http_header_timeout: Duration,
    pub http_max_header_bytes: usize,
    pub limits: LimitSettings,
    #[serde(with = "millis")]
    pub idle_timeout: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    /// The pods of the file and the flags, enrolled at start.
    pub pods: Vec<PodSpec>,
    /// What runtime-enrolled pods get unless they choose otherwise.
    #[serde(skip)]
    pub pod_defaults: PodDefaults,
    pub mesh_networks: Vec<IpNet>,
    pub workloads: Vec<(IpAddr, SpiffeId)>,
    pub admin_socket: PathBuf,
    pub admin_tcp: Option<std::net::SocketAddr>,
    /// Node mode (the `[node]` table), when pods come from the CNI plugin.
    pub node: Option<NodeMode>,
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
    /// Reads the file named by the flags (if any), applies the flags and validates
    /// against the real filesystem.
    pub fn from_args(args: &RunArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Self::build(file, args, &crate::spec::System)
    }

    pub fn build(file: FileConfig, args: &RunArgs, probe: &dyn Probe) -> Result<Self, ConfigError> {
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
        let absolute = |field: &str, p: PathBuf, what: &str| {
            if p.is_absolute() {
                Ok(p)
            } else {
                Err(invalid(field, format!("must be an absolute path {what}")))
            }
        };
        let limits = limits(&file)?;
        let pin_root = absolute(
            "pin_root",
            args.pin_root
                .clone()
                .or(file.pin_root)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT)),
            "on bpffs",
        )?;
        let state_dir = absolute(
            "state_dir",
            args.state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            "(e.g. under /run)",
        )?;
        let millis = |field: &str, v: Option<u64>, default: u64| {
            let ms = v.unwrap_or(default);
            if ms == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
            Ok(Duration::from_millis(ms))
        };
        let drain_timeout = Duration::from_millis(
            args.drain_timeout_ms
                .or(file.drain_timeout_ms)
                .unwrap_or(DEFAULT_DRAIN_MS),
        );
        let connect_timeout = millis(
            "connect_timeout_ms",
            file.connect_timeout_ms,
            DEFAULT_CONNECT_TIMEOUT_MS,
        )?;
        let handshake_timeout = millis(
            "handshake_timeout_ms",
            file.handshake_timeout_ms,
            DEFAULT_HANDSHAKE_TIMEOUT_MS,
        )?;
        let protocol_detect_timeout = millis(
            "protocol_detect_timeout_ms",
            file.protocol_detect_timeout_ms,
            DEFAULT_DETECT_TIMEOUT_MS,
        )?;
        let http_header_timeout = millis(
            "http_header_timeout_ms",
            file.http_header_timeout_ms,
            DEFAULT_HTTP_HEADER_TIMEOUT_MS,
        )?;
        let http_max_header_bytes = file
            .http_max_header_bytes
            .unwrap_or(DEFAULT_HTTP_MAX_HEADER_BYTES);
        if !(MIN_HTTP_MAX_HEADER_BYTES..=u32::MAX as usize).contains(&http_max_header_bytes) {
            return Err(invalid(
                "http_max_header_bytes",
                format!("must be at least {MIN_HTTP_MAX_HEADER_BYTES} (and fit in 32 bits)"),
            ));
        }
        let idle_timeout = millis(
            "idle_timeout_ms",
            file.idle_timeout_ms,
            DEFAULT_IDLE_TIMEOUT_MS,
        )?;
        let log_level = args
            .log_level
            .clone()
            .or(file.log_level)
            .unwrap_or_else(|| "info".to_string());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| invalid("log_level", format!("`{log_level}` is not a filter: {e}")))?;

        let pod_defaults = PodDefaults {
            policy: file.default_policy.clone(),
            upstream_mark: file.upstream_mark,
        };
        let all = file
            .pods
            .into_iter()
            .enumerate()
            .map(|(i, p)| (format!("pod[{i}]"), p))
            .chain(
                args.pods
                    .iter()
                    .map(|p| (format!("--pod `{}`", p.0.name), p.0.clone())),
            );
        let (mut pods, mut names, mut netns_seen, mut cgroups_seen) =
            (Vec::new(), HashSet::new(), HashSet::new(), HashSet::new());
        for (field, mut pod) in all {
            pod.cgroup = resolve_cgroup(&field, &pod.cgroup, probe)?;
            let p = pod.validate(&field, &pod_defaults, probe)?;
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
            let id = SpiffeId::parse(&w.identity)
                .map_err(|r| invalid(format!("workload[{i}].identity"), r))?;
            workloads.push((ip.to_canonical(), id));
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
        if args.sidecar {
            check_sidecar(&pods, file.node.is_some())?;
        }
        let node = match file.node {
            None => None,
            Some(n) => Some(node_mode(n, probe)?),
        };
        Ok(Config {
            node,
            admin_tcp,
            mesh_networks,
            workloads,
            admin_socket: file
                .admin_socket
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET)),
            protocol_detect_timeout,
            handshake_timeout,
            http_header_timeout,
            http_max_header_bytes,
            limits,
            idle_timeout,
            outbound_port,
            inbound_port,
            probe_sources,
            pin_root,
            state_dir,
            drain_timeout,
            connect_timeout,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            log_level,
            pods,
            pod_defaults,
        })
    }
}

/// A sidecar serves its own pod and nothing else, fail-closed.
fn check_sidecar(pods: &[PodSpec], node_mode: bool) -> Result<(), ConfigError> {
    if node_mode {
        return Err(invalid(
            "node",
            "--sidecar serves one pod: a [node] table (pods from a runtime) does not go with it",
        ));
    }
    let [pod] = pods else {
        return Err(invalid(
            "--pod",
            format!(
                "--sidecar serves exactly one pod (its own); {} given",
                pods.len()
            ),
        ));
    };
    if pod.fail_mode != FailMode::Closed {
        return Err(invalid(
            "--pod.fail_mode",
            "a sidecar's pod is fail-closed: `agent init` left it blocked for the sidecar to adopt",
        ));
    }
    Ok(())
}

fn node_mode(n: NodeFile, probe: &dyn Probe) -> Result<NodeMode, ConfigError> {
    let cgroup_root = match n.cgroup_root {
        Some(p) if p.is_absolute() => p,
        Some(_) => return Err(invalid("node.cgroup_root", "must be an absolute path")),
        None => probe
            .cgroup2_root()
            .map_err(|r| invalid("node.cgroup_root", r))?,
    };
    let template = |field: &str, t: Option<String>| {
        t.map(|t| Template::parse(&t).map_err(|r| invalid(format!("node.{field}"), r)))
            .transpose()
    };
    Ok(NodeMode {
        cgroup_root,
        include_namespaces: n.include_namespaces,
        exclude_namespaces: n.exclude_namespaces,
        identity_dir: template("identity_dir", n.identity_dir)?,
        policy: template("policy", n.policy)?,
        strict_namespaces: n.strict_namespaces,
        mode: n.mode,
        fail_mode: n.fail_mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{spec::tests::Fake, types::FailMode};

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(Path::new("test.toml"), text)
    }

    fn build(text: &str) -> Result<Config, ConfigError> {
        Config::build(parse(text)?, &RunArgs::default(), &Fake)
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
    fn missing_netns_is_named() {
        let err = build("[[pod]]\nname='a'\nnetns='/missing/ns'\ncgroup='/c'\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("pod[0].netns:"), "{err}");
        assert!(err.contains("/missing/ns"), "{err}");
    }

    #[test]
    fn a_node_may_start_with_no_pods() {
        let cfg = build("outbound_port = 15001\n").unwrap();
        assert!(cfg.pods.is_empty());
        assert_eq!(cfg.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    }

    #[test]
    fn two_pods_may_not_share_a_namespace() {
        let err = build(
            "[[pod]]\nname='a'\nnetns='/n'\ncgroup='/c1'\n[[pod]]\nname='b'\nnetns='/n'\ncgroup='/c2'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("pod[1].netns:"), "{err}");
    }

    #[test]
    fn node_mode_templates_are_checked() {
        let cfg = build("[node]\nidentity_dir = '/var/lib/kubelet/pods/{uid}/spiffe'\n").unwrap();
        let node = cfg.node.unwrap();
        assert_eq!(node.cgroup_root, PathBuf::from("/sys/fs/cgroup"));
        let err = build("[node]\npolicy = '/etc/agent/{ns}.yaml'\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("node.policy:"), "{err}");
        assert!(err.contains("unknown placeholder {ns}"), "{err}");
    }

    #[test]
    fn a_sidecar_finds_its_pod_cgroup_and_serves_only_it() {
        let args = RunArgs {
            sidecar: true,
            pods: vec!["name=web,netns=/proc/self/ns/net,cgroup=auto,mode=strict,identity_dir=/var/run/svid"
                .parse()
                .unwrap()],
            ..Default::default()
        };
        let cfg = Config::build(FileConfig::default(), &args, &Fake).unwrap();
        assert_eq!(
            cfg.pods[0].cgroup,
            PathBuf::from("/sys/fs/cgroup/kubepods/podabc")
        );
        let two = RunArgs {
            pods: vec![
                "name=a,netns=/n1,cgroup=/c1".parse().unwrap(),
                "name=b,netns=/n2,cgroup=/c2".parse().unwrap(),
            ],
            ..args.clone()
        };
        let err = Config::build(FileConfig::default(), &two, &Fake)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly one pod"), "{err}");
        let open = RunArgs {
            pods: vec!["name=a,netns=/n1,cgroup=/c1,fail_mode=open"
                .parse()
                .unwrap()],
            ..args
        };
        let err = Config::build(FileConfig::default(), &open, &Fake)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fail-closed"), "{err}");
    }

    #[test]
    fn timeouts_must_be_positive() {
        let err = build("handshake_timeout_ms = 0\n").unwrap_err().to_string();
        assert!(err.starts_with("handshake_timeout_ms:"), "{err}");
    }
}
