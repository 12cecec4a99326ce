//! `cargo xtask vm`: the privileged suite on other kernels, each booted under qemu with the
//! host's root shared read-only, running the test binaries built on the host.

mod image;
mod kernel;
mod qemu;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub use kernel::KNOWN;
use qemu::{Accel, Ended};

/// Test binaries the VMs do not run, with the reason the README gives.
pub const NOT_IN_VMS: &[(&str, &str)] = &[(
    "runtime",
    "it starts containerd and runs pods through CRI; it tests the runtime integration, which \
     does not depend on the kernel beyond what the rest of the suite covers, and takes longer \
     than the whole VM budget under emulation",
)];

/// How much slower than the host a guest is taken to be, for the tests' deadlines
/// (`SIMNODE_TIME_SCALE`): emulated CPUs measured 10-14x slower, shared between guests.
const TCG_TIME_SCALE: u32 = 20;
const KVM_TIME_SCALE: u32 = 2;

pub struct Opts {
    /// Kernel names (see [`KNOWN`]) or paths; empty: every known kernel.
    pub kernels: Vec<String>,
    /// The whole suite with the splice on in every pod.
    pub accelerate: bool,
    /// Passed to every test binary (a test name filter, say).
    pub args: Vec<String>,
}

/// One kernel's result.
pub struct Outcome {
    pub kernel: String,
    /// Only this test binary ran (the kernel is one the agent must refuse).
    pub only: Option<&'static str>,
    pub release: String,
    pub passed: u64,
    pub failed: u64,
    /// Failed tests, or binaries that ended without a result line.
    pub failures: Vec<String>,
    /// What went wrong beyond failed tests: a boot failure, a timeout.
    pub trouble: Option<String>,
    pub wall: Duration,
    pub console: PathBuf,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.trouble.is_none() && self.passed > 0
    }
}

