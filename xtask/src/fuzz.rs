//! `cargo xtask fuzz [--seconds N] [TARGET...]`: the cargo-fuzz targets of `fuzz/`, each
//! for a bounded time, after replaying its committed regression inputs.
//!
//! cargo fuzz needs `-Z` flags (the sanitizer); the project's compiler is stable, so
//! RUSTC_BOOTSTRAP=1 unlocks them for this build only. Corpora grow under `fuzz/corpus/`
//! (not committed); seeds in `fuzz/seeds/` and crashes turned into regressions in
//! `fuzz/regressions/` are.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{bail, Context, Result};

pub const TARGETS: &[&str] = &["policy", "config", "detect", "http", "admin"];

/// What one target's run did.
pub struct Outcome {
    /// Inputs executed.
    pub runs: u64,
}

fn fuzz_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn cargo_fuzz(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("fuzz")
        .args(args)
        .current_dir(fuzz_dir())
        .env("RUSTC_BOOTSTRAP", "1");
    cmd
}

fn files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

pub fn run(seconds: u64, targets: &[String]) -> Result<Vec<Outcome>> {
    let targets: Vec<String> = if targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        targets.to_vec()
    };
    for t in &targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("no fuzz target `{t}` (there are: {})", TARGETS.join(", "));
        }
    }
    println!("fuzz: building the targets (optimized, with AddressSanitizer)");
    let status = cargo_fuzz(&["build", "-O"])
        .status()
        .context("cannot run `cargo fuzz`: run `cargo xtask setup`, which installs it")?;
    if !status.success() {
        bail!("building the fuzz targets failed (output above)");
    }
    let mut outcomes = Vec::new();
    for t in &targets {
        let regressions = files_in(&fuzz_dir().join("regressions").join(t));
        if !regressions.is_empty() {
            let mut cmd = cargo_fuzz(&["run", "-O", t]);
            cmd.args(&regressions).args(["--", "-runs=1"]);
            if !cmd.status().context("cargo fuzz")?.success() {
                bail!("fuzz target `{t}` fails on a committed regression input (fuzz/regressions/{t}/, output above)");
            }
        }
        let corpus = fuzz_dir().join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir().join("seeds").join(t);
        let mut cmd = cargo_fuzz(&["run", "-O", t]);
        cmd.arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-print_final_stats=1",
            // A slow input is a finding too, but a hang must not pass as a long run.
            "-timeout=10",
            "-rss_limit_mb=2048",
        ]);
        let started = Instant::now();
        let out = cmd.output().context("cargo fuzz")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            eprintln!("{stderr}");
            bail!(
                "fuzz target `{t}` found a crash: the input is under fuzz/artifacts/{t}/ (replay it with \
                 `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O {t} artifacts/{t}/<file>`); fix it and \
                 copy the input to fuzz/regressions/{t}/"
            );
        }
        let runs = stderr
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if runs == 0 {
            eprintln!("{stderr}");
            bail!("fuzz target `{t}` ran no input");
        }
        let secs = started.elapsed().as_secs();
        println!("fuzz: {t}: {runs} inputs in {secs} s, no crash");
        outcomes.push(Outcome { runs });
    }
    Ok(outcomes)
}
