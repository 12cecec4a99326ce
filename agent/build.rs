//! Builds the `agent-ebpf` programs with aya-build and leaves the object in OUT_DIR, where
//! `src/ebpf/loader.rs` embeds it.
//!
//! The kernel side needs `-Z build-std=core` for `bpfel-unknown-none`. On these machines
//! that works only with Debian's compiler (it ships the `core` sources), which
//! `cargo xtask setup` links into rustup as the toolchain `bpf-debian`; it is a stable
//! compiler, so RUSTC_BOOTSTRAP=1 unlocks `-Z` for that one nested build.
//!
//! aya-build relays every line of the nested cargo as `cargo:warning=`, which a newcomer
//! reads as about 40 warnings. So the script runs itself a second time as a child for the
//! build, passes on the child's directives to cargo, and shows the nested build's output
//! only when it failed, then whole.
use std::process::Command;

use aya_build::{Package, Toolchain};

/// Set in the child: do the build instead of supervising it.
const INNER: &str = "AGENT_EBPF_BUILD_INNER";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AGENT_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("AGENT_EBPF_TOOLCHAIN").unwrap_or_else(|_| "bpf-debian".into());
    if std::env::var_os(INNER).is_some() {
        return build(&toolchain);
    }
    let out = Command::new(std::env::current_exe()?)
        .env(INNER, "1")
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run the eBPF build step: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        if out.status.success() {
            // Directives (rerun-if-*) pass; the relayed progress lines do not.
            if !line.starts_with("cargo:warning=") {
                println!("{line}");
            }
        } else {
            println!("{line}");
        }
    }
    if !out.status.success() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        anyhow::bail!("the eBPF build failed; its output is above");
    }
    Ok(())
}

fn build(toolchain: &str) -> anyhow::Result<()> {
    if std::env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // The build script is single-threaded here, and aya-build's child inherits this.
        std::env::set_var("RUSTC_BOOTSTRAP", "1");
    }
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "agent-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(toolchain),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF programs failed ({e:#}). Run `cargo xtask setup` as root: it \
             installs bpf-linker and links Debian's rustc as the `{toolchain}` toolchain."
        )
    })
}
