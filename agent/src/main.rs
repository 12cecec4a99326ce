//! `agent`: the node agent and its command line, in one binary.

use std::{path::PathBuf, process::ExitCode};

mod inspect;

use agent::{
    admin::client::Target,
    authz, ca, config, ebpf, run,
    spec::PodRequest,
    telemetry,
    types::{FailMode, Mode, Redirect, UdpOutbound, DEFAULT_PIN_ROOT, DEFAULT_STATE_DIR},
};
use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "agent", version, about = "eBPF transparent interception agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enroll pods: intercept, encrypt, authorize and proxy their TCP connections.
    Run(config::RunArgs),
    /// Sidecar mode's init container: pin the pod's blocking programs and exit (the pod is
    /// fail-closed until `agent run --sidecar` adopts them).
    Init(config::RunArgs),
    /// Enroll a pod into the running agent (the same checks as a [[pod]] of the config).
    Enroll(Box<EnrollArgs>),
    /// Release a pod: drain its connections, then honour its fail mode.
    Release {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Version, uptime, kernel features and the programs attached per pod.
    Status(Target),
    /// The enrolled pods.
    Pods(Target),
    /// Live connections.
    Conns {
        #[command(flatten)]
        target: Target,
        /// Only this pod's.
        #[arg(long)]
        pod: Option<String>,
    },
    /// Each pod's certificate: SPIFFE ID, issuer, expiry.
    Certs(Target),
    /// One connection, from the kernel's redirect through TLS to the deciding rule.
    Explain {
        /// A connection id, or a client address `ip:port` as the agent saw it.
        key: String,
        #[command(flatten)]
        target: Target,
    },
    /// The agent's BPF maps, decoded from their pins (works while the daemon is down).
    Maps {
        #[arg(long, env = "AGENT_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        #[arg(long, short = 'o', value_enum, default_value_t = agent::admin::client::Output::Table)]
        output: agent::admin::client::Output,
    },
    /// The Prometheus metrics page (OpenMetrics text), as a scraper sees it.
    Metrics(Target),
    /// Switch the running agent's log output between `json` and `human`.
    LogFormat {
        format: String,
        #[command(flatten)]
        target: Target,
    },
    /// Change the running agent's log filter (e.g. `debug`, `info,agent::proxy=trace`).
    LogLevel {
        filter: String,
        #[command(flatten)]
        target: Target,
    },
    /// Check a policy file, evaluate a decision offline, or show the policies in force.
    #[command(subcommand)]
    Policy(PolicyCli),
    /// Install agent-cni into the node's CNI configuration, or remove it.
    #[command(subcommand)]
    Cni(CniCmd),
    /// A development CA and SPIFFE SVIDs (for demos and tests).
    #[command(subcommand)]
    Ca(ca::CaCmd),
    /// Shell completions: `agent completions bash > /etc/bash_completion.d/agent`.
    Completions { shell: clap_complete::Shell },
    /// Remove everything a stopped agent left pinned in the kernel (fail-closed pods).
    Uninstall {
        #[arg(long, env = "AGENT_PIN_ROOT", default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// Also forget the pods recorded here, so no agent re-adopts them.
        #[arg(long, env = "AGENT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Only this pod's pins.
        #[arg(long)]
        pod: Option<String>,
    },
}

