//! Project tasks: `cargo xtask setup | test | demo`.

mod bench;
mod demo;
mod fuzz;
mod setup;
mod sh;
mod vm;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use simnode::image;

#[derive(Parser)]
#[command(name = "xtask", about = "Build, test and demo tasks for the agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (Debian/Ubuntu, as root). Idempotent.
    Setup,
    /// Everything CI checks: fmt, clippy, unit tests, the privileged tests on a simulated
    /// node, and on other kernels under qemu (`vm`).
    Test,
    /// The privileged suite on other kernels (Debian's 6.1, 6.12 and 5.10 by default), each
    /// booted under qemu; per kernel `N passed, M failed` from the guest's own test output.
    Vm {
        /// A known kernel (6.1, 6.12, 5.10), a linux-image .deb or an unpacked kernel
        /// directory; repeatable. Default: every known kernel.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// With the splice on in every pod that does not choose.
        #[arg(long)]
        accelerate: bool,
        /// Passed to every test binary, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the agent on a simulated two-pod node and show what it intercepted.
    Demo,
    /// The cargo-fuzz targets (policy, config, detect, http, admin), each for a bounded
    /// time after replaying its regression inputs.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets.
        targets: Vec<String>,
    },
    /// The agent's OCI image (agent + agent-cni), as an archive for `ctr images import`.
    Image {
        /// From the debug build instead of an optimized one.
        #[arg(long)]
        debug: bool,
    },
    /// Side-by-side performance arms on a simulated node; results in target/bench/.
    Bench {
        /// A short run that only checks the harness (every arm runs and moves bytes).
        #[arg(long)]
        quick: bool,
        /// Only these arms (comma-separated): direct, iptables, ebpf, ebpf+skmsg, mtls,
        /// haproxy-mtls.
        #[arg(long, value_delimiter = ',')]
        arms: Vec<String>,
        /// Record a perf profile of the proxies during every workload
        /// (target/bench/profile/ARM-WORKLOAD.txt).
        #[arg(long)]
        profile: bool,
        /// Rounds per arm (default 5; 1 with --quick).
        #[arg(long)]
        rounds: Option<usize>,
        /// Only re-render results.md and the chart from target/bench/results.json.
        #[arg(long)]
        render: bool,
        /// Instead of the arms: hold many proxied mutual TLS connections open at once and
        /// report the agents' memory per connection (target/bench/scale.json).
        #[arg(long)]
        scale: bool,
        /// With --scale: how many connections.
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// With --scale: how long they are held, seconds.
        #[arg(long, default_value_t = 60)]
        hold_secs: u64,
    },
}

/// Packages whose code is linted and tested (the eBPF crate is linted on the host too).
const LINT: &[&str] = &[
    "clippy",
    "--workspace",
    "--all-targets",
    "--",
    "-D",
    "warnings",
];

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test => test(),
        Cmd::Vm {
            kernels,
            accelerate,
            args,
        } => {
            setup::run()?;
            build_bins()?;
            let outcomes = vm::run(&vm::Opts {
                kernels,
                accelerate,
                args,
            })?;
            vm::require_ok(&outcomes)
        }
        Cmd::Fuzz { seconds, targets } => {
            setup::run()?;
            fuzz::run(seconds, &targets).map(|_| ())
        }
        Cmd::Image { debug } => {
            setup::run()?;
            let profile = if debug { "debug" } else { "release" };
            let mut args = vec!["build", "-p", "agent", "--bins"];
            if !debug {
                args.push("--release");
            }
            sh::run("cargo", &args)?;
            let (path, digest) =
                image::agent(&target_dir().join(profile), &target_dir().join("image"))
                    .map_err(anyhow::Error::msg)?;
            image::verify(&path, image::AGENT_IMAGE, AGENT_IMAGE_FILES)
                .map_err(anyhow::Error::msg)?;
            println!(
                "image {} ({digest}) written to {}\nimport it with: ctr -n k8s.io images import {}",
                image::AGENT_IMAGE,
                path.display(),
                path.display()
            );
            Ok(())
        }
        Cmd::Demo => {
            setup::run()?;
            build_bins()?;
            demo::run()
        }
        Cmd::Bench {
            quick,
            arms,
            profile,
            rounds,
            render,
            scale,
            conns,
            hold_secs,
        } => {
            if render {
                return bench::render();
            }
            let opts = bench::Opts {
                quick,
                arms: arms
                    .iter()
                    .map(|a| bench::Arm::parse(a))
                    .collect::<Result<_>>()?,
                profile,
                rounds,
            };
            setup::run()?;
            if quick {
                build_bins()?;
            } else {
                // Measure optimized binaries.
                sh::run(
                    "cargo",
                    &[
                        "build",
                        "--release",
                        "-p",
                        "agent",
                        "-p",
                        "simnode",
                        "--bins",
                    ],
                )?;
                let release = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/");
                for bin in ["agent", "loadgen", "podapp"] {
                    std::env::set_var(
                        format!("{}_BIN", bin.to_uppercase()),
                        format!("{release}{bin}"),
                    );
                }
            }
            if scale {
                let opts = bench::ScaleOpts {
                    conns,
                    hold: std::time::Duration::from_secs(hold_secs),
                };
                return bench::scale(&opts).map(|_| ());
            }
            bench::run(&opts)
        }
    }
}

