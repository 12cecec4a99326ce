//! `agent`: the node agent and its command line, in one binary.

use std::{path::PathBuf, process::ExitCode};

use agent::{authz, ca, config, ebpf, run, telemetry};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "agent", version, about = "eBPF transparent interception agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enroll pods and proxy their outbound TCP connections.
    Run(config::RunArgs),
    /// Remove everything a stopped agent left pinned in the kernel (fail-closed pods).
    /// Check a policy file, or evaluate a decision offline.
    #[command(subcommand)]
    Policy(authz::cli::PolicyCmd),
    /// A development CA and SPIFFE SVIDs (for demos and tests).
    #[command(subcommand)]
    Ca(ca::CaCmd),
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
