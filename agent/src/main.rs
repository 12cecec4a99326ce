//! `agent`: the node agent and its command line, in one binary.

use std::{path::PathBuf, process::ExitCode};

mod inspect;

use agent::{admin::client::Target, authz, ca, config, ebpf, run, telemetry};
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
        #[arg(long, env = "AGENT_PIN_ROOT", default_value = config::DEFAULT_PIN_ROOT)]
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
    Policy(authz::cli::PolicyCmd),
    /// A development CA and SPIFFE SVIDs (for demos and tests).
    #[command(subcommand)]
    Ca(ca::CaCmd),
    /// Shell completions: `agent completions bash > /etc/bash_completion.d/agent`.
    Completions { shell: clap_complete::Shell },
    /// Remove everything a stopped agent left pinned in the kernel (fail-closed pods).
    Uninstall {
        #[arg(long, env = "AGENT_PIN_ROOT", default_value = config::DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// Only this pod's pins.
        #[arg(long)]
        pod: Option<String>,
    },
}

/// Exit code for a configuration the agent refuses to start with.
const EXIT_CONFIG: u8 = 2;

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
            let result = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(run::run(cfg)).map_err(anyhow::Error::from));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "agent failed");
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
        Cmd::Policy(authz::cli::PolicyCmd::Show { target }) => {
            inspect::run(&target, inspect::View::Policy)
        }
        Cmd::Maps { pin_root, output } => inspect::maps(&pin_root, output),
        Cmd::Policy(cmd) => {
            let (text, code) = authz::cli::run(cmd);
            if code == 0 {
                println!("{text}");
            } else {
                eprintln!("{text}");
            }
            ExitCode::from(code)
        }
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
        Cmd::Uninstall { pin_root, pod } => match ebpf::uninstall(&pin_root, pod.as_deref()) {
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