/// What the agent's image must hold: both binaries and the dynamic loader they need.
const AGENT_IMAGE_FILES: &[&str] = &["agent", "agent-cni", "lib64/ld-linux-x86-64.so.2"];

fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn build_bins() -> Result<()> {
    sh::run(
        "cargo",
        &["build", "-p", "agent", "-p", "simnode", "--bins"],
    )
}

/// Seconds per fuzz target in the test command (the long runs are in docs/reliability.md).
const FUZZ_SECONDS: u64 = 30;

fn test() -> Result<()> {
    setup::run()?;
    demo::sweep_stale();
    sh::run("cargo", &["fmt", "--all", "--", "--check"])
        .context("formatting differs: run `cargo fmt --all`")?;
    sh::run("cargo", LINT).context("clippy found problems (shown above)")?;
    build_bins()?;
    // The image the manifests name, from the binaries just built: well-formed and complete.
    let (archive, _) = image::agent(&target_dir().join("debug"), &target_dir().join("image"))
        .map_err(anyhow::Error::msg)
        .context("building the OCI image")?;
    image::verify(&archive, image::AGENT_IMAGE, AGENT_IMAGE_FILES)
        .map_err(anyhow::Error::msg)
        .context("the OCI image is malformed")?;
    // The privileged tests share the kernel (cgroup attachments, bpffs, CPU): one at a time.
    let (passed, failed) = sh::cargo_test(
        &[
            "test",
            "--workspace",
            "--exclude",
            "agent-ebpf",
            "--lib",
            "--bins",
            "--tests",
            "--",
            "--test-threads=1",
        ],
        &[],
    )?;
    // The splice (off by default) must not change behaviour: the whole functional suite
    // again with `accelerate = true` in every pod that does not choose otherwise.
    let (passed_accel, failed_accel) = sh::cargo_test(
        &["test", "-p", "simnode", "--tests", "--", "--test-threads=1"],
        &[(simnode::agent::ACCELERATE_ALL, "1")],
    )
    .context("the functional suite failed with acceleration on")?;
    let (passed, failed) = (passed + passed_accel, failed + failed_accel);
    // One closing line for the whole suite (cargo prints one per test binary).
    anyhow::ensure!(passed > 0, "no test ran");
    // The privileged suite on Debian's 6.1 and 6.12 under qemu, and 5.10's refusal.
    let outcomes = vm::run(&vm::Opts {
        kernels: Vec::new(),
        accelerate: false,
        args: Vec::new(),
    })
    .context("the VM runner failed")?;
    vm::require_ok(&outcomes)?;
    let kernels: Vec<String> = outcomes
        .iter()
        .map(|o| format!("{} {} passed", o.kernel, o.passed))
        .collect();
    // Keep the benchmark harness from rotting: every arm must run and move bytes.
    let quick = bench::Opts {
        quick: true,
        arms: Vec::new(),
        profile: false,
        rounds: None,
    };
    bench::run(&quick).context("the quick benchmark failed")?;
    let small = bench::ScaleOpts {
        conns: 200,
        hold: std::time::Duration::from_secs(2),
    };
    bench::scale(&small).context("the quick scale benchmark failed")?;
    // Every parser a peer or an operator can feed, fuzzed for a bounded time.
    let fuzzed = fuzz::run(FUZZ_SECONDS, &[]).context("fuzzing failed")?;
    let inputs: u64 = fuzzed.iter().map(|o| o.runs).sum();
    println!(
        "xtask test: {passed} passed, {failed} failed; in VMs: {}; fuzzed {} targets ({inputs} inputs), no crash",
        kernels.join(", "),
        fuzzed.len()
    );
    Ok(())
}