/// Fetches, boots and runs; prints a line per kernel. An error is a problem of the runner
/// itself (a kernel that cannot be fetched); test failures are in the outcomes.
pub fn run(opts: &Opts) -> Result<Vec<Outcome>> {
    let root = crate::target_dir().join("vm");
    // The guests read the host's files live: they run a snapshot, so a build on the host
    // meanwhile changes nothing under them.
    let snapshot = root.join("snapshot");
    let binaries = snapshot_binaries(&test_binaries()?, &snapshot)?;
    let choices: Vec<String> = if opts.kernels.is_empty() {
        KNOWN.iter().map(|k| k.name.to_string()).collect()
    } else {
        opts.kernels.clone()
    };
    let mut kernels = Vec::new();
    for choice in &choices {
        let k = kernel::resolve(choice, &root.join("kernels"))
            .with_context(|| format!("preparing kernel {choice}"))?;
        let dir = root.join("kernels").join(&k.name);
        fs::create_dir_all(&dir)?;
        let initramfs = image::initramfs(&k, &dir)
            .with_context(|| format!("building the initramfs for {}", k.release))?;
        kernels.push((k, initramfs));
    }
    let accel = {
        let (k, initramfs) = &kernels[0];
        let probe = root.join("kvm-probe.log");
        if qemu::kvm_works(k, initramfs, &probe, Duration::from_secs(20)) {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    };
    let scale = match accel {
        Accel::Kvm => KVM_TIME_SCALE,
        Accel::Tcg => TCG_TIME_SCALE,
    };
    println!(
        "vm: {} kernel(s) under {accel:?} at once, {} test binaries each (deadlines x{scale}); not run in VMs: {}",
        kernels.len(),
        binaries.len(),
        NOT_IN_VMS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    );
    let mut env = vec![
        ("CI".to_string(), "true".to_string()),
        // Where the tests find the agent, podapp, loadgen and agent-cni.
        (
            "CARGO_TARGET_DIR".to_string(),
            snapshot.display().to_string(),
        ),
        (simnode::time::SCALE_VAR.to_string(), scale.to_string()),
    ];
    if opts.accelerate {
        env.push((simnode::agent::ACCELERATE_ALL.to_string(), "1".to_string()));
    }
    let cwd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests");
    let outcomes = std::thread::scope(|s| {
        let handles: Vec<_> = kernels
            .iter()
            .map(|(k, initramfs)| {
                let dir = root.join("run").join(&k.name);
                let (cwd, env, args) = (&cwd, &env, &opts.args);
                let binaries: Vec<_> = binaries
                    .iter()
                    .filter(|(name, _)| k.only.is_none_or(|only| only == name))
                    .cloned()
                    .collect();
                s.spawn(move || {
                    let job = image::Job {
                        binaries: &binaries,
                        cwd,
                        args,
                        env,
                    };
                    one(k, initramfs, &job, &dir, accel)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the VM runner panicked")))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    for o in &outcomes {
        println!("{}", summary(o));
    }
    Ok(outcomes)
}

/// Fails naming every kernel whose run did not pass.
pub fn require_ok(outcomes: &[Outcome]) -> Result<()> {
    let bad: Vec<_> = outcomes
        .iter()
        .filter(|o| !o.ok())
        .map(|o| o.kernel.as_str())
        .collect();
    anyhow::ensure!(
        bad.is_empty(),
        "the suite failed in the VM(s) for kernel(s) {} (results and console paths above)",
        bad.join(", ")
    );
    Ok(())
}

/// One kernel: boot (once more if the job never started) and count.
fn one(
    kernel: &kernel::Kernel,
    initramfs: &Path,
    job: &image::Job<'_>,
    dir: &Path,
    accel: Accel,
) -> Result<Outcome> {
    fs::create_dir_all(dir)?;
    let initrd = dir.join("initrd.cpio");
    image::with_job(initramfs, job, dir, &initrd)?;
    let console = dir.join("console.log");
    let began = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut counts = Counts::default();
        let tag = format!("[{}]", kernel.name);
        let boot = qemu::Boot {
            kernel,
            initrd: &initrd,
            console: &console,
            accel,
            cpus: 2,
            memory_mib: 3072,
            start_within: Duration::from_secs(300),
            timeout: Duration::from_secs(40 * 60),
        };
        let ended = qemu::run(&boot, |l| counts.line(&tag, l))?;
        let trouble = match ended {
            Ended::NeverStarted if attempt == 1 => {
                println!("{tag} the guest never started its job: booting it once more");
                continue;
            }
            Ended::NeverStarted => Some("boot failure: the job never started (twice)".to_string()),
            Ended::TimedOut => Some(format!("timed out after {:?}", boot.timeout)),
            Ended::Finished(None) => Some("the guest stopped without the job's exit line".into()),
            Ended::Finished(Some(99)) => {
                Some("the guest could not set up its job (see the console)".into())
            }
            Ended::Finished(Some(_)) => None,
        };
        return Ok(Outcome {
            kernel: kernel.name.clone(),
            only: kernel.only,
            release: kernel.release.clone(),
            passed: counts.passed,
            failed: counts.failed,
            failures: counts.failures,
            trouble,
            wall: began.elapsed(),
            console,
        });
    }
}

/// What the guest's test output adds up to.
#[derive(Default)]
struct Counts {
    passed: u64,
    failed: u64,
    failures: Vec<String>,
    /// The binary running now, and its result line's counts once printed.
    current: Option<(String, Option<(u64, u64)>)>,
}

impl Counts {
    /// Takes one console line; prints one line per test binary as it ends.
    fn line(&mut self, tag: &str, l: &str) {
        if let Some(name) = l.strip_prefix(image::BIN) {
            self.current = Some((name.trim().to_string(), None));
        } else if let Some(rest) = l.strip_prefix(image::BIN_EXIT) {
            let mut it = rest.split_whitespace();
            let (name, rc) = (it.next().unwrap_or("?"), it.next().unwrap_or("?"));
            match self.current.take().and_then(|(_, counts)| counts) {
                Some((p, f)) => println!("{tag} {name}: {p} passed, {f} failed"),
                None if rc == "0" => println!("{tag} {name}: no result line"),
                None => {
                    self.failed += 1;
                    self.failures
                        .push(format!("{name} (exited {rc} without a result)"));
                    println!("{tag} {name}: exited {rc} without a result");
                }
            }
        } else if let Some(rest) = l.strip_prefix("test result: ") {
            let (p, f) = crate::sh::result_counts(rest);
            self.passed += p;
            self.failed += f;
            if let Some((_, counts)) = &mut self.current {
                *counts = Some((p, f));
            }
        } else if let Some(test) = l
            .strip_prefix("test ")
            .and_then(|t| t.strip_suffix(" ... FAILED"))
        {
            let bin = self
                .current
                .as_ref()
                .map(|(b, _)| b.as_str())
                .unwrap_or("?");
            self.failures.push(format!("{bin}::{test}"));
        } else if l.starts_with(image::BOOTED) || l.starts_with(image::STARTED) {
            println!("{tag} {l}");
        }
    }
}

fn summary(o: &Outcome) -> String {
    let mut s = format!(
        "vm {} ({}): {} passed, {} failed in {}m{:02}s",
        o.kernel,
        o.release,
        o.passed,
        o.failed,
        o.wall.as_secs() / 60,
        o.wall.as_secs() % 60
    );
    if let Some(only) = o.only {
        s.push_str(&format!(
            " (only `{only}`: the agent must refuse this kernel)"
        ));
    }
    if let Some(t) = &o.trouble {
        s.push_str(&format!("; {t}"));
    }
    for f in &o.failures {
        s.push_str(&format!("\n  failed: {f}"));
    }
    if !o.ok() {
        s.push_str(&format!("\n  console: {}", o.console.display()));
    }
    s
}

/// The workspace binaries the tests run, besides the test binaries themselves.
const WORKSPACE_BINS: &[&str] = &["agent", "agent-cni", "podapp", "loadgen"];

/// Hard links (copies across file systems) of the test binaries and of the workspace
/// binaries under `dir` (`dir/debug/` holds the latter, as a target directory would).
fn snapshot_binaries(tests: &[(String, PathBuf)], dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let bins = dir.join("debug");
    let test_dir = dir.join("tests");
    fs::create_dir_all(&bins)?;
    fs::create_dir_all(&test_dir)?;
    let link = |from: &Path, to: &Path| -> Result<()> {
        fs::hard_link(from, to)
            .or_else(|_| fs::copy(from, to).map(|_| ()))
            .with_context(|| format!("snapshotting {}", from.display()))
    };
    let debug = crate::target_dir().join("debug");
    for name in WORKSPACE_BINS {
        link(&debug.join(name), &bins.join(name))?;
    }
    // What the build scripts printed, which a test reads next to the agent binary.
    std::os::unix::fs::symlink(debug.join("build"), bins.join("build"))?;
    let mut out = Vec::new();
    for (name, path) in tests {
        let to = test_dir.join(name);
        link(path, &to)?;
        out.push((name.clone(), to));
    }
    Ok(out)
}

/// The integration test binaries of the tests package, built now (the host's own build),
/// without those that do not run in VMs.
fn test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let out = crate::sh::output(
        "cargo",
        &[
            "test",
            "-p",
            "simnode",
            "--tests",
            "--no-run",
            "--message-format=json",
        ],
    )?;
    let mut bins = Vec::new();
    for line in out.lines() {
        let Ok(m) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if m["reason"] != "compiler-artifact" || m["target"]["kind"] != serde_json::json!(["test"])
        {
            continue;
        }
        let (Some(name), Some(exe)) = (m["target"]["name"].as_str(), m["executable"].as_str())
        else {
            continue;
        };
        if NOT_IN_VMS.iter().any(|(n, _)| *n == name) {
            continue;
        }
        bins.push((name.to_string(), PathBuf::from(exe)));
    }
    if bins.is_empty() {
        bail!("cargo built no test binaries for the VMs");
    }
    bins.sort();
    Ok(bins)
}