#[derive(Subcommand)]
enum CniCmd {
    /// Copy agent-cni next to the CNI plugins and append it to the primary conflist.
    Install {
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The plugin binary to install (default: agent-cni next to this binary).
        #[arg(long)]
        plugin: Option<PathBuf>,
        /// The agent's admin socket, as the plugin will reach it.
        #[arg(long, default_value = agent::types::DEFAULT_ADMIN_SOCKET)]
        agent_socket: PathBuf,
    },
    /// Remove exactly what `install` added.
    Uninstall {
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCli {
    /// The policy in force for each pod of the running agent (via the admin API).
    Show {
        #[command(flatten)]
        target: Target,
    },
    #[command(flatten)]
    Offline(authz::cli::PolicyCmd),
}

/// `agent enroll`: one pod, as the flags describe it.
#[derive(clap::Args)]
struct EnrollArgs {
    #[arg(long)]
    name: String,
    /// The pod's network namespace (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    #[arg(long)]
    netns: PathBuf,
    /// The pod's cgroup v2 directory.
    #[arg(long)]
    cgroup: PathBuf,
    /// A directory with the pod's SVID (cert.pem/key.pem/bundle.pem, tls.crt/tls.key/ca.crt,
    /// or svid.pem/svid_key.pem/svid_bundle.pem).
    #[arg(long)]
    identity_dir: Option<PathBuf>,
    /// The SPIFFE Workload API that hands out the pod's SVID (unix:///run/spire/agent.sock).
    #[arg(long)]
    spiffe_socket: Option<String>,
    /// Which SVID to take when the Workload API offers several.
    #[arg(long, requires = "spiffe_socket")]
    spiffe_id: Option<String>,
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    #[arg(long)]
    bundle: Option<PathBuf>,
    #[arg(long)]
    policy: Option<PathBuf>,
    /// strict or permissive.
    #[arg(long, default_value = "permissive")]
    mode: Mode,
    /// closed or open.
    #[arg(long, default_value = "closed")]
    fail_mode: FailMode,
    /// A destination port the pod reaches directly (repeatable).
    #[arg(long = "exclude-port")]
    exclude_ports: Vec<u16>,
    /// A destination CIDR the pod reaches directly (repeatable).
    #[arg(long = "exclude-cidr")]
    exclude_cidrs: Vec<String>,
    /// An inbound port left to the application (repeatable).
    #[arg(long = "exclude-inbound-port")]
    exclude_inbound_ports: Vec<u16>,
    /// A port health probes from the node reach directly (repeatable).
    #[arg(long = "probe-port")]
    probe_ports: Vec<u16>,
    /// A UDP port the pod offers or uses: accepted inbound by STRICT pods (or replied
    /// from), and reachable in the mesh under `--udp-outbound deny` (repeatable).
    #[arg(long = "udp-allow-port")]
    udp_allow_ports: Vec<u16>,
    /// Outbound UDP to the mesh: allow or deny (default: deny for strict, else allow).
    #[arg(long)]
    udp_outbound: Option<UdpOutbound>,
    /// ebpf or iptables.
    #[arg(long, default_value = "ebpf")]
    redirect: Redirect,
    #[arg(long)]
    accelerate: bool,
    #[command(flatten)]
    target: Target,
}

impl EnrollArgs {
    /// The request, with paths made absolute (the agent does not share our directory).
    fn request(&self) -> PodRequest {
        let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        let opt = |p: &Option<PathBuf>| p.as_ref().map(abs);
        PodRequest {
            name: self.name.clone(),
            netns: abs(&self.netns),
            cgroup: abs(&self.cgroup),
            fail_mode: self.fail_mode,
            exclude_ports: self.exclude_ports.clone(),
            exclude_cidrs: self.exclude_cidrs.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            probe_ports: self.probe_ports.clone(),
            udp_allow_ports: self.udp_allow_ports.clone(),
            udp_outbound: self.udp_outbound,
            mode: self.mode,
            cert: opt(&self.cert),
            key: opt(&self.key),
            bundle: opt(&self.bundle),
            identity_dir: opt(&self.identity_dir),
            spiffe_socket: self.spiffe_socket.clone(),
            spiffe_id: self.spiffe_id.clone(),
            policy: opt(&self.policy),
            redirect: self.redirect,
            accelerate: self.accelerate,
            edge: Vec::new(),
            authn: None,
            limits: None,
            kubernetes: None,
        }
    }
}

/// Exit code for a configuration the agent refuses to start with.
const EXIT_CONFIG: u8 = 2;

/// An error and its causes, each said once: messages that already quote their source
/// (`cannot read X: <io error>`) are not followed by it again.
fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = c.source();
    }
    text
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(args) => {
            let cfg = match config::Config::from_args(&args) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("agent: invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            telemetry::init(cfg.log_format, &cfg.log_level);
            tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(),
                           version = env!("CARGO_PKG_VERSION"), "starting");
            // While CAP_SYS_RESOURCE is still held (kernels before 5.11 charge BPF maps to
            // the memlock limit).
            agent::ebpf::probe::lift_memlock_limit();
            // Before the runtime exists: capabilities are per thread, and every thread
            // made later inherits this one's.
            match agent::privilege::drop_to_kept() {
                Ok(d) => tracing::info!(kept = ?d.held, dropped = d.dropped,
                                        bounding_set = d.bounded, "capabilities dropped"),
                Err(e) => {
                    tracing::error!(error = %e, "agent failed");
                    return ExitCode::FAILURE;
                }
            }
            let result = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(run::run(cfg)).map_err(anyhow::Error::from));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %report(e.as_ref()), "agent failed");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Init(mut args) => {
            args.sidecar = true;
            let cfg = match config::Config::from_args(&args) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("agent init: invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match run::init(&cfg) {
                Ok(msg) => {
                    println!("{msg}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("agent init: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "agent", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Cmd::Status(t) => inspect::run(&t, inspect::View::Status),
        Cmd::Pods(t) => inspect::run(&t, inspect::View::Pods),
        Cmd::Conns { target, pod } => inspect::run(&target, inspect::View::Conns(pod)),
        Cmd::Certs(t) => inspect::run(&t, inspect::View::Certs),
        Cmd::Metrics(t) => inspect::run(&t, inspect::View::Metrics),
        Cmd::Explain { key, target } => inspect::run(&target, inspect::View::Explain(key)),
        Cmd::LogLevel { filter, target } => inspect::run(&target, inspect::View::LogLevel(filter)),
        Cmd::LogFormat { format, target } => {
            inspect::run(&target, inspect::View::LogFormat(format))
        }
        Cmd::Enroll(args) => {
            let body = serde_json::to_string(&args.request()).unwrap_or_default();
            inspect::run(&args.target, inspect::View::Enroll(body))
        }
        Cmd::Release { name, target } => inspect::run(&target, inspect::View::Release(name)),
        Cmd::Policy(PolicyCli::Show { target }) => inspect::run(&target, inspect::View::Policy),
        Cmd::Maps { pin_root, output } => inspect::maps(&pin_root, output),
        Cmd::Policy(PolicyCli::Offline(cmd)) => {
            let (text, code) = authz::cli::run(cmd);
            if code == 0 {
                println!("{text}");
            } else {
                eprintln!("{text}");
            }
            ExitCode::from(code)
        }
        Cmd::Cni(cmd) => cni_cmd(cmd),
        Cmd::Ca(cmd) => match ca::run(cmd) {
            Ok(msg) => {
                println!("{msg}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("agent ca: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Uninstall {
            pin_root,
            state_dir,
            pod,
        } => match uninstall(&pin_root, &state_dir, pod.as_deref()) {
            Ok(removed) if removed.is_empty() => {
                println!("nothing pinned under {}", pin_root.display());
                ExitCode::SUCCESS
            }
            Ok(removed) => {
                for p in removed {
                    println!("removed pins of pod {p}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("agent uninstall: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Removes the pins (and the records, so no agent re-adopts what was uninstalled).
fn uninstall(
    pin_root: &std::path::Path,
    state_dir: &std::path::Path,
    pod: Option<&str>,
) -> Result<Vec<String>, ebpf::EbpfError> {
    let removed = ebpf::uninstall(pin_root, pod)?;
    let records = state_dir.join("pods");
    if let Ok(entries) = std::fs::read_dir(&records) {
        for e in entries.flatten() {
            let path = e.path();
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            if pod.is_none() || stem.as_deref() == pod {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(removed)
}

fn cni_cmd(cmd: CniCmd) -> ExitCode {
    use agent::cni::install;
    let result = match cmd {
        CniCmd::Install {
            bin_dir,
            conf_dir,
            plugin,
            agent_socket,
        } => {
            let plugin = plugin.unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join(install::PLUGIN)))
                    .unwrap_or_else(|| PathBuf::from(install::PLUGIN))
            });
            install::install(&plugin, &bin_dir, &conf_dir, &agent_socket).map(|conf| {
                format!(
                    "installed {} and appended it to {}",
                    bin_dir.join(install::PLUGIN).display(),
                    conf.display()
                )
            })
        }
        CniCmd::Uninstall { bin_dir, conf_dir } => {
            install::uninstall(&bin_dir, &conf_dir).map(|changed| {
                if changed.is_empty() {
                    "agent-cni was not installed".to_string()
                } else {
                    let names: Vec<String> =
                        changed.iter().map(|p| p.display().to_string()).collect();
                    format!("removed agent-cni from {}", names.join(", "))
                }
            })
        }
    };
    match result {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agent cni: {e}");
            ExitCode::FAILURE
        }
    }
}
